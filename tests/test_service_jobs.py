"""Long jobs against a real server: streamed progress, cancellation, SIGKILL recovery."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import grpc
import numpy as np
import pytest

from conftest import limit_details, until_running
from explaind.client import AbortedError, CancelledError, Client, FailedPreconditionError, NotFoundError, Operation, OperationError
from explaind.v1 import (common_pb2, inference_pb2, inference_pb2_grpc, neuroinspect_pb2, neuroinspect_pb2_grpc, operations_pb2, operations_pb2_grpc,
                         sample_sets_pb2, sample_sets_pb2_grpc)
from test_service_api import _metric


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(jobs={"evaluate_batch_size": 4})


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as client:
        yield client


def _distinct_images(count: int, seed: int) -> np.ndarray:
    """(count, 64, 64, 3) uint8 noise: every image distinct, so none hits the feature cache."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, 64, 64, 3), dtype=np.uint8)


def _pngs(count: int) -> list[bytes]:
    import io

    from PIL import Image

    encoded = []
    for pixels in _distinct_images(count, 11):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def _long_set(client: Client, name: str, count: int = 1500, seed: int = 0) -> None:
    client.create_sample_set(_distinct_images(count, seed), [i % 6 for i in range(count)], sample_set_id=name)


def test_watch_streams_progress_then_cancel_stops_it_before_its_end(client):
    _long_set(client, "cancel-me")
    operation = client.evaluate_sample_set("cancel-me", batch_size=2)
    steps = []
    for update in operation.watch(timeout=120):
        if update.state == "running" and update.progress.total:
            steps.append(update.progress.step)
        if len(set(steps)) >= 3:
            break
    assert steps == sorted(steps) and len(set(steps)) >= 3
    assert operation.progress.total == 1500
    # Predict keeps flowing while the job runs.
    assert len(client.predict(_distinct_images(2, 99))) == 2
    assert client.operation(operation.name).state == "running"
    operation.cancel()
    operation.wait(timeout=30)
    # Stopped at a check between batches, not run to its end: no bound in seconds, which a
    # paused server on a loaded CI machine would break.
    assert operation.state == "cancelled"
    assert operation.progress.step < 1500
    with pytest.raises(OperationError, match="cancelled") as caught:
        operation.result()
    assert caught.value.code.name == "CANCELLED" and isinstance(caught.value, CancelledError)  # the code's typed error too
    assert operation.cancel_requested and operation.create_time <= operation.start_time <= operation.end_time


def test_a_zero_timeout_looks_at_the_server_once(client):
    # "Is it done yet?": result(timeout=0) raised "still queued" for a job long done, and
    # wait(timeout=0) kept the state this handle last saw, without asking.
    client.create_sample_set(_distinct_images(4, 5), [0, 1, 2, 3], sample_set_id="poll-once")
    for look_once in (lambda job: job.wait(timeout=-1).result(), lambda job: job.result(timeout=0),
                      lambda job: job.result(timeout=0, progress=True)):
        submitted = client.evaluate_sample_set("poll-once")
        seen = submitted.state
        client.operation(submitted.name).wait(timeout=60)  # done, as another handle sees
        assert seen in ("queued", "running") and submitted.state == seen
        assert look_once(submitted).sample_count == 4


def test_sigkill_during_a_job_marks_it_failed_after_restart_and_keeps_sample_sets(server, client):
    _long_set(client, "survivor", count=1200, seed=1)
    before = client.sample_set("survivor")
    first_samples = [np.asarray(s.image) for _, s in zip(range(3), client.samples("survivor"))]
    operation = client.evaluate_sample_set("survivor", batch_size=2)
    for update in operation.watch(timeout=120):
        if update.state == "running" and update.progress.step > 0:
            break
    client.create_sample_set(_distinct_images(4, 7), [0, 1, 2, 3], sample_set_id="uploaded-in-two", chunk_size=2)
    with grpc.insecure_channel(server.target) as channel:  # an upload the crash interrupts
        request = sample_sets_pb2.CreateSampleSetRequest(sample_set_id="interrupted", upload_continues=True, samples=[
            sample_sets_pb2.Sample(image=common_pb2.Image(encoded=png), label=0) for png in _pngs(2)])
        sample_sets_pb2_grpc.SampleSetServiceStub(channel).CreateSampleSet(request, timeout=30)
    server.kill()
    server.start()
    with Client(server.target, timeout=60) as restarted:
        # The restart deletes the interrupted upload, never a finished one.
        assert [s.sample_set_id for s in restarted.sample_sets() if s.sample_set_id in ("uploaded-in-two", "interrupted")] == ["uploaded-in-two"]
        after = restarted.operation(operation.name)
        assert after.state == "failed" and after.done and after.progress.message == "failed"  # it said "running" beside "failed"
        assert "restart" in after.error.details
        with pytest.raises(AbortedError, match="restart") as aborted:  # ABORTED: submit it again
            after.result()
        assert isinstance(aborted.value, OperationError)
        kept = restarted.sample_set("survivor")
        assert (kept.sample_count, kept.class_counts, kept.create_time) == (before.sample_count, before.class_counts, before.create_time)
        for kept_sample, original in zip(restarted.samples("survivor"), first_samples):
            np.testing.assert_array_equal(np.asarray(kept_sample.image), original)
        # The store still works after the crash: the job can simply be run again.
        assert restarted.evaluate_sample_set("survivor", batch_size=256).result(timeout=120).sample_count == 1200


