"""A head evaluation's per-group accuracy counted in one pass against a mask per group,
in one run.

    python bench/group_accuracy.py [--samples 50000] [--groups 10000] [--repeats 3]

An edit evaluates the old and the new head on its evaluation samples, each grouped by
(class, ``group_attribute`` value), up to 10,000 groups (MAX_EDIT_GROUPS). Ours is
``evaluate_head`` with those groups; the reference adds to ``evaluate_head`` without
groups the loop it ran before: each group's accuracy as the mean over a mask comparing
its name with every sample's. Alternating, ``--repeats`` times each; prints the median
seconds, their ratio, and whether both give the same accuracies (they must, exactly).
"""

from __future__ import annotations

from _cli import bench_parser, median_seconds, positive_int  # bench/, the script's directory, is on sys.path


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--samples", type=positive_int, default=50_000, help="evaluation samples")
    parser.add_argument("--groups", type=positive_int, default=10_000, help="distinct groups among them")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each, alternating; the median is printed")
    args = parser.parse_args()
    # After the arguments: --help and a usage error answer without the seconds of torch.
    import numpy as np
    import torch

    from explaind.methods.neuroinspect import evaluate_head

    torch.set_num_threads(1)

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 128, generator=generator), torch.zeros(6)
    features, labels = torch.randn(args.samples, 128, generator=generator), torch.randint(0, 6, (args.samples,), generator=generator)
    groups = np.array([f"class{int(y)}/background{int(g)}" for y, g in
                       zip(labels, torch.randint(0, max(1, args.groups // 6), (args.samples,), generator=generator), strict=True)])

    def reference() -> dict[str, float]:
        evaluate_head(weight, bias, features, labels)
        correct = ((features @ weight.T + bias).argmax(1) == labels).numpy()
        return {str(g): float(correct[groups == g].mean()) for g in np.unique(groups)}

    def ours() -> dict[str, float]:
        return evaluate_head(weight, bias, features, labels, groups=groups).group_accuracy

    runs = {"reference": reference, "ours": ours}
    results = {name: run() for name, run in runs.items()}  # warm-up, and the accuracies compared below
    seconds = median_seconds(runs, args.repeats)
    reference_s, ours_s = seconds["reference"], seconds["ours"]
    print(f"evaluate_head on {args.samples} samples in {len(results['ours'])} groups (median of {args.repeats}):")
    print(f"  a mask per group       {reference_s:8.3f} s")
    print(f"  one pass (ours)        {ours_s:8.3f} s   ({reference_s / ours_s:.1f}x, same accuracies: "
          f"{'yes' if results['ours'] == results['reference'] else 'NO'})")


if __name__ == "__main__":
    main()
