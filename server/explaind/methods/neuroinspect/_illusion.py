"""CLIP-Illusion: class-conditional feature visualisation (NeuroInspect §III-D).

An image is optimised to raise neuron n's mean activation α_n and class c's logit l_c,
while CLIP keeps it looking like class c:

    L = −(cos_CLIP(E_I(I), T_c) + ε) · (α_n + γ l_c)

T_c is the mean of the normalised CLIP text embeddings of prompt templates filled with
the class name. The ablations of the paper are ``no_clip`` (L = −(α_n + γ l_c)) and
``feature_visualization`` (L = −α_n). Many (neuron, class) pairs are optimised together:
the loss is a sum of per-image terms, so each image evolves independently.

α_n is feature n as the head reads it: for a CNN the spatial mean of channel n of the
feature layer, for a ViT channel n of its class token. The masks come from channel n of
the feature layer's maps (a ViT's patch grid); where that layer holds vectors (a hidden
linear layer before the head, as MobileNetV3's), from the neuron's Grad-CAM map on the
last spatial layer before it (:func:`neuron_gradient_maps`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


from ..memory import is_host_out_of_memory
from ._checks import (callback_or_none, count, eval_mode, finite_rows, index, number, refuse_inference_mode, repeated_pair_problem,
                      require_step_fits, seed_value, tensor_argument)
from ._features import capture_forward, channel_maps, last_spatial_module, neuron_gradient_maps, split_forward, split_modules
from ._fourier import FourierImage, gaussian_noise, random_affine
from ._ranking import neuron_top_classes

METHODS = ("clip_illusion", "feature_visualization", "no_clip")
DEFAULT_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
)
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_ADAM_BETAS = (0.5, 0.99)  # the authors' AdamW betas

# Progress hook: (step, total steps, current images (B, 3, H, W) in [0, 1]) -> True to stop.
VisualizationCallback = Callable[[int, int, torch.Tensor], "bool | None"]


# Stands for a class name in a template filled in to check it (a private-use character).
_CLASS_NAME_PROBE = "\ue000"


def _names_the_class(template: str) -> bool:
    """Whether ``template.format(class_name)``, as the prompts are made, names the class
    and fails for none: "{{}}" is a literal "{}", and a second field or a named one
    ("{style}") failed only in the job that filled the templates in."""
    try:
        return _CLASS_NAME_PROBE in template.format(_CLASS_NAME_PROBE)
    except (IndexError, KeyError, ValueError, AttributeError):
        return False


@runtime_checkable
class _ClipEncoders(Protocol):
    """What :class:`ClipIllusion` calls on an open_clip model beyond its tower ``visual``."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


@dataclass
class VisualizationResult:
    """One row per requested (neuron, class) pair, in request order."""

    method: str
    neurons: torch.Tensor  # (B,) int64
    classes: torch.Tensor  # (B,) int64, the class each image was conditioned on (or scored by)
    images: torch.Tensor = field(repr=False)  # (B, 3, H, W) in [0, 1]
    masked_images: torch.Tensor = field(repr=False)  # (B, 3, H, W): low-activation regions dimmed
    masks: torch.Tensor = field(repr=False)  # (B, H, W) bool: where the neuron's upsampled map is high
    activations: torch.Tensor  # (B,) α_n of the final image: feature n as the head reads it
    logits: torch.Tensor  # (B,) l_c of the final image
    clip_similarity: torch.Tensor  # (B,) cosine to the class prompt embedding; NaN without CLIP
    core_relevance: torch.Tensor  # (B,) clip_similarity minus the same with the mask region greyed out
    steps: int  # optimisation steps run
    cancelled: bool = False