def test_a_pipeline_with_its_own_request_ids_run_again_after_crashes_stores_each_image_once_and_runs_an_aborted_job_again(server, monkeypatch):
    # A monitoring pipeline names its upload and its evaluation (AIP-155). The server is
    # SIGKILLed mid-upload, then while the evaluation runs; each time the pipeline is run
    # again from the top with the same ids.
    images, labels = _distinct_images(600, 21), [i % 6 for i in range(600)]
    upload_id, evaluate_id = uuid.uuid4(), uuid.uuid4()

    def pipeline(client: Client) -> tuple[Any, Any]:
        created = client.create_sample_set(images, labels, sample_set_id="monitored", request_id=upload_id, chunk_size=150)
        return created, client.evaluate_sample_set("monitored", batch_size=2, request_id=evaluate_id)

    with Client(server.target, timeout=60) as crashing:
        original, sent = crashing._call, []

        def crash_after_two_appends(service: str, method: str, request: Any, **kwargs: Any) -> Any:
            answer = original(service, method, request, **kwargs)
            sent.append(method)
            if sent.count("AppendSamples") == 2:  # applied, then the server and the pipeline die
                server.kill()
                raise SystemExit("the pipeline died with its server")
            return answer

        monkeypatch.setattr(crashing, "_call", crash_after_two_appends)
        with pytest.raises(SystemExit):
            pipeline(crashing)
    server.start()
    with Client(server.target, timeout=60) as client:
        # The restart deleted the set left uploading, and its requests' ids with it: the
        # same ids create it afresh.
        with pytest.raises(NotFoundError):
            client.sample_set("monitored")
        created, first = pipeline(client)
        assert created.sample_count == 600 and not created.uploading
        for update in first.watch(timeout=120):
            if update.state == "running" and update.progress.step > 0:
                break
    server.kill()
    server.start()
    with Client(server.target, timeout=60) as client:
        assert client.operation(first.name).error.code.name == "ABORTED"
        again, second = pipeline(client)  # the aborted evaluation runs again, a new operation
        assert (again.uid, again.sample_count) == (created.uid, 600) and second.name != first.name
        assert second.result(timeout=120).sample_count == 600
        third_set, third = pipeline(client)  # and a further run gets it
        assert (third_set.uid, third.name) == (created.uid, second.name)
        stored = [np.asarray(sample.image) for sample in client.samples("monitored")]
        assert len(stored) == 600 and all(np.array_equal(a, b) for a, b in zip(stored, images))
        assert [s.sample_set_id for s in client.sample_sets()].count("monitored") == 1


def test_a_watch_the_restart_of_its_server_drops_ends_with_the_jobs_abort(server):
    # The dropped stream raised UNAVAILABLE; the job's own end (ABORTED: submit it again)
    # is what the caller needs, and the restarted server has it.
    with Client(server.target, timeout=60) as client:
        operation = client.visualize_neurons([3], method="feature_visualization", steps=10_000)
        states = []
        for update in operation.watch():
            states.append(update.state)
            if update.state == "running" and "restarted" not in states:
                states.append("restarted")
                server.kill()
                server.start(same_ports=True)
        assert states[-1] == "failed" and "restarted" in states and operation.error.code.name == "ABORTED"
        with pytest.raises(OperationError, match="restart"):
            operation.result()


def test_delete_operation_refuses_an_unfinished_job_and_forgets_a_finished_one(server):
    # After the restart above: the module's client points at the old port.
    with Client(server.target, timeout=60) as client:
        _delete_finished_and_unfinished(client)
    assert _metric(server, "explaind_operations_deleted_total", reason="request") == 2


def _delete_finished_and_unfinished(client: Client) -> None:
    client.create_sample_set(_distinct_images(8, 3), [i % 6 for i in range(8)], sample_set_id="delete-ops")
    finished = client.evaluate_sample_set("delete-ops")
    finished.result(timeout=60)
    assert [a.name for a in finished.artifacts] == ["mistakes.png"]
    _long_set(client, "delete-ops-long", count=600, seed=2)
    running = client.evaluate_sample_set("delete-ops-long", batch_size=2)
    with pytest.raises(FailedPreconditionError, match="cancel it and wait"):
        running.delete()
    running.cancel().wait(timeout=30)
    finished.delete()
    running.delete()
    for name in (finished.name, running.name):
        with pytest.raises(NotFoundError):
            client.operation(name)
        with pytest.raises(NotFoundError):
            client.delete_operation(name)
    assert not {finished.name, running.name} & {op.name for op in client.operations(limit=1000)}
    assert client.sample_set("delete-ops").sample_count == 8  # the set it read stays


