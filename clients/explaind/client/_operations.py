"""Handles on long-running operations: wait, watch with a progress bar, cancel, results."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import math
import numbers
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Self, TypeVar, cast

import grpc
import numpy as np
from google.longrunning import operations_pb2 as lro_pb2
from google.protobuf import descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import Message

from explaind.v1 import inference_pb2, operations_pb2

from ._errors import (
    DataLossError,
    DeadlineExceededError,
    ExplaindError,
    NotFoundError,
    OperationError,
    ResourceExhaustedError,
    UnavailableError,
    code_of,
    error_from_code,
    error_reason,
    field_violations,
    named_field,
    operation_error,
    precondition_violations,
    quota_violations,
)
from ._images import open_image
from ._types import AbbreviatedRepr, Artifact, ComparedByValue, Progress

if TYPE_CHECKING:
    from PIL.Image import Image

    from ._client import Client

# What ``result()`` returns: Evaluation, NeuronVisualizations or HeadEdit for the
# operations the Client starts; Any for one fetched by name, of any kind. Defaulting to
# Any (PEP 696, typing's own from Python 3.13), a bare ``Operation`` annotation is
# Operation[Any] to a type checker, not a missing type argument.
if TYPE_CHECKING:
    from typing_extensions import TypeVar as _DefaultedTypeVar

    ResultT = _DefaultedTypeVar("ResultT", covariant=True, default=Any)
else:
    ResultT = TypeVar("ResultT", covariant=True)

# The last retry is sent this long before the deadline, so that it has time to be answered.
LAST_ATTEMPT_S = 0.25
# Long enough for any job; the SDK never makes a call without a deadline.
WATCH_DEADLINE_S = 24 * 3600.0
# Before a dropped WatchOperation stream is opened again (never a busy loop).
WATCH_REOPEN_PAUSE_S = 0.5
# Pauses between waits a busy server answered at once (see Operation.wait): the first,
# doubled after each such answer up to the longest.
BUSY_WAIT_MIN_PAUSE_S = 0.1
BUSY_WAIT_MAX_PAUSE_S = 2.0
# Between GetOperation calls when a busy server has no thread for a watch stream.
WATCH_POLL_INTERVAL_S = 1.0
# Longest single WaitOperation the SDK asks for, and how much longer than it the call's
# deadline is (the server answers when its wait ends).
WAIT_STEP_S = 60.0
WAIT_CALL_MARGIN_S = 10.0
PROGRESS_LINE_INTERVAL_S = 10.0
_NUMBER = re.compile(r"\d+(?:\.\d+)?")  # a progress message's counts, left out when telling its changes
# Bytes per GetArtifact call: under gRPC's default 4 MiB message limit, and large enough
# that a 100 MB array takes a few dozen calls; less where either side's limit is smaller.
ARTIFACT_RANGE_BYTES = 2 * 1024 * 1024
# What a GetArtifact response needs besides its content, or half a smaller message limit
# (the server keeps the same room). Beyond half, a limit under 64 KiB left 1-byte ranges.
ARTIFACT_HEADROOM_BYTES = 64 * 1024


@dataclass
class RetryTally:
    """The tries at reaching the server since ``started`` (``time.monotonic()``): one
    call's, or, carried across its calls, a wait's or watch's riding over a restart, so
    the note on its last call's error counts the whole time it retried, not that call's
    alone. ``refusals``: the tries the server refused for want of room."""

    started: float
    attempts: int = 0
    refusals: int = 0

    def starting(self, now: float) -> None:
        """A call begins at ``now``: where the server answered the last try, an outage
        would start with it."""
        if not self.attempts:
            self.started = now

    def answered(self) -> None:
        """The server answered: the count starts again with the next try (a wait's, whose
        ``started`` it then sets)."""
        self.attempts = self.refusals = 0


class EvaluatedMistake(NamedTuple):
    """One misclassified sample of an evaluation; a tuple, so it also unpacks in this order."""

    sample_index: int  # position in the sample set
    label: int  # the true class's index
    predicted_class: int
    probability: float  # of the predicted class


@dataclass(frozen=True, eq=False, repr=False)
class Evaluation(AbbreviatedRepr, ComparedByValue):
    """Result of ``evaluate_sample_set``: ``confusion_matrix`` is (C, C), rows = true
    labels, and ``confusion_cells`` (K, 3) its non-zero cells as (label, predicted,
    count) rows, most samples first. Where the server sends only the cells (C² counts
    too many for a response: over about 5,800 classes at its default message limit), the
    matrix is (0, 0): 21k classes would make it 3.5 GB here."""

    sample_set_id: str
    model_version: str
    sample_count: int
    accuracy: float
    class_accuracy: dict[str, float]  # the classes with samples in the set
    # Left out of the repr, as below: a notebook cell showing the result printed every mistake.
    confusion_matrix: np.ndarray = field(repr=False)
    # Most confident mistakes first.
    mistakes: list[EvaluatedMistake] = field(repr=False)
    class_counts: dict[str, int] = field(default_factory=dict)  # samples per class, every class of the model (0 when absent)
    class_names: list[str] = field(default_factory=list, repr=False)  # every class of the model, by index (mistakes' labels index it)
    confusion_cells: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64), repr=False)

    @property
    def mistake_count(self) -> int:
        """Samples predicted wrong: all of them, also where ``mistakes`` holds only the most
        confident (``result(download=False)`` of a cut response, whose ``confusion_cells``
        may hold only the largest too)."""
        if self.confusion_matrix.size:
            return int(self.confusion_matrix.sum() - np.trace(self.confusion_matrix))
        return round(self.sample_count * (1 - self.accuracy))  # the server's accuracy: right / count, in float64

    @property
    def worst_class(self) -> str:
        """The class with the lowest accuracy among those with samples (the first in class
        order on a tie), as ``HeadEvaluation.worst_class``: where to start explaining."""
        return min(self.class_accuracy.items(), key=lambda item: item[1])[0] if self.class_accuracy else ""

    @property
    def worst_class_accuracy(self) -> float:
        """``worst_class``'s accuracy (NaN when no class has samples)."""
        return self.class_accuracy[self.worst_class] if self.class_accuracy else math.nan


