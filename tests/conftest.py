"""Shared fixtures: a world classifier, and real explaind servers in subprocesses.

The classifier is the shipped ``assets/classifiers/balanced``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from explaind.client.cli import _bindable_port, _ports_below_the_ephemeral_range
from explaind.world import assets

# A torchvision VisionTransformer on 32 px images: a class token, then 4 x 4 patch tokens
# of width 16; `[classifier]` keys for the factory loader, and the constructor's arguments.
TINY_VIT_KWARGS = {"image_size": 32, "patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32, "num_classes": 3}
TINY_VIT_CLASSIFIER = {"loader": "factory", "factory": "torchvision.models.vision_transformer:VisionTransformer",
                       "factory_kwargs": TINY_VIT_KWARGS, "feature_layer": "encoder", "head": "heads.head", "image_size": 32}


class DividesByMean(torch.nn.Module):
    """A tiny classifier whose features are divided by the image's mean brightness: on a
    black image they are infinite (and its logits NaN), as a model's that overflows
    float16 would be; finite on any other."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x) / x.mean(dim=(1, 2, 3)).unsqueeze(1))


def divides_by_mean() -> DividesByMean:
    """The same :class:`DividesByMean` at every call, the global random state left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DividesByMean().eval()


def on_the_decision_boundary(count: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    """A 2-class head (512 features) and ``count`` feature rows each on its decision boundary,
    the two logits equal but for rounding: which class a row gets depends on how its
    product is computed (F.linear or @ and +, of few rows or many). The global random
    state is left as it was."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        head = torch.nn.Linear(512, 2)
        head.bias.copy_(torch.tensor([0.3, -0.2]))
        across = head.weight[0] - head.weight[1]
        features = torch.randn(count, 512)
        features -= ((features @ across + 0.5) / across.dot(across))[:, None] * across
    return head, features


# `[classifier]` keys serving divides_by_mean on 16 px images of classes a, b and c.
DIVIDES_BY_MEAN_CLASSIFIER = {"loader": "factory", "path": "", "factory": "conftest:divides_by_mean", "feature_layer": "body.0", "head": "fc",
                              "image_size": 16, "class_names": ("a", "b", "c")}


@pytest.fixture(autouse=True)
def _seeded_global_random_state() -> None:
    """Each test starts from the same global random state (torch, numpy, random): torch
    seeds its generator differently in every process, so tests drawing inputs from it
    (``torch.rand``) ran on other inputs at every run, and on inputs that depended on
    the tests that ran before them."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def _logging_left_as_found() -> Iterator[None]:
    """``explaind serve`` or ``demo`` run in-process set the process's log levels (our INFO
    lines; pytest's handlers keep basicConfig from adding its own): undone after each test,
    so what a later test's caplog holds does not depend on the tests that ran before it."""
    root, ours = logging.getLogger(), logging.getLogger("explaind")
    root_level, our_level = root.level, ours.level
    yield
    root.setLevel(root_level)
    ours.setLevel(our_level)


@contextlib.contextmanager
def torch_threads(count: int | None = None) -> Iterator[None]:
    """Run the block on ``count`` torch threads (None: as they are; code under test may
    change them process-wide), then give the process back the count it had."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def default_device_meta() -> Iterator[None]:
    """Run the block with torch's default device "meta": a tensor the code under test makes
    without ``device=`` is then a meta tensor, and meeting the CPU inputs fails at once, as
    a CPU tensor beside a model on a GPU fails there, which CPU-only tests cannot see."""
    with torch.device("meta"):
        yield


def limit_details(status) -> tuple[str, dict[str, str], list[tuple[str, str]]]:
    """The ErrorInfo reason and metadata, and the QuotaFailure's (subject, description), of a
    ``google.rpc.Status`` refusing a limit: a server ExplaindError's (``convert.error_status``),
    a call's (its grpc-status-details-bin), or an operation's error. One ErrorInfo at most
    (AIP-193), asserted."""
    from google.rpc import error_details_pb2

    infos, violations = [], []
    for detail in status.details:
        info, failure = error_details_pb2.ErrorInfo(), error_details_pb2.QuotaFailure()
        if detail.Unpack(info):
            infos.append(info)
        elif detail.Unpack(failure):
            violations += [(v.subject, v.description) for v in failure.violations]
    (info,) = infos
    assert info.domain == "explaind.v1"
    return info.reason, dict(info.metadata), violations


def trailing_status(metadata):
    """The ``google.rpc.Status`` in a call's (or an _AbortingContext's) trailing metadata."""
    from google.rpc import status_pb2

    return status_pb2.Status.FromString(dict(metadata)["grpc-status-details-bin"])


@contextlib.contextmanager
def json_log_lines(logger: str) -> Iterator[list[dict]]:
    """The INFO and higher lines ``logger`` logs while the block runs, each as the object
    of its line in ``log_format = "json"``; formatted in the thread that logs, where its
    call's or operation's span is current."""
    from explaind.logs import JsonFormatter

    lines: list[dict] = []

    class Formatted(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(JsonFormatter().format(record)))

    log, handler = logging.getLogger(logger), Formatted()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def core_share() -> int:
    """Cores this test process may fill with torch threads: its share of ``cores()`` when
    pytest-xdist runs several test processes. Why: torch threads beyond the cores left to
    them spin and wait; two threads beside a busy test process ran the shipped
    text-to-image evaluation in 210 s against 79 s on one (2 cores, 2026-12-03)."""
    return max(1, cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def vm_steps(store, call: Callable[[], object]) -> int:
    """The SQLite virtual-machine steps ``call`` costs ``store`` (a SQLiteStore): they grow
    with the rows its queries read, however fast the machine."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    store._db.set_progress_handler(count, 1)
    try:
        call()
    finally:
        store._db.set_progress_handler(None, 1)
    return steps


