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


def check_limit(limit: int) -> None:
    """A summary's ``limit`` of neurons shown: an integer, 0 (all) or more (1.5 failed as a
    slice index, None in a bare comparison)."""
    if isinstance(limit, bool) or not isinstance(limit, Integral):
        raise TypeError(f"limit must be an integer, 0 (all) or more, got {limit!r} ({type(limit).__name__})")
    if limit < 0:
        raise ValueError(f"limit must be 0 (all) or more, got {limit}")


def neuron_lines(neurons: Sequence[RankedNeuronLike], top: str, limit: int) -> list[str]:
    """One line per ranked neuron, the first ``limit`` (0: all): its direction, shares of
    mistakes in their ``top`` (e.g. "top 5"), importance and top classes (semicolons
    between them, as ImageNet's names hold commas); one line saying so where none passed
    the cut ratio (a summary of mistakes then ended in a heading over nothing)."""
    check_limit(limit)
    if not neurons:
        return ["  none passed the cut ratio"]
    return [f"  neuron {n.neuron:>3}  {n.direction:<12} {top} in {n.insufficient_ratio:.0%} of mistakes as insufficient, "
            f"{n.excessive_ratio:.0%} as excessive  importance {n.importance:.2f}  top classes {'; '.join(map(str, n.top_classes))}"
            for n in neurons[:limit or None]]