def _confusion(message: inference_pb2.EvaluateSampleSetResult) -> tuple[np.ndarray, np.ndarray]:
    """The (C, C) matrix (empty where the server sent only cells) and its (K, 3) non-zero
    cells, (label, predicted, count) rows, most samples first then row-major."""
    classes = len(message.per_class)
    if message.confusion_cells or not message.confusion_matrix:
        cells = np.array([(c.label, c.predicted, c.count) for c in message.confusion_cells], dtype=np.int64).reshape(-1, 3)
        return np.zeros((0, 0), np.int64), cells
    matrix = np.array(message.confusion_matrix, dtype=np.int64).reshape(classes, classes)
    labels, predicted = np.nonzero(matrix)
    counts = matrix[labels, predicted]
    order = np.argsort(-counts, kind="stable")
    return matrix, np.stack([labels[order], predicted[order], counts[order]], axis=1)


def _evaluation(message: inference_pb2.EvaluateSampleSetResult, operation: Operation | None = None) -> Evaluation:
    matrix, cells = _confusion(message)
    return Evaluation(
        sample_set_id=message.sample_set_id,
        model_version=message.model_version,
        sample_count=message.sample_count,
        accuracy=message.accuracy,
        class_accuracy={c.class_name: c.accuracy for c in message.per_class if c.count},
        class_counts={c.class_name: c.count for c in message.per_class},
        class_names=[c.class_name for c in message.per_class],
        confusion_matrix=matrix,
        confusion_cells=cells,
        mistakes=[EvaluatedMistake(m.sample_index, m.label, m.predicted, m.probability) for m in message.mistakes],
    )


# Result message type -> SDK dataclass, as ``converter(message, operation)`` (the operation
# lets a converter download artifacts; None: leave them out); later job kinds add theirs here.
RESULT_CONVERTERS: dict[str, Callable[[Any, Operation | None], Any]] = {
    inference_pb2.EvaluateSampleSetResult.DESCRIPTOR.full_name: _evaluation,
}


