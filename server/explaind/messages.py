"""Protobuf values that the servicers and the engine build alike: the engine stores job
results as messages (``JobManager.submit``), so it needs them too, without the gRPC layer."""

from __future__ import annotations

import numpy as np
from google.protobuf import timestamp_pb2

from explaind.v1 import common_pb2

_TENSOR_TYPES = {
    np.dtype(np.uint8): common_pb2.DATA_TYPE_UINT8,
    np.dtype(np.float16): common_pb2.DATA_TYPE_FLOAT16,
    np.dtype(np.float32): common_pb2.DATA_TYPE_FLOAT32,
    np.dtype(np.int64): common_pb2.DATA_TYPE_INT64,
}

__all__ = ["array_to_tensor", "timestamp"]


def array_to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    """A Tensor message of ``array`` (uint8, float16, float32 or int64), little-endian."""
    array = np.ascontiguousarray(array)
    return common_pb2.Tensor(dtype=_TENSOR_TYPES[array.dtype], shape=list(array.shape),
                             data=array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """Epoch seconds as a Timestamp (None stays None: a time not reached yet)."""
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
