"""Typed exceptions for gRPC status codes, carrying the server's message."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from ._operations import Operation


class ExplaindError(Exception):
    """Base class; ``code`` is the ``grpc.StatusCode``, ``details`` the server's message.

    ``field_violations`` lists ``(field, description)`` for each request field the server
    refused (``google.rpc.BadRequest`` details of an INVALID_ARGUMENT), e.g.
    ``("samples[3].label", "required: ...")``; ``field`` is the first one's field, or the
    field another error is about (``google.rpc.ErrorInfo`` details, e.g. the
    ``sample_set_id`` of a NOT_FOUND), None if it names none.
    ``precondition_violations`` lists ``(type, subject, description)`` for each request
    item a FAILED_PRECONDITION is about (``google.rpc.PreconditionFailure`` details), e.g.
    ``("UNUSABLE_LOGITS", "images[3]", "")`` for an image the model gives no usable
    logits for, ``("UNUSABLE_FEATURES", "samples[3]", "")`` for sample 3 of a set a
    ranking, evaluation or edit (inline, or its operation's error) was refused for,
    ``("UNDECODABLE_IMAGE", "samples[3]", "")`` for one whose stored image does not decode now;
    empty from a server older than them, whose message alone names them.
    ``reason`` is what the server's ``google.rpc.ErrorInfo`` (domain "explaind.v1") says
    the error is, e.g. "HEAD_VERSIONS_PER_CALLER_EXCEEDED" for a limit a
    ResourceExhaustedError met (the README lists them), None if it says nothing more than
    the code (errors that are no limit, and a server older than the reasons).
    ``quota_violations`` lists ``(subject, description)`` for the limit it met
    (``google.rpc.QuotaFailure`` details), e.g. ``("caller:alice", "head versions this
    caller holds")``, or ``("server", "jobs queued")`` for a limit of all callers'; empty
    if none. ``retry_delay`` is the seconds the server asked to wait before the same call may
    succeed (``google.rpc.RetryInfo``, e.g. while it loads its models, for a full job
    queue, or 1 s after an image decoder ran out of memory; no operation's error has one),
    None if it did not say: a Client with ``retry`` waits it out and sends the call again
    until the call's deadline, so one raised is the last refusal, noting the tries. ``operation`` is the job a
    DeadlineExceededError gave up waiting for (``result(timeout=...)``,
    ``rank_mistake_neurons``), still running: wait on it later; or the job an
    OperationError ended; or the one an earlier request under a reused ``request_id``
    created (an InvalidArgumentError on ``request_id``: its ``google.rpc.ResourceInfo``;
    with named callers only if this caller, or none, sent that request),
    as read once when the error came (None if that read failed); or, on a NotFoundError
    of ``wait``/``watch``/``result``, the job followed, deleted meanwhile, as last read;
    None on other errors."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    operation: Operation[Any] | None = None
    # Set on the errors of split calls only (the request's first item in the caller's
    # list, see explaind.client._client._note_chunk): declared, not defaulted.
    request_offset: int

    def __init__(self, details: str, code: grpc.StatusCode | None = None,
                 field_violations: list[tuple[str, str]] | None = None, *, retry_delay: float | None = None,
                 field: str | None = None, precondition_violations: list[tuple[str, str, str]] | None = None,
                 reason: str | None = None, quota_violations: list[tuple[str, str]] | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.field_violations = field_violations or []
        self.precondition_violations = precondition_violations or []
        self.reason = reason
        self.quota_violations = quota_violations or []
        self.retry_delay = retry_delay
        self._field = field
        if code is not None:
            self.code = code

    @property
    def field(self) -> str | None:
        return self.field_violations[0][0] if self.field_violations else self._field

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class PlaintextTokenWarning(UserWarning):
    """A Client sends its token without TLS to a host other than this machine, where
    anyone on the path can read it and call as its owner. Filter it
    (``warnings.filterwarnings("ignore", category=PlaintextTokenWarning)``) where the
    network itself is trusted, e.g. a sidecar proxy that adds TLS."""


class InvalidArgumentError(ExplaindError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ExplaindError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ExplaindError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ExplaindError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(ExplaindError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(ExplaindError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ExplaindError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(ExplaindError):
    code = grpc.StatusCode.CANCELLED


class UnauthenticatedError(ExplaindError):
    code = grpc.StatusCode.UNAUTHENTICATED


class InternalError(ExplaindError):
    code = grpc.StatusCode.INTERNAL


class AbortedError(ExplaindError):
    """An operation the server aborted (it restarted or shut down): submit it again (under
    its ``request_id`` too: an aborted operation does not keep its id)."""

    code = grpc.StatusCode.ABORTED


class PermissionDeniedError(ExplaindError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnimplementedError(ExplaindError):
    """A method this server does not have (an older server than the SDK)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class OutOfRangeError(ExplaindError):
    code = grpc.StatusCode.OUT_OF_RANGE


class DataLossError(ExplaindError):
    """Downloaded bytes that do not match their digest."""

    code = grpc.StatusCode.DATA_LOSS


class OperationError(ExplaindError):
    """A job that ended FAILED or CANCELLED; ``code`` is its error status. It is also the
    typed error of that code (:func:`operation_error`): ``except InvalidArgumentError``
    catches a job's refusal as it catches a call's, ``except OperationError`` any job's end."""


_BY_CODE = {cls.code: cls for cls in ExplaindError.__subclasses__() if cls is not OperationError}
# One OperationError subclass per typed error, e.g. an OperationError that is a FailedPreconditionError.
_OPERATION_BY_CODE = {code: type(f"Operation{cls.__name__}", (OperationError, cls), {"__module__": __name__})
                      for code, cls in _BY_CODE.items()}
# Module attributes under their names, where pickle looks a class up: a job's error returned
# by a process pool's worker (pickled) was a PicklingError in its place.
globals().update({cls.__name__: cls for cls in _OPERATION_BY_CODE.values()})


AnError = TypeVar("AnError", bound=ExplaindError)


def reworded(error: AnError, details: str) -> AnError:
    """``error`` with the message ``details`` and all else kept: its type (an
    OperationError's too), code, fields and violations, reason, retry delay, operation,
    ``request_offset`` and notes where set. What a caller raises to say more of an error
    than its message did: rebuilt from the code alone, a script lost the details it reads."""
    rebuilt = type(error)(details)
    vars(rebuilt).update(vars(error), details=details)
    if hasattr(error, "__notes__"):
        rebuilt.__notes__ = list(error.__notes__)  # not shared: a note added to one is not the other's
    return rebuilt


def error_from_code(code: grpc.StatusCode, details: str, field_violations: list[tuple[str, str]] | None = None, *,
                    retry_delay: float | None = None, field: str | None = None,
                    precondition_violations: list[tuple[str, str, str]] | None = None,
                    reason: str | None = None, quota_violations: list[tuple[str, str]] | None = None) -> ExplaindError:
    cls = _BY_CODE.get(code, ExplaindError)
    return cls(details, code, field_violations, retry_delay=retry_delay, field=field, precondition_violations=precondition_violations,
               reason=reason, quota_violations=quota_violations)


# Each status code by its number, as a google.rpc.Status holds it.
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def code_of(status: status_pb2.Status) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a ``google.rpc.Status`` (UNKNOWN for a number gRPC lacks)."""
    return _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)


def error_from_status(status: status_pb2.Status, *, rename: Callable[[str], str] = str) -> ExplaindError:
    """The typed error a ``google.rpc.Status`` in a response stands for (an image's error
    in a partial_failure Predict), with the fields of its details; its message and the
    fields and items it names passed through ``rename``."""
    code = code_of(status)
    named = named_field(status)
    return error_from_code(code, rename(status.message) or code.name, [(rename(field), description) for field, description in field_violations(status)],
                           field=None if named is None else rename(named),
                           precondition_violations=[(kind, rename(subject), description) for kind, subject, description in precondition_violations(status)],
                           reason=error_reason(status), quota_violations=quota_violations(status))


def operation_error(code: grpc.StatusCode, details: str, field_violations: list[tuple[str, str]] | None = None, *,
                    field: str | None = None, precondition_violations: list[tuple[str, str, str]] | None = None,
                    reason: str | None = None, quota_violations: list[tuple[str, str]] | None = None) -> OperationError:
    """A failed or cancelled job's error: an OperationError and the typed error of ``code``."""
    # cast: the classes type() made are OperationError subclasses.
    return cast(OperationError, _OPERATION_BY_CODE.get(code, OperationError)(details, code, field_violations, field=field,
                                                                             precondition_violations=precondition_violations,
                                                                             reason=reason, quota_violations=quota_violations))


def from_rpc_error(error: grpc.RpcError) -> ExplaindError:
    """The typed exception for a failed call, with the fields and retry delay of its
    status details."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    status = _status(error)
    return error_from_code(code, details or code.name, field_violations(status), retry_delay=_retry_delay(status), field=named_field(status),
                           precondition_violations=precondition_violations(status), reason=error_reason(status),
                           quota_violations=quota_violations(status))


def _status(error: grpc.RpcError) -> status_pb2.Status:
    """The ``google.rpc.Status`` a server sent with ``error`` (empty if none)."""
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return status_pb2.Status()


_Detail = TypeVar("_Detail", bound=Message)


def _details(status: status_pb2.Status, kind: type[_Detail]) -> Iterator[_Detail]:
    """Each of a status's details that is a ``kind`` (e.g. ``google.rpc.ErrorInfo``), in order."""
    for detail in status.details:
        message = kind()
        if detail.Unpack(message):
            yield message


def _retry_delay(status: status_pb2.Status) -> float | None:
    retry_info = next(_details(status, error_details_pb2.RetryInfo), None)
    return None if retry_info is None else retry_info.retry_delay.ToNanoseconds() / 1e9


# ErrorInfo.domain of the server's own errors.
_ERROR_DOMAIN = "explaind.v1"


def named_field(status: status_pb2.Status) -> str | None:
    """The request field a status's ``google.rpc.ErrorInfo`` from the server names (errors
    other than INVALID_ARGUMENT), None if none."""
    return next((info.metadata["field"] for info in _details(status, error_details_pb2.ErrorInfo)
                 if info.domain == _ERROR_DOMAIN and "field" in info.metadata), None)


def error_reason(status: status_pb2.Status) -> str | None:
    """The reason of a status's ``google.rpc.ErrorInfo`` from the server, None if none or
    if it is only the status code's name (what a server sends with a field alone, and all a
    server older than the reasons sends)."""
    return next((info.reason for info in _details(status, error_details_pb2.ErrorInfo)
                 if info.domain == _ERROR_DOMAIN and info.reason not in grpc.StatusCode.__members__), None)


def quota_violations(status: status_pb2.Status) -> list[tuple[str, str]]:
    """``(subject, description)`` of each ``google.rpc.QuotaFailure`` violation in a status's details."""
    return [(v.subject, v.description) for failure in _details(status, error_details_pb2.QuotaFailure) for v in failure.violations]


# ResourceInfo.resource_type of an operation the server's error names.
_OPERATION_RESOURCE_TYPE = "type.googleapis.com/google.longrunning.Operation"


def named_operation(error: grpc.RpcError) -> str | None:
    """The operation (``operations/<id>``) a failed call's ``google.rpc.ResourceInfo``
    names, e.g. the one a reused request_id created; None if none."""
    return next((info.resource_name for info in _details(_status(error), error_details_pb2.ResourceInfo)
                 if info.resource_type == _OPERATION_RESOURCE_TYPE), None)


def field_violations(status: status_pb2.Status) -> list[tuple[str, str]]:
    """``(field, description)`` of each ``google.rpc.BadRequest`` violation in a status's
    details: a call's error, or a failed operation's."""
    return [(v.field, v.description) for bad_request in _details(status, error_details_pb2.BadRequest) for v in bad_request.field_violations]


def precondition_violations(status: status_pb2.Status) -> list[tuple[str, str, str]]:
    """``(type, subject, description)`` of each ``google.rpc.PreconditionFailure`` violation
    in a status's details."""
    return [(v.type, v.subject, v.description) for failure in _details(status, error_details_pb2.PreconditionFailure) for v in failure.violations]


_IMAGE_IN_TEXT = re.compile(r"\bimages\[\d+\]")


def listed_items(error: ExplaindError) -> list[str]:
    """The request items (``images[i]``, numbered within the request) an error lists
    beside its field: its precondition violations' subjects (a Predict's images the model
    gives no usable logits for), or from a server older than those, which names them in
    the message alone, the ``images[i]`` in the text of an error about ``images``."""
    if error.precondition_violations:
        return [subject for _, subject, _ in error.precondition_violations]
    return _IMAGE_IN_TEXT.findall(error.details) if error.field == "images" else []
