"""Loading classifiers and splitting them into feature extractor h_b and linear head h_t.

A classifier is split by module name: ``h_b`` is the model with its head module
replaced by ``Identity`` (a shallow copy that shares every parameter), so
``h_b(x)`` is the penultimate feature vector (N, D) and ``head(h_b(x))`` equals
``model(x)`` — checked on a probe input at load time. The feature layer's activation
maps (N, C, h, w) are read with a forward hook on that module. An ONNX classifier is
split as a graph instead, before its final linear layer (``split_onnx_classifier``):
its features come from ONNX Runtime and its head is an ``nn.Linear``, so it is ranked,
evaluated and edited like the others, but has no gradients to visualise neurons with.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import pickle
import re
import threading
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

import torch
from torch import nn

from ..class_names import class_name_key
from ..config import (ClassifierSection, ClipSection, ConfigError, DiffusionSection, clip_directory_problem, diffusion_directory_problem,
                      missing_classifier_key, parse_factory, pipeline_components, resize_size_problem)
from ..errors import FailedPrecondition, ModelLoadError
from ..imaging import DECODING_VERSION, InputGeometry
from ..kernels import FLOAT_TYPES, ImageInput, UnsplittableGraph, execution_providers, fixed_batch_size, onnx_runtime_features, run_in_batches, split_onnx_classifier
from ..logs import route_huggingface_loggers, route_torch_loggers
from ..methods.neuroinspect import channel_maps
from ..methods.neuroinspect._features import modules_like

log = logging.getLogger(__name__)


class Preprocess(nn.Module):
    """Normalisation in front of a model that expects normalised input; identity otherwise.
    When enabled, its mean and std are in the state dict, so a feature version's hash
    changes with them (a model without one keeps the identity it had before they were)."""

    def __init__(self, mean: tuple[float, ...] = (), std: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.enabled = bool(mean)
        # (mean, std) as given, one value per channel or one for all (not the float32
        # buffers' 0.48500001430511475); both () when off.
        self.normalization: tuple[tuple[float, ...], tuple[float, ...]] = (tuple(mean), tuple(std)) if self.enabled else ((), ())
        self.register_buffer("mean", torch.tensor(mean or (0.0,)).view(1, -1, 1, 1), persistent=self.enabled)
        self.register_buffer("std", torch.tensor(std or (1.0,)).view(1, -1, 1, 1), persistent=self.enabled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std if self.enabled else images


class Backbone(nn.Module):
    """h_b, the classifier without its head: images (N, 3, S, S) in [0, 1] -> penultimate
    features (N, D) in float32; a half-precision trunk is fed its images in its own type,
    ``compute_dtype``. (``explaind.methods.neuroinspect.FeatureExtractor`` is the in-process
    API's counterpart, which reads the features off the whole classifier.)"""

    def __init__(self, preprocess: Preprocess, trunk: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.trunk = trunk
        self.compute_dtype = parameters_dtype(trunk)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # contiguous: a ViT's class token is a view of all its tokens, which caching it would keep
        features = self.trunk(self.preprocess(images).to(self.compute_dtype))
        return torch.flatten(features, 1).float().contiguous()


def parameters_dtype(module: nn.Module) -> torch.dtype:
    """The floating type ``module`` computes in, which its inputs must have: its first
    floating parameter's (e.g. float16 after ``model.half()``), float32 without one."""
    return next((parameter.dtype for parameter in module.parameters() if parameter.is_floating_point()), torch.float32)


class _LayerTap:
    """A permanent forward hook that records a module's output for the calling thread only."""

    def __init__(self, module: nn.Module) -> None:
        self._local = threading.local()
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # Captures run eagerly. Traced by torch.compile (the compile backend's h_b), reading the
        # thread-local made dynamo guard on it and trace h_b again in every other thread.
        if torch.compiler.is_compiling():
            return
        if getattr(self._local, "armed", False):
            self._local.output = output

    def capture(self, run: Callable[[], Any]) -> tuple[Any, torch.Tensor]:
        """``run()``'s result and the module's output during it."""
        self._local.armed, self._local.output = True, None
        try:
            return run(), self._local.output
        finally:
            self._local.armed, self._local.output = False, None


def model_version(feature_version: str, head_version: str) -> str:
    """What Predict reports for a classifier: short content hashes of h_b and of the head,
    so a head version's (HeadVersion.model_version) is the one Predict gives once served."""
    return f"{feature_version[:12]}.{head_version[:8]}"


@dataclass(frozen=True)
class ClassifierVersion:
    """One immutable (feature extractor, head) pair; the unit the registry swaps.

    ``feature_extractor`` is None where h_b is not a PyTorch module: an ONNX classifier
    split as a graph computes its features with ``onnx_features`` (no gradients), and
    inference-only ones (TorchScript, an ONNX graph that does not end in a linear layer)
    have no head and map images straight to logits with ``predict_fn``.
    """

    name: str
    loader: str
    source: str
    class_names: tuple[str, ...]
    image_size: int
    feature_layer: str
    head_name: str
    feature_extractor: Backbone | None
    head: nn.Linear | None
    # Content hashes: features depend only on h_b, so a head edit keeps the feature cache.
    feature_version: str
    head_version: str
    predict_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    onnx_features: Callable[[torch.Tensor], torch.Tensor] | None = None
    # 0: images are stretched to image_size; else shorter side to this, then centre crop.
    resize_size: int = 0
    interpolation: str = "bilinear"
    # JPEG files decoded at a reduced scale ([classifier].jpeg_reduced_decode, InputGeometry).
    jpeg_reduced_decode: bool = False
    # Why an inference-only classifier (no head) is not split, and what would split it.
    inference_only_reason: str = ""
    # (mean, std) pixels in [0, 1] are normalised by before the model; both (): none.
    normalization: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())
    _tap: _LayerTap | None = field(default=None, repr=False, compare=False)

    @property
    def version(self) -> str:
        return model_version(self.feature_version, self.head_version)

    @functools.cached_property
    def input_geometry(self) -> InputGeometry:
        """How images of any size become this model's (image_size, image_size) input."""
        return InputGeometry(self.image_size, self.resize_size, self.interpolation, self.jpeg_reduced_decode)

    @functools.cached_property  # read on every Predict
    def feature_cache_key(self) -> str:
        """What a stored image's cached features depend on: h_b, how its file is decoded and
        how the image is fitted to its input (a head version's identity, ``feature_version``,
        is h_b's alone). A JPEG decoded at a reduced scale is named apart, with the least side
        it is reduced to (which the margin sets), as the geometry's repr leaves it out: keys
        made without it are those of earlier releases."""
        reduced = f", JPEG reduced to {self.input_geometry.jpeg_min_side} a side" if self.jpeg_reduced_decode else ""
        return hashlib.sha256(f"{self.feature_version}:{self.input_geometry}:decoding {DECODING_VERSION}{reduced}".encode()).hexdigest()

    @property
    def supports_features(self) -> bool:
        """Penultimate features and a linear head: what ranking, evaluation and edits need."""
        return self.head is not None

    def require_split(self, needs: str, *, field: str | None = None) -> None:
        """FailedPrecondition for a call that ``needs`` something only a split classifier
        has (features, a head), saying why this one is not and what would make it so."""
        if not self.supports_features:
            raise FailedPrecondition(f"the {self.loader} classifier is inference-only, and {needs}: {self.inference_only_reason}", field=field)

    @property
    def differentiable(self) -> bool:
        """h_b is a PyTorch module: gradients for visualisations, and the torch backends."""
        return self.feature_extractor is not None

    @property
    def feature_dim(self) -> int:
        return self.head.in_features if self.head is not None else 0

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, D) of images (N, 3, S, S) in [0, 1]."""
        return self.feature_extractor(images) if self.feature_extractor is not None else self.onnx_features(images)

    @torch.inference_mode()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Head outputs (N, C) for features (N, D)."""
        return self.head(features)

    @torch.inference_mode()
    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Activations of ``feature_layer`` as maps (N, D, h, w) for images (N, 3, S, S) in
        [0, 1], whatever the layer's layout (see :func:`channel_maps`)."""
        _, output = self._tap.capture(lambda: self.feature_extractor(images))
        return channel_maps(output, self.feature_dim).float()

    def with_head(self, head: nn.Linear) -> ClassifierVersion:
        """The same feature extractor with another head (what head edits produce)."""
        return dataclasses.replace(self, head=head, head_version=_hash_module(head))


