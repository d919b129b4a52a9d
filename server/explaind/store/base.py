"""The store interface: sample sets, jobs, content-addressed artifacts, feature cache.

Engines and the job manager talk to this protocol only, so a PostgreSQL (+ object
store) implementation can replace the embedded SQLite one without touching them.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument
from ..ownership import OwnerCheck

# Job states, stored as text.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED_STATES = (SUCCEEDED, FAILED, CANCELLED)
# The error code of a job the server's shutdown or restart failed: the job itself was
# fine, so its request_id (AIP-155) starts it again.
ABORTED = "ABORTED"
# The key of a head version's details naming the job that stored it: the version stands
# only if that job succeeds, so the job of a version not yet dropped must not be forgotten.
EDIT_JOB_ID = "edit_job_id"


class StoreOpenError(Exception):
    """The store cannot be used: its data dir is held by another server, or its files are
    unreadable, read-only or corrupt. Raised at start-up, with the path in the message."""


@dataclass(frozen=True)
class SampleRecord:
    """One sample: its image is the artifact ``digest`` (encoded image bytes)."""

    digest: str
    label: int
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleSetInfo:
    sample_set_id: str
    display_name: str
    sample_count: int
    class_counts: dict[int, int]
    create_time: float
    update_time: float
    uploading: bool = False  # an upload in several requests is unfinished: not usable yet
    owner: str | None = None  # the named caller that created it (None: none, see explaind.ownership)

    @property
    def uid(self) -> str:
        return sample_set_uid(self.sample_set_id, self.create_time)


def sample_set_uid(sample_set_id: str, create_time: float) -> str:
    """What tells a set from another of the same id, deleted before it (AIP-148's uid):
    a name-based UUID (version 5) of the id and its creation time (epoch s), so nothing
    more is stored and every store derives the same."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"explaind:sample-set:{sample_set_id}:{create_time!r}"))


def sample_set_id_taken(sample_set_id: str, foreign_owner: str | None = None) -> AlreadyExists:
    """The error for a CreateSampleSet under the id of a set that exists; ``foreign_owner``:
    the set's owner, when the caller may not change the set (appending to it or deleting
    it would be refused)."""
    if foreign_owner is not None:
        return AlreadyExists(f"sample set {sample_set_id!r} already exists, owned by caller {foreign_owner!r}; choose another id",
                             field="sample_set_id")
    return AlreadyExists(f"sample set {sample_set_id!r} already exists; append to it or delete it first", field="sample_set_id")


def require_sample_set_uid(sample_set_id: str, create_time: float, uid: str | None, field: str) -> None:
    """FailedPrecondition naming ``field`` unless the set made at ``create_time`` is the
    set of ``uid`` (None or "": any set of the id will do)."""
    if uid and sample_set_uid(sample_set_id, create_time) != uid:
        raise FailedPrecondition(f"sample set {sample_set_id!r} is not the set of uid {uid} any more: it was deleted and "
                                 "created again since, by another client say", field=field)


@dataclass(frozen=True)
class RequestKey:
    """What identifies a request to repeat (AIP-155): the client's ``request_id`` (a UUID)
    and a ``fingerprint`` of the rest of the request, which a repeat must match; ``caller``,
    the named caller sending it (explaind.ownership; None: none named): an error for its id
    reused names the operation or set the id went to only if this caller, or no named
    caller, sent the request that used it (:func:`request_id_reused`), kept with an upload's
    request (an admin's append to another caller's set is the admin's). ``run_id``: the
    client's id of the run sending it ("" none: every such run counts as another's), not
    part of the request: a repeat from another run is the same request."""

    request_id: str
    fingerprint: str
    caller: str | None = None
    run_id: str = ""


# Told of an upload's request answered as a repeat: (the set it was applied to, its key).
OnRepeat = Callable[[str, RequestKey], object]


def request_id_reused(request_id: str, *, operation: str | None = None, sample_set: str | None = None) -> InvalidArgument:
    """The error for a request_id (AIP-155) sent with another request than the one it
    named, saying what that request did: created ``operation`` (``operations/<id>``, which
    the error names for clients to read too: ExplaindError.operation), or was applied to
    ``sample_set``. Neither: it was another named caller's request (two callers deriving
    the same ids, say), whose operation or set the error does not name: a client reading
    the operation would take that caller's for its own."""
    outcome = (f", which created {operation}" if operation is not None else
               f", which was applied to sample set {sample_set!r}" if sample_set is not None else " by another caller")
    return InvalidArgument(f"request_id {request_id} was sent with another request{outcome}; "
                           "give each request its own request_id (a new UUID) and send it again only with the same request",
                           field="request_id", operation=operation)


def request_of_deleted_job(request_id: str, operation: str) -> FailedPrecondition:
    """The error for a request, sent again or first arriving late (its resend found the job,
    cancelled and deleted it), whose request_id started ``operation``, deleted since: run
    again it would make a job nobody waits on. FAILED_PRECONDITION, not ALREADY_EXISTS
    (nothing exists now) nor the deleted job (AIP-155's repeat answer, which a GetOperation
    of it would then refuse NOT_FOUND): the server's state, not the request, refuses it,
    and the same request will not succeed until sent under a new request_id."""
    return FailedPrecondition(f"request_id {request_id} started {operation}, which was deleted since (DeleteOperation), so this request "
                              "is not run again: to run it, send it with a new request_id (a new UUID)", field="request_id")


@dataclass(frozen=True)
class ArtifactRef:
    name: str
    media_type: str
    digest: str
    size_bytes: int


@dataclass(frozen=True)
class JobRecord:
    """A job as persisted. ``result`` is a serialised ``google.protobuf.Any``: the response
    of a succeeded job, the detail naming the field or the limit of a failed one's error
    (if any: a BadRequest or an ErrorInfo); ``error_details``, a failed job's other details
    (its QuotaFailure, its PreconditionFailure naming the samples it failed for), as a serialised ``google.rpc.Status`` holding only them, or
    b"" (kept apart: a release before them reads ``result`` as one Any); ``error_code``
    a ``grpc.StatusCode`` name."""

    job_id: str
    kind: str
    state: str
    create_time: float
    start_time: float | None = None
    end_time: float | None = None
    step: int = 0
    total: int = 0
    message: str = ""
    cancel_requested: bool = False
    error_code: str = ""
    error_message: str = ""
    result: bytes = b""
    artifacts: tuple[ArtifactRef, ...] = ()
    owner: str | None = None  # the named caller that submitted it (None: none, see explaind.ownership)
    error_details: bytes = b""


@dataclass(frozen=True)
class HeadVersionRecord:
    """A classifier head stored for one feature extractor (``feature_version``).

    ``weights_digest`` is the artifact holding the head's weights (safetensors bytes);
    ``head_hash`` the content hash Predict's model_version is built from; ``details``
    engine-defined metadata (method, neurons, evaluations), stored as JSON.
    """

    feature_version: str
    version_id: str
    head_hash: str
    weights_digest: str
    parent_version_id: str
    create_time: float
    details: dict = field(default_factory=dict)
    owner: str | None = None  # the named caller whose edit stored it (None: none, see explaind.ownership)


class Store(Protocol):
    # Artifacts (content-addressed blobs). ``with store.writing_blobs() as put:`` gives
    # ``put(data) -> digest``; write the records that reference the blobs inside the block
    # (sweeps leave its blobs alone until it ends).
    def writing_blobs(self) -> AbstractContextManager[Callable[[bytes], str]]: ...
    # Sweep: remove the blobs that lost their last reference before ``before`` (epoch s;
    # None: any time); ``everything`` also checks every file on disk. Returns how many;
    # returns early once ``interrupt`` is set, the rest left for a later sweep.
    def delete_unused_blobs(self, *, before: float | None = None, everything: bool = False, interrupt: threading.Event | None = None) -> int: ...
    # ``length`` bytes from ``offset`` (None: to the end), so large artifacts are served in ranges.
    def get_blob(self, digest: str, *, offset: int = 0, length: int | None = None, size: int | None = None) -> bytes: ...

    # The wall clock (epoch s), always after any time it gave already (set back, it moves on
    # from there by the least a float can until it catches up): what stamps jobs, sets,
    # head versions and blobs' loss of their last reference, in the order things happened
    # (the sweep compares a blob's with the oldest unfinished job's submission).
    def now(self) -> float: ...

    # Sample sets. Unknown ids raise NotFound; existing ids on create raise AlreadyExists.
    # A request applied with a ``request_id`` (AIP-155) is remembered with its fingerprint
    # for as long as its set is kept: applied again with the same ones, it changes nothing
    # and returns the set as it is now; with another fingerprint, InvalidArgument naming
    # request_id (checked in the transaction that applies it, so racing repeats apply once;
    # ``on_repeat(set_id, request)`` is called, in that transaction, when it was a repeat).
    # ``before_write()``, called first in that transaction, may raise to write nothing: a
    # caller that stopped waiting while the request waited for the store (its retry may
    # have made the set, which its upload then deleted) gets no set made after all.
    # ``id_taken(its_owner)``: the AlreadyExists for an id a set holds, worded for the
    # caller (sample_set_id_taken's); without, that of a caller that may change the set.
    def create_sample_set(self, sample_set_id: str, display_name: str, samples: Sequence[SampleRecord], *, uploading: bool = False,
                          request: RequestKey | None = None, on_repeat: OnRepeat | None = None, owner: str | None = None,
                          before_write: Callable[[], object] | None = None,
                          id_taken: Callable[[str | None], AlreadyExists] | None = None) -> SampleSetInfo: ...
    # With ``uid``, only to the set of that uid: another (deleted and created again since,
    # by another client say) raises FailedPrecondition naming sample_set_uid. So does delete.
    # ``check_owner`` (explaind.ownership) may refuse the set, given its owner; so in delete.
    # ``before_write`` as in create.
    def append_samples(self, sample_set_id: str, samples: Sequence[SampleRecord], *, finish_upload: bool = False,
                       uid: str | None = None, request: RequestKey | None = None, on_repeat: OnRepeat | None = None,
                       check_owner: OwnerCheck | None = None, before_write: Callable[[], object] | None = None) -> SampleSetInfo: ...
    # ResourceExhausted (field samples) when ``adding`` samples would take the sets of named
    # caller ``owner`` past the store's limit per caller; create and append check it too.
    def require_room_for_samples(self, owner: str | None, adding: int) -> None: ...
    # The set a request of ``request_id`` was applied to, as it is now; None if none is kept
    # (its rows go with that set, so a set made under its id since is never it). Another
    # request's ``fingerprint`` raises InvalidArgument naming request_id.
    def sample_set_of_request(self, request: RequestKey) -> SampleSetInfo | None: ...
    def get_sample_set(self, sample_set_id: str) -> SampleSetInfo: ...
    # Oldest first; ``after`` (create_time, sample_set_id) resumes after that set, so sets
    # created or deleted while a client pages do not shift the pages. With ``owner``, only
    # the sets that named caller made, read without the others'.
    def list_sample_sets(self, *, owner: str = "", after: tuple[float, str] | None = None, limit: int = 100) -> list[SampleSetInfo]: ...
    # In the order stored; samples are only appended, so the first n are the set as it was
    # when it held n (a reader keeps to the size it checked). With ``uid``, only the set of
    # that uid's: another (deleted and created again since the caller read the uid) raises
    # FailedPrecondition naming sample_set_id.
    def list_samples(self, sample_set_id: str, offset: int = 0, limit: int | None = None, *, uid: str | None = None) -> list[SampleRecord]: ...
    # Its images become candidates for delete_unused_blobs (a job still reading them keeps them).
    def delete_sample_set(self, sample_set_id: str, *, uid: str | None = None, check_owner: OwnerCheck | None = None) -> None: ...
    # Delete the sets still uploading (at start-up: an earlier process left them so), or
    # with ``idle_s`` only those that had no request for over ``idle_s`` seconds (by the
    # monotonic clock: a wall clock set forward does not make a live upload idle);
    # returns their ids.
    def delete_unfinished_uploads(self, *, idle_s: float | None = None) -> list[str]: ...

    # Jobs. A job inserted with a ``request_id`` (AIP-155) is found by it, with the
    # fingerprint of its request, until the job is deleted or another is inserted with it
    # after it failed ABORTED; an id given to another job raises AlreadyExists naming
    # request_id. After delete_job (not retention's) of a job not ABORTED, the id raises request_of_deleted_job
    # (another request's, request_id_reused) until delete_jobs_ended_before passes the
    # job's end time.
    def insert_job(self, job: JobRecord, *, request: RequestKey | None = None) -> None: ...
    # The job inserted with ``request_id``; None if none is kept. Another request's
    # ``fingerprint`` raises InvalidArgument naming request_id (request_id_reused: the job
    # too, unless another caller made it).
    def job_of_request(self, request: RequestKey) -> str | None: ...
    # Record that a request from run ``run_id`` ("" none) got job ``job_id`` sent again (a
    # job made before the store recorded runs keeps none); a failed write (a full data dir)
    # is logged and kept in memory instead, not failing the repeat.
    def add_request_run(self, job_id: str, run_id: str) -> None: ...
    # The runs whose request under job ``job_id``'s request_id got it, making it or sent
    # again; None: it has no request_id; empty: made before the store recorded runs.
    def request_runs(self, job_id: str) -> frozenset[str] | None: ...
    def update_job(self, job: JobRecord) -> None: ...
    def get_job(self, job_id: str) -> JobRecord: ...
    # Newest first; ``after`` (create_time, job_id) resumes after that job, so jobs created
    # while a client pages do not shift the pages.
    # Without ``responses``, a succeeded job's ``result`` is b"" (read it with get_job).
    # With ``owner``, only the jobs that named caller submitted, read without the others'.
    def list_jobs(self, *, kind: str = "", state: str = "", owner: str = "", after: tuple[float, str] | None = None,
                  limit: int = 100, responses: bool = True) -> list[JobRecord]: ...
    # End queued and running jobs FAILED (ABORTED) with ``reason``; returns their (id, kind).
    def fail_unfinished_jobs(self, reason: str) -> list[tuple[str, str]]: ...
    # Forget finished jobs (a queued or running one raises FailedPrecondition); their
    # artifacts become candidates for delete_unused_blobs.
    def delete_job(self, job_id: str) -> None: ...
    # Retention: forget the finished jobs that ended before ``end_time`` (epoch s); returns how many;
    # returns early once ``interrupt`` is set, the rest left for a later sweep.
    def delete_jobs_ended_before(self, end_time: float, *, interrupt: threading.Event | None = None) -> int: ...

    # Feature cache, keyed by (feature version, image digest); rows (D,) float32.
    def get_features(self, version: str, digests: Sequence[str]) -> dict[str, np.ndarray]: ...
    def put_features(self, version: str, features: dict[str, np.ndarray]) -> bool: ...
    def retain_features(self, version: str) -> int: ...

    # Head versions, per feature version. Unknown ids raise NotFound.
    # ResourceExhausted when ``record.owner`` holds the store's limit per caller of versions
    # of its feature version already (asked in the insert's transaction).
    def insert_head_version(self, record: HeadVersionRecord) -> None: ...
    # ResourceExhausted when named caller ``owner`` may store no more versions of
    # ``feature_version``, as insert_head_version would raise.
    def require_room_for_head_version(self, feature_version: str, owner: str | None) -> None: ...
    # Oldest first; ``after`` = (create_time, version_id) of the last one already listed.
    def list_head_versions(self, feature_version: str, *, after: tuple[float, str] | None = None,
                           limit: int | None = None) -> list[HeadVersionRecord]: ...
    def get_head_version(self, feature_version: str, version_id: str) -> HeadVersionRecord: ...
    # The oldest version of ``head_hash`` (a head loaded at start-up); None if none.
    def first_head_version_of_hash(self, feature_version: str, head_hash: str) -> HeadVersionRecord | None: ...
    # (version id, job id) of the versions stored by an edit that failed or was cancelled, oldest first.
    def head_versions_of_failed_edits(self, feature_version: str) -> list[tuple[str, str]]: ...
    # Ids of the versions whose parent is ``version_id``, oldest first (as listed).
    def head_version_children(self, feature_version: str, version_id: str) -> list[str]: ...
    # Delete one; its parent takes its place as the active version and as its children's parent (one transaction).
    def delete_head_version(self, feature_version: str, version_id: str) -> None: ...
    # A new version's N (its id is vN): 1 + the highest N of the ids vN stored or deleted; 0 when none.
    def next_head_version_number(self, feature_version: str) -> int: ...
    def set_active_head_version(self, feature_version: str, version_id: str) -> None: ...
    def active_head_version(self, feature_version: str) -> str | None: ...
    # The version of the head the model file held at the last start (a changed file is served).
    def set_file_head_version(self, feature_version: str, version_id: str) -> None: ...
    def file_head_version(self, feature_version: str) -> str | None: ...

    def close(self) -> None: ...
