"""Cached penultimate features: the input every NeuroInspect solver and editor works on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ._checks import count, eval_mode, images_tensor


@contextmanager
def capture_output(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s forward output under key ``"output"`` while the context is open.

    Only forwards run by the opening thread are recorded: a served model is shared with
    Predict's batcher thread, whose forwards must not overwrite the capture."""
    captured: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            captured["output"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class FeatureExtractor:
    """Splits a classifier into h_b (feature layer, spatially averaged) and h_t (linear head).

    ``feature_layer`` and ``head`` are module names (``"layer3"``, ``"fc"`` for the shapes
    world). Features are the spatial mean of the feature layer's maps, i.e. exactly the
    vector the head sees after global average pooling.
    """

    def __init__(self, classifier: nn.Module, feature_layer: str, *, head: str = "fc") -> None:
        self.classifier = classifier
        self.feature_module = classifier.get_submodule(feature_layer)
        head_module = classifier.get_submodule(head)
        if not isinstance(head_module, nn.Linear):
            raise TypeError(f"head {head!r} must be an nn.Linear, got {type(head_module).__name__}")
        self.head: nn.Linear = head_module

    @torch.no_grad()
    def _map_chunks(self, images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        batch_size = count(batch_size, "batch_size")
        images = images_tensor(images, "images")
        parameter = next(self.classifier.parameters())  # the model's device and input dtype
        with eval_mode(self.classifier), capture_output(self.feature_module) as captured:
            for start in range(0, len(images), batch_size):
                self.classifier(images[start : start + batch_size].to(parameter.device, parameter.dtype))
                yield captured["output"]

    def feature_maps(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Feature-layer maps (N, D, h, w) for images (N, 3, H, W) in [0, 1]."""
        return torch.cat(list(self._map_chunks(images, batch_size)))

    def features(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (N, D): the spatial mean of the feature maps, chunk by chunk."""
        return torch.cat([maps.mean(dim=(2, 3)) for maps in self._map_chunks(images, batch_size)])
