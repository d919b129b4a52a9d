"""Regenerate the Python stubs for ``proto/explaind/v1/*.proto``.

    python proto/generate.py [OUT_DIR]          # default: clients/ (the committed stubs)
    python proto/generate.py --includes DIR     # the google/* protos they import, for any protoc

Imports of ``google/longrunning/operations.proto`` resolve against the copy that ships
with googleapis-common-protos (as ``operations_proto.proto``, aliased here), so no
google/* code is generated or committed; ``google/protobuf/*`` comes with grpc_tools.
``--includes DIR`` writes every google/* file proto/ imports, directly or not, under
the names the imports use, so that ``protoc -Iproto -IDIR --java_out=...`` (any
language, any protoc) finds them: see README, "Stubs for other languages".
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "clients"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "explaind" / "v1").glob("*.proto"))


@contextlib.contextmanager
def include_roots() -> Iterator[list[Path]]:
    """The directories protoc searches for the google/* imports, as the module docstring
    says (a scratch one holds the alias while the context lasts)."""
    import google.longrunning
    import grpc_tools

    googleapis_root = Path(google.longrunning.__path__[0]).parents[1]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as alias_root:
        alias = Path(alias_root) / "google" / "longrunning" / "operations.proto"
        alias.parent.mkdir(parents=True)
        shutil.copyfile(googleapis_root / "google" / "longrunning" / "operations_proto.proto", alias)
        yield [Path(alias_root), googleapis_root, well_known]


def run_protoc(proto_root: Path, outputs: list[str], files: list[str]) -> None:
    """protoc with ``outputs`` (``--python_out=...``) on ``files`` (relative to
    ``proto_root``), its imports resolved as the module docstring says."""
    from grpc_tools import protoc

    with include_roots() as roots:
        args = ["grpc_tools.protoc", f"-I{proto_root}", *(f"-I{root}" for root in roots), *outputs, *files]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")


def export_includes(dest: Path) -> list[Path]:
    """Copy the google/* protos that proto/explaind/v1 imports, directly or not, under
    ``dest`` by their import names; returns the files written."""
    from google.protobuf import descriptor_pb2

    files = [str(path.relative_to(PROTO_ROOT)) for path in proto_files()]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.pb"
        run_protoc(PROTO_ROOT, [f"--descriptor_set_out={out}", "--include_imports"], files)
        names = [f.name for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file]
    written = []
    with include_roots() as roots:
        for name in names:
            if name.startswith("explaind/"):
                continue
            source = next(root / name for root in roots if (root / name).is_file())
            target = Path(dest) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            written.append(target)
    return sorted(written)


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
# googleapis-common-protos' modules: no types (google.longrunning), or .pyi files without a
# py.typed marker (google.rpc), both "import-untyped" to a user's mypy --strict.
_UNTYPED_IMPORTS = ("from google.longrunning import operations_pb2 as _operations_pb2", "from google.rpc import status_pb2 as _status_pb2")
_TYPING_IMPORT = "from typing import ClassVar as _ClassVar"


def strict_stub(text: str) -> str:
    """protoc's .pyi as ``mypy --strict`` reads it in a checkout (the SDK's stubs are
    checked as source there, not as an installed package's): a message field's dict form
    is ``Mapping[str, Any]``, not the bare generic ``Mapping``, and googleapis-common-protos'
    imports (_UNTYPED_IMPORTS) are ignored."""
    text = text.replace("_Mapping]", "_Mapping[str, _Any]]")
    if "_Any]" in text:
        text = text.replace(_TYPING_IMPORT, "from typing import Any as _Any, ClassVar as _ClassVar", 1)
    for untyped in _UNTYPED_IMPORTS:
        text = text.replace(untyped, untyped + "  # type: ignore[import-untyped, unused-ignore]")
    return text


def main(argv: list[str] | None = None) -> None:
    """The command line the module docstring shows. ``--help`` prints it, and a misspelt
    option or ``--includes`` without its directory is a usage error: none is taken for a
    directory to write into."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, metavar="OUT_DIR",
                        help="where the Python stubs go (default: clients/, the committed stubs)")
    parser.add_argument("--includes", type=Path, metavar="DIR", help="write the google/* protos the protos import under DIR instead")
    args = parser.parse_args(argv)
    if args.includes is not None and args.out_dir is not None:
        parser.error("OUT_DIR and --includes DIR are two commands: give one")
    if args.includes is not None:
        exported = export_includes(args.includes)
        print(f"wrote {len(exported)} google/* protos under {args.includes}: protoc -I{PROTO_ROOT} -I{args.includes} ...")
    else:
        written = generate(args.out_dir or DEFAULT_OUT)
        print(f"generated {len(written)} files under {written[0].parent}")


if __name__ == "__main__":
    main()
