"""Translation between explaind.v1 messages and engine types (images, tensors, jobs)."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import numpy as np
import torch
from google.longrunning import operations_pb2 as lro_pb2
from google.rpc import status_pb2

import grpc
from explaind.v1 import common_pb2, operations_pb2, sample_sets_pb2

from ..decode_memory import TENSOR_DECODE_BYTES_PER_VALUE, UPLOAD_BYTES_PER_VALUE
from ..engine import NewSample
from ..errors import ExplaindError, InvalidArgument, status_details
from ..imaging import MAX_IMAGE_SIDE, InputGeometry, PixelBudget, array_from_buffer, decode_array, decode_encoded, decode_pixels, encode_png, to_uint8_hwc
from ..jobs import JOB_ID, RESULT_ARTIFACT, JobSnapshot
from ..messages import timestamp
from ..store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, RequestKey, SampleSetInfo
from .auth import current_caller

_DTYPE_NAMES = {
    common_pb2.DATA_TYPE_UINT8: "uint8",
    common_pb2.DATA_TYPE_FLOAT16: "float16",
    common_pb2.DATA_TYPE_FLOAT32: "float32",
}
_STATES = {
    QUEUED: operations_pb2.OPERATION_STATE_QUEUED,
    RUNNING: operations_pb2.OPERATION_STATE_RUNNING,
    SUCCEEDED: operations_pb2.OPERATION_STATE_SUCCEEDED,
    FAILED: operations_pb2.OPERATION_STATE_FAILED,
    CANCELLED: operations_pb2.OPERATION_STATE_CANCELLED,
}
STATE_NAMES = {value: key for key, value in _STATES.items()}
OPERATION_PREFIX = "operations/"


# What GetModelMetadataResponse.capabilities lists: the request fields this server honours
# that an older one ignores (a client relies on them only when listed).
# "request_id": the calls that start an operation; "sample_set_request_id": CreateSampleSet
# and AppendSamples (a client that knows only the first must not retry uploads);
# "list_owner_filter": ListOperations' and ListSampleSets' owner (an older server lists
# everyone's); "predict_partial_failure": Predict's partial_failure (an older server fails
# the whole request for one bad image); "requested_again": a start's answer sets
# OperationMetadata.requested_again (an older server's, keeping request_ids, never does, so
# a client cannot tell there that the operation is no new one); "run_id": the starts' run_id,
# OperationMetadata.requested_by_another_run in a repeat's answer, and CancelOperation's
# unless_asked_by_another_run_than (an older server's never says another run asked, and
# cancels, so a client cannot tell there whose wait a cancel stops).
CAPABILITIES = ("request_id", "sample_set_request_id", "list_owner_filter", "predict_partial_failure", "requested_again", "run_id")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _check_uuid(value: str, field: str, per: str) -> None:
    """InvalidArgument naming ``field`` where ``value`` is not a UUID, which a client picks ``per`` one."""
    if not _UUID.fullmatch(value):  # fullmatch: "$" would accept a final "\n"
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidArgument(f"{shown!r} is not a UUID (such as 123e4567-e89b-42d3-a456-426614174000); a client picks a new one "
                              f"{per}, e.g. uuid.uuid4()", field=field)


def request_key(request: Any, *, apart: str = "") -> RequestKey | None:
    """A request's ``request_id`` (AIP-155; None when empty) with a fingerprint of the
    rest of it: its type and its other fields, serialised deterministically. ``apart``
    names a repeated field (an upload's samples) hashed item by item, never copied: a
    64 MiB request's fingerprint then takes 0.07 s, not 0.3 s. The named caller sending
    it (explaind.ownership) is part of the fingerprint: another caller repeating a
    caller's request_id and request is another request (INVALID_ARGUMENT), not a repeat
    answered with what the first made, which its audit line would name as its own change.
    An id that is not a UUID is InvalidArgument naming request_id (a start's run_id:
    naming run_id), which RequestKey.run_id keeps out of the fingerprint."""
    request_id = request.request_id
    if not request_id:
        return None
    _check_uuid(request_id, "request_id", "per request")
    # The starts' (a sample set's requests have none): who sends it, not what it asks.
    run_id = (run_id_of(request.run_id, "run_id") or "") if "run_id" in request.DESCRIPTOR.fields_by_name else ""
    rest = type(request)()
    for field, value in request.ListFields():  # all but request_id, run_id and ``apart``, without copying those
        if field.name in ("request_id", "run_id", apart):
            continue
        if field.is_repeated or field.message_type is not None:
            getattr(rest, field.name).MergeFrom(value)
        else:
            setattr(rest, field.name, value)
    hashed = hashlib.sha256(rest.DESCRIPTOR.full_name.encode() + b"\0")
    if (caller := current_caller()) is not None:  # none: the fingerprint of a store from before named callers
        hashed.update(b"caller\0" + caller.encode() + b"\0")
    for part in (rest, *(getattr(request, apart) if apart else ())):  # length-prefixed, so no two requests hash alike
        encoded = part.SerializeToString(deterministic=True)
        hashed.update(len(encoded).to_bytes(8, "little") + encoded)
    return RequestKey(request_id.lower(), hashed.hexdigest(), caller, run_id)


def run_id_of(value: str, field: str) -> str | None:
    """A run_id sent in ``field``, lower-cased as a request_id is; None where empty;
    InvalidArgument naming ``field`` where it is not a UUID."""
    if not value:
        return None
    _check_uuid(value, field, "per run")
    return value.lower()


def unknown_enum_value(enum, value: int, field: str) -> InvalidArgument:
    """The error for a number ``enum`` (a generated enum type) does not define, e.g. a
    newer client's value: in the proto's terms, since the caller wrote the number."""
    known = ", ".join(name for name, number in enum.items() if number)
    return InvalidArgument(f"{value} is not a value of {enum.DESCRIPTOR.name}; use {known}", field=field)


def decode_image(image: common_pb2.Image, *, field: str, geometry: InputGeometry | None = None, budget: PixelBudget | None = None) -> torch.Tensor:
    """An Image message -> (3, H, W) float32 in [0, 1] (fitted to ``geometry`` if given);
    INVALID_ARGUMENT naming ``field``."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return decode_encoded(image.encoded, field=f"{field}.encoded", geometry=geometry, budget=budget)
    if kind == "tensor":
        if budget is not None:  # before its bytes are copied out of the message
            budget.reserve(tensor_decode_bytes(image.tensor, TENSOR_DECODE_BYTES_PER_VALUE))
        return decode_array(tensor_to_array(image.tensor, field=f"{field}.tensor"), field=f"{field}.tensor", geometry=geometry, budget=budget)
    raise InvalidArgument("image has neither encoded bytes nor a tensor", field=field)


def tensor_decode_bytes(tensor: common_pb2.Tensor, bytes_per_value: int) -> int:
    """What decoding ``tensor`` may take: its bytes copied out of the message and
    ``bytes_per_value`` more a value, read from its dtype and shape (at most an image's
    3 x MAX_IMAGE_SIDE² values: a larger shape is refused before its decode allocates)."""
    values = min(math.prod(max(side, 0) for side in tensor.shape), 3 * MAX_IMAGE_SIDE**2)
    itemsize = np.dtype(_DTYPE_NAMES.get(tensor.dtype, "float32")).itemsize
    return values * (itemsize + bytes_per_value)


def error_status(error: ExplaindError) -> status_pb2.Status:
    """``error`` as the google.rpc.Status a call refused with it would carry (code,
    message, the details naming its field, limit and items), for one image of a partial_failure
    Predict."""
    status = status_pb2.Status(code=grpc.StatusCode[error.code].value[0], message=str(error))
    for detail in status_details(error.code, field=error.field, description=error.description, quota=error.quota, violations=error.violations):
        status.details.add().Pack(detail)
    return status


def tensor_to_array(tensor: common_pb2.Tensor, *, field: str) -> np.ndarray:
    if tensor.dtype not in _DTYPE_NAMES:
        given = common_pb2.DataType.Name(tensor.dtype) if tensor.dtype in common_pb2.DataType.values() else tensor.dtype
        supported = ", ".join(common_pb2.DataType.Name(number) for number in _DTYPE_NAMES)
        raise InvalidArgument(f"{given} is not a pixel type; use {supported}", field=f"{field}.dtype")
    return array_from_buffer(_DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), tensor.data, field=field)


