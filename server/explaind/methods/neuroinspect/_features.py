"""Cached penultimate features: the input every NeuroInspect solver and editor works on."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ._checks import count, eval_mode, images_tensor


@contextmanager
def capture_forward(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s first input and its output under keys ``"input"`` and
    ``"output"`` while the context is open.

    Only forwards run by the opening thread are recorded: a served model is shared with
    Predict's batcher thread, whose forwards must not overwrite the capture."""
    captured: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            captured["input"], captured["output"] = inputs[0], output

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def channel_maps(output: torch.Tensor, channels: int) -> torch.Tensor:
    """A feature layer's output as maps (N, channels, h, w), whatever its layout: maps
    (N, C, h, w) as CNNs give them, channels last (N, h, w, C) as Swin does, tokens
    (N, T, C) as a ViT does (a first class token is dropped when the others form a square
    grid of patches), or a vector (N, C), one position. ValueError for any other shape."""
    if output.dim() == 4 and output.shape[1] == channels:
        return output
    if output.dim() == 4 and output.shape[-1] == channels:
        return output.permute(0, 3, 1, 2)
    if output.dim() == 3 and output.shape[-1] == channels:
        for skipped in (0, 1):
            side = math.isqrt(output.shape[1] - skipped)
            if side * side == output.shape[1] - skipped:
                return output[:, skipped:].transpose(1, 2).reshape(len(output), channels, side, side)
    if output.dim() == 2 and output.shape[1] == channels:
        return output[:, :, None, None]
    raise ValueError(f"the feature layer's output {tuple(output.shape)} cannot be read as maps of {channels} channels "
                     "(N, C, h, w), (N, h, w, C), tokens (N, T, C) on a square grid, or (N, C)")


class FeatureExtractor:
    """Splits a classifier into h_b (up to its linear head) and h_t (the head).

    ``feature_layer`` and ``head`` are module names (``"layer3"``, ``"fc"`` for the shapes
    world; ``"encoder"``, ``"heads.head"`` for a torchvision ViT). Features are what the
    head reads: for a CNN the spatial mean of the feature layer's maps, for a ViT its class
    token. The feature layer's output, in any layout :func:`channel_maps` reads, gives
    the maps (one per feature) that visualisations mask with.
    """

    def __init__(self, classifier: nn.Module, feature_layer: str, *, head: str = "fc") -> None:
        self.classifier = classifier
        self.feature_module = classifier.get_submodule(feature_layer)
        head_module = classifier.get_submodule(head)
        if not isinstance(head_module, nn.Linear):
            raise TypeError(f"head {head!r} must be an nn.Linear, got {type(head_module).__name__}")
        self.head: nn.Linear = head_module

    @torch.no_grad()
    def _captured_chunks(self, images: torch.Tensor, batch_size: int, module: nn.Module, key: str) -> Iterator[torch.Tensor]:
        """``module``'s ``key`` ("input" or "output") for each chunk of ``batch_size`` images."""
        batch_size = count(batch_size, "batch_size")
        images = images_tensor(images, "images")
        parameter = next(self.classifier.parameters())  # the model's device and input dtype
        with eval_mode(self.classifier), capture_forward(module) as captured:
            for start in range(0, len(images), batch_size):
                self.classifier(images[start : start + batch_size].to(parameter.device, parameter.dtype))
                yield captured[key]

    def feature_maps(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Feature-layer maps (N, D, h, w) for images (N, 3, H, W) in [0, 1]."""
        chunks = self._captured_chunks(images, batch_size, self.feature_module, "output")
        return torch.cat([channel_maps(output, self.head.in_features) for output in chunks])

    def features(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (N, D): the head's input, chunk by chunk (copied: a ViT's
        class token is a view that would keep every token of the chunk)."""
        features = torch.cat([inputs.contiguous() for inputs in self._captured_chunks(images, batch_size, self.head, "input")])
        if features.dim() != 2:
            raise ValueError(f"the head reads inputs of shape {tuple(features.shape[1:])} per image, not one feature vector")
        return features
