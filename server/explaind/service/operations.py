"""OperationsService: get, list, cancel, wait for, watch and delete jobs; download artifacts."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from explaind.v1 import operations_pb2, operations_pb2_grpc
from google.longrunning import operations_pb2 as lro_pb2
from google.protobuf import duration_pb2

from ..errors import InvalidArgument, NotFound, ResourceExhausted
from ..jobs import JobManager
from ..store import JobRecord
from . import audit, convert
from .auth import current_caller
from .interceptors import HeldCalls, response_bytes_quota
from .paging import listing_name, messages_that_fit, page_limit, resume_point, resume_token


# google.protobuf.Duration's documented range: about 10,000 years.
_MAX_DURATION_S = 315_576_000_000
# Room in a GetArtifact response for everything but the content (the Artifact
# description and framing), so a range of max_message_bytes - this always fits; half of
# a smaller limit (the whole of it left ranges of 1 byte).
_ARTIFACT_HEADROOM_BYTES = 64 * 1024


def _wait_timeout(duration: duration_pb2.Duration) -> float:
    """Seconds to wait; a negative or malformed Duration is the caller's mistake, not INTERNAL."""
    seconds, nanos = duration.seconds, duration.nanos
    if seconds * nanos < 0:  # (1 s, -5 ns) is no duration at all, not a negative one
        raise InvalidArgument(f"{seconds}s {nanos}ns mixes signs: google.protobuf.Duration's seconds and nanos must have the same sign",
                              field="timeout")
    if seconds < 0 or nanos < 0:
        raise InvalidArgument("must not be negative (0 returns the operation at once)", field="timeout")
    if seconds > _MAX_DURATION_S or nanos > 999_999_999:
        raise InvalidArgument(f"{seconds}s {nanos}ns is outside google.protobuf.Duration's range (at most {_MAX_DURATION_S}s)", field="timeout")
    return seconds + nanos / 1e9