def require_seconds(name: str, value: Any, *, positive: bool = True) -> None:
    """Refuse, naming ``name``, a ``value`` that is not a number of seconds (a bool, NaN),
    or with ``positive`` one that is not positive and finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if math.isnan(seconds) or (positive and not 0 < seconds < math.inf):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}number of seconds, got {value}")


def checked_timeout(timeout: float | None) -> float | None:
    """``timeout`` as given, None included (the client's, or no limit, as the method says),
    refused if it is no number of seconds: a string failed mid-call, NaN read as a deadline
    exceeded. 0 or less is the method's to read (a deadline past, or a look without waiting)."""
    if timeout is not None:
        require_seconds("timeout", timeout, positive=False)
    return timeout


def enum_names(enum: Any, prefix: str) -> dict[int, str]:
    """A proto enum's numbers -> the SDK's names for them: lower case, without ``prefix``
    (OPERATION_STATE_QUEUED -> "queued"); the unset 0 is left out."""
    return {number: name.removeprefix(prefix).lower() for name, number in enum.items() if number}


def enum_number(enum: Any, prefix: str, name: str, parameter: str, *, unset: str = "") -> int:
    """The number of the SDK's ``name`` for a value of ``enum`` (``unset`` names 0, the
    server's default); ValueError naming ``parameter`` and its choices for any other."""
    numbers = {value: number for number, value in enum_names(enum, prefix).items()} | ({unset: 0} if unset else {})
    if not isinstance(name, str) or name not in numbers:  # a list is unhashable: "in" raised its own TypeError
        raise (ValueError if isinstance(name, str) else TypeError)(f"{parameter} must be one of {', '.join(map(repr, numbers))}, got {name!r}")
    return numbers[name]


_STATE_NAMES = enum_names(operations_pb2.OperationState, "OPERATION_STATE_")
OPERATION_STATES = tuple(_STATE_NAMES.values())  # "queued", "running", "succeeded", "failed", "cancelled"


class ProgressDisplay:
    """Progress on stderr: a tqdm bar on a terminal; for logs and notebooks (stderr not a
    terminal), a line when the state or the message's words change and at most every
    ``PROGRESS_LINE_INTERVAL_S`` otherwise, instead of a bar redrawn with carriage returns
    into one endless line. Only the words: a message that counts ("computing features
    192/2000", sent up to 5 times a second) printed a line per update, hundreds in a
    notebook cell or a log."""

    def __init__(self, description: str, *, unit: str) -> None:
        self._description, self._unit = description, unit
        self._bar: Any = None
        self._shown: tuple[str, str] | None = None
        self._shown_at = -math.inf

    @classmethod
    def of_job(cls, operation: Operation[Any]) -> ProgressDisplay:
        """The display of a job waited for (Operation.result, AsyncClient.result): named by its kind, counted in steps."""
        return cls(operation.kind or operation.name, unit="step")

    def __enter__(self) -> ProgressDisplay:
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=self._description, unit=self._unit, dynamic_ncols=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def show_job(self, operation: Operation[Any]) -> None:
        """:meth:`show` ``operation`` as it was last read."""
        self.show(operation.progress.step, operation.progress.total, operation.state, operation.progress.message)

    def show(self, step: int, total: int, state: str, message: str = "") -> None:
        """``step`` of ``total`` (0: unknown). A change of state prints a line at once, so
        the last update of a job or an upload ("uploaded") is never held back. A message
        that begins with the state (a queued job's "queued: 2 ahead; running: ...") is
        shown without it."""
        said = "" if message == state else message.removeprefix(f"{state}: ")
        if self._bar is not None:
            if total and self._bar.total != total:
                self._bar.total = total
            self._bar.n = step
            self._bar.set_postfix_str(f"{state}: {said}" if said else state, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        words = (state, _NUMBER.sub("#", message))
        if words != self._shown or now - self._shown_at >= PROGRESS_LINE_INTERVAL_S:
            count = f"{step}/{total}" if total else str(step or "")
            print(" ".join(part for part in (f"{self._description}:", state, count, said) if part), file=sys.stderr, flush=True)
            self._shown, self._shown_at = words, now


def cancel_outcome(operation: Operation[Any]) -> str:
    """What a cancel did, read from the operation it returned. A job that ended before the
    cancel reached it keeps its result (or error): calling it "cancelled" sent callers to
    submit it again."""
    if operation._left_for_another_run:
        return (f"{operation.name} goes on ({operation.state}): another run asked for it under its request_id too, whose wait "
                f"cancelling it would end; its cancel() (explaind operations cancel {operation.name}) stops it")
    if not operation.done:  # a running job ends at its next check
        return f"cancel requested for {operation.name} ({operation.state}); it ends at its next check"
    if operation.state == "cancelled":
        return f"cancelled {operation.name}"
    return f"{operation.name} had already finished ({operation.state}); nothing to cancel"


class Operation(Generic[ResultT]):
    """A server-side job. ``state`` is one of queued, running, succeeded, failed, cancelled.
    ``Operation[Evaluation]`` is one whose ``result()`` is an :class:`Evaluation`."""

    metadata: operations_pb2.OperationMetadata  # as of the last update

    def __init__(self, client: Client, message: lro_pb2.Operation, *, retried: bool | None = None) -> None:
        """``retried``: ``message`` is a start's answer (None: not one, but fetched or
        listed), True to the SDK's retry of it, after an attempt whose answer was lost
        (:attr:`requested_again`)."""
        self._client = client
        self._update(message)
        # A start's answer says it; later updates do not. One to a retry may be this call's own lost attempt's.
        self._requested_again = self.metadata.requested_again and not retried
        # This client's run asked for it under its request_id: an interrupted wait cancels it only if no other run did too.
        self._asked_by_this_run = retried is not None

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled (in a spawn worker, say), its client is a new one, unanswered as yet:
        the server at its address made this operation, so its waits ride over a restart as
        the original's would, not failing at once as a client's first call to a wrong
        address does. One pickled by a release before runs were told apart is cancelled by
        an interrupted wait, as that release did."""
        self.__dict__.update({"_asked_by_this_run": False} | state)
        self._client._reached = True

    def _update(self, message: lro_pb2.Operation, *, keep_preview: bool = False) -> None:
        """``keep_preview``: a message of a watch, which sends each preview once; a running
        job's message without one keeps the one before."""
        previous = self.metadata.progress.preview_png if keep_preview else b""
        self._message = message
        self.metadata = operations_pb2.OperationMetadata()
        message.metadata.Unpack(self.metadata)
        if previous and not message.done and not self.metadata.progress.preview_png:
            self.metadata.progress.preview_png = previous

    def __repr__(self) -> str:
        cancel = ", cancel_requested=True" if self.cancel_requested and not self.done else ""
        return f"Operation({self.name!r}, kind={self.kind!r}, state={self.state!r}, progress={self.progress.step}/{self.progress.total}{cancel})"

    @property
    def name(self) -> str:
        """``operations/<id>``, for :meth:`Client.operation` and the CLI."""
        return cast(str, self._message.name)  # google.longrunning has no stubs: Any

    @property
    def kind(self) -> str:
        """The job kind: evaluate_sample_set, rank_mistake_neurons, visualize_neurons or edit_head."""
        return self.metadata.kind

    @property
    def state(self) -> str:
        """As of the last update from the server (``refresh()``, ``wait()``, ``watch()``);
        ``"unknown (N)"`` for a state a newer server added (``done`` still says whether it ended)."""
        number = self.metadata.state
        return _STATE_NAMES.get(number) or f"unknown ({number})"

    @property
    def done(self) -> bool:
        """True once succeeded, failed or cancelled (as of the last update)."""
        return cast(bool, self._message.done)

    @property
    def progress(self) -> Progress:
        """Step of total and a message; ``preview`` a PIL image of the partial result, if sent."""
        progress = self.metadata.progress
        preview = open_image(progress.preview_png) if progress.preview_png else None
        return Progress(progress.step, progress.total, progress.message, preview)

    @property
    def artifacts(self) -> list[Artifact]:
        """Files the job stored (e.g. ``mistakes.png``); download with :meth:`artifact`."""
        return [Artifact(a.name, a.media_type, a.digest, a.size_bytes) for a in self.metadata.artifacts]

    @property
    def create_time(self) -> dt.datetime:
        """When the job was submitted (UTC)."""
        return self.metadata.create_time.ToDatetime(tzinfo=dt.timezone.utc)

    @property
    def start_time(self) -> dt.datetime | None:
        """When the job started running (UTC); None while queued, or if it never ran."""
        return self.metadata.start_time.ToDatetime(tzinfo=dt.timezone.utc) if self.metadata.HasField("start_time") else None

    @property
    def end_time(self) -> dt.datetime | None:
        """When the job ended (UTC); None until done."""
        return self.metadata.end_time.ToDatetime(tzinfo=dt.timezone.utc) if self.metadata.HasField("end_time") else None

    @property
    def cancel_requested(self) -> bool:
        """Whether a cancel was asked for (the job ends CANCELLED at its next check)."""
        return self.metadata.cancel_requested

    @property
    def requested_again(self) -> bool:
        """Whether the call that started it got, for its request_id, the operation an
        earlier request under that id had started (AIP-155), not a new one: False for one
        fetched by name, from a server older than the field, and where the SDK retried the
        call after an attempt whose answer was lost (that attempt may have started it)."""
        return self._requested_again

    @property
    def owner(self) -> str:
        """The named caller that submitted it ("" for none): only it, or an admin, may cancel or delete it."""
        return self.metadata.owner

    @property
    def response_cut(self) -> bool:
        """Whether the server's response keeps only the leading items of the result's long
        lists (an evaluation's most confident mistakes), the result being over half its
        message limit (e.g. millions of mistakes); ``result()`` downloads the whole of it."""
        return bool(self.metadata.full_response_artifact)

    @property
    def error(self) -> OperationError | None:
        """Why a failed or cancelled job ended (None otherwise); ``result()`` raises it."""
        if not self._message.HasField("error"):
            return None
        status = self._message.error
        error = operation_error(code_of(status), status.message, field_violations(status), field=named_field(status),
                                precondition_violations=precondition_violations(status), reason=error_reason(status),
                                quota_violations=quota_violations(status))
        error.operation = self  # which job it was, for a caller that only sees the error (``result()``'s)
        return error

    def refresh(self, *, timeout: float | None = None) -> Self:
        """Fetch the current state once (no waiting; retried while the server restarts, for
        at most ``timeout`` seconds, default the client's); returns self."""
        return self._read(checked_timeout(timeout))

    def _read(self, timeout: float | None, retries: RetryTally | None = None) -> Self:
        """:meth:`refresh`, its tries counted in ``retries`` (a watch's, see RetryTally)."""
        response = self._client._call("operations", "GetOperation", operations_pb2.GetOperationRequest(name=self.name), timeout=timeout,
                                      retries=retries)
        self._update(response.operation)
        return self

    def cancel(self) -> Self:
        """Ask the server to stop the job (it ends CANCELLED at its next checkpoint)."""
        response = self._client._call("operations", "CancelOperation", operations_pb2.CancelOperationRequest(name=self.name))
        self._update(response.operation)
        return self

    def _cancel_unless_asked_by_another_run(self) -> Self:
        """:meth:`cancel`, where no other run (another client, a second CLI command under
        the same request_id) asked for the job under its request_id: its wait would end.
        Where one did, the job goes on, and :attr:`_left_for_another_run` says so; an older
        server (no "run_id" capability) ignores the condition and cancels."""
        response = self._client._call("operations", "CancelOperation", operations_pb2.CancelOperationRequest(
            name=self.name, unless_asked_by_another_run_than=self._client._run_id))
        self._update(response.operation)
        return self

    @property
    def _left_for_another_run(self) -> bool:
        """Whether the last answer, a cancel's (:meth:`_cancel_unless_asked_by_another_run`),
        left this job running for another run that asked for it."""
        return self.metadata.requested_by_another_run and not self.done and not self.cancel_requested

    def delete(self) -> None:
        """Forget the finished operation on the server (see :meth:`Client.delete_operation`)."""
        self._client.delete_operation(self.name)

    def wait(self, timeout: float | None = None) -> Self:
        """Block until done or ``timeout`` seconds (None: until done; 0 or less: look
        once, the poll of "is it done yet?")."""
        return self._wait(checked_timeout(timeout), RetryTally(time.monotonic()))

    def _wait(self, timeout: float | None, outage: RetryTally) -> Self:
        """:meth:`wait`, its calls' tries since the server last answered counted in
        ``outage``: an awaited result's, carried across its steps' waits (see RetryTally)."""
        if timeout is not None and timeout <= 0:  # the loop below would end before asking, with the state last seen
            if not self.done:  # one look, its tries counted in ``outage`` too (an awaited result's last step's)
                outage.starting(time.monotonic())
                self._look(None, outage)
                outage.answered()
            return self
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = BUSY_WAIT_MIN_PAUSE_S
        while not self.done:
            remaining = WATCH_DEADLINE_S if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                break
            step = min(remaining, WAIT_STEP_S)
            request = operations_pb2.WaitOperationRequest(name=self.name, timeout=duration_pb2.Duration(seconds=int(step), nanos=int(step % 1 * 1e9)))
            asked = time.monotonic()
            outage.starting(asked)
            # The call may take a little longer than the server's wait; retries may not.
            try:
                response = self._client._call("operations", "WaitOperation", request, timeout=step + WAIT_CALL_MARGIN_S, retry_until=deadline,
                                              retries=outage)
            except UnavailableError:
                # One call's retries end at its deadline; a server restarting for longer
                # is waited for within this wait's own timeout.
                if not self._client._waits_out_unavailable() or (deadline is not None and time.monotonic() >= deadline - LAST_ATTEMPT_S):
                    raise
                continue
            except NotFoundError as error:
                self._note_deleted(error)
                raise
            outage.answered()
            self._update(response.operation)
            if not self.done and time.monotonic() - asked < step / 2:
                # A busy server answers a wait at once (every waiting slot is taken): poll, backing off.
                self._client._pause(min(pause, max(0.0, remaining - (time.monotonic() - asked))))
                pause = min(2 * pause, BUSY_WAIT_MAX_PAUSE_S)
            else:
                pause = BUSY_WAIT_MIN_PAUSE_S
        return self

    def watch(self, timeout: float = WATCH_DEADLINE_S) -> Iterator[Self]:
        """Yield this operation on every progress update until it is done. A stream the
        server dropped (a restart) is opened again once GetOperation reaches the server
        (within the client's timeout and this one; the operation then usually reads
        ABORTED: submit it again). A busy server, whose threads for streams are all
        taken, is polled instead, every WATCH_POLL_INTERVAL_S. After ``timeout`` seconds
        the watch ends, as :meth:`wait` does, though the operation may still run: see
        :attr:`done`."""
        require_seconds("timeout", timeout, positive=False)
        deadline = time.monotonic() + timeout
        while True:
            stream = self._client._stream("operations", "WatchOperation", operations_pb2.WatchOperationRequest(name=self.name),
                                          timeout=deadline - time.monotonic())
            try:
                for response in stream:
                    self._update(response.operation, keep_preview=True)
                    yield self
                return
            except UnavailableError:
                if not self._client._waits_out_unavailable() or time.monotonic() >= deadline:
                    raise
                outage = RetryTally(time.monotonic(), attempts=1)  # the dropped stream's try, then the refreshes'
            except DeadlineExceededError:
                if time.monotonic() < deadline - LAST_ATTEMPT_S:  # not the watch's own timeout
                    raise
                return
            except NotFoundError as error:
                self._note_deleted(error)
                raise
            except ResourceExhaustedError:
                # Every thread for streams is taken. (An operation too large to send fails
                # the polls' GetOperation the same way, and that error reaches the caller.)
                yield from self._poll(deadline)
                return
            finally:
                stream.cancel()
            yield self._refresh_before(deadline, outage)
            if self.done:
                return
            self._client._pause(min(WATCH_REOPEN_PAUSE_S, max(0.0, deadline - time.monotonic())))

    def _poll(self, deadline: float) -> Iterator[Self]:
        """Yield this operation every WATCH_POLL_INTERVAL_S until it is done or ``deadline``
        (``time.monotonic()``) passes."""
        while not self.done:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._client._pause(min(WATCH_POLL_INTERVAL_S, left))
            yield self._refresh_before(deadline)

    def _refresh_before(self, deadline: float, outage: RetryTally | None = None) -> Self:
        """:meth:`refresh`, retried while the server is unavailable until ``deadline``
        (``time.monotonic()``), not only for the client's timeout: a watch keeps its own.
        ``outage``: the watch's tries since the server last answered, counted on (see
        RetryTally); a new one from the first refresh's start without."""
        outage = outage or RetryTally(time.monotonic())
        while True:
            try:  # each try within the client's timeout and the deadline (0 would mean the client's)
                return self._look(max(min(self._client.timeout, deadline - time.monotonic()), 1e-3), outage)
            except UnavailableError:
                if not self._client._waits_out_unavailable() or time.monotonic() >= deadline - LAST_ATTEMPT_S:
                    raise

    def _look(self, timeout: float | None, retries: RetryTally | None = None) -> Self:
        """A wait's or watch's read of the operation (:meth:`_read`), whose NOT_FOUND says
        it was deleted since (:meth:`_note_deleted`), as their waits and streams do."""
        try:
            return self._read(timeout, retries)
        except NotFoundError as error:
            self._note_deleted(error)
            raise

    def _note_deleted(self, error: NotFoundError) -> None:
        """What a NOT_FOUND for this operation, read before, means to a wait or a watch:
        it ended and another client (or the server's retention) deleted it in between (the
        server deletes no queued or running job). One its start got as an earlier request's
        under the same request_id (:attr:`requested_again`) is, queued or running when last
        read, most likely the job that an interrupted start under that id (another run's
        Ctrl-C or SIGTERM) made sending itself again, then cancelled and deleted.
        The error's ``operation`` is this one, as a failed job's is."""
        error.operation = self
        if self.requested_again and not self.done:
            error.add_note(f"{self.name} was {self.state} when last read, an earlier request's under the same request_id: it ended and "
                           "was deleted since, most likely cancelled and deleted by an interrupted start under that request_id (another "
                           "run's Ctrl-C or SIGTERM), which does so with the job it started sending itself again to find its own; or "
                           "deleted by another client once it ended")
            return
        error.add_note(f"{self.name} was {self.state} when last read: it was deleted since (by another client, or by the "
                       "server's retention of ended operations)")

    @contextlib.contextmanager
    def _cancelled_if_interrupted(self) -> Iterator[None]:
        """Ctrl-C (or the CLI's SIGTERM) met inside: cancel this job on the server before
        re-raising, the KeyboardInterrupt's ``operation`` this one, a note what the cancel
        did (:meth:`result`'s wait; the CLI's calls between a start and its wait)."""
        try:
            yield
        except KeyboardInterrupt as interrupt:
            interrupt.operation = self  # type: ignore[attr-defined]  # as an error's: the job it stopped waiting for
            try:
                if self._asked_by_this_run:  # another run's wait on it (its request_id's) goes on
                    self._cancel_unless_asked_by_another_run()
                else:  # fetched by name: as before runs were told apart
                    self.cancel()
            except ExplaindError as error:  # e.g. the server is down: the interrupt is still what happened
                interrupt.add_note(f"{self.name} may still be running: cancelling it failed ({error})")
            else:
                interrupt.add_note(cancel_outcome(self))
            raise

    def result(self, *, progress: bool = False, timeout: float | None = None, download: bool = True) -> ResultT:
        """Wait for the job and return its result (a dataclass where the SDK has one,
        else the response message). ``progress=True`` shows a tqdm bar, or plain lines
        when stderr is not a terminal; Ctrl-C cancels the job on the server before
        re-raising (the KeyboardInterrupt's ``operation`` is this one, a note what the
        cancel did). Raises OperationError if it failed, and DeadlineExceededError if it
        is not done within ``timeout`` seconds (None: no limit); the job keeps running
        then (the error's ``operation`` is this one: ``cancel()`` stops it, ``result()``
        again waits on). ``download=False``
        leaves out what the result keeps in artifacts (a ranking's ω, which can be
        gigabytes, and visualisation images): those fields are None; and a result over
        half the server's message limit has only the leading items of its long lists
        (:attr:`response_cut`)."""
        timeout = checked_timeout(timeout)
        started = time.monotonic()
        try:
            with self._cancelled_if_interrupted():
                if timeout is not None and timeout <= 0:  # one look, with or without progress
                    self.wait(timeout)
                elif progress:
                    with ProgressDisplay.of_job(self) as display:
                        for update in self.watch(WATCH_DEADLINE_S if timeout is None else timeout):
                            display.show_job(update)
                else:
                    self.wait(timeout)
        except DeadlineExceededError:
            if timeout is None:
                raise
            # A call of the watch or the wait went unanswered (a hung server): late, as below.
        if not self.done:
            raise self._late(timeout, started)
        if self.error is not None:
            raise self.error
        try:
            if not self._message.HasField("response"):  # listed without it (Client.operations)
                self.refresh()
            return cast(ResultT, self._unpack_response(download))  # the converter of the kind this Operation[ResultT] was made for
        except UnavailableError as error:  # e.g. the server stopped right after the job ended
            error.add_note(f"{self.name} {self.state}; fetching the files of its result failed: result() again once the server "
                           f"is back, or result(download=False) for what needs no files")
            raise

    def _late(self, timeout: float | None, started: float) -> ExplaindError:
        """The error of a result not ready after ``timeout`` seconds from ``started``
        (``time.monotonic()``), with this operation as its ``operation``. Ended sooner than
        a watch's last moments (LAST_ATTEMPT_S), a call went unanswered: the message says
        so, not that the whole timeout passed; 0 or less looked once ("after -1s" read as
        nonsense)."""
        waited = time.monotonic() - started
        message = f"{self.name} is still {self.state} after {timeout}s"
        if timeout is not None and timeout <= 0:
            message = f"{self.name} is still {self.state}: a timeout of {timeout}s looks once, without waiting"
        elif timeout is not None and waited < timeout - LAST_ATTEMPT_S:
            message = f"{self.name} was still {self.state} when the server left a wait unanswered, {waited:.1f}s into the {timeout}s timeout"
        late = error_from_code(grpc.StatusCode.DEADLINE_EXCEEDED, message)
        late.operation = self  # to wait on later, as for a call that started it inside (rank_mistake_neurons)
        return late

    def _unpack_response(self, download: bool) -> Any:
        response = self._message.response
        name = response.type_url.rsplit("/", 1)[-1]
        try:
            descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
        except KeyError:  # a job kind a newer server added
            raise error_from_code(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} ({self.kind}) has a result of type {name}, which this explaind "
                                  "SDK does not know: the server is newer; upgrade the SDK to read it") from None
        cls = message_factory.GetMessageClass(descriptor)
        message: Message = cls()
        if download and self.response_cut:
            message.ParseFromString(self.artifact(self.metadata.full_response_artifact))
        else:
            response.Unpack(message)
        converter = RESULT_CONVERTERS.get(name)
        return converter(message, self if download else None) if converter else message

    def artifact(self, name: str) -> bytes:
        """The content of an artifact listed in ``artifacts``, read in ranges of
        ``ARTIFACT_RANGE_BYTES`` or less, so that no response outgrows the client's or the
        server's message limit, and checked against its sha256 digest (DataLossError if it
        does not match)."""
        if not isinstance(name, str):  # protobuf's "bad argument type for built-in operation" named nothing
            raise TypeError(f"name must be an artifact's name (a string), got {name!r}")
        client = self._client
        server_limit = client._request_limits().max_message_bytes or client._max_message_bytes
        limit = min(client._max_message_bytes, server_limit)
        range_bytes = max(1, min(ARTIFACT_RANGE_BYTES, limit - min(ARTIFACT_HEADROOM_BYTES, limit // 2)))
        parts: list[bytes] = []
        offset, size, digest = 0, None, ""
        while size is None or offset < size:
            request = operations_pb2.GetArtifactRequest(name=self.name, artifact=name, offset=offset, max_bytes=range_bytes)
            response = self._client._call("operations", "GetArtifact", request)
            size, digest = response.artifact.size_bytes, response.artifact.digest
            if not response.content and offset < size:
                raise DataLossError(f"artifact {name!r} of {self.name} ended at byte {offset} of {size}")
            parts.append(response.content)
            offset += len(response.content)
        content = b"".join(parts)
        if hashlib.sha256(content).hexdigest() != digest:
            raise DataLossError(f"artifact {name!r} of {self.name} does not match its digest {digest}")
        return content

    def artifact_image(self, name: str) -> Image:
        """An image artifact as a PIL image."""
        return open_image(self.artifact(name))