def until_running(operation, limit_s: float = 60.0) -> None:
    """Wait for a worker to take ``operation`` (an SDK Operation) that a test acts on while it
    runs. One that ended first (a machine fast enough to finish it) fails at once, and one no
    worker took within ``limit_s`` then, naming its state: polling for "running" waited out
    the test's timeout (600 s) on either."""
    deadline = time.monotonic() + limit_s
    while operation.refresh().state != "running":
        assert not operation.done, f"{operation.name} ended ({operation.state}) before the test could act on it running"
        assert time.monotonic() < deadline, f"{operation.name} was still {operation.state} after {limit_s:g} s: no worker took it"
        time.sleep(0.05)


class StoppedClock:
    """Stands in for a module's ``time`` (``monkeypatch.setattr(module, "time", clock)``):
    ``monotonic()`` and ``time_ns()`` stand still until ``advance(seconds)`` moves both, so
    a test steps through intervals without sleeping. The wall clock starts at the real one:
    the files a test writes carry real times."""

    def __init__(self) -> None:
        self.monotonic_s, self.wall_ns = 1000.0, time.time_ns()

    def monotonic(self) -> float:
        return self.monotonic_s

    def time_ns(self) -> int:
        return self.wall_ns

    def advance(self, seconds: float) -> None:
        self.monotonic_s += seconds
        self.wall_ns += round(seconds * 1e9)


@pytest.fixture
def auth_clock(monkeypatch: pytest.MonkeyPatch) -> StoppedClock:
    """A :class:`StoppedClock` standing in for ``explaind.service.auth``'s time."""
    from explaind.service import auth

    clock = StoppedClock()
    monkeypatch.setattr(auth, "time", clock)
    return clock


@contextlib.contextmanager
def stderr_nobody_reads() -> Iterator[None]:
    """sys.stderr, within, a pipe whose reader has gone (`explaind report 2>&1 | head -1`):
    each line written to it fails with BrokenPipeError, until the CLI points its descriptor
    elsewhere. (Entered in the test itself: pytest's capture sets sys.stderr again as the
    test's call begins, over a fixture's.)"""
    reader, writer = os.pipe()
    os.close(reader)
    stream = open(writer, "w", buffering=1)  # line-buffered: a line fails as it is printed
    before, sys.stderr = sys.stderr, stream
    try:
        yield
    finally:
        sys.stderr = before
        with contextlib.suppress(OSError):
            stream.close()


def _candidate_ports() -> Iterator[int]:
    """This test process's ports for servers: below the kernel's ephemeral range, which a
    server's ``port=0`` or another probe never gets, a slice of their own per xdist worker,
    each offered once. Each process starts at its own place in its slice (by its pid): test
    runs side by side on one machine (two checkouts, an editor's run beside ``make test``)
    all began at the slice's first port, and a server of one could not bind the port
    another had just probed."""
    below = _ports_below_the_ephemeral_range()
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    slice_size = len(below) // 4
    first = below.start + (worker % 4) * slice_size
    start = first + os.getpid() % slice_size
    return itertools.chain(range(start, first + slice_size), range(first, start))


_candidates = _candidate_ports()


def free_port() -> int:
    """A port on 127.0.0.1 no other call in this test process has been given, bindable now."""
    if (port := _bindable_port(_candidates)) is None:
        raise RuntimeError("every candidate port of this test worker has been given out")
    return port


@pytest.fixture(scope="session")
def classifier_dir() -> Path:
    return assets.classifier_dir("balanced")