class OperationsServicer(operations_pb2_grpc.OperationsServiceServicer):
    def __init__(self, jobs: JobManager, *, max_message_bytes: int, held_calls: HeldCalls) -> None:
        self._jobs = jobs
        self._held_calls = held_calls
        self._max_message_bytes = max_message_bytes
        self._max_content_bytes = max(1, max_message_bytes - min(_ARTIFACT_HEADROOM_BYTES, max_message_bytes // 2))

    def GetOperation(self, request, context: grpc.ServicerContext) -> operations_pb2.GetOperationResponse:
        return operations_pb2.GetOperationResponse(operation=convert.operation(self._jobs.get(convert.job_id(request.name))))

    def ListOperations(self, request, context: grpc.ServicerContext) -> operations_pb2.ListOperationsResponse:
        state = ""
        if request.state:
            if request.state not in convert.STATE_NAMES:
                raise convert.unknown_enum_value(operations_pb2.OperationState, request.state, "state")
            state = convert.STATE_NAMES[request.state]
        listing = listing_name("operations", owner=request.owner, kind=request.kind, state=state)
        after, limit = resume_point(request.page_token, listing), page_limit(request.page_size, 100, 1000)
        if request.view not in operations_pb2.OperationView.values():
            raise convert.unknown_enum_value(operations_pb2.OperationView, request.view, "view")
        # Results can be large (an evaluation's mistakes, up to half the message limit each):
        # the page is listed without them and each is read as the page fills, so a page of
        # a thousand reads only those it sends.
        snapshots = self._jobs.list(kind=request.kind, state=state, owner=request.owner, after=after, limit=limit, responses=False)
        response = request.view != operations_pb2.OPERATION_VIEW_BASIC
        converted: list[JobRecord] = []  # the jobs of the messages made, in order

        def messages() -> Iterator[lro_pb2.Operation]:
            for snapshot in snapshots:
                if response:
                    try:
                        snapshot = self._jobs.response(snapshot)
                    except NotFound:  # deleted since it was listed: read on past it, as JobManager.list does
                        continue
                converted.append(snapshot.record)
                yield convert.operation(snapshot, response=response)

        operations = messages_that_fit(messages(), self._max_message_bytes)
        if len(operations) < len(converted):  # the page ended early, at the size limit
            last: JobRecord | None = converted[len(operations) - 1]
        else:
            last = snapshots[-1].record if len(snapshots) == limit else None
        return operations_pb2.ListOperationsResponse(
            operations=operations,
            next_page_token=resume_token(listing, last.create_time, last.job_id) if last is not None else "",
        )

    def CancelOperation(self, request, context: grpc.ServicerContext) -> operations_pb2.CancelOperationResponse:
        run_id = convert.run_id_of(request.unless_asked_by_another_run_than, "unless_asked_by_another_run_than")
        snapshot, changed = self._jobs.request_cancel(convert.job_id(request.name), caller=current_caller(),
                                                      unless_asked_by_another_run_than=run_id)
        if not changed:
            audit.unchanged()
        return operations_pb2.CancelOperationResponse(operation=convert.operation(snapshot))

    def WaitOperation(self, request, context: grpc.ServicerContext) -> operations_pb2.WaitOperationResponse:
        job_id = convert.job_id(request.name)
        timeout = _wait_timeout(request.timeout) if request.HasField("timeout") else None
        remaining = context.time_remaining()
        if remaining is not None and (timeout is None or remaining < timeout):
            # Answer before the caller's deadline, with room for a busy server to do so
            # (a job computing in this process delays the waiting thread's wake-up).
            timeout = max(0.0, remaining - min(0.5, remaining / 4))
        with self._held_calls.slot(caller=current_caller()) as held:
            # Best effort, as google.longrunning's WaitOperation: with every waiting slot
            # taken, the current state at once (the SDK then polls with backoff).
            snapshot = self._jobs.wait(job_id, timeout if held else 0.0, is_active=context.is_active)
        return operations_pb2.WaitOperationResponse(operation=convert.operation(snapshot))

    def WatchOperation(self, request, context: grpc.ServicerContext) -> Iterator[operations_pb2.WatchOperationResponse]:
        # A preview goes in the first message and then only when it changes, not with each
        # progress update: a grid of 16 images of 224² in every message streamed 55 MB for a
        # 5 s job.
        sent_preview = None
        for snapshot in self._jobs.watch(convert.job_id(request.name), is_active=context.is_active):
            yield operations_pb2.WatchOperationResponse(operation=convert.operation(snapshot, preview=snapshot.preview != sent_preview))
            sent_preview = snapshot.preview

    def GetArtifact(self, request, context: grpc.ServicerContext) -> operations_pb2.GetArtifactResponse:
        snapshot = self._jobs.get(convert.job_id(request.name))
        names = [a.name for a in snapshot.record.artifacts]
        if not request.artifact:
            raise InvalidArgument(f"required; the operation has {names}", field="artifact")
        for artifact in snapshot.record.artifacts:
            if artifact.name == request.artifact:
                offset, length = self._artifact_range(request, artifact.size_bytes)
                return operations_pb2.GetArtifactResponse(
                    artifact=operations_pb2.Artifact(name=artifact.name, media_type=artifact.media_type, digest=artifact.digest, size_bytes=artifact.size_bytes),
                    content=self._jobs.store.get_blob(artifact.digest, offset=offset, length=length, size=artifact.size_bytes),
                )
        raise NotFound(f"operation has no artifact {request.artifact!r}; it has {names}", field="artifact")

    def DeleteOperation(self, request, context: grpc.ServicerContext) -> operations_pb2.DeleteOperationResponse:
        self._jobs.delete(convert.job_id(request.name), caller=current_caller())
        return operations_pb2.DeleteOperationResponse()

    def _artifact_range(self, request: operations_pb2.GetArtifactRequest, size: int) -> tuple[int, int]:
        """(offset, length) of the requested bytes; a range one response cannot carry is
        refused rather than cut, so no client mistakes a prefix for the artifact."""
        if not 0 <= request.offset <= size:
            raise InvalidArgument(f"{request.offset} is not in [0, {size}] (the artifact's size in bytes)", field="offset")
        if request.max_bytes < 0:
            raise InvalidArgument(f"must not be negative, got {request.max_bytes} (0 means to the end)", field="max_bytes")
        remaining = size - request.offset
        length = min(request.max_bytes, remaining) if request.max_bytes else remaining
        if length > self._max_content_bytes:
            raise ResourceExhausted(
                f"{length} bytes do not fit in one response (at most {self._max_content_bytes}); read the artifact "
                f"in ranges with offset and max_bytes", field="max_bytes", quota=response_bytes_quota(self._max_content_bytes))
        return request.offset, length


