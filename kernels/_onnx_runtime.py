"""ONNX export of h_b and ONNX Runtime sessions on the CPU, CUDA or TensorRT provider."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from explaind.errors import FailedPrecondition

log = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "tensorrt")


def export_onnx(extractor: nn.Module, image_size: int, path: Path) -> Path:
    """Export ``extractor`` (images (N, 3, S, S) -> features (N, D), dynamic N) to ``path``
    unless it is already there.

    The module is traced where it lives (moving it would move the serving model's
    shared parameters), and the file is renamed into place, so a crash never leaves a
    half-written engine at ``path``.
    """
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    device = next(extractor.parameters()).device
    torch.onnx.export(
        extractor,
        (torch.rand(2, 3, image_size, image_size, device=device),),
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


def execution_providers(engine: str = "onnxruntime", device: str = "cpu") -> list[str]:
    """ONNX Runtime providers for ``engine`` on ``device``, best first; checked before any
    export so a machine without them fails at once with a ``FailedPrecondition`` naming
    what is missing.

    "tensorrt" uses TensorRT, falling back to CUDA, then CPU, per node; "onnxruntime"
    uses CUDA when ``device`` is a CUDA device, else the CPU.
    """
    import onnxruntime

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    available = onnxruntime.get_available_providers()
    if engine == "tensorrt":
        if not torch.cuda.is_available() or "TensorrtExecutionProvider" not in available:
            raise FailedPrecondition(
                f"backend 'tensorrt' needs CUDA and onnxruntime's TensorrtExecutionProvider; this machine has "
                f"CUDA={torch.cuda.is_available()}, providers={available}")
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise FailedPrecondition(
                f"device {device!r} with backend 'onnxruntime' needs onnxruntime-gpu (CUDAExecutionProvider); "
                f"providers here: {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_runtime_features(
    path: Path, providers: list[str], *, device: str = "cpu", num_threads: int = 0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function images (N, 3, S, S) in [0, 1] -> features (N, D) on ``device``, running
    the ONNX file at ``path`` on ``providers`` (from :func:`execution_providers`).
    ``num_threads`` caps intra-op threads (0: one per core).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    target = torch.device(device)

    def run(images: torch.Tensor) -> torch.Tensor:
        (features,) = session.run(None, {"images": images.detach().cpu().numpy()})
        return torch.from_numpy(features).to(target)

    return run
