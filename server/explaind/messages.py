"""Protobuf values that the servicers and the engine build alike: the engine stores job
results as messages (``JobManager.submit``), so it needs them too, without the gRPC layer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from explaind.v1 import common_pb2

_TENSOR_TYPES = {
    np.dtype(np.uint8): common_pb2.DATA_TYPE_UINT8,
    np.dtype(np.float16): common_pb2.DATA_TYPE_FLOAT16,
    np.dtype(np.float32): common_pb2.DATA_TYPE_FLOAT32,
    np.dtype(np.int64): common_pb2.DATA_TYPE_INT64,
}

__all__ = ["array_to_tensor", "leading_items_that_fit", "timestamp"]


def array_to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    """A Tensor message of ``array`` (uint8, float16, float32 or int64, in either byte order),
    little-endian."""
    array = np.ascontiguousarray(array)
    return common_pb2.Tensor(dtype=_TENSOR_TYPES[array.dtype.newbyteorder("=")], shape=list(array.shape),
                             data=array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """Epoch seconds as a Timestamp (None stays None: a time not reached yet)."""
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def leading_items_that_fit(message: Message, max_bytes: int, lists: Sequence[str]) -> Message | None:
    """A copy of ``message`` that serialises to at most ``max_bytes``, made by dropping
    trailing items of its repeated fields named in ``lists``, the longest (in bytes)
    first; None if it does not fit even with them all empty. Only named lists: a result's
    other lists must stay whole (an evaluation's per-class rows make its confusion matrix
    readable), and the head of a named one is worth keeping (e.g. the most confident
    mistakes)."""
    cut = type(message)()
    cut.CopyFrom(message)
    while (excess := cut.ByteSize() - max_bytes) > 0:
        longest = max((getattr(cut, name) for name in lists), key=lambda items: sum(item.ByteSize() for item in items), default=None)
        if longest is None or not longest:
            return None
        # An item costs its bytes plus a tag and a length prefix: 2 bytes for items under
        # 128 bytes, a little more above, so counting 2 drops enough and at most ~1 % extra.
        keep, dropped = len(longest), 0
        while keep and dropped < excess:
            keep -= 1
            dropped += longest[keep].ByteSize() + 2
        del longest[keep:]
    return cut
