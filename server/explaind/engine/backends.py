"""Backends that run the feature extractor h_b for Predict: eager, torch.compile,
ONNX Runtime, TensorRT (via ONNX Runtime's TensorRT execution provider).

Only h_b goes through a backend; the linear head always runs in eager PyTorch, so a
head edit never needs a recompile or re-export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..errors import FailedPrecondition
from .models import ClassifierVersion

log = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def check_device(device: str) -> torch.device:
    """The torch device, or a clear error when it names an accelerator that is absent."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"[runtime].device is {device!r} but CUDA is not available on this machine (torch {torch.__version__}); use device = \"cpu\"")
    return resolved


def build_feature_fn(version: ClassifierVersion, backend: str, device: str, cache_dir: Path, *, num_threads: int = 0) -> FeatureFn:
    """A function images (N, 3, S, S) in [0, 1] on ``device`` -> features (N, D) on ``device``.

    ``num_threads`` caps ONNX Runtime's intra-op threads as ``torch.set_num_threads``
    caps torch's (0: the runtime's default, one per core).
    """
    extractor = version.feature_extractor
    if extractor is None:
        raise FailedPrecondition(f"backend {backend!r} needs a split classifier; loader {version.loader!r} is inference-only")
    if backend == "eager":
        return version.features
    if backend == "compile":
        compiled = torch.compile(extractor, dynamic=True)

        @torch.inference_mode()
        def run_compiled(images: torch.Tensor) -> torch.Tensor:
            return compiled(images)

        return run_compiled
    if backend in ("onnxruntime", "tensorrt"):
        return _onnxruntime_fn(version, backend, device, cache_dir, num_threads)
    raise FailedPrecondition(f"unknown backend {backend!r}")


def _onnxruntime_fn(version: ClassifierVersion, backend: str, device: str, cache_dir: Path, num_threads: int) -> FeatureFn:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if backend == "tensorrt":
        if not torch.cuda.is_available() or "TensorrtExecutionProvider" not in available:
            raise FailedPrecondition(f"backend 'tensorrt' needs CUDA and onnxruntime's TensorrtExecutionProvider; this machine has CUDA={torch.cuda.is_available()}, providers={available}")
        providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    elif torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise FailedPrecondition(f"device {device!r} with backend 'onnxruntime' needs onnxruntime-gpu (CUDAExecutionProvider); providers here: {available}")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    path = export_onnx(version, cache_dir)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    target = torch.device(device)

    def run(images: torch.Tensor) -> torch.Tensor:
        (features,) = session.run(None, {"images": images.detach().cpu().numpy()})
        return torch.from_numpy(features).to(target)

    return run


def export_onnx(version: ClassifierVersion, cache_dir: Path) -> Path:
    """Export h_b to ONNX (dynamic batch) once per feature version; returns the file."""
    path = Path(cache_dir) / f"features-{version.feature_version[:16]}.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = torch.rand(2, 3, version.image_size, version.image_size)
    temporary = path.with_suffix(".tmp")
    extractor = version.feature_extractor.cpu()
    torch.onnx.export(
        extractor,
        (probe,),
        str(temporary),
        input_names=["images"],
        output_names=["features"],
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    temporary.replace(path)
    log.info("exported feature extractor to %s", path)
    return path
