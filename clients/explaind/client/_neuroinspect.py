"""NeuroInspect results as dataclasses (numpy arrays, PIL images) and their converters."""

from __future__ import annotations

import datetime as dt
import io
import math
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from explaind.class_names import class_name_key
from explaind.methods.ranking_text import check_limit, neuron_lines
from explaind.v1 import neuroinspect_pb2
from explaind.wording import counted

from ._images import IMAGE_BOX, image_data_uri
from ._operations import RESULT_CONVERTERS, enum_names
from ._types import AbbreviatedRepr, ComparedByValue, escape_controls, float32_array, html_text

if TYPE_CHECKING:
    from PIL.Image import Image

    from ._operations import Operation

_DIRECTIONS = enum_names(neuroinspect_pb2.NeuronDirection, "NEURON_DIRECTION_")
# Mistakes below which a ranking past its first neuron depends most on which mistakes it
# was given: bench/ranking_stability.py found the first neuron in every resample's top-5
# from 5 mistakes, and at least 2 of the top 3 carrying the planted value in each from 10
# where the full ranking's do (docs/neuroinspect.md).
FEW_MISTAKES = 10
# Bootstrap resamples behind the stability column of ``explaind rank`` and ``explaind
# report`` (their ``--stability`` and build_report's default; here, not in report.py, so the
# CLI's arguments need not import that): a person reading a ranking, or editing the top
# three on its word as the report does, should see how far to trust it, and 200 cost the
# server 0.11 s for 4,096 mistakes (docs/neuroinspect.md). The RPC and SDK ask for none
# unless told: a pipeline pays only for what it reads.
DEFAULT_STABILITY_RESAMPLES = 200
# The most steps a visualisation may take on a server that predates
# RequestLimits.max_visualization_steps (every such server's, since VisualizeNeurons began).
STEPS_LIMIT_OF_OLDER_SERVERS = 10_000
# What stopped a server's ranking's resamples early (stability_resamples_requested set):
# an operation's run time limit ([jobs].max_run_seconds) or an inline call's deadline,
# which the response does not tell apart.
RESAMPLES_STOPPED_BY_SERVER = "a time limit"


def few_mistakes_note(mistake_count: int) -> str | None:
    """What a ranking of ``mistake_count`` mistakes should be read with, when they are few."""
    if not 0 < mistake_count < FEW_MISTAKES:
        return None
    return (f"only {mistake_count} mistake{'' if mistake_count == 1 else 's'}: past the first neuron, a ranking of fewer than "
            f"{FEW_MISTAKES} changes with the mistakes drawn (docs/neuroinspect.md, How many mistakes a ranking needs)")


@dataclass(frozen=True)
class RankedNeuron:
    """A neuron behind the mistakes; ratios are shares of mistakes (0-1)."""

    neuron: int
    direction: str  # "insufficient" (ω > 0), "excessive" (ω < 0) or "both"
    insufficient_ratio: float
    excessive_ratio: float
    mean_omega: float
    importance: float  # p_c(f̄) / p_c(f̄ with the neuron zeroed)
    top_classes: list[str]  # names of the classes with the largest head weight for the neuron, largest first
    top_class_indices: list[int] = field(default_factory=list)  # the same classes' indices
    # Share of the ranking's stability_resamples bootstrap resamples of the mistakes whose
    # own ranking has the neuron in its top 5 (0-1); 0 where none were asked for
    # (stability_resamples 0).
    stability: float = 0.0

    @property
    def rank_ratio(self) -> float:
        return max(self.insufficient_ratio, self.excessive_ratio)


@dataclass(frozen=True)
class MistakeSummary:
    """One mistake's counterfactual ω (``include_samples``): the shift of its features that
    makes the classifier predict the true class."""

    sample_index: int  # position in the sample set
    predicted_class: int  # the class index it was predicted as
    converged: bool  # ω reached the true class within max_iterations
    iterations: int
    insufficient_neurons: list[int]  # its top-k largest ω > 0: features it lacked
    excessive_neurons: list[int]  # its top-k most negative ω: features it had too much of
    omega_l1: float  # ‖ω‖₁


