"""Argument checks shared by the NeuroInspect engines.

Why here and not in the server: the engines are used in-process too, where nothing else
stands between a caller's tensor and a silently wrong result (a NaN row that counts as
class 0, uint8 pixels read as [0, 255] floats, a float label truncated to a class). Each
check names the argument and says what was expected.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Integral, Real

import numpy as np
import torch
from torch import nn


def tensor_argument(value: object, name: str) -> torch.Tensor:
    """``value`` if it is a tensor; TypeError naming ``name`` (and torch.from_numpy for an array) if not."""
    if not isinstance(value, torch.Tensor):
        hint = " (use torch.from_numpy)" if type(value).__module__ == "numpy" else ""
        raise TypeError(f"{name} must be a torch.Tensor{hint}, got {type(value).__name__}")
    return value


def _matrix(value: object, name: str, dim: int | None) -> torch.Tensor:
    """(N, D) floating-point, N > 0 (and D = ``dim`` when given), detached."""
    features = tensor_argument(value, name)
    if features.ndim != 2 or len(features) == 0 or (dim is not None and features.shape[1] != dim):
        expected = "(N, D) with N > 0" if dim is None else f"(N, {dim}) with N > 0 to match the head"
        raise ValueError(f"{name} must be {expected}, got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {features.dtype}")
    return features.detach()


# Elements summed per slice of rows by :func:`finite_rows`: torch casts a whole tensor to
# the sum's float64 first, twice its float32 size (+780 MB for 50,000 x 2048 cached
# features, at each of an edit's three sets); slices bound that copy to 32 MB.
FINITE_CHECK_ELEMENTS = 1 << 22


def row_slices(rows: torch.Tensor, elements: int, per_row: int) -> list[torch.Tensor]:
    """``rows`` (N, ...) as consecutive views of ``elements // per_row`` rows (at least one),
    for work whose temporaries hold ``per_row`` elements a row; an empty ``rows`` as
    itself, so that torch.cat of the slices' answers is the empty answer."""
    rows_per_slice = max(1, elements // max(1, per_row))
    return [rows[start : start + rows_per_slice] for start in range(0, len(rows), rows_per_slice)] or [rows]


def finite_rows(features: torch.Tensor, name: str) -> torch.Tensor:
    """``features`` (N, D), after checking that every value is finite."""
    # A row sums (in float64, which no sum of float32s overflows) to a finite number only
    # if every element is finite: one pass and an (N,) result, not an (N, D) mask.
    slices = row_slices(features, FINITE_CHECK_ELEMENTS, features.shape[1])
    bad = torch.cat([~torch.isfinite(rows.sum(1, dtype=torch.float64)) for rows in slices])
    if bad.any():
        rows = bad.nonzero().squeeze(1)
        raise ValueError(f"{name} holds NaN or infinite values in {len(rows)} rows (first: row {int(rows[0])})")
    return features


def features_tensor(value: object, name: str, *, dim: int, like: torch.Tensor) -> torch.Tensor:
    """(N, dim) finite features with N > 0, on ``like``'s device and dtype (checked finite
    after the cast: a float64 value too large for float32 becomes infinite there)."""
    return finite_rows(_matrix(value, name, dim).to(like.device, like.dtype), name)


def feature_vector(value: object, name: str, *, like: torch.Tensor) -> torch.Tensor:
    """One finite feature vector (D,) for the head whose weight ``like`` is (C, D), on its
    device and dtype (:func:`features_tensor`)."""
    dim = like.shape[1]
    vector = tensor_argument(value, name)
    if vector.shape != (dim,):
        raise ValueError(f"{name} must be ({dim},) for this head, got {tuple(vector.shape)}")
    return features_tensor(vector.unsqueeze(0), name, dim=dim, like=like)[0]


def feature_matrix(value: object, name: str) -> torch.Tensor:
    """(N, D) finite floating-point features with N > 0, any D, detached."""
    return finite_rows(_matrix(value, name, None), name)


def head_parameters(weight: object, bias: object) -> None:
    """A linear head's ``weight`` (C, D) and ``bias`` (C,): floating-point, of one dtype and
    device. Metadata only, no values are read (this runs per minibatch of an edit)."""
    weight, bias = tensor_argument(weight, "weight"), tensor_argument(bias, "bias")
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"weight must be (C, D) and bias (C,), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if weight.numel() == 0:  # a solver divides its penalties by D
        raise ValueError(f"weight must have at least one class and one feature, got {tuple(weight.shape)}")
    if not weight.is_floating_point() or bias.dtype != weight.dtype or bias.device != weight.device:
        raise TypeError(f"weight and bias must be floating-point tensors of one dtype and device, got {weight.dtype} on "
                        f"{weight.device} and {bias.dtype} on {bias.device}")


def linear_head(value: object) -> nn.Linear:
    """``value``, an ``nn.Linear`` with a bias (the head a ranking or an edit reads)."""
    if not isinstance(value, nn.Linear) or value.bias is None:
        raise TypeError("head must be an nn.Linear with a bias")
    return value


def finite_head(weight: torch.Tensor, bias: torch.Tensor, prefix: str = "") -> None:
    """:func:`head_parameters`, and every value finite (one read of the head): a NaN logit
    row's argmax is class 0, so a NaN head predicts class 0 everywhere, without a word.
    ``prefix`` names where they come from (``"head."`` for a module)."""
    head_parameters(weight, bias)
    finite_rows(weight, f"{prefix}weight")
    finite_rows(bias.unsqueeze(0), f"{prefix}bias")


def labels_tensor(value: object, name: str, *, count: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """(count,) int64 class indices in [0, num_classes)."""
    labels = tensor_argument(value, name)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor of class indices, got {labels.dtype}")
    if labels.shape != (count,):
        raise ValueError(f"{name} must be ({count},), one class index per sample, got {tuple(labels.shape)}")
    labels = labels.to(device, torch.long)
    if count and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    return labels


def labelled_features(features: object, labels: object, *, like: torch.Tensor,
                      names: tuple[str, str] = ("features", "labels")) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (N, D) features and (N,) labels for the head whose weight ``like`` is (C, D)."""
    num_classes, dim = like.shape
    checked = features_tensor(features, names[0], dim=dim, like=like)
    return checked, labels_tensor(labels, names[1], count=len(checked), num_classes=num_classes, device=like.device)


def _scalar(value: object) -> object:
    """A one-element tensor or array as the Python number it holds; anything else as is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    return value


def index(value: object, name: str, upper: int) -> int:
    """An integer in [0, upper): a class or a neuron. Floats, bools and strings are refused,
    never truncated."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer index, got {value!r} ({type(value).__name__})")
    if not 0 <= int(value) < upper:
        raise ValueError(f"{name} must lie in [0, {upper}), got {int(value)}")
    return int(value)


def indices(values: object, name: str, upper: int, *, distinct: bool = False) -> list[int]:
    """A non-empty list of integers in [0, upper), each checked by :func:`index`; from a
    sequence, a set, or a 1-D tensor or array. With ``distinct``, none listed twice (a
    neuron zeroed twice is subtracted twice; a caller may have meant another one)."""
    if isinstance(values, torch.Tensor | np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | set | frozenset):
        raise TypeError(f"{name} must be a sequence of indices in [0, {upper}), got {values!r} ({type(values).__name__})")
    if len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of indices in [0, {upper}), got {values!r}")
    if isinstance(values, set | frozenset):  # named in sorted order: a set's own order varies from run to run
        try:
            values = sorted(values)
        except TypeError:  # {None, 2}: Python's bare "'<' not supported", naming no argument
            raise TypeError(f"{name} must be a sequence of indices in [0, {upper}), got {values!r} ({type(values).__name__})") from None
    listed = [index(value, f"{name}[{i}]", upper) for i, value in enumerate(values)]
    if distinct and len(set(listed)) < len(listed):
        twice = next(n for i, n in enumerate(listed) if n in listed[:i])
        raise ValueError(f"{name} lists neuron {twice} twice")
    return listed


def repeated_pair_problem(first_asking: dict[tuple[int, int], int], position: int, neuron: int, class_index: int,
                          class_names: Sequence[str]) -> str | None:
    """Why a visualisation's ``pairs[position]``, asking for image (``neuron``, ``class_index``),
    is refused, or None, noting it in ``first_asking`` (each pair asked so far, by the position
    of the first pair asking for it): an image's start and augmentations follow from (seed,
    neuron, class), so a second asking would optimise the same image again. The server's
    VisualizeNeurons and ClipIllusion.visualize check it alike."""
    if (first := first_asking.setdefault((neuron, class_index), position)) == position:
        return None
    named = repr(class_names[class_index]) if class_names else class_index
    return f"repeats pairs[{first}]: both ask for neuron {neuron} with class {named}, which would be optimised twice into the same image"


def number(value: object, name: str, *, low: float = 0.0, low_open: bool = False) -> float:
    """A finite real number ≥ ``low`` (> ``low`` with ``low_open``)."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '≥'} {low}, got {value!r}")
    return float(value)


