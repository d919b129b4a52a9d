"""What glibc's malloc_trim(0), called after each large decode as the decode budget does,
costs the other threads' allocations, measured in one run.

    python bench/malloc_trim_contention.py [--workers 4] [--seconds 3]

``--workers`` threads each allocate and free a 64 MiB buffer and twenty 2.4 MB ones (a
large decode's) in a loop, with malloc_trim(0) after each round and then without; the
main thread meanwhile times a 4 KiB malloc and free every 0.5 ms. Prints the rounds done, the small
allocation's median, p99 and max, each trim's median and max, and the p99 ratio
(trim / none). Linux with glibc only.
"""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path

_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.malloc_trim.argtypes, _LIBC.malloc.argtypes, _LIBC.free.argtypes = [ctypes.c_size_t], [ctypes.c_size_t], [ctypes.c_void_p]
_LIBC.malloc.restype = ctypes.c_void_p


def _run(trim: bool, workers: int, seconds: float) -> float:
    """The small allocation's p99 (ms) while ``workers`` threads decode, trimming or not."""
    stop, trims, rounds = threading.Event(), [], []

    def decode_loop() -> None:
        while not stop.is_set():
            buffers = [np.ones(64 * 1024 * 1024 // 8)] + [np.ones(300_000) for _ in range(20)]
            buffers.clear()
            rounds.append(1)
            if trim:
                started = time.perf_counter()
                _LIBC.malloc_trim(0)
                trims.append(time.perf_counter() - started)

    threads = [threading.Thread(target=decode_loop) for _ in range(workers)]
    for thread in threads:
        thread.start()
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        _LIBC.free(_LIBC.malloc(4096))
        latencies.append(time.perf_counter() - started)
        time.sleep(0.0005)
    stop.set()
    for thread in threads:
        thread.join()
    ms = np.array(latencies) * 1e3
    line = f"trim={trim!s:5} {len(rounds)} decode rounds; small malloc median {np.median(ms):.4f} ms, p99 {np.percentile(ms, 99):.4f} ms, max {ms.max():.2f} ms"
    if trims:
        line += f"; {len(trims)} trims, median {np.median(trims) * 1e3:.2f} ms, max {max(trims) * 1e3:.2f} ms"
    print(line)
    return float(np.percentile(ms, 99))


def main() -> None:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--workers", type=positive_int, default=4, help="threads decoding at once")
    parser.add_argument("--seconds", type=positive_int, default=3, help="how long each run lasts")
    args = parser.parse_args()
    with_trim = _run(True, args.workers, args.seconds)
    without = _run(False, args.workers, args.seconds)
    print(f"p99 ratio (trim / none): {with_trim / without:.2f}")


if __name__ == "__main__":
    main()
