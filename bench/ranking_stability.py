"""How stable is a NeuroInspect ranking, and how many mistakes does it need? Measured on
the shipped classifiers in one run.

    python bench/ranking_stability.py [--scenarios spurious_background,...] [--resamples 200] [--counts 5,10,20,40,80,all]
                                      [--solver faithful|proximal]

The reference ranking is bench/neuroinspect_eval.py's: the focus class's mistakes among
the first half of the test split, ranked by ``--solver`` (faithful by default; the
resamples by the same). For each count n of
mistakes (counts above the scenario's M mistakes skipped; "all" is M), B resamples of n
of those M mistakes are each ranked on their own and compared with the reference:

* ``J top-5``: mean Jaccard of the resample's merged top-5 with the reference's;
* ``J ins-5``: the same for the top-5 of the insufficient list (ω > 0);
* ``top-1 in 5``: the share of resamples whose merged top-5 holds the reference's top neuron;
* ``P@3 mean``, ``P@3 min``: the direction-aware precision at 3 of the resamples
  (neuroinspect_eval's ``P@3 all``), against the same probe ground truth, and
  ``P@3>=2/3``: the share of resamples with at least 2 of 3 (acceptance 2's bar);
* ``distinct``: mean distinct mistakes per resample; ``ms/rank``: median milliseconds
  per ranking.

Resamples are bootstrap draws by default: n of the M mistakes with replacement. An
analyst's n mistakes are n draws from all the mistakes the classifier makes; the
bootstrap draws n from the M at hand in the same way, so its spread at n estimates that
of a fresh set of n (the m-out-of-n bootstrap), and at n = M the spread of the reference
itself. ``--sampling subsample`` draws n distinct mistakes instead: that shares n/M of
the reference's mistakes with it, so near M it understates the spread, and at n = M
every draw is the reference (Jaccard exactly 1: a check of the bench, not a
measurement). For n well below M the two agree (a bootstrap draw repeats few mistakes).
A mistake's ω does not depend on the others solved with it, and a copy counts as one
more mistake (docs/neuroinspect.md), so a repeated mistake weighs as a drawn one should.

B is 200: a ranking takes milliseconds, so 200 resamples per count cost about what the
features do (the default run: about a minute on one thread), and at 20 resamples a
mean Jaccard lay up to 0.18 from its value at 200. ``P@3 min`` is the worst of B draws: it falls as B grows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explaind.methods.neuroinspect import MistakeNeuronRanker, NeuronRanking
from explaind.world.assets import ASSETS_DIR

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path
from neuroinspect_eval import RankingInputs, precision_at_3, ranking_inputs, shipped_scenarios, spurious_scenarios

TOP = 5  # the top-k compared, the paper's k


def mistake_counts(text: str) -> list[int | None]:
    """An argparse type: comma-separated counts of mistakes, "all" (None) for every one."""
    counts: list[int | None] = []
    for item in text.split(","):
        count = None if item.strip() == "all" else positive_int(item)
        if count in counts:
            raise argparse.ArgumentTypeError(f"expected distinct counts, got {text!r}")
        counts.append(count)
    return counts


def counts_for(counts: list[int | None], num_mistakes: int) -> list[int]:
    """The asked counts a scenario with ``num_mistakes`` mistakes can draw, ascending:
    larger ones are skipped, "all" is ``num_mistakes``."""
    return sorted({num_mistakes if count is None else count for count in counts
                   if count is None or count <= num_mistakes})


def draw(rng: np.random.Generator, num_mistakes: int, count: int, sampling: str) -> np.ndarray:
    """Positions (count,) into the reference's mistakes: with replacement ("bootstrap") or
    ``count`` distinct ones ("subsample")."""
    if sampling == "bootstrap":
        return rng.integers(num_mistakes, size=count)
    return rng.choice(num_mistakes, size=count, replace=False)


def jaccard(first: list[int], second: list[int]) -> float:
    """|A ∩ B| / |A ∪ B| of two lists' neuron sets; 1 where both are empty."""
    union = set(first) | set(second)
    return len(set(first) & set(second)) / len(union) if union else 1.0


@dataclass
class CountStability:
    """How B rankings of ``count`` resampled mistakes compare with the reference."""

    count: int
    distinct: float  # mean distinct mistakes per resample
    jaccard_merged: float  # mean Jaccard of the merged top-5s
    jaccard_insufficient: float  # mean Jaccard of the insufficient lists' top-5s
    top1_kept: float  # share of resamples whose merged top-5 holds the reference's first neuron
    precision_mean: float  # direction-aware P@3
    precision_min: float
    precision_two_of_three: float  # share of resamples with P@3 >= 2/3
    seconds_per_ranking: float  # median


@dataclass
class ScenarioStability:
    name: str
    reference: NeuronRanking
    reference_precision: float
    reference_seconds: float
    counts: list[CountStability]


