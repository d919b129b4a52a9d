"""How fast an upload stores its images, measured in one run on this machine.

    python bench/upload.py [--images 1024] [--data-dir DIR]

Each image of a CreateSampleSet is a durable write (the file synced, renamed, its
directory synced) before the set's record commits. The engine writes
``BLOB_WRITE_THREADS`` at a time, so their syncs share the file system's journal
commits; the reference is the same engine writing one at a time. Both store ``--images``
distinct 64x64 PNGs of the shapes world into a fresh data dir and print milliseconds per
image and the ratio. Use ``--data-dir`` on the volume a server would use (a network
volume's sync takes milliseconds, where the ratio grows): a fresh folder is made in it.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from explaind.config import default_config
from explaind.engine import Engine, NewSample
from explaind.engine.core import BLOB_WRITE_THREADS
from explaind.metrics import Metrics
from explaind.store import SQLiteStore
from explaind.world.scenarios import get_scenario

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path


def _seconds_per_image(engine: Engine, samples: list[NewSample], sample_set_id: str) -> float:
    started = time.perf_counter()
    engine.create_sample_set(sample_set_id, "", samples)
    return (time.perf_counter() - started) / len(samples)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--images", type=positive_int, default=1024, help="distinct images per upload")
    parser.add_argument("--data-dir", default=None, help="where to make the bench's data dirs (default: the system's temporary folder)")
    args = parser.parse_args()
    batch = get_scenario("balanced").dataset("test", size=args.images).all()
    pixels = (batch.images.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    samples = [NewSample.from_array(image, int(label)) for image, label in zip(pixels, batch.labels)]
    with tempfile.TemporaryDirectory(dir=args.data_dir) as root:
        times = {}
        for name in ("concurrent", "sequential"):  # each in a data dir of its own: no file is there yet
            data_dir = Path(root) / name
            engine = Engine(default_config().replace("server", data_dir=str(data_dir)), SQLiteStore(data_dir), Metrics())
            engine.load()
            if name == "sequential":
                engine._blob_writers = ThreadPoolExecutor(max_workers=1)  # the same rounds, one write at a time
            times[name] = _seconds_per_image(engine, samples, name)
            engine.close()
            engine.store.close()
    print(f"{args.images} images of 64x64 stored under {args.data_dir or tempfile.gettempdir()}:")
    print(f"  {BLOB_WRITE_THREADS} writes at a time: {times['concurrent'] * 1000:.2f} ms per image")
    print(f"  one at a time:     {times['sequential'] * 1000:.2f} ms per image")
    print(f"  ratio: {times['sequential'] / times['concurrent']:.1f}x")


if __name__ == "__main__":
    main()
