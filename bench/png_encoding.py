"""The PNGs a job makes (progress previews, grids, visualisations) at zlib's fastest level
against Pillow's default (6), in one run.

    python bench/png_encoding.py [--pairs 16] [--grid-images 64] [--repeats 5]

Two images a job encodes: a VisualizeNeurons preview (``--pairs`` images after a few
no_clip steps on the balanced classifier, captioned and tiled as the job tiles them) and
an EvaluateSampleSet ``mistakes.png`` (``--grid-images`` world test images, captioned).
Each is encoded both ways, alternating, ``--repeats`` times; prints the median
milliseconds, their ratio, the bytes, and whether both decode to the same pixels (PNG is
lossless: they must).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from explaind.world.assets import ASSETS_DIR, classifier_dir

from _cli import bench_parser, median_seconds, positive_int  # bench/, the script's directory, is on sys.path


def _preview(pairs: int, assets: Path) -> np.ndarray:
    """A preview grid as VisualizeNeurons sends it: its images after 10 no_clip steps."""
    from explaind.imaging import image_grid, to_uint8_hwc
    from explaind.methods.neuroinspect import ClipIllusion
    from explaind.world.classifier import load_classifier

    model = load_classifier(classifier_dir("balanced", assets))
    illusion = ClipIllusion(model, model.config.feature_layer, head=model.config.head)
    result = illusion.visualize([(neuron, None) for neuron in range(pairs)], method="no_clip", steps=10)
    names = model.config.class_names
    captions = [f"n{n} {names[int(c)]}" for n, c in zip(result.neurons.tolist(), result.classes.tolist())]
    return image_grid([to_uint8_hwc(image) for image in result.images.detach().float().cpu()], captions)


def _mistakes_grid(count: int) -> np.ndarray:
    """A mistakes.png as EvaluateSampleSet draws it: world test images captioned true>predicted."""
    from explaind.imaging import image_grid, to_uint8_hwc
    from explaind.world.scenarios import get_scenario

    batch = get_scenario("balanced").dataset("test", size=count).all()
    return image_grid([to_uint8_hwc(image) for image in batch.images], [f"square>circle {i}" for i in range(count)])


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--assets", default=str(ASSETS_DIR), help="assets root holding classifiers/balanced")
    parser.add_argument("--pairs", type=positive_int, default=16, help="images in the VisualizeNeurons preview")
    parser.add_argument("--grid-images", type=positive_int, default=64, help="images in the mistakes grid (the job's default most)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed encodings of each, alternating; the median is printed")
    args = parser.parse_args()
    # Here and in the helpers, after the arguments: --help and a usage error answer without the seconds of torch.
    from explaind.imaging import JOB_IMAGE_COMPRESS_LEVEL, encode_png

    cases = [(f"VisualizeNeurons preview, {args.pairs} images", _preview(args.pairs, Path(args.assets))),
             (f"EvaluateSampleSet mistakes.png, {args.grid_images} images", _mistakes_grid(args.grid_images))]
    print(f"PNG encoding, Pillow's default level (6) against level {JOB_IMAGE_COMPRESS_LEVEL} (median of {args.repeats}):")
    for title, pixels in cases:
        runs = {"default": lambda: encode_png(pixels), "ours": lambda: encode_png(pixels, compress_level=JOB_IMAGE_COMPRESS_LEVEL)}
        encoded = {name: run() for name, run in runs.items()}  # warm-up, and the bytes compared below
        seconds = median_seconds(runs, args.repeats)
        default, ours = seconds["default"] * 1e3, seconds["ours"] * 1e3
        same = np.array_equal(_decoded(encoded["default"]), _decoded(encoded["ours"]))
        print(f"{title} ({pixels.shape[1]}x{pixels.shape[0]}):")
        print(f"  level 6  {default:8.1f} ms  {len(encoded['default']):>9} bytes")
        print(f"  level {JOB_IMAGE_COMPRESS_LEVEL}  {ours:8.1f} ms  {len(encoded['ours']):>9} bytes   ({default / ours:.2f}x faster, "
              f"{len(encoded['ours']) / len(encoded['default']):.2f}x the bytes, same pixels: {'yes' if same else 'NO'})")


if __name__ == "__main__":
    main()
