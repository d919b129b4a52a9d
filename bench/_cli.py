"""The command line every bench script shares: its docstring as the description, each
option's default in --help, and sizes refused as usage errors, not tracebacks later."""

from __future__ import annotations

import argparse

__all__ = ["bench_parser", "positive_int", "share"]


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


def share(text: str) -> float:
    """An argparse type for a share in (0, 1]: none at all would leave nothing to measure."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text!r}")
    return value
