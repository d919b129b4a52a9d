"""The shapes world's tiny CLIP, an ordinary open_clip model.

The architecture is data (``model_configs/world-clip-tiny.json``, open_clip's
``embed_dim`` / ``vision_cfg`` / ``text_cfg`` format), registered with
``open_clip.add_model_config`` and built by ``open_clip.create_model(name,
pretrained=<checkpoint file>)`` with open_clip's own BPE tokenizer: exactly the
path a user's real CLIP takes, so every CLIP-based method runs unchanged on it.

Training is contrastive on captions of the balanced scenario's train split, with
caption variants ("a photo of a red", "a striped star on sand", the full caption)
so single-attribute zero-shot prompts work. Several captions in a batch can be true
of one image ("a photo of a star" fits every star), so the loss is a multi-positive
InfoNCE whose positives are known exactly from the ground-truth attributes.

    python -m explaind.world.clip --out server/explaind/world/assets/clip
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from .assets import clip_dir
from .render import ATTRIBUTE_VALUES, TEXTURE_WORDS, render
from .scenarios import get_scenario
from .train_classifier import one_cycle_schedule, seed_everything

CLIP_MODEL_NAME = "world-clip-tiny"
MODEL_CONFIG_FILE = Path(__file__).with_name("model_configs") / f"{CLIP_MODEL_NAME}.json"
CHECKPOINT_NAME = "open_clip_model.safetensors"
ZERO_SHOT_TEMPLATE = "a photo of a {}"
CLIP_TRAIN_STEPS = 3000
# Attributes a caption can name, with the word used for each value.
CAPTION_WORDS: dict[str, dict[str, str]] = {
    "shape": {v: v for v in ATTRIBUTE_VALUES["shape"]},
    "colour": {v: v for v in ATTRIBUTE_VALUES["colour"]},
    "texture": dict(TEXTURE_WORDS),
    "background": {v: v for v in ATTRIBUTE_VALUES["background"]},
    "artifact": {"watermark": "watermark"},
}
_WORD_TO_ATTRIBUTE = {word: (attribute, value) for attribute, words in CAPTION_WORDS.items() for value, word in words.items()}


def register_world_clip_config() -> str:
    """Make ``world-clip-tiny`` known to open_clip (idempotent); returns the model name."""
    if CLIP_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_FILE)
    return CLIP_MODEL_NAME


def load_world_clip(
    directory: str | Path | None = None, *, device: str | torch.device = "cpu"
) -> tuple[open_clip.CLIP, Callable[..., torch.Tensor], Callable]:
    """(model in eval mode, open_clip tokenizer, PIL preprocess) from the shipped files only."""
    checkpoint = Path(directory or clip_dir()) / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise FileNotFoundError(f"world CLIP checkpoint missing: {checkpoint} (build it with python -m explaind.world.clip)")
    name = register_world_clip_config()
    model = open_clip.create_model(name, pretrained=str(checkpoint), device=device)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model.eval(), open_clip.get_tokenizer(name), preprocess


def normalize_pixels(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Apply the model's own mean/std to RGB images (N, 3, H, W) in [0, 1]."""
    config = model.visual.preprocess_cfg
    mean = torch.tensor(config["mean"], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Unit-norm image embeddings (N, D) of RGB images (N, 3, H, W) in [0, 1]."""
    return model.encode_image(normalize_pixels(model, images), normalize=True)


def text_token_states(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token states (N, L, W) of the text transformer after its final layer norm.

    This is what Stable Diffusion conditions on (CLIP's "last hidden state"); it is
    differentiable in the model's parameters and works for any open_clip ``CLIP``.
    """
    out = model.forward_intermediates(text=tokens, text_indices=1, normalize_intermediates=True, intermediates_only=True)
    return out["text_intermediates"][-1]


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module, tokenizer: Callable[..., torch.Tensor], words: Sequence[str], template: str = ZERO_SHOT_TEMPLATE
) -> torch.Tensor:
    """Unit-norm text embeddings (K, D) of ``template.format(word)`` for each word."""
    device = next(model.parameters()).device
    return model.encode_text(tokenizer([template.format(w) for w in words]).to(device), normalize=True)


