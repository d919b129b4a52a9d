"""Peak memory of a VisualizeNeurons job at a production classifier's scale, per pair.

    python bench/illusion_scale.py [--architecture resnet50] [--clip ViT-B-32] [--pairs 1 2 4 8]
                                   [--steps 2] [--device cpu|cuda]

A job optimises all its pairs (up to the engine's limit per operation) in one batch
through the classifier and CLIP, with a backward pass every step. This bench builds
a torchvision ``--architecture`` with random weights, split as the torchvision loader
splits it and wrapped as the engine wraps it for ``ClipIllusion``, and an open_clip
``--clip`` without pretrained weights (random weights take the memory trained ones do),
and runs ``--steps`` steps of clip_illusion for each number of ``--pairs``, each in a
fresh process: the memory one run's allocator keeps would hide the next run's growth.
It prints each run's peak growth over the memory the models hold (the peak resident
memory on the CPU, through /proc/self/clear_refs, from a baseline with the allocator's
free memory handed back; ``torch.cuda.max_memory_allocated``
on a GPU), the least-squares MB per pair and fixed MB, and their sum at the limit.

Measured on 2026-12-06 (2-core CPU, shared, one thread, float32), resnet50 (224 px,
D = 2048, 1000 classes): with ViT-B-32, 2 steps, 1/2/4/8 pairs +175/+298/+575/+1144 MB,
a fit of 139 MB per pair + 26 MB, about 8.7 GB for 64 pairs (the largest of three
runs: the 8-pair peak varies by 100 MB); with ViT-L-14, 1 step,
1/2 pairs +560/+1090 MB, 531 MB per pair + 29 MB, about 33.2 GB for 64 (an earlier run
+541/+1143 MB, about 600 MB per pair, 38 GB; docs/performance.md, Memory of a visualisation).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from _cli import bench_parser, peak_rss_growth_mb, positive_int, require_peak_rss  # bench/, the script's directory, is on sys.path

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def peak_growth_mb(architecture: str, clip_name: str, image_size: int, pairs: int, steps: int, device: str, threads: int) -> float:
    """MB the peak memory of ``steps`` steps of clip_illusion on ``pairs`` pairs rose above
    what the models held before them (run in a fresh process)."""
    import open_clip
    import torch
    import torchvision

    from explaind.engine.models import Preprocess, split_classifier, torchvision_split
    from explaind.engine.neuroinspect import _Classifier  # the engine's wrapper: the job's own path
    from explaind.methods.neuroinspect import ClipIllusion

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    head, layer = torchvision_split(architecture)
    model = torchvision.models.get_model(architecture, weights=None)
    class_names = tuple(f"class {i}" for i in range(model.get_submodule(head).out_features))
    version = split_classifier(model.to(device), name=architecture, loader="torchvision", source="random weights", feature_layer=layer,
                               head=head, class_names=class_names, image_size=image_size,
                               preprocess=Preprocess(_IMAGENET_MEAN, _IMAGENET_STD).to(device))
    clip_model = open_clip.create_model(clip_name, pretrained=None).to(device)
    illusion = ClipIllusion(_Classifier(version), f"features.trunk.{layer}", clip_model, open_clip.get_tokenizer(clip_name),
                            class_names=class_names, head="head", image_size=image_size)
    chosen = [(neuron, None) for neuron in range(pairs)]
    for neuron, _ in chosen:  # the text embeddings, cached before the measurement: one per class, not per step
        illusion.class_embedding(illusion.top_classes(neuron)[0])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        illusion.visualize(chosen, steps=steps)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return peak_rss_growth_mb(lambda: illusion.visualize(chosen, steps=steps))


def per_pair_fit(grown: dict[int, float]) -> tuple[float, float]:
    """(MB per pair, fixed MB) of the least-squares line through ``grown`` (pairs -> MB):
    peak ≈ fixed + per pair · pairs, over two or more numbers of pairs."""
    mean_pairs = sum(grown) / len(grown)
    mean_mb = sum(grown.values()) / len(grown)
    per_pair = sum((p - mean_pairs) * (mb - mean_mb) for p, mb in grown.items()) / sum((p - mean_pairs) ** 2 for p in grown)
    return per_pair, mean_mb - per_pair * mean_pairs


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--architecture", default="resnet50", help="torchvision classifier, random weights")
    parser.add_argument("--image-size", type=positive_int, default=224, help="the classifier's input side")
    parser.add_argument("--clip", default="ViT-B-32", help="open_clip model name, random weights")
    parser.add_argument("--pairs", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="numbers of pairs, each run in its own process")
    parser.add_argument("--steps", type=positive_int, default=2, help="optimisation steps per run (the peak is reached in the first)")
    parser.add_argument("--limit", type=positive_int, default=64, help="pairs the estimate is printed for (the engine's limit per operation)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if len(set(args.pairs)) < 2:
        parser.error("--pairs needs at least two different numbers to tell the memory per pair from the fixed memory")
    if not args.device.startswith("cuda"):
        require_peak_rss(parser)

    grown = {}
    spawn = multiprocessing.get_context("spawn")  # a fresh process: no allocator cache, no CUDA context inherited
    for pairs in args.pairs:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            grown[pairs] = pool.submit(peak_growth_mb, args.architecture, args.clip, args.image_size, pairs, args.steps,
                                       args.device, args.threads).result()
    per_pair, fixed = per_pair_fit(grown)

    print(f"{args.architecture} ({args.image_size} px) + {args.clip}, clip_illusion, {args.steps} step{'s' * (args.steps != 1)}, on {args.device}, "
          f"{args.threads} thread{'s' * (args.threads != 1)}; peak growth over the models' memory, each in a fresh process:")
    for pairs, mb in grown.items():
        print(f"  {pairs:>4} pair{'s' if pairs != 1 else ' '}  +{mb:8.0f} MB  ({mb / pairs:6.0f} MB per pair)")
    print(f"fit: {per_pair:.0f} MB per pair + {fixed:.0f} MB; {args.limit} pairs: about {(fixed + per_pair * args.limit) / 1024:.1f} GB")


if __name__ == "__main__":
    main()
