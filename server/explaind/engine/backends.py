"""Backends that run the feature extractor h_b for Predict: eager, torch.compile,
ONNX Runtime, TensorRT (via ONNX Runtime's TensorRT execution provider; both engines
live in ``explaind.kernels``).

Only h_b goes through a backend; the linear head always runs in eager PyTorch, so a
head edit never needs a recompile or re-export.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..errors import FailedPrecondition
from ..kernels import ONNX_BACKENDS, execution_providers, export_onnx, onnx_runtime_features, require_providers
from .models import ClassifierVersion

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def check_device(device: str) -> torch.device:
    """The torch device, or a clear error when it names an accelerator that is absent."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"[runtime].device is {device!r} but CUDA is not available on this machine (torch {torch.__version__}); use device = \"cpu\"")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= (count := torch.cuda.device_count()):
        # Else the first .to() fails with "invalid device ordinal", after the server is listening.
        raise FailedPrecondition(f"[runtime].device is {device!r} but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1} "
                                 f"(CUDA_VISIBLE_DEVICES renumbers them from 0)")
    return resolved


# Loaders whose classifier runs on its own runtime, whatever [runtime].backend says.
OWN_RUNTIME_LOADERS = ("onnx", "torchscript")


def check_backend(backend: str, device: str, *, loader: str) -> None:
    """FailedPrecondition when ``backend`` cannot run on ``device`` on this machine (an
    ONNX Runtime without onnxruntime-gpu's CUDA or TensorRT provider, torch.compile on
    the CPU without a C++ compiler, on CUDA without a C compiler): the server checks it
    before it listens, as it does the device."""
    if loader in OWN_RUNTIME_LOADERS:
        return
    if backend in ONNX_BACKENDS:
        require_providers(backend, device)
    if backend == "compile" and torch.device(device).type == "cpu":
        _require_cpp_compiler()
    elif backend == "compile" and torch.device(device).type == "cuda":
        _require_c_compiler()


def _require_cpp_compiler() -> None:
    """torch.compile builds its CPU kernels with a C++ compiler. Without one, the first
    warm-up batch failed, after the server said it was listening, with torch's error alone."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as error:
        raise FailedPrecondition(f"[runtime].backend is 'compile', which builds h_b's code for the CPU with a C++ compiler (g++, or the one "
                                 f"$CXX names), and none works here ({error}); install one or use backend = \"eager\"") from None


def _require_c_compiler() -> None:
    """torch.compile's CUDA kernels are Triton's, and Triton builds its kernel launcher
    with a C compiler ($CC, else gcc, else clang: Triton's own search) at the first
    compiled batch: without one the warm-up failed, after the server said it was listening."""
    named = os.environ.get("CC")
    if shutil.which(named or "gcc") or (not named and shutil.which("clang")):
        return
    found = f"$CC is {named!r}, which is not an executable" if named else "neither gcc nor clang is on the PATH"
    raise FailedPrecondition(f"[runtime].backend is 'compile', whose CUDA kernels Triton builds with a C compiler, and {found}; "
                             f"install one (or name it in $CC) or use backend = \"eager\"")


def build_feature_fn(
    version: ClassifierVersion, backend: str, device: str, cache_dir: Path, *, num_threads: int = 0, max_batch_size: int = 32
) -> FeatureFn:
    """A function images (N, 3, S, S) in [0, 1] on ``device`` -> features (N, D) on ``device``.

    ``num_threads`` caps ONNX Runtime's intra-op threads as ``torch.set_num_threads``
    caps torch's (0: the runtime's default, one per core). ``max_batch_size`` is the
    largest batch TensorRT's engine is built for; larger ones run in slices. ``version`` is
    differentiable (has a PyTorch feature extractor) and ``backend`` one of BACKENDS, as
    the config checks [runtime].backend.
    """
    extractor = version.feature_extractor
    if extractor is None:
        raise FailedPrecondition(f"backend {backend!r} runs a PyTorch feature extractor; the {version.loader} classifier has none")
    if backend == "eager":
        return version.features
    if backend == "compile":
        compiled = torch.compile(extractor, dynamic=True)

        @torch.inference_mode()
        def run_compiled(images: torch.Tensor) -> torch.Tensor:
            return compiled(images)

        return run_compiled
    return _onnx_engine_fn(version, backend, device, cache_dir, num_threads, max_batch_size)  # one of ONNX_BACKENDS


def warm_up_batch_sizes(backend: str, max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a new feature function runs once before it serves. torch.compile
    traces again for a batch size outside the ranges its graphs guard on: 1 (specialised),
    and ranges split where an operator's choice depends on the batch size (16 for the
    shapes world's convolutions on the CPU). Each such trace stalled the first Predict of
    that size, 12 s on the CPU for the first single image. 1, the powers of two and
    ``max_batch_size`` land in every range split at a power of two, as the ones seen are;
    other backends need one small batch."""
    if backend != "compile":
        return (2,)
    powers = (1 << exponent for exponent in range(max(max_batch_size, 1).bit_length()))
    return tuple(sorted({*powers, max(max_batch_size, 1)}))


def _onnx_engine_fn(
    version: ClassifierVersion, backend: str, device: str, cache_dir: Path, num_threads: int, max_batch_size: int
) -> FeatureFn:
    """h_b exported once per feature version and input size under ``cache_dir`` (the graph
    has a fixed height and width), run by ONNX Runtime; TensorRT's engines are kept
    beside that file, in a folder of its name, so each model version has its own."""
    path = Path(cache_dir) / f"features-{version.feature_version[:16]}-{version.image_size}px.onnx"
    tensorrt = backend == "tensorrt"
    providers = execution_providers(
        backend, device, image_size=version.image_size, max_batch_size=max_batch_size,
        engine_cache_dir=path.with_name(f"{path.stem}.tensorrt") if tensorrt else None)
    export_onnx(version.feature_extractor, version.image_size, path)
    return onnx_runtime_features(path, providers, device=device, num_threads=num_threads,
                                 max_batch_size=max_batch_size if tensorrt else 0)