def test_retention_deletes_ended_operations_and_their_files_at_start_up(server):
    with Client(server.target, timeout=60) as client:
        client.create_sample_set(_distinct_images(8, 4), [i % 6 for i in range(8)], sample_set_id="retained")
        operation = client.evaluate_sample_set("retained")
        operation.result(timeout=60)
        client.evaluate_sample_set("retained").result(timeout=60)  # a sweep of two operations, at least
        kept = client.operations(limit=1000)  # with this module's others, all past a retention of 86 µs once restarted
    grid = server.data_dir / "artifacts" / "sha256" / operation.artifacts[0].digest[:2] / operation.artifacts[0].digest
    assert grid.is_file()
    original = server.config.read_text()
    server.stop()
    assert "[jobs]\n" in original
    server.config.write_text(original.replace("[jobs]\n", "[jobs]\nretention_days = 1e-9\n"))  # 86 µs
    try:
        server.start()
        with Client(server.target, timeout=60) as restarted:
            with pytest.raises(NotFoundError):
                restarted.operation(operation.name)
            assert restarted.operations(state="succeeded") == []
            assert restarted.sample_set("retained").sample_count == 8
        assert not grid.exists()
        # One per operation deleted, not one per sweep.
        assert _metric(server, "explaind_operations_deleted_total", reason="retention") == len(kept) > 1
        assert _metric(server, "explaind_stored_files_deleted_total") >= 1
    finally:
        server.stop()
        server.config.write_text(original)
        server.start()


# Request identification (AIP-155) ------------------------------------------------------


def _identified_requests(sample_set_id: str) -> dict[str, Any]:
    """One request of each call that starts an operation, each with its own request_id."""
    return {
        "EvaluateSampleSet": inference_pb2.EvaluateSampleSetRequest(sample_set_id=sample_set_id, request_id=str(uuid.uuid4())),
        "RankMistakeNeurons": neuroinspect_pb2.RankMistakeNeuronsRequest(sample_set_id=sample_set_id, class_index=0, max_iterations=5,
                                                                         execution=neuroinspect_pb2.EXECUTION_OPERATION, request_id=str(uuid.uuid4())),
        "VisualizeNeurons": neuroinspect_pb2.VisualizeNeuronsRequest(pairs=[neuroinspect_pb2.NeuronClassPair(neuron=1, class_index=0)], steps=2,
                                                                     method=neuroinspect_pb2.VISUALIZATION_METHOD_FEATURE_VISUALIZATION,
                                                                     request_id=str(uuid.uuid4())),
        "EditHead": neuroinspect_pb2.EditHeadRequest(sample_set_id=sample_set_id, class_index=0, neurons=[1], max_epochs=1, request_id=str(uuid.uuid4())),
    }


def _send(target: str, method: str, request: Any) -> str:
    """``method`` with ``request`` as it is (no SDK in between); the operation's name."""
    return _start(target, method, request)[0]


def _start(target: str, method: str, request: Any) -> tuple[str, bool]:
    """:func:`_send`'s operation name, and whether the answer says the request_id had made
    that operation already (OperationMetadata.requested_again)."""
    with grpc.insecure_channel(target) as channel:
        if method == "EvaluateSampleSet":
            operation = inference_pb2_grpc.InferenceServiceStub(channel).EvaluateSampleSet(request, timeout=60).operation
        else:
            operation = getattr(neuroinspect_pb2_grpc.NeuroInspectServiceStub(channel), method)(request, timeout=60).operation
    metadata = operations_pb2.OperationMetadata()
    operation.metadata.Unpack(metadata)
    return operation.name, metadata.requested_again


def test_a_request_s_key_is_its_lower_cased_ids_and_a_fingerprint_of_the_rest_and_its_caller_not_of_its_run():
    # run_id names the run sending a start, not what it asks: another run's repeat is the same
    # request (answered with its operation, requested_by_another_run), and ids match whatever
    # their case; another named caller's same request is another request (README: "run_id").
    from explaind.service.auth import calling_as
    from explaind.service.convert import request_key

    request_id, run_a, run_b = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())

    def key(run_id: str, request_id: str = request_id):
        return request_key(inference_pb2.EvaluateSampleSetRequest(sample_set_id="identified", request_id=request_id, run_id=run_id))

    first = key(run_a.upper(), request_id.upper())
    assert (first.request_id, first.run_id) == (request_id, run_a)
    assert key(run_b).fingerprint == key("").fingerprint == first.fingerprint and key(run_b).run_id == run_b
    with calling_as("alice"):
        alices = key(run_a)
    with calling_as("bob"):
        bobs = key(run_a)
    assert len({first.fingerprint, alices.fingerprint, bobs.fingerprint}) == 3 and (alices.caller, bobs.caller) == ("alice", "bob")


