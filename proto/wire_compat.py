"""Guard against wire breaks in ``proto/explaind/v1``: SDKs and servers are upgraded at
different times, and protobuf reads a field whose number or type changed as another
field, or as garbage, without an error.

    python proto/wire_compat.py            # check proto/ against proto/wire_snapshot.json
    python proto/wire_compat.py --update   # record an additive change (refused if it breaks)

The snapshot lists every message's fields (name -> number, type, label, message or enum
type), every enum's values, every RPC's request, response and streaming, and what each
message and enum reserves. A change is compatible when everything the snapshot lists is
still there as it was: new fields, values, messages and RPCs are fine; a field or enum
value that goes must leave its number ``reserved`` (and, for JSON, its name); a renamed
field or value, a new number or type for an existing one, and a removed or retyped RPC
are breaks. ``--update --allow-breaks`` records a deliberate break (a new API version,
``explaind.v2``, is the better way).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

PROTO_ROOT = Path(__file__).resolve().parent
SNAPSHOT = PROTO_ROOT / "wire_snapshot.json"


def _generate_module() -> Any:
    spec = importlib.util.spec_from_file_location("proto_generate", PROTO_ROOT / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def descriptor_set(proto_root: Path = PROTO_ROOT) -> Any:
    """The ``FileDescriptorSet`` of ``proto_root/explaind/v1/*.proto`` (this checkout's, or
    an older one's, e.g. from ``git archive``), compiled as ``generate.py`` compiles them."""
    from google.protobuf import descriptor_pb2

    generate = _generate_module()
    files = sorted((Path(proto_root) / "explaind" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.binpb"
        generate.run_protoc(proto_root, [f"--descriptor_set_out={out}"], [str(p.relative_to(proto_root)) for p in files])
        result = descriptor_pb2.FileDescriptorSet()
        result.ParseFromString(out.read_bytes())
    return result


def _reserved(descriptor: Any) -> dict[str, list[Any]]:
    # Message ranges end exclusive, enum ranges inclusive: both are stored as [first, last].
    inclusive = type(descriptor).__name__ == "EnumDescriptorProto"
    return {"numbers": [[r.start, r.end if inclusive else r.end - 1] for r in descriptor.reserved_range],
            "names": sorted(descriptor.reserved_name)}


def snapshot(files: Any) -> dict[str, Any]:
    """What the wire format depends on, by full name, as a JSON-able dict."""
    from google.protobuf import descriptor_pb2

    field_types = {number: name.removeprefix("TYPE_").lower() for name, number in descriptor_pb2.FieldDescriptorProto.Type.items()}
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    services: dict[str, Any] = {}

    def add_enum(prefix: str, enum: Any) -> None:
        enums[f"{prefix}.{enum.name}"] = {"values": {v.name: v.number for v in enum.value}, "reserved": _reserved(enum)}

    def add_message(prefix: str, message: Any) -> None:
        name = f"{prefix}.{message.name}"
        fields = {}
        for f in message.field:
            entry = {"number": f.number, "type": field_types[f.type], "repeated": f.label == f.LABEL_REPEATED}
            if f.type_name:
                entry["type_name"] = f.type_name.lstrip(".")
            fields[f.name] = entry
        messages[name] = {"fields": fields, "reserved": _reserved(message)}
        for nested in message.nested_type:
            add_message(name, nested)
        for enum in message.enum_type:
            add_enum(name, enum)

    for file in files.file:
        for message in file.message_type:
            add_message(file.package, message)
        for enum in file.enum_type:
            add_enum(file.package, enum)
        for service in file.service:
            services[f"{file.package}.{service.name}"] = {
                m.name: {"input": m.input_type.lstrip("."), "output": m.output_type.lstrip("."),
                         "client_streaming": m.client_streaming, "server_streaming": m.server_streaming}
                for m in service.method
            }
    return {"messages": dict(sorted(messages.items())), "enums": dict(sorted(enums.items())), "services": dict(sorted(services.items()))}


def _is_reserved(number: int, name: str, reserved: dict[str, list[Any]]) -> bool:
    return any(first <= number <= last for first, last in reserved["numbers"]) and name in reserved["names"]


def breaks(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How ``new`` would misread, or refuse, what a peer built from ``old`` sends: [] if
    it reads everything the same."""
    found = []
    for name, message in old["messages"].items():
        if name not in new["messages"]:
            found.append(f"message {name} was removed or renamed (an Any holding it, or a field typed by it, breaks)")
            continue
        now = new["messages"][name]
        for field, was in message["fields"].items():
            if field in now["fields"]:
                changed = {k: (was.get(k), v) for k, v in now["fields"][field].items() if was.get(k) != v}
                if changed:
                    found.append(f"{name}.{field} changed " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
            elif not _is_reserved(was["number"], field, now["reserved"]):
                taken = [f for f, v in now["fields"].items() if v["number"] == was["number"]]
                how = f"renamed to {taken[0]!r}" if taken else "removed"
                found.append(f"{name}.{field} = {was['number']} was {how} without `reserved {was['number']}; reserved \"{field}\";`")
    for name, enum in old["enums"].items():
        if name not in new["enums"]:
            found.append(f"enum {name} was removed or renamed")
            continue
        now = new["enums"][name]
        for value, number in enum["values"].items():
            if value in now["values"]:
                if now["values"][value] != number:
                    found.append(f"{name}.{value} changed number {number} -> {now['values'][value]}")
            elif not _is_reserved(number, value, now["reserved"]):
                found.append(f"{name}.{value} = {number} was removed or renamed without `reserved {number}; reserved \"{value}\";`")
    for name, methods in old["services"].items():
        for method, was in methods.items():
            now = new["services"].get(name, {}).get(method)
            if now is None:
                found.append(f"rpc {name}.{method} was removed (older clients get UNIMPLEMENTED)")
            elif now != was:
                found.append(f"rpc {name}.{method} changed: {was} -> {now}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="write proto/wire_snapshot.json (refused on a break)")
    parser.add_argument("--allow-breaks", action="store_true", help="with --update: record a deliberate break")
    parser.add_argument("--against", type=Path, help="check this proto root (e.g. an older checkout's proto/) against the snapshot")
    args = parser.parse_args(argv)
    current = snapshot(descriptor_set(args.against or PROTO_ROOT))
    recorded = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else None
    found = breaks(recorded, current) if recorded is not None else []
    for line in found:
        print(f"wire break: {line}", file=sys.stderr)
    if args.update and not args.against:
        if found and not args.allow_breaks:
            print("not updated: the changes above would break peers built from the recorded protos", file=sys.stderr)
            return 1
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        print(f"wrote {SNAPSHOT.relative_to(PROTO_ROOT.parent)}")
        return 0
    if found:
        return 1
    if recorded != current:
        print("proto/ has additions the snapshot lacks: run `python proto/wire_compat.py --update` and commit it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
