"""NeuroInspect on the shapes world: are the ranked neurons the planted ones, and does
editing them repair the worst group? Measured on the shipped classifiers in one run.

    python bench/neuroinspect_eval.py [--scenarios spurious_background,...] [--solver faithful]

Ground truth: a neuron carries a scenario's focus value (water, watermark, checker,
yellow) when its activation separates that value from the other values on
attribute-independent probe scenes: ROC AUC >= 0.8 (fires on it) or <= 0.2 (fires on
everything but it). Mistakes of the focus class are ranked on the first half of the
test split. Two precisions@3 are printed:

* ``P@3 ins``: the top-3 of the insufficient list (ω > 0, where the paper reads false
  correlations) against neurons that fire on the focus value (AUC >= 0.8), the issue's
  definition;
* ``P@3 all``: the top-3 of the merged ranking, direction-aware: an insufficient neuron
  counts when it fires on the focus value, an excessive one (ω < 0) when it fires on
  everything but it (AUC <= 0.2), e.g. "not water" for a heart missed on grass.

The edit table retrains the head on the train split with the merged top-3 neurons and
reports accuracy on the other half of the test split (balanced groups), for our
probability-ratio regulariser, the constrain baseline, and plain retraining without a
penalty (the control that shows what either regulariser adds).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explaind.methods.neuroinspect import FeatureExtractor, HeadEditor, MistakeNeuronRanker, NeuronRanking, neuron_auc
from explaind.world.assets import ASSETS_DIR, classifier_dir
from explaind.world.classifier import load_classifier
from explaind.world.probes import probe_batch
from explaind.world.scenarios import Scenario, WorldBatch, get_scenario, scenario_names

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path

AUC_THRESHOLD = 0.8


@dataclass
class Split:
    features: torch.Tensor
    labels: torch.Tensor
    groups: np.ndarray

    def __getitem__(self, index: slice) -> Split:
        return Split(self.features[index], self.labels[index], self.groups[index])


def split_features(extractor: FeatureExtractor, batch: WorldBatch, group_attribute: str) -> Split:
    return Split(extractor.features(batch.images), batch.labels, batch.groups(group_attribute))


def neurons_carrying(auc: torch.Tensor) -> tuple[set[int], set[int]]:
    """The neurons that fire on the focus value (AUC >= 0.8) and those that fire on
    everything but it (AUC <= 0.2), from their probe AUCs (D,) for that value vs the rest.
    The second reads 1 - AUC >= 0.8: ``auc <= 1 - 0.8`` compared with 0.19999999999999996
    and left out a neuron whose AUC is exactly 0.2."""
    fires_on = set((auc >= AUC_THRESHOLD).nonzero().squeeze(1).tolist())
    fires_off = set((1 - auc >= AUC_THRESHOLD).nonzero().squeeze(1).tolist())
    return fires_on, fires_off


def precision_at_3(ranking: NeuronRanking, fires_on: set[int], fires_off: set[int]) -> dict[str, float]:
    """``ins``: the share of the insufficient list's top 3 that fire on the focus value;
    ``all``: the share of the merged top 3 that carry it in the direction of their ω
    (module docstring). A list shorter than 3 counts its missing places as misses."""
    return {
        "ins": sum(n.neuron in fires_on for n in ranking.insufficient[:3]) / 3,
        "all": sum(n.neuron in (fires_on if n.direction == "insufficient" else fires_off if n.direction == "excessive"
                                else fires_on | fires_off) for n in ranking.neurons[:3]) / 3,
    }


def spurious_scenarios() -> list[str]:
    """The scenarios with a planted focus value, the ones a ranking can be scored on."""
    return [name for name in scenario_names() if get_scenario(name).focus is not None]


@dataclass
class RankingInputs:
    """What a scenario's ranking is computed from and scored against: the shipped
    classifier's features of the test split's two halves (ranked on the first), the focus
    class, and the probe ground truth (the neurons' AUCs (D,) and the two sets they give)."""

    scenario: Scenario
    extractor: FeatureExtractor
    target_class: int
    auc: torch.Tensor
    fires_on: set[int]
    fires_off: set[int]
    rank_set: Split
    eval_set: Split


def shipped_scenarios(names: str, assets: Path) -> Iterator[str]:
    """The comma-separated scenarios ``names`` whose classifier is shipped under ``assets``,
    saying which it skips."""
    for name in names.split(","):
        if (classifier_dir(name, assets) / "model.safetensors").is_file():
            yield name
        else:
            print(f"skipping {name}: no shipped classifier under {assets}")


def ranking_inputs(name: str, assets: Path, probe_size: int, test_size: int | None, probe_seed: int) -> RankingInputs:
    scenario = get_scenario(name)
    focus = scenario.focus
    model = load_classifier(classifier_dir(name, assets))
    extractor = FeatureExtractor(model, feature_layer=model.config.feature_layer, head=model.config.head)
    target_class = model.config.class_names.index(focus.klass)

    probe = probe_batch(probe_size, seed=probe_seed)
    auc = neuron_auc(extractor.features(probe.images), probe.attributes[focus.attribute] == focus.value)
    fires_on, fires_off = neurons_carrying(auc)

    test = split_features(extractor, scenario.dataset("test", size=test_size).all(), scenario.group_attribute)
    half = len(test.labels) // 2
    return RankingInputs(scenario, extractor, target_class, auc, fires_on, fires_off, test[:half], test[half:])


def evaluate_scenario(name: str, args: argparse.Namespace) -> dict:
    inputs = ranking_inputs(name, Path(args.assets), args.probe_size, args.test_size, args.seed)
    scenario, extractor, target_class = inputs.scenario, inputs.extractor, inputs.target_class
    fires_on, fires_off, rank_set, eval_set = inputs.fires_on, inputs.fires_off, inputs.rank_set, inputs.eval_set
    ranker = MistakeNeuronRanker(extractor.head)
    rankings = {solver: ranker.rank(rank_set.features, rank_set.labels, solver=solver, target_class=target_class)
                for solver in ("faithful", "proximal")}
    top3 = {solver: ranking.neuron_ids[:3] for solver, ranking in rankings.items()}
    precision = {solver: precision_at_3(ranking, fires_on, fires_off) for solver, ranking in rankings.items()}

    train = split_features(extractor, scenario.dataset("train", size=args.train_size).all(), scenario.group_attribute)
    validation_batch = scenario.dataset("val").all() if args.validation == "val" else probe_batch(
        args.validation_size, seed=args.seed + 1)
    validation = split_features(extractor, validation_batch, scenario.group_attribute)
    editor = HeadEditor(extractor.head)
    common = dict(target_class=target_class, neurons=top3[args.solver], validation_features=validation.features,
                  validation_labels=validation.labels, learning_rate=args.learning_rate, max_epochs=args.epochs,
                  patience=args.patience, selection=args.selection, evaluation_features=eval_set.features,
                  evaluation_labels=eval_set.labels, evaluation_groups=eval_set.groups)
    edits = {
        "probability_ratio": editor.edit(train.features, train.labels, method="probability_ratio", **common),
        "constrain": editor.edit(train.features, train.labels, method="constrain", **common),
        # Control: the same retraining without any penalty, to see what the regulariser adds.
        "retrain (λ=0)": editor.edit(train.features, train.labels, method="probability_ratio", strength=0.0, **common),
    }
    return {"name": name, "focus": scenario.focus, "rankings": rankings, "auc": inputs.auc, "precision": precision,
            "num_on": len(fires_on), "num_off": len(fires_off), "edits": edits}


def print_tables(results: list[dict], solver: str) -> None:
    print(f"\n== Ranked mistake neurons vs neurons carrying the focus value (AUC >= {AUC_THRESHOLD} or <= {1 - AUC_THRESHOLD:.1f}) ==")
    print(f"{'scenario':<28}{'focus':<28}{'mistakes':>9}{'#on/#off':>9}  {'solver':<10}"
          f"{'insufficient top-3 (AUC)':<30}{'merged top-3 (dir, AUC)':<40}{'P@3 ins':>8}{'P@3 all':>8}")
    for r in results:
        focus = f"{r['focus'].klass} + {r['focus'].attribute}={r['focus'].value}"
        for name, ranking in r["rankings"].items():
            insufficient = " ".join(f"{n.neuron}({r['auc'][n.neuron]:.2f})" for n in ranking.insufficient[:3])
            merged = " ".join(f"{n.neuron}({n.direction[:3]},{r['auc'][n.neuron]:.2f})" for n in ranking.neurons[:3])
            counts = f"{r['num_on']}/{r['num_off']}"
            print(f"{r['name']:<28}{focus:<28}{ranking.num_mistakes:>9}{counts:>9}  {name:<10}{insufficient:<30}{merged:<40}"
                  f"{r['precision'][name]['ins']:>8.2f}{r['precision'][name]['all']:>8.2f}")
    print(f"\n== Head edit with the {solver} top-3 neurons (held-out half of the test split) ==")
    print(f"{'scenario':<28}{'method':<20}{'avg before':>11}{'avg after':>10}{'Δavg pts':>9}"
          f"{'worst before':>13}{'worst after':>12}{'Δworst pts':>11}  {'worst group after':<22}{'epoch':>6}")
    for r in results:
        for method, edit in r["edits"].items():
            before, after = edit.before, edit.after
            group, worst = after.worst_group
            print(f"{r['name']:<28}{method:<20}{before.accuracy:>11.3f}{after.accuracy:>10.3f}"
                  f"{100 * (after.accuracy - before.accuracy):>9.1f}{before.worst_group[1]:>13.3f}{worst:>12.3f}"
                  f"{100 * (worst - before.worst_group[1]):>11.1f}  {group:<22}{edit.best_epoch:>6}")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--scenarios", default=",".join(spurious_scenarios()), help="comma-separated spurious scenarios")
    parser.add_argument("--assets", default=str(ASSETS_DIR), help="assets root holding classifiers/<scenario>")
    parser.add_argument("--solver", default="faithful", choices=("faithful", "proximal"), help="whose top-3 is edited")
    parser.add_argument("--probe-size", type=positive_int, default=1200, help="balanced probe scenes for the neurons' ground truth")
    parser.add_argument("--test-size", type=positive_int, default=None, help="test scenes (None: the whole test split)")
    parser.add_argument("--train-size", type=positive_int, default=6000, help="training scenes of the head edits")
    parser.add_argument("--validation", default="heldout", choices=("heldout", "val"),
                        help="early stopping on held-out attribute-independent scenes, or the scenario's own val split")
    parser.add_argument("--validation-size", type=positive_int, default=600, help="early-stopping scenes")
    parser.add_argument("--selection", default="accuracy", choices=("accuracy", "worst_class"), help="what picks the best epoch")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's, of the head edits")
    parser.add_argument("--epochs", type=positive_int, default=20, help="most epochs of a head edit")
    parser.add_argument("--patience", type=positive_int, default=5, help="epochs without a better validation score before stopping")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (minibatch order)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    results = []
    for name in shipped_scenarios(args.scenarios, Path(args.assets)):
        start = time.perf_counter()
        results.append(evaluate_scenario(name, args))
        print(f"{name}: evaluated in {time.perf_counter() - start:.0f}s")
    print_tables(results, args.solver)


if __name__ == "__main__":
    main()
