"""Embedded store: SQLite in WAL mode for records, a directory of sha256-named blobs."""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, NamedTuple, TypeVar

import numpy as np

from ..errors import AlreadyExists, DataLoss, FailedPrecondition, NotFound, Quota, ResourceExhausted, caller_subject, store_remedy
from ..ownership import OwnerCheck
from .base import (ABORTED, CANCELLED, EDIT_JOB_ID, FINISHED_STATES, FAILED, QUEUED, RUNNING, SUCCEEDED, ArtifactRef, HeadVersionRecord, JobRecord, OnRepeat, RequestKey, SampleRecord,
                   SampleSetInfo, StoreOpenError, request_id_reused, request_of_deleted_job, require_sample_set_uid, sample_set_id_taken)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sample_sets (
    id TEXT PRIMARY KEY, display_name TEXT NOT NULL, create_time REAL NOT NULL, update_time REAL NOT NULL
);
-- Listing pages in their order (see _resume_after), without sorting every set for each page.
CREATE INDEX IF NOT EXISTS sample_sets_by_time ON sample_sets (create_time, id);
-- Sets whose upload in several requests is unfinished. A table of its own, not a column,
-- so a store stays usable by the release before it (rolling back adds no column trouble).
CREATE TABLE IF NOT EXISTS uploading_sets (
    id TEXT PRIMARY KEY REFERENCES sample_sets(id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS samples (
    set_id TEXT NOT NULL REFERENCES sample_sets(id) ON DELETE CASCADE, position INTEGER NOT NULL,
    digest TEXT NOT NULL, label INTEGER NOT NULL, attributes TEXT NOT NULL, PRIMARY KEY (set_id, position)
);
-- Whether a blob is still used, when a set is deleted.
CREATE INDEX IF NOT EXISTS samples_by_digest ON samples (digest);
-- Blobs that may have lost their last reference, and since when (epoch seconds): the
-- images of deleted sets, the weights of deleted head versions. A sweep removes those
-- nothing uses any more (delete_unused_blobs).
CREATE TABLE IF NOT EXISTS blob_candidates (digest TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, create_time REAL NOT NULL,
    start_time REAL, end_time REAL, step INTEGER NOT NULL, total INTEGER NOT NULL, message TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL, error_code TEXT NOT NULL, error_message TEXT NOT NULL,
    result BLOB NOT NULL, artifacts TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (create_time);
-- Listing by kind, newest first, without reading other kinds' jobs.
CREATE INDEX IF NOT EXISTS jobs_by_kind ON jobs (kind, create_time);
-- Retention: finished jobs oldest first.
CREATE INDEX IF NOT EXISTS jobs_by_end_time ON jobs (end_time);
-- Listing by state (the few running among thousands finished) and, at start-up, the
-- unfinished ones, without reading every job.
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, create_time);
-- Listing by kind and state (a kind's running ones among thousands of its finished, or a
-- state's of one kind among others'), newest first, ties by id, as the page orders.
CREATE INDEX IF NOT EXISTS jobs_by_kind_and_state ON jobs (kind, state, create_time DESC, id);
-- Every blob a job's artifacts point at, or did (a replaced artifact's blob stays until
-- the job goes): whether a blob is still used, without reading every job's artifacts.
CREATE TABLE IF NOT EXISTS job_artifacts (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, digest TEXT NOT NULL, PRIMARY KEY (job_id, digest)
);
CREATE INDEX IF NOT EXISTS job_artifacts_by_digest ON job_artifacts (digest);
-- The request_id (AIP-155) a job was submitted with, and a fingerprint of the rest of its
-- request: a request sent again gets that job, for as long as the job is kept.
CREATE TABLE IF NOT EXISTS job_requests (
    request_id TEXT PRIMARY KEY, job_id TEXT NOT NULL UNIQUE REFERENCES jobs(id) ON DELETE CASCADE, fingerprint TEXT NOT NULL
);
-- The runs (RequestKey.run_id, '' for none named) whose request under a job's request_id
-- got the job, making it or sent again: a repeat's answer says whether another run asked
-- for it too (OperationMetadata.requested_by_another_run). The release before never reads
-- it, and its rows go with their job.
CREATE TABLE IF NOT EXISTS job_request_runs (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, run_id TEXT NOT NULL, PRIMARY KEY (job_id, run_id)
);
-- The request_id of each job DeleteOperation deleted, with its request's fingerprint,
-- the job's owner (NULL: none named) and end time: that request arriving later (a first
-- request delayed past its resend, whose job was found, cancelled and deleted) would
-- start a job nobody waits on, so it is refused (FAILED_PRECONDITION naming request_id)
-- for as long as the job would have been kept: retention deletes a row with the jobs
-- that ended when it did. The release before never reads it (after a rollback such a
-- request starts a job again, as it did there); a job retention deletes leaves none.
CREATE TABLE IF NOT EXISTS deleted_job_requests (
    request_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, fingerprint TEXT NOT NULL, owner TEXT, end_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deleted_job_requests_by_end_time ON deleted_job_requests (end_time);
-- The request_id (AIP-155) of each CreateSampleSet and AppendSamples applied to a set,
-- and a fingerprint of the rest of its request: a request sent again changes nothing and
-- gets the set, for as long as the set is kept (its rows go with it).
CREATE TABLE IF NOT EXISTS sample_set_requests (
    request_id TEXT PRIMARY KEY, set_id TEXT NOT NULL REFERENCES sample_sets(id) ON DELETE CASCADE, fingerprint TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sample_set_requests_by_set ON sample_set_requests (set_id);
-- The named caller that sent each of those requests, for those one did: an admin may
-- append to another caller's set, and the refusal of a request_id reused names the set
-- only to the request's sender (request_id_reused), not to the set's owner. A table, not
-- a column, as job_owners below; its rows go with their request, and those with their set.
-- A request without one (applied by the release before it) is named as its set's owner's.
CREATE TABLE IF NOT EXISTS sample_set_request_senders (
    request_id TEXT PRIMARY KEY REFERENCES sample_set_requests(request_id) ON DELETE CASCADE, sender TEXT NOT NULL
);
-- The named caller that made a job, set or head version (explaind.ownership), for those
-- one did. Tables, not columns: releases before them insert rows by position, all
-- columns, and the rows go with their object when such a release deletes it. A job's
-- or set's row carries its create_time (inserted with it, and never changed), so the
-- index below holds one caller's objects in list order.
CREATE TABLE IF NOT EXISTS job_owners (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE, owner TEXT NOT NULL, create_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sample_set_owners (
    set_id TEXT PRIMARY KEY REFERENCES sample_sets(id) ON DELETE CASCADE, owner TEXT NOT NULL, create_time REAL NOT NULL
);
-- A page of one caller's jobs or sets (owner=) in list order (jobs newest first, ties by
-- id; sets oldest first), read from where it starts (_resume_after): neither other
-- callers' objects nor the caller's others are read or sorted.
CREATE INDEX IF NOT EXISTS job_owners_by_owner ON job_owners (owner, create_time DESC, job_id);
CREATE INDEX IF NOT EXISTS sample_set_owners_by_owner ON sample_set_owners (owner, create_time, set_id);
-- A failed job's error details besides the one in jobs.result (JobRecord.error_details):
-- a table, not a column, as job_owners; the release before reads jobs.result alone, and
-- deletes these with their job.
CREATE TABLE IF NOT EXISTS job_error_details (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE, details BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS features (
    version TEXT NOT NULL, digest TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (version, digest)
);
CREATE TABLE IF NOT EXISTS head_versions (
    feature_version TEXT NOT NULL, version_id TEXT NOT NULL, head_hash TEXT NOT NULL, weights_digest TEXT NOT NULL,
    parent_version_id TEXT NOT NULL, create_time REAL NOT NULL, details TEXT NOT NULL, PRIMARY KEY (feature_version, version_id)
);
CREATE INDEX IF NOT EXISTS head_versions_by_time ON head_versions (feature_version, create_time, version_id);
-- The highest id vN, for a new version's (next_head_version_number), without reading every version.
CREATE INDEX IF NOT EXISTS head_versions_by_number ON head_versions (feature_version, CAST(substr(version_id, 2) AS INTEGER));
-- A version's children, in list order: a delete's check and re-parenting read those, not every version.
CREATE INDEX IF NOT EXISTS head_versions_by_parent ON head_versions (feature_version, parent_version_id, create_time, version_id);
-- The loaded head's version, at start-up (first_head_version_of_hash).
CREATE INDEX IF NOT EXISTS head_versions_by_hash ON head_versions (feature_version, head_hash, create_time, version_id);
-- The version an edit stored (_STORED_BY): at start-up those of failed edits, and whether
-- an operation being deleted stored one, without reading every version.
CREATE INDEX IF NOT EXISTS head_versions_by_edit ON head_versions (json_extract(details, '$.edit_job_id'));
CREATE TABLE IF NOT EXISTS head_version_owners (
    feature_version TEXT NOT NULL, version_id TEXT NOT NULL, owner TEXT NOT NULL, PRIMARY KEY (feature_version, version_id),
    FOREIGN KEY (feature_version, version_id) REFERENCES head_versions(feature_version, version_id) ON DELETE CASCADE
);
-- One caller's versions, counted against [server].max_head_versions_per_caller without reading the others'.
CREATE INDEX IF NOT EXISTS head_version_owners_by_owner ON head_version_owners (owner, feature_version);
CREATE TABLE IF NOT EXISTS deleted_head_versions (
    feature_version TEXT NOT NULL, version_id TEXT NOT NULL, PRIMARY KEY (feature_version, version_id)
);
CREATE TABLE IF NOT EXISTS active_heads (
    feature_version TEXT PRIMARY KEY, version_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS file_heads (
    feature_version TEXT PRIMARY KEY, version_id TEXT NOT NULL
);
"""


def _statements(script: str) -> Iterator[str]:
    """``script``'s statements one by one, to run in a transaction: executescript commits
    an open one before it starts."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""
    if any(line.strip() and not line.lstrip().startswith("--") for line in statement.splitlines()):
        # executescript would have run it; dropping it would leave a table out unseen
        raise ValueError(f"the script ends in a statement without its ';': {statement.strip()!r}")


# The layout _SCHEMA describes, kept in the database header (PRAGMA user_version): a
# release opens a store of its version or older (migrating it at start-up, in one
# transaction) and refuses a newer one before changing its records or files. 0: no version recorded
# (every store before versioning, and a new file). The version goes up only for a change an
# older release would misread or damage: a table it never reads, whose rows go with their
# job or set when it deletes one (ON DELETE CASCADE), keeps the version, so a rollback still
# opens the data dir (job_requests and sample_set_requests, 2026-12-03;
# sample_set_request_senders, 2026-12-07; deleted_job_requests, whose rows retention
# deletes by their own time, 2026-12-07; job_request_runs, 2026-12-08: a job a rollback
# made has none, which reads as another run's, but one it was asked for again by another run
# lacks that run, and a repeat of its maker's run reads as its own); so does an index, which SQLite keeps up to date
# for any release that writes the table.
SCHEMA_VERSION = 1
log = logging.getLogger(__name__)
T = TypeVar("T")

_SWEEP_CHUNK = 500  # candidates checked per hold of the store's lock
# Cached feature rows (by rowid) a sweep checks per hold of the lock for images no set
# holds: 25 ms where all stay, up to about 0.3 s where all go (256-byte rows); a million
# rows took 0.7-2.3 s in one statement, every request waiting.
_FEATURE_SCAN_ROWS = 50_000
# The write-ahead log is cut back to this after a checkpoint: it otherwise keeps the size
# of the largest transaction until the server stops (a sweep deleting 50,000 samples'
# features left 40 MiB). About four auto-checkpoints' worth (1000 pages of 4 KiB), so
# ordinary writes reuse the file as they did.
WAL_SIZE_LIMIT_BYTES = 16 * 2**20
# Space kept aside in the data dir, released when its file system is full: SQLite in WAL
# mode cannot even read without room for its -shm and -wal files, and a delete is a write,
# so without it a full data dir could neither restart nor be freed by deleting.
RESERVE_FILE = "explaind.reserve"
# The job that stored a head version, as head_versions_by_edit indexes it. Compared with a
# column, that goes as +column: a TEXT column's affinity would apply to this expression and
# keep SQLite from the index.
_STORED_BY = f"json_extract(details, '$.{EDIT_JOB_ID}')"
# N of a head version's id vN, as head_versions_by_number indexes it (the same text, or
# SQLite does not use the index); only ids whose N is all digits are numbered.
_VERSION_NUMBER = "CAST(substr(version_id, 2) AS INTEGER)"
_NUMBERED = "substr(version_id, 2) GLOB '[0-9]*' AND substr(version_id, 2) NOT GLOB '*[^0-9]*'"
# Qualified where a listing by owner joins a table with a create_time of its own.
_SET_COLUMNS = ("id, display_name, sample_sets.create_time, update_time, id IN (SELECT id FROM uploading_sets), "
                "(SELECT owner FROM sample_set_owners WHERE set_id = sample_sets.id)")
# The distinct feature versions by hops along the primary key, one lookup per version:
# SELECT DISTINCT scans every cached feature, at each sweep step of 500 images.
_FEATURE_VERSIONS = """WITH RECURSIVE hop(version) AS (
                           SELECT MIN(version) FROM features
                           UNION ALL SELECT (SELECT MIN(version) FROM features WHERE version > hop.version) FROM hop WHERE version IS NOT NULL)
                       SELECT version FROM hop WHERE version IS NOT NULL"""
# Each set's sample count per class, kept by a trigger as samples are inserted: counting
# a set's samples at every GetSampleSet, list page and append read all of them under the
# store's lock (10 ms a 50,000-sample set, a list page as many times as it has sets).
# Samples are never updated, and deleted only with their set, whose counts go with it.
# The trigger is the database's, so a release before it keeps the counts right too (the
# schema version stays); the table, its counts and the trigger are made in one
# transaction (_migrate), so a store has all of them or none.
_CLASS_COUNTS_TRIGGER = "samples_counted"
_CLASS_COUNTS = (
    """CREATE TABLE IF NOT EXISTS sample_class_counts (
           set_id TEXT NOT NULL REFERENCES sample_sets(id) ON DELETE CASCADE, label INTEGER NOT NULL, count INTEGER NOT NULL,
           PRIMARY KEY (set_id, label))""",
    "DELETE FROM sample_class_counts",
    "INSERT INTO sample_class_counts SELECT set_id, label, COUNT(*) FROM samples GROUP BY set_id, label",
    f"""CREATE TRIGGER {_CLASS_COUNTS_TRIGGER} AFTER INSERT ON samples BEGIN
            INSERT INTO sample_class_counts VALUES (new.set_id, new.label, 1)
            ON CONFLICT (set_id, label) DO UPDATE SET count = count + 1;
        END""",
)


def _resume_after(after: tuple[float, str] | None, id_column: str, *, time_column: str = "create_time",
                  newest_first: bool = False) -> tuple[str, tuple]:
    """The condition (and its parameters) a list page resuming after the row ``after`` =
    (create_time, id) adds, in ``time_column`` order (``newest_first``: descending), ties
    by ``id_column``; ("", ()) for the first page. Bounded on the time alone first, so
    SQLite seeks to the page in its index: as one OR it read up to every row (the second
    page of 20,000 operations read all of them)."""
    if after is None:
        return "", ()
    past = "<" if newest_first else ">"
    return f"{time_column} {past}= ? AND ({time_column} {past} ? OR {id_column} > ?)", (after[0], after[0], after[1])


class _Listing(NamedTuple):
    """Where a list page of a table reads its rows: the FROM ``source``, the WHERE
    ``condition`` ("" or one parameter: the owner) and the (create_time, id) columns it
    orders and resumes by."""

    source: str
    condition: str
    time_column: str
    id_column: str


def _owned(table: str, owners: str, key: str, owner: str) -> _Listing:
    """A listing of ``table`` kept to the rows ``owner`` made, as ``owners`` (its owner
    table, ``key`` naming the row's id) records them; everyone's for "". The owner's rows
    are read in list order from their owner table's index (CROSS JOIN fixes that order,
    and the page orders by that table's columns), then each row of the page by its id:
    neither another caller's rows nor the owner's before the page are read, nor sorted."""
    if not owner:
        return _Listing(table, "", "create_time", "id")
    return _Listing(f"{owners} CROSS JOIN {table} ON {table}.id = {owners}.{key}", f"{owners}.owner = ?",
                    f"{owners}.create_time", f"{owners}.{key}")


# Each job's artifacts' blobs, as job_artifacts rows, kept by triggers as jobs are inserted
# and their artifacts change: indexing at open the jobs a release without the table stored
# read every job's artifact list, and so all its response before it (373 MiB, 20,000
# operations of 20 KB), at every start. The triggers are the database's, so such a release,
# rolled back to, keeps the rows too (the schema version stays); they and the rows of the
# jobs stored until then are made in one transaction (_migrate), so a store has all or none.
_JOB_ARTIFACTS_TRIGGERS = ("job_artifacts_on_insert", "job_artifacts_on_update")
_JOB_ARTIFACT_ROWS = "INSERT OR IGNORE INTO job_artifacts SELECT new.id, json_extract(value, '$.digest') FROM json_each(new.artifacts)"
_JOB_ARTIFACTS = (
    f"CREATE TRIGGER IF NOT EXISTS {_JOB_ARTIFACTS_TRIGGERS[0]} AFTER INSERT ON jobs BEGIN {_JOB_ARTIFACT_ROWS}; END",
    # A replaced artifact's blob stays until the job goes (its rows are only added).
    f"CREATE TRIGGER IF NOT EXISTS {_JOB_ARTIFACTS_TRIGGERS[1]} AFTER UPDATE OF artifacts ON jobs BEGIN {_JOB_ARTIFACT_ROWS}; END",
    """INSERT OR IGNORE INTO job_artifacts
       SELECT jobs.id, json_extract(artifact.value, '$.digest') FROM jobs, json_each(jobs.artifacts) AS artifact""",
)
# One caller's jobs of one kind (owner= and kind=) in list order: a job_owners column
# kind, added at open and filled by a trigger (a job's kind never changes), so that page
# seeks by an index as an owner's page does, rather than reading the caller's jobs of
# every other kind in between (20,000 evaluations before its first edit). The trigger
# is the database's: the release before it, which inserts (job_id, owner, create_time),
# rolled back to, still fills the column.
_JOB_OWNER_KINDS_TRIGGER = "job_owners_kind_on_insert"
_JOB_OWNER_KINDS = (
    "ALTER TABLE job_owners ADD COLUMN kind TEXT",
    f"""CREATE TRIGGER {_JOB_OWNER_KINDS_TRIGGER} AFTER INSERT ON job_owners BEGIN
        UPDATE job_owners SET kind = (SELECT kind FROM jobs WHERE id = new.job_id) WHERE job_id = new.job_id; END""",
    "UPDATE job_owners SET kind = (SELECT kind FROM jobs WHERE jobs.id = job_owners.job_id)",
    "CREATE INDEX job_owners_by_owner_and_kind ON job_owners (owner, kind, create_time DESC, job_id)",
)
# One caller's jobs in one state (owner= and state=, with kind= or not) in list order: a
# job_owners column state, added at open as kind is, seeks by an index rather than reading
# the caller's jobs in every other state in between (20,000 finished before the running
# one). A job's state changes, so a trigger on jobs copies each change; both triggers are
# the database's, so the release before, rolled back to, keeps the column right too (the
# schema version stays: it never reads the column, and inserts job_owners by column name).
_JOB_OWNER_STATES_TRIGGERS = ("job_owners_state_on_insert", "job_owners_state_on_update")
_JOB_OWNER_STATES = (
    "ALTER TABLE job_owners ADD COLUMN state TEXT",
    f"""CREATE TRIGGER {_JOB_OWNER_STATES_TRIGGERS[0]} AFTER INSERT ON job_owners BEGIN
        UPDATE job_owners SET state = (SELECT state FROM jobs WHERE id = new.job_id) WHERE job_id = new.job_id; END""",
    # Not at each progress update (update_job writes every column): only when the state changes.
    f"""CREATE TRIGGER {_JOB_OWNER_STATES_TRIGGERS[1]} AFTER UPDATE OF state ON jobs WHEN new.state IS NOT old.state BEGIN
        UPDATE job_owners SET state = new.state WHERE job_id = new.id; END""",
    "UPDATE job_owners SET state = (SELECT state FROM jobs WHERE jobs.id = job_owners.job_id)",
    "CREATE INDEX job_owners_by_owner_and_state ON job_owners (owner, state, create_time DESC, job_id)",
    "CREATE INDEX job_owners_by_owner_kind_and_state ON job_owners (owner, kind, state, create_time DESC, job_id)",
)
_JOB_COLUMNS = ("id", "kind", "state", "create_time", "start_time", "end_time", "step", "total", "message", "cancel_requested", "error_code", "error_message", "result", "artifacts")
# _JOB_COLUMNS as selected, qualified: a listing by owner joins a table with a create_time of its own.
_JOB_SELECTED = ", ".join(f"jobs.{column}" for column in _JOB_COLUMNS)
# A succeeded job's result is its response, up to half of [server].max_message_bytes: a
# listing of a thousand of them read gigabytes to send none (OPERATION_VIEW_BASIC) or
# the few that fit in one message. A failed one's is its error's details, which stay.
_JOB_SELECTED_WITHOUT_RESPONSE = ", ".join(f"CASE WHEN jobs.state = '{SUCCEEDED}' THEN X'' ELSE jobs.result END" if column == "result"
                                           else f"jobs.{column}" for column in _JOB_COLUMNS)
# Read after a job's columns: its owner (job_owners) and error details (job_error_details).
_JOB_OWNER_AND_ERROR_DETAILS = "(SELECT owner FROM job_owners WHERE job_id = jobs.id), (SELECT details FROM job_error_details WHERE job_id = jobs.id)"


def _sync_directory(path: Path) -> None:
    """Put a directory's entries (a rename into it, a new subdirectory) on disk."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _uses_reserve(why: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Marks a store method that must go on with the file system full: when it is, the
    method releases the reserve (logged as released ``why``) and runs again."""

    def decorate(write: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(write)
        def run(self: SQLiteStore, *args: object, **kwargs: object) -> T:
            return self._with_reserve(why, functools.partial(write, self, *args, **kwargs))

        return run

    return decorate


# A delete, so freeing space stays possible.
_frees_space = _uses_reserve("for a delete")


def _interrupted(interrupt: threading.Event | None) -> bool:
    """Whether a sweep given ``interrupt`` is to return now (the server stopping)."""
    return interrupt is not None and interrupt.is_set()


class SQLiteStore:
    """Thread-safe (one connection behind a lock); durable across restarts and kill -9."""

    def __init__(self, data_dir: str | Path, *, reserve_bytes: int = 0, max_samples_per_owner: int = 0,
                 max_head_versions_per_owner: int = 0) -> None:
        """``reserve_bytes``: how much to keep aside for a full file system (see RESERVE_FILE);
        ``max_samples_per_owner``: samples one named caller's sets may hold in all;
        ``max_head_versions_per_owner``: head versions of one feature version one named
        caller may hold. 0: none."""
        self.data_dir = Path(data_dir)
        self.max_samples_per_owner = max_samples_per_owner
        self.max_head_versions_per_owner = max_head_versions_per_owner
        self.blob_dir = self.data_dir / "artifacts" / "sha256"
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            for directory in (self.blob_dir.parent, self.data_dir):  # their entries on disk: a put syncs blob_dir and below only
                _sync_directory(directory)
        except OSError as error:
            raise StoreOpenError(f"cannot use the data dir {self.data_dir}: {error.strerror}; the server must be able to write there") from None
        self._lock = threading.RLock()  # re-entered: blob deletion runs a transaction under it
        self._writing: Counter[str] = Counter()  # digests written but maybe not yet referenced (writing_blobs)
        self._syncing: Counter[str] = Counter()  # digests whose file a put is writing, maybe renamed but not yet synced
        # Digests whose rename into place a failed directory sync left unconfirmed: the file
        # stays, but is not stored until a put's own sync confirms it.
        self._unconfirmed_renames: set[str] = set()
        # Blob directories whose entry in blob_dir this store has synced: one that merely
        # exists may be another put's, made but not yet synced.
        self._synced_directories: set[str] = set()
        # Names this store's scratch files, so start-up removes only those of earlier ones.
        # Not the pid: in a container every server is pid 1.
        self._scratch_tag = uuid.uuid4().hex[:12]
        self._clock_lock, self._latest_time = threading.Lock(), 0.0  # see now()
        # An uploading set's last request (time.monotonic(): a wall clock set forward must
        # not make a live upload look idle), for delete_unfinished_uploads, forgotten once it
        # is finished or deleted; a set with none here had none since the store opened.
        self._upload_requests: dict[str, float] = {}
        self._opened = time.monotonic()
        self._dir_lock = self._lock_data_dir()
        self._reserve, self._reserve_bytes = self.data_dir / RESERVE_FILE, reserve_bytes
        for stale in self.data_dir.glob(f"{RESERVE_FILE}.*.tmp"):  # being set aside when an earlier server died (the lock is ours)
            stale.unlink(missing_ok=True)
        # Released for a full file system: what it freed is for deletes and for bookkeeping
        # (job states, small records), so new files, operations and samples are refused
        # until it is set aside again.
        self._reserve_released = False
        # Runs a repeat could not record (Store.add_request_run: a full data dir, a read-only file), by job id.
        self._unrecorded_runs: dict[str, set[str]] = {}
        if not reserve_bytes:
            self._reserve.unlink(missing_ok=True)  # set aside under an earlier configuration
        elif self._free_bytes() < min(reserve_bytes, self._held_reserve_bytes()):
            # Full by the reserve held, not by one configured larger since: released, that
            # one would refuse new files until the volume held twice the new size.
            self._release_reserve("at start-up")
        path = self.data_dir / "explaind.sqlite3"
        if not (path.is_file() and path.stat().st_size) and (stored := next((p for p in self.blob_dir.rglob("*") if p.is_file()), None)):
            # A lost database (a bad restore, a wrong mount): a new one would reference
            # nothing, and the start-up sweep would delete every stored file as unused.
            self._dir_lock.close()
            raise StoreOpenError(f"the data dir {self.data_dir} holds stored files ({stored.name}, ...) but its database {path} is missing "
                                 f"or empty: restore the database, or move {self.blob_dir.parent} away to start afresh without them")
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            if (version := self._db.execute("PRAGMA user_version").fetchone()[0]) > SCHEMA_VERSION:
                self._db.close()
                self._dir_lock.close()
                raise StoreOpenError(f"the data dir {self.data_dir} was written by a newer explaind (store schema {version}; this release "
                                     f"reads {SCHEMA_VERSION} and older): run that release, or this one on a copy restored from before")
            existing = self._db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None  # not a new file
            self._migrate(version, existing=existing)
            if next((p for p in self.blob_dir.rglob("*") if p.is_file()), None) is None and (referenced := self._db.execute(
                    """SELECT digest FROM samples UNION ALL SELECT weights_digest FROM head_versions WHERE weights_digest != ''
                       UNION ALL SELECT digest FROM job_artifacts LIMIT 1""").fetchone()):
                # The converse of a lost database (a database restored alone, a wrong mount):
                # served, every set's images and every edited head would be missing.
                self._db.close()
                self._dir_lock.close()
                raise StoreOpenError(f"the database {path} references stored files ({referenced[0]}, ...) but {self.blob_dir.parent} holds "
                                     f"none: restore it from the same backup as the database, or move the database away to start afresh")
        except (sqlite3.Error, ResourceExhausted) as error:  # the latter: a migration's write found the file system full
            self._dir_lock.close()
            free = self._free_bytes()
            # Full: less than the reserve, or than a WAL's worth where the reserve is larger (one
            # configured at terabytes does not make every failure to open a full disk's).
            full_below = min(max(reserve_bytes, 1 << 20), WAL_SIZE_LIMIT_BYTES)
            full = f"; its file system is full ({free} bytes free): free space there" if free < full_below else ""
            # As the first writes' errors say (explaind.service.server): "file is not a database" said nothing of what to do.
            raise StoreOpenError(f"cannot open the store {path}: {error}{full}{store_remedy(error)}") from None
        self.keep_reserve()
        held = self._held_reserve_bytes()
        if reserve_bytes and not self._reserve_released and held != reserve_bytes and (free := self._free_bytes()) < 2 * reserve_bytes:
            # Said once here, not at every sweep (a failed allocation with room has said why).
            kept = f"the {held} bytes set aside under an earlier setting stay" if held else "no reserve is set aside"
            log.warning("the data dir %s has %d bytes free, less than twice its reserve of %d bytes: %s until "
                        "there is room ([server].data_dir_reserve_bytes), so a full file system may stop deletes",
                        self.data_dir, free, reserve_bytes, kept)

    def _migrate(self, version: int, *, existing: bool) -> None:
        """Bring a store of schema ``version`` to SCHEMA_VERSION, the tables _SCHEMA adds
        and its version with the rest, in one transaction: one cut short (a full disk, a
        kill, a failing step) leaves the store as it was, and the next start migrates it
        (a new file stays new, not one of an older release). An ``existing`` store's
        migration is logged, as an operator upgrading wants to know it happened (a new
        file's is not)."""
        with self._transaction() as db:
            for statement in _statements(_SCHEMA):
                db.execute(statement)
            if version < 1 and "uploading" in {row[1] for row in db.execute("PRAGMA table_info(sample_sets)")}:
                # For a day (2026-12-01) an unfinished upload was a column of sample_sets, which
                # the releases since read as finished: such a set may have been appended to and
                # used since, so it is named, not marked unfinished (a start deletes those).
                if left := [row[0] for row in db.execute("SELECT id FROM sample_sets WHERE uploading ORDER BY id")]:
                    log.warning("store %s: sample set(s) %s were left uploading by a release of 2026-12-01 and are served as "
                                "complete; check their sample counts, or delete them", self.data_dir, ", ".join(left))
            triggers = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
            if _CLASS_COUNTS_TRIGGER not in triggers:
                for statement in _CLASS_COUNTS:
                    db.execute(statement)
            if not triggers.issuperset(_JOB_ARTIFACTS_TRIGGERS):
                for statement in _JOB_ARTIFACTS:
                    db.execute(statement)
            if _JOB_OWNER_KINDS_TRIGGER not in triggers:
                for statement in _JOB_OWNER_KINDS:
                    db.execute(statement)
            if not triggers.issuperset(_JOB_OWNER_STATES_TRIGGERS):  # after kind: an index holds both
                for statement in _JOB_OWNER_STATES:
                    db.execute(statement)
            # A job the release before (rolled back to: it never reads deleted_job_requests)
            # started under a deleted job's request_id is the id's now: the row would refuse
            # its repeat once a shutdown ABORTED it, and the id once it is deleted ABORTED.
            db.execute("DELETE FROM deleted_job_requests WHERE request_id IN (SELECT request_id FROM job_requests)")
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if existing and version < SCHEMA_VERSION:  # once committed: a full file system fails the COMMIT
            log.info("store %s: migrated from schema %d%s to %d", self.data_dir, version,
                     " (none recorded: a release before 2026-12-03)" if version == 0 else "", SCHEMA_VERSION)

    def _lock_data_dir(self) -> IO[str]:
        """Hold an exclusive lock on the data dir while open. Two servers on one store would
        each fail the other's running jobs at start-up and serve different heads."""
        try:
            lock = open(self.data_dir / "explaind.lock", "a+")  # noqa: SIM115 - held until close()
        except OSError as error:
            raise StoreOpenError(f"cannot use the data dir {self.data_dir}: {error.strerror}; the server must be able to write there") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise StoreOpenError(f"the data dir {self.data_dir} is in use by {holder}; give each server a data dir of its own") from None
        except OSError as error:  # e.g. ENOLCK: a file system without locks, where SQLite's WAL is not safe either
            lock.close()
            raise StoreOpenError(f"cannot lock the data dir {self.data_dir}: {error.strerror}; use a local file system") from None
        lock.truncate(0)
        lock.write(f"explaind server pid {os.getpid()}")
        lock.flush()
        return lock

    # Reserve --------------------------------------------------------------------------

    def _free_bytes(self) -> int:
        return shutil.disk_usage(self.data_dir).free

    def _held_reserve_bytes(self) -> int:
        """The size of the reserve set aside, 0 without one: another than the configured
        one where the setting changed since it was set aside."""
        try:
            return self._reserve.stat().st_size
        except FileNotFoundError:
            return 0

    def keep_reserve(self) -> None:
        """Set the reserve aside (again) once the file system has room for it and as much
        again: at start-up, at each sweep after a release, when deletes freed space, and
        before a new file is refused for want of it (space freed outside the server)."""
        if not self._reserve_bytes or self._held_reserve_bytes() == self._reserve_bytes or self._free_bytes() < 2 * self._reserve_bytes:
            return  # one of another size (the setting changed) is replaced once there is room
        temporary = self._reserve.with_name(f"{RESERVE_FILE}.{self._scratch_tag}.tmp")
        try:
            with open(temporary, "wb") as file:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(file.fileno(), 0, self._reserve_bytes)  # blocks taken, none written
                else:  # macOS: zeros written (a sparse file would hold no space)
                    for start in range(0, self._reserve_bytes, 1 << 20):
                        file.write(bytes(min(1 << 20, self._reserve_bytes - start)))
            os.replace(temporary, self._reserve)
            self._reserve_released = False
        except OSError as error:  # others took the room meanwhile: the next sweep tries again
            temporary.unlink(missing_ok=True)
            log.warning("cannot set %d bytes aside in the data dir %s: %s", self._reserve_bytes, self.data_dir, error.strerror)

    def _with_reserve(self, why: str, write: Callable[[], T]) -> T:
        """Run ``write``; when the file system is full, release the reserve (logged as
        released ``why``) and run it again."""
        try:
            return write()
        except ResourceExhausted:
            if not self._release_reserve(why):
                raise
            return write()

    def _release_reserve(self, when: str) -> bool:
        """Free the reserve for the writes that must go on with the file system full
        (start-up, deletes); False when it is already gone."""
        try:
            self._reserve.unlink()
        except FileNotFoundError:
            return False
        self._reserve_released = True
        log.warning("the data dir %s is full: released its reserve of %d bytes %s; new files, operations and samples are refused "
                    "until it is set aside again, once there is room: delete sample sets, operations or head versions, or grow the volume",
                    self.data_dir, self._reserve_bytes, when)
        return True

    def _refuse_while_reserve_released(self) -> None:
        """ResourceExhausted while the reserve is released and there is still no room to set
        it aside again (space freed since, not only by a delete here, sets it aside at once,
        with no wait for the next sweep). What it freed is for deletes and bookkeeping: new
        files, operations and samples ate into it (three operations started on a full data
        dir took a 1 MiB reserve in the database's log), and a data dir full with nothing
        left to release could neither delete nor start."""
        with self._lock:
            if self._reserve_released:
                self.keep_reserve()
            if self._reserve_released:
                raise self._full("what is left is kept for deletes")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as error:
                if self._db.in_transaction:  # a failed COMMIT may leave it open; the next BEGIN would fail
                    self._db.execute("ROLLBACK")
                if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:  # raised by SQLite, not constructed
                    raise self._full(str(error)) from None
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._dir_lock.close()  # releases the flock

    # Artifacts -----------------------------------------------------------------------

    def _blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest[:2] / digest

    @contextmanager
    def writing_blobs(self) -> Iterator[Callable[[bytes], str]]:
        """``put(data) -> digest`` for content-addressed blobs. A blob is written before the
        record that references it; deletes leave the blobs put in this block alone until it
        ends, so write those records inside it. If the block fails, its blobs become
        candidates for :meth:`delete_unused_blobs`."""
        written: list[str] = []

        def put(data: bytes) -> str:
            digest = hashlib.sha256(data).hexdigest()
            with self._lock:  # a delete either removed the file already or sees it kept
                # Renamed into place by another put but not yet synced, or whose sync failed, is not stored: this
                # put's record could commit before that rename reached the disk.
                missing = self._syncing[digest] > 0 or digest in self._unconfirmed_renames or not self._blob_path(digest).exists()
                if missing:
                    self._refuse_while_reserve_released()
                    self._syncing[digest] += 1
                self._writing[digest] += 1
                written.append(digest)
            if missing:
                try:
                    self._write_blob(digest, data)
                finally:
                    with self._lock:
                        self._syncing[digest] -= 1
                        self._syncing += Counter()  # drops the zeros
            return digest

        try:
            yield put
        except BaseException:
            # The records that were to reference them were not written (a set id taken,
            # a bad label): the next sweep removes those nothing else uses.
            def mark_for_deletion() -> None:
                with self._transaction() as db:
                    db.executemany("INSERT OR IGNORE INTO blob_candidates VALUES (?, ?)", [(digest, self.now()) for digest in set(written)])

            try:  # bookkeeping, which the reserve is kept for: the files it frees are what a full data dir needs
                self._with_reserve("to mark the files of a failed write for deletion", mark_for_deletion)
            except (sqlite3.Error, ResourceExhausted) as error:  # the caller's error matters more; a restart's sweep finds the files
                log.warning("cannot mark %d blob(s) of a failed write for deletion: %s", len(written), error)
            raise
        finally:
            with self._lock:
                self._writing.subtract(written)
                self._writing += Counter()  # drops the zeros

    def _write_blob(self, digest: str, data: bytes) -> None:
        path = self._blob_path(digest)
        temporary = path.with_name(f"{digest}.{self._scratch_tag}.{threading.get_ident()}.tmp")
        # Durable before the database can point at it: its directory's entry (once a store), the data,
        # then the rename, on disk.
        try:
            if path.parent.name not in self._synced_directories:
                path.parent.mkdir(exist_ok=True)
                _sync_directory(self.blob_dir)
                self._synced_directories.add(path.parent.name)
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
            try:
                _sync_directory(path.parent)
            except BaseException:
                with self._lock:
                    self._unconfirmed_renames.add(digest)
                raise
            with self._lock:  # the name on disk now: another put's later rename swaps in the same synced bytes or is lost
                self._unconfirmed_renames.discard(digest)
        except BaseException as error:  # a full disk, say: leave no half file behind
            temporary.unlink(missing_ok=True)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._full(error.strerror) from None
            raise

    def _full(self, detail: str) -> ResourceExhausted:
        """A write refused for want of space: the caller's answer, the operator's cue."""
        return ResourceExhausted(f"the server's data dir {self.data_dir} is full ({detail}); the operator must free space there")

    def now(self) -> float:
        """The wall clock (epoch s), always after any time this store gave already: set back
        (NTP, a VM resumed), it moves on from there by the least a float can until the
        clock catches up. A blob's loss of its last reference, a job's submission, start
        and end, a set's creation and last request and a head version's creation are
        stamped with it, so one that came after another is stamped after it: lists keep
        their order, an operation never ends before it started, and the sweep
        (delete_unused_blobs' ``before``) keeps the images a running job may read."""
        with self._clock_lock:
            self._latest_time = max(math.nextafter(self._latest_time, math.inf), time.time())
            return self._latest_time

    @_frees_space
    def delete_unused_blobs(self, *, before: float | None = None, everything: bool = False, interrupt: threading.Event | None = None) -> int:
        """Remove the blob files, and their cached features, that lost their last
        reference (a deleted set's images, a deleted head version's weights) before
        ``before`` (epoch seconds; None: any time) and that no writer is about to
        reference. ``everything`` (at start-up): every other blob file on disk nothing
        references goes too (see _delete_stray_files), as do killed writers' scratch files and stray cached features. Returns the
        blob files removed.

        Works in chunks, holding the store's lock for one chunk at a time, so requests are
        never held up for long. Once ``interrupt`` is set (the server stopping), returns
        after the chunk under way: each chunk's records are committed before its files go,
        so what is left is what a later sweep finds again (candidates still recorded, or
        files nothing references, which the next ``everything`` sweep takes)."""
        removed = self._delete_stray_files(interrupt) if everything else 0
        after = ""
        while not _interrupted(interrupt):
            with self._lock:
                chunk = [row[0] for row in self._db.execute(
                    "SELECT digest FROM blob_candidates WHERE digest > ? AND since < ? ORDER BY digest LIMIT ?",
                    (after, math.inf if before is None else before, _SWEEP_CHUNK))]
                if not chunk:
                    return removed
                removed += self._delete_unreferenced(chunk)
            after = chunk[-1]
        return removed

    def _delete_stray_files(self, interrupt: threading.Event | None) -> int:
        """Delete the blob files nothing references and no writer holds, but those that are
        candidates already (they wait for their ``before``); scratch files no live writer
        owns; and cached features of images no set holds (a job may cache them after a
        sweep). Returns the blob files removed. Each file is checked, not recorded as a
        candidate first: that wrote a row per stored file at every start, in the database's
        log, which on a full data dir took what its reserve freed for deletes. Works in
        chunks, as :meth:`delete_unused_blobs` does; once ``interrupt`` is set, returns
        between them."""
        with self._lock:
            last_row = self._db.execute("SELECT max(rowid) FROM features").fetchone()[0] or 0
        for first_row in range(1, last_row + 1, _FEATURE_SCAN_ROWS):
            if _interrupted(interrupt):
                return 0
            with self._transaction() as db:
                db.execute("DELETE FROM features WHERE rowid >= ? AND rowid < ? AND NOT EXISTS "
                           "(SELECT 1 FROM samples WHERE samples.digest = features.digest)", (first_row, first_row + _FEATURE_SCAN_ROWS))
            time.sleep(0)  # a request waiting for the lock takes it now (the lock is not fair), not after the scan
        removed = 0
        for directory in (path for path in self.blob_dir.iterdir() if path.is_dir()):
            names = [path.name for path in directory.iterdir()]
            for name in names:
                if name.endswith(".tmp") and name.split(".")[1] != self._scratch_tag:
                    (directory / name).unlink(missing_ok=True)
            digests = [name for name in names if len(name) == 64]
            for start in range(0, len(digests), _SWEEP_CHUNK):
                if _interrupted(interrupt):
                    return removed
                chunk = digests[start:start + _SWEEP_CHUNK]
                with self._lock:
                    waiting = {row[0] for row in self._db.execute(
                        f"SELECT digest FROM blob_candidates WHERE digest IN ({', '.join('?' * len(chunk))})", chunk)}
                    removed += self._delete_unreferenced([digest for digest in chunk if digest not in waiting])
        return removed

    def _delete_unreferenced(self, chunk: list[str]) -> int:
        """One sweep step (holding the lock): drop the candidates of ``chunk`` that are
        referenced, remove the files and features of the rest, keep those a writer holds.
        Returns the files removed: one that could not be is not counted."""
        held = {digest for digest in chunk if self._writing[digest]}
        used = self._referenced(chunk)
        unused = [digest for digest in chunk if digest not in used and digest not in held]
        # FULL for this commit: it makes the earlier ones durable too (WAL is in order), so
        # no power loss can bring back a record of a file deleted below.
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            with self._transaction() as db:
                versions = [row[0] for row in db.execute(_FEATURE_VERSIONS)]
                db.executemany("DELETE FROM features WHERE version = ? AND digest = ?", [(v, d) for v in versions for d in unused])
                db.executemany("DELETE FROM blob_candidates WHERE digest = ?", [(digest,) for digest in chunk if digest not in held])
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")
        removed = len(unused)
        for digest in unused:
            try:
                self._blob_path(digest).unlink(missing_ok=True)
            except OSError as error:  # the records are gone; a file left over costs only space
                log.warning("cannot delete the unused blob %s: %s", digest, error.strerror)
                removed -= 1
        return removed

    def _referenced(self, digests: Sequence[str]) -> set[str]:
        """Those of ``digests`` a sample, head version or operation's artifact references
        (the caller holds the lock)."""
        marks = ", ".join("?" * len(digests))
        return {row[0] for row in self._db.execute(
            f"""SELECT digest FROM samples WHERE digest IN ({marks})
                UNION SELECT weights_digest FROM head_versions WHERE weights_digest IN ({marks})
                UNION SELECT digest FROM job_artifacts WHERE digest IN ({marks})""", [*digests] * 3)}

    def get_blob(self, digest: str, *, offset: int = 0, length: int | None = None, size: int | None = None) -> bytes:
        """Bytes of the blob ``digest``: the whole is checked against its digest, a range
        (``offset``, ``length``) against the file's ``size`` where given. NotFound where
        nothing references it any more (a sweep removed the file of a set or operation
        deleted meanwhile); DataLoss where something still does, for its file is written
        before the record that points at it: the file was lost or damaged, which is the
        operator's to hear of, not the caller's (a damaged image is no bad request, and a
        damaged head must not be served)."""
        path = self._blob_path(digest)
        try:
            with open(path, "rb") as file:
                if offset == 0 and length is None:
                    data = file.read()
                    if hashlib.sha256(data).hexdigest() != digest:
                        raise self._damaged(path, digest, "its content does not match its digest")
                    return data
                if size is not None and (held := os.fstat(file.fileno()).st_size) != size:
                    raise self._damaged(path, digest, f"it holds {held} bytes of {size}")
                file.seek(offset)
                return file.read() if length is None else file.read(length)
        except (FileNotFoundError, IsADirectoryError):
            with self._lock:
                lost = bool(self._referenced([digest]))
            if lost:
                holders = self._holders(digest)
                log.error("the stored file %s is missing from the data dir though the store references it; held by %s", path, holders)
                raise DataLoss(f"the stored file of {digest!r} is missing from the server's data dir; "
                               f"the operator must restore it or delete what holds it ({holders})") from None
            raise NotFound(f"no artifact with digest {digest!r}") from None

    def _damaged(self, path: Path, digest: str, detail: str) -> DataLoss:
        holders = self._holders(digest)
        log.error("the stored file %s is damaged: %s; held by %s", path, detail, holders)
        return DataLoss(f"the stored file of {digest!r} is damaged ({detail}); the operator must restore it or delete what holds it ({holders})")

    # Holders named per kind in a lost file's log line and message: a shared image can be
    # in any number of sets, and the line must stay one line.
    _HOLDERS_NAMED = 5

    def _holders(self, digest: str) -> str:
        """What references the blob ``digest``, as the operator deletes it: "sample set
        's1', operation operations/ab12 (explaind operations delete NAME)"; the log line of
        a lost file said only its path, which names none of them."""
        limit = self._HOLDERS_NAMED + 1
        with self._lock:
            kinds = (
                ("sample set", "explaind sample-set delete ID",
                 [repr(row[0]) for row in self._db.execute("SELECT DISTINCT set_id FROM samples WHERE digest = ? ORDER BY set_id LIMIT ?", (digest, limit))],
                 "SELECT COUNT(DISTINCT set_id) FROM samples WHERE digest = ?"),
                ("operation", "explaind operations delete NAME",
                 [f"operations/{row[0]}" for row in self._db.execute("SELECT job_id FROM job_artifacts WHERE digest = ? ORDER BY job_id LIMIT ?", (digest, limit))],
                 "SELECT COUNT(*) FROM job_artifacts WHERE digest = ?"),
                ("head version", "explaind head-versions delete ID",
                 [repr(row[0]) for row in self._db.execute("SELECT DISTINCT version_id FROM head_versions WHERE weights_digest = ? ORDER BY version_id LIMIT ?", (digest, limit))],
                 "SELECT COUNT(DISTINCT version_id) FROM head_versions WHERE weights_digest = ?"),
            )
            named = []
            for kind, command, ids, count_query in kinds:
                if not ids:
                    continue
                shown = ", ".join(ids[:self._HOLDERS_NAMED])
                if len(ids) > self._HOLDERS_NAMED:
                    shown += f" and {self._db.execute(count_query, (digest,)).fetchone()[0] - self._HOLDERS_NAMED} more"
                named.append(f"{kind}{'s' if len(ids) > 1 else ''} {shown} ({command})")
        return "; ".join(named) or "nothing any more"

    # Sample sets ---------------------------------------------------------------------

    def create_sample_set(self, sample_set_id: str, display_name: str, samples: Sequence[SampleRecord], *, uploading: bool = False,
                          request: RequestKey | None = None, on_repeat: OnRepeat | None = None, owner: str | None = None,
                          before_write: Callable[[], object] | None = None,
                          id_taken: Callable[[str | None], AlreadyExists] | None = None) -> SampleSetInfo:
        now = self.now()
        with self._transaction() as db:
            if before_write is not None:
                before_write()
            if (repeated := self._repeated_request(db, request, on_repeat)) is not None:
                return self._info(self._require_set(db, repeated))
            if (taken := db.execute("SELECT owner FROM sample_sets LEFT JOIN sample_set_owners ON set_id = id WHERE id = ?",
                                    (sample_set_id,)).fetchone()):
                raise sample_set_id_taken(sample_set_id) if id_taken is None else id_taken(taken[0])
            self._refuse_while_reserve_released()
            self._require_room_for_samples(db, owner, len(samples))
            db.execute("INSERT INTO sample_sets (id, display_name, create_time, update_time) VALUES (?, ?, ?, ?)", (sample_set_id, display_name, now, now))
            if owner is not None:
                db.execute("INSERT INTO sample_set_owners (set_id, owner, create_time) VALUES (?, ?, ?)", (sample_set_id, owner, now))
            if uploading:
                db.execute("INSERT INTO uploading_sets VALUES (?)", (sample_set_id,))
                self._upload_requests[sample_set_id] = time.monotonic()
            self._insert_samples(db, sample_set_id, 0, samples)
            self._record_request(db, request, sample_set_id)
        return self.get_sample_set(sample_set_id)

    def append_samples(self, sample_set_id: str, samples: Sequence[SampleRecord], *, finish_upload: bool = False,
                       uid: str | None = None, request: RequestKey | None = None, on_repeat: OnRepeat | None = None,
                       check_owner: OwnerCheck | None = None, before_write: Callable[[], object] | None = None) -> SampleSetInfo:
        """``check_owner`` may refuse the set, given its owner, in the append's transaction."""
        with self._transaction() as db:
            if before_write is not None:
                before_write()
            if (repeated := self._repeated_request(db, request, on_repeat)) is not None:
                return self._info(self._require_set(db, repeated, uid))
            row = self._require_set(db, sample_set_id, uid, check_owner)
            owner, uploading = row[5], row[4]
            if samples:  # a finish_upload alone is bookkeeping
                self._refuse_while_reserve_released()
            self._require_room_for_samples(db, owner, len(samples))  # charged to the set's owner, whoever appends
            self._record_request(db, request, sample_set_id)
            # The next position, one step down the primary key (COUNT(*) read the whole set).
            (count,) = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM samples WHERE set_id = ?", (sample_set_id,)).fetchone()
            self._insert_samples(db, sample_set_id, count, samples)
            finished = finish_upload and db.execute("DELETE FROM uploading_sets WHERE id = ?", (sample_set_id,)).rowcount > 0
            if samples or finished:  # a finish_upload of a finished set changes nothing; an upload's request shows it alive
                db.execute("UPDATE sample_sets SET update_time = ? WHERE id = ?", (self.now(), sample_set_id))
                if uploading:
                    self._upload_requests[sample_set_id] = time.monotonic()
        if finished:  # once committed: a finish rolled back leaves the upload timed
            with self._lock:
                self._upload_requests.pop(sample_set_id, None)
        return self.get_sample_set(sample_set_id)

    def require_room_for_samples(self, owner: str | None, adding: int) -> None:
        with self._lock:
            self._require_room_for_samples(self._db, owner, adding)

    def _require_room_for_samples(self, db: sqlite3.Connection, owner: str | None, adding: int) -> None:
        """ResourceExhausted when ``adding`` samples would take the sets of ``owner`` (a named
        caller; None: no one's) past max_samples_per_owner. Asked in the transaction that
        adds them, so uploads racing each other cannot pass it together."""
        if not self.max_samples_per_owner or owner is None or not adding:
            return
        (held,) = db.execute("""SELECT COALESCE(SUM(counts.count), 0) FROM sample_set_owners AS owners
                                JOIN sample_class_counts AS counts ON counts.set_id = owners.set_id WHERE owners.owner = ?""",
                             (owner,)).fetchone()
        if held + adding > self.max_samples_per_owner:
            raise ResourceExhausted(f"caller {owner!r} holds {held} samples in its sample sets, and {adding} more would pass its limit "
                                    f"of {self.max_samples_per_owner} ([server].max_samples_per_caller): delete sets it no longer needs",
                                    field="samples", quota=Quota("SAMPLES_PER_CALLER_EXCEEDED", "[server].max_samples_per_caller",
                                                                 self.max_samples_per_owner, caller_subject(owner), "samples in this caller's sets"))

    def delete_unfinished_uploads(self, *, idle_s: float | None = None) -> list[str]:
        with self._transaction() as db:
            uploading = [row[0] for row in db.execute("SELECT id FROM uploading_sets ORDER BY id")]
            now = time.monotonic()
            abandoned = [set_id for set_id in uploading if idle_s is None or now - self._upload_requests.get(set_id, self._opened) > idle_s]
            for set_id in abandoned:
                self._delete_set(db, set_id)
            # Only the sets still uploading: an entry a create rolled back left goes too.
            self._upload_requests = {set_id: self._upload_requests[set_id] for set_id in uploading
                                     if set_id in self._upload_requests and set_id not in abandoned}
        return abandoned

    def sample_set_of_request(self, request: RequestKey) -> SampleSetInfo | None:
        with self._lock:  # one hold: the set is the one the request was applied to, not one made under its id since
            set_id = self._repeated_request(self._db, request)
            return None if set_id is None else self._info(self._require_set(self._db, set_id))

    @staticmethod
    def _repeated_request(db: sqlite3.Connection, request: RequestKey | None, on_repeat: OnRepeat | None = None) -> str | None:
        """The set a request of ``request``'s id was applied to, if one was (None for None):
        checked in the transaction that applies a request, so repeats racing each other
        apply it once (``on_repeat`` is told of the repeat). InvalidArgument naming
        request_id for another request's id."""
        if request is None:
            return None
        row = db.execute("SELECT set_id, fingerprint FROM sample_set_requests WHERE request_id = ?", (request.request_id,)).fetchone()
        if row is None:
            return None
        if row[1] != request.fingerprint:
            raise request_id_reused(request.request_id, sample_set=SQLiteStore._sample_set_of_request(db, request, row[0]))
        if on_repeat is not None:
            on_repeat(row[0], request)
        return row[0]

    @staticmethod
    def _made_by(db: sqlite3.Connection, request: RequestKey, owners: str, key: str, made: str) -> bool:
        """Whether ``request``'s caller made the job or set ``made`` (``key`` in the owner
        table ``owners``), so that an error for its request_id may name it: always without
        a named caller (None), or for one no named caller made (no owner: open to every
        caller, explaind.ownership), never for another caller's (see request_id_reused)."""
        if request.caller is None:
            return True
        row = db.execute(f"SELECT owner FROM {owners} WHERE {key} = ?", (made,)).fetchone()
        return row is None or row[0] == request.caller

    @staticmethod
    def _operation_of_request(db: sqlite3.Connection, request: RequestKey, job_id: str) -> str | None:
        """``operations/<job_id>``, the job ``request``'s id went to, for an error to name;
        None if another caller made it (:meth:`_made_by`)."""
        return f"operations/{job_id}" if SQLiteStore._made_by(db, request, "job_owners", "job_id", job_id) else None

    @staticmethod
    def _sample_set_of_request(db: sqlite3.Connection, request: RequestKey, set_id: str) -> str | None:
        """``set_id``, the sample set ``request``'s id was applied to, for an error to name;
        None if another named caller sent that request (an admin's append to someone's set
        is the admin's to be told of), or, where no sender is kept, made the set (:meth:`_made_by`)."""
        sender = db.execute("SELECT sender FROM sample_set_request_senders WHERE request_id = ?", (request.request_id,)).fetchone()
        if sender is not None:
            return set_id if request.caller in (None, sender[0]) else None
        return set_id if SQLiteStore._made_by(db, request, "sample_set_owners", "set_id", set_id) else None

    @staticmethod
    def _record_request(db: sqlite3.Connection, request: RequestKey | None, set_id: str) -> None:
        if request is not None:
            if row := db.execute("SELECT job_id FROM job_requests WHERE request_id = ?", (request.request_id,)).fetchone():
                # One id, one request, whatever its RPC.
                raise request_id_reused(request.request_id, operation=SQLiteStore._operation_of_request(db, request, row[0]))
            SQLiteStore._refuse_request_of_deleted_job(db, request)
            db.execute("INSERT INTO sample_set_requests VALUES (?, ?, ?)", (request.request_id, set_id, request.fingerprint))
            if request.caller is not None:
                db.execute("INSERT INTO sample_set_request_senders VALUES (?, ?)", (request.request_id, request.caller))

    @staticmethod
    def _insert_samples(db: sqlite3.Connection, set_id: str, start: int, samples: Sequence[SampleRecord]) -> None:
        db.executemany(
            "INSERT INTO samples VALUES (?, ?, ?, ?, ?)",
            [(set_id, start + i, s.digest, s.label, json.dumps(s.attributes, sort_keys=True)) for i, s in enumerate(samples)],
        )

    @staticmethod
    def _require_set(db: sqlite3.Connection, sample_set_id: str, uid: str | None = None, check_owner: OwnerCheck | None = None,
                     uid_field: str = "sample_set_uid") -> tuple:
        """The set's row; NotFound, or FailedPrecondition naming ``uid_field`` when it is not
        the set of ``uid``, or what ``check_owner`` raises given its owner."""
        row = db.execute(f"SELECT {_SET_COLUMNS} FROM sample_sets WHERE id = ?", (sample_set_id,)).fetchone()
        if row is None:
            raise NotFound(f"no sample set {sample_set_id!r}", field="sample_set_id")
        require_sample_set_uid(sample_set_id, row[2], uid, uid_field)
        if check_owner is not None:
            check_owner(row[5])
        return row

    def _info(self, row: tuple) -> SampleSetInfo:
        set_id, display_name, create_time, update_time, uploading, owner = row
        counts = dict(self._db.execute("SELECT label, count FROM sample_class_counts WHERE set_id = ? ORDER BY label", (set_id,)).fetchall())
        return SampleSetInfo(set_id, display_name, sum(counts.values()), counts, create_time, update_time, bool(uploading), owner)

    def get_sample_set(self, sample_set_id: str) -> SampleSetInfo:
        with self._lock:
            return self._info(self._require_set(self._db, sample_set_id))

    def list_sample_sets(self, *, owner: str = "", after: tuple[float, str] | None = None, limit: int = 100) -> list[SampleSetInfo]:
        """Oldest first; with ``owner``, only that caller's sets (see _owned)."""
        listing = _owned("sample_sets", "sample_set_owners", "set_id", owner)
        condition, params = _resume_after(after, listing.id_column, time_column=listing.time_column)
        clauses = [clause for clause in (listing.condition, condition) if clause]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SET_COLUMNS} FROM {listing.source} {where} ORDER BY {listing.time_column}, {listing.id_column} LIMIT ?",
                (*((owner,) if owner else ()), *params, limit)
            ).fetchall()
            return [self._info(row) for row in rows]

    def list_samples(self, sample_set_id: str, offset: int = 0, limit: int | None = None, *, uid: str | None = None) -> list[SampleRecord]:
        with self._lock:
            self._require_set(self._db, sample_set_id, uid, uid_field="sample_set_id")
            # Positions run 0, 1, ... (samples are only appended): the page starts at its
            # offset by the primary key, where OFFSET stepped over every sample before it.
            rows = self._db.execute(
                "SELECT digest, label, attributes FROM samples WHERE set_id = ? AND position >= ? ORDER BY position LIMIT ?",
                (sample_set_id, offset, -1 if limit is None else limit),
            ).fetchall()
        return [SampleRecord(digest, label, json.loads(attributes)) for digest, label, attributes in rows]

    @_frees_space
    def delete_sample_set(self, sample_set_id: str, *, uid: str | None = None, check_owner: OwnerCheck | None = None) -> None:
        """Delete the set; its images become candidates for :meth:`delete_unused_blobs`.
        ``check_owner`` may refuse it, given its owner, in the delete's transaction."""
        with self._transaction() as db:
            self._require_set(db, sample_set_id, uid, check_owner)
            self._delete_set(db, sample_set_id)

    def _delete_set(self, db: sqlite3.Connection, sample_set_id: str) -> None:
        """Delete a set's rows (samples and upload mark cascade) and its upload's last
        request; its images become candidates for the next sweep."""
        self._upload_requests.pop(sample_set_id, None)
        db.execute("INSERT OR REPLACE INTO blob_candidates SELECT DISTINCT digest, ? FROM samples WHERE set_id = ?",
                   (self.now(), sample_set_id))
        db.execute("DELETE FROM sample_sets WHERE id = ?", (sample_set_id,))

    # Jobs ----------------------------------------------------------------------------

    @staticmethod
    def _job_row(job: JobRecord) -> tuple:
        values = asdict(job)
        values["artifacts"] = json.dumps(values["artifacts"])
        values["cancel_requested"] = int(job.cancel_requested)
        values["id"] = values.pop("job_id")
        return tuple(values[column] for column in _JOB_COLUMNS)

    @staticmethod
    def _job_from_row(row: tuple) -> JobRecord:
        """A job from its _JOB_COLUMNS and _JOB_OWNER_AND_ERROR_DETAILS."""
        values = dict(zip((*_JOB_COLUMNS, "owner", "error_details"), row, strict=True))
        values["error_details"] = values["error_details"] or b""
        values["job_id"] = values.pop("id")
        values["cancel_requested"] = bool(values["cancel_requested"])
        values["artifacts"] = tuple(ArtifactRef(**a) for a in json.loads(values["artifacts"]))
        return JobRecord(**values)

    def insert_job(self, job: JobRecord, *, request: RequestKey | None = None) -> None:
        self._refuse_while_reserve_released()
        with self._transaction() as db:
            db.execute(f"INSERT INTO jobs VALUES ({', '.join('?' * len(_JOB_COLUMNS))})", self._job_row(job))
            self._write_error_details(db, job)
            if job.owner is not None:
                db.execute("INSERT INTO job_owners (job_id, owner, create_time) VALUES (?, ?, ?)", (job.job_id, job.owner, job.create_time))
            if request is not None:
                request_id = request.request_id
                row = db.execute("SELECT jobs.id, state, error_code, fingerprint FROM job_requests JOIN jobs ON jobs.id = job_id "
                                 "WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None and (row[1], row[2]) != (FAILED, ABORTED):  # an aborted job's id starts it again
                    # A caller inserting without asking job_of_request under the same lock first
                    # (JobManager.submit does; the data dir's lock keeps other processes out):
                    # another request under the id is the id reused, as job_of_request says.
                    if row[3] != request.fingerprint:
                        raise request_id_reused(request_id, operation=self._operation_of_request(db, request, row[0]))
                    # The same request (of the same caller: its fingerprint has the caller's name): its job is this one's.
                    raise AlreadyExists(f"request_id {request_id} was given to operations/{row[0]}", field="request_id",
                                        operation=f"operations/{row[0]}")
                if row := db.execute("SELECT set_id FROM sample_set_requests WHERE request_id = ?", (request_id,)).fetchone():
                    raise request_id_reused(request_id, sample_set=self._sample_set_of_request(db, request, row[0]))
                self._refuse_request_of_deleted_job(db, request)
                db.execute("INSERT OR REPLACE INTO job_requests VALUES (?, ?, ?)", (request_id, job.job_id, request.fingerprint))
                db.execute("INSERT INTO job_request_runs VALUES (?, ?)", (job.job_id, request.run_id))

    def job_of_request(self, request: RequestKey) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT job_id, fingerprint FROM job_requests WHERE request_id = ?", (request.request_id,)).fetchone()
            if row is not None and row[1] != request.fingerprint:
                raise request_id_reused(request.request_id, operation=self._operation_of_request(self._db, request, row[0]))
            if row is None:
                self._refuse_request_of_deleted_job(self._db, request)
        return None if row is None else row[0]

    def add_request_run(self, job_id: str, run_id: str) -> None:
        def add() -> None:
            with self._transaction() as db:
                # None recorded: made before runs were recorded, by a run nothing names, which a row would hide.
                db.execute("INSERT OR IGNORE INTO job_request_runs SELECT ?, ? WHERE EXISTS (SELECT 1 FROM job_request_runs WHERE job_id = ?)",
                           (job_id, run_id, job_id))
        try:
            # Bookkeeping a repeat's answer needs, as small as a cancel's: a full data dir refused the repeat otherwise.
            self._with_reserve(f"to record a run asking for operation {job_id} again", add)
        except (ResourceExhausted, sqlite3.Error) as error:  # still full, or a read-only file: the repeat was answered before runs were kept
            with self._lock:
                self._unrecorded_runs.setdefault(job_id, set()).add(run_id)
            log.warning("store %s: could not record that run %r asked for operation %s again (%s): kept in memory until the "
                        "server stops", self.data_dir, run_id, job_id, error)

    def request_runs(self, job_id: str) -> frozenset[str] | None:
        with self._lock:
            if self._db.execute("SELECT 1 FROM job_requests WHERE job_id = ?", (job_id,)).fetchone() is None:
                return None
            runs = {row[0] for row in self._db.execute("SELECT run_id FROM job_request_runs WHERE job_id = ?", (job_id,))}
            return frozenset(runs | self._unrecorded_runs.get(job_id, set()) if runs else runs)

    @staticmethod
    def _refuse_request_of_deleted_job(db: sqlite3.Connection, request: RequestKey) -> None:
        """FailedPrecondition naming request_id where ``request``'s id started a job that
        DeleteOperation deleted since (see deleted_job_requests); InvalidArgument where the
        id came with another request (request_id_reused, naming the job as _made_by would)."""
        row = db.execute("SELECT job_id, fingerprint, owner FROM deleted_job_requests WHERE request_id = ?", (request.request_id,)).fetchone()
        if row is None:
            return
        job_id, fingerprint, owner = row
        if fingerprint != request.fingerprint:
            named = request.caller is None or owner in (None, request.caller)
            raise request_id_reused(request.request_id, operation=f"operations/{job_id}" if named else None)
        raise request_of_deleted_job(request.request_id, f"operations/{job_id}")

    def update_job(self, job: JobRecord) -> None:
        # A job's failure or cancellation is bookkeeping (no response; an error's details),
        # which the reserve is kept for: else the store says it is running until a restart.
        # So is a cancel request (a running job is stopped first on a full data dir, and
        # CancelOperation was refused). A response is not: it may be as large as the reserve.
        if job.state in (FAILED, CANCELLED) or (job.cancel_requested and job.state == RUNNING):
            self._with_reserve(f"to record the end or cancel request of operation {job.job_id}", functools.partial(self._update_job, job))
        else:
            self._update_job(job)

    def _update_job(self, job: JobRecord) -> None:
        row = self._job_row(job)
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in _JOB_COLUMNS[1:])} WHERE id = ?", (*row[1:], row[0]))
            self._write_error_details(db, job)

    @staticmethod
    def _write_error_details(db: sqlite3.Connection, job: JobRecord) -> None:
        """Store ``job.error_details`` in job_error_details (b"": none, a row there deleted).
        Only a finished job has any, so a queued or running one's writes (its progress) touch
        nothing there."""
        if job.error_details:
            db.execute("INSERT OR REPLACE INTO job_error_details VALUES (?, ?)", (job.job_id, job.error_details))
        elif job.state in FINISHED_STATES:
            db.execute("DELETE FROM job_error_details WHERE job_id = ?", (job.job_id,))

    def get_job(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_SELECTED}, {_JOB_OWNER_AND_ERROR_DETAILS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no operation {job_id!r}", field="name")
        return self._job_from_row(row)

    def list_jobs(self, *, kind: str = "", state: str = "", owner: str = "", after: tuple[float, str] | None = None,
                  limit: int = 100, responses: bool = True) -> list[JobRecord]:
        """Newest first; with ``owner``, only that caller's jobs (see _owned)."""
        listing = _owned("jobs", "job_owners", "job_id", owner)
        clauses, params = ([listing.condition], [owner]) if owner else ([], [])
        # An owner's jobs of a kind or state are read from job_owners' indexes of them
        # (_JOB_OWNER_KINDS, _JOB_OWNER_STATES); everyone's from jobs'.
        table = "job_owners" if owner else "jobs"
        for column, value in ((f"{table}.kind", kind), (f"{table}.state", state)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if after is not None:
            condition, resume = _resume_after(after, listing.id_column, time_column=listing.time_column, newest_first=True)
            clauses.append(condition)
            params.extend(resume)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_SELECTED if responses else _JOB_SELECTED_WITHOUT_RESPONSE}, {_JOB_OWNER_AND_ERROR_DETAILS} FROM {listing.source} {where} "
                f"ORDER BY {listing.time_column} DESC, {listing.id_column} LIMIT ?", (*params, limit)
            ).fetchall()
        return [self._job_from_row(row) for row in rows]

    @_frees_space
    def delete_job(self, job_id: str) -> None:
        """Forget a finished job; its artifacts become candidates for :meth:`delete_unused_blobs`."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no operation {job_id!r}", field="name")
            if row[0] not in FINISHED_STATES:
                raise FailedPrecondition(f"operations/{job_id} is {row[0].lower()}; cancel it and wait for it to end, then delete it", field="name")
            if row[0] != SUCCEEDED and (version := db.execute(
                    f"SELECT version_id FROM head_versions WHERE {_STORED_BY} = ?", (job_id,)).fetchone()):
                raise FailedPrecondition(f"operations/{job_id} stored head version {version[0]} but did not succeed; delete that version "
                                         f"first (DeleteHeadVersion), or the server's next start does", field="name")
            # Not one a shutdown aborted: its request runs again when repeated, deleted or not.
            db.execute("""INSERT OR REPLACE INTO deleted_job_requests
                          SELECT request_id, job_id, fingerprint, (SELECT owner FROM job_owners WHERE job_owners.job_id = jobs.id),
                                 COALESCE(end_time, ?)
                          FROM job_requests JOIN jobs ON jobs.id = job_id WHERE job_id = ? AND (state, error_code) != (?, ?)""",
                       (self.now(), job_id, FAILED, ABORTED))
            self._forget_jobs(db, "id = ?", (job_id,))

    @_frees_space
    def delete_jobs_ended_before(self, end_time: float, *, interrupt: threading.Event | None = None) -> int:
        """Forget the finished jobs that ended before ``end_time`` (epoch s), at most
        ``_SWEEP_CHUNK`` per hold of the lock; returns how many. An edit that did not
        succeed stays while the head version it stored does (restore drops that first).
        Once ``interrupt`` is set (the server stopping), returns after the chunk under way."""
        placeholders = ", ".join("?" * len(FINISHED_STATES))
        deleted = 0
        with self._transaction() as db:  # one row per job a caller deleted: few
            db.execute("DELETE FROM deleted_job_requests WHERE end_time < ?", (end_time,))
        while True:
            with self._transaction() as db:
                # By end time only (+state uses no index): by state, each minute's sweep
                # read every finished job to find none due.
                count = self._forget_jobs(
                    db, f"""id IN (SELECT id FROM jobs WHERE end_time < ? AND +state IN ({placeholders})
                                   AND (state = ? OR NOT EXISTS (SELECT 1 FROM head_versions WHERE {_STORED_BY} = +jobs.id))
                                   ORDER BY end_time LIMIT ?)""",
                    (end_time, *FINISHED_STATES, SUCCEEDED, _SWEEP_CHUNK))
            deleted += count
            if count < _SWEEP_CHUNK or _interrupted(interrupt):
                return deleted

    def _forget_jobs(self, db: sqlite3.Connection, where: str, params: tuple) -> int:
        """Delete the jobs matching ``where``, recording their artifacts as blob candidates."""
        db.execute(f"INSERT OR REPLACE INTO blob_candidates SELECT DISTINCT digest, ? FROM job_artifacts WHERE job_id IN (SELECT id FROM jobs WHERE {where})",
                   (self.now(), *params))
        return db.execute(f"DELETE FROM jobs WHERE {where}", params).rowcount  # and, cascading, their job_artifacts

    def fail_unfinished_jobs(self, reason: str) -> list[tuple[str, str]]:
        with self._transaction() as db:  # by the state index: the unfinished, not every job
            return [(job_id, kind) for job_id, kind in db.execute(
                """UPDATE jobs SET state = ?, error_code = ?, error_message = ?, end_time = ?, message = 'failed'
                   WHERE state IN (?, ?) RETURNING id, kind""",
                (FAILED, ABORTED, reason, time.time(), QUEUED, RUNNING),
            ).fetchall()]

    # Feature cache -------------------------------------------------------------------

    def get_features(self, version: str, digests: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(digests))
        with self._lock:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                rows = self._db.execute(
                    f"SELECT digest, vector FROM features WHERE version = ? AND digest IN ({', '.join('?' * len(chunk))})", (version, *chunk)
                ).fetchall()
                found.update((digest, np.frombuffer(vector, dtype=np.float32)) for digest, vector in rows)
        return found

    def put_features(self, version: str, features: dict[str, np.ndarray]) -> bool:
        """Cache computed features; skipped while the data dir is full (the reserve released),
        False then: a caller told they are cached would compute them again."""
        if self._reserve_released:
            return False
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO features VALUES (?, ?, ?)",
                [(version, digest, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for digest, v in features.items()],
            )
        return True

    def retain_features(self, version: str) -> int:
        """Drop cached features of every other model version; returns rows removed."""
        with self._transaction() as db:
            return db.execute("DELETE FROM features WHERE version != ?", (version,)).rowcount

    # Head versions --------------------------------------------------------------------

    _HEAD_COLUMNS = "feature_version, version_id, head_hash, weights_digest, parent_version_id, create_time, details"
    # Read after a version's columns: its owner (head_version_owners).
    _HEAD_OWNER = ("(SELECT owner FROM head_version_owners AS o WHERE o.feature_version = head_versions.feature_version "
                   "AND o.version_id = head_versions.version_id)")

    @staticmethod
    def _head_from_row(row: tuple) -> HeadVersionRecord:
        *values, details, owner = row
        return HeadVersionRecord(*values, details=json.loads(details), owner=owner)

    def insert_head_version(self, record: HeadVersionRecord) -> None:
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM head_versions WHERE feature_version = ? AND version_id = ?", (record.feature_version, record.version_id)).fetchone():
                raise AlreadyExists(f"head version {record.version_id!r} already exists", field="version_id")
            self._require_room_for_head_version(db, record.feature_version, record.owner)
            db.execute(
                f"INSERT INTO head_versions ({self._HEAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.feature_version, record.version_id, record.head_hash, record.weights_digest, record.parent_version_id,
                 record.create_time, json.dumps(record.details, sort_keys=True)),
            )
            if record.owner is not None:
                db.execute("INSERT INTO head_version_owners VALUES (?, ?, ?)", (record.feature_version, record.version_id, record.owner))

    def require_room_for_head_version(self, feature_version: str, owner: str | None) -> None:
        with self._lock:
            self._require_room_for_head_version(self._db, feature_version, owner)

    def _require_room_for_head_version(self, db: sqlite3.Connection, feature_version: str, owner: str | None) -> None:
        """ResourceExhausted when ``owner`` (a named caller; None: no one's) holds
        max_head_versions_per_owner versions of ``feature_version`` already. Asked in the
        transaction that inserts one, so edits racing past the check at submit cannot
        pass it together."""
        if not self.max_head_versions_per_owner or owner is None:
            return
        # The served version is not counted: its caller cannot delete it, so a caller whose version an admin
        # promoted at a limit of 1 had no way to make room.
        (held,) = db.execute("SELECT COUNT(*) FROM head_version_owners AS o WHERE owner = ? AND feature_version = ? AND NOT EXISTS "
                             "(SELECT 1 FROM active_heads AS a WHERE a.feature_version = o.feature_version AND a.version_id = o.version_id)",
                             (owner, feature_version)).fetchone()
        if held >= self.max_head_versions_per_owner:
            raise ResourceExhausted(f"caller {owner!r} holds {held} head version{'s' * (held != 1)}, and 1 more would pass its limit of "
                                    f"{self.max_head_versions_per_owner} ([server].max_head_versions_per_caller): delete versions "
                                    f"it no longer needs (explaind head-versions delete)",
                                    quota=Quota("HEAD_VERSIONS_PER_CALLER_EXCEEDED", "[server].max_head_versions_per_caller",
                                                self.max_head_versions_per_owner, caller_subject(owner), "head versions this caller holds"))

    def list_head_versions(self, feature_version: str, *, after: tuple[float, str] | None = None,
                           limit: int | None = None) -> list[HeadVersionRecord]:
        condition, params = _resume_after(after, "version_id")
        where = f"AND {condition}" if condition else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._HEAD_COLUMNS}, {self._HEAD_OWNER} FROM head_versions WHERE feature_version = ? {where} ORDER BY create_time, version_id LIMIT ?",
                (feature_version, *params, -1 if limit is None else limit),
            ).fetchall()
        return [self._head_from_row(row) for row in rows]

    def first_head_version_of_hash(self, feature_version: str, head_hash: str) -> HeadVersionRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._HEAD_COLUMNS}, {self._HEAD_OWNER} FROM head_versions WHERE feature_version = ? AND head_hash = ? ORDER BY create_time, version_id LIMIT 1",
                (feature_version, head_hash)).fetchone()
        return None if row is None else self._head_from_row(row)

    def head_versions_of_failed_edits(self, feature_version: str) -> list[tuple[str, str]]:
        with self._lock:  # from the failed and cancelled jobs (by state; CROSS JOIN keeps that order), each by the edit index
            return self._db.execute(
                f"""SELECT version_id, jobs.id FROM jobs CROSS JOIN head_versions ON {_STORED_BY} = +jobs.id
                    WHERE jobs.state IN (?, ?) AND feature_version = ? ORDER BY head_versions.create_time, version_id""",
                (FAILED, CANCELLED, feature_version)).fetchall()

    def head_version_children(self, feature_version: str, version_id: str) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute(
                "SELECT version_id FROM head_versions WHERE feature_version = ? AND parent_version_id = ? ORDER BY create_time, version_id",
                (feature_version, version_id))]

    def get_head_version(self, feature_version: str, version_id: str) -> HeadVersionRecord:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._HEAD_COLUMNS}, {self._HEAD_OWNER} FROM head_versions WHERE feature_version = ? AND version_id = ?", (feature_version, version_id)
            ).fetchone()
        if row is None:
            raise NotFound(f"no head version {version_id!r} for the served feature extractor", field="version_id")
        return self._head_from_row(row)

    @_frees_space
    def delete_head_version(self, feature_version: str, version_id: str) -> None:
        with self._transaction() as db:
            row = db.execute("SELECT parent_version_id FROM head_versions WHERE feature_version = ? AND version_id = ?",
                             (feature_version, version_id)).fetchone()
            if row is None:
                raise NotFound(f"no head version {version_id!r} for the served feature extractor", field="version_id")
            db.execute("INSERT OR REPLACE INTO blob_candidates SELECT weights_digest, ? FROM head_versions WHERE feature_version = ? AND version_id = ?",
                       (self.now(), feature_version, version_id))
            db.execute("DELETE FROM head_versions WHERE feature_version = ? AND version_id = ?", (feature_version, version_id))
            # Only the highest deleted id is needed (ids are given out above every id ever
            # used): one row per deletion grew the table for as long as edits were deleted.
            db.execute("INSERT OR IGNORE INTO deleted_head_versions VALUES (?, ?)", (feature_version, version_id))
            db.execute("DELETE FROM deleted_head_versions WHERE feature_version = ? AND version_id != (SELECT version_id FROM "
                       f"deleted_head_versions WHERE feature_version = ? ORDER BY {_VERSION_NUMBER} DESC LIMIT 1)",
                       (feature_version, feature_version))
            db.execute("UPDATE active_heads SET version_id = ? WHERE feature_version = ? AND version_id = ?", (row[0], feature_version, version_id))
            # Its children now descend from its parent; their comparison was with it, not
            # with that parent, so it goes with it.
            children = db.execute("SELECT version_id, details FROM head_versions WHERE feature_version = ? AND parent_version_id = ?",
                                  (feature_version, version_id)).fetchall()
            db.executemany("UPDATE head_versions SET parent_version_id = ?, details = ? WHERE feature_version = ? AND version_id = ?",
                           [(row[0], json.dumps({k: v for k, v in json.loads(details).items() if k != "parent_evaluation"}, sort_keys=True),
                             feature_version, child) for child, details in children])

    def next_head_version_number(self, feature_version: str) -> int:
        """1 + the highest N of the ids vN stored or deleted (0 when none): by the number
        index and the one row kept of deleted ids, not by listing every version."""
        with self._lock:
            return self._db.execute(
                f"""SELECT 1 + MAX(-1, COALESCE((SELECT {_VERSION_NUMBER} FROM head_versions WHERE feature_version = ? AND {_NUMBERED}
                                                 ORDER BY {_VERSION_NUMBER} DESC LIMIT 1), -1),
                                       COALESCE((SELECT MAX({_VERSION_NUMBER}) FROM deleted_head_versions WHERE feature_version = ? AND {_NUMBERED}), -1))""",
                (feature_version, feature_version)).fetchone()[0]

    @_uses_reserve("to change the served head version")  # a promote or rollback: not held up by a full data dir
    def set_active_head_version(self, feature_version: str, version_id: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO active_heads VALUES (?, ?)", (feature_version, version_id))

    def active_head_version(self, feature_version: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT version_id FROM active_heads WHERE feature_version = ?", (feature_version,)).fetchone()
        return row[0] if row else None

    def set_file_head_version(self, feature_version: str, version_id: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO file_heads VALUES (?, ?)", (feature_version, version_id))

    def file_head_version(self, feature_version: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT version_id FROM file_heads WHERE feature_version = ?", (feature_version,)).fetchone()
        return row[0] if row else None
