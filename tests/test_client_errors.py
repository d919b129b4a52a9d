"""How the SDK turns a failed call's status into its typed exception, without a server:
each test failed against a small change to explaind.client._errors that the tests of the
SDK against a server let through."""

from __future__ import annotations

import pickle
import types

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

import explaind.client
from explaind.client import ExplaindError, InvalidArgumentError, NotFoundError, OperationError, UnavailableError
from explaind.client._errors import error_from_code, from_rpc_error, operation_error, reworded


def _packed(detail: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


class _Refused(grpc.RpcError):
    """A failed call as grpc raises it: its code, message and status details."""

    def __init__(self, code: grpc.StatusCode, message: str, *details: Message) -> None:
        self._code, self._message = code, message
        self._status = status_pb2.Status(code=code.value[0], message=message, details=[_packed(detail) for detail in details])

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


def _retry_info(seconds: int, nanos: int) -> error_details_pb2.RetryInfo:
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos))


def test_the_retry_delay_is_the_retry_infos_in_seconds_and_none_without_one():
    # A loading server's UNAVAILABLE: the delay decides whether and when a call is repeated,
    # so another detail must not read as "retry at once", nor a delay lose its fraction.
    bad_request = error_details_pb2.BadRequest(field_violations=[{"field": "top_k", "description": "too large"}])
    loading = from_rpc_error(_Refused(grpc.StatusCode.UNAVAILABLE, "loading", bad_request, _retry_info(1, 500_000_000)))
    assert isinstance(loading, UnavailableError) and loading.retry_delay == 1.5
    refused = from_rpc_error(_Refused(grpc.StatusCode.INVALID_ARGUMENT, "top_k: too large", bad_request))
    assert refused.retry_delay is None and refused.field_violations == [("top_k", "too large")]


def test_the_field_of_an_error_info_is_taken_from_explaind_only_and_only_where_it_names_one():
    # A proxy in front of the server (an API gateway) may add its own ErrorInfo, whose
    # metadata means something else; an explaind ErrorInfo without a field names none.
    foreign = error_details_pb2.ErrorInfo(reason="QUOTA", domain="gateway.example.com", metadata={"field": "x-api-key"})
    fieldless = error_details_pb2.ErrorInfo(reason="NOT_FOUND", domain="explaind.v1")
    named = error_details_pb2.ErrorInfo(reason="NOT_FOUND", domain="explaind.v1", metadata={"field": "sample_set_id"})
    assert from_rpc_error(_Refused(grpc.StatusCode.NOT_FOUND, "gone", foreign, fieldless)).field is None
    error = from_rpc_error(_Refused(grpc.StatusCode.NOT_FOUND, "gone", foreign, fieldless, named))
    assert isinstance(error, NotFoundError) and error.field == "sample_set_id" and error.field_violations == []


