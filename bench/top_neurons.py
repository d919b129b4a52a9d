"""A ranking's per-mistake top-k neurons (ours, ``_top_neurons``) against every tie
ordered by id and against topk alone, in one run.

    python bench/top_neurons.py [--mistakes 10000] [--neurons 2048] [--nonzero 0.002] [--top-k 5] [--repeats 3]

The proximal solver's ω is mostly exact zeros (``--nonzero``; 1 is the faithful solver's
dense ω): a mistake with fewer than k + 1 nonzero shifts ties at zero where its top k
end. Only positive scores are ranked, so ordering the tied zeros by id (``top_ids``' rows
of ties, a cumulative sum over each) buys nothing: ours leaves them, where "every tie
ordered" orders them and masks the same way. Past k = D / FULL_SORT_SHARE ours sorts
whole rows, and selects no more than any row's positive scores; "topk alone" is ours
with that turned off (FULL_SORT_SHARE = 0: topk of k + 1, then the ties' ordering).
Each takes both directions (insufficient ω, excessive -ω), alternating, ``--repeats``
times; prints the median seconds, ours' ratio to each, and whether all give the same
neurons (they must, exactly).
"""

from __future__ import annotations

from _cli import bench_parser, median_seconds, positive_int, share  # bench/, the script's directory, is on sys.path


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--mistakes", type=positive_int, default=10_000, help="rows of ω")
    parser.add_argument("--neurons", type=positive_int, default=2048, help="feature dimension D")
    parser.add_argument("--nonzero", type=share, default=0.002, help="share of ω entries not exactly zero")
    parser.add_argument("--top-k", type=positive_int, default=5, help="k, each mistake's top neurons per list (rank's top_k)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each, alternating; the median is printed")
    args = parser.parse_args()
    if args.top_k > args.neurons:
        parser.error(f"--top-k {args.top_k} is above --neurons {args.neurons}")
    # After the arguments: --help and a usage error answer without the seconds of torch.
    import torch

    from explaind.methods.neuroinspect import _ranking

    torch.set_num_threads(1)

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
        full_sort_share, _ranking.FULL_SORT_SHARE = _ranking.FULL_SORT_SHARE, 0
        try:
            return ours()
        finally:
            _ranking.FULL_SORT_SHARE = full_sort_share

    runs = {"every tie ordered": every_tie_ordered, "topk alone": topk_alone, "ours": ours}
    results = {name: run() for name, run in runs.items()}  # warm-up, and the neurons compared below
    seconds = median_seconds(runs, args.repeats)
    same = all(torch.equal(a, b) for top in results.values() for a, b in zip(results["ours"], top, strict=True))
    print(f"top {args.top_k} of {args.mistakes} mistakes x {args.neurons} neurons, {args.nonzero:.1%} of ω nonzero, both directions (median of {args.repeats}):")
    for name in ("every tie ordered", "topk alone"):
        print(f"  {name:<22} {seconds[name]:8.3f} s   ({seconds[name] / seconds['ours']:.1f}x ours)")
    print(f"  {'ours':<22} {seconds['ours']:8.3f} s   (same neurons: {'yes' if same else 'NO'})")


if __name__ == "__main__":
    main()
