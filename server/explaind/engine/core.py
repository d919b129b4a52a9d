"""The engine: models, batching, sample sets, the feature cache and jobs, without gRPC.

Explanation engines receive an :class:`Engine` and use ``engine.models.active``
(the current :class:`ClassifierVersion`: ``features``, ``logits``, ``feature_maps``),
``engine.sample_set_features(...)`` (cached penultimate features of a sample set),
``engine.components`` (CLIP, diffusion) and ``engine.jobs.submit(...)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..decode_memory import CallContext, DecodeMemory, trim_arenas
from ..errors import AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, PreconditionViolation
from ..imaging import DecodeOutOfMemory, PixelBudget, decode_encoded, encode_png, image_grid, stacked_batch, to_uint8_hwc
from ..jobs import JobContext, JobManager, JobSnapshot
from ..methods.neuroinspect._ranking import top_ids
from ..metrics import Metrics
from ..ownership import Ownership, OwnerCheck
from ..store import RequestKey, SampleRecord, SampleSetInfo, Store, require_sample_set_uid, sample_set_id_taken
from ..tracing import NO_TRACING, Tracing
from ..wording import counted
from .backends import FeatureFn, build_feature_fn, check_device, warm_up_batch_sizes
from .batcher import DynamicBatcher
from .models import ClassifierVersion, ComponentStatus, load_classifier, load_clip, load_diffusion
from .registry import ModelRegistry

log = logging.getLogger(__name__)

SAMPLE_SET_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # used with fullmatch: "$" would accept a final "\n"
# Free text the server stores and lists back: unbounded, a few large ones made every
# page of their list exceed the send limit.
MAX_DISPLAY_NAME_CHARS = 256
MAX_DESCRIPTION_CHARS = 4096
# A sample's attributes: metadata such as background=water or a source URL, bounded so
# that no one sample's record grows without limit (it is read back with every page).
MAX_ATTRIBUTES_PER_SAMPLE = 64
MAX_ATTRIBUTE_NAME_CHARS = 128
MAX_ATTRIBUTE_VALUE_CHARS = 1024
DEFAULT_TOP_K = 5
# Threads decoding stored samples for feature computation (PIL and torch release the GIL),
# at most one per CPU this process may run on (a container's cpuset, taskset).
_DECODE_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
# Images of an upload written at once: each is a durable write (file and directory
# synced, milliseconds, far more on a network volume), and concurrent syncs share the
# file system's journal commits (bench/upload.py). The caller is asked between rounds.
BLOB_WRITE_THREADS = 8
# Cached feature vectors read from the store at a time, each copied into the set's one
# (N, D) array: all of them read at once, then stacked, were twice a set's features
# (+291 MB for 20,000 samples of D = 2048, where 4096 at a time take +191 MB).
FEATURE_READ_ROWS = 4096
EVALUATE_KIND = "evaluate_sample_set"  # the job kind of EvaluateSampleSet
EVALUATE_STAGES = ("inference", "images")  # the stages its jobs time (JobContext.stage)


def check_sample_set_id(sample_set_id: str, field: str = "sample_set_id") -> None:
    """A malformed id is the caller's mistake (INVALID_ARGUMENT), not an unknown set."""
    if not SAMPLE_SET_ID.fullmatch(sample_set_id):
        raise InvalidArgument(f"{sample_set_id!r} is not a valid id; use 1-63 of a-z 0-9 _ - starting with a letter or digit", field=field)


def check_text_length(text: str, limit: int, field: str) -> None:
    if len(text) > limit:
        raise InvalidArgument(f"{len(text)} characters, more than the {limit} allowed", field=field)


# C0 and C1 control characters (Unicode category Cc): a name one caller stores, that the
# CLI prints as it is for every caller, must not carry terminal escapes (ESC [2J clears
# the screen, OSC 52 writes the clipboard), line breaks that forge list rows, or NULs.
# Nor the bidirectional embeddings, overrides and isolates (U+202A-202E, U+2066-2069,
# "Trojan Source"): U+202E shows the rest of a listing row, the owner included, reversed.
# Right-to-left letters and the LRM/RLM marks (U+200E, U+200F) open no embedding or
# override that carries on past the name, and stay allowed. Nor the line and paragraph
# separators (U+2028, U+2029), which str.splitlines and many editors take as line breaks.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def check_display_name(text: str) -> None:
    """A one-line label for people: at most MAX_DISPLAY_NAME_CHARS, no control,
    bidirectional-control or line-separator characters."""
    check_text_length(text, MAX_DISPLAY_NAME_CHARS, "display_name")
    if (control := _CONTROL_CHARACTER.search(text)) is not None:
        character = control.group()
        kind = {"Cc": "control", "Zl": "line-separator", "Zp": "paragraph-separator"}.get(unicodedata.category(character), "bidirectional-control")
        raise InvalidArgument(f"holds the {kind} character {character!r} (U+{ord(character):04X}) at {control.start()}; use printable text",
                              field="display_name")


def check_new_sample_set(sample_set_id: str, display_name: str) -> None:
    """The checks of a set to create that read neither its images nor the store, its id
    first ("": the server picks one)."""
    if sample_set_id:
        check_sample_set_id(sample_set_id)
    check_display_name(display_name)


def require_caller(caller_waits: Callable[[], bool], kept: str = "") -> None:
    """Raise Cancelled once ``caller_waits()`` is False: work a caller no longer waits for
    (its deadline passed, or it left) stops; ``kept``, ending the message, says what it
    leaves stored ("nothing was stored": nothing the caller was told failed turns up)."""
    if not caller_waits():
        raise Cancelled("the caller stopped waiting (its deadline passed, or it left)" + (f"; {kept}" if kept else ""))


class _JobDecodeWait:
    """A job as the context of its stored images' waits for room in [server].max_decode_bytes
    (a :class:`~explaind.decode_memory.CallContext`): its deadline is its run-time limit
    ([jobs].max_run_seconds; none without one); active until the job is cancelled. With no
    job (the engine used in-process, with no call waiting on it), it waits until there is room."""

    def __init__(self, job: JobContext | None) -> None:
        self._job = job

    def time_remaining(self) -> float | None:
        return None if self._job is None else self._job.run_time_remaining()

    def is_active(self) -> bool:
        return self._job is None or not self._job.cancelled


def _check_attributes(attributes: dict[str, str], field: str) -> None:
    if len(attributes) > MAX_ATTRIBUTES_PER_SAMPLE:
        raise InvalidArgument(f"{len(attributes)} attributes, more than the {MAX_ATTRIBUTES_PER_SAMPLE} allowed", field=field)
    for name, value in attributes.items():
        if not name:  # no group_attribute can name it
            raise InvalidArgument("an attribute without a name", field=field)
        if len(name) > MAX_ATTRIBUTE_NAME_CHARS:
            raise InvalidArgument(f"an attribute name of {len(name)} characters, more than the {MAX_ATTRIBUTE_NAME_CHARS} allowed", field=field)
        # The key as a JSON string: one quoting whatever it holds, so a path parser can split it.
        check_text_length(value, MAX_ATTRIBUTE_VALUE_CHARS, f"{field}[{json.dumps(name)}]")


@dataclass(frozen=True)
class PredictOptions:
    """What one Predict request needs of its batch's output: its ``top_k`` classes (already
    resolved: 1..C), whether its features, and whether images with unusable logits are
    answered apart (``partial_failure``) rather than failing the request."""

    top_k: int
    return_features: bool
    partial_failure: bool = False


@dataclass(frozen=True)
class _BatchForward:
    """A batch's forward pass: logits (N, C) and features (N, D) or None, on the model's device."""

    version: ClassifierVersion
    logits: torch.Tensor
    features: torch.Tensor | None


