"""One INFO line per call that changed something, naming its caller, the action and the
ids it acted on, so the log answers "who deleted set X, promoted v7, cancelled that
operation". The interceptor writes it once a call of :data:`ACTIONS` answered OK: one
table of the mutating methods and one line format, rather than a line at each place a
change happens. Reads and Predict (volume) get none; the ids come from the request or
the response, never sample contents, display names or tokens. A call that answers OK
but changed nothing (a cancel of a job that had ended or was stopping already, a promote
of the version served) gets none: its line would name its caller as the one who did it.

The text line reads ``delete_sample_set sample_set_id=train by caller analyst``; a JSON
line (logs.JsonFormatter) also carries ``action``, ``caller`` and each id as fields of
their own. A call without a named caller (one token, or no auth) has no ``caller``.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from explaind.v1 import operations_pb2

from ..logs import FIELDS
from .convert import job_id

log = logging.getLogger(__name__)

# request, response -> ids (name -> value); None: the call changed nothing.
_Ids = Callable[[Any, Any], "dict[str, str] | None"]


def _sample_set(_request: Any, response: Any) -> dict[str, str]:
    return {"sample_set_id": response.sample_set.sample_set_id, "sample_set_uid": response.sample_set.uid}


def _submitted(request: Any, response: Any) -> dict[str, str] | None:
    """The operation a job-starting call submitted; None for a ranking answered inline
    (a read). An edit that serves its version once stored says so: its job promotes."""
    if not response.HasField("operation"):
        return None
    metadata = operations_pb2.OperationMetadata()
    response.operation.metadata.Unpack(metadata)
    ids = {"operation_id": job_id(response.operation.name), "kind": metadata.kind}
    if getattr(request, "promote", False):
        ids["promote"] = "true"
    return ids


def _served(_request: Any, response: Any) -> dict[str, str] | None:
    """The version now served; None when it was served already (promoted again)."""
    if response.version.version_id == response.previous_version_id:
        return None
    return {"version_id": response.version.version_id, "previous_version_id": response.previous_version_id}


# (service, method) -> (action, its ids).
ACTIONS: dict[tuple[str, str], tuple[str, _Ids]] = {
    ("explaind.v1.SampleSetService", "CreateSampleSet"): ("create_sample_set", _sample_set),
    ("explaind.v1.SampleSetService", "AppendSamples"): ("append_samples", _sample_set),
    ("explaind.v1.SampleSetService", "DeleteSampleSet"): ("delete_sample_set", lambda request, _: {"sample_set_id": request.sample_set_id}),
    ("explaind.v1.InferenceService", "EvaluateSampleSet"): ("submit_operation", _submitted),
    ("explaind.v1.NeuroInspectService", "RankMistakeNeurons"): ("submit_operation", _submitted),
    ("explaind.v1.NeuroInspectService", "VisualizeNeurons"): ("submit_operation", _submitted),
    ("explaind.v1.NeuroInspectService", "EditHead"): ("submit_operation", _submitted),
    ("explaind.v1.OperationsService", "CancelOperation"): ("cancel_operation", lambda _, response: {"operation_id": job_id(response.operation.name)}),
    ("explaind.v1.OperationsService", "DeleteOperation"): ("delete_operation", lambda request, _: {"operation_id": job_id(request.name)}),
    ("explaind.v1.NeuroInspectService", "PromoteHeadVersion"): ("promote_head_version", _served),
    ("explaind.v1.NeuroInspectService", "RollbackHeadVersion"): ("rollback_head_version", _served),
    ("explaind.v1.NeuroInspectService", "DeleteHeadVersion"): ("delete_head_version", lambda request, _: {"version_id": request.version_id}),
}


class _Call:
    """Whether the call being served changed anything (see :func:`unchanged`)."""

    changed = True


_CURRENT_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("explaind_audited_call", default=None)


@contextmanager
def auditing() -> Iterator[_Call]:
    """While a servicer runs: the call :func:`unchanged` marks."""
    call = _Call()
    token = _CURRENT_CALL.set(call)
    try:
        yield call
    finally:
        _CURRENT_CALL.reset(token)


def unchanged() -> None:
    """Mark the call being served as one that changed nothing, though it answers OK (a
    cancel of a job that had ended): it gets no audit line, which would name its caller
    as the one who made the change. Outside a call (in-process), nothing."""
    if (call := _CURRENT_CALL.get()) is not None:
        call.changed = False


def log_change(service: str, method: str, request: Any, response: Any, caller: str | None) -> None:
    """The audit line of a call that answered OK, if its method changes anything.
    ``caller``: its named caller (None: none)."""
    action = ACTIONS.get((service, method))
    if action is None:
        return
    name, ids_of = action
    ids = ids_of(request, response)
    if ids is None:
        return
    fields = {"action": name, **({"caller": caller} if caller else {}), **ids}
    by = f" by caller {caller}" if caller else ""
    log.info("%s %s%s", name, " ".join(f"{key}={value}" for key, value in ids.items()), by, extra={FIELDS: fields})