@pytest.fixture(scope="session")
def world_model(classifier_dir: Path) -> torch.nn.Module:
    from explaind.world.classifier import load_classifier

    return load_classifier(classifier_dir)


@pytest.fixture(scope="session")
def world_images() -> tuple[torch.Tensor, torch.Tensor]:
    """48 balanced test images (N, 3, 64, 64) in [0, 1] and their labels (N,)."""
    from explaind.world.scenarios import get_scenario

    batch = get_scenario("balanced").dataset("test", size=48).all()
    return batch.images, batch.labels


def write_config(path: Path, classifier_dir: Path, **sections: dict[str, object]) -> Path:
    """A TOML config serving ``classifier_dir``; ``sections`` add/override tables."""
    # A 1 MiB reserve, not the default 16: pytest keeps the data dirs of its last runs.
    tables: dict[str, dict[str, object]] = {"classifier": {"loader": "world", "path": str(classifier_dir)},
                                            "server": {"data_dir_reserve_bytes": 1 << 20}}
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{key} = {_toml(v)}" for key, v in value.items()) + "}"
    return str(value)


class StallingRelay:
    """A TCP relay to 127.0.0.1:``port`` (connect to ``target``) that ``stall()`` makes go
    silent both ways, every connection left open: a peer gone with no FIN or RST (its host
    down, a network partition), as SIGSTOP leaves one. ``drop_open_connections()`` silences
    only the connections open now and relays later ones: a NAT or load balancer that forgot
    an idle connection. ``connections`` counts those accepted; ``server_hung_up`` is set once
    the server closes a silenced connection; ``close()`` closes them all."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self.server_hung_up = threading.Event()
        self._stalled, self._closed = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._dropped: list[threading.Event] = []  # one per connection relayed: set, it is silent
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        with self._lock:
            self._stalled.set()
        self.drop_open_connections()

    def drop_open_connections(self) -> None:
        with self._lock:
            for dropped in self._dropped:
                dropped.set()

    def close(self) -> None:
        self._closed.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):  # a listener, or a connection its peer closed
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads in accept() and recv(); close() alone leaves them
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:  # closed
                return
            self._sockets.append(downstream)
            with self._lock:
                self.connections += 1
                if self._stalled.is_set():  # accepted, never answered
                    continue
                dropped = threading.Event()
                self._dropped.append(dropped)
            upstream = socket.create_connection(("127.0.0.1", self._port))
            self._sockets.append(upstream)
            for source, sink, from_server in ((downstream, upstream, False), (upstream, downstream, True)):
                threading.Thread(target=self._relay, args=(source, sink, dropped, from_server), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket, dropped: threading.Event, from_server: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
                if dropped.is_set():  # what comes now is never passed on
                    while data:  # until its sender closes its side
                        data = source.recv(65536)
                    if from_server and not self._closed.is_set():
                        self.server_hung_up.set()
                    return
                if not data:  # the peer closed its side
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
            except OSError:  # closed
                return


class ServerProcess:
    """``explaind serve`` in a subprocess on free loopback ports, with its log in ``log_path``."""

    def __init__(self, config: Path, data_dir: Path, log_path: Path) -> None:
        self.config, self.data_dir, self.log_path = config, data_dir, log_path
        self.process: subprocess.Popen | None = None
        self._stopping = False
        self.port = self.metrics_port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0, *, same_ports: bool = False) -> ServerProcess:
        """Start (or restart) the server, on new free ports unless ``same_ports``."""
        from explaind.client import Client

        if not (same_ports and self.port):
            self.port, self.metrics_port = free_port(), free_port()
        command = [sys.executable, "-m", "explaind.client.cli", "serve", "--config", str(self.config), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--metrics-port", str(self.metrics_port), "--data-dir", str(self.data_dir)]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._stopping = False
        log.close()
        with Client(self.target, timeout=5) as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
                try:
                    client.wait_until_ready(timeout=1.0)
                    return self
                except TimeoutError:
                    continue
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def begin_stop(self) -> None:
        """SIGTERM, once, without waiting: servers asked together exit together."""
        if self.process is not None and self.process.poll() is None and not self._stopping:
            self.process.send_signal(signal.SIGTERM)
            self._stopping = True

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.begin_stop()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory, classifier_dir: Path):
    """Start servers (stopped at module end): ``server_factory(**config_sections)``."""
    started: list[ServerProcess] = []

    def start(**sections: dict[str, object]) -> ServerProcess:
        root = tmp_path_factory.mktemp("server")
        config = write_config(root / "explaind.toml", classifier_dir, **sections)
        server = ServerProcess(config, root / "data", root / "server.log").start()
        started.append(server)
        return server

    yield start
    for server in started:  # each takes about a second to exit
        server.begin_stop()
    for server in started:
        server.stop()