@dataclass(frozen=True)
class BatchOutput:
    """One request's slice of a batch, ranked in the batcher's thread: its top-k class
    indices (n, k) int64, highest logit first, their probabilities (n, k) float32, and its
    features (n, D) float32 or None. NumPy: the Predict threads then run no torch op,
    each of which would release the GIL and wait to retake it behind the forward pass
    and the other callers (ranking there, 32 clients got 11-18 % fewer answers a second).
    ``unusable_rows``: of a partial_failure request, the rows whose logits are unusable
    (_UNUSABLE_ROWS), ascending; their classes and probabilities mean nothing."""

    version: ClassifierVersion
    class_indices: np.ndarray
    probabilities: np.ndarray
    features: np.ndarray | None
    unusable_rows: tuple[int, ...] = ()


@dataclass(frozen=True)
class PredictOutput:
    """Top-k per image: ``class_indices`` / ``probabilities`` (N, k), highest first;
    ``unusable_rows`` as :class:`BatchOutput`'s."""

    class_indices: np.ndarray
    probabilities: np.ndarray
    labels: list[list[str]]
    features: np.ndarray | None
    model_version: str
    unusable_rows: tuple[int, ...] = ()


@dataclass(frozen=True)
class NewSample:
    """A sample to store: encoded image bytes (kept as given), label, attributes."""

    encoded: bytes
    label: int
    attributes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_array(cls, pixels: np.ndarray, label: int, attributes: dict[str, str] | None = None) -> NewSample:
        """From (H, W, 3) uint8 pixels, stored as PNG."""
        return cls(encode_png(np.ascontiguousarray(pixels, dtype=np.uint8)), int(label), dict(attributes or {}))


@dataclass(frozen=True)
class SampleFeatures:
    """Penultimate features (N, D) and labels (N,) of a sample set, in insertion order,
    and the N samples they were computed from (a set may grow after: read these, not it).
    ``all_cached``: each row is in the feature cache (none computed was skipped, the data
    dir full), so the same model reads them all back."""

    features: torch.Tensor
    labels: torch.Tensor
    records: list[SampleRecord]
    version: ClassifierVersion
    all_cached: bool = True

    @property
    def digests(self) -> list[str]:
        return [record.digest for record in self.records]


# Rows a non-finite output's error lists by index; the rest are counted.
MAX_SAMPLES_NAMED = 10
# PreconditionFailure.Violation.type of an image or sample the served model gives unusable
# logits, or (a split model's) penultimate features, for.
UNUSABLE_LOGITS = "UNUSABLE_LOGITS"
UNUSABLE_FEATURES = "UNUSABLE_FEATURES"
# PreconditionFailure.Violation.type of a sample whose stored image does not decode now.
UNDECODABLE_IMAGE = "UNDECODABLE_IMAGE"
# Of each kind of a served model's outputs: what makes a row unusable, what the model
# does to give one, and its violations' type. A logit of -inf is a class the model rules
# out (one that masks classes it may not answer), of probability exactly 0; a row needs
# one class not ruled out, and NaN or +inf leaves no probability defined (softmax gives
# NaN for the row).
_UNUSABLE_ROWS = {
    "penultimate features": ("are NaN or infinite", "overflows or divides by zero", UNUSABLE_FEATURES),
    "logits": ("hold NaN or +infinity, or are -infinity for every class", "overflows, divides by zero or rules out every class", UNUSABLE_LOGITS),
}


def _unusable_rows(bad: Sequence[int], what: str, field: str, sample_set_id: str | None = None, *, answered_alone: bool = False) -> FailedPrecondition:
    """FailedPrecondition naming ``field`` and the rows ``bad`` of the served model's
    ``what`` (a key of _UNUSABLE_ROWS) that no answer can come from: samples of sample
    set ``sample_set_id`` by sample_index in the message, as ``samples[i]`` in its
    violations (of a job or an inline call alike), else images of a Predict request as
    ``images[i]`` in both (which the SDK renumbers in the caller's list, see its
    _note_chunk); the violations' type is UNUSABLE_LOGITS or UNUSABLE_FEATURES.
    ``answered_alone``: the error of one image of a request whose others are answered
    (partial_failure), which leaving the image out would not mend."""
    fault, cause, violation_type = _UNUSABLE_ROWS[what]
    many = len(bad) != 1
    them = "them" if many else "it"
    if sample_set_id is not None:
        named, violations = _named_samples(bad, violation_type)
        rows, remedy = f"sample{'s' * many} of sample set {sample_set_id!r}", f"use a set without {them}, or mend the model"
    else:
        violations = [PreconditionViolation(violation_type, f"images[{row}]") for row in bad[:MAX_SAMPLES_NAMED]]
        rows, named = f"image{'s' * many} of the request", ", ".join(subject for _, subject in violations) + _more_than_named(len(bad))
        remedy = "only a mended model answers it" if answered_alone else f"send the request without {them}, or mend the model"
    return FailedPrecondition(f"the served classifier's {what} of {len(bad)} {rows} {fault} ({named}): the model {cause} on "
                              f"{'their images' if many else 'its image'}; {remedy}", field=field, violations=violations)


def _more_than_named(count: int, noun: str = "", named: int = MAX_SAMPLES_NAMED) -> str:
    """What a list of ``count`` items, cut to its first ``named``, says of the rest
    (``noun``: what one item is, "image", said after their number; "": nothing)."""
    rest = count - named
    if rest <= 0:
        return ""
    return f" and {rest} more" + (f" {noun}{'s' * (rest != 1)}" if noun else "")


def _named_samples(rows: Sequence[int], violation_type: str, named: int = MAX_SAMPLES_NAMED) -> tuple[str, list[PreconditionViolation]]:
    """How an error names ``rows`` of a sample set: by sample_index in its message (the
    first ``named``, the rest counted), and as violations of ``violation_type`` whose
    subject is ``samples[i]``, i the sample's index in the set."""
    first = rows[:named]
    return ("sample_index " + ", ".join(map(str, first)) + _more_than_named(len(rows), named=named),
            [PreconditionViolation(violation_type, f"samples[{row}]") for row in first])


class _UndecodableImages(InvalidArgument):
    """Stored samples' images that do not decode now, as :meth:`Engine.load_sample_image`
    refuses each (their upload decoded them: a server or classifier since then decodes
    them otherwise); ``refusals``: each image's digest and refusal, in the order met, which
    a set read names as their rows (:meth:`Engine.reading_images_of`). A read collects them
    before it fails, so their owner replaces them in one go, not one a run; ``checked`` of
    its ``total`` images were decoded to find them (fewer where its search stopped early,
    see :class:`_RefusalSearch`; None: all of them)."""

    def __init__(self, refusals: Mapping[str, InvalidArgument], checked: int | None = None, total: int | None = None) -> None:
        first = next(iter(refusals.values()))
        super().__init__(first.description, field=first.field)
        self.refusals = dict(refusals)
        self.checked, self.total = checked, total

    @property
    def search_stopped(self) -> bool:
        """Whether images of the read were left unchecked: there may be more such images."""
        return self.checked is not None and self.total is not None and self.checked < self.total


# Seconds a read bound to fail on an image that does not decode now goes on decoding its
# other images to name them too (the model idle). A count of images would bound nothing: one
# PNG takes 0.8 ms at 16 px, 2 ms at 224 px, 0.36 s at 4096² (decoded and fitted to 224 px on
# one CPU thread). Meanwhile it holds a job worker, decode memory and its caller: 30 s name
# every such image of most sets (50,000 PNGs of 224 px take about 25 s on 4 threads) without
# a set of large images holding them for hours.
UNDECODABLE_SEARCH_SECONDS = 30.0
# The search also stops once the time left to its job ([jobs].max_run_seconds) or call (its
# deadline) is under this many times what the slowest batch of images so far took to
# decode: the next may take longer, and the error naming those found must come before the
# deadline's.
_UNDECODABLE_SEARCH_DEADLINE_MARGIN = 2.0


