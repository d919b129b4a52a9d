"""Whether a server's resources grow with the requests it serves, measured in one run.

    python bench/soak.py [--cycles 300] [--every 100]

Starts ``explaind serve`` (the embedded defaults) on free ports in a fresh data dir and
runs ``--cycles`` cycles through the SDK, each: a client that connects and leaves,
Predict, a sample set of 20 new images created, evaluated, ranked inline, a 2-step
visualisation, a 1-epoch edit promoted, rolled back and deleted, an operation cancelled,
a Predict and a watch past their deadlines, three calls refused (INVALID_ARGUMENT), then
the set and the operations deleted. Every ``--every`` cycles it prints the server
process's resident memory, open files and threads, the data dir's files and bytes and the
store's rows; then their growth per 100 cycles after the first ``--every`` (which fill
thread pools and caches). Stored files lose their last reference in one sweep
([server] sweeps every minute), so a short run leaves the last minute's files.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from explaind.client import Client, DeadlineExceededError, InvalidArgumentError

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path
from predict import free_port

COLUMNS = ("rss_mib", "fds", "threads", "files", "data_mib", "rows")


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid`` (Linux)."""
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:")) / 1024


def _measure(pid: int, data_dir: Path) -> dict[str, float]:
    files = [path for path in data_dir.rglob("*") if path.is_file()]
    with sqlite3.connect(f"file:{data_dir / 'explaind.sqlite3'}?mode=ro", uri=True) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = sum(db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0] for name in tables)
    return {"rss_mib": rss_mib(pid), "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": len(os.listdir(f"/proc/{pid}/task")),
            "files": len(files), "data_mib": sum(path.stat().st_size for path in files) / 2**20, "rows": rows}


def _expect(call, error: type[Exception]) -> None:
    try:
        call()
    except error:
        return


def _cycle(client: Client, target: str, images: list, labels: list[int], number: int, visualize: str) -> None:
    with Client(target, timeout=30) as passing:
        passing.predict(images[0])
    client.predict(images[:4])
    fresh = [image.copy() for image in images[:20]]
    for index, image in enumerate(fresh):  # new images: their files and cached features are new too
        image[0, 0] = (number % 256, number // 256 % 256, index)
    set_id = f"soak-{number}"
    client.create_sample_set(fresh, labels[:20], sample_set_id=set_id)
    operations = [client.evaluate_sample_set(set_id).wait()]
    client.rank_mistake_neurons(set_id, labels[0], max_iterations=20, execution="inline")
    operations.append(client.visualize_neurons([3], method=visualize, steps=2).wait())
    edit = client.edit_head(set_id, labels[0], [1], max_epochs=1)
    version = edit.result().version.version_id
    client.promote_head_version(version)
    client.rollback_head_version()
    client.delete_head_version(version)
    long = client.visualize_neurons([5], method=visualize, steps=10_000)
    _expect(lambda: list(long.watch(timeout=0.2)), DeadlineExceededError)
    long.cancel().wait()
    _expect(lambda: client.predict(images[:1], timeout=0.0005), DeadlineExceededError)
    _expect(lambda: client.predict(images[:1], top_k=999), InvalidArgumentError)
    _expect(lambda: client.evaluate_sample_set("Not An Id"), InvalidArgumentError)
    _expect(lambda: client.edit_head(set_id, labels[0], [1, 1]), InvalidArgumentError)
    client.delete_sample_set(set_id)
    for operation in (*operations, edit, long):
        operation.delete()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--cycles", type=positive_int, default=300, help="request cycles to run")
    parser.add_argument("--every", type=positive_int, default=100, help="cycles between measurements")
    args = parser.parse_args()
    # After the arguments: --help and a usage error answer without the seconds of torch.
    from explaind.world.scenarios import get_scenario

    batch = get_scenario("balanced").dataset("test", size=20).all()
    images = list((batch.images.permute(0, 2, 3, 1) * 255).round().byte().numpy())
    labels = batch.labels.tolist()
    with tempfile.TemporaryDirectory() as root:
        data_dir, port, metrics_port = Path(root) / "data", free_port(), free_port()
        command = [sys.executable, "-m", "explaind", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--metrics-port", str(metrics_port), "--data-dir", str(data_dir)]
        with open(Path(root) / "server.log", "wb") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        target = f"127.0.0.1:{port}"
        try:
            with Client(target, timeout=60) as client:
                deadline = time.monotonic() + 300
                while True:
                    try:
                        client.wait_until_ready(timeout=2)
                        break
                    except TimeoutError:
                        if server.poll() is not None or time.monotonic() > deadline:
                            sys.exit(f"the server did not start:\n{(Path(root) / 'server.log').read_text()[-3000:]}")
                clip = client.model_metadata().components.get("clip")
                visualize = "clip_illusion" if clip is not None and clip.loaded else "no_clip"
                print(f"{'cycle':>6} {'seconds':>8} " + " ".join(f"{name:>9}" for name in COLUMNS))
                started, points = time.monotonic(), []
                for number in range(args.cycles + 1):
                    if number % args.every == 0 or number == args.cycles:
                        points.append((number, _measure(server.pid, data_dir)))
                        print(f"{number:>6} {time.monotonic() - started:>8.0f} " + " ".join(f"{points[-1][1][name]:>9.1f}" for name in COLUMNS), flush=True)
                    if number < args.cycles:
                        _cycle(client, target, images, labels, number, visualize)
        finally:
            server.terminate()
            server.wait(60)
    (first, before), (last, after) = points[1 if len(points) > 2 else 0], points[-1]
    growth = "  ".join(f"{name} {(after[name] - before[name]) * 100 / (last - first):+.2f}" for name in COLUMNS)
    print(f"growth per 100 cycles, cycles {first}-{last}: {growth}")


if __name__ == "__main__":
    main()