def new_sample(sample: sample_sets_pb2.Sample, *, field: str, budget: PixelBudget, jpeg_min_side: int) -> NewSample:
    """Validate a Sample's image; keep encoded bytes as given (decoded only to check them,
    never to float), store raw tensors as PNG. Encoded bytes are checked as the served
    classifier decodes them (``jpeg_min_side``, :attr:`InputGeometry.jpeg_min_side`): a
    JPEG at reduced scale still has all its coded data read, so a truncated or corrupt
    file is refused as a whole decode refuses it, 2.7-3.7x faster for 12 MP
    (bench/jpeg_reduced_decode.py)."""
    image = sample.image
    if image.WhichOneof("data") == "encoded":
        decode_pixels(image.encoded, field=f"{field}.image.encoded", budget=budget, jpeg_min_side=jpeg_min_side)
        return NewSample(image.encoded, sample.label, dict(sample.attributes))
    budget.reserve(tensor_decode_bytes(image.tensor, TENSOR_DECODE_BYTES_PER_VALUE + UPLOAD_BYTES_PER_VALUE))
    # The decoded tensor is this call's own float32 copy: scaled to uint8 in place.
    pixels = to_uint8_hwc(decode_image(image, field=f"{field}.image", budget=budget), overwrite=True)
    return NewSample(encode_png(pixels), sample.label, dict(sample.attributes))


