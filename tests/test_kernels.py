"""ONNX Runtime engines for h_b (explaind.kernels), apart from the engine that picks them."""

import contextlib
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from explaind.errors import FailedPrecondition
from explaind.kernels import ImageInput, UnsplittableGraph, execution_providers, export_onnx, onnx_runtime_features, split_onnx_classifier


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
    # Its batch is dynamic: one fixed at the traced 2 would run every call in padded slices of 2.
    import onnxruntime

    (graph_input,) = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    assert isinstance(graph_input.shape[0], str) and graph_input.shape[1:] == [3, 16, 16]
    # The graph and its weights side by side, no scratch left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.onnx", "features.onnx.data"]


def test_export_removes_scratch_left_by_killed_exports_and_waits_for_a_running_one(tmp_path):
    # Scratch was kept while a process of the pid in its name lived: in a container the
    # restarted server is pid 1 again, and a killed export's weights stayed for good.
    abandoned = tmp_path / ".features.onnx.1.x1"
    abandoned.mkdir()
    (abandoned / "features.onnx.data").write_bytes(b"weights")
    export_onnx(small_extractor(), 16, tmp_path / "features.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.onnx", "features.onnx.data"]
    # An export running in another process holds the folder: a second one waits for it
    # and then takes its file, instead of deleting its scratch or exporting again.
    other = tmp_path / "other"
    other.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from explaind.kernels._onnx_runtime import _exclusive
        held = _exclusive(Path({str(other)!r}))
        held.__enter__()  # as a running export holds it
        print("holding", flush=True)
        sys.stdin.readline()
        open({str(other / "features.onnx")!r}, "w").write("exported by the other process")
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        waiting = ThreadPoolExecutor(1).submit(export_onnx, small_extractor(), 16, other / "features.onnx")
        with pytest.raises(TimeoutError):
            waiting.result(timeout=1)
        holder.communicate("done\n", timeout=30)
        assert waiting.result(timeout=30).read_text() == "exported by the other process"
    finally:
        holder.kill()


