"""Engines that run the classifier's feature extractor h_b outside eager PyTorch.

h_b is exported to ONNX once per feature version and run by an ONNX Runtime session
on the CPU, CUDA or TensorRT execution provider, with images and features bound in
place on the device. ``explaind.engine.backends`` picks
one by ``[runtime].backend``; the linear head stays in eager PyTorch, so a head edit
never needs a new engine.
"""

from ._onnx_runtime import ENGINES, execution_providers, export_onnx, onnx_runtime_features

__all__ = ["ENGINES", "execution_providers", "export_onnx", "onnx_runtime_features"]
