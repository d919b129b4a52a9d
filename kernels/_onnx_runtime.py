"""ONNX export of h_b and ONNX Runtime sessions on the CPU, CUDA or TensorRT provider."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from explaind.errors import FailedPrecondition

log = logging.getLogger(__name__)

ONNX_BACKENDS = ("onnxruntime", "tensorrt")  # the [runtime].backend values that run h_b on ONNX Runtime
# The torch.export-based exporter's own default; ONNX Runtime and TensorRT 10 run it.
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "features"
# The element types, by ONNX Runtime's names, that images and features are bound as: float32,
# and float16 (a model exported after ``model.half()``, or converted with onnxconverter_common).
FLOAT_TYPES: dict[str, tuple[torch.dtype, type[np.floating]]] = {
    "tensor(float)": (torch.float32, np.float32),
    "tensor(float16)": (torch.float16, np.float16),
}
# And the types a graph may take images as: also uint8 pixels, 0-255, which a graph with its
# preprocessing inside takes (one converted from TensorFlow, or exported with it).
IMAGE_TYPES: dict[str, tuple[torch.dtype, type[np.generic]]] = {**FLOAT_TYPES, "tensor(uint8)": (torch.uint8, np.uint8)}


@dataclass(frozen=True)
class ImageInput:
    """How a graph's image input takes explaind's images, (N, 3, S, S) floats in [0, 1]:
    in its element type (``type``, a key of :data:`IMAGE_TYPES`; uint8 as pixels 0-255)
    and its layout, channels first (N, 3, S, S) or last (N, S, S, 3)."""

    name: str
    type: str
    channels_last: bool
    shape: tuple[int | str | None, ...]  # as the graph gives it: ints where fixed, names where dynamic

    @classmethod
    def of(cls, graph_input: object) -> ImageInput:
        """An ONNX Runtime session's input (a ``NodeArg``) read as images; ``ValueError``
        completing "the input <name> ..." where it takes no images explaind can feed. Its
        layout is channels last only where its last dimension, not its second, is fixed at 3.
        A last dimension fixed at another channel count (1, 2 or 4: grey, grey and alpha,
        RGBA) beside a second that is not 3 is refused as a channels-last graph's channels:
        read as a width, a graph of dynamic height and width was served 1-pixel images."""
        name, kind, shape = getattr(graph_input, "name"), getattr(graph_input, "type"), tuple(getattr(graph_input, "shape", None) or ())
        if kind not in IMAGE_TYPES:
            raise ValueError(f"is {kind}; explaind feeds it float32, float16 or uint8 images")
        channels_last = len(shape) == 4 and shape[3] == 3 and shape[1] != 3
        other_channels_last = len(shape) == 4 and shape[1] != 3 and shape[3] in (1, 2, 4)
        if len(shape) != 4 or other_channels_last or (not channels_last and isinstance(shape[1], int) and shape[1] != 3):
            raise ValueError(f"has shape {list(shape)}; explaind feeds it images (N, 3, S, S) or (N, S, S, 3)")
        return cls(name, kind, channels_last, shape)

    @property
    def takes_pixels(self) -> bool:
        """uint8 images, 0-255: normalising them is the graph's own business."""
        return self.type == "tensor(uint8)"

    @property
    def channels_first_shape(self) -> list[int | str | None]:
        """``shape`` in the order (N, 3, S, S)."""
        batch, *rest = self.shape
        return [batch, rest[2], rest[0], rest[1]] if self.channels_last else [batch, *rest]

    def fed(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (N, 3, S, S) in [0, 1] in this input's type and layout, contiguous;
        as pixels, each rounded to the nearest."""
        dtype = IMAGE_TYPES[self.type][0]
        images = (images * 255).round().clamp(0, 255).to(dtype) if self.takes_pixels else images.to(dtype)
        return (images.permute(0, 2, 3, 1) if self.channels_last else images).contiguous()


def export_onnx(extractor: nn.Module, image_size: int, path: Path) -> Path:
    """Export ``extractor`` (images (N, 3, S, S) -> features (N, D), dynamic N) to ``path``
    unless it is already there.

    torch.export-based (the TorchScript exporter is deprecated). Weights go to
    ``<path>.data`` beside the graph, so models over protobuf's 2 GB limit export too.
    The module is traced where it lives (moving it would move the serving model's shared
    parameters), and both files are written elsewhere and renamed into place, the graph
    last, so a crash never leaves a half-written engine at ``path``. Exports into one folder
    take turns (a lock on the folder), so a scratch folder found there belongs to an
    export that was killed: it may hold a model's weights, and is removed.
    """
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.parent):
        if path.is_file():  # exported by the process we waited for
            return path
        for abandoned in path.parent.glob(f".{path.name}.*"):
            shutil.rmtree(abandoned, ignore_errors=True)
        _export(extractor, image_size, path)
    log.info("exported feature extractor to %s", path)
    return path


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (flock: released by the kernel when its holder
    dies, which a pid in a name cannot tell in a container, where every server is pid 1)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _export(extractor: nn.Module, image_size: int, path: Path) -> None:
    device = next(extractor.parameters()).device
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
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


Provider = tuple[str, dict[str, object]]


def execution_providers(
    backend: str = "onnxruntime",
    device: str = "cpu",
    *,
    image_size: int = 0,
    max_batch_size: int = 0,
    engine_cache_dir: Path | None = None,
) -> list[Provider]:
    """ONNX Runtime providers with their options for ``backend`` on ``device``, best first;
    checked before any export so a machine without them fails at once with a
    ``FailedPrecondition`` naming what is missing.

    "tensorrt" uses TensorRT, falling back to CUDA, then CPU, per node; "onnxruntime"
    uses CUDA when ``device`` is a CUDA device, else the CPU. GPU providers run on
    ``device``'s index (ONNX Runtime's own default is GPU 0).

    TensorRT needs ``image_size``, ``max_batch_size`` and ``engine_cache_dir``: it builds
    one engine for batches 1 to ``max_batch_size`` (without a profile it would rebuild,
    for minutes on a large model, each time a larger batch came) and keeps it, with its
    timing cache, in ``engine_cache_dir`` under a folder per ONNX Runtime version,
    TensorRT version and GPU architecture (an engine serialised by another TensorRT does
    not load), so a restart loads it instead of building it again.
    """
    import onnxruntime

    require_providers(backend, device)
    cpu: Provider = ("CPUExecutionProvider", {})
    if backend == "tensorrt":
        if image_size < 1 or max_batch_size < 1 or engine_cache_dir is None:
            raise ValueError("TensorRT needs image_size, max_batch_size and engine_cache_dir")
        index = _cuda_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        cache = Path(engine_cache_dir) / f"onnxruntime-{onnxruntime.__version__}-tensorrt-{_tensorrt_version()}-sm{major}{minor}"
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
        return [("CUDAExecutionProvider", {"device_id": _cuda_index(device)}), cpu]
    return [cpu]


def require_providers(backend: str, device: str) -> None:
    """``FailedPrecondition`` naming what is missing when this machine's ONNX Runtime lacks
    the provider ``backend`` needs on ``device`` (onnxruntime-gpu's CUDA, TensorRT): cheap,
    so a server checks it before it listens, not minutes later as the models load."""
    import onnxruntime

    if backend not in ONNX_BACKENDS:
        raise ValueError(f"backend must be one of {ONNX_BACKENDS}, got {backend!r}")
    available = onnxruntime.get_available_providers()
    if backend == "tensorrt":
        if torch.device(device).type != "cuda":  # else its providers took the current GPU, unasked
            raise ValueError(f"backend 'tensorrt' runs on a CUDA device, got device={device!r}")
        if not torch.cuda.is_available() or "TensorrtExecutionProvider" not in available:
            raise FailedPrecondition(
                f"backend 'tensorrt' needs CUDA and onnxruntime's TensorrtExecutionProvider; this machine has "
                f"CUDA={torch.cuda.is_available()}, providers={available}")
    elif torch.device(device).type == "cuda" and "CUDAExecutionProvider" not in available:
        raise FailedPrecondition(
            f"device {device!r} with backend 'onnxruntime' needs onnxruntime-gpu (CUDAExecutionProvider); "
            f"providers here: {available}")


def _tensorrt_version() -> str:
    """The TensorRT that ONNX Runtime's TensorRT provider will load: the ``tensorrt``
    package's version, else ``getInferLibVersion()`` of the shared library (e.g. 100900
    for 10.9.0), else "unknown"."""
    try:
        import tensorrt
    except ImportError:
        pass
    else:
        return tensorrt.__version__
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            return str(ctypes.CDLL(name).getInferLibVersion())
        except (OSError, AttributeError):
            continue
    return "unknown"


def _cuda_index(device: str) -> int:
    """The GPU index of a CUDA ``device`` ("cuda" is torch's current GPU)."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def onnx_runtime_features(
    model: Path | bytes, providers: list[Provider], *, device: str = "cpu", num_threads: int = 0, max_batch_size: int = 0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function images (N, 3, S, S) in [0, 1] -> float32 features (N, D) on ``device``,
    running the ONNX graph ``model`` (a file, or the serialised graph) with one image input
    (fed as :class:`ImageInput` says) and one output (N, D), float32 or float16
    (:data:`FLOAT_TYPES`), on ``providers`` (from :func:`execution_providers`).
    ``num_threads`` caps intra-op threads (0: one per core); ``max_batch_size`` > 0 runs
    larger batches in slices of that size (TensorRT's profile ends there). A graph whose
    batch dimension is fixed runs any batch in slices of that size (see :func:`run_in_batches`).

    Images and features are bound in place on ``device``: on a GPU they stay there
    instead of crossing to host memory and back on every call. A provider ONNX Runtime
    could not start (it falls back to the next one, e.g. the CPU, with only a warning) is
    a ``FailedPrecondition``, not a silent run elsewhere.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options, providers=providers)
    asked, started = providers[0][0], session.get_providers()
    if asked not in started:
        raise FailedPrecondition(f"ONNX Runtime could not start its {asked} (the server log says why) and would run on "
                                 f"{started} instead; install its libraries, or configure another device or backend")
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    width = graph_output.shape[-1]
    if not isinstance(width, int):
        raise FailedPrecondition(f"the feature width must be fixed in the graph, got {width!r}")
    if graph_output.type not in FLOAT_TYPES:
        raise FailedPrecondition(f"the graph's {graph_output.name!r} is {graph_output.type}, not one of {sorted(FLOAT_TYPES)}")
    try:
        image_input = ImageInput.of(graph_input)
    except ValueError as reason:
        raise FailedPrecondition(f"the graph's input {graph_input.name!r} {reason}") from None
    feature_dtype, feature_type = FLOAT_TYPES[graph_output.type]
    target = torch.device(device)
    bound_device = ("cuda", _cuda_index(device)) if target.type == "cuda" else ("cpu", 0)

    def run_slice(images: torch.Tensor) -> torch.Tensor:
        images = image_input.fed(images.detach().to(target))
        features = torch.empty(len(images), width, device=target, dtype=feature_dtype)
        binding = session.io_binding()
        binding.bind_input(image_input.name, *bound_device, IMAGE_TYPES[image_input.type][1], tuple(images.shape), images.data_ptr())
        binding.bind_output(graph_output.name, *bound_device, feature_type, tuple(features.shape), features.data_ptr())
        if target.type == "cuda":  # ONNX Runtime reads the images on its own stream
            torch.cuda.current_stream(target).synchronize()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return features.float()  # float32 features are returned as they are, not copied

    fixed = fixed_batch_size(graph_input)
    return lambda images: run_in_batches(run_slice, images, fixed or max_batch_size, pad=bool(fixed))


def fixed_batch_size(graph_input: object) -> int:
    """The batch size an ONNX Runtime session's input (a ``NodeArg``) fixes, 0 where it is
    dynamic: ``torch.onnx.export`` without dynamic axes fixes the batch it traced, often 1."""
    shape = getattr(graph_input, "shape", None) or [None]
    return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 0


def run_in_batches(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int, *, pad: bool = False) -> torch.Tensor:
    """``run`` on ``images`` (N, ...) in slices of at most ``size`` (0: all at once); with
    ``pad`` (a graph whose batch is fixed at ``size``) each slice is exactly ``size``, the
    last one filled up with zeros whose outputs are dropped."""
    if not size or not len(images) or len(images) == size or (len(images) < size and not pad):
        return run(images)
    outputs = []
    for part in images.split(size):
        count = len(part)
        if pad and count < size:
            part = torch.cat([part, part.new_zeros((size - count, *part.shape[1:]))])
        outputs.append(run(part)[:count])
    return torch.cat(outputs)


class UnsplittableGraph(ValueError):
    """Why an ONNX classifier cannot be cut before a final linear layer; its message is
    about the graph alone (no file paths), so it may be shown to callers."""


@dataclass(frozen=True)
class OnnxClassifierSplit:
    """An ONNX classifier cut before its final linear layer: ``feature_graph`` (serialised
    ONNX, images -> features (N, D), the tensor ``feature_name``) and that layer,
    ``head_name``, as ``weight`` (C, D) and ``bias`` (C,)."""

    feature_graph: bytes
    weight: torch.Tensor
    bias: torch.Tensor
    feature_name: str
    head_name: str


def _keep_only_what_computes(graph: object, output: str) -> None:
    """Drop from the ONNX ``graph`` the nodes, constants and shape notes that ``output``
    does not depend on. Older exporters (keep_initializers_as_inputs, IR < 4, the ONNX model zoo) also list
    constants among the inputs: one left without its constant would be a required input."""
    nodes, initializers, inputs, shapes = (getattr(graph, key) for key in ("node", "initializer", "input", "value_info"))
    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    needed, kept, pending = set(), set(), [output]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer and producer[name] not in kept:
            kept.add(producer[name])
            pending += _names_read(nodes[producer[name]])
    survivors = [node for index, node in enumerate(nodes) if index in kept]
    del nodes[:]
    nodes.extend(survivors)
    unused = {tensor.name for tensor in initializers} - needed
    for tensor in [tensor for tensor in initializers if tensor.name in unused]:
        initializers.remove(tensor)
    for graph_input in [i for i in inputs if i.name in unused]:
        inputs.remove(graph_input)
    for shape in [shape for shape in shapes if shape.name not in needed]:  # shape inference's notes on dropped tensors
        shapes.remove(shape)


def _names_read(node: object) -> list[str]:
    """The tensors an ONNX node reads: its inputs, and those its subgraphs (an If's
    branches, a Loop's body) read from the graph around them."""
    from onnx import helper

    names = [name for name in getattr(node, "input") if name]
    for attribute in getattr(node, "attribute"):
        for subgraph in ([helper.get_attribute_value(attribute)] if attribute.type == attribute.GRAPH else
                         list(attribute.graphs) if attribute.type == attribute.GRAPHS else []):
            names += [name for inner in subgraph.node for name in _names_read(inner)]
    return names


def split_onnx_classifier(path: Path) -> OnnxClassifierSplit:
    """Cut the classifier at ``path`` (one input, and the logits as its first output) before
    the linear layer that computes its logits: a ``Gemm`` (what torch exports for
    ``nn.Linear``), or a ``MatMul`` with an optional ``Add``, whose weights are constants.
    The feature graph keeps only what the features need: other outputs (say, the
    probabilities beside the logits) go with the head. Raises :class:`UnsplittableGraph`
    saying why a graph cannot be cut (e.g. its first output is a softmax)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))  # with external weights beside it
    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    constants = {tensor.name: tensor for tensor in graph.initializer}
    if len([i for i in graph.input if i.name not in constants]) != 1 or not graph.output:
        raise UnsplittableGraph("a splittable classifier has one input, the images, and the logits as its first output")

    def constant(name: str) -> np.ndarray:
        if name not in constants:
            raise UnsplittableGraph(f"the final linear layer's {name!r} is computed, not a constant")
        return numpy_helper.to_array(constants[name]).astype(np.float32)

    last = producers.get(graph.output[0].name)
    bias_name = ""
    if last is not None and last.op_type == "Add":  # MatMul, then the bias
        computed = [name for name in last.input if name not in constants]
        bias_name = next((name for name in last.input if name in constants), "")
        last = producers.get(computed[0]) if len(computed) == 1 else None
        if last is None or last.op_type != "MatMul":
            raise UnsplittableGraph("its logits come from an Add that is not a MatMul's bias")
    if last is None or last.op_type not in ("Gemm", "MatMul"):
        raise UnsplittableGraph(f"its logits come from {'a ' + last.op_type + ' node' if last else 'its input'}, not a linear layer (Gemm, or MatMul and Add)")
    features = last.input[0]
    if last.op_type == "Gemm":
        attributes = {a.name: helper.get_attribute_value(a) for a in last.attribute}
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            raise UnsplittableGraph("its final Gemm scales or transposes its input")
        weight = constant(last.input[1])
        weight = weight if attributes.get("transB", 0) else weight.T
        bias_name = last.input[2] if len(last.input) > 2 else ""
    else:
        weight = constant(last.input[1]).T
    if weight.ndim != 2:
        raise UnsplittableGraph(f"its final linear layer's weight has shape {weight.shape}, not (classes, features)")
    bias = np.broadcast_to(constant(bias_name).reshape(-1), weight.shape[:1]) if bias_name else np.zeros(weight.shape[0], np.float32)
    element_type = constants[last.input[1]].data_type
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(features, element_type, [None, weight.shape[1]]))
    _keep_only_what_computes(graph, features)
    if model.ByteSize() >= 2**31:
        raise UnsplittableGraph("its feature graph is over protobuf's 2 GiB limit for one message")
    return OnnxClassifierSplit(model.SerializeToString(), torch.from_numpy(weight.copy()), torch.from_numpy(bias.copy()),
                               feature_name=features, head_name=last.name or last.input[1])
