"""Long-running jobs: a bounded executor with progress, cancellation and persistence.

Adding a job kind is a registration and one call from an engine::

    engine.jobs.register_kinds("rank_neurons")                    # ListOperations may filter by it

    def rank_neurons(ctx: JobContext) -> RankNeuronsResult:       # any protobuf message
        for step, chunk in enumerate(chunks):
            ctx.raise_if_cancelled()                              # ends the job CANCELLED
            ...
            ctx.report_progress(step + 1, len(chunks), "scoring neurons", preview=png_bytes)
        ctx.save_image("top_neurons.png", grid)                   # artifact, downloadable
        return RankNeuronsResult(...)

A job may name the stages its time goes to (``ctx.stage("solve")``, a few fixed names per
kind, declared with ``register_kinds(kind, stages=(...))`` so their series start at zero):
each job's seconds per stage are observed in ``explaind_job_stage_duration_seconds``.

    snapshot = engine.jobs.submit("rank_neurons", rank_neurons)   # returns at once

A request that carries a request_id (AIP-155: a retry after a dropped connection sends
it again) is submitted with its :class:`RequestKey`: the same key gets the job the first
created, as long as the job is kept; an engine asks :meth:`JobManager.submitted` before
its checks, so a repeat is answered as the first was whatever changed since.

The returned message is stored (as ``google.protobuf.Any``) and becomes the
operation's response (stored whole as an artifact, and cut to fit a message, when it is
larger than ``max_result_bytes``: ``submit(..., cut_lists=...)``); an exception fails the job (an :class:`~explaind.errors.ExplaindError`
keeps its status code, e.g. INVALID_ARGUMENT, the field it names and the items it lists). Every job kind uses the models, so all
share one pool of ``jobs.gpu_workers`` threads (one by default: GPU memory holds one job's
batch); Predict has its own batcher thread and keeps flowing.

The queue is fair across named callers (a job's ``owner``): a worker that frees takes the
oldest queued job of the caller whose latest job started longest ago (first a caller none
of whose jobs has started, of those the one whose oldest queued job is oldest), so callers
with queued jobs take turns, one job each: a pipeline's job submitted after an analyst's
fifty waits for the jobs running then and at most one of the fifty. Jobs without an owner
(no named callers) are one caller: without callers the queue is first in, first out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import re
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from .errors import (DeadlineExceeded, ExplaindError, FailedPrecondition, InvalidArgument, NotFound, Quota, ResourceExhausted, Unavailable,
                     caller_subject, limit_and_item_details, report_unexpected, subject_detail)
from .imaging import JOB_IMAGE_COMPRESS_LEVEL, encode_png
from .logs import FIELDS, log_fields
from .messages import leading_items_that_fit
from .metrics import Metrics, exemplar
from .ownership import Ownership
from .store import ABORTED, CANCELLED, FAILED, FINISHED_STATES, QUEUED, RUNNING, SUCCEEDED, ArtifactRef, JobRecord, RequestKey, Store
from .tracing import NO_TRACING, OperationTrace, Tracing, current, trace_id

log = logging.getLogger(__name__)

# Progress is written to the store at most this often.
PERSIST_INTERVAL_S = 1.0
# A watcher gets progress alone at most this often (a new state, artifact or preview, and
# the end, at once; previews come every preview_every steps): a job of thousands of steps
# sent thousands of messages, the same preview in each, and a slow reader got them one by
# one, long after the job had ended.
WATCH_PROGRESS_INTERVAL_S = 0.2
# How often a job waiting for a lock another job holds (JobContext.holding) looks whether
# it was cancelled or has run too long (seconds).
LOCK_CANCEL_POLL_S = 0.1
# The delay a full queue's refusal asks callers to wait (google.rpc.RetryInfo): a place
# frees when a worker takes a queued job, so about when the next running job ends. With
# W workers busy on jobs of run time T, one ends every T / W on average; T is the median
# run time of the last QUEUE_RETRY_SAMPLE jobs that succeeded or ran to [jobs].max_run_seconds
# (a median: one runaway job does not stretch it; not other ends: a job refused at once or
# cancelled early says nothing of how long a job holds a worker, and a burst of them made
# the delay a second while the workers stayed busy with long jobs; one ended at the limit
# held its worker all that while). Clamped to QUEUE_RETRY_RANGE_S: under a
# second a retry loop spins on a queue that cannot have moved, and over a minute a caller
# sleeps through a cancel that freed a place. Before any job has succeeded there is no
# run time to go by: QUEUE_RETRY_UNKNOWN_S. A caller at its own limit
# ([jobs].max_queued_per_caller) gets a place when a worker takes its first queued job, on
# its turn (the fair order, see the module's docstring): once the k jobs ahead of that one
# have started, so in about (k + 1) T / W, clamped alike (its own running jobs ending frees
# no place of its: the limit counts queued jobs).
QUEUE_RETRY_SAMPLE = 16
QUEUE_RETRY_RANGE_S = (1.0, 60.0)
QUEUE_RETRY_UNKNOWN_S = 10.0
# The artifact holding a result too large to be the response whole (JobManager.max_result_bytes).
RESULT_ARTIFACT = "result.binpb"
RESULT_MEDIA_TYPE = "application/x-protobuf"
JOB_ID = re.compile(r"[0-9a-f]{16}")  # what submit() makes; used with fullmatch ("$" would accept a final "\n")


class JobCancelled(Exception):
    """Raised by :meth:`JobContext.raise_if_cancelled`; ends the job CANCELLED."""


@dataclass(frozen=True)
class JobSnapshot:
    """A job's state at one moment; ``preview`` (PNG) is live-only, never persisted.
    ``requested_again``: returned to a request whose request_id had made the job
    already (:meth:`JobManager.submitted`), not made by it; ``requested_by_another_run``,
    with it: a request from another run than that one's got the job too (Store.add_request_run)."""

    record: JobRecord
    preview: bytes = b""
    requested_again: bool = False
    requested_by_another_run: bool = False

    @property
    def done(self) -> bool:
        return self.record.state in FINISHED_STATES


