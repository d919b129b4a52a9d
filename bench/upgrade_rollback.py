"""Upgrade and rollback of one data dir between two releases, with real servers.

    python bench/upgrade_rollback.py OLD_PYTHON [--new-python NEW_PYTHON] [--dir DIR]

OLD_PYTHON and NEW_PYTHON (default: this one) are Pythons, or scripts that run one in
an environment, with the release to roll back to (old) and the one to upgrade to (new).
Each serves the shapes world on one data dir in turn: old writes it (sample sets that
share images, appends, an upload left unfinished, evaluations, a ranking, two head
edits, one promoted, deletes); new opens it and writes more; old opens it again (the
rollback), writes, and is killed with an operation running; new opens it twice more.
New serves named callers (a callers file: alice, bob, and root, its admin), which own
the sets, operations and head versions they write; old, whose config has no
callers_file (its loader refuses keys it does not know), serves one token. Old deletes
some owned objects and writes unowned ones; new deletes an old object as another caller.
After each start, through this SDK: every set's sample count and per-class counts
against a recount of its samples, its ListSamples pages (images and labels) against
what was uploaded, ListOperations pages and its kind and state filters, every
operation's artifacts, the head versions and the served one, unfinished uploads gone,
and (new) each object's owner, and that another caller's append or delete of an owned
object is PERMISSION_DENIED; in the data dir, that every stored file a record
references is there, that the start-up sweep kept none nothing references, that the
database's per-class counts (where a release keeps them) match its samples, and that
its owner tables (once new has made them) hold a row for each owned object and none
else (none of a deleted one). Prints each phase; exits 1 at the first difference.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np

from explaind.client import Client, NotFoundError, Operation, PermissionDeniedError
from explaind.client._images import iter_image_messages, open_image
from explaind.v1 import operations_pb2, sample_sets_pb2

from _cli import bench_parser  # bench/, the script's directory, is on sys.path
from predict import free_port

PAGE = 37  # samples per ListSamples page: pages that end inside a set and across appends
CALLERS = ("alice", "bob", "root")  # new's named callers; the first checks, the last is its admin
ADMIN = CALLERS[-1]


class Mismatch(AssertionError):
    """What a release served differs from what was written."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Mismatch(what)


class World:
    """What the data dir should hold: each set's samples (pixel digest, label), the
    operations (name -> kind), the head versions and the served one, and the owner of
    each owned object."""

    def __init__(self) -> None:
        # Here, once the arguments are parsed: --help and a usage error answer without the seconds of torch.
        from explaind.world.scenarios import get_scenario

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
        self.owners: dict[tuple[str, str], str] = {}  # ("set" | "operation" | "version", id) -> its named caller
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

    def made(self, kind: str, key: str, caller: Caller) -> None:
        """``caller`` made the object (a set's id again: a new set, unowned when old made it)."""
        if caller.name:
            self.owners[kind, key] = caller.name
        else:
            self.owners.pop((kind, key), None)

    def owner(self, kind: str, key: str) -> str:
        return self.owners.get((kind, key), "")


class Caller(NamedTuple):
    """A client that calls as one caller; ``name`` "" where its release has no named
    callers (what it writes has no owner)."""
    name: str
    client: Client


@dataclass(frozen=True)
class Release:
    """A release as a phase serves it: its Python, its ``serve`` flags for auth, and the
    token each of CALLERS calls with (old: the same one for all)."""
    python: str
    flags: tuple[str, ...]
    tokens: dict[str, str]
    named: bool  # whether its callers are named, so own what they write

    @classmethod
    def with_callers(cls, python: str, root: Path) -> Release:
        """[server].callers_file with CALLERS, and ADMIN as its admin: a config file (admins
        is no ``serve`` flag), so the world's classifier without CLIP and text-to-image,
        which no phase uses."""
        tokens = {name: f"{name}-{hashlib.sha256(name.encode()).hexdigest()[:24]}" for name in CALLERS}
        callers = root / "callers"
        callers.write_text("".join(f"{name} {token}\n" for name, token in tokens.items()))
        config = root / "named-callers.toml"
        config.write_text(f'[server]\ncallers_file = "{callers}"\nadmins = ["{ADMIN}"]\n')
        return cls(python, ("--config", str(config)), tokens, named=True)

    @classmethod
    def with_one_token(cls, python: str, root: Path) -> Release:
        """One token for every caller, as ``serve --token-file``: a release before named
        callers refuses a config with callers_file (an unknown key)."""
        token_file = root / "token"
        token_file.write_text("one-token-for-every-caller\n")
        return cls(python, ("--token-file", str(token_file)), dict.fromkeys(CALLERS, "one-token-for-every-caller"), named=False)


def pixel_digest(image: object) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes()).hexdigest()