@dataclass(frozen=True, eq=False, repr=False)
class NeuronRanking(AbbreviatedRepr, ComparedByValue):
    """Result of ``rank_mistake_neurons``; ``omega`` is (M, D) float32 with
    ``include_samples`` (downloaded from the operation's ``omega.npy`` artifact when the
    ranking ran as an operation, unless read with ``result(download=False)``).

    The reads common with the in-process ranking
    (``explaind.methods.neuroinspect.NeuronRanking``) have the same names, so code moves
    between the two: ``neurons`` (each with ``neuron``, ``direction``, ``rank_ratio``, the
    two ratios, ``mean_omega``, ``importance``), ``neuron_ids``, ``mistake_count`` (the
    in-process one also answers to it), ``solver`` and ``top_k``. They differ in
    ``class_index`` (in-process ``target_class``) and in a neuron's ``top_classes``: names
    here (indices: ``top_class_indices``), indices in-process."""

    sample_set_id: str
    model_version: str
    class_index: int
    class_name: str
    solver: str
    sample_count: int
    mistake_count: int
    converged_count: int
    neurons: list[RankedNeuron]
    predicted_as: dict[str, int]  # what the mistakes were classified as
    # Left out of the repr: a notebook cell showing the ranking printed every mistake.
    mistakes: list[MistakeSummary] = field(default_factory=list, repr=False)
    omega: np.ndarray | None = field(default=None, repr=False)
    # Neurons taken per mistake and direction (the request's top_k, or the default 5, D
    # where D < 5); 0 from a server too old to report it.
    top_k: int = 0
    # Bootstrap resamples behind each neuron's stability; 0: none asked (or an older server).
    stability_resamples: int = 0
    # The resamples asked where a time limit (an operation's run time limit, an inline
    # call's deadline) stopped them after ``stability_resamples``; 0: all were drawn (or an
    # older server).
    stability_resamples_requested: int = 0
    # The job that computed it (its name), where ``rank_mistake_neurons`` ran the set as
    # one; None inline. Not compared: the same ranking, however it was computed.
    operation: str | None = field(default=None, compare=False)
    # Whether that job is one an earlier request under the same request_id started (its
    # ``Operation.requested_again``, with its rules: False for a new job, and after the
    # SDK's retry of a start whose answer was lost); False inline, where no job ran and the
    # server keeps no request_id. Not compared, as ``operation``.
    requested_again: bool = field(default=False, compare=False)

    @property
    def neuron_ids(self) -> list[int]:
        """The ranked neurons' ids, in rank order (``[n.neuron for n in neurons]``), as the
        in-process ranking has them."""
        return [n.neuron for n in self.neurons]

    def summary(self, limit: int = 10) -> str:
        """The ranking as lines of text, as ``explaind rank`` prints it: the mistakes, the
        first ``limit`` neurons (0: all) with their direction, shares, importance, stability
        (where ``stability_resamples`` is above 0) and top classes, and what the mistakes
        were predicted as. ``print(ranking.summary())``.
        From a server that does not report ``top_k`` (0) it says "top k", not a number.
        Top classes are separated by semicolons, as ImageNet's names hold commas."""
        check_limit(limit)
        if not self.mistake_count:
            return escape_controls(f"no mistakes of {self.class_name} in {self.sample_set_id} ({counted(self.sample_count, 'sample')}): nothing to explain")
        top = f"top {self.top_k}" if self.top_k else "top k"
        unknown = "" if self.top_k else ", k not reported by this server"
        lines = [f"{counted(self.mistake_count, 'mistake')} of {self.class_name} in {self.sample_set_id}; "
                 f"neurons ranked by share of mistakes in their {top} (solver {self.solver}{unknown}):"]
        lines += neuron_lines(self.neurons, limit, self.stability_resamples, self.stability_resamples_requested,
                              stopped_by=RESAMPLES_STOPPED_BY_SERVER)
        predicted = ", ".join(f"{name} {count}" for name, count in self.predicted_as.items())
        lines.append(f"predicted as: {predicted}; {self.converged_count} of {counted(self.mistake_count, 'counterfactual')} flipped the prediction")
        if (note := few_mistakes_note(self.mistake_count)) is not None:
            lines.append(note)
        return "\n".join(map(escape_controls, lines))  # class names as the server's config wrote them: a control or bidi character not run

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """A notebook cell ending in a ranking shows its summary, not a repr of thousands of
        characters on one line (``repr()`` keeps the fields, for logs and debugging)."""
        printer.text(self.summary())


