"""Which neurons detect a concept: per-neuron ROC AUC of activation for concept vs rest."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

import numpy as np
import torch

from ._checks import count, feature_matrix, number

Concept = TypeVar("Concept", bound=Hashable)


def neuron_auc(features: torch.Tensor, positive: torch.Tensor | np.ndarray) -> torch.Tensor:
    """AUC (D,) of each neuron's activation in ``features`` (N, D) separating ``positive`` (N,) bool.

    1.0: the neuron is higher on every positive than on every negative; 0.5: chance.
    Ties count half (Mann–Whitney U).
    """
    return _neuron_auc(feature_matrix(features, "features"), positive, "positive")


def _neuron_auc(features: torch.Tensor, positive: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """:func:`neuron_auc` on checked ``features``, its errors naming the mask ``name`` (a
    concept's, for :func:`concept_neurons`)."""
    if isinstance(positive, torch.Tensor):
        positive = positive.cpu().numpy()
    positive = np.asarray(positive)
    if positive.dtype != bool:  # class labels read as a mask would make every non-zero class positive
        if positive.dtype.kind not in "iu" or not np.isin(positive, (0, 1)).all():
            shown = np.unique(positive) if positive.dtype.kind in "iuf" else positive.ravel()  # objects (None) do not sort
            raise TypeError(f"{name} must be a boolean (or 0/1) mask, got {positive.dtype} values {shown[:5].tolist()}")
        positive = positive.astype(bool)
    if positive.shape != (len(features),):
        raise ValueError(f"{name} must be ({len(features)},) for features (N, D), got {positive.shape}")
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    if num_positive == 0 or num_negative == 0:
        raise ValueError(f"{name} must mark at least one positive and one negative sample")
    # Imported here, not at the top: scipy.stats takes about a quarter of the server's
    # start-up imports, and only probing needs it.
    from scipy.stats import rankdata  # type: ignore[import-untyped]  # scipy ships no types

    ranks = rankdata(features.cpu().double().numpy(), axis=0)
    u = ranks[positive].sum(0) - num_positive * (num_positive + 1) / 2
    return torch.from_numpy(u / (num_positive * num_negative))


def concept_neurons(
    features: torch.Tensor, concepts: Mapping[Concept, torch.Tensor | np.ndarray], *, min_auc: float = 0.9,
    per_concept: int = 3,
) -> dict[Concept, list[int]]:
    """Neurons that detect each concept: AUC >= ``min_auc`` for it, strongest first.

    ``features`` (N, D); ``concepts`` maps a concept (any hashable key) to its (N,) bool positive mask.
    "Strongest" is the mean activation over all N samples, so a detector that fires
    often and hard comes before a faint one. At most ``per_concept`` per concept; a
    concept no neuron detects maps to an empty list.
    """
    if not 0.5 < number(min_auc, "min_auc") <= 1:
        raise ValueError(f"min_auc must lie in (0.5, 1], got {min_auc}")
    per_concept = count(per_concept, "per_concept")
    features = feature_matrix(features, "features")
    if not isinstance(concepts, Mapping):
        raise TypeError(f"concepts must be a mapping of concept to its (N,) bool mask, got {type(concepts).__name__}")
    # Ties by neuron (an unstable sort reorders 17 or more); on the host, as neuron_auc's tensor it indexes.
    by_strength = features.mean(0).argsort(descending=True, stable=True).cpu()
    found = {}
    for name, positive in concepts.items():
        detects = _neuron_auc(features, positive, f"concepts[{name!r}]")[by_strength] >= min_auc
        found[name] = by_strength[detects][:per_concept].tolist()
    return found
