"""The server's peak resident memory under the largest requests its config admits, against
the sizing in docs/configuration.md (Memory), measured in one run.

    python bench/request_memory.py [--message-mib 64] [--workers 4] [--levels 1 2 4 8]
                                   [--requests Predict CreateSampleSet AppendSamples]
                                   [--decode-mib MIB] [--env NAME=VALUE ...] [--no-trim]

Starts ``explaind serve`` (the embedded defaults, with [server].max_message_bytes of
``--message-mib`` and max_workers of ``--workers``) in a fresh data dir, sends one small
Predict and takes its resident memory as the baseline. Then, for the largest request each
worker thread may hold, each of ``--requests`` (a Predict, a CreateSampleSet, an
AppendSamples to a set of its own, of one float16 tensor filling the message), and each N
of ``--levels``, sends N at once from N threads and prints the server's peak resident
memory (VmHWM, reset before each), the docs' bound for it
(baseline + min(max_decode_bytes, R x the decode's multiple x max_message_bytes)
+ R x 2 x max_message_bytes, for R = min(N, workers) running), their ratio,
the peak's growth per running request as a multiple of the message, the resident
memory left once they are done, the N requests' wall seconds, and the server's calls of
glibc's malloc_trim meanwhile and their seconds (summed over threads: their ratio to the
wall seconds is how many trimmed at once on average; the server runs with its trim timed). A level over ``--workers`` checks that the calls waiting
for a thread add nothing: gRPC reads a call's message only once a thread takes it.
``--decode-mib`` sets [server].max_decode_bytes (else its default), ``--env`` the
server's environment (glibc's MALLOC_ARENA_MAX or GLIBC_TUNABLES, to compare the memory
its allocator keeps once the requests are done: the "left" column). ``--no-trim`` serves
with malloc_trim never called, to compare the wall seconds and what is left.
"""

from __future__ import annotations

import math
import os
import shutil
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
DECODE_MESSAGES = {"Predict": 3.0, "CreateSampleSet": 4.0, "AppendSamples": 4.0}
# What each running request holds beside its decode: the message as received and as
# parsed, an upload's PNG once made.
THREAD_MESSAGES = 2.0
# ``explaind serve`` with its malloc_trim timed: each call adds its seconds to the totals
# in the file named first on the command line ("calls seconds"), or, with "off" second,
# trims nothing. The remaining arguments are serve's.
_TIMED_TRIM_SERVE = """
import os, sys, threading, time
import explaind.decode_memory as decode_memory
from explaind.client.cli import main
log, mode, arguments = sys.argv[1], sys.argv[2], sys.argv[3:]
trim, lock, totals = decode_memory._MALLOC_TRIM, threading.Lock(), [0, 0.0]
def timed_trim():
    started = time.perf_counter()
    if mode == "on" and trim is not None:
        trim()
    seconds = time.perf_counter() - started
    with lock:
        totals[0] += 1
        totals[1] += seconds
        with open(log + ".new", "w") as file:
            file.write(f"{totals[0]} {totals[1]}")
        os.replace(log + ".new", log)  # read whole or not at all
decode_memory._MALLOC_TRIM = timed_trim
sys.exit(main(["serve", *arguments]))
"""


def _status_mib(pid: int, key: str) -> float:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _largest_image(message_bytes: int) -> common_pb2.Image:
    """One float16 (3, side, side) tensor of random pixels in [0, 1], the largest whose
    request fits ``message_bytes`` (a few hundred bytes of framing left over)."""
    side = math.isqrt((message_bytes - 1024) // 6)
    pixels = np.random.default_rng(0).random((3, side, side), dtype=np.float32).astype(np.float16)
    return common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT16, shape=pixels.shape, data=pixels.tobytes()))


