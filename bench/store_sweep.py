"""How long one sweep step's job-artifact check holds the store's lock, measured in one
run on this machine.

    python bench/store_sweep.py [--jobs 100000] [--repeats 5]

A sweep step checks 500 candidate blobs for references while every request waits on the
store's lock. Job artifacts are one of the references (with sample sets and head
versions; the step also deletes and commits): the store answers from its
``job_artifacts`` index; the reference reads every job's artifact list (JSON), as the
store did before the index. Prints both times and their ratio with ``--jobs`` stored
operations of two artifacts each, and the time to delete half of them by retention.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time

from explaind.store import ArtifactRef, JobRecord, SQLiteStore
from explaind.store.sqlite import _SWEEP_CHUNK

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path

_SCAN_EVERY_JOB = """SELECT json_extract(artifact.value, '$.digest') FROM jobs, json_each(jobs.artifacts) AS artifact
                     WHERE json_extract(artifact.value, '$.digest') IN ({marks})"""
_INDEXED = "SELECT digest FROM job_artifacts WHERE digest IN ({marks})"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _fill(store: SQLiteStore, jobs: int) -> None:
    """``jobs`` finished jobs with two artifacts each, written as the job manager does."""
    for start in range(0, jobs, 10_000):
        with store._transaction() as db:
            for i in range(start, min(jobs, start + 10_000)):
                artifacts = tuple(ArtifactRef(f"a{j}", "image/png", _digest(f"{i}/{j}"), 1) for j in range(2))
                job = JobRecord(f"job{i:08d}", "visualize_neurons", "succeeded", float(i), end_time=float(i), artifacts=artifacts)
                db.execute(f"INSERT INTO jobs VALUES ({', '.join('?' * 14)})", store._job_row(job))  # job_artifacts by trigger


def _median_seconds(store: SQLiteStore, query: str, chunk: list[str], repeats: int) -> float:
    marks = ", ".join("?" * len(chunk))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with store._lock:
            store._db.execute(query.format(marks=marks), chunk).fetchall()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--jobs", type=positive_int, default=100_000, help="finished operations stored")
    parser.add_argument("--repeats", type=positive_int, default=5, help="each time: the median of this many checks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        store = SQLiteStore(data_dir)
        _fill(store, args.jobs)
        # Half the candidates are some job's artifact, half are not.
        chunk = [_digest(f"{i}/0") for i in range(0, args.jobs, max(1, args.jobs // (_SWEEP_CHUNK // 2)))][: _SWEEP_CHUNK // 2]
        chunk += [_digest(f"unused {i}") for i in range(_SWEEP_CHUNK - len(chunk))]
        indexed = _median_seconds(store, _INDEXED, chunk, args.repeats)
        scanned = _median_seconds(store, _SCAN_EVERY_JOB, chunk, args.repeats)
        print(f"{args.jobs} operations, {len(chunk)} candidate blobs per sweep step (median of {args.repeats}):")
        print(f"  job_artifacts index  {indexed * 1e3:9.2f} ms")
        print(f"  scan every job       {scanned * 1e3:9.2f} ms   ({scanned / indexed:.0f}x the index)")
        started = time.perf_counter()
        deleted = store.delete_jobs_ended_before(args.jobs / 2)
        elapsed = time.perf_counter() - started
        holds = deleted // _SWEEP_CHUNK + 1  # the store stops after a chunk under _SWEEP_CHUNK, maybe an empty one
        print(f"retention: {deleted} operations deleted in {elapsed:.2f} s ({holds} lock holds, {elapsed / holds * 1e3:.1f} ms each)")
        store.close()


if __name__ == "__main__":
    main()
