"""Rank the neurons behind a class's mistakes from their counterfactual shifts ω."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from explaind.methods.ranking_text import check_limit, neuron_lines
from explaind.wording import counted

from ._counterfactual import CounterfactualSolver, SolverCallback, make_solver
from ._checks import callback_or_none, count, feature_vector, finite_head, index, labelled_features, linear_head, number
from ._probability import neuron_importance, predicted_classes

INSUFFICIENT = "insufficient"  # ω > 0: the true class needed more of this neuron
EXCESSIVE = "excessive"  # ω < 0: the neuron pushed the sample away from its class
BOTH = "both"
# Neurons taken per sample and direction when top_k is not given (the paper's), or D where D is smaller.
DEFAULT_TOP_K = 5
# Bootstrap resamples a ranking's stability may ask for: 1000 on M = 4096, D = 2048 took
# 0.53 s on one CPU thread, 200 took 0.11 s (bench/stability_cost.py, docs/neuroinspect.md).
MAX_STABILITY_RESAMPLES = 1000
# The neurons a resample's stability counts: the first this many of its merged ranking.
STABILITY_TOP = 5
# Seed of the resamples: fixed, so the same mistakes give the same stability every time
# (a repeated request, a notebook rerun); the mistakes themselves are what varies.
STABILITY_SEED = 0
# Progress hook of the stability's resamples: (resamples done, resamples) -> True to stop now.
ResampleCallback = Callable[[int, int], "bool | None"]


@dataclass(frozen=True)
class RankedNeuron:
    """One neuron implicated in the mistakes."""

    neuron: int
    direction: str  # "insufficient", "excessive" or "both" (each list it passed the cut in)
    insufficient_ratio: float  # share of mistakes with the neuron among their top-k positive ω
    excessive_ratio: float  # share of mistakes with the neuron among their top-k negative ω
    mean_omega: float  # mean ω over the mistakes (feature units)
    importance: float  # p_c(f̄) / p_c(f̄ with the neuron zeroed), f̄ the class mean feature
    top_classes: tuple[int, ...]  # classes with the largest head weight for the neuron
    # Share of bootstrap resamples of the mistakes whose merged top-5 holds the neuron;
    # 0 where ``rank`` was not given ``stability_resamples`` (see NeuronRanking's).
    stability: float = 0.0

    @property
    def rank_ratio(self) -> float:
        return max(self.insufficient_ratio, self.excessive_ratio)


@dataclass
class NeuronRanking:
    """Ranked neurons plus the per-mistake ω they were ranked from.

    ``neurons`` is ordered by rank ratio (the larger of the two), then by |mean ω|.

    Per-mistake tensors have one row per mistake, in the order of ``mistake_indices``
    (indices into the samples passed to :meth:`MistakeNeuronRanker.rank`).

    The reads common with the SDK's ``explaind.client.NeuronRanking`` (the server's
    answer) have the same names, so code moves between the two: ``neurons`` (each with
    ``neuron``, ``direction``, ``rank_ratio``, the two ratios, ``mean_omega``,
    ``importance``), ``neuron_ids``, ``mistake_count`` (also ``num_mistakes``), ``solver``
    and ``top_k``. They differ in ``target_class`` (the SDK's ``class_index``) and in a
    neuron's ``top_classes``: indices here, names in the SDK (its indices are
    ``top_class_indices``).
    """

    # Left out of the repr, as the tensors are: a notebook cell showing the ranking printed
    # every neuron and mistake (5 kB on the shapes world); it shows summary() instead.
    neurons: list[RankedNeuron] = field(repr=False)
    target_class: int
    solver: str
    num_samples: int
    mistake_indices: torch.Tensor = field(repr=False)  # (M,) int64
    omega: torch.Tensor = field(repr=False)  # (M, D)
    converged: torch.Tensor = field(repr=False)  # (M,) bool: the shift flips the prediction
    iterations: torch.Tensor = field(repr=False)  # (M,) solver steps taken
    insufficient_top: torch.Tensor = field(repr=False)  # (M, k) neuron ids, -1 where ω > 0 has < k entries
    excessive_top: torch.Tensor = field(repr=False)  # (M, k) neuron ids, -1 where ω < 0 has < k entries
    cancelled: bool = False
    # Bootstrap resamples behind each neuron's ``stability``; 0: not asked, stabilities all 0.
    stability_resamples: int = field(default=0, repr=False)
    # The B asked where a stop between resamples drew fewer (``stability_resamples``, a
    # chunk of 50 at least): ``rank``'s callback_on_resample_chunk_end. 0: all were drawn.
    stability_resamples_requested: int = field(default=0, repr=False)

    @property
    def num_mistakes(self) -> int:
        return len(self.mistake_indices)

    @property
    def mistake_count(self) -> int:
        """``num_mistakes`` under the SDK's name for it."""
        return self.num_mistakes

    @property
    def top_k(self) -> int:
        """Neurons taken per mistake and direction, the k of the ratios' top-k: ``rank``'s
        ``top_k``, or the default it stood for (5, or D where D < 5)."""
        return self.insufficient_top.shape[1]

    @property
    def num_converged(self) -> int:
        return int(self.converged.sum())

    @property
    def neuron_ids(self) -> list[int]:
        return [n.neuron for n in self.neurons]

    def summary(self, limit: int = 10) -> str:
        """The ranking as lines of text, as the SDK's ``NeuronRanking.summary`` gives the
        server's: the mistakes, the first ``limit`` neurons (0: all) with their direction,
        shares, importance and top classes (indices here), and how many counterfactuals
        flipped the prediction. ``print(ranking.summary())``."""
        check_limit(limit)
        cancelled = " (cancelled: stopped early)" if self.cancelled else ""  # in its solver
        if not self.num_mistakes:
            return f"no mistakes of class {self.target_class} in {counted(self.num_samples, 'sample')}: nothing to explain{cancelled}"
        top = f"top {self.top_k}"
        lines = [f"{counted(self.num_mistakes, 'mistake')} of class {self.target_class} in {counted(self.num_samples, 'sample')}{cancelled}; "
                 f"neurons ranked by share of mistakes in their {top} (solver {self.solver}):"]
        lines += neuron_lines(self.neurons, limit, self.stability_resamples, self.stability_resamples_requested)
        lines.append(f"{self.num_converged} of {counted(self.num_mistakes, 'counterfactual')} flipped the prediction")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """A notebook cell ending in a ranking shows its summary, as the SDK's does."""
        printer.text(self.summary())

    @property
    def insufficient(self) -> list[RankedNeuron]:
        """Neurons in the insufficient list, by insufficient ratio."""
        chosen = [n for n in self.neurons if n.direction in (INSUFFICIENT, BOTH)]
        return sorted(chosen, key=lambda n: (-n.insufficient_ratio, -abs(n.mean_omega), n.neuron))

    @property
    def excessive(self) -> list[RankedNeuron]:
        """Neurons in the excessive list, by excessive ratio."""
        chosen = [n for n in self.neurons if n.direction in (EXCESSIVE, BOTH)]
        return sorted(chosen, key=lambda n: (-n.excessive_ratio, -abs(n.mean_omega), n.neuron))


