"""The Python SDK against a real server (balanced classifier): argument checks and messages."""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import datetime as dt
import gc
import io
import pickle
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2 as operations_lro
from google.protobuf import any_pb2, timestamp_pb2

from explaind.client import AsyncClient, Client, DeadlineExceededError, Operation, PlaintextTokenWarning, UnavailableError
from explaind.v1 import common_pb2, inference_pb2, inference_pb2_grpc, operations_pb2, operations_pb2_grpc, sample_sets_pb2_grpc

IMAGE = np.zeros((64, 64, 3), np.uint8)


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=30) as client:
        yield client


def test_a_timeout_longer_than_grpc_can_hold_is_no_limit(server):
    # gRPC holds a deadline as nanoseconds since the epoch in an int64: a client's or a
    # call's timeout past 2262 (1e10 s) was DEADLINE_EXCEEDED at once, the CLI's
    # --timeout 1e10 with it, and a job's progress watch with no timeout past 2262 too.
    with Client(server.target, timeout=1e10) as client:
        assert client.health() == "SERVING" and client.health(timeout=1e300) == "SERVING"
        operation = client.evaluate_sample_set(client.create_sample_set([IMAGE] * 2, [0, 1]).sample_set_id)
        assert operation.result(progress=True, timeout=1e12).accuracy >= 0
        assert list(operation.watch(timeout=1e12))[-1].done


def test_sample_labels_may_be_class_names_or_indices(client):
    created = client.create_sample_set([IMAGE] * 3, ["heart", 1, np.int64(5)])
    assert created.class_counts == {1: 1, 5: 2}
    appended = client.append_samples(created.sample_set_id, [IMAGE], np.array(["circle"]))
    assert appended.class_counts == {0: 1, 1: 1, 5: 2}
    assert client.append_samples(created.sample_set_id, [IMAGE] * 2, iter(["circle", 5])).class_counts == {0: 2, 1: 1, 5: 3}  # an iterator too


def test_an_append_given_a_sets_uid_goes_to_that_set_only(client):
    from explaind.client import FailedPreconditionError

    first = client.create_sample_set([IMAGE] * 2, ["heart", "star"], sample_set_id="append-by-uid")
    assert client.append_samples("append-by-uid", [IMAGE], ["heart"], uid=first.uid).sample_count == 3
    client.delete_sample_set("append-by-uid")
    again = client.create_sample_set([IMAGE], ["star"], sample_set_id="append-by-uid")
    with pytest.raises(FailedPreconditionError) as refused:
        client.append_samples("append-by-uid", [IMAGE] * 3, ["heart"] * 3, chunk_size=1, uid=first.uid)
    assert refused.value.field == "sample_set_uid"
    assert client.sample_set("append-by-uid").sample_count == 1
    assert client.append_samples("append-by-uid", [IMAGE], ["heart"], uid=again.uid).sample_count == 2


def test_a_folder_with_one_subfolder_per_class_is_listed_for_an_upload(client, tmp_path):
    from PIL import Image

    from explaind.client import image_folder

    root = tmp_path / "images"
    for name, files in (("heart", ["b.png", "a.JPG", "nested/c.png"]), ("circle", ["z.webp"])):
        for file in files:
            (root / name / file).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (40, 80, 120)).save(root / name / file, format="WEBP" if file.endswith("webp") else "PNG")
    (root / "heart" / "notes.txt").write_text("not an image")
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbnails" / "x.png")
    Image.new("RGB", (8, 8)).save(root / "unlabelled.png")  # no class folder
    images, labels = image_folder(str(root))
    assert images == [root / "circle" / "z.webp", root / "heart" / "a.JPG", root / "heart" / "b.png", root / "heart" / "nested" / "c.png"]
    assert labels == ["circle", "heart", "heart", "heart"]
    names = client.model_metadata().class_names
    assert client.create_sample_set(*image_folder(root)).class_counts == {names.index("circle"): 1, names.index("heart"): 3}
    with pytest.raises(NotADirectoryError, match="^no such directory: .*/missing$"):
        image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"^no images in .*/circle/<class name>/ \(\.png, \.jpg"):
        image_folder(root / "circle")
    # "" (an unset variable) listed the working directory; a number failed in os.fspath.
    with pytest.raises(ValueError, match=re.escape("""root is empty: give a folder's path ("." for the working directory)""")):
        image_folder("")
    with pytest.raises(TypeError, match="^root must be a folder's path, got 5$"):
        image_folder(5)


def test_a_ctrl_c_during_a_split_upload_gets_no_note_about_the_failing_request(client, monkeypatch):
    # "[i] there is item 2 + i here" explains a server's samples[i]; a Ctrl-C has no i.
    call = client._call

    def interrupted(service, method, request, **kwargs):
        if method == "AppendSamples":
            raise KeyboardInterrupt
        return call(service, method, request, **kwargs)

    monkeypatch.setattr(client, "_call", interrupted)
    with pytest.raises(KeyboardInterrupt) as raised:
        client.create_sample_set([IMAGE] * 3, [0] * 3, sample_set_id="interrupted", chunk_size=2)
    assert raised.value.__notes__ == ["the partly uploaded sample set 'interrupted' was deleted"]
    monkeypatch.undo()
    assert "interrupted" not in [s.sample_set_id for s in client.sample_sets()]


def test_head_versions_read_over_pages_mark_one_active_the_one_the_last_page_names(monkeypatch):
    # Each page marks the version served when it was read: with a promote between pages the
    # first page marked v1 and the last v3, and a script taking "the active one" got two.
    pages = _head_version_pages()
    with Client("127.0.0.1:1", timeout=1, retry=False) as offline:
        monkeypatch.setattr(offline, "_call", lambda service, method, request, **kwargs: pages[request.page_token])
        assert [(v.version_id, v.active) for v in offline.head_versions()] == [("v0", False), ("v1", False), ("v2", False), ("v3", True)]


def _head_version_pages() -> dict:
    """ListHeadVersions pages by page token: v0..v3 over two, v1 served when the first
    was read and v3 when the second was (a promote between them)."""
    from explaind.v1 import neuroinspect_pb2

    return {
        "": neuroinspect_pb2.ListHeadVersionsResponse(
            versions=[neuroinspect_pb2.HeadVersion(version_id="v0"), neuroinspect_pb2.HeadVersion(version_id="v1", active=True)],
            active_version_id="v1", next_page_token="after-v1"),
        "after-v1": neuroinspect_pb2.ListHeadVersionsResponse(
            versions=[neuroinspect_pb2.HeadVersion(version_id="v2"), neuroinspect_pb2.HeadVersion(version_id="v3", active=True)],
            active_version_id="v3"),
    }


class _OlderHeadVersions:
    """A NeuroInspectService from before GetHeadVersion: it serves ListHeadVersions alone
    (v0..v3 over two pages, v1 served when the first was read, v3 when the second was)
    and answers anything else UNIMPLEMENTED, as gRPC does for a method it was not given."""

    def __init__(self) -> None:
        self.page_tokens: list[str] = []
        self.pages = _head_version_pages()

    def ListHeadVersions(self, request, context):
        self.page_tokens.append(request.page_token)
        return self.pages[request.page_token]


def _add_list_head_versions_only(servicer: _OlderHeadVersions, server: grpc.Server) -> None:
    from explaind.v1 import neuroinspect_pb2

    handler = grpc.unary_unary_rpc_method_handler(servicer.ListHeadVersions, request_deserializer=neuroinspect_pb2.ListHeadVersionsRequest.FromString,
                                                  response_serializer=neuroinspect_pb2.ListHeadVersionsResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("explaind.v1.NeuroInspectService", {"ListHeadVersions": handler}),))


def test_head_version_from_a_server_without_get_head_version_is_read_from_the_list_pages():
    from explaind.client import NotFoundError

    older = _OlderHeadVersions()
    server, target = _serve(older, add=_add_list_head_versions_only)
    try:
        with Client(target, timeout=30) as client:
            first = client.head_version("v1")
            assert (first.version_id, first.active) == ("v1", True) and older.page_tokens == [""]  # the page holding it, no further
            older.page_tokens.clear()
            assert (client.head_version("v3").active, older.page_tokens) == (True, ["", "after-v1"])
            with pytest.raises(NotFoundError, match=r"no head version 'v9'.*has no GetHeadVersion") as missing:
                client.head_version("v9")
            assert missing.value.field == "version_id"
    finally:
        server.stop(0)


def test_head_version_from_a_server_with_get_head_version_is_one_call():
    from explaind.v1 import neuroinspect_pb2, neuroinspect_pb2_grpc

    class Current(_OlderHeadVersions, neuroinspect_pb2_grpc.NeuroInspectServiceServicer):
        def GetHeadVersion(self, request, context):
            return neuroinspect_pb2.GetHeadVersionResponse(version=neuroinspect_pb2.HeadVersion(version_id=request.version_id, method="loaded"))

    current = Current()
    server, target = _serve(current, add=neuroinspect_pb2_grpc.add_NeuroInspectServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            assert (client.head_version("v2").version_id, client.head_version("v2").method, current.page_tokens) == ("v2", "loaded", [])
    finally:
        server.stop(0)


def _label_indices_of_a_model_with(monkeypatch, client: Client, class_names: list[str]) -> Callable[[Any, int], int]:
    """``client``'s label indices, its served model's class names ``class_names``."""
    monkeypatch.setattr(client, "model_metadata", lambda: SimpleNamespace(class_names=class_names))
    monkeypatch.setattr(client, "_keep_limits", lambda metadata: None)  # the limits it lacks
    index_of, _ = client._label_indices()
    return index_of


def test_a_class_name_the_model_repeats_is_its_first_index(monkeypatch):
    # As list.index: a model whose class names repeat ("cat" at 0 and 2) labels "cat" as 0.
    with Client("127.0.0.1:1", timeout=1, retry=False) as offline:
        index_of = _label_indices_of_a_model_with(monkeypatch, offline, ["cat", "dog", "cat"])
        assert [index_of(label, i) for i, label in enumerate(["cat", "dog", 2])] == [0, 1, 2]


def test_a_label_names_its_class_however_its_accents_are_encoded(monkeypatch):
    # As the server matches class names: "é" as one code point or as "e" and a combining
    # accent (a macOS folder name) is one class, not "'café' is not a class ... (café)".
    with Client("127.0.0.1:1", timeout=1, retry=False) as offline:
        index_of = _label_indices_of_a_model_with(monkeypatch, offline, ["caf\u00e9", "cre\u0300me"])
        assert [index_of(label, i) for i, label in enumerate(["cafe\u0301", "cr\u00e8me", "caf\u00e9"])] == [0, 1, 0]


def test_an_unknown_class_name_is_a_value_error_naming_the_label(client):
    with pytest.raises(ValueError, match=r"labels\[1\]: 'dog' is not a class of the served model \(circle, square"):
        client.create_sample_set([IMAGE] * 2, ["heart", "dog"])


@pytest.mark.parametrize("label", [1.7, 1.0, True, None])
def test_a_label_that_is_no_class_index_is_rejected_not_truncated(client, label):
    with pytest.raises(TypeError, match=r"labels\[0\] must be a class name \(str\) or index \(int\)"):
        client.create_sample_set([IMAGE], [label])


@pytest.mark.parametrize("target", [5.9, False])
def test_a_target_class_that_is_no_class_index_is_rejected_not_truncated(client, target):
    with pytest.raises(TypeError, match="target_class must be a class name"):
        client.rank_mistake_neurons("any", target)
    with pytest.raises(TypeError, match="target_class must be a class name"):
        client.edit_head("any", target, [3])


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["3"], r"pairs\[0\] is '3': expected a list of neuron indices or \(neuron, class\) pairs"),
        ([3, (4, "heart", 1)], r"pairs\[1\] is \(4, 'heart', 1\): expected a list"),
        ([3.0], r"pairs\[0\] is 3.0: expected a list"),
        (3, r"pairs: expected a list of neuron indices or \(neuron, class\) pairs, got 3"),
        ([(3, 1.5)], r"pairs\[0\] class must be a class name \(str\) or index \(int\), got 1.5"),
    ],
)
def test_visualize_neurons_says_what_it_expects(client, pairs, message):
    with pytest.raises(TypeError, match=message):
        client.visualize_neurons(pairs)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.rank_mistake_neurons("s", "heart", solver="newton"), "solver must be one of 'faithful', 'proximal', got 'newton'"),
        (lambda c: c.rank_mistake_neurons("s", "heart", execution="later"), "execution must be one of 'inline', 'operation', 'auto', got 'later'"),
        (lambda c: c.visualize_neurons([3], method="dream"), "method must be one of 'clip_illusion', 'feature_visualization', 'no_clip', got 'dream'"),
        (lambda c: c.edit_head("s", "heart", [3], method="retrain"), "method must be one of 'probability_ratio', 'constrain', got 'retrain'"),
        (lambda c: c.operations(state="done"), "state must be one of 'queued', 'running', 'succeeded', 'failed', 'cancelled', got 'done'"),
    ],
)
def test_a_name_outside_its_choices_is_refused_by_name_before_any_call(call, message):
    # Unknown names went to the server as the number 99, which it reported as such.
    with Client("127.0.0.1:1", timeout=1, retry=False) as offline, pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call(offline)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: c.evaluate_sample_set(5), TypeError, "sample_set_id must be a string, got 5"),
        (lambda c: c.evaluate_sample_set("s", batch_size=2**40), ValueError, "batch_size must be a 32-bit integer, got 1099511627776"),
        (lambda c: c.predict(np.zeros((8, 8, 3), np.uint8), top_k="3"), TypeError, "top_k must be a 32-bit integer, got '3'"),
        (lambda c: c.predict(None), TypeError, "images must be an image, or a list, batch array or iterable of images, got NoneType"),
        # Which image of the batch is named, as the server's refusals name it: it was not.
        (lambda c: c.predict([5]), TypeError, "images[0]: cannot send int as an image; use a numpy array, torch tensor, PIL image, path or bytes"),
        (lambda c: c.predict(np.zeros(64, np.uint8)), TypeError,  # a 1-D array is a list: of numbers here
         "images[0]: cannot send uint8 as an image; use a numpy array, torch tensor, PIL image, path or bytes"),
        (lambda c: c.predict([IMAGE, np.zeros((4, 5, 3), np.int64)]), TypeError,
         "images[1]: unsupported image dtype int64; use uint8, float16 or float32"),
        # A message alone (one goes in a list) was quoted whole, every byte of its image escaped.
        (lambda c: c.predict(common_pb2.Image(encoded=b"\x89" * 100_000)), TypeError,
         "images must be an image, or a list, batch array or iterable of images, got Image"),
        (lambda c: c.visualize_neurons([1], steps=1.5), TypeError, "steps must be a 32-bit integer, got 1.5"),
        # A pair given twice, which the server refuses (the same image, optimised twice); "" is no class, as the server reads it.
        (lambda c: c.visualize_neurons([(8, "heart"), 3, (8, "heart")]), ValueError,
         "pairs[2] repeats pairs[0] ((8, 'heart')): the same neuron and class would be optimised twice into the same image"),
        (lambda c: c.visualize_neurons([3, (3, "")]), ValueError, "pairs[1] repeats pairs[0] ((3, '')): the same neuron and class would be optimised twice into the same image"),
        (lambda c: c.edit_head("s", "heart", 5), TypeError, "neurons must be a sequence of neuron indices, got 5"),
        (lambda c: c.edit_head("s", "heart", [1, 2**40]), ValueError,
         "neurons must be a sequence of which each is a 32-bit integer, got [1, 1099511627776]"),
        (lambda c: c.edit_head("s", "heart", [1], target_ratio="abc"), TypeError, 'target_ratio must be a number or "auto", got \'abc\''),
        (lambda c: c.edit_head("s", "heart", [1], request_id="nightly-1"), ValueError,
         "request_id must be a UUID (such as 123e4567-e89b-42d3-a456-426614174000), got 'nightly-1'"),
        (lambda c: c.visualize_neurons([1], request_id=7), TypeError, "request_id must be a UUID or its string, got 7"),
        (lambda c: c.create_sample_set([np.zeros((8, 8, 3), np.uint8)], [1], attributes=[{"a": 1}]), TypeError,
         "attributes[0] must map strings to strings, got {'a': 1}"),
        # Each below raised an error that named no argument, or none at all (found by an
        # offline fuzz of every method's arguments):
        # a call's own timeout: '5' failed mid-call ("unsupported operand type(s) for +"),
        # NaN came back as DEADLINE_EXCEEDED from gRPC (0 or less is a deadline passed);
        (lambda c: c.predict(IMAGE, timeout="5"), TypeError, "timeout must be a number of seconds, got '5'"),
        (lambda c: c.rank_mistake_neurons("s", 0, timeout=float("nan")), ValueError, "timeout must be a number of seconds, got nan"),
        (lambda c: c.health(timeout=True), TypeError, "timeout must be a number of seconds, got True"),
        (lambda c: c.wait_until_ready(timeout=float("nan")), ValueError, "timeout must be a number of seconds, got nan"),
        (lambda c: Operation(c, _running_operation("operations/x")).wait("1"), TypeError, "timeout must be a number of seconds, got '1'"),
        (lambda c: Operation(c, _running_operation("operations/x")).result(timeout=float("nan")), ValueError,
         "timeout must be a number of seconds, got nan"),
        (lambda c: Operation(c, _running_operation("operations/x")).refresh(timeout="2"), TypeError,
         "timeout must be a number of seconds, got '2'"),
        (lambda c: Operation(c, _running_operation("operations/x")).result(timeout="1"), TypeError,
         "timeout must be a number of seconds, got '1'"),
        (lambda c: next(Operation(c, _running_operation("operations/x")).watch(timeout="1")), TypeError,
         "timeout must be a number of seconds, got '1'"),
        # protobuf's "bad argument type", an OverflowError, a comparison's TypeError;
        (lambda c: c.health(service=0), TypeError, "service must be a string, got 0"),
        (lambda c: Operation(c, _running_operation("operations/x")).artifact_image(0), TypeError,
         "name must be an artifact's name (a string), got 0"),
        (lambda c: c.edit_head("s", "heart", [1], promote=2**63), ValueError, "promote must be a bool, got 9223372036854775808"),
        (lambda c: c.create_sample_set([IMAGE], [0], chunk_size=None), TypeError, "chunk_size must be an integer, got None"),
        (lambda c: c.operations(limit=float("nan")), TypeError, "limit must be an integer, got nan"),  # NaN listed every operation
        (lambda c: c.operations(limit=0), ValueError, "limit must be at least 1, got 0"),
        (lambda c: c.create_sample_set([IMAGE], [0], chunk_size=0), ValueError, "chunk_size must be at least 1, got 0"),
        # "unhashable type: 'list'";
        (lambda c: c.operations(state=["queued"]), TypeError,
         "state must be one of 'queued', 'running', 'succeeded', 'failed', 'cancelled', got ['queued']"),
        (lambda c: c.edit_head("s", "heart", [1], method=[]), TypeError, "method must be one of 'probability_ratio', 'constrain', got []"),
        # an empty list is no state, not "every state" as "" is
        (lambda c: c.operations(state=[]), TypeError, "state must be one of 'queued', 'running', 'succeeded', 'failed', 'cancelled', got []"),
        # the request's field, not the argument;
        (lambda c: c.rank_mistake_neurons("s", 2**31), ValueError, "target_class must be a 32-bit integer, got 2147483648"),
        (lambda c: c.edit_head("s", -2**31 - 1, [1]), ValueError, "target_class must be a 32-bit integer, got -2147483649"),
        # numpy's "iteration over a 0-d array" and "truth value of an array ... is ambiguous";
        (lambda c: c.edit_head("s", "heart", np.array(3)), TypeError, "neurons must be a sequence of neuron indices, got array(3)"),
        (lambda c: c.visualize_neurons(np.array(3)), TypeError,
         "pairs: expected a list of neuron indices or (neuron, class) pairs, got array(3)"),
        (lambda c: c.edit_head("s", "heart", [1], target_ratio=np.array([1.0, 2.0])), TypeError,
         'target_ratio must be a number or "auto", got array([1., 2.])'),
        # labels or attributes that are no sequence: "'NoneType' object is not iterable", a
        # dict's KeyError 0, a string's characters taken as labels.
        (lambda c: c.create_sample_set([IMAGE], None), TypeError, "labels must be a sequence of class names or indices, one per image, got NoneType"),
        (lambda c: c.create_sample_set([IMAGE], {"heart": 0}), TypeError,
         "labels must be a sequence of class names or indices, one per image, got dict"),
        (lambda c: c.create_sample_set([IMAGE] * 5, "heart"), TypeError, "labels must be a sequence of class names or indices, one per image, got str"),
        (lambda c: c.append_samples("s", [IMAGE], [0], attributes={"background": "red"}), TypeError,
         "attributes must be a sequence of {name: value} maps, one per image, got dict"),
    ],
)
def test_an_argument_of_the_wrong_type_or_range_is_refused_by_name_before_any_call(call, error, message):
    # Protobuf's own errors named no argument: "bad argument type for built-in operation".
    with Client("127.0.0.1:1", timeout=1, retry=False) as offline, pytest.raises(error, match=f"^{re.escape(message)}$"):
        call(offline)


def test_a_client_takes_the_largest_message_size_grpc_holds():
    # gRPC's channel options are C ints: 2**31 - 1 is the largest, and allowed.
    with Client("127.0.0.1:1", max_message_bytes=2**31 - 1) as client:
        assert client._max_message_bytes == 2**31 - 1


def test_a_target_class_at_either_end_of_the_32_bit_range_is_sent_as_its_index():
    from explaind.client._neuroinspect import class_fields

    assert class_fields(-2**31) == {"class_index": -2**31}
    assert class_fields(2**31 - 1) == {"class_index": 2**31 - 1}


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"timeout": 0}, ValueError, "timeout must be a positive number of seconds, got 0"),
    ({"timeout": -1}, ValueError, "timeout must be a positive number of seconds, got -1"),
    ({"timeout": float("inf")}, ValueError, "timeout must be a positive number of seconds, got inf"),
    ({"timeout": "30"}, TypeError, "timeout must be a number of seconds, got '30'"),
    ({"max_message_bytes": 0}, ValueError, "max_message_bytes must be a positive 32-bit integer, got 0"),
    ({"max_message_bytes": 2**31}, ValueError, "max_message_bytes must be a positive 32-bit integer, got 2147483648"),  # an OverflowError
    # A path of another type, or with a NUL: "expected str, bytes or os.PathLike object", "embedded null byte".
    ({"tls": True, "root_certificates": 3}, TypeError, "root_certificates must be a file's path, got 3"),
    ({"private_key": "a\x00", "certificate_chain": "b"}, ValueError, "private_key: 'a\\x00' is no file's path"),
    # An unset variable ("") or a falsy non-path connected in plaintext, as if none were given.
    ({"root_certificates": ""}, ValueError, "root_certificates is empty: give a PEM file's path, or None for none"),
    ({"private_key": "", "certificate_chain": ""}, ValueError, "private_key is empty: give a PEM file's path, or None for none"),
    ({"private_key": "", "certificate_chain": "me.pem"}, ValueError, "private_key is empty: give a PEM file's path, or None for none"),
    ({"root_certificates": 0}, TypeError, "root_certificates must be a file's path, got 0"),
    ({"target": ""}, ValueError, "target must be the server's address (host:port), got ''"),
    ({"target": " "}, ValueError, "target must be the server's address (host:port), got ' '"),
    ({"target": None}, TypeError, "target must be the server's address (a host:port string), got None"),
])
def test_a_client_refuses_a_target_timeout_message_size_or_key_file_every_call_would_fail_on(options, error, message, capfd):
    # Accepted, they failed every call later: DEADLINE_EXCEEDED at once, a TypeError, or
    # UNKNOWN "Failed to create channel" after gRPC's C core logged its errors.
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        Client(**{"target": "127.0.0.1:1", **options})
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(("target", "remote"), [
    ("explaind.example.com:50051", True),
    ("10.0.0.7:50051", True),
    ("[2001:db8::1]:50051", True),
    ("dns:///explaind:50051", True),
    ("dns:explaind:50051", True),
    ("ipv4:127.0.0.1:50051,10.0.0.7:50051", True),  # one address elsewhere is enough
    ("127.0.0.1:50051", False),
    ("localhost:50051", False),
    ("[::1]:50051", False),
    ("dns:///localhost:50051", False),
    ("dns:localhost:50051", False),  # gRPC's URI form without an authority
    ("api.localhost:50051", False),  # RFC 6761: a name under .localhost is loopback, as the server holds too
    ("localhost.example.com:50051", True),
    ("dns:[::1]:50051", False),
    ("ipv6:[::1]:50051", False),
    ("::1", False),  # a bare IPv6 address: gRPC's default port
    ("[::ffff:127.0.0.1]:50051", False),  # IPv4's loopback written as IPv6, as the server no longer warns of it
    ("ipv6:[::ffff:10.0.0.7]:50051", True),
    ("2001:db8::1", True),
    ("unix:/run/explaind.sock", False),
])
def test_a_token_sent_without_tls_to_another_machine_is_warned_about(target, remote):
    # The server warns at start-up; a caller pointed at a plaintext port got no word that
    # its token crossed the network readable.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Client(target, token="secret").close()
        Client(target).close()  # no token: nothing to read
        Client(target, token="secret", tls=True).close()
    assert [str(warning.message) for warning in caught] == ([
        f"the token travels to {target} in plaintext, readable by anyone on the network path: connect with tls=True "
        "(the CLI's --tls), or through a proxy that adds TLS"] if remote else [])
    assert all(issubclass(warning.category, PlaintextTokenWarning) and warning.filename == __file__ for warning in caught)
    with warnings.catch_warnings(record=True) as caught:  # the AsyncClient's points at its caller's line too
        warnings.simplefilter("always")
        asyncio.run(AsyncClient(target, token="secret").close())
        asyncio.run(AsyncClient(target, token="secret", tls=True).close())
    assert [(warning.category, warning.filename) for warning in caught] == ([(PlaintextTokenWarning, __file__)] if remote else [])


def _channels_made_while_another_thread_warns(monkeypatch) -> None:
    """Each Client's channel without TLS is made after another thread adds a warning filter
    ("another thread's filter") and gives a warning (from another_thread.py): what
    catch_warnings() around a Client() caught or dropped, as it swaps the filters and
    display of every thread."""
    insecure_channel = grpc.insecure_channel

    def another_thread() -> None:
        warnings.filterwarnings("ignore", "another thread's filter")
        warnings.warn_explicit("another thread's warning", UserWarning, "another_thread.py", 1)

    def made_while_another_thread_warns(*args: Any, **kwargs: Any) -> grpc.Channel:
        thread = threading.Thread(target=another_thread)
        thread.start()
        thread.join()
        return insecure_channel(*args, **kwargs)

    monkeypatch.setattr(grpc, "insecure_channel", made_while_another_thread_warns)


def test_uploads_whose_images_and_labels_do_not_match_or_name_missing_files_are_refused_before_any_call(tmp_path):
    # A list (or tuple) is counted and its paths checked before the first request: an
    # upload that could only fail part way is never begun (this client reaches no server).
    present = tmp_path / "present.png"
    present.write_bytes(b"png")
    with Client("127.0.0.1:1", timeout=1, retry=False) as offline:
        with pytest.raises(ValueError, match=r"^got 3 images but 2 labels$"):
            offline.create_sample_set([IMAGE] * 3, [0, 1])
        with pytest.raises(ValueError, match=r"^got 1 images but 2 labels$"):
            offline.append_samples("any", IMAGE, [0, 1])
        with pytest.raises(ValueError, match=r"^got 2 images but 1 attribute maps$"):  # not paired up short
            offline.create_sample_set([IMAGE] * 2, [0, 1], attributes=[{"background": "water"}])
        with pytest.raises(ValueError, match=r"^the images are not as many as the 2 labels$"):  # an iterator is counted as it is read
            offline.create_sample_set(iter([IMAGE] * 3), [0, 1])
        with pytest.raises(FileNotFoundError, match=r"^images\[1\]: no such file: .*gone.png$"):
            offline.create_sample_set((present, tmp_path / "gone.png"), [0, 0])
        with pytest.raises(FileNotFoundError, match=r"^images\[1\]: no such file: .*gone.png$"):  # not after the first requests' answers
            offline.predict([present, tmp_path / "gone.png"])
        with pytest.raises(IsADirectoryError, match=r"^images\[1\]: a directory, not an image file: "):
            offline.predict([present, tmp_path])


def test_edit_head_neurons_must_be_indices(client):
    with pytest.raises(TypeError, match=r"neurons\[1\] must be a neuron index \(int\), got 4.5"):
        client.edit_head("any", "heart", [3, 4.5])


@pytest.mark.parametrize("progress", [False, True])
def test_result_timeout_says_the_job_is_still_running_with_or_without_progress(client, progress):
    operation = client.visualize_neurons([3], method="no_clip", steps=10_000)
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match=rf"^DEADLINE_EXCEEDED: {operation.name} is still (queued|running) after 0.5s$"):
            operation.result(progress=progress, timeout=0.5)
        assert time.monotonic() - started < 10  # the server is asked to wait what is left of 0.5 s, not WAIT_STEP_S (60 s)
        assert not operation.refresh().done  # the timeout ends the wait, not the job
    finally:
        operation.cancel()


