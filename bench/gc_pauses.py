"""How long the server's garbage collections hold the GIL, with its start-up heap frozen
and without, measured in one run.

    python bench/gc_pauses.py [--rounds 2] [--seconds 8] [--no-clip]

Starts ``explaind serve`` on the shapes world (its classifier, and CLIP unless
``--no-clip``; ``[runtime].num_threads = 1``) in a bootstrap that records every garbage
collection (``gc.callbacks``), three times a round: as it is ("frozen": start-up calls
``gc.collect()`` then ``gc.freeze()`` before it lets Predict in), with the collection but
no freeze ("collected"), and with neither ("before", the server before it froze). Each
serves Predict (one 64x64 image per call) from 1 and from 8 clients idle, then from 8
clients while a loop of jobs runs (a new set of 64 images evaluated, a 2-epoch EditHead,
a 20-step VisualizeNeurons). A collection holds the GIL, so every
thread, Predict's among them, waits for it. Printed per variant: the full (generation 2)
collections while serving and the longest young one, one full collection timed as the
server stops (before stop() unfreezes the heap), and Predict's p50/p99/max latency.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from explaind.client import Client
from explaind.world import assets

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path
from predict import free_port, latencies

VARIANTS = ("frozen", "collected", "before")
PHASES = (("idle", 1), ("idle", 8), ("jobs", 8))
# Runs `explaind serve` (argv[3:]) recording each collection's end (time.monotonic, the
# clocks of every process alike), generation and milliseconds; argv[2], the variant, gives
# the server module a gc whose start-up calls do less. At exit it writes the collections,
# the full collection timed in stop() and the objects frozen then, to argv[1].
BOOTSTRAP = """
import atexit, gc, json, sys, threading, time, types
from pathlib import Path
record_path, variant = Path(sys.argv[1]), sys.argv[2]
collections, began, at_stop, frozen_at_stop = [], {}, [], []
def record(phase, info):
    if phase == "start":
        began[threading.get_ident()] = time.perf_counter()
    elif (start := began.pop(threading.get_ident(), None)) is not None:
        collections.append((time.monotonic(), info["generation"], (time.perf_counter() - start) * 1000))
gc.callbacks.append(record)
from explaind.service import ExplaindServer, server
if variant != "frozen":
    server.gc = types.SimpleNamespace(collect=gc.collect if variant == "collected" else lambda: 0, freeze=lambda: None, unfreeze=gc.unfreeze)
stop = ExplaindServer.stop
def timed_stop(self, *args, **kwargs):
    if not at_stop:
        start = time.perf_counter()
        gc.collect()
        at_stop.append((time.perf_counter() - start) * 1000)
        frozen_at_stop.append(gc.get_freeze_count())
    stop(self, *args, **kwargs)
