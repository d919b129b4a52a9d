"""The server's peak resident memory under the largest requests its config admits, against
the sizing in docs/configuration.md (Memory), measured in one run.

    python bench/request_memory.py [--message-mib 64] [--workers 4] [--levels 1 2 4 8]
                                   [--decode-mib MIB] [--env NAME=VALUE ...]

Starts ``explaind serve`` (the embedded defaults, with [server].max_message_bytes of
``--message-mib`` and max_workers of ``--workers``) in a fresh data dir, sends one small
Predict and takes its resident memory as the baseline. Then, for the largest request each
worker thread may hold, a Predict and a CreateSampleSet of one float16 tensor filling the
message, and each N of ``--levels``, sends N at once from N threads and prints the
server's peak resident memory (VmHWM, reset before each), the docs' bound for it
(baseline + min(max_decode_bytes, R x the decode's multiple x max_message_bytes)
+ R x 2 x max_message_bytes, for R = min(N, workers) running), their ratio,
the peak's growth per running request as a multiple of the message, and the resident
memory left once they are done. A level over ``--workers`` checks that the calls waiting
for a thread add nothing: gRPC reads a call's message only once a thread takes it.
``--decode-mib`` sets [server].max_decode_bytes (else its default), ``--env`` the
server's environment (glibc's MALLOC_ARENA_MAX or GLIBC_TUNABLES, to compare the memory
its allocator keeps once the requests are done: the "left" column).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from explaind.client import Client
from explaind.config import ServerSection
from explaind.v1 import common_pb2, inference_pb2, inference_pb2_grpc, sample_sets_pb2, sample_sets_pb2_grpc

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path
from predict import free_port

MIB = 1024 * 1024
# The largest float16 tensor of one image within MAX_IMAGE_SIDE (4096) a side: 96 MiB.
MAX_MESSAGE_MIB = 3 * 4096 * 4096 * 2 // MIB
# What one request's decode reserves of [server].max_decode_bytes, in multiples of its
# message (docs/configuration.md, Memory): its tensor's bytes (1) and their float32 copy
# (2 for float16), an upload's uint8 pixels and PNG (0.5 each) too.
DECODE_MESSAGES = {"Predict": 3.0, "CreateSampleSet": 4.0}
# What each running request holds beside its decode: the message as received and as
# parsed, an upload's PNG once made.
THREAD_MESSAGES = 2.0


def _status_mib(pid: int, key: str) -> float:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _largest_image(message_bytes: int) -> common_pb2.Image:
    """One float16 (3, side, side) tensor of random pixels in [0, 1], the largest whose
    request fits ``message_bytes`` (a few hundred bytes of framing left over)."""
    side = math.isqrt((message_bytes - 1024) // 6)
    pixels = np.random.default_rng(0).random((3, side, side), dtype=np.float32).astype(np.float16)
    return common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT16, shape=pixels.shape, data=pixels.tobytes()))


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--message-mib", type=positive_int, default=64, help=f"[server].max_message_bytes in MiB, at most {MAX_MESSAGE_MIB}")
    parser.add_argument("--workers", type=positive_int, default=4, help="[server].max_workers")
    parser.add_argument("--levels", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="requests sent at once, in turn")
    parser.add_argument("--decode-mib", type=positive_int, help="[server].max_decode_bytes in MiB (default: the config's)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="the server's environment, added to this one's")
    args = parser.parse_args()
    if args.message_mib > MAX_MESSAGE_MIB:
        parser.error(f"argument --message-mib: at most {MAX_MESSAGE_MIB} (one float16 image of 4096x4096)")
    message_bytes = args.message_mib * MIB
    root = Path(tempfile.mkdtemp(prefix="request-memory-"))
    config = root / "explaind.toml"
    decode = f"max_decode_bytes = {args.decode_mib * MIB}\n" if args.decode_mib else ""
    decode_mib = args.decode_mib or ServerSection().max_decode_bytes / MIB
    config.write_text(f"[server]\nmax_message_bytes = {message_bytes}\nmax_workers = {args.workers}\n{decode}")
    if any("=" not in setting for setting in args.env):
        parser.error("argument --env: expected NAME=VALUE")
    environment = dict(os.environ, **dict(setting.split("=", 1) for setting in args.env))
    port = free_port()
    command = [sys.executable, "-m", "explaind.client.cli", "serve", "--config", str(config), "--port", str(port), "--data-dir", str(root / "data")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    target = f"127.0.0.1:{port}"
    options = [("grpc.max_send_message_length", message_bytes), ("grpc.max_receive_message_length", message_bytes)]
    try:
        with Client(target) as client:
            client.wait_until_ready(timeout=300)
        channel = grpc.insecure_channel(target, options=options)
        inference, sample_sets = inference_pb2_grpc.InferenceServiceStub(channel), sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        small = common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[64, 64, 3], data=bytes(64 * 64 * 3)))
        inference.Predict(inference_pb2.PredictRequest(images=[small]), timeout=300)
        time.sleep(1)
        baseline = _status_mib(process.pid, "VmRSS")
        image = _largest_image(message_bytes)
        predict = inference_pb2.PredictRequest(images=[image])
        upload = sample_sets_pb2.CreateSampleSetRequest(samples=[sample_sets_pb2.Sample(image=image, label=0)])
        print(f"message {predict.ByteSize() / MIB:.1f} MiB (max_message_bytes {args.message_mib} MiB), max_workers {args.workers}, "
              f"max_decode_bytes {f'{args.decode_mib} MiB' if args.decode_mib else 'default'}, environment {' '.join(args.env) or 'as is'}, "
              f"baseline {baseline:.0f} MiB resident after one small Predict")
        requests: dict[str, Callable[[], object]] = {
            "Predict": lambda: inference.Predict(predict, timeout=600),
            "CreateSampleSet": lambda: sample_sets.CreateSampleSet(upload, timeout=600),
        }
        print(f"{'request':<16}{'N':>4}{'peak MiB':>10}{'bound MiB':>11}{'peak/bound':>12}{'growth/running (x message)':>28}{'left MiB':>10}")
        for name, send in requests.items():
            for level in args.levels:
                Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
                with ThreadPoolExecutor(level) as pool:
                    for future in [pool.submit(send) for _ in range(level)]:
                        future.result()
                peak, running = _status_mib(process.pid, "VmHWM"), min(level, args.workers)
                decodes = min(decode_mib, running * DECODE_MESSAGES[name] * args.message_mib)
                bound = baseline + decodes + running * THREAD_MESSAGES * args.message_mib
                growth = (peak - baseline) / running / args.message_mib
                time.sleep(0.5)
                print(f"{name:<16}{level:>4}{peak:>10.0f}{bound:>11.0f}{peak / bound:>12.2f}{growth:>28.2f}{_status_mib(process.pid, 'VmRSS'):>10.0f}", flush=True)
        channel.close()
    finally:
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    main()