class _LoadingSampleSets(sample_sets_pb2_grpc.SampleSetServiceServicer):
    """A SampleSetService that answers UNAVAILABLE for its first ``loading_s`` seconds, as
    a server does while it loads its models (or shuts down), and counts the attempts.
    With ``retry_delay_s`` the UNAVAILABLE carries a RetryInfo, as explaind's does; without,
    it looks like one gRPC makes for a connection that failed. Timed on ``clock`` (a
    :class:`_SkippingClock`, the SDK's, for a load its retry pauses pass at once).
    ``code``: the refusal's, RESOURCE_EXHAUSTED for a server without room (a full job queue)."""

    def __init__(self, loading_s: float, *, retry_delay_s: float | None = None, clock: Any = time,
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__()
        self.clock = clock
        self.ready_at = clock.monotonic() + loading_s
        self.retry_delay_s = retry_delay_s
        self.code = code
        self.attempts: dict[str, int] = {}

    def _attempt(self, method: str, context) -> None:
        from google.protobuf import duration_pb2
        from google.rpc import error_details_pb2, status_pb2

        self.attempts[method] = self.attempts.get(method, 0) + 1
        if self.clock.monotonic() < self.ready_at:
            if self.retry_delay_s is not None:
                delay = duration_pb2.Duration()
                delay.FromNanoseconds(round(self.retry_delay_s * 1e9))
                status = status_pb2.Status(code=self.code.value[0], message="models are still loading")
                status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
            context.abort(self.code, "models are still loading")

    def GetSampleSet(self, request, context):
        from explaind.v1 import sample_sets_pb2

        self._attempt("GetSampleSet", context)
        if request.sample_set_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no sample set 'missing'")
        return sample_sets_pb2.GetSampleSetResponse(sample_set=sample_sets_pb2.SampleSet(sample_set_id=request.sample_set_id))

    def DeleteSampleSet(self, request, context):
        from explaind.v1 import sample_sets_pb2

        self._attempt("DeleteSampleSet", context)
        return sample_sets_pb2.DeleteSampleSetResponse()


def _serve(servicer, port: int = 0, *, add=sample_sets_pb2_grpc.add_SampleSetServiceServicer_to_server, threads: int = 2,
           options: Sequence[tuple[str, int]] = ()) -> tuple[grpc.Server, str]:
    """A local gRPC server of ``servicer`` (``add``: its service's add_*_to_server) on
    ``port`` (0: any free one), answering ``threads`` calls at once, with gRPC ``options``;
    the server and its address."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(threads), options=options)
    add(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_calls_that_change_nothing_are_retried_while_the_server_is_unavailable(monkeypatch):
    from explaind.client import UnavailableError, _client

    # On a skipping clock: the 6 s load costs no wall time, and the retries' last needs no
    # answer within a fraction of a second.
    clock = _SkippingClock()
    monkeypatch.setattr(_client, "time", clock)
    servicer = _LoadingSampleSets(loading_s=0, clock=clock)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=30) as client:
            assert client.sample_set("s").sample_set_id == "s"
            # Restarted, it loads its models for 6 s: gRPC's own retry policy (at most 5
            # attempts) gave up after at most 3 s.
            servicer.ready_at, servicer.attempts = clock.monotonic() + 6.0, {}
            with pytest.raises(UnavailableError, match="loading"):
                client.delete_sample_set("s")  # it may have taken effect: never sent twice
            assert client.sample_set("s").sample_set_id == "s"
        assert servicer.attempts["DeleteSampleSet"] == 1 and servicer.attempts["GetSampleSet"] > 1
        servicer.ready_at, servicer.attempts = float("inf"), {}
        with Client(target, timeout=30, retry=False) as client, pytest.raises(UnavailableError):
            client.sample_set("s")
        assert servicer.attempts == {"GetSampleSet": 1}
        with Client(target, timeout=30) as client, pytest.raises(UnavailableError):
            client.sample_set("s")  # a server that never answered this client: said at once
        assert servicer.attempts == {"GetSampleSet": 2}
    finally:
        server.stop(0)


def test_a_call_that_asks_the_limits_first_waits_out_a_server_down_once_within_its_timeout(monkeypatch):
    # A server gone for good: predict(images, timeout=5) and create_sample_set waited 5 s
    # for the limits, then sent their first request for 5 s more, twice the timeout.
    class LoadingInference(_LoadingSampleSets, inference_pb2_grpc.InferenceServiceServicer):
        def GetModelMetadata(self, request, context):
            self._attempt("GetModelMetadata", context)

        def Predict(self, request, context):
            self._attempt("Predict", context)

    def add_both(servicer, server) -> None:
        sample_sets_pb2_grpc.add_SampleSetServiceServicer_to_server(servicer, server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    clock = _skipping_sdk_clock(monkeypatch)
    servicer = LoadingInference(loading_s=0, retry_delay_s=0.5, clock=clock)
    server, target = _serve(servicer, add=add_both)
    try:
        with Client(target, timeout=30) as client:
            assert client.sample_set("s").sample_set_id == "s"  # reached once: its restarts are waited out
            servicer.ready_at, servicer.attempts = float("inf"), {}
            # Each within its own timeout: predict's ask for the limits waits its 5 s, not the client's 30.
            for call, timeout in ((lambda: client.predict([IMAGE, IMAGE], timeout=5), 5), (lambda: client.create_sample_set([IMAGE], [0]), 30)):
                started = clock.monotonic()
                with pytest.raises(UnavailableError, match="loading") as raised:
                    call()
                assert clock.monotonic() - started <= timeout
                # Not an upload sent that many times: the notes say whose attempts they were.
                assert "limits (GetModelMetadata) before the call's first request: no request of the call was sent" in raised.value.__notes__[-1]
        assert set(servicer.attempts) == {"GetModelMetadata"} and servicer.attempts["GetModelMetadata"] > 2
    finally:
        server.stop(0)


def test_a_call_s_first_request_gets_what_its_ask_for_the_limits_left_of_its_timeout(monkeypatch):
    # A server still loading that answered the ask for the limits 3.5 s into a timeout of 4
    # gave the call's first request 4 s more: the call took twice its timeout.
    class LoadingThenTimed(_LoadingSampleSets, inference_pb2_grpc.InferenceServiceServicer):
        """Metadata (one class, "zero"; a batch of 1: one image per Predict; partial_failure
        honoured) once loaded, counting its answers; each request's time left."""

        left_s: list[float]
        metadata_answers = 0
        answer_s = 0.0  # of the SDK's clock each metadata answer takes

        def GetModelMetadata(self, request, context):
            from explaind.client._client import PARTIAL_FAILURE_CAPABILITY

            self._attempt("GetModelMetadata", context)
            self.metadata_answers += 1
            self.clock.sleep(self.answer_s)
            return inference_pb2.GetModelMetadataResponse(classifier=inference_pb2.ClassifierInfo(class_names=["zero"]),
                                                          batching=inference_pb2.BatchingInfo(max_batch_size=1),
                                                          capabilities=[PARTIAL_FAILURE_CAPABILITY])

        def Predict(self, request, context):
            self.left_s.append(context.time_remaining())
            return inference_pb2.PredictResponse(predictions=[inference_pb2.Prediction() for _ in request.images])

        def CreateSampleSet(self, request, context):
            from explaind.v1 import sample_sets_pb2

            self.left_s.append(context.time_remaining())
            set_ = sample_sets_pb2.SampleSet(sample_set_id="s", uid="u", uploading=request.upload_continues)
            return sample_sets_pb2.CreateSampleSetResponse(sample_set=set_)

        def AppendSamples(self, request, context):
            from explaind.v1 import sample_sets_pb2

            self.left_s.append(context.time_remaining())
            set_ = sample_sets_pb2.SampleSet(sample_set_id="s", uid="u", uploading=not request.finish_upload)
            return sample_sets_pb2.AppendSamplesResponse(sample_set=set_)

    def add_both(servicer, server) -> None:
        sample_sets_pb2_grpc.add_SampleSetServiceServicer_to_server(servicer, server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    # On a skipping clock: the ask's tries at 0, 0.5, ... 3.5 s (RetryInfo 0.5 s) cost no wall
    # time; the server is ready from 3.2 s, so the try at 3.5 s is answered, 0.5 s before the end.
    clock = _skipping_sdk_clock(monkeypatch)
    servicer = LoadingThenTimed(loading_s=0, retry_delay_s=0.5, clock=clock)

    class SlowlyChecked(tuple):
        """Labels whose checking takes 1 s, as a million's may: no ask of the server."""

        def __iter__(self):
            clock.sleep(1)
            return super().__iter__()

    server, target = _serve(servicer, add=add_both)
    try:
        # predict's own timeout, and an upload's, the client's: each client asks the limits once.
        # partial_failure's ask for the capabilities (with the limits) counts alike, one image's too,
        # and so does an upload's for the class names its labels give, whose answer gives the limits:
        # it took a whole timeout of its own, then the limits were asked again.
        for call in (lambda client: client.predict([IMAGE, IMAGE], timeout=4),
                     lambda client: client.create_sample_set([IMAGE, IMAGE], [0, 0], chunk_size=1),
                     lambda client: client.predict([IMAGE, IMAGE], timeout=4, partial_failure=True),
                     lambda client: client.predict([IMAGE], timeout=4, partial_failure=True),
                     lambda client: client.create_sample_set([IMAGE, IMAGE], ["zero", "zero"], chunk_size=1),
                     lambda client: client.append_samples("s", [IMAGE, IMAGE], ["zero", "zero"], chunk_size=1)):
            with Client(target, timeout=4) as client:
                assert client.sample_set("s").sample_set_id == "s"  # reached once: its loading is waited out
                servicer.ready_at, servicer.left_s, servicer.metadata_answers = clock.monotonic() + 3.2, [], 0
                call(client)
            first, *others = sorted(servicer.left_s)  # a predict's two requests are in flight at once
            assert 0 < first < 1 and all(left > 3.5 for left in others)  # 0.5 s, but for gRPC rounding its deadline up
            assert servicer.metadata_answers == 1  # asked once per client
        # Only the asks count: checking an upload's labels here, 1 s of no request's time (as a
        # million labels' may take), was taken from its first request too.
        for labels in (SlowlyChecked((0,)), SlowlyChecked(("zero",))):
            with Client(target, timeout=4) as client:
                servicer.left_s = []
                client.create_sample_set([IMAGE], labels)
            assert servicer.left_s[0] > 3.5
        # Labels read as they are sent ask for the class names after the limits, as the first
        # request is made (two asks: the limits', then the names'): both count. Each answer here
        # takes 1.5 s of a timeout of 4; the names' was not counted, leaving the first 2.5 s.
        servicer.answer_s = 1.5
        with Client(target, timeout=4) as client:
            servicer.left_s, servicer.metadata_answers = [], 0
            client.create_sample_set([IMAGE, IMAGE], _ReadAsSent(["zero", "zero"]), chunk_size=1)
        assert servicer.metadata_answers == 2
        first, *others = servicer.left_s
        assert 0.5 < first < 1.5 and all(left > 3.5 for left in others)
    finally:
        server.stop(0)


class _ReadAsSent(collections.abc.Sequence):
    """Labels computed as they are read (neither a list, a tuple nor an array): the SDK checks
    each as its sample is sent, not before the upload."""

    def __init__(self, labels: list) -> None:
        self._labels = labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i):
        return self._labels[i]


def test_limits_an_ask_failed_to_get_are_asked_again_and_those_answered_are_kept():
    # As the README says: an ask met with UNAVAILABLE that is not waited out (retry=False,
    # or a server this client never reached) keeps nothing, its call sent with no limits
    # known (one request of both images, no batch size known), and the next call asks again.
    class UnavailableOnce(inference_pb2_grpc.InferenceServiceServicer):
        """UNAVAILABLE to the first GetModelMetadata, then a batch of 1; each Predict's images."""

        metadata_asks = 0
        images_per_request: list[int]

        def GetModelMetadata(self, request, context):
            self.metadata_asks += 1
            if self.metadata_asks == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading")
            return inference_pb2.GetModelMetadataResponse(batching=inference_pb2.BatchingInfo(max_batch_size=1))

        def Predict(self, request, context):
            self.images_per_request.append(len(request.images))
            return inference_pb2.PredictResponse(predictions=[inference_pb2.Prediction() for _ in request.images])

    servicer = UnavailableOnce()
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30, retry=False) as client:
            asked = []
            for _ in range(3):
                servicer.images_per_request = []
                client.predict([IMAGE, IMAGE])
                asked.append((servicer.metadata_asks, servicer.images_per_request))
        assert asked == [(1, [2]), (2, [1, 1]), (2, [1, 1])]
    finally:
        server.stop(0)


def test_a_split_call_s_first_request_gets_no_more_than_the_call_s_timeout(monkeypatch):
    # What the ask for the limits left of a timeout under 1 ms was raised to 1 ms: ten
    # times a timeout of 0.1 ms.
    from explaind.client import RequestLimits

    timeouts = []

    def answer(service, method, request, *, timeout, **kwargs):
        timeouts.append(timeout)
        return inference_pb2.PredictResponse(predictions=[inference_pb2.Prediction() for _ in request.images])

    with Client("127.0.0.1:1") as client:
        monkeypatch.setattr(client, "_request_limits", lambda timeout: RequestLimits(0, 0, 0, 0))  # known: asked in no time
        monkeypatch.setattr(client, "_call", answer)
        assert len(client.predict([IMAGE, IMAGE], timeout=1e-4)) == 2
    assert len(timeouts) == 1 and 0 < timeouts[0] <= 1e-4


def test_a_read_only_call_rides_over_a_restart_but_a_wrong_address_fails_at_once(monkeypatch):
    from explaind.client import UnavailableError

    from conftest import free_port

    clock = _skipping_sdk_clock(monkeypatch)
    with Client(f"127.0.0.1:{free_port()}", timeout=30) as client:
        with pytest.raises(UnavailableError, match="failed to connect"):
            client.sample_set("s")
    assert clock.pauses == []  # said at once, not retried for the 30 s
    # A port of free_port's, not one the kernel hands out: closed meanwhile, the kernel could
    # give one of its own to another test process's server or connection, and the restart
    # could not bind it.
    port = free_port()
    first, target = _serve(_LoadingSampleSets(loading_s=0), port)
    # The port stays closed for 4 s of the SDK's retry pauses, as when a server process
    # restarts, at no wall time: the pause that passes them restarts the server, and those
    # after it are real, gRPC's reconnect's time, as in a real restart.
    skip, restarted = clock.sleep, []

    def pause(seconds: float) -> None:
        if restarted:
            time.sleep(seconds)
            return
        skip(seconds)
        if clock.monotonic() >= closed_until:
            restarted.append(_serve(_LoadingSampleSets(loading_s=0), port)[0])

    monkeypatch.setattr(clock, "sleep", pause)
    with Client(target, timeout=30) as client:
        assert client.sample_set("s").sample_set_id == "s"
        first.stop(0).wait()
        closed_until = clock.monotonic() + 4.0
        try:
            assert client.sample_set("s").sample_set_id == "s"
        finally:
            for server in restarted:
                server.stop(0)


def test_a_deadline_met_before_any_answer_does_not_count_as_the_server_answering(monkeypatch):
    # A listener that accepts the connection but never speaks gRPC (a wrong port, a
    # stuck proxy) makes the call run out of time on the client's side. That is no
    # answer from a server: when the port then refuses, the wrong address is still
    # said at once, not retried until the deadline as a restarting server would be.
    import socket
    from types import SimpleNamespace

    from explaind.client import DeadlineExceededError, UnavailableError
    from explaind.client import _client

    mute = socket.create_server(("127.0.0.1", 0))
    target = f"127.0.0.1:{mute.getsockname()[1]}"
    pauses: list[float] = []
    monkeypatch.setattr(_client, "time", SimpleNamespace(monotonic=time.monotonic, sleep=pauses.append))
    with Client(target, timeout=30) as client:
        try:
            with pytest.raises(DeadlineExceededError):
                client.health(timeout=0.5)
        finally:
            mute.close()
        with pytest.raises(UnavailableError):
            client.sample_set("s")
    assert pauses == []


@contextlib.contextmanager
def _ready_for_the_last_try_only(monkeypatch) -> Iterator[tuple[Client, _LoadingSampleSets, _SkippingClock]]:
    """A client (timeout 5 s) that reached a :class:`_LoadingSampleSets`, that servicer,
    loading from now until the client's last try, and the SDK's clock. Backoff 0.1 s doubling to 2 s: tries at
    0, 0.1, 0.3, 0.7, 1.5 and 3.1 s; the next, at 5.1 s, is past the deadline, so the last
    is LAST_ATTEMPT_S before it (1 s here, the time that try has for its answer: the 0.25 s
    of the SDK's own was a loaded machine's to miss), at 4 s. The server is ready from 3.6
    s on. On a skipping clock: the pauses cost no wall time, and the calls' own time, which
    the clock counts, has 0.5 s before the try at 3.1 s would meet it ready."""
    from explaind.client import _client

    clock = _SkippingClock()
    monkeypatch.setattr(_client, "time", clock)
    monkeypatch.setattr(_client, "LAST_ATTEMPT_S", 1.0)
    servicer = _LoadingSampleSets(loading_s=0, clock=clock)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=5) as client:
            client.sample_set("s")
            servicer.ready_at, servicer.attempts = clock.monotonic() + 3.6, {}
            yield client, servicer, clock
    finally:
        server.stop(0)


def test_the_last_retry_comes_just_before_the_deadline(monkeypatch):
    # Retrying stopped at the last try of the backoff's before the deadline (3.1 s), though
    # the server answered from 3.6 s on: the last is now sent shortly before the deadline.
    with _ready_for_the_last_try_only(monkeypatch) as (client, servicer, clock):
        started = clock.monotonic()
        assert client.sample_set("s").sample_set_id == "s"
        # The last of 7 tries at 4 s, with LAST_ATTEMPT_S left for its answer, not at the deadline.
        assert servicer.attempts["GetSampleSet"] == 7 and clock.monotonic() - started < 4.5


def test_a_call_that_ran_out_of_time_retrying_says_it_was_retried_and_how_to_wait_longer(monkeypatch):
    # A server restarting for longer than the timeout ended the call in one UNAVAILABLE
    # (or DEADLINE_EXCEEDED) that did not say the SDK had retried it for the whole timeout.
    # On a skipping clock: the retries' 2 s cost no wall time.
    from explaind.client import UnavailableError

    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _LoadingSampleSets(loading_s=0)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=2) as client:
            client.sample_set("s")
            servicer.ready_at = float("inf")
            with pytest.raises(UnavailableError, match="loading") as unavailable:
                client.sample_set("s")
        attempts = servicer.attempts["GetSampleSet"] - 1
        assert attempts > 2 and attempts == len(clock.pauses) + 1 and len(unavailable.value.__notes__) == 1
        assert re.fullmatch(rf"the call was tried {attempts} times over [12]\.\ds, the server at {re.escape(target)} unavailable each time "
                            r"\(restarting, or loading its models\); a larger timeout waits longer for it \(timeout= of the Client or "
                            r"of the call; --timeout in the CLI\)", unavailable.value.__notes__[0])
        with Client(target, timeout=2, retry=False) as client, pytest.raises(UnavailableError) as once:
            client.sample_set("s")
        assert not hasattr(once.value, "__notes__")  # tried once: nothing to add
    finally:
        server.stop(0)


class _MuteAfterRestart(_LoadingSampleSets):
    """Unavailable (``refusal``: _LoadingSampleSets's code and retry_delay_s) for its first ``unavailable``
    attempts, then answers none until ``answer`` is set."""

    def __init__(self, unavailable: int, **refusal: Any) -> None:
        super().__init__(loading_s=0, **refusal)
        self.unavailable, self.answer = unavailable, threading.Event()

    def GetSampleSet(self, request, context):
        if self.attempts.get("GetSampleSet", 0) < self.unavailable:
            self.ready_at = float("inf")
        else:
            self.ready_at = 0.0
            self.answer.wait(timeout=60)
        return super().GetSampleSet(request, context)


def test_a_retried_call_whose_last_attempt_timed_out_says_so(monkeypatch):
    # On a skipping clock: of the timeout, 1 s, the pauses before the tries at 0.1 and
    # 0.25 s cost no wall time; the last try's 0.75 s, gRPC's deadline, does (0.5 s left the
    # first two tries 0.15 s of real time on a loaded machine).
    _skipping_sdk_clock(monkeypatch)
    servicer = _MuteAfterRestart(unavailable=2)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=1) as client:
            client._reached = True  # as after any earlier answer
            with pytest.raises(DeadlineExceededError) as late:
                client.sample_set("s")
        assert re.fullmatch(rf"the call was tried 3 times over (0\.[5-9]|1\.\d)s, the server at {re.escape(target)} unavailable the first 2, "
                            r"the last running out of time \(restarting, or loading its models\); a larger timeout waits longer .*",
                            late.value.__notes__[0])
    finally:
        servicer.answer.set()
        server.stop(0)


def test_a_call_refused_for_want_of_room_whose_retry_timed_out_says_so_not_that_the_server_did_nothing(monkeypatch):
    # A full queue's refusal, then a last try that went unanswered: the note said "without
    # room for it 1 times, unavailable or out of time the other 1 (...: it did nothing with
    # the call)", though that last try may have done something.
    _skipping_sdk_clock(monkeypatch)
    servicer = _MuteAfterRestart(unavailable=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=0.1)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=1) as client, pytest.raises(DeadlineExceededError) as late:
            client.sample_set("s")
        assert re.fullmatch(rf"the call was tried 2 times over (0\.[5-9]|1\.\d)s, the server at {re.escape(target)} without room for it "
                            r"once, unavailable or out of time the other 1 \(each refusal a RESOURCE_EXHAUSTED with a retry delay, "
                            r"which it did nothing with\); a larger timeout waits longer for room .*", late.value.__notes__[0])
    finally:
        servicer.answer.set()
        server.stop(0)


def test_a_retried_call_whose_last_attempt_got_another_error_does_not_say_it_ran_out_of_time(monkeypatch):
    from explaind.client import NotFoundError

    # The server came back for the last attempt, just before the deadline, and answered
    # NOT_FOUND: that answer carried a note of "unavailable the first 6, the last running
    # out of time", which it was not.
    with _ready_for_the_last_try_only(monkeypatch) as (client, servicer, _):
        with pytest.raises(NotFoundError) as missing:
            client.sample_set("missing")
        assert servicer.attempts["GetSampleSet"] == 7 and not hasattr(missing.value, "__notes__")


def _recorded_pauses(monkeypatch, servicer: _LoadingSampleSets, *, ready_after: int) -> list[float]:
    """The SDK's retry pauses (s), recorded instead of slept; ``servicer`` gets ready after
    ``ready_after`` of them (clear the list to count again)."""
    from types import SimpleNamespace

    from explaind.client import _client

    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(round(seconds, 3))
        if len(pauses) == ready_after:
            servicer.ready_at = 0.0

    monkeypatch.setattr(_client, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    return pauses


def test_retries_back_off_from_a_tenth_of_a_second_doubling_to_at_most_two_seconds(monkeypatch):
    # A server loading for minutes must be retried every 2 s (RETRY_MAX_BACKOFF_S), not
    # after pauses that keep doubling.
    servicer = _LoadingSampleSets(loading_s=float("inf"))
    pauses = _recorded_pauses(monkeypatch, servicer, ready_after=7)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=30) as client:
            client._reached = True  # as after any earlier answer
            assert client.sample_set("s").sample_set_id == "s"
        assert pauses == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    finally:
        server.stop(0)


def test_a_first_call_to_a_loading_server_waits_the_delay_it_asks_for(monkeypatch):
    # explaind's own UNAVAILABLE carries a RetryInfo: the address is right, so even a
    # client's first call is retried (it failed at once, though the server would answer
    # in a moment), after the server's delay rather than the doubling backoff, and so is
    # a call that changes something.
    from explaind.client import UnavailableError

    servicer = _LoadingSampleSets(loading_s=float("inf"), retry_delay_s=0.25)
    pauses = _recorded_pauses(monkeypatch, servicer, ready_after=5)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=30) as client:
            assert client.sample_set("s").sample_set_id == "s"
        assert pauses == [0.25] * 5 and servicer.attempts == {"GetSampleSet": 6}
        # The RetryInfo says the server did nothing with the call: a change is repeated too.
        servicer.ready_at, servicer.attempts, pauses[:] = float("inf"), {}, []
        with Client(target, timeout=30) as client:
            client.delete_sample_set("s")
        assert pauses == [0.25] * 5 and servicer.attempts == {"DeleteSampleSet": 6}
        servicer.ready_at = float("inf")
        with Client(target, timeout=30, retry=False) as client, pytest.raises(UnavailableError, match="loading") as loading:
            client.sample_set("s")
        assert loading.value.retry_delay == 0.25
        # A delay of 0 (another server, a proxy) is not taken as "retry at once, forever".
        servicer.ready_at, servicer.attempts, servicer.retry_delay_s, pauses[:] = float("inf"), {}, 0.0, []
        with Client(target, timeout=30) as client:
            client.sample_set("s")
        assert pauses == [0.1] * 5
    finally:
        server.stop(0)


def test_a_server_that_answered_with_an_error_is_retried_when_it_restarts():
    # Any answer, a refusal too, shows the address is right: a later UNAVAILABLE is a
    # restart worth waiting for, not a wrong address to report at once.
    from explaind.client import NotFoundError

    servicer = _LoadingSampleSets(loading_s=0)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=30) as client:
            with pytest.raises(NotFoundError):
                client.sample_set("missing")
            servicer.ready_at = time.monotonic() + 1.0
            assert client.sample_set("s").sample_set_id == "s"
        assert servicer.attempts["GetSampleSet"] > 2
    finally:
        server.stop(0)


class _LoadingInference(inference_pb2_grpc.InferenceServiceServicer):
    """An InferenceService whose metadata is UNAVAILABLE until ``loaded``, then states a
    limit of 2 images per Predict; Predict records how many images each request carried."""

    def __init__(self) -> None:
        self.loaded, self.requests = False, []

    def GetModelMetadata(self, request, context):
        if not self.loaded:
            context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading")
        return inference_pb2.GetModelMetadataResponse(limits=inference_pb2.RequestLimits(max_images_per_request=2))

    def Predict(self, request, context):
        self.requests.append(len(request.images))
        return inference_pb2.PredictResponse(predictions=[inference_pb2.Prediction() for _ in request.images])


def test_limits_unknown_while_the_server_loads_are_asked_again_once_it_has_loaded():
    # Limits are asked once per client; an answer of "still loading" must not stand for
    # them for the client's lifetime, or its requests would never be split.
    servicer = _LoadingInference()
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            assert len(client.predict([IMAGE] * 3)) == 3  # no limit known: one request
            servicer.loaded = True
            assert len(client.predict([IMAGE] * 3)) == 3
        # The second call's requests are in flight at once: they reach the server in either order.
        assert servicer.requests[0] == 3 and sorted(servicer.requests[1:]) == [1, 2]
    finally:
        server.stop(0)


class _BatchingInference(_LoadingInference):
    """Loaded, with a batch size of 4 images and room for 1024 per Predict."""

    def GetModelMetadata(self, request, context):
        return inference_pb2.GetModelMetadataResponse(batching=inference_pb2.BatchingInfo(max_batch_size=4),
                                                      limits=inference_pb2.RequestLimits(max_images_per_request=1024))


def test_predict_sends_requests_of_at_most_the_servers_batch_size():
    # A list sent whole (up to 1024 images a request) ran past the 30 s deadline on a CPU
    # server (800 ResNet-18 images of 224², one thread). A batch's time is the server's to size.
    servicer = _BatchingInference()
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            assert len(client.predict([IMAGE] * 10)) == 10
        assert sorted(servicer.requests) == [2, 4, 4]  # in flight at once, they reach the server in any order
    finally:
        server.stop(0)


class _LimitedInference(inference_pb2_grpc.InferenceServiceServicer):
    """States ``limits`` (and no batch size); Predict records each request and labels each
    image with its first pixel's value, so that the answers show the images' order."""

    def __init__(self, limits: inference_pb2.RequestLimits) -> None:
        self.limits, self.requests = limits, []

    def GetModelMetadata(self, request, context):
        return inference_pb2.GetModelMetadataResponse(limits=self.limits)

    def Predict(self, request, context):
        self.requests.append(request)
        dtypes = {common_pb2.DATA_TYPE_UINT8: "u1", common_pb2.DATA_TYPE_FLOAT32: "<f4"}
        first = [np.frombuffer(image.tensor.data, dtypes[image.tensor.dtype])[0] for image in request.images]
        return inference_pb2.PredictResponse(predictions=[inference_pb2.Prediction(labels=[f"{value:g}"]) for value in first])


@pytest.mark.parametrize("images, limits, per_request", [
    # 16x16x3 uint8 arrays are 784 bytes each in a request: 5 fit in half of 9400, 6 (4704) would not.
    ([np.full((16, 16, 3), i, np.uint8) for i in range(12)], inference_pb2.RequestLimits(max_message_bytes=9400), [5, 5, 2]),
    # (3, 16, 16) float arrays are 256 pixels each, not 3 x 16: 2 fit in 600 pixels.
    ([np.full((3, 16, 16), i, np.float32) for i in range(5)], inference_pb2.RequestLimits(max_pixels_per_request=600), [2, 2, 1]),
])
def test_predict_fills_requests_up_to_half_the_servers_message_limit_and_its_pixel_limit_in_order(images, limits, per_request):
    # The server refuses a request over either limit (the half leaves it room for its answer).
    servicer = _LimitedInference(limits)
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            predictions = client.predict(images, max_in_flight=1)
    finally:
        server.stop(0)
    assert [p.label for p in predictions] == [str(i) for i in range(len(images))]
    assert [len(request.images) for request in servicer.requests] == per_request
    from explaind.client._client import DEFAULT_MAX_MESSAGE_BYTES

    assert all(request.ByteSize() <= (limits.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES) // 2 for request in servicer.requests)


class _RankingInference(inference_pb2_grpc.InferenceServiceServicer):
    """Answers each image i with classes i+1 then i (probabilities 0.75, 0.25), and the
    features [i, i, i] when asked for them."""

    def GetModelMetadata(self, request, context):
        return inference_pb2.GetModelMetadataResponse(limits=inference_pb2.RequestLimits(max_images_per_request=2))

    def Predict(self, request, context):
        first = [image.tensor.data[0] for image in request.images]
        predictions = [inference_pb2.Prediction(labels=[f"c{i + 1}", f"c{i}"], class_indices=[i + 1, i], probabilities=[0.75, 0.25]) for i in first]
        features = None
        if request.return_features:
            features = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[len(first), 3],
                                         data=np.repeat(np.array(first, "<f4"), 3).tobytes())
        return inference_pb2.PredictResponse(predictions=predictions, features=features, model_version=f"v{first[0]}")