# top_ids sorts whole rows where k is at least 1 / FULL_SORT_SHARE of them: of 4096 rows of
# D = 2048 on a CPU thread, one stable sort took 0.48 s of normal scores and 0.14 s of 95 %
# zeros whatever k, topk of k + 1 with its ties ordered 0.39 s and 0.15 s at k = 600, and
# 1.6 s and 0.75 s at k = D. Rows that tie in topk's k + 1 (a ranking's ω, float16, and
# float32 normal scores from rows of about 2048) cross over at about n / 3: sort / topk
# 1.05 for 256 rows of 2048 at k = 683, 1.03 for 16 of 21000 at k = 7000 (median of 15,
# one CPU thread, a shared machine at load 4 on 2 cores, so +-30 %); 4096 rows of 100 (a
# Predict of 100 classes) 0.93 at k = 34 and 0.66 at 50 (2026-12-07, an earlier, busier
# run read 1.3 at 50). Rows without a tie skip the ordering and cross over later, which a
# rule of the shape alone cannot see: 64 rows of 1000 float32 normal scores, none tied,
# took 2.0 to 3.2 times topk's time at k = 333 (4 seeds) and 1.6 to 2.0 at 500, where
# float16 ones took 1.0 and 0.7. bench/top_neurons.py --crossover, docs/performance.md.
FULL_SORT_SHARE = 3
# A call of at most this many scores (rows x n) sorts whole rows whatever k: there a
# call's fixed cost decides. On a CPU thread one row of 10 to 1000 scores sorted in 0.010
# to 0.025 ms, where topk's path took 0.020 to 0.025 ms of scores without ties and 0.11 to
# 0.16 ms with (its ties' ordering is about 25 small operations); 64 rows of 10, 0.02 ms
# against 0.023 and 0.13. Past it the sort loses where nothing ties: one row of 2048
# logits took 0.036 to 0.059 ms where topk took 0.024 to 0.039.
SORTED_CALL_SCORES = 1024
# Where topk's k + 1 of a call of at most this many scores tie, the whole rows are sorted
# instead of ordering the ties (topk's time spent for nothing, but no more than a small
# sort's): one row of 2048 took 0.07 ms where ordering its ties took 0.15 (the sort alone
# 0.04), 64 rows of 100 0.12 ms against 0.19 (0.07). 4096 rows of 10 (40,960 scores)
# gain nothing: the sort's 0.25 to 0.7 ms after topk's 0.4 to 0.7 is as long as the
# ordering, 0.45 to 1.2.
TIED_CALL_SORTED_SCORES = 8192


