"""Results returned by the SDK: plain dataclasses with numpy arrays and PIL images."""

from __future__ import annotations

import datetime as dt
import html
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

    from ._errors import ExplaindError

    from explaind.v1 import common_pb2


class ComparedByValue:
    """``==`` for result dataclasses holding numpy arrays (declared with ``eq=False``):
    the generated ``__eq__`` compares field tuples, where an array's ``==`` gives an
    array whose truth value raises. Unhashable, as arrays are."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(_equal(getattr(self, item.name), getattr(other, item.name)) for item in fields(self) if item.compare)  # type: ignore[arg-type]


class AbbreviatedRepr:
    """A dataclass repr (declared with ``repr=False``) that shows at most
    ``SHOWN_ITEMS`` items of a list or dict and an array's shape: a notebook cell showing
    the metadata or an evaluation of a 1000-class model printed every class."""

    SHOWN_ITEMS = 8

    def __repr__(self) -> str:
        shown = ", ".join(f"{item.name}={_abbreviated(getattr(self, item.name), self.SHOWN_ITEMS)}" for item in fields(self) if item.repr)  # type: ignore[arg-type]
        return f"{type(self).__name__}({shown})"


def _abbreviated(value: object, shown: int) -> str:
    if isinstance(value, np.ndarray):
        return f"array(shape={value.shape}, dtype={value.dtype})"
    if isinstance(value, dict) and len(value) > shown:
        items = ", ".join(f"{key!r}: {item!r}" for key, item in list(value.items())[:shown])
        return f"{{{items}, ... {len(value) - shown} more}}"
    if isinstance(value, list) and len(value) > shown:
        return f"[{', '.join(map(repr, value[:shown]))}, ... {len(value) - shown} more]"
    return repr(value)


# C0 and C1 control characters, which a terminal acts on (ESC [2J clears it, OSC 52 sets
# the clipboard) or which forge lines: a set's attribute values are kept as given. Also
# the bidirectional embeddings, overrides and isolates (U+202A-202E, U+2066-2069): a
# set's name holding U+202E (right-to-left override) showed the rest of its line, "by
# <owner>" included, reversed on a terminal that lays out bidirectional text. And the
# line and paragraph separators (U+2028, U+2029), which break lines as \n does for
# str.splitlines and editors.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` another caller stored (an attribute value, a set's name) with its control,
    bidirectional-control and line-separator characters escaped as Python writes them
    (``\\x1b``, ``\\n``, ``\\u202e``), for a terminal or a summary's lines."""
    return _CONTROL_CHARACTER.sub(lambda control: repr(control.group())[1:-1], text)


def html_text(text: str) -> str:
    """``text`` for an HTML page (the report's, a notebook's table): markup escaped, and
    control, bidirectional-control and line-separator characters written out (``\\u202e``)
    as the CLI writes them, so a class, group or set name cannot reorder the text around it."""
    return html.escape(escape_controls(text))


def float32_array(tensor: common_pb2.Tensor) -> np.ndarray:
    """A float32 ``Tensor`` message (little-endian data and its shape) as a writable array:
    one over the message's bytes would be read-only, and ``features -= mean`` would fail."""
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tuple(tensor.shape)).copy()


def _equal(first: object, second: object) -> bool:
    """Arrays by their items, NaN equal to NaN (a failed image's features are NaN: such a
    Prediction was unequal even to itself); exceptions (a Prediction's error) by their
    type and values, not identity (one pickled, or the same image's error from another call)."""
    if isinstance(first, np.ndarray) or isinstance(second, np.ndarray):
        if not (isinstance(first, np.ndarray) and isinstance(second, np.ndarray)):
            return False
        inexact = np.issubdtype(first.dtype, np.inexact) and np.issubdtype(second.dtype, np.inexact)  # isnan takes no other
        return np.array_equal(first, second, equal_nan=inexact)
    if isinstance(first, BaseException) and isinstance(second, BaseException):
        return type(first) is type(second) and first.args == second.args and vars(first) == vars(second)
    return first == second


@dataclass(frozen=True, eq=False, repr=False)
class Prediction(AbbreviatedRepr, ComparedByValue):
    """Top-k for one image, highest logit first (as the head orders classes whose
    probabilities round to one float), equal logits by class index.

    With ``predict(..., partial_failure=True)``, an image the server could not answer
    (it did not decode, or the model's logits for it are unusable) has its ``error``
    (the typed exception the whole call would have raised for it alone, naming
    ``images[i]`` by its index in the caller's list), empty lists, and features of NaN;
    ``label`` and ``probability`` raise that error."""

    labels: list[str]
    class_indices: list[int]
    # Softmax probabilities of class_indices: 0 for a class the model rules out (logit -inf).
    probabilities: list[float]
    # Penultimate activations (D,), when requested.
    features: np.ndarray | None = None
    # The classifier and head version that computed it (changes on promote/rollback).
    model_version: str = ""
    # Why the image got no answer (partial_failure only); None when answered.
    error: ExplaindError | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        if self.error is not None:
            # A traceback of this access alone: raised as kept, the error gathered every
            # earlier access's frames too (3, 6, 9 ... deep), keeping their locals alive.
            raise self.error.with_traceback(None)
        return self.labels[0]

    @property
    def probability(self) -> float:
        if self.error is not None:
            raise self.error.with_traceback(None)  # as label's
        return self.probabilities[0]

    def __repr__(self) -> str:
        shown = super().__repr__()
        return shown if self.error is None else f"{shown[:-1]}, error={self.error!r})"