@dataclass(frozen=True)
class NeuronVisualization:
    """An image optimised to excite ``neuron`` (conditioned on ``class_name``), and its mask."""

    neuron: int
    class_index: int
    class_name: str
    image: Image | None  # None: read with result(download=False)
    masked_image: Image | None  # low-activation regions dimmed
    activation: float  # α_n of the final image
    logit: float  # l_c of the final image
    clip_similarity: float  # NaN without CLIP
    core_relevance: float  # NaN without CLIP
    mask_fraction: float
    # The operation's artifacts holding the two images (Operation.artifact_image(name)),
    # to fetch them later after result(download=False).
    image_artifact: str = ""
    masked_image_artifact: str = ""


def visualization_alts(visualization: NeuronVisualization) -> tuple[str, str]:
    """The alt texts of a visualisation's image and masked image (plain text, to escape),
    the report's and the notebook's: each names its neuron and class and says what it is,
    read out alone by a screen reader or where the image is not shown."""
    subject = f"neuron {visualization.neuron}, class {visualization.class_name}"
    return (f"{subject}: an image optimised to make the neuron fire",
            f"{subject}: the same image, the regions where the neuron fires little dimmed")


@dataclass(frozen=True, repr=False)
class NeuronVisualizations(AbbreviatedRepr):
    """Result of ``visualize_neurons``: how the images were made, and one visualisation
    per requested pair, in request order. The settings the images were optimised with
    (the request's, or the defaults it left unset) are None where the method has no such
    term (``gamma`` for feature_visualization, ``epsilon`` for all but clip_illusion),
    and from a server older than them."""

    model_version: str  # the head the images were optimised against (its logit l_c)
    method: str  # "clip_illusion", "feature_visualization" or "no_clip"
    steps: int
    visualizations: list[NeuronVisualization]
    gamma: float | None = None  # γ, the class logit's weight
    epsilon: float | None = None  # ε, CLIP-Illusion's: its loss is −(cos + ε)(α_n + γ l_c)
    learning_rate: float | None = None
    seed: int | None = None

    def flipped(self) -> list[NeuronVisualization]:
        """The visualisations whose clip_similarity + epsilon ≤ 0: there CLIP-Illusion's
        loss rewarded a lower activation, so the image is not what excites the neuron;
        run them again with a larger epsilon."""
        return [v for v in self.visualizations if self._flips(v)]

    def _flips(self, visualization: NeuronVisualization) -> bool:
        """Whether ``visualization``'s clip_similarity + epsilon ≤ 0 (never without epsilon)."""
        return self.epsilon is not None and visualization.clip_similarity + self.epsilon <= 0

    def _made_with(self) -> str:
        """How the images were made, with the settings known: "clip_illusion, 100 steps
        (gamma 0.5, epsilon 0.05, learning rate 0.009, seed 0)" (the summary's, the
        notebook's and the report's words)."""
        weights = [f"{name} {value:g}" for name, value in (("gamma", self.gamma), ("epsilon", self.epsilon), ("learning rate", self.learning_rate))
                   if value is not None]
        settings = ", ".join(weights + ([] if self.seed is None else [f"seed {self.seed}"]))
        return f"{self.method}, {self.steps} steps" + (f" ({settings})" if settings else "")

    def _flipped_warning(self) -> str:
        """The warning for the flipped visualisations, "" for none."""
        flipped = self.flipped()
        if not flipped:
            return ""
        return (f"warning: {len(flipped)} of {len(self.visualizations)} images ended with clip_similarity + epsilon ≤ 0 (marked !): "
                "the loss rewarded a lower activation; raise epsilon (visualize_neurons(epsilon=...), explaind visualize --epsilon, "
                "or the server's [clip].illusion_epsilon)")

    def _described(self) -> str:
        """What the result holds: "3 neurons visualised with clip_illusion, 40 steps, against
        head m.1" (the summary's first line, the notebook table's name)."""
        count = len(self.visualizations)
        return f"{count} neuron{'' if count == 1 else 's'} visualised with {self._made_with()}, against head {self.model_version}"

    def summary(self) -> str:
        """As ``explaind visualize`` prints it: how the images were made, one line per
        visualisation with its scores, and a warning marking those whose clip_similarity
        + epsilon ≤ 0."""
        lines = [f"{self._described()}:"]
        for v in self.visualizations:
            similarity = "n/a (no CLIP)" if math.isnan(v.clip_similarity) else f"{v.clip_similarity:.3f}"
            lines.append(f"neuron {v.neuron:>3} as {escape_controls(v.class_name)}: activation {v.activation:.3f}, logit {v.logit:.3f}, "
                         f"CLIP similarity {similarity}, mask area {v.mask_fraction:.0%}{' !' if self._flips(v) else ''}")
        if warning := self._flipped_warning():
            lines.append(warning)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """A notebook shows the images, not their PIL reprs: a table with one row per
        visualisation (its numbers, image and masked image inlined as PNG), a flipped one
        marked !, then the warning for those. Marked up as the report's tables: named, each
        column heading scoped, each row headed by its neuron, so a screen reader reads a
        number with its neuron and its column; its text escaped as the report's
        (:func:`html_text`)."""
        alts = [visualization_alts(v) for v in self.visualizations]
        rows = "".join(
            f"<tr><th scope='row'>{v.neuron}{' !' if self._flips(v) else ''}</th><td>{html_text(v.class_name)}</td><td>{v.activation:.3g}</td>"
            f"<td>{v.logit:.3g}</td><td>{v.clip_similarity:.3g}</td><td>{v.mask_fraction:.0%}</td><td>{_html_image(v.image, image_alt)}</td>"
            f"<td>{_html_image(v.masked_image, masked_alt)}</td></tr>"
            for v, (image_alt, masked_alt) in zip(self.visualizations, alts))
        headings = "".join(f"<th scope='col'>{name}</th>" for name in ("neuron", "class", "activation", "logit", "CLIP similarity", "mask", "image", "masked"))
        warning = self._flipped_warning()
        return (f"<p>{html_text(self._made_with())}, model {html_text(self.model_version)}</p>"
                f"<table aria-label='{html_text(self._described())}'><thead><tr>{headings}</tr></thead><tbody>{rows}</tbody></table>"
                f"{f'<p>{html_text(warning)}</p>' if warning else ''}")


