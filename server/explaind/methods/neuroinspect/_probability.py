"""Probability ratios p_c(f) / p_c(f with neurons zeroed) (NeuroInspect, Eq. 7).

A ratio above 1 means the neurons raise class c's probability relative to the other
classes; 1 means zeroing them leaves p_c unchanged. Computed in log space, so large
ratios do not overflow the softmax, and capped at 1e15, the bound the authors' 1e-15
floor on p'_c sets, so they stay finite in float32 (and a penalty on them trainable).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import feature_vector, features_tensor, finite_head, index, indices, row_slices

MAX_RATIO = 1e15
_MAX_LOG_RATIO = math.log(MAX_RATIO)


# Logits computed at a time where only each row's prediction is kept (4 MB of float32): a
# 50,000-sample set's logits under a 1000-class head, and the bias added to them, took
# 381 MB at once, at every epoch of an edit. Slices of 16 MB came back to the process's
# heap, which then grew by up to 125 MB (bench/neuroinspect_scale.py).
PREDICTION_ELEMENTS = 1 << 20


def predicted_classes(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The head's class (N,) for each row of ``features`` (N, D), its logits argmaxed by
    slices of rows of :data:`PREDICTION_ELEMENTS` logits. The head module's own product,
    F.linear, as EvaluateSampleSet and Predict classify and the solvers judge a flip:
    ``features @ weight.T + bias`` rounds some samples on the decision boundary to another
    class, mistakes an evaluation counted right. A BLAS may still round a product of a few
    rows otherwise than one of many (a class's handful of samples, the last slice): on
    this project's CPU under 16 rows with one thread, under about 272 with two on a
    2048 x 1000 head; with MKL's AVX2 kernels a row's rounding also depends on its place
    in the product, so padding slices to a minimum size would not make them agree."""
    return torch.cat([F.linear(rows, weight, bias).argmax(1) for rows in row_slices(features, PREDICTION_ELEMENTS, len(weight))])


@torch.no_grad()
def neuron_importance(weight: torch.Tensor, bias: torch.Tensor, feature: torch.Tensor, class_index: int) -> torch.Tensor:
    """Ratio (D,) for each neuron zeroed on its own, at one feature vector (D,), under the
    head ``weight`` (C, D), ``bias`` (C,); ``feature`` is cast to the head's device and dtype.
    A report, not a loss: given a head's parameters (``model.fc.weight``) it came back
    requiring grad, which ``.numpy()`` (and a plot of it) refused; :func:`probability_ratio`
    is the differentiable one."""
    finite_head(weight, bias)
    feature = feature_vector(feature, "feature", like=weight)
    class_index = index(class_index, "class_index", weight.shape[0])
    logits = weight @ feature + bias  # (C,)
    zeroed = logits.unsqueeze(0) - feature.unsqueeze(1) * weight.T  # (D, C): neuron k zeroed in row k
    log_p = logits[class_index] - logits.logsumexp(0)
    log_p_zeroed = zeroed[:, class_index] - zeroed.logsumexp(1)
    return _capped_exp(log_p - log_p_zeroed)


def probability_ratio(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, class_index: int, neurons: torch.Tensor
) -> torch.Tensor:
    """Ratio (N,) per sample of features (N, D), with all ``neurons`` (K,) zeroed together.

    Differentiable in ``weight`` and ``bias``: the head editor's regulariser. ``features``
    are checked finite (a read of the device), detached and cast to the head's device and
    dtype; the editor's minibatches skip the check, through ``_ratio_of_logits``.
    """
    finite_head(weight, bias)
    features = features_tensor(features, "features", dim=weight.shape[1], like=weight)
    class_index = index(class_index, "class_index", weight.shape[0])
    if not isinstance(neurons, torch.Tensor) or neurons.ndim != 1 or neurons.is_floating_point() or neurons.dtype == torch.bool:
        raise TypeError(f"neurons must be a 1-D integer tensor of neuron indices, got {neurons!r}")
    indices(neurons, "neurons", weight.shape[1], distinct=True)  # -1 would silently be the last neuron, [2, 2] zero it twice
    # int64 on the head's device: uint8 indices are read as a mask, int8 ones refused, and
    # a CPU tensor cannot be indexed by a GPU one.
    neurons = neurons.to(weight.device, torch.long)
    return _ratio_of_logits(features @ weight.T + bias, weight, features, class_index, neurons)


def _ratio_of_logits(logits: torch.Tensor, weight: torch.Tensor, features: torch.Tensor, class_index: int,
                     neurons: torch.Tensor) -> torch.Tensor:
    """:func:`probability_ratio` on checked arguments, from the head's ``logits`` (N, C) of
    ``features``: per minibatch of an edit, which computes them for its cross-entropy
    already, and where reading the neuron indices back would wait for a GPU."""
    zeroed = logits - features[:, neurons] @ weight[:, neurons].T
    log_p = logits[:, class_index] - logits.logsumexp(1)
    log_p_zeroed = zeroed[:, class_index] - zeroed.logsumexp(1)
    return _capped_exp(log_p - log_p_zeroed)


def _capped_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp of ``log_ratio`` capped at 1e15, in at least float32: float16's largest value,
    65504, is e^11, so a half-precision head's ratios overflowed to infinity below the cap."""
    return log_ratio.to(torch.promote_types(log_ratio.dtype, torch.float32)).clamp_max(_MAX_LOG_RATIO).exp()