def _hash_module(module: nn.Module) -> str:
    """A digest of ``module``'s state dict: names and raw bytes (as bytes, as numpy has no bfloat16)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _without_submodule(model: nn.Module, dotted: str) -> nn.Module:
    """A shallow copy of ``model`` whose submodule ``dotted`` (one :func:`_require_module`
    found) is ``Identity``; parameters shared."""
    head, *rest = dotted.split(".", 1)
    clone = copy.copy(model)
    clone._modules = dict(model._modules)
    clone._modules[head] = _without_submodule(model._modules[head], rest[0]) if rest else nn.Identity()
    return clone


# Why a head must be an nn.Linear, and what serves a model that ends in another layer.
_LINEAR_HEAD_NEEDED = ("ranking neurons and editing the head need a final linear layer; a model ending in another layer "
                       "(e.g. SqueezeNet's convolution) can be served inference-only, with loader 'torchscript' or 'onnx'")


def _require_module(model: nn.Module, name: str, role: str, source: str | Path) -> nn.Module:
    """Submodule ``name`` of ``model``; ModelLoadError naming the key ``[classifier].<role>``,
    the module names closest to ``name`` and the last ones (where a head is) if absent."""
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n]
        close = modules_like(model, name)
        raise ModelLoadError(f"{source}: no module named {name!r} for [classifier].{role}"
                             f"{f'; close matches are {close}' if close else ''}; last modules are {names[-8:]}")
    return modules[name]


def split_classifier(
    model: nn.Module,
    *,
    name: str,
    loader: str,
    source: str,
    feature_layer: str,
    head: str,
    class_names: tuple[str, ...],
    image_size: int,
    resize_size: int = 0,
    interpolation: str = "bilinear",
    jpeg_reduced_decode: bool = False,
    preprocess: Preprocess,
) -> ClassifierVersion:
    """Split ``model`` by module names and check that ``head(h_b(x)) == model(x)``, to
    the precision of the type the model computes in (:func:`_head_gives_logits`). A
    half-precision model's head is served in float32, as its features are."""
    _check_resize_size(resize_size, image_size)
    head_module = _require_module(model, head, "head", source)
    tapped = _require_module(model, feature_layer, "feature_layer", source)
    if not isinstance(head_module, nn.Linear):
        raise ModelLoadError(f"{source}: head {head!r} is a {type(head_module).__name__}, not an nn.Linear: {_LINEAR_HEAD_NEEDED}")
    if feature_layer == head or head.startswith(f"{feature_layer}."):  # the features stop before the head: it cannot be among them
        raise ModelLoadError(f"{source}: [classifier].feature_layer {feature_layer!r} {'is' if feature_layer == head else 'holds'} the head "
                             f"{head!r}; name a layer the model runs before the head, whose output the head reads "
                             "(docs/configuration.md, Torchvision architectures)")
    if head_module.bias is None:  # ranking and head edits work with a bias; a zero one changes no output
        head_module = _replace_with_linear(model, head, source)
    model.eval()
    extractor = Backbone(preprocess, _without_submodule(model, head)).eval()
    tap = _LayerTap(tapped)
    device = next(model.parameters()).device  # the CPU but for an exported program placed at load
    probe = _probe_images(image_size).to(device)
    with torch.inference_mode():
        expected = model(preprocess(probe).to(extractor.compute_dtype)).float()
        features, layer_output = tap.capture(lambda: extractor(probe))
    # Now that the model has run; h_b has an Identity in its place. Outside inference mode,
    # which would leave its parameters inference tensors that head edits cannot train.
    head_module.float()
    with torch.inference_mode():
        # Either would fail the comparison below (NaN equals nothing), told as a misnamed head.
        _require_finite_head(head_module, source, head)
        if not torch.isfinite(expected).all():
            raise ModelLoadError(f"{source}: the model's logits for the {len(probe)} random images its split is checked on are NaN or "
                                 "infinite (a float16 overflow, a division by zero?), so head(h_b(x)) == model(x) cannot be checked; "
                                 "mend the model, or serve it inference-only (loader 'torchscript' or 'onnx')")
        if features.shape[1] != head_module.in_features or not _head_gives_logits(head_module, features, expected, extractor.compute_dtype):
            raise ModelLoadError(f"{source}: {head!r} is not the last operation of the model (head(h_b(x)) != model(x)); name the final linear layer as head")
    if not isinstance(layer_output, torch.Tensor):
        raise ModelLoadError(f"{source}: feature_layer {feature_layer!r} does not run in the model's forward or returns no single tensor; "
                             "name the layer whose channels the head reads")
    try:
        channel_maps(layer_output, head_module.in_features)
    except ValueError as error:
        raise ModelLoadError(f"{source}: feature_layer {feature_layer!r}: {error}; name the layer whose channels the head reads") from None
    if head_module.out_features != len(class_names):
        raise ModelLoadError(f"{source}: the head has {head_module.out_features} outputs but {len(class_names)} class names were given")
    return ClassifierVersion(
        name=name,
        loader=loader,
        source=source,
        class_names=tuple(class_names),
        image_size=image_size,
        feature_layer=feature_layer,
        head_name=head,
        feature_extractor=extractor,
        head=head_module,
        feature_version=_hash_module(extractor),
        head_version=_hash_module(head_module),
        resize_size=resize_size,
        interpolation=interpolation,
        jpeg_reduced_decode=jpeg_reduced_decode,
        normalization=preprocess.normalization,
        _tap=tap,
    )


