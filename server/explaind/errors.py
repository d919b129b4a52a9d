"""Errors that engines raise and the gRPC layer maps to status codes.

Engines know nothing of gRPC: they raise these, and ``explaind.service`` turns
``error.code`` (a ``grpc.StatusCode`` name) into the call's status with ``str(error)``
as the message. Messages name the offending request field where there is one.
"""

from __future__ import annotations

import errno
import logging
import re
import secrets
import sqlite3
import sys
from collections.abc import Sequence
from typing import NamedTuple

from google.protobuf.message import Message
from google.rpc import error_details_pb2

from .methods.memory import is_host_out_of_memory

# ErrorInfo.domain of the errors this service raises.
ERROR_DOMAIN = "explaind.v1"
# ResourceInfo.resource_type of an operation an error names (its resource_name: operations/<id>).
OPERATION_RESOURCE_TYPE = "type.googleapis.com/google.longrunning.Operation"


class ExplaindError(Exception):
    code = "INTERNAL"
    # Seconds after which the same request may succeed, sent as google.rpc.RetryInfo
    # (AIP-194); None where retrying would not help.
    retry_delay_s: float | None = None

    def __init__(self, message: str, *, field: str | None = None, violations: Sequence[PreconditionViolation] = (),
                 retry_delay_s: float | None = None, operation: str | None = None, quota: Quota | None = None) -> None:
        """``violations``: the request items a FAILED_PRECONDITION is about, sent as a
        ``google.rpc.PreconditionFailure`` (:func:`precondition_failure`) beside the
        message that names them too. ``retry_delay_s``: this error's own delay, over
        its class's. ``operation``: the operation (``operations/<id>``) the error is
        about, e.g. the one a reused request_id created, sent as a
        ``google.rpc.ResourceInfo`` (:data:`OPERATION_RESOURCE_TYPE`) so clients read it
        without parsing the message. ``quota``: the limit a RESOURCE_EXHAUSTED met,
        sent as an ErrorInfo with its reason and a ``google.rpc.QuotaFailure``
        (:func:`quota_failure`)."""
        self.field = field
        self.operation = operation
        self.quota = quota
        if retry_delay_s is not None:
            self.retry_delay_s = retry_delay_s
        self.description = message  # without the field
        self.violations = tuple(violations)
        super().__init__(f"{field}: {message}" if field else message)


class Quota(NamedTuple):
    """A limit of the server's that a RESOURCE_EXHAUSTED refusal met (AIP-193), so
    clients tell one from another without parsing the message: ``reason`` its
    ErrorInfo reason (e.g. "HEAD_VERSIONS_PER_CALLER_EXCEEDED"), ``setting`` the
    config setting that sets it ("[server].max_head_versions_per_caller") and
    ``limit`` its value, ``subject`` whose share it is (:func:`caller_subject`, or
    "server" for a limit of all callers', of the calls without a token, or of one
    call), ``description`` what it
    counts, short. Resources that ran out (memory, disk, file descriptors) are no
    quota: their refusals carry none."""

    reason: str
    setting: str
    limit: int
    subject: str
    description: str


def caller_subject(caller: str) -> str:
    """The QuotaFailure subject of a named caller's share of a limit."""
    return f"caller:{caller}"


def subject_detail(code: str, *, field: str | None = None, description: str = "", quota: Quota | None = None) -> Message | None:
    """The status detail saying what an error of ``code`` is about, so clients in any
    language read it without parsing the message (AIP-193): a ``google.rpc.BadRequest``
    violation for an INVALID_ARGUMENT naming a request ``field``; else one
    ``google.rpc.ErrorInfo`` (domain :data:`ERROR_DOMAIN`) whose reason is the
    ``quota``'s (its metadata "setting" and "limit"), or the code, and whose
    ``metadata["field"]`` names the ``field``, e.g. the ``sample_set_id`` of a NOT_FOUND;
    None where there is neither. One ErrorInfo, not one each: AIP-193 allows one."""
    if field and code == "INVALID_ARGUMENT":
        return error_details_pb2.BadRequest(field_violations=[{"field": field, "description": description}])
    if not field and quota is None:
        return None
    metadata = {"field": field} if field else {}
    if quota is not None:
        metadata.update(setting=quota.setting, limit=str(quota.limit))
    return error_details_pb2.ErrorInfo(reason=quota.reason if quota else code, domain=ERROR_DOMAIN, metadata=metadata)