def _html_image(image: Image | None, alt: str) -> str:
    """An ``<img>`` of ``image`` inlined as the report inlines it, at least its box wide,
    ``alt`` its text for a screen reader (escaped here); a dash for None (a result read
    with download=False)."""
    if image is None:
        return "–"
    return f'<img src="{image_data_uri(image)}" alt="{html_text(alt)}" width="{max(image.width, IMAGE_BOX)}" style="image-rendering: pixelated">'


def worst_of(accuracy: dict[str, float], worst: str) -> str:
    """``worst``, the one of ``accuracy`` the server named worst (the first of those
    tied), or that none is, every one tying: the edit's summary and the report's table
    named one of equals as worst."""
    if len(accuracy) > 1 and len(set(accuracy.values())) == 1:
        return f"none: all {len(accuracy)} tie"
    return worst


@dataclass(frozen=True, repr=False)
class HeadEvaluation(AbbreviatedRepr):
    """A head's accuracy on the edit's evaluation samples; groups with ``group_attribute``."""

    accuracy: float
    class_accuracy: dict[str, float]  # the classes with samples in the evaluated set, as Evaluation's
    worst_class: str
    worst_class_accuracy: float
    group_accuracy: dict[str, float]  # empty without groups
    worst_group: str
    worst_group_accuracy: float


