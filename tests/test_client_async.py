"""AsyncClient against a real server in-process: concurrent awaits, typed errors through
await, awaited operation results, cancellation, and one awaitable twin per Client method."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import io
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from conftest import free_port
from explaind.client import (AsyncClient, Client, DeadlineExceededError, Evaluation, NotFoundError, Operation, OperationError,
                             PlaintextTokenWarning, UnavailableError)
from explaind.client import _async, _operations
from explaind.config import default_config
from explaind.v1 import (common_pb2, inference_pb2_grpc, neuroinspect_pb2, neuroinspect_pb2_grpc, operations_pb2, operations_pb2_grpc,
                         sample_sets_pb2, sample_sets_pb2_grpc)
from test_client_sdk import (_BatchingInference, _channels_made_while_another_thread_warns, _closing_before_the_lookup, _GatedInference,
                             _LoadingSampleSets, _numbered_images, _operation_message, _predict_threads, _ranking_with_omega,
                             _RestartingOperations, _running_operation, _serve, _serve_a_reused_request_id_s_refusal, _SkippingClock)
from test_client_sdk import _skipping_sdk_clock as _skipping_client_clock

IMAGE = np.zeros((64, 64, 3), np.uint8)


class _PredictGate:
    """Counts the Predict calls inside the server at once (``peak``: the most) and, once
    ``hold(parties)`` is called, keeps each at a barrier until ``parties`` are inside:
    calls that do not run at once break it (INTERNAL) instead of passing slowly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self.peak = 0
        self._barrier: threading.Barrier | None = None

    def hold(self, parties: int) -> None:
        self.peak, self._barrier = 0, threading.Barrier(parties, timeout=30)

    def wrap(self, predict: Any) -> Any:
        def counted(servicer: Any, request: Any, context: Any) -> Any:
            with self._lock:
                self._inside += 1
                self.peak = max(self.peak, self._inside)
            try:
                if self._barrier is not None:
                    self._barrier.wait()
                return predict(servicer, request, context)
            finally:
                with self._lock:
                    self._inside -= 1

        return counted


def _world_config(tmp_path_factory, classifier_dir) -> Any:
    """The config of a server of the world classifier alone, on a free port, with its own data dir."""
    return (default_config().replace("classifier", path=str(classifier_dir)).replace("clip", path="").replace("diffusion", path="")
            .replace("server", port=0, metrics_port=free_port(), data_dir=str(tmp_path_factory.mktemp("async")), data_dir_reserve_bytes=1 << 20))


@pytest.fixture(scope="module")
def served(tmp_path_factory, classifier_dir) -> Iterator[tuple[str, _PredictGate]]:
    """A server of the world classifier in this process, its Predict counted: (target, gate)."""
    from explaind.service import ExplaindServer
    from explaind.service.inference import InferenceServicer

    gate = _PredictGate()
    config = _world_config(tmp_path_factory, classifier_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InferenceServicer, "Predict", gate.wrap(InferenceServicer.Predict))
        server = ExplaindServer(config)
        port = server.start()
        server.load_models()
        try:
            yield f"127.0.0.1:{port}", gate
        finally:
            server.stop(0)


@pytest.fixture(scope="module")
def loading(tmp_path_factory, classifier_dir) -> Iterator[str]:
    """A server of the world classifier in this process that never loads its models: it
    answers UNAVAILABLE with a delay to retry after, as one starting does. Its target."""
    from explaind.service import ExplaindServer

    server = ExplaindServer(_world_config(tmp_path_factory, classifier_dir))
    try:
        yield f"127.0.0.1:{server.start()}"
    finally:
        server.stop(0)


def test_twenty_awaited_predicts_at_once_all_succeed_running_at_once(served):
    target, gate = served
    with Client(target) as client:
        expected = client.predict([IMAGE], top_k=2)[0]

    async def predict_twenty() -> list[Any]:
        async with AsyncClient(target, max_workers=20) as client:
            gate.hold(20)  # all twenty inside the server at once, or the barrier breaks
            return await asyncio.gather(*(client.predict([IMAGE], top_k=2) for _ in range(20)))

    answers = asyncio.run(predict_twenty())
    assert gate.peak == 20
    assert [answer[0].class_indices for answer in answers] == [expected.class_indices] * 20


def test_no_more_calls_run_at_once_than_the_clients_threads(served):
    target, gate = served

    async def predict_eight() -> None:
        async with AsyncClient(target, max_workers=4) as client:
            gate.hold(4)  # in fours: a fifth inside at once would show in the peak
            await asyncio.gather(*(client.predict([IMAGE]) for _ in range(8)))

    asyncio.run(predict_eight())
    assert gate.peak == 4


def test_an_error_keeps_its_typed_sdk_error_through_await(served):
    target, _ = served

    async def ask() -> None:
        async with AsyncClient(target) as client:
            with pytest.raises(NotFoundError) as missing:
                await client.sample_set("missing")
            assert missing.value.field == "sample_set_id"
            with pytest.raises(ValueError, match="^start must be a sample index"):
                async for _ in client.samples("missing", start=-1):
                    pass

    asyncio.run(ask())


def test_an_operations_result_and_a_sets_samples_are_awaited(served):
    target, _ = served

    async def evaluate() -> tuple[Evaluation, Evaluation, int]:
        async with AsyncClient(target) as client:
            await client.create_sample_set([IMAGE] * 3, ["heart", "star", "circle"], sample_set_id="awaited")
            operation = await client.evaluate_sample_set("awaited")
            awaited = await client.result(operation, timeout=60)
            read = [sample.label async for sample in client.samples("awaited", start=1)]
            return awaited, await client.to_thread(operation.result), len(read)

    awaited, blocking, read = asyncio.run(evaluate())
    assert awaited == blocking and awaited.sample_count == 3 and read == 2


class _OneSamplePages(sample_sets_pb2_grpc.SampleSetServiceServicer):
    """A set of three samples (labels 0, 1, 2) listed one a page; ``asked``: the page tokens asked for."""

    def __init__(self) -> None:
        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, format="PNG")
        self.png, self.asked = png.getvalue(), []

    def ListSamples(self, request, context):
        self.asked.append(request.page_token)
        index = int(request.page_token or 0)
        return sample_sets_pb2.ListSamplesResponse(samples=[sample_sets_pb2.Sample(image=common_pb2.Image(encoded=self.png), label=index)],
                                                   next_page_token=str(index + 1) if index < 2 else "")


def test_an_async_for_over_samples_reads_each_page_only_when_it_gets_there():
    # A set may be too large to read ahead: a loop that stops at its first sample reads no later page.
    pages = _OneSamplePages()
    server, target = _serve(pages)

    async def first_then_all() -> tuple[list[str], list[int]]:
        async with AsyncClient(target) as client:
            async for _ in client.samples("s"):
                break
            asked_for_one = list(pages.asked)
            return asked_for_one, [sample.label async for sample in client.samples("s")]

    try:
        asked_for_one, labels = asyncio.run(first_then_all())
    finally:
        server.stop(0)
    assert asked_for_one == [""] and labels == [0, 1, 2]


def test_an_awaited_result_shows_its_jobs_progress_as_the_blocking_one_does(served, capsys):
    target, _ = served

    async def evaluate() -> Evaluation:
        async with AsyncClient(target) as client:
            await client.create_sample_set([IMAGE] * 40, ["heart", "star"] * 20, sample_set_id="awaited-progress")
            return await client.result(await client.evaluate_sample_set("awaited-progress", batch_size=4), progress=True, timeout=60)

    assert asyncio.run(evaluate()).sample_count == 40
    lines = capsys.readouterr().err.splitlines()  # not a terminal here: lines, as Operation.result writes them
    assert lines and all(line.startswith("evaluate_sample_set: ") for line in lines), lines
    assert lines[-1] == "evaluate_sample_set: succeeded 40/40 done", lines

    async def again() -> None:  # a job already done shows its outcome, as Operation.result does
        async with AsyncClient(target) as client:
            done = await client.evaluate_sample_set("awaited-progress", batch_size=4)
            await client.result(done, timeout=60)
            await client.result(done, progress=True, timeout=60)

    asyncio.run(again())
    assert capsys.readouterr().err.splitlines() == ["evaluate_sample_set: succeeded 40/40 done"]


