"""Which class to condition an excessive neuron's CLIP-Illusion image on: the explained
class, or the neuron's top class by head weight (the method's automatic choice, which
`explaind report` takes for an excessive neuron), in one run.

    python bench/excessive_conditioning.py [--scenario spurious_background] [--class heart] [--count 240] [--seeds 0,1,2] [--steps 400]

The ranking is the demo's: the shipped classifier's mistakes of ``--class`` among the
first ``--count`` test scenes (the demo's sample set; heart is its worst class), ranked
with the ranker's defaults. Each excessive neuron (ω < 0) is visualised with
``clip_illusion`` on the class and on its top class, per seed one batch of all neurons
each way. Each neuron's strongest shape and background are the values whose ROC AUC
(its activation, that value against the rest) is highest on attribute-independent probe
scenes, where its top-1 % activation is taken too. Printed: the neurons, a row per
(seed, neuron), then over all those images:

* ``mean activation α``, and ``better``: the images whose α is higher on the top class;
* ``α at the neuron's top 1 %``: per seed, the images whose α reaches it;
* ``CLIP cosine to the strongest probe shape``: to the prompt "a photo of a {shape}";
* ``CLIP cosine to the strongest background``: the same for its background.

Each image's random draws depend on its (seed, neuron, class), but batched kernels round
differently per batch and thread count (docs/neuroinspect.md), so the numbers hold for
the same ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from explaind.config import WORLD_CLIP_ILLUSION_EPSILON
from explaind.world.assets import ASSETS_DIR

from _cli import bench_parser, finite_number, positive_int  # bench/, the script's directory, is on sys.path

if TYPE_CHECKING:
    import torch

    from explaind.world.classifier import WorldClassifier
    from explaind.world.scenarios import Scenario, WorldBatch

CONDITIONINGS = ("explained", "top")  # the explained class, the neuron's top class
ATTRIBUTES = ("shape", "background")  # the attributes whose strongest value each image is scored against
REACHED_LABEL = "α at the neuron's top 1 % on probe scenes, per seed"


def seed_list(text: str) -> list[int]:
    """An argparse type for comma-separated seeds, each used once."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


@dataclass
class Comparison:
    """The excessive neurons and their images' scores, (seed, conditioning) -> score -> (K,)
    a value per neuron: ``alpha`` (α_n), ``shape`` and ``background`` (CLIP cosines)."""

    neurons: list[int]
    top_percent: torch.Tensor  # (K,) each neuron's top-1 % activation on the probe scenes
    scores: dict[tuple[int, str], dict[str, torch.Tensor]]