def measure_scenario(inputs: RankingInputs, name: str, counts: list[int | None], resamples: int, sampling: str,
                     solver: str, seed: int) -> ScenarioStability:
    ranker = MistakeNeuronRanker(inputs.extractor.head)
    features, labels = inputs.rank_set.features, inputs.rank_set.labels
    # The reference's f̄ for every resample (a resample holds no correct sample of the class).
    class_mean = features[labels == inputs.target_class].mean(0)

    def rank(rows: torch.Tensor) -> tuple[NeuronRanking, float]:
        started = time.perf_counter()
        ranking = ranker.rank(features[rows], labels[rows], solver=solver, target_class=inputs.target_class,
                              class_mean_feature=class_mean)
        return ranking, time.perf_counter() - started

    reference, reference_seconds = rank(torch.arange(len(labels)))
    mistakes = reference.mistake_indices
    top = reference.neuron_ids[:TOP]
    top_insufficient = [n.neuron for n in reference.insufficient[:TOP]]
    rows = []
    for count in counts_for(counts, len(mistakes)):
        rng = np.random.default_rng([seed, count])  # a count's draws do not depend on the other counts asked
        merged, insufficient, kept, precision, seconds, distinct = [], [], [], [], [], []
        for _ in range(resamples):
            positions = draw(rng, len(mistakes), count, sampling)
            ranking, took = rank(mistakes[torch.from_numpy(positions)])
            merged.append(jaccard(ranking.neuron_ids[:TOP], top))
            insufficient.append(jaccard([n.neuron for n in ranking.insufficient[:TOP]], top_insufficient))
            kept.append(bool(top) and top[0] in ranking.neuron_ids[:TOP])
            precision.append(precision_at_3(ranking, inputs.fires_on, inputs.fires_off)["all"])
            seconds.append(took)
            distinct.append(len(set(positions.tolist())))
        rows.append(CountStability(count, statistics.mean(distinct), statistics.mean(merged), statistics.mean(insufficient),
                                   statistics.mean(kept), statistics.mean(precision), min(precision),
                                   statistics.mean(p >= 2 / 3 for p in precision), statistics.median(seconds)))
    reference_precision = precision_at_3(reference, inputs.fires_on, inputs.fires_off)["all"]
    return ScenarioStability(name, reference, reference_precision, reference_seconds, rows)


def print_table(results: list[ScenarioStability], resamples: int, sampling: str) -> None:
    print("\n== Reference rankings (all mistakes of the first test half) ==")
    print(f"{'scenario':<28}{'mistakes':>9}  {'merged top-5 (dir)':<52}{'insufficient top-5':<24}{'P@3':>6}{'ms/rank':>9}")
    for r in results:
        merged = " ".join(f"{n.neuron}({n.direction[:3]})" for n in r.reference.neurons[:TOP])
        insufficient = " ".join(str(n.neuron) for n in r.reference.insufficient[:TOP])
        print(f"{r.name:<28}{r.reference.num_mistakes:>9}  {merged:<52}{insufficient:<24}{r.reference_precision:>6.2f}"
              f"{1000 * r.reference_seconds:>9.1f}")
    print(f"\n== {resamples} resamples per count ({sampling}) against the reference ==")
    print(f"{'scenario':<28}{'n':>5}{'distinct':>9}{'J top-5':>9}{'J ins-5':>9}{'top-1 in 5':>11}"
          f"{'P@3 mean':>9}{'P@3 min':>8}{'P@3>=2/3':>9}{'ms/rank':>9}")
    for r in results:
        for row in r.counts:
            print(f"{r.name:<28}{row.count:>5}{row.distinct:>9.1f}{row.jaccard_merged:>9.2f}{row.jaccard_insufficient:>9.2f}"
                  f"{row.top1_kept:>11.2f}{row.precision_mean:>9.2f}{row.precision_min:>8.2f}{row.precision_two_of_three:>9.2f}{1000 * row.seconds_per_ranking:>9.1f}")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--scenarios", default=",".join(spurious_scenarios()), help="comma-separated spurious scenarios")
    parser.add_argument("--resamples", type=positive_int, default=200, help="rankings per count of mistakes (B)")
    parser.add_argument("--counts", type=mistake_counts, default="5,10,20,40,80,all",
                        help="comma-separated counts of mistakes per resample; all: every mistake of the reference")
    parser.add_argument("--sampling", default="bootstrap", choices=("bootstrap", "subsample"),
                        help="draw with replacement, or distinct mistakes (see above)")
    parser.add_argument("--solver", default="faithful", choices=("faithful", "proximal"), help="the solver of every ranking")
    parser.add_argument("--assets", default=str(ASSETS_DIR), help="assets root holding classifiers/<scenario>")
    parser.add_argument("--probe-size", type=positive_int, default=1200, help="balanced probe scenes for the neurons' ground truth")
    parser.add_argument("--test-size", type=positive_int, default=None, help="test scenes (None: the whole test split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe scenes and of the draws")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for name in shipped_scenarios(args.scenarios, Path(args.assets)):
        start = time.perf_counter()
        inputs = ranking_inputs(name, Path(args.assets), args.probe_size, args.test_size, args.seed)
        prepared = time.perf_counter()
        results.append(measure_scenario(inputs, name, args.counts, args.resamples, args.sampling, args.solver, args.seed))
        print(f"{name}: features in {prepared - start:.0f}s, rankings in {time.perf_counter() - prepared:.0f}s")
    print_table(results, args.resamples, args.sampling)


if __name__ == "__main__":
    main()