def test_a_prediction_keeps_the_servers_ranking_and_each_image_its_own_features():
    from explaind.client import Prediction

    server, target = _serve(_RankingInference(), add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            predictions = client.predict([np.full((4, 4, 3), i, np.uint8) for i in range(3)], return_features=True)
    finally:
        server.stop(0)
    # Two requests (the server takes 2 images each), each with its own model_version.
    assert predictions == [Prediction(labels=[f"c{i + 1}", f"c{i}"], class_indices=[i + 1, i], probabilities=[0.75, 0.25],
                                      features=np.full(3, i, np.float32), model_version="v2" if i == 2 else "v0") for i in range(3)]


# The most a stand-in server holds a request for others to arrive: reached only where the
# client sends fewer at once than the test expects (then it fails, not hangs).
HOLD_S = 10.0


class _PipelinedInference(inference_pb2_grpc.InferenceServiceServicer):
    """A batch size of 2 images (and ``queued_per_caller`` and ``calls_per_caller``, 0: no
    such limit; a Predict past ``calls_per_caller`` in progress is RESOURCE_EXHAUSTED). Each
    Predict of ``requests`` waits until ``window`` of
    them are in flight at once, or all have come, then
    answers each image with its first pixel as its class: the later sent first, or with
    ``failing`` (a first pixel), INVALID_ARGUMENT for that request, and the requests sent
    after it held until the client cancels them."""

    def __init__(self, requests: int, *, window: int, failing: int | None = None, queued_per_caller: int = 0, calls_per_caller: int = 0,
                 hold_s: float = HOLD_S) -> None:
        """``hold_s``: how long a request waits for its window at most (then none waits)."""
        self.requests, self.window, self.failing, self.queued_per_caller = requests, window, failing, queued_per_caller
        self.calls_per_caller, self.hold_s = calls_per_caller, hold_s
        self.changed = threading.Condition()
        self.arrived: list[int] = []  # each request's first pixel
        self.answered: list[int] = []
        self.cancelled: list[int] = []
        self.running = self.most_running = 0
        self.held_too_long = False

    def GetModelMetadata(self, request, context):
        batching = inference_pb2.BatchingInfo(max_batch_size=2, max_queued_images_per_caller=self.queued_per_caller)
        limits = inference_pb2.RequestLimits(max_images_per_request=1024, max_calls_per_caller=self.calls_per_caller)
        return inference_pb2.GetModelMetadataResponse(batching=batching, limits=limits)

    def Predict(self, request, context):
        first = request.images[0].tensor.data[0]
        with self.changed:
            if 0 < self.calls_per_caller <= self.running:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "this caller's Predict ... calls in progress hold its share")
            self.arrived.append(first)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.changed.notify_all()
            self._hold(lambda: self.most_running == self.window or len(self.arrived) == self.requests)
            if self.failing is None:
                self._hold(lambda: all(later in self.answered for later in self.arrived if later > first))
            self.running -= 1
        if self.failing is not None and first > self.failing:
            ended = threading.Event()
            if not context.add_callback(ended.set):  # the call had ended already: gRPC never calls it then
                ended.set()
            ended.wait(HOLD_S)
            with self.changed:
                if not context.is_active():
                    self.cancelled.append(first)
                    self.changed.notify_all()
            return inference_pb2.PredictResponse()
        if first == self.failing:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "images[1]: not an image")
        with self.changed:
            self.answered.append(first)
            self.changed.notify_all()
        return inference_pb2.PredictResponse(predictions=[inference_pb2.Prediction(class_indices=[image.tensor.data[0]])
                                                          for image in request.images])

    def _hold(self, until) -> None:
        if not self.changed.wait_for(lambda: self.held_too_long or until(), self.hold_s):
            self.held_too_long = True


def _numbered_images(count: int) -> np.ndarray:
    """``count`` 4x4 images, image i all of value i."""
    return np.arange(count, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)


@contextlib.contextmanager
def _client_of(servicer: _PipelinedInference) -> Iterator[Client]:
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server, threads=8)
    try:
        with Client(target, timeout=30) as client:
            yield client
    finally:
        server.stop(0)


def test_predict_keeps_several_requests_in_flight_and_returns_their_answers_in_order():
    # One request at a time paid a round trip each, and the server's batcher never saw two
    # of them at once. The server answers them last sent first: the list stays in order.
    servicer = _PipelinedInference(requests=5, window=4)  # the default max_in_flight
    with _client_of(servicer) as client:
        predictions = client.predict(_numbered_images(10))
    assert [p.class_indices for p in predictions] == [[i] for i in range(10)]
    assert servicer.most_running == 4 and servicer.answered[:4] == [6, 4, 2, 0]
    servicer = _PipelinedInference(requests=3, window=2)
    with _client_of(servicer) as client:
        assert [p.class_indices for p in client.predict(_numbered_images(6), max_in_flight=2)] == [[i] for i in range(6)]
        assert servicer.most_running == 2
        with pytest.raises(ValueError, match="^max_in_flight must be a positive integer"):
            client.predict(_numbered_images(6), max_in_flight=0)
    # A server that keeps each caller to 4 images waiting gets 2 requests of 2 at once, not
    # a third refused as RESOURCE_EXHAUSTED (one at a time never met that limit): the 4th
    # request's images (8 on) are read only once the 3rd is sent, after the 1st's answer.
    servicer = _PipelinedInference(requests=5, window=2, queued_per_caller=4)
    answered_when_read = []

    def images() -> Iterator[np.ndarray]:
        for image in _numbered_images(10):
            answered_when_read.append(len(servicer.answered))
            yield image

    with _client_of(servicer) as client:
        assert len(client.predict(images())) == 10
    assert servicer.most_running == 2 and answered_when_read[8] >= 1
    # A server that keeps each named caller to 2 calls in progress (half of its 4
    # max_workers) gets 2 requests at once, not a third refused as RESOURCE_EXHAUSTED,
    # failing the whole predict (the server holds the first two for a third, up to 1 s,
    # which the client must not send); an older server (0, no such limit) gets 4, above.
    servicer = _PipelinedInference(requests=5, window=3, calls_per_caller=2, hold_s=1.0)
    with _client_of(servicer) as client:
        assert [p.class_indices for p in client.predict(_numbered_images(10))] == [[i] for i in range(10)]
        assert client.model_metadata().limits.max_calls_per_caller == 2
    assert servicer.most_running == 2 and servicer.held_too_long


def test_a_failing_request_among_those_in_flight_raises_its_error_and_cancels_the_later_ones():
    from explaind.client import InvalidArgumentError

    servicer = _PipelinedInference(requests=5, window=4, failing=4)  # the third request, images 4 and 5
    with _client_of(servicer) as client:
        with pytest.raises(InvalidArgumentError, match=r"images\[1\]: not an image$") as raised:
            client.predict(_numbered_images(10))
        assert raised.value.request_offset == 4
        assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("explaind-Predict")]
        # The fourth request was in flight (the server holds each until four are): cancelled, not left to run.
        with servicer.changed:
            servicer.changed.wait_for(lambda: 6 in servicer.cancelled, HOLD_S)
        assert 6 in servicer.cancelled and sorted(servicer.answered) == [0, 2]


class _GatedInference(inference_pb2_grpc.InferenceServiceServicer):
    """A batch size of 2 images; each Predict, named by its first image's first pixel, waits
    until the test opens it (:meth:`open`), then answers each image with its first pixel
    as its class, or ``failing`` with INVALID_ARGUMENT. One the client cancels while it
    waits is noted in ``cancelled``."""

    def __init__(self, *, failing: int | None = None) -> None:
        self.failing = failing
        self.changed = threading.Condition()
        self.arrived: list[int] = []
        self.opened: set[int] = set()
        self.cancelled: list[int] = []

    def GetModelMetadata(self, request, context):
        return inference_pb2.GetModelMetadataResponse(batching=inference_pb2.BatchingInfo(max_batch_size=2),
                                                      limits=inference_pb2.RequestLimits(max_images_per_request=1024))

    def Predict(self, request, context):
        first = request.images[0].tensor.data[0]
        context.add_callback(self._ended)
        with self.changed:
            self.arrived.append(first)
            self.changed.notify_all()
            self.changed.wait_for(lambda: first in self.opened or not context.is_active(), HOLD_S)
            if not context.is_active():
                self.cancelled.append(first)
                self.changed.notify_all()
                return inference_pb2.PredictResponse()
        if first == self.failing:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "images[1]: not an image")
        return inference_pb2.PredictResponse(predictions=[inference_pb2.Prediction(class_indices=[image.tensor.data[0]])
                                                          for image in request.images])

    def open(self, *firsts: int) -> None:
        with self.changed:
            self.opened.update(firsts)
            self.changed.notify_all()

    def wait_for(self, until: Callable[[], bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(until, HOLD_S)

    def _ended(self) -> None:
        with self.changed:
            self.changed.notify_all()


def _predict_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("explaind-Predict")]


def test_predictions_come_as_their_requests_are_answered_and_a_close_cancels_those_in_flight():
    # predict returned nothing until every request was answered: a loop over 50,000 files
    # saw nothing for minutes, and a Ctrl-C lost every prediction made.
    servicer = _GatedInference()
    servicer.open(0)  # the first request of 3 (images 0-1, 2-3, 4-5) is answered, the second held
    with _client_of(servicer) as client:
        predictions = client.predictions(_numbered_images(6), max_in_flight=2)
        assert [next(predictions).class_indices, next(predictions).class_indices] == [[0], [1]]
        servicer.wait_for(lambda: 2 in servicer.arrived)
        predictions.close()
        assert not _predict_threads()
        servicer.wait_for(lambda: 2 in servicer.cancelled)
        assert sorted(servicer.arrived) == [0, 2]  # the third request is never sent (the first two, sent at once, in either order)
    # A loop's break drops the generator, which closes it, as close() does.
    servicer = _GatedInference()
    servicer.open(0)
    with _client_of(servicer) as client:
        for prediction in client.predictions(_numbered_images(6), max_in_flight=2):
            break
        assert prediction.class_indices == [0] and not _predict_threads() and 4 not in servicer.arrived
        # The arguments are checked at the call, not at the first prediction.
        with pytest.raises(ValueError, match="^max_in_flight must be a positive integer"):
            client.predictions(_numbered_images(6), max_in_flight=0)


def test_predictions_before_a_failing_request_come_before_its_error():
    from explaind.client import InvalidArgumentError

    servicer = _GatedInference(failing=2)  # the second of three requests
    servicer.open(0, 2, 4)
    with _client_of(servicer) as client:
        seen = []
        with pytest.raises(InvalidArgumentError, match=r"images\[1\]: not an image$") as raised:
            for prediction in client.predictions(_numbered_images(6), max_in_flight=2):
                seen.append(prediction.class_indices)
        assert seen == [[0], [1]] and raised.value.request_offset == 2 and not _predict_threads()


def test_predictions_left_in_a_reference_cycle_and_collected_in_one_of_their_threads_close_quietly(monkeypatch):
    # The garbage collector runs in whichever thread allocates, often a request's thread: the
    # close of a generator it found in a cycle waited there for that thread itself, and failed
    # as "Exception ignored in: <generator ...> RuntimeError: cannot join current thread".
    servicer = _GatedInference()
    servicer.open(0)
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    collected = threading.Event()
    call_at = Client._call_at

    def collecting_after_the_second(self, offset, *args, **kwargs):
        try:
            return call_at(self, offset, *args, **kwargs)
        finally:
            if offset == 2:
                gc.collect()  # as an allocation in this thread may
                collected.set()

    monkeypatch.setattr(Client, "_call_at", collecting_after_the_second)
    with _client_of(servicer) as client:
        cycle = SimpleNamespace(predictions=client.predictions(_numbered_images(6), max_in_flight=2))
        cycle.itself = cycle
        assert next(cycle.predictions).class_indices == [0]
        servicer.wait_for(lambda: 2 in servicer.arrived)
        gc.disable()  # collected in the request's thread alone
        try:
            del cycle
            servicer.open(2)
            assert collected.wait(HOLD_S)
        finally:
            gc.enable()
    for thread in threading.enumerate():
        if thread.name.startswith("explaind-Predict"):
            thread.join(HOLD_S)  # they end after the close, not before
    assert unraisable == [] and sorted(servicer.arrived) == [0, 2] and not _predict_threads()


def test_a_failing_request_of_a_predict_one_request_at_a_time_says_where_it_began():
    from explaind.client import InvalidArgumentError

    servicer = _PipelinedInference(requests=5, window=1, failing=4)  # the third request, images 4 and 5
    with _client_of(servicer) as client:
        with pytest.raises(InvalidArgumentError, match=r"images\[1\]: not an image$") as raised:
            client.predict(_numbered_images(10), max_in_flight=1)
    assert raised.value.request_offset == 4 and servicer.arrived == [0, 2, 4]


def test_a_predict_refusal_listing_images_of_a_later_request_says_where_that_request_began():
    # The server names images its model gives no usable logits for as images[i] of the
    # request, under the field images: i is the caller's item start + i. An older server
    # lists them in the message alone.
    from explaind.client import FailedPreconditionError, InvalidArgumentError
    from explaind.client._client import _note_chunk

    listing = FailedPreconditionError("images: the served classifier's logits of 1 image of the request hold NaN or +infinity, or are "
                                      "-infinity for every class (images[1]): ...", field="images")
    _note_chunk(listing, 32, 40)
    assert listing.__notes__ == ["the failing request began at item 32 of 40: [i] there is item 32 + i here"]
    unlisted = InvalidArgumentError("images: 33 images exceed the limit of 32 per request", field="images")
    _note_chunk(unlisted, 32, 40)
    assert unlisted.request_offset == 32 and not hasattr(unlisted, "__notes__")
    # In the first request, images[i] is the caller's item i already.
    first = FailedPreconditionError(listing.details, field="images")
    _note_chunk(first, 0, 40)
    assert first.request_offset == 0 and not hasattr(first, "__notes__")
    # A server that lists them as precondition violations is read from those, not its text.
    structured = FailedPreconditionError("images: the served classifier's logits of 1 image hold NaN", field="images",
                                         precondition_violations=[("UNUSABLE_LOGITS", "images[1]", "")])
    _note_chunk(structured, 32, 40)
    assert structured.__notes__ == listing.__notes__


def test_an_image_unread_after_a_failing_request_raises_the_request_s_error_as_one_at_a_time_does():
    # The images are read while the requests before them run: a read error raised at once
    # hid the earlier request's refusal, which one request at a time raised first.
    from explaind.client import InvalidArgumentError

    def images(readable: int) -> Iterator[np.ndarray]:
        yield from _numbered_images(readable)
        raise OSError("image 4: input/output error")

    for max_in_flight in (1, 4):
        servicer = _PipelinedInference(requests=1, window=2, failing=0)  # held for no second request: it may not be made
        with _client_of(servicer) as client:
            with pytest.raises(InvalidArgumentError, match=r"images\[1\]: not an image$") as raised:
                client.predict(images(4), max_in_flight=max_in_flight)
            assert raised.value.request_offset == 0
    # With the requests before it answered, the read error is the call's.
    servicer = _PipelinedInference(requests=1, window=2)
    with _client_of(servicer) as client:
        with pytest.raises(OSError, match="^image 4: input/output error$"):
            client.predict(images(4))
        assert 0 in servicer.answered


class _OnceUnavailableInference(inference_pb2_grpc.InferenceServiceServicer):
    """A batch size of 2 images. The request of first pixel 2 answers its first attempt
    UNAVAILABLE with a RetryInfo of ``retry_delay_s``; with ``refusing_first``, the request
    of first pixel 0 is refused (INVALID_ARGUMENT) once that UNAVAILABLE has been sent.
    Others answer each image with its first pixel as its class."""

    def __init__(self, retry_delay_s: float, *, refusing_first: bool = False) -> None:
        self.retry_delay_s, self.refusing_first = retry_delay_s, refusing_first
        self.attempts: dict[int, int] = {}
        self.unavailable_sent = threading.Event()

    def GetModelMetadata(self, request, context):
        return inference_pb2.GetModelMetadataResponse(batching=inference_pb2.BatchingInfo(max_batch_size=2),
                                                      limits=inference_pb2.RequestLimits(max_images_per_request=1024))

    def Predict(self, request, context):
        from google.protobuf import duration_pb2
        from google.rpc import error_details_pb2, status_pb2

        first = request.images[0].tensor.data[0]
        self.attempts[first] = self.attempts.get(first, 0) + 1
        if first == 2 and self.attempts[first] == 1:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(round(self.retry_delay_s * 1e9))
            status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="models are still loading")
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
            context.add_callback(self.unavailable_sent.set)  # once the call has ended
            context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading")
        if first == 0 and self.refusing_first:
            self.unavailable_sent.wait(HOLD_S)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "images[1]: not an image")
        return inference_pb2.PredictResponse(predictions=[inference_pb2.Prediction(class_indices=[image.tensor.data[0]])
                                                          for image in request.images])


def test_a_request_among_those_in_flight_is_retried_after_an_unavailable_and_its_pause_ends_with_the_call():
    from explaind.client import InvalidArgumentError

    servicer = _OnceUnavailableInference(retry_delay_s=0.1)
    with _client_of(servicer) as client:
        assert [p.class_indices for p in client.predict(_numbered_images(6))] == [[i] for i in range(6)]
    assert servicer.attempts == {0: 1, 2: 2, 4: 1}
    # Another request's refusal ends the call: the retry's pause (the server asked for 60 s,
    # the call's deadline allows 30) is cut short, and no thread is left pausing.
    servicer = _OnceUnavailableInference(retry_delay_s=60, refusing_first=True)
    with _client_of(servicer) as client:
        started = time.monotonic()
        with pytest.raises(InvalidArgumentError, match=r"images\[1\]: not an image$"):
            client.predict(_numbered_images(6))
        assert time.monotonic() - started < HOLD_S
    assert servicer.attempts[2] == 1 and not [thread.name for thread in threading.enumerate() if thread.name.startswith("explaind-Predict")]


