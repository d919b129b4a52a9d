"""NeuroInspect as a service: ranking, visualisation and head edits on the served model.

:class:`NeuroInspectEngine` validates requests (errors name the request field), runs the
method engines of :mod:`explaind.methods.neuroinspect` on cached sample-set features,
and keeps *head versions*: every edit stores a new head (weights as an artifact,
metadata as a row) for the served feature extractor; promote and rollback swap the
served head atomically through :meth:`Engine.activate`, and :meth:`restore` serves the
stored active version again after a restart. No gRPC here; results are the
``explaind.v1`` messages the job system stores.
"""

from __future__ import annotations

import difflib
import io
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from explaind.v1 import common_pb2, neuroinspect_pb2

from ..config import MAX_LOSS_WEIGHT
from ..decode_memory import CallContext
from ..errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from ..imaging import JOB_IMAGE_COMPRESS_LEVEL, encode_png, image_grid, to_uint8_hwc
from ..jobs import JobContext, JobSnapshot
from ..messages import array_to_tensor, timestamp
from ..methods.memory import is_host_out_of_memory
from ..methods.neuroinspect import (
    EDIT_METHODS,
    SOLVERS,
    VISUALIZATION_METHODS,
    ClipIllusion,
    HeadEdit,
    HeadEditor,
    HeadEvaluation,
    MistakeNeuronRanker,
    ShiftsOverflowed,
    TrainingDiverged,
)
from ..methods.neuroinspect._checks import repeated_pair_problem
from ..methods.neuroinspect._probability import predicted_classes
from ..methods.neuroinspect._ranking import DEFAULT_TOP_K, MAX_STABILITY_RESAMPLES, neuron_top_classes
from ..store import EDIT_JOB_ID, HeadVersionRecord, RequestKey, SampleSetInfo
from ..wording import counted
from .core import MAX_DESCRIPTION_CHARS, check_text_length, require_caller
from ..class_names import class_name_key
from .models import ClassifierVersion, model_version

log = logging.getLogger(__name__)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the model's device (a GPU's allocator) or, on a CPU, the host
    running out of memory, rather than a bug."""
    return isinstance(error, torch.OutOfMemoryError) or is_host_out_of_memory(error)


def _move_whole(module: nn.Module, device: torch.device) -> None:
    """Move ``module``'s parameters and buffers onto ``device``, all or none. ``Module.to``
    moves them one by one: out of memory part-way, those moved stayed on the device,
    holding its memory until a later job finished the move. Here every copy is made first
    and swapped in (as ``Module.to`` swaps its own) only once all exist; a failure drops
    the copies, freeing their memory at once, and leaves the module as it was."""
    copies = {tensor: tensor.to(device) for tensor in (*module.parameters(), *module.buffers())}
    if all(copy is tensor for tensor, copy in copies.items()):  # Tensor.to returns a tensor already there itself
        return  # already moved: no walk over a module another job may be running
    # Module.to's own walk, handed the copies (a gradient, which CLIP's parameters lack, is moved as it goes).
    module._apply(lambda tensor: copies[tensor] if tensor in copies else tensor.to(device))


# RankMistakeNeurons answers inline up to these sizes (execution "auto"), and while its
# response cannot outgrow [server].max_message_bytes (see _inline_response_bound).
INLINE_MAX_SAMPLES = 4096
INLINE_MAX_MISTAKES = 256
# An inline ranking stops its stability resamples (a chunk of 50 at least) once the time
# left to its call (the deadline) is under this many times what its slowest chunk so far
# took, plus _RESAMPLE_ANSWER_SECONDS: the next may take longer, and the answer, built and
# sent after them, must come before the caller hears DEADLINE_EXCEEDED and loses the
# solved ranking.
_RESAMPLE_DEADLINE_MARGIN = 2.0
# Seconds kept for the answer itself, whatever the chunks take: building and serialising
# the largest inline one (2.4 MB: 256 mistakes with include_samples at D = 2048) took 28 ms
# on one CPU thread, 0.57 of twice its slowest chunk (bench/inline_answer_time.py,
# 2026-12-07), but a GPU's chunk may take far less (its CPU draws took 0.06 ms; not
# measured on a GPU); and the answer must still cross the network (0.19 s for 2.4 MB at
# 100 Mbit/s), the server's view of the deadline later than the caller's by the request's
# own trip.
_RESAMPLE_ANSWER_SECONDS = 0.25
# Classes a ranked neuron reports by head weight (RankedNeuron.top_classes).
RANKED_NEURON_TOP_CLASSES = 3
MAX_VISUALIZATION_PAIRS = 64
EXECUTIONS = ("auto", "inline", "operation")
# The job kinds, as operations report them.
RANK_KIND, VISUALIZE_KIND, EDIT_KIND = "rank_mistake_neurons", "visualize_neurons", "edit_head"
# The stages (JobContext.stage) each kind's jobs time, exported at zero from the start.
RANK_STAGES = ("features", "solve", "response")
VISUALIZE_STAGES = ("setup", "optimise", "preview", "images")
EDIT_STAGES = ("features", "training", "evaluation", "storing")
# The artifact that holds ω (float32 (M, D), .npy) when a ranking ran as an operation.
OMEGA_ARTIFACT = "omega.npy"
# Upper bound of the edit's target probability ratio given by a caller, for the same reason
# as config.MAX_LOSS_WEIGHT's. auto's o is not held to it: it follows the importances, up to
# about 3.3e14 where they reach their 1e15 cap (the result reports it).
MAX_TARGET_RATIO = 1e6
# Groups (class, attribute value) an edit's evaluation may have: per-group accuracy is for
# attributes of a few values (a background, a colour); one of a value per sample (a file
# name) would make each version's evaluation, stored and listed, as large as its set.
MAX_EDIT_GROUPS = 10_000
# Optimisation steps one visualisation may take (RequestLimits.max_visualization_steps tells clients).
MAX_VISUALIZATION_STEPS = 10_000
LOADED = "loaded"
# The key of a promoted edit's details naming the version it replaced as the served one.
_SERVED_BEFORE = "served_before"
# "v0", "v1", ...; "v01" names none of them. Used with fullmatch ("$" would accept a final "\n").
HEAD_VERSION_ID = re.compile(r"v(0|[1-9][0-9]{0,17})")

ClassRef = str | int  # a class name, or its index


@dataclass(frozen=True)
class RankSettings:
    """A ranking's parameters, with the issue's defaults: ω's penalties λ1 ‖ω‖₁/D and
    λ2 ‖ω‖₂/D, and the share of mistakes under which a neuron is dropped."""

    solver: str = "faithful"
    l1: float = 0.1
    l2: float = 0.01
    max_iterations: int = 1000
    cut_ratio: float = 0.03
    top_k: int = 0  # 0: the ranker's default, 5 (D where D < 5)
    include_samples: bool = False
    stability_resamples: int = 0  # bootstrap resamples behind each neuron's stability; 0: none


class _Classifier(nn.Module):
    """h_t(h_b(x)) as one module, so ClipIllusion can hook ``features.trunk.<layer>``."""

    def __init__(self, version: ClassifierVersion) -> None:
        super().__init__()
        self.features = version.feature_extractor
        self.head = version.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _bounded(value: float, field: str, *, high: float, low_open: bool = False) -> float:
    """A request's number in [0, ``high``] (``low_open``: (0, ``high``]), the service's bounds,
    upper ones too (the methods check only what makes sense at all); INVALID_ARGUMENT naming ``field``."""
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > high or (low_open and value == 0):
        bounds = f"{'(' if low_open else '['}0.0, {high}]"
        raise InvalidArgument(f"{value} is not in {bounds}", field=field)
    return value


def _length_delimited(size: int) -> int:
    """Bytes of a field of ``size`` bytes of message or bytes, with its one-byte tag
    (field numbers below 16) and its length's varint."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def _inline_response_bound(version: ClassifierVersion, sample_set_id: str, class_index: int, settings: RankSettings,
                           sample_count: int, mistake_count: int) -> int:
    """The most bytes a RankMistakeNeuronsResponse holding this ranking inline can take,
    known before the solver runs: every field at its widest (the largest indices, the
    longest class names), a neuron for each one the mistakes' top-k can reach (at most
    D), and with include_samples a summary per mistake and ω's (M, D) float32."""
    names, dim = version.class_names, version.feature_dim
    top_k = settings.top_k or min(DEFAULT_TOP_K, dim)
    longest = sorted(names, key=lambda name: len(name.encode()), reverse=True)
    shown = min(RANKED_NEURON_TOP_CLASSES, len(names))
    ranking = neuroinspect_pb2.NeuronRanking(
        sample_set_id=sample_set_id, model_version=version.version, class_index=class_index, class_name=names[class_index],
        solver=settings.solver, sample_count=sample_count, mistake_count=mistake_count, converged_count=mistake_count, top_k=top_k,
        stability_resamples=settings.stability_resamples, stability_resamples_requested=settings.stability_resamples,
        predicted_as=dict.fromkeys(list(dict.fromkeys(longest))[:mistake_count], mistake_count),  # distinct names, as the map's keys
    )
    neuron = neuroinspect_pb2.RankedNeuron(
        neuron=dim - 1, direction=max(neuroinspect_pb2.NeuronDirection.values()), insufficient_ratio=1.0, excessive_ratio=1.0,
        mean_omega=1.0, importance=1.0, top_classes=[len(names) - 1] * shown, top_class_names=longest[:shown], stability=1.0,
    )
    size = ranking.ByteSize() + min(dim, 2 * top_k * mistake_count) * _length_delimited(neuron.ByteSize())
    if settings.include_samples:
        mistake = neuroinspect_pb2.MistakeSummary(
            sample_index=sample_count - 1, predicted_class=len(names) - 1, converged=True, iterations=settings.max_iterations,
            insufficient_neurons=[dim - 1] * top_k, excessive_neurons=[dim - 1] * top_k, omega_l1=1.0,
        )
        omega = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[mistake_count, dim]).ByteSize()
        omega += _length_delimited(4 * mistake_count * dim)  # its data
        size += mistake_count * _length_delimited(mistake.ByteSize()) + _length_delimited(omega)
    return _length_delimited(size)