def test_export_moves_the_engine_into_place_only_when_complete(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def crash_after_writing(*args, **kwargs):
        real_export(*args, **kwargs)
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(torch.onnx, "export", crash_after_writing)
    with pytest.raises(RuntimeError, match="killed mid-export"):
        export_onnx(small_extractor(), 16, tmp_path / "features.onnx")
    assert list(tmp_path.iterdir()) == []


def test_pixels_are_fed_as_the_nearest_value_saturating_at_0_and_255_channels_last_where_the_graph_says():
    """uint8 wraps around: an image a hair over 1 (resampling overshoots) was fed 255.5 -> 256 -> 0."""
    images = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 1.002, -0.003
    pixels = ImageInput("images", "tensor(uint8)", True, ("n", 4, 5, 3)).fed(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 4, 5, 3) and pixels.is_contiguous()
    assert pixels[0, 0, 0, 0] == 255 and pixels[0, 0, 1, 0] == 0
    inside = (images >= 0) & (images <= 1)
    error = (pixels.permute(0, 3, 1, 2).float() - images * 255).abs()
    assert error[inside].max() <= 0.5  # the nearest pixel value, not truncated
    floats = ImageInput("images", "tensor(float16)", False, ("n", 3, 4, 5)).fed(images)
    assert floats.dtype == torch.float16 and torch.equal(floats, images.half())


@pytest.mark.parametrize(("element_type", "size", "reason"), [
    ("FLOAT", "s", r"the feature width must be fixed in the graph, got "),
    ("DOUBLE", 4, r"the graph's 'features' is tensor\(double\), not one of \['tensor\(float\)', 'tensor\(float16\)'\]"),
])
def test_a_graph_whose_features_are_not_floats_of_a_fixed_width_is_refused(element_type, size, reason):
    """Features (N, 3 x S x S), flattened images: their width is fixed only where S is."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("Cast", ["flat"], ["features"], to=getattr(TensorProto, element_type))]
    graph = helper.make_graph(nodes, "features", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, size, size])],
                              [helper.make_tensor_value_info("features", getattr(TensorProto, element_type), None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    with pytest.raises(FailedPrecondition, match=reason):
        onnx_runtime_features(model.SerializeToString(), execution_providers(), num_threads=1)


def test_a_graph_whose_input_takes_no_images_is_refused_naming_it():
    """A FailedPrecondition naming the input, as for its features, not a bare ValueError."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"]), helper.make_node("Cast", ["flat"], ["features"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "features", [helper.make_tensor_value_info("pixels", TensorProto.DOUBLE, ["n", 3, 4, 4])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 48])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    with pytest.raises(FailedPrecondition, match=r"^the graph's input 'pixels' is tensor\(double\); explaind feeds it float32, float16 or uint8 images$"):
        onnx_runtime_features(model.SerializeToString(), execution_providers(), num_threads=1)


def test_engine_reads_images_of_any_layout_and_slices_batches_beyond_its_limit(tmp_path):
    """Images are bound by address, so a strided tensor must be made contiguous first;
    a batch over ``max_batch_size`` (TensorRT's profile) runs in slices, in order."""
    extractor = small_extractor()
    path = export_onnx(extractor, 16, tmp_path / "features.onnx")
    sliced = onnx_runtime_features(path, execution_providers(), num_threads=1, max_batch_size=2)
    images = torch.rand(10, 3, 16, 16)
    for layout in (images[::2], images[:5].to(memory_format=torch.channels_last), images[:5, :, :, :]):
        with torch.no_grad():
            torch.testing.assert_close(sliced(layout), extractor(layout), atol=1e-5, rtol=1e-4)


def test_a_graph_with_a_fixed_batch_runs_in_slices_of_its_batch_whatever_the_configured_limit(tmp_path):
    """Its own batch wins over ``max_batch_size``: a slice of any other size fails ONNX Runtime's shape check."""
    extractor = small_extractor()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(extractor, (torch.rand(2, 3, 16, 16),), str(path), input_names=["images"], dynamo=True, verbose=False)
    features = onnx_runtime_features(path, execution_providers(), num_threads=1, max_batch_size=3)
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(features(images), extractor(images), atol=1e-5, rtol=1e-4)


def test_gpu_providers_run_on_the_configured_gpu_and_tensorrt_keeps_one_engine_per_runtime_tensorrt_and_gpu(tmp_path, monkeypatch):
    import ctypes
    from types import SimpleNamespace

    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.8.0.43"))
    assert execution_providers("onnxruntime", "cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    # "cuda" is torch's current GPU (torch.cuda.set_device), not ONNX Runtime's default GPU 0.
    assert execution_providers("onnxruntime", "cuda")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    with pytest.raises(ValueError, match="max_batch_size"):
        execution_providers("tensorrt", "cuda:1", image_size=224)
    for missing_one in ({"max_batch_size": 64, "engine_cache_dir": tmp_path}, {"image_size": 224, "engine_cache_dir": tmp_path},
                        {"image_size": 224, "max_batch_size": 64}):
        with pytest.raises(ValueError, match="TensorRT needs image_size, max_batch_size and engine_cache_dir"):
            execution_providers("tensorrt", "cuda:1", **missing_one)
    providers = execution_providers("tensorrt", "cuda:1", image_size=224, max_batch_size=64, engine_cache_dir=tmp_path / "engines")
    assert [name for name, _ in providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    options = providers[0][1]
    cache = tmp_path / "engines" / f"onnxruntime-{onnxruntime.__version__}-tensorrt-10.8.0.43-sm90"
    assert cache.is_dir() and options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(cache)
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"] and options["device_id"] == 1
    assert (options["trt_profile_min_shapes"], options["trt_profile_opt_shapes"], options["trt_profile_max_shapes"]) == (
        "images:1x3x224x224", "images:64x3x224x224", "images:64x3x224x224")
    assert providers[1] == ("CUDAExecutionProvider", {"device_id": 1})
    # An engine serialised by one TensorRT does not load in another: an upgrade builds anew.
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.9.0.34"))
    upgraded = execution_providers("tensorrt", "cuda:1", image_size=224, max_batch_size=64, engine_cache_dir=tmp_path / "engines")
    assert upgraded[0][1]["trt_engine_cache_path"] == str(tmp_path / "engines" / f"onnxruntime-{onnxruntime.__version__}-tensorrt-10.9.0.34-sm90")
    # Without the tensorrt package its shared library says which; failing that, "unknown".
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace(getInferLibVersion=lambda: 100900))
    library = execution_providers("tensorrt", "cuda:1", image_size=224, max_batch_size=64, engine_cache_dir=tmp_path / "engines")
    assert library[0][1]["trt_engine_cache_path"].endswith("-tensorrt-100900-sm90")

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace())  # a libnvinfer too old to say
    assert execution_providers("tensorrt", "cuda:1", image_size=224, max_batch_size=64, engine_cache_dir=tmp_path / "engines")[0][1][
        "trt_engine_cache_path"].endswith("-tensorrt-unknown-sm90")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    unknown = execution_providers("tensorrt", "cuda:1", image_size=224, max_batch_size=64, engine_cache_dir=tmp_path / "engines")
    assert unknown[0][1]["trt_engine_cache_path"].endswith("-tensorrt-unknown-sm90")


def test_an_unknown_backend_and_missing_providers_fail_clearly():
    assert execution_providers() == [("CPUExecutionProvider", {})]
    with pytest.raises(ValueError, match=r"backend must be one of \(.onnxruntime., .tensorrt.\), got .openvino."):
        execution_providers("openvino")
    with pytest.raises(ValueError, match=r"^backend 'tensorrt' runs on a CUDA device, got device='cpu'$"):  # it took GPU 0 unasked
        execution_providers("tensorrt", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="TensorrtExecutionProvider"):
            execution_providers("tensorrt", "cuda")
        with pytest.raises(FailedPrecondition, match="CUDAExecutionProvider"):
            execution_providers("onnxruntime", "cuda")


def test_tensorrt_without_its_provider_is_refused_even_where_cuda_is_available(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(FailedPrecondition, match=r"TensorrtExecutionProvider; this machine has CUDA=True, providers=\['CUDAExecutionProvider'"):
        execution_providers("tensorrt", "cuda:0", image_size=224, max_batch_size=8, engine_cache_dir=Path("unused"))


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_gpu_provider_onnx_runtime_could_not_start_is_refused_not_replaced_by_the_cpu(tmp_path, monkeypatch):
    """onnxruntime-gpu lists its CUDA provider even where CUDA's libraries do not load;
    the session then starts on the CPU with only a warning (here: a provider this build
    lacks, which ONNX Runtime skips the same way)."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("checks an onnxruntime without its CUDA provider")
    path = export_onnx(small_extractor(), 16, tmp_path / "features.onnx")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(FailedPrecondition, match=r"could not start its CUDAExecutionProvider .* would run on \['CPUExecutionProvider'\]"):
        onnx_runtime_features(path, execution_providers("onnxruntime", "cuda:0"), device="cuda:0", num_threads=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_leaves_a_cuda_model_on_the_gpu(tmp_path):
    extractor = small_extractor().cuda()
    export_onnx(extractor, 16, tmp_path / "features.onnx")
    assert all(p.is_cuda for p in extractor.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_returns_features_on_the_gpu_that_match_eager(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    extractor = small_extractor().cuda()
    path = export_onnx(extractor, 16, tmp_path / "features.onnx")
    features = onnx_runtime_features(path, execution_providers("onnxruntime", "cuda"), device="cuda")
    images = torch.rand(5, 3, 16, 16, device="cuda") * 2  # written by a kernel just before the call
    with torch.no_grad():
        expected = extractor(images)
    computed = features(images)
    assert computed.is_cuda
    torch.testing.assert_close(computed, expected, atol=1e-4, rtol=1e-3)


def _linear_classifier_graph(tmp_path, tail: str, *, initializers_as_inputs: bool = False) -> tuple[str, np.ndarray]:
    """A tiny ONNX classifier: images (N, 3, 4, 4) -> mean over space (N, 3) -> a final
    linear layer of the form ``tail`` -> logits (N, 2); returns its path and W (2, 3).
    ``initializers_as_inputs`` also lists the constants among the graph's inputs, as older
    exporters (keep_initializers_as_inputs) and the ONNX model zoo do."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal(2).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", ["images", "axes"], ["pooled"], keepdims=0)]
    constants = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    outputs, shapes = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])], []
    if tail == "gemm_transposed":  # what torch exports for nn.Linear
        nodes.append(helper.make_node("Gemm", ["pooled", "W", "b"], ["logits"], name="fc", transB=1))
        constants += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    elif tail == "gemm_and_probabilities":  # a second output, computed from the logits and from a constant of its own
        nodes += [helper.make_node("Gemm", ["pooled", "W", "b"], ["logits"], transB=1),
                  helper.make_node("Mul", ["logits", "temperature"], ["scaled"]), helper.make_node("Softmax", ["scaled"], ["probabilities"])]
        constants += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b"),
                      numpy_helper.from_array(np.float32(0.5), "temperature")]
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 2]))
        shapes = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", size]) for name, size in (("pooled", 3), ("scaled", 2))]
    elif tail == "gemm":
        nodes.append(helper.make_node("Gemm", ["pooled", "W", "b"], ["logits"]))
        constants += [numpy_helper.from_array(weight.T.copy(), "W"), numpy_helper.from_array(bias, "b")]
    elif tail in ("matmul_add", "matmul"):
        nodes.append(helper.make_node("MatMul", ["pooled", "W"], ["product" if tail == "matmul_add" else "logits"]))
        constants.append(numpy_helper.from_array(weight.T.copy(), "W"))
        if tail == "matmul_add":
            nodes.append(helper.make_node("Add", ["b", "product"], ["logits"]))
            constants.append(numpy_helper.from_array(bias, "b"))
    elif tail == "features_from_an_if":  # its branches read "pooled" from the graph around them, not as inputs
        branch = {name: helper.make_graph([helper.make_node(op, ["pooled"], [f"{name}_out"])], name, [],
                                          [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["n", 3])])
                  for name, op in (("then", "Identity"), ("otherwise", "Neg"))}
        nodes += [helper.make_node("If", ["always"], ["features"], then_branch=branch["then"], else_branch=branch["otherwise"]),
                  helper.make_node("Gemm", ["features", "W", "b"], ["logits"], transB=1)]
        constants += [numpy_helper.from_array(np.array(True), "always"), numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    elif tail == "softmax":
        nodes += [helper.make_node("Gemm", ["pooled", "W", "b"], ["scores"], transB=1), helper.make_node("Softmax", ["scores"], ["logits"])]
        constants += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    elif tail == "scaled_gemm":
        nodes.append(helper.make_node("Gemm", ["pooled", "W", "b"], ["logits"], transB=1, alpha=2.0))
        constants += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    elif tail == "scaled_bias_gemm":
        nodes.append(helper.make_node("Gemm", ["pooled", "W", "b"], ["logits"], transB=1, beta=0.5))
        constants += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    elif tail == "transposed_input_gemm":  # transA: it multiplies the features transposed
        nodes.append(helper.make_node("Gemm", ["pooled", "W", "b"], ["logits"], transA=1, transB=1))
        constants += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    elif tail == "gemm_then_add":  # the Add's constant would be lost beside the Gemm's own bias
        nodes += [helper.make_node("Gemm", ["pooled", "W", "b"], ["scores"], transB=1), helper.make_node("Add", ["scores", "b"], ["logits"])]
        constants += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    elif tail == "matmul_plus_computed":  # a residual sum, not a bias
        nodes += [helper.make_node("MatMul", ["pooled", "W"], ["product"]), helper.make_node("Relu", ["product"], ["rectified"]),
                  helper.make_node("Add", ["product", "rectified"], ["logits"])]
        constants.append(numpy_helper.from_array(weight.T.copy(), "W"))
    elif tail == "batched_weight":
        nodes.append(helper.make_node("MatMul", ["pooled", "W"], ["logits"]))
        constants.append(numpy_helper.from_array(weight.T.copy()[None], "W"))
    elif tail == "two_inputs":
        nodes += [helper.make_node("Mul", ["pooled", "mask"], ["masked"]), helper.make_node("Gemm", ["masked", "W", "b"], ["logits"], transB=1)]
        constants += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    elif tail == "computed_weight":
        nodes += [helper.make_node("Relu", ["W"], ["W_relu"]), helper.make_node("Gemm", ["pooled", "W_relu", "b"], ["logits"], transB=1)]
        constants += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 4, 4])]
    if tail == "two_inputs":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["n", 3]))
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(c.name, c.data_type, list(c.dims)) for c in constants]
    graph = helper.make_graph(nodes, "classifier", inputs, outputs, constants, value_info=shapes)
    path = str(tmp_path / f"{tail}.onnx")
    # IR 9, not the installed onnx's newest: an older ONNX Runtime (1.30 reads up to 13)
    # refuses a newer IR version, as it would a user's model saved so.
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
    return path, weight