# The stages the manager times around every job's own (JobContext.stage): storing that it
# runs, all of its code for a job that names no stage (a job that does counts the time
# before its first stage in that stage), and packing and storing its result or error.
START_STAGE, RUN_STAGE, FINISH_STAGE = "start", "run", "finish"


class _Stages:
    """Where one job's time goes: monotonic seconds per stage, summed over its visits
    (a job may go back to a stage), from its start to its end without gaps; with
    ``trace``, its stage spans too."""

    def __init__(self, trace: OperationTrace | None = None) -> None:
        self.current: str | None = START_STAGE
        self.seconds: dict[str, float] = {}
        self._since = time.monotonic()
        self._trace = trace
        if trace is not None:
            trace.stage(START_STAGE)

    def enter(self, stage: str | None) -> None:
        """End the current stage; None leaves the time from now to the next named stage."""
        if stage == self.current:
            return
        now = time.monotonic()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._since
            self._since = now
        self.current = stage
        if self._trace is not None:
            self._trace.stage(stage)


# What a worker runs for a job: its function and the result's lists it may cut (see JobManager._packed).
_Work = tuple[Callable[["JobContext"], Message], tuple[str, ...]]


class _LiveJob:
    def __init__(self, record: JobRecord, work: _Work, trace: OperationTrace | None = None, less_work: str = "") -> None:
        self.record = record
        self.work = work
        self.less_work = less_work  # what a retry may ask less of should the job run out of memory (report_unexpected)
        self.taken = False  # by a worker, which is starting it: no longer in the queue's order
        self.trace = trace  # its spans, when tracing is on
        self.preview = b""
        self.cancel_event = threading.Event()
        self.persisted_at = 0.0
        # What the worker running it records of the run as its end is set (its time, its
        # stages', the running count), called by _set_record before any reader sees the end.
        self.on_end: Callable[[JobRecord], None] | None = None


class JobContext:
    """What a running job sees: progress reporting, cancellation, artifact storage."""

    def __init__(self, manager: JobManager, live: _LiveJob, stages: _Stages | None = None) -> None:
        self._manager = manager
        self._live = live
        self._stages = stages or _Stages()
        # time.monotonic() past which the job has run too long (JobManager.max_run_s); None: no limit.
        self._run_deadline = None if manager.max_run_s is None else time.monotonic() + manager.max_run_s

    @property
    def job_id(self) -> str:
        return self._live.record.job_id

    @property
    def cancelled(self) -> bool:
        return self._live.cancel_event.is_set()

    def raise_if_cancelled(self) -> None:
        """End the job here if it was cancelled (or the server is shutting down), or, as
        DEADLINE_EXCEEDED, if it has run longer than the server allows (``max_run_s``)."""
        if self.cancelled:
            raise JobCancelled(self.job_id)
        if self._run_deadline is not None and time.monotonic() > self._run_deadline:
            raise self.ran_too_long()

    @contextlib.contextmanager
    def holding(self, lock: threading.Lock) -> Iterator[None]:
        """Hold ``lock`` for the block, waiting for it as :meth:`raise_if_cancelled` allows:
        a job cancelled (or past its run time) while another holds it ends within
        ``LOCK_CANCEL_POLL_S``, not once the holder lets go, and never takes it after its
        cancel."""
        while True:
            self.raise_if_cancelled()
            if lock.acquire(timeout=LOCK_CANCEL_POLL_S):
                break
        try:
            self.raise_if_cancelled()  # a cancel that came within the wait that took it
            yield
        finally:
            lock.release()

    def run_time_remaining(self) -> float | None:
        """Seconds the job may still run before ``max_run_s`` ends it (0 once past it);
        None: no limit. A wait inside the job ends by then (its decodes' waits for room)."""
        return None if self._run_deadline is None else max(0.0, self._run_deadline - time.monotonic())

    def ran_too_long(self) -> DeadlineExceeded:
        """The error a job past ``max_run_s`` ends with, FAILED."""
        return DeadlineExceeded(f"the job ran longer than the server allows an operation, {self._manager.max_run_s:g} s "
                                f"([jobs].max_run_seconds); ask for less work (fewer samples, steps or pairs), or for a higher limit")

    def stage(self, name: str) -> None:
        """The job's time from now on goes to stage ``name`` (until the next call or its
        end): a literal from its kind's few stages, never an id (it is a metric label)."""
        self._stages.enter(name)

    def report_progress(self, step: int, total: int | None = None, message: str = "", preview: bytes | None = None) -> None:
        """``step`` of ``total`` units done (total None keeps the last one, 0 = unknown);
        ``preview`` is an optional PNG of the partial result."""
        changes = {"step": int(step), "message": message}
        if total is not None:
            changes["total"] = int(total)
        self._manager._update(self._live, preview=preview, **changes)

    def save_artifact(self, name: str, data: bytes, media_type: str = "application/octet-stream") -> ArtifactRef:
        """Store ``data`` content-addressed and list it in the operation's metadata."""
        with self._manager.store.writing_blobs() as put:
            artifact = ArtifactRef(name, media_type, put(data), len(data))
            artifacts = tuple(a for a in self._live.record.artifacts if a.name != name) + (artifact,)
            self._manager._update(self._live, persist=True, artifacts=artifacts)
        return artifact

    def save_image(self, name: str, pixels) -> ArtifactRef:
        """Save an (H, W, 3) uint8 image as a PNG artifact."""
        return self.save_artifact(name, encode_png(pixels, compress_level=JOB_IMAGE_COMPRESS_LEVEL), "image/png")


def _subject_detail(error: ExplaindError) -> bytes:
    """A failed job's ``result``: what its error is about (the field it names, the limit
    it met), as a serialised Any of :func:`subject_detail` (the operation's error carries
    it as the call's would), or nothing."""
    detail = subject_detail(error.code, field=error.field, description=error.description, quota=error.quota)
    if detail is None:
        return b""
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed.SerializeToString()