class _StoppingOperations(operations_pb2_grpc.OperationsServiceServicer):
    """Knows one running operation, but WaitOperation and CancelOperation answer
    UNAVAILABLE, as a server shutting down does."""

    def GetOperation(self, request, context):
        metadata = any_pb2.Any()
        metadata.Pack(operations_pb2.OperationMetadata(kind="visualize_neurons", state=operations_pb2.OPERATION_STATE_RUNNING))
        return operations_pb2.GetOperationResponse(operation=operations_lro.Operation(name=request.name, metadata=metadata))

    def WaitOperation(self, request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    def CancelOperation(self, request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")


def test_waiting_for_an_operation_keeps_its_own_timeout_while_the_server_is_unavailable(monkeypatch):
    from explaind.client import UnavailableError

    server, target = _serve(_StoppingOperations(), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            operation = client.operation("operations/x")
            clock = _skipping_sdk_clock(monkeypatch)
            with pytest.raises(UnavailableError, match="shutting down"):
                operation.wait(timeout=1)
            # Retried within the wait's 1 s, not until the call's own deadline, 11 s away.
            assert clock.pauses and sum(clock.pauses) <= 1
            # Ctrl-C while waiting: the cancel fails, and the interrupt still reaches the caller.
            monkeypatch.setattr(type(operation), "wait", lambda self, timeout=None: (_ for _ in ()).throw(KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt) as interrupted:
                operation.result()
            assert interrupted.value.__notes__ == ["operations/x may still be running: cancelling it failed (UNAVAILABLE: the server is shutting down)"]
    finally:
        server.stop(0)


def _operation_message(name: str = "operations/x", *, done: bool = False, **metadata_fields) -> operations_lro.Operation:
    """A google.longrunning Operation whose metadata is ``OperationMetadata(**metadata_fields)``."""
    metadata = any_pb2.Any()
    metadata.Pack(operations_pb2.OperationMetadata(**metadata_fields))
    return operations_lro.Operation(name=name, metadata=metadata, done=done)


def _running_operation(name: str) -> operations_lro.Operation:
    return _operation_message(name, kind="edit_head", state=operations_pb2.OPERATION_STATE_RUNNING)


@contextlib.contextmanager
def _running_operation_of(servicer: operations_pb2_grpc.OperationsServiceServicer) -> Iterator[Any]:
    """The running operation "operations/x" of a client (timeout 30 s) of a local server of
    ``servicer``, a stand-in OperationsService, which that client reached (started the job)."""
    from explaind.client._operations import Operation

    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            client._reached = True  # as after the call that started the job
            yield Operation(client, _running_operation("operations/x"))
    finally:
        server.stop(0)


class _SlowWaitOperations(operations_pb2_grpc.OperationsServiceServicer):
    """Answers a WaitOperation a little after the wait it was asked for (as over a slow
    network, or a server that only checks its deadline at the end): still running."""

    def WaitOperation(self, request, context):
        time.sleep(request.timeout.ToTimedelta().total_seconds() + 0.2)
        return operations_pb2.WaitOperationResponse(operation=_running_operation(request.name))


def test_a_result_that_runs_out_of_time_hands_back_its_operation():
    # Only the message named it: a ranking that ran as an operation could not be waited
    # on again without parsing the text.
    from explaind.client import DeadlineExceededError

    with _running_operation_of(_SlowWaitOperations()) as operation:
        with pytest.raises(DeadlineExceededError, match="operations/x is still running") as late:
            operation.result(timeout=0.5)
        assert late.value.operation is operation


class _EndedOperations(operations_pb2_grpc.OperationsServiceServicer):
    """Answers that "operations/x" has succeeded, and records the methods asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def GetOperation(self, request, context):
        self.asked.append("GetOperation")
        return operations_pb2.GetOperationResponse(operation=_operation_message(request.name, done=True, state=operations_pb2.OPERATION_STATE_SUCCEEDED))


def test_a_wait_of_0_or_less_looks_once_and_does_not_wait():
    # Operation.wait: "0 or less: look once, the poll of 'is it done yet?'": without the
    # look it handed back the state last seen (running), however long ago that was.
    servicer = _EndedOperations()
    with _running_operation_of(servicer) as operation:
        assert operation.wait(timeout=0).done and operation.state == "succeeded"
    with _running_operation_of(servicer) as operation:
        assert operation.wait(timeout=-1).done
    assert servicer.asked == ["GetOperation", "GetOperation"]  # a look each, no WaitOperation


def test_a_wait_answered_a_little_after_the_servers_wait_ends_is_no_deadline_exceeded():
    # Each WaitOperation call's deadline is WAIT_CALL_MARGIN_S past the wait it asks for;
    # a deadline of the wait alone failed the caller's wait with DEADLINE_EXCEEDED.
    with _running_operation_of(_SlowWaitOperations()) as operation:
        assert not operation.wait(timeout=0.5).done


class _RestartingOperations(operations_pb2_grpc.OperationsServiceServicer):
    """One operation, answered UNAVAILABLE (a server restarting) until ``ready_at`` on
    ``clock`` (the SDK's: its retry pauses pass the outage, not the wall clock), then
    done; its watch stream always fails. ``asked``: the methods called, in turn."""

    def __init__(self, clock: _SkippingClock) -> None:
        self.clock, self.ready_at = clock, 0.0
        self.asked: list[str] = []

    def _operation(self, name: str, context) -> operations_lro.Operation:
        if self.clock.monotonic() < self.ready_at:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        metadata = any_pb2.Any()
        metadata.Pack(operations_pb2.OperationMetadata(kind="edit_head", state=operations_pb2.OPERATION_STATE_SUCCEEDED))
        return operations_lro.Operation(name=name, metadata=metadata, done=True)

    def GetOperation(self, request, context):
        self.asked.append("GetOperation")
        return operations_pb2.GetOperationResponse(operation=self._operation(request.name, context))

    def WaitOperation(self, request, context):
        self.asked.append("WaitOperation")
        return operations_pb2.WaitOperationResponse(operation=self._operation(request.name, context))

    def WatchOperation(self, request, context):
        self.asked.append("WatchOperation")
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")


def test_wait_and_watch_ride_over_an_outage_longer_than_one_call(monkeypatch):
    # wait() gave up when one WaitOperation call's retries ended (its deadline, 70 s at
    # most), and watch() when one GetOperation's did (the client's timeout), whatever
    # their own timeouts said. On a skipping clock: each call has its whole deadline to be
    # answered, however loaded the machine (scaled down to 0.5 s, a late first answer
    # failed the wait with DEADLINE_EXCEEDED).
    from explaind.client import _operations

    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _RestartingOperations(clock)
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    outage = 3 * (_operations.WAIT_STEP_S + _operations.WAIT_CALL_MARGIN_S)  # three times one wait call's retries
    try:
        with Client(target, timeout=30) as client:
            client._reached = True  # as after the call that started the job
            for follow in (lambda operation: operation.wait(timeout=10 * outage), lambda operation: list(operation.watch(timeout=10 * outage))):
                operation = client.operation("operations/x")
                operation._message.done = False  # as if it were still running
                servicer.ready_at = clock.monotonic() + outage
                follow(operation)
                assert operation.done and clock.monotonic() >= servicer.ready_at
    finally:
        server.stop(0)


def test_a_wait_or_watch_unavailable_to_its_end_says_it_tried_over_its_whole_outage(monkeypatch):
    # The note counted only the last call's tries: a watch retrying its refreshes for 4.8 s
    # (the client's timeout 1 s) said "tried 4 times over 1.0s", a wait whose calls each
    # retry for 70 s said 70 s of 200. On a skipping clock, as above.
    from explaind.client import UnavailableError

    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _RestartingOperations(clock)
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        with Client(target, timeout=1) as client:
            client._reached = True  # as after the call that started the job
            servicer.ready_at = float("inf")
            for follow, over in ((lambda operation: list(operation.watch(timeout=5)), r"4\.\d"),
                                 (lambda operation: operation.wait(timeout=200), r"19\d\.\d")):
                operation = Operation(client, _running_operation("operations/x"))
                asked = len(servicer.asked)
                with pytest.raises(UnavailableError, match="restarting") as unavailable:
                    follow(operation)
                tries = len(servicer.asked) - asked
                assert len(unavailable.value.__notes__) == 1, unavailable.value.__notes__
                assert re.match(rf"the call was tried {tries} times over {over}s, the server at {re.escape(target)} unavailable each time ",
                                unavailable.value.__notes__[0]), unavailable.value.__notes__[0]
    finally:
        server.stop(0)


class _AnsweringOnceThenRestarting(_RestartingOperations):
    """A :class:`_RestartingOperations` whose first WaitOperation is held for the whole
    wait asked and answered, the job still running, then the server restarts for good;
    with ``refusing_first``, refused for want of room (RESOURCE_EXHAUSTED with a retry
    delay) before that answer."""

    def __init__(self, clock: _SkippingClock, *, refusing_first: bool) -> None:
        super().__init__(clock)
        self.refusing = _LoadingSampleSets(float("inf"), retry_delay_s=0.1, clock=clock, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.refusals_left = int(refusing_first)

    def WaitOperation(self, request, context):
        if self.ready_at:
            return super().WaitOperation(request, context)
        self.asked.append("WaitOperation")
        if self.refusals_left:
            self.refusals_left -= 1
            self.refusing._attempt("WaitOperation", context)
        self.clock.now += request.timeout.ToTimedelta().total_seconds()
        self.ready_at = float("inf")
        return operations_pb2.WaitOperationResponse(operation=_running_operation(request.name))


@pytest.mark.parametrize("refusing_first", [False, True], ids=["answered", "refused, then answered"])
def test_a_wait_s_unavailable_note_counts_the_tries_since_the_server_last_answered(monkeypatch, refusing_first):
    # The outage starts after the answer: its tries and time, not the answered call's 60 s
    # too, nor a refusal before it (the note said the server was "without room for it once").
    from explaind.client import UnavailableError

    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _AnsweringOnceThenRestarting(clock, refusing_first=refusing_first)
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        with Client(target, timeout=1) as client:
            client._reached = True  # as after the call that started the job
            with pytest.raises(UnavailableError, match="restarting") as unavailable:
                Operation(client, _running_operation("operations/x")).wait(timeout=200)
            tries = len(servicer.asked) - 1 - refusing_first  # the refused and the answered are no tries of the outage
            said = re.match(rf"the call was tried {tries} times over (\d+\.\d)s, the server at {re.escape(target)} unavailable each time ",
                            unavailable.value.__notes__[0])
            assert tries > 1 and said and 130 < float(said[1]) < 150, unavailable.value.__notes__  # the outage's 140 s, not the wait's 200
    finally:
        server.stop(0)


class _RestartingAfterAnUpdate(_RestartingOperations):
    """A :class:`_RestartingOperations` whose first watch stream sends the job running,
    then the server restarts for ``outage_s`` (of its clock)."""

    def __init__(self, clock: _SkippingClock, outage_s: float) -> None:
        super().__init__(clock)
        self.outage_s, self.updated = outage_s, False

    def WatchOperation(self, request, context):
        if not self.updated:
            self.updated = True
            yield operations_pb2.WatchOperationResponse(operation=_running_operation(request.name))
            self.ready_at = self.clock.monotonic() + self.outage_s
        yield from super().WatchOperation(request, context)


def test_an_operation_whose_client_never_reached_the_server_is_said_unavailable_at_once_but_an_unpickled_one_waits(monkeypatch):
    # An operation built on a client the server never answered (a wrong address, for all
    # it knows): a call says UNAVAILABLE at once, but wait() and watch() asked again
    # without a pause, thousands of calls a second until their timeout (forever without
    # one); they say it at once too. A client whose only answer was a watch's update has
    # reached the server, though: that watch rides over the restart. So does an unpickled
    # operation's wait (a spawn worker's): the server at its address made it, though its
    # client is a new one.
    import pickle

    from explaind.client import UnavailableError, _operations

    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _RestartingAfterAnUpdate(clock, outage_s=3 * _operations.WATCH_REOPEN_PAUSE_S)
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as watching, Client(target, timeout=30) as waiting:
            watched = Operation(watching, _running_operation("operations/x"))
            assert [update.state for update in watched.watch(timeout=60)] == ["running", "succeeded"]
            assert servicer.asked[0] == "WatchOperation" and servicer.asked.count("GetOperation") > 1  # refreshed through the restart
            servicer.ready_at, servicer.asked = float("inf"), []
            waited = Operation(waiting, _running_operation("operations/x"))
            for follow in (lambda operation: operation.wait(timeout=1), lambda operation: list(operation.watch(timeout=1))):
                with pytest.raises(UnavailableError, match="restarting"):
                    follow(waited)
            assert servicer.asked == ["WaitOperation", "WatchOperation"]
            unpickled = pickle.loads(pickle.dumps(Operation(watching, _running_operation("operations/x"))))
            servicer.ready_at, servicer.asked = clock.monotonic() + 3 * (_operations.WAIT_STEP_S + _operations.WAIT_CALL_MARGIN_S), []
            assert unpickled._client is not watching and unpickled.wait(timeout=600).state == "succeeded"
            assert servicer.asked.count("WaitOperation") > 3, servicer.asked  # retried, within and across calls
            unpickled._client.close()
    finally:
        server.stop(0)


class _BusyStreamsRestartingOperations(_RestartingOperations):
    """A :class:`_RestartingOperations` with no thread for a watch's stream: it refuses
    each with RESOURCE_EXHAUSTED, its own answer."""

    def WatchOperation(self, request, context):
        self.asked.append("WatchOperation")
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no thread for another stream")


def test_a_watch_refused_a_stream_by_the_server_rides_over_a_restart_in_its_polls(monkeypatch):
    # The server's refusal of a stream is its answer, as a call's error is: a client that
    # had had no answer, refused a stream (no thread for it) and then unavailable at its
    # first poll (a restart), reached the server and waits for it. The stream's error did
    # not count, so the poll's UNAVAILABLE was said at once, as for a wrong address.
    from explaind.client import _operations

    clock = _skipping_sdk_clock(monkeypatch)
    servicer = _BusyStreamsRestartingOperations(clock)
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            operation = Operation(client, _running_operation("operations/x"))  # its client never answered
            servicer.ready_at = clock.monotonic() + _operations.WATCH_POLL_INTERVAL_S + 5  # down from before the first poll
            assert [update.state for update in operation.watch(timeout=60)] == ["succeeded"]
            assert servicer.asked[0] == "WatchOperation" and servicer.asked.count("GetOperation") > 1
    finally:
        server.stop(0)


class _DeletedOperations(operations_pb2_grpc.OperationsServiceServicer):
    """Knows "operations/x" running at the first WaitOperation and the first WatchOperation
    (whose stream then drops), then no more: another client deleted it once it ended."""

    def __init__(self) -> None:
        self.waits = self.watches = 0

    def GetOperation(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "name: no operation 'x'")

    def WaitOperation(self, request, context):
        self.waits += 1
        if self.waits > 1:
            context.abort(grpc.StatusCode.NOT_FOUND, "name: no operation 'x'")
        return operations_pb2.WaitOperationResponse(operation=_running_operation(request.name))

    def WatchOperation(self, request, context):
        self.watches += 1
        if self.watches > 1:
            context.abort(grpc.StatusCode.NOT_FOUND, "name: no operation 'x'")
        yield operations_pb2.WatchOperationResponse(operation=_running_operation(request.name))
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")


def test_waiting_for_or_watching_an_operation_deleted_meanwhile_says_so():
    # Its end and deletion between two of the SDK's calls: a bare "no operation 'x'" for
    # an operation the caller was following, running when last read.
    from explaind.client import NotFoundError

    servicer = _DeletedOperations()
    with _running_operation_of(servicer) as operation:
        note = ["operations/x was running when last read: it was deleted since (by another client, or by the server's retention "
                "of ended operations)"]
        # wait(0): its one look (an awaited result's last step's) said nothing of what was read before.
        for follow in (lambda: operation.wait(timeout=20), lambda: list(operation.watch(timeout=20)), lambda: list(operation.watch(timeout=20)),
                       lambda: operation.wait(timeout=0)):
            with pytest.raises(NotFoundError, match="no operation 'x'") as gone:
                follow()
            assert gone.value.__notes__ == note
        assert (servicer.waits, servicer.watches) == (2, 2)  # the second watch's stream answered NOT_FOUND itself


def test_watching_an_earlier_request_s_ended_operation_deleted_meanwhile_does_not_blame_an_interrupted_start():
    # An interrupted start's search cancels and deletes only a job it found queued or running; one already ended when last
    # read (a succeeded job a start got under a reused request_id) was deleted by another client or the server's retention.
    from explaind.client import NotFoundError
    from explaind.client._operations import Operation

    servicer = _DeletedOperations()
    servicer.watches = 1  # deleted already: the watch's first stream answers NOT_FOUND
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            operation = Operation(client, _operation_message(done=True, kind="edit_head", state=operations_pb2.OPERATION_STATE_SUCCEEDED,
                                                             requested_again=True))
            assert operation.requested_again
            with pytest.raises(NotFoundError) as gone:
                list(operation.watch(timeout=20))
    finally:
        server.stop(0)
    assert gone.value.operation is operation
    assert gone.value.__notes__ == ["operations/x was succeeded when last read: it was deleted since (by another client, or by the "
                                    "server's retention of ended operations)"]


class _OwnerBlindLists(operations_pb2_grpc.OperationsServiceServicer, sample_sets_pb2_grpc.SampleSetServiceServicer):
    """A server older than the lists' owner filter: it ignores owner and pages through
    everyone's operations and sets, two a page, alternately "monitoring"'s and "analyst"'s."""

    OWNERS = ("monitoring", "analyst") * 3

    def __init__(self) -> None:
        self.owners_asked: list[str] = []

    def _page(self, request) -> tuple[range, str]:
        self.owners_asked.append(request.owner)
        start = int(request.page_token or 0)
        end = min(start + 2, len(self.OWNERS))
        return range(start, end), str(end) if end < len(self.OWNERS) else ""

    def ListOperations(self, request, context):
        shown, token = self._page(request)
        listed = []
        for i in shown:
            metadata = any_pb2.Any()
            metadata.Pack(operations_pb2.OperationMetadata(kind="evaluate_sample_set", owner=self.OWNERS[i]))
            listed.append(operations_lro.Operation(name=f"operations/{i}", metadata=metadata))
        return operations_pb2.ListOperationsResponse(operations=listed, next_page_token=token)

    def ListSampleSets(self, request, context):
        from explaind.v1 import sample_sets_pb2

        shown, token = self._page(request)
        return sample_sets_pb2.ListSampleSetsResponse(
            sample_sets=[sample_sets_pb2.SampleSet(sample_set_id=f"set-{i}", owner=self.OWNERS[i]) for i in shown], next_page_token=token)


def test_an_owners_lists_from_a_server_that_ignores_owner_keep_to_that_owners_objects():
    servicer = _OwnerBlindLists()
    server, target = _serve(servicer, add=lambda servicer, server: (operations_pb2_grpc.add_OperationsServiceServicer_to_server(servicer, server),
                                                                     sample_sets_pb2_grpc.add_SampleSetServiceServicer_to_server(servicer, server)))
    try:
        with Client(target, timeout=30) as client:
            assert [op.name for op in client.operations(owner="monitoring")] == ["operations/0", "operations/2", "operations/4"]
            assert [op.name for op in client.operations(owner="analyst", limit=2)] == ["operations/1", "operations/3"]
            assert [s.sample_set_id for s in client.sample_sets(owner="analyst")] == ["set-1", "set-3", "set-5"]
            assert len(client.sample_sets()) == len(client.operations()) == 6
        assert set(servicer.owners_asked) == {"monitoring", "analyst", ""}  # sent for a server that honours it
    finally:
        server.stop(0)


class _TruncatedArtifacts(operations_pb2_grpc.OperationsServiceServicer):
    """Lists a 10-byte artifact but has only its first 4 bytes (a blob cut short on disk):
    past them it answers with no content, and after 20 such calls with INTERNAL."""

    def __init__(self) -> None:
        self.calls = 0

    def GetArtifact(self, request, context):
        self.calls += 1
        if self.calls > 20:
            context.abort(grpc.StatusCode.INTERNAL, "asked for the same range again and again")
        content = b"abcd"[request.offset:request.offset + request.max_bytes]
        return operations_pb2.GetArtifactResponse(artifact=operations_pb2.Artifact(name=request.artifact, size_bytes=10), content=content)


def test_an_artifact_that_ends_before_its_size_is_a_data_loss_not_an_endless_download(monkeypatch):
    # Without the check the download asked for byte 4 on and on, appending nothing.
    from explaind.client import DataLossError
    from explaind.client._operations import Operation
    from explaind.client._types import RequestLimits

    servicer = _TruncatedArtifacts()
    server, target = _serve(servicer, add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            monkeypatch.setattr(client, "_request_limits", lambda: RequestLimits(0, 0, 0, 0))  # this server has no metadata
            operation = Operation(client, operations_lro.Operation(name="operations/x", done=True))
            with pytest.raises(DataLossError, match=r"^DATA_LOSS: artifact 'omega.npy' of operations/x ended at byte 4 of 10$"):
                operation.artifact("omega.npy")
        assert servicer.calls == 2
    finally:
        server.stop(0)


def test_a_result_whose_files_cannot_be_fetched_says_the_job_ended_and_how_to_read_it(monkeypatch):
    # A server stopping right after the job ended refused result()'s artifact downloads:
    # the caller saw UNAVAILABLE alone, as if the job had not ended.
    from explaind.client import UnavailableError
    from explaind.client._operations import Operation

    metadata = any_pb2.Any()
    metadata.Pack(operations_pb2.OperationMetadata(kind="evaluate_sample_set", state=operations_pb2.OPERATION_STATE_SUCCEEDED,
                                                   full_response_artifact="result.binpb"))
    response = any_pb2.Any()
    response.Pack(operations_pb2.OperationMetadata())
    operation = Operation(None, operations_lro.Operation(name="operations/x", done=True, metadata=metadata, response=response))
    monkeypatch.setattr(Operation, "artifact", lambda self, name: (_ for _ in ()).throw(UnavailableError("Connection refused")))
    with pytest.raises(UnavailableError) as refused:
        operation.result()
    assert refused.value.__notes__ == ["operations/x succeeded; fetching the files of its result failed: result() again once the "
                                       "server is back, or result(download=False) for what needs no files"]
    assert operation.result(download=False) == operations_pb2.OperationMetadata()


class _HangingOperations(operations_pb2_grpc.OperationsServiceServicer):
    """A server half up: its watch stream fails UNAVAILABLE and GetOperation goes
    unanswered until the caller leaves."""

    def GetOperation(self, request, context):
        while context.is_active():
            time.sleep(0.05)
        return operations_pb2.GetOperationResponse(operation=_running_operation(request.name))

    def WatchOperation(self, request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")


def test_a_watch_refreshing_after_a_dropped_stream_keeps_its_own_timeout():
    # The refresh after a dropped stream took the client's whole timeout (30 s here), not
    # what was left of the watch's.
    with _running_operation_of(_HangingOperations()) as operation:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="operations/x is still .* after 1s"):
            operation.result(progress=True, timeout=1)
        assert time.monotonic() - started < 10  # far from the 30 s, however loaded the machine


class _EndlessOperations(operations_pb2_grpc.OperationsServiceServicer):
    """A job that runs until the watcher leaves; its state is read in 0.5 s. Records the
    time each watch stream had left as it began (s)."""

    def __init__(self) -> None:
        super().__init__()
        self.watches_left_s: list[float] = []

    def GetOperation(self, request, context):
        time.sleep(0.5)
        return operations_pb2.GetOperationResponse(operation=_running_operation(request.name))

    def WatchOperation(self, request, context):
        self.watches_left_s.append(context.time_remaining())
        yield operations_pb2.WatchOperationResponse(operation=_running_operation(request.name))
        while context.is_active():
            time.sleep(0.05)


def test_a_watch_ends_at_its_timeout_like_wait_with_the_operation_still_running():
    # The stream's deadline escaped as a bare "Stream removed (Deadline Exceeded)".
    servicer = _EndlessOperations()
    with _running_operation_of(servicer) as operation:
        started = time.monotonic()
        updates = list(operation.watch(timeout=1))
        assert 1 <= time.monotonic() - started < 10  # far from the client's 30 s, however loaded the machine
        assert updates and not operation.done and operation.state == "running"
    # One stream, given the watch's 1 s (gRPC rounds the deadline it sends up by a few ms).
    assert len(servicer.watches_left_s) == 1 and servicer.watches_left_s[0] <= 1.1, servicer.watches_left_s


def test_a_watch_with_a_timeout_of_zero_ends_at_once_with_the_operation_still_running():
    # 0 is a watch's to read, as wait's (a look without waiting), not a refused timeout.
    with _running_operation_of(_EndlessOperations()) as operation:
        list(operation.watch(timeout=0))
        assert not operation.done and operation.state == "running"


def test_a_watch_outlives_quiet_spells_and_fails_once_its_server_goes_silent(monkeypatch):
    # A server gone without closing the connection (its host down, a partition) left the
    # watch waiting for its deadline, 24 hours by default; the channel's keepalive pings,
    # as often as an explaind server lets clients ping, do not get it closed meanwhile.
    from conftest import StallingRelay
    from explaind.client import UnavailableError, _client
    from explaind.client._operations import Operation
    from explaind.service import server as explaind_server

    monkeypatch.setattr(_client, "KEEPALIVE_TIME_MS", 300)
    monkeypatch.setattr(_client, "KEEPALIVE_TIMEOUT_MS", 2000)  # an answer late on a loaded machine is no silence
    monkeypatch.setattr(explaind_server, "CLIENT_PING_INTERVAL_MIN_MS", 100)
    quiet_spell_over = threading.Event()

    class QuietOperations(operations_pb2_grpc.OperationsServiceServicer):
        def WatchOperation(self, request, context):
            yield operations_pb2.WatchOperationResponse(operation=_running_operation(request.name))
            quiet_spell_over.wait()
            yield operations_pb2.WatchOperationResponse(operation=_running_operation(request.name))
            while context.is_active():
                time.sleep(0.05)

    server, target = _serve(QuietOperations(), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server,
                            options=explaind_server.keepalive_options())
    relay = StallingRelay(int(target.rpartition(":")[2]))
    try:
        with Client(relay.target, timeout=5, retry=False) as client:
            updates = Operation(client, _running_operation("operations/x")).watch(timeout=20)
            next(updates)
            time.sleep(3.5)  # 3 pings without an update (one a second at most): gRPC's default policy closed the connection
            quiet_spell_over.set()
            next(updates)
            time.sleep(0.5)  # the ping gRPC sends on an update answered: the keepalive's to find the silence
            relay.stall()
            with pytest.raises(UnavailableError):
                next(updates)
    finally:
        quiet_spell_over.set()
        relay.close()
        server.stop(0)


@contextlib.contextmanager
def _a_client_connected_through_a_relay(server_options: list[tuple[str, int]]):
    """(client, its channel's connectivity states after READY, the relay): a Client with no
    retry, connected through a StallingRelay to a sample-set server of ``server_options``,
    READY after one call. The keepalive tests drop or watch its connection."""
    import queue

    from conftest import StallingRelay

    server, target = _serve(_LoadingSampleSets(loading_s=0), options=server_options)
    relay = StallingRelay(int(target.rpartition(":")[2]))
    try:
        with Client(relay.target, timeout=5, retry=False) as client:
            assert client.sample_set("s").sample_set_id == "s"
            states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
            client._channel.subscribe(states.put)
            assert states.get(timeout=5) == grpc.ChannelConnectivity.READY
            yield client, states, relay
    finally:
        relay.close()
        server.stop(0)


def test_an_idle_client_keeps_its_connection_and_finds_it_dropped_before_its_next_call(monkeypatch):
    # An idle channel sent no keepalive ping: the first call after a NAT or load balancer
    # forgot the idle connection (or the server's host went down) went out on it and
    # failed UNAVAILABLE only once the call's own ping went unanswered, 30 s + 60 s.
    from explaind.client import _client
    from explaind.service import server as explaind_server

    monkeypatch.setattr(_client, "KEEPALIVE_TIME_MS", 300)
    monkeypatch.setattr(_client, "KEEPALIVE_TIMEOUT_MS", 2000)  # an answer late on a loaded machine is no silence
    monkeypatch.setattr(explaind_server, "CLIENT_PING_INTERVAL_MIN_MS", 100)
    with _a_client_connected_through_a_relay(explaind_server.keepalive_options()) as (client, states, relay):
        # 4 pings without a call (gRPC sends one a second at most): a server that does
        # not permit them closes the connection at the 4th (GOAWAY too_many_pings).
        time.sleep(5)
        assert states.empty() and relay.connections == 1
        relay.drop_open_connections()
        # Generous: the idle ping unanswered for KEEPALIVE_TIMEOUT_MS closes the connection.
        assert states.get(timeout=20) != grpc.ChannelConnectivity.READY
        assert client.sample_set("s").sample_set_id == "s"  # no retry: the call went out on a new connection
        assert relay.connections == 2


def test_an_idle_client_whose_server_refuses_pings_without_calls_has_its_next_call_answered(monkeypatch):
    # A server of an earlier release permits no ping without a call: it closes an idle
    # client's connection at the 4th (GOAWAY too_many_pings), which the next call opens
    # again, without a retry (gRPC halves the client's pings each time).
    from explaind.client import _client
    from explaind.service import server as explaind_server

    monkeypatch.setattr(_client, "KEEPALIVE_TIME_MS", 300)
    monkeypatch.setattr(explaind_server, "CLIENT_PING_INTERVAL_MIN_MS", 100)
    earlier_options = [option for option in explaind_server.keepalive_options()
                       if option[0] != "grpc.keepalive_permit_without_calls"]
    with _a_client_connected_through_a_relay(earlier_options) as (client, states, relay):
        assert states.get(timeout=20) != grpc.ChannelConnectivity.READY  # generous: 4 pings, one a second
        assert client.sample_set("s").sample_set_id == "s"
        assert relay.connections == 2


def test_a_key_or_certificate_path_that_is_a_directory_is_refused_naming_its_argument(tmp_path):
    # The OSError named the path, not which of the three arguments gave it.
    with pytest.raises(OSError, match=r"^root_certificates: cannot read .+: Is a directory$"):
        Client("127.0.0.1:1", tls=True, root_certificates=tmp_path)


@pytest.mark.parametrize("timeout", [0, -1])
@pytest.mark.parametrize("progress", [False, True])
def test_a_result_timeout_of_zero_or_less_is_no_wait_with_or_without_progress(progress, timeout):
    # With progress the 0 was read as "no timeout": the watch ran for WATCH_DEADLINE_S (24 h);
    # and the error said the job was "still running after -1s".
    import threading

    with _running_operation_of(_EndlessOperations()) as operation:
        raised = []

        def follow() -> None:
            with pytest.raises(DeadlineExceededError, match=rf"operations/x is still running: a timeout of {timeout}s looks once, without waiting$"):
                operation.result(progress=progress, timeout=timeout)
            raised.append(True)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        thread.join(5)
        assert raised == [True]


def test_a_call_timeout_of_zero_is_no_wait_not_the_clients_default():
    # 0 was read as "unset": the call got the client's 30 s.
    with _running_operation_of(_EndlessOperations()) as operation:
        assert not operation.refresh().done
        with pytest.raises(DeadlineExceededError):
            operation.refresh(timeout=0)


class _FinishedOperations(operations_pb2_grpc.OperationsServiceServicer):
    """Says the operation has succeeded (its handle still reads it running)."""

    def GetOperation(self, request, context):
        operation = _running_operation(request.name)
        metadata = operations_pb2.OperationMetadata()
        operation.metadata.Unpack(metadata)
        metadata.state = operations_pb2.OPERATION_STATE_SUCCEEDED
        operation.metadata.Pack(metadata)
        operation.done = True
        return operations_pb2.GetOperationResponse(operation=operation)


@pytest.mark.parametrize("timeout", [0, -1])
def test_a_wait_of_no_time_reads_the_operations_state_from_the_server(timeout):
    # wait(0) is a poll ("is it done yet?"): it answered with the state last read.
    with _running_operation_of(_FinishedOperations()) as operation:
        assert operation.wait(timeout).done and operation.state == "succeeded"


HOLDER = "visualize_neurons 0123456789abcdef (step 120/400, 14 min)"  # the job a queued one waits for, as the server names it


class _StreamedOperations(operations_pb2_grpc.OperationsServiceServicer):
    """Streams a job's updates at once: queued, running at 1 of 2 steps, then cancelled."""

    def WatchOperation(self, request, context):
        from google.rpc import status_pb2

        updates = [(operations_pb2.OPERATION_STATE_QUEUED, 0, f"queued: 1 ahead; running: {HOLDER}"), (operations_pb2.OPERATION_STATE_RUNNING, 1, "epoch 1"),
                   (operations_pb2.OPERATION_STATE_CANCELLED, 1, "")]
        for state, step, message in updates:
            metadata = any_pb2.Any()
            metadata.Pack(operations_pb2.OperationMetadata(kind="edit_head", state=state, progress=operations_pb2.Progress(step=step, total=2, message=message)))
            done = state == operations_pb2.OPERATION_STATE_CANCELLED
            error = status_pb2.Status(code=grpc.StatusCode.CANCELLED.value[0], message="cancelled") if done else None
            yield operations_pb2.WatchOperationResponse(operation=operations_lro.Operation(name=request.name, metadata=metadata, done=done, error=error))


def test_progress_lines_show_every_change_of_state_or_message_at_once(capsys):
    # Only a change *and* PROGRESS_LINE_INTERVAL_S since the last line printed one: a job
    # ending within 10 s showed its first state only, never its outcome.
    from explaind.client import CancelledError

    with _running_operation_of(_StreamedOperations()) as operation, pytest.raises(CancelledError):
        operation.result(progress=True, timeout=10)
    # A queued job's message, "queued: <place>; running: <what holds the workers>", reads
    # without its state twice.
    assert capsys.readouterr().err.splitlines() == [f"edit_head: queued 0/2 1 ahead; running: {HOLDER}", "edit_head: running 1/2 epoch 1",
                                                    "edit_head: cancelled 1/2"]


def test_progress_lines_of_a_counting_message_keep_to_the_interval(capsys):
    # A message that counts ("computing features 64/6000", up to 5 updates a second) was a
    # change each update: a line each, hundreds in a notebook cell or a log.
    from explaind.client._operations import ProgressDisplay

    with ProgressDisplay("evaluate_sample_set", unit="step") as display:
        display.show(0, 0, "running")
        for step in range(64, 6000, 64):
            display.show(step, 6000, "running", f"computing features {step}/6000")
        display.show(6000, 6000, "running", "drawing 64 mistakes")
        display.show(6000, 6000, "succeeded", "done")
    assert capsys.readouterr().err.splitlines() == [
        "evaluate_sample_set: running", "evaluate_sample_set: running 64/6000 computing features 64/6000",
        "evaluate_sample_set: running 6000/6000 drawing 64 mistakes", "evaluate_sample_set: succeeded 6000/6000 done"]


def test_wait_until_ready_keeps_its_timeout_on_a_server_that_never_answers():
    # Each probe took the client's whole timeout (8 s) however little of the wait was left.
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        with Client(f"127.0.0.1:{silent.getsockname()[1]}", timeout=30) as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="was not SERVING within 1"):
                client.wait_until_ready(timeout=1)
            assert time.monotonic() - started < 10  # far from the 30 s, however loaded the machine


def test_a_closed_client_says_so_at_once(server):
    # gRPC's "Cannot invoke RPC on closed channel!" named no client, and wait_until_ready
    # polled it for its whole timeout before blaming the server.
    with Client(server.target, timeout=30) as client:
        operation = client.evaluate_sample_set(client.create_sample_set(np.zeros((2, 8, 8, 3), np.uint8), [0, 1]).sample_set_id)
    for call in (client.health, lambda: client.wait_until_ready(timeout=30), operation.refresh, lambda: next(operation.watch())):
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"this Client of .* is closed \(close\(\), or the end of its with-block\); make a new Client"):
            call()
        assert time.monotonic() - started < 5


def test_the_retried_methods_are_read_only_methods_of_the_api():
    from explaind.client._client import READ_ONLY_METHODS
    from explaind.v1 import inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2

    files = (inference_pb2, sample_sets_pb2, operations_pb2, neuroinspect_pb2)
    methods = {service.full_name: set(service.methods_by_name) for module in files for service in module.DESCRIPTOR.services_by_name.values()}
    for service, names in READ_ONLY_METHODS.items():
        assert set(names) <= methods[service], service  # a misspelt name would silently never retry
        assert not {name for name in names if name.startswith(("Create", "Append", "Delete", "Edit", "Promote", "Rollback", "Cancel", "Evaluate", "Visualize", "Rank"))}


def test_listing_operations_of_an_unknown_kind_names_the_field_and_the_kinds(client):
    from explaind.client import InvalidArgumentError

    with pytest.raises(InvalidArgumentError) as raised:
        client.operations(kind="rank_neurons")
    assert raised.value.field == "kind"
    assert "the kinds are edit_head, evaluate_sample_set, rank_mistake_neurons, visualize_neurons" in str(raised.value)


def test_an_unknown_label_of_a_large_classifier_is_answered_with_the_closest_names():
    # The error listed every class: 1000 names for an ImageNet model.
    from explaind.client._client import _classes_hint

    names = ["tench", "goldfish", "great white shark"] + [f"class {i}" for i in range(997)]
    assert _classes_hint("goldfsh", names) == "1000 classes; did you mean 'goldfish'?"
    assert _classes_hint("zzzz", names) == "1000 classes"
    assert _classes_hint("dog", names[:3]) == "tench, goldfish, great white shark"
    assert _classes_hint("cta", ["cat", "cat"] + names) == "1002 classes; did you mean 'cat'?"  # a repeated name once


def test_every_status_code_but_ok_and_unknown_has_its_typed_error():
    # ABORTED (an operation a restart ended), PERMISSION_DENIED, UNIMPLEMENTED and
    # OUT_OF_RANGE were bare ExplaindErrors: `except AbortedError` was impossible.
    from explaind.client import ExplaindError, OperationError
    from explaind.client._errors import error_from_code, operation_error

    for code in grpc.StatusCode:
        if code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN):
            continue
        error = error_from_code(code, "why", [("field", "what")])
        assert type(error) is not ExplaindError and error.code == code and error.field == "field", code
        failed = operation_error(code, "why")
        assert isinstance(failed, OperationError) and isinstance(failed, type(error)) and failed.code == code


def test_a_code_without_its_own_error_stays_a_plain_explaind_error_of_that_code():
    # UNKNOWN (e.g. an exception a proxy or an older server did not map) must not pass for
    # a typed error such as InternalError; a job failing with it is still an OperationError.
    from explaind.client import ExplaindError, InternalError, OperationError
    from explaind.client._errors import error_from_code, operation_error

    error = error_from_code(grpc.StatusCode.UNKNOWN, "why")
    assert type(error) is ExplaindError and not isinstance(error, InternalError)
    assert error.code == grpc.StatusCode.UNKNOWN and str(error) == "UNKNOWN: why"
    failed = operation_error(grpc.StatusCode.UNKNOWN, "why")
    assert type(failed) is OperationError and failed.code == grpc.StatusCode.UNKNOWN


def _bad_request(*fields: str) -> any_pb2.Any:
    """A ``google.rpc.BadRequest`` status detail refusing ``fields``."""
    from google.rpc import error_details_pb2

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description=f"{field} is wrong") for field in fields]))
    return detail


def test_a_call_error_keeps_every_field_violation_in_order_and_names_its_code_without_a_message():
    # A status may carry several BadRequest details of several violations each: none is
    # dropped and ``field`` is the first. A status without a message still says what it is.
    from google.rpc import status_pb2

    from explaind.client import InvalidArgumentError
    from explaind.client._errors import from_rpc_error

    status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], details=[_bad_request("images[0]", "top_k"), _bad_request("labels[2]")])

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return ""

        def trailing_metadata(self):
            return (("other-bin", b"x"), ("grpc-status-details-bin", status.SerializeToString()))

    error = from_rpc_error(Refused())
    assert isinstance(error, InvalidArgumentError) and str(error) == "INVALID_ARGUMENT: INVALID_ARGUMENT"
    assert error.field == "images[0]"
    assert error.field_violations == [("images[0]", "images[0] is wrong"), ("top_k", "top_k is wrong"), ("labels[2]", "labels[2] is wrong")]


def test_a_failed_jobs_error_is_its_typed_error_with_the_field_it_refused():
    # A job refused at run time reads as the call would have: an InvalidArgumentError (and
    # an OperationError) whose ``field`` names what to fix.
    from google.rpc import status_pb2

    from explaind.client import InvalidArgumentError, OperationError
    from explaind.client._operations import Operation

    status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="group_attribute: no sample has it",
                               details=[_bad_request("group_attribute")])
    operation = Operation(None, operations_lro.Operation(name="operations/x", done=True, error=status))
    with pytest.raises(InvalidArgumentError) as raised:
        operation.result()  # done: no call is made
    assert isinstance(raised.value, OperationError) and raised.value.field == "group_attribute"
    assert str(raised.value) == "INVALID_ARGUMENT: group_attribute: no sample has it"


def test_pixel_count_reads_a_png_header_as_pillow_does():
    """The SDK's split of a predict or upload counts an encoded PNG's pixels from its IHDR
    chunk without Pillow: the same count as Pillow's size for any PNG it opens, and 0 (as
    Pillow's open fails) for a header whose CRC is wrong."""
    import io
    import zlib

    from PIL import Image, UnidentifiedImageError

    from explaind.client._images import pixel_count
    from explaind.v1 import common_pb2

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in ((1, 1), (64, 64), (37, 301), (512, 3))]
    images += [images[2].convert(mode) for mode in ("L", "LA", "P", "RGBA", "1", "I;16")]
    for image in images:
        data = png(image)
        with Image.open(io.BytesIO(data)) as opened:
            assert pixel_count(common_pb2.Image(encoded=data)) == opened.size[0] * opened.size[1] == image.size[0] * image.size[1]
    data = bytearray(png(images[1]))
    data[29:33] = ((zlib.crc32(data[12:29]) + 1) % 2**32).to_bytes(4, "big")
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(bytes(data)))
    assert pixel_count(common_pb2.Image(encoded=bytes(data))) == 0
    assert pixel_count(common_pb2.Image(encoded=b"\x89PNG\r\n\x1a\n")) == 0  # truncated: no header


def test_arrays_travel_as_their_pixels_uint8_channels_first_turned_to_channels_last():
    from explaind.client._images import to_image_message

    def sent(array: np.ndarray) -> np.ndarray:
        tensor = to_image_message(array).tensor
        dtype = {common_pb2.DATA_TYPE_UINT8: "u1", common_pb2.DATA_TYPE_FLOAT16: "<f2", common_pb2.DATA_TYPE_FLOAT32: "<f4"}[tensor.dtype]
        return np.frombuffer(tensor.data, dtype).reshape(tensor.shape)

    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(sent(pixels.transpose(2, 0, 1)), pixels)  # torchvision's (3, H, W) uint8
    for kept in (pixels, pixels[:3]):  # (H, W, 3), also 3 rows high: not read as (3, H, W)
        assert np.array_equal(sent(kept), kept) and sent(kept).dtype == np.uint8
    floats = pixels.transpose(2, 0, 1) / 255  # float64, channels first: float32 as it is
    assert sent(floats).dtype == np.float32 and np.allclose(sent(floats), floats, atol=1e-7)
    assert sent(floats.astype(np.float16)).dtype == np.float16
    # Big-endian arrays (FITS data, some TIFF readers) were refused as of an unsupported dtype.
    for dtype in (">f8", ">f4", ">f2"):
        big_endian = floats.astype(dtype)
        assert np.array_equal(sent(big_endian), sent(big_endian.astype(dtype.replace(">", "="))))


def _operation_from_a_newer_server(state: int, response_type: str = "") -> Any:
    from explaind.client._operations import Operation

    metadata = any_pb2.Any()
    metadata.Pack(operations_pb2.OperationMetadata(kind="summarize_dataset", state=state))
    message = operations_lro.Operation(name="operations/x", done=bool(response_type), metadata=metadata)
    if response_type:
        message.response.type_url = f"type.googleapis.com/{response_type}"
        message.response.value = b"\x08\x01"
    return Operation(None, message)


def test_an_operation_state_or_result_type_a_newer_server_added_reads_without_a_traceback():
    # A pipeline's SDK upgrades after its server: an OperationState this SDK does not know
    # raised KeyError from .state (and so from repr, `operations list` and watch), and a
    # result of a job kind it does not know raised KeyError from the descriptor pool.
    from explaind.client import UnimplementedError

    operation = _operation_from_a_newer_server(9)
    assert operation.state == "unknown (9)"
    assert repr(operation) == "Operation('operations/x', kind='summarize_dataset', state='unknown (9)', progress=0/0)"
    done = _operation_from_a_newer_server(operations_pb2.OPERATION_STATE_SUCCEEDED, "explaind.v1.SummarizeDatasetResult")
    assert done.state == "succeeded"
    with pytest.raises(UnimplementedError, match=r"^UNIMPLEMENTED: operations/x \(summarize_dataset\) has a result of type explaind\.v1\.SummarizeDatasetResult, "
                                                 r"which this explaind SDK does not know: the server is newer; upgrade the SDK"):
        done.result()