def status_details(code: str, *, field: str | None = None, description: str = "", quota: Quota | None = None,
                   violations: Sequence[PreconditionViolation] = ()) -> list[Message]:
    """The details a status of ``code`` carries about its error, in this order: what it is
    about (:func:`subject_detail`), then :func:`limit_and_item_details`."""
    subject = subject_detail(code, field=field, description=description, quota=quota)
    return ([] if subject is None else [subject]) + limit_and_item_details(quota, violations)


def limit_and_item_details(quota: Quota | None, violations: Sequence[PreconditionViolation]) -> list[Message]:
    """The ``quota``'s :func:`quota_failure` and the ``violations``' :func:`precondition_failure`,
    each where there is one: a failed job stores them apart from its subject detail."""
    return ([] if quota is None else [quota_failure(quota)]) + ([precondition_failure(violations)] if violations else [])


def quota_failure(quota: Quota) -> Message:
    """The ``google.rpc.QuotaFailure`` of the limit a refusal met, its subject (a caller's
    name) and description cut to MAX_VIOLATION_PART_BYTES: it travels in a status header."""
    return error_details_pb2.QuotaFailure(violations=[{"subject": _cut_part(quota.subject), "description": _cut_part(quota.description)}])


class PreconditionViolation(NamedTuple):
    """One item of a request a precondition fails for: ``type`` says which (e.g.
    "UNUSABLE_LOGITS"), ``subject`` names the item as the request does (``images[3]``)."""

    type: str
    subject: str


# A PreconditionFailure lists at most this many violations, each type and subject cut to
# MAX_VIOLATION_PART_BYTES (UTF-8): it travels in a status header (base64, beside the
# message: see the interceptor's budgets) and is stored with a failed job's error.
MAX_PRECONDITION_VIOLATIONS = 10
MAX_VIOLATION_PART_BYTES = 64


def _cut_part(text: str) -> str:
    """``text`` within MAX_VIOLATION_PART_BYTES UTF-8 bytes, a cut one ending in "..."."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_VIOLATION_PART_BYTES:
        return text
    return encoded[: MAX_VIOLATION_PART_BYTES - 3].decode("utf-8", "ignore") + "..."


def precondition_failure(violations: Sequence[PreconditionViolation]) -> Message:
    """The status detail listing the request items ``violations`` names, so a client reads
    each (and, say, the file it sent as that image) without parsing the message: the
    first MAX_PRECONDITION_VIOLATIONS, their parts cut to MAX_VIOLATION_PART_BYTES (the
    message says how many there are). No descriptions: the message says what is wrong,
    and a violation stays ~30 bytes."""
    return error_details_pb2.PreconditionFailure(violations=[{"type": _cut_part(v.type), "subject": _cut_part(v.subject)}
                                                             for v in violations[:MAX_PRECONDITION_VIOLATIONS]])


class InvalidArgument(ExplaindError):
    code = "INVALID_ARGUMENT"


class NotFound(ExplaindError):
    code = "NOT_FOUND"


class AlreadyExists(ExplaindError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ExplaindError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(ExplaindError):
    """A named caller may not change this object ([server].callers_file, .admins)."""

    code = "PERMISSION_DENIED"


class ResourceExhausted(ExplaindError):
    """A limit met (with its :class:`Quota`), or a resource run out (none)."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ExplaindError):
    """The server cannot take the request yet (loading its models, shutting down); it
    did nothing with it. The RetryInfo tells clients it was the server that answered, so
    the address is right and the call is worth repeating."""

    code = "UNAVAILABLE"
    retry_delay_s = 0.5


class Cancelled(ExplaindError):
    code = "CANCELLED"


class DeadlineExceeded(ExplaindError):
    code = "DEADLINE_EXCEEDED"


class DataLoss(ExplaindError):
    """Stored data that cannot be read back (a truncated, corrupt or missing file)."""

    code = "DATA_LOSS"


class ModelLoadError(ExplaindError):
    """A model that could not be loaded; the message names the file."""

    code = "FAILED_PRECONDITION"


def is_damaged_database(error: BaseException) -> bool:
    """Whether ``error`` is SQLite's for a damaged file ("malformed", "not a database"):
    its subclasses are a busy or full disk, or misuse, which a backup does not mend."""
    return type(error) is sqlite3.DatabaseError


def store_remedy(error: BaseException) -> str:
    """What to do about SQLite's ``error`` met as the store opens or first writes, as
    "; ..." to end its message ("" when there is nothing to add). A read-only database (the
    data dir or a file in it not writable by the server's user: a restore or copy made as
    another user) said "attempt to write a readonly database" alone, of a file the
    operator may have made writable while its directory, where SQLite adds its journal, was not."""
    if is_damaged_database(error):
        return "; restore its database from a backup"
    if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY:
        return "; the server's user must be able to write the data dir and every file in it"
    return ""


