"""The renderer's fingerprint: digests of a fixed set of scenes, recorded beside the weights.

Every shipped model was trained on rendered scenes. A change to what the renderer or a
scenario draws (a colour, a jitter, a scenario's sampling) moves those models off their
training data, and only their accuracy tests would notice, if the change is large.
``python -m explaind.world.build`` records the fingerprint of the renderer it trained with
beside the weights (:func:`record_render_fingerprint`); a test re-renders it and compares.

The digests are exact: the scenes' bytes came out identical with numpy's AVX-512, AVX2 and
baseline (SSE4) kernels (``NPY_DISABLE_CPU_FEATURES``, numpy 2.4). ``arctan2`` there differs
by one ulp in 7 % of a star's pixels, but no pixel lies within 1e-6 of the star's outline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .assets import ASSETS_DIR
from .render import BACKGROUNDS, COLOURS, MIN_IMAGE_SIZE, SHAPES, TEXTURES, Scene, SceneSpec, caption_for, render
from .scenarios import SPLITS, Scenario, get_scenario, scenario_names

FINGERPRINT_FILE = "render_fingerprint.json"
SAMPLES_PER_SPLIT = 6  # the first scenes of each scenario's split: its drawing of specs, not only the renderer


def fingerprint_specs() -> list[SceneSpec]:
    """Every shape on every background in every texture, colours and watermarks alternating,
    and each shape once at the smallest size and once at an odd one."""
    colours = tuple(COLOURS)
    specs: list[SceneSpec] = []
    for shape in SHAPES:
        for b, background in enumerate(BACKGROUNDS):
            for t, texture in enumerate(TEXTURES):
                index = len(specs)
                specs.append(SceneSpec(shape, colours[index % len(colours)], texture, background,
                                       artifact=(b + t) % 2 == 1, seed=index))
    for s, shape in enumerate(SHAPES):
        for size in (MIN_IMAGE_SIZE, 37):
            specs.append(SceneSpec(shape, colours[s], TEXTURES[s % len(TEXTURES)], BACKGROUNDS[s % len(BACKGROUNDS)],
                                   artifact=True, seed=1000 + s, size=size))
    return specs


def _digest(scene: Scene) -> str:
    spec = scene.spec
    digest = hashlib.sha256(repr((spec.shape, spec.colour, spec.texture, spec.background, bool(spec.artifact),
                                  int(spec.seed), int(spec.size))).encode())
    for array in (scene.image, scene.object_mask, scene.artifact_mask):
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _distributions_digest(scenario: Scenario) -> str:
    """Its split sizes and attribute probabilities: a few scenes seldom show a change of a share."""
    digest = hashlib.sha256(repr(sorted(scenario.sizes.items())).encode())
    for split in SPLITS:
        for klass in SHAPES:
            for attribute, probabilities in sorted(scenario.distributions[split][klass].items()):
                digest.update(f"{split}/{klass}/{attribute}".encode())
                digest.update(probabilities.tobytes())
    return digest.hexdigest()[:16]


def render_fingerprint() -> dict[str, str]:
    """Scene name -> digest of its spec, image and masks, for :func:`fingerprint_specs` and
    the first :data:`SAMPLES_PER_SPLIT` scenes of every split of every shipped scenario, and
    per scenario a digest of its sizes and distributions."""
    fingerprint = {
        f"{caption_for(spec)} (seed {spec.seed}, {spec.size} px)": _digest(render(spec)) for spec in fingerprint_specs()
    }
    for name in scenario_names():
        fingerprint[f"{name} (sizes and distributions)"] = _distributions_digest(get_scenario(name))
        for split in SPLITS:
            dataset = get_scenario(name).dataset(split)
            for index in range(SAMPLES_PER_SPLIT):
                fingerprint[f"{name}/{split}/{index}"] = _digest(dataset[index])
    return fingerprint


def record_render_fingerprint(root: Path = ASSETS_DIR) -> Path:
    """Write the current renderer's fingerprint under ``root``, as the renderer its weights were trained with."""
    path = root / FINGERPRINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(render_fingerprint(), indent=1) + "\n")
    return path


def recorded_render_fingerprint(root: Path = ASSETS_DIR) -> dict[str, str] | None:
    """The fingerprint recorded under ``root``, or None where no build recorded one."""
    path = root / FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def changed_scenes(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """Names of the scenes drawn differently, or found in only one of the two fingerprints."""
    return sorted(name for name in recorded.keys() | current.keys() if recorded.get(name) != current.get(name))