def _fitting(section: ClassifierSection, resize_size: int = 0, interpolation: str = "bilinear") -> dict[str, Any]:
    """How images are fitted to the input: what the config sets, else the model's own
    (``resize_size`` and ``interpolation`` of torchvision weights by name)."""
    return {"resize_size": resize_size if section.resize_size is None else section.resize_size,
            "interpolation": section.interpolation or interpolation, "jpeg_reduced_decode": section.jpeg_reduced_decode}


def _check_resize_size(resize_size: int, image_size: int) -> None:
    """The config's check of the sizes it sets, for the model's own (image_size 0, a weights' resize)."""
    if problem := resize_size_problem(resize_size, image_size):
        raise ModelLoadError(problem)


def load_classifier(section: ClassifierSection, *, device: str | torch.device = "cpu", num_threads: int = 0) -> ClassifierVersion:
    """Load the configured classifier; raises :class:`ModelLoadError` naming the file.
    Models load on the CPU and the engine moves them to ``device``, except an exported
    program, which is placed on ``device`` as it loads (see :func:`_load_export`).
    ``num_threads`` caps the intra-op threads of an ONNX classifier's ONNX Runtime
    sessions ([runtime].num_threads; 0: one per core)."""
    # Which keys each reads is explaind.config's _LOADER_READS: a file's other keys are warned of as unused.
    loaders = {
        "world": _load_world,
        "torchvision": _load_torchvision,
        "export": functools.partial(_load_export, device=torch.device(device)),
        "factory": _load_factory,
        "torchscript": _load_torchscript,
        "onnx": functools.partial(_load_onnx, device=torch.device(device), num_threads=num_threads),
    }
    if problem := missing_classifier_key(section):
        raise ModelLoadError(problem)
    try:
        return loaders[section.loader](section)
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - any loader failure becomes one clear message
        where = section.path or section.weights or section.factory or section.name
        raise ModelLoadError(f"cannot load classifier ({section.loader}) from {where}: {type(error).__name__}: {error}") from error


def _class_names(section: ClassifierSection, count: int = 0, *, shipped: Sequence[str] = ()) -> tuple[str, ...]:
    """The configured class names, else those ``shipped`` with the model's weights, else
    ``class_<i>`` for each of the model's ``count`` outputs; configured names must be one
    per output (``count`` 0: not known yet)."""
    names: tuple[str, ...] = ()
    if section.class_names:
        names, source = tuple(section.class_names), "[classifier].class_names"
    elif section.class_names_file:
        path = Path(section.class_names_file)
        if not path.is_file():
            raise ModelLoadError(f"class names file not found: {path}")
        try:  # UTF-8 whatever the locale; a byte order mark (Windows Notepad's) is not part of the first name
            text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")  # not "utf-8-sig", whose error offsets leave out the mark
        except UnicodeDecodeError as error:
            raise ModelLoadError(f"class names file {path}: not UTF-8 text (byte {error.start})") from None
        names, source = tuple(line.strip() for line in text.splitlines() if line.strip()), f"class names file {path}"
        if not names:  # else "required", for a key that is set
            raise ModelLoadError(f"class names file {path} holds no class names (one per line)")
    if names:
        # Calls name classes by name, so two alike would rank one class and edit the other.
        first: dict[str, int] = {}
        for index, name in enumerate(names):
            if (key := class_name_key(name)) in first:
                spelled = "" if names[first[key]] == name else " (in other Unicode code points, alike once normalised)"
                raise ModelLoadError(f"{source}: {name!r} names both class {first[key]} and class {index}{spelled}; "
                                     f"class names must be unique (e.g. {name + ' (2)'!r})")
            first[key] = index
        if count and len(names) != count:
            raise ModelLoadError(f"the model has {count} outputs but {source} gives {len(names)} class names; give one per output, in their order")
        return names
    return tuple(shipped) or tuple(f"class_{i}" for i in range(count))


def _require_file(path: str, what: str) -> Path:
    if not Path(path).exists():
        raise ModelLoadError(f"[classifier].{what} not found: {path}")
    return Path(path)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's message tells to pass weights_only=False, which no key does
        detail = str(error).rpartition("WeightsUnpickler error:")[2].strip().splitlines()[0].partition(" was not an allowed")[0][:300]
        if detail.startswith("Unsupported operand"):  # its first bytes are no pickle: not a checkpoint at all
            raise ModelLoadError(f"{path} is not a file torch.save wrote ({detail}): it is damaged or another format, such as a "
                                 "Git LFS pointer or the web page of a failed download; fetch the weights file again") from None
        raise ModelLoadError(f"{path} holds objects other than tensors ({detail}), as a whole model saved with torch.save(model), "
                             "or a training checkpoint's saved arguments or optimiser, does; save the model's state dict alone, "
                             "e.g. torch.save(model.state_dict(), 'weights.pth') or torch.save(checkpoint['model'], 'weights.pth')") from None
    if isinstance(state, dict):
        # A training checkpoint holds the state dict under a key: "state_dict" (Lightning,
        # timm), "model" (torchvision's reference scripts) or "model_state_dict" (PyTorch's
        # tutorials).
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        # (Distributed)DataParallel's module saved as is: every key under "module.".
        if state and all(isinstance(key, str) and key.startswith("module.") for key in state):
            state = {key.removeprefix("module."): value for key, value in state.items()}
        return state
    # A bare tensor or a list of them: weights_only loads it, and a tensor answered "in" with torch's RuntimeError.
    raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict (layer names to tensors); "
                         "save the model's state dict, e.g. torch.save(model.state_dict(), 'weights.pth')")


def _load_world(section: ClassifierSection) -> ClassifierVersion:
    from ..world.classifier import load_classifier as load_world_classifier

    directory = _require_file(section.path, "path (a world classifier directory)")
    model = load_world_classifier(directory)
    config = model.config
    return split_classifier(
        model,
        name=f"world:{directory.name}",
        loader="world",
        source=str(directory),
        feature_layer=section.feature_layer or config.feature_layer,
        head=section.head or config.head,
        class_names=_class_names(section, shipped=config.class_names),
        image_size=section.image_size or config.image_size,
        **_fitting(section),
        preprocess=Preprocess(section.mean, section.std),
    )


# Where torchvision's classifiers split (docs/configuration.md, Torchvision architectures):
# (pattern of the architecture's name, head, feature_layer), the first match applies,
# to each key [classifier] leaves unset; ResNet's ("fc", "layer4") for any other name.
TORCHVISION_SPLITS: tuple[tuple[str, str, str], ...] = (
    (r"regnet_", "fc", "trunk_output"),
    (r"shufflenet_v2_", "fc", "conv5"),
    (r"googlenet", "fc", "inception5b"),
    (r"inception_v3", "fc", "Mixed_7c"),
    (r"efficientnet_|mobilenet_v2", "classifier.1", "features"),
    (r"mnasnet", "classifier.1", "layers"),
    (r"mobilenet_v3_", "classifier.3", "classifier.1"),
    (r"convnext_", "classifier.2", "features"),
    (r"densenet", "classifier", "features"),
    (r"swin_", "head", "features"),
    (r"vgg", "classifier.6", "classifier.4"),
    (r"alexnet", "classifier.6", "classifier.5"),
    (r"vit_", "heads.head", "encoder"),
    (r"maxvit_", "classifier.5", "classifier.4"),
)


