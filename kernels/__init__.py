"""Engines that run the classifier's feature extractor h_b outside eager PyTorch.

h_b is exported to ONNX once per feature version and run by an ONNX Runtime session
on the CPU, CUDA or TensorRT execution provider, with images and features bound in
place on the device. ``explaind.engine.backends`` picks
one by ``[runtime].backend``; the linear head stays in eager PyTorch, so a head edit
never needs a new engine. ``split_onnx_classifier`` cuts a classifier given as ONNX
before its final linear layer, so its features and head are explained the same way.

Python run at the repository's root (``python -m explaind``, ``make test``, ``make demo``)
finds this directory as a top-level package ``kernels``, ahead of Hugging Face's
``kernels``, which transformers 5.25 and later import as diffusers loads any model.
Imported under that name, it hands the name to Hugging Face's package where that is
installed: explaind imports its engines only as ``explaind.kernels``.
"""

import importlib.metadata
import importlib.util
import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path


def _hugging_faces_kernels() -> ModuleSpec | None:
    """The package of the installed ``kernels`` distribution, or None where none is installed.
    Searched on sys.path past this checkout's root, not where its metadata lies: an editable
    install's (maturin's .pth) is its source directory; and never back here, nor in an entry
    before the root, so another checkout's kernels/ further on hands over onwards, not back."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    root = Path(__file__).resolve().parents[1]
    places = [Path(entry or ".").resolve() for entry in sys.path]
    past_root = places.index(root) + 1 if root in places else 0
    return PathFinder.find_spec("kernels", [entry for entry, place in zip(sys.path[past_root:], places[past_root:]) if place != root])


if __name__ == "kernels" and (_installed := _hugging_faces_kernels()) is not None and _installed.loader is not None:
    # An import returns the module sys.modules holds under its name once the file ran: Hugging Face's.
    sys.modules[__name__] = _module = importlib.util.module_from_spec(_installed)
    _installed.loader.exec_module(_module)
else:
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
