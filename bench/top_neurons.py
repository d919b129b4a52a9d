"""A ranking's per-mistake top-k neurons with ties at zero left unordered (ours) against
every tie ordered by id, in one run.

    python bench/top_neurons.py [--mistakes 10000] [--neurons 2048] [--nonzero 0.002] [--repeats 3]

The proximal solver's ω is mostly exact zeros: a mistake with fewer than k + 1 nonzero
shifts ties at zero where its top k end. Only positive scores are ranked, so ordering the
tied zeros by id (``top_ids``' rows of ties, a cumulative sum over each) buys nothing.
Ours is ``_top_neurons``, which leaves them; the reference orders every tie and masks the
same way. Each takes both directions (insufficient ω, excessive -ω), alternating,
``--repeats`` times; prints the median seconds, their ratio, and whether both give the
same neurons (they must, exactly).
"""

from __future__ import annotations

from _cli import bench_parser, median_seconds, positive_int, share  # bench/, the script's directory, is on sys.path

TOP_K = 5  # the top 5


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--mistakes", type=positive_int, default=10_000, help="rows of ω")
    parser.add_argument("--neurons", type=positive_int, default=2048, help="feature dimension D")
    parser.add_argument("--nonzero", type=share, default=0.002, help="share of ω entries not exactly zero")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each, alternating; the median is printed")
    args = parser.parse_args()
    # After the arguments: --help and a usage error answer without the seconds of torch.
    import torch

    from explaind.methods.neuroinspect._ranking import _top_neurons, top_ids

    torch.set_num_threads(1)

    generator = torch.Generator().manual_seed(0)
    omega = torch.randn(args.mistakes, args.neurons, generator=generator)
    omega[torch.rand(args.mistakes, args.neurons, generator=generator) >= args.nonzero] = 0.0

    def reference() -> list[torch.Tensor]:
        tops = []
        for scores in (omega, -omega):
            values, ids = top_ids(scores, TOP_K)
            tops.append(torch.where(values > 0, ids, -1))
        return tops

    def ours() -> list[torch.Tensor]:
        return [_top_neurons(scores, TOP_K) for scores in (omega, -omega)]

    runs = {"reference": reference, "ours": ours}
    results = {name: run() for name, run in runs.items()}  # warm-up, and the neurons compared below
    seconds = median_seconds(runs, args.repeats)
    reference_s, ours_s = seconds["reference"], seconds["ours"]
    same = all(torch.equal(a, b) for a, b in zip(results["ours"], results["reference"], strict=True))
    print(f"top {TOP_K} of {args.mistakes} mistakes x {args.neurons} neurons, {args.nonzero:.1%} of ω nonzero, both directions (median of {args.repeats}):")
    print(f"  every tie ordered      {reference_s:8.3f} s")
    print(f"  ties at zero left      {ours_s:8.3f} s   ({reference_s / ours_s:.1f}x, same neurons: {'yes' if same else 'NO'})")


if __name__ == "__main__":
    main()