ExplaindServer.stop = timed_stop
atexit.register(lambda: record_path.write_text(json.dumps({"collections": collections, "full_at_stop_ms": at_stop, "frozen_at_stop": frozen_at_stop})))
from explaind.__main__ import main
sys.argv = ["explaind", *sys.argv[3:]]
sys.exit(main())
"""


def _run_jobs(target: str, images: np.ndarray, labels: list[int], method: str, stop: threading.Event) -> None:
    """Evaluate, edit and visualise in a loop until ``stop``, each cycle on new images."""
    with Client(target, timeout=120) as client:
        cycle = 0
        while not stop.is_set():
            fresh = images.copy()
            fresh[:, 0, 0] = (cycle % 256, cycle // 256 % 256, 7)
            set_id = client.create_sample_set(list(fresh), labels).sample_set_id
            client.evaluate_sample_set(set_id).wait()
            edit = client.edit_head(set_id, labels[0], [1, 2], max_epochs=2)
            version = edit.result().version.version_id
            client.visualize_neurons([3], method=method, steps=20).wait()
            client.delete_sample_set(set_id)
            client.delete_head_version(version)
            cycle += 1


def serve_once(root: Path, variant: str, clip: bool, images: np.ndarray, labels: list[int], seconds: float) -> tuple[dict, dict]:
    """One server of ``variant`` through the phases: (its collections' record, Predict
    seconds per phase)."""
    config = root / f"{variant}.toml"
    config.write_text(f'[classifier]\nloader = "world"\npath = "{assets.classifier_dir("balanced")}"\n[runtime]\nnum_threads = 1\n'
                      + (f'[clip]\npath = "{assets.clip_dir()}"\n' if clip else ""))
    port, record = free_port(), root / f"{variant}.json"
    command = [sys.executable, "-c", BOOTSTRAP, str(record), variant, "serve", "--config", str(config), "--port", str(port),
               "--data-dir", str(root / f"data-{variant}")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target, samples = f"127.0.0.1:{port}", {}
    try:
        with Client(target) as client:
            client.wait_until_ready(timeout=300)
        serving_from = time.monotonic()
        for phase, clients in PHASES:
            stop = threading.Event()
            jobs = threading.Thread(target=_run_jobs, args=(target, images, labels, "clip_illusion" if clip else "no_clip", stop))
            if phase == "jobs":
                jobs.start()
                time.sleep(1)  # past the first job's start
            samples[(phase, clients)] = latencies(target, images, clients, seconds)
            if phase == "jobs":
                stop.set()
                jobs.join()
        serving_until = time.monotonic()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    recorded = json.loads(record.read_text())
    # A server that froze anyway (its gc's functions imported by name, say) would be measured as "before" unseen.
    if any(recorded["frozen_at_stop"]) != (variant == "frozen"):
        raise RuntimeError(f"the {variant!r} server had {sum(recorded['frozen_at_stop'])} object(s) frozen as it stopped: the bootstrap no "
                           "longer decides its start-up freeze (does explaind.service.server still call gc.collect and gc.freeze as gc's attributes?)")
    serving = [(generation, ms) for at, generation, ms in recorded["collections"] if serving_from <= at <= serving_until]
    return {"full": [ms for generation, ms in serving if generation == 2], "young": [ms for generation, ms in serving if generation < 2],
            "serving_s": serving_until - serving_from, "at_stop": recorded["full_at_stop_ms"]}, samples


def _longest_ms(records: list[dict], kind: str) -> str:
    """The longest of the ``kind`` ("full" or "young") collections of ``records``, "-" for none."""
    durations = [ms for record in records for ms in record[kind]]
    return f"{max(durations):.1f}" if durations else "-"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds, each starting one server of each variant")
    parser.add_argument("--seconds", type=float, default=8.0, help="Predict per phase (idle from 1 and 8 clients, 8 during jobs)")
    parser.add_argument("--no-clip", action="store_true", help="serve without CLIP (visualisations by no_clip)")
    args = parser.parse_args()
    # After the arguments: --help and a usage error answer without the seconds of torch.
    from explaind.world.scenarios import get_scenario

    batch = get_scenario("balanced").dataset("test", size=64).all()
    images = (batch.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    labels = batch.labels.tolist()
    gc_records: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    samples: dict[str, dict[tuple[str, int], list[float]]] = {variant: {} for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as root:
        for number in range(args.rounds):
            for variant in VARIANTS if number % 2 == 0 else VARIANTS[::-1]:  # alternating the order: drift hits each alike
                record, latency = serve_once(Path(root), variant, not args.no_clip, images, labels, args.seconds)
                gc_records[variant].append(record)
                for phase, values in latency.items():
                    samples[variant].setdefault(phase, []).extend(values)

    print(f"server {'without' if args.no_clip else 'with'} CLIP, {args.rounds} round(s), {args.seconds:g} s per phase")
    print(f"\n  {'collections while serving':<44}" + "".join(f"{variant:>12}" for variant in VARIANTS))
    rows = {"seconds served": lambda r: f"{sum(x['serving_s'] for x in r):.0f}",
            "full (generation 2): count": lambda r: f"{sum(len(x['full']) for x in r)}",
            "full: longest (ms)": lambda r: _longest_ms(r, "full"),
            "young (generations 0, 1): longest (ms)": lambda r: _longest_ms(r, "young"),
            "full, timed as the server stops (ms, median)": lambda r: f"{np.median([ms for x in r for ms in x['at_stop']]):.1f}"}
    for name, cell in rows.items():
        print(f"  {name:<44}" + "".join(f"{cell(gc_records[variant]):>12}" for variant in VARIANTS))
    print(f"\n  {'Predict latency (ms)':<20}" + "".join(f"{variant + ' p50/p99/max':>24}" for variant in VARIANTS))
    for phase, clients in PHASES:
        cells = []
        for variant in VARIANTS:
            values = np.array(samples[variant][(phase, clients)]) * 1000
            cells.append(f"{np.percentile(values, 50):.1f} / {np.percentile(values, 99):.1f} / {values.max():.1f}")
        print(f"  {f'{phase}, {clients} client(s)':<20}" + "".join(f"{cell:>24}" for cell in cells))


if __name__ == "__main__":
    main()
