"""CLIP-Illusion against feature visualisation on every neuron with a known attribute
(issue 4, acceptance 4), on the shipped world classifiers in one run.

    python bench/illusion_eval.py [--classifiers balanced,...] [--per-value 3] [--workers 2 --threads 1] [--per-neuron]

A neuron has a known attribute when its activation separates one attribute value
(shape, colour, texture, background, watermark) from the rest with ROC AUC >= 0.9 on
attribute-independent probe scenes; the ``--per-value`` strongest such neurons per
value are taken. Each is visualised with ``clip_illusion`` conditioned on its top class
(largest head weight, the method's automatic choice; ``--condition own-shape`` conditions
shape neurons on their own shape instead) and with ``feature_visualization``,
400 steps each, all neurons of a classifier in one batch. Printed per classifier and
attribute:

* ``own``: shape neurons whose top class is their own shape. The others are
  conditioned on a class their attribute does not belong to (every context neuron is),
  which is where CLIP-Illusion loses its lead (docs/neuroinspect.md);
* ``sim ours`` / ``FV``: mean CLIP cosine of the image to the attribute's prompt
  ("a photo of a water"), and ``wins``, the neurons where ours is higher; acceptance 4
  asks ours > FV on average;
* ``act>=top1%``: neurons whose CLIP-Illusion activation reaches their top-1 %
  activation on the probe scenes; acceptance 4 asks this of every neuron;
* ``holds`` when both do, then one line per neuron that stays below its top 1 %;
* ``masked ours`` / ``FV``: the mean cosine of the masked images (regions where the
  neuron's map is low dimmed), the paper's final visualisation, not part of the verdict.

A second table asks whether CLIP-Illusion's core relevance (the cosine to the conditioned
class's prompt lost when the neuron's region is greyed) tells core neurons (shape
neurons conditioned on their own shape) from context neurons (colour, texture,
background, watermark): mean core relevance and mask share (``mask``, the greyed
region's share of the image) per group, and for each group of core neurons the ROC AUC
of each against all context neurons (docs/neuroinspect.md). Beside core relevance, its
controls: ``shifted``, the cosine lost greying the mask rolled by half the image each way
(the same share elsewhere), with ``own>shift``, the neurons whose own region costs more,
and ``rest``, the cosine lost greying everything but the mask. A third table gives, per
conditioned class, the mean cosine of the images to the class's prompt and that of a
plain 0.5-grey image, the fill that greying tends to.

``--per-neuron`` adds a row per neuron. Each image's random draws depend only on its
(neuron, class, seed), but batched kernels round differently per batch shape, so a
neuron's numbers still move slightly (a few hundredths of cosine) with ``--per-value``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from explaind.config import WORLD_CLIP_ILLUSION_EPSILON
from explaind.world.assets import ASSETS_DIR, classifier_dir
from explaind.world.scenarios import scenario_names

from _cli import bench_parser, finite_number, positive_int, share  # bench/, the script's directory, is on sys.path

if TYPE_CHECKING:
    from explaind.world.illusion_check import NeuronComparison


def summary_line(label: str, results: list[NeuronComparison]) -> str:
    ours = sum(r.similarity_ours for r in results) / len(results)
    baseline = sum(r.similarity_baseline for r in results) / len(results)
    wins = sum(r.similarity_ours > r.similarity_baseline for r in results)
    reached = sum(r.reaches_top_percent for r in results)
    own = sum(r.own_class for r in results)
    masked_ours = sum(r.masked_similarity_ours for r in results) / len(results)
    masked_baseline = sum(r.masked_similarity_baseline for r in results) / len(results)
    verdict = "holds" if ours > baseline and reached == len(results) else "fails"
    return (f"{label:<40}{len(results):>4}{own:>5}{ours:>9.3f}{baseline:>8.3f}{f'{wins}/{len(results)}':>8}"
            f"{f'{reached}/{len(results)}':>12}{verdict:>7}{masked_ours:>11.3f}{masked_baseline:>8.3f}")


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """ROC AUC of a score separating ``positive`` from ``negative`` (ties count half)."""
    import torch

    from explaind.methods.neuroinspect import neuron_auc

    scores = torch.tensor([[score] for score in positive + negative])
    return float(neuron_auc(scores, torch.arange(len(scores)) < len(positive))[0])


def core_relevance_lines(results: list[NeuronComparison]) -> list[str]:
    """Core relevance of the CLIP-Illusion images by the neuron's known attribute: core
    neurons (shape neurons conditioned on their own shape, whose region should carry the
    class) against context neurons (every other attribute; no class is one of them), with
    the ROC AUC of core relevance, and of the mask share beside it, for each group of core
    neurons against all context neurons. Shape neurons conditioned on another shape are
    neither; their row is shown apart."""
    core = [r for r in results if r.own_class]
    context = [r for r in results if r.attribute != "shape"]
    groups = [("core: shape on its own class", core)]
    groups += [(f"  {value}", [r for r in core if r.value == value]) for value in dict.fromkeys(r.value for r in core)]
    groups.append(("shape on another class", [r for r in results if r.attribute == "shape" and not r.own_class]))
    groups.append(("context: every other attribute", context))
    groups += [(f"  {attribute}", [r for r in context if r.attribute == attribute]) for attribute in dict.fromkeys(r.attribute for r in context)]
    lines = [f"{'neurons':<36}{'n':>4}{'core rel':>10}{'shifted':>9}{'own>shift':>11}{'rest':>7}{'mask':>7}"
             f"{'AUC rel':>9}{'AUC mask':>10}"]
    for label, group in groups:
        if not group:
            continue
        relevance = sum(r.core_relevance for r in group) / len(group)
        shifted = sum(r.shifted_relevance for r in group) / len(group)
        own_costs_more = sum(r.core_relevance > r.shifted_relevance for r in group)
        rest = sum(r.rest_relevance for r in group) / len(group)
        mask = sum(r.mask_fraction for r in group) / len(group)
        line = (f"{label:<36}{len(group):>4}{relevance:>10.3f}{shifted:>9.3f}{f'{own_costs_more}/{len(group)}':>11}"
                f"{rest:>7.3f}{mask:>7.3f}")
        if context and group[0].own_class:  # a core group: how well each score tells it from the context neurons
            line += (f"{roc_auc([r.core_relevance for r in group], [r.core_relevance for r in context]):>9.2f}"
                     f"{roc_auc([r.mask_fraction for r in group], [r.mask_fraction for r in context]):>10.2f}")
        lines.append(line)
    return lines


def grey_similarity_lines(results: list[NeuronComparison]) -> list[str]:
    """Per conditioned class: how many images, their mean CLIP cosine to the class's
    prompt, and a plain 0.5-grey image's, the fill core relevance greys with. Where the
    grey scores as high as the images, greying any region cannot cost much."""
    lines = [f"{'conditioned on':<16}{'n':>4}{'images':>8}{'plain grey':>12}"]
    for name in dict.fromkeys(r.conditioned_on for r in results):
        group = [r for r in results if r.conditioned_on == name]
        images = sum(r.class_similarity for r in group) / len(group)
        grey = sum(r.grey_similarity for r in group) / len(group)
        lines.append(f"{name:<16}{len(group):>4}{images:>8.3f}{grey:>12.3f}")
    return lines


def print_tables(results: list[NeuronComparison], per_neuron: bool) -> None:
    if per_neuron:
        print(f"\n{'classifier':<28}{'attribute=value':<22}{'neuron':>7}  {'conditioned on':<15}"
              f"{'sim ours':>9}{'FV':>8}{'act ours':>9}{'FV':>8}{'top1%':>7}{'core rel':>10}{'mask':>7}{'shifted':>9}{'rest':>7}")
        for r in results:
            print(f"{r.classifier:<28}{r.attribute + '=' + r.value:<22}{r.neuron:>7}  {r.conditioned_on:<15}"
                  f"{r.similarity_ours:>9.3f}{r.similarity_baseline:>8.3f}{r.activation_ours:>9.2f}"
                  f"{r.activation_baseline:>8.2f}{r.top_percent:>7.2f}{r.core_relevance:>10.3f}{r.mask_fraction:>7.3f}"
                  f"{r.shifted_relevance:>9.3f}{r.rest_relevance:>7.3f}")
    print("\n== CLIP-Illusion vs feature visualisation on neurons with a known attribute ==")
    print(f"{'classifier / attribute':<40}{'n':>4}{'own':>5}{'sim ours':>9}{'FV':>8}{'wins':>8}{'act>=top1%':>12}{'':>7}"
          f"{'masked ours':>11}{'FV':>8}")
    for classifier in dict.fromkeys(r.classifier for r in results):
        mine = [r for r in results if r.classifier == classifier]
        print(summary_line(classifier, mine))
        for attribute in dict.fromkeys(r.attribute for r in mine):
            print(summary_line(f"  {attribute}", [r for r in mine if r.attribute == attribute]))
    print(summary_line("all classifiers", results))
    own = [r for r in results if r.own_class]
    other = [r for r in results if not r.own_class]
    if own:
        print(summary_line("  conditioned on the neuron's own shape", own))
    if other:
        print(summary_line("  conditioned on another class", other))
    missed = [r for r in results if not r.reaches_top_percent]
    for r in missed:
        print(f"below top 1 %: {r.classifier} neuron {r.neuron} ({r.attribute}={r.value}) conditioned on "
              f"{r.conditioned_on}: {r.activation_ours:.2f} < {r.top_percent:.2f} (FV {r.activation_baseline:.2f})")
    print("\n== Core relevance of the CLIP-Illusion images: core (own shape) against context neurons ==")
    print("\n".join(core_relevance_lines(results)))
    print("\n== CLIP cosine to the conditioned class's prompt: the images against a plain 0.5-grey image ==")
    print("\n".join(grey_similarity_lines(results)))


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--classifiers", default=",".join(scenario_names()), help="comma-separated world classifiers")
    parser.add_argument("--assets", default=str(ASSETS_DIR), help="assets root holding classifiers/<scenario> and clip")
    parser.add_argument("--per-value", type=positive_int, default=3, help="strongest neurons taken per attribute value")
    parser.add_argument("--min-auc", type=share, default=0.9, help="probe ROC AUC that makes an attribute a neuron's known one")
    parser.add_argument("--steps", type=positive_int, default=400, help="optimisation steps per image")
    parser.add_argument("--epsilon", type=finite_number, default=WORLD_CLIP_ILLUSION_EPSILON, help="CLIP-Illusion's ε")
    parser.add_argument("--probe-size", type=positive_int, default=600, help="attribute-independent probe scenes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe scenes and the optimisation")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (of each worker with --workers > 1)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="classifiers evaluated at once, each in its own process (the same numbers, sooner)")
    parser.add_argument("--condition", default="top-class", choices=("top-class", "own-shape"),
                        help="own-shape: condition shape neurons on their shape's class, the others on their top class")
    parser.add_argument("--per-neuron", action="store_true", help="also print one row per neuron")
    args = parser.parse_args()
    # After the arguments: --help and a usage error answer without the seconds of open_clip.
    import torch

    from explaind.world.assets import clip_dir
    from explaind.world.clip import CAPTION_WORDS, CHECKPOINT_NAME
    from explaind.world.illusion_check import compare_shipped_classifiers
    from explaind.world.probes import one_sided_values, probe_batch

    torch.set_num_threads(args.threads)

    assets = Path(args.assets)
    # Refused now, not with a traceback after the first classifier's minutes.
    if not (clip_dir(assets) / CHECKPOINT_NAME).is_file():
        parser.error(f"argument --assets: no world CLIP under {clip_dir(assets)} (build it with python -m explaind.world.clip)")
    if unseen := one_sided_values(probe_batch(args.probe_size, seed=args.seed), CAPTION_WORDS):
        parser.error(f"argument --probe-size: {args.probe_size} probe scenes leave no scene with, or none without, "
                     f"{', '.join(unseen)}; take more")
    names = []
    for name in args.classifiers.split(","):
        if (classifier_dir(name, assets) / "model.safetensors").is_file():
            names.append(name)
        else:
            print(f"skipping {name}: no shipped classifier under {args.assets}")
    start = time.perf_counter()
    found = compare_shipped_classifiers(
        names, assets=assets, probe_size=args.probe_size, seed=args.seed, workers=args.workers,
        threads_per_worker=args.threads, per_value=args.per_value, min_auc=args.min_auc, steps=args.steps,
        epsilon=args.epsilon, condition=args.condition)
    for name, comparisons in found.items():
        print(f"{name}: {len(comparisons)} neurons with a known attribute")
    print(f"evaluated in {time.perf_counter() - start:.0f}s ({args.workers} worker(s), {args.threads} thread(s) each)")
    results = [comparison for comparisons in found.values() for comparison in comparisons]
    if results:
        print_tables(results, args.per_neuron)


if __name__ == "__main__":
    main()