def test_a_request_sent_again_with_its_request_id_gets_the_first_operation_even_after_a_restart(server):
    # A call starting an operation could not be repeated after a dropped connection: its
    # first attempt may have started it, and a second ran it again (an edit stored twice).
    from explaind.client._errors import from_rpc_error, named_operation

    with Client(server.target, timeout=60) as client:
        client.create_sample_set(_distinct_images(30, 21), [i % 6 for i in range(30)], sample_set_id="identified")
        before = {op.name for op in client.operations(limit=1000)}
        versions = len(client.head_versions())
    requests = _identified_requests("identified")
    answers = {method: _start(server.target, method, request) for method, request in requests.items()}
    first = {method: name for method, (name, _) in answers.items()}
    assert len(set(first.values())) == 4
    # Each answer says whether it is an earlier request's operation (a rerun still queued
    # looked like a new start): the first time not, the second time so.
    assert {method: _start(server.target, method, request) for method, request in requests.items()} == {
        method: (name, True) for method, name in first.items()} and not any(again for _, again in answers.values())
    with Client(server.target, timeout=60) as client:
        assert not any(client.operation(name).metadata.requested_again for name in first.values())  # only a start's answer
    with Client(server.target, timeout=60) as client:
        for name in first.values():
            assert client.operation(name).wait(timeout=120).state == "succeeded"
    server.stop()
    server.start()
    # Kept in the store, ended: still an earlier request's.
    assert {method: _start(server.target, method, request) for method, request in requests.items()} == {
        method: (name, True) for method, name in first.items()}
    with Client(server.target, timeout=60) as client:
        assert {op.name for op in client.operations(limit=1000)} - before == set(first.values())  # one job each
        assert len(client.head_versions()) == versions + 1  # one edit stored

    # Another request under a request_id: refused naming the field, whatever the call.
    changed = inference_pb2.EvaluateSampleSetRequest(sample_set_id="identified", batch_size=8, request_id=requests["EvaluateSampleSet"].request_id)
    other_call = inference_pb2.EvaluateSampleSetRequest(sample_set_id="identified", request_id=requests["EditHead"].request_id)
    for request, operation in ((changed, first["EvaluateSampleSet"]), (other_call, first["EditHead"])):
        with pytest.raises(grpc.RpcError) as caught:
            _send(server.target, "EvaluateSampleSet", request)
        error = from_rpc_error(caught.value)
        assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "request_id")
        assert f"was sent with another request, which created {operation}" in error.details
        assert named_operation(caught.value) == operation  # a google.rpc.ResourceInfo names it, for clients to read
    for malformed in ("not-a-uuid", "123e4567e89b42d3a456426614174000", "123e4567-e89b-42d3-a456-426614174000\n"):
        with pytest.raises(grpc.RpcError) as caught:
            _send(server.target, "EvaluateSampleSet", inference_pb2.EvaluateSampleSetRequest(sample_set_id="identified", request_id=malformed))
        error = from_rpc_error(caught.value)
        assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "request_id") and "is not a UUID" in error.details
    with pytest.raises(grpc.RpcError) as caught:  # the run sending it, kept out of the request's fingerprint, is checked too
        _send(server.target, "EvaluateSampleSet", inference_pb2.EvaluateSampleSetRequest(
            sample_set_id="identified", request_id=requests["EvaluateSampleSet"].request_id, run_id="not-a-uuid"))
    error = from_rpc_error(caught.value)
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "run_id") and "is not a UUID" in error.details
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as caught:  # and a cancel's, as it
        operations_pb2_grpc.OperationsServiceStub(channel).CancelOperation(operations_pb2.CancelOperationRequest(
            name=first["EvaluateSampleSet"], unless_asked_by_another_run_than="not-a-uuid"), timeout=60)
    error = from_rpc_error(caught.value)
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "unless_asked_by_another_run_than") and "is not a UUID" in error.details