def _other_details(error: ExplaindError) -> bytes:
    """A failed job's ``error_details``: the limit its error met (:func:`quota_failure`) and
    the items it names (the samples a model gives unusable outputs for, at most ten
    violations, their parts cut short, :func:`precondition_failure`), as a serialised
    Status holding them, or nothing."""
    details = limit_and_item_details(error.quota, error.violations)
    if not details:
        return b""
    status = status_pb2.Status()
    for detail in details:
        status.details.add().Pack(detail)
    return status.SerializeToString()


# Failures that are the server's to fix; others (refused input, cancels, restarts) are
# the caller's or expected, and logged at INFO.
_SERVER_FAILURES = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "RESOURCE_EXHAUSTED"})
# The codes deploy/alerts.yml's ExplaindJobsFailing counts: all of those above, so a GPU
# out of memory (RESOURCE_EXHAUSTED) is seen too; a full data dir also has its own alert.
ALERTED_FAILURE_CODES = ("INTERNAL", "UNKNOWN", "DATA_LOSS", "RESOURCE_EXHAUSTED")


def _store_refusal(error: Exception) -> tuple[str, str]:
    """The code and reason of a job whose start or end the store refused: a project error
    (a full data dir, say) keeps its code and message, the caller's cue; another is INTERNAL."""
    if isinstance(error, ExplaindError):
        return error.code, f"the store could not record it: {error}"
    return "INTERNAL", f"the store failed to record it ({type(error).__name__})"


def _log_write_failure(error: Exception, message: str, *args: object) -> None:
    """A job's write the store failed: with its traceback, unless the store refused it with
    a reason (an ExplaindError: the data dir full, which the store says once itself). The
    operation's end line then tells it, at WARNING with that reason; an ERROR traceback
    of the refusal per job, two for a job it refused to start, only repeated it."""
    if not isinstance(error, ExplaindError):
        log.error(message, *args, exc_info=error)


