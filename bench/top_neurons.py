"""A ranking's per-mistake top-k neurons (ours, ``_top_neurons``) against every tie
ordered by id and against topk alone, in one run; or, with ``--crossover``, ``top_ids``'
whole-row sort against its topk over a grid of shapes.

    python bench/top_neurons.py [--mistakes 10000] [--neurons 2048] [--nonzero 0.002] [--top-k 5] [--repeats 3] [--threads 1]
    python bench/top_neurons.py --crossover [--max-elements 2097152] [--repeats 3] [--threads 1]

The proximal solver's ω is mostly exact zeros (``--nonzero``; 1 is the faithful solver's
dense ω): a mistake with fewer than k + 1 nonzero shifts ties at zero where its top k
end. Only positive scores are ranked, so ordering the tied zeros by id (``top_ids``' rows
of ties, a cumulative sum over each) buys nothing: ours leaves them, where "every tie
ordered" orders them and masks the same way. Past k = D / POSITIVES_COUNTED_SHARE ours
counts each row's positive scores first and selects no more than the most of them, and
past k = D / FULL_SORT_SHARE it sorts whole rows; "topk alone" is ours with both turned
off, and the whole-row sort of a small call (both shares and SORTED_CALL_SCORES and
TIED_CALL_SORTED_SCORES 0: topk of k + 1, then the ties' ordering), "counted from D / 3" ours
counting only from k = D / FULL_SORT_SHARE, as it did before.
Each takes both directions (insufficient ω, excessive -ω), alternating, ``--repeats``
times; prints the median seconds, ours' ratio to each, and whether all give the same
neurons (they must, exactly).

``--crossover`` times ``top_ids`` forced to sort whole rows, forced to take topk (its
ties ordered after it) and as its rule picks (ours: FULL_SORT_SHARE, SORTED_CALL_SCORES,
TIED_CALL_SORTED_SCORES), alternating, on rows of n in 10, 100, 1000, 2048, 21000 (up to
``--max-elements`` per batch of 1, 64 or 4096 rows), k from 1 to n in 8 steps, float32
and float16, of three kinds: dense normal scores (logits; every tie ordered), 95 % exact
zeros (a proximal ω; ties at or below 0 left, as a ranking asks) and 8 distinct values
(heavy ties; every tie ordered). Each line gives the median milliseconds of the three,
sort / topk, and ours over the quicker of the two; then the worst of those, over every
point and over the points whose quicker took at least 0.5 ms (below that a call's fixed
cost decides: topk's tie ordering alone is about 0.1 ms of calls), and whether all three
gave the same ids everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from _cli import bench_parser, median_seconds, positive_int, share  # bench/, the script's directory, is on sys.path

# _ranking's constants that send top_ids down topk's path (0) or not: the share of a large k
# and the sizes of a small call.
TOP_IDS_RULE = ("FULL_SORT_SHARE", "SORTED_CALL_SCORES", "TIED_CALL_SORTED_SCORES")


@contextmanager
def ranking_constants(**values: int) -> Iterator[None]:
    """_ranking's module constants set to ``values`` in the block, then restored: a way
    forced."""
    from explaind.methods.neuroinspect import _ranking

    saved = {name: getattr(_ranking, name) for name in values}
    for name, value in values.items():
        setattr(_ranking, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_ranking, name, value)


# Shapes of --crossover: row lengths n, batch sizes, and the share of zeros of a sparse row.
CROSSOVER_ROW_LENGTHS = (10, 100, 1000, 2048, 21000)
CROSSOVER_BATCHES = (1, 64, 4096)
SPARSE_ZEROS = 0.95
# Below this many milliseconds of the quicker of the two a point is not counted in the
# worst ratio that matters: topk's tie ordering costs about 0.1 ms of fixed calls.
TIMED_FLOOR_MS = 0.5


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--mistakes", type=positive_int, default=10_000, help="rows of ω")
    parser.add_argument("--neurons", type=positive_int, default=2048, help="feature dimension D")
    parser.add_argument("--nonzero", type=share, default=0.002, help="share of ω entries not exactly zero")
    parser.add_argument("--top-k", type=positive_int, default=5, help="k, each mistake's top neurons per list (rank's top_k)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each, alternating; the median is printed")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch's CPU threads")
    parser.add_argument("--crossover", action="store_true", help="time top_ids' whole-row sort against its topk over a grid of shapes instead")
    parser.add_argument("--max-elements", type=positive_int, default=2**21, help="--crossover: largest batch, in scores")
    args = parser.parse_args()
    if args.top_k > args.neurons:
        parser.error(f"--top-k {args.top_k} is above --neurons {args.neurons}")
    # After the arguments: --help and a usage error answer without the seconds of torch.
    import torch

    from explaind.methods.neuroinspect import _ranking

    torch.set_num_threads(args.threads)
    if args.crossover:
        crossover(args.max_elements, args.repeats)
        return

    generator = torch.Generator().manual_seed(0)
    omega = torch.randn(args.mistakes, args.neurons, generator=generator)
    omega[torch.rand(args.mistakes, args.neurons, generator=generator) >= args.nonzero] = 0.0

    def every_tie_ordered() -> list[torch.Tensor]:
        tops = []
        for scores in (omega, -omega):
            values, ids = _ranking.top_ids(scores, args.top_k)
            tops.append(torch.where(values > 0, ids, -1))
        return tops

    def ours() -> list[torch.Tensor]:
        return [_ranking._top_neurons(scores, args.top_k) for scores in (omega, -omega)]

    def topk_alone() -> list[torch.Tensor]:
        # The small calls' sizes too: top_ids sorts those whole whatever the share.
        with ranking_constants(POSITIVES_COUNTED_SHARE=0, **dict.fromkeys(TOP_IDS_RULE, 0)):
            return ours()

    def counted_from_a_third() -> list[torch.Tensor]:
        with ranking_constants(POSITIVES_COUNTED_SHARE=_ranking.FULL_SORT_SHARE):
            return ours()

    runs = {"every tie ordered": every_tie_ordered, "topk alone": topk_alone, "counted from D / 3": counted_from_a_third, "ours": ours}
    results = {name: run() for name, run in runs.items()}  # warm-up, and the neurons compared below
    seconds = median_seconds(runs, args.repeats)
    same = all(torch.equal(a, b) for top in results.values() for a, b in zip(results["ours"], top, strict=True))
    print(f"top {args.top_k} of {args.mistakes} mistakes x {args.neurons} neurons, {args.nonzero:.1%} of ω nonzero, both directions (median of {args.repeats}):")
    for name in ("every tie ordered", "topk alone", "counted from D / 3"):
        print(f"  {name:<22} {seconds[name]:8.3f} s   ({seconds[name] / seconds['ours']:.1f}x ours)")
    print(f"  {'ours':<22} {seconds['ours']:8.3f} s   (same neurons: {'yes' if same else 'NO'})")


def crossover(max_elements: int, repeats: int) -> None:
    """Prints, per shape, top_ids' whole-row sort against its topk (see the docstring)."""
    import torch

    from explaind.methods.neuroinspect import _ranking

    generator = torch.Generator().manual_seed(0)

    def forced(scores: torch.Tensor, k: int, strategy: str, ties_kept_above: float | None) -> Any:
        """top_ids by ``strategy``: "sort" (whole rows), "topk" (topk, then its ties
        ordered) or "ours" (the module's rule, which picks between them)."""
        constants = {"sort": {"FULL_SORT_SHARE": scores.shape[1] + 1}, "topk": dict.fromkeys(TOP_IDS_RULE, 0), "ours": {}}[strategy]
        with ranking_constants(**constants):
            return _ranking.top_ids(scores, k, ties_kept_above=ties_kept_above)

    print(f"top_ids, whole-row sort against topk, {torch.get_num_threads()} thread(s), median of {repeats} (ms):")
    print(f"  {'n':>5} {'k':>5} {'rows':>4} {'dtype':<7} {'kind':<6} {'sort':>9} {'topk':>9} {'ours':>9} {'sort/topk':>9} {'ours/best':>9}")
    worst, worst_timed, same = 1.0, 1.0, True
    for n in CROSSOVER_ROW_LENGTHS:
        ks = sorted({1, max(1, n // 50), max(1, n // 16), max(1, n // 8), max(1, n // 5), -(-n // 3), n // 2, n})
        for rows in (batch for batch in CROSSOVER_BATCHES if batch * n <= max_elements):
            for dtype in (torch.float32, torch.float16):
                for kind in ("dense", "sparse", "ties"):
                    if kind == "ties":
                        scores = torch.randint(0, 8, (rows, n), generator=generator).float()
                    else:
                        scores = torch.randn(rows, n, generator=generator)
                        if kind == "sparse":
                            scores[torch.rand(rows, n, generator=generator) < SPARSE_ZEROS] = 0.0
                    scores = scores.to(dtype)
                    ties_kept_above = 0.0 if kind == "sparse" else None
                    for k in ks:
                        runs = {strategy: partial(forced, scores, k, strategy, ties_kept_above) for strategy in ("sort", "topk", "ours")}
                        answers = [run() for run in runs.values()]
                        # Which tied ids at or below ties_kept_above are taken is left to topk.
                        same &= all(torch.equal(answers[0][0], values) and (ties_kept_above is not None or torch.equal(answers[0][1], ids))
                                    for values, ids in answers[1:])
                        ms = {name: seconds * 1e3 for name, seconds in median_seconds(runs, repeats).items()}
                        best = min(ms["sort"], ms["topk"])
                        ours = ms["ours"] / best
                        worst = max(worst, ours)
                        if best >= TIMED_FLOOR_MS:
                            worst_timed = max(worst_timed, ours)
                        print(f"  {n:>5} {k:>5} {rows:>4} {str(dtype)[6:]:<7} {kind:<6} {ms['sort']:>9.3f} {ms['topk']:>9.3f} {ms['ours']:>9.3f} "
                              f"{ms['sort'] / ms['topk']:>9.2f} {ours:>9.2f}", flush=True)
    print(f"ours over the quicker, worst: {worst:.2f}x; where the quicker took >= {TIMED_FLOOR_MS} ms: {worst_timed:.2f}x "
          f"(same values and ids: {'yes' if same else 'NO'})")


if __name__ == "__main__":
    main()