class _DroppingProxy(grpc.GenericRpcHandler):
    """Passes unary calls on to ``target``, but answers the first call of each method in
    ``drop`` UNAVAILABLE, without a RetryInfo, once the server has answered it: what a
    client sees of a connection dropped after the server accepted its call."""

    def __init__(self, target: str, drop: set[str]) -> None:
        self._channel = grpc.insecure_channel(target)
        self._drop = set(drop)
        self.calls: list[str] = []

    def service(self, handler_call_details):
        method = handler_call_details.method

        def forward(request: bytes, context):
            self.calls.append(method.rsplit("/", 1)[1])
            try:
                response = self._channel.unary_unary(method)(request, timeout=context.time_remaining())
            except grpc.RpcError as error:
                context.set_trailing_metadata(error.trailing_metadata())
                context.abort(error.code(), error.details())
            if method.rsplit("/", 1)[1] in self._drop:
                self._drop.discard(method.rsplit("/", 1)[1])
                context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            return response

        return grpc.unary_unary_rpc_method_handler(forward)


def test_waiting_for_a_job_no_worker_takes_fails_naming_it_and_its_state():
    # until_running polled a job stuck queued (every worker busy, or none) until the test's
    # own timeout, 600 s, which names no job.
    class StuckQueued:
        name, state, done = "operations/stuck", "queued", False

        def refresh(self):
            return self

    with pytest.raises(AssertionError, match=r"^operations/stuck was still queued after 0 s: no worker took it"):
        until_running(StuckQueued(), limit_s=0)


def _filled_queue(client: Client, sample_set_id: str, seed: int, **evaluation: Any) -> tuple[Operation[Any], Operation[Any]]:
    """On a server of one queued place ([jobs].max_queued = 1), a visualisation running (for
    longer than any test) and an evaluation of a new set ``sample_set_id`` queued after it
    (with ``evaluation``'s arguments), filling the queue: (running, queued). No job has
    ended, so a full queue's refusal asks for the documented 10 s."""
    client.create_sample_set(_distinct_images(4, seed), [0, 1, 2, 3], sample_set_id=sample_set_id)
    running = client.visualize_neurons([3], method="no_clip", steps=10_000)
    until_running(running)  # not yet taken, it would fill the queue itself
    return running, client.evaluate_sample_set(sample_set_id, **evaluation)


def _refused_starts(server) -> float:
    """The EvaluateSampleSet calls ``server`` refused RESOURCE_EXHAUSTED: each attempt of the SDK's counts."""
    return _metric(server, "explaind_rpc_duration_seconds_count", method="EvaluateSampleSet", code="RESOURCE_EXHAUSTED")


def test_a_full_job_queue_s_refusal_says_when_to_retry_and_the_sdk_waits_that_long_until_the_deadline(server_factory):
    # A pipeline refused for a full queue got RESOURCE_EXHAUSTED "retry later" and no
    # RetryInfo: the SDK's retry_delay (the CLI's retry_delay_seconds) was None. Then the
    # SDK retried no RESOURCE_EXHAUSTED, a RetryInfo's neither: the start failed at once.
    from google.rpc import error_details_pb2, status_pb2

    from explaind.client import ResourceExhaustedError

    server = server_factory(jobs={"max_queued": 1})
    with Client(server.target, timeout=60) as client:
        running, queued = _filled_queue(client, "full-queue", 31)
        try:
            with Client(server.target, retry=False) as unretried:
                with pytest.raises(ResourceExhaustedError, match=r"job queue is full \(1 queued, limit 1\)") as caught:
                    unretried.evaluate_sample_set("full-queue")
            assert caught.value.retry_delay == 10.0  # no job has ended yet: the documented guess
            assert _refused_starts(server) == 1 and not getattr(caught.value, "__notes__", None)  # tried once
            # Retried, after the 10 s asked for (not the backoff's 0.1 s doubling, 5 tries in 2 s),
            # cut to a last try just before the deadline: the server's own refusal, saying so.
            with Client(server.target, timeout=2) as brief, pytest.raises(ResourceExhaustedError) as waited:
                brief.evaluate_sample_set("full-queue")
            assert _refused_starts(server) == 1 + 2
            assert (waited.value.reason, waited.value.quota_violations, waited.value.retry_delay) == (
                "QUEUED_JOBS_EXCEEDED", [("server", "jobs queued")], 10.0)
            assert re.fullmatch(rf"the call was tried 2 times over [12]\.\ds, the server at {re.escape(server.target)} without room for it each "
                                r"time \(RESOURCE_EXHAUSTED with a retry delay: it did nothing with the call\); a larger timeout waits "
                                r"longer for room \(timeout= of the Client or of the call; --timeout in the CLI\)", waited.value.__notes__[-1])
            assert {operation.name for operation in client.operations(limit=1000)} == {queued.name, running.name}  # none refused started one
            with pytest.raises(grpc.RpcError) as refused:  # what any gRPC client reads
                _send(server.target, "EvaluateSampleSet", inference_pb2.EvaluateSampleSetRequest(sample_set_id="full-queue"))
            status = status_pb2.Status.FromString(dict(refused.value.trailing_metadata())["grpc-status-details-bin"])
            retry_info = error_details_pb2.RetryInfo()
            assert [detail.Unpack(retry_info) for detail in status.details] == [False, False, True] and retry_info.retry_delay.seconds == 10
            # Beside it, which limit (AIP-193): the ErrorInfo and the QuotaFailure.
            assert limit_details(status) == ("QUEUED_JOBS_EXCEEDED", {"setting": "[jobs].max_queued", "limit": "1"}, [("server", "jobs queued")])
            assert (caught.value.reason, caught.value.quota_violations) == ("QUEUED_JOBS_EXCEEDED", [("server", "jobs queued")])
        finally:
            for operation in (queued, running):
                operation.cancel()


