"""What a ranking's stability costs (``rank(..., stability_resamples=B)``, the request's
``stability_resamples``): seconds and peak memory of the resampling alone, on synthetic ω, in one run.

    python bench/stability_cost.py [--mistakes 4096] [--dim 2048] [--top-k 5] [--resamples 200,1000] [--threads 1]

Each resample re-counts the mistakes' top-k rows (nothing is solved again): its draw
counts added into the k ids of each mistake (a k above D/16 in 1 MB blocks of 0/1
indicators), one (B, M) x (M, D) product for the mean ω,
then two sorts of (B, D). It is printed beside the per-mistake top-k selection every ranking does anyway
(both lists, ``_top_neurons``), as a ratio: the solver's steps, far longer, are left out.

"peak RSS" is the MB one ``stability`` call raised the peak resident memory above what
its inputs (ω and both top-k lists) already held, each B in a fresh process with the
allocator's free memory handed back first (freed memory kept resident, of the timed calls
or of building the inputs, would hide it): Linux's /proc/self/clear_refs resets the peak;
"n/a" where there is none.
"""

from __future__ import annotations

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from _cli import bench_parser, median_seconds, peak_rss_growth_mb, positive_int  # bench/, the script's directory, is on sys.path


def resample_counts(text: str) -> list[int]:
    return [positive_int(item) for item in text.split(",")]


if TYPE_CHECKING:
    import torch


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ω (M, D) of seeded normals and its insufficient and excessive top-k lists, (M, k) each."""
    import torch

    from explaind.methods.neuroinspect._ranking import _top_neurons

    torch.set_num_threads(args.threads)
    omega = torch.randn(args.mistakes, args.dim, generator=torch.Generator().manual_seed(0))
    return omega, _top_neurons(omega, args.top_k), _top_neurons(-omega, args.top_k)


def peak_rss_growth_of_one_call_mb(args: argparse.Namespace, resamples: int) -> float:
    """Run in a fresh process: MB of peak resident memory one ``stability`` call adds to its inputs'."""
    from explaind.methods.neuroinspect._ranking import stability

    omega, insufficient, excessive = inputs(args)
    stability(omega[:2], insufficient[:2], excessive[:2], 1)  # its code paths' first run: pages of torch's libraries, not memory it holds
    return peak_rss_growth_mb(lambda: stability(omega, insufficient, excessive, resamples))


def peak_rss_column(args: argparse.Namespace, resamples: int) -> str:
    if not Path("/proc/self/clear_refs").exists():
        return "n/a"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return f"{fresh.submit(peak_rss_growth_of_one_call_mb, args, resamples).result():6.0f} MB"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--mistakes", type=positive_int, default=4096, help="M, the class's mistakes (an inline ranking's most)")
    parser.add_argument("--dim", type=positive_int, default=2048, help="D, a ResNet-50's features")
    parser.add_argument("--top-k", type=positive_int, default=5, help="k, each mistake's top neurons per list (rank's top_k)")
    parser.add_argument("--resamples", type=resample_counts, default="200,1000", help="comma-separated B")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed calls of each, the median printed")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.top_k > args.dim:
        parser.error(f"--top-k {args.top_k} is above --dim {args.dim}")
    from explaind.methods.neuroinspect._ranking import _top_neurons, stability  # after the arguments: --help answers without torch

    omega, insufficient, excessive = inputs(args)
    runs = {"top-k selection": lambda: (_top_neurons(omega, args.top_k), _top_neurons(-omega, args.top_k))}
    runs |= {f"stability B={b}": (lambda b=b: stability(omega, insufficient, excessive, b)) for b in args.resamples}
    seconds = median_seconds(runs, args.repeats)
    print(f"M = {args.mistakes}, D = {args.dim}, k = {args.top_k}, {args.threads} thread(s), median of {args.repeats}")
    for name, value in seconds.items():
        memory = peak_rss_column(args, int(name.split("=")[1])) if name.startswith("stability") else ""
        print(f"{name:<20} {value:8.3f} s  {value / seconds['top-k selection']:6.1f} x the top-k selection  {memory}".rstrip())


if __name__ == "__main__":
    main()
