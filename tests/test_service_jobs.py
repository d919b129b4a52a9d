"""Long jobs against a real server: streamed progress, cancellation, SIGKILL recovery."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from explaind.client import Client, OperationError
from explaind.v1 import common_pb2, sample_sets_pb2, sample_sets_pb2_grpc


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


def test_watch_streams_progress_then_cancel_stops_within_a_second(client):
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
    cancelled_at = time.monotonic()
    operation.cancel()
    operation.wait(timeout=30)
    assert time.monotonic() - cancelled_at < 1.0
    assert operation.state == "cancelled"
    assert operation.progress.step < 1500
    with pytest.raises(OperationError, match="cancelled") as caught:
        operation.result()
    assert caught.value.code.name == "CANCELLED"


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
        assert after.state == "failed" and after.done
        assert "restart" in after.error.details
        with pytest.raises(OperationError, match="restart"):
            after.result()
        kept = restarted.sample_set("survivor")
        assert (kept.sample_count, kept.class_counts, kept.create_time) == (before.sample_count, before.class_counts, before.create_time)
        for kept_sample, original in zip(restarted.samples("survivor"), first_samples):
            np.testing.assert_array_equal(np.asarray(kept_sample.image), original)
        # The store still works after the crash: the job can simply be run again.
        assert restarted.evaluate_sample_set("survivor", batch_size=256).result(timeout=120).sample_count == 1200