def test_a_start_a_full_queue_refused_is_sent_again_after_its_delay_and_starts_one_job_once_a_place_frees(server_factory):
    # The SDK retried no RESOURCE_EXHAUSTED: a start refused for a full queue failed at
    # once, though its RetryInfo said the server did nothing with it and a place would free.
    from concurrent.futures import ThreadPoolExecutor

    server = server_factory(jobs={"max_queued": 1})
    with Client(server.target, timeout=60) as client:
        # No job has ended: the refusal asks for 10 s (the documented guess), ample time for the
        # cancel below to free a place before the retry however loaded the machine (a job's
        # run time, 1 s, left a cancel slower than that a second refusal).
        running, queued = _filled_queue(client, "draining", 41)
        before = {operation.name for operation in client.operations(limit=1000)}
        started = None
        try:
            with ThreadPoolExecutor(1) as pool:
                submitted = time.monotonic()
                start = pool.submit(client.evaluate_sample_set, "draining")
                deadline = time.monotonic() + 30
                while _refused_starts(server) == 0:  # refused once, waiting out the delay
                    assert time.monotonic() < deadline and not start.done(), start
                    time.sleep(0.05)
                queued.cancel()  # a place frees
                started = start.result(timeout=60)
            assert time.monotonic() - submitted >= 10  # the delay asked for, not the backoff's 0.1 s
            assert {operation.name for operation in client.operations(limit=1000)} - before == {started.name}  # one job, no duplicate
            assert started.name not in before and not started.requested_again  # the refused attempt did nothing
            assert _refused_starts(server) == 1
        finally:
            for operation in (queued, running, started):
                if operation is not None:
                    operation.cancel()


def test_an_async_start_abandoned_in_a_full_queue_s_retry_pause_frees_its_thread_at_once_and_starts_no_job(server_factory):
    # An AsyncClient start whose await was cancelled kept retrying in its thread: sent again
    # after the refusal's 10 s, once a place had freed, it started a job nobody awaited.
    import asyncio

    from explaind.client import AsyncClient

    server = server_factory(jobs={"max_queued": 1})
    with Client(server.target, timeout=60) as client:
        running, queued = _filled_queue(client, "abandoned", 43)  # a refusal asks for 10 s, which the abandoned start does not wait out
        before = {operation.name for operation in client.operations(limit=1000)}

        async def abandon_a_refused_start() -> float:
            async with AsyncClient(server.target, timeout=60, max_workers=1) as async_client:
                start = asyncio.ensure_future(async_client.evaluate_sample_set("abandoned"))
                deadline = time.monotonic() + 30
                while _refused_starts(server) == 0:  # refused once, pausing for the delay
                    assert time.monotonic() < deadline and not start.done(), start
                    await asyncio.sleep(0.05)
                start.cancel()
                abandoned = time.monotonic()
                queued.cancel()  # a place frees, for a retry to take
                await async_client.to_thread(time.monotonic)  # on the one thread: once the abandoned start has left it
                return time.monotonic() - abandoned

        try:
            assert asyncio.run(abandon_a_refused_start()) < 5  # not after the 10 s pause
            assert {operation.name for operation in client.operations(limit=1000)} == before  # no job started
            assert _refused_starts(server) == 1  # and no further attempt
        finally:
            for operation in (queued, running):
                operation.cancel()