def torchvision_split(architecture: str) -> tuple[str, str]:
    """(head, feature_layer) of torchvision architecture ``architecture`` (e.g. "efficientnet_b0")."""
    return next(((head, layer) for pattern, head, layer in TORCHVISION_SPLITS if re.match(pattern, architecture)), ("fc", "layer4"))


def _load_torchvision(section: ClassifierSection) -> ClassifierVersion:
    """A torchvision architecture with a state-dict file, or with torchvision weights by
    name (then with their class names, input size, resize and normalisation unless configured),
    split where TORCHVISION_SPLITS says unless the section says."""
    import torchvision

    default_head, default_layer = torchvision_split(section.name)
    head = section.head or default_head
    if section.weights and not Path(section.weights).exists():
        model, weights = _torchvision_pretrained(section)
        transforms = weights.transforms()
        source, image_size, mean, std = str(weights), transforms.crop_size[0], tuple(transforms.mean), tuple(transforms.std)
        # Their resize for their crop (256 for 224); at another input size, in that ratio.
        resize_size = round((section.image_size or image_size) * transforms.resize_size[0] / image_size)
        interpolation = transforms.interpolation.value
        class_names = _class_names(section, shipped=weights.meta["categories"])
    else:
        path = _require_file(section.weights, "weights file")
        state = _load_state_dict(path)
        if f"{head}.weight" not in state:  # else "class_names is required", or torch's list of every missing key
            keys = [str(key) for key in state][:5]
            raise ModelLoadError(f"{path}: no {head + '.weight'!r} in the state dict, so it is not one of torchvision's {section.name} with "
                                 f"head {head!r} (its first keys: {keys}; its last linear layers: {_linear_layers(state)[-3:]}); "
                                 "set [classifier].head to the final linear layer's name, or save the model's state_dict()")
        class_names = _class_names(section, state[f"{head}.weight"].shape[0])
        model = torchvision.models.get_model(section.name, weights=None, num_classes=len(class_names))
        _load_architecture_state(model, state, path, f"torchvision's {section.name}",
                                 "set [classifier].name to the architecture the weights were saved from")
        source, image_size, mean, std, resize_size, interpolation = str(path), 224, (), (), 0, "bilinear"
        if not section.mean:  # served as is, its predictions are quietly worse, often one class for every image
            log.warning("%s: served without normalisation ([classifier].mean and .std unset), but torchvision's %s does not normalise "
                        "its images itself: set the mean and std it was trained with (ImageNet's: mean = [0.485, 0.456, 0.406], "
                        "std = [0.229, 0.224, 0.225])", path, section.name)
    return split_classifier(
        model,
        name=section.name,
        loader="torchvision",
        source=source,
        feature_layer=section.feature_layer or default_layer,
        head=head,
        class_names=class_names,
        image_size=section.image_size or image_size,
        **_fitting(section, resize_size, interpolation),
        preprocess=Preprocess(section.mean or mean, section.std or std),
    )


def _load_architecture_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, architecture: str, fix: str) -> None:
    """Loads ``state`` into ``model``; weights of another architecture (resnet18's as
    resnet34) are refused in one line naming what does not fit and the ``fix``, where
    torch lists every missing key."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        expected = model.state_dict()
        # BatchNorm fills a missing num_batches_tracked itself: never what failed.
        missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
        unexpected = [str(key) for key in state if key not in expected]
        resized = [f"{key} {tuple(state[key].shape)} for {tuple(value.shape)}" for key, value in expected.items()
                   if key in state and isinstance(state[key], torch.Tensor) and state[key].shape != value.shape]
        found = [f"{len(keys)} {what} (first: {', '.join(keys[:3])})"
                 for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (resized, "of another shape")) if keys]
        if not found:  # not a mismatch of keys or shapes: torch's own error says what
            raise
        raise ModelLoadError(f"{path} does not fit {architecture}: its state dict has {'; '.join(found)}; {fix}") from None


def _linear_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the layers with a 2-D ``weight`` in a state dict, in its order: the
    candidates for a head (the final one is usually last)."""
    return [str(key).removesuffix(".weight") for key, value in state.items()
            if str(key).endswith(".weight") and isinstance(value, torch.Tensor) and value.dim() == 2]


def _torchvision_pretrained(section: ClassifierSection) -> tuple[nn.Module, Any]:
    """(model, weights enum member) for ``weights`` naming torchvision weights ("DEFAULT",
    "IMAGENET1K_V2" or "ResNet50_Weights.IMAGENET1K_V2"), downloaded once into the torch
    hub cache."""
    import torchvision

    try:
        known = torchvision.models.get_model_weights(section.name)
    except (KeyError, ValueError):
        raise ModelLoadError(f"[classifier].name: torchvision has no model {section.name!r}") from None
    try:
        weights = known[section.weights.removeprefix(f"{known.__name__}.")]
    except KeyError:
        raise ModelLoadError(f"[classifier].weights {section.weights!r} is neither a file nor a weights name of torchvision's "
                             f"{section.name} ({', '.join(known.__members__)})") from None
    try:
        return torchvision.models.get_model(section.name, weights=weights), weights
    except Exception as error:  # noqa: BLE001 - a download: no network, a full disk, a bad cache file
        raise ModelLoadError(f"cannot get torchvision weights {weights} (downloaded once into {torch.hub.get_dir()}, "
                             f"so the first start needs the network): {type(error).__name__}: {error}") from None


def _load_export(section: ClassifierSection, device: torch.device) -> ClassifierVersion:
    """A ``torch.export.save`` program (.pt2), unflattened back into its module tree so it
    splits like an eager model: TorchScript's successor, with explanations. Tracing bakes
    devices into the graph (constants, ``device=`` arguments), so the program is moved to
    ``device`` before it is unflattened; ``.to()`` on the result would miss them."""
    path = _require_file(section.path, "path (a .pt2 file from torch.export.save)")
    program = _read_exported_program(path)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    image_size = _exported_image_size(program, section.image_size, path)
    model = torch.export.unflatten(program)
    head = section.head or "fc"
    dtype = parameters_dtype(model)
    preprocess = Preprocess(section.mean, section.std).to(device)
    probe = preprocess(torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)).to(dtype)
    try:
        with torch.inference_mode():
            expected, alone = model(probe), model(probe[:1])
    except Exception as error:  # noqa: BLE001 - a static batch size or input size fails here
        raise ModelLoadError(
            f"{path}: the program does not run on (1 | 3, 3, {image_size}, {image_size}) images ({type(error).__name__}); export "
            f"it with a dynamic batch, dynamic_shapes=({{0: torch.export.Dim('batch')}},), at [classifier].image_size") from None
    if not torch.allclose(alone, expected[:1], atol=_tolerance(dtype), rtol=_tolerance(dtype)):
        # .eval() cannot reach into a traced graph: batch norm would mix the batcher's callers.
        raise ModelLoadError(f"{path}: an image's output depends on the rest of its batch; the program was exported in "
                             "training mode: call model.eval() before torch.export.export")
    _replace_with_linear(model, head, path)
    with torch.inference_mode():
        if not torch.allclose(model(probe), expected, atol=1e-5, rtol=1e-5):
            raise ModelLoadError(f"{path}: head {head!r} is not a plain linear layer (x @ weight.T + bias)")
    return split_classifier(
        model,
        name=path.stem,
        loader="export",
        source=str(path),
        feature_layer=section.feature_layer or "layer4",
        head=head,
        class_names=_class_names(section, model.get_submodule(head).out_features),
        image_size=image_size,
        **_fitting(section),
        preprocess=preprocess,
    )


