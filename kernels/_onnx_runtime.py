"""ONNX export of h_b and ONNX Runtime sessions on the CPU, CUDA or TensorRT provider."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from explaind.errors import FailedPrecondition

log = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "tensorrt")
# The torch.export-based exporter's own default; ONNX Runtime and TensorRT 10 run it.
ONNX_OPSET = 18


def export_onnx(extractor: nn.Module, image_size: int, path: Path) -> Path:
    """Export ``extractor`` (images (N, 3, S, S) -> features (N, D), dynamic N) to ``path``
    unless it is already there.

    torch.export-based (the TorchScript exporter is deprecated). Weights go to
    ``<path>.data`` beside the graph, so models over protobuf's 2 GB limit export too.
    The module is traced where it lives (moving it would move the serving model's shared
    parameters), and both files are written elsewhere and renamed into place, the graph
    last, so a crash never leaves a half-written engine at ``path``.
    """
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_scratch(path)
    device = next(extractor.parameters()).device
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.") as scratch:
        staged = Path(scratch) / path.name
        torch.onnx.export(
            extractor,
            (torch.rand(2, 3, image_size, image_size, device=device),),
            str(staged),
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=True,
            verbose=False,
        )
        weights = staged.with_name(staged.name + ".data")
        if weights.is_file():  # referenced by its bare name, so it moves beside the graph unchanged
            weights.replace(path.with_name(weights.name))
        staged.replace(path)
    log.info("exported feature extractor to %s", path)
    return path


def _remove_abandoned_scratch(path: Path) -> None:
    """Delete scratch folders of exports to ``path`` whose process is gone (killed mid-way):
    each may hold a model's weights. Folders of live processes, exporting now, stay."""
    for scratch in path.parent.glob(f".{path.name}.*"):
        pid = scratch.name.removeprefix(f".{path.name}.").partition(".")[0]
        if scratch.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
