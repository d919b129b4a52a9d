"""Upgrade and rollback of one data dir between two releases, with real servers.

    python bench/upgrade_rollback.py OLD_PYTHON [--new-python NEW_PYTHON] [--dir DIR]

OLD_PYTHON and NEW_PYTHON (default: this one) are Pythons, or scripts that run one in
an environment, with the release to roll back to (old) and the one to upgrade to (new).
Each serves the shapes world on one data dir in turn: old writes it (sample sets that
share images, appends, an upload left unfinished, evaluations, a ranking, two head
edits, one promoted, deletes); new opens it and writes more; old opens it again (the
rollback), writes, and is killed with an operation running; new opens it twice more.
After each start, through this SDK: every set's sample count and per-class counts
against a recount of its samples, its ListSamples pages (images and labels) against
what was uploaded, ListOperations pages and its kind and state filters, every
operation's artifacts, the head versions and the served one, unfinished uploads gone;
in the data dir, that every stored file a record references is there, that the start-up
sweep kept none nothing references, and that the database's per-class counts (where a
release keeps them) match its samples. Prints each phase; exits 1 at the first difference.
"""

from __future__ import annotations

import collections
import hashlib
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from explaind.client import Client, NotFoundError, Operation
from explaind.client._images import iter_image_messages, open_image
from explaind.v1 import operations_pb2, sample_sets_pb2
from explaind.world.scenarios import get_scenario

from _cli import bench_parser  # bench/, the script's directory, is on sys.path
from predict import free_port

PAGE = 37  # samples per ListSamples page: pages that end inside a set and across appends


