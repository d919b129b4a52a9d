"""Which neurons detect a concept: per-neuron ROC AUC of activation for concept vs rest."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata


def neuron_auc(features: torch.Tensor, positive: torch.Tensor | np.ndarray) -> torch.Tensor:
    """AUC (D,) of each neuron's activation in ``features`` (N, D) separating ``positive`` (N,) bool.

    1.0: the neuron is higher on every positive than on every negative; 0.5: chance.
    Ties count half (Mann–Whitney U).
    """
    positive = np.asarray(positive, dtype=bool)
    if features.ndim != 2 or positive.shape != (len(features),):
        raise ValueError(f"positive must be ({len(features)},) for features (N, D), got {positive.shape}")
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    if num_positive == 0 or num_negative == 0:
        raise ValueError("positive must mark at least one positive and one negative sample")
    ranks = rankdata(features.detach().cpu().double().numpy(), axis=0)
    u = ranks[positive].sum(0) - num_positive * (num_positive + 1) / 2
    return torch.from_numpy(u / (num_positive * num_negative))
