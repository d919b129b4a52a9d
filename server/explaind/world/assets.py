"""Where the shapes world's shipped weights live.

Layout under ``assets/`` (all written by ``python -m explaind.world.build``):
``classifiers/<scenario>/`` (config.json + model.safetensors), ``clip/``
(open_clip model config + checkpoint), ``t2i/`` (diffusers pipeline directory)
and ``oracle/`` (attribute oracle), beside them ``render_fingerprint.json`` (the renderer
they were trained with, :mod:`explaind.world.fingerprint`).
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).with_name("assets")


def classifier_dir(scenario: str = "balanced", root: Path = ASSETS_DIR) -> Path:
    return root / "classifiers" / scenario


def clip_dir(root: Path = ASSETS_DIR) -> Path:
    return root / "clip"


def t2i_dir(root: Path = ASSETS_DIR) -> Path:
    return root / "t2i"


def oracle_dir(root: Path = ASSETS_DIR) -> Path:
    return root / "oracle"