def _holder(record: JobRecord, now: float) -> str:
    """A running job as a queued one's message names it: kind, id, its step and how long
    it has run by ``now`` (the clock of its start_time, JobManager.store's now()), e.g.
    "visualize_neurons 0123456789abcdef (step 120/400, 14 min)"."""
    step = f"step {record.step}/{record.total}" if record.total else f"step {record.step}" if record.step else ""
    minutes = int((now - (record.start_time or now)) // 60)
    ran = f"{minutes} min" if minutes else "under a minute"
    cancelling = ", cancel requested" if record.cancel_requested else ""
    return f"{record.kind} {record.job_id} ({', '.join(part for part in (step, ran) if part)}{cancelling})"


def _operation_ids(record: JobRecord) -> dict[str, str]:
    """An operation's id and kind, the JSON fields (logs.FIELDS) of each line about it
    (queued, started, ended, and all its run logs), named as its audit line names them:
    a log pipeline joins the lines of one operation without parsing their messages."""
    return {"operation_id": record.job_id, "kind": record.kind}


def _log_end(record: JobRecord) -> None:
    """One line per operation's end, with its id, kind, outcome and time since submission."""
    took = (record.end_time or time.time()) - record.create_time
    if record.state == SUCCEEDED:
        log.info("operation %s (%s) succeeded in %.2f s", record.job_id, record.kind, took, extra={FIELDS: _operation_ids(record)})
        return
    level = logging.WARNING if record.error_code in _SERVER_FAILURES else logging.INFO
    log.log(level, "operation %s (%s) %s after %.2f s: %s %s", record.job_id, record.kind, record.state, took,
            record.error_code, record.error_message, extra={FIELDS: _operation_ids(record)})


class JobManager:
    """Long-running work as operations: queued (at most ``max_queued``, and at most
    ``max_queued_per_caller`` of one named caller's; 0: no such limit) and run on
    ``workers`` threads, callers taking turns (see the module's docstring), with progress,
    cancellation and results kept in the store, so callers may poll, wait or watch, and a
    restart reports what it cut short."""

    def __init__(self, store: Store, metrics: Metrics, *, max_queued: int = 64, max_queued_per_caller: int = 0, workers: int = 1,
                 max_result_bytes: int | None = None, max_run_s: float | None = None, tracing: Tracing = NO_TRACING,
                 ownership: Ownership | None = None) -> None:
        self.store = store
        # Who may cancel and delete a job (its owner, an admin; see explaind.ownership).
        self.ownership = ownership or Ownership()
        self.metrics = metrics
        # A span per job (child of the RPC submitting it), with its queue wait and stages.
        self.tracing = tracing
        self.max_queued = max_queued
        self.max_queued_per_caller = max_queued_per_caller
        # Seconds a job may run before its next cancellation check ends it FAILED
        # (DEADLINE_EXCEEDED), so a runaway one frees its worker; None: no limit.
        self.max_run_s = max_run_s
        # A result larger than this (serialised, in bytes) is stored whole as the artifact
        # RESULT_ARTIFACT and kept cut to fit (leading_items_that_fit): an operation too
        # large for one message could neither be fetched nor listed. None: no limit.
        self.max_result_bytes = max_result_bytes
        self._kinds: set[str] = set()  # what list() may filter by: registered or submitted
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="job")
        self._workers = workers
        # Seconds each of the latest jobs that succeeded (or ran to the limit) ran, for a full queue's retry delay (_queue_retry_delay_s).
        self._recent_run_s: deque[float] = deque(maxlen=QUEUE_RETRY_SAMPLE)
        self._live: dict[str, _LiveJob] = {}  # in submission order
        # The turn each owner's latest job started at (a count of starts), for the fair order (_queue_order).
        self._last_start: dict[str | None, int] = {}
        self._starts = itertools.count()
        self._changed = threading.Condition()
        self._accepting = True

    def recover(self) -> list[str]:
        """Mark jobs left queued/running by a previous process FAILED (ABORTED); returns their
        ids. They count in jobs_ended here: a process that crashed never counted them, and a
        crash loop would otherwise cut jobs short unseen by rates and alerts."""
        ended = self.store.fail_unfinished_jobs("the server stopped while this job was queued or running (restart); submit it again")
        if ended:
            log.warning("marked %d operation(s) an earlier process left queued or running FAILED (ABORTED): %s",
                        len(ended), ", ".join(f"{job_id} ({kind})" for job_id, kind in ended))
        for _, kind in ended:
            self.metrics.jobs_ended.labels(kind=kind, outcome=FAILED, code=ABORTED).inc()
        return [job_id for job_id, _ in ended]

    # Submitting and running ----------------------------------------------------------

    def register_kinds(self, *kinds: str, stages: tuple[str, ...] = ()) -> None:
        """Declare the job kinds an engine submits, so that listing by one of them is valid
        before the first is submitted (an unknown kind is INVALID_ARGUMENT, not []). Their
        queue-wait and running series, their counts of successes and server-side
        failures, and the time in each of their stages (``stages``: the names their jobs
        give :meth:`JobContext.stage`; none: all of a job's time is ``run``), are exported
        at zero from now on: a rate or an alert then sees the first such job, which a
        series born with it would hide."""
        self._kinds.update(kinds)
        for kind in kinds:
            self.metrics.job_queue_wait.labels(kind=kind)
            self.metrics.job_requests_repeated.labels(kind=kind)
            self.metrics.jobs_running.labels(kind=kind)
            for stage in (START_STAGE, *(stages or (RUN_STAGE,)), FINISH_STAGE):
                self.metrics.job_stage_duration.labels(kind=kind, stage=stage)
            self.metrics.jobs_ended.labels(kind=kind, outcome=SUCCEEDED, code="OK")
            for code in ALERTED_FAILURE_CODES:
                self.metrics.jobs_ended.labels(kind=kind, outcome=FAILED, code=code)

    def submitted(self, request: RequestKey | None) -> JobSnapshot | None:
        """The job a request with ``request``'s request_id created, as it is now; None if
        none is kept, or the server's shutdown ended it (ABORTED: it runs again), or
        ``request`` is None. InvalidArgument naming request_id when that job was created
        by another request (another fingerprint); FailedPrecondition naming it when
        DeleteOperation deleted that job (the store's request_of_deleted_job)."""
        if request is None:
            return None
        with self._changed:
            if (job_id := self.store.job_of_request(request)) is None:
                return None
            try:
                previous = self.get(job_id)
            except NotFound:  # deleted (retention) since it was looked up: the request is new again
                return None
            if (previous.record.state, previous.record.error_code) == (FAILED, ABORTED):
                return None  # the server's shutdown ended it, not the request: it runs again
            self.metrics.job_requests_repeated.labels(kind=previous.record.kind).inc()
            self.store.add_request_run(job_id, request.run_id)
            return dataclasses.replace(previous, requested_again=True, requested_by_another_run=self._asked_by_another_run(job_id, request.run_id))

    def _asked_by_another_run(self, job_id: str, run_id: str) -> bool:
        """Whether a run other than ``run_id`` ("" none) asked for job ``job_id`` under its
        request_id: one from no named run, or from before the store recorded runs (none
        recorded), counts as another's; a job with no request_id, none. Under ``_changed``,
        as the starts that record runs are."""
        runs = self.store.request_runs(job_id)
        return runs is not None and (not run_id or runs != {run_id})

    def submit(self, kind: str, fn: Callable[[JobContext], Message], *, message: str = "queued",
               cut_lists: tuple[str, ...] = (), request: RequestKey | None = None, owner: str | None = None,
               less_work: str = "") -> JobSnapshot:
        """Queue ``fn`` as a job of ``kind``; returns its QUEUED snapshot at once.
        ``cut_lists`` names the repeated fields of its result that may lose trailing items
        when the result is over ``max_result_bytes`` (see :meth:`_packed`). With
        ``request``, the job a request of its request_id submitted before (see
        :meth:`submitted`), if one is kept, instead of a new one: checked and recorded
        under one lock, so repeats racing each other make one job. ``owner``: the named
        caller submitting it, if any. ``less_work``: what a retry may ask less of should the
        job run the host or the model's device out of memory anywhere in it ("a smaller
        sample set"; "": nothing, see :func:`~explaind.errors.report_unexpected`): advice
        true of only part of a job (a visualisation's pairs, on the device at once only as
        they are optimised) is that part's own error's, not this."""
        with self._changed:
            if (previous := self.submitted(request)) is not None:
                log.info("operation %s (%s) requested again (request_id %s)", previous.record.job_id, previous.record.kind,
                         request.request_id if request else "", extra={FIELDS: _operation_ids(previous.record)})
                return previous
            if not self._accepting:
                raise Unavailable("the server is shutting down; no new jobs are accepted")
            queued = [live for live in self._live.values() if live.record.state == QUEUED]
            if owner is not None and self.max_queued_per_caller:
                if (mine := sum(live.record.owner == owner for live in queued)) >= self.max_queued_per_caller:
                    order = self._queue_order()
                    ahead = next((place for place, live in enumerate(order) if live.record.owner == owner), 0)  # none: a worker has just taken it
                    raise ResourceExhausted(f"job queue is full for caller {owner!r} ({mine} of its jobs queued, limit "
                                            f"{self.max_queued_per_caller}, [jobs].max_queued_per_caller); retry later",
                                            retry_delay_s=self._queue_retry_delay_s(ahead),
                                            quota=Quota("QUEUED_JOBS_PER_CALLER_EXCEEDED", "[jobs].max_queued_per_caller", self.max_queued_per_caller,
                                                        caller_subject(owner), "jobs this caller has queued"))
            if len(queued) >= self.max_queued:
                raise ResourceExhausted(f"job queue is full ({len(queued)} queued, limit {self.max_queued}); retry later",
                                        retry_delay_s=self._queue_retry_delay_s(),
                                        quota=Quota("QUEUED_JOBS_EXCEEDED", "[jobs].max_queued", self.max_queued, "server", "jobs queued"))
            self._kinds.add(kind)
            record = JobRecord(job_id=uuid.uuid4().hex[:16], kind=kind, state=QUEUED, create_time=self.store.now(), message=message, owner=owner)
            self.store.insert_job(record, request=request)
            live = _LiveJob(record, (fn, cut_lists), self.tracing.operation(record.job_id, kind), less_work)
            self._live[record.job_id] = live
            self.metrics.jobs_queued.inc()
            # One turn of a worker per job: the turn takes whichever job is first then (_queue_order).
            self._executor.submit(self._take_turn)
            submitted = self._snapshot(live)
        log.info("operation %s (%s) queued", record.job_id, kind, extra={FIELDS: _operation_ids(record)})
        return submitted

    def _queue_retry_delay_s(self, ahead: int = 0) -> float:
        """Seconds a caller refused for a full queue should wait until the queued job with
        ``ahead`` jobs before it in the queue's order starts: see QUEUE_RETRY_SAMPLE."""
        if not self._recent_run_s:
            return QUEUE_RETRY_UNKNOWN_S
        low, high = QUEUE_RETRY_RANGE_S
        return min(max((ahead + 1) * statistics.median(self._recent_run_s) / self._workers, low), high)

    def _queue_order(self) -> list[_LiveJob]:
        """The queued jobs no worker has taken yet, in the order the workers will take
        them if no other job is submitted (holding ``_changed``): the owners in the order
        of their latest job's start (one with none started first; ties: its oldest job's
        submission) take turns, one job each, their oldest first."""
        waiting: dict[str | None, deque[_LiveJob]] = {}  # each owner's jobs, oldest first; owners by their oldest job
        for live in self._live.values():
            if live.record.state == QUEUED and not live.taken:
                waiting.setdefault(live.record.owner, deque()).append(live)
        turns = deque(sorted(waiting, key=lambda owner: self._last_start.get(owner, -1)))
        order = []
        while turns:
            owner = turns.popleft()
            order.append(waiting[owner].popleft())
            if waiting[owner]:
                turns.append(owner)
        return order

    def _take_turn(self) -> None:
        """A worker's turn: run the job first in the queue's order; none if every job
        queued since its turn was given has ended or been taken (a cancelled one, say)."""
        with self._changed:
            order = self._queue_order()
            if not order:
                return
            live = order[0]
            self._last_start[live.record.owner] = next(self._starts)
            live.taken = True
        # Every line the job's run logs carries its span's ids and its operation's (JSON fields).
        with current(live.trace.span if live.trace is not None else None), log_fields(**_operation_ids(live.record)):
            self._run_job(live, *live.work)

    def _run_job(self, live: _LiveJob, fn: Callable[[JobContext], Message], cut_lists: tuple[str, ...]) -> None:
        with self._changed:  # one transition: a cancel either finished it already or sees RUNNING
            if live.record.state != QUEUED:
                return
            self.metrics.jobs_queued.dec()
            stages = _Stages(live.trace)
            started, started_clock = self.store.now(), time.monotonic()  # the record's epoch time; the duration's clock
            try:
                self._update(live, persist=True, state=RUNNING, start_time=started, message="running")
            except Exception as error:  # noqa: BLE001 - the store refused the write; the job cannot run
                _log_write_failure(error, "job %s (%s): storing its start failed", live.record.job_id, live.record.kind)
                code, why = _store_refusal(error)
                self._finish(live, FAILED, error=(code, f"the job could not be started: {why}; submit it again"))
                return
        waited = max(0.0, started - live.record.create_time)
        # The job's observations link to its operation's trace, when it is traced and sampled.
        linked = exemplar(trace_id(live.trace.span if live.trace is not None else None))
        self.metrics.job_queue_wait.labels(kind=live.record.kind).observe(waited, linked)
        # ExplaindJobQueueStalled: a started line with no end after it names what holds a worker.
        log.info("operation %s (%s) started after %.2f s queued", live.record.job_id, live.record.kind, waited)
        running = self.metrics.jobs_running.labels(kind=live.record.kind)
        running.inc()

        def record_the_run(end: JobRecord) -> None:
            """Where the end is set, before any reader sees it: observed after, a caller that
            read the metrics once its result was in could find the job still running."""
            running.dec()
            stages.enter(None)
            for stage, seconds in stages.seconds.items():
                self.metrics.job_stage_duration.labels(kind=end.kind, stage=stage).observe(seconds, linked)
            ran = time.monotonic() - started_clock
            self.metrics.job_duration.labels(kind=end.kind, outcome=end.state).observe(ran, linked)
            if end.state == SUCCEEDED or (end.state, end.error_code) == (FAILED, "DEADLINE_EXCEEDED"):  # see QUEUE_RETRY_SAMPLE
                with self._changed:  # read under it by submit (a median iterates it)
                    self._recent_run_s.append(ran)

        live.on_end = record_the_run
        try:
            context = JobContext(self, live, stages)
            stages.enter(None)
            try:
                result = fn(context)
            finally:
                stages.enter(stages.current or RUN_STAGE)
                stages.enter(FINISH_STAGE)
            packed = self._packed(context, result, cut_lists)
        except JobCancelled:
            if live.record.cancel_requested:
                self._finish(live, CANCELLED, error=("CANCELLED", "cancelled by request"))
            else:  # only shutdown() stops a job nobody cancelled
                self._finish(live, FAILED, error=(ABORTED, "the server shut down while this job was running; submit it again"))
        except ExplaindError as error:
            self._finish(live, FAILED, error=(error.code, str(error)), result=_subject_detail(error), error_details=_other_details(error))
        except BaseException as error:  # noqa: BLE001 - a job's failure is reported, not raised
            # BaseException too: a library's sys.exit() in the job's thread (SystemExit) left the
            # job running forever to its waiters, its worker free for the next one.
            self._finish(live, FAILED, error=report_unexpected(log, f"job {live.record.job_id} ({live.record.kind}) failed", error,
                                                               less_work=live.less_work))
        else:
            self._finish(live, SUCCEEDED, result=packed.SerializeToString())
        finally:
            with self._changed:  # left with no end set (an exception past the ones above): recorded as it stands
                unrecorded, live.on_end = live.on_end, None
            if unrecorded is not None:
                unrecorded(live.record)

    def _packed(self, context: JobContext, result: Message, cut_lists: tuple[str, ...]) -> any_pb2.Any:
        """``result`` as the operation's response. Over ``max_result_bytes``, the whole of
        it is saved as the artifact RESULT_ARTIFACT and the response keeps the leading
        items of its ``cut_lists``; ResourceExhausted (the job fails, the artifact stays)
        if it does not fit even with those empty."""
        packed = any_pb2.Any()
        packed.Pack(result)
        if self.max_result_bytes is None or packed.ByteSize() <= self.max_result_bytes:
            return packed
        context.save_artifact(RESULT_ARTIFACT, result.SerializeToString(), RESULT_MEDIA_TYPE)
        cut = self._cut(result, cut_lists)
        if cut is None:
            raise self._too_large(result, f"it is whole in the artifact {RESULT_ARTIFACT}")
        packed.Pack(cut)
        return packed

    def require_result_fits(self, result: Message, *, cut_lists: tuple[str, ...] = (), consequence: str = "") -> None:
        """Raise the ResourceExhausted a job returning ``result`` would fail with, so that a
        job with side effects checks before them (an edit stores a head version only for a
        result that can be returned). ``consequence`` ends the error's message."""
        if self.max_result_bytes is not None and self._cut(result, cut_lists) is None:
            raise self._too_large(result, consequence)

    def _cut(self, result: Message, cut_lists: tuple[str, ...]) -> Message | None:
        """``result``, or its leading items of ``cut_lists``, packed within ``max_result_bytes``; None if nothing fits."""
        packed = any_pb2.Any()
        packed.Pack(result)
        if packed.ByteSize() <= self.max_result_bytes:
            return result
        envelope = packed.ByteSize() - result.ByteSize()  # type URL, tags, length prefix
        return leading_items_that_fit(result, self.max_result_bytes - envelope, cut_lists)

    def _too_large(self, result: Message, consequence: str) -> ResourceExhausted:
        return ResourceExhausted(f"the result is {result.ByteSize()} bytes, over the {self.max_result_bytes} an operation's "
                                 f"response may hold (half of [server].max_message_bytes)" + (f"; {consequence}" if consequence else ""),
                                 quota=Quota("RESULT_BYTES_EXCEEDED", "[server].max_message_bytes", self.max_result_bytes, "server",
                                             "bytes of an operation's result"))

    def _finish(self, live: _LiveJob, state: str, *, error: tuple[str, str] = ("", ""), result: bytes = b"", **changes) -> None:
        """Store the job's end, then drop it from the live jobs (readers go to the store).
        If the store refuses, the job ends FAILED instead; if it refuses that too, the job
        stays live as FAILED in memory (the store says running until a restart fails it)."""
        message = {SUCCEEDED: "done", FAILED: "failed", CANCELLED: "cancelled"}[state]
        try:
            self._end(live, state=state, end_time=self.store.now(), error_code=error[0], error_message=error[1],
                      result=result, message=message, **changes)
        except Exception as write_error:  # noqa: BLE001 - e.g. a full disk; the outcome is lost, say so
            _log_write_failure(write_error, "job %s (%s): storing its end (%s) failed", live.record.job_id, live.record.kind, state)
            code, why = _store_refusal(write_error)
            failed = dict(state=FAILED, end_time=self.store.now(), error_code=code, result=b"", error_details=b"", message="failed",
                          error_message=f"the job ended {state} but {why}; submit it again")
            try:
                self._end(live, **failed)
            except Exception as failure_write_error:  # noqa: BLE001
                _log_write_failure(failure_write_error, "job %s: storing its failure failed too", live.record.job_id)
                with self._changed:
                    self._set_record(live, dataclasses.replace(live.record, **failed))

    def _end(self, live: _LiveJob, **changes) -> None:
        """Store the job's end and drop it from the live jobs in one hold of the lock: a
        reader the end wakes may delete the job at once, and must find it in the store
        alone (a live job that ended is one whose end the store refused)."""
        with self._changed:
            self._update(live, persist=True, **changes)
            self._live.pop(live.record.job_id, None)

    def _update(self, live: _LiveJob, *, persist: bool = False, preview: bytes | None = None, **changes) -> None:
        """Apply ``changes``; a write that is due goes to the store first, so readers never
        see a state the store does not have (a failed write raises and changes nothing)."""
        with self._changed:
            record = dataclasses.replace(live.record, **changes)
            now = time.monotonic()
            if persist or now - live.persisted_at >= PERSIST_INTERVAL_S:
                self.store.update_job(record)
                live.persisted_at = now
            if preview is not None:
                live.preview = preview
            self._set_record(live, record)

    def _set_record(self, live: _LiveJob, record: JobRecord) -> None:
        """Replace the job's record and wake its readers (holding ``_changed``); a job
        reaching its end is counted, and its run recorded (``on_end``), before anyone can see
        it ended."""
        if record.state in FINISHED_STATES and live.record.state not in FINISHED_STATES:
            self.metrics.jobs_ended.labels(kind=record.kind, outcome=record.state, code=record.error_code or "OK").inc()
            if live.on_end is not None:
                live.on_end, record_the_run = None, live.on_end
                record_the_run(record)
            _log_end(record)
            if live.trace is not None:
                live.trace.end(record)
        live.record = record
        self._changed.notify_all()

    # Reading, cancelling, waiting ----------------------------------------------------

    def get(self, job_id: str) -> JobSnapshot:
        with self._changed:
            live = self._live.get(job_id)
            if live is not None:
                return self._snapshot(live)
        return JobSnapshot(self.store.get_job(job_id))

    def _snapshot(self, live: _LiveJob) -> JobSnapshot:
        """The live job as a reader sees it (holding ``_changed``): a queued one's message
        says where it stands (:meth:`_queued_message`), made at each read and never
        stored, so the queue moving costs no write."""
        record = live.record
        if record.state == QUEUED:
            record = dataclasses.replace(record, message=self._queued_message(live))
        return JobSnapshot(record, live.preview)

    def _queued_message(self, live: _LiveJob) -> str:
        """``live``'s stored message ("queued"), its place in the queue and what holds the
        workers, e.g. "queued: 2 ahead; running: visualize_neurons 0123456789abcdef (step
        120/400, 14 min)": a caller behind a long job sees what it waits for, and can
        look that job up by its id (holding ``_changed``). Its place is in the fair order
        (:meth:`_queue_order`): a job another caller submits later may go before it."""
        order = self._queue_order()
        ahead = order.index(live) if live in order else 0  # not in it: a worker has just taken it
        now = self.store.now()
        running = [_holder(other.record, now) for other in self._live.values() if other.record.state == RUNNING]
        return f"{live.record.message}: {f'{ahead} ahead' if ahead else 'next'}" + (f"; running: {', '.join(running)}" if running else "")

    def _read_again(self, job_id: str, read: _LiveJob | None) -> tuple[JobSnapshot, _LiveJob | None]:
        """:meth:`get` for a reader that reads the job over and over (watch, wait), and the
        live job it found (None if none), to pass back as ``read`` next time. A job that has
        left the live jobs since has ended, its record as stored: that is what the reader
        gets, though the job may be gone from the store (its end wakes every reader at once,
        and one of them, another client say, may delete it before this one reads again)."""
        with self._changed:
            live = self._live.get(job_id)
            if live is not None:
                return self._snapshot(live), live
            if read is not None:
                return JobSnapshot(read.record), None  # as get() read it from the store
        return JobSnapshot(self.store.get_job(job_id)), None

    def response(self, snapshot: JobSnapshot) -> JobSnapshot:
        """``snapshot`` with its result, read if a listing without responses left it out;
        NotFound for a job deleted since (it has no response to send: as a succeeded
        operation with an empty one, a client could not unpack it)."""
        if snapshot.record.state != SUCCEEDED or snapshot.record.result:
            return snapshot
        return JobSnapshot(self.store.get_job(snapshot.record.job_id), snapshot.preview)

    def list(self, *, kind: str = "", state: str = "", owner: str = "", after: tuple[float, str] | None = None,
             limit: int = 100, responses: bool = True) -> list[JobSnapshot]:
        """Newest first (only ``owner``'s, when given), resuming after the (create_time, job_id)
        of a previous page's last job; fewer than ``limit`` only at the end (a page's size is how a caller tells).
        Without ``responses``, a succeeded job stored before the call has ``result`` b""
        (:meth:`response` reads it)."""
        # A kind no engine runs any more still lists the jobs stored under it.
        if kind and kind not in self._kinds and not self.store.list_jobs(kind=kind, limit=1):
            raise InvalidArgument(f"unknown kind {kind!r}; the kinds are {', '.join(sorted(self._kinds))}", field="kind")
        snapshots: list[JobSnapshot] = []
        while len(snapshots) < limit:
            wanted = limit - len(snapshots)
            records = self.store.list_jobs(kind=kind, state=state, owner=owner, after=after, limit=wanted, responses=responses)
            for record in records:
                if record.state in FINISHED_STATES:
                    snapshots.append(JobSnapshot(record))
                    continue
                try:  # the live state of a running one, which may have ended and been deleted since
                    live = self.get(record.job_id)
                except NotFound:  # read on past it: a short page would end a caller's listing
                    continue
                if not state or live.record.state == state:  # it may have moved on from the state asked for
                    snapshots.append(live)
            if len(records) < wanted:
                break
            after = (records[-1].create_time, records[-1].job_id)
        return snapshots

    def cancel(self, job_id: str, *, caller: str | None = None) -> JobSnapshot:
        """Ask a job to stop; a queued job ends at once (its worker skips it), a running
        one at its next check. PermissionDenied when ``caller`` may not change it."""
        return self.request_cancel(job_id, caller=caller)[0]

    def request_cancel(self, job_id: str, *, caller: str | None = None, unless_asked_by_another_run_than: str | None = None) -> tuple[JobSnapshot, bool]:
        """:meth:`cancel`, and whether this call changed anything: False for a job that had
        ended or had been asked to stop already (the audit log names who stopped a job).
        ``unless_asked_by_another_run_than`` (a run_id): leave the job alone where another
        run asked for it under its request_id (the snapshot's ``requested_by_another_run``):
        an interrupted run's cancel would end that run's wait."""
        with self._changed:
            self._require_owner(job_id, caller)
            live = self._live.get(job_id)
            if live is None or live.record.state in FINISHED_STATES or live.record.cancel_requested:
                return self.get(job_id), False  # ended (live: its end the store refused), or stopping already
            if unless_asked_by_another_run_than is not None and self._asked_by_another_run(job_id, unless_asked_by_another_run_than):
                return dataclasses.replace(self.get(job_id), requested_by_another_run=True), False
            if live.record.state == QUEUED:
                live.cancel_event.set()
                self._end_queued(live, CANCELLED, ("CANCELLED", "cancelled before it started"), cancel_requested=True)
            else:
                # Recorded before the job can see the event: a job that stops reads it to
                # tell a cancel (CANCELLED) from a shutdown (FAILED, ABORTED).
                self._update(live, persist=True, cancel_requested=True)
                live.cancel_event.set()
                log.info("operation %s (%s): cancel requested", job_id, live.record.kind, extra={FIELDS: _operation_ids(live.record)})
        return self.get(job_id), True

    def _require_owner(self, job_id: str, caller: str | None) -> None:
        if caller is not None:
            self.ownership.require_owner(caller, self.get(job_id).record.owner, f"operations/{job_id}", field="name")

    def delete(self, job_id: str, *, caller: str | None = None) -> None:
        """Forget a finished job (FailedPrecondition while it is queued or running;
        PermissionDenied when ``caller`` may not change it)."""
        with self._changed:  # a job ends (store first, then here) under this lock
            self._require_owner(job_id, caller)
            live = self._live.get(job_id)
            if live is not None and live.record.state not in FINISHED_STATES:
                raise FailedPrecondition(f"operations/{job_id} is {live.record.state}; cancel it and wait for it to end, then delete it", field="name")
            if live is not None:  # ended, but the store refused to record it (see _finish): it may take it now
                try:
                    self._end(live)
                except Exception as error:  # noqa: BLE001 - still refused (a full data dir, say)
                    raise FailedPrecondition(f"operations/{job_id} ended {live.record.state} but the store failed to record its end "
                                             f"({error}); it can be deleted once the store takes it, or after the server restarts",
                                             field="name") from None
            self.store.delete_job(job_id)
        self.metrics.operations_deleted.labels(reason="request").inc()

    def record_unrecorded_ends(self) -> int:
        """Store the ends the store refused (see :meth:`_finish`), now that it may take them
        (space freed in a full data dir): until then it says running, which a listing by
        state and a restart read. Returns how many were stored; a refusal is left for the
        next call."""
        recorded = 0
        with self._changed:
            for live in [live for live in self._live.values() if live.record.state in FINISHED_STATES]:
                try:
                    self._end(live)
                except Exception:  # noqa: BLE001 - still refused; the next sweep tries again
                    continue
                recorded += 1
        return recorded

    def delete_ended_before(self, end_time: float, *, interrupt: threading.Event | None = None) -> int:
        """Retention: forget the jobs that finished before ``end_time`` (epoch s); once
        ``interrupt`` is set, after the chunk under way (the rest: the next sweep's)."""
        deleted = self.store.delete_jobs_ended_before(end_time, interrupt=interrupt)
        self.metrics.operations_deleted.labels(reason="retention").inc(deleted)
        return deleted

    def watch(self, job_id: str, *, is_active: Callable[[], bool] = lambda: True, poll_s: float = 0.25) -> Iterator[JobSnapshot]:
        """Yield the job now and after every change until it is done (or the caller leaves):
        at once for a new state, artifact or preview, the latest progress at most every
        WATCH_PROGRESS_INTERVAL_S."""
        last, sent_at, read = None, 0.0, None
        while True:
            snapshot, read = self._read_again(job_id, read)
            if snapshot != last:
                wait = WATCH_PROGRESS_INTERVAL_S - (time.monotonic() - sent_at)
                progress_only = last is not None and snapshot.preview == last.preview and (
                    (snapshot.record.state, snapshot.record.artifacts) == (last.record.state, last.record.artifacts))
                if progress_only and wait > 0:  # woken by the next change (a preview or the end goes at once), else the progress of that moment
                    self._wait_for_change(job_id, snapshot, wait)
                    continue
                yield snapshot
                last, sent_at = snapshot, time.monotonic()
            if snapshot.done or not is_active():
                return
            self._wait_for_change(job_id, snapshot, poll_s)

    def _wait_for_change(self, job_id: str, read: JobSnapshot, timeout_s: float) -> None:
        """Sleep until the job changes from ``read`` or ``timeout_s`` pass; not at all if it
        changed (or ended) since it was read: its wake-up has gone, and the sleep would
        last the whole timeout."""
        with self._changed:
            live = self._live.get(job_id)
            if live is not None and self._snapshot(live) == read:
                self._changed.wait(timeout_s)

    def wait(self, job_id: str, timeout: float | None = None, *, is_active: Callable[[], bool] = lambda: True) -> JobSnapshot:
        """The job once done, or as it is when ``timeout`` seconds pass or the caller leaves."""
        deadline = None if timeout is None else time.monotonic() + timeout
        read = None
        while True:
            snapshot, read = self._read_again(job_id, read)
            remaining = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
            if snapshot.done or remaining <= 0 or not is_active():
                return snapshot
            with self._changed:
                live = self._live.get(job_id)
                if live is not None and self._snapshot(live).record == snapshot.record:
                    self._changed.wait(remaining)

    def _end_queued(self, live: _LiveJob, state: str, error: tuple[str, str], **changes: object) -> None:
        """Finish a job that never started; its worker skips it when its turn comes."""
        self.metrics.jobs_queued.dec()
        self._finish(live, state, error=error, **changes)

    def oldest_unfinished_create_time(self) -> float | None:
        """When the oldest queued or running job was submitted (epoch s); None if none is."""
        with self._changed:
            return min((live.record.create_time for live in self._unfinished()), default=None)

    def _unfinished(self) -> list[_LiveJob]:
        """Live jobs not yet done (a done one stays live only when its end could not be stored)."""
        return [live for live in self._live.values() if live.record.state not in FINISHED_STATES]

    def shutdown(self, grace_s: float) -> None:
        """Stop accepting; let jobs finish for ``grace_s``, then end what is left FAILED with
        code ABORTED, as :meth:`recover` does after a crash: the job was fine, the server
        went away (queued ones at once, running ones at their next cancellation check)."""
        with self._changed:
            self._accepting = False
        deadline = time.monotonic() + grace_s
        with self._changed:
            while self._unfinished() and time.monotonic() < deadline:
                self._changed.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            for live in self._unfinished():
                if live.record.state == QUEUED:
                    self._end_queued(live, FAILED, (ABORTED, "the server shut down before this job started; submit it again"))
                else:
                    live.cancel_event.set()
        self._executor.shutdown(wait=True, cancel_futures=False)
