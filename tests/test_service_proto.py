"""The committed stubs are exactly what ``make proto`` generates from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def test_every_rpc_takes_its_own_request_and_response():
    from explaind.v1 import inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2

    for module in (inference_pb2, operations_pb2, sample_sets_pb2, neuroinspect_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request", method.full_name
                assert method.output_type.name == f"{method.name}Response", method.full_name
