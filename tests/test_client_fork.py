"""The SDK's clients across processes: used in forked workers, and pickled for spawned ones.

No torch here: a spawned worker imports this module to find its function.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2 as operations_lro
from google.protobuf import any_pb2

from conftest import StallingRelay
from explaind.client import AsyncClient, Client, ExplaindError, PlaintextTokenWarning, _operations
from explaind.client._operations import Operation
from explaind.v1 import operations_pb2

# Four 64 px images, whose top classes are compared across processes.
IMAGES = np.stack([np.full((64, 64, 3), shade, np.uint8) for shade in (0, 80, 160, 240)])
# Longest a forked child may take for its calls before it counts as hung, seconds.
CHILD_LIMIT_S = 30.0
# Longest a child forked amid a call may take to start running Python, seconds: gRPC's own
# fork handler hung 3 of 83 such children on a loaded machine (2026-12-08), before any of
# their code ran. Well under CHILD_LIMIT_S, so that a grandchild forked again once fits in
# its parent's limit (two more tries would not: a few in ten thousand at that rate).
START_LIMIT_S = 10.0
# A child that never started is forked again this many times in all before the test fails.
FORK_TRIES = 3


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory()


def _top_classes(client: Client) -> list[int]:
    return [prediction.class_indices[0] for prediction in client.predict(IMAGES, top_k=1)]


def _in_forked_child(work: Callable[[], object], *, amid_a_call: bool = False) -> str:
    """``repr(work())`` run in a child forked from this process, or ``"Type: message"`` of
    what it raised there; fails the test if the child does not end within CHILD_LIMIT_S.
    ``amid_a_call``: another thread is in a gRPC call, and a child that has not started
    its Python within START_LIMIT_S hangs in gRPC's fork handler, where no SDK code has run
    yet: it is killed and another forked, FORK_TRIES in all."""
    tries, start_limit_s = (FORK_TRIES, START_LIMIT_S) if amid_a_call else (1, CHILD_LIMIT_S)
    for _ in range(tries):
        answer = _answer_of_a_forked_child(work, start_limit_s)
        if answer is not None:
            return answer
    pytest.fail(f"{tries} forked child(ren) never reported starting within {start_limit_s:.0f}s: hung in a fork handler "
                "before running any Python, or died there")


def _answer_of_a_forked_child(work: Callable[[], object], start_limit_s: float) -> str | None:
    """What _in_forked_child returns, or None where the child did not start within
    ``start_limit_s`` (it is killed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave at once (no pytest teardown here)
        os.write(write, b"+")  # started: the fork handlers are done
        try:
            answer = repr(work())
        except BaseException as error:  # reported to the parent, whatever it is
            answer = f"{type(error).__name__}: {error}"
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb", buffering=0) as answer:
        started = bool(select.select([answer], [], [], start_limit_s)[0]) and answer.read(1) == b"+"
        deadline = time.monotonic() + CHILD_LIMIT_S
        while started and os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the forked child hung: no answer in {CHILD_LIMIT_S:.0f}s")
            time.sleep(0.01)
        if started:
            return answer.read().decode()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _wait_for_a_call_under_way() -> None:
    """Until another thread's call counts as under way: a fixed sleep raced a thread slow
    to start on a loaded machine, whose child was then forked with no call under way."""
    from explaind.client import _client

    deadline = time.monotonic() + CHILD_LIMIT_S
    while not _client._calls_under_way:
        assert time.monotonic() < deadline, f"no call under way after {CHILD_LIMIT_S:.0f}s"
        time.sleep(0.01)


def test_a_forked_child_calls_with_its_parents_client_and_the_parent_goes_on(server):
    # A pool's workers forked after the client was made and used (Linux's default start
    # method), or a web server's workers forked after loading the app.
    with Client(server.target, timeout=10) as client:
        expected = _top_classes(client)
        assert _in_forked_child(lambda: _top_classes(client)) == repr(expected)
        assert _in_forked_child(lambda: client.close()) == "None"  # the child's close leaves the parent's connection
        assert _top_classes(client) == expected


@pytest.mark.parametrize("under_way", ["call", "watch"])
def test_a_forked_child_of_a_process_with_a_call_under_way_refuses_its_calls_saying_why(server, under_way):
    # gRPC's C core skips its fork handlers while another thread is in a call, or reads
    # a stream: a child forked then hung in its calls (13 of 60), past their deadline. Now
    # every call there is refused at once, saying what to do.
    refusal = ("RuntimeError: this process was forked while another thread was in a call of an explaind Client, and gRPC "
               "cannot be used in it: start worker processes before calls begin in other threads, or with "
               "multiprocessing's 'spawn' or 'forkserver' start method (a Client pickles, so it can be passed to them)")
    relay = StallingRelay(server.port)
    # Its call must stay under way through four forked children on a loaded machine (10 s ran out there): the relay's close ends it.
    stalled = Client(relay.target, timeout=120, retry=False)
    ended: list[ExplaindError] = []
    with Client(server.target, timeout=10) as client:
        job = client.evaluate_sample_set(client.create_sample_set(IMAGES, [0, 1, 2, 3]).sample_set_id)
        operation = stalled.operation(job.name)  # connected through the relay, which then goes silent
        relay.stall()

        def wait_for_an_answer() -> None:
            try:
                stalled.health() if under_way == "call" else list(operation.watch())
            except ExplaindError as error:
                ended.append(error)

        waiting = threading.Thread(target=wait_for_an_answer)
        waiting.start()
        try:
            _wait_for_a_call_under_way()
            assert _in_forked_child(lambda: _top_classes(client), amid_a_call=True) == refusal
            assert _in_forked_child(lambda: list(job.watch()), amid_a_call=True) == refusal
            assert _in_forked_child(lambda: Client(server.target), amid_a_call=True) == refusal  # gRPC is not to be used there at all
            # nor in its children
            assert _in_forked_child(lambda: _in_forked_child(lambda: _top_classes(client), amid_a_call=True), amid_a_call=True) == repr(refusal)
        finally:
            relay.close()  # the waiting call ends UNAVAILABLE
            waiting.join()
            stalled.close()
        assert [error.code.name for error in ended] == ["UNAVAILABLE"]
        # No call under way now: a child forked now calls.
        assert _in_forked_child(lambda: _top_classes(client)) == repr(_top_classes(client))


def test_an_async_client_works_in_a_forked_child(server):
    # The thread pool copied into the child counted idle threads that were not there: the
    # child's first call waited for them forever.
    async def top_classes(client: AsyncClient) -> list[int]:
        return [prediction.class_indices[0] for prediction in await asyncio.wait_for(client.predict(IMAGES, top_k=1), CHILD_LIMIT_S / 2)]

    client = AsyncClient(server.target, timeout=10)
    expected = asyncio.run(top_classes(client))
    assert _in_forked_child(lambda: asyncio.run(top_classes(client))) == repr(expected)
    assert asyncio.run(top_classes(client)) == expected
    asyncio.run(client.close())


def test_an_async_client_closed_in_a_forked_child_leaves_its_parents_threads_alone(server):
    # The child's copy of its parent's pool has no threads there, and its lock stays held
    # if a parent thread held it at the fork: the child's close() waited forever.
    client = AsyncClient(server.target, timeout=10)
    classes = len(asyncio.run(client.model_metadata()).class_names)  # the parent's threads started
    with client._executor._shutdown_lock:  # as a parent thread submitting a call at the fork
        assert _in_forked_child(lambda: asyncio.run(client.close())) == "None"
    assert len(asyncio.run(client.model_metadata()).class_names) == classes  # the parent's threads still run
    asyncio.run(client.close())


def test_the_sdk_imports_and_calls_where_the_os_has_no_fork_handlers(server):
    # Windows has no os.register_at_fork: the SDK's import called it, and failed there
    # with AttributeError before an analyst's first call.
    script = ("import asyncio, os, sys\n"
              "del os.fork, os.register_at_fork  # as on Windows\n"
              "from explaind.client import AsyncClient, Client, cli, report\n"
              "with Client(sys.argv[1], timeout=10) as client:\n"
              "    print(len(client.model_metadata().class_names))\n"
              "async def classes():\n"
              "    async with AsyncClient(sys.argv[1], timeout=10) as client:\n"
              "        return len((await client.model_metadata()).class_names)\n"
              "print(asyncio.run(classes()))\n")
    done = subprocess.run([sys.executable, "-c", script, server.target], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    with Client(server.target, timeout=10) as client:
        classes = len(client.model_metadata().class_names)
    assert done.stdout.split() == [str(classes), str(classes)]


def test_a_client_pickles_as_its_arguments_into_a_new_client(server):
    # A spawn or forkserver pool pickles what it is given: a Client failed with gRPC's
    # "TypeError: no default __reduce__ due to non-trivial __cinit__".
    with Client(server.target, timeout=7, token="s3cret", retry=False) as client:
        copy = pickle.loads(pickle.dumps(client))
        assert copy is not client and copy._channel is not client._channel
        assert (copy.target, copy.timeout, copy._retry, copy._metadata) == (server.target, 7, False, (("authorization", "Bearer s3cret"),))
        assert _top_classes(copy) == _top_classes(client)
        copy.close()
        assert _top_classes(client)  # closing the copy leaves the original open
    # An error a pool's worker raises holds its operation, and so the client its with-block
    # closed: it reached the caller as "this Client ... is closed", not as the error it was.
    closed_copy = pickle.loads(pickle.dumps(client))
    assert closed_copy.target == server.target
    with pytest.raises(ValueError, match="this Client of .* is closed"):
        closed_copy.model_metadata()
    async_client = AsyncClient(server.target, timeout=7, max_workers=3)
    async_copy = pickle.loads(pickle.dumps(async_client))
    assert (async_copy.client.target, async_copy.client.timeout, async_copy._max_workers) == (server.target, 7, 3)
    assert len(asyncio.run(async_copy.model_metadata()).class_names) == 6
    asyncio.run(async_client.close())
    asyncio.run(async_copy.close())
    with pytest.raises(ValueError, match="this AsyncClient of .* is closed"):  # the class its user holds
        asyncio.run(pickle.loads(pickle.dumps(async_client)).model_metadata())


def test_a_spawned_worker_calls_with_a_client_it_was_given(server):
    with Client(server.target, timeout=10) as client, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_top_classes, client).result(timeout=60) == _top_classes(client)


class _RefusedWatch(grpc.RpcError):
    """A WatchOperation call a busy server refused (every thread for streams taken): it
    raises itself once read, as a gRPC stream that ended RESOURCE_EXHAUSTED."""

    def __iter__(self):
        raise self

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "no thread for another stream"

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def cancel(self) -> bool:
        return False


def test_a_watch_polling_a_busy_server_leaves_no_call_under_way_between_its_polls(server, monkeypatch):
    # A watch the server refused a stream polls GetOperation until the job ends (for up to
    # a day): its ended stream counted as a call under way all that time, so every process
    # forked meanwhile refused its calls.
    monkeypatch.setattr(_operations, "WATCH_POLL_INTERVAL_S", 0.01)
    polls = []

    def get_operation(request, **kwargs):
        polls.append(request.name)
        done = len(polls) == 2
        state = operations_pb2.OPERATION_STATE_SUCCEEDED if done else operations_pb2.OPERATION_STATE_RUNNING
        metadata = any_pb2.Any()
        metadata.Pack(operations_pb2.OperationMetadata(state=state))
        return operations_pb2.GetOperationResponse(operation=operations_lro.Operation(name=request.name, done=done, metadata=metadata))

    with Client(server.target, timeout=10) as client:
        client._stubs["operations"] = SimpleNamespace(WatchOperation=lambda request, **kwargs: _RefusedWatch(),
                                                      GetOperation=get_operation)
        expected = _top_classes(client)
        running = operations_lro.Operation(name="operations/busy")
        children = [_in_forked_child(lambda: _top_classes(client)) for _ in Operation(client, running).watch(timeout=60)]
        assert polls == ["operations/busy"] * 2 and children == [repr(expected)] * 2


def test_a_watch_stream_counts_as_under_way_from_before_its_call_starts(monkeypatch):
    # gRPC reads a stream in a thread of its own from the moment its call starts: a process
    # another thread forked before the stream counted itself went on to use gRPC there.
    from explaind.client import _client

    counted_at_start = []

    def watch_operation(request, **kwargs):
        counted_at_start.append(bool(_client._calls_under_way))
        return _RefusedWatch()

    with Client("127.0.0.1:1") as client:
        client._stubs["operations"] = SimpleNamespace(WatchOperation=watch_operation)
        stream = client._stream("operations", "WatchOperation", operations_pb2.WatchOperationRequest(name="operations/x"), timeout=5)
        stream.cancel()
    assert counted_at_start == [True] and not _client._calls_under_way


def test_a_late_results_error_reaches_a_pools_caller_with_its_operation_though_the_worker_closed_its_client(server):
    # What a worker raises crosses to the pool's caller pickled; the error of a result not
    # ready in time holds its operation, and so the client the worker's with-block closed.
    with Client(server.target) as client:
        error = Operation(client, operations_lro.Operation(name="operations/late"))._late(5.0, time.monotonic() - 5.0)
    delivered = pickle.loads(pickle.dumps(error))
    assert type(delivered) is type(error) and str(delivered) == str(error)
    assert delivered.operation.name == "operations/late"


def test_a_closed_client_pickles_without_its_token_and_unpickles_without_a_plaintext_warning():
    # A late result's error carries its closed client to the pool's caller: its pickle held
    # the token, and unpickling it warned that the token travels in plaintext, where nothing
    # travels through a closed client.
    with pytest.warns(PlaintextTokenWarning):
        client = Client("explaind.example:50051", token="s3cret")
        async_client = AsyncClient("explaind.example:50051", token="s3cret")
    client.close()
    asyncio.run(async_client.close())
    for pickled in (pickle.dumps(client), pickle.dumps(async_client)):
        assert b"s3cret" not in pickled
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            copy = pickle.loads(pickled)
        held = "Client" if isinstance(copy, Client) else "AsyncClient"
        with pytest.raises(ValueError, match=f"this {held} of explaind.example:50051 is closed"):
            (copy if isinstance(copy, Client) else copy.client).model_metadata()


def test_a_pickle_carries_the_timeout_set_after_the_client_was_made():
    # A spawn pool's worker got the constructor's timeout: calls waited 30 s there where the
    # caller had set 5; set on an AsyncClient, it was an attribute no call read.
    client = Client("127.0.0.1:1", timeout=30)
    async_client = AsyncClient("127.0.0.1:1", timeout=30)
    client.timeout = 5
    async_client.timeout = 2.5
    assert pickle.loads(pickle.dumps(client)).timeout == 5
    async_copy = pickle.loads(pickle.dumps(async_client))
    assert (async_client.client.timeout, async_copy.client.timeout, async_copy.timeout) == (2.5, 2.5, 2.5)
    with pytest.raises(TypeError, match="^timeout must be a number of seconds, got '5'"):
        client.timeout = "5"  # failed at the next call, as a TypeError naming nothing
    with pytest.raises(ValueError, match="^timeout must be a positive number of seconds"):
        async_client.timeout = 0
    # The connection keeps its address: a new target set here went unused by the calls.
    with pytest.raises(AttributeError):
        client.target = "127.0.0.1:2"
    client.close()
    asyncio.run(async_client.close())
    assert (pickle.loads(pickle.dumps(client)).timeout, pickle.loads(pickle.dumps(async_client)).timeout) == (5, 2.5)