def compare_conditionings(scenario: Scenario, model: WorldClassifier, probe: WorldBatch, args: argparse.Namespace,
                          assets: Path) -> Comparison | None:
    """Rank the class's mistakes, print its excessive neurons' probe profile, and score
    their images conditioned both ways (None: no excessive neuron)."""
    from explaind.methods.neuroinspect import EXCESSIVE, ClipIllusion, FeatureExtractor, MistakeNeuronRanker, neuron_auc
    from explaind.world.assets import clip_dir
    from explaind.world.clip import CAPTION_WORDS, load_world_clip
    from explaind.world.illusion_check import attribute_similarity, top_percent_activations

    names = model.config.class_names
    explained = names.index(args.class_name)
    extractor = FeatureExtractor(model, feature_layer=model.config.feature_layer, head=model.config.head)
    test = scenario.dataset("test", size=args.count).all()
    ranking = MistakeNeuronRanker(extractor.head).rank(extractor.features(test.images), test.labels, target_class=explained)
    neurons = [n.neuron for n in ranking.neurons if n.direction == EXCESSIVE]
    print(f"{scenario.name}, first {args.count} test scenes: {ranking.num_mistakes} mistakes of {args.class_name}, "
          f"{len(ranking.neurons)} ranked neurons, {len(neurons)} excessive")
    if not neurons:
        return None

    probe_features = extractor.features(probe.images)
    top_percent = top_percent_activations(probe_features, neurons)
    # (attribute, value) -> (K,) each neuron's AUC for that value against the rest
    auc = {(attribute, value): neuron_auc(probe_features, probe.attributes[attribute] == value)[neurons]
           for attribute in ATTRIBUTES for value in CAPTION_WORDS[attribute]}
    strongest = {attribute: [max(CAPTION_WORDS[attribute], key=lambda value: float(auc[attribute, value][i])) for i in range(len(neurons))]
                 for attribute in ATTRIBUTES}
    weight = extractor.head.weight.detach()
    print(f"\n{'neuron':>6}  {'strongest shape (AUC)':<23}{'background (AUC)':<18}{'W[' + args.class_name + ']':>9}  "
          f"{'top class':<10}{'W':>7}{'top 1 %':>9}")
    for i, neuron in enumerate(neurons):
        shape, background = (strongest[attribute][i] for attribute in ATTRIBUTES)
        top = int(weight[:, neuron].argmax())
        shape_auc, background_auc = float(auc["shape", shape][i]), float(auc["background", background][i])
        print(f"{neuron:>6}  {f'{shape} ({shape_auc:.2f})':<23}{f'{background} ({background_auc:.2f})':<18}"
              f"{float(weight[explained, neuron]):>+9.3f}  {names[top]:<10}{float(weight[top, neuron]):>+7.3f}{float(top_percent[i]):>9.2f}")

    illusion = ClipIllusion(model, model.config.feature_layer, *load_world_clip(clip_dir(assets))[:2], head=model.config.head)
    words = {attribute: [CAPTION_WORDS[attribute][value] for value in strongest[attribute]] for attribute in ATTRIBUTES}
    scores = {}
    for seed in args.seeds:
        for conditioning, condition_on in zip(CONDITIONINGS, (explained, None), strict=True):
            result = illusion.visualize([(neuron, condition_on) for neuron in neurons], steps=args.steps,
                                        method="clip_illusion", epsilon=args.epsilon, seed=seed)
            scores[seed, conditioning] = {"alpha": result.activations.detach(),
                                          **{attribute: attribute_similarity(illusion, result.images, words[attribute]) for attribute in ATTRIBUTES}}
    return Comparison(neurons, top_percent, scores)


def print_images(comparison: Comparison, class_name: str) -> None:
    print(f"\n{'seed':>4}{'neuron':>7}   {'α on ' + class_name:>10}{'on top':>8}   {'cos shape':>9}{'on top':>8}   "
          f"{'cos background':>14}{'on top':>8}")
    for (seed, conditioning), scores in comparison.scores.items():
        if conditioning != "explained":
            continue
        top = comparison.scores[seed, "top"]
        for i, neuron in enumerate(comparison.neurons):
            print(f"{seed:>4}{neuron:>7}   {float(scores['alpha'][i]):>10.2f}{float(top['alpha'][i]):>8.2f}   "
                  f"{float(scores['shape'][i]):>+9.3f}{float(top['shape'][i]):>+8.3f}   "
                  f"{float(scores['background'][i]):>+14.3f}{float(top['background'][i]):>+8.3f}")