@torch.no_grad()
def evaluate_clip_zero_shot(
    model: nn.Module | None = None,
    tokenizer: Callable[..., torch.Tensor] | None = None,
    *,
    size: int | None = None,
    attributes: Sequence[str] = ("shape", "colour", "texture", "background"),
    batch_size: int = 500,
) -> dict[str, float]:
    """Top-1 zero-shot accuracy per attribute on the balanced test split, prompts ``"a photo of a {x}"``.

    Loads the shipped model when ``model`` is None; ``size`` takes the first N test images.
    """
    if model is None:
        model, tokenizer, _ = load_world_clip()
    model.eval()
    dataset = get_scenario("balanced").dataset("test", size=size)
    classifiers = {a: zero_shot_classifier(model, tokenizer, list(CAPTION_WORDS[a].values())) for a in attributes}
    correct = {a: 0 for a in attributes}
    device = classifiers[attributes[0]].device
    for batch in dataset.batches(batch_size):
        features = encode_images(model, batch.images.to(device))
        for a in attributes:
            predicted = np.array(list(CAPTION_WORDS[a]))[(features @ classifiers[a].T).argmax(1).cpu().numpy()]
            correct[a] += int((predicted == batch.attributes[a]).sum())
    return {a: correct[a] / len(dataset) for a in attributes}


def caption_constraints(caption: str) -> dict[str, str]:
    """Attribute values a caption asserts, read off its words (``{"colour": "red", ...}``)."""
    return dict(_WORD_TO_ATTRIBUTE[w] for w in caption.split() if w in _WORD_TO_ATTRIBUTE)


def sample_caption(attributes: dict[str, str], full_caption: str, rng: np.random.Generator) -> str:
    """One random true caption of a scene: its full caption, a single-attribute prompt or a partial one."""
    if rng.random() < 0.3:
        return full_caption
    named = [a for a in CAPTION_WORDS if attributes[a] in CAPTION_WORDS[a]]
    if rng.random() < 0.5:
        attribute = named[rng.integers(len(named))]
        return ZERO_SHOT_TEMPLATE.format(CAPTION_WORDS[attribute][attributes[attribute]])
    chosen = {a for a in named if rng.random() < 0.5} or {named[rng.integers(len(named))]}
    words = ["a"] + [CAPTION_WORDS[a][attributes[a]] for a in ("colour", "texture") if a in chosen]
    words.append(attributes["shape"] if "shape" in chosen else "shape")
    if "background" in chosen:
        words += ["on", attributes["background"]]
    if "artifact" in chosen:
        words += ["with", "a", "watermark"]
    return " ".join(words)


def prompt_set_loss(
    logits: torch.Tensor, prompts: Sequence[tuple[str, str]], scenes: Sequence[dict[str, str]]
) -> torch.Tensor:
    """Sum over attributes of the zero-shot cross-entropy among that attribute's prompts.

    logits: (N_images, K) against the single-attribute prompts, whose (attribute, value)
    pairs are ``prompts``; attributes with a single prompt (the watermark) are skipped.
    """
    losses = []
    for attribute in dict.fromkeys(a for a, _ in prompts):
        columns = [k for k, (a, _) in enumerate(prompts) if a == attribute]
        if len(columns) < 2:
            continue
        values = [prompts[k][1] for k in columns]
        targets = torch.tensor([values.index(scene[attribute]) for scene in scenes])
        losses.append(F.cross_entropy(logits[:, columns], targets))
    return torch.stack(losses).sum()


def caption_match_matrix(captions: Sequence[str], attributes: Sequence[dict[str, str]]) -> torch.Tensor:
    """(N_images, N_captions) bool: caption j is true of image i (every value it names holds)."""
    constraints = [caption_constraints(c) for c in captions]
    matches = np.ones((len(attributes), len(captions)), dtype=bool)
    for attribute in CAPTION_WORDS:
        have = np.array([a[attribute] for a in attributes])
        want = np.array([c.get(attribute, "") for c in constraints])
        matches &= (want == "")[None, :] | (have[:, None] == want[None, :])
    return torch.from_numpy(matches)


