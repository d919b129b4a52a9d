"""NeuroInspectService: translate messages and call :class:`NeuroInspectEngine`."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import grpc
from explaind.v1 import neuroinspect_pb2, neuroinspect_pb2_grpc

from ..engine import NeuroInspectEngine, RankSettings
from ..errors import InvalidArgument, ResourceExhausted
from ..jobs import JobSnapshot
from . import convert
from .auth import current_caller
from .interceptors import HeldCalls, response_bytes_quota
from .paging import messages_that_fit, page_limit, resume_point, resume_token

class _EnumNames:
    """A proto enum's numbers -> the engine's names (COUNTERFACTUAL_SOLVER_PROXIMAL ->
    "proximal"), the unspecified 0 -> ``unset``, the default."""

    def __init__(self, enum, prefix: str, *, unset: str) -> None:
        self._enum = enum
        self._names = {number: name.removeprefix(prefix).lower() if number else unset for name, number in enum.items()}

    def __call__(self, value: int, field: str) -> str:
        if value not in self._names:
            raise convert.unknown_enum_value(self._enum, value, field)
        return self._names[value]


_SOLVER = _EnumNames(neuroinspect_pb2.CounterfactualSolver, "COUNTERFACTUAL_SOLVER_", unset=RankSettings.solver)
_EXECUTION = _EnumNames(neuroinspect_pb2.Execution, "EXECUTION_", unset="auto")
_VISUALIZATION_METHOD = _EnumNames(neuroinspect_pb2.VisualizationMethod, "VISUALIZATION_METHOD_", unset="clip_illusion")
_EDIT_METHOD = _EnumNames(neuroinspect_pb2.HeadEditMethod, "HEAD_EDIT_METHOD_", unset="probability_ratio")


def _target_class(message) -> str | int | None:
    """The ``target_class`` oneof: a name, an index, or None when unset."""
    which = message.WhichOneof("target_class")
    return None if which is None else getattr(message, which)


def _optional(message, field: str, default: float | None) -> float | None:
    return getattr(message, field) if message.HasField(field) else default


def _given(**options: Any) -> dict[str, Any]:
    """The options a request set (not None): the engine's defaults, kept in one place,
    stand for the others."""
    return {name: value for name, value in options.items() if value is not None}


class NeuroInspectServicer(neuroinspect_pb2_grpc.NeuroInspectServiceServicer):
    def __init__(self, engine: NeuroInspectEngine, *, max_message_bytes: int, held_calls: HeldCalls) -> None:
        self._engine = engine
        self._max_message_bytes = max_message_bytes  # a ListHeadVersions page ends before it; an inline ranking fits
        self._held_calls = held_calls  # an inline ranking computes in its RPC's thread

    def RankMistakeNeurons(self, request, context: grpc.ServicerContext) -> neuroinspect_pb2.RankMistakeNeuronsResponse:
        defaults = RankSettings()  # the issue's, kept in one place
        settings = RankSettings(
            solver=_SOLVER(request.solver, "solver"),
            l1=_optional(request, "l1", defaults.l1),
            l2=_optional(request, "l2", defaults.l2),
            max_iterations=request.max_iterations or defaults.max_iterations,
            cut_ratio=_optional(request, "cut_ratio", defaults.cut_ratio),
            top_k=request.top_k,
            include_samples=request.include_samples,
            stability_resamples=request.stability_resamples,
        )
        execution, caller = _EXECUTION(request.execution, "execution"), current_caller()
        # An inline ranking holds its thread for seconds (features of up to 4096 samples,
        # then the solver): it takes a held call's slot, so that rankings cannot take every
        # thread from Predict and the short calls, nor one caller's from the others.
        # Without one, AUTO runs it as an operation, through the job queue's limits. One
        # asked for as an operation holds no thread, so it takes no slot from the waits.
        with self._held_calls.slot(caller=caller) if execution != "operation" else nullcontext(None) as held:
            if execution == "inline" and held is not None and held.refused is not None:
                raise ResourceExhausted(f"no thread is free for an inline ranking: {self._held_calls.refusal(held.refused)}, "
                                        "or use execution AUTO or OPERATION", quota=held.refused)
            outcome = self._engine.rank_mistake_neurons(
                request.sample_set_id, target_class=_target_class(request), settings=settings,
                execution=execution if held else "operation", call=context, request=convert.request_key(request),
                caller=caller,
            )
        if isinstance(outcome, JobSnapshot):
            return neuroinspect_pb2.RankMistakeNeuronsResponse(operation=convert.operation(outcome))
        response = neuroinspect_pb2.RankMistakeNeuronsResponse(ranking=outcome)
        # Only INLINE gets here past the limit: AUTO ran as an operation whatever might
        # not fit. The interceptor refuses it too, but cannot say how else to get the ranking.
        if (size := response.ByteSize()) > self._max_message_bytes:
            raise ResourceExhausted(f"the ranking is {size} bytes, more than the server's limit of {self._max_message_bytes} "
                                    "([server].max_message_bytes); use execution OPERATION, whose result keeps the top neurons "
                                    "and the first mistakes that fit (with include_samples, every ω in its artifact)",
                                    quota=response_bytes_quota(self._max_message_bytes))
        return response

    def VisualizeNeurons(self, request, context: grpc.ServicerContext) -> neuroinspect_pb2.VisualizeNeuronsResponse:
        snapshot = self._engine.visualize_neurons(
            [(pair.neuron, _target_class(pair)) for pair in request.pairs],
            method=_VISUALIZATION_METHOD(request.method, "method"),
            gamma=_optional(request, "gamma", None),
            epsilon=_optional(request, "epsilon", None),
            seed=request.seed,
            classes_per_neuron=request.classes_per_neuron or None,
            request=convert.request_key(request),
            caller=current_caller(),
            **_given(steps=request.steps or None, learning_rate=_optional(request, "learning_rate", None),
                     preview_every=request.preview_every or None),
        )
        return neuroinspect_pb2.VisualizeNeuronsResponse(operation=convert.operation(snapshot))

    def EditHead(self, request, context: grpc.ServicerContext) -> neuroinspect_pb2.EditHeadResponse:
        # Both set: one would be ignored, and the caller believes it took effect.
        if request.auto_target_ratio and request.HasField("target_ratio"):
            raise InvalidArgument("set either target_ratio or auto_target_ratio, not both", field="target_ratio")
        snapshot = self._engine.edit_head(
            request.sample_set_id,
            target_class=_target_class(request),
            neurons=list(request.neurons),
            method=_EDIT_METHOD(request.method, "method"),
            validation_sample_set_id=request.validation_sample_set_id,
            evaluation_sample_set_id=request.evaluation_sample_set_id,
            group_attribute=request.group_attribute,
            strength=request.strength if request.HasField("strength") else None,
            target_ratio="auto" if request.auto_target_ratio else _optional(request, "target_ratio", None),
            seed=request.seed,
            promote=request.promote,
            description=request.description,
            request=convert.request_key(request),
            caller=current_caller(),
            **_given(learning_rate=_optional(request, "learning_rate", None), max_epochs=request.max_epochs or None,
                     patience=request.patience or None),
        )
        return neuroinspect_pb2.EditHeadResponse(operation=convert.operation(snapshot))

    def ListHeadVersions(self, request, context: grpc.ServicerContext) -> neuroinspect_pb2.ListHeadVersionsResponse:
        after, limit = resume_point(request.page_token, "head_versions"), page_limit(request.page_size, 100, 1000)
        records, active_id = self._engine.head_versions(after=after, limit=limit)
        versions = messages_that_fit((self._engine.head_version_message(r, active_id) for r in records), self._max_message_bytes)
        last = records[len(versions) - 1] if versions and (len(versions) < len(records) or len(records) == limit) else None
        return neuroinspect_pb2.ListHeadVersionsResponse(
            versions=versions, active_version_id=active_id,
            next_page_token=resume_token("head_versions", last.create_time, last.version_id) if last else "",
        )

    def GetHeadVersion(self, request, context: grpc.ServicerContext) -> neuroinspect_pb2.GetHeadVersionResponse:
        record, active_id = self._engine.head_version(request.version_id)
        return neuroinspect_pb2.GetHeadVersionResponse(version=self._engine.head_version_message(record, active_id))

    def PromoteHeadVersion(self, request, context: grpc.ServicerContext) -> neuroinspect_pb2.PromoteHeadVersionResponse:
        record, previous = self._engine.promote_head_version(request.version_id, caller=current_caller())
        return neuroinspect_pb2.PromoteHeadVersionResponse(version=self._engine.head_version_message(record), previous_version_id=previous)

    def RollbackHeadVersion(self, request, context: grpc.ServicerContext) -> neuroinspect_pb2.RollbackHeadVersionResponse:
        record, previous = self._engine.rollback_head_version(request.version_id, caller=current_caller())
        return neuroinspect_pb2.RollbackHeadVersionResponse(version=self._engine.head_version_message(record), previous_version_id=previous)

    def DeleteHeadVersion(self, request, context: grpc.ServicerContext) -> neuroinspect_pb2.DeleteHeadVersionResponse:
        self._engine.delete_head_version(request.version_id, caller=current_caller())
        return neuroinspect_pb2.DeleteHeadVersionResponse()
