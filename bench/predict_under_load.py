"""How much a running job slows Predict, measured in one run on this machine.

    python bench/predict_under_load.py [--rounds 3] [--seconds 4] [--eval-images 3000]

Starts ``explaind serve`` on the shapes world (its classifier and CLIP, as the embedded
defaults) on a free loopback port, and measures Predict latency (p50/p99, one 64x64
image per call) from 1 and from 8 concurrent clients in three phases: (a) the server
idle, (b) while a VisualizeNeurons job (clip_illusion, a few neurons) runs, (c) while an
EvaluateSampleSet of ``--eval-images`` new images (features not cached) runs. The
phases are interleaved over ``--rounds`` rounds, so that drift in a shared machine's
speed hits them alike, and the result is printed as ratios to the idle phase, with the
job's own rate (steps/s, images/s) beside it.

Jobs run on the ``[jobs]`` executor's thread and Predict on the batcher's (or a gRPC
worker's) thread; on the CPU both use torch's intra-op thread pool, by default one
thread per core each: a job and a forward at once ask for twice the cores there are.

CPU only in what it says: on a GPU, Predict and a job share the device's streams and
memory instead, and this bench's numbers tell little about that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from explaind.client import Client
from explaind.world import assets

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path
from predict import latencies, percentiles, serve

PHASES = ("idle", "visualize", "evaluate")
CLIENT_COUNTS = (1, 8)


def start_server(root: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """``explaind serve`` with the world's classifier and CLIP, as without a config file,
    and ``[runtime].num_threads = threads`` (0: torch's default, one per core)."""
    config = root / f"threads{threads}.toml"
    config.write_text(
        f'[classifier]\nloader = "world"\npath = "{assets.classifier_dir("balanced")}"\n'
        f'[clip]\npath = "{assets.clip_dir()}"\n'
        f'[runtime]\nnum_threads = {threads}\n'
    )
    return serve(config, root / f"data{threads}")


class Load:
    """A job kept running through a phase; ``rate()``: its progress steps per second
    over the phase (VisualizeNeurons: optimisation steps; EvaluateSampleSet: images)."""

    def __init__(self, client: Client, phase: str, set_id: str, steps: int, neurons: int) -> None:
        if phase == "visualize":
            self.operation = client.visualize_neurons(list(range(neurons)), method="clip_illusion", steps=steps)
        else:
            self.operation = client.evaluate_sample_set(set_id)
        deadline = time.monotonic() + 60
        while self.operation.refresh().progress.step == 0 and time.monotonic() < deadline:  # running, past its setup
            time.sleep(0.05)
        self.start = (time.monotonic(), self.operation.progress.step)

    def rate(self) -> tuple[float, bool]:
        """(steps per second so far, whether the job was still running)."""
        self.operation.refresh()
        step = self.operation.progress.step if not self.operation.done else self.operation.progress.total
        return (step - self.start[1]) / (time.monotonic() - self.start[0]), not self.operation.done

    def end(self) -> None:
        if not self.operation.done:
            self.operation.cancel().wait(60)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=positive_int, default=3, help="rounds of the three phases, interleaved")
    parser.add_argument("--seconds", type=float, default=4.0, help="per latency measurement (each phase has one per client count)")
    parser.add_argument("--eval-images", type=positive_int, default=8000, help="images in each round's new sample set (EvaluateSampleSet)")
    parser.add_argument("--neurons", type=positive_int, default=4, help="neurons the VisualizeNeurons job optimises at once")
    parser.add_argument("--threads", type=int, default=0, help="the server's [runtime].num_threads (0: torch's default, one per core)")
    args = parser.parse_args()
    # After the arguments: --help and a usage error answer without the seconds of torch.
    from explaind.world.scenarios import get_scenario

    batch = get_scenario("balanced").dataset("test", size=64).all()
    images = (batch.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    labels = batch.labels.tolist()
    print(f"machine: {os.cpu_count()} CPU cores; server [runtime].num_threads = {args.threads}")

    with tempfile.TemporaryDirectory() as root:
        process, target = start_server(Path(root), args.threads)
        try:
            with Client(target, timeout=120) as client:
                set_ids = []
                for number in range(args.rounds):  # new images each round: evaluated features are cached by image
                    fresh = np.stack([images[i % len(images)] for i in range(args.eval_images)])
                    fresh[:, 0, 0] = np.stack([np.full(args.eval_images, number), np.arange(args.eval_images) // 256, np.arange(args.eval_images) % 256], 1)
                    set_ids.append(client.create_sample_set(list(fresh), [labels[i % len(labels)] for i in range(args.eval_images)]).sample_set_id)
                results: dict[tuple[str, int], list[float]] = {}
                rates: dict[str, list[float]] = {phase: [] for phase in PHASES[1:]}
                short = {phase: 0 for phase in PHASES[1:]}
                for number in range(args.rounds):
                    for phase in PHASES:
                        load = None if phase == "idle" else Load(client, phase, set_ids[number], 10_000, args.neurons)
                        try:
                            for clients in CLIENT_COUNTS:
                                results.setdefault((phase, clients), []).extend(latencies(target, images, clients, args.seconds))
                        finally:
                            if load is not None:
                                rate, running = load.rate()
                                rates[phase].append(rate)
                                short[phase] += not running
                                load.end()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    print(f"\nPredict latency under load, {args.rounds} interleaved rounds, ratio to idle")
    print(f"  {'phase':<10} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>6} {'p99 x':>6}   job rate")
    for phase in PHASES:
        for clients in CLIENT_COUNTS:
            p50, p99 = percentiles(results[(phase, clients)])
            idle50, idle99 = percentiles(results[("idle", clients)])
            rate = "" if phase == "idle" else f"{np.median(rates[phase]):8.1f} {'steps' if phase == 'visualize' else 'images'}/s"
            print(f"  {phase:<10} {clients:>7} {p50:8.2f} {p99:8.2f} {p50 / idle50:6.2f} {p99 / idle99:6.2f}   {rate}")
    for phase, count in short.items():
        if count:
            print(f"note: the {phase} job ended before its phase did in {count} of {args.rounds} rounds (raise --eval-images)")


if __name__ == "__main__":
    main()
