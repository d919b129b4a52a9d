"""Attribute oracle: reads shape, colour, texture and background off an image.

Used only to score generated images in tests and benches, so it is trained on the
balanced scenario with blur, noise and colour jitter: generated samples are softer
than rendered ones and the oracle must still recognise them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .assets import oracle_dir
from .classifier import ClassifierConfig, WorldClassifier
from .render import ATTRIBUTE_VALUES
from .scenarios import get_scenario
from .train_classifier import one_cycle_schedule, seed_everything
from .weights import load_weights, save_weights

ORACLE_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "texture", "background")


class AttributeOracle(nn.Module):
    """One small CNN trunk, one linear head per attribute."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 128)) -> None:
        super().__init__()
        self.trunk = WorldClassifier(ClassifierConfig(widths=widths))
        self.trunk.fc = nn.Identity()
        self.heads = nn.ModuleDict(
            {attribute: nn.Linear(widths[-1], len(ATTRIBUTE_VALUES[attribute])) for attribute in ORACLE_ATTRIBUTES}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images (N, 3, 64, 64) in [0, 1]."""
        features = self.trunk(images)
        return {attribute: head(features) for attribute, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Attribute value names per image, e.g. ``{"shape": array(["star", ...]), ...}``."""
        self.eval()
        logits = [self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return {
            attribute: np.array(ATTRIBUTE_VALUES[attribute])[torch.cat([l[attribute] for l in logits]).argmax(1).numpy()]
            for attribute in ORACLE_ATTRIBUTES
        }


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, noise and brightness/contrast jitter, per image."""
    n = len(images)
    blurred = nn.functional.avg_pool2d(nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=generator)
    images = images * (1 - mix) + blurred * mix
    gain = 1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1)
    images = images * gain + 0.05 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


def train_oracle(
    *,
    epochs: int = 3,
    train_size: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    init_from: WorldClassifier | None = None,
    log: bool = True,
) -> AttributeOracle:
    """Multi-task training with augmentation; ``init_from`` (a balanced classifier) seeds the trunk.

    Shape is the slow attribute to learn from scratch (a long plateau on 2 CPU cores), so
    the build starts the trunk from the balanced classifier and lets augmentation make it
    robust; colour, texture and background heads learn in the first epoch.
    """
    seed_everything(seed)
    batch = get_scenario("balanced").dataset("train", size=train_size).all()
    targets = {
        attribute: torch.tensor([ATTRIBUTE_VALUES[attribute].index(v) for v in batch.attributes[attribute]])
        for attribute in ORACLE_ATTRIBUTES
    }
    oracle = AttributeOracle()
    if init_from is not None:
        trunk = {k: v for k, v in init_from.state_dict().items() if not k.startswith("fc.")}
        oracle.trunk.load_state_dict(trunk)
    optimiser = torch.optim.AdamW(oracle.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(batch.labels) + batch_size - 1) // batch_size)
    schedule = one_cycle_schedule(optimiser, max_learning_rate=3e-3, total_steps=steps, warmup_fraction=0.15)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        oracle.train()
        order = torch.randperm(len(batch.labels), generator=generator)
        for i in range(0, len(order), batch_size):
            index = order[i : i + batch_size]
            logits = oracle(_augment(batch.images[index], generator))
            loss = sum(nn.functional.cross_entropy(logits[a], targets[a][index]) for a in ORACLE_ATTRIBUTES)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
        if log:
            print(f"[oracle] epoch {epoch + 1}/{epochs} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    return oracle.eval()


def oracle_accuracy(oracle: AttributeOracle, size: int = 1200) -> dict[str, float]:
    """Per-attribute accuracy on the balanced test split."""
    batch = get_scenario("balanced").dataset("test", size=size).all()
    predicted = oracle.predict(batch.images)
    return {attribute: float((predicted[attribute] == batch.attributes[attribute]).mean()) for attribute in ORACLE_ATTRIBUTES}


def save_oracle(oracle: AttributeOracle, directory: str | Path = oracle_dir()) -> Path:
    save_weights(oracle, Path(directory) / "oracle.safetensors")
    return Path(directory)


def load_oracle(directory: str | Path = oracle_dir()) -> AttributeOracle:
    return load_weights(AttributeOracle(), Path(directory) / "oracle.safetensors").eval()
