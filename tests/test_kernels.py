"""ONNX Runtime engines for h_b (explaind.kernels), apart from the engine that picks them."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from explaind.errors import FailedPrecondition
from explaind.kernels import execution_providers, export_onnx, onnx_runtime_features


def small_extractor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def test_engine_matches_eager_at_any_batch_size_and_exports_once(tmp_path, monkeypatch):
    extractor = small_extractor()
    path = export_onnx(extractor, 16, tmp_path / "features.onnx")
    features = onnx_runtime_features(path, execution_providers(), num_threads=1)
    for batch in (1, 5):
        images = torch.rand(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(features(images), extractor(images), atol=1e-5, rtol=1e-4)

    def no_second_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_second_export)
    assert export_onnx(extractor, 16, path) == path
    # The graph and its weights side by side, no scratch left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.onnx", "features.onnx.data"]


def test_export_removes_scratch_left_by_killed_exports_but_not_by_running_ones(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    abandoned = tmp_path / f".features.onnx.{finished.stdout.strip()}.x1"  # its process has exited
    running = tmp_path / f".features.onnx.{os.getpid()}.x2"
    for scratch in (abandoned, running):
        scratch.mkdir()
        (scratch / "features.onnx.data").write_bytes(b"weights")
    export_onnx(small_extractor(), 16, tmp_path / "features.onnx")
    assert not abandoned.exists() and (running / "features.onnx.data").is_file()


def test_export_moves_the_engine_into_place_only_when_complete(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def crash_after_writing(*args, **kwargs):
        real_export(*args, **kwargs)
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(torch.onnx, "export", crash_after_writing)
    with pytest.raises(RuntimeError, match="killed mid-export"):
        export_onnx(small_extractor(), 16, tmp_path / "features.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unknown_engine_and_missing_providers_fail_clearly():
    assert execution_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="engine"):
        execution_providers("openvino")
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="TensorrtExecutionProvider"):
            execution_providers("tensorrt")
        with pytest.raises(FailedPrecondition, match="CUDAExecutionProvider"):
            execution_providers("onnxruntime", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_leaves_a_cuda_model_on_the_gpu(tmp_path):
    extractor = small_extractor().cuda()
    export_onnx(extractor, 16, tmp_path / "features.onnx")
    assert all(p.is_cuda for p in extractor.parameters())