class _RefusalSearch:
    """Of a read of ``total`` distinct images, those that do not decode now met so far
    (``refusals``, by digest) and how many it has checked: once one is met, the read will
    fail, and decodes the rest only to name others, for UNDECODABLE_SEARCH_SECONDS at most
    (waits for decode memory included) and while ``deadline`` (the job's or call's,
    :class:`~explaind.decode_memory.CallContext`) leaves time for more (:meth:`stops_before`).
    The next step (a batch, or a grid's image) is expected to take as long as the slowest
    so far (:meth:`timed`): the last alone let a slower one overshoot the deadline."""

    def __init__(self, total: int, deadline: CallContext) -> None:
        self.total, self.checked = total, 0
        self.refusals: dict[str, InvalidArgument] = {}
        self._deadline = deadline
        self._first_refused_at: float | None = None  # time.monotonic() of the first refusal met
        self._slowest = 0.0  # seconds the slowest step of the read took

    def refused(self, refusals: Mapping[str, InvalidArgument]) -> None:
        if self._first_refused_at is None:
            self._first_refused_at = time.monotonic()
        self.refusals.update(refusals)

    def timed(self, seconds: float) -> None:
        """Count a step of the read (a batch's decodes, or an image's) that took ``seconds``."""
        self._slowest = max(self._slowest, seconds)

    def stops_before(self) -> bool:
        """Whether a read bound to fail stops looking rather than decode more images, which
        would take about as long as its slowest step so far."""
        if self._first_refused_at is None or self.checked >= self.total:
            return False
        if time.monotonic() - self._first_refused_at + self._slowest > UNDECODABLE_SEARCH_SECONDS:
            return True
        remaining = self._deadline.time_remaining()
        return remaining is not None and remaining <= _UNDECODABLE_SEARCH_DEADLINE_MARGIN * self._slowest

    def failure(self) -> _UndecodableImages:
        return _UndecodableImages(self.refusals, self.checked, self.total)

    def decoding_for(self, call: CallContext | None) -> CallContext | None:
        """The context of the read's next decodes for the RPC ``call`` (None: a job's or no
        caller's): ``call`` as it is until the read is bound to fail; from then on the
        read's deadline the margin of its slowest step earlier, and the search's end at the
        latest, so that a wait for decode memory ends (DEADLINE_EXCEEDED, then
        :meth:`failure`) while a caller still waits (at the call's own deadline gRPC has
        ended it, and its caller hears DEADLINE_EXCEEDED, not the images found), and a job
        without a run-time limit waits no longer than the search may last."""
        if self._first_refused_at is None:
            return call
        return _EarlierDeadline(self._deadline, _UNDECODABLE_SEARCH_DEADLINE_MARGIN * self._slowest,
                                self._first_refused_at + UNDECODABLE_SEARCH_SECONDS)


class _EarlierDeadline:
    """A :class:`~explaind.decode_memory.CallContext` ending ``seconds`` before ``context``'s
    deadline, and at ``latest`` (a time.monotonic()) if that comes first; active as long as
    ``context`` is."""

    def __init__(self, context: CallContext, seconds: float, latest: float) -> None:
        self._context, self._seconds, self._latest = context, seconds, latest

    def time_remaining(self) -> float:
        remaining = self._context.time_remaining()
        until_latest = self._latest - time.monotonic()
        return max(0.0, until_latest if remaining is None else min(until_latest, remaining - self._seconds))

    def is_active(self) -> bool:
        return self._context.is_active()


# Of a read's images that do not decode now, each named in its error lists its first this
# many samples (the error's violations list the first MAX_SAMPLES_NAMED of them all).
_ROWS_NAMED_PER_IMAGE = 3


def _undecodable_rows(refused: _UndecodableImages, rows_of: Mapping[str, Sequence[int]], sample_set_id: str, field: str) -> FailedPrecondition:
    """FailedPrecondition naming ``field`` and the rows of sample set ``sample_set_id``
    holding the images ``refused`` could not decode (``rows_of``: each image's rows), as
    UNDECODABLE_IMAGE violations of subject ``samples[i]``, the first MAX_SAMPLES_NAMED by
    sample_index (as :func:`_unusable_rows` names them; a status carries no more, see
    MAX_PRECONDITION_VIOLATIONS). Its message names the first MAX_SAMPLES_NAMED images
    (the rest counted), each by its digest's first 12 hex digits, its samples and its
    refusal (1.25 kB for ten images refused in 50 characters each, within the 2 KiB a
    status message with details is cut to): one image may be several samples of a set,
    and only their indices tell its owner what to replace. Where the read stopped looking
    before its last image, it says how far it looked, and counts them as "at least".
    Not INVALID_ARGUMENT: the request is sound, and the set, not it, must change."""
    refusals = refused.refusals
    digests = sorted(refusals, key=lambda digest: rows_of[digest][0])
    rows = sorted(row for digest in digests for row in rows_of[digest])
    many = len(rows) != 1
    named, violations = _named_samples(rows, UNDECODABLE_IMAGE)
    remedy = f"use a set without {'them' if many else 'it'}"
    unchecked = (f"found checking {refused.checked} of the {counted(refused.total, 'image')} read; the rest were not checked"
                 if refused.search_stopped else "")
    if len(digests) == 1:
        (digest,) = digests
        return FailedPrecondition(f"the image {digest[:12]} of {len(rows)} sample{'s' * many} of sample set {sample_set_id!r} ({named}) "
                                  f"does not decode now: {refusals[digest].description}; {remedy}" + (f" (the only one {unchecked})" if unchecked else ""),
                                  field=field, violations=violations)
    images = ", ".join(f"[{digest[:12]}, {_named_samples(rows_of[digest], UNDECODABLE_IMAGE, _ROWS_NAMED_PER_IMAGE)[0]}: "
                       f"{refusals[digest].description}]" for digest in digests[:MAX_SAMPLES_NAMED])
    # The count and remedy come first: a status message past 2 KiB (long refusals) loses its tail.
    return FailedPrecondition(f"{'at least ' if unchecked else ''}{len(digests)} images of {len(rows)} samples of sample set {sample_set_id!r} "
                              f"do not decode now{f' ({unchecked})' if unchecked else ''}; {remedy}: {images}{_more_than_named(len(digests), 'image')}",
                              field=field, violations=violations)


def _stacked_unless_refused(decoding: list[Future[torch.Tensor]], search: _RefusalSearch) -> torch.Tensor | None:
    """The images ``decoding`` gives, stacked (n, 3, S, S); None once the read met an image
    that does not decode now, whose refusal it adds to ``search``. A decoder out of memory,
    or a wait for decode memory past the deadline, ends the read: as
    :meth:`_RefusalSearch.failure` once it met such an image (in this chunk, whatever their
    order, or before), whose refusal a retry meets again, else as itself. A function of its
    own so that no loop variable keeps one of the images alive while the model runs on them."""
    decoded = []
    stopped: DecodeOutOfMemory | DeadlineExceeded | None = None
    for future in decoding:
        try:
            decoded.append(future.result())
        except _UndecodableImages as refused:
            search.refused(refused.refusals)
        except (DecodeOutOfMemory, DeadlineExceeded) as error:
            stopped = stopped or error
            continue
        search.checked += 1
    if stopped is not None:
        raise search.failure() if search.refusals else stopped
    return None if search.refusals else stacked_batch(decoded, field=None)


def _raise_if_cancelled(job: JobContext | None) -> None:
    """End a read whose search for images that do not decode stops as its ``job``'s cancel
    where the job was cancelled (CANCELLED, not FAILED naming those found); not as its
    run-time limit, near which the search stops to name them (:class:`_RefusalSearch`)."""
    if job is not None and job.cancelled:
        job.raise_if_cancelled()


