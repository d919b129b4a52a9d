"""ONNX export of h_b and ONNX Runtime sessions on the CPU, CUDA or TensorRT provider."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from explaind.errors import FailedPrecondition

log = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "tensorrt")
# The torch.export-based exporter's own default; ONNX Runtime and TensorRT 10 run it.
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "features"


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
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
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


Provider = tuple[str, dict[str, object]]


def execution_providers(
    engine: str = "onnxruntime",
    device: str = "cpu",
    *,
    image_size: int = 0,
    max_batch_size: int = 0,
    engine_cache_dir: Path | None = None,
) -> list[Provider]:
    """ONNX Runtime providers with their options for ``engine`` on ``device``, best first;
    checked before any export so a machine without them fails at once with a
    ``FailedPrecondition`` naming what is missing.

    "tensorrt" uses TensorRT, falling back to CUDA, then CPU, per node; "onnxruntime"
    uses CUDA when ``device`` is a CUDA device, else the CPU. GPU providers run on
    ``device``'s index (ONNX Runtime's own default is GPU 0).

    TensorRT needs ``image_size``, ``max_batch_size`` and ``engine_cache_dir``: it builds
    one engine for batches 1 to ``max_batch_size`` (without a profile it would rebuild,
    for minutes on a large model, each time a larger batch came) and keeps it, with its
    timing cache, in ``engine_cache_dir`` under a folder per ONNX Runtime version and GPU
    architecture, so a restart loads it instead of building it again.
    """
    import onnxruntime

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    available = onnxruntime.get_available_providers()
    cpu: Provider = ("CPUExecutionProvider", {})
    if engine == "tensorrt":
        if not torch.cuda.is_available() or "TensorrtExecutionProvider" not in available:
            raise FailedPrecondition(
                f"backend 'tensorrt' needs CUDA and onnxruntime's TensorrtExecutionProvider; this machine has "
                f"CUDA={torch.cuda.is_available()}, providers={available}")
        if image_size < 1 or max_batch_size < 1 or engine_cache_dir is None:
            raise ValueError("TensorRT needs image_size, max_batch_size and engine_cache_dir")
        index = _cuda_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        cache = Path(engine_cache_dir) / f"onnxruntime-{onnxruntime.__version__}-sm{major}{minor}"
        cache.mkdir(parents=True, exist_ok=True)
        shape = f"3x{image_size}x{image_size}"
        tensorrt: Provider = ("TensorrtExecutionProvider", {
            "device_id": index,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": f"{INPUT_NAME}:1x{shape}",
            "trt_profile_opt_shapes": f"{INPUT_NAME}:{max_batch_size}x{shape}",
            "trt_profile_max_shapes": f"{INPUT_NAME}:{max_batch_size}x{shape}",
        })
        return [tensorrt, ("CUDAExecutionProvider", {"device_id": index}), cpu]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise FailedPrecondition(
                f"device {device!r} with backend 'onnxruntime' needs onnxruntime-gpu (CUDAExecutionProvider); "
                f"providers here: {available}")
        return [("CUDAExecutionProvider", {"device_id": _cuda_index(device)}), cpu]
    return [cpu]


def _cuda_index(device: str) -> int:
    """The GPU index of a CUDA ``device`` ("cuda" is torch's current GPU)."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def onnx_runtime_features(
    path: Path, providers: list[Provider], *, device: str = "cpu", num_threads: int = 0, max_batch_size: int = 0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function images (N, 3, S, S) in [0, 1] -> features (N, D) on ``device``, running
    the ONNX file at ``path`` on ``providers`` (from :func:`execution_providers`).
    ``num_threads`` caps intra-op threads (0: one per core); ``max_batch_size`` > 0 runs
    larger batches in slices of that size (TensorRT's profile ends there).

    Images and features are bound in place on ``device``: on a GPU they stay there
    instead of crossing to host memory and back on every call.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    width = session.get_outputs()[0].shape[1]
    if not isinstance(width, int):
        raise FailedPrecondition(f"{path}: the feature width must be fixed in the graph, got {width!r}")
    target = torch.device(device)
    bound_device = ("cuda", _cuda_index(device)) if target.type == "cuda" else ("cpu", 0)

    def run_slice(images: torch.Tensor) -> torch.Tensor:
        images = images.detach().to(target, torch.float32).contiguous()
        features = torch.empty(len(images), width, device=target)
        binding = session.io_binding()
        binding.bind_input(INPUT_NAME, *bound_device, np.float32, tuple(images.shape), images.data_ptr())
        binding.bind_output(OUTPUT_NAME, *bound_device, np.float32, tuple(features.shape), features.data_ptr())
        if target.type == "cuda":  # ONNX Runtime reads the images on its own stream
            torch.cuda.current_stream(target).synchronize()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return features

    def run(images: torch.Tensor) -> torch.Tensor:
        if not max_batch_size or len(images) <= max_batch_size:
            return run_slice(images)
        return torch.cat([run_slice(part) for part in images.split(max_batch_size)])

    return run