@dataclass(frozen=True, repr=False)
class HeadVersion(AbbreviatedRepr):
    """A stored classifier head: the model file's (v0) or an edit's, with its evaluation
    against its parent's on the same samples."""

    version_id: str
    model_version: str  # what Predict reports while it serves
    parent_version_id: str
    method: str  # "loaded", "probability_ratio" or "constrain"
    class_name: str
    neurons: list[int]
    description: str
    create_time: dt.datetime
    active: bool
    parent_evaluation: HeadEvaluation | None  # None for a loaded head
    evaluation: HeadEvaluation | None
    # The named caller whose edit stored it ("" for none): only it, or an admin, may delete it.
    owner: str = ""

    def summary(self) -> str:
        """One line, as ``explaind head-versions`` lists it: ``*`` marks the served version,
        then its id, model version, method, the class and neurons edited, and its accuracy
        against its parent's (alone once the parent is deleted: the server drops that
        comparison, not the version's own evaluation)."""
        accuracy = f", accuracy {self.evaluation.accuracy:.3f}" if self.evaluation else ""
        if self.evaluation and self.parent_evaluation:
            accuracy += f" (was {self.parent_evaluation.accuracy:.3f})"
        neurons = f" {escape_controls(self.class_name)} neurons {self.neurons}" if self.neurons else ""
        owner = f" (by {self.owner})" if self.owner else ""
        return f"{'*' if self.active else ' '} {self.version_id} {self.model_version} {self.method}{neurons}{accuracy}{owner}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """A notebook shows a version (and a list of them) as its summary line, not a repr
        of some 900 characters with both evaluations."""
        printer.text(self.summary())


@dataclass(frozen=True)
class ActiveHeadChange:
    """Result of ``promote_head_version`` and ``rollback_head_version``."""

    version: HeadVersion  # served from now on
    previous_version_id: str  # served until the call: promote_head_version(previous_version_id) undoes it


@dataclass(frozen=True, repr=False)
class HeadEdit(AbbreviatedRepr):
    """Result of ``edit_head``: the new version and how training went. ``target_ratio``:
    the o trained towards (what "auto" computed, or the one given); None for constrain,
    and from a server older than the field."""

    version: HeadVersion
    best_epoch: int
    epochs_run: int
    validation_accuracy: list[float]
    target_ratio: float | None = None

    def summary(self) -> str:
        """As ``explaind edit-head`` prints it: the training, whether the version is served,
        its summary line, and its worst class (and group) against its parent's, or none
        where all tie. Group names, attribute values as uploaded, with their control
        characters escaped."""
        version = self.version
        served = "served now" if version.active else f"not served; explaind head-versions promote {version.version_id} serves it"
        towards = "" if self.target_ratio is None else f", towards probability ratio {self.target_ratio:.4g}"
        lines = [f"stored head version (best epoch {self.best_epoch} of {self.epochs_run}{towards}; {served}):", version.summary()]
        before, after = version.parent_evaluation, version.evaluation
        if before and after:
            old, new = (escape_controls(worst_of(e.class_accuracy, e.worst_class)) for e in (before, after))
            lines.append(f"  worst class {old} {before.worst_class_accuracy:.3f} -> {new} {after.worst_class_accuracy:.3f}")
            if after.group_accuracy:
                old, new = (escape_controls(worst_of(e.group_accuracy, e.worst_group)) for e in (before, after))
                lines.append(f"  worst group {old} {before.worst_group_accuracy:.3f} -> {new} {after.worst_group_accuracy:.3f}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """A notebook shows an edit as its summary, not a repr of some 1,500 characters
        with both nested evaluations (``repr()`` keeps the fields)."""
        printer.text(self.summary())


def ranking(message: neuroinspect_pb2.NeuronRanking, operation: Operation | None = None) -> NeuronRanking:
    omega = None
    if message.HasField("omega"):
        omega = float32_array(message.omega)
    elif message.omega_artifact and operation is not None:
        omega = np.load(io.BytesIO(operation.artifact(message.omega_artifact)), allow_pickle=False)
    return NeuronRanking(
        sample_set_id=message.sample_set_id,
        model_version=message.model_version,
        class_index=message.class_index,
        class_name=message.class_name,
        solver=message.solver,
        sample_count=message.sample_count,
        mistake_count=message.mistake_count,
        converged_count=message.converged_count,
        neurons=[
            RankedNeuron(n.neuron, _DIRECTIONS.get(n.direction, "unspecified"), n.insufficient_ratio, n.excessive_ratio, n.mean_omega, n.importance, list(n.top_class_names),
                         list(n.top_classes), n.stability)
            for n in message.neurons
        ],
        # Most first, ties by name: a proto map iterates in its hash order, not the server's.
        predicted_as=dict(sorted(message.predicted_as.items(), key=lambda item: (-item[1], item[0]))),
        mistakes=[
            MistakeSummary(m.sample_index, m.predicted_class, m.converged, m.iterations, list(m.insufficient_neurons), list(m.excessive_neurons), m.omega_l1)
            for m in message.mistakes
        ],
        omega=omega,
        top_k=message.top_k,
        stability_resamples=message.stability_resamples,
        stability_resamples_requested=message.stability_resamples_requested,
    )


def visualizations(message: neuroinspect_pb2.VisualizeNeuronsResult, operation: Operation | None) -> NeuronVisualizations:
    """Images downloaded from the operation's artifacts (None without it)."""
    def echoed(name: str) -> Any:
        return getattr(message, name) if message.HasField(name) else None

    return NeuronVisualizations(message.model_version, message.method, message.steps, [
        NeuronVisualization(
            neuron=v.neuron,
            class_index=v.class_index,
            class_name=v.class_name,
            image=operation.artifact_image(v.image_artifact) if operation else None,
            masked_image=operation.artifact_image(v.masked_image_artifact) if operation else None,
            activation=v.activation,
            logit=v.logit,
            clip_similarity=v.clip_similarity,
            core_relevance=v.core_relevance,
            mask_fraction=v.mask_fraction,
            image_artifact=v.image_artifact,
            masked_image_artifact=v.masked_image_artifact,
        )
        for v in message.visualizations
    ], gamma=echoed("gamma"), epsilon=echoed("epsilon"), learning_rate=echoed("learning_rate"), seed=echoed("seed"))


