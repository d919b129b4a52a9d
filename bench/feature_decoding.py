"""Computing a sample set's features: decoding on a thread pool, overlapped with the
model, against decoding one image at a time before each batch, in one run.

    python bench/feature_decoding.py [--images 384] [--device cpu] [--repeats 3]

The set holds 500x375 JPEG photographs (smooth gradients with grain, as camera images
are) served to the world's balanced classifier with an ImageNet-style input geometry
(shorter side to 256, centre crop 224). The reference is the loop the engine ran before:
decode and resize each image of a batch, then run the batch (without the feature cache's
reads and writes, which ours still does). Ours is ``Engine.sample_set_features`` with the
feature cache emptied before each run. After one warm-up run of each, they alternate. On a CPU
the model's forward takes much of the time in both; on a GPU, where it is fast, decoding
dominates and the pool's threads bound the gain. Prints the seconds of each (median of
``--repeats``) and their ratio.
"""

from __future__ import annotations

import argparse
import io
import tempfile

import numpy as np
from PIL import Image

from explaind.config import default_config
from explaind.metrics import Metrics
from explaind.store import SQLiteStore

from _cli import bench_parser, median_seconds, positive_int  # bench/, the script's directory, is on sys.path


def _photographs(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:375, 0:500]
    photos = []
    for i in range(count):
        pixels = np.stack([(np.sin(columns / (9 + i % 7)) + 1) * 120, (np.cos(rows / 13.0) + 1) * 120,
                           rng.integers(0, 60, (375, 500))], axis=-1).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--images", type=positive_int, default=384, help="JPEG photographs in the set")
    parser.add_argument("--device", default="cpu", help="torch device of the classifier")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each, alternating; the median is printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="explaind-bench-") as data_dir:
        _measure(args, data_dir)


def _measure(args: argparse.Namespace, data_dir: str) -> None:
    """Both runs on a set stored under ``data_dir``; prints their times and ratio."""
    # Here, after the arguments: --help and a usage error answer without the seconds of torch.
    import torch

    import explaind.engine.core as engine_core
    from explaind.engine import Engine, NewSample

    config = (default_config().replace("server", data_dir=data_dir).replace("runtime", device=args.device)
              .replace("classifier", image_size=224, resize_size=256))
    engine = Engine(config, SQLiteStore(data_dir), Metrics())
    engine.load()
    engine.create_sample_set("photos", "", [NewSample(photo, i % 6, {}) for i, photo in enumerate(_photographs(args.images))])
    version, batch_size = engine.models.active, config.jobs.evaluate_batch_size
    digests = [record.digest for record in engine.store.list_samples("photos")]

    def reference() -> None:
        for start in range(0, len(digests), batch_size):
            images = torch.stack([engine.load_sample_image(d, version) for d in digests[start : start + batch_size]])
            version.features(images.to(engine.device)).float().cpu()

    def ours() -> None:
        engine.store.retain_features("")  # empty the cache
        engine.sample_set_features("photos")

    runs = {"reference": reference, "ours": ours}
    for run in runs.values():  # warm-up: the first full-size batches pay one-off costs
        run()
    seconds = median_seconds(runs, args.repeats, settle=torch.cuda.synchronize if engine.device.type == "cuda" else lambda: None)
    engine.close()
    engine.store.close()
    print(f"{args.images} images of 500x375 -> 224, batches of {batch_size}, on {args.device}, "
          f"{engine_core._DECODE_THREADS} decode threads (median of {args.repeats}):")
    print(f"  one image at a time, then the batch   {seconds['reference']:7.2f} s")
    print(f"  thread pool, overlapped with the model {seconds['ours']:7.2f} s   ({seconds['reference'] / seconds['ours']:.2f}x)")


if __name__ == "__main__":
    main()