def _check_version_id(version_id: str) -> None:
    """An id no version can have is the caller's mistake (INVALID_ARGUMENT), not an unknown version."""
    if not version_id:
        raise InvalidArgument("required", field="version_id")
    if not HEAD_VERSION_ID.fullmatch(version_id):
        raise InvalidArgument(f"{version_id!r} is not a head version id; expected 'v' and a number without leading zeros, such as 'v3'", field="version_id")


def _is_finite(head: nn.Linear) -> bool:
    return bool(torch.isfinite(head.weight).all() and torch.isfinite(head.bias).all())


def _require_training_samples(labels: list[int], class_index: int, version: ClassifierVersion, sample_set_id: str, field: str) -> None:
    """An edit of class c learns from c's training samples; with none it stores a
    meaningless head version."""
    if class_index not in labels:
        raise InvalidArgument(f"sample set {sample_set_id!r} has no sample of class {version.class_names[class_index]!r} to train the edit on "
                              "(without a validation set every 5th sample is held out)", field=field)


def _head_bytes(head: nn.Linear) -> bytes:
    return save_safetensors({"weight": head.weight.detach().float().cpu().contiguous(), "bias": head.bias.detach().float().cpu().contiguous()})


def _head_from_bytes(data: bytes) -> nn.Linear:
    """The stored head as a module. Built without initialising it first (as
    ``HeadEdit.as_linear``): that drew from torch's global random generator at every
    promote, rollback and restart, moving the stream of a process that had seeded it."""
    tensors = load_safetensors(data)
    weight, bias = tensors["weight"], tensors["bias"]
    head: nn.Linear = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0])  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.eval()