@pytest.mark.parametrize("tail", ["gemm_transposed", "gemm", "matmul_add", "matmul", "gemm_and_probabilities", "features_from_an_if"])
def test_an_onnx_classifier_splits_before_its_final_linear_layer(tmp_path, tail):
    import onnx
    import onnxruntime

    path, weight = _linear_classifier_graph(tmp_path, tail)
    split = split_onnx_classifier(path)  # a second output (probabilities) was refused: "one output, the logits"
    feature_graph = onnx.load_from_string(split.feature_graph).graph
    # The head, and all that only other outputs need, gone.
    branched = tail == "features_from_an_if"
    assert [node.op_type for node in feature_graph.node] == (["ReduceMean", "If"] if branched else ["ReduceMean"])
    assert {tensor.name for tensor in feature_graph.initializer} == ({"axes", "always"} if branched else {"axes"})
    assert [shape.name for shape in feature_graph.value_info] == (["pooled"] if tail == "gemm_and_probabilities" else [])
    images = torch.rand(5, 3, 4, 4)
    features = onnx_runtime_features(split.feature_graph, execution_providers(), num_threads=1)(images)
    torch.testing.assert_close(features, images.mean(dim=(2, 3)))
    torch.testing.assert_close(split.weight, torch.from_numpy(weight))
    whole = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    torch.testing.assert_close(features @ split.weight.T + split.bias, torch.from_numpy(whole))
    assert split.feature_name == ("features" if branched else "pooled") and (split.bias == 0).all() == (tail == "matmul")
    assert split.head_name == ("fc" if tail == "gemm_transposed" else "W")  # the node's name, else its weight's