def test_an_awaited_result_fetches_artifacts_only_with_download():
    # download=False is for a ranking whose ω is gigabytes: awaited, it must not be fetched either.
    omega = np.arange(6, dtype=np.float32).reshape(2, 3)
    operation, server = _ranking_with_omega(omega)

    async def read() -> tuple[Any, list, Any]:
        async with AsyncClient("127.0.0.1:1") as client:  # never called: the operation is done, its artifact is the stand-in's
            kept = await client.result(operation, download=False)
            asked_then = list(server.asked)
            return kept, asked_then, await client.result(operation)

    kept, asked_then, fetched = asyncio.run(read())
    assert kept.omega is None and asked_then == []
    assert np.array_equal(fetched.omega, omega) and server.asked == [(0, 2 << 20)]


def test_a_watch_yields_each_change_of_a_job_until_it_is_done_or_its_timeout(served):
    target, _ = served

    async def watch() -> tuple[list[tuple[str, int]], bool]:
        async with AsyncClient(target) as client:
            await client.create_sample_set([IMAGE] * 40, ["heart", "star"] * 20, sample_set_id="watched")
            seen = [(update.state, update.progress.step) async for update in client.watch(await client.evaluate_sample_set("watched", batch_size=4))]
            endless = await client.visualize_neurons([3], method="no_clip", steps=10_000)
            try:
                async for _ in client.watch(endless, timeout=0.5):
                    pass
                return seen, endless.done
            finally:
                await client.to_thread(endless.cancel)

    seen, endless_done = asyncio.run(watch())
    assert seen[-1] == ("succeeded", 40) and all(a != b for a, b in zip(seen, seen[1:])), seen  # changes only, to the end
    assert not endless_done  # the watch ended at its timeout; the job ran on


class _Unchanging(operations_pb2_grpc.OperationsServiceServicer):
    """A job that never changes from ``operation``; a wait takes what it asks for (at most 1 s)."""

    def __init__(self, operation: Any) -> None:
        self.operation = operation

    def GetOperation(self, request, context):
        return operations_pb2.GetOperationResponse(operation=self.operation)

    def WaitOperation(self, request, context):
        time.sleep(min(request.timeout.ToTimedelta().total_seconds(), 1.0))
        return operations_pb2.WaitOperationResponse(operation=self.operation)


def _succeeded_operation(name: str) -> Any:
    finished, metadata = _running_operation(name), operations_pb2.OperationMetadata()
    finished.metadata.Unpack(metadata)
    metadata.state = operations_pb2.OPERATION_STATE_SUCCEEDED
    finished.metadata.Pack(metadata)
    finished.done = True
    return finished


def test_an_awaited_wait_asks_for_no_more_than_its_step_or_the_time_left(monkeypatch):
    # A result with progress reads the job every PROGRESS_STEP_S, one without every
    # RESULT_STEP_S, neither past its timeout: a wait past it made a late result later.
    monkeypatch.setattr(_async, "PROGRESS_STEP_S", 0.05)
    monkeypatch.setattr(_async, "RESULT_STEP_S", 10.0)
    asked: list[float] = []
    wait = Operation._wait
    monkeypatch.setattr(Operation, "_wait", lambda self, timeout, outage: (asked.append(timeout), wait(self, timeout, outage))[1])
    server, target = _serve(_Unchanging(_running_operation("operations/x")), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def await_result(progress: bool, timeout: float) -> None:
        async with AsyncClient(target) as client:
            with pytest.raises(DeadlineExceededError):
                await client.result(Operation(client.client, _running_operation("operations/x")), progress=progress, timeout=timeout)

    async def watch() -> None:
        async with AsyncClient(target) as client:
            async for _ in client.watch(Operation(client.client, _running_operation("operations/x")), timeout=0.3):
                pass

    try:
        asyncio.run(await_result(progress=False, timeout=0.3))
        assert len(asked) == 1 and asked[0] <= 0.3, asked  # RESULT_STEP_S is longer: one wait, for the time left
        asked.clear()
        # 20 steps' time: in 0.3 s (6 steps) a first step slowed 0.25 s on a loaded machine left no second.
        asyncio.run(await_result(progress=True, timeout=1.0))
        assert len(asked) > 1 and all(timeout <= 0.05 for timeout in asked), asked
        asked.clear()
        asyncio.run(watch())  # a watch, too, reads the job every PROGRESS_STEP_S
        assert len(asked) > 1 and all(timeout <= 0.05 for timeout in asked), asked
    finally:
        server.stop(0)


class _RestartingThenFailed(operations_pb2_grpc.OperationsServiceServicer):
    """UNAVAILABLE for ``restarting_s`` seconds of ``clock`` from the first call (a server
    restarting), then the job failed. Timed from the first call, not from its making: a
    client slow to call on a loaded machine found the restart over and the job failed at
    once; and on the client's clock, a :class:`_SkippingClock` whose retry pauses cost no
    wall time, so no call of the SDK's has to be answered within a fraction of a second."""

    def __init__(self, restarting_s: float, clock: _SkippingClock) -> None:
        self.restarting_s, self.clock = restarting_s, clock
        self.ready_at: float | None = None

    def WaitOperation(self, request, context):
        time.sleep(0.03)
        if self.ready_at is None:
            self.ready_at = self.clock.monotonic() + self.restarting_s
        if self.clock.monotonic() < self.ready_at:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        failed = _operation_message(request.name, done=True, kind="edit_head", state=operations_pb2.OPERATION_STATE_FAILED)
        failed.error.code, failed.error.message = grpc.StatusCode.INVALID_ARGUMENT.value[0], "no such class"
        return operations_pb2.WaitOperationResponse(operation=failed)


def _skipping_sdk_clock(monkeypatch) -> _SkippingClock:
    """test_client_sdk's skipping clock standing in for the AsyncClient's time too (its
    awaited results, and its calls' retry pauses, which wait on their abandonment: see
    _Cancellation.sleep)."""
    from explaind.client import _client

    clock = _skipping_client_clock(monkeypatch)
    monkeypatch.setattr(_async, "time", clock)
    monkeypatch.setattr(_client._Cancellation, "sleep", lambda _, seconds: clock.sleep(seconds))
    return clock


@pytest.mark.parametrize("retry", [True, False])
def test_an_awaited_result_waits_through_a_restart_only_when_its_client_retries(monkeypatch, retry):
    # Each step's wait gives up on an unavailable server at its end; the next step asks
    # again while the result's time lasts, unless the client was made not to retry.
    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _RestartingThenFailed(1.5 * _async.RESULT_STEP_S, clock)  # longer than one step's retries
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def await_result() -> Any:
        async with AsyncClient(target, retry=retry) as client:
            client.client._reached = True  # as after the call that started the job
            return await client.result(Operation(client.client, _running_operation("operations/x")), timeout=3 * _async.RESULT_STEP_S)

    try:
        with pytest.raises(OperationError if retry else UnavailableError):
            asyncio.run(await_result())
        assert clock.monotonic() > servicer.ready_at if retry else not clock.pauses
    finally:
        server.stop(0)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["Client", "AsyncClient"])