# How ONNX Runtime words a failed allocation: its arena past its limit ("Available memory
# of N is smaller than requested bytes of M") or unable to grow ("Failed to allocate
# memory for requested buffer of size N", CPU and CUDA alike), the C++ allocator's
# bad_alloc ("std::bad_alloc"; "bad allocation" on Windows), or CUDA's own
# ("CUDA failure 2: out of memory", "cudaErrorMemoryAllocation").
_ONNX_RUNTIME_OUT_OF_MEMORY = re.compile(
    r"Failed to allocate memory for requested buffer|Available memory of \d+ is smaller than requested bytes"
    r"|\bbad_alloc\b|\bbad allocation\b|CUDA failure 2: out of memory|cudaErrorMemoryAllocation")


def is_onnx_runtime_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is ONNX Runtime's failure to allocate memory for a run. Its
    sessions raise its ``Fail`` (an arena's) or ``RuntimeException`` (the allocator's,
    CUDA's), and ``run_with_iobinding`` a bare ``RuntimeError`` ("Error in execution:
    ..."); only their message tells an allocation from a bug, so both are checked."""
    onnxruntime = sys.modules.get("onnxruntime")  # not imported here: only a server that loaded it raises its errors
    if onnxruntime is None:
        return False
    state = onnxruntime.capi.onnxruntime_pybind11_state
    raised_by_onnx_runtime = (isinstance(error, (state.Fail, state.RuntimeException))
                              or (type(error) is RuntimeError and str(error).startswith("Error in execution: ")))
    return raised_by_onnx_runtime and _ONNX_RUNTIME_OUT_OF_MEMORY.search(str(error)) is not None


def report_unexpected(logger: logging.Logger, what: str, error: BaseException, *, less_work: str = "") -> tuple[str, str]:
    """Log an unexpected ``error`` with its traceback under a fresh incident id and return
    the caller's (code, message). Why: an exception's text can hold server file paths and
    internals; the caller gets its type and an id to quote, the operator's log the rest.
    A damaged SQLite database is DATA_LOSS, not a bug: the operator must restore it; the
    process out of file descriptors (EMFILE, ENFILE) is RESOURCE_EXHAUSTED, and so is the
    memory of the host or the model's device running out, where ``less_work`` says what a
    retry may ask less of ("a smaller sample set"; "": nothing the caller sets, a retry
    waits): "fewer images" would be no advice to a ranking or a head edit, which send none."""
    retry = f"retry with {less_work}, or later" if less_work else "retry later"
    incident = secrets.token_hex(4)
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        # Every call that opens a file fails alike until descriptors are freed: one line
        # each, naming the cause and the remedy, not a traceback per call; and the caller
        # hears it is a limit that may pass, not a bug.
        opening = f" opening {error.filename}" if error.filename else ""
        logger.error("%s (incident %s): out of file descriptors%s: %s; raise the open-file limit (ulimit -n)", what, incident, opening, error.strerror)
        return "RESOURCE_EXHAUSTED", (f"the server is out of file descriptors ({error.strerror}); retry later "
                                      f"(the server log has the details under incident {incident})")
    logger.error("%s (incident %s)", what, incident, exc_info=error)
    if is_damaged_database(error):
        return "DATA_LOSS", (f"the server's database is damaged ({error}); the operator must restore it from a backup "
                             f"(the server log has the details under incident {incident})")
    torch = sys.modules.get("torch")  # not imported here: only a server that loaded it can run out of device memory
    if (torch is not None and isinstance(error, torch.OutOfMemoryError)) or is_onnx_runtime_out_of_memory(error):
        # A GPU's (or ONNX Runtime's host) memory, full of this call's or of concurrent work: no bug to quote, and a
        # smaller request may pass.
        return "RESOURCE_EXHAUSTED", (f"the model's device ran out of memory; {retry} "
                                      f"(the server log has the details under incident {incident})")
    if is_host_out_of_memory(error):
        # The host's memory, where nothing more specific caught it (the model's run on a CPU,
        # joining requests into one batch): the server's, full of concurrent work; no bug.
        return "RESOURCE_EXHAUSTED", (f"the server ran out of memory; {retry} "
                                      f"(the server log has the details under incident {incident})")
    return "INTERNAL", f"internal error ({type(error).__name__}); the server log has the details under incident {incident}"
