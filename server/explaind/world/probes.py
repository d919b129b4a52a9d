"""Probe data: scenes with every attribute independent and uniform (watermark on half).

Used to label neurons with ground truth ("this channel fires on water") when judging
explanation methods: no attribute is correlated with the class or with another one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .render import ATTRIBUTE_VALUES, SceneSpec, render, whole_number
from .scenarios import WorldBatch, collate


def probe_batch(size: int = 1200, *, seed: int = 0, image_size: int = 64) -> WorldBatch:
    """``size`` scenes, shapes cycling through the classes, other attributes uniform at random."""
    size = whole_number("size", size, 1)  # 0 failed in np.stack, naming nothing
    rng = np.random.default_rng(seed)
    shapes = ATTRIBUTE_VALUES["shape"]
    specs = [
        SceneSpec(
            shape=shapes[i % len(shapes)],
            colour=str(rng.choice(ATTRIBUTE_VALUES["colour"])),
            texture=str(rng.choice(ATTRIBUTE_VALUES["texture"])),
            background=str(rng.choice(ATTRIBUTE_VALUES["background"])),
            artifact=bool(rng.integers(2)),
            seed=int(rng.integers(2**31)),
            size=image_size,
        )
        for i in range(size)
    ]
    return collate([render(spec) for spec in specs])


def one_sided_values(probe: WorldBatch, values: Mapping[str, Iterable[str]]) -> list[str]:
    """"attribute value" for each of ``values`` that no scene of ``probe`` shows, or every
    scene does: a neuron's ROC AUC for it against the rest is undefined (a small probe)."""
    return [f"{attribute} {value}" for attribute, attribute_values in values.items() for value in attribute_values
            if not 0 < int((probe.attributes[attribute] == value).sum()) < len(probe.attributes[attribute])]