class NeuroInspectEngine:
    """The NeuroInspect debugging loop over one :class:`~explaind.engine.Engine`."""

    def __init__(self, engine) -> None:
        self._engine = engine
        engine.jobs.register_kinds(RANK_KIND, stages=RANK_STAGES)
        engine.jobs.register_kinds(VISUALIZE_KIND, stages=VISUALIZE_STAGES)
        engine.jobs.register_kinds(EDIT_KIND, stages=EDIT_STAGES)
        self._versions_lock = threading.Lock()  # serialises id allocation, promote, rollback, delete
        # EditHead jobs and the (feature version, version id) each edits from: a version
        # an unfinished edit will name as its parent is not deleted.
        self._edits_from: dict[str, tuple[str, str]] = {}
        # The model file's head, (feature version, version id) and module: serving it again
        # never depends on its stored copy (the others are read from the store when served).
        self._file_head: tuple[tuple[str, str], nn.Linear] | None = None
        self._restored = threading.Event()  # set by restore(): until then the served head may still change
        # Held while a visualisation moves CLIP onto the device: with [jobs].gpu_workers > 1, two
        # starting at once each copied it there, one copy wasted (or out of memory) beside the other.
        self._clip_move_lock = threading.Lock()

    @property
    def restored(self) -> bool:
        """Whether :meth:`restore` has run: the served head is the one to serve."""
        return self._restored.is_set()

    # Helpers -------------------------------------------------------------------------

    def _split_version(self) -> ClassifierVersion:
        if not self._restored.is_set():
            raise Unavailable("the server is still restoring its head versions; retry when health reports SERVING")
        version = self._engine.models.active
        version.require_split("NeuroInspect needs a split classifier (features and a linear head)")
        return version

    @staticmethod
    def _class_index(version: ClassifierVersion, target: ClassRef | None, *, field: str = "class") -> int:
        """A class name or index -> index; INVALID_ARGUMENT names ``class_name``/``class_index``."""
        names = version.class_names
        if target is None or target == "":
            raise InvalidArgument("a class is required (class_name or class_index)", field=f"{field}_name")
        if isinstance(target, str):
            wanted = class_name_key(target)
            index = next((position for position, name in enumerate(names) if class_name_key(name) == wanted), None)  # the first, as list.index
            if index is None:
                # A typo among a thousand classes is not found in the first twenty shown.
                close = difflib.get_close_matches(target, names, n=3)
                guess = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
                shown = ", ".join(map(repr, names[:20])) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
                raise InvalidArgument(f"unknown class {target[:100]!r}; {guess}classes are {shown}", field=f"{field}_name")
            return index
        if not 0 <= int(target) < len(names):
            raise InvalidArgument(f"{target} is not a class index in [0, {len(names)})", field=f"{field}_index")
        return int(target)

    # Rank ----------------------------------------------------------------------------

    def rank_mistake_neurons(
        self,
        sample_set_id: str,
        *,
        target_class: ClassRef | None,
        settings: RankSettings = RankSettings(),
        execution: str = "auto",
        call: CallContext | None = None,
        request: RequestKey | None = None,
        caller: str | None = None,
    ) -> neuroinspect_pb2.NeuronRanking | JobSnapshot:
        """Rank the neurons behind ``target_class``'s mistakes in a sample set: the
        ranking itself when small (see ``INLINE_MAX_*``), else the job computing it. AUTO
        never answers inline what might outgrow [server].max_message_bytes: its response
        would be refused after the work, and the operation's result fits (cut if need be).
        An inline ranking lasts as long as the RPC ``call`` it answers waits (None: no RPC):
        its stored samples wait for room to decode only within the call's deadline and while
        its caller stays (DEADLINE_EXCEEDED, CANCELLED), and its features' next batch or its
        solver's next step stops (Cancelled) once ``call.is_active()`` is False: a caller past its deadline, or gone, must not
        leave it running for nobody. ``request``: the job an earlier request of its
        request_id started, if kept; an inline ranking has no effect to repeat and runs
        again. ``caller``: the named caller, owner of the job."""
        if (previous := self._engine.jobs.submitted(request)) is not None:
            return previous
        version = self._split_version()
        class_index = self._class_index(version, target_class)
        class_field = "class_name" if isinstance(target_class, str) else "class_index"
        self._check_rank_settings(settings, version)
        if execution not in EXECUTIONS:
            raise InvalidArgument(f"must be one of {EXECUTIONS}", field="execution")
        info = self._engine.usable_sample_set(sample_set_id)
        count = info.sample_count
        if execution == "operation" or (execution == "auto" and count > INLINE_MAX_SAMPLES):
            return self._submit_ranking(sample_set_id, info, version, class_index, class_field, settings, request, caller)
        if count > INLINE_MAX_SAMPLES:
            raise FailedPrecondition(f"the set has {count} samples (inline limit {INLINE_MAX_SAMPLES}); use execution OPERATION", field="execution")
        # ``uid``: the set checked above, not one made under its id since (as a job reads it);
        # ``count``: the samples counted above, not those appended since (past the inline limit).
        features = self._engine.sample_set_features(sample_set_id, version=version, call=call, uid=info.uid, count=count)
        mistakes, _ = self._mistakes(version, features.features, features.labels, class_index, class_field, sample_set_id)
        too_many = len(mistakes) > INLINE_MAX_MISTAKES
        if too_many and execution == "inline":
            raise FailedPrecondition(f"{len(mistakes)} mistakes exceed the inline limit of {INLINE_MAX_MISTAKES}; use execution OPERATION", field="execution")
        # INLINE is answered even so: the bound is an upper one, and the call refuses what does not fit.
        if too_many or (execution == "auto" and _inline_response_bound(version, sample_set_id, class_index, settings, count, len(mistakes))
                        > self._engine.config.server.max_message_bytes):
            return self._submit_ranking(sample_set_id, info, version, class_index, class_field, settings, request, caller)
        return self._rank(None, sample_set_id, version, class_index, class_field, settings, features=features, call=call)

    def _submit_ranking(self, sample_set_id: str, info: SampleSetInfo, version: ClassifierVersion, class_index: int, class_field: str,
                        settings: RankSettings, request: RequestKey | None, caller: str | None) -> JobSnapshot:
        # ``info``: the set it runs on as checked at the submit, not one made under its id
        # before the job starts, nor samples appended since.
        # Cut to fit a message, a ranking keeps its top neurons and its first mistakes' summaries.
        return self._engine.jobs.submit(RANK_KIND, lambda ctx: self._rank(ctx, sample_set_id, version, class_index, class_field, settings,
                                                                          uid=info.uid, count=info.sample_count),
                                        cut_lists=("mistakes", "neurons"), request=request, owner=caller, less_work="a smaller sample set")

    @staticmethod
    def _check_rank_settings(settings: RankSettings, version: ClassifierVersion) -> None:
        if settings.solver not in SOLVERS:
            raise InvalidArgument(f"must be one of {tuple(SOLVERS)}", field="solver")
        _bounded(settings.l1, "l1", high=MAX_LOSS_WEIGHT)
        _bounded(settings.l2, "l2", high=MAX_LOSS_WEIGHT)
        _bounded(settings.cut_ratio, "cut_ratio", high=1.0)
        if not 1 <= settings.max_iterations <= 100_000:
            raise InvalidArgument(f"{settings.max_iterations} is not in [1, 100000] (0 means 1000)", field="max_iterations")
        if settings.top_k and not 1 <= settings.top_k <= version.feature_dim:
            raise InvalidArgument(f"{settings.top_k} is not in [1, {version.feature_dim}] (0 means 5, or D where D < 5)", field="top_k")
        if not 0 <= settings.stability_resamples <= MAX_STABILITY_RESAMPLES:
            raise InvalidArgument(f"{settings.stability_resamples} is not in [0, {MAX_STABILITY_RESAMPLES}] (0: no stability)",
                                  field="stability_resamples")

    @staticmethod
    def _mistakes(version: ClassifierVersion, features: torch.Tensor, labels: torch.Tensor, class_index: int, class_field: str,
                  sample_set_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The indices of the class's mistakes among ``features`` and the classes they were
        predicted as: those the ranker explains, of the same product of the same rows."""
        labels = labels.to(features.device)
        in_class = (labels == class_index).nonzero().squeeze(1)
        name = version.class_names[class_index]
        if not len(in_class):
            raise InvalidArgument(f"sample set {sample_set_id!r} has no sample of class {name!r}", field=class_field)
        # Only the class's samples are classified: the whole set's logits took 2.4 s and
        # 390 MB for 50,000 samples of a 1000-class head on 2048 features, twice an inline ranking.
        # With the ranker's own function (the head module's product, in slices): another
        # product rounds a sample on the decision boundary to another class at times, and the
        # mistakes counted here (AUTO's bound of the response, the inline limit) must be those it explains.
        with torch.inference_mode():
            predicted = predicted_classes(version.head.weight, version.head.bias, features[in_class])
        # None is an answer, an empty ranking: a pipeline ranking every class daily must
        # not fail on the classes it gets right.
        wrong = predicted != labels[in_class]
        return in_class[wrong], predicted[wrong]

    def _rank(self, context: JobContext | None, sample_set_id: str, version: ClassifierVersion, class_index: int, class_field: str,
              settings: RankSettings, features=None, call: CallContext | None = None,
              uid: str | None = None, count: int | None = None) -> neuroinspect_pb2.NeuronRanking:
        stage = context.stage if context is not None else lambda name: None
        stage("features")
        if features is None:
            features = self._engine.sample_set_features(sample_set_id, version=version, context=context, uid=uid, count=count)
        stage("solve")
        # Each mistake's class as it was counted wrong: predicted again on the mistakes' rows
        # alone, a BLAS's kernel for few rows rounded some on the boundary to their own class.
        _, mistaken_for = self._mistakes(version, features.features, features.labels, class_index, class_field, sample_set_id)

        def check() -> bool:
            """Raise once the job is cancelled or past its run time, or the inline caller stopped waiting."""
            if context is not None:
                context.raise_if_cancelled()
            elif call is not None:
                require_caller(call.is_active, "the set's features are cached: a retry on the same model computes none but those of samples appended since"
                               if features.all_cached else "nothing was stored")
            return False

        # time.monotonic() a chunk of resamples began (the first: at the solver's last step,
        # an overestimate on the safe side), and seconds the slowest chunk so far took.
        chunk_began, slowest_chunk = time.monotonic(), 0.0

        def on_resample_chunk(done: int, total: int) -> bool:
            """Stop the resamples once the job is past its run time, or an inline call's deadline
            is within the margin of its slowest chunk and of its answer, keeping the shares of
            those drawn (the ranking is complete: ω is solved), labelled with how many; a
            cancel, or an inline caller gone, ends the ranking as at a solver step."""
            nonlocal chunk_began, slowest_chunk
            now = time.monotonic()
            chunk_began, slowest_chunk = now, max(slowest_chunk, now - chunk_began)
            if context is not None and not context.cancelled and context.run_time_remaining() == 0:
                return True
            check()
            remaining = call.time_remaining() if call is not None else None
            return remaining is not None and remaining <= _RESAMPLE_DEADLINE_MARGIN * slowest_chunk + _RESAMPLE_ANSWER_SECONDS

        def on_step(step: int, total: int, running: int) -> bool:
            nonlocal chunk_began
            chunk_began = time.monotonic()
            check()
            if context is not None and step % 25 == 0:
                context.report_progress(step, total, f"solving counterfactuals: {counted(running, 'mistake')} still running")
            return False

        try:
            ranking = MistakeNeuronRanker(version.head).rank(
                features.features, features.labels, solver=settings.solver, l1=settings.l1, l2=settings.l2,
                max_iterations=settings.max_iterations, cut_ratio=settings.cut_ratio, top_k=settings.top_k or None,
                target_class=class_index, num_top_classes=RANKED_NEURON_TOP_CLASSES, callback_on_step_end=on_step,
                stability_resamples=settings.stability_resamples, callback_on_resample_chunk_end=on_resample_chunk,
            )
        except ShiftsOverflowed as error:  # a head of huge (finite) weights overflows them with any settings
            raise FailedPrecondition(str(error)) from None
        stage("response")
        if ranking.stability_resamples_requested:  # succeeds, so say it somewhere an operator reads
            stopped_by = (f"job {context.job_id}: the run time limit ([jobs].max_run_seconds)" if context is not None
                          else "an inline ranking: its call's deadline")
            log.warning("%s stopped its stability resamples after %d of %d",
                        stopped_by, ranking.stability_resamples, ranking.stability_resamples_requested)
        names = version.class_names
        mistake_indices = ranking.mistake_indices.cpu()
        predicted = mistaken_for.cpu()
        message = neuroinspect_pb2.NeuronRanking(
            sample_set_id=sample_set_id,
            model_version=version.version,
            class_index=class_index,
            class_name=names[class_index],
            solver=ranking.solver,
            sample_count=ranking.num_samples,
            mistake_count=ranking.num_mistakes,
            converged_count=ranking.num_converged,
            top_k=ranking.top_k,
            stability_resamples=ranking.stability_resamples,
            stability_resamples_requested=ranking.stability_resamples_requested,
            predicted_as={names[c]: n for c, n in sorted(Counter(predicted.tolist()).items())},
        )
        for neuron in ranking.neurons:
            message.neurons.add(
                neuron=neuron.neuron, direction=neuroinspect_pb2.NeuronDirection.Value(f"NEURON_DIRECTION_{neuron.direction.upper()}"),
                insufficient_ratio=neuron.insufficient_ratio, excessive_ratio=neuron.excessive_ratio, mean_omega=neuron.mean_omega, importance=neuron.importance,
                top_classes=list(neuron.top_classes), top_class_names=[names[c] for c in neuron.top_classes], stability=neuron.stability,
            )
        if settings.include_samples:
            omega = ranking.omega.float().cpu()
            # Whole columns to the host at once: reading device tensors row by row synced a GPU four times a mistake.
            rows = zip(mistake_indices.tolist(), predicted.tolist(), ranking.converged.tolist(), ranking.iterations.tolist(),
                       ranking.insufficient_top.tolist(), ranking.excessive_top.tolist(), omega.abs().sum(1).tolist(), strict=True)
            for index, predicted_class, converged, iterations, insufficient, excessive, omega_l1 in rows:
                message.mistakes.add(
                    sample_index=index, predicted_class=predicted_class, converged=converged, iterations=iterations,
                    insufficient_neurons=[n for n in insufficient if n >= 0], excessive_neurons=[n for n in excessive if n >= 0],
                    omega_l1=omega_l1,
                )
            if context is None:
                message.omega.CopyFrom(array_to_tensor(omega.numpy()))
            else:  # (M, D) floats of a large set outgrow one message: an artifact, read in ranges
                buffer = io.BytesIO()
                # Little-endian float32 already on most hosts: astype copied it anyway, 164 MB
                # more for 20,000 mistakes of D = 2048 beside the buffer, whose getvalue()
                # hands over the buffer's own memory (CPython copies only an exported one).
                np.save(buffer, omega.numpy().astype("<f4", copy=False), allow_pickle=False)
                message.omega_artifact = context.save_artifact(OMEGA_ARTIFACT, buffer.getvalue(), "application/x-npy").name
        if context is not None:
            context.report_progress(settings.max_iterations, settings.max_iterations, f"ranked {counted(len(ranking.neurons), 'neuron')} from {counted(ranking.num_mistakes, 'mistake')}")
        return message

    # Visualise -----------------------------------------------------------------------

    def visualize_neurons(
        self,
        pairs: Sequence[tuple[int, ClassRef | None]],
        *,
        method: str = "clip_illusion",
        steps: int = 400,
        gamma: float | None = None,
        epsilon: float | None = None,
        learning_rate: float = 9e-3,
        seed: int = 0,
        preview_every: int = 10,
        classes_per_neuron: int | None = None,
        request: RequestKey | None = None,
        caller: str | None = None,
    ) -> JobSnapshot:
        """Start optimising one image per (neuron, class) pair; a pair with class None
        gives one image per class among the ``classes_per_neuron`` (None: 1) with the
        largest head weights for the neuron. Images and masked images become artifacts.
        ``gamma`` None is 0.5; ``epsilon`` None takes the configured
        ``[clip].illusion_epsilon``. An option the method would ignore is refused, so
        no caller believes it took effect. ``request``: the job an earlier request of its
        request_id started, if kept. ``caller``: the named caller, owner of the job."""
        if (previous := self._engine.jobs.submitted(request)) is not None:
            return previous
        version = self._split_version()
        if not version.differentiable:
            raise FailedPrecondition(f"the {version.loader} classifier runs as a graph without gradients; visualising neurons needs a "
                                     "PyTorch classifier (loader world, torchvision, export or factory)")
        if method not in VISUALIZATION_METHODS:
            raise InvalidArgument(f"must be one of {VISUALIZATION_METHODS}", field="method")
        if method == "feature_visualization" and gamma is not None:
            raise InvalidArgument("feature_visualization has no class term to weigh; gamma is for clip_illusion and no_clip", field="gamma")
        if method != "clip_illusion" and epsilon is not None:
            raise InvalidArgument(f"{method} has no CLIP term; epsilon is for clip_illusion", field="epsilon")
        if not pairs:
            raise InvalidArgument("at least one (neuron, class) pair is required", field="pairs")
        if classes_per_neuron is not None and all(target not in (None, "") for _, target in pairs):
            raise InvalidArgument("every pair names its class; classes_per_neuron is for pairs without one", field="classes_per_neuron")
        gamma = 0.5 if gamma is None else gamma
        epsilon = self._engine.config.clip.default_epsilon() if epsilon is None else epsilon
        classes_per_neuron = 1 if classes_per_neuron is None else classes_per_neuron
        num_classes = len(version.class_names)
        if not 1 <= classes_per_neuron <= num_classes:
            raise InvalidArgument(f"{classes_per_neuron} is not in [1, {num_classes}] (0 means 1)", field="classes_per_neuron")
        images = sum(classes_per_neuron if target is None or target == "" else 1 for _, target in pairs)
        if images > MAX_VISUALIZATION_PAIRS:  # before resolving: a huge request is refused at once
            raise InvalidArgument(f"{images} images exceed the limit of {MAX_VISUALIZATION_PAIRS} per operation", field="pairs")
        resolved: list[tuple[int, int]] = []
        first_asking: dict[tuple[int, int], int] = {}
        for i, (neuron, target) in enumerate(pairs):
            if not 0 <= int(neuron) < version.feature_dim:
                raise InvalidArgument(f"{neuron} is not a neuron index in [0, {version.feature_dim})", field=f"pairs[{i}].neuron")
            if target is None or target == "":
                classes = neuron_top_classes(version.head.weight, int(neuron), classes_per_neuron)
            else:
                classes = [self._class_index(version, target, field=f"pairs[{i}].class")]
            for klass in classes:  # as edit_head refuses a neuron twice
                if problem := repeated_pair_problem(first_asking, i, int(neuron), klass, version.class_names):
                    raise InvalidArgument(problem, field=f"pairs[{i}]")
            resolved += [(int(neuron), klass) for klass in classes]
        clip = self._engine.components.get("clip")
        if method == "clip_illusion" and (clip is None or not clip.loaded):
            raise FailedPrecondition(f"clip_illusion needs CLIP, which is not loaded ({clip.detail if clip else 'not configured'}); use no_clip or feature_visualization", field="method")
        if not 1 <= steps <= MAX_VISUALIZATION_STEPS:
            raise InvalidArgument(f"{steps} is not in [1, {MAX_VISUALIZATION_STEPS}] (0 means 400)", field="steps")
        _bounded(gamma, "gamma", high=MAX_LOSS_WEIGHT)
        _bounded(epsilon, "epsilon", high=MAX_LOSS_WEIGHT)
        _bounded(learning_rate, "learning_rate", low_open=True, high=10.0)
        if preview_every < 1:
            raise InvalidArgument("must be positive (0 means 10)", field="preview_every")
        return self._engine.jobs.submit(
            VISUALIZE_KIND,
            lambda ctx: self._visualize(ctx, version, resolved, method, steps, gamma, epsilon, learning_rate, seed, preview_every),
            # No less_work: fewer pairs help only where the pairs are on the device at once, in the
            # optimisation, whose own error names them; elsewhere (moving CLIP there, scoring the finished
            # images, saving them one by one) a retry waits.
            request=request, owner=caller,
        )

    def _visualize(self, context: JobContext, version: ClassifierVersion, pairs: list[tuple[int, int]], method: str, steps: int,
                   gamma: float, epsilon: float, learning_rate: float, seed: int, preview_every: int) -> neuroinspect_pb2.VisualizeNeuronsResult:
        context.stage("setup")
        clip = self._engine.components.get("clip")
        clip_model, tokenizer = (clip.model[0], clip.model[2]) if clip is not None and clip.loaded else (None, None)
        if clip_model is not None:
            try:
                with context.holding(self._clip_move_lock):  # the move alone: the optimisations that follow run side by side
                    _move_whole(clip_model, self._engine.device)
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
                # CLIP's size alone, whatever the pairs: fewer of them would not help, and the
                # report, told so by no field, stops rather than halving them.
                if not _out_of_memory(error):
                    raise
                log.error("job %s (%s): the device ran out of memory moving CLIP onto it: %s", context.job_id, VISUALIZE_KIND, error)
                raise ResourceExhausted("the model's device ran out of memory moving CLIP onto it, before optimising any image, so fewer "
                                        "pairs would not help; retry later (should it recur, the device has no room for CLIP beside the "
                                        "classifier, which only the server's operator can change)") from None
        illusion = ClipIllusion(
            _Classifier(version), f"features.trunk.{version.feature_layer}", clip_model, tokenizer,
            class_names=version.class_names, head="head", image_size=version.image_size,
        )
        names = version.class_names
        captions = [f"n{n} {names[c]}" for n, c in pairs]
        pair_images = counted(len(pairs), "image")
        optimised = False  # past the last step's callback: what fails then is the finished images' scoring

        def on_step(step: int, total: int, images: torch.Tensor) -> bool:
            nonlocal optimised
            context.raise_if_cancelled()
            preview = None
            if step % preview_every == 0 or step == total:
                context.stage("preview")
                preview = encode_png(image_grid([to_uint8_hwc(image) for image in images.detach().float().cpu()], captions),
                                     compress_level=JOB_IMAGE_COMPRESS_LEVEL)
            context.report_progress(step, total, f"optimising {pair_images}", preview=preview)
            context.stage("optimise")
            optimised = step == total
            return False

        context.stage("optimise")
        try:
            result = illusion.visualize(
                pairs, method=method, steps=steps, gamma=gamma, epsilon=epsilon, learning_rate=learning_rate, seed=seed,
                callback_on_step_end=on_step,
            )
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
            # All the images are optimised in one batch, each keeping its activations through the
            # classifier (and CLIP) for the backward pass: the pairs are what to cut, which the
            # generic "fewer images or a smaller batch" did not say; on a GPU, or on a CPU the
            # host's memory (PyTorch's allocator's RuntimeError), which the report halves alike.
            # The allocator's report is the operator's, at ERROR as any device out of memory is.
            if not _out_of_memory(error):
                raise
            if optimised:
                # Scored together and then (out of memory) one at a time: one
                # image's scoring did not fit, which fewer pairs or another method (CLIP scores
                # every method's images) would not change. No field: the report stops, not halves.
                log.error("job %s (%s): the device ran out of memory scoring the %s optimised: %s", context.job_id, VISUALIZE_KIND, pair_images, error)
                scorers = "the classifier's" if clip_model is None else "CLIP's and the classifier's"
                alone = "" if len(pairs) == 1 else ", together and then one at a time,"
                raise ResourceExhausted(f"the model's device ran out of memory scoring {pair_images}{alone} once optimised ({scorers} passes "
                                        "over the finished images, to mask and score them), so fewer pairs would not help; retry "
                                        "later (should it recur, the device has no room to score one image beside its other work, "
                                        "which only the server's operator can change)") from None
            log.error("job %s (%s): the device ran out of memory optimising %s at once: %s", context.job_id, VISUALIZE_KIND, pair_images, error)
            if len(pairs) == 1:  # no fewer to ask for: naming pairs would send the report (or a caller) to halve one
                # Still no field: no_clip is another method (another image), not less of this
                # request, so the report stops with these words rather than switching methods.
                room = (" beside CLIP's activations for its backward pass: method no_clip, the paper's ablation without CLIP's term, "
                        "keeps none of them and may fit, though it optimises a different image, which CLIP only scores; else only the "
                        "server's operator can make room" if method == "clip_illusion" else
                        ", which only the server's operator can change")
                raise ResourceExhausted("the model's device ran out of memory optimising 1 image, the fewest a request can ask for; retry "
                                        f"later (should it recur, the device has no room to optimise one image of this classifier{room})"
                                        ) from None
            raise ResourceExhausted(f"the model's device ran out of memory optimising {pair_images} at once; retry with fewer pairs "
                                    "(or a smaller classes_per_neuron) per request, or later", field="pairs") from None
        context.stage("images")
        saving = f"saving {pair_images} and {'its masked version' if len(pairs) == 1 else 'their masked versions'}"
        # In double, as the SDK's flipped() judges the result's (double) cosines: in float32
        # a cosine within its rounding of −ε summed to 0 here and not there.
        if method == "clip_illusion" and (reversed_pairs := int((result.clip_similarity.double() + epsilon <= 0).sum())):
            # The loss −(cos + ε)·(α_n + γ l_c) rewarded a lower activation there: the image is
            # meaningless, so the caller is told in the job's progress and the log, once per job.
            advice = (f"{reversed_pairs} of {counted(len(pairs), 'pair')} ended with clip_similarity + epsilon {epsilon:g} ≤ 0, where the loss "
                      f"rewarded a lower activation; raise epsilon in the request or [clip].illusion_epsilon")
            log.warning("job %s (%s): %s", context.job_id, VISUALIZE_KIND, advice)
            saving = f"{saving}; {advice}"
        context.report_progress(result.steps, steps, saving)
        message = neuroinspect_pb2.VisualizeNeuronsResult(
            model_version=version.version, method=method, steps=result.steps, learning_rate=learning_rate, seed=seed,
            gamma=None if method == "feature_visualization" else gamma, epsilon=epsilon if method == "clip_illusion" else None,
        )
        for i, (neuron, klass) in enumerate(pairs):
            stem = f"{i:02d}_neuron{neuron}_{names[klass]}"
            context.save_image(f"{stem}.png", to_uint8_hwc(result.images[i].float().cpu()))
            context.save_image(f"{stem}_masked.png", to_uint8_hwc(result.masked_images[i].float().cpu()))
            message.visualizations.add(
                neuron=neuron, class_index=klass, class_name=names[klass], image_artifact=f"{stem}.png",
                masked_image_artifact=f"{stem}_masked.png", activation=float(result.activations[i]), logit=float(result.logits[i]),
                clip_similarity=float(result.clip_similarity[i]), core_relevance=float(result.core_relevance[i]),
                mask_fraction=float(result.masks[i].float().mean()),
            )
        return message

    # Edit ----------------------------------------------------------------------------

    def edit_head(
        self,
        sample_set_id: str,
        *,
        target_class: ClassRef | None,
        neurons: Sequence[int],
        method: str = "probability_ratio",
        validation_sample_set_id: str = "",
        evaluation_sample_set_id: str = "",
        group_attribute: str = "",
        strength: float | None = None,
        target_ratio: float | str | None = None,
        learning_rate: float = 1e-3,
        max_epochs: int = 20,
        patience: int = 5,
        seed: int = 0,
        promote: bool = False,
        description: str = "",
        request: RequestKey | None = None,
        caller: str | None = None,
    ) -> JobSnapshot:
        """Start retraining the served head; the job stores a new head version (and
        serves it when ``promote``: PermissionDenied unless ``caller`` may change the
        served head). ``caller``, the named caller, owns the job and the version. ``target_ratio`` may be ``"auto"``; None is 1 for
        probability_ratio, and the only value constrain takes (it has no target ratio).
        ``request``: the job an earlier request of its request_id started, if kept (its
        version is stored once)."""
        if (previous := self._engine.jobs.submitted(request)) is not None:
            return previous
        if promote:
            self._engine.ownership.require_head_changer(caller, "promote the edited head", field="promote")
        version = self._split_version()
        class_index = self._class_index(version, target_class)
        if not neurons:
            raise InvalidArgument("at least one neuron is required", field="neurons")
        seen: set[int] = set()
        for i, neuron in enumerate(neurons):
            if not 0 <= int(neuron) < version.feature_dim:
                raise InvalidArgument(f"{neuron} is not a neuron index in [0, {version.feature_dim})", field=f"neurons[{i}]")
            if neuron in seen:
                raise InvalidArgument(f"neuron {neuron} is listed twice", field=f"neurons[{i}]")
            seen.add(neuron)
        if method not in EDIT_METHODS:
            raise InvalidArgument(f"must be one of {EDIT_METHODS}", field="method")
        check_text_length(description, MAX_DESCRIPTION_CHARS, "description")
        training = self._engine.usable_sample_set(sample_set_id)
        train_count = training.sample_count
        class_field = "class_name" if isinstance(target_class, str) else "class_index"
        if not validation_sample_set_id and train_count < 5:
            raise InvalidArgument("needs at least 5 samples to hold out a validation split, or a validation_sample_set_id", field="sample_set_id")
        stored_labels = [r.label for r in self._engine.store.list_samples(sample_set_id, limit=train_count)]
        training_labels = stored_labels if validation_sample_set_id else [label for i, label in enumerate(stored_labels) if i % 5]  # as run() splits
        _require_training_samples(training_labels, class_index, version, sample_set_id, class_field)
        # The sets run() reads, by id: these, not sets made under their ids before it runs,
        # and their samples now, not those appended before it runs.
        submitted = {sample_set_id: training}
        for value, field in ((validation_sample_set_id, "validation_sample_set_id"), (evaluation_sample_set_id, "evaluation_sample_set_id")):
            if value:
                submitted[value] = self._engine.usable_sample_set(value, field)
        eval_id = evaluation_sample_set_id or validation_sample_set_id
        if group_attribute:  # checked on the evaluated samples as run() takes them: the evaluation set, else the held-out fifth
            stored = self._engine.store.list_samples(eval_id or sample_set_id, limit=submitted[eval_id or sample_set_id].sample_count)
            records, evaluated = (stored, repr(eval_id)) if eval_id else (stored[::5], f"the held-out fifth of {sample_set_id!r}")
            if not any(group_attribute in r.attributes for r in records):
                raise InvalidArgument(f"no sample of {evaluated} has attribute {group_attribute!r}", field="group_attribute")
            if (count := len({(r.label, r.attributes.get(group_attribute, "")) for r in records})) > MAX_EDIT_GROUPS:
                raise InvalidArgument(f"{evaluated} has {count} groups (class, {group_attribute} value), more than the {MAX_EDIT_GROUPS} "
                                      f"an edit evaluates; choose an attribute with fewer values", field="group_attribute")
        if strength is not None:
            _bounded(strength, "strength", high=MAX_LOSS_WEIGHT)
        if method == "constrain" and target_ratio is not None:  # refused, not silently ignored
            raise InvalidArgument("applies to the probability_ratio method only; constrain has no target ratio",
                                  field="auto_target_ratio" if target_ratio == "auto" else "target_ratio")
        if target_ratio not in (None, "auto"):
            target_ratio = _bounded(target_ratio, "target_ratio", low_open=True, high=MAX_TARGET_RATIO)
        _bounded(learning_rate, "learning_rate", low_open=True, high=10.0)
        if not 1 <= max_epochs <= 1000:
            raise InvalidArgument(f"{max_epochs} is not in [1, 1000] (0 means 20)", field="max_epochs")
        if not 1 <= patience <= 1000:
            raise InvalidArgument(f"{patience} is not in [1, 1000] (0 means 5)", field="patience")
        # After the request's checks (a wrong option at the limit is named, not hidden behind the limit), before any
        # training; the store asks again as it stores the version, so edits racing past this store one at most.
        self._engine.store.require_room_for_head_version(version.feature_version, caller)

        def run(context: JobContext) -> neuroinspect_pb2.EditHeadResult:
            context.stage("features")
            train = self._engine.sample_set_features(sample_set_id, version=version, context=context, uid=training.uid, count=train_count)
            features, labels, train_records = train.features, train.labels, train.records
            # Held by ``train`` to the end, the whole set's features stayed beside the two parts
            # a held-out fifth splits them into: 820 MB more for 100,000 samples of D = 2048.
            del train
            if validation_sample_set_id:
                validation = self._engine.sample_set_features(validation_sample_set_id, version=version, context=context,
                                                              field="validation_sample_set_id", uid=submitted[validation_sample_set_id].uid,
                                                              count=submitted[validation_sample_set_id].sample_count)
                val_features, val_labels = validation.features, validation.labels
            else:  # every 5th sample held out
                held = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
                held[::5] = True
                val_features, val_labels = features[held.to(features.device)], labels[held]
                features, labels = features[~held.to(features.device)], labels[~held]
            eval_features, eval_labels, evaluated = val_features, val_labels, train_records[::5]
            if eval_id:
                evaluation = self._engine.sample_set_features(eval_id, version=version, context=context, uid=submitted[eval_id].uid,
                                                              count=submitted[eval_id].sample_count,
                                                              field="evaluation_sample_set_id" if evaluation_sample_set_id else "validation_sample_set_id")
                eval_features, eval_labels, evaluated = evaluation.features, evaluation.labels, evaluation.records
            # The groups of the very samples evaluated: the set may have grown since they were read.
            groups = np.array([f"{version.class_names[r.label]}/{r.attributes.get(group_attribute, '')}" for r in evaluated]) if group_attribute else None

            epochs_run = 0

            def on_epoch(epoch: int, total: int, record) -> bool:
                nonlocal epochs_run
                context.raise_if_cancelled()
                epochs_run = epoch
                context.report_progress(epoch, total, f"epoch {epoch}: validation accuracy {record.validation_accuracy:.3f}")
                return False

            def on_training_end() -> None:
                # Stopped early, the epochs run are all there were: a succeeded edit said "9/20".
                context.report_progress(epochs_run, epochs_run, f"trained {epochs_run} epoch{'s' * (epochs_run != 1)}; evaluating the edited head")
                context.stage("evaluation")

            context.stage("training")
            try:
                edit = HeadEditor(version.head).edit(
                    features, labels, target_class=class_index, neurons=list(neurons), validation_features=val_features,
                    validation_labels=val_labels, method=method, strength=strength, target_ratio=target_ratio,
                    learning_rate=learning_rate, max_epochs=max_epochs, patience=patience, seed=seed,
                    evaluation_features=eval_features, evaluation_labels=eval_labels, evaluation_groups=groups,
                    callback_on_epoch_end=on_epoch, callback_on_training_end=on_training_end,
                )
            except TrainingDiverged as error:
                raise FailedPrecondition(f"{error}; nothing was stored") from None
            context.stage("storing")
            counts = Counter(eval_labels.tolist())
            details = {
                "method": method,
                "class_name": version.class_names[class_index],
                "neurons": sorted({int(n) for n in neurons}),
                "description": description,
                EDIT_JOB_ID: context.job_id,  # the version stands only if this job succeeds (see restore)
                "parent_evaluation": self._evaluation_dict(edit.before, version, counts),
                "evaluation": self._evaluation_dict(edit.after, version, counts),
            }
            stored_only_if = "nothing was stored" + ("; a group_attribute with fewer values gives a smaller result" if group_attribute else "")

            def require_result_fits(record: HeadVersionRecord) -> None:  # else the job would fail with its version stored
                self._engine.jobs.require_result_fits(self._edit_result(record, edit, active_id=record.version_id), consequence=stored_only_if)

            record = self._add_head_version(version, edit.as_linear(), parent.version_id, details, check=require_result_fits,
                                            owner=caller, serve=promote)
            return self._edit_result(record, edit)

        with self._versions_lock:  # no promote or delete between reading the served head, its version and noting the edit
            version = self._split_version()  # what run() trains from: the head served now, not when the checks began
            parent = self.active_head_version()
            self._forget_finished_edits()
            # A repeat racing the first past the checks above: only edits pass this lock.
            if (previous := self._engine.jobs.submitted(request)) is not None:
                return previous
            snapshot = self._engine.jobs.submit(EDIT_KIND, run, request=request, owner=caller, less_work="smaller sample sets")
            self._edits_from[snapshot.record.job_id] = (version.feature_version, parent.version_id)
        return snapshot

    def _edit_result(self, record: HeadVersionRecord, edit: HeadEdit, active_id: str | None = None) -> neuroinspect_pb2.EditHeadResult:
        return neuroinspect_pb2.EditHeadResult(
            version=self.head_version_message(record, active_id), best_epoch=edit.best_epoch, epochs_run=len(edit.history),
            validation_accuracy=[r.validation_accuracy for r in edit.history],
            target_ratio=None if math.isnan(edit.target_ratio) else edit.target_ratio,
        )

    @staticmethod
    def _evaluation_dict(evaluation: HeadEvaluation, version: ClassifierVersion, counts: Counter) -> dict:
        return {
            "accuracy": evaluation.accuracy,
            "per_class": [[version.class_names[c], counts.get(c, 0), a] for c, a in sorted(evaluation.class_accuracy.items())],
            "group_accuracy": dict(sorted(evaluation.group_accuracy.items())),
        }

    @staticmethod
    def _evaluation_message(values: dict) -> neuroinspect_pb2.HeadEvaluation:
        message = neuroinspect_pb2.HeadEvaluation(accuracy=values["accuracy"], group_accuracy=values["group_accuracy"])
        for name, count, accuracy in values["per_class"]:
            message.per_class.add(class_name=name, count=count, accuracy=accuracy)
        if values["per_class"]:
            name, _, accuracy = min(values["per_class"], key=lambda row: row[2])
            message.worst_class_name, message.worst_class_accuracy = name, accuracy
        if values["group_accuracy"]:
            group = min(values["group_accuracy"], key=values["group_accuracy"].__getitem__)
            message.worst_group, message.worst_group_accuracy = group, values["group_accuracy"][group]
        return message

    # Head versions -------------------------------------------------------------------

    def _add_head_version(self, version: ClassifierVersion, head: nn.Linear, parent_id: str, details: dict,
                          check: Callable[[HeadVersionRecord], None] | None = None, owner: str | None = None,
                          serve: bool = False) -> HeadVersionRecord:
        """Store ``head`` as a new version of ``owner``, and serve it when ``serve``; ``check``
        may refuse the record (by raising) before it is stored. Served, the record names the
        version it replaced (read in the same hold of the lock as the promote), which a
        restart serves again if the edit then did not succeed."""
        store = self._engine.store
        with store.writing_blobs() as put, self._versions_lock:
            if serve:
                details = {**details, _SERVED_BEFORE: self.active_head_version().version_id}
            digest = put(_head_bytes(head))
            # Deleted ids count too: an id never names two different heads.
            number = store.next_head_version_number(version.feature_version)
            record = HeadVersionRecord(
                feature_version=version.feature_version, version_id=f"v{number}", head_hash=version.with_head(head).head_version,
                weights_digest=digest, parent_version_id=parent_id, create_time=store.now(), details=details, owner=owner,
            )
            if check is not None:
                check(record)
            store.insert_head_version(record)
            if serve:
                try:
                    self._activate(record)
                except BaseException:  # the job fails, so its version goes too
                    store.delete_head_version(version.feature_version, record.version_id)
                    raise
        return record

    def restore(self) -> None:
        """At start-up: register the loaded head (as ``v0`` the first time) and serve the
        stored active head version of this feature extractor, if it is another one.

        If the model file's head differs from the one it held at the last start, the
        operator deployed another model file (same h_b, new or earlier head): its head is
        served, and the version active until now stays stored for a promote. Versions
        whose EditHead job did not succeed are deleted first. NeuroInspect calls wait
        (UNAVAILABLE) until this has run."""
        try:
            self._restore()
        finally:
            self._restored.set()

    def _restore(self) -> None:
        version = self._engine.models.active
        if not version.supports_features:
            return
        store = self._engine.store
        self._drop_versions_of_failed_edits(version.feature_version)
        loaded = store.first_head_version_of_hash(version.feature_version, version.head_version)
        newly_seen = loaded is None
        if loaded is None:
            loaded = self._add_head_version(version, version.head, "", {"method": LOADED, "description": f"loaded from {version.source}"})
        self._file_head = (version.feature_version, loaded.version_id), version.head
        previous_file_head = store.file_head_version(version.feature_version)
        # Written only when it changed, as the active version below: a data dir full with no
        # reserve left to release refuses every write, and a start that writes would not
        # serve even Predict, nor the deletes that free space once there is room for them.
        if previous_file_head != loaded.version_id:
            store.set_file_head_version(version.feature_version, loaded.version_id)
        # Stores from before file heads were recorded know only whether the head is new.
        file_changed = newly_seen if previous_file_head is None else previous_file_head != loaded.version_id
        active_id = store.active_head_version(version.feature_version)
        if active_id is not None and active_id != loaded.version_id and file_changed:
            log.warning("the head in %s (%s) is not the one it held at the last start: serving it instead of head version %s, "
                        "which `promote` serves again", version.source, loaded.version_id, active_id)
            active_id = None
        if active_id is None:
            store.set_active_head_version(version.feature_version, loaded.version_id)
        elif active_id != loaded.version_id:
            try:
                self._activate(store.get_head_version(version.feature_version, active_id))
            except (FailedPrecondition, NotFound, DataLoss) as error:  # a NaN head promoted before promotions were checked; a lost or corrupt file
                # The operator's to hear of: predictions change, and only a promote brings the version back.
                log.error("%s; serving the loaded head %s instead (once it is mended, promote %s to serve it again)",
                          error, loaded.version_id, active_id)
                store.set_active_head_version(version.feature_version, loaded.version_id)

    def _drop_versions_of_failed_edits(self, feature_version: str) -> None:
        """Delete the versions whose EditHead job did not succeed: a crash after the version
        was stored but before the job's success was leaves the job FAILED ("submit it
        again") beside a version, possibly promoted, that a resubmission would duplicate.
        A promoted one gives way to the version it replaced, if still stored (else to its
        parent): newest first, so a chain of such edits unwinds to what was served before
        the first, not to a parent older than a promote made while an edit trained."""
        store = self._engine.store
        for version_id, job_id in reversed(store.head_versions_of_failed_edits(feature_version)):
            log.warning("deleting head version %s: the edit that stored it (operations/%s) did not succeed", version_id, job_id)
            replaced = store.get_head_version(feature_version, version_id).details.get(_SERVED_BEFORE)
            if replaced and store.active_head_version(feature_version) == version_id and self._is_stored(feature_version, replaced):
                store.set_active_head_version(feature_version, replaced)
            store.delete_head_version(feature_version, version_id)

    def _is_stored(self, feature_version: str, version_id: str) -> bool:
        """Whether head version ``version_id`` of ``feature_version`` is stored (not deleted)."""
        try:
            self._engine.store.get_head_version(feature_version, version_id)
        except NotFound:
            return False
        return True

    def _head(self, record: HeadVersionRecord) -> nn.Linear:
        """The head of ``record`` on the device: the model file's as loaded, any other read
        from the store when it is to be served. Only those two stay on the device (caching
        every version's kept 8 MB of GPU memory per edit of a 1000-class, D = 2048 head)."""
        if self._file_head is not None and self._file_head[0] == (record.feature_version, record.version_id):
            return self._file_head[1]
        try:
            head = _head_from_bytes(self._engine.store.get_blob(record.weights_digest))
        except (DataLoss, SafetensorError, KeyError, RuntimeError) as error:  # damaged or lost; not safetensors; no weight or bias; shapes that disagree
            raise DataLoss(f"the stored weights of head version {record.version_id!r} cannot be read ({type(error).__name__}: "
                           f"{error}); roll back or delete it", field="version_id") from None
        return head.to(self._engine.device).eval()

    def _activate(self, record: HeadVersionRecord) -> None:
        """Serve ``record``'s head: the new version object is complete before the one swap.
        A head with NaN or infinite weights (stored before edits were checked) would make
        every Predict NaN, so it is refused. The store learns of it first, so a failed write
        never leaves Predict serving a head the store does not call active."""
        head = self._head(record)
        if not _is_finite(head):
            raise FailedPrecondition(f"head version {record.version_id!r} has NaN or infinite weights; it cannot be served", field="version_id")
        store = self._engine.store
        previous = store.active_head_version(record.feature_version)
        changed = previous != record.version_id  # a restart's, unchanged, writes nothing: see _restore
        if changed:
            store.set_active_head_version(record.feature_version, record.version_id)
        try:
            self._engine.activate(self._engine.models.active.with_head(head))
        except BaseException:
            if changed and previous is not None:
                store.set_active_head_version(record.feature_version, previous)
            raise
        log.info("serving head version %s of classifier %s (%s)", record.version_id, self._engine.models.active.name,
                 "unchanged" if previous == record.version_id else f"was {previous or 'none'}")

    def head_versions(self, *, after: tuple[float, str] | None = None, limit: int | None = None) -> tuple[list[HeadVersionRecord], str]:
        """The versions, oldest first (``limit`` of them after ``after`` = (create_time,
        version_id)), and the active id, read together: an edit storing and promoting a
        version in between would give an active id the list does not hold."""
        version = self._split_version()
        with self._versions_lock:
            return self._engine.store.list_head_versions(version.feature_version, after=after, limit=limit), self.active_head_version().version_id

    def head_version(self, version_id: str) -> tuple[HeadVersionRecord, str]:
        """A stored version and the active id at the same moment, read under the lock
        that promote, rollback and delete take (as :meth:`head_versions`). INVALID_ARGUMENT
        for a malformed id, NOT_FOUND for an unknown one, each naming version_id."""
        _check_version_id(version_id)
        version = self._split_version()
        with self._versions_lock:
            return self._engine.store.get_head_version(version.feature_version, version_id), self.active_head_version().version_id

    def active_head_version(self) -> HeadVersionRecord:
        version = self._split_version()
        store = self._engine.store
        active_id = store.active_head_version(version.feature_version)
        if active_id is None:
            raise FailedPrecondition("head versions are not initialised yet; retry when health reports SERVING")
        return store.get_head_version(version.feature_version, active_id)

    def promote_head_version(self, version_id: str, *, caller: str | None = None) -> tuple[HeadVersionRecord, str]:
        """Serve ``version_id``; returns it and the previously active id. PermissionDenied
        unless ``caller`` may change the served head."""
        _check_version_id(version_id)
        self._engine.ownership.require_head_changer(caller, f"promote head version {version_id!r}")
        version = self._split_version()
        with self._versions_lock:
            record = self._engine.store.get_head_version(version.feature_version, version_id)
            previous = self.active_head_version().version_id
            self._activate(record)
        return record, previous

    def rollback_head_version(self, version_id: str = "", *, caller: str | None = None) -> tuple[HeadVersionRecord, str]:
        """Serve the active version's parent (or ``version_id``); returns it and the previous
        id. PermissionDenied unless ``caller`` may change the served head."""
        if version_id:
            _check_version_id(version_id)
        self._engine.ownership.require_head_changer(caller, "roll back the served head")
        version = self._split_version()
        with self._versions_lock:
            active = self.active_head_version()
            target = version_id or active.parent_version_id
            if not target:
                raise FailedPrecondition(f"head version {active.version_id!r} is the loaded head; there is nothing to roll back to", field="version_id")
            record = self._engine.store.get_head_version(version.feature_version, target)
            self._activate(record)
        return record, active.version_id

    def delete_head_version(self, version_id: str, *, caller: str | None = None) -> None:
        """Delete a stored version that is not served, not the model file's head (stored
        again at every start), not a loaded head with edits of it, and not one an
        unfinished edit started from or is storing; its children take its parent as
        theirs, and its weights go in a sweep. PermissionDenied when it is not
        ``caller``'s to change (a loaded head: when ``caller`` may not change the served head)."""
        _check_version_id(version_id)
        version = self._split_version()
        store = self._engine.store
        with self._versions_lock:
            record = store.get_head_version(version.feature_version, version_id)  # NotFound naming it
            self._engine.ownership.require_owner(caller, record.owner, f"head version {version_id!r}", field="version_id")
            if record.owner is None and record.details.get("method") == LOADED:  # the server's, not a caller's: a head admins may serve again
                self._engine.ownership.require_head_changer(caller, f"delete head version {version_id!r}, a head loaded from a model file",
                                                                 field="version_id")
            if version_id == self.active_head_version().version_id:
                raise FailedPrecondition(f"head version {version_id!r} is served; promote or roll back to another first", field="version_id")
            if version_id == store.file_head_version(version.feature_version):
                raise FailedPrecondition(f"head version {version_id!r} is the model file's head, stored again at every start", field="version_id")
            # A loaded head's children would look loaded themselves (read only then: by the parent index).
            if record.details.get("method") == LOADED and (children := store.head_version_children(version.feature_version, version_id)):
                raise FailedPrecondition(f"head version {version_id!r} is a loaded head that {', '.join(children)} were edited from; "
                                         f"delete those first", field="version_id")
            storing_job = record.details.get(EDIT_JOB_ID)
            if storing_job and not self._job_done(storing_job):  # it may still promote (or, failing, delete) it
                raise FailedPrecondition(f"operations/{storing_job}, which stored head version {version_id!r}, has not ended", field="version_id")
            self._forget_finished_edits()
            editing = [job_id for job_id, parent in self._edits_from.items() if parent == (version.feature_version, version_id)]
            if editing:
                raise FailedPrecondition(f"operations/{editing[0]} is editing from head version {version_id!r}; "
                                         f"delete it once that operation has ended", field="version_id")
            store.delete_head_version(version.feature_version, version_id)

    def _forget_finished_edits(self) -> None:
        for job_id in [job_id for job_id in self._edits_from if self._job_done(job_id)]:
            del self._edits_from[job_id]

    def _job_done(self, job_id: str) -> bool:
        try:
            return self._engine.jobs.get(job_id).done
        except NotFound:  # deleted, so it had ended
            return True

    def head_version_message(self, record: HeadVersionRecord, active_id: str | None = None) -> neuroinspect_pb2.HeadVersion:
        if active_id is None:
            active_id = self._engine.store.active_head_version(record.feature_version)
        details = record.details
        message = neuroinspect_pb2.HeadVersion(
            version_id=record.version_id,
            model_version=model_version(record.feature_version, record.head_hash),
            parent_version_id=record.parent_version_id,
            method=details.get("method", ""),
            class_name=details.get("class_name", ""),
            neurons=details.get("neurons", []),
            description=details.get("description", ""),
            create_time=timestamp(record.create_time),
            active=record.version_id == active_id,
            owner=record.owner or "",
        )
        for key in ("parent_evaluation", "evaluation"):
            if key in details:
                getattr(message, key).CopyFrom(self._evaluation_message(details[key]))
        return message