def sample_set(info: SampleSetInfo) -> sample_sets_pb2.SampleSet:
    return sample_sets_pb2.SampleSet(
        sample_set_id=info.sample_set_id,
        display_name=info.display_name,
        sample_count=info.sample_count,
        class_counts=info.class_counts,
        create_time=timestamp(info.create_time),
        update_time=timestamp(info.update_time),
        uploading=info.uploading,
        uid=info.uid,
        owner=info.owner or "",
    )


def job_id(name: str) -> str:
    """``operations/<id>`` or ``<id>`` -> ``<id>``; a name that no operation can have is
    the caller's mistake (INVALID_ARGUMENT), not an unknown operation."""
    bare = name.removeprefix(OPERATION_PREFIX)
    if not JOB_ID.fullmatch(bare):
        raise InvalidArgument(f"{name!r} is not an operation name; expected 'operations/' and 16 hex digits", field="name")
    return bare


def operation(snapshot: JobSnapshot, *, response: bool = True, preview: bool = True) -> lro_pb2.Operation:
    """A job as a google.longrunning.Operation (metadata: OperationMetadata); without a
    succeeded job's response when ``response`` is False (OPERATION_VIEW_BASIC), without
    its progress preview when ``preview`` is False (a watch already sent that one)."""
    record = snapshot.record
    metadata = operations_pb2.OperationMetadata(
        kind=record.kind,
        state=_STATES[record.state],
        progress=operations_pb2.Progress(step=record.step, total=record.total, message=record.message, preview_png=snapshot.preview if preview else b""),
        create_time=timestamp(record.create_time),
        start_time=timestamp(record.start_time),
        end_time=timestamp(record.end_time),
        artifacts=[operations_pb2.Artifact(name=a.name, media_type=a.media_type, digest=a.digest, size_bytes=a.size_bytes) for a in record.artifacts],
        cancel_requested=record.cancel_requested,
        # Only once the cut response is there: the whole is saved just before the job ends.
        full_response_artifact=RESULT_ARTIFACT if record.state == SUCCEEDED and any(a.name == RESULT_ARTIFACT for a in record.artifacts) else "",
        owner=record.owner or "",
        requested_again=snapshot.requested_again,
        requested_by_another_run=snapshot.requested_by_another_run,
    )
    message = lro_pb2.Operation(name=f"{OPERATION_PREFIX}{record.job_id}", done=snapshot.done)
    message.metadata.Pack(metadata)
    if record.state == SUCCEEDED and response:
        message.response.ParseFromString(record.result)
    elif record.state in (FAILED, CANCELLED):
        code = grpc.StatusCode[record.error_code or ("CANCELLED" if record.state == CANCELLED else "UNKNOWN")]
        message.error.CopyFrom(status_pb2.Status(code=code.value[0], message=record.error_message))
        if record.result:  # what the error is about: the field it names, the limit it met (jobs.py)
            message.error.details.add().ParseFromString(record.result)
        message.error.details.extend(status_pb2.Status.FromString(record.error_details).details)  # the limit's QuotaFailure, the items it names
    return message