def rows_by_digest(digests: Sequence[str]) -> dict[str, list[int]]:
    """The rows of each image among ``digests`` (a set's samples, in order), in the order
    the images first appear: a set may hold one image several times."""
    rows_of: dict[str, list[int]] = {}
    for row, digest in enumerate(digests):
        rows_of.setdefault(digest, []).append(row)
    return rows_of


def unusable_image(index: int) -> FailedPrecondition:
    """The error of ``images[index]`` alone, whose logits are unusable (_UNUSABLE_ROWS): a
    partial_failure Predict answers it with this, naming the image as its field."""
    return _unusable_rows([index], "logits", f"images[{index}]", answered_alone=True)


def _require_usable_rows(outputs: np.ndarray, sample_set_id: str, field: str, what: str) -> None:
    """:func:`_unusable_rows` for the samples of a set whose row of ``outputs`` (N, D), the
    served model's ``what`` on the set's images, is unusable (_UNUSABLE_ROWS): it
    overflowed or divided by zero on them (a float16 model, a constant image), or ruled
    out every class. A job must not go on with them: a NaN row's argmax is class 0, a
    mistake or not as it happens, and the methods refuse such features by their own row
    numbers."""
    rows = outputs.reshape(len(outputs), -1)
    if what == "logits":  # usable where the largest is a number: max gives NaN where there is one
        bad = np.flatnonzero(~np.isfinite(rows.max(1)))
    else:
        # A row sums (in float64, which no sum of float32s overflows) to a finite number only
        # if every value is finite: one pass, and an (N,) result rather than a mask of them all.
        with np.errstate(invalid="ignore"):  # inf + -inf is the NaN looked for, not a warning for the log
            bad = np.flatnonzero(~np.isfinite(rows.sum(1, dtype=np.float64)))
    if len(bad):
        raise _unusable_rows(bad.tolist(), what, field, sample_set_id)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The slices' outputs as one batch; a lone slice as it is, uncopied."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _split_outputs(forward: _BatchForward, sizes: list[int], options: list[PredictOptions]) -> list[BatchOutput | FailedPrecondition]:
    """Each request's top classes from one top-k of the whole batch's logits, as deep as
    the deepest request asks (a full sort of 21k classes cost 34x a top-5 here), equal
    logits by class index (:func:`top_ids`: topk's kernel orders ties as it likes), and
    their probabilities from one softmax. Ranked by logit, as EvaluateSampleSet and a
    ranking classify: softmax rounds logits a rounding step apart to equal probabilities,
    which put the lower class first. Features leave the device only when a request asks
    for them. A request with an image whose logits are unusable (_UNUSABLE_ROWS) gets
    the FailedPrecondition naming them instead, the other requests their answers; one
    with partial_failure gets its answer with those rows listed as unusable_rows."""
    logits = forward.logits.float()
    _, indices = top_ids(logits, max(o.top_k for o in options))
    probabilities = torch.softmax(logits, dim=1).gather(1, indices)
    probabilities, indices = probabilities.cpu().numpy(), indices.cpu().numpy()
    # A row's softmax is NaN exactly where it is unusable: one of NaN or +inf makes its sum
    # NaN, and so does -inf less -inf where all are -inf; else its largest logit adds
    # exp(0) = 1 to a sum of numbers in [0, 1]. So its top probability, already here, tells.
    unusable = np.isnan(probabilities[:, 0])
    any_unusable = bool(unusable.any())  # the usual batch has none: one test for it, not a numpy call a request
    features = forward.features.float().cpu().numpy() if forward.features is not None and any(o.return_features for o in options) else None
    outputs: list[BatchOutput | FailedPrecondition] = []
    start = 0
    for size, option in zip(sizes, options, strict=True):
        rows = slice(start, start + size)
        bad = tuple(np.flatnonzero(unusable[rows]).tolist()) if any_unusable else ()
        if bad and not option.partial_failure:
            outputs.append(_unusable_rows(bad, "logits", "images"))
        else:
            outputs.append(BatchOutput(forward.version, indices[rows, :option.top_k], probabilities[rows, :option.top_k],
                                       features[rows] if option.return_features and features is not None else None, bad))
        start += size
    return outputs


