"""Regenerate the Python stubs for ``proto/explaind/v1/*.proto``.

    python proto/generate.py [OUT_DIR]     # default: clients/ (the committed stubs)

Imports of ``google/longrunning/operations.proto`` resolve against the copy that ships
with googleapis-common-protos (as ``operations_proto.proto``, aliased here), so no
google/* code is generated or committed; ``google/protobuf/*`` comes with grpc_tools.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "clients"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "explaind" / "v1").glob("*.proto"))


def run_protoc(proto_root: Path, outputs: list[str], files: list[str]) -> None:
    """protoc with ``outputs`` (``--python_out=...``) on ``files`` (relative to
    ``proto_root``), its imports resolved as the module docstring says."""
    import google.longrunning
    import grpc_tools
    from grpc_tools import protoc

    googleapis_root = Path(google.longrunning.__path__[0]).parents[1]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as alias_root:
        alias = Path(alias_root) / "google" / "longrunning" / "operations.proto"
        alias.parent.mkdir(parents=True)
        shutil.copyfile(googleapis_root / "google" / "longrunning" / "operations_proto.proto", alias)
        args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{alias_root}", f"-I{googleapis_root}", f"-I{well_known}", *outputs, *files]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Run protoc into ``out_dir``; returns the files written (``explaind/v1/*_pb2*.py(i)``)."""
    out_dir = Path(out_dir)
    target = out_dir / "explaind" / "v1"
    target.mkdir(parents=True, exist_ok=True)
    run_protoc(PROTO_ROOT, [f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}"],
               [str(path.relative_to(PROTO_ROOT)) for path in proto_files()])
    for stub in target.glob("*_pb2.pyi"):
        stub.write_text(strict_stub(stub.read_text()))
    return sorted(p for p in target.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))


# googleapis-common-protos ships no types (and types-protobuf covers google.protobuf
# only): its import is Any, whether or not a checker has stubs for it.
_LONGRUNNING_IMPORT = "from google.longrunning import operations_pb2 as _operations_pb2"
_TYPING_IMPORT = "from typing import ClassVar as _ClassVar"


def strict_stub(text: str) -> str:
    """protoc's .pyi as ``mypy --strict`` reads it in a checkout (the SDK's stubs are
    checked as source there, not as an installed package's): a message field's dict form
    is ``Mapping[str, Any]``, not the bare generic ``Mapping``, and google.longrunning,
    which has no types, is an ignored import."""
    text = text.replace("_Mapping]", "_Mapping[str, _Any]]")
    if "_Any]" in text:
        text = text.replace(_TYPING_IMPORT, "from typing import Any as _Any, ClassVar as _ClassVar", 1)
    return text.replace(_LONGRUNNING_IMPORT, _LONGRUNNING_IMPORT + "  # type: ignore[import-untyped, unused-ignore]")


if __name__ == "__main__":
    written = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
    print(f"generated {len(written)} files under {written[0].parent}")