def require_step_fits(learning_rate: float, name: str, dtype: torch.dtype, *, factor: float = 1.0) -> None:
    """ValueError unless ``factor`` × ``learning_rate`` fits ``dtype``: an optimiser hands
    torch that much as a number of the parameters' dtype (Adam's first step is
    1 / (1 − β1) times its rate), and past the dtype's range torch raises a bare overflow
    RuntimeError in the middle of the work."""
    if learning_rate * factor > (largest := torch.finfo(dtype).max):
        raise ValueError(f"{name} must be at most {largest / factor:.3g} ({factor:g} × {name} must fit {dtype}, "
                         f"the optimiser's first step), got {learning_rate!r}")


def count(value: object, name: str, *, low: int = 1) -> int:
    """An integer ≥ ``low``: steps, epochs, sizes."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return int(value)


def callback_or_none(value: object, name: str) -> None:
    """TypeError unless ``value`` is None or callable: called only after the first step or
    epoch, a wrong one failed there, with torch's work up to it lost."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {value!r} ({type(value).__name__})")


def seed_value(value: object) -> int:
    """An integer seed (any sign); floats and bools are refused, never truncated."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"seed must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


# Bicubic resizing overshoots [0, 1] by up to about 0.1; 0–255 pixels and images already
# normalised with a mean and std (about −2.1 … 2.6) fall well outside.
_IMAGE_RANGE = (-0.25, 1.25)


def images_tensor(value: object, name: str) -> torch.Tensor:
    """(N, 3, H, W) float images in [0, 1] with N > 0, where they are (a model moves them
    batch by batch: 50,000 ImageNet images would not fit on a GPU at once).

    uint8 pixels are refused rather than scaled: a caller passing 0–255 floats would get
    the same silent nonsense, so both are told what the range is."""
    images = tensor_argument(value, name)
    if not images.is_floating_point():
        raise TypeError(f"{name} must be float images in [0, 1] (divide uint8 pixels by 255), got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3 or 0 in images.shape:  # an image of no pixels has no range to check
        raise ValueError(f"{name} must be (N, 3, H, W) RGB with N, H, W > 0, got {tuple(images.shape)}")
    if not images.is_meta:
        values = images.detach()  # read, not differentiated: torch warns on a scalar that requires grad
        low, high = float(values.amin()), float(values.amax())
        if not (_IMAGE_RANGE[0] <= low and high <= _IMAGE_RANGE[1]):  # also False for NaN
            raise ValueError(f"{name} must lie in [0, 1] (the engines normalise themselves), got values in [{low:.3g}, {high:.3g}]")
    return images


def refuse_inference_mode(work: str) -> None:
    """RuntimeError saying so inside ``torch.inference_mode()``, where ``torch.enable_grad()``
    cannot turn gradients back on (it can under ``torch.no_grad()``): else ``work`` failed
    with torch's bare "element 0 of tensors does not require grad"."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{work}, which torch.inference_mode() turns off; "
                           "call it outside inference mode (under torch.no_grad() it works)")


_modes_lock = threading.Lock()
_saved_modes: dict[int, tuple[int, list[tuple[nn.Module, bool]]]] = {}  # id(root) -> (blocks open, modes)


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block and restore each submodule's own mode
    after: a caller's model in training mode must not update its BatchNorm statistics
    from our forwards, nor come back switched to eval. Blocks on one model may overlap
    (threads): the first saves its modes, the last to leave restores them."""
    roots = list({id(root): root for root in modules if root is not None}.values())
    with _modes_lock:
        for root in roots:
            count, saved = _saved_modes.get(id(root), (0, [(module, module.training) for module in root.modules()]))
            _saved_modes[id(root)] = (count + 1, saved)
            root.eval()
    try:
        yield
    finally:
        with _modes_lock:
            for root in roots:
                count, saved = _saved_modes.pop(id(root))
                if count > 1:
                    _saved_modes[id(root)] = (count - 1, saved)
                else:
                    for module, training in saved:
                        module.training = training
