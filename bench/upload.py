"""How fast an upload stores its images, measured in one run on this machine.

    python bench/upload.py [--images 1024] [--data-dir DIR]

Each image of a CreateSampleSet is a durable write (the file synced, renamed, its
directory synced) before the set's record commits. The engine writes
``BLOB_WRITE_THREADS`` at a time, so their syncs share the file system's journal
commits; the reference is the same engine writing one at a time. Both store ``--images``
distinct 64x64 PNGs of the shapes world into a fresh data dir and print milliseconds per
image and the ratio. Use ``--data-dir`` on the volume a server would use (a network
volume's sync takes milliseconds, where the ratio grows): a fresh folder is made in it.

    python bench/upload.py --served [--images 20000] [--every 5000]

With ``--served``, how a served server copes with one large set instead: starts
``explaind serve`` (the spurious_background classifier, one thread) in a fresh data dir
and uploads ``--images`` of that scenario's test split (64 px PNGs with their background
attribute, rendered first, about 1.5 ms each) through the SDK, 1000 per call. Every
``--every`` images it prints the last call's seconds (flat if an upload is linear),
GetSampleSet and ListSampleSets (median of 5), the server's peak resident memory since
the line before, and the sizes of the database, its WAL and the stored images. Then one
line each: ListSamples' first and last page and the whole set, EvaluateSampleSet
(features computed, then cached), RankMistakeNeurons as an operation with every
sample's ω, for the class with the most mistakes, a restart with the set stored (until
SERVING), DeleteSampleSet, and a restart that sweeps the deleted set's files.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from explaind.client import Client
from explaind.config import default_config
from explaind.metrics import Metrics
from explaind.store import SQLiteStore
from explaind.world import assets

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path
from predict import start_server
from soak import rss_mib

if TYPE_CHECKING:
    from explaind.engine import Engine, NewSample

SERVED_SCENARIO = "spurious_background"
SERVED_CALL_IMAGES = 1000  # images per CreateSampleSet / AppendSamples call of --served


def _seconds_per_image(engine: Engine, samples: list[NewSample], sample_set_id: str) -> float:
    started = time.perf_counter()
    engine.create_sample_set(sample_set_id, "", samples)
    return (time.perf_counter() - started) / len(samples)


class _PeakMemory:
    """A process's peak resident memory (MiB), sampled every 50 ms on a thread of its own."""

    def __init__(self, pid: int) -> None:
        self._pid, self._peak, self._stopped = pid, rss_mib(pid), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.wait(0.05):
            self._peak = max(self._peak, rss_mib(self._pid))

    def take(self) -> float:
        """The peak since the last take; the next starts from now."""
        peak, self._peak = max(self._peak, rss_mib(self._pid)), rss_mib(self._pid)
        return peak

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def _median_ms(call: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _timed(call: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def _served(images: int, every: int, data_root: str | None) -> None:
    """The --served run (see the module's docstring)."""
    from explaind.imaging import encode_png
    from explaind.world.scenarios import get_scenario

    pngs, labels, attributes = [], [], []
    for batch in get_scenario(SERVED_SCENARIO).dataset("test", size=images).batches(SERVED_CALL_IMAGES):
        pngs += [encode_png(pixels) for pixels in (batch.images.permute(0, 2, 3, 1) * 255).round().byte().numpy()]
        labels += batch.labels.tolist()
        attributes += [{"background": str(value)} for value in batch.attributes["background"]]
    with tempfile.TemporaryDirectory(dir=data_root) as root:
        def start() -> tuple[float, object]:
            return _timed(lambda: start_server(Path(root), assets.classifier_dir(SERVED_SCENARIO), 32, 1, "eager", "cpu"))

        data_dir = Path(root) / "data32"  # start_server's, for a max_batch_size of 32

        def sizes() -> str:
            files = [path for path in (data_dir / "artifacts").rglob("*") if path.is_file()]
            database, wal = ((data_dir / name).stat().st_size / 2**20 if (data_dir / name).exists() else 0.0
                             for name in ("explaind.sqlite3", "explaind.sqlite3-wal"))
            return f"{database:8.1f} {wal:6.1f} {sum(path.stat().st_size for path in files) / 2**20:8.1f}"

        _, (server, target) = start()
        memory = _PeakMemory(server.pid)
        try:
            with Client(target, timeout=3600) as client:
                print(f"{'images':>7} {'s/1000':>7} {'get_ms':>7} {'list_ms':>7} {'rss_mib':>8} {'db_mib':>8} {'wal_mib':>6} {'files_mib':>8}")
                for start_index in range(0, images, SERVED_CALL_IMAGES):
                    part = slice(start_index, start_index + SERVED_CALL_IMAGES)
                    if start_index == 0:
                        seconds, _ = _timed(lambda: client.create_sample_set(pngs[part], labels[part], sample_set_id="big", attributes=attributes[part]))
                    else:
                        seconds, _ = _timed(lambda: client.append_samples("big", pngs[part], labels[part], attributes=attributes[part]))
                    stored = min(images, start_index + SERVED_CALL_IMAGES)
                    if stored % every < SERVED_CALL_IMAGES or stored == images:
                        per_1000 = seconds * 1000 / (stored - start_index)
                        print(f"{stored:>7} {per_1000:>7.2f} {_median_ms(lambda: client.sample_set('big')):>7.1f} "
                              f"{_median_ms(client.sample_sets):>7.1f} {memory.take():>8.0f} {sizes()}", flush=True)
                first, last = (_median_ms(lambda: list(itertools.islice(client.samples("big", start=at), 256)), 3) for at in (0, max(0, images - 256)))
                seconds, _ = _timed(lambda: sum(1 for _ in client.samples("big")))
                print(f"ListSamples: first page {first:.0f} ms, last page {last:.0f} ms (256 samples each), the whole set {seconds:.1f} s; "
                      f"peak {memory.take():.0f} MiB")
                for state in ("computed", "cached"):
                    seconds, evaluation = _timed(lambda: client.evaluate_sample_set("big").result())
                    print(f"EvaluateSampleSet, features {state}: {seconds:.1f} s; peak {memory.take():.0f} MiB; database {sizes()}")
                confusion = evaluation.confusion_matrix
                worst = int((confusion.sum(1) - confusion.diagonal()).argmax())
                seconds, ranking = _timed(lambda: client.rank_mistake_neurons("big", worst, execution="operation", include_samples=True))
                print(f"RankMistakeNeurons (operation, class {worst}, {ranking.mistake_count} mistakes): {seconds:.1f} s; peak {memory.take():.0f} MiB")
            memory.stop()
            server.terminate()
            server.wait(60)
            seconds, (server, target) = start()
            print(f"restart with the set stored: {seconds:.1f} s to SERVING; {rss_mib(server.pid):.0f} MiB")
            with Client(target, timeout=600) as client:
                seconds, _ = _timed(lambda: client.delete_sample_set("big"))
            print(f"DeleteSampleSet: {seconds:.2f} s")
            server.terminate()
            server.wait(60)
            seconds, (server, target) = start()
            print(f"restart sweeping its files: {seconds:.1f} s to SERVING; database, WAL, files (MiB) {sizes()}")
        finally:
            memory.stop()
            server.terminate()
            server.wait(60)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--images", type=positive_int, default=1024, help="distinct images per upload (with --served, in the set)")
    parser.add_argument("--data-dir", default=None, help="where to make the bench's data dirs (default: the system's temporary folder)")
    parser.add_argument("--served", action="store_true", help="measure a served server with one large set instead (see above)")
    parser.add_argument("--every", type=positive_int, default=5000, help="with --served, images between measurements")
    args = parser.parse_args()
    # Here and in _served, after the arguments: --help and a usage error answer without the seconds of torch.
    if args.served:
        _served(args.images, args.every, args.data_dir)
        return
    from explaind.engine import Engine, NewSample
    from explaind.engine.core import BLOB_WRITE_THREADS
    from explaind.world.scenarios import get_scenario

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