class Server:
    """``explaind serve`` of one release on ``data_dir`` (the shapes world's classifier),
    with a client for each of CALLERS; ``client``, the first's, checks."""

    def __init__(self, release: Release, data_dir: Path, log_path: Path) -> None:
        self.release, self.data_dir, self.log_path = release, data_dir, log_path

    def __enter__(self) -> Server:
        self.port = free_port()
        command = [self.release.python, "-m", "explaind", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--data-dir", str(self.data_dir), *self.release.flags]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.clients = {name: Client(f"127.0.0.1:{self.port}", timeout=120, token=token) for name, token in self.release.tokens.items()}
        self.client = self.clients[CALLERS[0]]
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                self.client.wait_until_ready(timeout=1.0)
                return self
            except TimeoutError:
                expect(time.monotonic() < deadline, "server not ready in 180 s")

    def caller(self, name: str) -> Caller:
        return Caller(name if self.release.named else "", self.clients[name])

    def __exit__(self, *_: object) -> None:
        for client in self.clients.values():
            client.close()
        if self.process.poll() is None:
            self.process.terminate()
            expect(self.process.wait(timeout=60) == 0, f"server exited with {self.process.returncode}")

    def kill(self) -> None:
        """SIGKILL: nothing of its shutdown runs (its running jobs stay running in the store)."""
        self.process.kill()
        self.process.wait()


# Writes -------------------------------------------------------------------------------

def create(caller: Caller, world: World, set_id: str, count: int, *, shared_from: str = "") -> None:
    """A set of ``count`` new images; ``shared_from``: the first half are that set's images
    too (files two sets reference)."""
    images, labels = world.draw(count)
    if shared_from:
        half = count // 2
        images[:half], labels[:half] = world.halves[shared_from]
    world.halves[set_id] = (images[: count // 2], labels[: count // 2])
    caller.client.create_sample_set(images, labels, sample_set_id=set_id, chunk_size=64)
    world.stored(set_id, images, labels)
    world.made("set", set_id, caller)


def append(caller: Caller, world: World, set_id: str, count: int) -> None:
    images, labels = world.draw(count)
    caller.client.append_samples(set_id, images, labels, chunk_size=50)
    world.stored(set_id, images, labels)


def leave_unfinished(caller: Caller, world: World, set_id: str) -> None:
    """An upload whose first request says more follows, never continued: the next start
    deletes it (and its owner's row)."""
    images, labels = world.draw(20)
    samples = [sample_sets_pb2.Sample(image=message, label=label) for message, label in zip(iter_image_messages(images), labels)]
    request = sample_sets_pb2.CreateSampleSetRequest(sample_set_id=set_id, samples=samples, upload_continues=True)
    expect(caller.client._call("sample_sets", "CreateSampleSet", request).sample_set.uploading, f"{set_id} uploading")


def delete_set(caller: Caller, world: World, set_id: str) -> None:
    caller.client.delete_sample_set(set_id)
    del world.sets[set_id]
    world.owners.pop(("set", set_id), None)


def run(caller: Caller, world: World, operation: Operation, *, kind: str) -> Operation:
    done = operation.wait(timeout=600)
    expect(done.state == "succeeded", f"{kind} {done.name}: {done.state} {done.error}")
    world.operations[done.name] = done.kind
    world.made("operation", done.name, caller)
    return done


def evaluate(caller: Caller, world: World, set_id: str) -> str:
    return run(caller, world, caller.client.evaluate_sample_set(set_id), kind="evaluate").name


def rank(caller: Caller, world: World, set_id: str) -> str:
    before = {op.name for op in caller.client.operations(limit=1000)}
    caller.client.rank_mistake_neurons(set_id, 0, execution="operation", max_iterations=20)
    (name,) = {op.name for op in caller.client.operations(limit=1000)} - before
    world.operations[name] = caller.client.operation(name).kind
    world.made("operation", name, caller)
    return name


def edit(caller: Caller, world: World, set_id: str, *, promote: bool) -> tuple[str, str]:
    """(operation name, head version id) of an edit of the head."""
    done = run(caller, world, caller.client.edit_head(set_id, 0, [1, 2], max_epochs=1, promote=promote), kind="edit")
    version = done.result().version.version_id
    world.versions.append(version)
    world.made("version", version, caller)
    if promote:
        world.active = version
    return done.name, version


def delete_operation(caller: Caller, world: World, name: str) -> None:
    caller.client.delete_operation(name)
    del world.operations[name]
    world.deleted_operations.append(name)
    world.owners.pop(("operation", name), None)


def delete_version(caller: Caller, world: World, version: str) -> None:
    caller.client.delete_head_version(version)
    world.versions.remove(version)
    world.owners.pop(("version", version), None)


# Checks -------------------------------------------------------------------------------

def check(server: Server, world: World, data_dir: Path, phase: str) -> None:
    client, named = server.client, server.release.named
    # A release that knows owners (it filters lists by them) shows them while it serves one token.
    shows_owners = named or "list_owner_filter" in client.model_metadata().capabilities

    def owner(kind: str, key: str) -> str:
        """The owner ``key`` should show: none where a release before owners serves it."""
        return world.owner(kind, key) if shows_owners else ""

    sets = {s.sample_set_id: s for s in client.sample_sets()}
    expect(set(sets) == set(world.sets), f"{phase}: sets {sorted(sets)} != {sorted(world.sets)}")
    for set_id, expected in world.sets.items():
        served = sets[set_id]
        expect(not served.uploading, f"{phase}: {set_id} uploading")
        expect(served.owner == owner("set", set_id), f"{phase}: {set_id} owner {served.owner!r} != {owner('set', set_id)!r}")
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
        expect(operation.owner == owner("operation", name), f"{phase}: {name} owner {operation.owner!r} != {owner('operation', name)!r}")
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
    shown = {v.version_id: v.owner for v in versions if v.version_id in world.versions}
    expect(shown == {v: owner("version", v) for v in world.versions}, f"{phase}: head version owners {shown}")
    active = [v.version_id for v in versions if v.active]
    world.active = world.active or active[0]  # the model file's head, until an edit is promoted
    expect(active == [world.active], f"{phase}: active head {active} != {world.active}")
    client.predict(world.images[:4])
    check_files(data_dir, phase, swept=True)
    check_owner_rows(data_dir, world, phase)
    if named:
        check_refusals(server, world, phase)


def check_refusals(server: Server, world: World, phase: str) -> None:
    """Another caller (not an admin) may not append to or delete any owned set, nor delete
    any owned operation or head version: each is PERMISSION_DENIED, and changes nothing."""
    changes: dict[str, Callable[[Client, str], object]] = {
        "set": lambda client, key: client.append_samples(key, world.images[:1], world.labels[:1]),
        "operation": Client.delete_operation, "version": Client.delete_head_version}
    for (kind, key), owner in world.owners.items():
        other = next(name for name in CALLERS if name not in (owner, ADMIN))
        refused(lambda: changes[kind](server.clients[other], key), f"{phase}: {other} changing {owner}'s {kind} {key}")
        if kind == "set":
            refused(lambda: server.clients[other].delete_sample_set(key), f"{phase}: {other} deleting {owner}'s set {key}")


def refused(change: Callable[[], object], what: str) -> None:
    try:
        change()
    except PermissionDeniedError:
        return
    raise Mismatch(f"{what}: not refused (PERMISSION_DENIED)")


def check_owner_rows(data_dir: Path, world: World, phase: str) -> None:
    """The owner tables (where new has made them) hold a row for each owned object, with
    its owner (and a set's or operation's create_time, which its owner listing is ordered
    by), and none else: none of an object deleted (by either release), none orphaned (an
    unfinished upload's row goes with it at the next start)."""
    tables = {  # kind: (owner table, its object's id, the objects' table, the object of a row)
        "set": ("sample_set_owners", "set_id", "sample_sets", "x.id = o.set_id"),
        "operation": ("job_owners", "job_id", "jobs", "x.id = o.job_id"),
        "version": ("head_version_owners", "version_id", "head_versions",
                    "x.feature_version = o.feature_version AND x.version_id = o.version_id")}
    with sqlite3.connect(f"file:{data_dir / 'explaind.sqlite3'}?mode=ro", uri=True) as db:
        present = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for kind, (table, column, objects, match) in tables.items():
            if table not in present:
                expect(not world.owners, f"{phase}: owned objects without the table {table}")
                continue
            orphans = db.execute(f"SELECT {column} FROM {table} AS o WHERE NOT EXISTS (SELECT 1 FROM {objects} AS x WHERE {match})").fetchall()
            expect(not orphans, f"{phase}: {table} has row(s) of deleted objects: {orphans}")
            if kind != "version":
                drifted = db.execute(f"SELECT {column} FROM {table} AS o JOIN {objects} AS x ON {match} WHERE o.create_time IS NOT x.create_time").fetchall()
                expect(not drifted, f"{phase}: {table} row(s) whose create_time is not their object's: {drifted}")
            rows = dict(db.execute(f"SELECT {column}, owner FROM {table} WHERE {column} NOT IN (SELECT id FROM uploading_sets)").fetchall())
            # Operation names are operations/<job id>.
            written = {k.removeprefix("operations/"): owner for (which, k), owner in world.owners.items() if which == kind}
            expect(rows == written, f"{phase}: {table} {rows} != {written}")


def check_after_writes(client: Client, world: World, name: str) -> None:
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

def scenario(old: Release, new: Release, data_dir: Path) -> None:
    world = World()
    log = data_dir.parent / "servers.log"
    later: dict[str, str] = {}  # what a later phase deletes: its operation name or version id

    def phase(name: str, release: Release, writes: Callable[[Server], None]) -> None:
        started = time.monotonic()
        with Server(release, data_dir, log) as server:
            check(server, world, data_dir, f"{name}, at start")
            writes(server)
            if server.process.poll() is None:  # not killed by its writes (which checked before)
                check_after_writes(server.client, world, name)
        check_files(data_dir, f"{name}, stopped", swept=False)
        check_owner_rows(data_dir, world, f"{name}, stopped")
        print(f"{name}: ok ({len(world.sets)} sets, {sum(map(len, world.sets.values()))} samples, "
              f"{len(world.operations)} operations, {len(world.owners)} owned, {time.monotonic() - started:.0f} s)", flush=True)

    def old_writes(server: Server) -> None:
        alice, bob, _ = (server.caller(name) for name in CALLERS)  # one token: nothing they write is owned
        create(alice, world, "a", 150)
        create(bob, world, "b", 120, shared_from="a")
        create(alice, world, "doomed", 60, shared_from="b")
        append(alice, world, "a", 61)
        append(bob, world, "b", 40)
        leave_unfinished(alice, world, "unfinished-1")
        evaluate(alice, world, "a")
        doomed_evaluation = evaluate(bob, world, "doomed")
        rank(alice, world, "a")
        edit(alice, world, "a", promote=True)
        edit(bob, world, "b", promote=False)
        delete_set(bob, world, "doomed")
        delete_operation(alice, world, doomed_evaluation)

    def new_writes(server: Server) -> None:
        alice, bob, root = (server.caller(name) for name in CALLERS)
        append(alice, world, "a", 33)  # old's set: open to every caller
        create(alice, world, "c", 90, shared_from="a")
        leave_unfinished(alice, world, "unfinished-2")  # old's start deletes it, and (cascading) its owner's row
        evaluate(alice, world, "c")
        edit(alice, world, "c", promote=False)
        create(bob, world, "e", 40, shared_from="c")
        later["bob's evaluation"] = evaluate(bob, world, "e")
        later["bob's version"] = edit(bob, world, "e", promote=False)[1]
        later["bob's ranking"] = rank(bob, world, "b")
        edit_name, _ = edit(root, world, "c", promote=True)  # only an admin may promote
        delete_operation(root, world, edit_name)  # its head version (root's) stays
        delete_set(bob, world, "b")  # old's set: open to every caller

    def rollback_writes(server: Server) -> None:
        alice, bob, _ = (server.caller(name) for name in CALLERS)
        append(alice, world, "c", 45)
        append(bob, world, "a", 7)
        create(alice, world, "d", 80, shared_from="c")
        leave_unfinished(alice, world, "unfinished-3")
        later["old's evaluation"] = evaluate(bob, world, "d")
        delete_operation(alice, world, next(name for name, kind in world.operations.items() if kind != "edit_head"))
        delete_set(alice, world, "a")
        create(alice, world, "a", 30)  # its id again: a set with none of the old one's samples or counts
        delete_set(alice, world, "e")  # bob's, with its owner's row (cascading)
        create(alice, world, "e", 25)  # its id again: a set of no one's, not bob's
        delete_operation(alice, world, later["bob's evaluation"])
        delete_version(alice, world, later["bob's version"])
        check_after_writes(alice.client, world, "old opens it again (rollback)")
        running = alice.client.visualize_neurons([3], steps=10_000)
        while running.refresh().state != "running":
            time.sleep(0.05)
        server.kill()
        world.operations[running.name] = running.kind
        world.aborted.add(running.name)

    def final_writes(server: Server) -> None:
        alice, bob, root = (server.caller(name) for name in CALLERS)
        append(bob, world, "d", 19)  # old's set: open to every caller
        delete_operation(alice, world, later["old's evaluation"])  # bob's in old, where it has no owner: open
        delete_operation(root, world, later["bob's ranking"])  # an admin's change of bob's
        create(alice, world, "f", 30, shared_from="d")
        evaluate(bob, world, "f")

    phase("old writes a new data dir", old, old_writes)
    phase("new opens it (upgrade)", new, new_writes)
    phase("old opens it again (rollback)", old, rollback_writes)
    phase("new opens it again", new, final_writes)
    with Server(new, data_dir, log) as server:  # the last writes, and the sweep of the sets deleted by old
        check(server, world, data_dir, "new, restarted")
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
        scenario(Release.with_one_token(args.old_python, root), Release.with_callers(args.new_python, root), root / "data")
    except Mismatch as error:
        sys.exit(f"MISMATCH: {error}")


if __name__ == "__main__":
    main()
