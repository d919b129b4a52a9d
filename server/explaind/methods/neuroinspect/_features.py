"""Cached penultimate features: the input every NeuroInspect solver and editor works on."""

from __future__ import annotations

import difflib
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._checks import count, eval_mode, images_tensor, indices, refuse_inference_mode, tensor_argument


@contextmanager
def capture_forward(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s first input and its output under keys ``"input"`` and
    ``"output"`` while the context is open.

    Only forwards run by the opening thread are recorded: a served model is shared with
    Predict's batcher thread, whose forwards must not overwrite the capture."""
    captured: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            captured["input"], captured["output"] = inputs[0], output

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def last_spatial_module(classifier: nn.Module, images: torch.Tensor, feature_module: nn.Module) -> tuple[nn.Module, int] | None:
    """(module, call) whose output is the last maps (N, C, h, w) with h·w > 1 that
    ``classifier`` computes on ``images`` before ``feature_module``'s output, ``call``
    counting that module's calls in the forward from 0 (a shared activation runs more
    than once); None if there are none. Why: where the feature layer holds vectors (a
    hidden linear layer before the head, as MobileNetV3 has), a neuron's map has to come
    from there (:func:`neuron_gradient_maps`). Outputs are read as (N, C, h, w): a layer
    giving channels last (N, h, w, C) would be misread. The forward runs in eval mode
    without gradients: a model in training mode keeps its mode and BatchNorm statistics."""
    owner = threading.get_ident()
    calls: dict[nn.Module, int] = {}
    handles: list[RemovableHandle] = []
    last: tuple[nn.Module, int] | None = None
    done = False

    def hook(module: nn.Module, _inputs: tuple[object, ...], output: object) -> None:
        nonlocal last, done
        if threading.get_ident() != owner or done:
            return
        call = calls[module] = calls.get(module, -1) + 1
        if module is feature_module:
            done = True
        elif isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
            last = (module, call)

    try:
        handles = [module.register_forward_hook(hook) for module in classifier.modules() if module is not classifier]
        with torch.no_grad(), eval_mode(classifier):
            classifier(images)
    finally:
        for handle in handles:
            handle.remove()
    return last


def neuron_gradient_maps(classifier: nn.Module, images: torch.Tensor, spatial: tuple[nn.Module, int], head: nn.Linear,
                         neurons: torch.Tensor) -> torch.Tensor:
    """Maps (B, h, w) of feature ``neurons[b]`` on image b (B, 3, H, W), for a feature
    layer without spatial extent: Grad-CAM (Selvaraju et al., 2017) for a neuron instead
    of a class. The maps (B, K, h, w) of ``spatial`` = (module, call), as
    :func:`last_spatial_module` gives it, are weighted by the spatial mean of the neuron's
    gradient with respect to each, summed over K, and what speaks against the neuron is
    cut off (ReLU). The forward runs in eval mode (:func:`last_spatial_module`'s reason),
    and no parameter's ``.grad`` is written. Runs under ``torch.no_grad()`` too; inside
    ``torch.inference_mode()`` it raises RuntimeError."""
    refuse_inference_mode("neuron_gradient_maps differentiates the neurons with respect to the maps")
    module, wanted = spatial
    neurons = tensor_argument(neurons, "neurons")
    if neurons.is_floating_point() or neurons.is_complex() or neurons.dtype == torch.bool:
        raise TypeError(f"neurons must be an integer tensor of neuron indices, got {neurons.dtype}")
    if neurons.shape != (len(images),):
        raise ValueError(f"neurons must be ({len(images)},), one neuron per image, got {tuple(neurons.shape)}")
    indices(neurons, "neurons", head.in_features)  # -1 would be the last neuron; one neuron was broadcast to every image
    owner, captured, calls = threading.get_ident(), {}, [0]

    def hook(_module: nn.Module, _inputs: tuple[object, ...], output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner:
            return None
        calls[0] += 1
        if calls[0] - 1 != wanted:
            return None
        captured["maps"] = output.detach().requires_grad_()  # a leaf: its gradient is all that is computed
        return captured["maps"]

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad(), eval_mode(classifier), capture_forward(head) as read:
            classifier(images)
            if "maps" not in captured:
                raise ValueError(f"spatial {spatial!r}: the module runs {calls[0]} times in the classifier's forward, "
                                 f"not {wanted + 1}; take spatial from last_spatial_module")
            picked = read["input"][torch.arange(len(images), device=images.device), neurons].sum()
            (gradient,) = torch.autograd.grad(picked, captured["maps"])
    finally:
        handle.remove()
    return torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * captured["maps"].detach()).sum(dim=1))


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


def modules_like(model: nn.Module, name: str) -> list[str]:
    """Up to 3 module names of ``model`` that ``name``, not one of them, may mean: those
    ending in it (``"layer4"`` of a model wrapped in ``nn.Sequential(normalise, model)``
    is ``"1.layer4"``), else the closest spellings."""
    names = [module_name for module_name, _ in model.named_modules() if module_name]
    return [module_name for module_name in names if module_name.endswith(f".{name}")][:3] or difflib.get_close_matches(name, names, n=3)