def multi_positive_clip_loss(logits: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where each row/column spreads its target over all true pairs.

    logits, matches: (N_images, N_captions) image-by-caption; every image has at least
    one true caption. Captions true of no image in the batch only serve as negatives.
    """
    targets = matches.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    described = targets.sum(0) > 0
    column_targets = targets[:, described] / targets[:, described].sum(0, keepdim=True)
    text_to_image = -(column_targets * logits[:, described].log_softmax(0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def training_scenes(
    train_size: int, seed: int, watermark_fraction: float
) -> tuple[torch.Tensor, list[dict[str, str]], list[str], torch.Tensor]:
    """Balanced train images (N, 3, 64, 64) uint8, attributes, captions and object masks (N, 64, 64) bool.

    A fraction of scenes gets a watermark so CLIP learns the word (balanced has none).
    """
    dataset = get_scenario("balanced").dataset("train", size=train_size)
    rng = np.random.default_rng(seed)
    images, attributes, captions, object_masks = [], [], [], []
    for index in range(len(dataset)):
        spec = dataset.spec(index)
        if rng.random() < watermark_fraction:
            spec = replace(spec, artifact=True)
        scene = render(spec)
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1))
        attributes.append(scene.attributes)
        captions.append(scene.caption)
        object_masks.append(torch.from_numpy(scene.object_mask))
    return torch.stack(images), attributes, captions, torch.stack(object_masks)


def train_clip(
    *,
    steps: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    train_size: int | None = None,
    watermark_fraction: float = 0.2,
    num_threads: int = 2,
    prompt_set_weight: float = 1.0,
    eval_every: int = 0,
    log: bool = True,
) -> Path:
    """Train the tiny CLIP from scratch and save it as an open_clip checkpoint; returns ``out_dir``.

    ``steps`` defaults to :data:`CLIP_TRAIN_STEPS`. Only as many scenes are rendered as
    ``steps * batch_size`` can visit, so a smoke run (``steps=3``) takes seconds.
    Every batch also contrasts each image against the full set of single-attribute
    prompts ("a photo of a star", ... one per attribute value), per attribute
    (:func:`prompt_set_loss`): with captions alone the shape words collapse into
    "round" and "pointy" early, while the image tower cannot yet tell shapes apart,
    and that saddle leaves the image tower no reason to learn shape.
    ``eval_every`` > 0 logs zero-shot accuracy on 300 test images that often.
    """
    torch.set_num_threads(num_threads)
    seed_everything(seed)
    steps = CLIP_TRAIN_STEPS if steps is None else steps
    train_size = min(train_size or get_scenario("balanced").sizes["train"], steps * batch_size)
    out_dir = Path(out_dir or clip_dir())
    name = register_world_clip_config()
    model = open_clip.create_model(name)
    tokenizer = open_clip.get_tokenizer(name)
    images, attributes, full_captions, _ = training_scenes(train_size, seed, watermark_fraction)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate
    )
    schedule = one_cycle_schedule(optimiser, max_learning_rate=learning_rate, total_steps=steps, warmup_fraction=0.1)
    prompt_pairs = [(attribute, value) for attribute, words in CAPTION_WORDS.items() for value in words]
    prompt_set = [ZERO_SHOT_TEMPLATE.format(CAPTION_WORDS[a][v]) for a, v in prompt_pairs]
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        index = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        # Random flips keep shape identity and double the pose variety.
        batch = images[index].float().div_(255.0)
        flip = torch.rand(len(index), generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        scene_attributes = [attributes[i] for i in index.tolist()]
        captions = [sample_caption(attributes[i], full_captions[i], rng) for i in index.tolist()] + prompt_set
        image_features = encode_images(model, batch)
        text_features = model.encode_text(tokenizer(captions), normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        loss = multi_positive_clip_loss(logits, caption_match_matrix(captions, scene_attributes))
        loss = loss + prompt_set_weight * prompt_set_loss(logits[:, len(index) :], prompt_pairs, scene_attributes)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log and (step % 50 == 0 or step == steps - 1):
            print(f"[clip] step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
        if log and eval_every and (step + 1) % eval_every == 0:
            accuracy = evaluate_clip_zero_shot(model, tokenizer, size=300)
            print(f"[clip] step {step + 1} zero-shot " + ", ".join(f"{a} {v:.2f}" for a, v in accuracy.items()), flush=True)
            model.train()
    return save_world_clip(model.eval(), out_dir)


def save_world_clip(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the fp16 open_clip checkpoint plus an ``open_clip_config.json`` (for ``local-dir:`` loading)
    and the ε its negative cosines need (CLIP_SETTINGS_FILE), which every config naming the directory gets."""
    from ..config import CLIP_SETTINGS_FILE, WORLD_CLIP_ILLUSION_EPSILON
    from .weights import save_weights

    out_dir = Path(out_dir)
    save_weights(model, out_dir / CHECKPOINT_NAME)
    config = {"model_cfg": json.loads(MODEL_CONFIG_FILE.read_text()), "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / CLIP_SETTINGS_FILE).write_text(json.dumps({"illusion_epsilon": WORLD_CLIP_ILLUSION_EPSILON}, indent=2) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=clip_dir())
    parser.add_argument("--steps", type=int, default=CLIP_TRAIN_STEPS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = train_clip(
        steps=args.steps, seed=args.seed, out_dir=args.out, batch_size=args.batch_size,
        train_size=args.train_size, num_threads=args.threads,
    )
    print(f"[clip] trained in {time.perf_counter() - start:.0f}s -> {out}")
    model, tokenizer, _ = load_world_clip(out)
    accuracy = evaluate_clip_zero_shot(model, tokenizer, size=args.eval_size)
    print("[clip] zero-shot top-1 on balanced test: " + ", ".join(f"{a} {v:.3f}" for a, v in accuracy.items()))


if __name__ == "__main__":
    main()