def _trims(log: Path) -> tuple[int, float]:
    """The server's malloc_trim calls so far and their seconds, summed over threads."""
    if not log.exists():
        return 0, 0.0
    calls, seconds = log.read_text().split()
    return int(calls), float(seconds)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--message-mib", type=positive_int, default=64, help=f"[server].max_message_bytes in MiB, at most {MAX_MESSAGE_MIB}")
    parser.add_argument("--workers", type=positive_int, default=4, help="[server].max_workers, at least 2")
    parser.add_argument("--levels", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="requests sent at once, in turn")
    parser.add_argument("--requests", nargs="+", choices=list(DECODE_MESSAGES), default=list(DECODE_MESSAGES), help="the requests to send, in turn")
    parser.add_argument("--decode-mib", type=positive_int, help="[server].max_decode_bytes in MiB (default: the config's)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="the server's environment, added to this one's")
    parser.add_argument("--no-trim", action="store_true", help="serve with glibc's malloc_trim never called")
    args = parser.parse_args()
    if args.message_mib > MAX_MESSAGE_MIB:
        parser.error(f"argument --message-mib: at most {MAX_MESSAGE_MIB} (one float16 image of 4096x4096)")
    if args.workers < 2:  # the server refuses fewer (explaind.config), unseen here: its output goes nowhere
        parser.error("argument --workers: at least 2, as [server].max_workers must be")
    if any("=" not in setting for setting in args.env):
        parser.error("argument --env: expected NAME=VALUE")
    message_bytes = args.message_mib * MIB
    root = Path(tempfile.mkdtemp(prefix="request-memory-"))
    config = root / "explaind.toml"
    decode = f"max_decode_bytes = {args.decode_mib * MIB}\n" if args.decode_mib else ""
    decode_mib = args.decode_mib or ServerSection().max_decode_bytes / MIB
    config.write_text(f"[server]\nmax_message_bytes = {message_bytes}\nmax_workers = {args.workers}\n{decode}")
    environment = dict(os.environ, **dict(setting.split("=", 1) for setting in args.env))
    port = free_port()
    trim_log = root / "trims"
    command = [sys.executable, "-c", _TIMED_TRIM_SERVE, str(trim_log), "off" if args.no_trim else "on",
               "--config", str(config), "--port", str(port), "--data-dir", str(root / "data")]
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
        appended_sets = [f"append-{index}" for index in range(max(args.levels) if "AppendSamples" in args.requests else 0)]  # one set each
        for set_id in appended_sets:
            sample_sets.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id=set_id, samples=[sample_sets_pb2.Sample(image=small, label=0)]), timeout=300)
        appends = [sample_sets_pb2.AppendSamplesRequest(sample_set_id=set_id, samples=upload.samples) for set_id in appended_sets]
        print(f"message {predict.ByteSize() / MIB:.1f} MiB (max_message_bytes {args.message_mib} MiB), max_workers {args.workers}, "
              f"max_decode_bytes {f'{args.decode_mib} MiB' if args.decode_mib else 'default'}, environment {' '.join(args.env) or 'as is'}, "
              f"malloc_trim {'off' if args.no_trim else 'on'}, "
              f"baseline {baseline:.0f} MiB resident after one small Predict")
        requests: dict[str, Callable[[int], object]] = {
            "Predict": lambda index: inference.Predict(predict, timeout=600),
            "CreateSampleSet": lambda index: sample_sets.CreateSampleSet(upload, timeout=600),
            "AppendSamples": lambda index: sample_sets.AppendSamples(appends[index], timeout=600),
        }
        print(f"{'request':<16}{'N':>4}{'peak MiB':>10}{'bound MiB':>11}{'peak/bound':>12}{'growth/running (x message)':>28}{'left MiB':>10}"
              f"{'wall s':>8}{'trims':>7}{'trim s':>8}")
        for name in args.requests:
            for level in args.levels:
                Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
                trims_before, started = _trims(trim_log), time.perf_counter()
                with ThreadPoolExecutor(level) as pool:
                    for future in [pool.submit(requests[name], index) for index in range(level)]:
                        future.result()
                wall = time.perf_counter() - started
                trims = _trims(trim_log)
                peak, running = _status_mib(process.pid, "VmHWM"), min(level, args.workers)
                decodes = min(decode_mib, running * DECODE_MESSAGES[name] * args.message_mib)
                bound = baseline + decodes + running * THREAD_MESSAGES * args.message_mib
                growth = (peak - baseline) / running / args.message_mib
                time.sleep(0.5)
                print(f"{name:<16}{level:>4}{peak:>10.0f}{bound:>11.0f}{peak / bound:>12.2f}{growth:>28.2f}{_status_mib(process.pid, 'VmRSS'):>10.0f}"
                      f"{wall:>8.1f}{trims[0] - trims_before[0]:>7}{trims[1] - trims_before[1]:>8.2f}", flush=True)
        channel.close()
    finally:
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(root)  # its server's data dir: 19 MB at --message-mib 4, more at the default


if __name__ == "__main__":
    main()
