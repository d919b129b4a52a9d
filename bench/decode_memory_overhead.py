"""What [server].max_decode_bytes costs the usual Predict and a job's features, measured
in one run.

    python bench/decode_memory_overhead.py [--images 4] [--repeats 2000] [--samples 300] [--job-repeats 30] [--large-samples 16]

An in-process InferenceServicer.Predict of ``--images`` small PNGs (64x64) on the
shapes world, with the engine's decode memory and with none (the handlers as before the
budget: no lease), alternating; prints each median and their ratio. Then the same for a
job's feature computation of a stored set of ``--samples`` 64x64 PNGs (the engine's
batches, decode threads and model; the feature cache bypassed). Such images reserve
nothing (under 16 MiB, explaind.decode_memory): the difference is the lease's fast path.
Last, a job's feature computation of ``--large-samples`` stored 1024x1024 PNGs of random
pixels, which reserve, trimming the malloc arenas once at its end (the server) and after
each image.
"""

from __future__ import annotations

import tempfile

import numpy as np

from explaind.config import default_config
from explaind.metrics import Metrics
from explaind.store import SQLiteStore
from explaind.v1 import common_pb2, inference_pb2, sample_sets_pb2

from _cli import bench_parser, median_seconds, positive_int  # bench/, the script's directory, is on sys.path


class _Call:
    """A servicer context with no deadline whose caller waits."""

    def time_remaining(self) -> None:
        return None

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback) -> bool:
        return True


class _NoDecodeMemory:
    """An engine's decode memory that leases none: PixelBudget(memory=None)."""

    def lease(self, context, *, trim: bool = True) -> None:
        return None


class _TrimAfterEachDecode:
    """An engine's decode memory whose every lease trims the arenas as it is given back."""

    def __init__(self, memory) -> None:
        self._memory = memory

    def lease(self, context, *, trim: bool = True):
        return self._memory.lease(context, trim=True)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--images", type=positive_int, default=4, help="PNGs per Predict")
    parser.add_argument("--repeats", type=positive_int, default=2000, help="timed Predicts of each kind")
    parser.add_argument("--samples", type=positive_int, default=300, help="stored 64x64 PNGs whose features a job computes")
    parser.add_argument("--job-repeats", type=positive_int, default=30, help="timed feature computations of each kind")
    parser.add_argument("--large-samples", type=positive_int, default=16, help="stored 1024x1024 PNGs whose features a job computes")
    args = parser.parse_args()
    from explaind.engine import Engine
    from explaind.imaging import encode_png
    from explaind.service.inference import InferenceServicer
    from explaind.service.sample_sets import SampleSetServicer

    data_dir = tempfile.mkdtemp(prefix="decode-memory-overhead-")
    engine = Engine(default_config().replace("server", data_dir=data_dir), SQLiteStore(data_dir), Metrics())
    engine.load()
    rng = np.random.default_rng(0)
    images = []
    for _ in range(max(args.images, args.samples)):
        images.append(common_pb2.Image(encoded=encode_png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))))
    request, call = inference_pb2.PredictRequest(images=images[: args.images]), _Call()
    servicer = InferenceServicer(engine, serving=lambda: True)
    budgeted, unbudgeted = engine.decode_memory, _NoDecodeMemory()

    def predict(memory) -> None:
        engine.decode_memory = memory
        servicer.Predict(request, call)

    for _ in range(50):  # warm up
        predict(budgeted)
    medians = median_seconds({"with the budget": lambda: predict(budgeted), "without": lambda: predict(unbudgeted)}, args.repeats)
    for name, seconds in medians.items():
        print(f"Predict of {args.images} 64x64 PNGs, {name}: {seconds * 1e3:.3f} ms (median of {args.repeats})")
    print(f"with / without: {medians['with the budget'] / medians['without']:.3f}")

    samples = [sample_sets_pb2.Sample(image=image, label=0) for image in images[: args.samples]]
    SampleSetServicer(engine).CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="bench", samples=samples), call)
    version = engine.models.active

    def compute_features(digests: list[str], memory) -> None:
        engine.decode_memory = memory
        for _ in engine._run_on_samples(digests, version, lambda batch: version.features(batch.to(engine.device)), 0, None, "computing features"):
            pass

    def compare(what: str, digests: list[str], kinds: dict[str, object]) -> None:
        for _ in range(3):  # warm up
            compute_features(digests, budgeted)
        medians = median_seconds({name: (lambda memory=memory: compute_features(digests, memory)) for name, memory in kinds.items()}, args.job_repeats)
        for name, seconds in medians.items():
            print(f"features of {len(digests)} stored {what}, {name}: {seconds * 1e3:.2f} ms (median of {args.job_repeats})")
        first, second = medians
        print(f"{first} / {second}: {medians[first] / medians[second]:.3f}")

    compare("64x64 PNGs", list(dict.fromkeys(record.digest for record in engine.store.list_samples("bench"))),
            {"with the budget": budgeted, "without": unbudgeted})
    with engine.store.writing_blobs() as put:
        large = [put(encode_png(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))) for _ in range(args.large_samples)]
    compare("1024x1024 PNGs", large, {"trimmed once (the server)": budgeted, "trimmed after each": _TrimAfterEachDecode(budgeted)})
    engine.close()


if __name__ == "__main__":
    main()
