"""Edit the linear head to weaken false correlations (NeuroInspect §III-E).

Only the head is retrained, on cached features, with cross-entropy plus a penalty on the
neurons K found behind the mistakes:

* ``probability_ratio`` (ours): λ3 ‖p_c / p'_c − o‖₂, p' the softmax with the features
  in K zeroed and the norm taken over the minibatch as in the authors' code. With o = 1
  class c may use K no more than the other classes do, which keeps the rest intact.
* ``constrain`` (the paper's CON baseline, Eq. 9): λ ‖α_k β_{c,k} + b_c‖₂ over k ∈ K,
  averaged over the minibatch; it shrinks class c's use of K directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (callback_or_none, count, finite_head, index, indices, labelled_features, linear_head, number, refuse_inference_mode,
                      require_step_fits, seed_value)
from ._probability import MAX_RATIO, _ratio_of_logits, neuron_importance, predicted_classes

METHODS = ("probability_ratio", "constrain")
SELECTIONS = ("accuracy", "worst_class")
DEFAULT_STRENGTH = {"probability_ratio": 0.01, "constrain": 1.0}


@dataclass
class HeadEvaluation:
    """Accuracy of a head on one labelled feature set."""

    accuracy: float
    class_accuracy: dict[int, float]  # classes present in the set
    group_accuracy: dict[str, float] = field(default_factory=dict)  # empty without groups

    @property
    def worst_class(self) -> tuple[int, float]:
        klass = min(self.class_accuracy, key=self.class_accuracy.__getitem__)
        return klass, self.class_accuracy[klass]

    @property
    def worst_group(self) -> tuple[str, float] | None:
        if not self.group_accuracy:
            return None
        group = min(self.group_accuracy, key=self.group_accuracy.__getitem__)
        return group, self.group_accuracy[group]


@torch.no_grad()
def evaluate_head(
    weight: torch.Tensor,
    bias: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    groups: Sequence[str] | np.ndarray | None = None,
) -> HeadEvaluation:
    """Overall, per-class and (with ``groups``, one name per sample) per-group accuracy of
    the head ``weight`` (C, D), ``bias`` (C,) on ``features`` (N, D) with ``labels`` (N,)."""
    finite_head(weight, bias)
    return _evaluate(weight, bias, *labelled_features(features, labels, like=weight), groups)


def _evaluate(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
              groups: Sequence[str] | np.ndarray | None = None) -> HeadEvaluation:
    """:func:`evaluate_head` on features and labels already checked (each epoch of an edit)."""
    correct = (predicted_classes(weight, bias, features) == labels).cpu().numpy()
    labels_np = labels.cpu().numpy()
    counts, hits = np.bincount(labels_np), np.bincount(labels_np, weights=correct)  # one pass, not a mask per class
    class_accuracy = {int(c): float(hits[c] / counts[c]) for c in np.flatnonzero(counts)}
    group_accuracy = {}
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != correct.shape:
            raise ValueError(f"groups must have one entry per sample ({len(correct)}), got {groups.shape}")
        _refuse_missing_groups(groups, "groups")
        # Counted in one pass too: a mask per group compared every name with every sample's,
        # 5.9 s for 10,000 groups (MAX_EDIT_GROUPS) of 50,000 samples, twice an edit (bench/group_accuracy.py).
        names, group_of = np.unique(groups, return_inverse=True)
        group_hits, group_counts = np.bincount(group_of, weights=correct, minlength=len(names)), np.bincount(group_of, minlength=len(names))
        group_accuracy = {str(g): float(hit / count) for g, hit, count in zip(names, group_hits, group_counts, strict=True)}
    return HeadEvaluation(float(correct.mean()), class_accuracy, group_accuracy)


def _refuse_missing_groups(groups: np.ndarray, name: str) -> None:
    """ValueError where a sample has no group (None, or NaN as pandas marks a missing value):
    NaN made a group of its own whose accuracy was NaN (no NaN equals another), and None
    among names failed inside numpy's sort with a bare TypeError."""
    missing = [position for position, group in enumerate(groups.tolist()) if group is None or group != group]
    if missing:
        raise ValueError(f"{name} must name every sample's group, got a missing value (None or NaN) for {len(missing)} "
                         f"samples (first: sample {missing[0]})")


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of an edit, as ``callback_on_epoch_end`` receives it and the result keeps."""

    epoch: int
    train_loss: float  # mean total loss over the epoch's minibatches
    penalty: float  # mean penalty term (before the strength factor)
    validation_accuracy: float
    validation_worst_class_accuracy: float


@dataclass
class HeadEdit:
    """New head weights, how they were found, and their evaluation against the old head.
    The repr leaves out the weights: a notebook cell ending in an edit printed all C × D
    of them (some 13,000 characters for the shapes world's 6 × 128 head)."""

    weight: torch.Tensor = field(repr=False)  # (C, D)
    bias: torch.Tensor = field(repr=False)  # (C,)
    method: str
    target_class: int
    neurons: tuple[int, ...]
    strength: float
    target_ratio: float  # o; NaN for constrain, which has none
    best_epoch: int  # 1-based epoch whose weights were kept
    history: list[EpochRecord]
    before: HeadEvaluation  # old head on the evaluation set (the validation set by default)
    after: HeadEvaluation  # new head on the same set
    cancelled: bool = False

    def as_linear(self) -> nn.Linear:
        """The edited head as a module on the weights' device and dtype, to put in place of
        the model's head. Built without initialising it first: that would draw from the
        global random generator a caller may have seeded."""
        head: nn.Linear = nn.utils.skip_init(  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            nn.Linear, self.weight.shape[1], self.weight.shape[0], device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(self.weight)
            head.bias.copy_(self.bias)
        return head


# Progress hook: (epoch, max_epochs, record) -> True to stop after this epoch.
EpochCallback = Callable[[int, int, EpochRecord], "bool | None"]


class TrainingDiverged(ArithmeticError):
    """The head's weights became NaN or infinite: the settings were too aggressive."""


class HeadEditor:
    """Retrains only a linear head so that class ``target_class`` relies less on ``neurons``."""

    def __init__(self, head: nn.Linear) -> None:
        self.head = linear_head(head)

    def suggested_target_ratio(self, features: torch.Tensor, labels: torch.Tensor, *, target_class: int,
                               neurons: Sequence[int]) -> float:
        """The paper's o = (min_k importance_k − 1) / 3 + 1 on class ``target_class``'s mean feature."""
        weight = self.head.weight.detach()
        num_classes, dim = weight.shape
        features, labels = labelled_features(features, labels, like=weight)
        return self._target_ratio(features, labels, index(target_class, "target_class", num_classes), indices(neurons, "neurons", dim))

    def _target_ratio(self, features: torch.Tensor, labels: torch.Tensor, target_class: int, neuron_ids: list[int]) -> float:
        """:meth:`suggested_target_ratio` on arguments already checked."""
        in_class = labels == target_class
        if not in_class.any():
            raise ValueError(f"labels hold no sample of target_class {target_class}")
        weight, bias = self.head.weight.detach(), self.head.bias.detach()
        importance = neuron_importance(weight, bias, features[in_class].mean(0), target_class)
        return float((importance[neuron_ids].min() - 1) / 3 + 1)

    def edit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        target_class: int,
        neurons: Sequence[int],
        validation_features: torch.Tensor,
        validation_labels: torch.Tensor,
        method: str = "probability_ratio",
        strength: float | None = None,
        target_ratio: float | str | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 32,
        max_epochs: int = 20,
        patience: int = 5,
        selection: str = "accuracy",
        seed: int = 0,
        evaluation_features: torch.Tensor | None = None,
        evaluation_labels: torch.Tensor | None = None,
        evaluation_groups: Sequence[str] | np.ndarray | None = None,
        callback_on_epoch_end: EpochCallback | None = None,
        callback_on_training_end: Callable[[], None] | None = None,
    ) -> HeadEdit:
        """Retrain the head on training ``features`` (N, D) / ``labels`` (N,) with Adam.

        Args:
            target_class: the class c whose reliance on ``neurons`` is penalised.
            neurons: the neuron ids K (feature indices), e.g. a ranking's top ids.
            validation_features, validation_labels: (M, D) / (M,), for early stopping.
            method: ``"probability_ratio"`` (ours) or ``"constrain"`` (the CON baseline).
            strength: λ3 of the penalty; default 0.01 for ours, 1.0 for ``constrain``.
            target_ratio: o (default 1; at most 1e15, where ratios are capped), or ``"auto"`` for :meth:`suggested_target_ratio`;
                ``probability_ratio`` only (``constrain`` refuses one rather than ignore it).
            learning_rate, weight_decay, batch_size: Adam's step size and L2 decay, and
                the minibatch size; ``seed`` fixes the minibatch order.
            max_epochs, patience: early stopping on the validation set; the best epoch's
                weights are kept, judged by ``selection`` (``"accuracy"``, ties broken by
                worst-class accuracy, or ``"worst_class"``, ties broken by accuracy).
            evaluation_features, evaluation_labels, evaluation_groups: the set ``before`` and
                ``after`` are measured on (default: the validation set, without groups).
            callback_on_epoch_end: ``(epoch, max_epochs, record)``; return True to stop.
            callback_on_training_end: called once the epochs end, before ``before`` and
                ``after`` are measured (e.g. to time that evaluation apart).

        Runs under ``torch.no_grad()`` too (gradients are turned on for the head's training
        alone); inside ``torch.inference_mode()`` it raises RuntimeError, as
        :meth:`ClipIllusion.visualize` does.
        """
        refuse_inference_mode("edit trains the head by gradient descent")
        weight0, bias0 = self.head.weight.detach(), self.head.bias.detach()
        finite_head(weight0, bias0, "head.")  # else reported as diverged training, to retry with lower settings
        device = weight0.device
        num_classes, dim = weight0.shape
        features, labels = labelled_features(features, labels, like=weight0)
        validation_features, validation_labels = labelled_features(validation_features, validation_labels, like=weight0,
                                                                   names=("validation_features", "validation_labels"))
        if evaluation_features is None:
            if evaluation_labels is not None or evaluation_groups is not None:
                raise ValueError("evaluation_labels and evaluation_groups need evaluation_features (without them "
                                 "the validation set is evaluated, without groups)")
            evaluation_features, evaluation_labels = validation_features, validation_labels
        elif evaluation_labels is None:
            raise ValueError("evaluation_labels must be given with evaluation_features")
        else:
            evaluation_features, evaluation_labels = labelled_features(evaluation_features, evaluation_labels, like=weight0,
                                                                       names=("evaluation_features", "evaluation_labels"))
            if evaluation_groups is not None:
                if np.shape(evaluation_groups) != (len(evaluation_features),):
                    raise ValueError(f"evaluation_groups must have one entry per evaluation sample ({len(evaluation_features)},), "
                                     f"got {np.shape(evaluation_groups)}")
                _refuse_missing_groups(np.asarray(evaluation_groups), "evaluation_groups")
        target_class = index(target_class, "target_class", num_classes)
        neuron_ids = torch.tensor(sorted(indices(neurons, "neurons", dim, distinct=True)), device=device)  # as the service refuses them
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        strength = number(DEFAULT_STRENGTH[method] if strength is None else strength, "strength")
        learning_rate = number(learning_rate, "learning_rate", low_open=True)
        weight_decay = number(weight_decay, "weight_decay")
        batch_size, max_epochs, patience = count(batch_size, "batch_size"), count(max_epochs, "max_epochs"), count(patience, "patience")
        seed = seed_value(seed)
        callback_or_none(callback_on_epoch_end, "callback_on_epoch_end")
        callback_or_none(callback_on_training_end, "callback_on_training_end")
        if method == "constrain":
            if target_ratio is not None:
                raise ValueError("target_ratio applies to the probability_ratio method only; constrain has no target ratio")
            target_ratio = float("nan")
        elif target_ratio == "auto":
            target_ratio = self._target_ratio(features, labels, target_class, neuron_ids.tolist())
        elif isinstance(target_ratio, str):
            raise ValueError(f"target_ratio must be a number or 'auto', got {target_ratio!r}")
        else:
            target_ratio = number(1.0 if target_ratio is None else target_ratio, "target_ratio", low_open=True)
            if target_ratio > MAX_RATIO:  # a target no ratio can reach; past float32's range a "diverged" training
                raise ValueError(f"target_ratio must be at most {MAX_RATIO:g}, where the probability ratios are capped, "
                                 f"got {target_ratio:g}")

        # Adam's moments and its eps (1e-8 is 0 in float16) need at least float32: a float16
        # head is trained on float32 copies, and evaluated and kept in its own dtype.
        train_dtype = torch.promote_types(weight0.dtype, torch.float32)
        require_step_fits(learning_rate, "learning_rate", train_dtype, factor=1 / (1 - 0.9))  # Adam's default β1
        train_features = features.to(train_dtype)
        weight = weight0.to(train_dtype).clone().requires_grad_(True)
        bias = bias0.to(train_dtype).clone().requires_grad_(True)
        optimiser = torch.optim.Adam([weight, bias], lr=learning_rate, weight_decay=weight_decay)
        generator = torch.Generator(device="cpu").manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)  # a negative seed as its two's complement
        history: list[EpochRecord] = []
        best_key, best_state, best_epoch, stale = None, (weight0, bias0), 0, 0
        cancelled = False
        for epoch in range(1, max_epochs + 1):
            order = torch.randperm(len(features), generator=generator, device="cpu").to(device)  # drawn on the host: one order on every device
            totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed where computed: .item() would sync a GPU every step
            batches = 0
            with torch.enable_grad():  # the head trains under a caller's torch.no_grad() too
                for start in range(0, len(order), batch_size):
                    batch = order[start : start + batch_size]
                    x, y = train_features[batch], labels[batch]
                    logits = x @ weight.T + bias  # once, for the cross-entropy and the ratio
                    ce = F.cross_entropy(logits, y)
                    if method == "probability_ratio":
                        penalty = (_ratio_of_logits(logits, weight, x, target_class, neuron_ids) - target_ratio).norm()
                    else:
                        penalty = (x[:, neuron_ids] * weight[target_class, neuron_ids] + bias[target_class]).norm(dim=1).mean()
                    loss = ce + strength * penalty
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    totals += torch.stack([loss.detach(), penalty.detach()]).double()
                    batches += 1
            current = weight.detach().to(weight0.dtype).clone(), bias.detach().to(weight0.dtype).clone()
            if not (torch.isfinite(current[0]).all() and torch.isfinite(current[1]).all()):
                raise TrainingDiverged(f"training diverged: the edited head has NaN or infinite weights after epoch {epoch}; "
                                       f"retry with a lower strength, target_ratio or learning_rate")
            validation = _evaluate(*current, validation_features, validation_labels)
            mean_loss, mean_penalty = (totals / batches).tolist()
            record = EpochRecord(epoch, mean_loss, mean_penalty,
                                 validation.accuracy, validation.worst_class[1])
            history.append(record)
            key = (validation.accuracy, validation.worst_class[1])
            key = key if selection == "accuracy" else key[::-1]
            if best_key is None or key > best_key:
                best_key, best_state, best_epoch, stale = key, current, epoch, 0
            else:
                stale += 1
            if callback_on_epoch_end is not None and callback_on_epoch_end(epoch, max_epochs, record):
                cancelled = True
                break
            if stale >= patience:
                break

        new_weight, new_bias = best_state
        if callback_on_training_end is not None:
            callback_on_training_end()
        return HeadEdit(
            weight=new_weight,
            bias=new_bias,
            method=method,
            target_class=target_class,
            neurons=tuple(int(n) for n in neuron_ids.tolist()),
            strength=strength,
            target_ratio=target_ratio,
            best_epoch=best_epoch,
            history=history,
            before=_evaluate(weight0, bias0, evaluation_features, evaluation_labels, evaluation_groups),
            after=_evaluate(new_weight, new_bias, evaluation_features, evaluation_labels, evaluation_groups),
            cancelled=cancelled,
        )
