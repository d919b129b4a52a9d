"""Quality table of the shipped world models (issue acceptance, measured, printed).

    python -m explaind.world.quality [--parts classifiers,oracle,clip,t2i]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .assets import ASSETS_DIR, classifier_dir
from .classifier import load_classifier
from .scenarios import get_scenario, scenario_names
from .train_classifier import GroupReport, group_report, predict_batches


def classifier_report(scenario_name: str, root: Path = ASSETS_DIR, test_size: int | None = None) -> GroupReport:
    """Test-split accuracy per group of the shipped classifier for ``scenario_name``."""
    scenario = get_scenario(scenario_name)
    model = load_classifier(classifier_dir(scenario_name, root))
    test = scenario.dataset("test", size=test_size).all()
    return group_report(predict_batches(model, test.images), test, scenario.group_attribute)


def format_classifier_table(reports: dict[str, GroupReport], per_group: bool = True) -> str:
    lines = [f"{'scenario':<28}{'accuracy':>10}{'worst group':>26}{'worst':>8}{'gap (pts)':>11}"]
    for name, report in reports.items():
        group, worst = report.worst_group
        gap = 100 * (report.accuracy - worst)
        lines.append(f"{name:<28}{report.accuracy:>10.3f}{group:>26}{worst:>8.3f}{gap:>11.1f}")
    if per_group:
        for name, report in reports.items():
            lines.append(f"\n{name}: accuracy per group (class/{get_scenario(name).group_attribute})")
            items = sorted(report.group_accuracy.items())
            for start in range(0, len(items), 5):
                lines.append("  " + "  ".join(f"{g:<18}{a:.2f}" for g, a in items[start : start + 5]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="classifiers,oracle,clip,t2i")
    parser.add_argument("--root", type=Path, default=ASSETS_DIR)
    args = parser.parse_args()
    print_quality_table(args.parts.split(","), args.root)


def print_quality_table(parts: list[str], root: Path = ASSETS_DIR) -> None:
    if "classifiers" in parts:
        reports = {name: classifier_report(name, root) for name in scenario_names()}
        print("== Classifiers (test split) ==")
        print(format_classifier_table(reports))
    if "oracle" in parts:
        from .oracle import load_oracle, oracle_accuracy

        print("\n== Attribute oracle (balanced test) ==")
        for attribute, accuracy in oracle_accuracy(load_oracle(root / "oracle")).items():
            print(f"  {attribute:<12}{accuracy:.3f}")
    if "clip" in parts:
        from .clip import evaluate_clip_zero_shot, load_world_clip

        print('\n== CLIP zero-shot top-1 (balanced test, "a photo of a {x}") ==')
        model, tokenizer, _ = load_world_clip(root / "clip")
        for attribute, accuracy in evaluate_clip_zero_shot(model, tokenizer).items():
            print(f"  {attribute:<12}{accuracy:.3f}")
    if "t2i" in parts:
        from .clip import load_world_clip
        from .oracle import load_oracle
        from .t2i import evaluate_t2i, load_world_t2i

        grid = root / "t2i_samples.png"
        result = evaluate_t2i(load_oracle(root / "oracle"), load_world_t2i(root / "t2i", load_world_clip(root / "clip")), grid_path=grid)
        print(
            f"\n== Text-to-image: oracle recognises the prompted attribute ({result['num_images']} images, "
            f"CFG {result['guidance_scale']}, {result['num_inference_steps']} DDIM steps) =="
        )
        for attribute, accuracy in result["accuracy"].items():
            print(f"  {attribute:<12}{accuracy:.3f}")
        print(f"  sample grid: {grid}")


if __name__ == "__main__":
    main()
