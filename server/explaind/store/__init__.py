"""Persistence behind one small interface (:class:`Store`); :class:`SQLiteStore` is the
embedded default (SQLite WAL + a content-addressed artifact directory)."""

from .base import (
    ABORTED,
    CANCELLED,
    EDIT_JOB_ID,
    FAILED,
    FINISHED_STATES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    ArtifactRef,
    HeadVersionRecord,
    JobRecord,
    RequestKey,
    SampleRecord,
    SampleSetInfo,
    Store,
    StoreOpenError,
    require_sample_set_uid,
    sample_set_id_taken,
)
from .sqlite import SQLiteStore

__all__ = [
    "ABORTED",
    "CANCELLED",
    "EDIT_JOB_ID",
    "FAILED",
    "FINISHED_STATES",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "ArtifactRef",
    "HeadVersionRecord",
    "JobRecord",
    "RequestKey",
    "SQLiteStore",
    "StoreOpenError",
    "SampleRecord",
    "SampleSetInfo",
    "Store",
    "require_sample_set_uid",
    "sample_set_id_taken",
]