def test_a_split_keeps_what_a_custom_operators_subgraph_list_reads(tmp_path):
    """A custom-domain node may hold a list of subgraphs (a GRAPHS attribute, which no
    standard op has) that read tensors of the graph around them: the feature graph must
    keep the nodes computing those, and drop only what nothing reads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def branch(name: str, reads: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Identity", [reads], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["n", 3])])

    nodes = [helper.make_node(op, ["images", "axes"], [name], keepdims=0)
             for op, name in (("ReduceMean", "pooled"), ("ReduceMax", "peak"), ("ReduceMin", "unread"))]
    nodes += [helper.make_node("Choose", ["selector"], ["features"], domain="com.example", branches=[branch("first", "pooled"), branch("second", "peak")]),
              helper.make_node("Gemm", ["features", "W", "b"], ["logits"], transB=1)]
    constants = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"), numpy_helper.from_array(np.array(0, np.int64), "selector"),
                 numpy_helper.from_array(np.ones((2, 3), np.float32), "W"), numpy_helper.from_array(np.zeros(2, np.float32), "b")]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])], constants)
    assert graph.node[3].attribute[0].type == onnx.AttributeProto.GRAPHS
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)], ir_version=9), path)
    split = split_onnx_classifier(path)
    feature_graph = onnx.load_from_string(split.feature_graph).graph
    assert [node.op_type for node in feature_graph.node] == ["ReduceMean", "ReduceMax", "Choose"]
    assert {tensor.name for tensor in feature_graph.initializer} == {"axes", "selector"} and split.feature_name == "features"


@pytest.mark.parametrize("tail", ["gemm_transposed", "matmul_add"])
def test_an_onnx_classifier_listing_its_initializers_as_inputs_splits_into_a_one_input_feature_graph(tmp_path, tail):
    import onnx

    path, weight = _linear_classifier_graph(tmp_path, tail, initializers_as_inputs=True)
    split = split_onnx_classifier(path)
    assert [i.name for i in onnx.load_from_string(split.feature_graph).graph.input] == ["images", "axes"]  # the head's went with it
    images = torch.rand(5, 3, 4, 4)
    features = onnx_runtime_features(split.feature_graph, execution_providers(), num_threads=1)(images)
    torch.testing.assert_close(features, images.mean(dim=(2, 3)))
    torch.testing.assert_close(split.weight, torch.from_numpy(weight))


@pytest.mark.parametrize(("tail", "reason"), [("softmax", "from a Softmax node"), ("scaled_gemm", "scales or transposes"),
                                              ("scaled_bias_gemm", "scales or transposes"), ("transposed_input_gemm", "scales or transposes"),
                                              ("gemm_then_add", "not a MatMul's bias"),
                                              ("matmul_plus_computed", "not a MatMul's bias"), ("batched_weight", r"shape \(2, 3, 1\), not \(classes, features\)"),
                                              ("two_inputs", "one input, the images"), ("computed_weight", "is computed, not a constant")])
def test_an_onnx_classifier_that_does_not_end_in_a_linear_layer_is_not_split(tmp_path, tail, reason):
    path, _ = _linear_classifier_graph(tmp_path, tail)
    with pytest.raises(UnsplittableGraph, match=reason):
        split_onnx_classifier(path)


@pytest.mark.parametrize(("shape", "channels_last"), [
    (["n", 3, "h", "w"], False), (["n", "c", "h", "w"], False), ([2, 3, 64, 64], False), (["n", "h", "w", 3], True), ([1, 64, 64, 3], True),
    (["n", "h", "w", 1], None), (["n", "h", "w", 4], None), (["n", "c", "h", 2], None), ([2, 64, 64, 1], None), (["n", 1, "h", "w"], None),
    (["n", 3, "h", 3], False), (["n", 3, "s"], None),
])
def test_an_onnx_image_inputs_layout_is_read_off_its_fixed_channels_and_another_channel_count_is_refused(shape, channels_last):
    """A grey or RGBA graph channels last, its height and width dynamic, was read as
    channels first 1 or 4 pixels wide: served images of that size, or refused for an
    image_size it did not fix. (None: refused.)"""
    import onnxruntime
    from onnx import TensorProto, helper

    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("images", "out")]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "images", values[:1], values[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    (graph_input,) = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).get_inputs()
    if channels_last is None:
        with pytest.raises(ValueError, match=r"^has shape .*; explaind feeds it images \(N, 3, S, S\) or \(N, S, S, 3\)$"):
            ImageInput.of(graph_input)
    else:
        assert ImageInput.of(graph_input).channels_last is channels_last


def _onnx_runtime_out_of_memory_errors() -> list[BaseException]:
    """Real ONNX Runtime allocation failures: a graph whose hidden layer, at 20,000 rows,
    needs 320 MB, run in a session on a CPU arena limited to 64 MB, through ``run`` and
    through ``run_with_iobinding`` (the engine's path), which raise different types."""
    import onnxruntime
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1024, 4096], np.zeros(1024 * 4096, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("ReduceSum", ["h"], ["y"], keepdims=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9)
    # The process's ONNX Runtime environment gets a CPU arena allocator capped at 64 MB,
    # used only by sessions that ask for it (this one), not by the engines of other tests.
    onnxruntime.create_and_register_allocator(
        onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT),
        onnxruntime.OrtArenaCfg(64 << 20, -1, -1, -1))
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    images = np.ones((20_000, 1024), np.float32)
    assert session.run(None, {"x": images[:2]})[0].shape == (1, 1)  # a small batch fits
    errors = []
    try:
        session.run(None, {"x": images})
    except Exception as error:  # noqa: BLE001
        errors.append(error)
    binding = session.io_binding()
    binding.bind_cpu_input("x", images)
    binding.bind_output("y")
    try:
        session.run_with_iobinding(binding)
    except Exception as error:  # noqa: BLE001
        errors.append(error)
    return errors