def test_a_ranking_answered_neither_inline_nor_as_an_operation_says_to_upgrade(client, monkeypatch):
    # RankMistakeNeuronsResponse.outcome is a oneof: a member a newer server added read as
    # an operation without a name, and the SDK asked GetOperation for "" (INVALID_ARGUMENT).
    from explaind.client import UnimplementedError
    from explaind.v1 import neuroinspect_pb2

    call = client._call
    monkeypatch.setattr(client, "_call", lambda service, method, request, **kwargs: neuroinspect_pb2.RankMistakeNeuronsResponse()
                        if method == "RankMistakeNeurons" else call(service, method, request, **kwargs))
    with pytest.raises(UnimplementedError, match=r"^UNIMPLEMENTED: RankMistakeNeurons answered with neither a ranking nor an operation: the server is newer"):
        client.rank_mistake_neurons("any", 0)


@pytest.mark.parametrize(("said_again", "lost_attempts", "requested_again"), [
    (False, 0, False),  # a new job
    (True, 0, True),  # an earlier request's under the request_id
    (True, 1, False),  # the SDK's retry after a lost answer: that attempt may have started it
])
def test_a_ranking_run_as_an_operation_says_whether_an_earlier_request_started_it(client, monkeypatch, said_again, lost_attempts, requested_again):
    # The ranking named its job but not whether a repeat of a request_id got an earlier
    # request's (Operation.requested_again): an SDK caller could not tell a rerun's result.
    import uuid

    from explaind.v1 import neuroinspect_pb2

    job = _operation_message("operations/r", done=True, kind="rank_mistake_neurons", state=operations_pb2.OPERATION_STATE_SUCCEEDED,
                             requested_again=said_again)
    job.response.Pack(neuroinspect_pb2.NeuronRanking(class_name="heart"))

    def answer(service, method, request, unanswered=None, **kwargs):
        assert method == "RankMistakeNeurons"
        unanswered.append(lost_attempts)
        return neuroinspect_pb2.RankMistakeNeuronsResponse(operation=job)

    monkeypatch.setattr(client, "_call", answer)
    ranking = client.rank_mistake_neurons("any", 0, request_id=uuid.uuid4())
    assert (ranking.operation, ranking.requested_again) == ("operations/r", requested_again)
    # Not compared, as the docs say: the same ranking, whoever's request started its job, and inline.
    import dataclasses

    assert ranking == dataclasses.replace(ranking, operation=None, requested_again=not requested_again)


def test_a_ranking_answered_inline_is_not_said_to_be_requested_again(client, monkeypatch):
    # No job ran, and the server keeps no request_id of an inline ranking: the same id again computes it again.
    import uuid

    from explaind.v1 import neuroinspect_pb2

    answer = neuroinspect_pb2.RankMistakeNeuronsResponse(ranking=neuroinspect_pb2.NeuronRanking(class_name="heart"))
    monkeypatch.setattr(client, "_call", lambda service, method, request, unanswered=None, **kwargs: answer)
    ranking = client.rank_mistake_neurons("any", 0, request_id=uuid.uuid4())
    assert (ranking.operation, ranking.requested_again) == (None, False)


def test_a_ranking_without_a_timeout_gives_its_request_at_least_300_s_and_one_with_a_timeout_that(client, monkeypatch):
    # rank_mistake_neurons: "None: the request gets at least 300 s" (an inline ranking
    # computes in the call), the client's timeout where that is longer; a given timeout as is.
    from explaind.v1 import neuroinspect_pb2

    deadlines = []
    answer = neuroinspect_pb2.RankMistakeNeuronsResponse(ranking=neuroinspect_pb2.NeuronRanking(class_name="heart"))
    monkeypatch.setattr(client, "_call", lambda service, method, request, **kwargs: deadlines.append(kwargs["timeout"]) or answer)
    monkeypatch.setattr(client, "timeout", 5.0)
    client.rank_mistake_neurons("any", 0)
    monkeypatch.setattr(client, "timeout", 600.0)
    client.rank_mistake_neurons("any", 0)
    client.rank_mistake_neurons("any", 0, timeout=2)
    assert deadlines == [300.0, 600.0, 2]


class _EvaluatingServer(inference_pb2_grpc.InferenceServiceServicer):
    """An InferenceService whose first EvaluateSampleSet answer is lost (UNAVAILABLE without
    a RetryInfo, after it started the operation), which honours request_id if ``capable``
    (an operation per request_id) and says so in its metadata."""

    def __init__(self, *, capable: bool) -> None:
        super().__init__()
        self.capable = capable
        self.request_ids: list[str] = []
        self.operations: dict[str, str] = {}

    def GetModelMetadata(self, request, context):
        return inference_pb2.GetModelMetadataResponse(capabilities=["request_id"] if self.capable else [])

    def EvaluateSampleSet(self, request, context):
        self.request_ids.append(request.request_id)
        key = request.request_id if self.capable else str(len(self.request_ids))
        name = self.operations.setdefault(key, f"operations/{len(self.operations):016x}")
        if len(self.request_ids) == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        return inference_pb2.EvaluateSampleSetResponse(operation=operations_lro.Operation(name=name))


def test_a_call_starting_an_operation_is_sent_again_with_its_request_id_only_to_a_server_honouring_it():
    import uuid

    from explaind.client import UnavailableError

    capable = _EvaluatingServer(capable=True)
    server, target = _serve(capable, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            assert client.model_metadata().capabilities == ("request_id",)
            assert client.evaluate_sample_set("s").name == "operations/0000000000000000"
            assert client.evaluate_sample_set("s").name == "operations/0000000000000001"  # each call its own id
    finally:
        server.stop(0)
    first, again, other = capable.request_ids
    assert first == again != other and uuid.UUID(first).version == 4 and len(capable.operations) == 2

    older = _EvaluatingServer(capable=False)  # ignores request_id: a repeat would start it twice
    server, target = _serve(older, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            assert client.model_metadata().capabilities == ()
            with pytest.raises(UnavailableError, match="Socket closed"):
                client.evaluate_sample_set("s")
    finally:
        server.stop(0)
    assert len(older.request_ids) == 1


class _RepeatSayingServer(_EvaluatingServer):
    """An :class:`_EvaluatingServer` (honouring request_id, its first answer lost) whose
    answer to a request_id it had started an operation for says so (requested_again)."""

    def EvaluateSampleSet(self, request, context):
        again = request.request_id in self.operations
        response = super().EvaluateSampleSet(request, context)
        response.operation.metadata.Pack(operations_pb2.OperationMetadata(state=operations_pb2.OPERATION_STATE_QUEUED, requested_again=again))
        return response


def test_a_start_whose_lost_answer_the_sdk_retried_is_not_said_to_be_requested_again():
    # The retry gets the job its own first attempt started: requested_again said an earlier
    # request's (the CLI: "started by an earlier run with this --request-id, is queued").
    import uuid

    servicer = _RepeatSayingServer(capable=True)
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            request_id = uuid.uuid4()
            started = client.evaluate_sample_set("s", request_id=request_id)
            again = client.evaluate_sample_set("s", request_id=request_id)
            new = client.evaluate_sample_set("s")
    finally:
        server.stop(0)
    assert len(servicer.request_ids) == 4 and started.name == again.name != new.name  # the first answer lost, retried once
    assert (started.requested_again, again.requested_again, new.requested_again) == (False, True, False)



def test_a_start_the_server_refused_with_a_retry_delay_first_still_says_an_earlier_request_started_its_operation():
    # An UNAVAILABLE with a RetryInfo says the server did nothing: the retry's answer is
    # as a first attempt's, and its requested_again true. Any attempt before the answer
    # counted as one that may have started the operation, hiding that an earlier run had.
    import uuid

    from google.protobuf import duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    class RefusingTheRerunOnce(_RepeatSayingServer):
        def EvaluateSampleSet(self, request, context):
            if len(self.request_ids) == 2 and not getattr(self, "refused", False):  # the rerun's first attempt
                self.refused = True
                delay = duration_pb2.Duration()
                delay.FromNanoseconds(50_000_000)
                status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="the queue is full")
                status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
                context.abort(grpc.StatusCode.UNAVAILABLE, "the queue is full")
            return super().EvaluateSampleSet(request, context)

    servicer = RefusingTheRerunOnce(capable=True)
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client:
            request_id = uuid.uuid4()
            started = client.evaluate_sample_set("s", request_id=request_id)  # its first answer lost, retried
            again = client.evaluate_sample_set("s", request_id=request_id)  # refused with a delay once, then answered
    finally:
        server.stop(0)
    assert servicer.refused and len(servicer.request_ids) == 3 and started.name == again.name
    assert (started.requested_again, again.requested_again) == (False, True)

class _UploadServer(sample_sets_pb2_grpc.SampleSetServiceServicer, inference_pb2_grpc.InferenceServiceServicer):
    """A SampleSetService whose first answer to each method of ``drop`` is lost (UNAVAILABLE
    without a RetryInfo, after the request was applied), which lists ``capabilities`` and
    honours the request_id of uploads if they name "sample_set_request_id"; an older one
    ignores it (a repeated create is ALREADY_EXISTS, a repeated append adds its samples again)."""

    UID = "0" * 8 + "-0000-4000-8000-" + "0" * 12  # of every set it answers with

    def __init__(self, capabilities: tuple[str, ...], drop: set[str]) -> None:
        super().__init__()
        self.capabilities, self.drop = capabilities, set(drop)
        self.calls: list[tuple[str, str]] = []  # (method, request_id)
        self.labels: dict[str, list[int]] = {}
        self.applied: set[str] = set()
        self.uploading: set[str] = set()

    def GetModelMetadata(self, request, context):
        return inference_pb2.GetModelMetadataResponse(capabilities=self.capabilities)

    def _answer(self, method: str, set_id: str, context):
        if method in self.drop:
            self.drop.discard(method)
            context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        from explaind.v1 import sample_sets_pb2

        labels = self.labels[set_id]
        return sample_sets_pb2.SampleSet(sample_set_id=set_id, sample_count=len(labels), uid=self.UID,
                                         uploading=set_id in self.uploading)

    def _repeat(self, request) -> bool:
        if "sample_set_request_id" not in self.capabilities:
            return False
        repeated = request.request_id in self.applied
        self.applied.add(request.request_id)
        return repeated

    def CreateSampleSet(self, request, context):
        from explaind.v1 import sample_sets_pb2

        self.calls.append(("CreateSampleSet", request.request_id))
        if not self._repeat(request):
            if request.sample_set_id in self.labels:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"sample set {request.sample_set_id!r} already exists")
            self.labels[request.sample_set_id] = [s.label for s in request.samples]
            if request.upload_continues:
                self.uploading.add(request.sample_set_id)
        return sample_sets_pb2.CreateSampleSetResponse(sample_set=self._answer("CreateSampleSet", request.sample_set_id, context))

    def AppendSamples(self, request, context):
        from explaind.v1 import sample_sets_pb2

        self.calls.append(("AppendSamples", request.request_id))
        if not self._repeat(request):
            self.labels[request.sample_set_id] += [s.label for s in request.samples]
            if request.finish_upload:
                self.uploading.discard(request.sample_set_id)
        return sample_sets_pb2.AppendSamplesResponse(sample_set=self._answer("AppendSamples", request.sample_set_id, context))

    def DeleteSampleSet(self, request, context):
        from explaind.v1 import sample_sets_pb2

        self.labels.pop(request.sample_set_id, None)
        self.uploading.discard(request.sample_set_id)
        return sample_sets_pb2.DeleteSampleSetResponse()


def _png_files(folder, count: int) -> list:
    """``count`` 8x8 PNG files in ``folder``, image i all of value i (paths, in order)."""
    from PIL import Image

    paths = [folder / f"{value}.png" for value in range(count)]
    for value, path in enumerate(paths):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return paths


def _serve_uploads(servicer: _UploadServer) -> tuple[grpc.Server, str]:
    def add(servicer, server):
        sample_sets_pb2_grpc.add_SampleSetServiceServicer_to_server(servicer, server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    return _serve(servicer, add=add)


class _RefusingAppendsServer(_UploadServer):
    """Records the set uid each append names, and refuses the append that would take the
    set past 4 samples, naming its second sample."""

    def __init__(self) -> None:
        super().__init__((), set())
        self.append_uids: list[str] = []

    def AppendSamples(self, request, context):
        self.append_uids.append(request.sample_set_uid)
        if len(self.labels[request.sample_set_id]) + len(request.samples) > 4:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "samples[1].image: not an image")
        return super().AppendSamples(request, context)


def test_an_uploads_appends_name_the_set_it_created_and_a_refused_one_says_where_its_request_began():
    # Without the uid, a set deleted and made again under the same id meanwhile would
    # take the rest of this upload; samples[1] of the third request is the caller's 5.
    from explaind.client import InvalidArgumentError

    servicer = _RefusingAppendsServer()
    server, target = _serve_uploads(servicer)
    try:
        with Client(target, timeout=30) as client:
            with pytest.raises(InvalidArgumentError, match=r"samples\[1\]\.image: not an image") as raised:
                client.create_sample_set(np.zeros((6, 4, 4, 3), np.uint8), [0] * 6, sample_set_id="up", chunk_size=2)
    finally:
        server.stop(0)
    assert raised.value.request_offset == 4
    assert servicer.append_uids == [_UploadServer.UID] * 2 and "up" not in servicer.labels


class _ComputedLabels(Sequence):
    """Labels computed when read, as a dataset's are, ``label_at`` the one of index i;
    records the furthest index read."""

    def __init__(self, length: int, label_at=lambda i: i % 6) -> None:
        self.length, self.label_at, self.furthest = length, label_at, -1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        self.furthest = max(self.furthest, index)
        return self.label_at(index)


def test_a_samples_attributes_are_read_by_name_whatever_the_process_s_hash_order(client):
    # A proto map iterates in its hash order, which PYTHONHASHSEED changes from process to
    # process: printed or dumped as JSON, the same sample's attributes came in another order.
    names = ["shape", "colour", "texture", "background", "zone", "angle", "mood", "id"]
    client.create_sample_set([IMAGE], [0], sample_set_id="attribute-order", attributes=[{name: "x" for name in names}])
    (sample,) = client.samples("attribute-order")
    assert list(sample.attributes) == sorted(names)


def test_labels_computed_when_read_are_read_as_their_samples_are_sent():
    # Read ahead, a million computed labels were all read (and held) before anything was
    # sent: a set of 10**14 world scenes ran silently until interrupted.
    images = (np.zeros((4, 4, 3), np.uint8) for _ in range(10))  # the stream ends first
    labels = _ComputedLabels(10**6)
    servicer = _UploadServer((), set())
    server, target = _serve_uploads(servicer)
    try:
        with Client(target, timeout=30) as client, pytest.raises(ValueError, match="the images are not as many as the 1000000 labels") as raised:
            client.create_sample_set(images, labels, sample_set_id="up", chunk_size=2)
    finally:
        server.stop(0)
    assert labels.furthest == 9  # one sample a chunk's end and one chunk are read ahead of a request
    assert [method for method, _ in servicer.calls] == ["CreateSampleSet", "AppendSamples", "AppendSamples"]
    assert "up" not in servicer.labels and "the partly uploaded sample set 'up' was deleted" in raised.value.__notes__


@pytest.mark.parametrize(("labels", "attributes", "message"), [
    ([0] * 6 + [1.5, 0], None, r"^labels\[6\] must be a class name \(str\) or index \(int\), got 1\.5$"),
    ([0] * 8, [{}] * 6 + [{"a": 1}, {}], r"^attributes\[6\] must map strings to strings, got \{'a': 1\}$"),
    ([0] * 8, [{}] * 6 + [["a", "b"], {}], r"^attributes\[6\] must map strings to strings, got \['a', 'b'\]$"),
    (tuple([0] * 6 + [1.5, 0]), None, r"^labels\[6\] must be a class name \(str\) or index \(int\), got 1\.5$"),
    (np.array([0] * 6 + [1.5, 0], dtype=object), None, r"^labels\[6\] must be a class name \(str\) or index \(int\), got 1\.5$"),
    ([0] * 8, tuple([{}] * 6 + [{"a": 1}, {}]), r"^attributes\[6\] must map strings to strings, got \{'a': 1\}$"),
])
def test_labels_and_attributes_in_a_list_tuple_or_array_are_checked_whole_before_the_first_request(labels, attributes, message):
    # Unlike computed ones: these are in memory, so the last label is as cheap to check as the first.
    servicer = _UploadServer((), set())
    server, target = _serve_uploads(servicer)
    try:
        with Client(target, timeout=30) as client, pytest.raises(TypeError, match=message):
            client.create_sample_set([IMAGE] * 8, labels, attributes=attributes, chunk_size=2)
    finally:
        server.stop(0)
    assert servicer.calls == []


def test_computed_attribute_maps_are_checked_as_their_samples_are_sent():
    # Not read ahead, as computed labels are not: a bad map is found once the set was
    # created, which is then deleted; each map is still checked, naming its index.
    attributes = _ComputedLabels(8, lambda i: {"a": 1} if i == 5 else {"a": "b"})
    servicer = _UploadServer((), set())
    server, target = _serve_uploads(servicer)
    try:
        with Client(target, timeout=30) as client, pytest.raises(TypeError, match=r"^attributes\[5\] must map strings to strings, got \{'a': 1\}\n") as raised:
            client.create_sample_set([IMAGE] * 8, [0] * 8, attributes=attributes, sample_set_id="up", chunk_size=2)
    finally:
        server.stop(0)
    assert attributes.furthest == 5
    assert [method for method, _ in servicer.calls][0] == "CreateSampleSet"
    assert "up" not in servicer.labels and "the partly uploaded sample set 'up' was deleted" in raised.value.__notes__


def test_a_computed_label_that_is_no_class_fails_the_upload_when_its_sample_is_made(client):
    # Not read ahead, so found after the set was created: the set is deleted, as for an
    # image that cannot be read; a list's is refused before any call (above).
    labels = _ComputedLabels(8, lambda i: "dog" if i == 5 else "heart")
    with pytest.raises(ValueError, match=r"^labels\[5\]: 'dog' is not a class of the served model \(circle, square") as raised:
        client.create_sample_set([IMAGE] * 8, labels, sample_set_id="computed-labels", chunk_size=2)
    assert "the partly uploaded sample set 'computed-labels' was deleted" in raised.value.__notes__
    assert "computed-labels" not in [stored.sample_set_id for stored in client.sample_sets()]
    stored = client.create_sample_set([IMAGE] * 3, _ComputedLabels(3, lambda i: ["heart", 0, "square"][i]), sample_set_id="computed-labels")
    assert stored.class_counts == {0: 1, 1: 1, client.model_metadata().class_names.index("heart"): 1}
    client.delete_sample_set("computed-labels")


def test_an_upload_request_whose_answer_was_lost_is_sent_again_only_to_a_server_honouring_its_request_id():
    # A dropped answer to CreateSampleSet or AppendSamples failed the whole upload: sent
    # again, an append would add its samples twice and a create get ALREADY_EXISTS.
    from explaind.client import UnavailableError

    images, labels = np.zeros((12, 4, 4, 3), np.uint8), [i % 6 for i in range(12)]
    capable = _UploadServer(("request_id", "sample_set_request_id"), {"CreateSampleSet", "AppendSamples"})
    server, target = _serve_uploads(capable)
    try:
        with Client(target, timeout=30) as client:
            assert client.create_sample_set(images, labels, sample_set_id="up", chunk_size=4).sample_count == 12
            capable.drop = {"AppendSamples"}
            assert client.append_samples("up", images[:8], labels[:8], chunk_size=4).sample_count == 20
    finally:
        server.stop(0)
    assert capable.labels["up"] == labels + labels[:8]  # each sample once, in order
    methods, ids = zip(*capable.calls)
    assert methods == ("CreateSampleSet",) * 2 + ("AppendSamples",) * 6
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[5] == ids[6] and len(set(ids)) == 5  # a repeat keeps its id

    # A server that honours only the operations' request_id: not retried, whatever its answer.
    for dropped in ("CreateSampleSet", "AppendSamples"):
        older = _UploadServer(("request_id",), {dropped})
        server, target = _serve_uploads(older)
        try:
            with Client(target, timeout=30) as client, pytest.raises(UnavailableError, match="Socket closed"):
                client.create_sample_set(images, labels, sample_set_id="up", chunk_size=4)
        finally:
            server.stop(0)
        assert [method for method, _ in older.calls].count(dropped) == 1
        assert ("up" in older.labels) == (dropped == "CreateSampleSet")  # a set the client knows of is deleted, as before


def test_a_pipeline_s_own_request_id_sent_again_gets_the_operation_it_started(client):
    # The SDK made a new id per call and took none: a call that ran past its deadline, or
    # a pipeline that restarted, could only start its operation a second time.
    import uuid

    from explaind.client import InvalidArgumentError

    labels = ["heart", "heart", "star", "star", "heart"]
    set_id = client.create_sample_set([IMAGE] * 5, labels).sample_set_id
    request_id = uuid.uuid5(uuid.NAMESPACE_URL, f"explaind-test/{set_id}")
    first = client.evaluate_sample_set(set_id, request_id=request_id)
    assert client.evaluate_sample_set(set_id, request_id=str(request_id).upper()).name == first.name  # any form uuid.UUID reads
    assert client.evaluate_sample_set(set_id).name != first.name
    with pytest.raises(InvalidArgumentError, match="was sent with another request") as caught:  # an id names one request
        client.edit_head(set_id, "heart", [1], max_epochs=1, request_id=request_id)
    assert caught.value.field == "request_id" and caught.value.operation.name == first.name  # the id's operation, to wait on
    versions, edit_id = len(client.head_versions()), uuid.uuid5(request_id, "edit")
    edit = client.edit_head(set_id, "heart", [1], max_epochs=1, request_id=edit_id.hex)
    edit.result(timeout=60)
    again = client.edit_head(set_id, "heart", [1], max_epochs=1, request_id=edit_id.hex)
    assert again.name == edit.name and len(client.head_versions()) == versions + 1  # its version is stored once
    # The repeat says it got the earlier request's operation (a queued one looked new), and
    # still does once refreshed, whose answer (GetOperation) does not say it.
    assert (edit.requested_again, again.requested_again, again.refresh().requested_again) == (False, True, True)
    assert not client.operation(again.name).requested_again
    first.result(timeout=60)


class _RefusingAReusedRequestId(inference_pb2_grpc.InferenceServiceServicer, operations_pb2_grpc.OperationsServiceServicer):
    """A server refusing EvaluateSampleSet's request_id as reused (naming operations/first
    in a google.rpc.ResourceInfo, as explaind does) ``answer_s`` seconds after it came,
    then restarting: GetOperation is UNAVAILABLE with a RetryInfo. It keeps the seconds
    each GetOperation had left of its deadline. ``racing``: it refuses the id as given to
    operations/first for the same request (ALREADY_EXISTS, the same ResourceInfo: explaind's
    store on a request inserted twice), and GetOperation answers operations/first running."""

    def __init__(self, answer_s: float, *, racing: bool = False) -> None:
        self.answer_s = answer_s
        self.racing = racing
        self.lookups_left_s: list[float] = []

    @staticmethod
    def _abort(context, code: grpc.StatusCode, message: str, *details) -> None:
        from google.rpc import status_pb2

        status = status_pb2.Status(code=code.value[0], message=message)
        for detail in details:
            status.details.add().Pack(detail)
        context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
        context.abort(code, message)

    def EvaluateSampleSet(self, request, context):
        from google.rpc import error_details_pb2

        time.sleep(self.answer_s)
        operation = error_details_pb2.ResourceInfo(resource_type="type.googleapis.com/google.longrunning.Operation", resource_name="operations/first")
        if self.racing:
            message = f"request_id: request_id {request.request_id} was given to operations/first"
            self._abort(context, grpc.StatusCode.ALREADY_EXISTS, message,
                        error_details_pb2.ErrorInfo(reason="ALREADY_EXISTS", domain="explaind.v1", metadata={"field": "request_id"}), operation)
        message = f"request_id: request_id {request.request_id} was sent with another request, which created operations/first"
        self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, message,
                    error_details_pb2.BadRequest(field_violations=[{"field": "request_id", "description": message}]), operation)

    def GetOperation(self, request, context):
        from google.protobuf import duration_pb2
        from google.rpc import error_details_pb2

        self.lookups_left_s.append(context.time_remaining())
        if self.racing:
            return operations_pb2.GetOperationResponse(operation=_running_operation(request.name))
        self._abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down",
                    error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=50_000_000)))