def test_a_limit_s_reason_and_quota_violations_are_read_from_explaind_s_details_and_none_from_an_older_server():
    # Clients told one RESOURCE_EXHAUSTED from another by the setting in its message; the
    # reason is explaind's ErrorInfo's, not a proxy's, nor the code name that a server
    # older than the reasons (or one naming a field alone) sends.
    foreign = error_details_pb2.ErrorInfo(reason="RATE_LIMIT_EXCEEDED", domain="gateway.example.com")
    limit = error_details_pb2.ErrorInfo(reason="SAMPLES_PER_CALLER_EXCEEDED", domain="explaind.v1",
                                        metadata={"field": "samples", "setting": "[server].max_samples_per_caller", "limit": "10"})
    quota = error_details_pb2.QuotaFailure(violations=[{"subject": "caller:alice", "description": "samples in this caller's sets"}])
    error = from_rpc_error(_Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many", foreign, limit, quota))
    assert (error.reason, error.field, error.quota_violations) == ("SAMPLES_PER_CALLER_EXCEEDED", "samples", [("caller:alice", "samples in this caller's sets")])
    older = error_details_pb2.ErrorInfo(reason="RESOURCE_EXHAUSTED", domain="explaind.v1", metadata={"field": "samples"})
    error = from_rpc_error(_Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many", foreign, older))
    assert (error.reason, error.field, error.quota_violations) == (None, "samples", [])
    assert (from_rpc_error(_Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many")).reason, ExplaindError("boom").quota_violations) == (None, [])


def test_a_status_s_reason_and_each_quota_failure_s_violations_are_read_as_a_call_s_are():
    # A google.rpc.Status the SDK reads itself (a partial_failure Predict's per-image
    # error) carries the limit as a call's trailers do; a proxy may add a QuotaFailure of
    # its own beside the server's, and neither is dropped.
    from google.rpc import status_pb2

    from explaind.client._errors import error_from_status

    status = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="images[0]: full")
    for detail in (error_details_pb2.ErrorInfo(reason="QUEUED_IMAGES_EXCEEDED", domain="explaind.v1"),
                   error_details_pb2.QuotaFailure(violations=[{"subject": "server", "description": "images waiting"}]),
                   error_details_pb2.QuotaFailure(violations=[{"subject": "project:p", "description": "requests per minute"}])):
        status.details.add().Pack(detail)
    error = error_from_status(status, rename=lambda text: text.replace("images[0]", "images[3]"))
    assert (error.code, error.details, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "images[3]: full", "QUEUED_IMAGES_EXCEEDED")
    assert error.quota_violations == [("server", "images waiting"), ("project:p", "requests per minute")]


def test_an_rpc_error_without_a_status_is_an_unknown_error_with_its_message():
    # grpc.RpcError itself (as an interceptor or a test double raises it) has no code(),
    # details() or trailing metadata.
    error = from_rpc_error(grpc.RpcError("the channel broke"))
    assert type(error) is ExplaindError and error.code == grpc.StatusCode.UNKNOWN
    assert str(error) == "UNKNOWN: the channel broke"
    assert (error.field, error.field_violations, error.retry_delay) == (None, [], None)


def test_an_explaind_error_raised_without_a_code_is_unknown():
    # As a caller's stand-in for the SDK in their own tests raises it.
    error = ExplaindError("boom")
    assert error.code == grpc.StatusCode.UNKNOWN and str(error) == "UNKNOWN: boom"


def test_an_error_pickles_as_a_process_pool_returns_it_keeping_its_type_and_fields():
    # A job's error (an OperationError subclass made per code) could not be pickled: a
    # ProcessPoolExecutor's worker returned a PicklingError in place of it.
    refused = operation_error(grpc.StatusCode.INVALID_ARGUMENT, "group_attribute: no sample has it", [("group_attribute", "no sample has it")])
    unknown = operation_error(grpc.StatusCode.UNKNOWN, "why")
    missing = error_from_code(grpc.StatusCode.NOT_FOUND, "sample_set_id: gone", retry_delay=0.5, field="sample_set_id")
    missing.request_offset = 3
    for error in (refused, unknown, missing):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.code == error.code, error
        assert (copy.details, copy.field, copy.field_violations, copy.retry_delay) == (error.details, error.field, error.field_violations, error.retry_delay)
    copy = pickle.loads(pickle.dumps(refused))
    assert isinstance(copy, InvalidArgumentError) and isinstance(copy, OperationError)
    assert pickle.loads(pickle.dumps(missing)).request_offset == 3


def test_a_reworded_error_has_its_new_message_and_keeps_all_else():
    # The CLI said more of a report's visualisation error by rebuilding it from its code:
    # the reason, quota and precondition violations and field a script reads were lost.
    limit = operation_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "job queue is full", [("neurons", "too many")],
                            precondition_violations=[("UNUSABLE_FEATURES", "samples[3]", "")], reason="QUEUED_JOBS_PER_CALLER_EXCEEDED",
                            quota_violations=[("caller:nightly", "jobs this caller has queued")])
    limit.retry_delay, limit.operation, limit.request_offset = 2.5, types.SimpleNamespace(name="operations/job"), 4
    limit.add_note("that is file a.png")
    said = reworded(limit, "the visualisations stopped: job queue is full")
    assert type(said) is type(limit) and isinstance(said, OperationError)
    assert (str(said), said.args) == ("RESOURCE_EXHAUSTED: the visualisations stopped: job queue is full",
                                      ("the visualisations stopped: job queue is full",))
    kept = ("code", "field", "field_violations", "precondition_violations", "reason", "quota_violations", "retry_delay", "operation",
            "request_offset", "__notes__")
    assert [getattr(said, name) for name in kept] == [getattr(limit, name) for name in kept]
    said.add_note("said once")
    assert limit.__notes__ == ["that is file a.png"]  # the original's notes are its own
    named = reworded(NotFoundError("gone", field="sample_set_id"), "the set is gone")
    assert (type(named), named.field, named.details, hasattr(named, "request_offset")) == (NotFoundError, "sample_set_id", "the set is gone", False)
    assert not hasattr(named, "__notes__")


def test_the_package_exports_each_public_name_it_imports():
    # ``from explaind.client import *`` (a notebook's first cell) gives what __all__ lists:
    # a class imported here for users but left out of it was missing there.
    public = {name for name, value in vars(explaind.client).items() if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert set(explaind.client.__all__) == public


def test_the_operation_an_error_names_is_read_from_its_operation_resource_info_alone():
    # A ResourceInfo naming another kind of resource (a sample set, say) is not an operation
    # to look up; the operation's is found among such details, whatever their order.
    from explaind.client._errors import named_operation

    operation = error_details_pb2.ResourceInfo(resource_type="type.googleapis.com/google.longrunning.Operation", resource_name="operations/first")
    sample_set = error_details_pb2.ResourceInfo(resource_type="type.googleapis.com/explaind.v1.SampleSet", resource_name="sample-sets/s")
    code = grpc.StatusCode.INVALID_ARGUMENT
    assert named_operation(_Refused(code, "reused", sample_set)) is None
    assert named_operation(_Refused(code, "reused", sample_set, operation)) == "operations/first"
    assert named_operation(_Refused(code, "reused")) is None