class Engine:
    """Serving without gRPC: loads the models, answers Predict through the dynamic batcher,
    stores sample sets and computes (and caches) their features for the method jobs, which
    run on its :class:`JobManager`."""

    def __init__(self, config: Config, store: Store, metrics: Metrics, tracing: Tracing = NO_TRACING) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.models = ModelRegistry()
        self.components: dict[str, ComponentStatus] = {}
        # Half a message for the result leaves the other half to the operation's metadata
        # (its artifacts list) and to a list page's framing.
        self.jobs = JobManager(store, metrics, max_queued=config.jobs.max_queued, max_queued_per_caller=config.jobs.max_queued_per_caller,
                               workers=config.jobs.gpu_workers, max_result_bytes=config.server.max_message_bytes // 2,
                               max_run_s=config.jobs.max_run_seconds or None, tracing=tracing, ownership=Ownership(config.server.admins))
        self.ownership = self.jobs.ownership
        self.jobs.register_kinds(EVALUATE_KIND, stages=EVALUATE_STAGES)
        self.decode_memory = DecodeMemory(config.server.max_decode_bytes, held_gauge=metrics.decode_memory_held,
                                          wait_seconds=metrics.decode_memory_wait)
        self.device = torch.device("cpu")
        self._feature_fns: dict[str, FeatureFn] = {}
        self._batcher: DynamicBatcher[_BatchForward] | None = None
        # Never shut down: uploads may still be running when the engine closes (calls outlast
        # jobs); idle threads end with the engine.
        self._blob_writers = ThreadPoolExecutor(max_workers=BLOB_WRITE_THREADS, thread_name_prefix="explaind-blob-write")

    # Loading -------------------------------------------------------------------------

    def load(self) -> None:
        """Load every configured model and start the batcher. Raises ModelLoadError."""
        runtime = self.config.runtime
        self.device = check_device(runtime.device)
        if runtime.num_threads:
            torch.set_num_threads(runtime.num_threads)
        # Building a model initialises its layers from the global generator before its
        # weights replace them: a process that seeded torch would draw other numbers after.
        with torch.random.fork_rng(devices=[]):
            version = load_classifier(self.config.classifier, device=self.device, num_threads=runtime.num_threads)
            required = self.config.models_required
            clip = load_clip(self.config.clip, required=required)
            diffusion = load_diffusion(self.config.diffusion, clip, required=required)
        self.components = {
            "classifier": ComponentStatus("classifier", True, version.source, f"{version.name} ({version.loader})"),
            "clip": clip,
            "diffusion": diffusion,
        }
        for name, status in self.components.items():
            self.metrics.component_loaded.labels(component=name).set(int(status.loaded))
            if not status.loaded:
                log.info("%s not loaded: %s", name, status.detail)
        batching = self.config.batching
        # Before the first version is active: a Predict that sees a version finds the batcher.
        self._batcher = DynamicBatcher(
            self._run_batch,
            _split_outputs,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000.0,
            max_queue_size=batching.max_queue_size,
            max_queued_per_caller=batching.max_queued_images_per_caller,
            on_queue_depth=self.metrics.queue_depth.set,
        )
        self.activate(version)

    def activate(self, version: ClassifierVersion) -> None:
        """Serve ``version``: its backend is built (and warmed) first, then one swap.
        Cached sample features of other feature versions are dropped."""
        if not version.supports_features and self.device.type != "cpu":
            log.warning("the %s classifier is inference-only and runs on the CPU with its own runtime; [runtime].device "
                        "applies to classifiers split into features and a linear head", version.loader)
        if not version.differentiable and self.config.runtime.backend != "eager":
            log.warning("the %s classifier runs on its own runtime; [runtime].backend applies to PyTorch classifiers only", version.loader)
        if version.supports_features:
            version.head.to(self.device)
        if version.differentiable:
            version.feature_extractor.to(self.device)
            if version.feature_cache_key not in self._feature_fns:
                backend = self.config.runtime.backend
                max_batch_size = max(self.config.batching.max_batch_size, self.config.jobs.evaluate_batch_size)
                started = time.perf_counter()
                fn = build_feature_fn(version, backend, str(self.device), Path(self.config.server.data_dir) / "compiled",
                                      num_threads=self.config.runtime.num_threads, max_batch_size=max_batch_size)
                # Fixed images, not the global generator's: warming up must not move the stream of a process that seeded it.
                generator = torch.Generator().manual_seed(0)
                for batch_size in warm_up_batch_sizes(backend, max_batch_size):
                    fn(torch.rand(batch_size, 3, version.image_size, version.image_size, generator=generator).to(self.device))
                log.info("backend %s ready for %s in %.1f s", backend, version.name, time.perf_counter() - started)
                self._feature_fns[version.feature_cache_key] = fn
        previous = self.models.activate(version)
        if previous is None or previous.feature_cache_key != version.feature_cache_key:
            dropped = self.store.retain_features(version.feature_cache_key)
            if dropped:
                log.info("feature cache: dropped %d entries of other model versions", dropped)
        backend, device = self.runtime(version)
        self.metrics.model_info.info({"name": version.name, "loader": version.loader, "version": version.version, "backend": backend, "device": device})

    def runtime(self, version: ClassifierVersion) -> tuple[str, str]:
        """(backend, device) that run ``version``'s forward pass: the configured ones for a
        PyTorch classifier, its own runtime for the others (on the CPU when inference-only)."""
        if version.differentiable:
            return self.config.runtime.backend, str(self.device)
        return "onnxruntime" if version.loader == "onnx" else version.loader, str(self.device) if version.supports_features else "cpu"

    def close(self) -> None:
        """Finish queued predictions, then abort the jobs left (a server gives them its grace
        period first, and closes this once they and its calls have ended: ExplaindServer.stop)."""
        self.close_batcher()
        self.jobs.shutdown(0.0)

    def close_batcher(self) -> None:
        """Finish queued predictions and stop the batcher's thread, the jobs left alone: a
        server stopped while this loaded closes the batcher :meth:`load` started after its
        :meth:`close`, while its stop may still give the jobs their grace period."""
        if self._batcher is not None:
            self._batcher.close()

    # Predict -------------------------------------------------------------------------

    def predict_options(self, *, top_k: int = DEFAULT_TOP_K, return_features: bool = False, partial_failure: bool = False) -> PredictOptions:
        """A Predict request's options, checked against the served classifier (InvalidArgument
        naming top_k or return_features). Head versions share the classes and the feature
        layer, so what is checked here still holds when the batch runs."""
        version = self.models.active  # raises Unavailable while loading
        if top_k < 0 or top_k > len(version.class_names):
            raise InvalidArgument(f"must be between 1 and {len(version.class_names)} (the number of classes), or 0 for the default", field="top_k")
        if return_features:
            version.require_split("features need a split classifier", field="return_features")
        return PredictOptions(min(top_k or DEFAULT_TOP_K, len(version.class_names)), return_features, partial_failure)

    def submit_predict(self, images: torch.Tensor, *, top_k: int = DEFAULT_TOP_K, return_features: bool = False,
                       partial_failure: bool = False, caller: str | None = None) -> Future:
        """Queue (N, 3, S, S) images for the batcher; the future yields a :class:`BatchOutput`
        for :meth:`finish_predict`, or raises FailedPrecondition naming the images whose
        logits are unusable (_UNUSABLE_ROWS; with ``partial_failure``, the output lists
        them as its unusable_rows instead). The options are checked first
        (:meth:`predict_options`), so a request they refuse never costs a forward pass.
        ``caller``: the named caller, whose images waiting count against
        [batching].max_queued_images_per_caller."""
        options = self.predict_options(top_k=top_k, return_features=return_features, partial_failure=partial_failure)
        return self._batcher.submit(images, caller=caller, options=options)

    def check_predict_room(self, count: int, *, caller: str | None = None) -> None:
        """RESOURCE_EXHAUSTED now if the prediction queue cannot take ``count`` images of
        ``caller``: asked before a Predict decodes its images, which a refused request
        would otherwise pay for in full (up to [server].max_pixels_per_request)."""
        if self._batcher is not None:  # none before the models load (Predict is UNAVAILABLE then)
            self._batcher.check_room(count, caller=caller)

    def _run_batch(self, images: torch.Tensor) -> _BatchForward:
        """The forward of one batch (N, 3, S, S), in slices of at most
        [batching].max_batch_size images: one Predict may carry up to
        [batching].max_images_per_request, and a single forward of them all held
        activations in proportion (6 GB more for 800 ResNet-18 images of 224² on a CPU)."""
        version = self.models.active  # read once: the whole batch uses one version
        slices = images.split(self.config.batching.max_batch_size)
        for part in slices:
            self.metrics.batch_size.observe(len(part))
        if not version.supports_features:  # inference-only loaders run on the CPU, where they loaded
            return _BatchForward(version, _joined([version.predict_fn(part.cpu()) for part in slices]), None)
        extract = self._feature_fns.get(version.feature_cache_key, version.features)
        features = _joined([extract(part.to(self.device, non_blocking=True)) for part in slices])
        return _BatchForward(version, version.logits(features), features)

    def finish_predict(self, output: BatchOutput) -> PredictOutput:
        """Labels for a batch slice's top classes; its unusable rows are not counted as
        predicted."""
        names = output.version.class_names
        self.metrics.predicted_images.inc(len(output.class_indices) - len(output.unusable_rows))
        return PredictOutput(
            class_indices=output.class_indices,
            probabilities=output.probabilities,
            labels=[[names[i] for i in row] for row in output.class_indices.tolist()],
            features=output.features,
            model_version=output.version.version,
            unusable_rows=output.unusable_rows,
        )

    def predict(self, images: torch.Tensor, *, top_k: int = DEFAULT_TOP_K, return_features: bool = False, timeout: float | None = None) -> PredictOutput:
        """In-process Predict through the same batcher as the RPC."""
        future = self.submit_predict(images, top_k=top_k, return_features=return_features)
        return self.finish_predict(future.result(timeout))

    # Sample sets ---------------------------------------------------------------------

    def repeated_sample_set_request(self, request: RequestKey | None, method: str) -> SampleSetInfo | None:
        """The set a CreateSampleSet or AppendSamples (``method``) with ``request``'s
        request_id was applied to, as it is now; None if none is kept (or ``request`` is
        None). Asked before a request's images are decoded, so a repeat is answered as the
        first was, at once. InvalidArgument naming request_id when another request was
        applied under it."""
        if request is None or (info := self.store.sample_set_of_request(request)) is None:
            return None
        self._sample_set_request_repeated(method, info.sample_set_id, request)
        return info

    def _sample_set_request_repeated(self, method: str, set_id: str, request: RequestKey) -> None:
        """Counts and logs an upload request answered as a repeat: found before its images
        were decoded, or, racing the first (two runs of one upload), in the store's transaction."""
        self.metrics.sample_set_requests_repeated.labels(method=method).inc()
        log.info("sample set %r: request %s sent again, not applied again", set_id, request.request_id)

    def create_sample_set(self, sample_set_id: str, display_name: str, samples: Sequence[NewSample], *, uploading: bool = False,
                          caller_waits: Callable[[], bool] = lambda: True, request: RequestKey | None = None,
                          caller: str | None = None) -> SampleSetInfo:
        """``uploading``: more samples follow (``append_samples(..., finish_upload=True)``
        ends it); until then jobs refuse the set. Once ``caller_waits()`` is False (a caller
        past its deadline, or gone) nothing is stored, up to the store's transaction (a wait
        for the store included): it raises Cancelled, so a caller told the call failed (or
        its retry, or the upload that deleted the set the retry made) never finds the set
        made after all. With ``request``, a repeat of
        the request that created a set gets that set (see :meth:`repeated_sample_set_request`).
        ``caller``: the named caller creating it, its owner (see explaind.ownership)."""
        check_new_sample_set(sample_set_id, display_name)
        sample_set_id = sample_set_id or f"set-{uuid.uuid4().hex[:12]}"
        with self.store.writing_blobs() as put:
            return self.store.create_sample_set(sample_set_id, display_name, self._store_samples(samples, put, caller_waits), uploading=uploading,
                                                request=request, on_repeat=partial(self._sample_set_request_repeated, "CreateSampleSet"), owner=caller,
                                                before_write=partial(require_caller, caller_waits, "nothing was stored"),
                                                id_taken=self._sample_set_id_taken(sample_set_id, caller))

    def check_create(self, sample_set_id: str, sample_count: int, *, caller: str | None = None) -> None:
        """The checks of a new set of ``sample_count`` samples that read none of its images:
        AlreadyExists for the id of a set that exists ("" is free), ResourceExhausted when
        ``caller`` has no room for them. Asked before a CreateSampleSet's images are
        decoded; the store asks again as it creates."""
        if sample_set_id:
            try:
                owner = self.store.get_sample_set(sample_set_id).owner
            except NotFound:
                pass
            else:
                raise self._sample_set_id_taken(sample_set_id, caller)(owner)
        self.store.require_room_for_samples(caller, sample_count)

    def _sample_set_id_taken(self, sample_set_id: str, caller: str | None) -> Callable[[str | None], AlreadyExists]:
        """The AlreadyExists telling ``caller`` that a set of the owner given holds
        ``sample_set_id``: to choose another id where it may not change that set. Asked
        before a create's images are decoded, and by the store as it creates (a race)."""
        return lambda owner: sample_set_id_taken(sample_set_id, None if self.ownership.may_change(caller, owner) else owner)

    def check_append(self, sample_set_id: str, sample_count: int, *, finish_upload: bool = False, uid: str | None = None,
                     caller: str | None = None) -> None:
        """The checks of an append of ``sample_count`` samples that read none of its images:
        something to do, and the set there (of ``uid``, when given) and ``caller``'s to
        change, and room for them among its owner's samples. Asked before its images are
        decoded and stored; the store checks again as it appends."""
        if not sample_count and not finish_upload:
            raise InvalidArgument("no samples to append", field="samples")
        info = self.store.get_sample_set(sample_set_id)
        require_sample_set_uid(sample_set_id, info.create_time, uid, "sample_set_uid")
        self._set_owner_check(sample_set_id, caller)(info.owner)
        self.store.require_room_for_samples(info.owner, sample_count)

    def _set_owner_check(self, sample_set_id: str, caller: str | None) -> OwnerCheck:
        return self.ownership.owner_check(caller, f"sample set {sample_set_id!r}", field="sample_set_id")

    def append_samples(self, sample_set_id: str, samples: Sequence[NewSample], *, finish_upload: bool = False,
                       caller_waits: Callable[[], bool] = lambda: True, uid: str | None = None,
                       request: RequestKey | None = None, caller: str | None = None) -> SampleSetInfo:
        """As :meth:`create_sample_set`, ``caller_waits`` and ``request`` included (a
        repeat appends nothing); with ``uid``, only to the set of that uid
        (FailedPrecondition for another of the same id); PermissionDenied when the set is
        not ``caller``'s to change."""
        self.check_append(sample_set_id, len(samples), finish_upload=finish_upload, uid=uid, caller=caller)
        with self.store.writing_blobs() as put:
            return self.store.append_samples(sample_set_id, self._store_samples(samples, put, caller_waits), finish_upload=finish_upload,
                                             uid=uid, request=request, on_repeat=partial(self._sample_set_request_repeated, "AppendSamples"),
                                             check_owner=self._set_owner_check(sample_set_id, caller),
                                             before_write=partial(require_caller, caller_waits, "nothing was stored"))

    def delete_sample_set(self, sample_set_id: str, *, uid: str | None = None, caller: str | None = None) -> None:
        """Delete the set (of ``uid``, when given); PermissionDenied when it is not ``caller``'s to change."""
        self.store.delete_sample_set(sample_set_id, uid=uid, check_owner=self._set_owner_check(sample_set_id, caller))

    def usable_sample_set(self, sample_set_id: str, field: str = "sample_set_id", uid: str | None = None) -> SampleSetInfo:
        """The set a job is asked to run on: it must exist, hold samples, be fully uploaded
        and be labelled for the served classifier; with ``uid`` (what the set was when the
        job was submitted), it must still be that set, not another of its id."""
        if not sample_set_id:
            raise InvalidArgument("required", field=field)
        check_sample_set_id(sample_set_id, field)
        try:
            info = self.store.get_sample_set(sample_set_id)
        except NotFound:
            raise NotFound(f"no sample set {sample_set_id!r}", field=field) from None
        require_sample_set_uid(sample_set_id, info.create_time, uid, field)
        if info.sample_count == 0:
            raise InvalidArgument(f"sample set {sample_set_id!r} is empty", field=field)
        if info.uploading:
            raise FailedPrecondition(f"sample set {sample_set_id!r} is still being uploaded ({counted(info.sample_count, 'sample')} so far); "
                                     "use it once its upload has finished", field=field)
        # Sets outlive a change of classifier in the same data dir; labels were checked only at upload.
        num_classes = len(self.models.active.class_names)
        if (largest := max(info.class_counts, default=0)) >= num_classes:
            raise InvalidArgument(f"sample set {sample_set_id!r} has labels up to {largest}, but the served classifier has "
                                  f"{num_classes} classes: it was uploaded for another classifier", field=field)
        return info

    def _store_samples(self, samples: Sequence[NewSample], put: Callable[[bytes], str], caller_waits: Callable[[], bool]) -> list[SampleRecord]:
        """Records for ``samples`` after checking their labels, images written with ``put``
        BLOB_WRITE_THREADS at a time (the caller is asked before each round; the store asks
        it once more in the transaction that would record them)."""
        num_classes = len(self.models.active.class_names)
        for index, sample in enumerate(samples):
            if not 0 <= sample.label < num_classes:
                raise InvalidArgument(f"label {sample.label} is not a class index in [0, {num_classes})", field=f"samples[{index}].label")
            _check_attributes(sample.attributes, f"samples[{index}].attributes")
        digests: list[str] = []
        for start in range(0, len(samples), BLOB_WRITE_THREADS):
            require_caller(caller_waits, "nothing was stored")
            writes = [self._blob_writers.submit(put, sample.encoded) for sample in samples[start : start + BLOB_WRITE_THREADS]]
            futures.wait(writes)  # all of them, failed or not, before the block that counts them as written ends
            digests += [write.result() for write in writes]
        return [SampleRecord(digest, sample.label, dict(sample.attributes)) for digest, sample in zip(digests, samples, strict=True)]

    def load_sample_image(self, digest: str, version: ClassifierVersion | None = None, *, job: JobContext | None = None,
                          call: CallContext | None = None, trim: bool = True) -> torch.Tensor:
        """A stored sample as (3, S, S) in [0, 1], fitted to the input of ``version`` (the
        active one by default). Its decode holds room in [server].max_decode_bytes, as a
        request's image does, until it is fitted: a stored image may be 4096² (436 MB to
        decode), and a job decodes several at once. Waiting for room ends as ``job`` does
        (:class:`_JobDecodeWait`): cancelled, or at its run-time limit, failing as a job
        past it does; for an inline computation, as the RPC ``call`` it answers does, as a
        Predict's (DEADLINE_EXCEEDED at its deadline, CANCELLED once its caller left).
        ``trim``: as :meth:`DecodeMemory.lease`'s."""
        geometry = (version or self.models.active).input_geometry
        field = f"sample {digest[:12]}"
        data = self.store.get_blob(digest)
        # Stored samples passed the pixel limit when they were sent: only the memory is budgeted here.
        lease = self.decode_memory.lease(call if call is not None else _JobDecodeWait(job), trim=trim)
        try:
            with PixelBudget(sys.maxsize, field=field, memory=lease) as budget:
                return decode_encoded(data, field=field, geometry=geometry, budget=budget)
        except InvalidArgument as refusal:
            raise _UndecodableImages({digest: refusal}) from None
        except Cancelled:
            if job is not None:
                job.raise_if_cancelled()  # the job's own end (JobCancelled), not a call's CANCELLED
            raise
        except DeadlineExceeded:
            if job is not None:  # a job's wait has no deadline but its run-time limit
                raise job.ran_too_long() from None
            raise

    def sample_set_features(
        self,
        sample_set_id: str,
        *,
        version: ClassifierVersion | None = None,
        batch_size: int = 0,
        context: JobContext | None = None,
        call: CallContext | None = None,
        field: str = "sample_set_id",
        uid: str | None = None,
        count: int | None = None,
    ) -> SampleFeatures:
        """Penultimate features of every sample, from the (feature version, image) cache
        where present; the rest are computed in batches, with progress and cancellation
        through ``context`` when given; ``call``: the RPC computing them inline, whose
        deadline and caller the decodes' waits for room end with (:meth:`load_sample_image`),
        and whose caller's leaving stops the next batch (Cancelled); the batches computed
        by then stay cached (unless the data dir was full), and its error says what a retry computes.
        The set is checked again here, when a job runs: it may have been deleted, or replaced
        (``uid``: the set the job was submitted for), since the job was queued. With
        ``count``, only its first ``count`` samples: the set as it was when it held that many
        (samples are only appended), not samples appended since. FailedPrecondition naming
        ``field`` and the samples whose features are NaN or infinite (:func:`_require_usable_rows`),
        or that hold an image that does not decode now (:func:`_undecodable_rows`)."""
        version = version or self.models.active
        version.require_split("explanation methods need a split classifier")
        records = self._samples_of(sample_set_id, field, uid, count)
        digests = [record.digest for record in records]
        rows_of = rows_by_digest(digests)
        stacked = np.empty((len(digests), version.feature_dim), dtype=np.float32)
        unique, missing = list(rows_of), []
        for start in range(0, len(unique), FEATURE_READ_ROWS):
            wanted = unique[start : start + FEATURE_READ_ROWS]
            cached = self.store.get_features(version.feature_cache_key, wanted)
            for digest in wanted:
                if digest in cached:
                    stacked[rows_of[digest]] = cached[digest]
                else:
                    missing.append(digest)
        self.metrics.feature_cache_hits.inc(len(digests) - len(missing))
        self.metrics.feature_cache_misses.inc(len(missing))
        fn = self._feature_fns.get(version.feature_cache_key, version.features)
        # A set none of whose rows are cached or repeated is computed straight into
        # ``stacked``: an array of the computed rows beside it was twice its features.
        computed_into = stacked if len(missing) == len(digests) else None
        cached = 0  # of ``missing``, computed and put in the cache so far (not while the data dir is full)
        try:
            with self.reading_images_of(sample_set_id, field, rows_of):
                for chunk, computed in self._run_on_samples(missing, version, lambda images: fn(images.to(self.device)), batch_size, context,
                                                            "computing features", outputs=computed_into, call=call):
                    if self.store.put_features(version.feature_cache_key, dict(zip(chunk, computed, strict=True))):
                        cached += len(chunk)
                    if computed_into is None:
                        for digest, vector in zip(chunk, computed, strict=True):
                            stacked[rows_of[digest]] = vector
        except (Cancelled, DeadlineExceeded) as error:  # an inline call's caller gone, or its deadline passed waiting for decode memory
            if call is None:
                raise
            kept = (f"the features of the {cached} image{'s' * (cached != 1)} computed before it stopped are cached: "
                    f"a retry on the same model computes only the other {len(missing) - cached}" if cached else "nothing was stored")
            raise type(error)(f"{error.description}; {kept}", field=error.field) from None
        if context is not None:
            context.report_progress(len(missing), len(missing), "features ready")
        _require_usable_rows(stacked, sample_set_id, field, "penultimate features")
        features = torch.from_numpy(stacked).to(self.device)
        labels = torch.tensor([record.label for record in records], dtype=torch.long, device="cpu")
        return SampleFeatures(features, labels, records, version, all_cached=cached == len(missing))

    def sample_set_logits(self, sample_set_id: str, *, version: ClassifierVersion, batch_size: int = 0,
                          context: JobContext | None = None, uid: str | None = None, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Logits (N, C) on the CPU, labels (N,) and digests of every sample (with ``count``,
        of the first ``count``, as sample_set_features): the head on the cached features, or
        for an inference-only classifier the whole model on every image (it has no
        features to cache). Logits of -inf are classes the model rules out (one that masks
        classes). FailedPrecondition naming the samples whose features are not all finite,
        or whose logits hold NaN or +inf, or are -inf for every class (:func:`_require_usable_rows`)."""
        if version.supports_features:
            sample = self.sample_set_features(sample_set_id, version=version, batch_size=batch_size, context=context, uid=uid, count=count)
            logits = version.logits(sample.features).float().cpu()
            _require_usable_rows(logits.numpy(), sample_set_id, "sample_set_id", "logits")  # finite features, a head that overflows float32
            return logits, sample.labels, sample.digests
        records = self._samples_of(sample_set_id, "sample_set_id", uid, count)
        digests = [record.digest for record in records]
        rows_of = rows_by_digest(digests)
        computed: dict[str, np.ndarray] = {}
        with self.reading_images_of(sample_set_id, "sample_set_id", rows_of):
            for chunk, logits in self._run_on_samples(list(rows_of), version, version.predict_fn, batch_size, context, "classifying"):
                computed.update(zip(chunk, logits, strict=True))
        logits = torch.from_numpy(np.stack([computed[digest] for digest in digests]))  # never empty: usable sets have samples
        _require_usable_rows(logits.numpy(), sample_set_id, "sample_set_id", "logits")
        return logits, torch.tensor([record.label for record in records], dtype=torch.long, device="cpu"), digests

    @staticmethod
    @contextlib.contextmanager
    def reading_images_of(sample_set_id: str, field: str, rows_of: Mapping[str, Sequence[int]]) -> Iterator[None]:
        """Around reading a set's images (``rows_of``: each image's rows in the set): a stored
        image that is NotFound (no longer referenced, its file swept) means the set was
        deleted while it was read. A job's reads are safe from sweeps (see the server's
        sweep); a call's inline ones are not, and told "no artifact with digest ..." with no
        field. Those that do not decode now fail naming their rows (:func:`_undecodable_rows`)."""
        try:
            yield
        except _UndecodableImages as error:
            raise _undecodable_rows(error, rows_of, sample_set_id, field) from None
        except NotFound:
            raise NotFound(f"sample set {sample_set_id!r} was deleted while it was read", field=field) from None

    def _samples_of(self, sample_set_id: str, field: str, uid: str | None, count: int | None = None) -> list[SampleRecord]:
        """The usable set's samples (with ``count``, its first ``count``); with ``uid``
        checked again after the read, so they are that set's, not those of one made under
        its id in between."""
        self.usable_sample_set(sample_set_id, field, uid)
        records = self.store.list_samples(sample_set_id, limit=count)
        if uid:
            self.usable_sample_set(sample_set_id, field, uid)
        return records

    def _run_on_samples(self, digests: list[str], version: ClassifierVersion, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                        context: JobContext | None, activity: str, *, outputs: np.ndarray | None = None,
                        call: CallContext | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
        """``fn`` on the stored images ``digests`` (decoded on the CPU) in batches of
        ``batch_size`` (0: ``[jobs].evaluate_batch_size``): each batch's digests and float
        outputs, with progress ("<activity> i/n") and cancellation through ``context``
        (``call``: the RPC computing them inline instead, see :meth:`load_sample_image`;
        each batch stops, Cancelled, once its caller no longer waits).

        The outputs are rows of one (len(digests), ...) array, filled batch by batch (the
        caller's ``outputs``, or one of its own): each batch's own output, kept by the
        caller to the end, pinned the allocator's heap between the batches' freed
        temporaries, which the process then held (its RSS grew 25 kB a 64 px sample:
        1.2 GB to evaluate 50,000)."""
        batch_size = batch_size or self.config.jobs.evaluate_batch_size
        chunks = [digests[start : start + batch_size] for start in range(0, len(digests), batch_size)]
        done = 0
        with contextlib.closing(self._decoded_chunks(chunks, version, context, call)) as decoded:  # a cancel stops the decoding too
            for chunk, images in zip(chunks, decoded, strict=True):
                if context is not None:
                    if images is None:  # bound to fail: the search stops near the run-time limit by itself, naming the images found
                        _raise_if_cancelled(context)
                    else:
                        context.raise_if_cancelled()
                    context.report_progress(done, len(digests), f"{activity} {done}/{len(digests)}")
                elif call is not None:
                    require_caller(call.is_active)
                if images is None:  # the read fails once decoded: the model need not run
                    done += len(chunk)
                    continue
                output = fn(images).float().cpu().numpy()
                if outputs is None:
                    outputs = np.empty((len(digests), *output.shape[1:]), dtype=np.float32)
                rows = outputs[done : done + len(chunk)]
                rows[:] = output
                del output  # freed before the next batch's temporaries are allocated
                yield chunk, rows
                done += len(chunk)

    def _decoded_chunks(self, chunks: list[list[str]], version: ClassifierVersion, job: JobContext | None,
                        call: CallContext | None = None) -> Iterator[torch.Tensor | None]:
        """Each chunk of stored samples as images (n, 3, S, S), decoded by a thread pool
        while the model runs on the chunk before: decoding and resizing one at a time
        (3 ms a 224 px image) left a GPU idle most of the time. Only the next chunk is
        decoded ahead of the one in use. Each decode holds its own room in
        [server].max_decode_bytes while it runs (:meth:`load_sample_image`) for ``job`` or ``call``;
        the arenas are trimmed once, at the end, not after each. Once an image does not
        decode now, the read will fail: each chunk after it is None, its images decoded only
        to find any others (dropped with their chunk, never stacked), and the end raises :class:`_UndecodableImages`
        naming them all, or those found when the search stops early (:class:`_RefusalSearch`: at
        its time limit or near the deadline of ``job`` or ``call``; on a decoder out of memory
        or a wait for decode memory past the margin before that deadline or past the search's
        time, :meth:`_RefusalSearch.decoding_for`, :func:`_stacked_unless_refused`)."""
        if not chunks:
            return
        pool = ThreadPoolExecutor(max_workers=_DECODE_THREADS, thread_name_prefix="explaind-decode")
        search = _RefusalSearch(sum(map(len, chunks)), call if call is not None else _JobDecodeWait(job))
        try:
            started = time.monotonic()
            upcoming = [pool.submit(self.load_sample_image, digest, version, job=job, call=call, trim=False) for digest in chunks[0]]
            for following in [*chunks[1:], None]:
                images = _stacked_unless_refused(upcoming, search)
                search.timed(time.monotonic() - started)
                if search.stops_before():
                    _raise_if_cancelled(job)
                    raise search.failure()
                # Nothing else holds this chunk's decoded images while the model runs on it.
                started = time.monotonic()
                decoding_for = search.decoding_for(call)
                upcoming = [pool.submit(self.load_sample_image, digest, version, job=job, call=decoding_for, trim=False)
                            for digest in following] if following else []
                yield images
            if search.refusals:
                raise search.failure()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            trim_arenas()

    # Jobs ----------------------------------------------------------------------------

    def evaluate_sample_set(self, sample_set_id: str, *, batch_size: int = 0, max_grid_images: int = 0,
                            request: RequestKey | None = None, caller: str | None = None) -> JobSnapshot:
        """Start a job that classifies a sample set: accuracy, confusion, mistakes grid
        (with ``request``, the job an earlier request of its request_id started, if kept),
        owned by ``caller``."""
        from .evaluation import evaluate

        if (previous := self.jobs.submitted(request)) is not None:
            return previous
        # The job runs on this set, not one made under its id later, and on the samples it holds
        # now, not those appended before the job starts.
        info = self.usable_sample_set(sample_set_id)
        if batch_size < 0 or batch_size > 4096:
            raise InvalidArgument("must be between 1 and 4096, or 0 for the default", field="batch_size")
        if max_grid_images < 0 or max_grid_images > 1024:
            raise InvalidArgument("must be between 1 and 1024, or 0 for 64", field="max_grid_images")
        version = self.models.active
        # Its C² counts take a byte each at least: where they cannot fit a response, its cells do
        # (and where they fit alone but not beside the per-class rows, as evaluate finds).
        most = self.jobs.max_result_bytes
        dense = most is None or len(version.class_names) ** 2 <= most
        run: Callable[[JobContext], object] = lambda context: evaluate(self, context, sample_set_id, info.uid, info.sample_count, version, batch_size,
                                                                      max_grid_images or 64, dense_confusion=dense)
        # Cut, each keeps its head: the most confident mistakes, the cells of the most samples.
        return self.jobs.submit(EVALUATE_KIND, run, cut_lists=("mistakes", "confusion_cells"), request=request, owner=caller,
                                less_work="a smaller batch_size or sample set")  # its features and logits are the whole set's

    def sample_grid(self, digests: Sequence[str], captions: Sequence[str] | None = None, *, job: JobContext | None = None) -> np.ndarray:
        """A (H', W', 3) uint8 tile image of stored samples; their waits for decode memory
        end as ``job`` does (:meth:`load_sample_image`), and so does the grid, between two
        images. Images that do not decode now are found before it fails
        (:class:`_UndecodableImages`), the tiles dropped once one is; the search for more
        stops as a set read's does (:class:`_RefusalSearch`, counting the distinct images
        checked, not tiles), or on a decoder out of memory, failing on those found."""
        tiles: list[np.ndarray] = []
        met: set[str] = set()  # the images checked: a grid may show one in several tiles, and the search counts images
        search = _RefusalSearch(len(set(digests)), _JobDecodeWait(job))
        for digest in digests:
            if search.stops_before():
                _raise_if_cancelled(job)
                raise search.failure()
            if search.refusals:  # bound to fail: its run-time limit ends the search (stops_before), naming those found
                _raise_if_cancelled(job)
            elif job is not None:
                job.raise_if_cancelled()
            if search.refusals and digest in met:  # bound to fail, a tile is drawn no more, and this image was checked
                continue
            started = time.monotonic()
            try:
                image = self.load_sample_image(digest, job=job, call=search.decoding_for(None))
            except _UndecodableImages as refused:
                search.refused(refused.refusals)
                tiles.clear()
            except (DecodeOutOfMemory, DeadlineExceeded):
                if search.refusals:  # the grid fails anyway: on the refusals met, which a retry meets again
                    raise search.failure() from None
                raise
            else:
                if not search.refusals:  # else decoded only to find the others refused
                    tiles.append(to_uint8_hwc(image))
                del image
            search.timed(time.monotonic() - started)
            if digest not in met:
                met.add(digest)
                search.checked += 1
        if search.refusals:
            raise search.failure()
        return image_grid(tiles, list(captions) if captions else None)


__all__ = ["BatchOutput", "Engine", "NewSample", "PredictOptions", "PredictOutput", "SampleFeatures", "check_sample_set_id", "rows_by_digest", "unusable_image"]