def test_a_reused_request_id_s_error_waits_for_one_look_at_its_operation_within_the_call_s_deadline():
    # The SDK read the operation a reused request_id's error names with a call of its own,
    # with the client's whole timeout and retried on UNAVAILABLE: a server restarting just
    # after refusing the id held the caller's INVALID_ARGUMENT back for up to that timeout
    # again, for a lookup whose failure it then dropped.
    from explaind.client import InvalidArgumentError

    refusing = _RefusingAReusedRequestId(answer_s=1.0)

    def add(servicer, server: grpc.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        operations_pb2_grpc.add_OperationsServiceServicer_to_server(servicer, server)

    server, target = _serve(refusing, add=add)
    try:
        with Client(target, timeout=5) as client, pytest.raises(InvalidArgumentError, match="was sent with another request") as caught:
            client.evaluate_sample_set("s", request_id="123e4567-e89b-42d3-a456-426614174000")
    finally:
        server.stop(0)
    assert (caught.value.field, caught.value.operation) == ("request_id", None)  # not read: the error as the server sent it
    assert len(refusing.lookups_left_s) == 1, refusing.lookups_left_s  # looked up once, not retried
    assert refusing.lookups_left_s[0] <= 4.0  # what the call had left of its 5 s, not 5 s more


def _closing_before_the_lookup(monkeypatch, close: Callable[[], object]) -> None:
    """Has ``close`` run as a refusal naming an operation has come, before the SDK looks
    the operation up: a client closed by another thread (or task) between the two."""
    from explaind.client import _client

    def named_then_closed(error):
        close()
        return named_operation(error)

    named_operation = _client.named_operation
    monkeypatch.setattr(_client, "named_operation", named_then_closed)


def _serve_a_reused_request_id_s_refusal(*, racing: bool = False) -> tuple[grpc.Server, str, _RefusingAReusedRequestId]:
    refusing = _RefusingAReusedRequestId(answer_s=0.0, racing=racing)

    def add(servicer, server: grpc.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        operations_pb2_grpc.add_OperationsServiceServicer_to_server(servicer, server)

    return (*_serve(refusing, add=add), refusing)


def test_a_reused_request_id_s_error_is_raised_as_it_came_by_a_client_closed_before_its_operation_is_looked_up(monkeypatch):
    # The lookup of the operation the error names met the closed client's ValueError, which
    # was raised instead of the InvalidArgumentError the call got.
    from explaind.client import InvalidArgumentError

    server, target, refusing = _serve_a_reused_request_id_s_refusal()
    try:
        with Client(target, timeout=5) as client:
            _closing_before_the_lookup(monkeypatch, client.close)
            with pytest.raises(InvalidArgumentError, match="was sent with another request") as caught:
                client.evaluate_sample_set("s", request_id="123e4567-e89b-42d3-a456-426614174000")
    finally:
        server.stop(0)
    assert (caught.value.field, caught.value.operation, refusing.lookups_left_s) == ("request_id", None, [])


def test_a_request_id_s_already_exists_names_its_operation_as_a_reused_one_does():
    # An ALREADY_EXISTS on request_id carries the ResourceInfo a reused id's
    # INVALID_ARGUMENT has (the store's, for a request inserted twice; no second server
    # process can take the id: the data dir's lock keeps it out); the SDK reads it alike.
    from explaind.client import AlreadyExistsError

    server, target, refusing = _serve_a_reused_request_id_s_refusal(racing=True)
    try:
        with Client(target, timeout=5) as client, pytest.raises(AlreadyExistsError, match="was given to operations/first") as caught:
            client.evaluate_sample_set("s", request_id="123e4567-e89b-42d3-a456-426614174000")
    finally:
        server.stop(0)
    assert caught.value.field == "request_id" and len(refusing.lookups_left_s) == 1
    assert caught.value.operation is not None and (caught.value.operation.name, caught.value.operation.state) == ("operations/first", "running")


def test_an_upload_run_again_with_its_request_id_stores_each_image_once(client):
    # A pipeline that restarted could only upload again: a second set, or samples twice.
    import uuid

    images = [np.full((8, 8, 3), value, np.uint8) for value in range(5)]
    upload = uuid.uuid4()
    created = [client.create_sample_set(images, ["heart"] * 5, chunk_size=2, request_id=upload) for _ in range(2)]  # 3 requests each
    assert created[0].sample_set_id == created[1].sample_set_id and created[1].sample_count == 5
    set_id = created[0].sample_set_id
    again = uuid.uuid4()  # an id names one upload: the create's is refused here (INVALID_ARGUMENT)
    appended = [client.append_samples(set_id, images[:3], ["star"] * 3, chunk_size=2, request_id=str(again).upper()) for _ in range(2)]
    assert appended[1].sample_count == 8 and appended[1].class_counts == appended[0].class_counts  # appended once...
    assert client.append_samples(set_id, images[:3], ["star"] * 3, chunk_size=2).sample_count == 11  # ...as a new upload is
    pixels = [sample.image.getpixel((0, 0))[0] for sample in client.samples(set_id)]
    assert pixels == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2]


def test_a_failed_run_of_an_upload_with_its_request_id_leaves_its_set_to_other_runs_only_where_they_share_it():
    # A server honouring the upload's request ids gives its runs one set, which a failed run
    # keeps for the others; an older one gives each run its own, deleted as before.
    import uuid

    def interrupted_at_5():
        yield from np.zeros((5, 4, 4, 3), np.uint8)
        raise KeyboardInterrupt

    for capabilities, kept in ((("request_id", "sample_set_request_id"), True), (("request_id",), False)):
        servicer = _UploadServer(capabilities, set())
        server, target = _serve_uploads(servicer)
        try:
            with Client(target, timeout=30) as client, pytest.raises(KeyboardInterrupt) as caught:
                client.create_sample_set(interrupted_at_5(), [0] * 8, sample_set_id="up", chunk_size=2, request_id=uuid.uuid4())
        finally:
            server.stop(0)
        assert ("up" in servicer.labels) == kept and servicer.uploading == ({"up"} if kept else set())
        assert ("'up' was kept, not deleted" in caught.value.__notes__[-1]) == kept


@pytest.mark.parametrize("error, kept", [(OSError(5, "Input/output error"), True), (TimeoutError("the pipeline's alarm"), True),
                                          (FileNotFoundError(2, "No such file or directory"), False),
                                          (PermissionError(13, "Permission denied"), False),
                                          (UnavailableError("the server at its label lookup"), True),
                                          (grpc.FutureCancelledError(), True)])
def test_a_transient_error_reading_an_upload_leaves_its_set_to_other_runs_and_a_lasting_one_deletes_it(error, kept):
    # Every error reading the images counted as one every run meets: an EIO of a network
    # mount in one run deleted the set another run, reading the same files, was filling.
    # Reading a chunk may call the server too (a label's name resolved with the model's
    # class names), which an outage or an abandoned AsyncClient call fails: not the images.
    import uuid

    def images():
        yield from np.zeros((5, 4, 4, 3), np.uint8)
        raise error

    servicer = _UploadServer(("request_id", "sample_set_request_id"), set())
    server, target = _serve_uploads(servicer)
    try:
        with Client(target, timeout=30) as client, pytest.raises(type(error)):
            client.create_sample_set(images(), [0] * 8, sample_set_id="up", chunk_size=2, request_id=uuid.uuid4())
    finally:
        server.stop(0)
    assert servicer.uploading == ({"up"} if kept else set()) and ("up" in servicer.labels) == kept


def test_an_upload_run_again_with_its_request_id_that_fails_keeps_the_set_an_earlier_run_finished(client):
    # The re-run's create got the finished set of the first run; a later request that
    # failed (other images under the same request_id, or a Ctrl-C) then deleted that set
    # as if this run had uploaded it partly.
    import uuid

    from explaind.client import InvalidArgumentError

    images = [np.full((8, 8, 3), value, np.uint8) for value in range(5)]
    upload = uuid.uuid4()
    first = client.create_sample_set(images, ["heart"] * 5, sample_set_id="finished-before", chunk_size=2, request_id=upload)
    changed = [*images[:2], np.full((8, 8, 3), 99, np.uint8), *images[3:]]  # the first request is as before, the second not
    with pytest.raises(InvalidArgumentError) as caught:
        client.create_sample_set(changed, ["heart"] * 5, sample_set_id="finished-before", chunk_size=2, request_id=upload)
    notes = "\n".join(caught.value.__notes__)
    assert caught.value.field == "request_id" and str(upload) not in caught.value.details  # the server names the derived id...
    assert f"request 2 of this create_sample_set differs from the one sent before under request_id {upload}" in notes  # ...the SDK the caller's
    finished = "'finished-before' was kept as an earlier run of this upload (its request_id) finished it, with 5 samples"
    assert finished in notes  # not "kept, not deleted: a run ... continues it", of a set no run has left to do

    def interrupted():
        yield from images[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.create_sample_set(interrupted(), ["heart"] * 5, sample_set_id="finished-before", chunk_size=2, request_id=upload)
    kept = client.sample_set("finished-before")
    assert (kept.uid, kept.sample_count, kept.uploading) == (first.uid, 5, False)
    client.delete_sample_set("finished-before")


def test_two_runs_of_one_upload_at_once_fill_one_set_and_the_failure_of_one_leaves_it_to_the_other(client):
    # A pipeline retried by its scheduler while its first attempt still ran: both runs
    # share the set (same request_id), and the one that failed (a Ctrl-C)
    # deleted it as its own partial upload, under the other, which then failed NOT_FOUND
    # or returned the id of a set no longer there.
    import threading
    import uuid

    images = [np.full((8, 8, 3), value, np.uint8) for value in range(8)]  # chunk_size 2: 4 requests

    def run(upload, set_id, at_image_6=None):
        def images_read():
            for index, image in enumerate(images):
                if index == 6 and at_image_6:  # this run's CreateSampleSet has been answered
                    at_image_6()
                yield image

        return client.create_sample_set(images_read(), ["heart"] * 8, sample_set_id=set_id, chunk_size=2, request_id=upload)

    def check(finished, set_id):
        kept = client.sample_set(set_id)
        assert (kept.uid, kept.sample_count, kept.uploading) == (finished.uid, 8, False)
        assert [sample.image.getpixel((0, 0))[0] for sample in client.samples(set_id)] == list(range(8))  # each image once
        client.delete_sample_set(set_id)

    # The other run finished the set before this one failed.
    upload, other = uuid.uuid4(), {}

    def finish_other_then_fail():
        other["set"] = run(upload, "raced-finished")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        run(upload, "raced-finished", finish_other_then_fail)
    assert "'raced-finished' was kept" in "\n".join(caught.value.__notes__)
    check(other["set"], "raced-finished")

    # The other run was still filling the set when this one failed.
    upload, other, waiting, failed = uuid.uuid4(), {}, threading.Event(), threading.Event()

    def other_run():
        try:
            other["set"] = run(upload, "raced-filling", lambda: (waiting.set(), failed.wait(30)))
        except BaseException as error:  # noqa: BLE001 - checked below
            other["error"] = error
            waiting.set()

    def start_other_then_fail():
        thread.start()
        assert waiting.wait(30)
        raise KeyboardInterrupt

    thread = threading.Thread(target=other_run)
    with pytest.raises(KeyboardInterrupt) as caught:
        run(upload, "raced-filling", start_other_then_fail)
    failed.set()
    thread.join(60)
    assert "error" not in other, other.get("error")
    assert "'raced-filling' was kept" in "\n".join(caught.value.__notes__)
    check(other["set"], "raced-filling")


def test_a_failed_run_of_an_upload_with_its_request_id_does_not_say_it_kept_a_set_deleted_under_it(client):
    # The set was deleted (by another client, or the idle sweep) while this run uploaded to
    # it: its next request failed NOT_FOUND, and the note said the set "was kept, not
    # deleted" for a run under the same request_id to continue, of a set not there.
    import uuid

    from explaind.client import NotFoundError

    def images():
        for index in range(10):
            if index == 8:  # read ahead of the requests: the create and an append have been answered
                client.delete_sample_set("deleted-under-it")
            yield IMAGE

    with pytest.raises(NotFoundError) as caught:
        client.create_sample_set(images(), ["heart"] * 10, sample_set_id="deleted-under-it", chunk_size=2, request_id=uuid.uuid4())
    notes = "\n".join(caught.value.__notes__)
    assert "was kept" not in notes and "'deleted-under-it' was deleted meanwhile, not by this run" in notes


def test_a_failed_upload_never_deletes_a_set_another_client_made_under_its_id_meanwhile(client, tmp_path):
    # The delete names the set this upload created by its uid: by its id alone it would
    # delete the set another client made under that id since.
    paths = _png_files(tmp_path, 10)

    def images():
        for index, path in enumerate(paths):
            if index == 8:  # read ahead: the create and an append have been answered
                client.delete_sample_set("taken-over")
                client.create_sample_set([IMAGE], [0], sample_set_id="taken-over")  # another client's
                raise FileNotFoundError(2, "No such file or directory", str(path))
            yield path

    with pytest.raises(FileNotFoundError) as caught:
        client.create_sample_set(images(), [0] * 10, sample_set_id="taken-over", chunk_size=2)
    assert "the partly uploaded sample set 'taken-over' was deleted meanwhile, not by this upload" in caught.value.__notes__[-1]
    assert client.sample_set("taken-over").sample_count == 1
    client.delete_sample_set("taken-over")


def test_a_named_upload_whose_image_the_server_refused_is_deleted_and_runs_again_with_any_request_id(client):
    # The server refuses that request to every run of the upload (same request_id, same
    # images): keeping the set for "another run to continue" left it uploading under its id,
    # and the upload run again with the image fixed under a new request_id (or none, as the
    # CLI's default) failed ALREADY_EXISTS until the set was deleted or swept.
    import io
    import uuid

    from PIL import Image

    from explaind.client import AlreadyExistsError, InvalidArgumentError, NotFoundError

    def png(value):
        encoded = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(encoded, "PNG")
        return encoded.getvalue()

    good = [png(value) for value in range(6)]
    bad = good[:4] + [b"not an image"] + good[5:]
    with pytest.raises(InvalidArgumentError) as refused:
        client.create_sample_set(bad, [0] * 6, sample_set_id="refused-image", chunk_size=2, request_id=uuid.uuid4())
    assert "the partly uploaded sample set 'refused-image' was deleted" in refused.value.__notes__[-1]
    with pytest.raises(NotFoundError):
        client.sample_set("refused-image")
    try:
        fixed = client.create_sample_set(good, [0] * 6, sample_set_id="refused-image", chunk_size=2, request_id=uuid.uuid4())
    except AlreadyExistsError as error:
        pytest.fail(f"the failed run left its set: {error}")
    assert (fixed.sample_count, fixed.uploading) == (6, False)
    client.delete_sample_set("refused-image")


@pytest.mark.parametrize("failure", ["unreadable file", "fewer images than labels"])
def test_a_named_upload_that_cannot_read_its_images_deletes_its_set_and_runs_again_with_any_request_id(client, tmp_path, failure):
    # Like an image the server refuses, one this process cannot read (or images fewer than
    # the labels) fails every run of the upload alike: keeping the set for "another run to
    # continue" left it uploading, and the upload run again fixed under a new request_id
    # (or none) failed ALREADY_EXISTS until the set was deleted or swept.
    import uuid

    from explaind.client import AlreadyExistsError, NotFoundError

    paths = _png_files(tmp_path, 10)

    def images():  # read a request ahead: image 8 once the create and an append are answered
        yield from paths[:8]
        if failure == "unreadable file":
            yield tmp_path / "gone.png"  # named by the caller, gone since
            yield from paths[9:]

    with pytest.raises(FileNotFoundError if failure == "unreadable file" else ValueError) as caught:
        client.create_sample_set(images(), [0] * 10, sample_set_id="unreadable", chunk_size=2, request_id=uuid.uuid4())
    assert "the partly uploaded sample set 'unreadable' was deleted" in caught.value.__notes__[-1]
    with pytest.raises(NotFoundError):
        client.sample_set("unreadable")
    try:
        fixed = client.create_sample_set(paths, [0] * 10, sample_set_id="unreadable", chunk_size=2, request_id=uuid.uuid4())
    except AlreadyExistsError as error:
        pytest.fail(f"the failed run left its set: {error}")
    assert (fixed.sample_count, fixed.uploading) == (10, False)
    client.delete_sample_set("unreadable")


class _HangingUploadServer(_UploadServer):
    """An _UploadServer that stops answering (each call hangs) once ``hang`` is set, and
    records each call it then got: its method, and the time it had left (s)."""

    hang = False

    def __init__(self, capabilities: tuple[str, ...], drop: set[str]) -> None:
        super().__init__(capabilities, drop)
        self.hung: list[tuple[str, float]] = []

    def _hang(self, method: str, context) -> None:
        if self.hang:
            self.hung.append((method, context.time_remaining()))
            time.sleep(10)

    def GetModelMetadata(self, request, context):
        self._hang("GetModelMetadata", context)
        return super().GetModelMetadata(request, context)

    def CreateSampleSet(self, request, context):
        self._hang("CreateSampleSet", context)
        return super().CreateSampleSet(request, context)

    def AppendSamples(self, request, context):
        self._hang("AppendSamples", context)
        return super().AppendSamples(request, context)

    def DeleteSampleSet(self, request, context):
        self._hang("DeleteSampleSet", context)
        return super().DeleteSampleSet(request, context)

    def GetSampleSet(self, request, context):
        from explaind.v1 import sample_sets_pb2

        self._hang("GetSampleSet", context)
        return sample_sets_pb2.GetSampleSetResponse(sample_set=self._answer("GetSampleSet", request.sample_set_id, context))


def test_a_failed_upload_with_its_request_id_waits_out_one_timeout_for_a_server_that_stopped_answering():
    # Its cleanup asked the server's capabilities (a timeout without an answer), then sent
    # the delete (a second timeout): a Ctrl-C blocked for twice the Client's timeout.
    import uuid

    from concurrent.futures import ThreadPoolExecutor

    servicer = _HangingUploadServer(("request_id", "sample_set_request_id"), set())
    server = grpc.server(ThreadPoolExecutor(8))
    sample_sets_pb2_grpc.add_SampleSetServiceServicer_to_server(servicer, server)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()

    def images():
        for index in range(10):
            if index == 8:  # read ahead: the create and an append have been answered
                servicer.hang = True
                raise KeyboardInterrupt
            yield np.zeros((4, 4, 3), np.uint8)

    try:
        with Client(target, timeout=2) as client, pytest.raises(KeyboardInterrupt) as caught:
            client.create_sample_set(images(), [0] * 10, sample_set_id="hung", chunk_size=2, request_id=uuid.uuid4())
    finally:
        server.stop(0)
    # One timeout of 2 s, not two: after the interrupt, one call (the capability query),
    # given the client's timeout (gRPC rounds the deadline it sends up by a few ms).
    assert [method for method, _ in servicer.hung] == ["GetModelMetadata"] and servicer.hung[0][1] <= 2.1, servicer.hung
    assert re.fullmatch(r"sample set 'hung' was left with 4 of 10 samples, uploading: the server did not answer \(DEADLINE_EXCEEDED\); .*",
                        caught.value.__notes__[-1])


def test_an_upload_whose_first_answer_was_lost_says_the_set_may_stay_uploading():
    # An older server (no upload request ids: not sent again) applied the create and its
    # answer was lost: the set stays uploading, and the error said nothing of it (only a
    # Ctrl-C did).
    from explaind.client import UnavailableError

    servicer = _UploadServer(("request_id",), {"CreateSampleSet"})
    server, target = _serve_uploads(servicer)
    try:
        with Client(target, timeout=5) as client, pytest.raises(UnavailableError) as caught:
            client.create_sample_set(np.zeros((4, 4, 4, 3), np.uint8), [0] * 4, sample_set_id="lost", chunk_size=2)
    finally:
        server.stop(0)
    assert servicer.uploading == {"lost"}
    assert caught.value.__notes__[-1].startswith("if the server created the set before this, it stays uploading")


class _OverloadedUploadServer(_UploadServer):
    """An _UploadServer whose GetModelMetadata is RESOURCE_EXHAUSTED once ``overloaded`` is set."""

    overloaded = False

    def GetModelMetadata(self, request, context):
        if self.overloaded:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls")
        return super().GetModelMetadata(request, context)


def test_a_failed_upload_with_its_request_id_leaves_its_set_when_the_server_does_not_say_whether_runs_share_it():
    # A capability check refused (an overloaded server) read as "runs do not share sets":
    # the set was deleted, under another run of the upload that may be filling it.
    import uuid

    servicer = _OverloadedUploadServer(("request_id", "sample_set_request_id"), set())
    server, target = _serve_uploads(servicer)

    def images():
        for index in range(10):
            if index == 8:  # read ahead: the create and an append have been answered
                servicer.overloaded = True
                raise KeyboardInterrupt
            yield np.zeros((4, 4, 3), np.uint8)

    try:
        with Client(target, timeout=5) as client, pytest.raises(KeyboardInterrupt) as caught:
            client.create_sample_set(images(), [0] * 10, sample_set_id="overloaded", chunk_size=2, request_id=uuid.uuid4())
    finally:
        server.stop(0)
    assert servicer.uploading == {"overloaded"}
    assert re.fullmatch(r"sample set 'overloaded' was left with 4 of 10 samples, uploading: the server did not say whether other runs of "
                        r"this upload share it \(RESOURCE_EXHAUSTED\); .*", caught.value.__notes__[-1])


def test_a_run_of_an_upload_refused_for_reusing_its_request_id_with_other_images_leaves_the_set_to_the_run_filling_it(client):
    # The refusal (INVALID_ARGUMENT, field request_id) says the set is another run's, and
    # says nothing of that run's images: deleting it pulled the set from under that run.
    import uuid

    from explaind.client import InvalidArgumentError

    images = [np.full((8, 8, 3), value, np.uint8) for value in range(8)]
    upload = uuid.uuid4()

    def interrupted_at(index, given):
        yield from given[:index]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the first run: stopped once its create and an append were applied
        client.create_sample_set(interrupted_at(8, images), [0] * 8, sample_set_id="reused-id", chunk_size=2, request_id=upload)
    assert client.sample_set("reused-id").sample_count == 4
    other_images = [*images[:2], np.full((8, 8, 3), 99, np.uint8), *images[3:]]  # request 2 differs
    with pytest.raises(InvalidArgumentError) as refused:
        client.create_sample_set(other_images, [0] * 8, sample_set_id="reused-id", chunk_size=2, request_id=upload)
    assert refused.value.field == "request_id"
    assert "'reused-id' was kept, not deleted" in "\n".join(refused.value.__notes__)
    continued = client.create_sample_set(images, [0] * 8, sample_set_id="reused-id", chunk_size=2, request_id=upload)  # the first, run again
    assert (continued.sample_count, continued.uploading) == (8, False)
    assert [sample.image.getpixel((0, 0))[0] for sample in client.samples("reused-id")] == list(range(8))
    client.delete_sample_set("reused-id")


class _OverloadedAppendsServer(_UploadServer):
    """An _UploadServer whose second AppendSamples is RESOURCE_EXHAUSTED without a field
    (too many calls at once), as a server at its max_concurrent_rpcs refuses a call."""

    def __init__(self) -> None:
        super().__init__(("request_id", "sample_set_request_id"), set())
        self.appends = 0

    def AppendSamples(self, request, context):
        self.appends += 1
        if self.appends == 2:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls at once; retry later")
        return super().AppendSamples(request, context)


def test_an_upload_with_its_request_id_that_an_overloaded_server_refuses_leaves_its_set_to_other_runs():
    # Only the caller's sets at its samples limit (field samples) fail every run alike; a
    # server too busy for this run's request says nothing of the runs sharing its set.
    import uuid

    from explaind.client import ResourceExhaustedError

    servicer = _OverloadedAppendsServer()
    server, target = _serve_uploads(servicer)
    try:
        with Client(target, timeout=30) as client, pytest.raises(ResourceExhaustedError) as caught:
            client.create_sample_set(np.zeros((10, 4, 4, 3), np.uint8), [0] * 10, sample_set_id="busy", chunk_size=2, request_id=uuid.uuid4())
    finally:
        server.stop(0)
    assert servicer.uploading == {"busy"} and len(servicer.labels["busy"]) == 4
    assert "'busy' was kept, not deleted" in caught.value.__notes__[-1]

def test_the_methods_sent_with_a_request_id_take_one_and_are_not_read_only():
    from explaind.client._client import IDENTIFIED_METHODS, READ_ONLY_METHODS
    from explaind.v1 import neuroinspect_pb2, sample_sets_pb2

    services = {service.full_name: service for module in (inference_pb2, neuroinspect_pb2, sample_sets_pb2)
                for service in module.DESCRIPTOR.services_by_name.values()}
    for service, names in IDENTIFIED_METHODS.items():
        for name in names:  # a misspelt one would never be retried; one without the field, twice
            assert "request_id" in services[service].methods_by_name[name].input_type.fields_by_name, name
            assert name not in READ_ONLY_METHODS.get(service, ())


def test_a_call_starting_an_operation_is_sent_again_only_if_the_server_honours_request_id_when_it_is_sent(monkeypatch):
    # The capability was asked before the pause, not after: a server restarted into an
    # older release (request_id ignored) during that pause got the repeat, and started the
    # operation a second time.
    import types

    from explaind.client import UnavailableError
    from explaind.client import _client

    servicer = _EvaluatingServer(capable=True)

    def sleep(seconds: float) -> None:  # the pause before the repeat: the server is replaced
        servicer.capable = False
        time.sleep(seconds)

    monkeypatch.setattr(_client, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    server, target = _serve(servicer, add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        with Client(target, timeout=30) as client, pytest.raises(UnavailableError, match="Socket closed"):
            client.evaluate_sample_set("s")
    finally:
        server.stop(0)
    assert len(servicer.request_ids) == 1 and len(servicer.operations) == 1


def _evaluation(class_accuracy: dict[str, float]) -> Any:
    from explaind.client import Evaluation

    names = ["circle", "square", "heart"]
    return Evaluation(sample_set_id="s", model_version="v", sample_count=30, accuracy=0.5, class_accuracy=class_accuracy,
                      confusion_matrix=np.zeros((3, 3), np.int64), mistakes=[], class_names=names,
                      class_counts={name: 10 if name in class_accuracy else 0 for name in names})


def test_an_evaluation_of_cells_only_has_an_empty_matrix_and_counts_its_mistakes_all_the_same():
    # A classifier of 21k classes: the server sends the non-zero cells of its matrix, whose
    # 441M counts would be 3.5 GB here.
    from explaind.client._operations import _evaluation
    from explaind.v1 import inference_pb2

    names = [f"c{i}" for i in range(6000)]
    message = inference_pb2.EvaluateSampleSetResult(
        sample_set_id="s", model_version="v", sample_count=7, accuracy=3 / 7,
        per_class=[inference_pb2.ClassAccuracy(class_name=name) for name in names],
        confusion_cells=[inference_pb2.ConfusionCell(label=5999, predicted=2, count=3), inference_pb2.ConfusionCell(label=1, predicted=1, count=2),
                         inference_pb2.ConfusionCell(label=4, predicted=4, count=1), inference_pb2.ConfusionCell(label=0, predicted=3, count=1)])
    evaluation = _evaluation(message)
    assert evaluation.confusion_matrix.shape == (0, 0)
    assert evaluation.confusion_cells.tolist() == [[5999, 2, 3], [1, 1, 2], [4, 4, 1], [0, 3, 1]]
    assert evaluation.mistake_count == 4 and len(evaluation.class_names) == 6000
    # A matrix sent whole gives its cells too, in the server's order.
    dense = inference_pb2.EvaluateSampleSetResult(sample_count=5, accuracy=0.6, per_class=[inference_pb2.ClassAccuracy(class_name=n) for n in "abc"],
                                                  confusion_matrix=[1, 0, 2, 0, 0, 0, 0, 0, 2])
    evaluation = _evaluation(dense)
    assert evaluation.confusion_matrix.tolist() == [[1, 0, 2], [0, 0, 0], [0, 0, 2]]
    assert evaluation.confusion_cells.tolist() == [[0, 2, 2], [2, 2, 2], [0, 0, 1]] and evaluation.mistake_count == 2


def test_an_evaluation_names_its_worst_class_as_a_head_evaluation_does():
    evaluation = _evaluation({"circle": 0.9, "square": 0.4, "heart": 0.4})
    assert (evaluation.worst_class, evaluation.worst_class_accuracy) == ("square", 0.4)  # a tie: the first in class order
    assert _evaluation({"heart": 1.0}).worst_class == "heart"  # classes without samples are not candidates
    empty = _evaluation({})
    assert empty.worst_class == "" and np.isnan(empty.worst_class_accuracy)


def test_an_evaluations_class_without_samples_has_no_accuracy_and_is_not_its_worst_class():
    # Such a class's accuracy reads 0 in the message: taken as it is, it would be the
    # worst class of every evaluation of a set without all classes.
    from explaind.client._operations import _evaluation as evaluation_of

    per_class = [inference_pb2.ClassAccuracy(class_name=name, count=count, accuracy=accuracy)
                 for name, count, accuracy in (("circle", 10, 0.9), ("square", 0, 0.0), ("heart", 10, 0.4))]
    evaluation = evaluation_of(inference_pb2.EvaluateSampleSetResult(sample_count=20, accuracy=0.65, per_class=per_class))
    assert evaluation.class_accuracy == {"circle": 0.9, "heart": 0.4}
    assert evaluation.class_counts == {"circle": 10, "square": 0, "heart": 10}
    assert (evaluation.worst_class, evaluation.worst_class_accuracy) == ("heart", 0.4)


def _ranking(mistake_count: int) -> Any:
    from explaind.client import NeuronRanking, RankedNeuron

    neurons = [RankedNeuron(neuron=n, direction="excessive", insufficient_ratio=0.0, excessive_ratio=1.0 - n / 10, mean_omega=-0.2,
                            importance=0.87, top_classes=["square", "circle"], top_class_indices=[1, 0]) for n in range(4)]
    return NeuronRanking(sample_set_id="hearts", model_version="v", class_index=2, class_name="heart", solver="faithful",
                         sample_count=30, mistake_count=mistake_count, converged_count=mistake_count,
                         neurons=neurons if mistake_count else [], predicted_as={"circle": 5, "square": 3} if mistake_count else {})


def test_a_ranking_is_read_with_the_in_process_rankings_names():
    # README's in-process example reads ranking.neuron_ids: copied to the SDK it failed
    # with AttributeError; the in-process ranking answers to the SDK's mistake_count.
    import torch
    from torch import nn

    from explaind.methods.neuroinspect import MistakeNeuronRanker

    sdk = _ranking(8)
    assert sdk.neuron_ids == [0, 1, 2, 3] and _ranking(0).neuron_ids == []
    head = nn.Linear(6, 3)
    features, labels = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 3
    in_process = MistakeNeuronRanker(head).rank(features, labels, target_class=0, max_iterations=20)
    for ranking in (sdk, in_process):
        assert ranking.neuron_ids == [n.neuron for n in ranking.neurons] and ranking.mistake_count > 0
        assert all(isinstance(n.rank_ratio, float) for n in ranking.neurons) and ranking.solver == "faithful" and ranking.top_k in (0, 5)
    assert in_process.mistake_count == in_process.num_mistakes


def test_a_ranking_reads_as_the_cli_prints_it():
    import dataclasses

    lines = dataclasses.replace(_ranking(8), top_k=3).summary(limit=2).splitlines()
    assert lines[0] == "8 mistakes of heart in hearts; neurons ranked by share of mistakes in their top 3 (solver faithful):"
    assert lines[1:3] == ["  neuron  direction     insufficient  excessive  importance  top classes", "       0  excessive               0%       100%        0.87  square; circle"]
    assert lines[3].startswith("       1  excessive               0%        90%  ")
    few = ("only 8 mistakes: past the first neuron, a ranking of fewer than 10 changes with the mistakes drawn "
           "(docs/neuroinspect.md, How many mistakes a ranking needs)")
    assert lines[4:] == ["predicted as: circle 5, square 3; 8 of 8 counterfactuals flipped the prediction", few]
    # From 10 mistakes no caution: bench/ranking_stability.py's top 3 held in every resample from there.
    assert dataclasses.replace(_ranking(8), mistake_count=10).summary().splitlines()[-1].startswith("predicted as: ")
    alone = dataclasses.replace(_ranking(8), mistake_count=1, converged_count=1).summary().splitlines()
    assert alone[-1].startswith("only 1 mistake: past")
    # One reads as one, as the in-process ranking's summary: it said "1 mistakes", "1 of 1 counterfactuals".
    assert alone[0].startswith("1 mistake of heart in hearts; ") and alone[-2].endswith("; 1 of 1 counterfactual flipped the prediction")
    # A server too old to report top_k (0): no "top 5" it cannot know.
    lines = _ranking(8).summary(limit=1).splitlines()
    assert lines[0] == ("8 mistakes of heart in hearts; neurons ranked by share of mistakes in their top k "
                        "(solver faithful, k not reported by this server):")
    assert lines[1:] == ["  neuron  direction     insufficient  excessive  importance  top classes", "       0  excessive               0%       100%        0.87  square; circle",
                         "predicted as: circle 5, square 3; 8 of 8 counterfactuals flipped the prediction", few]
    assert len(_ranking(8).summary(limit=0).splitlines()) == 8  # every neuron, under the header
    # With stability asked for, a column before the top classes and a line saying what it is.
    stable = dataclasses.replace(_ranking(8), top_k=3, stability_resamples=200,
                                 neurons=[dataclasses.replace(n, stability=0.875) for n in _ranking(8).neurons])
    lines = stable.summary(limit=1).splitlines()
    assert lines[1:4] == ["  neuron  direction     insufficient  excessive  importance  stability  top classes",
                          "       0  excessive               0%       100%        0.87        88%  square; circle",
                          "stability: share of 200 bootstrap resamples of the mistakes whose own ranking has the neuron in its top 5"]
    # Fewer where the server's run time limit stopped them: said, with the number asked.
    assert dataclasses.replace(stable, stability_resamples=50, stability_resamples_requested=200).summary(limit=1).splitlines()[3] == (
        "stability: share of 50 bootstrap resamples (of 200 asked: a time limit stopped the rest) of the mistakes "
        "whose own ranking has the neuron in its top 5")
    assert _ranking(0).summary() == "no mistakes of heart in hearts (30 samples): nothing to explain"
    # Mistakes, but no neuron passed the cut: said, not a heading ending in a colon over nothing.
    assert dataclasses.replace(_ranking(8), top_k=3, neurons=[]).summary().splitlines()[1:] == [
        "  none passed the cut ratio", "predicted as: circle 5, square 3; 8 of 8 counterfactuals flipped the prediction", few]
    with pytest.raises(ValueError, match="limit must be 0"):
        _ranking(8).summary(limit=-1)


def test_a_ranking_shown_in_a_notebook_is_its_summary():
    # IPython showed a cell's ranking as its repr: some 2,200 characters on one line.
    from types import SimpleNamespace

    shown: list[str] = []
    _ranking(8)._repr_pretty_(SimpleNamespace(text=shown.append), False)
    assert shown == [_ranking(8).summary()]
    assert repr(_ranking(8)).startswith("NeuronRanking(sample_set_id='hearts'")


def test_a_head_version_shown_in_a_notebook_is_its_summary_line():
    # Each version with its two evaluations was a repr of some 900 characters: a list of a
    # few edits filled the cell.
    import datetime as dt
    from types import SimpleNamespace

    from explaind.client import HeadVersion

    evaluation = SimpleNamespace(accuracy=0.9)
    version = HeadVersion(version_id="v2", model_version="world+head.v2", parent_version_id="v1", method="constrain", class_name="heart",
                          neurons=[3, 7], description="", create_time=dt.datetime.now(dt.timezone.utc), active=True,
                          parent_evaluation=SimpleNamespace(accuracy=0.85), evaluation=evaluation)
    shown: list[str] = []
    version._repr_pretty_(SimpleNamespace(text=shown.append), False)
    assert shown == [version.summary()] == ["* v2 world+head.v2 constrain heart neurons [3, 7], accuracy 0.900 (was 0.850)"]


def test_a_run_of_an_upload_failing_on_no_image_of_its_own_leaves_the_set_to_a_run_filling_it(client, monkeypatch):
    # Any Exception in this process counted as "cannot read its images" (a failure every
    # run meets alike) and deleted the set: a TimeoutError that a pipeline's alarm raised
    # in a request (no word of the images, like a deadline) pulled the set from under the
    # other run of the upload filling it, which then failed FAILED_PRECONDITION.
    import threading
    import uuid

    from explaind.client import Client

    upload, other, waiting, failed = uuid.uuid4(), {}, threading.Event(), threading.Event()
    images = [np.full((8, 8, 3), value, np.uint8) for value in range(8)]

    def other_run():
        def images_read():
            for index, image in enumerate(images):
                if index == 6:
                    waiting.set()
                    failed.wait(30)
                yield image
        try:
            other["set"] = client.create_sample_set(images_read(), ["heart"] * 8, sample_set_id="alarmed", chunk_size=2, request_id=upload)
        except BaseException as error:  # noqa: BLE001 - checked below
            other["error"] = error
            waiting.set()

    calls = []
    real_call_at = Client._call_at

    def alarmed(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1 and threading.current_thread() is threading.main_thread():
            thread.start()
            assert waiting.wait(30)
            raise TimeoutError("the pipeline step's alarm")
        return real_call_at(self, *args, **kwargs)

    monkeypatch.setattr(Client, "_call_at", alarmed)
    thread = threading.Thread(target=other_run)
    with pytest.raises(TimeoutError) as caught:
        client.create_sample_set(images, ["heart"] * 8, sample_set_id="alarmed", chunk_size=2, request_id=upload)
    failed.set()
    thread.join(60)
    assert "error" not in other, other.get("error")
    assert "'alarmed' was kept" in "\n".join(caught.value.__notes__)
    kept = client.sample_set("alarmed")
    assert (kept.uid, kept.sample_count, kept.uploading) == (other["set"].uid, 8, False)
    client.delete_sample_set("alarmed")


def test_a_run_of_an_upload_that_cannot_read_an_image_keeps_the_set_another_run_finished_meanwhile(client, tmp_path):
    # Another run of the upload (same request_id) read the images and finished the set after
    # this run's create; then this run could not read a file (gone since, the other run's
    # pipeline cleaning up its input): it deleted the finished set the other run had returned.
    import uuid

    paths = _png_files(tmp_path, 8)
    upload, other = uuid.uuid4(), {}

    def images():
        for index, path in enumerate(paths):
            if index == 6:  # read ahead: this run's create has been answered
                other["set"] = client.create_sample_set(paths, [0] * 8, sample_set_id="finished-by-other", chunk_size=2, request_id=upload)
                for gone in paths[6:]:
                    gone.unlink()
            yield path

    with pytest.raises(FileNotFoundError) as caught:
        client.create_sample_set(images(), [0] * 8, sample_set_id="finished-by-other", chunk_size=2, request_id=upload)
    assert "'finished-by-other' was kept as another run of this upload (its request_id) finished it" in "\n".join(caught.value.__notes__)
    kept = client.sample_set("finished-by-other")
    assert (kept.uid, kept.sample_count, kept.uploading) == (other["set"].uid, 8, False)
    client.delete_sample_set("finished-by-other")


def test_a_run_of_an_upload_whose_set_another_run_deleted_does_not_say_no_run_of_it_did(client, tmp_path):
    # The other run (same request_id) could not read an image and deleted the set they
    # shared; this run's note said "deleted meanwhile, not by this upload (by another
    # client, or by a server restart)": it was this upload, under its other run.
    import uuid

    from explaind.client import ExplaindError

    paths = _png_files(tmp_path, 10)
    upload = uuid.uuid4()

    def images():
        for index, path in enumerate(paths):
            if index == 6:  # this run's create has been answered; the other run fails reading its image 8
                with pytest.raises(FileNotFoundError):
                    client.create_sample_set(iter(paths[:8] + [tmp_path / "gone.png"] + paths[9:]), [0] * 10, sample_set_id="shared-deleted",
                                             chunk_size=2, request_id=upload)
            yield path

    with pytest.raises(ExplaindError) as caught:
        client.create_sample_set(images(), [0] * 10, sample_set_id="shared-deleted", chunk_size=2, request_id=upload)
    notes = "\n".join(caught.value.__notes__)
    assert "was deleted meanwhile, not by this run (by another client, by another run of this upload under the same request_id" in notes


def test_visualizations_show_their_images_in_a_notebook():
    # A notebook cell ending in the result showed the dataclass repr: PIL reprs
    # ("<PIL.PngImagePlugin.PngImageFile image mode=RGB size=64x64 at 0x...>"), no image.
    import base64
    import dataclasses
    import io
    import re

    from PIL import Image

    from explaind.client import NeuronVisualization, NeuronVisualizations

    image = Image.new("RGB", (64, 64), (200, 10, 10))
    shown = NeuronVisualization(neuron=8, class_index=1, class_name="<b>square</b>", image=image, masked_image=image, activation=2.5,
                                logit=20.1, clip_similarity=0.2, core_relevance=0.1, mask_fraction=0.25)
    unread = dataclasses.replace(shown, neuron=21, image=None, masked_image=None)  # result(download=False)
    page = NeuronVisualizations(model_version="m.1", method="clip_illusion", steps=40, visualizations=[shown, unread])._repr_html_()
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == 2 and Image.open(io.BytesIO(base64.b64decode(sources[0]))).getpixel((0, 0)) == (200, 10, 10)
    assert "&lt;b&gt;square&lt;/b&gt;" in page and "<b>" not in page and "PIL" not in page
    assert page.count("<tr>") == 3 and "clip_illusion, 40 steps" in page


def test_a_notebook_s_table_of_visualizations_writes_out_control_characters_in_class_names_as_the_report_does():
    # A class name as the server's config wrote it, holding a right-to-left override and an
    # escape: the table and its images' alts showed them raw, reversing the text after it
    # ("gnp.sutcac" read as "cactus.png"), where the report's page and the CLI write them out.
    from PIL import Image

    from explaind.client import NeuronVisualization, NeuronVisualizations

    image = Image.new("RGB", (64, 64), (200, 10, 10))
    shown = NeuronVisualization(neuron=8, class_index=1, class_name="<i>\u202egnp.sutcac\x1b", image=image, masked_image=image,
                                activation=2.5, logit=20.1, clip_similarity=0.2, core_relevance=0.1, mask_fraction=0.25)
    page = NeuronVisualizations(model_version="m.1", method="clip_illusion", steps=40, visualizations=[shown])._repr_html_()
    assert "\u202e" not in page and "\x1b" not in page and "<i>" not in page
    assert page.count("&lt;i&gt;\\u202egnp.sutcac\\x1b") == 3  # its cell and its two images' alts


def test_a_notebook_s_table_of_visualizations_reads_aloud_as_the_report_s_tables_do():
    # The table had no name, its column headings no scope and its rows no heading: a screen
    # reader moving down the activations read "2.5" without the neuron of its row, where the
    # report's tables (test_client_report's check, the same here) name their neuron.
    # Its images had no alt at all: read out as "image", or as their file of base64.
    import dataclasses

    from PIL import Image
    from test_client_report import _parsed, _table_name_read_aloud

    from explaind.client import NeuronVisualization, NeuronVisualizations

    image = Image.new("RGB", (64, 64), (200, 10, 10))
    shown = NeuronVisualization(neuron=8, class_index=1, class_name="square's", image=image, masked_image=image, activation=2.5,
                                logit=20.1, clip_similarity=-0.5, core_relevance=0.1, mask_fraction=0.25)
    unread = dataclasses.replace(shown, neuron=21, image=None, masked_image=None, clip_similarity=0.5)  # result(download=False): no image
    result = NeuronVisualizations(model_version="m'1", method="clip_illusion", steps=40, visualizations=[shown, unread], epsilon=0.25)
    page = _parsed(result._repr_html_())
    (table,) = page.iter("table")
    assert _table_name_read_aloud(table) == "2 neurons visualised with clip_illusion, 40 steps (epsilon 0.25), against head m'1"
    assert [header.text for header in table.iter("th")] == [
        "neuron", "class", "activation", "logit", "CLIP similarity", "mask", "image", "masked", "8 !", "21"]
    # The report's words for the same images.
    assert [image.attrs["alt"] for image in page.iter("img")] == [
        "neuron 8, class square's: an image optimised to make the neuron fire",
        "neuron 8, class square's: the same image, the regions where the neuron fires little dimmed"]


def test_visualizations_whose_clip_similarity_plus_epsilon_is_not_positive_are_flagged_in_their_summary_and_notebook_table():
    # CLIP-Illusion's loss −(cos + ε)(α_n + γ l_c) rewards a lower activation where
    # cos + ε ≤ 0: such an image is meaningless, and nothing said so. One at exactly 0.
    import dataclasses
    import html

    from explaind.client import NeuronVisualization, NeuronVisualizations

    healthy = NeuronVisualization(neuron=8, class_index=1, class_name="square", image=None, masked_image=None, activation=2.5,
                                  logit=20.1, clip_similarity=0.2, core_relevance=0.1, mask_fraction=0.25)
    below, at_zero = dataclasses.replace(healthy, neuron=21, clip_similarity=-0.5), dataclasses.replace(healthy, neuron=34, clip_similarity=-0.25)
    result = NeuronVisualizations(model_version="m.1", method="clip_illusion", steps=40, visualizations=[healthy, below, at_zero],
                                  gamma=0.5, epsilon=0.25, learning_rate=9e-3, seed=7)
    assert result.flipped() == [below, at_zero]
    warning = ("warning: 2 of 3 images ended with clip_similarity + epsilon ≤ 0 (marked !): the loss rewarded a lower activation; "
               "raise epsilon (visualize_neurons(epsilon=...), explaind visualize --epsilon, or the server's [clip].illusion_epsilon)")
    assert result.summary().splitlines() == [
        "3 neurons visualised with clip_illusion, 40 steps (gamma 0.5, epsilon 0.25, learning rate 0.009, seed 7), against head m.1:",
        "neuron   8 as square: activation 2.500, logit 20.100, CLIP similarity 0.200, mask area 25%",
        "neuron  21 as square: activation 2.500, logit 20.100, CLIP similarity -0.500, mask area 25% !",
        "neuron  34 as square: activation 2.500, logit 20.100, CLIP similarity -0.250, mask area 25% !",
        warning,
    ]
    page = result._repr_html_()
    assert "<th scope='row'>8</th>" in page and "<th scope='row'>21 !</th>" in page and "<th scope='row'>34 !</th>" in page
    assert page.endswith(f"</table><p>{html.escape(warning)}</p>") and "(gamma 0.5, epsilon 0.25, learning rate 0.009, seed 7)" in page
    # With a larger ε, or none (another method, an older server), nothing is flagged.
    for healthy_result in (dataclasses.replace(result, epsilon=0.5 + 1 / 64), dataclasses.replace(result, method="no_clip", epsilon=None)):
        assert healthy_result.flipped() == [] and "!" not in healthy_result.summary() + healthy_result._repr_html_()
    # A server older than the echo sent none of the settings: none is shown, as before.
    older = dataclasses.replace(result, gamma=None, epsilon=None, learning_rate=None, seed=None)
    assert older.summary().splitlines()[0] == "3 neurons visualised with clip_illusion, 40 steps, against head m.1:"
    assert older._repr_html_().startswith("<p>clip_illusion, 40 steps, model m.1</p>") and older.flipped() == []


def test_an_append_cut_off_by_a_server_killed_mid_way_says_what_was_stored_and_its_request_id_run_again_appends_the_rest(server_factory):
    # The error said "the first 4 of 8 samples were appended", though the request that got
    # no answer may have been applied too, and said nothing of how to go on.
    import uuid

    from explaind.client import UnavailableError

    server = server_factory()
    images, labels = [np.full((8, 8, 3), value, np.uint8) for value in range(8)], ["heart"] * 8
    upload = uuid.UUID(int=1)
    with Client(server.target, timeout=2) as client:
        client.create_sample_set([IMAGE], ["star"], sample_set_id="cut")
        call, appends = client._call, []

        def killed_at_the_third_append(service, method, request, **kwargs):
            if method == "AppendSamples":
                appends.append(request)
                if len(appends) == 3:
                    server.kill()
            return call(service, method, request, **kwargs)

        client._call = killed_at_the_third_append
        with pytest.raises(UnavailableError) as cut:
            client.append_samples("cut", images, labels, chunk_size=2, request_id=upload)
    assert cut.value.__notes__[0].startswith(f"the call was tried once, the server at {server.target} unavailable then and for the ")
    assert cut.value.__notes__[-1] == (
        "the first 4 of 8 samples were appended to 'cut', and samples 4 to 5 may have been too (their request got no answer): "
        f"run this append_samples again under request_id {upload} (the CLI's --request-id; the same images and chunk_size) to append the rest: "
        "the requests the server applied are answered without appending again")
    server.start(same_ports=True)
    with Client(server.target, timeout=30) as client:
        assert client.sample_set("cut").sample_count == 1 + 4
        assert client.append_samples("cut", images, labels, chunk_size=2, request_id=upload).sample_count == 1 + 8
        assert [sample.image.getpixel((0, 0))[0] for sample in client.samples("cut")][1:] == list(range(8))


def test_an_append_whose_answer_was_lost_says_how_to_tell_what_was_appended():
    # Without a request_id it cannot be run again as it is: the set's count tells which samples it holds.
    from explaind.client import UnavailableError

    class LosingTheSecondAppend(_UploadServer):
        def AppendSamples(self, request, context):
            if [method for method, _ in self.calls].count("AppendSamples") == 1:
                self.drop.add("AppendSamples")
            return super().AppendSamples(request, context)

    servicer = LosingTheSecondAppend((), set())
    servicer.labels["lost"] = [0]
    server, target = _serve_uploads(servicer)
    try:
        with Client(target, timeout=30) as client, pytest.raises(UnavailableError) as lost:
            client.append_samples("lost", [IMAGE] * 6, [0] * 6, chunk_size=2)
    finally:
        server.stop(0)
    assert lost.value.__notes__[-1] == (
        "the first 2 of 6 samples were appended to 'lost', and samples 2 to 3 may have been too (their request got no answer): "
        "sample_set('lost').sample_count (explaind sample-set show lost) tells which; then append the rest "
        "(an append given a request_id, the CLI's --request-id, can be run again as it is instead)")
    assert len(servicer.labels["lost"]) == 1 + 4  # the lost answer's samples were appended


def test_an_async_upload_cut_off_says_what_it_left_and_what_to_do(client):
    # A create whose delete also found the server gone said "left with 4 of 6 samples", as
    # if the set stayed so; an append refused part way said how many, not what next.
    from explaind.client import ExplaindError, ResourceExhaustedError, UnavailableError

    def failing_at_the_second_append(remote: Client, error: ExplaindError) -> None:
        """``remote``'s second AppendSamples, and any delete, fail with ``error``."""
        call, appends = remote._call, []

        def failing(service, method, request, **kwargs):
            appends.append(method)
            if method == "DeleteSampleSet" or appends.count("AppendSamples") == 2:
                raise error
            return call(service, method, request, **kwargs)

        remote._call = failing  # type: ignore[method-assign]

    async def uploads() -> tuple[UnavailableError, ResourceExhaustedError]:
        async with AsyncClient(client.target, timeout=30) as remote:
            failing_at_the_second_append(remote.client, UnavailableError("Stream removed"))
            with pytest.raises(UnavailableError) as created:
                await remote.create_sample_set([IMAGE] * 6, [0] * 6, sample_set_id="async-cut", chunk_size=2)
        async with AsyncClient(client.target, timeout=30) as remote:
            await remote.create_sample_set([IMAGE], [0], sample_set_id="refused-part-way")
            failing_at_the_second_append(remote.client, ResourceExhaustedError("samples: over the caller's limit", field="samples"))
            with pytest.raises(ResourceExhaustedError) as appended:
                await remote.append_samples("refused-part-way", [IMAGE] * 6, [0] * 6, chunk_size=2)
        return created.value, appended.value

    created, appended = asyncio.run(uploads())
    assert str(created) == "UNAVAILABLE: Stream removed" and created.__notes__ == [
        "sample set 'async-cut' was left with 4 of 6 samples, uploading: its delete failed (UNAVAILABLE); jobs refuse it, and the "
        "server deletes it at its next start or after [server].upload_idle_timeout_s without a request (or delete the set); "
        "run the upload again once it is gone"]
    assert client.sample_set("async-cut").uploading
    client.delete_sample_set("async-cut")
    # The server answered: the failing request stored nothing.
    assert appended.__notes__[-1] == ("the first 2 of 6 samples were appended to 'refused-part-way': once what the error names is put "
                                      "right, append the rest (samples 2 on)")
    assert client.sample_set("refused-part-way").sample_count == 1 + 2


def test_a_head_edit_shown_in_a_notebook_is_its_summary_as_the_cli_prints_it():
    # Its repr held the version with both nested evaluations: some 1,500 characters.
    import dataclasses
    import datetime as dt
    from types import SimpleNamespace

    from explaind.client import HeadEdit, HeadEvaluation, HeadVersion

    def evaluation(accuracy: float, worst_group: str) -> HeadEvaluation:
        return HeadEvaluation(accuracy=accuracy, class_accuracy={"circle": 1.0, "heart": accuracy}, worst_class="heart",
                              worst_class_accuracy=accuracy, group_accuracy={"heart/grass": accuracy, worst_group: 0.5},
                              worst_group=worst_group, worst_group_accuracy=0.5)

    version = HeadVersion(version_id="v2", model_version="world+head.v2", parent_version_id="v1", method="constrain", class_name="heart",
                          neurons=[3, 7], description="", create_time=dt.datetime.now(dt.timezone.utc), active=False,
                          parent_evaluation=evaluation(0.75, "water"), evaluation=evaluation(0.875, "grass\x1b[2J"))
    edit = HeadEdit(version, best_epoch=4, epochs_run=6, validation_accuracy=[0.5] * 6)
    assert edit.summary().splitlines() == [
        "stored head version (best epoch 4 of 6; not served; explaind head-versions promote v2 serves it):",
        "  v2 world+head.v2 constrain heart neurons [3, 7], accuracy 0.875 (was 0.750)",
        "  worst class heart 0.750 -> heart 0.875",
        "  worst group water 0.500 -> grass\\x1b[2J 0.500",  # an attribute value as uploaded: its controls escaped
    ]
    shown: list[str] = []
    edit._repr_pretty_(SimpleNamespace(text=shown.append), False)
    assert shown == [edit.summary()]
    assert repr(edit).startswith("HeadEdit(version=HeadVersion(version_id='v2'")  # repr() keeps the fields, for logs
    # Its parent deleted since, a version read again has no parent_evaluation: its own
    # accuracy stays (the line lost it), with nothing to compare it to.
    orphan = HeadEdit(dataclasses.replace(version, parent_evaluation=None), best_epoch=4, epochs_run=6, validation_accuracy=[0.5] * 6)
    assert orphan.summary().splitlines() == [
        "stored head version (best epoch 4 of 6; not served; explaind head-versions promote v2 serves it):",
        "  v2 world+head.v2 constrain heart neurons [3, 7], accuracy 0.875",
    ]
    # A probability_ratio edit says the o it trained towards (auto computes one).
    towards = HeadEdit(dataclasses.replace(version, method="probability_ratio", parent_evaluation=None), best_epoch=4, epochs_run=6,
                       validation_accuracy=[0.5] * 6, target_ratio=123456.789)
    assert towards.summary().splitlines()[0] == (
        "stored head version (best epoch 4 of 6, towards probability ratio 1.235e+05; not served; explaind head-versions promote v2 serves it):")


def test_a_head_edit_summary_names_no_worst_class_or_group_where_all_tie():
    # Every class at 1.000 read "worst class circle 0.500 -> circle 1.000": the server names
    # the first of those tied (HeadEvaluation.worst_class, kept), no worse than the rest.
    import datetime as dt

    from explaind.client import HeadEdit, HeadEvaluation, HeadVersion

    def evaluation(circle: float, heart: float) -> HeadEvaluation:
        return HeadEvaluation(accuracy=(circle + heart) / 2, class_accuracy={"circle": circle, "heart": heart}, worst_class="circle",
                              worst_class_accuracy=min(circle, heart), group_accuracy={"circle/water": circle, "heart/grass": heart},
                              worst_group="circle/water", worst_group_accuracy=min(circle, heart))

    version = HeadVersion(version_id="v2", model_version="world+head.v2", parent_version_id="v1", method="constrain", class_name="circle",
                          neurons=[3], description="", create_time=dt.datetime.now(dt.timezone.utc), active=True,
                          parent_evaluation=evaluation(0.5, 1.0), evaluation=evaluation(1.0, 1.0))
    edit = HeadEdit(version, best_epoch=1, epochs_run=2, validation_accuracy=[1.0] * 2)
    assert edit.summary().splitlines()[2:] == ["  worst class circle 0.500 -> none: all 2 tie 1.000",
                                               "  worst group circle/water 0.500 -> none: all 2 tie 1.000"]
    assert version.evaluation.worst_class == "circle"  # the field keeps the server's choice


class _FakeClock:
    """``time`` for _operations: monotonic() stands still but for sleep(), which it records."""

    def __init__(self) -> None:
        self.now, self.pauses = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


class _SkippingClock(_FakeClock):
    """A _FakeClock that also runs with the real one: a retry loop against a real server,
    whose calls take time, still runs out of it, while its pauses cost no wall time."""

    def __init__(self) -> None:
        super().__init__()
        self.now -= time.monotonic()

    def monotonic(self) -> float:
        return self.now + time.monotonic()


def _skipping_sdk_clock(monkeypatch) -> _SkippingClock:
    """A :class:`_SkippingClock` standing in for the SDK's time (its calls and its
    operations' waits and watches): their retry pauses cost no wall time, and each call is
    given its full deadline (seconds), however slow a loaded machine answers."""
    from explaind.client import _client, _operations

    clock = _SkippingClock()
    for module in (_client, _operations):
        monkeypatch.setattr(module, "time", clock)
    return clock


def test_a_busy_server_answering_waits_at_once_is_polled_backing_off_to_at_most_two_seconds(monkeypatch):
    # A busy server answers each WaitOperation at once (its waiting slots all taken): the
    # SDK polls, doubling its pause from 0.1 s up to BUSY_WAIT_MAX_PAUSE_S, and asks each
    # wait for what is left of the caller's timeout, to the nanosecond.
    from explaind.client import _client, _operations
    from explaind.client._operations import Operation

    clock = _FakeClock()
    for module in (_client, _operations):  # the Client's pauses too (Client._pause)
        monkeypatch.setattr(module, "time", clock)
    asked = []

    class BusyServer:
        _retry = True
        _pause = staticmethod(Client._pause)

        def _call(self, service, method, request, **kwargs):
            asked.append(request.timeout.ToTimedelta().total_seconds())
            done = len(asked) == 9
            state = operations_pb2.OPERATION_STATE_SUCCEEDED if done else operations_pb2.OPERATION_STATE_RUNNING
            return operations_pb2.WaitOperationResponse(operation=_operation_message(request.name, done=done, state=state))

    operation = Operation(BusyServer(), _operation_message(state=operations_pb2.OPERATION_STATE_RUNNING))
    assert operation.wait(timeout=30.5).done and operation.state == "succeeded"
    assert clock.pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
    assert asked == pytest.approx([30.5 - sum(clock.pauses[:i]) for i in range(9)], abs=1e-5)


def test_a_busy_server_s_polling_starts_again_from_the_shortest_pause_after_a_wait_it_held(monkeypatch):
    # A wait the server held for its whole step found a waiting slot: a later answer at once
    # is a new spell of busyness, polled from BUSY_WAIT_MIN_PAUSE_S again, not from where the
    # last spell's backoff had got to.
    from explaind.client import _client, _operations
    from explaind.client._operations import Operation

    clock = _FakeClock()
    for module in (_client, _operations):
        monkeypatch.setattr(module, "time", clock)
    asked = []

    class BusyThenNotServer:
        _retry = True
        _pause = staticmethod(Client._pause)

        def _call(self, service, method, request, **kwargs):
            asked.append(request.timeout.ToTimedelta().total_seconds())
            if len(asked) == 4:  # held for the whole wait asked, a step of the wait's
                clock.now += asked[-1]
            done = len(asked) == 6
            state = operations_pb2.OPERATION_STATE_SUCCEEDED if done else operations_pb2.OPERATION_STATE_RUNNING
            return operations_pb2.WaitOperationResponse(operation=_operation_message(request.name, done=done, state=state))

    assert Operation(BusyThenNotServer(), _operation_message(state=operations_pb2.OPERATION_STATE_RUNNING)).wait(timeout=1000).done
    assert clock.pauses == pytest.approx([0.1, 0.2, 0.4, 0.1])


class _Stream:
    """A stand-in WatchOperation stream of ``updates``, which records its cancel."""

    def __init__(self, updates) -> None:
        self.updates, self.cancelled = updates, False

    def __iter__(self):
        for update in self.updates:
            yield operations_pb2.WatchOperationResponse(operation=update)

    def cancel(self) -> None:
        self.cancelled = True


def _png_bytes(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_watch_keeps_a_running_jobs_last_preview_until_it_ends_and_cancels_its_stream():
    # The server sends each preview once: an update without one keeps the last, and a job
    # that ended has none. A watch left early (or ended) closes its stream, which holds
    # one of the server's threads for streams.
    from explaind.client._operations import Operation

    running = operations_pb2.OPERATION_STATE_RUNNING
    updates = [_operation_message(state=running, progress=operations_pb2.Progress(step=1, total=4, preview_png=_png_bytes(2))),
               _operation_message(state=running, progress=operations_pb2.Progress(step=2, total=4)),
               _operation_message(state=running, progress=operations_pb2.Progress(step=3, total=4, preview_png=_png_bytes(3))),
               _operation_message(state=operations_pb2.OPERATION_STATE_SUCCEEDED, done=True, progress=operations_pb2.Progress(step=4, total=4))]
    streams = []
    client = SimpleNamespace(_stream=lambda *args, **kwargs: streams.append(_Stream(updates)) or streams[-1])
    operation = Operation(client, _operation_message(state=operations_pb2.OPERATION_STATE_QUEUED))
    previews = [(update.progress.step, update.progress.preview and update.progress.preview.size) for update in operation.watch()]
    assert previews == [(1, (2, 2)), (2, (2, 2)), (3, (3, 3)), (4, None)]
    assert len(streams) == 1 and streams[0].cancelled
    for update in Operation(client, _operation_message(state=running)).watch():
        break
    assert len(streams) == 2 and streams[1].cancelled


def test_an_operations_times_are_none_until_they_happen_and_its_artifacts_say_their_size():
    from explaind.client import Artifact
    from explaind.client._operations import Operation

    def at(seconds: int) -> timestamp_pb2.Timestamp:
        return timestamp_pb2.Timestamp(seconds=seconds)

    artifact = operations_pb2.Artifact(name="omega.npy", media_type="application/x-npy", digest="ab12", size_bytes=4096)
    queued = Operation(None, _operation_message(state=operations_pb2.OPERATION_STATE_QUEUED, create_time=at(60)))
    assert queued.create_time == dt.datetime(1970, 1, 1, 0, 1, tzinfo=dt.timezone.utc)
    assert queued.start_time is None and queued.end_time is None and queued.artifacts == []
    ended = Operation(None, _operation_message(state=operations_pb2.OPERATION_STATE_SUCCEEDED, done=True, create_time=at(60),
                                               start_time=at(120), end_time=at(180), artifacts=[artifact]))
    assert (ended.start_time, ended.end_time) == (dt.datetime(1970, 1, 1, 0, 2, tzinfo=dt.timezone.utc), dt.datetime(1970, 1, 1, 0, 3, tzinfo=dt.timezone.utc))
    assert ended.artifacts == [Artifact("omega.npy", "application/x-npy", "ab12", 4096)]


class _ArtifactServer:
    """A stand-in client for ``Operation.artifact``: the server's message limit is
    ``server_limit`` bytes (0: not said) and it sends at most ``cap`` bytes a response
    (fewer than asked, as a server with a smaller limit does); it records each range asked."""

    def __init__(self, content: bytes, *, server_limit: int, client_limit: int, cap: int) -> None:
        import hashlib

        from explaind.client._types import RequestLimits

        self.content, self.cap, self.asked = content, cap, []
        self.digest = hashlib.sha256(content).hexdigest()
        self._max_message_bytes = client_limit
        self._request_limits = lambda: RequestLimits(server_limit, 0, 0, 0)

    def _call(self, service, method, request, **kwargs):
        self.asked.append((request.offset, request.max_bytes))
        part = self.content[request.offset:request.offset + min(request.max_bytes, self.cap)]
        return operations_pb2.GetArtifactResponse(artifact=operations_pb2.Artifact(name=request.artifact, digest=self.digest, size_bytes=len(self.content)),
                                                  content=part)


@pytest.mark.parametrize(("server_limit", "client_limit", "range_bytes"), [
    (8192, 4 << 20, 4096),  # under 128 KiB: half the limit is left for the rest of the response
    (0, 200_000, 200_000 - 64 * 1024),  # the server does not say: the client's own limit
    (300_000, 200_000, 200_000 - 64 * 1024),  # the smaller of the two
    (64 << 20, 64 << 20, 2 << 20),  # ARTIFACT_RANGE_BYTES at most
])
def test_an_artifact_is_read_in_ranges_that_fit_both_sides_message_limits(server_limit, client_limit, range_bytes):
    from explaind.client._operations import Operation

    content = np.random.default_rng(0).integers(0, 256, 5 * 1024 * 1024 + 7, np.uint8).tobytes()
    server = _ArtifactServer(content, server_limit=server_limit, client_limit=client_limit, cap=range_bytes)
    assert Operation(server, _operation_message(done=True)).artifact("omega.npy") == content
    assert server.asked == [(offset, range_bytes) for offset in range(0, len(content), range_bytes)]


def test_an_artifact_sent_in_ranges_shorter_than_asked_is_read_whole_from_where_each_ended():
    from explaind.client._operations import Operation

    content = bytes(range(256)) * 40
    server = _ArtifactServer(content, server_limit=8192, client_limit=4 << 20, cap=1000)
    assert Operation(server, _operation_message(done=True)).artifact("omega.npy") == content
    assert [offset for offset, _ in server.asked] == list(range(0, len(content), 1000))


def test_a_cells_only_evaluation_counts_its_mistakes_from_an_accuracy_read_in_float64():
    # 10 samples, 9 right: 10 * (1 - 0.9) is 0.9999999999999998, which int() makes 0.
    from explaind.client._operations import _evaluation as evaluation_of

    message = inference_pb2.EvaluateSampleSetResult(sample_count=10, accuracy=9 / 10, per_class=[inference_pb2.ClassAccuracy(class_name="a", count=10)],
                                                    confusion_cells=[inference_pb2.ConfusionCell(label=0, predicted=0, count=9)])
    assert evaluation_of(message).mistake_count == 1


def test_a_progress_bar_on_a_terminal_shows_the_step_of_the_total_and_the_message(capsys, monkeypatch):
    import sys

    from explaind.client._operations import ProgressDisplay

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with ProgressDisplay("edit_head", unit="step") as display:
        display.show(3, 10, "running", "running: epoch 3")
    drawn = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert drawn.startswith("edit_head:  30%") and " 3/10 " in drawn and drawn.endswith(", running: epoch 3]"), drawn
    with ProgressDisplay("edit_head", unit="step") as display:  # an update of unknown total (0) keeps the total known
        display.show(3, 10, "running")
        display.show(4, 0, "running")
    drawn = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert drawn.startswith("edit_head:  40%") and " 4/10 " in drawn, drawn


def test_an_operations_repr_says_a_cancel_was_asked_only_while_it_runs():
    from explaind.client._operations import Operation

    running = Operation(None, _operation_message(kind="edit_head", state=operations_pb2.OPERATION_STATE_RUNNING, cancel_requested=True,
                                                 progress=operations_pb2.Progress(step=3, total=8)))
    assert repr(running) == "Operation('operations/x', kind='edit_head', state='running', progress=3/8, cancel_requested=True)"
    ended = Operation(None, _operation_message(kind="edit_head", state=operations_pb2.OPERATION_STATE_CANCELLED, done=True, cancel_requested=True))
    assert repr(ended) == "Operation('operations/x', kind='edit_head', state='cancelled', progress=0/0)"


def test_an_evaluations_cells_of_equal_count_keep_row_major_order_and_its_mistakes_their_fields():
    from explaind.client._operations import EvaluatedMistake, _evaluation as evaluation_of

    counts = np.random.default_rng(0).integers(1, 3, (7, 7))  # ties everywhere: an unstable sort reorders them
    message = inference_pb2.EvaluateSampleSetResult(
        sample_count=int(counts.sum()), per_class=[inference_pb2.ClassAccuracy(class_name=str(i), count=1) for i in range(7)],
        confusion_matrix=counts.ravel().tolist(), mistakes=[inference_pb2.Mistake(sample_index=12, label=3, predicted=5, probability=0.75)])
    evaluation = evaluation_of(message)
    cells = [(label, predicted, int(counts[label, predicted])) for label in range(7) for predicted in range(7)]
    assert evaluation.confusion_cells.tolist() == [list(cell) for cell in sorted(cells, key=lambda cell: -cell[2])]
    assert evaluation.mistakes == [EvaluatedMistake(sample_index=12, label=3, predicted_class=5, probability=0.75)]


def test_a_failed_jobs_error_of_another_code_names_the_field_its_error_info_names():
    # Not only INVALID_ARGUMENT's violations: a job whose sample set was deleted while it
    # was queued fails NOT_FOUND, its ErrorInfo naming sample_set_id.
    from google.rpc import error_details_pb2, status_pb2

    from explaind.client import NotFoundError, OperationError
    from explaind.client._operations import Operation

    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="NOT_FOUND", domain="explaind.v1", metadata={"field": "sample_set_id"}))
    status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="sample_set_id: no sample set 'hearts'", details=[info])
    with pytest.raises(NotFoundError) as raised:
        Operation(None, operations_lro.Operation(name="operations/x", done=True, error=status)).result()
    assert isinstance(raised.value, OperationError) and raised.value.field == "sample_set_id"


class _RefusedStream(_Stream):
    """A stand-in WatchOperation stream that fails with ``error`` before its first message."""

    def __init__(self, error: Exception) -> None:
        super().__init__([])
        self.error = error

    def __iter__(self):
        raise self.error


def test_a_watch_a_busy_server_has_no_stream_for_polls_it_until_the_job_ends(monkeypatch):
    # Every thread for streams taken (RESOURCE_EXHAUSTED): GetOperation every
    # WATCH_POLL_INTERVAL_S instead, each poll an update.
    from explaind.client import ResourceExhaustedError, _client, _operations
    from explaind.client._operations import Operation

    clock = _FakeClock()
    for module in (_client, _operations):  # the Client's pauses too (Client._pause)
        monkeypatch.setattr(module, "time", clock)
    polls = []

    class BusyServer:
        timeout, _retry = 30.0, True
        _pause = staticmethod(Client._pause)

        def _stream(self, *args, **kwargs):
            return _RefusedStream(ResourceExhaustedError("no thread for another stream"))

        def _call(self, service, method, request, **kwargs):
            polls.append(method)
            done = len(polls) == 3
            state = operations_pb2.OPERATION_STATE_SUCCEEDED if done else operations_pb2.OPERATION_STATE_RUNNING
            return operations_pb2.GetOperationResponse(operation=_operation_message(request.name, done=done, state=state,
                                                                                    progress=operations_pb2.Progress(step=len(polls), total=3)))

    operation = Operation(BusyServer(), _operation_message(state=operations_pb2.OPERATION_STATE_RUNNING))
    assert [(update.state, update.progress.step) for update in operation.watch(timeout=60)] == [("running", 1), ("running", 2), ("succeeded", 3)]
    assert polls == ["GetOperation"] * 3 and clock.pauses == [_operations.WATCH_POLL_INTERVAL_S] * 3


class _DroppingStreamsServer:
    """A stand-in client whose watch streams are ``streams`` in turn and whose GetOperation
    answers ``refreshed``, or raises it (an error) after retrying for the call's whole timeout."""

    timeout, _reached = 30.0, True
    _waits_out_unavailable = Client._waits_out_unavailable
    _pause = staticmethod(Client._pause)

    def __init__(self, clock: _FakeClock, streams: list, refreshed, *, retry: bool = True) -> None:
        self.clock, self.streams, self.refreshed, self._retry = clock, streams, refreshed, retry
        self.refreshes = 0

    def _stream(self, *args, **kwargs):
        return self.streams.pop(0)

    def _call(self, service, method, request, *, timeout, **kwargs):
        self.refreshes += 1
        assert self.refreshes <= 10, "refreshed past the watch's timeout"  # the clock stands still between them
        if isinstance(self.refreshed, Exception):
            self.clock.sleep(timeout)
            raise self.refreshed
        return operations_pb2.GetOperationResponse(operation=self.refreshed)


def test_a_watch_whose_stream_drops_refreshes_reopens_and_gives_up_at_its_own_timeout(monkeypatch):
    from explaind.client import ResourceExhaustedError, UnavailableError, _client, _operations
    from explaind.client._operations import Operation

    clock = _FakeClock()
    for module in (_client, _operations):  # the Client's pauses too (Client._pause)
        monkeypatch.setattr(module, "time", clock)
    running = _operation_message(state=operations_pb2.OPERATION_STATE_RUNNING)
    succeeded = _operation_message(done=True, state=operations_pb2.OPERATION_STATE_SUCCEEDED)
    # A stream dropped with the job still running: refreshed, then opened again after a pause.
    server = _DroppingStreamsServer(clock, [_RefusedStream(UnavailableError("restarting")), _Stream([succeeded])], running)
    assert [update.state for update in Operation(server, running).watch(timeout=60)] == ["running", "succeeded"]
    assert clock.pauses == [_operations.WATCH_REOPEN_PAUSE_S] and not server.streams
    # The server unavailable past the watch's own timeout: its error, once the refreshes have used the time up.
    clock.pauses.clear()
    server = _DroppingStreamsServer(clock, [_RefusedStream(UnavailableError("restarting"))], UnavailableError("restarting"))
    with pytest.raises(UnavailableError, match="restarting"):
        list(Operation(server, running).watch(timeout=60))
    assert sum(clock.pauses) == 60
    # A client that does not retry raises the dropped stream's error at once.
    clock.pauses.clear()
    server = _DroppingStreamsServer(clock, [_RefusedStream(UnavailableError("restarting"))], running, retry=False)
    with pytest.raises(UnavailableError, match="restarting"):
        list(Operation(server, running).watch(timeout=60))
    assert clock.pauses == []
    # Nor is a client that never reached the server (an operation built on a new one) refreshed:
    # unavailable from its first stream, it could be a wrong address.
    server = _DroppingStreamsServer(clock, [_RefusedStream(UnavailableError("restarting"))], running)
    server._reached = False
    with pytest.raises(UnavailableError, match="restarting"):
        list(Operation(server, running).watch(timeout=60))
    assert server.refreshes == 0 and clock.pauses == []
    # A busy server (no thread for a stream) is polled until the watch's timeout, the job still running.
    server = _DroppingStreamsServer(clock, [_RefusedStream(ResourceExhaustedError("no thread for another stream"))], running)
    operation = Operation(server, running)
    interval = _operations.WATCH_POLL_INTERVAL_S
    assert [update.state for update in operation.watch(timeout=2.5 * interval)] == ["running"] * 3 and not operation.done
    assert clock.pauses == [interval, interval, interval / 2]


def test_a_watch_whose_stream_the_server_ended_early_as_deadline_exceeded_raises_it():
    # Before the watch's own timeout a DEADLINE_EXCEEDED is the server's (or a proxy's):
    # ending the watch quietly read as the timeout having passed with the job still running.
    from explaind.client import DeadlineExceededError
    from explaind.client._operations import Operation

    client = SimpleNamespace(_stream=lambda *args, **kwargs: _RefusedStream(DeadlineExceededError("the proxy's stream timeout")))
    operation = Operation(client, _operation_message(state=operations_pb2.OPERATION_STATE_RUNNING))
    with pytest.raises(DeadlineExceededError, match="the proxy's stream timeout"):
        list(operation.watch(timeout=3600))


def test_the_result_of_an_operation_listed_without_its_response_is_read_from_the_server():
    # Client.operations lists ended operations without their results (a page of rankings
    # would not fit a message): result() fetches it.
    from explaind.client._operations import Operation

    evaluated = inference_pb2.EvaluateSampleSetResult(sample_set_id="hearts", sample_count=4, accuracy=0.75)
    asked = []

    class Server:
        def _call(self, service, method, request, **kwargs):
            asked.append(method)
            whole = _operation_message(request.name, done=True, state=operations_pb2.OPERATION_STATE_SUCCEEDED)
            whole.response.Pack(evaluated)
            return operations_pb2.GetOperationResponse(operation=whole)

    listed = Operation(Server(), _operation_message(done=True, state=operations_pb2.OPERATION_STATE_SUCCEEDED))
    result = listed.result()
    assert (result.sample_set_id, result.sample_count, result.accuracy) == ("hearts", 4, 0.75) and asked == ["GetOperation"]


def test_an_artifact_whose_bytes_do_not_match_its_digest_is_a_data_loss():
    from explaind.client import DataLossError
    from explaind.client._operations import Operation

    server = _ArtifactServer(b"omega", server_limit=8192, client_limit=4 << 20, cap=4096)
    server.digest = server.digest[::-1]
    with pytest.raises(DataLossError, match=r"^DATA_LOSS: artifact 'omega.npy' of operations/x does not match its digest "):
        Operation(server, _operation_message(done=True)).artifact("omega.npy")


def _ranking_with_omega(omega: np.ndarray) -> tuple[Any, _ArtifactServer]:
    """A finished ranking operation whose ω (``omega``) is its artifact on a stand-in
    server, which records the ranges asked: (operation, server)."""
    from explaind.client._operations import Operation
    from explaind.v1 import neuroinspect_pb2

    saved = io.BytesIO()
    np.save(saved, omega)
    server = _ArtifactServer(saved.getvalue(), server_limit=0, client_limit=4 << 20, cap=4 << 20)
    message = _operation_message(done=True, state=operations_pb2.OPERATION_STATE_SUCCEEDED)
    message.response.Pack(neuroinspect_pb2.NeuronRanking(class_name="heart", omega_artifact="omega.npy"))
    return Operation(server, message), server


def test_a_ranking_read_without_download_fetches_no_artifact_and_with_it_its_omega():
    # download=False is for a ranking whose ω is gigabytes: it must not be fetched.
    omega = np.arange(6, dtype=np.float32).reshape(2, 3)
    operation, server = _ranking_with_omega(omega)
    assert operation.result(download=False).omega is None and server.asked == []
    assert np.array_equal(operation.result().omega, omega) and server.asked == [(0, 2 << 20)]


@pytest.mark.parametrize(("answer", "note"), [
    (dict(state=operations_pb2.OPERATION_STATE_RUNNING, cancel_requested=True), "cancel requested for operations/x (running); it ends at its next check"),
    (dict(state=operations_pb2.OPERATION_STATE_CANCELLED, done=True), "cancelled operations/x"),
    # It ended as Ctrl-C came: "cancelled" sent the caller to submit again a job whose result was there.
    (dict(state=operations_pb2.OPERATION_STATE_SUCCEEDED, done=True), "operations/x had already finished (succeeded); nothing to cancel"),
    # Another run (another Client) asked for it under its request_id: the server left it running for that run's wait.
    (dict(state=operations_pb2.OPERATION_STATE_RUNNING, requested_by_another_run=True),
     "operations/x goes on (running): another run asked for it under its request_id too, whose wait cancelling it would end; its "
     "cancel() (explaind operations cancel operations/x) stops it"),
])
def test_ctrl_c_during_a_result_cancels_the_job_and_says_how_it_stands(monkeypatch, answer, note):
    from explaind.client._operations import Operation

    asked = []

    class Server:
        _run_id = "00000000-0000-4000-8000-00000000000a"

        def _call(self, service, method, request, **kwargs):
            asked.append((method, request.name, request.unless_asked_by_another_run_than))
            done = answer.get("done", False)
            fields = {key: value for key, value in answer.items() if key != "done"}
            return operations_pb2.CancelOperationResponse(operation=_operation_message(request.name, done=done, **fields))

    monkeypatch.setattr(Operation, "wait", lambda self, timeout=None: (_ for _ in ()).throw(KeyboardInterrupt()))
    operation = Operation(Server(), _operation_message(state=operations_pb2.OPERATION_STATE_RUNNING), retried=False)  # a start's
    with pytest.raises(KeyboardInterrupt) as interrupted:
        operation.result()
    assert asked == [("CancelOperation", "operations/x", Server._run_id)]  # unless another run asked for it
    assert interrupted.value.__notes__ == [note]
    # One fetched by name (client.operation) is no run's own: cancelled whoever asked for it, as before runs were told apart.
    asked.clear()
    with pytest.raises(KeyboardInterrupt):
        Operation(Server(), _operation_message(state=operations_pb2.OPERATION_STATE_RUNNING)).result()
    assert asked == [("CancelOperation", "operations/x", "")]
    # One a release before runs pickled (no _asked_by_this_run) is cancelled as that release did, not an AttributeError.
    asked.clear()
    state = dict(vars(Operation(Server(), _operation_message(state=operations_pb2.OPERATION_STATE_RUNNING), retried=False)))
    del state["_asked_by_this_run"]
    unpickled = Operation.__new__(Operation)  # as pickle builds it (the stand-in client itself cannot be pickled)
    Operation.__setstate__(unpickled, state)
    with pytest.raises(KeyboardInterrupt):
        unpickled.result()
    assert asked == [("CancelOperation", "operations/x", "")]


def test_a_client_unpickled_is_of_the_same_run():
    # An operation a client started, waited on in a spawn worker: a run of the worker's own would read as another run's,
    # whose Ctrl-C would leave the job running.
    # An AsyncClient's too: a start a worker's copy repeated under its request_id read as another run's.
    from explaind.client import AsyncClient, Client

    with Client("127.0.0.1:1") as client:
        assert pickle.loads(pickle.dumps(client))._run_id == client._run_id
    async_client = AsyncClient("127.0.0.1:1")
    assert pickle.loads(pickle.dumps(async_client)).client._run_id == async_client.client._run_id
    async_client._close()


def test_a_client_s_repr_names_its_server_and_state_never_its_token():
    # It was <explaind.client._client.Client object at 0x...>: a log naming no server.
    client = Client("127.0.0.1:1", timeout=5, token="s3cret")
    assert repr(client) == "Client('127.0.0.1:1', timeout=5)"
    client.close()
    assert repr(client) == repr(pickle.loads(pickle.dumps(client))) == "Client('127.0.0.1:1', timeout=5, closed=True)"
    with Client("127.0.0.1:1", tls=True) as secure:
        assert repr(secure) == "Client('127.0.0.1:1', timeout=30.0, tls=True)"
    async_client = AsyncClient("127.0.0.1:1", token="s3cret", max_workers=2, tls=True)
    assert repr(async_client) == "AsyncClient('127.0.0.1:1', timeout=30.0, tls=True, max_workers=2)"
    async_client._close()
    # closed last, as the Client's (it came before max_workers).
    assert repr(async_client) == "AsyncClient('127.0.0.1:1', timeout=30.0, tls=True, max_workers=2, closed=True)"


def test_a_rankings_fields_are_the_servers_each_in_its_place():
    from explaind.client import MistakeSummary, RankedNeuron
    from explaind.client._neuroinspect import ranking
    from explaind.v1 import common_pb2, neuroinspect_pb2 as ni

    omega = np.arange(6, dtype="<f4").reshape(2, 3)
    message = ni.NeuronRanking(
        sample_set_id="s", model_version="v", class_index=2, class_name="heart", solver="faithful", sample_count=30, mistake_count=6,
        converged_count=5, top_k=3, predicted_as={"circle": 2, "square": 4}, stability_resamples=40, stability_resamples_requested=200,
        omega=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[2, 3], data=omega.tobytes()),
        neurons=[ni.RankedNeuron(neuron=7, direction=ni.NEURON_DIRECTION_EXCESSIVE, insufficient_ratio=0.25, excessive_ratio=0.75,
                                 mean_omega=-0.5, importance=1.5, top_classes=[1, 0], top_class_names=["square", "circle"], stability=0.625)],
        mistakes=[ni.MistakeSummary(sample_index=4, predicted_class=1, converged=True, iterations=12, insufficient_neurons=[7, 3],
                                    excessive_neurons=[9], omega_l1=2.5)])
    read = ranking(message)
    assert (read.sample_set_id, read.model_version, read.class_index, read.class_name, read.solver) == ("s", "v", 2, "heart", "faithful")
    assert (read.sample_count, read.mistake_count, read.converged_count, read.top_k, read.stability_resamples) == (30, 6, 5, 3, 40)
    assert read.stability_resamples_requested == 200
    assert list(read.predicted_as.items()) == [("square", 4), ("circle", 2)]  # most first
    assert read.neurons == [RankedNeuron(7, "excessive", 0.25, 0.75, -0.5, 1.5, ["square", "circle"], [1, 0], 0.625)]
    assert read.neurons[0].rank_ratio == 0.75
    assert read.mistakes == [MistakeSummary(4, 1, True, 12, [7, 3], [9], 2.5)]
    assert read.omega.dtype == np.float32 and np.array_equal(read.omega, omega)


def test_a_rankings_classes_predicted_equally_often_are_listed_by_name_not_in_the_maps_order():
    # A few mistakes spread over classes tie in their counts: a proto map iterates in its
    # hash order, so summary() and the report listed them in an order of no meaning.
    from explaind.client._neuroinspect import ranking
    from explaind.v1 import neuroinspect_pb2 as ni

    names = [f"class {i:02d}" for i in range(20)]
    message = ni.NeuronRanking(mistake_count=21, predicted_as={name: 1 for name in names} | {"class 07": 2})
    parsed = ni.NeuronRanking.FromString(message.SerializeToString())
    assert list(ranking(parsed).predicted_as) == ["class 07", *(name for name in names if name != "class 07")]


def test_visualizations_fields_and_images_are_the_servers_each_in_its_place():
    from PIL import Image

    from explaind.client._neuroinspect import visualizations
    from explaind.v1 import neuroinspect_pb2 as ni

    message = ni.VisualizeNeuronsResult(model_version="v", method="clip_illusion", steps=50, visualizations=[ni.NeuronVisualization(
        neuron=7, class_index=2, class_name="heart", image_artifact="n7.png", masked_image_artifact="n7_masked.png", activation=3.5,
        logit=1.25, clip_similarity=0.3, core_relevance=0.6, mask_fraction=0.4)])
    images = {"n7.png": Image.new("RGB", (4, 4)), "n7_masked.png": Image.new("RGB", (5, 5))}
    operation = SimpleNamespace(artifact_image=images.__getitem__)
    read = visualizations(message, operation)
    assert (read.model_version, read.method, read.steps) == ("v", "clip_illusion", 50)
    (shown,) = read.visualizations
    assert (shown.neuron, shown.class_index, shown.class_name, shown.activation, shown.logit) == (7, 2, "heart", 3.5, 1.25)
    assert (shown.clip_similarity, shown.core_relevance, shown.mask_fraction) == (0.3, 0.6, 0.4)
    assert (shown.image_artifact, shown.masked_image_artifact) == ("n7.png", "n7_masked.png")
    assert (shown.image.size, shown.masked_image.size) == ((4, 4), (5, 5))
    assert visualizations(message, None).visualizations[0].image is None
    # The settings it ran with; None where unset (gamma for feature_visualization, epsilon
    # for all but clip_illusion, any from an older server), not the proto's 0.
    assert (read.gamma, read.epsilon, read.learning_rate, read.seed) == (None, None, None, None)
    message.MergeFrom(ni.VisualizeNeuronsResult(gamma=0.25, epsilon=0.125, learning_rate=0.5, seed=-9))
    echoed = visualizations(message, None)
    assert (echoed.gamma, echoed.epsilon, echoed.learning_rate, echoed.seed) == (0.25, 0.125, 0.5, -9)
    message.ClearField("epsilon")
    assert visualizations(message, None).epsilon is None


def test_a_head_edits_fields_are_the_servers_each_in_its_place():
    from explaind.client._neuroinspect import active_head_change, head_edit
    from explaind.v1 import inference_pb2 as inf, neuroinspect_pb2 as ni

    def evaluation(accuracy: float, groups: dict[str, float]) -> ni.HeadEvaluation:
        return ni.HeadEvaluation(accuracy=accuracy, per_class=[inf.ClassAccuracy(class_name="heart", accuracy=accuracy)], worst_class_name="heart",
                                 worst_class_accuracy=accuracy, group_accuracy=groups, worst_group=min(groups, key=groups.get) if groups else "",
                                 worst_group_accuracy=min(groups.values(), default=0.0))

    version = ni.HeadVersion(version_id="h2", model_version="m@h2", parent_version_id="h1", method="constrain", class_name="heart", neurons=[7, 3],
                             description="d", create_time=timestamp_pb2.Timestamp(seconds=60), active=True, owner="analyst",
                             parent_evaluation=evaluation(0.5, {"water": 0.25, "land": 0.75}), evaluation=evaluation(0.75, {"water": 0.5, "land": 0.75}))
    edit = head_edit(ni.EditHeadResult(version=version, best_epoch=2, epochs_run=5, validation_accuracy=[0.5, 0.75]))
    assert (edit.best_epoch, edit.epochs_run, edit.validation_accuracy, edit.target_ratio) == (2, 5, [0.5, 0.75], None)
    assert head_edit(ni.EditHeadResult(version=version, target_ratio=0.0)).target_ratio == 0.0  # set, though a proto default
    read = edit.version
    assert (read.version_id, read.model_version, read.parent_version_id, read.method, read.class_name) == ("h2", "m@h2", "h1", "constrain", "heart")
    assert (read.neurons, read.description, read.active, read.owner) == ([7, 3], "d", True, "analyst")
    assert read.create_time == dt.datetime(1970, 1, 1, 0, 1, tzinfo=dt.timezone.utc)
    assert (read.parent_evaluation.accuracy, read.evaluation.accuracy) == (0.5, 0.75)
    assert read.evaluation.class_accuracy == {"heart": 0.75} and (read.evaluation.worst_class, read.evaluation.worst_class_accuracy) == ("heart", 0.75)
    assert list(read.evaluation.group_accuracy.items()) == [("land", 0.75), ("water", 0.5)]  # by name
    assert (read.evaluation.worst_group, read.evaluation.worst_group_accuracy) == ("water", 0.5)
    loaded = head_edit(ni.EditHeadResult(version=ni.HeadVersion(version_id="h0", evaluation=evaluation(0.5, {})))).version
    assert loaded.parent_evaluation is None and loaded.evaluation.worst_group == "" and np.isnan(loaded.evaluation.worst_group_accuracy)
    change = active_head_change(ni.PromoteHeadVersionResponse(version=version, previous_version_id="h0"))
    assert (change.version.version_id, change.previous_version_id) == ("h2", "h0")


def test_a_sample_sets_summary_has_its_name_times_and_upload_state(client):
    # A look at the set while the upload reads its fourth image: the first request (one
    # image) created it, still uploading; the summaries are the server's, field by field.
    during = []

    def images():
        yield from [IMAGE] * 3  # requests are made a chunk ahead: the fourth image is read once the first request was answered
        during.append(client.sample_set("summary"))
        yield IMAGE

    created = client.create_sample_set(images(), [5, 1, 5, 5], sample_set_id="summary", display_name="hearts and stars", chunk_size=1)
    (uploading,) = during
    assert (uploading.sample_count, uploading.uploading, uploading.display_name) == (1, True, "hearts and stars")
    assert (created.sample_count, created.uploading, created.display_name, created.uid) == (4, False, "hearts and stars", uploading.uid)
    assert created.class_counts == {1: 1, 5: 3}  # by class index
    appended = client.append_samples("summary", [IMAGE], [0])
    assert appended.create_time == created.create_time < appended.update_time
    assert [s for s in client.sample_sets() if s.sample_set_id == "summary"] == [appended]


def test_model_metadata_has_each_of_the_servers_fields_in_its_place(client):
    from explaind.client import RequestLimits
    from explaind.config import default_config
    from explaind.engine.neuroinspect import MAX_VISUALIZATION_STEPS
    from explaind.imaging import MAX_IMAGE_SIDE

    config = default_config()  # the test server's, but for its classifier
    meta = client.model_metadata()
    assert (meta.name, meta.loader, meta.device, meta.interpolation) == ("world:balanced", "world", config.runtime.device, "bilinear")
    assert meta.supports_visualization  # a PyTorch classifier: its neurons can be visualised
    assert meta.limits == RequestLimits(config.server.max_message_bytes, config.server.max_pixels_per_request,
                                        config.batching.max_images_per_request, MAX_IMAGE_SIDE, 0, 0,  # no callers_file: no share
                                        max_visualization_steps=MAX_VISUALIZATION_STEPS)
    assert (meta.components["classifier"].source, meta.components["classifier"].detail) == (meta.source, "world:balanced (world)")


class _FittingServer(inference_pb2_grpc.InferenceServiceServicer):
    """Answers GetModelMetadata with ``classifier`` alone."""

    def __init__(self, classifier: inference_pb2.ClassifierInfo) -> None:
        super().__init__()
        self.classifier = classifier

    def GetModelMetadata(self, request, context):
        return inference_pb2.GetModelMetadataResponse(classifier=self.classifier)


def test_model_metadata_says_whether_jpeg_files_are_decoded_at_a_reduced_scale_and_an_older_server_decodes_them_whole():
    for classifier, expected in [(inference_pb2.ClassifierInfo(resize_size=256, jpeg_reduced_decode=True), True),
                                 (inference_pb2.ClassifierInfo(resize_size=256), False)]:  # an older server sets no such field
        server, target = _serve(_FittingServer(classifier), add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
        try:
            with Client(target, timeout=30) as client:
                meta = client.model_metadata()
        finally:
            server.stop(0)
        assert (meta.resize_size, meta.jpeg_reduced_decode) == (256, expected)


def test_health_is_asked_of_the_service_named(client):
    from explaind.client import NotFoundError

    assert client.health("explaind.v1.InferenceService") == "SERVING"
    with pytest.raises(NotFoundError):  # gRPC's health service knows no such service
        client.health("explaind.v1.NoSuchService")


def test_a_clients_message_limit_bounds_what_it_sends_and_what_it_takes(client, server):
    from explaind.client import ResourceExhaustedError

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)  # 12 kB raw, about as much as a PNG
    client.create_sample_set([noise], [0], sample_set_id="noise")
    with Client(server.target, max_message_bytes=4096) as small:
        assert small.predict([np.zeros((16, 16, 3), np.uint8)])[0].labels  # a request and answer under 4 kB
        with pytest.raises(ResourceExhaustedError):
            small.predict([noise])
        with pytest.raises(ResourceExhaustedError):
            next(small.samples("noise"))


@pytest.mark.parametrize("given", ["s3cret\n", " s3cret "])
def test_a_token_with_surrounding_whitespace_authenticates_as_the_token(tmp_path, given):
    # A Secret mounted as a file or set as a variable often ends in a line break; the server
    # drops it from its token file, and the client from its token.
    from explaind.client import UnauthenticatedError
    from explaind.config import default_config
    from explaind.service import ExplaindServer

    (tmp_path / "token").write_text("s3cret\n")
    server = ExplaindServer(default_config().replace("server", port=0, data_dir=str(tmp_path / "data"), token_file=str(tmp_path / "token")))
    port = server.start()  # sets are listed before the models load: none are loaded here
    try:
        with Client(f"127.0.0.1:{port}", timeout=30, token=given) as client:
            assert client.sample_sets() == []
        with Client(f"127.0.0.1:{port}", timeout=30, token="other") as stranger, pytest.raises(UnauthenticatedError):
            stranger.sample_sets()
    finally:
        server.stop(0)


def test_a_class_name_the_model_repeats_labels_its_first_index():
    # ImageNet's names repeat ("crane" the bird and the machine): a name means its first
    # index, as class_names.index(name) does.
    class Repeating(_UploadServer):
        def GetModelMetadata(self, request, context):
            return inference_pb2.GetModelMetadataResponse(classifier=inference_pb2.ClassifierInfo(class_names=["crane", "bird", "crane"]))

    servicer = Repeating((), set())
    server, target = _serve_uploads(servicer)
    try:
        with Client(target, timeout=10) as client:
            client.create_sample_set([IMAGE] * 3, ["bird", "crane", 2], sample_set_id="cranes")
    finally:
        server.stop(None)
    assert servicer.labels["cranes"] == [1, 0, 2]


def test_an_evaluations_arguments_reach_the_server(client):
    from explaind.client import InvalidArgumentError

    client.create_sample_set([IMAGE], [0], sample_set_id="evaluated")
    for argument in ("batch_size", "max_grid_images"):
        with pytest.raises(InvalidArgumentError) as refused:
            client.evaluate_sample_set("evaluated", **{argument: 5000})  # over 4096 and 1024
        assert refused.value.field == argument


def test_a_watch_the_server_cancels_raises_rather_than_ending_as_if_done():
    # It ended quietly, the operation not done, as if the watch had reached its end.
    from explaind.client import CancelledError
    from explaind.client._operations import Operation

    class Cancelling(operations_pb2_grpc.OperationsServiceServicer):
        def WatchOperation(self, request, context):
            context.abort(grpc.StatusCode.CANCELLED, "the server cancelled the watch")

    server, target = _serve(Cancelling(), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        with Client(target, timeout=5) as client, pytest.raises(CancelledError, match="the server cancelled the watch"):
            list(Operation(client, _operation_message()).watch(timeout=5))
    finally:
        server.stop(None)


def test_predicted_features_are_a_writable_array_of_their_own(client):
    features = client.predict([IMAGE], return_features=True)[0].features
    centred = features - features.mean()
    features -= features.mean()  # an array over the message's bytes was read-only
    np.testing.assert_array_equal(features, centred)


def test_a_result_holding_arrays_is_unequal_to_another_type(client):
    prediction = client.predict([IMAGE], return_features=True)[0]
    assert prediction != "circle" and prediction != (prediction.labels, prediction.class_indices)  # not an AttributeError