def top_ids(scores: torch.Tensor, k: int, *, ties_kept_above: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest of each row of ``scores`` (R, n), largest first and
    equal scores by id (neurons of equal head columns have equal ω; a dead neuron's head
    column weighs every class 0; a Predict's classes of equal logits). ``topk``
    leaves ties to its kernel, which took ids 6 and 3 of 3, 4 and 6 tied in a row of 8 on
    a CPU, and may take others on another device.
    Where the k-th score ties the next at or below ``ties_kept_above``, if given, which
    of the tied ids are taken is left to topk (they are still listed by id), for a caller
    that drops them: ordering a mostly-zero ω's zeros took 15 times topk's time.
    Without it every tie is ordered, -inf's too (a Predict's classes a model masks).
    NaN (a Predict's logit where the model overflows: inf - inf), which topk puts above
    every number, ties with NaN here: a row's NaNs are ordered by id, whatever the other
    rows hold. Off the CPU every NaN is made positive first: CUDA's radix sort orders NaN
    by its bits, a NaN with the sign bit set below -inf (pytorch/pytorch#190781, as MPS's
    sort, #116567), where the CPU's puts every NaN first.
    A k of at least 1 / FULL_SORT_SHARE of the row is one stable descending sort, which
    orders every tie by id (and takes the first ids of a tie at or below
    ``ties_kept_above``) in less time than topk and the ties' ordering after it, where rows
    tie (a ranking's ω); so is a call of at most SORTED_CALL_SCORES scores whatever k, and
    one of at most TIED_CALL_SORTED_SCORES whose topk ties, where the ordering's fixed cost
    decides. Only the first k columns are kept: not the whole (R, n) sort."""
    row_count, n = scores.shape
    if scores.device.type != "cpu":  # a NaN of sign bit set (-nan, 0 * -inf's) is any NaN
        scores = torch.where(scores.isnan(), math.nan, scores)  # math.nan: the sign bit clear
    if k * FULL_SORT_SHARE >= n or row_count * n <= SORTED_CALL_SCORES:
        return _sorted_top(scores, k)
    values, ids = scores.topk(min(k + 1, n), dim=1)
    if not _tied(values[:, 1:], values[:, :-1]).any():  # no ties: topk's answer is the only one (Predict's usual case)
        return values[:, :k], ids[:, :k]
    if row_count * n <= TIED_CALL_SORTED_SCORES:
        return _sorted_top(scores, k)
    ids = ids[:, :k].clone()
    if k < n:  # rows whose k-th score ties the next: the first tied ids fill them
        last, following = values[:, k - 1], values[:, k]
        cut_tie = _tied(last, following)
        if ties_kept_above is not None:
            cut_tie &= (last > ties_kept_above) | last.isnan()
        crowded = cut_tie.nonzero().squeeze(1)
        rows, kth = scores[crowded], values[crowded, k - 1 : k]
        tied = _tied(rows, kth)
        above = ((rows > kth) | rows.isnan()) & ~tied
        chosen = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
        ids[crowded] = chosen.nonzero()[:, 1].view(len(crowded), k)
    ids = ids.sort(dim=1).values
    values, order = scores.gather(1, ids).sort(dim=1, descending=True, stable=True)
    return values, ids.gather(1, order)


def _sorted_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top_ids' answer by one stable descending sort of whole rows (NaN first, as topk):
    every tie ordered by id. Only the first k columns are kept, not the whole (R, n) sort."""
    values, ids = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k].contiguous(), ids[:, :k].contiguous()


def _tied(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Where ``first`` and ``second`` are equal or both NaN (which ``==`` calls unequal)."""
    return (first == second) | (first.isnan() & second.isnan())


def neuron_top_classes(weight: torch.Tensor, neuron: int, k: int) -> list[int]:
    """The ``k`` classes whose head ``weight`` (C, D) for ``neuron`` is largest, largest
    first, equal weights by class index (:func:`top_ids`): a visualisation's automatic
    conditioning, in-process and through the engine alike."""
    return top_ids(weight.detach()[:, neuron].unsqueeze(0), k)[1][0].tolist()


# _top_neurons counts each row's positive scores where k is at least D over this, not only
# from D / FULL_SORT_SHARE. Of ω of 4096 mistakes x D = 2048, both directions, on a CPU
# thread (bench/top_neurons.py, median of 7, one run each, a shared machine on which the
# same code differed by up to 15 %): at k = 409, 0.18 s where counting from D / 3 took
# 0.27 s (5 % of ω nonzero) and 0.09 s against 0.17 s (0.2 %); at k = 256, 0.19 s against
# 0.22 s (5 %) and, of dense ω, whose count (about 0.02 s a direction) selects all k,
# 0.47 s against 0.43 s. From D / 16 the count cost more than it saved: at k = 128,
# 0.24 s against 0.20 s (5 %) and 0.33 s against 0.27 s (dense).
POSITIVES_COUNTED_SHARE = 8


def _top_neurons(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the ids of the k largest strictly positive scores, largest first, equal
    ones by id (:func:`top_ids`); -1 pads rows with fewer (and stands where a NaN is,
    which ranks above every number). Past the most positive or NaN scores of any row
    every place is a pad, so only that many are selected where k is large
    (POSITIVES_COUNTED_SHARE): the proximal solver's ω, mostly exact zeros, has a few
    dozen per row of D = 2048 whatever k, which topk takes where a topk of k and its
    tied zeros took 1.5 to 1.9 times as long at k = D / 5."""
    k_selected = k
    if k * POSITIVES_COUNTED_SHARE >= scores.shape[1] and len(scores):  # counting took 0.03 s of M = 4096, D = 2048 on a CPU thread, the sort 0.5 s
        k_selected = min(k, scores.shape[1] - int(scores.le(0).sum(1, dtype=torch.int32).min()))  # not <= 0: > 0 or NaN
    values, ids = top_ids(scores, k_selected, ties_kept_above=0.0)
    top = torch.where(values > 0, ids, -1)
    return torch.nn.functional.pad(top, (0, min(k, scores.shape[1]) - top.shape[1]), value=-1)


# Mistakes' top-k ids are added id by id into a resample's counts while k is at most D over
# this; past it, a product with a block of mistakes' 0/1 indicators is quicker (equal at
# D / k = 16 on a CPU thread: k = 128 of D = 2048, 16 of 256). Per 50 resamples of 4096
# mistakes and D = 2048, adding took 0.7 ms at k = 5 where the product took 13 ms (its two
# directions would double the default's whole cost), and 250 ms at k = D where the product
# took 56 ms.
ADDED_IDS_PER_FEATURE = 16
# Elements of one block's (rows, D + 1) indicators in that product: 1 MB of float32, which
# kept in cache took 0.26 s for 200 resamples of k = 256 of D = 2048 where 16 MB took 0.33 s.
INDICATOR_BLOCK = 2**18


def _top_counts(weights: torch.Tensor, top: torch.Tensor, dim: int) -> torch.Tensor:
    """(b, D) per resample, the drawn mistakes whose top-k ``top`` (M, k), -1 padded, holds
    each neuron: the draw ``weights`` (b, M) times the mistakes' (M, D) 0/1 indicators,
    without ever holding them (memory (M, b) + (D, b), or one block of INDICATOR_BLOCK; the
    ids are mapped a column or block at a time: a copy of all of them, (M, k) int64, was
    819 MB at M = 50,000 and k = D = 2048). A -1 pad, mapped to D (``remainder``), counts
    in a column D that is dropped. Whole numbers up to M, exact in float32 whatever the
    order they are summed in."""
    if top.shape[1] * ADDED_IDS_PER_FEATURE <= dim:
        counts = torch.zeros(dim + 1, len(weights), dtype=weights.dtype, device=weights.device)
        per_mistake = weights.T.contiguous()  # (M, b)
        for column in top.T:
            counts.index_add_(0, column.remainder(dim + 1), per_mistake)
        return counts[:dim].T
    counts = torch.zeros(len(weights), dim + 1, dtype=weights.dtype, device=weights.device)
    rows = max(1, INDICATOR_BLOCK // (dim + 1))
    one = torch.ones(1, dtype=weights.dtype, device=weights.device)  # scattered as a tensor: a scalar took 2.7x at k = D = 2048
    for start in range(0, len(top), rows):
        block = top[start:start + rows].remainder(dim + 1)
        marks = torch.zeros(len(block), dim + 1, dtype=weights.dtype, device=weights.device).scatter_(1, block, one.expand_as(block))
        counts += weights[:, start:start + rows] @ marks
    return counts[:, :dim]


def _rank_order(counts: torch.Tensor, mean_omega: torch.Tensor) -> torch.Tensor:
    """(R, D) each row's neuron ids in ``rank``'s order: by top-k ``counts`` (R, D) (the
    rank ratio times M), then by |``mean_omega``| (R, D), then by id. The mean, not the ω
    sum: dividing by M ties some sums that differ only in float32 rounding, and ``rank`` and
    every resample of :func:`stability` must break such a tie alike."""
    by_size = mean_omega.abs().sort(dim=1, descending=True, stable=True).indices  # equal sizes by id
    order = counts.gather(1, by_size).sort(dim=1, descending=True, stable=True).indices
    return by_size.gather(1, order)


def stability(omega: torch.Tensor, insufficient_top: torch.Tensor, excessive_top: torch.Tensor,
              resamples: int, *, chunk: int = 50,
              callback_on_resample_chunk_end: ResampleCallback | None = None) -> tuple[torch.Tensor, int]:
    """(D,) share of ``resamples`` bootstrap resamples of the M mistakes (drawn with
    replacement, seed STABILITY_SEED) whose merged top-5 holds each neuron. A resample is
    ranked as ``rank`` ranks (:func:`_rank_order`; neurons in no drawn mistake's top-k left
    out), before any cut. ω is per mistake, so nothing is solved again: ``chunk`` resamples
    at a time are drawn as (chunk, M) draw counts, counted over their mistakes' top-k
    neurons (:func:`_top_counts`) and multiplied by ω (M, D) for the ω sums. Memory beyond
    the inputs: (chunk, M) draws and (chunk, D) results, never M x D.
    ``callback_on_resample_chunk_end(resamples done, resamples)`` after each chunk: return
    True to stop there. Returns the shares and the resamples they are of: ``resamples``,
    or fewer after a stop (a chunk at least), the first ones of a run to the end, as the
    draws are one stream. 200 resamples of D = 2048 on one CPU thread
    (``bench/stability_cost.py``, 2026-12-06): 0.11 s and 8 MB of peak RSS for M = 4096,
    0.88 s and 34 MB for M = 50,000 (``--mistakes 50000``); at k = D (``--top-k 2048``)
    0.46 s and 22 MB, and 5.2 s and 41 MB (the seconds of a quieter run before
    :func:`_listed_top`, which changed the memory alone)."""
    omega = omega.to(torch.promote_types(omega.dtype, torch.float32))  # counts up to M exact; half's end at 2048
    num_mistakes, dim = omega.shape
    generator = torch.Generator().manual_seed(STABILITY_SEED)  # one stream: chunk by chunk, the draws of one (B, M) call
    held = torch.zeros(dim, dtype=torch.float64, device=omega.device)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        listed = _listed_top(_draw_counts(generator, size, num_mistakes, omega), omega, insufficient_top, excessive_top)
        held.index_add_(0, listed, torch.ones(len(listed), dtype=torch.float64, device=omega.device))
        if callback_on_resample_chunk_end is not None and callback_on_resample_chunk_end(start + size, resamples):
            return held / (start + size), start + size
    return held / resamples, resamples


def _draw_counts(generator: torch.Generator, resamples: int, num_mistakes: int, like: torch.Tensor) -> torch.Tensor:
    """(resamples, M) how often each bootstrap resample draws each mistake, ``like``'s dtype
    and device. Its (resamples, M) int64 draws, twice its size in float32, are freed on
    return, before the counts are counted over the top-k (20 MB a chunk at M = 50,000)."""
    draws = torch.randint(num_mistakes, (resamples, num_mistakes), generator=generator)
    return torch.zeros(draws.shape, dtype=like.dtype).scatter_add_(
        1, draws, torch.ones(1, dtype=like.dtype).expand_as(draws)).to(like.device)


def _listed_top(part: torch.Tensor, omega: torch.Tensor, insufficient_top: torch.Tensor, excessive_top: torch.Tensor) -> torch.Tensor:
    """The neuron ids in each resample's merged top STABILITY_TOP (one flat int64 list), for
    resamples of draw counts ``part`` (b, M): neurons in no drawn mistake's top-k left out.
    A function of its own so that the chunk's (b, M) and (b, D) tensors are freed on return,
    not held while the next chunk draws (at M = 50,000, 30 MB more at the peak)."""
    num_mistakes, dim = omega.shape
    counts = torch.maximum(_top_counts(part, insufficient_top, dim), _top_counts(part, excessive_top, dim))
    first = _rank_order(counts, (part @ omega) / num_mistakes)[:, :STABILITY_TOP]
    return first[counts.gather(1, first) > 0]


def _counts(top: torch.Tensor, dim: int) -> torch.Tensor:
    """(D,) int64: the mistakes whose top-k ``top`` (M, k), -1 padded, holds each neuron."""
    return torch.bincount(top[top >= 0], minlength=dim)


class MistakeNeuronRanker:
    """Neuron-based counterfactual explanation of a classifier's mistakes (NeuroInspect §III-C).

    Works on cached penultimate features and the linear head only: for every mistake it
    solves for the feature shift ω that flips the prediction to the true label, takes
    each sample's top-k positive ω (insufficient features) and top-k negative ω
    (excessive features), and ranks neurons by how often they appear there. Only strictly
    positive (negative) ω count, so a sample that needs fewer than k neurons contributes
    fewer, and the proximal solver's exact zeros are never ranked.

    The two solvers explain a mistake with nearly the same neurons: on the shipped
    spurious_background classifier 98.5 % of each sample's top-5 is shared, and proximal
    needs about 4x fewer steps, 3.7 against 14.1 on average (``bench/neuroinspect_solver.py``,
    2026-12-01 and 2026-12-02). ``faithful`` is the
    default because it is the method of the paper.
    """

    def __init__(self, head: nn.Linear) -> None:
        self.head = linear_head(head)

    @torch.no_grad()
    def rank(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        solver: str | CounterfactualSolver = "faithful",
        l1: float = 0.1,
        l2: float = 0.01,
        max_iterations: int = 1000,
        cut_ratio: float = 0.03,
        top_k: int | None = None,
        target_class: int | None = None,
        class_mean_feature: torch.Tensor | None = None,
        num_top_classes: int = 3,
        callback_on_step_end: SolverCallback | None = None,
        stability_resamples: int = 0,
        callback_on_resample_chunk_end: ResampleCallback | None = None,
    ) -> NeuronRanking:
        """Rank the neurons behind the mistakes among ``features`` (N, D) with true ``labels`` (N,).

        No mistakes (of ``target_class``) give an empty ranking, not an error: a monitoring
        script may simply have nothing to explain (the service answers so too).

        Args:
            solver: ``"faithful"`` (the authors' SGD, batched), ``"proximal"`` (FISTA, exact
                zeros, usually fewer steps) or a configured solver instance.
            l1, l2: weights of ‖ω‖₁ / D and ‖ω‖₂ / D.
            max_iterations: per-sample step cap; capped samples have ``converged`` False.
            cut_ratio: neurons whose ratio is below this in both lists are dropped.
            top_k: neurons taken per sample and direction; default 5 (the paper's), or D
                where the features have fewer.
            target_class: explain only the mistakes whose true label is this class; by
                default all mistakes, and the class for ``importance`` is their most
                common true label (the smallest such class where several tie).
            class_mean_feature: f̄ (D,) for ``importance``; default the mean feature of the
                given samples labelled ``target_class``.
            num_top_classes: classes reported per neuron by head weight (at most C).
            callback_on_step_end: ``(step, max_iterations, samples running)`` after each
                solver step; return True to stop (the ranking is then marked cancelled, and
                draws no resamples: ``stability_resamples`` 0).
            stability_resamples: B, 0..1000: each neuron's ``stability`` is the share of B
                bootstrap resamples of the mistakes whose own ranking has it in its top 5
                (:func:`stability`); 0, the default, computes none (stabilities 0).
            callback_on_resample_chunk_end: ``(resamples done, stability_resamples)`` after
                each chunk of them, as ``callback_on_step_end`` after each solver step;
                return True to stop them there (a deadline): the ranking, complete, keeps
                the shares of the resamples drawn (``stability_resamples`` says how many,
                ``stability_resamples_requested`` B); raise to abandon it (a cancel).
                :func:`stability` takes it by the same name.
        """
        weight, bias = self.head.weight.detach(), self.head.bias.detach()
        finite_head(weight, bias, "head.")
        num_classes, dim = weight.shape
        features, labels = labelled_features(features, labels, like=weight)
        l1, l2 = number(l1, "l1"), number(l2, "l2")
        top_k = min(DEFAULT_TOP_K, dim) if top_k is None else top_k
        max_iterations, top_k, num_top_classes = (count(max_iterations, "max_iterations"), count(top_k, "top_k"),
                                                  count(num_top_classes, "num_top_classes"))
        if top_k > dim:
            raise ValueError(f"top_k must be at most {dim} (the feature dimension), got {top_k}")
        cut_ratio = number(cut_ratio, "cut_ratio")
        if cut_ratio > 1:
            raise ValueError(f"cut_ratio must lie in [0, 1], got {cut_ratio}")
        if target_class is not None:
            target_class = index(target_class, "target_class", num_classes)
        stability_resamples = count(stability_resamples, "stability_resamples", low=0)
        if stability_resamples > MAX_STABILITY_RESAMPLES:
            raise ValueError(f"stability_resamples must be at most {MAX_STABILITY_RESAMPLES}, got {stability_resamples}")
        solver = make_solver(solver)
        callback_or_none(callback_on_step_end, "callback_on_step_end")  # before the mistakes are found, not at the first step
        callback_or_none(callback_on_resample_chunk_end, "callback_on_resample_chunk_end")

        # Only the samples explained need a prediction: with a target class its own, not all
        # of a large set (50,000 samples, D = 2048, 1000 classes: 2.4 s and 390 MB of logits
        # on a CPU core, where the class's 50 samples take 4 ms).
        if target_class is None:
            mistake_indices = (predicted_classes(weight, bias, features) != labels).nonzero().squeeze(1)
        else:
            in_class = (labels == target_class).nonzero().squeeze(1)
            mistake_indices = in_class[predicted_classes(weight, bias, features[in_class]) != labels[in_class]]
        if target_class is None:
            pool = labels[mistake_indices] if len(mistake_indices) else labels
            # Ties go to the smallest class: the first one met would depend on the samples' order.
            counts = Counter(pool.tolist())
            target_class = min(counts, key=lambda klass: (-counts[klass], klass))

        if class_mean_feature is None:
            in_class = labels == target_class
            class_mean_feature = features[in_class].mean(0) if in_class.any() else features.mean(0)
        else:
            class_mean_feature = feature_vector(class_mean_feature, "class_mean_feature", like=weight)
        importance = neuron_importance(weight, bias, class_mean_feature, target_class)

        solution = solver.solve(weight, bias, features[mistake_indices], labels[mistake_indices],
                                l1=l1, l2=l2, max_iterations=max_iterations, callback_on_step_end=callback_on_step_end)
        omega = solution.omega
        insufficient_top = _top_neurons(omega, top_k)
        excessive_top = _top_neurons(-omega, top_k)
        insufficient_count, excessive_count = _counts(insufficient_top, dim), _counts(excessive_top, dim)
        insufficient_ratio = insufficient_count.to(torch.float64) / max(len(omega), 1)
        excessive_ratio = excessive_count.to(torch.float64) / max(len(omega), 1)
        # The ω sum over M, as stability's resamples take their means (not torch's mean: a
        # GPU's multiplies by 1/M), so a tie of |mean ω| is the same tie there; summed in
        # float32 at least, as they are: a float16 sum of 1000 ω of 100 overflowed.
        mean_omega = omega.sum(0, dtype=torch.promote_types(omega.dtype, torch.float32)) / max(len(omega), 1)
        order = _rank_order(torch.maximum(insufficient_count, excessive_count)[None], mean_omega[None])[0]
        top_classes = top_ids(weight.T, min(num_top_classes, num_classes))[1]  # (D, num_top_classes)
        # No resamples of a solver the caller stopped: its ω is half-solved, and it asked to stop.
        if stability_resamples and len(omega) and not solution.cancelled:
            shares, drawn = stability(omega, insufficient_top, excessive_top, stability_resamples,
                                      callback_on_resample_chunk_end=callback_on_resample_chunk_end)
        else:
            shares, drawn = torch.zeros(dim), 0 if solution.cancelled else stability_resamples

        # The per-neuron loop reads Python lists: indexing device tensors neuron by neuron
        # synchronised with a GPU several times per neuron (8000 times for D = 2048).
        passes_insufficient = ((insufficient_ratio > 0) & (insufficient_ratio >= cut_ratio)).tolist()
        passes_excessive = ((excessive_ratio > 0) & (excessive_ratio >= cut_ratio)).tolist()
        columns = list(zip(insufficient_ratio.tolist(), excessive_ratio.tolist(), mean_omega.tolist(), importance.tolist(),
                           top_classes.tolist(), shares.tolist()))
        ranked = []
        for neuron in order.tolist():
            insufficient, excessive, omega_mean, probability_ratio, classes, share = columns[neuron]
            if not (passes_insufficient[neuron] or passes_excessive[neuron]):
                continue
            direction = BOTH if passes_insufficient[neuron] and passes_excessive[neuron] else (
                INSUFFICIENT if passes_insufficient[neuron] else EXCESSIVE)
            ranked.append(RankedNeuron(
                neuron=neuron,
                direction=direction,
                insufficient_ratio=insufficient,
                excessive_ratio=excessive,
                mean_omega=omega_mean,
                importance=probability_ratio,
                top_classes=tuple(classes),
                stability=share,
            ))
        return NeuronRanking(
            neurons=ranked,
            target_class=int(target_class),
            solver=solver.name,
            num_samples=len(features),
            mistake_indices=mistake_indices,
            omega=omega,
            converged=solution.converged,
            iterations=solution.iterations,
            insufficient_top=insufficient_top,
            excessive_top=excessive_top,
            cancelled=solution.cancelled,
            stability_resamples=drawn,
            stability_resamples_requested=stability_resamples if 0 < drawn < stability_resamples else 0,
        )