def test_a_full_queue_gives_a_repeated_request_id_its_job_and_refuses_another_request_under_it_naming_that_job(server_factory, capsys):
    # A full queue's refusal (RetryInfo) must not shadow a request_id's: a repeat still gets
    # the job it queued, and the id sent with another request is INVALID_ARGUMENT naming that
    # job (the CLI's --json operation), with no retry delay: waiting would not help.
    import json

    from explaind.client import InvalidArgumentError
    from explaind.client.cli import main

    server = server_factory(jobs={"max_queued": 1})
    request_id = str(uuid.uuid4())
    with Client(server.target, timeout=60) as client:
        running, queued = _filled_queue(client, "full-rerun", 37, request_id=request_id)
        try:
            assert client.evaluate_sample_set("full-rerun", request_id=request_id).name == queued.name
            with pytest.raises(InvalidArgumentError) as refused:
                client.evaluate_sample_set("full-rerun", batch_size=8, request_id=request_id)
            assert refused.value.operation is not None and refused.value.operation.name == queued.name
            assert refused.value.retry_delay is None
            capsys.readouterr()
            assert main(["--target", server.target, "evaluate", "full-rerun", "--no-wait", "--json", "--request-id", request_id]) == 0
            assert json.loads(capsys.readouterr().out)["operation"] == queued.name
            assert main(["--target", server.target, "evaluate", "full-rerun", "--batch-size", "8", "--json", "--request-id", request_id]) == 1
            error = json.loads(capsys.readouterr().out)["error"]
            assert (error["code"], error["option"], error["operation"], error["retry_delay_seconds"]) == (
                "INVALID_ARGUMENT", "--request-id", queued.name, None), error
            # Still running: the queue stayed full throughout (a machine that ended this job first would pass on an empty queue).
            assert not running.refresh().done
        finally:
            for operation in (queued, running):
                operation.cancel()


def test_a_call_whose_answer_a_dropped_connection_lost_is_sent_again_and_starts_one_operation(server):
    from concurrent.futures import ThreadPoolExecutor

    with Client(server.target, timeout=60) as client:
        client.create_sample_set(_distinct_images(30, 23), [i % 6 for i in range(30)], sample_set_id="answer-lost")
        before = {op.name for op in client.operations(limit=1000)}
        versions = len(client.head_versions())
    proxy = _DroppingProxy(server.target, {"EvaluateSampleSet", "EditHead", "VisualizeNeurons", "RankMistakeNeurons"})
    relay = grpc.server(ThreadPoolExecutor(4), handlers=[proxy])
    port = relay.add_insecure_port("127.0.0.1:0")
    relay.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:  # the first call of this client is the one dropped
            evaluation = client.evaluate_sample_set("answer-lost")
            edit = client.edit_head("answer-lost", 0, [1], max_epochs=1)
            visualization = client.visualize_neurons([3], method="no_clip", steps=1)
            ranking = client._start_ranking("answer-lost", 0, execution="operation")
            assert evaluation.result(timeout=120).sample_count == 30 and edit.result(timeout=120).version.version_id
            assert visualization.result(timeout=120).visualizations and ranking.result(timeout=120).class_name
    finally:
        relay.stop(0)
    started = (evaluation, edit, visualization, ranking)
    assert [proxy.calls.count(method) for method in ("EvaluateSampleSet", "EditHead", "VisualizeNeurons", "RankMistakeNeurons")] == [2, 2, 2, 2]
    # The retry's answer is the job its own lost attempt started: not an earlier request's.
    assert not any(operation.requested_again for operation in started)
    with Client(server.target, timeout=60) as client:
        assert {op.name for op in client.operations(limit=1000)} - before == {operation.name for operation in started}
        assert len(client.head_versions()) == versions + 1


def test_a_cli_start_under_a_new_request_id_whose_answer_was_lost_says_it_started_its_queued_job(server, capsys):
    # The SDK's retry got the job its own first attempt queued, which the server's answer
    # says was requested again: the CLI said "started by an earlier run with this --request-id".
    from concurrent.futures import ThreadPoolExecutor

    from explaind.client.cli import main

    proxy = _DroppingProxy(server.target, {"EvaluateSampleSet"})
    relay = grpc.server(ThreadPoolExecutor(4), handlers=[proxy])
    port = relay.add_insecure_port("127.0.0.1:0")
    relay.start()
    with Client(server.target, timeout=60) as client:
        client.create_sample_set(_distinct_images(6, 29), [i % 6 for i in range(6)], sample_set_id="answer-lost-cli")
        ahead = client.visualize_neurons([3], method="no_clip", steps=10_000)  # one worker: the evaluation queues behind it
        try:
            capsys.readouterr()
            assert main(["--target", f"127.0.0.1:{port}", "evaluate", "answer-lost-cli", "--no-wait", "--request-id", str(uuid.uuid4())]) == 0
            printed = capsys.readouterr()
            name = printed.out.strip()
            assert proxy.calls.count("EvaluateSampleSet") == 2 and client.operation(name).state == "queued"
            assert printed.err == f"started {name}; explaind operations wait {name} waits for it\n", printed.err
            client.operation(name).cancel()
        finally:
            ahead.cancel()
            relay.stop(0)