def _replace_with_linear(model: nn.Module, name: str, source: str | Path) -> nn.Linear:
    """Put an ``nn.Linear`` with the same parameters in place of submodule ``name``, with a
    zero bias where it had none: an unflattened program's layers are graph interpreters,
    and the ranking and head edits need a Linear with a bias. Returns the new layer."""
    module = _require_module(model, name, "head", source)
    parameters = dict(module.named_parameters(recurse=False))
    weight, bias = parameters.get("weight"), parameters.get("bias")
    if weight is None or weight.dim() != 2 or set(parameters) - {"weight", "bias"}:
        shapes = {key: tuple(value.shape) for key, value in sorted(parameters.items())}
        raise ModelLoadError(f"{source}: head {name!r} has parameters {shapes}, not a linear layer's weight (C, D) and bias: {_LINEAR_HEAD_NEEDED}")
    linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias if bias is not None else torch.zeros_like(linear.bias))
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, linear)
    return linear


def _load_factory(section: ClassifierSection) -> ClassifierVersion:
    try:  # a config's was checked as it was read; a section built in code is checked here
        module_name, function = parse_factory(section.factory)
    except ConfigError as error:
        raise ModelLoadError(str(error)) from None
    model = getattr(importlib.import_module(module_name), function)(**section.factory_kwargs)
    route_torch_loggers()  # a factory calling torch._logging.set_logs() brought torch's own stderr lines back
    if section.weights:
        path = _require_file(section.weights, "weights file")
        _load_architecture_state(model, _load_state_dict(path), path, f"the model {section.factory} builds",
                                 "make [classifier].factory and .factory_kwargs build the architecture the weights were saved from")
    head = dict(model.named_modules()).get(section.head)
    return split_classifier(
        model,
        name=section.factory,
        loader="factory",
        source=section.weights or section.factory,
        feature_layer=section.feature_layer,
        head=section.head,
        class_names=_class_names(section, getattr(head, "out_features", 0)),  # a missing head is reported by the split
        image_size=section.image_size or 224,
        **_fitting(section),
        preprocess=Preprocess(section.mean, section.std),
    )


def _inference_only(section: ClassifierSection, loader: str, path: Path, digest: str,
                    fn: Callable[[torch.Tensor], torch.Tensor], reason: str, *, scores_dtype: torch.dtype = torch.float32) -> ClassifierVersion:
    """``fn`` maps images to logits, or to probabilities where the model ends in a softmax:
    then it is served their logarithms, logits whose softmax gives back the same
    probabilities (the softmax of probabilities would flatten them). ``digest`` identifies
    the model's files and normalisation; ``reason`` says why it is not split, and what
    would split it, for the calls it refuses. ``scores_dtype`` is the precision the model
    computes them in (:func:`_tolerance`), whatever type ``fn`` returns them as."""
    image_size = section.image_size or 224
    fitting = _fitting(section)
    _check_resize_size(fitting["resize_size"], image_size)
    probe = torch.cat([fn(image) for image in _probe_images(image_size).split(1)])  # one at a time: a fixed batch of 1 loads too
    if probe.dim() != 2 or len(probe) != 2 or not probe.is_floating_point():  # e.g. an ONNX graph whose first output is its labels
        raise ModelLoadError(f"[classifier].path: {path}'s (first) output for 2 images is {probe.dtype} of shape {tuple(probe.shape)}, "
                             "not scores (N, classes): logits or probabilities")
    probe = probe.float()
    if bool(((probe >= 0) & (probe <= 1)).all()) and torch.allclose(probe.sum(dim=1), torch.ones(len(probe), device=probe.device), atol=_tolerance(scores_dtype)):
        log.info("%s: its outputs are probabilities (each row sums to 1); serving their logarithms as logits", path)
        fn = _logarithm_of(fn)
    return ClassifierVersion(
        name=path.stem,
        loader=loader,
        source=str(path),
        class_names=_class_names(section, int(probe.shape[-1])),
        image_size=image_size,
        feature_layer="",
        head_name="",
        feature_extractor=None,
        head=None,
        feature_version=digest,
        head_version=digest,
        predict_fn=fn,
        inference_only_reason=reason,
        normalization=Preprocess(section.mean, section.std).normalization,
        **fitting,
    )


def _probe_images(image_size: int) -> torch.Tensor:
    """Two fixed random images (2, 3, S, S) that a loader checks a model's outputs on."""
    return torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def _normalised_digest(digest: str, section: ClassifierSection) -> str:
    """A model file's digest joined with the normalisation in front of it."""
    return hashlib.sha256(f"{digest}:{tuple(section.mean)}:{tuple(section.std)}".encode()).hexdigest()


def _read_exported_program(path: Path) -> torch.export.ExportedProgram:
    """``torch.export.load``, failing with one ModelLoadError naming the key and file. On a
    file it cannot read, torch logs the first attempt's traceback on its own handler
    (outside a JSON log), then fails with "check the warnings above"; that traceback's
    error is the one that says what is wrong with the file."""
    logger = logging.getLogger("torch.export")
    tracebacks: list[logging.LogRecord] = []

    def keep_traceback(record: logging.LogRecord) -> bool:
        if record.exc_info:
            tracebacks.append(record)
            return False
        return True

    logger.addFilter(keep_traceback)
    try:
        return torch.export.load(str(path))
    except Exception as error:  # noqa: BLE001 - a damaged file, or one torch.export.save did not write
        first = tracebacks[0].exc_info[1] if tracebacks and tracebacks[0].exc_info else error
        detail = str(first).partition(" This is an internal miniz error.")[0]
        raise ModelLoadError(f"[classifier].path: cannot read {path} as a torch.export program (a .pt2 file from torch.export.save): "
                             f"it is damaged or another format ({type(first).__name__}: {detail})") from None
    finally:
        logger.removeFilter(keep_traceback)


