"""How a count reads in a message, shared by the server and the CLI (``explaind.client``),
so that neither says "1 mistakes": neither torch nor gRPC is imported here."""

from __future__ import annotations


def counted(count: int, noun: str) -> str:
    """'1 neuron', '2 neurons' (the noun's last word takes the s: '3 more mistakes')."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
