"""The command line every bench script shares: its docstring as the description, each
option's default in --help, and sizes refused as usage errors, not tracebacks later."""

from __future__ import annotations

import argparse

__all__ = ["bench_parser", "positive_int"]


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