class Mismatch(AssertionError):
    """What a release served differs from what was written."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Mismatch(what)


class World:
    """What the data dir should hold: each set's samples (pixel digest, label), the
    operations (name -> kind), the head versions and the served one."""

    def __init__(self) -> None:
        batch = get_scenario("balanced").dataset("test", size=400).all()
        self.images = list((batch.images.permute(0, 2, 3, 1) * 255).round().byte().numpy())
        self.labels = batch.labels.tolist()
        self.sets: dict[str, list[tuple[str, int]]] = {}
        self.operations: dict[str, str] = {}
        self.aborted: set[str] = set()  # running when their server was killed: FAILED (ABORTED) at the next start
        self.deleted_operations: list[str] = []
        self.versions: list[str] = []
        self.active = ""
        self.halves: dict[str, tuple[list[np.ndarray], list[int]]] = {}  # each set's first half, to share
        self._drawn = 0

    def draw(self, count: int) -> tuple[list[np.ndarray], list[int]]:
        """``count`` images and labels, each image made unique by a marked pixel (a new file)."""
        picked = [(self._drawn + i) % len(self.images) for i in range(count)]
        images = [self.images[i].copy() for i in picked]
        for offset, image in enumerate(images):
            number = self._drawn + offset
            image[0, 0] = (number % 256, number // 256 % 256, 7)
        self._drawn += count
        return images, [self.labels[i] for i in picked]

    def stored(self, set_id: str, images: list[np.ndarray], labels: list[int]) -> None:
        self.sets.setdefault(set_id, []).extend((pixel_digest(image), label) for image, label in zip(images, labels))


def pixel_digest(image: object) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes()).hexdigest()


class Server:
    """``explaind serve`` of one release on ``data_dir`` (the embedded shapes world)."""

    def __init__(self, python: str, data_dir: Path, log_path: Path) -> None:
        self.python, self.data_dir, self.log_path = python, data_dir, log_path

    def __enter__(self) -> Server:
        self.port = free_port()
        command = [self.python, "-m", "explaind", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.client = Client(f"127.0.0.1:{self.port}", timeout=120)
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                self.client.wait_until_ready(timeout=1.0)
                return self
            except TimeoutError:
                expect(time.monotonic() < deadline, "server not ready in 180 s")

    def __exit__(self, *_: object) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            expect(self.process.wait(timeout=60) == 0, f"server exited with {self.process.returncode}")

    def kill(self) -> None:
        """SIGKILL: nothing of its shutdown runs (its running jobs stay running in the store)."""
        self.process.kill()
        self.process.wait()


# Writes -------------------------------------------------------------------------------

def create(client: Client, world: World, set_id: str, count: int, *, shared_from: str = "") -> None:
    """A set of ``count`` new images; ``shared_from``: the first half are that set's images
    too (files two sets reference)."""
    images, labels = world.draw(count)
    if shared_from:
        half = count // 2
        images[:half], labels[:half] = world.halves[shared_from]
    world.halves[set_id] = (images[: count // 2], labels[: count // 2])
    client.create_sample_set(images, labels, sample_set_id=set_id, chunk_size=64)
    world.stored(set_id, images, labels)


def append(client: Client, world: World, set_id: str, count: int) -> None:
    images, labels = world.draw(count)
    client.append_samples(set_id, images, labels, chunk_size=50)
    world.stored(set_id, images, labels)


def leave_unfinished(client: Client, world: World, set_id: str) -> None:
    """An upload whose first request says more follows, never continued: the next start deletes it."""
    images, labels = world.draw(20)
    samples = [sample_sets_pb2.Sample(image=message, label=label) for message, label in zip(iter_image_messages(images), labels)]
    request = sample_sets_pb2.CreateSampleSetRequest(sample_set_id=set_id, samples=samples, upload_continues=True)
    expect(client._call("sample_sets", "CreateSampleSet", request).sample_set.uploading, f"{set_id} uploading")


def delete_set(client: Client, world: World, set_id: str) -> None:
    client.delete_sample_set(set_id)
    del world.sets[set_id]


def run(world: World, operation: Operation, *, kind: str) -> Operation:
    done = operation.wait(timeout=600)
    expect(done.state == "succeeded", f"{kind} {done.name}: {done.state} {done.error}")
    world.operations[done.name] = done.kind
    return done


def evaluate(client: Client, world: World, set_id: str) -> None:
    run(world, client.evaluate_sample_set(set_id), kind="evaluate")


def rank(client: Client, world: World, set_id: str) -> None:
    before = {op.name for op in client.operations(limit=1000)}
    client.rank_mistake_neurons(set_id, 0, execution="operation", max_iterations=20)
    (name,) = {op.name for op in client.operations(limit=1000)} - before
    world.operations[name] = client.operation(name).kind


def edit(client: Client, world: World, set_id: str, *, promote: bool) -> str:
    done = run(world, client.edit_head(set_id, 0, [1, 2], max_epochs=1, promote=promote), kind="edit")
    version = done.result().version.version_id
    world.versions.append(version)
    if promote:
        world.active = version
    return done.name


def delete_operation(client: Client, world: World, name: str) -> None:
    client.delete_operation(name)
    del world.operations[name]
    world.deleted_operations.append(name)


# Checks -------------------------------------------------------------------------------

def check(client: Client, world: World, data_dir: Path, phase: str) -> None:
    sets = {s.sample_set_id: s for s in client.sample_sets()}
    expect(set(sets) == set(world.sets), f"{phase}: sets {sorted(sets)} != {sorted(world.sets)}")
    for set_id, expected in world.sets.items():
        served = sets[set_id]
        expect(not served.uploading, f"{phase}: {set_id} uploading")
        pages = list_samples(client, set_id)
        expect([label for _, label in pages] == [label for _, label in expected], f"{phase}: {set_id} labels differ")
        expect(pages == expected, f"{phase}: {set_id} images differ")
        recount = dict(collections.Counter(label for _, label in pages))
        expect(served.sample_count == len(expected), f"{phase}: {set_id} sample_count {served.sample_count} != {len(expected)}")
        expect(served.class_counts == recount, f"{phase}: {set_id} class_counts {served.class_counts} != recount {recount}")
        expect(client.sample_set(set_id).class_counts == recount, f"{phase}: {set_id} GetSampleSet class_counts")
        start = len(expected) * 2 // 3
        tail = [(pixel_digest(s.image), s.label) for s in client.samples(set_id, start=start)]
        expect(tail == expected[start:], f"{phase}: {set_id} samples from {start} differ")
    listed = list_operations(client)
    expect(sorted(name for name, _, _ in listed) == sorted(world.operations), f"{phase}: operations {len(listed)} != {len(world.operations)}")
    expect(all(state == ("failed" if name in world.aborted else "succeeded") for name, _, state in listed), f"{phase}: operation states")
    for kind in set(world.operations.values()):
        by_kind = [name for name, _, _ in list_operations(client, kind=kind)]
        expect(by_kind == [name for name, k, _ in listed if k == kind], f"{phase}: ListOperations kind={kind}")
    succeeded = [name for name, _, _ in list_operations(client, state=operations_pb2.OPERATION_STATE_SUCCEEDED)]
    expect(succeeded == [name for name, _, _ in listed if name not in world.aborted], f"{phase}: ListOperations state=SUCCEEDED")
    failed = [name for name, _, _ in list_operations(client, state=operations_pb2.OPERATION_STATE_FAILED)]
    expect(failed == [name for name, _, _ in listed if name in world.aborted], f"{phase}: ListOperations state=FAILED")
    for name in world.aborted:
        error = client.operation(name).error
        expect(error is not None and error.code == grpc.StatusCode.ABORTED, f"{phase}: {name} failed with {error}")
    for name in world.operations:
        operation = client.operation(name)
        for artifact in operation.artifacts if name not in world.aborted else ():
            data = operation.artifact(artifact.name)
            expect(hashlib.sha256(data).hexdigest() == artifact.digest, f"{phase}: {name} artifact {artifact.name}")
    for name in world.deleted_operations:
        try:
            client.operation(name)
            raise Mismatch(f"{phase}: deleted operation {name} served")
        except NotFoundError:
            pass
    versions = client.head_versions()
    stored = [v.version_id for v in versions if v.version_id in world.versions]
    expect(stored == world.versions, f"{phase}: head versions {stored} != {world.versions}")
    active = [v.version_id for v in versions if v.active]
    world.active = world.active or active[0]  # the model file's head, until an edit is promoted
    expect(active == [world.active], f"{phase}: active head {active} != {world.active}")
    client.predict(world.images[:4])
    check_files(data_dir, phase, swept=True)


def check_after_writes(client: Client, world: World, data_dir: Path, name: str) -> None:
    sets = {s.sample_set_id: s for s in client.sample_sets()}
    for set_id, expected in world.sets.items():
        recount = dict(collections.Counter(label for _, label in expected))
        expect(sets[set_id].class_counts == recount, f"{name}, after its writes: {set_id} class_counts {sets[set_id].class_counts} != {recount}")
        expect(list_samples(client, set_id) == expected, f"{name}, after its writes: {set_id} samples differ")


def list_samples(client: Client, set_id: str) -> list[tuple[str, int]]:
    """Every sample of the set by ListSamples pages of PAGE: (pixel digest, label)."""
    found, token = [], ""
    while True:
        request = sample_sets_pb2.ListSamplesRequest(sample_set_id=set_id, page_size=PAGE, page_token=token)
        response = client._call("sample_sets", "ListSamples", request)
        found += [(pixel_digest(open_image(s.image.encoded)), s.label) for s in response.samples]
        token = response.next_page_token
        if not token:
            return found


def list_operations(client: Client, *, kind: str = "", state: int = 0) -> list[tuple[str, str, str]]:
    """Every operation by pages of 2, newest first: (name, kind, state name)."""
    found, token = [], ""
    while True:
        request = operations_pb2.ListOperationsRequest(kind=kind, state=state, page_size=2, page_token=token, view=operations_pb2.OPERATION_VIEW_BASIC)
        response = client._call("operations", "ListOperations", request)
        found += [(op.name, op.kind, op.state) for op in (Operation(client, message) for message in response.operations)]
        token = response.next_page_token
        if not token:
            return found


def check_files(data_dir: Path, phase: str, *, swept: bool) -> None:
    """Every file a record references is on disk; ``swept`` (after the start-up sweep, before
    a write): no file is there that nothing references. The database is sound, and its
    per-class counts match a recount of the samples."""
    on_disk = {path.name for path in (data_dir / "artifacts").rglob("*") if path.is_file() and len(path.name) == 64}
    with sqlite3.connect(f"file:{data_dir / 'explaind.sqlite3'}?mode=ro", uri=True) as db:
        held = {row[0] for row in db.execute(
            "SELECT digest FROM samples UNION SELECT weights_digest FROM head_versions WHERE weights_digest != ''")}
        artifacts = {row[0] for row in db.execute(
            "SELECT json_extract(artifact.value, '$.digest') FROM jobs, json_each(jobs.artifacts) AS artifact")}
        indexed = {row[0] for row in db.execute("SELECT digest FROM job_artifacts")}
        recount = set(db.execute("SELECT set_id, label, COUNT(*) FROM samples GROUP BY set_id, label"))
        expect(db.execute("PRAGMA integrity_check").fetchall() == [("ok",)] and not db.execute("PRAGMA foreign_key_check").fetchall(),
               f"{phase}: the database fails its integrity or foreign key check")
        kept = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sample_class_counts'").fetchone()  # by a release that keeps them
        counts = set(db.execute("SELECT set_id, label, count FROM sample_class_counts")) if kept else recount
    referenced = held | artifacts
    expect(referenced <= on_disk, f"{phase}: {len(referenced - on_disk)} referenced file(s) missing")
    expect(artifacts <= indexed, f"{phase}: {len(artifacts - indexed)} artifact file(s) of jobs not in job_artifacts")
    expect(counts == recount, f"{phase}: sample_class_counts {sorted(counts - recount)} != recount {sorted(recount - counts)}")
    if swept:
        expect(on_disk <= held | indexed, f"{phase}: {len(on_disk - held - indexed)} unreferenced file(s) kept")


# The scenario -------------------------------------------------------------------------

def scenario(old: str, new: str, data_dir: Path) -> None:
    world = World()
    log = data_dir.parent / "servers.log"

    def phase(name: str, python: str, writes) -> None:
        started = time.monotonic()
        with Server(python, data_dir, log) as server:
            check(server.client, world, data_dir, f"{name}, at start")
            writes(server)
            if server.process.poll() is None:  # not killed by its writes (which checked before)
                check_after_writes(server.client, world, data_dir, name)
        check_files(data_dir, f"{name}, stopped", swept=False)
        print(f"{name}: ok ({len(world.sets)} sets, {sum(map(len, world.sets.values()))} samples, "
              f"{len(world.operations)} operations, {time.monotonic() - started:.0f} s)", flush=True)

    def old_writes(server: Server) -> None:
        client = server.client
        create(client, world, "a", 150)
        create(client, world, "b", 120, shared_from="a")
        create(client, world, "doomed", 60, shared_from="b")
        append(client, world, "a", 61)
        append(client, world, "b", 40)
        leave_unfinished(client, world, "unfinished-1")
        evaluate(client, world, "a")
        doomed_evaluation = run(world, client.evaluate_sample_set("doomed"), kind="evaluate").name
        rank(client, world, "a")
        edit(client, world, "a", promote=True)
        edit(client, world, "b", promote=False)
        delete_set(client, world, "doomed")
        delete_operation(client, world, doomed_evaluation)

    def new_writes(server: Server) -> None:
        client = server.client
        append(client, world, "a", 33)
        create(client, world, "c", 90, shared_from="a")
        leave_unfinished(client, world, "unfinished-2")
        evaluate(client, world, "c")
        rank(client, world, "b")
        edit_name = edit(client, world, "c", promote=True)
        delete_operation(client, world, edit_name)  # its head version stays
        delete_set(client, world, "b")

    def rollback_writes(server: Server) -> None:
        client = server.client
        append(client, world, "c", 45)
        append(client, world, "a", 7)
        create(client, world, "d", 80, shared_from="c")
        leave_unfinished(client, world, "unfinished-3")
        evaluate(client, world, "d")
        delete_operation(client, world, next(name for name, kind in world.operations.items() if kind != "edit_head"))
        delete_set(client, world, "a")
        create(client, world, "a", 30)  # its id again: a set with none of the old one's samples or counts
        check_after_writes(client, world, data_dir, "old opens it again (rollback)")
        running = client.visualize_neurons([3], steps=10_000)
        while running.refresh().state != "running":
            time.sleep(0.05)
        server.kill()
        world.operations[running.name] = running.kind
        world.aborted.add(running.name)

    def final_writes(server: Server) -> None:
        client = server.client
        append(client, world, "d", 19)

    phase("old writes a new data dir", old, old_writes)
    phase("new opens it (upgrade)", new, new_writes)
    phase("old opens it again (rollback)", old, rollback_writes)
    phase("new opens it again", new, final_writes)
    with Server(new, data_dir, log) as server:  # the last writes, and the sweep of the sets deleted by old
        check(server.client, world, data_dir, "new, restarted")
    print("all phases ok")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("old_python", help="a Python with the release to roll back to (or a script that runs one)")
    parser.add_argument("--new-python", default=sys.executable, help="a Python with the release to upgrade to")
    parser.add_argument("--dir", default="", help="an empty or new folder for the data dir and the servers' log (empty: a new temporary one)")
    args = parser.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="explaind-upgrade-"))
    root.mkdir(parents=True, exist_ok=True)
    for name, python in (("old", args.old_python), ("new", args.new_python)):
        source = subprocess.run([python, "-c", "import explaind; print(explaind.__file__)"], capture_output=True, text=True, check=True)
        print(f"{name}: {python} serves {source.stdout.strip()}")
    print(f"data dir {root / 'data'}, servers' log {root / 'servers.log'}", flush=True)
    try:
        scenario(args.old_python, args.new_python, root / "data")
    except Mismatch as error:
        sys.exit(f"MISMATCH: {error}")


if __name__ == "__main__":
    main()