def _logarithm_of(probabilities: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of a model that outputs probabilities (N, C). One that underflowed to 0 is a
    very low logit, not a class ruled out; a row of only zeros names no class, and is NaN,
    which Predict and EvaluateSampleSet refuse (it was a uniform row)."""
    def log_probabilities(images: torch.Tensor) -> torch.Tensor:
        scores = probabilities(images).float()
        logits = scores.clamp_min(torch.finfo(torch.float32).tiny).log()
        return torch.where((scores > 0).any(dim=1, keepdim=True), logits, torch.nan)

    return log_probabilities


def _load_torchscript(section: ClassifierSection) -> ClassifierVersion:
    path = _require_file(section.path, "path (a TorchScript file)")
    # torch deprecates torch.jit.load, and has no other reader of a TorchScript file
    # (torch.export.load reads loader 'export''s .pt2): its FutureWarning was a WARNING line
    # at every start that no setting of this loader removes; the way off TorchScript, loader
    # 'export', is the docs' to say (configuration.md). The filter is added for good (once:
    # filterwarnings appends none that is there), last, so an operator's -W still decides,
    # and for that message from torch's serialisation module alone. Not catch_warnings()
    # around the load: the filters are the process's, so that swapped them for every thread
    # during the load, and its exit dropped any filter another thread added meanwhile.
    warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning, module=r"torch\.jit\._serialization\Z", append=True)
    module = torch.jit.load(str(path), map_location="cpu").eval()
    dtype = parameters_dtype(module)  # a half-precision model takes float16 images
    preprocess = Preprocess(section.mean, section.std)

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        return _float32_scores(module(preprocess(images).to(dtype)))

    return _inference_only(section, "torchscript", path, _normalised_digest(_hash_file(path), section), run,
                           "a TorchScript model cannot be split into features and a head; to explain it, serve it with "
                           "[classifier].loader = 'export' (a torch.export.save .pt2 of the model) or 'factory'", scores_dtype=dtype)


def _float32_scores(scores: torch.Tensor) -> torch.Tensor:
    """A model's floating scores as float32, whatever type it computes them in; other
    outputs (labels) as they are, for :func:`_inference_only`'s probe to refuse."""
    return scores.float() if scores.is_floating_point() else scores


def _load_onnx(section: ClassifierSection, device: torch.device, num_threads: int = 0) -> ClassifierVersion:
    """Split before the final linear layer when the graph ends in one (checked on a CPU
    probe: head(features) must give the graph's logits, see :func:`_head_gives_logits`),
    running the features on ``device``; else inference-only, on the CPU. Images are fed
    in the graph's type and layout (:class:`ImageInput`): a float16 graph's logits and
    features are served as float32, and its head is a float32 ``nn.Linear``."""
    import onnxruntime

    path = _require_file(section.path, "path (an ONNX file)")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    graph_input = session.get_inputs()[0]
    try:
        image_input = ImageInput.of(graph_input)
    except ValueError as reason:
        raise ModelLoadError(f"[classifier].path: the input {graph_input.name!r} of {path} {reason}") from None
    if image_input.takes_pixels and section.mean:
        raise ModelLoadError(f"[classifier].mean: the input {graph_input.name!r} of {path} takes uint8 pixels (0-255), which the graph "
                             "normalises itself: leave mean and std unset")
    batch = fixed_batch_size(graph_input)
    section = dataclasses.replace(section, image_size=_fixed_image_size(graph_input.name, image_input.channels_first_shape, section.image_size, path))
    scores_dtype = FLOAT_TYPES.get(session.get_outputs()[0].type, FLOAT_TYPES["tensor(float)"])[0]
    preprocess = Preprocess(section.mean, section.std)

    def run_batch(images: torch.Tensor) -> torch.Tensor:
        return _float32_scores(torch.from_numpy(session.run(None, {graph_input.name: image_input.fed(images).numpy()})[0]))

    def run(images: torch.Tensor) -> torch.Tensor:
        return run_in_batches(run_batch, preprocess(images), batch, pad=True)

    whole = _inference_only(section, "onnx", path, _normalised_digest(_hash_onnx(path), section), run, "", scores_dtype=scores_dtype)
    try:
        split = split_onnx_classifier(path)
        head = nn.Linear(*reversed(split.weight.shape))
        with torch.no_grad():
            head.weight.copy_(split.weight)
            head.bias.copy_(split.bias)
        on_cpu = onnx_runtime_features(split.feature_graph, execution_providers(), num_threads=num_threads)
        with torch.inference_mode():
            probes = [(run(image), on_cpu(preprocess(image))) for image in _probe_images(whole.image_size).split(1)]
            if _rules_out_classes(head):  # as -inf logits do: the whole graph serves them
                raise UnsplittableGraph("its final linear layer's bias is -infinity for some classes (it rules them out), and rankings "
                                        "and head edits need a finite head")
            # Either would fail the comparison below (NaN equals nothing), told as a head that gives other logits.
            _require_finite_head(head, f"[classifier].path: {path}", split.head_name)  # refused, as the torch loaders refuse it
            if not all(torch.isfinite(logits).all() for logits, _ in probes):
                raise UnsplittableGraph(f"its logits for the {len(probes)} random images the split is checked on are NaN or infinite "
                                        "(a float16 overflow, a division by zero?)")
            if not all(_head_gives_logits(head, features, logits, scores_dtype) for logits, features in probes):
                raise UnsplittableGraph("its final linear layer, applied to the features before it, does not give its logits")
    except ModelLoadError:
        raise  # a model no prediction of which is of use, not a graph that cannot be cut
    except Exception as reason:  # noqa: BLE001 - whatever stops the cut graph, the whole one still serves predictions
        log.warning("%s: serving it inference-only (no features for ranking or head edits): %s", path, reason)
        # Callers see why the graph is not cut; other errors' text can hold server paths.
        said = str(reason) if isinstance(reason, UnsplittableGraph) else f"{type(reason).__name__} (the server log says more)"
        return dataclasses.replace(whole, inference_only_reason=f"its graph could not be split before a final linear layer: {said}")
    features = on_cpu if device.type == "cpu" else onnx_runtime_features(
        split.feature_graph, execution_providers("onnxruntime", str(device)), device=str(device), num_threads=num_threads)
    on_device = Preprocess(section.mean, section.std).to(device)
    return dataclasses.replace(
        whole, feature_layer=split.feature_name, head_name=split.head_name, head=head.eval(), head_version=_hash_module(head), predict_fn=None,
        onnx_features=lambda images: features(on_device(images)),
    )


def _rules_out_classes(head: nn.Linear) -> bool:
    """Whether ``head``'s weights are finite and its bias is too but for some -inf: classes
    the model rules out (logits of -inf), not a head that makes predictions NaN, nor one
    that rules out every class (no prediction of it is of use)."""
    finite = torch.isfinite(head.bias)
    return bool(torch.isfinite(head.weight).all() and finite.any() and not finite.all() and (finite | torch.isneginf(head.bias)).all())


def _require_finite_head(head: nn.Linear, source: str, name: str) -> None:
    """ModelLoadError where the head ``name`` of the model at ``source`` holds NaN or an
    infinity: served, every prediction would be NaN; or, where its bias alone is -inf for
    some classes, the model rules them out, and only rankings and head edits cannot use it."""
    if _rules_out_classes(head):
        raise ModelLoadError(f"{source}: head {name!r} has a bias of -infinity for some classes (it rules them out), and rankings and head "
                             "edits need a finite head; serve the model inference-only (loader 'torchscript' or 'onnx')")
    if not (torch.isfinite(head.weight).all() and torch.isfinite(head.bias).all()):
        raise ModelLoadError(f"{source}: head {name!r} has NaN or infinite weights, which would make every prediction NaN; "
                             "its training diverged or the file is damaged")


def _tolerance(dtype: torch.dtype) -> float:
    """How closely results a model computes in ``dtype`` are checked (probabilities' row
    sums, a split's logits): 1e-4 for float32, two epsilons of a coarser type (float16: 2^-9)."""
    return max(1e-4, 2 * torch.finfo(dtype).eps)


def _head_gives_logits(head: nn.Linear, features: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the cut graph's float32 ``head`` on its ``features`` (N, D) gives the whole
    graph's ``logits`` (N, C), computed in ``dtype``, which sets how closely: to 1e-4 for
    float32; a float16 graph's to within :func:`_tolerance` of each logit's magnitude
    |features| @ |W|^T + |b|: the cut graph's features are rounded to float16 as
    they leave it, where the whole graph can keep them wider (ONNX Runtime's CPU casts a
    float16 graph to float32 inside), and that rounding moves a logit summed from large
    terms to near 0 by far more than 1e-3 of itself."""
    cut = head(features)
    if cut.shape != logits.shape:
        return False
    if dtype == torch.float32:
        return torch.allclose(cut, logits, atol=1e-4, rtol=1e-4)
    magnitude = features.abs() @ head.weight.abs().T + head.bias.abs()
    return bool(((cut - logits).abs() <= _tolerance(dtype) * magnitude).all())


def _fixed_image_size(input_name: str, shape: list[Any], configured: int, path: Path) -> int:
    """The square input size for a model file whose input ``input_name``, of ``shape``
    (ints where the file fixes a size, names where it leaves it dynamic), must be images
    (N, 3, S, S): the ``configured`` one, else the size the file fixes, else 224. A model
    of another layout, or fixing another size, is refused here, in words naming the key,
    instead of by its runtime's dimension check on the probe."""
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise ModelLoadError(f"[classifier].path: the input {input_name!r} of {path} has shape {shape}; explaind feeds it "
                             "images (N, 3, S, S), channels first")
    fixed = {size for size in shape[2:] if isinstance(size, int)}
    if len(fixed) > 1:
        raise ModelLoadError(f"[classifier].path: {path} takes {shape[2]}x{shape[3]} images; explaind feeds square ones")
    if fixed and configured and configured not in fixed:
        raise ModelLoadError(f"[classifier].image_size is {configured} but {path} takes {shape[2]}x{shape[3]} images: "
                             "leave it unset (0) or export the model with that size")
    return configured or next(iter(fixed), 224)


def _exported_image_size(program: torch.export.ExportedProgram, configured: int, path: Path) -> int:
    """:func:`_fixed_image_size` for an exported program's one image input (the size it
    was traced at stays fixed unless exported as dynamic). A program taking other inputs
    is refused here, naming them: its probe failed with advice to export a dynamic batch."""
    from torch.export.graph_signature import InputKind

    names = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    values = [node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder" and node.name in names]
    if len(values) != 1 or not isinstance(values[0], torch.Tensor):
        raise ModelLoadError(f"[classifier].path: {path} takes inputs {names}, where explaind feeds it one tensor, images (N, 3, S, S)")
    shape = [size if isinstance(size, int) else str(size) for size in values[0].shape]
    return _fixed_image_size(names[0], shape, configured, path)


def _hash_onnx(path: Path) -> str:
    """The digest of an ONNX graph and the external weight files it names (a retrained
    model saved with external data can keep a byte-identical graph file)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({entry.value for tensor in model.graph.initializer if uses_external_data(tensor)
                        for entry in tensor.external_data if entry.key == "location"})
    return hashlib.sha256(":".join([_hash_file(path), *(_hash_file(path.parent / location) for location in locations)]).encode()).hexdigest()


@dataclass
class ComponentStatus:
    """Whether an optional model is loaded; ``detail`` says why not, or what it is."""

    name: str
    loaded: bool
    source: str
    detail: str
    model: Any = None


def load_clip(section: ClipSection, *, required: bool) -> ComponentStatus:
    """open_clip model + preprocessing + tokenizer, as ``status.model = (model, preprocess, tokenizer)``."""
    source = section.path or section.checkpoint or section.model
    if not source:
        return ComponentStatus("clip", False, "", "not configured")
    if section.path and not Path(section.path).exists():
        return _optional_failure("clip", source, f"[clip].path not found: {section.path}", required)
    try:
        import open_clip

        if section.path:
            if problem := clip_directory_problem(Path(section.path)):
                raise ModelLoadError(problem)
            model_name = f"local-dir:{section.path}"
            model, _, preprocess = open_clip.create_model_and_transforms(model_name)
        else:
            if not section.checkpoint:
                raise ModelLoadError("[clip].model needs [clip].checkpoint (a weights file or an open_clip pretrained tag)")
            tags = open_clip.list_pretrained_tags_by_model(section.model)
            if not Path(section.checkpoint).is_file() and section.checkpoint not in tags:
                raise ModelLoadError(f"[clip].checkpoint {section.checkpoint!r} is neither a file nor a pretrained tag of {section.model!r} "
                                     f"(tags: {', '.join(tags) or 'none'}; a tag is downloaded, so it needs the hub)")
            model_name = section.model
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=section.checkpoint)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as error:  # noqa: BLE001
        detail = f"cannot load CLIP ([clip]) from {source}: {type(error).__name__}: {error}"
        if not section.path and Path(section.checkpoint).is_file() and isinstance(error, (AssertionError, KeyError, RuntimeError)):
            # open_clip's own words for weights of another architecture ("text pos_embed width changed!", a
            # state dict's missing keys) do not say that [clip].model is what to change.
            detail += f"; is [clip].model {section.model!r} the architecture the checkpoint was saved from?"
        return _optional_failure("clip", source, detail, required)
    return ComponentStatus("clip", True, source, f"open_clip {section.model or type(model).__name__}", (model.eval(), preprocess, tokenizer))


def load_diffusion(section: DiffusionSection, clip: ComponentStatus, *, required: bool) -> ComponentStatus:
    """A diffusers pipeline directory (``model_index.json``), or one holding only
    ``vae/``, ``unet/`` and ``scheduler/`` whose text encoder is the loaded open_clip
    ``clip`` (the shapes world's layout, as Stable Diffusion conditions on CLIP's token
    states), as ``status.model``."""
    if not section.path:
        return ComponentStatus("diffusion", False, "", "not configured")
    directory = Path(section.path)
    has_index = (directory / "model_index.json").is_file()
    if problem := diffusion_directory_problem(directory):
        return _optional_failure("diffusion", section.path, problem, required)
    if has_index and (absent := _absent_pipeline_libraries(directory / "model_index.json")):
        library, components = next(iter(absent.items()))
        return _optional_failure(
            "diffusion", section.path,
            f"[diffusion].path: {directory / 'model_index.json'} loads {', '.join(components)} with the {library!r} package, which is not "
            f"installed: {_install_command(library)}", required
        )
    if not has_index and not clip.loaded:
        return _optional_failure(
            "diffusion", section.path, f"{section.path} has no text encoder and takes CLIP's, which is not loaded ({clip.detail})", required
        )
    try:
        # Imported here, not with the logging's set-up: a server without a diffusion model (or, for transformers, without a
        # pipeline directory, whose text encoder it may be) spends no second importing them.
        route_huggingface_loggers("diffusers", *(("transformers",) if has_index else ()))
        if has_index:
            from diffusers import DiffusionPipeline

            pipeline = DiffusionPipeline.from_pretrained(section.path)
        else:
            from ..world.t2i import load_world_t2i

            model, _, tokenizer = clip.model
            pipeline = load_world_t2i(directory, (model, tokenizer))
    except Exception as error:  # noqa: BLE001
        return _optional_failure(
            "diffusion", section.path,
            f"cannot load the diffusion pipeline ([diffusion].path) from {section.path}: {_kernels_cause(error)}{type(error).__name__}: {error}",
            required
        )
    return ComponentStatus("diffusion", True, section.path, type(pipeline).__name__, pipeline)


# The packages a diffusers component may need that an explaind extra installs, by extra:
# its version range is explaind's, which a bare `pip install transformers` would not keep.
_EXTRA_OF_PACKAGE = {"transformers": "stable-diffusion"}


def _install_command(package: str) -> str:
    """What installs ``package``: explaind's extra that declares it, else the package itself."""
    extra = _EXTRA_OF_PACKAGE.get(package)
    return f"pip install 'explaind[{extra}]'" if extra else f"pip install {package}"


def _kernels_cause(error: BaseException) -> str:
    """What a diffusion load's ``error`` owes to Hugging Face's ``kernels`` package, which
    transformers imports, as a clause ending in "; " ("" where nothing): that package failing
    as it is imported (its own module code on the error's traceback, or its causes'); its
    distribution installed without the package; or another ``kernels`` directory found first
    that does not hand the name over, named by the error. A broken install was put down to
    the last, "an explaind checkout's from before", whose advice did not help."""
    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return ""
    package = _installed_kernels_file(installed)
    reinstall = f"repair that install (pip install --force-reinstall 'kernels=={installed.version}', its dependencies too)"
    if any(_imports_from(chained.__traceback__, package.parent) for chained in _chain(error)):
        return (f"Hugging Face's kernels package, which transformers imports, is installed ({package.parent}) but its own import fails "
                f"with the error that follows (no kernels directory hides it): {reinstall}; ")
    if (hiding := _directory_hiding_kernels()) is None or str(hiding / "__init__.py") not in str(error):
        return ""
    if not package.is_file():
        return (f"Hugging Face's kernels distribution {installed.version}, which transformers imports, is installed without its package "
                f"({package} is missing), so Python took {hiding} for it: {reinstall}; ")
    return (f"Hugging Face's kernels package, which transformers imports, is hidden by {hiding} (a kernels package in the directory "
            "Python runs in, such as an explaind checkout's from before its kernels/ handed the name over): run explaind from another "
            "directory; ")


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from or while handling, each once."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _imports_from(trace: TracebackType | None, directory: Path) -> bool:
    """Whether ``trace`` runs a module's own code (its import) from a file under ``directory``."""
    return any(frame.f_code.co_name == "<module>" and Path(frame.f_code.co_filename).resolve().is_relative_to(directory)
               for frame, _ in traceback.walk_tb(trace))


def _directory_hiding_kernels() -> Path | None:
    """The package directory Python imports as ``kernels`` in place of Hugging Face's
    installed ``kernels`` distribution (one found first on sys.path, such as the working
    directory's), or None. transformers 5.25 and later require that package and import
    it as diffusers imports any model, which then fails with "cannot import name
    'CUDAProperties' from 'kernels'". explaind's own kernels/ hands the name over where
    Python runs at the repository's root: an older checkout's kernels/ did not."""
    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        spec = importlib.util.find_spec("kernels")
    except ValueError:  # a `kernels` in sys.modules without a spec
        return None
    if spec is None or spec.origin is None:
        return None
    found = Path(spec.origin)  # as the ImportError names it
    return None if found.resolve() == _installed_kernels_file(installed) else found.parent


def _installed_kernels_file(installed: importlib.metadata.Distribution) -> Path:
    """The ``__init__.py`` of the ``kernels`` distribution ``installed``'s package (which may
    be missing): beside its metadata or, installed editable, in the source directory its
    .pth puts on sys.path (maturin's, hatchling's). Not beside its metadata, an editable
    install's package was taken for missing, or for a directory hiding itself."""
    beside = Path(str(installed.locate_file("kernels/__init__.py"))).resolve()
    for listed in installed.files or ():
        if listed.suffix == ".pth":
            try:
                lines = Path(str(installed.locate_file(listed))).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                continue
            for line in lines:  # a .pth's other lines (import ..., comments) name no directory holding the package
                if (candidate := Path(line.strip()) / "kernels" / "__init__.py").is_absolute() and candidate.is_file():
                    return candidate.resolve()
    return beside


def _absent_pipeline_libraries(index_file: Path) -> dict[str, list[str]]:
    """Package -> the components of a diffusers ``model_index.json`` it loads, for each
    package that is not installed ({} when none is missing, or the file is no JSON object,
    which diffusers then reports). A Stable Diffusion directory's text encoder and tokenizer
    are ``transformers``' (the ``stable-diffusion`` extra): without it, diffusers failed with
    "AttributeError: 'super' object has no attribute '__getattr__'"."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    absent: dict[str, list[str]] = {}
    for component, (library, class_name) in pipeline_components(index).items():
        custom_code = index_file.parent / component / f"{library}.py"  # a component of the directory's own code
        package = library.split(".")[0]  # a library "a.b" is package a's module: find_spec("a.b") would raise where a is absent
        if importlib.util.find_spec(package) is None and not custom_code.is_file() and not _is_diffusers_pipeline_module(library):
            absent.setdefault(package, []).append(f"{component} ({class_name})")
    return absent


def _is_diffusers_pipeline_module(library: str) -> bool:
    """Whether a component's ``library`` is a module of ``diffusers.pipelines``, where
    diffusers looks first: Stable Diffusion 1.x's safety checker is ``["stable_diffusion",
    "StableDiffusionSafetyChecker"]``, no package to install."""
    return library.isidentifier() and importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None


def _optional_failure(name: str, source: str, detail: str, required: bool) -> ComponentStatus:
    if required:
        raise ModelLoadError(detail)
    return ComponentStatus(name, False, source, detail)