def test_a_result_whose_server_is_unavailable_until_its_timeout_raises_unavailable(monkeypatch, asynchronous):
    # The awaited result, retrying its last step too, said the job was late where
    # Operation.result says what happened: the server was unavailable to the end. Its
    # note counted the last step's tries alone ("tried 4 times over 0.4s" after 30 s).
    clock = _skipping_sdk_clock(monkeypatch)
    timeout = 3 * _async.RESULT_STEP_S
    server, target = _serve(_RestartingThenFailed(float("inf"), clock), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def await_result(operation: Operation) -> Any:
        async with AsyncClient(target) as client:
            return await client.result(operation, timeout=timeout)

    try:
        with Client(target) as client, pytest.raises(UnavailableError) as unavailable:
            client._reached = True  # as after the call that started the job
            operation = Operation(client, _running_operation("operations/x"))
            started = clock.monotonic()
            asyncio.run(await_result(operation)) if asynchronous else operation.result(timeout=timeout)
        over = re.match(r"the call was tried \d+ times over ([\d.]+)s, ", unavailable.value.__notes__[-1])
        assert over and float(over[1]) >= timeout - 2 * _operations.LAST_ATTEMPT_S, unavailable.value.__notes__
        # Retried to the end of the result's timeout, on the clock the SDK reads: its pauses and
        # the calls' own time together, so a loaded machine's slow calls leave fewer pauses, not less.
        assert clock.monotonic() - started >= timeout - _operations.LAST_ATTEMPT_S and sum(clock.pauses) <= timeout
    finally:
        server.stop(0)


class _OverrunningWaitThenRestarting(_RestartingOperations):
    """A :class:`_RestartingOperations` restarting for good, whose WaitOperation holds its
    caller a second past the wait asked before failing UNAVAILABLE (on ``clock``)."""

    def WaitOperation(self, request, context):
        self.asked.append("WaitOperation")
        self.clock.now += request.timeout.ToTimedelta().total_seconds() + 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")


def test_an_awaited_result_s_last_look_says_it_tried_over_the_whole_outage(monkeypatch):
    # A step's wait overrunning the result's timeout leaves the last step no time: it looks
    # once, through refresh, whose own tally made the note count its tries alone ("tried
    # 5 times over 0.8s" after 12 s without an answer), not the earlier step's too.
    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _OverrunningWaitThenRestarting(clock)
    servicer.ready_at = float("inf")
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def await_result() -> Any:
        async with AsyncClient(target, timeout=1) as client:
            client.client._reached = True  # as after the call that started the job
            with pytest.raises(UnavailableError, match="restarting") as unavailable:
                await client.result(Operation(client.client, _running_operation("operations/x")), timeout=_async.RESULT_STEP_S + 0.5)
            return unavailable.value

    try:
        error = asyncio.run(await_result())
        assert servicer.asked[0] == "WaitOperation" and set(servicer.asked[1:]) == {"GetOperation"}, servicer.asked
        said = re.match(rf"the call was tried {len(servicer.asked)} times over ([\d.]+)s, ", error.__notes__[-1])
        assert said and float(said[1]) > _async.RESULT_STEP_S + 1, error.__notes__  # the wait's 11 s, then the look's
    finally:
        server.stop(0)


class _DeletedAfterItsWait(operations_pb2_grpc.OperationsServiceServicer):
    """One running operation, whose WaitOperation holds its caller a second past the wait
    asked (on ``clock``) and answers it still running; deleted after that wait, each
    GetOperation is NOT_FOUND, as after another client's delete."""

    def __init__(self, clock: _SkippingClock) -> None:
        self.clock = clock
        self.deleted = False

    def WaitOperation(self, request, context):
        self.clock.now += request.timeout.ToTimedelta().total_seconds() + 1
        self.deleted = True
        return operations_pb2.WaitOperationResponse(operation=_running_operation(request.name))

    def GetOperation(self, request, context):
        if self.deleted:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no operation {request.name!r}")
        return operations_pb2.GetOperationResponse(operation=_running_operation(request.name))


@pytest.mark.parametrize("awaited", ["result", "watch"])
def test_an_awaited_wait_s_look_that_finds_the_job_deleted_says_it_was_deleted_since(monkeypatch, awaited):
    # A sync wait or watch notes a job gone since it was last read; an awaited result's last
    # step, left no time by the wait before it, and an awaited watch's first look read it
    # through refresh, whose NOT_FOUND said nothing of what was read before.
    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _DeletedAfterItsWait(clock)
    servicer.deleted = awaited == "watch"
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def await_the_job() -> NotFoundError:
        async with AsyncClient(target, timeout=1) as client:
            operation = Operation(client.client, _running_operation("operations/x"))
            with pytest.raises(NotFoundError) as missing:
                if awaited == "result":
                    await client.result(operation, timeout=_async.RESULT_STEP_S + 0.5)
                else:
                    async for _ in client.watch(operation):
                        pass
            assert missing.value.operation is operation
            return missing.value

    try:
        error = asyncio.run(await_the_job())
        assert error.__notes__[-1] == ("operations/x was running when last read: it was deleted since (by another client, or by the "
                                       "server's retention of ended operations)")
    finally:
        server.stop(0)


def test_an_awaited_result_whose_client_never_reached_the_server_is_said_unavailable_at_once(monkeypatch):
    # Its client unavailable from the first call (a wrong address, for all it knows: an
    # operation built on a new client), each step's wait failed at once and the next was asked
    # without a pause, thousands a second until the result's timeout (forever without one).
    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _RestartingOperations(clock)
    servicer.ready_at = float("inf")
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def await_result() -> Any:
        async with AsyncClient(target) as client:
            return await client.result(Operation(client.client, _running_operation("operations/x")), timeout=3 * _async.RESULT_STEP_S)

    try:
        with pytest.raises(UnavailableError, match="restarting"):
            asyncio.run(await_result())
        assert servicer.asked == ["WaitOperation"]
    finally:
        server.stop(0)


def test_a_watch_yields_a_job_once_while_it_does_not_change_and_a_done_one_once(monkeypatch):
    monkeypatch.setattr(_async, "PROGRESS_STEP_S", 0.05)

    async def watch(message: Any) -> list[str]:
        server, target = _serve(_Unchanging(message), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
        try:
            async with AsyncClient(target) as client:
                return [update.state async for update in client.watch(Operation(client.client, message), timeout=0.3)]
        finally:
            server.stop(0)

    assert asyncio.run(watch(_running_operation("operations/x"))) == ["running"]
    assert asyncio.run(watch(_succeeded_operation("operations/x"))) == ["succeeded"]  # as it is now, though done already


class _Scripted(operations_pb2_grpc.OperationsServiceServicer):
    """A job read as each of ``messages`` in turn, one a read (GetOperation, or a WaitOperation
    that takes what it asks for), the last from then on."""

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages

    def _next(self) -> Any:
        return self.messages.pop(0) if len(self.messages) > 1 else self.messages[0]

    def GetOperation(self, request, context):
        return operations_pb2.GetOperationResponse(operation=self._next())

    def WaitOperation(self, request, context):
        time.sleep(request.timeout.ToTimedelta().total_seconds())
        return operations_pb2.WaitOperationResponse(operation=self._next())


@pytest.mark.parametrize("timeout", [30, None])
def test_a_watch_yields_every_change_of_state_step_total_or_message_from_the_jobs_state_now(monkeypatch, timeout):
    # Each of the four alone is a change, as each is a progress update of Operation.watch;
    # the first yield is the job as the server has it, not as the Operation was last read.
    monkeypatch.setattr(_async, "PROGRESS_STEP_S", 0.05)
    states = {name: getattr(operations_pb2, f"OPERATION_STATE_{name.upper()}") for name in ("queued", "running", "succeeded")}
    reads = [("queued", 0, 0, ""), ("running", 0, 0, ""), ("running", 0, 4, ""), ("running", 0, 4, "loading"), ("running", 0, 4, "loading"),
             ("running", 1, 4, "loading"), ("succeeded", 4, 4, "done")]
    server, target = _serve(_Scripted([_operation_message("operations/x", done=state == "succeeded", kind="edit_head", state=states[state],
                                                          progress=operations_pb2.Progress(step=step, total=total, message=message))
                                       for state, step, total, message in reads]),
                            add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def watch() -> list[tuple[str, int, int, str]]:
        async with AsyncClient(target) as client:
            stale = Operation(client.client, _running_operation("operations/x"))
            return [(update.state, update.progress.step, update.progress.total, update.progress.message)
                    async for update in client.watch(stale, timeout=timeout)]  # None: until it is done

    try:
        assert asyncio.run(watch()) == reads[:4] + reads[5:]  # the fifth read changed nothing
    finally:
        server.stop(0)


def test_a_result_not_ready_in_time_hands_back_its_operation_and_the_job_runs_on(served):
    target, _ = served

    async def wait_briefly() -> None:
        async with AsyncClient(target) as client:
            operation = await client.visualize_neurons([3], method="no_clip", steps=10_000)
            try:
                with pytest.raises(DeadlineExceededError, match=rf"^DEADLINE_EXCEEDED: {operation.name} is still (queued|running) after 0.5s$") as late:
                    await client.result(operation, timeout=0.5)
                assert late.value.operation is operation
                assert not (await client.to_thread(operation.refresh)).done
            finally:
                await client.to_thread(operation.cancel)

    asyncio.run(wait_briefly())


def test_a_cancelled_result_await_frees_its_thread_at_once_long_before_its_job_ends(served):
    # Waiting in one call until the job ended kept the thread (one of max_workers) for as
    # long as the job ran, though nothing awaited it any more; then, in steps, to a step's end.
    target, _ = served

    async def cancel_a_wait() -> None:
        async with AsyncClient(target, max_workers=1) as client:
            operation = await client.visualize_neurons([3], method="no_clip", steps=10_000)
            try:
                waiting = asyncio.ensure_future(client.result(operation))
                await asyncio.sleep(0.1)
                waiting.cancel()
                # The one thread is free again, its wait cancelled, not at the end of its RESULT_STEP_S (10 s).
                assert await asyncio.wait_for(client.to_thread(lambda: operation.done), timeout=5) is False
            finally:
                await client.to_thread(operation.cancel)

    asyncio.run(cancel_a_wait())


def test_an_awaited_result_leaves_the_event_loop_free_while_it_waits(monkeypatch):
    # A wait made in the loop's own thread would hold every other task until the job ended
    # or the result's timeout passed.
    monkeypatch.setattr(_async, "RESULT_STEP_S", 0.2)
    server, target = _serve(_Unchanging(_running_operation("operations/x")), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def call_while_waiting() -> None:
        async with AsyncClient(target) as client:
            waiting = asyncio.ensure_future(client.result(Operation(client.client, _running_operation("operations/x")), timeout=5))
            await asyncio.sleep(0)  # the result begins its first wait
            assert await client.to_thread(str, "answered") == "answered"
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

    try:
        asyncio.run(call_while_waiting())
    finally:
        server.stop(0)


def test_an_async_client_runs_calls_at_once_by_default():
    # Its default threads are several: with one, it would run no more at once than a Client.
    both_inside = threading.Barrier(2, timeout=10)

    async def two_at_once() -> None:
        async with AsyncClient("127.0.0.1:1") as client:
            await asyncio.gather(client.to_thread(both_inside.wait), client.to_thread(both_inside.wait))

    asyncio.run(two_at_once())


def test_closing_an_async_client_neither_waits_for_its_running_calls_nor_keeps_their_threads():
    # close() is awaited in the event loop: waiting there for a call to end would hold every
    # task; and a pool left open keeps its threads waiting for work for good.
    release, ended = threading.Event(), threading.Event()

    def held() -> threading.Thread:
        release.wait(10)
        ended.set()
        return threading.current_thread()

    async def close_while_running() -> tuple[AsyncClient, threading.Thread]:
        client = AsyncClient("127.0.0.1:1")
        running = client.to_thread(held)
        await client.close()
        assert not ended.is_set()
        release.set()
        return client, await running

    client, thread = asyncio.run(close_while_running())  # the client kept, as a program's may be: its pool is not collected
    thread.join(10)
    assert not thread.is_alive()


def test_a_call_cancelled_while_waiting_its_turn_never_runs(served):
    target, _ = served

    async def cancel_a_queued_call() -> list[int]:
        ran: list[int] = []
        async with AsyncClient(target, max_workers=1) as client:
            release = threading.Event()
            first = client.to_thread(release.wait, 30)
            queued = client.to_thread(ran.append, 1)
            queued.cancel()
            await asyncio.sleep(0)  # the cancel reaches the pool's queue in the loop's next round
            release.set()
            await first
            await client.to_thread(ran.append, 2)  # runs after the queued one's turn
        return ran

    assert asyncio.run(cancel_a_queued_call()) == [2]


async def _until(condition: Callable[[], bool], call: asyncio.Future) -> None:
    """Return once ``condition()`` holds, failing if ``call`` ends first or 30 s pass."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline and not call.done(), call
        await asyncio.sleep(0.01)


async def _seconds_to_free_the_thread(client: AsyncClient, call: asyncio.Future) -> float:
    """Cancel ``call`` and return the seconds until the one thread of ``client`` (made
    with ``max_workers=1``) runs the next function: once the abandoned call has left it."""
    call.cancel()
    abandoned = time.monotonic()
    await client.to_thread(time.monotonic)
    return time.monotonic() - abandoned


def test_a_call_abandoned_in_a_retry_pause_makes_no_further_attempt_and_frees_its_thread_at_once():
    # A call whose await was cancelled went on retrying in its thread while the server
    # restarted, for up to its whole timeout, holding one of the client's threads.
    servicer = _LoadingSampleSets(loading_s=3600, retry_delay_s=30)  # UNAVAILABLE, retry after 30 s
    server, target = _serve(servicer)

    async def abandon_a_retrying_call() -> float:
        async with AsyncClient(target, timeout=20, max_workers=1) as client:  # a retry would pause 19.75 s (the 30 s asked, cut to the deadline)
            asking = asyncio.ensure_future(client.sample_set("s"))
            await _until(lambda: bool(servicer.attempts), asking)  # refused once, pausing for the delay
            return await _seconds_to_free_the_thread(client, asking)

    try:
        assert asyncio.run(abandon_a_retrying_call()) < 10  # not after the 30 s pause
        assert servicer.attempts == {"GetSampleSet": 1}
    finally:
        server.stop(0)


class _FullPredictQueue(_BatchingInference, _LoadingSampleSets):
    """A batch size of 4 images, each Predict refused for a full queue: retry after 30 s."""

    def __init__(self) -> None:
        _LoadingSampleSets.__init__(self, loading_s=3600, retry_delay_s=30, code=grpc.StatusCode.RESOURCE_EXHAUSTED)

    def Predict(self, request, context):
        self._attempt("Predict", context)


def test_a_split_predict_abandoned_in_its_requests_retry_pauses_makes_no_further_attempt_and_frees_its_thread_at_once():
    # The split requests wait in threads of the call's own: an abandonment reaches them too.
    from explaind.v1 import inference_pb2_grpc

    servicer = _FullPredictQueue()
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server, threads=4)

    async def abandon_a_refused_predict() -> float:
        async with AsyncClient(target, timeout=20, max_workers=1) as client:  # a retry would pause 19.75 s
            predicting = asyncio.ensure_future(client.predict([IMAGE] * 10))  # 3 requests, in flight at once
            await _until(lambda: servicer.attempts.get("Predict", 0) >= 3, predicting)  # each refused once, pausing for the delay
            return await _seconds_to_free_the_thread(client, predicting)

    try:
        assert asyncio.run(abandon_a_refused_predict()) < 10  # not after the 30 s pause
        assert servicer.attempts == {"Predict": 3}
    finally:
        server.stop(0)


def test_an_upload_abandoned_between_its_requests_sends_no_further_one_and_deletes_its_part(served):
    # An abandoned upload's thread went on reading and sending the rest of its samples. Then
    # it stopped, but left its part uploading, as no interrupted upload does: run again, the
    # upload met ALREADY_EXISTS for up to [server].upload_idle_timeout_s.
    target, _ = served
    reading_the_last, go_on = threading.Event(), threading.Event()
    sent_after_the_abandonment: list[str] = []

    class NotingStub:
        """The client's stub, noting each request sent once the upload was abandoned."""

        def __init__(self, stub: Any) -> None:
            self._stub = stub

        def __getattr__(self, method: str) -> Any:
            if go_on.is_set():
                sent_after_the_abandonment.append(method)
            return getattr(self._stub, method)

    def images() -> Iterator[np.ndarray]:
        yield from [IMAGE] * 4
        reading_the_last.set()  # some requests sent, the next waiting for this image (read ahead: is it the last?)
        go_on.wait(30)
        yield IMAGE

    labels = ["heart", "star"] * 2 + ["circle"]

    async def abandon_an_upload() -> None:
        async with AsyncClient(target, max_workers=1) as async_client:
            async_client.client._stubs["sample_sets"] = NotingStub(async_client.client._stubs["sample_sets"])
            uploading = asyncio.ensure_future(async_client.create_sample_set(images(), labels, sample_set_id="abandoned", chunk_size=1))
            assert await asyncio.get_running_loop().run_in_executor(None, reading_the_last.wait, 30)
            uploading.cancel()
            await asyncio.sleep(0)  # the cancel reaches the thread's call in the loop's next round
            go_on.set()
            await async_client.to_thread(time.monotonic)  # on the one thread: once the abandoned upload has left it

    asyncio.run(abandon_an_upload())
    assert sent_after_the_abandonment == ["DeleteSampleSet"]  # no sample: its part deleted, as an interrupted upload's
    with Client(target) as client:
        try:
            assert client.create_sample_set([IMAGE] * 5, labels, sample_set_id="abandoned").sample_count == 5  # run again: not ALREADY_EXISTS
        finally:
            client.delete_sample_set("abandoned")


def test_split_predicts_in_one_threaded_function_keep_nothing_of_theirs_once_answered():
    # Each split (pipelined) Predict in an AsyncClient.to_thread function left its own stop
    # (see _Cancellation.within) with the call's for as long as the function ran: a function
    # classifying a data set a batch at a time kept ~1.7 kB per batch until it returned.
    import gc

    from explaind.client._client import _Cancellation
    from explaind.v1 import inference_pb2_grpc

    server, target = _serve(_BatchingInference(), add=inference_pb2_grpc.add_InferenceServiceServicer_to_server, threads=4)

    def live_stops() -> int:
        gc.collect()
        return sum(type(thing) is _Cancellation for thing in gc.get_objects())

    def classify_in_batches(client: Client) -> int:
        before = live_stops()
        for _ in range(20):
            assert len(client.predict([IMAGE] * 10)) == 10  # 3 requests, in flight at once
        return live_stops() - before

    async def classify() -> int:
        async with AsyncClient(target) as client:
            return await client.to_thread(classify_in_batches, client.client)

    try:
        assert asyncio.run(classify()) == 0
    finally:
        server.stop(0)


def _run_abandoned(target: str, function: Callable[[Client, Callable[[], None]], None]) -> None:
    """Run ``function(client, wait_for_abandonment)`` by AsyncClient.to_thread; once it calls
    ``wait_for_abandonment()``, cancel its await, then let that return. Return once the
    function has left its thread."""
    waiting, abandoned = threading.Event(), threading.Event()

    def wait_for_abandonment() -> None:
        waiting.set()
        assert abandoned.wait(30)

    async def abandon() -> None:
        async with AsyncClient(target, max_workers=1) as async_client:
            running = async_client.to_thread(function, async_client.client, wait_for_abandonment)
            assert await asyncio.get_running_loop().run_in_executor(None, waiting.wait, 30)
            running.cancel()
            await asyncio.sleep(0)  # the cancel's callbacks run in the loop's next round
            abandoned.set()
            await async_client.to_thread(time.monotonic)  # on the one thread: once the function has left it

    asyncio.run(abandon())


class _HeldPredicts(_BatchingInference):
    """Loaded, with a batch size of 4 images; each Predict waits inside for ``answer``,
    its call's context kept in ``contexts``."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded, self.answer, self.contexts = True, threading.Event(), []

    def Predict(self, request, context):
        self.contexts.append(context)
        self.answer.wait(30)
        return super().Predict(request, context)


def test_a_split_predict_abandoned_with_its_requests_in_flight_cancels_them_at_once():
    # An abandonment cancels the calls in flight that change nothing (Predict is one), so
    # the thread is free at once, and makes no further attempt.
    from explaind.v1 import inference_pb2_grpc

    servicer = _HeldPredicts()
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server, threads=4)

    async def abandon_predicts_in_flight() -> bool:
        async with AsyncClient(target, max_workers=1) as client:
            predicting = asyncio.ensure_future(client.predict([IMAGE] * 10))  # 3 requests, in flight at once
            await _until(lambda: len(servicer.contexts) >= 3, predicting)
            predicting.cancel()
            cancelled_soon = time.monotonic() + 10  # held until servicer.answer: only a cancel ends them before
            while time.monotonic() < cancelled_soon and any(context.is_active() for context in servicer.contexts):
                await asyncio.sleep(0.01)
            cancelled = not any(context.is_active() for context in servicer.contexts)
            await client.to_thread(time.monotonic)  # on the one thread: once the abandoned predict has left it
            return cancelled

    try:
        assert asyncio.run(abandon_predicts_in_flight())
        assert len(servicer.contexts) == 3  # no request after the abandonment
    finally:
        servicer.answer.set()
        server.stop(0)


def test_a_split_predict_begun_after_its_call_was_abandoned_sends_no_request():
    # A split Predict's requests are stopped by a stop of its own, abandoned with the call's
    # (see _Cancellation.within): one begun once the call was already abandoned must start so.
    from explaind.v1 import inference_pb2_grpc

    servicer = _BatchingInference()
    servicer.loaded = True
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server, threads=4)
    outcomes: list[str] = []

    def predict_before_and_after(client: Client, wait_for_abandonment: Callable[[], None]) -> None:
        assert len(client.predict([IMAGE] * 10)) == 10  # the server's batch size known: the next one splits at once
        wait_for_abandonment()
        try:
            client.predict([IMAGE] * 10)
            outcomes.append("answered")
        except grpc.FutureCancelledError:
            outcomes.append("abandoned")

    try:
        _run_abandoned(target, predict_before_and_after)
        assert outcomes == ["abandoned"] and sorted(servicer.requests) == [2, 4, 4]  # the first Predict's alone
    finally:
        server.stop(0)


def test_a_watch_begun_after_its_call_was_abandoned_opens_no_stream():
    from explaind.client._operations import Operation

    servicer = _RestartingOperations(time)  # answers the operation at once; its stream fails
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    outcomes: list[str] = []

    def watch_once_abandoned(client: Client, wait_for_abandonment: Callable[[], None]) -> None:
        operation = Operation(client, _running_operation("operations/x"))
        wait_for_abandonment()
        try:
            next(operation.watch())
            outcomes.append("watched")
        except grpc.FutureCancelledError:
            outcomes.append("abandoned")

    try:
        _run_abandoned(target, watch_once_abandoned)
        assert outcomes == ["abandoned"] and servicer.asked == []
    finally:
        server.stop(0)


def test_calls_after_an_abandoned_upload_s_cleanup_are_abandoned_too(served):
    # The cleanup of an abandoned upload (deleting its part) is made despite the abandonment;
    # the function's calls after it are not.
    target, _ = served
    outcomes: list[str] = []

    def upload_then_list(client: Client, wait_for_abandonment: Callable[[], None]) -> None:
        def images() -> Iterator[np.ndarray]:
            yield from [IMAGE] * 4  # some requests sent, the set created (the next read ahead: is it the last?)
            wait_for_abandonment()
            yield IMAGE

        labels = ["heart", "star"] * 2 + ["circle"]
        for name, call in (("upload", lambda: client.create_sample_set(images(), labels, sample_set_id="abandoned-first", chunk_size=1)),
                           ("list", client.sample_sets)):
            try:
                call()
                outcomes.append(f"{name} answered")
            except grpc.FutureCancelledError:
                outcomes.append(f"{name} abandoned")

    _run_abandoned(target, upload_then_list)
    assert outcomes == ["upload abandoned", "list abandoned"]
    with Client(target) as client, pytest.raises(NotFoundError):
        client.sample_set("abandoned-first")  # its part deleted


# A closed client's error, {0} the class its user holds.
CLOSED = r"^this {0} of .* is closed \(close\(\), or the end of its with-block\); make a new {0}$"


def test_the_end_of_async_with_closes_the_connection(served):
    target, _ = served

    async def use_and_leave() -> AsyncClient:
        async with AsyncClient(target) as client:
            assert await client.health() == "SERVING"
        with pytest.raises(ValueError, match=CLOSED.format("AsyncClient")):  # it said "make a new Client"
            await client.health()
        return client

    client = asyncio.run(use_and_leave())
    with pytest.raises(ValueError, match=CLOSED.format("AsyncClient")):  # the Client it wraps, too: its user holds the AsyncClient
        client.client.health()


@pytest.mark.parametrize("waiting", ["result", "watch"])
def test_an_async_wait_given_an_operation_s_name_says_how_to_get_the_operation(waiting):
    # It raised AttributeError: 'str' object has no attribute 'done' (or 'refresh').
    async def wait_on_a_name() -> None:
        async with AsyncClient("127.0.0.1:1") as client:
            if waiting == "result":
                await client.result("operations/0123456789abcdef")  # type: ignore[arg-type]
            async for _ in client.watch("operations/0123456789abcdef"):  # type: ignore[arg-type]
                pass

    with pytest.raises(TypeError, match=r"^operation must be an Operation \(await client.operation\(name\) gets one by its name\), "
                                        r"got 'operations/0123456789abcdef'$"):
        asyncio.run(wait_on_a_name())


def test_an_async_for_over_predictions_gets_each_as_its_request_is_answered_and_a_close_cancels_the_rest():
    servicer = _GatedInference()
    servicer.open(0)  # the first request of 3 (images 0-1, 2-3, 4-5) is answered, the second held
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server, threads=8)

    async def first_two() -> tuple[list[list[int]], list[str]]:
        async with AsyncClient(target) as client:
            seen = []
            async with contextlib.aclosing(client.predictions(_numbered_images(6), max_in_flight=2)) as predictions:
                async for prediction in predictions:
                    seen.append(prediction.class_indices)
                    if len(seen) == 2:
                        await asyncio.to_thread(servicer.wait_for, lambda: 2 in servicer.arrived)
                        break
            return seen, _predict_threads()

    try:
        seen, threads_left = asyncio.run(first_two())
        servicer.wait_for(lambda: 2 in servicer.cancelled)
    finally:
        server.stop(0)
    assert seen == [[0], [1]] and not threads_left and sorted(servicer.arrived) == [0, 2]  # sent at once: in either order


def test_a_cancelled_await_of_a_later_async_prediction_cancels_the_requests_in_flight_and_frees_its_thread():
    # The pipeline, made at the first item, was abandoned with that item's await only: a
    # later one's cancelled await left its Predict held, and the one thread with it.
    servicer = _GatedInference()
    servicer.open(0)  # the first request of 3 (images 0-1, 2-3, 4-5) is answered, the second held
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server, threads=8)

    async def abandon_the_third() -> float:
        async with AsyncClient(target, max_workers=1) as client:
            predictions = client.predictions(_numbered_images(6), max_in_flight=2)
            assert [(await anext(predictions)).class_indices for _ in range(2)] == [[0], [1]]
            third = asyncio.ensure_future(anext(predictions))
            await asyncio.to_thread(servicer.wait_for, lambda: 4 in servicer.arrived)  # sent as the third is taken: it waits for the second
            return await _seconds_to_free_the_thread(client, third)

    try:
        assert asyncio.run(abandon_the_third()) < 5  # not the server's HOLD_S
        servicer.wait_for(lambda: sorted(servicer.cancelled) == [2, 4])
    finally:
        server.stop(0)
    assert not _predict_threads()


def test_a_break_out_of_async_predictions_at_the_end_of_the_client_s_block_closes_them_quietly():
    # Left without aclosing, the loop's generator is closed when the event loop finalises it:
    # after the `async with` closed the client, whose threads then refused the close, which
    # ended as "Task exception was never retrieved: ValueError: this AsyncClient ... is closed".
    servicer = _GatedInference()
    servicer.open(0)
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server, threads=8)
    reported = []

    async def break_out() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        async with AsyncClient(target) as client:
            async for _ in client.predictions(_numbered_images(6), max_in_flight=2):
                await asyncio.to_thread(servicer.wait_for, lambda: 2 in servicer.arrived)
                break

    try:
        asyncio.run(break_out())
        gc.collect()  # a task's unretrieved exception is reported as it goes
        servicer.wait_for(lambda: 2 in servicer.cancelled)
    finally:
        server.stop(0)
    assert reported == [] and not _predict_threads()


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def test_every_public_client_method_has_an_awaitable_twin_with_its_parameters():
    twins = _public_methods(AsyncClient)
    for name, signature in _public_methods(Client).items():
        assert name in twins, f"Client.{name} has no AsyncClient.{name}: add `{name} = _awaitable(Client.{name})`"
        method = getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), f"AsyncClient.{name} is not awaitable"
        assert list(twins[name].parameters)[1:] == list(signature.parameters)[1:], f"AsyncClient.{name}'s parameters are not Client.{name}'s"
        if name != "close":  # the AsyncClient's own; the rest call the Client's, not another of the same parameters
            assert method.__wrapped__ is getattr(Client, name), f"AsyncClient.{name} calls Client.{method.__wrapped__.__name__}"
    # result and watch are Operation.result's and .watch's twins: the same defaults (a watch's time limit, a result's none).
    for name in ("result", "watch"):
        awaited, blocking = (inspect.signature(getattr(cls, name)).parameters for cls in (AsyncClient, Operation))
        assert {key: awaited[key].default for key in blocking if key != "self"} == {key: p.default for key, p in blocking.items() if key != "self"}
    client_arguments = list(inspect.signature(Client).parameters.values())
    assert list(inspect.signature(AsyncClient).parameters.values()) == [
        *client_arguments, inspect.Parameter("max_workers", inspect.Parameter.KEYWORD_ONLY, default=_async.DEFAULT_MAX_WORKERS, annotation="int")]


@pytest.mark.parametrize("max_workers", [0, -1, 2.5, True])
def test_max_workers_must_be_a_positive_integer(max_workers):
    with pytest.raises(ValueError, match="^max_workers must be a positive integer"):
        AsyncClient(max_workers=max_workers)


@pytest.mark.parametrize("timeout, error, message", [("1", TypeError, "got '1'"), (float("nan"), ValueError, "got nan"), (True, TypeError, "got True")])
@pytest.mark.parametrize("wait", ["result", "watch"])
def test_an_awaited_results_or_watchs_timeout_is_checked_as_the_operations(wait, timeout, error, message):
    # A string failed mid-wait ("unsupported operand type(s) for +"), True waited a second,
    # and a watch's NaN went on to the server: Operation.result and .watch refuse each.
    async def wait_on(client: AsyncClient) -> None:
        operation = Operation(client.client, _running_operation("operations/x"))
        if wait == "result":
            await client.result(operation, timeout=timeout)
        else:
            async for _ in client.watch(operation, timeout=timeout):
                pass

    async def main() -> None:
        async with AsyncClient("127.0.0.1:1") as client:  # refused before any call: no server
            with pytest.raises(error, match=f"^timeout must be a number of seconds, {message}$"):
                await wait_on(client)

    asyncio.run(main())


@pytest.mark.parametrize("asynchronous", [False, True], ids=["Client", "AsyncClient"])
def test_a_call_retrying_as_its_client_is_closed_says_the_client_is_closed(loading, monkeypatch, asynchronous):
    # Its next attempt met gRPC's own "Cannot invoke RPC on closed channel!", naming no client.
    from types import SimpleNamespace

    from explaind.client import _client

    pausing, closed = threading.Event(), threading.Event()

    def sleep(seconds: float) -> None:  # the pause before the next attempt, held until the client is closed
        pausing.set()
        closed.wait(30)

    monkeypatch.setattr(_client, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    monkeypatch.setattr(_client._Cancellation, "sleep", lambda _, seconds: sleep(seconds))  # an AsyncClient call's pause

    async def leave_the_block_while_it_retries() -> None:
        async with AsyncClient(loading) as client:
            asking = asyncio.ensure_future(client.model_metadata())
            await asyncio.get_running_loop().run_in_executor(None, pausing.wait, 30)
        closed.set()
        await asking

    with pytest.raises(ValueError, match=CLOSED.format("AsyncClient" if asynchronous else "Client")):
        if asynchronous:
            asyncio.run(leave_the_block_while_it_retries())
        else:
            with Client(loading) as client:
                threading.Thread(target=lambda: (pausing.wait(30), client.close(), closed.set()), daemon=True).start()
                client.model_metadata()


class _UnansweredWaits(operations_pb2_grpc.OperationsServiceServicer):
    """A running job whose WaitOperation goes unanswered until the caller leaves (a hung server)."""

    def WaitOperation(self, request, context):
        while context.is_active():
            time.sleep(0.05)
        return operations_pb2.WaitOperationResponse(operation=_running_operation(request.name))


@pytest.mark.parametrize("asynchronous", [False, True], ids=["Client", "AsyncClient"])
def test_a_result_whose_wait_goes_unanswered_is_late_and_hands_back_its_operation(monkeypatch, asynchronous):
    # AsyncClient.result raised the unanswered call's bare "Deadline Exceeded", without the
    # operation to wait on later, where Operation.result said the job was late; and both
    # said the whole timeout had passed when a wait went unanswered long before it.
    monkeypatch.setattr(_operations, "WAIT_CALL_MARGIN_S", 0.5)  # the call's deadline: this long after the wait asked for
    monkeypatch.setattr(_operations, "WAIT_STEP_S", 0.5)  # what one wait call asks for
    monkeypatch.setattr(_async, "RESULT_STEP_S", 0.5)
    server, target = _serve(_UnansweredWaits(), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def await_result(operation: Operation, timeout: float | None) -> Any:
        async with AsyncClient(target) as client:
            return await client.result(operation, timeout=timeout)

    try:
        with Client(target) as client:
            operation = Operation(client, _running_operation("operations/x"))
            for timeout, message in ((0.5, r"is still running after 0.5s$"),  # unanswered past the timeout: late
                                     (30, r"was still running when the server left a wait unanswered, \d+\.\ds into the 30s timeout$")):
                with pytest.raises(DeadlineExceededError, match=rf"^DEADLINE_EXCEEDED: operations/x {message}") as late:
                    asyncio.run(await_result(operation, timeout)) if asynchronous else operation.result(timeout=timeout)
                assert late.value.operation is operation
            # Without a timeout nothing is late: the unanswered call's own error, not "still running after Nones".
            with pytest.raises(DeadlineExceededError, match=r"^DEADLINE_EXCEEDED: Deadline Exceeded$"):
                asyncio.run(await_result(operation, None)) if asynchronous else operation.result(timeout=None)
    finally:
        server.stop(0)


def test_an_async_clients_arguments_are_its_clients(tmp_path_factory, classifier_dir):
    from explaind.client import ResourceExhaustedError
    from explaind.service import ExplaindServer

    server = ExplaindServer(_world_config(tmp_path_factory, classifier_dir))
    loading = f"127.0.0.1:{server.start()}"  # never loads its models: UNAVAILABLE, retry after a delay
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)  # 12 kB raw

    async def main() -> None:
        async with AsyncClient(loading, timeout=2, retry=False) as unretried:
            with pytest.raises(UnavailableError) as unavailable:
                await unretried.model_metadata()
        assert not getattr(unavailable.value, "__notes__", None)  # tried once, not retried until its timeout
        async with AsyncClient(loading, timeout=2, max_message_bytes=4096) as small:
            with pytest.raises(ResourceExhaustedError):
                await small.predict([noise])  # refused by the client before it is sent

    try:
        asyncio.run(main())
    finally:
        server.stop(0)


def test_an_async_clients_timeout_and_tls_files_are_its_clients(tmp_path):
    # Its TLS files are checked as the Client checks them, before any call.
    async def timeout_of_a_client() -> float:
        async with AsyncClient("127.0.0.1:1", timeout=2.5) as client:
            return client.client.timeout

    assert asyncio.run(timeout_of_a_client()) == 2.5
    with pytest.raises(FileNotFoundError, match="^root_certificates: no file"):
        AsyncClient("127.0.0.1:1", root_certificates=tmp_path / "ca.pem")
    (tmp_path / "chain.pem").write_text("-----BEGIN CERTIFICATE-----\n")  # the key alone is missing: the error names it, not the chain
    with pytest.raises(FileNotFoundError, match="^private_key: no file"):
        AsyncClient("127.0.0.1:1", private_key=tmp_path / "key.pem", certificate_chain=tmp_path / "chain.pem")
    with pytest.raises(ValueError, match="^private_key and certificate_chain go together"):
        AsyncClient("127.0.0.1:1", certificate_chain=tmp_path / "chain.pem")


def test_making_an_async_client_neither_catches_another_threads_warning_nor_drops_its_filter(monkeypatch):
    # AsyncClient() made its Client inside catch_warnings(record=True), to point its
    # PlaintextTokenWarning at the caller's line: another thread's warning meanwhile was
    # given again as if from that line, and a filter that thread added was gone at the end.
    _channels_made_while_another_thread_warns(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:  # the test's own, restoring the filters after
        warnings.simplefilter("always")
        asyncio.run(AsyncClient("10.0.0.7:50051", token="secret").close())
        patterns = [message.pattern for _, message, *_ in warnings.filters if message is not None]
    assert [(warning.category, warning.filename) for warning in caught] == [
        (PlaintextTokenWarning, __file__), (UserWarning, "another_thread.py")]
    assert patterns.count("another thread's filter") == 1


def test_a_function_on_the_async_clients_threads_runs_in_the_callers_context(served):
    # As asyncio.to_thread: its OpenTelemetry span, a contextvar, are the caller's.
    import contextvars

    stage = contextvars.ContextVar("stage", default="unset")

    async def main() -> str:
        stage.set("the caller's")
        async with AsyncClient(served[0]) as asynchronous:
            return await asynchronous.to_thread(stage.get)

    assert asyncio.run(main()) == "the caller's"


def test_a_reused_request_id_s_error_is_raised_as_it_came_by_an_async_client_closed_before_its_operation_is_looked_up(monkeypatch):
    # As the Client's: the closed client's ValueError from the lookup replaced the error.
    from explaind.client import InvalidArgumentError

    server, target, refusing = _serve_a_reused_request_id_s_refusal()

    async def main() -> InvalidArgumentError:
        loop = asyncio.get_running_loop()
        async with AsyncClient(target, timeout=5) as client:
            _closing_before_the_lookup(monkeypatch, lambda: asyncio.run_coroutine_threadsafe(client.close(), loop).result(5))
            with pytest.raises(InvalidArgumentError, match="was sent with another request") as caught:
                await client.evaluate_sample_set("s", request_id="123e4567-e89b-42d3-a456-426614174000")
        return caught.value

    try:
        error = asyncio.run(main())
    finally:
        server.stop(0)
    assert (error.field, error.operation, refusing.lookups_left_s) == ("request_id", None, [])


class _HeldCalls(neuroinspect_pb2_grpc.NeuroInspectServiceServicer, operations_pb2_grpc.OperationsServiceServicer, health_pb2_grpc.HealthServicer):
    """A ranking's job that never ends: its WaitOperation and its watch stream (after one
    update), and a health check, are held until the caller leaves (``left``: the methods it left) or 10 s pass;
    its start, while ``hold_start``, until ``release_start``; with ``no_streams``, a watch
    is refused (every thread for streams taken); with ``dropped_streams``, its stream
    dropped after the update (a restart). ``inside``: set once a held call is inside, a
    watch refused, or the job read after a stream dropped; ``asked``: the methods called."""

    def __init__(self, *, hold_start: bool = False, no_streams: bool = False, dropped_streams: bool = False) -> None:
        self.hold_start, self.no_streams, self.release_start, self.inside = hold_start, no_streams, threading.Event(), threading.Event()
        self.dropped_streams = dropped_streams
        self.asked: list[str] = []
        self.left: list[str] = []
        self.start_answered_to_a_caller_still_there: bool | None = None

    def _hold(self, method: str, context) -> None:
        self.inside.set()
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not context.is_active():
            self.left.append(method)

    def Check(self, request, context):
        self.asked.append("Check")
        self._hold("Check", context)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def RankMistakeNeurons(self, request, context):
        self.asked.append("RankMistakeNeurons")
        if self.hold_start:
            self.inside.set()
            self.release_start.wait(10)
            self.start_answered_to_a_caller_still_there = context.is_active()
        return neuroinspect_pb2.RankMistakeNeuronsResponse(operation=_running_operation("operations/x"))

    def GetOperation(self, request, context):
        self.asked.append("GetOperation")
        if self.dropped_streams:
            self.inside.set()
        return operations_pb2.GetOperationResponse(operation=_running_operation(request.name))

    def WaitOperation(self, request, context):
        self.asked.append("WaitOperation")
        self._hold("WaitOperation", context)
        return operations_pb2.WaitOperationResponse(operation=_running_operation(request.name))

    def WatchOperation(self, request, context):
        self.asked.append("WatchOperation")
        if self.no_streams:
            self.inside.set()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no thread for another stream")
        yield operations_pb2.WatchOperationResponse(operation=_running_operation(request.name))
        if self.dropped_streams:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        self._hold("WatchOperation", context)


def _serve_held_calls(servicer: _HeldCalls) -> tuple[grpc.Server, str]:
    def add(servicer: _HeldCalls, server: grpc.Server) -> None:
        neuroinspect_pb2_grpc.add_NeuroInspectServiceServicer_to_server(servicer, server)
        operations_pb2_grpc.add_OperationsServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)

    return _serve(servicer, add=add, threads=4)


@pytest.mark.parametrize("wait, held", [
    (lambda client, operation: client.rank_mistake_neurons("s", 3), "WaitOperation"),
    (lambda client, operation: client.result(operation), "WaitOperation"),
    (lambda client, operation: client.to_thread(operation.result), "WaitOperation"),
    (lambda client, operation: client.to_thread(operation.result, progress=True), "WatchOperation"),
    (lambda client, operation: client.wait_until_ready(60), "Check"),
], ids=["rank_mistake_neurons", "AsyncClient.result", "Operation.result", "Operation.result-progress", "wait_until_ready"])
def test_an_abandoned_wait_cancels_its_read_only_call_in_flight_and_frees_its_thread_at_once(wait, held):
    # The abandoned call's WaitOperation in flight held its thread until the server
    # answered (up to a minute), its watch stream until the job's next update, though the
    # call changed nothing on the server and nobody awaited its answer.
    servicer = _HeldCalls()
    server, target = _serve_held_calls(servicer)

    async def abandon_a_wait() -> float:
        async with AsyncClient(target, max_workers=1) as client:
            waiting = asyncio.ensure_future(wait(client, Operation(client.client, _running_operation("operations/x"))))
            await _until(servicer.inside.is_set, waiting)
            return await _seconds_to_free_the_thread(client, waiting)

    try:
        assert asyncio.run(abandon_a_wait()) < 5  # not the server's 10 s
        deadline = time.monotonic() + 5
        while servicer.left != [held]:  # the server sees its call end, at once
            assert time.monotonic() < deadline, servicer.left
            time.sleep(0.01)
    finally:
        server.stop(0)


def test_an_abandoned_calls_start_in_flight_runs_to_its_answer_and_makes_no_further_call():
    # A start may take effect: cancelled, the job it started would run on, its name unknown.
    servicer = _HeldCalls(hold_start=True)
    server, target = _serve_held_calls(servicer)

    async def abandon_a_start() -> None:
        async with AsyncClient(target, max_workers=1) as client:
            ranking = asyncio.ensure_future(client.rank_mistake_neurons("s", 3))
            await _until(servicer.inside.is_set, ranking)
            ranking.cancel()
            with pytest.raises(asyncio.CancelledError):
                await ranking
            await asyncio.sleep(0.2)  # the abandonment reaches the thread (a done callback)
            servicer.release_start.set()
            await client.to_thread(time.monotonic)  # on the one thread: once the abandoned ranking has left it

    try:
        asyncio.run(abandon_a_start())
        assert servicer.start_answered_to_a_caller_still_there is True
        assert servicer.asked == ["RankMistakeNeurons"]  # abandoned: no wait for the job it started
    finally:
        server.stop(0)


@pytest.mark.parametrize("dropped", [False, True], ids=["polling a busy server", "reopening a dropped stream"])
def test_an_abandoned_watch_ends_its_pause_at_once(monkeypatch, dropped):
    # A watch refused a stream polls the job, and one whose stream dropped reads the job
    # and opens it again after a pause; their pauses (as an Operation.wait's on a busy
    # server) held the abandoned call's thread to their end.
    monkeypatch.setattr(_operations, "WATCH_REOPEN_PAUSE_S" if dropped else "WATCH_POLL_INTERVAL_S", 30.0)
    servicer = _HeldCalls(dropped_streams=dropped, no_streams=not dropped)
    server, target = _serve_held_calls(servicer)

    async def abandon_a_polling_watch() -> float:
        async with AsyncClient(target, max_workers=1) as client:
            watching = asyncio.ensure_future(client.to_thread(Operation(client.client, _running_operation("operations/x")).result, progress=True))
            await _until(servicer.inside.is_set, watching)
            return await _seconds_to_free_the_thread(client, watching)

    try:
        assert asyncio.run(abandon_a_polling_watch()) < 5  # not after the 30 s pause
        assert servicer.asked == ["WatchOperation", "GetOperation"] if dropped else ["WatchOperation"]  # no poll, no stream again
    finally:
        server.stop(0)


class _BusyWaits(operations_pb2_grpc.OperationsServiceServicer, _LoadingSampleSets):
    """A job that never ends, whose WaitOperation a busy server refuses with ``code``, asking
    for a retry after 30 s, or, with ``code`` None, answers at once (every waiting slot taken)."""

    def __init__(self, code: grpc.StatusCode | None) -> None:
        _LoadingSampleSets.__init__(self, loading_s=0 if code is None else 3600, retry_delay_s=30,
                                    code=code or grpc.StatusCode.UNAVAILABLE)

    def WaitOperation(self, request, context):
        self._attempt("WaitOperation", context)
        return operations_pb2.WaitOperationResponse(operation=_running_operation(request.name))


@pytest.mark.parametrize("code", [None, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE],
                         ids=["answered at once", "RESOURCE_EXHAUSTED", "UNAVAILABLE"])
def test_an_abandoned_operation_wait_ends_its_busy_server_pause_at_once(monkeypatch, code):
    # Operation.wait pauses where a busy server answers its wait at once (its own backoff)
    # or refuses it asking for a delay (its call's retry): an abandoned await must cut the
    # pause short, not hold the client's thread to its end and then ask again.
    from explaind.client import _client

    monkeypatch.setattr(_operations, "BUSY_WAIT_MIN_PAUSE_S", 30.0)
    monkeypatch.setattr(_operations, "BUSY_WAIT_MAX_PAUSE_S", 30.0)
    pausing = threading.Event()
    sleep = _client._Cancellation.sleep

    def noting_the_pause(cancellation, seconds):
        pausing.set()
        return sleep(cancellation, seconds)

    monkeypatch.setattr(_client._Cancellation, "sleep", noting_the_pause)
    servicer = _BusyWaits(code)
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)

    async def abandon_a_pausing_wait() -> float:
        async with AsyncClient(target, max_workers=1) as client:
            waiting = asyncio.ensure_future(client.to_thread(Operation(client.client, _running_operation("operations/x")).wait))
            await _until(pausing.is_set, waiting)
            return await _seconds_to_free_the_thread(client, waiting)

    try:
        assert asyncio.run(abandon_a_pausing_wait()) < 5  # not after the 30 s pause
        assert servicer.attempts == {"WaitOperation": 1}  # no wait asked again
    finally:
        server.stop(0)
