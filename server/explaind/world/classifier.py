"""The shapes world's classifier: a small ResNet-style CNN, its architecture as data.

The network is ``stem -> layer1..layerK -> avgpool -> fc``. ``layerK`` is the feature
layer (activation maps (N, C, h, w)); its spatial mean is the penultimate feature
vector (N, C) and ``fc`` is the linear head, so every method can split the model into
h_b (features) and h_t (head) by module name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import WORLD_CLASSIFIER_FILES
from .render import SHAPES
from .weights import load_weights, save_weights

# ImageNet-style normalisation applied inside the model, so callers feed [0, 1] RGB.
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of a world classifier; ``widths[-1]`` is the penultimate width D."""

    widths: tuple[int, ...] = (16, 32, 128)
    blocks_per_stage: int = 1
    num_classes: int = len(SHAPES)
    class_names: tuple[str, ...] = SHAPES
    image_size: int = 64
    feature_layer: str = field(default="", compare=False)
    head: str = "fc"

    def __post_init__(self) -> None:
        if not self.feature_layer:
            object.__setattr__(self, "feature_layer", f"layer{len(self.widths)}")
        if len(self.class_names) != self.num_classes:
            raise ValueError("class_names must have num_classes entries")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClassifierConfig:
        raw = json.loads(text)
        raw["widths"] = tuple(raw["widths"])
        raw["class_names"] = tuple(raw["class_names"])
        return cls(**raw)


class _ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class WorldClassifier(nn.Module):
    """Input (N, 3, H, W) RGB in [0, 1]; output logits (N, num_classes)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        first = config.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, first, 3, 2, 1, bias=False), nn.BatchNorm2d(first), nn.ReLU())
        in_channels = first
        for index, width in enumerate(config.widths, start=1):
            stride = 1 if index == 1 else 2
            blocks = [_ResidualBlock(in_channels, width, stride)]
            blocks += [_ResidualBlock(width, width, 1) for _ in range(config.blocks_per_stage - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, config.num_classes)

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Feature-layer activations (N, D, h, w)."""
        x = self.stem((images - self.pixel_mean) / self.pixel_std)
        for index in range(1, len(self.config.widths) + 1):
            x = getattr(self, f"layer{index}")(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.feature_maps(images)), 1))


def save_classifier(model: WorldClassifier, directory: str | Path, *, half: bool = True) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (fp16 by default) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_file, weights_file = WORLD_CLASSIFIER_FILES
    (directory / config_file).write_text(model.config.to_json())
    save_weights(model, directory / weights_file, half=half)
    return directory


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> WorldClassifier:
    """Load a classifier written by :func:`save_classifier`; weights are cast to fp32."""
    config_file, weights_file = WORLD_CLASSIFIER_FILES
    config_path = Path(directory) / config_file
    if not config_path.is_file():
        raise FileNotFoundError(f"classifier config missing: {config_path}")
    model = WorldClassifier(ClassifierConfig.from_json(config_path.read_text()))
    load_weights(model, Path(directory) / weights_file)
    return model.to(device).eval()
