"""Predict performance, measured in one run on this machine.

    python bench/predict.py [--seconds 3] [--iterations 300] [--backend eager] [--device cpu] [--images 1024] [--repeats 5]

Prints (1) in-process forward latency vs Predict RPC latency for one 64x64 image
(p50/p99, and the RPC overhead: percentiles of RPC minus forward over alternating
pairs), (2) Predict throughput with dynamic batching (max_batch_size 32) and
without (max_batch_size 1) at 1, 8 and 32 concurrent clients, (3) the model
alone in-process at batch 1 and 32: the server runs one forward at a time in both
modes, so batching's throughput gain cannot exceed the model's own batch-32 gain,
and (4) one ``client.predict`` of ``--images`` images, which the SDK sends in
requests of the server's batch size, one at a time (``max_in_flight=1``) and with
its default of several in flight: their round trips and the client's encoding
overlap the server's forwards.
Servers run as subprocesses on loopback ports, like production, with ``--backend``
for h_b on ``--device``; the in-process reference runs the same backend on the same
device and waits for each result, as the server must before it answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from explaind.client import Client
from explaind.client._client import DEFAULT_PREDICT_IN_FLIGHT
from explaind.client.cli import _free_port
from explaind.config import BACKENDS, ClassifierSection
from explaind.errors import FailedPrecondition
from explaind.world import assets

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path

if TYPE_CHECKING:
    import torch

# torch's side (torch, the engine, imaging, the world's scenes) is imported in the functions that
# use it: --help and a usage error answer at once, and the benches importing free_port or
# latencies from here need none of it.


_given_ports: set[int] = set()


def free_port() -> int:
    """A loopback port free now that no earlier call here gave, drawn as ``explaind demo``
    draws its server's, below the kernel's ephemeral range: bind-to-0 probes gave the same
    port twice in a row (a server's gRPC and metrics ports, in CI), and the port a probe
    released may go to another process's bind of port 0 before the server binds it."""
    while (port := _free_port()) in _given_ports:
        pass
    _given_ports.add(port)
    return port


def start_server(root: Path, classifier: Path, max_batch_size: int, threads: int, backend: str, device: str) -> tuple[subprocess.Popen, str]:
    config = root / f"batch{max_batch_size}.toml"
    config.write_text(
        f'[classifier]\nloader = "world"\npath = "{classifier}"\n'
        f'[batching]\nmax_batch_size = {max_batch_size}\n'
        f'[runtime]\nnum_threads = {threads}\nbackend = "{backend}"\ndevice = "{device}"\n'
    )
    return serve(config, root / f"data{max_batch_size}")


def serve(config: Path, data_dir: Path) -> tuple[subprocess.Popen, str]:
    """``explaind serve --config config`` on ``data_dir`` at a free port, once it is ready:
    its process and its address."""
    port = free_port()
    command = [sys.executable, "-m", "explaind.client.cli", "serve", "--config", str(config), "--port", str(port), "--data-dir", str(data_dir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    with Client(target) as client:
        client.wait_until_ready(timeout=300)
    return process, target


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    values = np.array(samples_s) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def in_process_model(classifier: Path, backend: str, threads: int, device: str, cache_dir: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the server computes per batch, without the RPC: images (N, 3, S, S) in
    [0, 1] on the CPU go to ``device``, through h_b (``backend``) and the head; returns
    the logits (N, C) back on the CPU, so every call includes the device's work."""
    from explaind.engine.backends import build_feature_fn
    from explaind.engine.models import load_classifier

    version = load_classifier(ClassifierSection(loader="world", path=str(classifier)))
    version.feature_extractor.to(device)
    version.head.to(device)
    features = build_feature_fn(version, backend, device, cache_dir, num_threads=threads)
    return lambda images: version.logits(features(images.to(device))).cpu()


def paired_latency(model: Callable[[torch.Tensor], torch.Tensor], target: str, image: np.ndarray, iterations: int) -> tuple[list[float], list[float]]:
    """Alternate one in-process forward and one Predict RPC, so that drift in the
    machine's speed (a shared VM) hits both alike. In-process: the server's uint8 ->
    float conversion, then the model, softmax and top-5."""
    import torch

    from explaind.imaging import uint8_hwc_to_float_chw

    forwards, rpcs = [], []
    with Client(target) as client, torch.inference_mode():
        for _ in range(iterations + 20):
            start = time.perf_counter()
            x = uint8_hwc_to_float_chw(image)[None]
            torch.softmax(model(x), 1).topk(5)
            forwards.append(time.perf_counter() - start)
            start = time.perf_counter()
            client.predict([image], top_k=5)
            rpcs.append(time.perf_counter() - start)
    return forwards[20:], rpcs[20:]


def latencies(target: str, images: np.ndarray, clients: int, seconds: float) -> list[float]:
    """Seconds per Predict call, from ``clients`` threads each sending one image per call."""
    samples: list[list[float]] = [[] for _ in range(clients)]
    stop = threading.Event()
    barrier = threading.Barrier(clients + 1)

    def worker(index: int) -> None:
        with Client(target) as client:
            client.predict([images[index]])
            barrier.wait()
            count = 0
            while not stop.is_set():
                start = time.perf_counter()
                client.predict([images[(index + count) % len(images)]])
                samples[index].append(time.perf_counter() - start)
                count += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return [sample for worker_samples in samples for sample in worker_samples]


def throughput(target: str, images: np.ndarray, clients: int, seconds: float) -> float:
    """Images per second with ``clients`` threads each sending one image per call."""
    return len(latencies(target, images, clients, seconds)) / seconds


def model_throughput(model: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int, seconds: float) -> float:
    """Images per second through ``model`` alone, ``batch_size`` images per forward
    (stacked as the server stacks them: contiguous (N, 3, S, S))."""
    import torch

    from explaind.imaging import uint8_hwc_to_float_chw

    x = torch.stack([uint8_hwc_to_float_chw(image) for image in images[:batch_size]])
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        forwards, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            model(x)
            forwards += 1
    return forwards * batch_size / elapsed


def pipelined_predict(target: str, images: np.ndarray, count: int, repeats: int) -> dict[int, float]:
    """Median seconds of one predict of ``count`` images (``images`` repeated) by
    max_in_flight: 1 and the default, alternated ``repeats`` times, so that drift in the
    machine's speed hits both alike."""
    batch = images[np.arange(count) % len(images)]
    seconds: dict[int, list[float]] = {1: [], DEFAULT_PREDICT_IN_FLIGHT: []}
    with Client(target) as client:
        client.predict(batch[:64])  # the server's limits read, the connection up
        for _ in range(repeats):
            for in_flight, taken in seconds.items():
                start = time.perf_counter()
                client.predict(batch, max_in_flight=in_flight)
                taken.append(time.perf_counter() - start)
    return {in_flight: float(np.median(taken)) for in_flight, taken in seconds.items()}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument("--iterations", type=positive_int, default=300, help="latency samples")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch (and ONNX Runtime) threads, in-process and in the servers alike")
    parser.add_argument("--backend", choices=[b for b in BACKENDS if b != "tensorrt"], default="eager", help="h_b backend, in-process and in the servers alike")
    parser.add_argument("--device", default="cpu", help="torch device of the model (e.g. cuda), in-process and in the servers alike")
    parser.add_argument("--images", type=positive_int, default=1024, help="images of the one predict call sent one request at a time and pipelined")
    parser.add_argument("--repeats", type=positive_int, default=5, help="runs of that predict call each way (the median is printed)")
    args = parser.parse_args()
    import torch

    from explaind.engine.backends import check_device
    from explaind.world.scenarios import get_scenario

    try:
        check_device(args.device)
    except FailedPrecondition as error:
        raise SystemExit(str(error)) from None
    torch.set_num_threads(args.threads)
    classifier = assets.classifier_dir("balanced")
    if not (classifier / "model.safetensors").is_file():
        raise SystemExit(f"no shipped classifier at {classifier}; run `make world` first")
    batch = get_scenario("balanced").dataset("test", size=64).all()
    images = (batch.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, CUDA={torch.cuda.is_available()}, backend {args.backend} on {args.device}")

    with tempfile.TemporaryDirectory() as root:
        servers = {size: start_server(Path(root), classifier, size, args.threads, args.backend, args.device) for size in (32, 1)}
        try:
            model = in_process_model(classifier, args.backend, args.threads, args.device, Path(root) / "compiled")
            forwards, rpcs = paired_latency(model, servers[32][1], images[0], args.iterations)
            forward, rpc = percentiles(forwards), percentiles(rpcs)
            overhead = percentiles([r - f for r, f in zip(rpcs, forwards, strict=True)])
            print("\nlatency, one 64x64 image (ms)      p50      p99")
            print(f"  in-process forward            {forward[0]:7.3f}  {forward[1]:7.3f}")
            print(f"  Predict RPC (batching on)     {rpc[0]:7.3f}  {rpc[1]:7.3f}")
            print(f"  RPC overhead (per pair)       {overhead[0]:7.3f}  {overhead[1]:7.3f}")
            print("\nthroughput (images/s)   clients   no batching   dynamic batching   ratio")
            for clients in (1, 8, 32):
                single = throughput(servers[1][1], images, clients, args.seconds)
                batched = throughput(servers[32][1], images, clients, args.seconds)
                print(f"                        {clients:7d}   {single:11.1f}   {batched:16.1f}   {batched / single:5.2f}x")
            single, batched = (model_throughput(model, images, size, args.seconds) for size in (1, 32))
            print("\nmodel alone, in-process (images/s)   batch 1   batch 32   ratio")
            print(f"                                    {single:9.1f}  {batched:9.1f}   {batched / single:5.2f}x")
            taken = pipelined_predict(servers[32][1], images, args.images, args.repeats)
            one, pipelined = taken[1], taken[DEFAULT_PREDICT_IN_FLIGHT]
            print(f"\none predict of {args.images} images in requests of 32 (s, median of {args.repeats})   "
                  f"one at a time   {DEFAULT_PREDICT_IN_FLIGHT} in flight   ratio")
            print(f"{'':67}{one:13.3f}   {pipelined:11.3f}   {one / pipelined:5.2f}x")
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


if __name__ == "__main__":
    main()
