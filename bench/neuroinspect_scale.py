"""Peak memory and time of the NeuroInspect engines at a production classifier's scale,
on synthetic features, in one process on the CPU.

    python bench/neuroinspect_scale.py [--mistakes 20000] [--dim 2048] [--classes 1000] [--samples 50000] [--steps 3]

A ResNet-50 head is D = 2048 features by 1000 classes, and its sets hold tens of
thousands of samples. Prints, for each step a ranking or an edit takes on such a set,
the growth of the process's resident memory over what it held before (Linux's peak
RSS, reset before each step through /proc/self/clear_refs, from a baseline with the
allocator's free memory handed back), as MB and as a multiple
of one float32 (N, D) matrix of its inputs, and its seconds:

* each solver on ``--mistakes`` mistakes for ``--steps`` steps (a solve needs ω, its
  velocity or extrapolated point, a gradient, the shifted features and the written-out
  ω: about 5 such matrices);
* ``MistakeNeuronRanker.rank`` of one class among ``--samples`` samples (finding the
  class's mistakes needs the class's predictions, not the whole set's (N, C) logits);
* ``evaluate_head`` on ``--samples`` samples (what an edit does to its validation set
  every epoch): the checks and predictions by slices of rows, not whole-set copies.

The peak counts what the allocator keeps as well as what is live: one line may read
100 MB or so more in one run than in the next. Measured on 2026-12-06 (2-core CPU,
shared, one thread), before -> after the fixes this script came with (after: from a
trimmed baseline, docs/performance.md, ResNet-50 sizes):

    faithful         +1336 MB (8.5 x) ->  +868 MB (5.6 x)
    proximal         +1576 MB (10.1 x) -> +885 MB (5.7 x)
    rank one class    +781 MB, 2.2 s  ->    +48 MB, 0.4 s (a quiet machine), 0.59 s (a busy one)
    evaluate_head     +781 MB         ->    +48 to +192 MB (a float64 copy in the finite check, then the logits)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from _cli import bench_parser, peak_rss_growth_mb, positive_int, require_peak_rss  # bench/, the script's directory, is on sys.path

def measured(run: Callable[[], object]) -> tuple[float, float]:
    """(MB the peak RSS rose above the RSS before ``run``, seconds) of one call."""
    started = time.perf_counter()
    return peak_rss_growth_mb(run), time.perf_counter() - started


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--mistakes", type=positive_int, default=20_000, help="mistakes each solver explains")
    parser.add_argument("--dim", type=positive_int, default=2048, help="feature dimension D")
    parser.add_argument("--classes", type=positive_int, default=1000, help="classes C of the linear head")
    parser.add_argument("--samples", type=positive_int, default=50_000, help="samples of the set ranked and evaluated")
    parser.add_argument("--steps", type=positive_int, default=3, help="solver steps (each is two (N, D) x (D, C) products)")
    args = parser.parse_args()
    require_peak_rss(parser)
    # After the arguments: --help and a usage error answer without the seconds of torch.
    import torch

    from explaind.methods.neuroinspect import FaithfulSGD, MistakeNeuronRanker, ProximalGradient, evaluate_head

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.dim, args.classes)
    weight, bias = head.weight.detach(), head.bias.detach()
    mistakes = torch.randn(args.mistakes, args.dim, generator=generator).relu()
    targets = torch.randint(0, args.classes, (args.mistakes,), generator=generator)
    samples = torch.randn(args.samples, args.dim, generator=generator).relu()
    labels = torch.randint(0, args.classes, (args.samples,), generator=generator)

    def line(name: str, rows: int, run: Callable[[], object]) -> None:
        grown, seconds = measured(run)
        matrix = rows * args.dim * 4 / 2**20
        print(f"  {name:<24} peak +{grown:7.0f} MB  ({grown / matrix:4.1f} x one ({rows}, {args.dim}) float32)  {seconds:7.2f} s")

    print(f"solve {args.mistakes} mistakes x {args.dim} features, {args.classes} classes, {args.steps} steps:")
    for solver in (FaithfulSGD(), ProximalGradient()):
        line(solver.name, args.mistakes, lambda: solver.solve(weight, bias, mistakes, targets, max_iterations=args.steps))
    print(f"{args.samples} samples x {args.dim} features, {args.classes} classes:")
    line("rank one class", args.samples, lambda: MistakeNeuronRanker(head).rank(samples, labels, target_class=0, max_iterations=args.steps))
    line("evaluate_head", args.samples, lambda: evaluate_head(weight, bias, samples, labels))


if __name__ == "__main__":
    main()