def _module_guess(classifier: nn.Module, name: str) -> str:
    """"; did you mean ...?" for a module name that is not there; "" when none is close."""
    close = modules_like(classifier, name)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def split_modules(classifier: nn.Module, feature_layer: str, head: str) -> tuple[nn.Module, nn.Linear]:
    """The modules named ``feature_layer`` and ``head`` (its final ``nn.Linear``) of
    ``classifier``; ValueError or TypeError naming the argument, not torch's bare
    AttributeError, for a name that is not there (with the closest names it has)."""
    if not isinstance(classifier, nn.Module):  # its modules are found by name
        raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
    found = []
    for argument, name in (("feature_layer", feature_layer), ("head", head)):
        if not isinstance(name, str):
            raise TypeError(f"{argument} must be a module name (str), such as 'layer4' or 'fc', got {name!r} ({type(name).__name__})")
        try:
            found.append(classifier.get_submodule(name))
        except AttributeError as error:
            raise ValueError(f"{argument} {name!r} is not a module of the classifier ({error}){_module_guess(classifier, name)}") from None
    feature_module, head_module = found
    if not isinstance(head_module, nn.Linear):
        raise TypeError(f"head {head!r} must be an nn.Linear, got {type(head_module).__name__}")
    return feature_module, head_module


@dataclass
class SplitForward:
    """One forward of a classifier seen through its split: the logits (N, C), the feature
    layer's output (any layout :func:`channel_maps` reads) and the head's input (N, D)."""

    logits: torch.Tensor
    layer_output: torch.Tensor
    head_input: torch.Tensor


def split_forward(classifier: Callable[[torch.Tensor], object], images: torch.Tensor, feature_module: nn.Module,
                  head: nn.Linear, names: tuple[str, str]) -> SplitForward:
    """Run ``classifier`` (the model, or a function calling it) on ``images`` (on its device
    and dtype already) and check the split named ``names`` = (feature_layer, head): both
    modules run, the feature layer's output holds one map per feature (:func:`channel_maps`),
    the head reads one vector per image, the classifier returns a tensor, and the head's
    output is the classifier's (the head is its last operation: a hidden linear layer named
    as the head would explain the wrong decision). ValueError naming the module otherwise."""
    feature_layer, head_name = names
    with capture_forward(feature_module) as layer, capture_forward(head) as read:
        logits = classifier(images)
    if "output" not in layer:
        raise ValueError(f"feature_layer {feature_layer!r} does not run in the classifier's forward; name a layer it runs")
    if "input" not in read:
        raise ValueError(f"head {head_name!r} does not run in the classifier's forward; name its final nn.Linear")
    if read["input"].dim() != 2:
        raise ValueError(f"head {head_name!r} reads inputs of shape {tuple(read['input'].shape[1:])} per image, not one feature vector")
    if not isinstance(logits, torch.Tensor):  # a Hugging Face ModelOutput, a dict, a tuple
        raise ValueError(f"the classifier's output is a {type(logits).__name__}, not a tensor; wrap the model so that it "
                         "returns the logits tensor (N, C)")
    last = logits is read["output"] or (
        logits.shape == read["output"].shape and torch.allclose(logits, read["output"], atol=1e-4, rtol=1e-4))
    if not last:
        raise ValueError(f"head {head_name!r} is not the classifier's last operation (its output is not the classifier's "
                         "logits); name the final nn.Linear as head")
    try:
        channel_maps(layer["output"], head.in_features)
    except ValueError as error:
        raise ValueError(f"feature_layer {feature_layer!r}: {error}; name the layer whose channels the head reads") from None
    return SplitForward(logits, layer["output"], read["input"])


class FeatureExtractor:
    """Splits a classifier into h_b (up to its linear head) and h_t (the head).

    ``feature_layer`` and ``head`` are module names (``"layer3"``, ``"fc"`` for the shapes
    world; ``"encoder"``, ``"heads.head"`` for a torchvision ViT). Features are what the
    head reads: for a ResNet the spatial mean of the feature layer's maps, for a ViT its
    class token, for a model with hidden layers before the head (MobileNetV3) the last
    hidden layer. The feature layer's output, in any layout :func:`channel_maps` reads,
    gives the maps (one per feature) that visualisations mask with. Every call checks
    the split (:func:`split_forward`).
    """

    def __init__(self, classifier: nn.Module, feature_layer: str, *, head: str = "fc") -> None:
        self.classifier = classifier
        self.feature_module, self.head = split_modules(classifier, feature_layer, head)
        self._names = (feature_layer, head)

    def _forward_chunks(self, images: torch.Tensor, batch_size: int, read: Callable[[SplitForward], torch.Tensor]) -> torch.Tensor:
        """``read`` of each chunk of ``batch_size`` images' forward, concatenated. Not a
        generator: the model's mode and hooks are restored before an error reaches the
        caller (a generator's cleanup waits until its traceback is freed)."""
        batch_size = count(batch_size, "batch_size")
        images = images_tensor(images, "images")
        parameter = next(self.classifier.parameters())  # the model's device and input dtype
        parts = []
        with torch.no_grad(), eval_mode(self.classifier):
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size].to(parameter.device, parameter.dtype)
                parts.append(read(split_forward(self.classifier, chunk, self.feature_module, self.head, self._names)))
        return torch.cat(parts)

    def feature_maps(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Feature-layer maps (N, D, h, w) for images (N, 3, H, W) in [0, 1]."""
        return self._forward_chunks(images, batch_size, lambda forward: channel_maps(forward.layer_output, self.head.in_features))

    def features(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (N, D): the head's input, chunk by chunk (copied: a ViT's
        class token is a view that would keep every token of the chunk)."""
        return self._forward_chunks(images, batch_size, lambda forward: forward.head_input.contiguous())