def print_table(comparison: Comparison, args: argparse.Namespace, seconds: float) -> None:
    scores, count = comparison.scores, len(comparison.neurons)
    images = len(args.seeds) * count

    def mean(conditioning: str, score: str) -> float:
        return statistics.mean(float(value) for seed in args.seeds for value in scores[seed, conditioning][score])

    def better(score: str) -> str:
        wins = sum(int((scores[seed, "top"][score] > scores[seed, "explained"][score]).sum()) for seed in args.seeds)
        return f"(better {wins} of {images})"

    def reached(conditioning: str) -> str:
        return " ".join(f"{int((scores[seed, conditioning]['alpha'] >= comparison.top_percent).sum())}/{count}" for seed in args.seeds)

    print(f"\n== {args.class_name}'s {count} excessive neurons, {len(args.seeds)} seed(s) x {args.steps} steps, ε {args.epsilon}: "
          f"{images} images each way, in {seconds:.0f}s ({args.threads} thread(s)) ==")
    print(f"{'':<54}{'on ' + args.class_name:>12}{'on top class':>16}")
    print(f"{'mean activation α':<54}{mean('explained', 'alpha'):>12.2f}{mean('top', 'alpha'):>16.2f}  {better('alpha')}")
    print(f"{REACHED_LABEL:<54}{reached('explained'):>12}{reached('top'):>16}")
    for score, label in (("shape", "CLIP cosine to the strongest probe shape"), ("background", "CLIP cosine to the strongest background")):
        print(f"{label:<54}{mean('explained', score):>+12.3f}{mean('top', score):>+16.3f}  {better(score)}")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--scenario", default="spurious_background", help="shapes-world scenario whose shipped classifier is ranked")
    parser.add_argument("--class", dest="class_name", metavar="CLASS", default="heart", help="the explained class, whose mistakes are ranked")
    parser.add_argument("--count", type=positive_int, default=240, help="first test scenes ranked (the demo's sample set)")
    parser.add_argument("--seeds", type=seed_list, default="0,1,2", help="comma-separated seeds of the visualisations")
    parser.add_argument("--steps", type=positive_int, default=400, help="optimisation steps per image (the report's default; the demo runs 60)")
    parser.add_argument("--epsilon", type=finite_number, default=WORLD_CLIP_ILLUSION_EPSILON, help="CLIP-Illusion's ε")
    parser.add_argument("--probe-size", type=positive_int, default=600, help="attribute-independent probe scenes (drawn with seed 0)")
    parser.add_argument("--assets", default=str(ASSETS_DIR), help="assets root holding classifiers/<scenario> and clip")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    # After the arguments: --help and a usage error answer without the seconds of torch and open_clip.
    import torch

    from explaind.world.assets import classifier_dir, clip_dir
    from explaind.world.classifier import load_classifier
    from explaind.world.probes import one_sided_values, probe_batch
    from explaind.world.render import ATTRIBUTE_VALUES
    from explaind.world.scenarios import get_scenario

    torch.set_num_threads(args.threads)
    try:
        scenario = get_scenario(args.scenario)
    except KeyError as error:
        parser.error(f"argument --scenario: {error.args[0]}")
    assets = Path(args.assets)
    if not (classifier_dir(scenario.name, assets) / "model.safetensors").is_file():
        parser.error(f"argument --scenario: no shipped classifier for {scenario.name} under {assets}")
    model = load_classifier(classifier_dir(scenario.name, assets))
    if args.class_name not in model.config.class_names:
        parser.error(f"argument --class: {args.class_name!r} is not a class of {scenario.name}; "
                     f"its classes: {', '.join(model.config.class_names)}")
    # A value's AUC against the rest (its neurons' strongest values) needs scenes with it and without it.
    probe = probe_batch(args.probe_size, seed=0)
    unseen = one_sided_values(probe, {attribute: ATTRIBUTE_VALUES[attribute] for attribute in ATTRIBUTES})
    if unseen:
        parser.error(f"argument --probe-size: {args.probe_size} probe scenes leave no scene with, or none without, "
                     f"{', '.join(unseen)}; take more")
    from explaind.world.clip import CHECKPOINT_NAME  # open_clip's seconds, after the cheaper checks

    if not (clip_dir(assets) / CHECKPOINT_NAME).is_file():
        parser.error(f"argument --assets: no world CLIP under {clip_dir(assets)} (build it with python -m explaind.world.clip)")
    started = time.perf_counter()
    comparison = compare_conditionings(scenario, model, probe, args, assets)
    if comparison is not None:
        print_images(comparison, args.class_name)
        print_table(comparison, args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
