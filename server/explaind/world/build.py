"""Regenerate every shapes-world asset from scratch, then print the quality table.

    python -m explaind.world.build                 # everything (about three hours on 2 CPU cores; t2i alone about 2.5 h in three runs)
    python -m explaind.world.build --parts classifiers --smoke --root /tmp/assets

``--smoke`` trains each model for a few steps on tiny data: CI uses it to prove the
scripts run, not to produce useful weights.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from .assets import ASSETS_DIR, classifier_dir, clip_dir, oracle_dir, t2i_dir
from .classifier import load_classifier, save_classifier
from .fingerprint import FINGERPRINT_FILE, changed_scenes, record_render_fingerprint, recorded_render_fingerprint, render_fingerprint
from .oracle import save_oracle, train_oracle
from .quality import print_quality_table
from .scenarios import scenario_names
from .train_classifier import train_classifier

PARTS = ("classifiers", "oracle", "clip", "t2i")


class RendererChanged(ValueError):
    """A build of some parts asked for where the renderer no longer draws the recorded scenes."""


class FingerprintNotRecorded(UserWarning):
    """A build of some parts into a root holding other parts' weights but no fingerprint:
    those were trained on a renderer nobody recorded, so none is recorded for them."""


def _part_dir(part: str, root: Path) -> Path:
    """The directory under ``root`` that ``part``'s weights are saved in."""
    return {"classifiers": classifier_dir(root=root).parent, "oracle": oracle_dir(root), "clip": clip_dir(root), "t2i": t2i_dir(root)}[part]


def _holds_weights(part: str, root: Path) -> bool:
    return any(path.is_file() for path in _part_dir(part, root).rglob("*"))


def build(
    parts: tuple[str, ...] = PARTS, *, root: Path = ASSETS_DIR, smoke: bool = False, num_threads: int = 2
) -> dict[str, float]:
    """Train and save the requested parts under ``root``; returns seconds per part.

    ``num_threads`` pins torch's CPU threads: runs with different counts sum floats in a
    different order and end in different weights (docs/neuroinspect.md).

    The renderer's fingerprint is recorded under ``root`` (:mod:`explaind.world.fingerprint`)
    once every weight there is this build's: after each part, so a build into an empty
    root that fails in a later part (the 2.5 h text-to-image model) can be finished by
    building the parts left (a fingerprint that matches stays as it is; over an older
    renderer's weights, it is recorded once the build has replaced them all). Where the
    renderer draws other scenes than the recorded fingerprint says, every model under
    ``root`` was trained on the old ones, so only a build of all parts is allowed:
    RendererChanged otherwise, before anything is trained.
    Where ``root`` has no fingerprint but holds weights of parts not built (which the
    oracle and t2i may start from), nothing says which renderer trained those: the parts
    are built, no fingerprint is recorded, and FingerprintNotRecorded warns so first
    (where warnings are errors, it is raised before anything is trained).
    """
    recorded = recorded_render_fingerprint(root)
    if recorded is not None and set(parts) != set(PARTS):
        changed = changed_scenes(recorded, render_fingerprint())
        if changed:
            raise RendererChanged(
                f"the renderer draws {len(changed)} fingerprint scenes differently than the one the models under "
                f"{root} were trained with (e.g. {changed[0]!r}); rebuild every part "
                f"(python -m explaind.world.build --root {root}), not only {parts}")
    unvouched = [] if recorded is not None else [part for part in PARTS if part not in parts and _holds_weights(part, root)]
    if unvouched:
        warnings.warn(f"{root} holds weights of {', '.join(unvouched)} but no {FINGERPRINT_FILE}: they may come from another renderer, "
                      f"so this build of {', '.join(parts)} records no fingerprint; rebuild every part to record one",
                      FingerprintNotRecorded, stacklevel=2)
    built: set[str] = set()

    def finished(part: str) -> None:
        built.add(part)
        if not any(_holds_weights(other, root) for other in PARTS if other not in built):
            record_render_fingerprint(root)

    torch.set_num_threads(num_threads)
    timings: dict[str, float] = {}
    if "classifiers" in parts:
        for name in scenario_names():
            start = time.perf_counter()
            model, _ = train_classifier(
                name,
                epochs=1 if smoke else None,  # None: the scenario's classifier_epochs, else the default
                train_size=96 if smoke else None,
                test_size=96 if smoke else None,
            )
            save_classifier(model, classifier_dir(name, root))
            timings[f"classifier/{name}"] = time.perf_counter() - start
        finished("classifiers")
    if "oracle" in parts:
        start = time.perf_counter()
        balanced = load_classifier(classifier_dir("balanced", root))
        oracle = train_oracle(epochs=1 if smoke else 6, train_size=96 if smoke else None, init_from=balanced)
        save_oracle(oracle, oracle_dir(root))
        timings["oracle"] = time.perf_counter() - start
        finished("oracle")
    if "clip" in parts:
        from .clip import train_clip

        start = time.perf_counter()
        train_clip(steps=3 if smoke else None, seed=0, out_dir=clip_dir(root), num_threads=num_threads)
        timings["clip"] = time.perf_counter() - start
        finished("clip")
    if "t2i" in parts:
        from .t2i import UNET_TRAIN_STAGES, train_t2i

        start = time.perf_counter()
        for stage, (steps, seed) in enumerate(UNET_TRAIN_STAGES):
            train_t2i(
                steps=3 if smoke else steps, seed=seed, clip_dir=clip_dir(root), out_dir=t2i_dir(root),
                init_from=t2i_dir(root) if stage else None, num_threads=num_threads,
            )
        timings["t2i"] = time.perf_counter() - start
        finished("t2i")
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--root", type=Path, default=ASSETS_DIR, help="where assets are written")
    parser.add_argument("--smoke", action="store_true", help="a few steps per model (CI)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, fixed so that reruns give the same weights")
    args = parser.parse_args()
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    try:
        timings = build(parts, root=args.root, smoke=args.smoke, num_threads=args.threads)
    except RendererChanged as error:
        parser.error(str(error))
    except FingerprintNotRecorded as error:  # raised where warnings are errors (-W error, PYTHONWARNINGS=error): a traceback
        parser.exit(1, f"{parser.prog}: error: {error}\n(a warning, stopped here as warnings are errors under -W error or "
                       f"PYTHONWARNINGS; before any training: nothing under {args.root} changed)\n")
    print("== Training time (seconds, this machine) ==")
    for part, seconds in timings.items():
        print(f"  {part:<40}{seconds:>8.0f}")
    if not args.smoke:
        print_quality_table(list(parts), args.root)


if __name__ == "__main__":
    main()
