"""Engines that run the classifier's feature extractor h_b outside eager PyTorch.

h_b is exported to ONNX once per feature version and run by an ONNX Runtime session
on the CPU, CUDA or TensorRT execution provider, with images and features bound in
place on the device. ``explaind.engine.backends`` picks
one by ``[runtime].backend``; the linear head stays in eager PyTorch, so a head edit
never needs a new engine. ``split_onnx_classifier`` cuts a classifier given as ONNX
before its final linear layer, so its features and head are explained the same way.
"""

from ._onnx_runtime import (
    FLOAT_TYPES,
    ONNX_BACKENDS,
    ImageInput,
    OnnxClassifierSplit,
    UnsplittableGraph,
    execution_providers,
    export_onnx,
    fixed_batch_size,
    onnx_runtime_features,
    require_providers,
    run_in_batches,
    split_onnx_classifier,
)

__all__ = [
    "FLOAT_TYPES",
    "ONNX_BACKENDS",
    "ImageInput",
    "OnnxClassifierSplit",
    "UnsplittableGraph",
    "execution_providers",
    "export_onnx",
    "fixed_batch_size",
    "onnx_runtime_features",
    "require_providers",
    "run_in_batches",
    "split_onnx_classifier",
]