class ClipIllusion:
    """Visualise what makes neuron ``n`` of ``feature_layer`` fire within class ``c``.

    ``classifier`` takes RGB in [0, 1] (N, 3, H, W) and returns logits; ``head`` names
    its final ``nn.Linear``. ``clip_model`` is any open_clip model (``encode_image``,
    ``encode_text``) with its ``tokenizer`` and needs ``class_names`` for its prompts;
    without one only the ``no_clip`` and ``feature_visualization`` methods run. Images
    are optimised in float32 on the classifier's device as it is at each call; the
    classifier runs in its own dtype, so ``activations`` and ``logits`` come back in it.
    """

    def __init__(
        self,
        classifier: nn.Module,
        feature_layer: str,
        clip_model: nn.Module | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        *,
        class_names: Sequence[str] | None = None,
        head: str = "fc",
        image_size: int | None = None,
        prompt_templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES,
    ) -> None:
        config = getattr(classifier, "config", None)
        self.classifier = classifier
        self.feature_module, self.head = split_modules(classifier, feature_layer, head)
        self._names = (feature_layer, head)
        if (clip_model is None) != (tokenizer is None):
            raise ValueError("clip_model and tokenizer must be given together")
        if isinstance(class_names, (str, bytes)):  # would be read as one name per character
            raise TypeError(f"class_names must be a sequence of names, one per class, got a {type(class_names).__name__}: "
                            f"{class_names!r}")
        self.class_names = tuple(class_names if class_names is not None else getattr(config, "class_names", ()))
        if self.class_names and len(self.class_names) != self.head.out_features or clip_model is not None and not self.class_names:
            raise ValueError(f"class_names must name all {self.head.out_features} classes (CLIP's prompts name them), "
                             f"got {len(self.class_names)}")
        if image_size is None:
            image_size = getattr(config, "image_size", None)
            if image_size is None:
                raise ValueError("image_size must be given for a classifier without config.image_size")
        self.image_size = count(image_size, "image_size")
        self.clip_model = clip_model
        self.tokenizer = tokenizer
        if isinstance(prompt_templates, (str, bytes)):  # would be one template per character
            raise TypeError(f"prompt_templates must be a sequence of templates, got a {type(prompt_templates).__name__}: {prompt_templates!r}")
        self.prompt_templates = tuple(prompt_templates)
        for position, template in enumerate(self.prompt_templates):
            if not isinstance(template, str) or not _names_the_class(template):  # a prompt without the class name
                raise ValueError(f"prompt_templates[{position}] must be a str with '{{}}' where the class name goes (any other brace doubled), "
                                 f"got {template!r}")
        if clip_model is not None:
            if not isinstance(clip_model, _ClipEncoders):
                raise TypeError(f"clip_model must be an open_clip model (encode_image, encode_text), got {type(clip_model).__name__}")
            visual = getattr(clip_model, "visual", None)  # open_clip's image tower
            if visual is None:
                raise TypeError(f"clip_model must be an open_clip model with an image tower .visual, got {type(clip_model).__name__}")
            preprocess = getattr(visual, "preprocess_cfg", None) or {}
            self._clip_size = _clip_image_size(visual.image_size)
            self._clip_normalisation = (tuple(preprocess.get("mean", _OPENAI_MEAN)), tuple(preprocess.get("std", _OPENAI_STD)))
        self._class_embeddings: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        """The classifier's device now (read at each call: a model moved after construction is followed)."""
        return self.head.weight.device

    @property
    def _dtype(self) -> torch.dtype:
        """The classifier's dtype now; the image is optimised in float32."""
        return self.head.weight.dtype

    def top_classes(self, neuron: int, k: int = 1) -> list[int]:
        """The ``k`` classes whose head weight for ``neuron`` is largest, largest first (equal
        weights by class index): the automatic conditioning."""
        num_classes, dim = self.head.weight.shape
        neuron = index(neuron, "neuron", dim)
        if not 1 <= count(k, "k") <= num_classes:
            raise ValueError(f"k must lie in [1, {num_classes}] (the number of classes), got {k}")
        return neuron_top_classes(self.head.weight, neuron, k)

    @torch.no_grad()
    def text_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm mean of the unit-norm CLIP embeddings of ``prompts``, (E,)."""
        clip = self._require_clip()
        assert self.tokenizer is not None  # __init__ takes clip_model and tokenizer only together
        if isinstance(prompts, (str, bytes)) or not prompts:  # a str would be one prompt per character
            raise TypeError(f"prompts must be a non-empty sequence of prompts, got {prompts!r}")
        with eval_mode(self.clip_model):
            embeddings = F.normalize(clip.encode_text(self.tokenizer(list(prompts)).to(self.device)), dim=-1)
        return F.normalize(embeddings.mean(0), dim=-1)

    def class_embedding(self, class_index: int) -> torch.Tensor:
        """T_c (E,): the prompt templates filled with the class name, cached per device (the
        models may move after construction)."""
        class_index = index(class_index, "class_index", len(self.class_names))  # -1 would be the last class's
        key = (class_index, self.device)
        if key not in self._class_embeddings:
            name = self.class_names[class_index]
            self._class_embeddings[key] = self.text_embedding([t.format(name) for t in self.prompt_templates])
        return self._class_embeddings[key]

    def clip_similarity(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine (B,) between images (B, 3, H, W) in [0, 1] and unit text embeddings (B, E)."""
        clip = self._require_clip()
        pixels = images
        if images.shape[-2:] != self._clip_size:  # at CLIP's size bilinear is the identity: its work, and backward's, is skipped
            pixels = F.interpolate(images, size=self._clip_size, mode="bilinear", align_corners=False)
        mean, std = (torch.tensor(values, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1) for values in self._clip_normalisation)
        pixels = ((pixels - mean) / std).to(next(clip.parameters()).dtype)
        with eval_mode(self.clip_model):
            embeddings = F.normalize(clip.encode_image(pixels).float(), dim=-1)
        return (embeddings * text_embeddings.float()).sum(-1)

    def visualize(
        self,
        pairs: Sequence[tuple[int, int | None]],
        *,
        method: str = "clip_illusion",
        steps: int = 400,
        gamma: float = 0.5,
        epsilon: float = 0.05,
        learning_rate: float = 9e-3,
        weight_decay: float = 1e-3,
        noise_std: float = 0.05,
        mask_threshold: float = 0.5,
        mask_dim: float = 0.2,
        decay_power: float = 1.5,
        seed: int = 0,
        callback_on_step_end: VisualizationCallback | None = None,
    ) -> VisualizationResult:
        """Optimise one image per (neuron, class) pair; a ``None`` class means the class with
        the largest head weight for the neuron.

        ``gamma`` weighs the class logit against the activation (γ); ``epsilon`` (ε) keeps
        the CLIP factor cos + ε positive. The paper's ε = 0.05 assumes a CLIP whose cosine
        to a class prompt stays well above −0.05; a smaller CLIP can go below, where the
        factor turns negative and the objective lowers the activation it should raise (the
        shapes world's CLIP needs ε = 1.0, the value its server config sets).
        ``learning_rate`` is AdamW's, annealed to 0 over ``steps``; ``seed`` fixes each
        pair's start and augmentations (see :func:`_pair_generator`).

        Each step applies a random rotation (±15°), translation (±15 %), scale (0.7–1.2) and
        Gaussian noise whose std decays linearly from ``noise_std`` to 0; AdamW with cosine
        annealing updates the Fourier parameters. ``mask_threshold`` (0–1, of the min–max
        normalised activation map) splits kept from dimmed regions; ``mask_dim`` is the
        brightness factor of the dimmed ones. ``decay_power`` shapes the spectrum (1.0 is
        Lucid's 1/f; see :class:`FourierImage`). ``callback_on_step_end(step, steps, images)``
        may return True to stop after that step (the result is then marked cancelled); any
        true value stops, tqdm's ``bar.update()`` too when it redraws, so call that in a
        function returning None rather than return it.
        """
        refuse_inference_mode("visualize optimises images by gradient descent")
        neurons, classes = self._resolve_pairs(pairs)
        seed = seed_value(seed)
        callback_or_none(callback_on_step_end, "callback_on_step_end")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        steps = count(steps, "steps")
        gamma, epsilon, noise_std = number(gamma, "gamma"), number(epsilon, "epsilon", low=-math.inf), number(noise_std, "noise_std")
        learning_rate, weight_decay = number(learning_rate, "learning_rate"), number(weight_decay, "weight_decay")  # 0: the start images
        require_step_fits(learning_rate, "learning_rate", torch.get_default_dtype(), factor=1 / (1 - _ADAM_BETAS[0]))  # FourierImage's dtype
        decay_power = number(decay_power, "decay_power")
        if not 0 < number(mask_threshold, "mask_threshold") < 1:
            raise ValueError(f"mask_threshold must lie in (0, 1), got {mask_threshold}")
        if not 0 <= number(mask_dim, "mask_dim") <= 1:
            raise ValueError(f"mask_dim must lie in [0, 1] (a brightness factor), got {mask_dim}")
        # Eval mode for our forwards only (a caller's BatchNorm statistics stay as they
        # were), and gradients even when the caller runs us under torch.no_grad().
        with eval_mode(self.classifier, self.clip_model), torch.enable_grad():
            use_clip = method == "clip_illusion"
            if use_clip:
                self._require_clip()
            map_source = self._check_split()
            rows = torch.arange(len(neurons), device=self.device)
            targets = torch.stack([self.class_embedding(int(c)) for c in classes]) if use_clip else None

            generators = [_pair_generator(seed, int(n), int(c), self.device) for n, c in zip(neurons, classes)]
            image = FourierImage(generators, self.image_size, decay_power=decay_power).to(self.device)
            optimiser = torch.optim.AdamW(image.parameters(), lr=learning_rate, betas=_ADAM_BETAS, weight_decay=weight_decay)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
            cancelled, step = False, 0
            for step in range(1, steps + 1):
                augmented = random_affine(image(), generators=generators)
                augmented = augmented + noise_std * (1 - (step - 1) / steps) * gaussian_noise(augmented, generators=generators)
                with capture_forward(self.head) as captured:
                    logits = self.classifier(augmented.to(self._dtype))
                activation = captured["input"][rows, neurons]
                objective = activation if method == "feature_visualization" else activation + gamma * logits[rows, classes]
                if targets is not None:  # use_clip
                    objective = (self.clip_similarity(augmented, targets) + epsilon) * objective
                optimiser.zero_grad(set_to_none=True)
                (-objective.sum()).backward(inputs=list(image.parameters()))
                optimiser.step()
                schedule.step()
                if callback_on_step_end is not None:
                    with torch.no_grad():
                        if callback_on_step_end(step, steps, image()):
                            cancelled = True
                            break
            return self._finish(image, method, neurons, classes, rows, step, cancelled, mask_threshold, mask_dim, map_source)

    @torch.no_grad()
    def _finish(self, image: FourierImage, method: str, neurons: torch.Tensor, classes: torch.Tensor,
                rows: torch.Tensor, steps: int, cancelled: bool, mask_threshold: float,
                mask_dim: float, map_source: tuple[nn.Module, int] | None) -> VisualizationResult:
        images = image()
        if not torch.isfinite(images).all():  # NaN images would be masked whole and scored NaN
            raise ValueError(f"learning_rate, weight_decay or gamma are too large: the images overflowed to NaN or infinity "
                             f"in {steps} steps; lower them")
        scored = None
        try:
            scored = self._scores(images, neurons, classes, mask_threshold, mask_dim, map_source)
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            if not (isinstance(error, torch.OutOfMemoryError) or is_host_out_of_memory(error)) or len(images) == 1:
                raise  # one image alone: scoring it alone again is the same work
        if scored is None:
            # Out of memory scoring them all at once (the device's memory taken since, by other
            # work): the optimised images are not thrown away but scored one at a time, a B-th
            # of the memory, once the except above has let go of the batch's.
            parts = [self._scores(images[i : i + 1], neurons[i : i + 1], classes[i : i + 1], mask_threshold, mask_dim, map_source)
                     for i in range(len(rows))]
            scored = tuple(torch.cat(part) for part in zip(*parts))
        masked, masks, activations, logits, similarity, relevance = scored
        return VisualizationResult(
            method=method,
            neurons=neurons,
            classes=classes,
            images=images,
            masked_images=masked,
            masks=masks,
            activations=activations,
            logits=logits,
            clip_similarity=similarity,
            core_relevance=relevance,
            steps=steps,
            cancelled=cancelled,
        )

    @torch.no_grad()
    def _scores(self, images: torch.Tensor, neurons: torch.Tensor, classes: torch.Tensor, mask_threshold: float, mask_dim: float,
                map_source: tuple[nn.Module, int] | None) -> tuple[torch.Tensor, ...]:
        """The masked images, masks, activations, logits, CLIP similarities and core
        relevances of final ``images`` (B, 3, H, W), one row each."""
        rows = torch.arange(len(images), device=self.device)
        forward = split_forward(self.classifier, images.to(self._dtype), self.feature_module, self.head, self._names)
        if map_source is None:
            maps = channel_maps(forward.layer_output, self.head.in_features)[rows, neurons]  # (B, h, w)
        else:
            maps = neuron_gradient_maps(self.classifier, images.to(self._dtype), map_source, self.head, neurons)
        maps = maps.float()
        masks = activation_masks(maps, (images.shape[-2], images.shape[-1]), mask_threshold)
        keep = masks.unsqueeze(1).to(images.dtype)
        masked = images * (keep + (1 - keep) * mask_dim)
        nan = torch.full((len(rows),), float("nan"), device=self.device)
        similarity, relevance = nan, nan
        if self.clip_model is not None:
            targets = torch.stack([self.class_embedding(int(c)) for c in classes])
            similarity = self.clip_similarity(images, targets)
            relevance = similarity - self.clip_similarity(grey_out(images, masks), targets)
        return masked, masks, forward.head_input[rows, neurons], forward.logits[rows, classes], similarity, relevance

    @torch.no_grad()
    def _check_split(self) -> tuple[nn.Module, int] | None:
        """Run the classifier once on a grey image of ``image_size`` and check its split
        (:func:`split_forward`), feature layer's maps included: a wrong layer name fails
        here, before the steps, not after them. Returns the (module, call) the masks' maps
        come from where the feature layer's are 1x1 (:func:`last_spatial_module`), else None."""
        probe = torch.full((1, 3, self.image_size, self.image_size), 0.5, device=self.device, dtype=self._dtype)

        def classify(images: torch.Tensor) -> object:
            try:
                return self.classifier(images)
            except torch.OutOfMemoryError:
                raise  # the device's state, not an argument: kept as it is for callers that retry
            except (RuntimeError, AssertionError) as error:  # a torchvision ViT asserts its input size
                if is_host_out_of_memory(error):  # the CPU's state (PyTorch's allocator), as above
                    raise
                raise ValueError(f"the classifier fails on a {self.image_size}x{self.image_size} image (image_size): "
                                 f"{error}") from error

        forward = split_forward(classify, probe, self.feature_module, self.head, self._names)
        maps = channel_maps(forward.layer_output, self.head.in_features)
        return last_spatial_module(self.classifier, probe, self.feature_module) if maps.shape[-2:] == (1, 1) else None

    def _resolve_pairs(self, pairs: Sequence[tuple[int, int | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        num_classes, dim = self.head.weight.shape
        if isinstance(pairs, torch.Tensor | np.ndarray):  # a (P, 2) array of (neuron, class)
            pairs = pairs.tolist()
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
            raise TypeError(f"pairs must be a sequence of (neuron, class or None) pairs, got {pairs!r} ({type(pairs).__name__})")
        pairs = list(pairs)  # a generator too
        if len(pairs) == 0:
            raise ValueError("pairs must hold at least one (neuron, class) pair")
        neurons, classes = [], []
        first_asking: dict[tuple[int, int], int] = {}
        for position, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"pairs[{position}] must be a (neuron, class or None) pair, got {pair!r}")
            neuron = index(pair[0], f"pairs[{position}] neuron", dim)
            klass = self.top_classes(neuron)[0] if pair[1] is None else index(pair[1], f"pairs[{position}] class", num_classes)
            if problem := repeated_pair_problem(first_asking, position, neuron, klass, self.class_names):
                raise ValueError(f"pairs[{position}]: {problem}")
            neurons.append(neuron)
            classes.append(klass)
        return torch.tensor(neurons, device=self.device), torch.tensor(classes, device=self.device)

    def _require_clip(self) -> _ClipEncoders:
        if self.clip_model is None:
            raise ValueError("this ClipIllusion has no CLIP model; use method 'no_clip' or 'feature_visualization'")
        assert isinstance(self.clip_model, _ClipEncoders)  # __init__ refuses any other
        return self.clip_model


def _clip_image_size(size: object) -> tuple[int, int]:
    """(H, W) CLIP's image tower takes, from its ``image_size``: an int or a pair."""
    if isinstance(size, numbers.Integral):  # numpy's too
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(side, numbers.Integral) for side in size):
        return int(size[0]), int(size[1])
    raise TypeError(f"clip_model.visual.image_size must be an int or an (H, W) pair, got {size!r}")


def _pair_generator(seed: int, neuron: int, class_index: int, device: torch.device) -> torch.Generator:
    """The random stream of one (neuron, class) image: its start and augmentations are the
    same whatever else shares its batch, and every method starts from the same spectrum.
    (Batched kernels still round differently per batch shape, so after hundreds of steps
    an image can drift: less than 0.01 of CLIP cosine on the world, but its activation and
    mask by up to a third and an eighth; docs/neuroinspect.md.) Drawn on ``device``,
    so a GPU's draws differ from the CPU's for the same seed. A negative (int64) seed is
    taken as its two's complement."""
    state = np.random.SeedSequence((seed & 0xFFFF_FFFF_FFFF_FFFF, neuron, class_index)).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def grey_out(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``images`` (B, 3, H, W) with the pixels where ``masks`` (B, H, W) is true set to
    0.5 grey: the fill of core relevance, which greys the neuron's mask this way."""
    if masks.shape != images.shape[:1] + images.shape[2:]:
        raise ValueError(f"masks must be (B, H, W) of the images' {tuple(images.shape)}, got {tuple(masks.shape)}")
    keep = masks.unsqueeze(1).to(images.dtype)
    return images * (1 - keep) + 0.5 * keep


def activation_masks(maps: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Where each activation map (B, h, w), upsampled to ``size``, is high: (B, H, W) bool.

    High means at least ``threshold`` (0–1) of the way from the map's minimum to its
    maximum. A flat map has no low region, so nothing of it is dimmed. ``size`` is an
    (H, W) pair or one side.
    """
    maps = tensor_argument(maps, "maps")
    if maps.ndim != 3 or 0 in maps.shape[1:]:
        raise ValueError(f"maps must be (B, h, w) with h, w ≥ 1, got {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise TypeError(f"maps must be a floating-point tensor, got {maps.dtype}")
    finite_rows(maps.flatten(1), "maps")  # a NaN map was all dimmed, without a word
    sides = (size, size) if isinstance(size, numbers.Integral) else size
    if not isinstance(sides, Sequence) or len(sides) != 2:
        raise TypeError(f"size must be an (H, W) pair of integers, got {size!r}")
    size = (count(sides[0], "size[0]"), count(sides[1], "size[1]"))
    if not 0 <= number(threshold, "threshold") <= 1:  # outside, every map was dimmed whole (or kept whole)
        raise ValueError(f"threshold must lie in [0, 1] (of each map's min–max range), got {threshold}")
    heat = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    low = heat.amin(dim=(1, 2), keepdim=True)
    high = heat.amax(dim=(1, 2), keepdim=True)
    # Flat is judged on the maps themselves: upsampling a constant map rounds it into one
    # that varies in its last bits, which the threshold would split.
    flat = (maps.amax(dim=(1, 2)) == maps.amin(dim=(1, 2)))[:, None, None]
    return (heat - low >= threshold * (high - low)) | flat