def test_an_upload_whose_answers_a_dropped_connection_lost_ends_with_each_image_once(server):
    # A dropped answer to CreateSampleSet or AppendSamples lost the whole upload: sent
    # again, a create was ALREADY_EXISTS and an append added its samples twice.
    from concurrent.futures import ThreadPoolExecutor

    images = _distinct_images(30, 31)
    labels = [i % 6 for i in range(30)]
    with Client(server.target, timeout=60) as client:
        before = {s.sample_set_id for s in client.sample_sets()}
    proxy = _DroppingProxy(server.target, {"CreateSampleSet", "AppendSamples"})
    relay = grpc.server(ThreadPoolExecutor(4), handlers=[proxy])
    port = relay.add_insecure_port("127.0.0.1:0")
    relay.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            assert "sample_set_request_id" in client.model_metadata().capabilities
            created = client.create_sample_set(images, labels, sample_set_id="answers-lost", chunk_size=10)
            assert (created.sample_count, created.uploading) == (30, False)
            proxy._drop = {"AppendSamples"}
            assert client.append_samples("answers-lost", images[:12], labels[:12], chunk_size=5).sample_count == 42
            # A set the server names: a repeat gets it, not a second one.
            proxy._drop = {"CreateSampleSet"}
            named = client.create_sample_set(images[:3], labels[:3])
    finally:
        relay.stop(0)
    assert proxy.calls.count("CreateSampleSet") == 4 and proxy.calls.count("AppendSamples") == 2 + 1 + 3 + 1
    with Client(server.target, timeout=60) as client:
        stored = list(client.samples("answers-lost"))
        assert [s.label for s in stored] == labels + labels[:12]
        assert all(np.array_equal(np.asarray(s.image), pixels) for s, pixels in zip(stored, [*images, *images[:12]]))
        assert {s.sample_set_id for s in client.sample_sets()} - before == {"answers-lost", named.sample_set_id}  # no second set
        assert client.sample_set(named.sample_set_id).sample_count == 3
        client.delete_sample_set(named.sample_set_id)


def test_an_upload_request_sent_again_with_its_request_id_is_applied_once_and_another_under_it_refused(server):
    from explaind.client._errors import from_rpc_error

    def sample(index: int) -> sample_sets_pb2.Sample:
        return sample_sets_pb2.Sample(image=common_pb2.Image(encoded=_pngs(4)[index]), label=index)

    create = sample_sets_pb2.CreateSampleSetRequest(sample_set_id="resent", samples=[sample(0)], upload_continues=True,
                                                    request_id=str(uuid.uuid4()))
    with grpc.insecure_channel(server.target) as channel:
        stub = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        first = stub.CreateSampleSet(create, timeout=60).sample_set
        assert stub.CreateSampleSet(create, timeout=60).sample_set == first  # not ALREADY_EXISTS
        append = sample_sets_pb2.AppendSamplesRequest(sample_set_id="resent", samples=[sample(1), sample(2)], finish_upload=True,
                                                      sample_set_uid=first.uid, request_id=str(uuid.uuid4()))
        for _ in range(3):
            appended = stub.AppendSamples(append, timeout=60).sample_set
            assert (appended.sample_count, appended.uploading, dict(appended.class_counts)) == (3, False, {0: 1, 1: 1, 2: 1})
        changed_create = sample_sets_pb2.CreateSampleSetRequest(sample_set_id="resent", samples=[sample(3)], request_id=create.request_id)
        changed_append = sample_sets_pb2.AppendSamplesRequest(sample_set_id="resent", samples=[sample(3)], request_id=append.request_id)
        for method, request in (("CreateSampleSet", changed_create), ("AppendSamples", changed_append),
                                ("AppendSamples", sample_sets_pb2.AppendSamplesRequest(sample_set_id="resent", samples=[sample(3)],
                                                                                       request_id="not-a-uuid"))):
            with pytest.raises(grpc.RpcError) as caught:
                getattr(stub, method)(request, timeout=60)
            error = from_rpc_error(caught.value)
            assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "request_id"), error
            assert "was sent with another request, which was applied to sample set 'resent'" in error.details or "is not a UUID" in error.details
        assert stub.GetSampleSet(sample_sets_pb2.GetSampleSetRequest(sample_set_id="resent"), timeout=60).sample_set.sample_count == 3
        stub.DeleteSampleSet(sample_sets_pb2.DeleteSampleSetRequest(sample_set_id="resent"), timeout=60)
        # Forgotten with its set: the request makes a new one.
        assert stub.CreateSampleSet(create, timeout=60).sample_set.uid != first.uid


def test_a_sample_sets_uid_is_derived_as_released_versions_derived_it():
    # Not stored but derived from the id and creation time: a derivation changed by an
    # upgrade would turn every uid a caller kept (for sample_set_uid=) into a
    # FAILED_PRECONDITION. The literal is what released versions answer for this set.
    from explaind.store.base import sample_set_uid

    assert sample_set_uid("shapes-eval", 1764547200.25) == "4e3289d5-df81-5937-9087-a0d5507b388c"
    assert len({sample_set_uid("shapes-eval", 1764547200.25), sample_set_uid("shapes-eval", 1764547200.5),
                sample_set_uid("shapes-eval2", 1764547200.25)}) == 3
