"""Visualising many (neuron, class) pairs in one batch vs one pair at a time, in one run.

    python bench/illusion_batching.py [--classifier balanced] [--pairs 16] [--steps 50]
                                      [--method clip_illusion] [--device cpu|cuda]

A VisualizeNeurons job optimises all its pairs together (``ClipIllusion.visualize``
with every pair). This bench runs the same pairs that way and once per pair, on the
same device (after a warm-up, alternating, ``--repeats`` times each), and prints the
median seconds per image and the ratio. Each pair's random draws
depend only on (neuron, class, seed), so both runs optimise the same problems; the
bench also prints how far their final activations differ (batched kernels round
differently per batch shape, so not exactly zero).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from explaind.config import WORLD_CLIP_ILLUSION_EPSILON
from explaind.world.assets import ASSETS_DIR, classifier_dir

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path


def timed(run) -> tuple[float, object]:
    """(seconds, result) of ``run()``, synchronising CUDA around it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--assets", default=str(ASSETS_DIR), help="assets root holding classifiers/<name> and clip/")
    parser.add_argument("--classifier", default="balanced", help="world classifier whose neurons are visualised")
    parser.add_argument("--pairs", type=positive_int, default=16, help="neurons 0..pairs-1, each on its top class")
    parser.add_argument("--steps", type=positive_int, default=50, help="optimisation steps per image")
    parser.add_argument("--method", default="clip_illusion", choices=("clip_illusion", "feature_visualization", "no_clip"),
                        help="the loss optimised")
    parser.add_argument("--device", default="cpu", help="torch device of both runs")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads for both runs")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each, alternating; the median is printed")
    args = parser.parse_args()
    # After the arguments: --help and a usage error answer without the seconds of torch and open_clip.
    import torch

    from explaind.methods.neuroinspect import ClipIllusion
    from explaind.world.classifier import load_classifier
    from explaind.world.clip import load_world_clip

    torch.set_num_threads(args.threads)

    model = load_classifier(classifier_dir(args.classifier, Path(args.assets))).to(args.device)
    clip_model, tokenizer, _ = load_world_clip(Path(args.assets) / "clip", device=args.device)
    illusion = ClipIllusion(model, model.config.feature_layer, clip_model, tokenizer, head=model.config.head)
    pairs = [(neuron, None) for neuron in range(args.pairs)]
    options = dict(method=args.method, steps=args.steps, epsilon=WORLD_CLIP_ILLUSION_EPSILON)
    for shape in (pairs[:1], pairs):  # warm-up of both batch shapes: text embeddings, allocator, kernels
        illusion.visualize(shape, **{**options, "steps": 2})

    runs = {"batched": lambda: illusion.visualize(pairs, **options),
            "single": lambda: [illusion.visualize([pair], **options) for pair in pairs]}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for round_ in range(args.repeats):  # alternating which goes first: neither always meets a warmer machine
        for name in sorted(runs, reverse=bool(round_ % 2)):
            took, results[name] = timed(runs[name])
            seconds[name].append(took)
    batched, singles = results["batched"], results["single"]
    batched_seconds, single_seconds = statistics.median(seconds["batched"]), statistics.median(seconds["single"])
    single_activations = torch.cat([result.activations for result in singles])
    difference = (batched.activations - single_activations).abs().max().item()

    print(f"{args.classifier}: {args.pairs} pairs, {args.steps} steps of {args.method}, on {args.device}, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'':<24}{'seconds':>10}{'s/image':>10}{'ratio':>8}")
    print(f"{'one pair at a time':<24}{single_seconds:>10.2f}{single_seconds / args.pairs:>10.3f}{1.0:>8.2f}")
    print(f"{'all pairs in one batch':<24}{batched_seconds:>10.2f}{batched_seconds / args.pairs:>10.3f}"
          f"{single_seconds / batched_seconds:>8.2f}")
    print(f"largest activation difference between the two runs: {difference:.4f} "
          f"(activations {batched.activations.min():.2f} to {batched.activations.max():.2f})")


if __name__ == "__main__":
    main()