@dataclass(frozen=True)
class Component:
    """A model the server loads (classifier, CLIP, text-to-image) and whether it is usable."""

    name: str
    loaded: bool
    source: str
    detail: str


@dataclass(frozen=True)
class Normalization:
    """How the server normalises pixels in [0, 1] before its classifier: (pixel - mean) /
    std per channel, one value for all channels where each holds one; both () for none
    (the model takes [0, 1] pixels, or normalises them itself)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class RequestLimits:
    """What one request may carry on this server, and what one caller's sets and edits may hold; 0
    where the server does not say (or, for ``max_samples_per_caller`` and
    ``max_head_versions_per_caller``, sets no such limit)."""

    max_message_bytes: int
    max_pixels_per_request: int  # decoded pixels of one request's images, in all
    max_images_per_request: int  # images in one Predict, samples in one sample-set request
    max_image_side: int
    max_samples_per_caller: int = 0  # in all the sets of one named caller ([server].max_samples_per_caller)
    # Predict, CreateSampleSet and AppendSamples calls one named caller may have in progress
    # at once (half of [server].max_workers); 0 from an older server, which has no such limit.
    max_calls_per_caller: int = 0
    # Head versions of the served model one named caller's edits may hold
    # ([server].max_head_versions_per_caller); 0: no such limit, or an older server.
    max_head_versions_per_caller: int = 0
    # Optimisation steps of one visualisation (VisualizeNeurons' steps); 0 from an older server,
    # whose limit was 10000 (neuroinspect.STEPS_LIMIT_OF_OLDER_SERVERS).
    max_visualization_steps: int = 0


@dataclass(frozen=True, repr=False)
class ModelMetadata(AbbreviatedRepr):
    """What the server serves: the classifier, its split (``feature_layer``, ``head``,
    ``feature_dim`` D), how it runs, the other components, and the limits on requests."""

    name: str
    loader: str
    class_names: list[str]
    feature_layer: str
    head: str
    feature_dim: int
    image_size: int
    model_version: str
    backend: str
    device: str
    supports_features: bool
    components: dict[str, Component]
    max_batch_size: int
    limits: RequestLimits
    # 0: images are stretched to image_size; else their shorter side is resized to this and
    # the central image_size square cropped.
    resize_size: int = 0
    interpolation: str = ""  # "bilinear" or "bicubic"; empty from a server that does not say
    # The feature extractor has gradients (a PyTorch classifier): neurons can be visualised.
    supports_visualization: bool = False
    # The weights file, directory or torchvision weights name the classifier was loaded from.
    source: str = ""
    # Predict's batcher: longest a request waits for a fuller batch (seconds), most
    # images waiting for the model (more is RESOURCE_EXHAUSTED), and most of those one
    # named caller may have (0: no limit of its own; see [batching].max_queued_images_per_caller).
    max_queue_delay_seconds: float = 0.0
    max_queue_size: int = 0
    max_queued_images_per_caller: int = 0
    # What the server honours or says that an older one does not, e.g. "request_id" (calls that
    # start an operation are then retried after a dropped connection); () from such a server.
    capabilities: tuple[str, ...] = ()
    # None from a server that does not say.
    normalization: Normalization | None = None
    # JPEG files are decoded at a reduced scale before they are fitted, slightly unlike the
    # whole image ([classifier].jpeg_reduced_decode); False from a server that does not say.
    jpeg_reduced_decode: bool = False


@dataclass(frozen=True, repr=False)
class SampleSet(AbbreviatedRepr):
    """A stored set of labelled images (without them: see ``Client.samples``)."""

    sample_set_id: str
    display_name: str
    sample_count: int
    # Samples per class index, as stored (Evaluation's are by name): a set is readable while
    # the models load, before their class names are known; model_metadata().class_names names them.
    class_counts: dict[int, int]
    create_time: dt.datetime
    update_time: dt.datetime
    uploading: bool = False  # an upload in several requests is unfinished; jobs refuse the set until it ends
    # Unique to this set: one deleted and created again under its id has another
    # (delete_sample_set(uid=...) acts only on this one).
    uid: str = ""
    # The named caller that created it ("" for none): only it, or an admin, may change it.
    owner: str = ""


@dataclass(frozen=True)
class Sample:
    """One stored image with its label (class index) and attributes (by name)."""

    image: Image
    label: int
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Artifact:
    """A file an operation produced (``Operation.artifact(name)`` reads it)."""

    name: str
    media_type: str
    digest: str
    size_bytes: int


@dataclass(frozen=True)
class Progress:
    """How far a job is: ``step`` of ``total`` (units depend on the job), and what it does."""

    step: int
    total: int
    message: str
    # A PIL image of the partial result, when the job sends one.
    preview: Image | None = None
