"""The committed stubs are exactly what ``make proto`` generates from proto/."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_protos(tmp_path):
    written = _generator().generate(tmp_path)
    committed = ROOT / "clients" / "explaind" / "v1"
    assert {p.name for p in written} == {p.name for p in committed.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))}
    stale = [p.name for p in written if p.read_bytes() != (committed / p.name).read_bytes()]
    assert not stale, f"stubs drifted from proto/: {stale}; run `make proto` and commit"


def test_the_generator_takes_no_option_for_the_directory_to_write_stubs_into(tmp_path, monkeypatch, capsys):
    # `python proto/generate.py --help` generated the stubs into a directory named "--help",
    # and `--includes` without its directory into one named "--includes"; OUT_DIR beside
    # `--includes DIR` is one of the two forms, not both.
    monkeypatch.chdir(tmp_path)
    for argv, status in (["--help"], 0), (["--includes"], 2), (["--out", "stubs"], 2), (["stubs", "--includes", "includes"], 2):
        with pytest.raises(SystemExit) as exited:
            _generator().main(argv)
        assert exited.value.code == status, argv
    assert "--includes DIR" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_the_generator_writes_where_its_one_form_says(tmp_path, monkeypatch, capsys):
    # OUT_DIR, else the committed stubs' clients/; --includes DIR writes the protos there instead.
    generator = _generator()
    written: list[tuple[str, Path]] = []
    monkeypatch.setattr(generator, "generate", lambda out: written.append(("stubs", out)) or [out / "explaind" / "v1" / "common_pb2.py"])
    monkeypatch.setattr(generator, "export_includes", lambda out: written.append(("includes", out)) or [out / "google" / "protobuf" / "empty.proto"])
    generator.main([str(tmp_path / "stubs")])
    generator.main([])
    generator.main(["--includes", str(tmp_path / "includes")])
    assert written == [("stubs", tmp_path / "stubs"), ("stubs", generator.DEFAULT_OUT), ("includes", tmp_path / "includes")]
    assert f"wrote 1 google/* protos under {tmp_path / 'includes'}" in capsys.readouterr().out


def test_every_rpc_takes_its_own_request_and_response():
    from explaind.v1 import inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2

    for module in (inference_pb2, operations_pb2, sample_sets_pb2, neuroinspect_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request", method.full_name
                assert method.output_type.name == f"{method.name}Response", method.full_name


def _wire_compat():
    spec = importlib.util.spec_from_file_location("proto_wire_compat", ROOT / "proto" / "wire_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protos_keep_the_recorded_wire_format():
    """An SDK and a server of different releases read each other's messages: no field of
    proto/wire_snapshot.json may change number or type, or go without being reserved."""
    wire = _wire_compat()
    recorded = json.loads((ROOT / "proto" / "wire_snapshot.json").read_text())
    current = wire.snapshot(wire.descriptor_set())
    assert wire.breaks(recorded, current) == []
    assert current == recorded, "proto/ has additions the snapshot lacks: run `python proto/wire_compat.py --update` and commit it"


def test_wire_compat_tells_breaks_from_additions(tmp_path):
    wire = _wire_compat()
    base = wire.snapshot(wire.descriptor_set())

    def edited(old: str, new: str) -> dict:
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ROOT / "proto" / "explaind", root / "explaind")
        common = root / "explaind" / "v1" / "common.proto"
        text = common.read_text()
        assert old in text
        common.write_text(text.replace(old, new, 1))
        return wire.snapshot(wire.descriptor_set(root))

    assert wire.breaks(base, edited("bytes data = 3;", "bytes data = 3;\n  string note = 4;")) == []  # a new field
    assert wire.breaks(base, edited("bytes data = 3;", 'reserved 3;\n  reserved "data";')) == []  # removed, reserved
    assert wire.breaks(base, edited("DATA_TYPE_INT64 = 4;", 'reserved 4;\n  reserved "DATA_TYPE_INT64";')) == []
    assert wire.breaks(base, edited("bytes data = 3;", "")) == [
        'explaind.v1.Tensor.data = 3 was removed without `reserved 3; reserved "data";`']
    assert wire.breaks(base, edited("bytes data = 3;", "bytes data = 5;")) == ["explaind.v1.Tensor.data changed number 3 -> 5"]
    assert wire.breaks(base, edited("bytes data = 3;", "string data = 3;")) == ["explaind.v1.Tensor.data changed type 'bytes' -> 'string'"]
    assert wire.breaks(base, edited("repeated int64 shape = 2;", "int64 shape = 2;")) == [
        "explaind.v1.Tensor.shape changed repeated True -> False"]
    assert wire.breaks(base, edited("bytes data = 3;", "bytes payload = 3;")) == [
        "explaind.v1.Tensor.data = 3 was renamed to 'payload' without `reserved 3; reserved \"data\";`"]
    assert wire.breaks(base, edited("DATA_TYPE_INT64 = 4;", "DATA_TYPE_INT64 = 5;")) == [
        "explaind.v1.DataType.DATA_TYPE_INT64 changed number 4 -> 5"]
    assert wire.breaks(base, edited("DATA_TYPE_INT64 = 4;", "")) == [
        'explaind.v1.DataType.DATA_TYPE_INT64 = 4 was removed or renamed without `reserved 4; reserved "DATA_TYPE_INT64";`']
    fewer = {**base, "messages": {k: v for k, v in base["messages"].items() if k != "explaind.v1.Tensor"}}
    assert wire.breaks(base, fewer) == ["message explaind.v1.Tensor was removed or renamed (an Any holding it, or a field typed by it, breaks)"]
    rpcs = {**base, "services": {**base["services"], "explaind.v1.InferenceService": {}}}
    assert "rpc explaind.v1.InferenceService.Predict was removed (older clients get UNIMPLEMENTED)" in wire.breaks(base, rpcs)


def _outer_classname(proto_name: str) -> str:
    stem = Path(proto_name).stem
    return {"neuroinspect": "NeuroInspect"}.get(stem, "".join(part.title() for part in stem.split("_"))) + "Proto"


def test_every_proto_names_its_package_for_other_languages():
    """Monitoring pipelines call explaind from Go, Java, C#...: protoc-gen-go refuses a
    file without go_package, and without java_package / java_multiple_files every Java
    message would be nested in an outer class of the package explaind.v1."""
    for file in _wire_compat().descriptor_set().file:
        options = file.options
        assert options.go_package == "github.com/explaind/explaind/gen/go/explaind/v1;explaindv1", file.name
        assert options.java_package == "dev.explaind.v1", file.name
        assert options.java_multiple_files, file.name
        assert options.java_outer_classname == _outer_classname(file.name), file.name
        assert options.csharp_namespace == "Explaind.V1", file.name
        assert (options.php_namespace, options.ruby_package, options.objc_class_prefix) == ("Explaind\\V1", "Explaind::V1", "EXD"), file.name


def test_any_protoc_generates_other_languages_with_the_documented_includes(tmp_path):
    """README, "Stubs for other languages": `python proto/generate.py --includes DIR`, then
    `protoc -Iproto -IDIR`, no other path: googleapis-common-protos ships
    google/longrunning/operations.proto as operations_proto.proto, so its own directory
    does not resolve the import."""
    includes = tmp_path / "includes"
    exported = _generator().export_includes(includes)
    assert includes / "google" / "longrunning" / "operations.proto" in exported
    files = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto" / "explaind" / "v1").glob("*.proto"))
    flags = [f"-I{ROOT / 'proto'}", f"-I{includes}"]
    from grpc_tools import protoc

    # grpc_tools' protoc generates Python only; a descriptor set shows every import resolved.
    assert protoc.main(["protoc", *flags, f"--descriptor_set_out={tmp_path / 'set.pb'}", *files]) == 0
    binary = shutil.which("protoc")
    if binary is None:
        pytest.skip("no protoc on PATH (apt-get install protobuf-compiler) for the C++/Java/C# generators")
    expected = {"cpp": "explaind/v1/inference.pb.h", "java": "dev/explaind/v1/PredictRequest.java", "csharp": "Inference.cs"}
    go_dir = "github.com/explaind/explaind/gen/go/explaind/v1"
    if shutil.which("protoc-gen-go"):
        expected["go"] = f"{go_dir}/inference.pb.go"
    if shutil.which("protoc-gen-go-grpc"):
        expected["go-grpc"] = f"{go_dir}/inference_grpc.pb.go"
    obsolete = []
    for language, generated in expected.items():
        out = tmp_path / language
        out.mkdir()
        result = subprocess.run([binary, *flags, f"--{language}_out={out}", *files], capture_output=True, text=True)
        if language.startswith("go") and "support proto3 optional" in result.stderr:
            # A plugin older than proto3 optional (Debian's golang-goprotobuf-dev installs
            # github.com/golang/protobuf 1.3's as /usr/bin/protoc-gen-go): README says
            # which to use; the protos are not at fault.
            obsolete.append(language)
            continue
        assert result.returncode == 0, f"{language}: {result.stderr}"
        assert (out / generated).is_file(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))[:20]
    if obsolete:
        pytest.skip(f"protoc-gen-{obsolete[0]} on PATH predates proto3 optional (README: Go)")