def test_onnx_runtime_out_of_memory_is_resource_exhausted_like_pytorchs(caplog):
    # ONNX Runtime's failed allocations (an ONNX classifier given a large batch) were INTERNAL, reported as a bug.
    import logging

    from explaind.errors import report_unexpected

    errors = _onnx_runtime_out_of_memory_errors()
    # run's arena failure is a Fail (a RuntimeException in onnxruntime 1.19, the lowest the project admits).
    assert [type(error).__name__ for error in errors] in (["Fail", "RuntimeError"], ["RuntimeException", "RuntimeError"])
    assert all("smaller than requested bytes" in str(error) for error in errors)
    log = logging.getLogger("test")
    for error in errors:
        code, message = report_unexpected(log, "a run", error, less_work="fewer images")  # a Predict's
        assert code == "RESOURCE_EXHAUSTED" and message.startswith("the model's device ran out of memory; retry with fewer images, or later")
    # Other ONNX Runtime failures, and other errors that speak of memory, are still bugs.
    import onnxruntime

    state = onnxruntime.capi.onnxruntime_pybind11_state
    for error in (state.Fail("[ONNXRuntimeError] : 1 : FAIL : Load model failed"), RuntimeError("Error in execution: Got invalid dimensions")):
        assert report_unexpected(log, "a run", error)[0] == "INTERNAL"
    # The host's memory (PyTorch's CPU allocator, a MemoryError) is the server's, as the device's is, said as the host's.
    for error in (RuntimeError("DefaultCPUAllocator: can't allocate memory: Failed to allocate memory for requested buffer"), MemoryError("bad allocation")):
        code, message = report_unexpected(log, "a run", error, less_work="fewer images")
        assert code == "RESOURCE_EXHAUSTED" and message.startswith("the server ran out of memory; retry with fewer images, or later")
    # A server that never loaded ONNX Runtime cannot have met its failure (the same words are a bug), nor imports it to judge one.
    with pytest.MonkeyPatch.context() as patched:
        patched.delitem(sys.modules, "onnxruntime")
        assert report_unexpected(log, "a run", errors[1])[0] == "INTERNAL"
        assert "onnxruntime" not in sys.modules


