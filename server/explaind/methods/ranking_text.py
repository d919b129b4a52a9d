"""A neuron ranking as text, shared by the in-process ranking
(``explaind.methods.neuroinspect.NeuronRanking``) and the SDK's (``explaind.client``):
neither torch nor gRPC is imported here, so each imports it without the other's needs."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Protocol


class RankedNeuronLike(Protocol):
    """What a line reads of a ranked neuron, in-process or the SDK's; ratios are shares of mistakes (0-1)."""

    @property
    def neuron(self) -> int: ...
    @property
    def direction(self) -> str: ...
    @property
    def insufficient_ratio(self) -> float: ...
    @property
    def excessive_ratio(self) -> float: ...
    @property
    def importance(self) -> float: ...
    @property
    def top_classes(self) -> Sequence[object]: ...  # names or indices
    @property
    def stability(self) -> float: ...  # share of bootstrap resamples (0-1)


def check_limit(limit: int) -> None:
    """A summary's ``limit`` of neurons shown: an integer, 0 (all) or more (1.5 failed as a
    slice index, None in a bare comparison)."""
    if isinstance(limit, bool) or not isinstance(limit, Integral):
        raise TypeError(f"limit must be an integer, 0 (all) or more, got {limit!r} ({type(limit).__name__})")
    if limit < 0:
        raise ValueError(f"limit must be 0 (all) or more, got {limit}")


def neuron_lines(neurons: Sequence[RankedNeuronLike], limit: int, stability_resamples: int = 0,
                 stability_resamples_requested: int = 0, stopped_by: str = "callback_on_resample_chunk_end") -> list[str]:
    """A table of the first ``limit`` ranked neurons (0: all) under a header row: each
    one's direction, the shares of mistakes with it in their top k (which the ranking's
    heading states) as insufficient and as excessive, its importance and top classes
    (semicolons between them, as ImageNet's names hold commas); one line saying so where
    none passed the cut ratio (a summary of mistakes then ended in a heading over nothing).
    With ``stability_resamples`` (the ranking's B, 0: none asked) a stability column
    before the top classes, and a line under the table saying what it is, and of how many
    asked (``stability_resamples_requested``) where ``stopped_by`` stopped the resamples
    (an in-process ranking's callback, or a server's time limit)."""
    check_limit(limit)
    if not neurons:
        return ["  none passed the cut ratio"]
    stable = f"  {'stability':>9}" if stability_resamples else ""
    header = f"  {'neuron':>6}  {'direction':<12}  {'insufficient':>12}  {'excessive':>9}  {'importance':>10}{stable}  top classes"
    lines = [header] + [
        f"  {n.neuron:>6}  {n.direction:<12}  {n.insufficient_ratio:>12.0%}  {n.excessive_ratio:>9.0%}  {_importance(n.importance):>10}"
        f"{f'  {n.stability:>9.0%}' if stability_resamples else ''}  {'; '.join(map(str, n.top_classes))}"
        for n in neurons[:limit or None]
    ]
    if stability_resamples:
        of = f" (of {stability_resamples_requested} asked: {stopped_by} stopped the rest)" if stability_resamples_requested else ""
        lines.append(f"stability: share of {stability_resamples} bootstrap resamples{of} of the mistakes whose own ranking "
                     "has the neuron in its top 5")
    return lines


def _importance(ratio: float) -> str:
    """Two decimals, as importances sit near 1 (1.01, 0.87); in exponent form from 1e6 up to
    their cap of 1e15, which would otherwise push the top classes out of their column."""
    return f"{ratio:.2f}" if ratio < 1e6 else f"{ratio:.2e}"
