"""Probe data: scenes with every attribute independent and uniform (watermark on half).

Used to label neurons with ground truth ("this channel fires on water") when judging
explanation methods: no attribute is correlated with the class or with another one.
"""

from __future__ import annotations

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
