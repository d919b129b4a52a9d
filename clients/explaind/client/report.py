"""``explaind report``: one self-contained HTML page explaining a class's mistakes.

Runs the NeuroInspect loop through the SDK (rank the neurons behind the class's
mistakes, visualise the top ones, suggest a head edit on them and evaluate it) and
renders it with every image inlined (base64 JPEG, or PNG for the small images drawn as
crisp pixels), no scripts and no external resources, so the file can be mailed or
attached to a ticket as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc

from ._client import Client, _is_index
from ._errors import ExplaindError, InvalidArgumentError, NotFoundError, OperationError, ResourceExhaustedError, error_from_code
from ._images import IMAGE_BOX, image_data_uri
from ._interrupted import followed_ranking, following, started_job
from ._neuroinspect import (DEFAULT_STABILITY_RESAMPLES, STEPS_LIMIT_OF_OLDER_SERVERS, HeadEdit, HeadEvaluation, NeuronRanking, NeuronVisualization, NeuronVisualizations,
                            RESAMPLES_STOPPED_BY_SERVER, RankedNeuron, few_mistakes_note, visualization_alts, worst_of)
from ._operations import cancel_outcome
from ._types import escape_controls, html_text

if TYPE_CHECKING:
    from PIL.Image import Image

    from ._operations import Operation

__all__ = ["MistakeReport", "build_report", "render_report"]


# Who started a job, in the words printed should a Ctrl-C inside its start be followed to it
# (an SDK caller's program, or the CLI's report: not "this command").
REPORT_WORDS = "the report"

# Seconds a report stopped by Ctrl-C waits for its edit's job, whose cancel the job may not
# heed before it succeeds (it was running), to end: the version it stored is then named, or
# deleted as the report was asked.
CANCELLED_EDIT_WAIT_S = 5.0

# VisualizeNeuronsRequest takes at most this many (neuron, class) pairs (the proto's 1..64).
VISUALIZATION_PAIRS_PER_REQUEST = 64


@dataclass(frozen=True)
class MistakeReport:
    ranking: NeuronRanking
    visualizations: list[NeuronVisualization]  # one per shown neuron (every ranked one by default), in ranking order
    edit: HeadEdit | None  # the suggested edit (stored as a version, not promoted; deleted again unless kept)
    visualization_method: str
    evaluated_on: str = ""  # the held-out samples of the edit's before/after evaluation
    no_edit_reason: str = ""  # why no edit was suggested, when the server refused one (e.g. too few samples)
    no_visualization_reason: str = ""  # why there are no visualisations (a classifier without gradients)
    # The server's failure that stopped the visualisations part way (a full data dir, or a
    # job out of memory where fewer pairs would not help: one pair, or moving CLIP onto the
    # device); those made before it are kept, and the page still shows the ranking and edit.
    visualization_error: ExplaindError | None = None
    # The results the visualisations came from, with the settings each ran with (method,
    # steps, epsilon...): the page states them beside each image and flags those whose
    # CLIP-Illusion loss flipped sign. A visualisation found in none is shown without them.
    visualization_results: list[NeuronVisualizations] = dataclasses.field(default_factory=list)
    # Where a visualisation job ran out of device memory and its pairs were retried in
    # halves: the fewest pairs of a request that ran out (0: none did), and the most pairs
    # of a request that fit after the first ran out (the pairs last tried where none did;
    # after the last where as many as had fit ran out, another job's memory taken since).
    visualization_out_of_memory_at: int = 0
    visualization_pairs_per_request: int = VISUALIZATION_PAIRS_PER_REQUEST
    # Whether the edit's head version stays stored: False once build_report(keep_edit=False)
    # deleted it (or found it deleted already), True where it was kept or its deletion failed
    # (edit_discard_error says why).
    edit_kept: bool = True
    edit_discard_error: ExplaindError | None = None
    # The `explaind edit-head` command that stores the same edit again (the report's set,
    # class, neurons, validation and evaluation sets, group attribute and seed); "" without an edit.
    edit_command: str = ""
    # The most pairs of any request that fit (0: none did), before the first ran out too, or
    # before as many as had fit ran out: more than visualization_pairs_per_request there.
    # Last, as fields added later are, so positional construction keeps its meaning.
    visualization_largest_fit: int = 0
    # True where the server refused to store the edit as the caller holds as many head
    # versions as [server].max_head_versions_per_caller allows (no_edit_reason: its words):
    # the page goes on without it, saying how to make room, rather than losing the rest.
    edit_at_head_version_limit: bool = False


def build_report(
    client: Client,
    target_class: str | int,
    sample_set_id: str,
    *,
    max_neurons: int | None = None,
    edit_neurons: int = 3,
    steps: int = 100,
    group_attribute: str = "",
    evaluation_sample_set_id: str = "",
    validation_sample_set_id: str = "",
    progress: bool = False,
    stability_resamples: int = DEFAULT_STABILITY_RESAMPLES,
    keep_edit: bool = True,
) -> MistakeReport:
    """Rank, visualise every ranked neuron (or the top ``max_neurons``) on the class (an
    excessive one on its top class by head weight), with CLIP-Illusion when the server has
    CLIP, else the no_clip ablation (none when the classifier has no gradients, e.g. ONNX:
    ``no_visualization_reason`` says so), and edit the head on the top ``edit_neurons`` of
    the ranking (however many are shown). The edit stops early on
    ``validation_sample_set_id``, else on the fifth of the set the server holds out (every
    5th sample), and is evaluated on data it did not train on:
    ``evaluation_sample_set_id``, else that validation data; ``group_attribute`` adds
    per-group accuracy (e.g. "background"). ``stability_resamples`` (0..1000; 0: none) gives
    each ranked neuron its stability, a column of the page's ranking. ``steps`` (0: the
    server's default, 400) is each visualisation's, at most the server's limit
    (``limits.max_visualization_steps``): one past it is INVALID_ARGUMENT before any work.

    The edit is stored as a head version (not promoted), which ``keep_edit=False`` deletes
    as soon as it is evaluated: the report keeps its numbers, ``edit_kept`` is False and
    ``edit_command`` stores it again (the same head, given the same served head and sets:
    its seed fixes the minibatch order); one deleted already (NOT_FOUND) counts as
    deleted. A deletion the server refuses (the version promoted meanwhile) or cannot
    answer leaves it stored, the report going on with the error in ``edit_discard_error``.

    A wrong option of the caller's (an unknown set, a group attribute the samples lack)
    raises, before the visualisations (the longest part) where it can: the edit runs
    before them. A refusal the data causes (too few samples, training that diverged)
    leaves the page without an edit, saying why, as does the server refusing to store it
    as the caller holds as many head versions as ``[server].max_head_versions_per_caller``
    allows (``edit_at_head_version_limit``); a server error that stops the
    visualisations leaves it without the rest of them, in ``visualization_error``, rather
    than losing the ranking and the edit; a job out of device memory for its pairs (the
    server's error names ``pairs``) is retried with half of them, down to one
    (``visualization_out_of_memory_at``), and one out of memory where fewer would not help
    (moving CLIP onto the device, a single image) stops them with the server's words."""
    for name, count in (("edit_neurons", edit_neurons), ("max_neurons", max_neurons)):
        if count is not None and not (_is_index(count) and count >= 1):  # a slice of the ranking: -1 would edit all but the last
            raise ValueError(f"{name} must be a positive integer, got {count!r}")
    if not (_is_index(steps) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0 (0: the server's default, 400), got {steps!r}")
    for field, named in (("evaluation_sample_set_id", evaluation_sample_set_id), ("validation_sample_set_id", validation_sample_set_id)):
        if not isinstance(named, str):  # client.sample_set's own error would name its sample_set_id
            raise TypeError(f"{field} must be a string, got {named!r}")
        if named:
            _require_sample_set(client, named, field)
    _require_visualization_steps(client, steps)
    ranking = followed_ranking(client, sample_set_id, target_class, started_by=REPORT_WORDS, progress=progress,
                               stability_resamples=stability_resamples)
    edit, evaluated_on, no_edit_reason, edit_command = None, "", "", ""
    edit_kept, edit_discard_error, edit_at_head_version_limit = True, None, False
    if ranking.neurons:
        neurons = [n.neuron for n in ranking.neurons[:edit_neurons]]
        try:
            edit, evaluated_on = _suggest_edit(client, ranking.class_name, neurons, sample_set_id, evaluation_sample_set_id,
                                               validation_sample_set_id, group_attribute, progress)
            edit_command = edit_head_command(sample_set_id, ranking.class_name, neurons, evaluation_sample_set_id, validation_sample_set_id,
                                             group_attribute, connection_options(client))
        except KeyboardInterrupt as interrupt:  # in the edit's start or wait: its job may have succeeded all the same, storing a version
            with following(interrupt):  # seconds, waiting for a running job: a SIGTERM's stuck exit then says what this one left
                _settle_interrupted_edit(client, interrupt, keep_edit, lambda: edit_head_command(
                    sample_set_id, ranking.class_name, neurons, evaluation_sample_set_id, validation_sample_set_id, group_attribute,
                    connection_options(client)))
            raise
        except (InvalidArgumentError, OperationError, ResourceExhaustedError) as error:  # refused, or no usable head came of it: the page still shows the rest
            edit_at_head_version_limit = _at_head_version_limit(error)
            if not edit_at_head_version_limit and not _refused_for_the_data(error):
                raise
            no_edit_reason = error.details
    if edit is not None and not keep_edit:  # now, not after the images: an interrupt there leaves no version behind
        edit_discard_error = _discard_edit(client, edit)
        edit_kept = edit_discard_error is not None
    with noting_stored_edit(edit, kept=edit_kept, command=edit_command, discard_error=edit_discard_error):
        visualized = _visualize_ranked(client, ranking, max_neurons, steps, progress)
    visualizations = [v for result in visualized.results for v in result.visualizations]
    return MistakeReport(ranking, visualizations, edit, visualized.method, evaluated_on, no_edit_reason, visualized.no_visualization_reason,
                         visualized.error, visualized.results, visualized.out_of_memory_at, visualized.pairs_per_request,
                         edit_kept, edit_discard_error, edit_command, visualized.largest_fit, edit_at_head_version_limit)


# The setting a server older than the error reasons names in its refusal of a caller's head version past the limit.
_HEAD_VERSION_LIMIT_SETTING = "[server].max_head_versions_per_caller"


def _at_head_version_limit(error: ExplaindError) -> bool:
    """Whether ``error`` is the server refusing to store a head version as its caller holds
    as many as :data:`_HEAD_VERSION_LIMIT_SETTING` allows (at the edit's start, or at its
    end where edits raced past that check), not another RESOURCE_EXHAUSTED: a full job
    queue or a data dir is no reason to go on without the edit. Read from the error's
    reason; a server older than the reasons says it in the message alone, which names the
    setting."""
    if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    if error.reason is not None:
        return error.reason == "HEAD_VERSIONS_PER_CALLER_EXCEEDED"
    return _HEAD_VERSION_LIMIT_SETTING in error.details


def _refused_for_the_data(error: ExplaindError) -> bool:
    """Whether the edit's ``error`` is the server refusing the data (too few samples, a
    class absent from the part trained on) or the job finding no usable head (training
    diverged), not a wrong option of the caller's, which the report raises."""
    if isinstance(error, OperationError):
        refused = error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    else:
        refused = isinstance(error, InvalidArgumentError)
    return refused and not any(field in _CALLERS_OPTIONS for field, _ in error.field_violations)


def _discard_edit(client: Client, edit: HeadEdit) -> ExplaindError | None:
    """Delete the edit's head version, as ``keep_edit=False`` asks: the server's error where
    it stays stored (refused: promoted meanwhile; or unanswered), None where it is gone (one
    deleted already, NOT_FOUND, counts: a cleanup job or an admin was quicker). A Ctrl-C
    inside the deletion names the version as it may stay stored."""
    with noting_stored_edit(edit, deleting=True):
        try:
            client.delete_head_version(edit.version.version_id)
        except NotFoundError:
            pass
        except ExplaindError as error:
            return error
    return None


def _settle_interrupted_edit(client: Client, interrupt: KeyboardInterrupt, keep_edit: bool, edit_command: Callable[[], str]) -> None:
    """Name, on ``interrupt``, the head version of an edit whose job succeeded though the
    interrupt stopped the report in its start or its wait (the cancel came too late), or
    just after (its ``operation`` then the edit's job, set by :func:`_suggest_edit`), and,
    not ``keep_edit``, delete it first, as the report was asked (``edit_command()``: the
    command that stores it again). A job cancelled in time stored none; one still running
    after its cancel is waited for a few seconds (:func:`_ended_after_cancel`)."""
    operation: Operation[HeadEdit] | None = getattr(interrupt, "operation", None)
    if operation is None:
        return
    if not operation.done and not _ended_after_cancel(operation, interrupt):
        return
    if operation.state != "succeeded":
        return
    try:
        edit = operation.result(download=False)  # the result the cancel's answer holds: its version
    except ExplaindError as error:
        interrupt.add_note(f"the suggested edit stays stored as a head version (not served), which reading its result failed to name ({error}): "
                           f"explaind operations get {operation.name} names it, and explaind head-versions delete VERSION deletes it if it is not wanted")
        return
    try:
        discard_error = None if keep_edit else _discard_edit(client, edit)
    except KeyboardInterrupt:  # a second Ctrl-C in the deletion, wherever it landed (before its noting too): on the first, the version may stay stored
        interrupt.add_note(_stored_edit_note(edit, kept=True, command="", discard_error=None, deleting=True))
        return
    interrupt.add_note(_stored_edit_note(edit, kept=keep_edit or discard_error is not None, command="" if keep_edit else edit_command(),
                                         discard_error=discard_error))


def _ended_after_cancel(operation: Operation[HeadEdit], interrupt: KeyboardInterrupt) -> bool:
    """Wait, at most :data:`CANCELLED_EDIT_WAIT_S` (a second Ctrl-C stops it), for the edit's
    job whose cancel was only requested (it was running) to end: it may still succeed and
    store a version. False, with a note on ``interrupt`` saying how to find and delete that
    version, where it had not ended; where it had, the cancel's note ("it ends at its next
    check") says how it ended. One whose cancel failed or was cut short (a second
    Ctrl-C) runs on: it is not waited for, its note said at once. While waiting, that note
    is on ``interrupt`` already, for an exit cutting the wait short (the CLI's, where a
    SIGTERM's command does not end in time) to say."""

    def may_store(why: str) -> str:
        return (f"{operation.name} may still store the suggested edit as a head version ({why}): explaind operations get "
                f"{operation.name} names the version once it has succeeded, and explaind head-versions delete VERSION deletes it")

    requested = cancel_outcome(operation)  # as the cancel's note says it of the running job
    meanwhile = None
    if not operation.cancel_requested:
        why = "its cancel failed"
    else:
        with contextlib.suppress(OSError):  # stderr's reader gone: the wait, and the interrupt's notes, matter more than this line
            print(f"interrupted: waiting up to {CANCELLED_EDIT_WAIT_S:g} s for the cancelled edit {operation.name} to end, as it may still "
                  "store a head version (a second Ctrl-C stops waiting)", file=sys.stderr, flush=True)
        meanwhile = may_store("waiting for it to end was cut short")
        interrupt.add_note(meanwhile)
        try:
            operation.wait(CANCELLED_EDIT_WAIT_S)
            why = f"it had not ended after {CANCELLED_EDIT_WAIT_S:g} s of waiting"
        except KeyboardInterrupt:
            why = "waiting for it to end was interrupted"
        except ExplaindError as error:  # e.g. the server gone
            why = f"waiting for it to end failed ({error})"
    if not operation.done:
        interrupt.add_note(may_store(why))
    elif requested in getattr(interrupt, "__notes__", ()):  # no note where the cancel said none
        ended = cancel_outcome(operation) if operation.state == "cancelled" else f"{operation.name} {operation.state} before its cancel took effect"
        interrupt.__notes__[interrupt.__notes__.index(requested)] = ended
    if meanwhile is not None:  # gone after its successor came: an exit reading the notes between finds one
        interrupt.__notes__.remove(meanwhile)
    return operation.done


@contextlib.contextmanager
def noting_stored_edit(edit: HeadEdit | None, *, kept: bool = True, command: str = "",
                       discard_error: ExplaindError | None = None, deleting: bool = False) -> Iterator[None]:
    """Name the suggested edit on an error or Ctrl-C that stops the report after it (in the
    images, or writing the page): else nothing would mention it. Stored already, or, not
    ``kept``, deleted: then ``command`` (the report's ``edit_command``) stores it again.
    Kept as its deletion failed (``discard_error``, the report's ``edit_discard_error``), not
    said to be unserved: the server refuses to delete the served head, so it may be served.
    Stopped while ``deleting`` it: the server may have deleted it or not."""
    try:
        yield
    except BaseException as error:
        if edit is not None:
            error.add_note(_stored_edit_note(edit, kept=kept, command=command, discard_error=discard_error, deleting=deleting))
        raise


def _stored_edit_note(edit: HeadEdit, *, kept: bool, command: str, discard_error: ExplaindError | None, deleting: bool = False) -> str:
    """What became of the suggested edit's head version, as :func:`noting_stored_edit` says it."""
    version = edit.version.version_id
    if deleting:
        return (f"head version {version}, the suggested edit, may stay stored: the report stopped as it deleted it; "
                f"explaind head-versions delete {version} if it is still listed")
    if not kept:
        return f"head version {version}, the suggested edit, was not kept; {shown_command(command)} stores it again"
    if discard_error is not None:
        return (f"head version {version}, the suggested edit, stays stored: deleting it failed ({discard_error}); "
                f"explaind head-versions delete {version} once it can be")
    return f"head version {version}, the suggested edit, stays stored (not served); explaind head-versions delete {version} if it is not wanted"


@dataclass(frozen=True)
class _Visualized:
    """What :func:`_visualize_ranked` made, and how (MistakeReport's fields of the same names)."""

    results: list[NeuronVisualizations]
    method: str
    no_visualization_reason: str
    error: ExplaindError | None
    out_of_memory_at: int
    pairs_per_request: int
    largest_fit: int


def _visualize_ranked(client: Client, ranking: NeuronRanking, max_neurons: int | None, steps: int, progress: bool) -> _Visualized:
    """Visualise every ranked neuron (or the top ``max_neurons``) on the class (an
    excessive one on its top class, :func:`_conditioning_class`): the results (each
    request's visualisations with the settings they ran with), the method, why there are
    none where the classifier has no gradients, and the server's error that stopped them
    part way (those before it kept). A job out of device memory optimising its pairs in
    one batch is retried with half of them (or, once one fit, with as many as the most
    that did), and each request that fits lets the next take half the way up to the fewest
    pairs that ran out: a bisection that finds about as many as the device holds in a few
    jobs out of memory (each fails at its first step), where staying at the half took up
    to twice the requests, each a job's setup and steps. Never back to a size that ran
    out: that is the device's memory for this model and these settings (a memory another
    job held for a while is not told apart); where as many as had fit run out, the most
    that fit is forgotten and the halving starts again from them, so each request out of
    memory is smaller than the last. Only memory that fewer pairs would not free stops them
    (one pair, or moving CLIP onto the device: the server's error names no ``pairs``)."""
    shown = ranking.neurons if max_neurons is None else ranking.neurons[:max_neurons]
    meta = client.model_metadata()
    clip = meta.components.get("clip")
    method = "clip_illusion" if clip is not None and clip.loaded else "no_clip"
    results: list[NeuronVisualizations] = []
    no_visualization_reason = "" if meta.supports_visualization or not shown else (
        f"the served {meta.loader} classifier has no gradients to optimise images with; visualising neurons needs a PyTorch classifier")
    # The pairs of the next request; the fewest of one that ran out (0: none yet); the most of one that fit since; of any that fit.
    per_request, out_of_memory_at, fits, largest_fit, start = VISUALIZATION_PAIRS_PER_REQUEST, 0, 0, 0, 0
    while meta.supports_visualization and start < len(shown):
        pairs = [(n.neuron, _conditioning_class(n, ranking.class_name)) for n in shown[start : start + per_request]]
        try:
            results.append(started_job(client, lambda request_id: client.visualize_neurons(pairs, method=method, steps=steps, request_id=request_id),
                                       started_by=REPORT_WORDS, rerun_hint=False).result(progress=progress))
        except ExplaindError as error:  # the queue full, a job out of memory on one pair or moving CLIP: what came before is still worth its page
            if not (_out_of_device_memory(error) and len(pairs) > 1):
                return _Visualized(results, method, no_visualization_reason, error, out_of_memory_at, fits or per_request, largest_fit)
            if fits >= len(pairs):  # as many as had fit ran out (memory another job took): halve again, from these
                fits = 0
            out_of_memory_at, per_request = len(pairs), fits or (len(pairs) + 1) // 2  # fits < every size that ran out
            if progress:
                print(f"the device ran out of memory visualising {out_of_memory_at} pairs at once; retrying {per_request} at a time",
                      file=sys.stderr)
            continue
        start += len(pairs)
        largest_fit = max(largest_fit, len(pairs))
        if out_of_memory_at:
            fits = max(fits, len(pairs))
            per_request = (fits + out_of_memory_at) // 2
    return _Visualized(results, method, no_visualization_reason, None, out_of_memory_at, fits or per_request, largest_fit)


def _conditioning_class(neuron: RankedNeuron, class_name: str) -> str | None:
    """The class a ranked neuron's image is conditioned on: the explained class for a
    neuron that fired too little for it (insufficient, or both); for an excessive one,
    which fired too much and pushed the mistakes elsewhere, None: the server's automatic
    choice, the class whose head weight for the neuron is largest (the paper conditions
    on "classes correlated to features embedded in the neurons"). The explained class's
    weight for an excessive neuron is small or negative, so α_n + γ·l_c pulls two ways:
    on the shapes world's heart, its excessive neurons reached about a third of the
    activation conditioned on heart that they reached on their top class
    (bench/excessive_conditioning.py)."""
    return None if neuron.direction == "excessive" else class_name


def _out_of_device_memory(error: ExplaindError) -> bool:
    """Whether a visualisation job failed for its batch of pairs not fitting the device's
    memory (RESOURCE_EXHAUSTED on field ``pairs``), which fewer pairs per request may fit;
    a full queue, say, is RESOURCE_EXHAUSTED on no field, as is memory that ran out where
    fewer pairs would not help (moving CLIP onto the device, optimising a single image)."""
    return isinstance(error, ResourceExhaustedError) and error.field == "pairs"


def _require_visualization_steps(client: Client, steps: int) -> None:
    """Fail now, in the server's words, if ``steps`` is past the server's limit: its
    visualisations would refuse it only after the ranking and a stored edit."""
    limit = client.model_metadata().limits.max_visualization_steps or STEPS_LIMIT_OF_OLDER_SERVERS
    if steps > limit:
        message = f"{steps} is not in [1, {limit}] (0 means 400)"
        raise error_from_code(grpc.StatusCode.INVALID_ARGUMENT, f"steps: {message}", [("steps", message)])


# Request fields build_report's caller chose: the edit refusing one of them is the caller's mistake.
_CALLERS_OPTIONS = ("group_attribute", "evaluation_sample_set_id", "validation_sample_set_id")


def _require_sample_set(client: Client, sample_set_id: str, field: str) -> None:
    """Fail now if ``sample_set_id``, given as the report's ``field``, names no set: the
    edit would say so only after the ranking."""
    try:
        client.sample_set(sample_set_id)
    except (NotFoundError, InvalidArgumentError) as error:  # named as the report's argument, not GetSampleSet's
        message = error.details.removeprefix("sample_set_id: ")
        raise error_from_code(error.code, f"{field}: {message}", [(field, message)]) from None


# The seed the report's edit runs with (edit_head's default, written out in its command).
EDIT_SEED = 0


def _edit_description(class_name: str) -> str:
    return f"suggested by explaind report for {class_name}"


def edit_head_command(sample_set_id: str, class_name: str, neurons: list[int], evaluation_sample_set_id: str, validation_sample_set_id: str,
                      group_attribute: str, connection: Sequence[str] = ()) -> str:
    """The ``explaind edit-head`` command that makes the report's edit again, quoted for a
    POSIX shell (:func:`shlex.split` reads it back; :func:`shown_command` is its form to
    show), ending in the ``connection`` options (:func:`connection_options`); ``--class name:X``
    where X alone would read as an index, a prefix or an option ("-x"), and ``--option=value``
    where the value (an attribute named "-x") would read as an option too."""
    plain = not (class_name.isdecimal() or class_name.startswith(("-", "name:", "index:")))
    words = ["explaind", "edit-head", sample_set_id, "--class", class_name if plain else f"name:{class_name}",
             "--neurons", *map(str, neurons), "--seed", str(EDIT_SEED)]
    for option, value in (("--validation-sample-set", validation_sample_set_id), ("--evaluation-sample-set", evaluation_sample_set_id),
                          ("--group-attribute", group_attribute)):
        if value:
            words.append(f"{option}={value}")
    return shlex.join([*words, "--description", _edit_description(class_name), *connection])


def connection_options(client: Client) -> list[str]:
    """The CLI options that reach the server ``client`` calls, for a command run elsewhere
    (where EXPLAIND_TARGET may name another server): ``--target``, and where it connects over
    TLS ``--tls`` and its PEM files' absolute paths (a ``unix:`` socket's path absolute too:
    gRPC reads ``unix:run/x.sock`` from the current directory). Never its token, a secret: the
    command takes EXPLAIND_TOKEN or --token as any other does."""
    arguments = client._arguments
    files = (("--ca-file", "root_certificates"), ("--cert-file", "certificate_chain"), ("--key-file", "private_key"))
    target = client.target
    if target.startswith("unix:") and not target.startswith("unix://"):  # unix:///path is absolute already
        target = f"unix:{os.path.abspath(target.removeprefix('unix:'))}"
    return [f"--target={target}", *(["--tls"] if arguments["tls"] else []),
            *(f"{flag}={arguments[name]}" for flag, name in files if arguments[name] is not None)]


# A byte that did not decode, as os.fsdecode holds it (surrogateescape).
_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")


def shown_command(command: str) -> str:
    """``command`` (:func:`shlex.join`'s POSIX shell words) as a page or a terminal shows it,
    still working when pasted: a word holding a control, bidirectional-control or
    line-separator character (a class named with a line break) in ANSI-C quotes,
    ``$'heart\\nnew'``, which bash and zsh read back (dash does not, nor POSIX.1-2024 sh
    its ``\\u``; ksh93 may take a hex digit after ``\\x1b`` as the escape's), not raw, which a terminal acts on and a page shows as a space, nor
    escaped inside plain quotes, which the shell takes as a backslash and an "n". A C1
    control (U+0080..U+009F) is written ``\\u0085``: ``$'\\x85'`` is the byte 0x85, no UTF-8.
    A byte of a file name that does not decode (a TLS file's: Python holds it as a lone
    surrogate, which no page or terminal encodes) is written as that byte, ``\\xff``."""
    def character(text: str) -> str:
        if text in "\\'":
            return "\\" + text
        if _UNDECODED_BYTE.fullmatch(text):
            return f"\\x{os.fsencode(text)[0]:02x}"
        if escape_controls(text) == text:
            return text
        return escape_controls(text) if text < "\x80" else f"\\u{ord(text):04x}"

    def word(text: str) -> str:
        if escape_controls(text) == text and not _UNDECODED_BYTE.search(text):
            return shlex.quote(text)
        return "$'" + "".join(map(character, text)) + "'"

    return " ".join(word(text) for text in shlex.split(command))


def _suggest_edit(
    client: Client, class_name: str, neurons: list[int], sample_set_id: str, evaluation_sample_set_id: str, validation_sample_set_id: str,
    group_attribute: str, progress: bool,
) -> tuple[HeadEdit, str]:
    """The edit, and which samples its before/after evaluation used."""
    operation = started_job(client, lambda request_id: client.edit_head(
        sample_set_id, target_class=class_name, neurons=neurons, group_attribute=group_attribute,
        evaluation_sample_set_id=evaluation_sample_set_id, validation_sample_set_id=validation_sample_set_id,
        seed=EDIT_SEED, description=_edit_description(class_name), request_id=request_id), started_by=REPORT_WORDS, rerun_hint=False)
    edit = operation.result(progress=progress)
    try:
        return edit, edit_evaluated_on(client, sample_set_id, evaluation_sample_set_id, validation_sample_set_id)
    except KeyboardInterrupt as interrupt:  # its job succeeded: build_report names its version, or deletes it as asked
        interrupt.operation = operation  # type: ignore[attr-defined]
        raise
    except BaseException as error:
        error.add_note(_stored_edit_note(edit, kept=True, command="", discard_error=None))
        raise


def edit_evaluated_on(client: Client, sample_set_id: str, evaluation_sample_set_id: str, validation_sample_set_id: str) -> str:
    """Which samples an edit of ``sample_set_id`` measured its before/after accuracy on,
    for a reader who would otherwise compare it with an evaluation of the whole set."""
    independent = ": --evaluation-sample-set gives an independent set"
    optimistic = f"; they also chose the best epoch, so these numbers lean optimistic{independent}"
    if evaluated := evaluation_sample_set_id or validation_sample_set_id:
        count = client.sample_set(evaluated).sample_count
        if evaluated == sample_set_id:  # the set trained on: all of it beside a validation set, else all but every 5th sample
            trained = "all" if validation_sample_set_id else str(count - len(range(0, count, 5)))
            return f"sample set {evaluated} ({count} samples), {trained} of which the edit trained on, so these numbers lean optimistic{independent}"
        return f"sample set {evaluated} ({count} samples)" + ("" if evaluation_sample_set_id else optimistic)
    # The server held out every 5th sample: the edit's validation and evaluation data.
    held_out = len(range(0, client.sample_set(sample_set_id).sample_count, 5))
    return f"the {held_out} samples of {sample_set_id} held out from training (every 5th, from sample 0){optimistic}"


def _number(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _signed(value: float) -> str:
    """``value`` with its sign, to 3 decimals; one that rounds to zero is +0.000, not -0.000."""
    return "–" if math.isnan(value) else f"{round(value, 3) + 0.0:+.3f}"


# Class rows of the edit's table; an ImageNet-sized set would give a thousand.
_CLASS_ROWS = 20


def _mean(values: list[float]) -> float:
    """Mean of the values that are numbers; NaN if none is."""
    numbers = [v for v in values if not math.isnan(v)]
    return sum(numbers) / len(numbers) if numbers else math.nan


def _evaluation_rows(before: HeadEvaluation, after: HeadEvaluation, edited_class: str = "") -> str:
    """Overall, worst-class and worst-group accuracy (each version's own worst, which may
    be different classes or groups, or none where all tie), then every group that was
    worst in either version and every class, before and after. Beyond ``_CLASS_ROWS``
    classes: the edited class and those whose accuracy changed most, then the mean of
    the rest."""

    def worst(kind: str, old: str, new: str) -> str:
        return f"worst {kind} ({old})" if old == new else f"worst {kind} ({old} → {new})"

    rows = [("overall accuracy", before.accuracy, after.accuracy),
            (worst("class", worst_of(before.class_accuracy, before.worst_class), worst_of(after.class_accuracy, after.worst_class)),
             before.worst_class_accuracy, after.worst_class_accuracy)]
    if after.worst_group:
        rows.append((worst("group", worst_of(before.group_accuracy, before.worst_group), worst_of(after.group_accuracy, after.worst_group)),
                     before.worst_group_accuracy, after.worst_group_accuracy))
        rows += [(f"group {group}", before.group_accuracy.get(group, math.nan), after.group_accuracy.get(group, math.nan))
                 for group in dict.fromkeys((before.worst_group, after.worst_group)) if group]
    classes = [(name, before.class_accuracy.get(name, math.nan), value) for name, value in after.class_accuracy.items()]
    rest: list[tuple[str, float, float]] = []
    if len(classes) > _CLASS_ROWS:
        def shown_first(row: tuple[str, float, float]) -> tuple[bool, float]:
            name, old, new = row
            return name != edited_class, 0.0 if math.isnan(old) else -abs(new - old)

        classes.sort(key=shown_first)  # stable: equal changes stay in class order
        classes, rest = classes[:_CLASS_ROWS - 1], classes[_CLASS_ROWS - 1:]
    rows += [(f"class {name}", old, new) for name, old, new in classes]
    if rest:
        rows.append((f"the other {len(rest)} classes, mean", _mean([old for _, old, _ in rest]), _mean([new for _, _, new in rest])))
    return "".join(
        f"<tr><th scope='row'>{html_text(label)}</th><td>{_number(b)}</td><td>{_number(a)}</td><td>{_signed(a - b)}</td></tr>"
        for label, b, a in rows
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; background: #fff; max-width: 1100px; overflow-wrap: anywhere; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { padding: .25em .7em; border-bottom: 1px solid #eee; text-align: right; overflow-wrap: normal; }
td:first-child, th:first-child, .text, .names { text-align: left; }
.names, .evaluation tbody th { overflow-wrap: anywhere; }
th[scope=row] { font-weight: normal; }
.neurons { display: flex; flex-wrap: wrap; gap: 1em; }
.neuron { border: 1px solid #ddd; border-radius: 6px; padding: .6em; width: 300px; margin: 0; }
.muted { color: #595959; font-size: .9em; }
.warning { color: #9b1c1c; }
.neuron.flipped { border: 2px solid #9b1c1c; }
@media print {
  body { margin: 0; max-width: none; }
  td, th { padding: .2em .4em; }
  .neuron, tr { break-inside: avoid; }
  h2 { break-after: avoid; }
}
"""
_STYLE += (f".neuron img {{ width: {IMAGE_BOX}px; height: {IMAGE_BOX}px; border: 1px solid #ccc; }}\n"
           ".neuron img[data-upscaled] { image-rendering: pixelated; }\n")  # small inputs as crisp pixels, larger smoothly scaled


# What the numbers mean, under the tables that show them (NeuroInspect's definitions);
# {top}: how many neurons per mistake and direction the ranking took.
_RANKING_LEGEND = (
    "<p class='muted' id='ranking-legend'>Each mistake gets the smallest shift ω of the penultimate features that makes the "
    "classifier predict its true class. <b>insufficient</b>: the share of mistakes in which the neuron is among the largest "
    "increases ({top}): it fired too little. <b>excessive</b>: among the largest decreases: it fired too much. "
    "<b>direction</b>: the list whose cut it passed, or both. <b>mean ω</b>: its mean shift over the mistakes, in feature units. <b>importance</b>: the class's probability on its mean "
    "feature divided by the same with this neuron zeroed; above 1 the neuron speaks for the class. <b>top classes</b>: the "
    "classes whose head weight for the neuron is largest.{stability}</p>"
)
_STABILITY_LEGEND = (
    " <b>stability</b>: the share of {resamples} bootstrap resamples{of} of the mistakes (as many, drawn with replacement) whose own "
    "ranking has the neuron in its top 5: about how often a fresh set of as many mistakes would rank it there."
)
_VISUALIZATION_LEGEND = (
    "<p class='muted' id='visualization-legend'>Left, an image optimised to make the neuron fire within the class named on its "
    "card: the explained class for a neuron that fired too little (insufficient or both); for an excessive one, the class whose "
    "head weight for it is largest, the class it speaks for, as the explained class's weight for it is small or negative. Right, the "
    "same with the regions where it fires little dimmed. <b>activation α</b>: the neuron's value on the image, as the head reads "
    "it. <b>logit</b>: the class's logit on it. <b>CLIP similarity</b>: cosine between the image and the class's prompts (– "
    "without CLIP). <b>core relevance</b>: that similarity minus the same with the neuron's region greyed out: how much of the "
    "class's look the neuron's region carries. <b>mask area</b>: the share of the image left undimmed.</p>"
)


# Classes named in "predicted instead as"; a 1000-class model's mistakes of one class
# went to hundreds of others, a paragraph pages long above the ranking.
_PREDICTED_SHOWN = 10


def _class_list(names: list[str]) -> str:
    """Class names, escaped, separated by semicolons: ImageNet's names hold commas
    ("great white shark, white shark, man-eater, ...")."""
    return "; ".join(html_text(name) for name in names)


def _predicted_as(predicted_as: dict[str, int]) -> str:
    """The classes the mistakes were predicted as, most first, the first ``_PREDICTED_SHOWN``
    named and the rest counted."""
    ordered = sorted(predicted_as.items(), key=lambda item: -item[1])  # stable: equal counts keep their order
    shown, rest = ordered[:_PREDICTED_SHOWN], ordered[_PREDICTED_SHOWN:]
    text = "; ".join(f"{html_text(name)} ({count})" for name, count in shown) or "–"
    if rest:
        others = sum(count for _, count in rest)
        text += f"; and {len(rest)} other class{'' if len(rest) == 1 else 'es'} ({others} mistake{'' if others == 1 else 's'})"
    return text


# Flipped images the page's warning links to; the rest it counts (each card says so too).
_FLIPPED_LINKED = 10


def _flipped_warning(flipped: list[NeuronVisualization], shown: int) -> str:
    """The page's warning over the visualisations whose CLIP-Illusion loss flipped sign,
    linking to each, and how to make them again; "" for none."""
    if not flipped:
        return ""
    links = ", ".join(f"<a href='#neuron-{v.neuron}'>neuron {v.neuron}</a>" for v in flipped[:_FLIPPED_LINKED])
    if len(flipped) > _FLIPPED_LINKED:
        links += f" and {len(flipped) - _FLIPPED_LINKED} more"
    return (f"<p id='flipped-warning' class='warning'><strong>Warning:</strong> {len(flipped)} of the {shown} images shown ({links}) ended with "
            "CLIP similarity + epsilon ≤ 0: CLIP-Illusion's loss, −(cos + ε)(α + γ·logit), then rewarded a lower activation, so they do "
            "not show what makes their neuron fire. Make them again with a larger epsilon: <code>explaind visualize --epsilon</code>, "
            "the SDK's <code>visualize_neurons(epsilon=...)</code>, or the server's <code>[clip].illusion_epsilon</code>.</p>")


def _edit_storage(report: MistakeReport) -> str:
    """What became of the suggested edit's head version: stored (how to serve or delete it),
    deleted as the report was asked (how to store it again), or kept after its deletion failed."""
    version = cast("HeadEdit", report.edit).version
    stored = f"Stored as head version <b>{html_text(version.version_id)}</b> (from {html_text(version.parent_version_id)})"
    delete = f"<code>explaind head-versions delete {html_text(version.version_id)}</code>"
    if not report.edit_kept:
        return (f"<span id='edit-not-kept'>{stored} to be evaluated, then deleted as the report was asked: not kept.</span> To store it again: "
                f"<code id='edit-command'>{html_text(shown_command(report.edit_command))}</code> (its seed fixes the minibatch order: the same head, as long as "
                f"the served head is still {html_text(version.parent_version_id)} and the sets are unchanged).")
    if report.edit_discard_error is not None:
        return (f"<span id='edit-discard-failed' class='warning'>{stored}; deleting it, as the report was asked, failed "
                f"({html_text(str(report.edit_discard_error))}), so it stays stored:</span> {delete} once it can be.")
    return (f"{stored}; not served until promoted: <code>explaind head-versions promote {html_text(version.version_id)}</code>, "
            f"or, if you do not want it, {delete}.")


def render_report(report: MistakeReport) -> str:
    """The report as one HTML document (UTF-8, images inlined, no scripts)."""
    ranking = report.ranking
    escape = html_text
    predicted = _predicted_as(ranking.predicted_as)
    # Each visualisation's result (its settings), and those flipped, by identity: the results hold these very objects.
    result_of = {id(v): result for result in report.visualization_results for v in result.visualizations}
    flipped_ids = {id(v) for result in report.visualization_results for v in result.flipped()}
    flipped = [v for v in report.visualizations if id(v) in flipped_ids]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>explaind: mistakes of class {escape(ranking.class_name)} (model {escape(ranking.model_version)})</title><style>{_STYLE}</style></head><body>",
        f"<h1>Why the classifier gets <em>{escape(ranking.class_name)}</em> wrong</h1>",
        f"<p class='muted'>sample set {escape(ranking.sample_set_id)} · model {escape(ranking.model_version)} · solver {escape(ranking.solver)}</p>",
        _flipped_warning(flipped, len(report.visualizations)),
        f"<h2>Mistakes</h2><table aria-label='the mistakes on class {escape(ranking.class_name)}'>",
        f"<tr><th scope='row'>samples in the set</th><td>{ranking.sample_count}</td></tr>",
        f"<tr><th scope='row'>mistakes on <span class='names'>{escape(ranking.class_name)}</span></th><td>{ranking.mistake_count}</td></tr>",
        f"<tr><th scope='row'>counterfactuals that flip the prediction</th><td>{ranking.converged_count}</td></tr>",
        f"<tr><th scope='row'>predicted instead as</th><td class='names'>{predicted}</td></tr></table>",
        "<h2>Ranked neurons</h2>",
    ]
    shown = {v.neuron for v in report.visualizations}
    if (few := few_mistakes_note(ranking.mistake_count)) is not None:
        parts.append(f"<p id='few-mistakes' class='warning'>{escape(few[0].upper() + few[1:])}.</p>")
    if ranking.neurons:
        # The header rows in <thead>: printed, each page of a long ranking repeats them over its numbers.
        # Each row led by its neuron as the row's header: a screen reader reads a number with its neuron and its column.
        stable = ranking.stability_resamples > 0
        stability = "<th scope='col'>stability</th>" if stable else ""
        parts.append(f"<table aria-label='neurons ranked by the mistakes on class {escape(ranking.class_name)}'><thead><tr>"
                     "<th scope='col'>neuron</th><th scope='col' class='text'>direction</th><th scope='col'>insufficient</th>"
                     "<th scope='col'>excessive</th><th scope='col'>mean ω</th><th scope='col'>importance</th>"
                     f"{stability}<th scope='col' class='text'>top classes</th></tr></thead><tbody>")
        for n in ranking.neurons:
            neuron = f"<a href='#neuron-{n.neuron}'>{n.neuron}</a>" if n.neuron in shown else str(n.neuron)
            parts.append(
                f"<tr><th scope='row'>{neuron}</th><td class='text'>{escape(n.direction)}</td><td>{n.insufficient_ratio:.0%}</td><td>{n.excessive_ratio:.0%}</td>"
                f"<td>{_signed(n.mean_omega)}</td><td>{_number(n.importance)}</td>{f'<td>{n.stability:.0%}</td>' if stable else ''}"
                f"<td class='names'>{_class_list(n.top_classes)}</td></tr>"
            )
        # A server too old to say (0) took the default, 5 (or D where D < 5).
        parts.append("</tbody></table>" + _RANKING_LEGEND.format(
            top=f"the {ranking.top_k} largest" if ranking.top_k else "top 5 by default",
            stability=_STABILITY_LEGEND.format(
                resamples=ranking.stability_resamples, of=f" (of {ranking.stability_resamples_requested} asked: {RESAMPLES_STOPPED_BY_SERVER} "
                "stopped the rest)" if ranking.stability_resamples_requested else "") if stable else ""))
    elif not ranking.mistake_count:  # not an empty table under a heading that asks why
        parts.append(f"<p id='no-mistakes'>The classifier makes no mistakes on {escape(ranking.class_name)} in this set: nothing to explain.</p>")
    else:
        parts.append("<p id='no-neurons'>No neuron passed the cut ratio; nothing to visualise or edit.</p>")
    if report.visualizations:
        parts.append(f"<h2>What the ranked neurons respond to <span class='muted'>({escape(report.visualization_method)})</span></h2>")
        if report.visualization_method == "no_clip":  # build_report's choice when the server has no CLIP
            parts.append("<p id='no-clip'>The server has no CLIP model loaded ([clip] in its config), so these images are optimised for "
                         "the neuron and the class's logit alone (no_clip), and their CLIP similarity and core relevance are not measured.</p>")
        parts.append("<div class='neurons'>")
        by_neuron = {n.neuron: n for n in ranking.neurons}
        for v in report.visualizations:
            ranked = by_neuron.get(v.neuron)
            # build_report's visualisations are downloaded (result() with download=True): their images are set.
            image, masked_image = cast("Image", v.image), cast("Image", v.masked_image)
            upscaled = " data-upscaled" if image.width < IMAGE_BOX else ""
            # Each image's alt names its neuron and class and says what it is: read out alone
            # (a screen reader, a page printed without images), "neuron 7 masked" said neither.
            subject = f"neuron {v.neuron}, class {escape(v.class_name)}"
            image_alt, masked_alt = map(escape, visualization_alts(v))
            result = result_of.get(id(v))
            settings = f"<br><span class='muted settings'>{escape(result._made_with())}</span>" if result is not None else ""
            # Said in words beside the images, not by the card's colour alone.
            warning = (f"<p class='warning'><strong>Warning:</strong> CLIP similarity + epsilon ≤ 0 (epsilon {result.epsilon:g}): "
                       "the optimiser lowered the neuron's activation, so this image does not show what makes it fire.</p>"
                       if result is not None and id(v) in flipped_ids else "")
            parts.append(
                f"<figure class='neuron{' flipped' if warning else ''}' id='neuron-{v.neuron}'><figcaption><b>neuron {v.neuron}</b> · "
                f"class {escape(v.class_name)}{settings}</figcaption>"
                f"<img class='visualization' data-neuron='{v.neuron}'{upscaled} alt='{image_alt}' "
                f"src='{image_data_uri(image)}'> "
                f"<img class='mask' data-neuron='{v.neuron}'{upscaled} alt='{masked_alt}' src='{image_data_uri(masked_image)}'>{warning}"
                f"<table aria-label='{subject}: measures'><tr><th scope='row'>activation α</th><td>{_number(v.activation)}</td></tr><tr><th scope='row'>logit</th><td>{_number(v.logit)}</td></tr>"
                f"<tr><th scope='row'>importance</th><td>{_number(ranked.importance if ranked else math.nan)}</td></tr>"
                f"<tr><th scope='row'>CLIP similarity</th><td>{_number(v.clip_similarity)}</td></tr><tr><th scope='row'>core relevance</th><td>{_number(v.core_relevance)}</td></tr>"
                f"<tr><th scope='row'>mask area</th><td>{v.mask_fraction:.0%}</td></tr></table></figure>"
            )
        parts.append(f"</div>{_VISUALIZATION_LEGEND}")
        if report.visualization_error is None and len(shown) < len(ranking.neurons):  # asked for fewer, not stopped
            # Both ways of asking named: a page build_report made in a program had no --neurons.
            parts.append(f"<p class='muted' id='visualization-limited'>Visualised: the top {len(shown)} of the {len(ranking.neurons)} "
                         "ranked neurons, as many as the report was asked for (explaind report's --neurons, build_report's "
                         "max_neurons); the rest are in the ranking above, without a link.</p>")
    elif report.no_visualization_reason or report.visualization_error:
        parts.append("<h2>What the ranked neurons respond to</h2>")
        if report.no_visualization_reason:
            parts.append(f"<p id='no-visualization'>Not shown: {escape(report.no_visualization_reason)}.</p>")
    if report.visualization_out_of_memory_at:
        # A request larger than the last size fit before (the first, or before memory another job took): "at most" would understate.
        earlier = (f" (the largest request that fit held {report.visualization_largest_fit} pairs, before that)"
                   if report.visualization_largest_fit > report.visualization_pairs_per_request else "")
        parts.append(f"<p class='muted' id='visualization-halved'>The server's device ran out of memory optimising "
                     f"{report.visualization_out_of_memory_at} pairs at once{earlier}, so the visualisations were requested "
                     f"at most {report.visualization_pairs_per_request} at a time after it.</p>")
    if report.visualization_error is not None:
        parts.append(f"<p id='visualization-failed'>The visualisations stopped after {len(report.visualizations)} of the ranked neurons: "
                     f"{escape(str(report.visualization_error))}</p>")
    if report.edit is not None:
        version = report.edit.version
        parts.append(
            f"<h2>Suggested head edit</h2><p>Retrain the head ({escape(version.method)}) to shrink the effect of neurons "
            f"{', '.join(map(str, version.neurons))} on the decision for <em>{escape(version.class_name)}</em>. {_edit_storage(report)}</p>"
        )
        if version.evaluation is not None and version.parent_evaluation is not None:
            parts.append(f"<table class='evaluation' aria-label='accuracy of head version {escape(version.parent_version_id)} and of the edited "
                         f"{escape(version.version_id)}'><thead><tr><th scope='col'>metric</th><th scope='col'>{escape(version.parent_version_id)}</th>"
                         f"<th scope='col'>{escape(version.version_id)}</th><th scope='col'>change</th></tr></thead><tbody>")
            parts.append(_evaluation_rows(version.parent_evaluation, version.evaluation, version.class_name))
            parts.append(f"</tbody></table><p class='muted' id='evaluated-on'>Evaluated on {escape(report.evaluated_on)}.</p>")
    elif ranking.neurons and report.edit_at_head_version_limit:
        parts.append("<h2>Suggested head edit</h2><p id='no-edit' class='warning'>None evaluated: the server refused to store it, as this "
                     f"caller holds as many head versions as it may ({escape(report.no_edit_reason)}). To have one: delete the versions "
                     "it no longer needs (<code>explaind head-versions list</code> names them, <code>explaind head-versions delete "
                     "VERSION</code> deletes one), or have an admin raise the limit, and run the report again.</p>")
    elif ranking.neurons and report.no_edit_reason:
        parts.append(f"<h2>Suggested head edit</h2><p id='no-edit'>None: the server refused the edit ({escape(report.no_edit_reason)}).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
