"""What a ranking's stability costs (``rank(..., stability_resamples=B)``, the request's
``stability_resamples``): seconds of the resampling alone, on synthetic ω, in one run.

    python bench/stability_cost.py [--mistakes 4096] [--dim 2048] [--resamples 200,1000] [--threads 1]

Each resample re-counts the mistakes' top-k rows (nothing is solved again): its draw
counts added into the k ids of each mistake (a k above D/16 in 1 MB blocks of 0/1
indicators), one (B, M) x (M, D) product for the mean ω,
then two sorts of (B, D). It is printed beside the per-mistake top-k selection every ranking does anyway
(both lists, ``_top_neurons``), as a ratio: the solver's steps, far longer, are left out.
"""

from __future__ import annotations

from _cli import bench_parser, median_seconds, positive_int  # bench/, the script's directory, is on sys.path


def resample_counts(text: str) -> list[int]:
    return [positive_int(item) for item in text.split(",")]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--mistakes", type=positive_int, default=4096, help="M, the class's mistakes (an inline ranking's most)")
    parser.add_argument("--dim", type=positive_int, default=2048, help="D, a ResNet-50's features")
    parser.add_argument("--resamples", type=resample_counts, default="200,1000", help="comma-separated B")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed calls of each, the median printed")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    import torch  # after the arguments: --help answers without the seconds of importing it

    from explaind.methods.neuroinspect._ranking import _top_neurons, stability

    torch.set_num_threads(args.threads)
    omega = torch.randn(args.mistakes, args.dim, generator=torch.Generator().manual_seed(0))
    insufficient, excessive = _top_neurons(omega, 5), _top_neurons(-omega, 5)
    runs = {"top-k selection": lambda: (_top_neurons(omega, 5), _top_neurons(-omega, 5))}
    runs |= {f"stability B={b}": (lambda b=b: stability(omega, insufficient, excessive, b)) for b in args.resamples}
    seconds = median_seconds(runs, args.repeats)
    print(f"M = {args.mistakes}, D = {args.dim}, {args.threads} thread(s), median of {args.repeats}")
    for name, value in seconds.items():
        print(f"{name:<20} {value:8.3f} s  {value / seconds['top-k selection']:6.1f} x the top-k selection")


if __name__ == "__main__":
    main()