@pytest.mark.parametrize("installed", ["wheel", "editable", "behind_another_checkout", "root_on_the_path_again"])
def test_at_the_repositorys_root_kernels_is_hugging_faces_installed_package_and_explaind_kernels_the_engines(tmp_path, installed):
    # transformers 5.25 and later import Hugging Face's `kernels` as diffusers imports any model. Python run at the
    # repository's root (python -m explaind, make test, make demo) found kernels/ there first, and every diffusers
    # model failed to import: "cannot import name 'CUDAProperties' from 'kernels' (.../kernels/__init__.py)".
    # Installed from a wheel, its package lies beside its metadata; installed editable (maturin's .pth), in its source
    # directory, later on sys.path; behind another explaind checkout, that one's kernels/ hands it on, not back; nor to
    # itself where the root is on sys.path again (PYTHONPATH=. at the root), ahead of Hugging Face's.
    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"  # Hugging Face's kernels, installed: on sys.path after the root, which `python -c` puts first
    (site / "kernels-0.19.1.dist-info").mkdir(parents=True)
    (site / "kernels-0.19.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    package = (tmp_path / "source" if installed == "editable" else site) / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("class CUDAProperties:\n    pass\n")
    before = [tmp_path / "checkout"] if installed == "behind_another_checkout" else []
    for checkout in before:
        (checkout / "kernels").mkdir(parents=True)
        (checkout / "kernels" / "__init__.py").write_bytes((root / "kernels" / "__init__.py").read_bytes())
    again = [root] if installed == "root_on_the_path_again" else []
    python_path = [*map(str, [*again, *before, site, *([package.parent] if installed == "editable" else [])]),
                   *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    found = subprocess.run(
        [sys.executable, "-c", "import kernels, explaind.kernels\nfrom kernels import CUDAProperties\n"
                               "print(kernels.__file__, explaind.kernels.ImageInput.__module__)"],
        cwd=root, env={**os.environ, "PYTHONPATH": os.pathsep.join(python_path)}, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(package / "__init__.py"), "explaind.kernels._onnx_runtime"]


def test_at_the_repositorys_root_without_hugging_faces_kernels_installed_kernels_is_the_engines():
    # Nothing to hand the name over to: the checkout's kernels/ stays the engines, not a search that finds itself again.
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        pytest.skip(f"Hugging Face's kernels is installed: {importlib.metadata.distribution('kernels').version}")
    found = subprocess.run([sys.executable, "-c", "import kernels\nprint(kernels.__file__, kernels.ImageInput.__module__)"],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"), "kernels._onnx_runtime"]
