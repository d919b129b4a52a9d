"""How a class name given in a call is matched with a model's, shared by the server and
the SDK (``explaind.client``): neither torch nor gRPC is imported here."""

from __future__ import annotations

import unicodedata


def class_name_key(name: str) -> str:
    """``name`` as class names are matched: NFC, so an "é" sent as one code point or as
    "e" and a combining accent (as macOS writes file and folder names) names one class."""
    return unicodedata.normalize("NFC", name)