def head_evaluation(message: neuroinspect_pb2.HeadEvaluation) -> HeadEvaluation:
    return HeadEvaluation(
        accuracy=message.accuracy,
        class_accuracy={c.class_name: c.accuracy for c in message.per_class},
        worst_class=message.worst_class_name,
        worst_class_accuracy=message.worst_class_accuracy,
        group_accuracy=dict(sorted(message.group_accuracy.items())),
        worst_group=message.worst_group,
        worst_group_accuracy=message.worst_group_accuracy if message.worst_group else math.nan,
    )


def head_version(message: neuroinspect_pb2.HeadVersion) -> HeadVersion:
    return HeadVersion(
        version_id=message.version_id,
        model_version=message.model_version,
        parent_version_id=message.parent_version_id,
        method=message.method,
        class_name=message.class_name,
        neurons=list(message.neurons),
        description=message.description,
        create_time=message.create_time.ToDatetime(tzinfo=dt.timezone.utc),
        active=message.active,
        parent_evaluation=head_evaluation(message.parent_evaluation) if message.HasField("parent_evaluation") else None,
        evaluation=head_evaluation(message.evaluation) if message.HasField("evaluation") else None,
        owner=message.owner,
    )


def active_head_change(message: neuroinspect_pb2.PromoteHeadVersionResponse | neuroinspect_pb2.RollbackHeadVersionResponse) -> ActiveHeadChange:
    return ActiveHeadChange(head_version(message.version), message.previous_version_id)


def head_edit(message: neuroinspect_pb2.EditHeadResult, operation: Operation | None = None) -> HeadEdit:
    return HeadEdit(head_version(message.version), message.best_epoch, message.epochs_run, list(message.validation_accuracy),
                    message.target_ratio if message.HasField("target_ratio") else None)


RESULT_CONVERTERS.update({
    neuroinspect_pb2.NeuronRanking.DESCRIPTOR.full_name: ranking,
    neuroinspect_pb2.VisualizeNeuronsResult.DESCRIPTOR.full_name: visualizations,
    neuroinspect_pb2.EditHeadResult.DESCRIPTOR.full_name: head_edit,
})


def as_scalar(value: Any) -> Any:
    """A 0-d array or tensor (numpy, torch: ``labels.unique()``'s elements) as the Python
    number it holds; anything else as it is."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def class_ref(value: Any, argument: str) -> str | int:
    """A class name or index as given (or in a 0-d array or tensor); floats and bools are
    errors, not truncated."""
    value = as_scalar(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{argument} must be a class name (str) or index (int), got {value!r}")


def class_fields(target: Any, argument: str = "target_class") -> dict[str, Any]:
    """The request's ``target_class`` oneof from a class name or index (None: unset)."""
    if target is None:
        return {}
    target = class_ref(target, argument)
    if isinstance(target, int) and not -2**31 <= target < 2**31:  # the request would name its field, class_index
        raise ValueError(f"{argument} must be a 32-bit integer, got {target}")
    return {"class_name": target} if isinstance(target, str) else {"class_index": target}


def repeated_pair(pairs: Sequence[tuple[int, str | int | None]]) -> tuple[int, int] | None:
    """The first (neuron, class) pair that repeats an earlier one, as (its index, the
    earlier one's), matched as the server matches them (a class name's NFC form; "" is no
    class), or None: the server refuses it (the same image, optimised twice). A class by
    name and the same class by index are the server's to match."""
    first_at: dict[tuple[int, str | int | None], int] = {}
    for i, (neuron, target) in enumerate(pairs):
        key = (int(neuron), (class_name_key(target) or None) if isinstance(target, str) else target)
        if (first := first_at.setdefault(key, i)) != i:
            return i, first
    return None
