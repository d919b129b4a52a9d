"""The command line every bench script shares: its docstring as the description, each
option's default in --help, and sizes refused as usage errors, not tracebacks later."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["bench_parser", "finite_number", "median_seconds", "peak_rss_growth_mb", "positive_int", "require_peak_rss", "share"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written (its usage lines and lists), and "(default: ...)" after each option's help."""


def bench_parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)


def positive_int(text: str) -> int:
    """An argparse type for counts and sizes: 0 would end in a ZeroDivisionError or an empty set."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def finite_number(text: str) -> float:
    """An argparse type for a real setting: float() takes "nan" and "inf", which a method
    refuses only after the work before it, with a traceback rather than a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def share(text: str) -> float:
    """An argparse type for a share in (0, 1]: none at all would leave nothing to measure."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text!r}")
    return value


def median_seconds(runs: Mapping[str, Callable[[], object]], repeats: int, *, settle: Callable[[], None] = lambda: None) -> dict[str, float]:
    """The median seconds of ``repeats`` timed calls of each of ``runs``, alternating which
    goes first, so a drift in the machine's speed hits each alike. ``settle`` runs inside
    each timing after the call (a CUDA synchronize, for work queued on a GPU)."""
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
            started = time.perf_counter()
            runs[name]()
            settle()
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def require_peak_rss(parser: argparse.ArgumentParser) -> None:
    """A usage error where :func:`peak_rss_growth_mb` cannot measure: it resets the peak
    through Linux's /proc/self/clear_refs."""
    if not _CLEAR_REFS.exists():
        parser.error("needs Linux's /proc/self/clear_refs to reset the peak resident memory")


def peak_rss_growth_mb(run: Callable[[], object]) -> float:
    """MB the peak resident memory of ``run()`` rose above the resident memory before it,
    measured from a baseline with the allocator's free memory handed back: glibc keeps
    freed memory resident, and ``run()`` reusing it would grow the peak unseen (at
    stability_cost.py's k = D, 0 MB instead of 24). Elsewhere (musl, macOS) nothing is trimmed."""
    from explaind.decode_memory import trim_arenas  # here, not at import: a bench's --help answers without explaind

    trim_arenas()
    _CLEAR_REFS.write_text("5")  # the peak (VmHWM) starts again from the current RSS
    before = _status_mb("VmRSS")
    run()
    return _status_mb("VmHWM") - before


def _status_mb(key: str) -> float:
    line = next(line for line in _STATUS.read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024
