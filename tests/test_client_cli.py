"""The ``explaind`` CLI: user errors are one ``error:`` line and an exit code, not a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import errno
import functools
import io
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ServerProcess, free_port, until_running, write_config
from explaind.client import Client, EvaluatedMistake, Operation, PlaintextTokenWarning
from explaind.client.cli import REQUEST_ID_IGNORED, SAFE_FILE_NAME_CHARS, main
from explaind.client.report import DEFAULT_STABILITY_RESAMPLES
from explaind.v1 import inference_pb2_grpc, neuroinspect_pb2_grpc, sample_sets_pb2_grpc


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory()


def _png(path, value: int) -> str:
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(path)
    return str(path)


def _usage_error(capsys, argv: list[str]) -> str:
    """Run ``argv`` expecting argparse's usage error (exit 2); returns stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def _fail_if_serving_starts(monkeypatch) -> None:
    """A refusal test fails, not serves until killed, when a check lets a bad value through."""
    import explaind.service

    def refused_value_served(config, stop_requested=None):
        raise AssertionError("serve started with a value it should have refused")

    monkeypatch.setattr(explaind.service, "serve", refused_value_served)


def _error(capsys, argv: list[str]) -> str:
    """Run ``argv`` expecting exit code 1 and exactly one ``error:`` line; returns it."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_predict_of_a_missing_file_is_a_usage_error(capsys, tmp_path):
    assert "no such file: " + str(tmp_path / "missing.png") in _usage_error(capsys, ["predict", str(tmp_path / "missing.png")])


@pytest.mark.parametrize(("argv", "said"), [
    # "--topk"'s value was taken for an image, and "no such file: 2" hid the typo.
    (["predict", "--topk", "2", "IMAGE"], "explaind predict: error: unrecognized arguments: --topk; did you mean --top-k?"),
    (["evaluate", "s", "--gird", "g.png", "--bach-size=3"],
     "explaind evaluate: error: unrecognized arguments: --gird g.png --bach-size=3; did you mean --grid for --gird, --batch-size for --bach-size?"),
    (["info", "--verbose"], "explaind info: error: unrecognized arguments: --verbose\n"),
    # Before the command only the options every command shares are read: "did you mean --json?" named the option given.
    (["--json", "rank", "s", "--class", "circle"],
     "explaind rank: error: unrecognized arguments: --json; --json is an option of rank: give it after rank\n"),
    (["--json", "--stability=5", "rank", "s", "--class", "circle"],
     "unrecognized arguments: --json --stability=5; --json, --stability are options of rank: give them after rank\n"),
])
def test_a_mistyped_option_is_named_with_the_option_it_resembles(capsys, tmp_path, argv, said):
    argv = [_png(tmp_path / "a.png", 0) if arg == "IMAGE" else arg for arg in argv]
    err = _usage_error(capsys, argv)
    assert said in err and "no such file" not in err, err


@pytest.mark.parametrize("argv", [["head-versions", "promote"], ["sample-set", "show"], ["operations", "get"], ["sample-set", "create", "s"]])
def test_a_mistake_found_after_parsing_shows_the_command_s_usage_not_every_command_s(capsys, argv):
    said = _usage_error(capsys, argv)
    assert said.startswith(f"usage: explaind {argv[0]} ") and f"explaind {argv[0]}: error: {argv[0]}" in said, said


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "unknown scenario 'nosuch'; known: balanced"),
        ("balanced:tset:10", "unknown split 'tset'; known: train, val, test"),
        ("balanced:test:abc", "count must be a positive integer, got 'abc'"),
        ("balanced:test:0", "count must be a positive integer, got '0'"),
    ],
)
def test_a_bad_world_spec_is_a_usage_error(capsys, spec, message):
    assert message in _usage_error(capsys, ["sample-set", "create", "--world", spec])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", __file__, "--top-k", "0"], "--top-k: expected an integer >= 1, got '0'"),
        (["predict", __file__, "--max-in-flight", "0"], "--max-in-flight: expected an integer >= 1, got '0'"),
        (["report", "--class", "heart", "--neurons", "-19"], "--neurons: expected an integer >= 0, got '-19'"),
        (["report", "--class", "heart", "--steps", "99999999999"], "--steps: 99999999999 is out of range [1, 2147483647]"),
        # Past an int32, an option of its own least value says its own range, not the field's negative one.
        (["report", "--class", "heart", "--neurons", "99999999999"], "--neurons: 99999999999 is out of range [0, 2147483647]"),
        (["operations", "list", "--limit", "99999999999"], "--limit: 99999999999 is out of range [1, 2147483647]"),
        (["info", "--timeout", "-1"], "--timeout: expected a number of seconds > 0, got '-1'"),
        (["head-versions", "promote"], "head-versions promote: give a version id"),
        (["head-versions", "list", "v1"], "head-versions list takes no version id"),
        (["head-versions", "delete"], "head-versions delete: give a version id"),
        (["head-versions", "show"], "head-versions show: give a version id"),
        # An empty id (an unset $VAR) was taken as none given: the parent served, the newest set reported on.
        (["head-versions", "rollback", "", "--target", "127.0.0.1:1"], "head-versions rollback: the version id is empty; leave it out to roll back "
                                                                        "to the served version's parent"),
        (["report", "--class", "heart", "--sample-set", "", "--target", "127.0.0.1:1"], "argument --sample-set: empty; leave it out for the newest sample set"),
        (["sample-set", "list", "--owner", "", "--target", "127.0.0.1:1"], "argument --owner: empty; leave it out to list every caller's"),
        (["operations", "list", "--owner=", "--target", "127.0.0.1:1"], "argument --owner: empty"),
        (["sample-set", "create", "", "--world", "balanced:test:2", "--target", "127.0.0.1:1"],
         "sample-set create: the sample set id is empty; leave it out for one the server picks"),
        (["sample-set", "create", "--id=", "--world", "balanced:test:2", "--target", "127.0.0.1:1"], "sample-set create: the sample set id is empty"),
        (["operations", "list", "junk"], "operations list takes no operation name"),
        (["operations", "get", "operations/0123456789abcdef", "extra"], "operations get takes one operation name, got 'extra' as well"),
        (["operations", "wait", "operations/0123456789abcdef", "-o", "out.png"], "operations wait takes one operation name, got --output as well"),
        (["operations", "get", "x", "--state", "failed"], "operations get: --kind, --state, --owner, --limit and --json-object are options of list"),
        (["operations", "cancel", "x", "--owner", "monitoring"], "operations cancel: --kind, --state, --owner, --limit and --json-object are options of list"),
        (["operations", "get", "x", "--json", "--json-object"], "operations get: --kind, --state, --owner, --limit and --json-object are options of list"),
        (["operations", "list", "--json-object"], "operations list: --json-object shapes --json's output; add --json"),
        (["sample-set", "show", "x", "--owner", "monitoring"], "sample-set show: --owner is an option of list"),
        (["operations", "list", "--limit", "0"], "--limit: expected an integer >= 1, got '0'"),
        (["sample-set", "list", "junk"], "sample-set list takes no sample set id"),
        (["sample-set", "create", "--world", "balanced", "--images", __file__, "--labels", "0"], "sample-set create: give only one of --world, --folder and --images (got --world and --images)"),
        (["sample-set", "show", "x", "--name", "y"], "sample-set show: --world, --folder, --images, --labels and --request-id are options of create and "
                                                   "append, --name of create"),
        (["sample-set", "delete", "x", "--request-id", "123e4567-e89b-42d3-a456-426614174000"], "sample-set delete: --world, --folder"),
        (["sample-set", "create", "a", "--id", "b", "--world", "balanced"], "sample-set create: two ids, 'a' and --id 'b'; give one"),
        (["sample-set", "create", "a"], "sample-set create: give --world SPEC, --folder DIR, or --images FILE... with as many --labels"),
        (["sample-set", "append", "a", "--world", "balanced", "--labels", "heart"], "sample-set append: --labels goes with --images (--world brings its own labels)"),
        (["sample-set", "create", "--images", __file__, __file__, "--labels", "heart"], "sample-set create: 2 --images but 1 --labels; give one label per image"),
        (["evaluate", "s", "--grid", "g.png", "--no-wait"], "evaluate: --grid needs the result, which --no-wait does not wait for; drop --no-wait, "
                                                           "or fetch the files later: explaind operations artifact NAME mistakes.png --output FILE"),
        (["visualize", "3", "--out-dir", "x", "--no-wait"], "visualize: --out-dir needs the result"),
        (["predict", str(Path(__file__).parent)], f"{Path(__file__).parent} is a directory, not a file"),
        # Integers no request field holds were a protobuf ValueError traceback (the report's after its ranking).
        (["rank", "s", "--class", "99999999999"], "--class: 99999999999 is out of range [-2147483648, 2147483647]"),
        (["visualize", "99999999999"], "NEURON[:CLASS]: 99999999999 is out of range"),
        (["visualize", "3", "--seed", "99999999999999999999"], "--seed: 99999999999999999999 is out of range"),
        (["evaluate", "s", "--batch-size", "99999999999"], "--batch-size: 99999999999 is out of range"),
        (["edit-head", "s", "--class", "heart", "--neurons", "3", "--request-id", "nightly"], "--request-id: expected a UUID (e.g. from uuidgen), got 'nightly'"),
        (["edit-head", "s", "--class", "heart", "--neurons", "99999999999"], "--neurons: 99999999999 is out of range"),
        (["edit-head", "s", "--class", "heart", "--neurons", "3", "--target-ratio", "nan"], "--target-ratio: expected a finite number or auto, got 'nan'"),
        (["edit-head", "s", "--class", "heart", "--neurons", "3", "--target-ratio", "Auto"], "--target-ratio: expected a finite number or auto, got 'Auto'"),
        (["edit-head", "s", "--class", "heart", "--neurons", "3", "--strength", "high"], "--strength: expected a finite number, got 'high'"),
        # An infinity is no number the server takes either: refused here, as NaN is, in the option's words.
        (["edit-head", "s", "--class", "heart", "--neurons", "3", "--strength", "inf"], "--strength: expected a finite number, got 'inf'"),
        (["edit-head", "s", "--class", "heart", "--neurons", "3", "--target-ratio=-inf"], "--target-ratio: expected a finite number or auto, got '-inf'"),
        (["edit-head", "s", "--class", "heart", "--neurons", "3", "--learning-rate", "fast"], "--learning-rate: expected a finite number, got 'fast'"),
        (["edit-head", "s", "--class", "heart", "--neurons", "3", "--max-epochs", "-1"], "--max-epochs: expected an integer >= 0, got '-1'"),
        (["rank", "s", "--stability", "-1"], "--stability: expected an integer >= 0, got '-1'"),
        (["rank", "s", "--stability", "2.5"], "--stability: expected an integer >= 0, got '2.5'"),
        (["rank", "s", "--stability", "99999999999"], "--stability: 99999999999 is out of range [0, 2147483647]"),
        (["report", "--class", "heart", "--stability", "-1"], "--stability: expected an integer >= 0, got '-1'"),
        (["demo", "--count", "0"], "--count: expected an integer >= 1, got '0'"),
        # A port that is no number was argparse's "invalid int value", Python's type name (one out of range: the config's words).
        (["serve", "--port", "http"], "--port: expected an integer, got 'http'"),
        (["serve", "--metrics-port", "9464.0"], "--metrics-port: expected an integer, got '9464.0'"),
        (["serve", "--health-port", "off"], "--health-port: expected an integer, got 'off'"),
        # A digit int() does not read was "invalid _positive_int value: '²'", naming a function of the CLI's code.
        (["predict", __file__, "--top-k", "²"], "--top-k: expected an integer >= 1, got '²'"),
        (["sample-set", "create", "--world", "balanced:test:²"], "count must be a positive integer, got '²'"),
        (["info", "--timeout", "inf"], "--timeout: expected a number of seconds > 0, got 'inf'"),  # no call ends without a deadline  # was a traceback once the server had started
        (["info", "--timeout", "0"], "--timeout: expected a number of seconds > 0, got '0'"),
        (["info", "--timeout", "nan"], "--timeout: expected a number of seconds > 0, got 'nan'"),  # NaN compares false with everything
        # A word, not a number: in its own words argparse would name a function of the CLI ("invalid _int64 value").
        (["info", "--timeout", "soon"], "--timeout: expected a number of seconds > 0, got 'soon'"),
        (["visualize", "3", "--seed", "random"], "--seed: expected an integer, got 'random'"),
        # One past each end of the field's range; a seed's is int64, not int32.
        (["rank", "s", "--class", "2147483648"], "--class: 2147483648 is out of range [-2147483648, 2147483647]"),
        (["rank", "s", "--class", "-2147483649"], "--class: -2147483649 is out of range [-2147483648, 2147483647]"),
        (["visualize", "3", "--seed", "9223372036854775808"],
         "--seed: 9223372036854775808 is out of range [-9223372036854775808, 9223372036854775807]"),
        (["sample-set", "create", "--world", "balanced:test:5:9"], "'balanced:test:5:9' is not scenario[:split[:count]]"),
        (["sample-set", "append", "a", "--world", "balanced", "--name", "x"], "sample-set append: --name is an option of create"),
        (["sample-set", "delete"], "sample-set delete: give a sample set id"),
        (["operations", "artifact", "operations/0123456789abcdef"], "operations artifact: give an artifact name (operations get NAME lists its artifacts)"),
        (["sample-set", "create", "--images", "/nonexistent.png", "--labels", "0"], "argument --images: no such file: /nonexistent.png"),
        (["predict", "/dev/null"], "argument images: /dev/null is not a regular file but a pipe or a device"),  # was "no such file"
        # An empty address (an unset $HOST) printed gRPC's C-core errors around an UNKNOWN one.
        (["info", "--target", ""], "argument --target: empty; give the server's host:port, or leave --target out for 127.0.0.1:50051"),
        (["operations", "list", "--target= "], "argument --target: empty"),
        # Either alone was refused in the SDK's words: "private_key and certificate_chain go together".
        (["--cert-file", "me.pem", "info"], "--cert-file and --key-file go together: a client certificate needs its private key"),
        (["sample-set", "list", "--key-file", "me.key"], "--cert-file and --key-file go together"),
        # gRPC dialled such a port modulo 65536 (99999: port 34463), perhaps another server's.
        (["--target", "127.0.0.1:99999", "info"], "argument --target: port 99999 is out of range [1, 65535]"),
        (["operations", "list", "--target=[::1]:-3"], "argument --target: port -3 is out of range [1, 65535]"),
        (["info", "--target", "dns:///localhost:0"], "argument --target: port 0 is out of range [1, 65535]"),
        (["info", "--target", "localhost:"], "argument --target: 'localhost:' has no port after its ':'"),  # dialled port 443
        # An unset $HOST: each call failed UNAVAILABLE, "host must not be empty".
        (["info", "--target", ":50051"], "argument --target: ':50051' has no host before its ':' (e.g. localhost:50051)"),
        (["info", "--target", ":"], "argument --target: ':' has no host before its ':'"),
    ],
)
def test_values_and_arguments_a_command_cannot_use_are_usage_errors(capsys, argv, message):
    # Each used to be accepted and ignored or misread (a negative --neurons sliced the ranking).
    assert message in _usage_error(capsys, argv)


@pytest.mark.parametrize("argv, given", [
    (["operations", "get", "--json", "operations/0123456789abcdef"], {"name": "operations/0123456789abcdef"}),
    (["operations", "artifact", "--json", "0123456789abcdef", "mistakes.png"], {"name": "0123456789abcdef", "artifact": "mistakes.png"}),
    (["operations", "artifact", "0123456789abcdef", "-o", "grid.png", "mistakes.png"], {"name": "0123456789abcdef", "artifact": "mistakes.png"}),
    (["head-versions", "show", "--json", "v1"], {"version": "v1"}),
    (["sample-set", "create", "--world", "balanced", "hearts"], {"id": "hearts", "world": ("balanced", "test", 64)}),
    # "--", the separator: dropped, and what follows it positional, as later Pythons read it.
    (["head-versions", "show", "--json", "--", "v1"], {"version": "v1"}),
    (["sample-set", "create", "--world", "balanced", "--", "hearts"], {"id": "hearts"}),
    (["operations", "artifact", "--json", "0123456789abcdef", "--", "mistakes.png"], {"name": "0123456789abcdef", "artifact": "mistakes.png"}),
    (["operations", "get", "--json", "0123456789abcdef", "--"], {"name": "0123456789abcdef", "artifact": None}),
])
def test_a_positional_argument_after_an_option_is_taken_on_every_python(argv, given):
    # Python 3.11's argparse (before CPython gh-59317, fixed in 3.12.7) left NAME in
    # `operations get --json NAME` unrecognized: a usage error there, parsed on later Pythons.
    from explaind.client.cli import parse_arguments

    parsed = parse_arguments(argv)
    assert {dest: getattr(parsed, dest) for dest in given} == given


def test_a_set_s_id_after_images_ended_by_the_separator_is_its_id(tmp_path):
    # `--images *.png -- ID`: "--" ends the list of a variable-length option, which would take the ID as an image.
    from explaind.client.cli import parse_arguments

    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for image in images:
        image.write_bytes(b"")
    parsed = parse_arguments(["sample-set", "create", "--labels", "circle", "heart", "--images", *map(str, images), "--", "hearts"])
    assert (parsed.id, parsed.images, parsed.labels) == ("hearts", [str(image) for image in images], ["circle", "heart"])


@pytest.mark.parametrize("word", ["-v1", "--"])
def test_a_word_after_the_separator_is_a_positional_whatever_it_starts_with(word):
    # As later Pythons read it: only the first "--" separates, and what follows is positional,
    # even a word that looks like an option or a second "--".
    from explaind.client.cli import parse_arguments

    assert parse_arguments(["head-versions", "show", "--json", "--", word]).version == word


def test_a_word_past_a_command_s_positional_arguments_is_still_a_usage_error(capsys):
    assert _usage_error(capsys, ["head-versions", "show", "--json", "v1", "extra"]).endswith("unrecognized arguments: extra\n")
    # An unknown option alone, as later Pythons name it, the word after it the command's
    # (Python 3.11 said "--bogus v1", "--wrld balanced", "--bogus v1" for one before the command).
    assert _usage_error(capsys, ["head-versions", "show", "--bogus", "v1"]).endswith("unrecognized arguments: --bogus\n")
    assert _usage_error(capsys, ["sample-set", "create", "--wrld", "balanced"]).endswith(
        "unrecognized arguments: --wrld; did you mean --world?\n")
    assert _usage_error(capsys, ["--bogus", "head-versions", "show", "--json", "v1"]).endswith("unrecognized arguments: --bogus\n")
    # The separator left over is no option mistyped: sample-set's offered --id for it.
    assert _usage_error(capsys, ["sample-set", "show", "hearts", "--json", "--", "extra"]).endswith("unrecognized arguments: -- extra\n")


def test_integers_at_the_ends_of_their_fields_range_and_the_world_spec_s_defaults_are_taken():
    from explaind.client.cli import parse_arguments

    assert parse_arguments(["rank", "s", "--class", "2147483647"]).target_class == 2147483647
    assert parse_arguments(["rank", "s", "--class", "-2147483648"]).target_class == -2147483648
    assert parse_arguments(["--target", "localhost:65535", "info"]).target == "localhost:65535"
    assert parse_arguments(["--target", "::1", "info"]).target == "::1"  # a bare IPv6 address starts with ':' too
    assert parse_arguments(["visualize", "3", "--seed", "9223372036854775807"]).seed == 2**63 - 1
    assert parse_arguments(["edit-head", "s", "--class", "0", "--neurons", "1", "--seed", "-9223372036854775808"]).seed == -2**63
    # scenario[:split[:count]]: the test split, 64 samples, unless given.
    assert parse_arguments(["sample-set", "create", "--world", "balanced"]).world == ("balanced", "test", 64)
    assert parse_arguments(["sample-set", "create", "--world", "balanced:val"]).world == ("balanced", "val", 64)


@pytest.mark.parametrize(("argv", "argument"), [
    (["--cert-file", "", "--key-file", "", "info"], "--cert-file"),  # connected in plaintext, as if neither were given
    (["--tls", "--ca-file", "", "info"], "--ca-file"),  # trusted the system's CAs instead
    (["evaluate", "s", "--grid", ""], "--grid"),  # evaluated, wrote no grid and exited 0
    (["visualize", "3", "--out-dir", ""], "--out-dir"),  # wrote the images into the current directory
    (["operations", "artifact", "operations/0123456789abcdef", "mistakes.png", "-o", ""], "-o/--output"),  # wrote ./mistakes.png
    (["report", "--class", "heart", "--out", ""], "--out"),  # "cannot write : it is a directory"
    (["sample-set", "create", "--folder", ""], "--folder"),  # "give --world SPEC, --folder DIR, ..." as if none were given
    (["predict", ""], "images"),  # " is a directory, not a file"
    (["sample-set", "create", "--images", "", "--labels", "0"], "--images"),
])
def test_an_empty_path_is_a_usage_error_not_none_or_the_current_directory(capsys, argv, argument):
    # An unset variable, as in --grid "$GRID", gives an empty path.
    said = _usage_error(capsys, ["--target", "127.0.0.1:1", "--timeout", "2", *argv])
    assert f"error: argument {argument}: expected a path, got ''\n" in said, said


def test_visualize_that_fails_before_its_images_leaves_no_out_dir_it_made(capsys, tmp_path):
    # The directories were made before the job, to refuse a bad one early, and stayed, empty, when it failed.
    (tmp_path / "kept").mkdir()
    out_dir = tmp_path / "kept" / "made" / "for" / "images"
    assert "UNAVAILABLE" in _error(capsys, ["--target", "127.0.0.1:1", "--timeout", "2", "visualize", "3", "--out-dir", str(out_dir)])
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


def test_visualize_refuses_a_neuron_and_class_given_twice_before_any_call(capsys, monkeypatch):
    # The server optimises a pair given twice into the same image twice (its seed is the pair's): refused, as edit-head refuses a neuron twice.
    monkeypatch.setattr(Client, "visualize_neurons", lambda *args, **kwargs: pytest.fail("sent a request the server refuses"))
    for neurons, positions in ((["8:heart", "3", "8:name:heart"], (3, 1)), (["3", "8", "8"], (3, 2)), (["8:index:5", "8:index:5"], (2, 1))):
        assert _error(capsys, ["--target", "127.0.0.1:1", "--timeout", "2", "visualize", *neurons]) == (
            f"error: the NEURON[:CLASS] at position {positions[0]} repeats the one at position {positions[1]}: the same neuron and class "
            "would be optimised twice into the same image")


def test_visualize_interrupted_before_its_images_leaves_no_out_dir_it_made(capsys, tmp_path, monkeypatch):
    # Ctrl-C is no Exception: the directories made for the images stayed, empty.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "visualize_neurons", interrupted)
    out_dir = tmp_path / "made" / "images"
    assert main(["--target", "127.0.0.1:1", "--timeout", "2", "visualize", "3", "--out-dir", str(out_dir)]) == 130
    assert capsys.readouterr().err.startswith("interrupted\n  a job may have started under request_id ")  # no server to find it on
    assert list(tmp_path.iterdir()) == []


def test_an_explaind_target_empty_or_of_a_port_out_of_range_is_a_usage_error_naming_it(capsys, monkeypatch):
    monkeypatch.setenv("EXPLAIND_TARGET", "")
    err = _usage_error(capsys, ["sample-set", "list"])
    assert "error: EXPLAIND_TARGET is empty; set it to the server's host:port, or unset it for 127.0.0.1:50051\n" in err
    assert "dns" not in err  # no gRPC log
    monkeypatch.setenv("EXPLAIND_TARGET", "localhost:65536")
    assert "error: EXPLAIND_TARGET: port 65536 is out of range [1, 65535]\n" in _usage_error(capsys, ["info"])


def test_errors_say_what_to_check_when_no_server_answers_or_it_wants_a_token(capsys, server_factory, monkeypatch):
    target = f"127.0.0.1:{free_port()}"
    assert main(["--target", target, "--timeout", "2", "info"]) == 1
    assert capsys.readouterr().err.endswith(f"\n  (is a server running at {target}? --target or EXPLAIND_TARGET names another)\n")
    # A host no resolver knows (.invalid never resolves) printed the resolver's error alone.
    assert main(["--target", "no-such-host.invalid:50051", "--timeout", "2", "info"]) == 1
    assert capsys.readouterr().err.endswith("\n  (cannot resolve the host of no-such-host.invalid:50051: is it spelled right, "
                                            "and is DNS reachable? --target or EXPLAIND_TARGET names it)\n")
    # A target gRPC cannot parse printed its UNKNOWN "Failed to create channel" alone.
    for unparsable in ("dns:///", "ipv4:1.2.3", "dns:"):  # "dns:" is a scheme alone, not host "dns" with no port
        assert main(["--target", unparsable, "--timeout", "2", "info"]) == 1
        assert capsys.readouterr().err.endswith(f"\n  ({unparsable!r} is no gRPC target: --target or EXPLAIND_TARGET is host:port, or a URI "
                                                "such as dns:///host:port, ipv4:10.0.0.7:50051 or unix:///run/explaind.sock)\n")
    server = server_factory(server={"token": "s3cret"})
    assert main(["--target", server.target, "--timeout", "10", "info"]) == 1
    assert capsys.readouterr().err.endswith("\n  (the server asks for a token: --token or EXPLAIND_TOKEN)\n")
    # A token given and refused is not "asks for a token": the one given is wrong, or stale.
    assert main(["--target", server.target, "--timeout", "10", "--token", "old", "info"]) == 1
    assert capsys.readouterr().err.endswith("\n  (the server refused the token of --token: was it rotated?)\n")
    monkeypatch.setenv("EXPLAIND_TOKEN", "old")
    assert main(["--target", server.target, "--timeout", "10", "info"]) == 1
    assert capsys.readouterr().err.endswith("\n  (the server refused the token of EXPLAIND_TOKEN: was it rotated?)\n")
    # A Secret given as a variable keeps its final line break; the server drops it from its token file.
    monkeypatch.setenv("EXPLAIND_TOKEN", "s3cret\n")
    assert main(["--target", server.target, "--timeout", "10", "info"]) == 0
    capsys.readouterr()
    assert main(["--target", server.target, "--timeout", "10", "--tls", "info"]) == 1
    assert capsys.readouterr().err.endswith(f"\n  ({server.target} does not speak TLS: drop --tls (and its files) for a plaintext server)\n")
    # The `explaind` command's stderr holds only those lines: gRPC's own log of the failed
    # handshake came first.
    env = {key: value for key, value in os.environ.items() if key not in ("GRPC_VERBOSITY", "EXPLAIND_TOKEN")}
    command = subprocess.run([sys.executable, "-m", "explaind", "--target", server.target, "--timeout", "10", "--tls", "info"],
                             capture_output=True, text=True, timeout=120, check=False, env=env)
    assert command.returncode == 1 and command.stderr.startswith("error: UNAVAILABLE: ") and len(command.stderr.splitlines()) == 2, command.stderr


def test_an_unavailable_server_that_says_why_gets_no_guess_at_the_connection(capsys):
    # Its own reason (a server shutting down) is the whole story: no "is a server running?".
    import grpc

    from explaind.v1 import inference_pb2_grpc
    from test_client_sdk import _serve

    class ShuttingDown(inference_pb2_grpc.InferenceServiceServicer):
        def EvaluateSampleSet(self, request, context):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; no new jobs are accepted")

    server, target = _serve(ShuttingDown(), add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        assert main(["--target", target, "--timeout", "10", "evaluate", "s"]) == 1
    finally:
        server.stop(0)
    assert capsys.readouterr().err == "error: UNAVAILABLE: the server is shutting down; no new jobs are accepted\n"


def test_a_call_unanswered_within_the_timeout_names_the_option(capsys, monkeypatch):
    # It said "DEADLINE_EXCEEDED: Deadline Exceeded" alone: no word of the --timeout that set the deadline.
    with socket.socket() as silent:  # takes the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert main(["--target", f"127.0.0.1:{silent.getsockname()[1]}", "--timeout", "0.5", "info"]) == 1
    assert capsys.readouterr().err == ("error: DEADLINE_EXCEEDED: Deadline Exceeded\n"
                                       "  (no answer within 0.5 s, the --timeout of each call: a busy server or a slow link may need more)\n")
    # A job the server ended at its [jobs].max_run_seconds is no call of --timeout's.
    import grpc

    from explaind.client._errors import operation_error

    def ran_too_long(self):
        raise operation_error(grpc.StatusCode.DEADLINE_EXCEEDED, "the job ran past [jobs].max_run_seconds = 60")

    monkeypatch.setattr(Client, "model_metadata", ran_too_long)
    assert main(["--target", "127.0.0.1:1", "info"]) == 1
    assert capsys.readouterr().err == "error: DEADLINE_EXCEEDED: the job ran past [jobs].max_run_seconds = 60\n"


def test_outputs_that_cannot_be_written_are_refused_before_any_work(capsys, tmp_path):
    for argv in (["report", "--class", "heart", "--out", str(tmp_path / "missing" / "r.html")],
                 ["evaluate", "some-set", "--grid", str(tmp_path / "missing" / "g.png")]):
        # No server at the target: the command fails on the path before it calls one.
        assert f"cannot write {tmp_path / 'missing'}" in _error(capsys, ["--target", "127.0.0.1:1", *argv])
    assert f"cannot write {tmp_path}: it is a directory" in _error(capsys, ["report", "--class", "heart", "--out", str(tmp_path)])
    # Tried, not asked of os.access, which says yes to root even where nothing can be created.
    if Path("/sys").is_dir():
        unwritable = "/sys/explaind-report.html"
        assert _error(capsys, ["--target", "127.0.0.1:1", "report", "--class", "heart", "--out", unwritable]) == (
            f"error: cannot write {unwritable}: Permission denied")
    existing = tmp_path / "kept.html"
    existing.write_text("old report")
    assert "UNAVAILABLE" in _error(capsys, ["--target", "127.0.0.1:1", "--timeout", "2", "report", "--class", "heart", "--out", str(existing)])
    assert existing.read_text() == "old report" and sorted(tmp_path.iterdir()) == [existing]  # tried, and left as it was


def test_an_output_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # A write that failed half-way (a full disk) left a truncated report where the old one had been.
    import resource

    from explaind.client.cli import CommandError, _write

    old = tmp_path / "report.html"
    old.write_text("old report")
    old.chmod(0o640)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))  # writes past 4 kB fail with EFBIG, as on a full disk
    try:
        with pytest.raises(CommandError, match=f"^cannot write {old}: File too large$"):
            _write(old, b"<html>" * 10_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert old.read_text() == "old report" and sorted(tmp_path.iterdir()) == [old]  # no leftover partial file either
    _write(old, b"new report")
    assert old.read_bytes() == b"new report" and stat.S_IMODE(old.stat().st_mode) == 0o640  # an existing file keeps its mode
    link = tmp_path / "link.html"
    link.symlink_to(old)
    _write(link, b"through the link")
    assert link.is_symlink() and old.read_bytes() == b"through the link"
    umask = os.umask(0o027)
    try:
        _write(tmp_path / "new.html", b"new")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.html").stat().st_mode) == 0o640  # a new file's mode as the umask allows
    # A directory that takes no new file (not so for root, hence faked), the file itself writable: written in place.
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda name, *args: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if str(name).endswith(".part") else real_open(name, *args))
    _write(old, b"in place")
    assert old.read_bytes() == b"in place" and sorted(p.name for p in tmp_path.iterdir()) == ["link.html", "new.html", "report.html"]


def test_an_output_file_is_replaced_where_the_os_has_no_fchmod(tmp_path, monkeypatch):
    # Windows before Python 3.13 has no os.fchmod: a report written over an older one
    # failed there with AttributeError, a stack trace.
    from explaind.client.cli import _write

    monkeypatch.delattr(os, "fchmod")
    old = tmp_path / "report.html"
    old.write_text("old report")
    _write(old, b"new report")
    assert old.read_bytes() == b"new report" and sorted(tmp_path.iterdir()) == [old]


def test_an_output_file_is_opened_in_binary_mode_where_the_os_has_a_text_mode(tmp_path, monkeypatch):
    # Windows opens a descriptor in text mode unless asked for O_BINARY (0x8000 there;
    # harmless to a new file on Linux): a PNG written there had each "\n" byte as "\r\n".
    from explaind.client.cli import _write

    monkeypatch.setattr(os, "O_BINARY", 0x8000, raising=False)
    flags, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda name, flag, *args: (flags.append(flag), real_open(name, flag, *args))[1])
    _write(tmp_path / "mistakes.png", b"\x89PNG\r\n\x1a\n")
    assert [flag & 0x8000 for flag in flags] == [0x8000]
    assert (tmp_path / "mistakes.png").read_bytes() == b"\x89PNG\r\n\x1a\n"


def test_an_output_through_a_link_to_a_file_not_made_yet_is_written_where_the_link_points(tmp_path):
    # The check before the work refused it ("File exists") though the write follows the link.
    from explaind.client.cli import _require_writable, _write

    link = tmp_path / "latest.html"
    link.symlink_to(tmp_path / "report-1.html")
    _require_writable(str(link))
    assert link.is_symlink() and not link.exists()  # tried and removed again
    _write(link, b"report")
    assert (tmp_path / "report-1.html").read_bytes() == b"report" and link.is_symlink()


def test_an_output_that_is_a_pipe_is_written_into_not_replaced_by_a_file(tmp_path, monkeypatch):
    # `--out /dev/stdout` or a named pipe a reader waits on: a file renamed over it would
    # take its place, and the check before the work must not open it (that blocks).
    from explaind.client.cli import _require_writable, _write

    pipe = tmp_path / "report.pipe"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # so that a write cannot block the test
    try:
        with monkeypatch.context() as watched:
            opened, open_path = [], Path.open
            watched.setattr(Path, "open", lambda path, *args, **kwargs: (opened.append(path), open_path(path, *args, **kwargs))[1])
            _require_writable(str(pipe))
        assert opened == []  # without a reader, opening it for writing would block
        _write(pipe, b"report")
        assert os.read(reader, 100) == b"report"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(pipe.lstat().st_mode) and sorted(tmp_path.iterdir()) == [pipe]


def test_standard_output_that_cannot_be_written_is_an_error_line_not_a_traceback(server, capsys, monkeypatch):
    with open("/dev/full", "w") as full:  # every write fails: No space left on device
        monkeypatch.setattr(sys, "stdout", full)
        assert main(["--target", server.target, "info", "--json"]) == 1
    assert capsys.readouterr().err == "error: cannot write standard output: No space left on device\n"
    # Unbuffered (PYTHONUNBUFFERED=1), the print itself fails and the flush after it works.
    with open("/dev/full", "wb", buffering=0) as raw, io.TextIOWrapper(raw, write_through=True) as full:
        monkeypatch.setattr(sys, "stdout", full)
        assert main(["--target", server.target, "info", "--json"]) == 1
        monkeypatch.undo()
    assert capsys.readouterr().err == "error: cannot write standard output: No space left on device\n"
    # A full disk met writing something else, with standard output buffered and fine, is not standard output's.
    from explaind.client.cli import _standard_output_failed

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO()))  # as a terminal's or a pipe's without PYTHONUNBUFFERED
    assert not _standard_output_failed(OSError(errno.ENOSPC, "No space left on device"))
    # So main lets it through (an error the CLI does not know, a traceback) rather than blame standard output.
    monkeypatch.setattr(Client, "model_metadata", lambda self: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space left on device"):
        main(["--target", server.target, "info"])
    assert "standard output" not in capsys.readouterr().err


def test_a_token_that_no_header_can_carry_is_refused_before_any_call(capsys, monkeypatch):
    # It was sent, and every call failed INTERNAL "Invalid metadata" after gRPC's own log lines.
    for token in ("tök", "two\nlines", "with space"):
        assert _error(capsys, ["--target", "127.0.0.1:1", "--token", token, "info"]) == (
            "error: --token: token must be printable ASCII without spaces or line breaks (it travels in a gRPC header)")
    monkeypatch.setenv("EXPLAIND_TOKEN", "tök")  # named as what set it
    assert _error(capsys, ["--target", "127.0.0.1:1", "info"]) == (
        "error: EXPLAIND_TOKEN: token must be printable ASCII without spaces or line breaks (it travels in a gRPC header)")


def test_a_token_sent_without_tls_to_another_machine_is_one_warning_line_naming_its_source(capsys, monkeypatch):
    monkeypatch.setenv("EXPLAIND_TOKEN", "secret")
    for _ in range(2):  # every command says it, not only a process's first
        assert main(["--target", "10.255.255.1:1", "--timeout", "0.1", "info"]) == 1
        assert capsys.readouterr().err.startswith(
            "warning: EXPLAIND_TOKEN travels to 10.255.255.1:1 in plaintext, readable by anyone on the network path: "
            "add --tls (and --ca-file for a private CA), or connect through a proxy that adds TLS\nerror: ")
    assert main(["--target", "127.0.0.1:1", "--timeout", "0.1", "info"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlaintextTokenWarning)  # PYTHONWARNINGS=error: an error line, not a traceback
        assert main(["--target", "10.255.255.1:1", "--timeout", "0.1", "info"]) == 1
    assert capsys.readouterr().err == (
        "error: EXPLAIND_TOKEN travels to 10.255.255.1:1 in plaintext, readable by anyone on the network path: "
        "add --tls (and --ca-file for a private CA), or connect through a proxy that adds TLS\n")


def test_ctrl_c_stops_a_wait_but_not_the_job_it_waits_on_and_cancels_a_job_the_command_started(server, capsys, monkeypatch, tmp_path):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with Client(server.target, timeout=30) as client:
        job = client.visualize_neurons([3], method="feature_visualization", steps=10_000)
        try:
            monkeypatch.setattr(Operation, "wait", interrupted)
            assert main(["--target", server.target, "operations", "wait", job.name]) == 130
            assert capsys.readouterr().err == f"interrupted\n  {job.name} goes on; explaind operations cancel {job.name} stops it\n"
            assert not job.refresh().done
            # With --json, its error names the job the wait was on, as a command's own job is named.
            assert main(["--target", server.target, "operations", "wait", job.name, "--json"]) == 130
            error = json.loads(capsys.readouterr().out)["error"]
            assert (error["code"], error["message"], error["operation"]) == ("INTERRUPTED", "interrupted", job.name), error
            with monkeypatch.context() as cancelling:  # and so does one stopped as it cancelled the job
                cancelling.setattr(Operation, "cancel", interrupted)
                assert main(["--target", server.target, "operations", "cancel", job.name, "--json"]) == 130
                assert json.loads(capsys.readouterr().out)["error"]["operation"] == job.name
            monkeypatch.setattr(Operation, "watch", interrupted)  # what a command that shows progress waits with
            assert main(["--target", server.target, "visualize", "5", "--method", "feature_visualization", "--steps", "10000",
                         "--out-dir", str(tmp_path)]) == 130
            err = capsys.readouterr().err
            started = re.search(r"operations/[0-9a-f]{16}", err).group()
            assert err.endswith(f"interrupted\n  cancelled {started}\n"), err  # queued behind the first: it ends at once
            assert client.operation(started).state == "cancelled"
        finally:
            job.cancel()


def _interrupted_once_started(monkeypatch, method: str, *, sent: bool) -> list[str]:
    """Make the first call of the Client's job-starting ``method`` raise KeyboardInterrupt,
    after it reached the server (``sent``) or before; returns the request_id of each call."""
    start = getattr(Client, method)
    request_ids: list[str] = []

    def interrupted_once(self, *args, **kwargs):
        request_ids.append(kwargs["request_id"])
        if len(request_ids) > 1:
            return start(self, *args, **kwargs)
        if sent:
            start(self, *args, **kwargs)
        raise KeyboardInterrupt  # where Ctrl-C or SIGTERM lands while the job's answer is on its way

    monkeypatch.setattr(Client, method, interrupted_once)
    return request_ids


@pytest.mark.parametrize("options", [[], ["--no-wait", "--json"]])
def test_ctrl_c_inside_the_call_that_started_a_job_cancels_that_job_and_names_it(server, capsys, monkeypatch, tmp_path, options):
    # The job started on the server, its answer unread: the command neither named nor cancelled it.
    with Client(server.target, timeout=30) as client:
        ahead = client.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the job queues behind it
        try:
            request_ids = _interrupted_once_started(monkeypatch, "visualize_neurons", sent=True)
            assert main(["--target", server.target, "visualize", "5", "--method", "feature_visualization", "--steps", "10000",
                         *(options or ["--out-dir", str(tmp_path)])]) == 130
            out, err = capsys.readouterr()
            assert len(request_ids) == 2 and request_ids[0] == request_ids[1] and uuid.UUID(request_ids[0]), request_ids
            started = re.fullmatch(r"interrupted\n  cancelled (operations/[0-9a-f]{16})\n", err)
            assert started, err
            assert client.operation(started[1]).state == "cancelled"
            assert [op.name for op in client.operations(kind="visualize_neurons", state="cancelled")].count(started[1]) == 1
            if "--json" in options:
                error = json.loads(out)["error"]
                assert (error["code"], error["operation"], error["notes"]) == ("INTERRUPTED", started[1], [f"cancelled {started[1]}"]), error
                # The search's start sent again got the first attempt's job "again": that is no earlier run's.
                assert error["requested_again"] is False, error
        finally:
            ahead.cancel()


def _as_an_older_server(monkeypatch) -> None:
    """Make the server answer as a release before run_id: it lists no such capability, and
    its CancelOperation, not knowing unless_asked_by_another_run_than, cancels."""
    metadata, call = Client.model_metadata, Client._call

    def older_call(self, service, method, request, **kwargs):
        if method == "CancelOperation":
            request.ClearField("unless_asked_by_another_run_than")  # an older server's parse drops it
        return call(self, service, method, request, **kwargs)

    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: dataclasses.replace(
        metadata(self, **kwargs), capabilities=tuple(c for c in metadata(self, **kwargs).capabilities if c != "run_id")))
    monkeypatch.setattr(Client, "_call", older_call)


@pytest.mark.parametrize("other_run", ["earlier, the start not sent", "earlier, the start sent", "joined the start's job",
                                       "joined the repeat's job", "older server"])
def test_ctrl_c_inside_a_start_under_another_run_s_request_id_leaves_that_run_s_job_running(server, capsys, monkeypatch, other_run):
    # Two runs under one --request-id (a retry in a second terminal): the second's Ctrl-C inside its start found the job by
    # sending the start again and cancelled it, the job the first run was waiting on. Whoever made it, another run asked for
    # it, even between the start sent again and the cancel: it goes on, named, the note saying why. A server that knows
    # nothing of runs cancels it, as before.
    given = str(uuid.uuid4())
    start = Client.visualize_neurons
    runs: list[object] = []  # the other run's job
    calls: list[object] = []  # this run's starts

    def other_run_s_start() -> None:
        runs.append(start(other, [5], method="no_clip", steps=1, request_id=given))

    def interrupted_once(self, *args, **kwargs):
        calls.append(kwargs["request_id"])
        if len(calls) > 1:
            found = start(self, *args, **kwargs)
            if not runs:  # the other run asks for the job this run's start sent again made, before this run cancels it
                other_run_s_start()
            return found
        if other_run not in ("earlier, the start not sent", "joined the repeat's job"):
            start(self, *args, **kwargs)
        if not runs and other_run != "joined the repeat's job":  # the other run asks for the job this run's interrupted start made
            other_run_s_start()
        raise KeyboardInterrupt  # where Ctrl-C lands while the job's answer is on its way

    if other_run == "older server":
        _as_an_older_server(monkeypatch)
    with Client(server.target, timeout=30) as other:
        ahead = other.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the job queues behind it
        try:
            if other_run.startswith("earlier"):
                other_run_s_start()
            monkeypatch.setattr(Client, "visualize_neurons", interrupted_once)
            assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--request-id", given,
                         "--no-wait", "--json"]) == 130
            out, err = capsys.readouterr()
            assert calls == [given, given], calls
            job = runs[0].refresh()
            assert (job.state, job.cancel_requested) == (("cancelled", True) if other_run == "older server" else ("queued", False))
        finally:
            ahead.cancel()
            runs[0].cancel()
    error = json.loads(out)["error"]
    note = (f"cancelled {job.name}" if other_run == "older server" else
            f"{job.name} goes on: another run asked for it under request_id {given} too, whose wait cancelling it would end; "
            f"explaind operations cancel {job.name} stops it")
    assert err == f"interrupted\n  {note}\n", err
    assert (error["operation"], error["notes"]) == (job.name, [note]), error


@pytest.mark.parametrize("other_run", ["earlier", "joined during the wait", "older server"])
def test_ctrl_c_in_the_wait_of_a_command_under_another_run_s_request_id_leaves_that_run_s_job_running(server, capsys, monkeypatch, other_run):
    # The wait's Ctrl-C cancelled the job whatever its start had been told: the job another command under the same
    # --request-id made, or one that asked for this command's job while it waited. It goes on, named; a server that knows
    # nothing of runs cancels it, as before.
    given = str(uuid.uuid4())
    runs: list[Operation] = []  # the other run's job

    def other_run_s_start() -> None:
        runs.append(other.visualize_neurons([5], method="no_clip", steps=1, request_id=given))

    def interrupted(self, *args, **kwargs):
        if not runs:
            other_run_s_start()
        raise KeyboardInterrupt

    if other_run == "older server":
        _as_an_older_server(monkeypatch)
    with Client(server.target, timeout=30) as other:
        ahead = other.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the job queues behind it
        try:
            if other_run == "earlier":
                other_run_s_start()
            monkeypatch.setattr(Operation, "wait", interrupted)
            monkeypatch.setattr(Operation, "watch", interrupted)  # what a command that shows progress waits with
            assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--request-id", given,
                         "--json"]) == 130
            out, err = capsys.readouterr()
            job = runs[0].refresh()
            assert (job.state, job.cancel_requested) == (("cancelled", True) if other_run == "older server" else ("queued", False))
        finally:
            ahead.cancel()
            runs[0].cancel()
    error = json.loads(out)["error"]
    note = (f"cancelled {job.name}" if other_run == "older server" else
            f"{job.name} goes on (queued): another run asked for it under its request_id too, whose wait cancelling it would end; "
            f"its cancel() (explaind operations cancel {job.name}) stops it")
    assert (error["operation"], error["notes"]) == (job.name, [note]), (error, err)


def test_sigterm_inside_the_call_that_started_a_job_cancels_it_through_a_second_sigterm(server, capsys, monkeypatch, tmp_path):
    # coreutils' timeout sends a second SIGTERM to the process group: it must not stop the search for the job the first left.
    start = Client.visualize_neurons
    request_ids: list[str] = []

    def terminated_in_each_start(self, *args, **kwargs):
        request_ids.append(kwargs["request_id"])
        operation = start(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # where the signal's handler runs: the first raises, the second not
        return operation

    with Client(server.target, timeout=30) as client:
        ahead = client.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the job queues behind it
        try:
            monkeypatch.setattr(Client, "visualize_neurons", terminated_in_each_start)
            before = signal.getsignal(signal.SIGTERM)
            assert main(["--target", server.target, "visualize", "5", "--method", "feature_visualization", "--steps", "10000",
                         "--no-wait", "--json"]) == 143
            assert signal.getsignal(signal.SIGTERM) is before
            error = json.loads(capsys.readouterr().out)["error"]
            assert (error["message"], error["notes"]) == ("terminated", [f"cancelled {error['operation']}"]), error
            assert len(request_ids) == 2 and request_ids[0] == request_ids[1], request_ids
            assert client.operation(error["operation"]).state == "cancelled"
        finally:
            ahead.cancel()


@pytest.mark.parametrize("again", ["unreachable", "interrupted"])
def test_ctrl_c_inside_the_call_that_starts_a_job_names_its_request_id_where_the_job_cannot_be_found(capsys, monkeypatch, again):
    # No server to ask (or a second Ctrl-C while asking): the words say which request_id a job may have started under.
    # Looking for it took the --timeout of 2 s on no server: after a second it says so (at
    # once here), and what a Ctrl-C then does; where the search ends at once, never.
    import explaind.client._interrupted as _interrupted

    target = f"127.0.0.1:{free_port()}"
    request_ids = _interrupted_once_started(monkeypatch, "evaluate_sample_set", sent=False)
    monkeypatch.setattr(_interrupted, "INTERRUPTED_START_WORDS_S", 0.0 if again == "unreachable" else 60.0)
    if again == "interrupted":
        monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["--target", target, "--timeout", "2", "evaluate", "some-set", "--json"]) == 130
    out, err = capsys.readouterr()
    looking = "interrupted: looking for the job this command may have started, to cancel it (a second Ctrl-C stops looking)\n"
    assert err.startswith(looking) == (again == "unreachable"), err
    err = err.removeprefix(looking)
    request_id = request_ids[0]
    maybe = f"a job may have started under request_id {request_id}, not found ("
    find = (f"): this command again with --request-id {request_id} --no-wait names it (starting it if none did), and explaind "
            "operations cancel NAME stops it\n")
    assert err.startswith(f"interrupted\n  {maybe}") and err.endswith(find) and err.count("\n") == 2, err
    assert ("(interrupted again)" in err) == (again == "interrupted"), err
    error = json.loads(out)["error"]
    assert error["operation"] is None and error["notes"] == [err.split("\n")[1].strip()], error
    # With --request-id, that one.
    given = str(uuid.uuid4())
    request_ids.clear()
    assert main(["--target", target, "--timeout", "2", "evaluate", "some-set", "--request-id", given]) == 130
    assert request_ids[0] == given and f"under request_id {given}, not found (" in capsys.readouterr().err


def test_ctrl_c_inside_a_start_whose_job_cannot_be_cancelled_names_that_job(server, capsys, monkeypatch):
    # The repeat got the job (started by the first call, or by the repeat itself); the cancel failing leaves it running.
    _interrupted_once_started(monkeypatch, "visualize_neurons", sent=True)
    monkeypatch.setattr(Operation, "_cancel_unless_asked_by_another_run", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))  # a second Ctrl-C
    assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--no-wait", "--json"]) == 130
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    name = error["operation"]
    assert re.fullmatch(r"operations/[0-9a-f]{16}", name or ""), error
    assert err == (f"interrupted\n  {name} may still be running: cancelling it failed (interrupted again); explaind operations "
                   f"cancel {name} stops it\n"), err


def test_ctrl_c_inside_a_start_on_a_server_that_keeps_no_request_id_starts_no_second_job(server, capsys, monkeypatch):
    # A server that ignores request_id would answer the repeat with a second job: none is sent, the note sends to the list.
    metadata = Client.model_metadata
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: dataclasses.replace(
        metadata(self, **kwargs), capabilities=tuple(c for c in metadata(self, **kwargs).capabilities if c != "request_id")))
    request_ids = _interrupted_once_started(monkeypatch, "visualize_neurons", sent=True)
    with Client(server.target, timeout=30) as client:
        before = {op.name for op in client.operations(kind="visualize_neurons")}
        assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--no-wait", "--json"]) == 130
        out, err = capsys.readouterr()
        assert len(request_ids) == 1 and err == (f"interrupted\n  a job may have started under request_id {request_ids[0]}, which this "
                                                 "server keeps no record of: explaind operations list shows it\n"), err
        assert json.loads(out)["error"]["operation"] is None
        assert len({op.name for op in client.operations(kind="visualize_neurons")} - before) == 1


def _repeat_deleted_note(request_id: str, *, given: bool = False) -> str:
    """The note of an interrupted start whose search's repeat started the job, then cancelled and deleted it: not "no job had
    started", which a restart that ended the start's own job (FAILED, ABORTED; the server then runs the request again) belies.
    Under a --request-id ``given``, a run again under it is refused, which it says; a run choosing its own id is not (nor has
    the report such an option)."""
    rerun = "; running it again takes a new --request-id, as the server refuses a deleted job's" if given else ""
    return (f"no job runs under request_id {request_id}: the one sending it again started, to find it, was cancelled and deleted (the "
            f"start had not reached the server, or a restart ended its job, failed ABORTED: explaind operations list shows it){rerun}")


def test_a_run_waiting_on_the_job_an_interrupted_start_s_repeat_made_says_why_it_is_gone(server, capsys, monkeypatch):
    # Another run under the same --request-id got the job the interrupted start's search made (requested_again); that
    # search cancelled and deleted it, and the run's wait read a bare NOT_FOUND, "deleted by another client".
    given = str(uuid.uuid4())
    visualize = Client.visualize_neurons

    def deleted_by_the_search(self, *args, **kwargs):
        job = visualize(self, *args, **kwargs)
        repeat = self.operation(job.name).cancel()  # as the interrupted start's search does with the job it started
        repeat.wait(20)
        repeat.delete()
        return job

    with Client(server.target, timeout=30) as client:
        ahead = client.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the jobs queue behind it
        try:
            client.visualize_neurons([5], method="no_clip", steps=1, request_id=given)  # the search's repeat
            monkeypatch.setattr(Client, "visualize_neurons", deleted_by_the_search)
            assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--request-id", given,
                         "--json"]) == 1
        finally:
            ahead.cancel()
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    assert error["code"] == "NOT_FOUND" and error["requested_again"] is True, error
    assert error["notes"] == [f"{error['operation']} was queued when last read, an earlier request's under the same request_id: it "
                              "ended and was deleted since, most likely cancelled and deleted by an interrupted start under that request_id "
                              "(another run's Ctrl-C or SIGTERM), which does so with the job it started sending itself again to find its "
                              "own; or deleted by another client once it ended"], error
    assert error["notes"][0] in err, err


@pytest.mark.parametrize("server_says_requested_again", [True, False])
def test_ctrl_c_inside_a_start_that_never_reached_the_server_leaves_no_job_behind(server, capsys, monkeypatch, server_says_requested_again):
    # The search's start sent again, under the request_id nothing had used, started the job, which it then cancelled: a
    # CANCELLED job nobody had asked for stayed listed. Cancelled before it ran, it is deleted too. A server that does not
    # say requested_again cannot tell it from the interrupted start's own: it stays, named, as before.
    if not server_says_requested_again:
        metadata = Client.model_metadata
        monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: dataclasses.replace(
            metadata(self, **kwargs), capabilities=tuple(c for c in metadata(self, **kwargs).capabilities if c != "requested_again")))
    with Client(server.target, timeout=30) as client:
        ahead = client.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the job queues behind it
        try:
            request_ids = _interrupted_once_started(monkeypatch, "visualize_neurons", sent=False)
            before = {op.name for op in client.operations(kind="visualize_neurons")}
            assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--no-wait", "--json"]) == 130
            out, err = capsys.readouterr()
            left = {op.name for op in client.operations(kind="visualize_neurons")} - before
            # Still running: the repeat's job queued behind it throughout, cancelled before it ran (not the idle worker's
            # case, tested below, which ends the same way: a machine that ended this job first would pass untested).
            assert not ahead.refresh().done
        finally:
            ahead.cancel()
    error = json.loads(out)["error"]
    assert len(request_ids) == 2, request_ids
    if not server_says_requested_again:
        assert left == {error["operation"]} and error["notes"] == [f"cancelled {error['operation']}"], error
        return
    note = _repeat_deleted_note(request_ids[0])
    assert left == set() and err == f"interrupted\n  {note}\n", err
    assert (error["operation"], error["notes"]) == (None, [note]), error


@pytest.mark.parametrize("given", [False, True])
def test_ctrl_c_inside_a_start_that_never_reached_an_idle_server_leaves_no_job_behind(server, capsys, monkeypatch, given):
    # An idle worker starts the job the search's repeat made before the cancel reaches it: the cancel was only requested,
    # and the job, nobody's, stayed listed CANCELLED (every time, on an idle server). It is waited for to end, then deleted.
    with Client(server.target, timeout=30) as client:
        request_ids = _interrupted_once_started(monkeypatch, "visualize_neurons", sent=False)
        before = {op.name for op in client.operations(kind="visualize_neurons")}
        assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "10000", "--no-wait", "--json",
                     *(["--request-id", str(uuid.uuid4())] if given else [])]) == 130
        out, err = capsys.readouterr()
        left = {op.name for op in client.operations(kind="visualize_neurons")} - before
    note = _repeat_deleted_note(request_ids[0], given=given)
    assert left == set() and err == f"interrupted\n  {note}\n", err
    assert json.loads(out)["error"]["notes"] == [note]
    # As the note says: the start's own request, reaching the server late, or a rerun under the id, is refused.
    monkeypatch.undo()
    assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "10000", "--no-wait", "--json",
                 "--request-id", request_ids[0]]) == 1
    refused = json.loads(capsys.readouterr().out)["error"]
    assert (refused["code"], refused["field"]) == ("FAILED_PRECONDITION", "request_id"), refused


def test_an_interrupted_start_whose_repeat_started_a_job_it_cannot_delete_names_it_cancelled():
    # The server gone before the deletion: the job stays listed, cancelled, as the note says.
    from explaind.client import UnavailableError
    from explaind.client._interrupted import cancel_interrupted_start

    def cancel():
        job.state, job.done = "cancelled", True

    def delete():
        raise UnavailableError("the server is restarting")

    job = types.SimpleNamespace(name="operations/00000000000000dd", state="queued", done=False, _cancel_unless_asked_by_another_run=cancel, _left_for_another_run=False, delete=delete,
                                metadata=types.SimpleNamespace(requested_again=False))
    client = types.SimpleNamespace(model_metadata=lambda: types.SimpleNamespace(capabilities=("request_id", "requested_again")))
    interrupt = KeyboardInterrupt()
    cancel_interrupted_start(interrupt, client, "r-1", lambda request_id: job)
    assert (interrupt.__notes__, interrupt.operation) == ([f"cancelled {job.name}"], job)


def test_an_interrupted_start_whose_repeat_the_sdk_retried_to_an_earlier_job_does_not_delete_it():
    # The repeat's first answer lost, the SDK's retry got the job with requested_again set: the SDK's Operation.requested_again
    # says False (the lost attempt may have made it), yet the job may be the interrupted start's own, which must stay.
    from explaind.client._interrupted import cancel_interrupted_start

    def cancel():
        job.state, job.done = "cancelled", True

    deleted: list[str] = []
    job = types.SimpleNamespace(name="operations/00000000000000ee", state="queued", done=False, _cancel_unless_asked_by_another_run=cancel, _left_for_another_run=False,
                                delete=lambda: deleted.append(job.name), requested_again=False,
                                metadata=types.SimpleNamespace(requested_again=True))
    client = types.SimpleNamespace(model_metadata=lambda: types.SimpleNamespace(capabilities=("request_id", "requested_again")))
    interrupt = KeyboardInterrupt()
    cancel_interrupted_start(interrupt, client, "r-1", lambda request_id: job)
    assert (deleted, interrupt.__notes__, interrupt.operation) == ([], [f"cancelled {job.name}"], job)


def test_an_interrupted_start_whose_repeat_started_a_job_that_ended_before_its_cancel_keeps_it():
    # The job the repeat made finished as its cancel reached it: only one that ended cancelled is deleted, and one with a
    # result is named as finished, not said to be "cancelled and deleted".
    from explaind.client._interrupted import cancel_interrupted_start

    def cancel():
        job.state, job.done = "succeeded", True

    deleted: list[str] = []
    job = types.SimpleNamespace(name="operations/00000000000000ff", state="running", done=False, _cancel_unless_asked_by_another_run=cancel, _left_for_another_run=False,
                                delete=lambda: deleted.append(job.name), metadata=types.SimpleNamespace(requested_again=False))
    client = types.SimpleNamespace(model_metadata=lambda: types.SimpleNamespace(capabilities=("request_id", "requested_again")))
    interrupt = KeyboardInterrupt()
    cancel_interrupted_start(interrupt, client, "r-1", lambda request_id: job)
    assert (deleted, interrupt.__notes__, interrupt.operation) == ([], [f"{job.name} had already finished (succeeded); nothing to cancel"], job)


def test_ctrl_c_inside_a_start_under_a_request_id_of_another_request_says_no_job_started_under_it(server, capsys, monkeypatch):
    # --request-id an earlier run used with other options: the repeat is refused (as the start, had it arrived, was), so no
    # job of this command's is under it, and running it again (as a note advised) is refused again.
    given = str(uuid.uuid4())
    with Client(server.target, timeout=30) as client:
        earlier = client.visualize_neurons([3], method="no_clip", steps=1, request_id=given)
    _interrupted_once_started(monkeypatch, "visualize_neurons", sent=False)
    assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--request-id", given,
                 "--no-wait", "--json"]) == 130
    out, err = capsys.readouterr()
    assert err.startswith(f"interrupted\n  no job started under request_id {given} (INVALID_ARGUMENT: request_id: request_id {given} "
                          f"was sent with another request, which created {earlier.name};") and "--no-wait names it" not in err and err.count("\n") == 2, err
    error = json.loads(out)["error"]
    assert (error["code"], error["operation"]) == ("INTERRUPTED", None), error


def test_ctrl_c_inside_a_start_under_a_request_id_whose_job_was_deleted_says_no_job_started_under_it(server, capsys, monkeypatch):
    # The server refuses a request whose request_id's job was deleted (FAILED_PRECONDITION on request_id), the repeat too:
    # the note sent the user to run the command again under that id, "starting it if none did", which is refused again.
    given = str(uuid.uuid4())
    with Client(server.target, timeout=30) as client:
        earlier = client.visualize_neurons([5], method="no_clip", steps=1, request_id=given)
        earlier.wait(60)
        earlier.delete()
    _interrupted_once_started(monkeypatch, "visualize_neurons", sent=False)
    assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--request-id", given,
                 "--no-wait", "--json"]) == 130
    out, err = capsys.readouterr()
    assert err.startswith(f"interrupted\n  no job started under request_id {given} (FAILED_PRECONDITION: request_id: request_id {given} "
                          f"started {earlier.name}, which was deleted since (DeleteOperation)") and "--no-wait names it" not in err, err
    assert err.count("\n") == 2, err
    assert json.loads(out)["error"]["operation"] is None


def test_ctrl_c_inside_the_call_that_starts_a_ranking_names_its_request_id_where_the_job_cannot_be_found(capsys, monkeypatch):
    # rank has no --no-wait: the note sends to the list.
    request_ids = _interrupted_once_started(monkeypatch, "_start_ranking", sent=False)
    assert main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "2", "rank", "some-set", "--class", "index:0"]) == 130
    err = capsys.readouterr().err
    assert uuid.UUID(request_ids[0])  # no server to ask whether it keeps request_ids: no repeat
    assert err.startswith(f"interrupted\n  a job may have started under request_id {request_ids[0]}, not found (") and err.endswith(
        "): explaind operations list shows it, and explaind operations cancel NAME stops it\n"), err


def test_rank_json_names_the_job_that_computed_the_ranking(server, capsys, monkeypatch, relabelled_set):
    # A large set's ranking runs as a job, which the CLI waits on itself: its JSON names it, as the SDK's ranking does.
    start = Client._start_ranking
    monkeypatch.setattr(Client, "_start_ranking", lambda self, *args, **kwargs: start(self, *args, **{**kwargs, "execution": "operation"}))
    assert main(["--target", server.target, "rank", relabelled_set[0], "--class", "heart", "--stability", "0", "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)
    name = ranking["operation"]
    assert ranking["requested_again"] is False  # a new job, as evaluate's JSON says of its own
    with Client(server.target, timeout=30) as client:
        assert client.operation(name).kind == "rank_mistake_neurons"


def test_a_rank_rerun_under_its_request_id_says_the_ranking_s_job_is_an_earlier_run_s(server, capsys, monkeypatch, relabelled_set):
    # rank's JSON named the ranking's job with nothing telling an earlier run's, queued, from a new one, and its text
    # said nothing of a rerun, where evaluate, visualize and edit-head say it.
    sample_set_id, _ = relabelled_set
    start = Client._start_ranking
    monkeypatch.setattr(Client, "_start_ranking", lambda self, *args, **kwargs: start(self, *args, **{**kwargs, "execution": "operation"}))
    rank = ["--target", server.target, "rank", sample_set_id, "--class", "heart", "--stability", "0"]
    queued_id, cancelled_id = str(uuid.uuid4()), str(uuid.uuid4())
    earlier = "started by an earlier run with this --request-id"
    with Client(server.target, timeout=30) as client:
        ahead = client.visualize_neurons([3], method="no_clip", steps=1000)  # one worker: the rankings queue behind it
        try:
            queued = client._start_ranking(sample_set_id, "heart", request_id=queued_id).name
            cancelled = client._start_ranking(sample_set_id, "heart", request_id=cancelled_id).cancel().name
            result = Operation.result

            def ahead_cancelled_first(self, *args, **kwargs):
                ahead.cancel()  # the rerun read its job queued: it runs now
                return result(self, *args, **kwargs)

            monkeypatch.setattr(Operation, "result", ahead_cancelled_first)
            assert main([*rank, "--json", "--request-id", queued_id]) == 0
        finally:
            ahead.cancel()
        printed = capsys.readouterr()
        ranking = json.loads(printed.out)
        assert (ranking["operation"], ranking["requested_again"]) == (queued, True), ranking
        assert printed.err.startswith(f"{queued}, {earlier}, is queued; waiting for it\n"), printed.err
        monkeypatch.setattr(Operation, "result", result)
        # Ended: the text says so before the ranking, which follows as ever.
        assert main([*rank, "--request-id", queued_id]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"{queued}, {earlier}, ended already (succeeded)" and out[1].startswith(f"{ranking['mistake_count']} mistakes of heart"), out
        # The earlier run's job cancelled: its outcome, told from this run's failing by requested_again, as the words say.
        error, err = _json_failure(capsys, [*rank, "--json", "--request-id", cancelled_id])
        assert (error["code"], error["operation"], error["requested_again"]) == ("CANCELLED", cancelled, True), error
        assert err.startswith(f"{cancelled}, {earlier}, ended already (cancelled); its outcome stays that id's: give a new "
                              "--request-id to run it again\n"), err
        # A new job under a new id: not an earlier run's, and nothing said of one.
        assert main([*rank, "--request-id", str(uuid.uuid4())]) == 0
        assert capsys.readouterr().out.startswith(f"{ranking['mistake_count']} mistakes of heart")


def test_ctrl_c_inside_a_ranking_s_start_bounds_the_start_sent_again_which_inline_would_rank_in_full(capsys, monkeypatch):
    # A small set's ranking is answered inline, and the same start again (to find a job) runs it
    # again in full: minutes with --stability. Bounded, it is stopped; the note still names the request_id.
    import grpc

    import explaind.client._interrupted as _interrupted
    from explaind.client._errors import error_from_code

    timeouts: list[float | None] = []

    def interrupted_then_ranking_inline_again(self, *args, timeout=None, **kwargs):
        timeouts.append(timeout)
        if len(timeouts) == 1:
            raise KeyboardInterrupt  # where Ctrl-C lands while the inline ranking runs
        raise error_from_code(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")  # the repeat, ranking again, stopped

    monkeypatch.setattr(Client, "_start_ranking", interrupted_then_ranking_inline_again)
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: types.SimpleNamespace(capabilities=("request_id",)))
    assert main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "600", "rank", "some-set", "--class", "index:0"]) == 130
    assert timeouts == [None, _interrupted.RANKING_REPEAT_TIMEOUT_S], timeouts
    assert "a job may have started under request_id " in capsys.readouterr().err


@pytest.mark.parametrize("execution", ["operation", "auto"])
def test_ctrl_c_inside_the_call_that_started_a_ranking_cancels_its_job_and_names_it(server, capsys, monkeypatch, relabelled_set, execution):
    # The ranking's job started, its answer unread: the same start again gets it to cancel. A small set is answered inline: no job.
    start = Client._start_ranking
    request_ids: list[str] = []

    def interrupted_once(self, *args, **kwargs):
        request_ids.append(kwargs["request_id"])
        answer = start(self, *args, **{**kwargs, "execution": execution})
        if len(request_ids) == 1:
            raise KeyboardInterrupt  # where Ctrl-C lands while the answer is on its way
        return answer

    monkeypatch.setattr(Client, "_start_ranking", interrupted_once)
    assert main(["--target", server.target, "rank", relabelled_set[0], "--class", "heart", "--json"]) == 130
    out, err = capsys.readouterr()
    assert len(request_ids) == 2 and request_ids[0] == request_ids[1], request_ids
    error = json.loads(out)["error"]
    if execution == "auto":
        assert error["operation"] is None and error["notes"] == [f"no job started under request_id {request_ids[0]}: the server answers it inline"]
        assert error["requested_again"] is None, error  # no job
        return
    name = error["operation"]
    assert re.fullmatch(r"operations/[0-9a-f]{16}", name or ""), error
    assert error["requested_again"] is False, error  # the start sent again got the first attempt's job: no earlier run's
    assert error["notes"][0] in (f"cancelled {name}", f"{name} had already finished (succeeded); nothing to cancel") or error[
        "notes"][0].startswith(f"cancel requested for {name} ("), error
    with Client(server.target, timeout=30) as client:
        assert client.operation(name).wait(timeout=60).state in ("cancelled", "succeeded")


def _interrupted_start_notes(start, *, cancel=None) -> tuple[list[str], object]:
    """The notes cancel_interrupted_start leaves on an interrupt, and the operation it names,
    for a server keeping request_ids whose repeat of the start is ``start(request_id)``."""
    from explaind.client._interrupted import cancel_interrupted_start

    client = types.SimpleNamespace(model_metadata=lambda: types.SimpleNamespace(capabilities=("request_id",)))
    interrupt = KeyboardInterrupt()
    cancel_interrupted_start(interrupt, client, "r-1", start)
    return list(getattr(interrupt, "__notes__", ())), getattr(interrupt, "operation", None)


def test_an_interrupted_start_whose_job_ended_already_is_not_cancelled_and_says_it_finished():
    # A --request-id's earlier run's job, ended: no cancel is sent (one failing said the job "may still be running").
    def cancel():
        raise AssertionError("an ended job is not cancelled")

    ended = types.SimpleNamespace(name="operations/0123456789abcdef", state="succeeded", done=True, _cancel_unless_asked_by_another_run=cancel, _left_for_another_run=False)
    notes, named = _interrupted_start_notes(lambda request_id: ended)
    assert (notes, named) == (["operations/0123456789abcdef had already finished (succeeded); nothing to cancel"], ended)


def test_an_interrupted_start_whose_repeat_is_refused_on_another_field_than_request_id_may_still_have_started_a_job():
    # Only a refusal of the request_id itself says no job started under it.
    from explaind.client import InvalidArgumentError

    def refused(request_id):
        raise InvalidArgumentError("class_name: no class 'x'", field="class_name")

    notes, named = _interrupted_start_notes(refused)
    assert named is None and len(notes) == 1 and notes[0].startswith("a job may have started under request_id r-1, not found ("), notes


def test_an_interrupted_start_found_at_once_says_nothing_of_looking_for_it(server, capsys, monkeypatch):
    # The words "looking for the job ..." are for a search that lasts (a server restarting): one
    # that ends first has them cancelled, not printed later over the command's own words.
    import explaind.client.cli as cli

    timers = []

    class RecordedTimer:
        def __init__(self, *args, **kwargs):
            self.started = self.cancelled = False
            timers.append(self)

        def start(self):
            self.started = True

        def cancel(self):
            self.cancelled = True

    monkeypatch.setattr(cli.threading, "Timer", RecordedTimer)
    _interrupted_once_started(monkeypatch, "visualize_neurons", sent=True)
    assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--no-wait", "--json"]) == 130
    capsys.readouterr()
    assert [(timer.started, timer.cancelled) for timer in timers] == [(True, True)]


@pytest.mark.parametrize(("state", "rerun", "requested_again", "said"), [
    ("succeeded", False, True, "started operations/x; explaind operations wait operations/x waits for it"),  # the SDK's retry found its own job ended
    ("queued", True, False, "started operations/x; explaind operations wait operations/x waits for it"),  # the server says it is new
    ("queued", True, True, "operations/x, started by an earlier run with this --request-id, is queued; "
                           "explaind operations wait operations/x waits for it"),  # it was said to be started
    ("running", True, True, "operations/x, started by an earlier run with this --request-id, is running already; "
                            "explaind operations wait operations/x waits for it"),
    ("failed", True, True, "operations/x, started by an earlier run with this --request-id, ended already (failed); its outcome stays that "
                           "id's: give a new --request-id to run it again"),
])
def test_a_job_command_says_whose_job_it_got_by_its_state_and_whether_a_request_id_was_given(state, rerun, requested_again, said):
    from explaind.client.cli import _announcement

    operation = types.SimpleNamespace(name="operations/x", state=state, done=state in ("succeeded", "failed", "cancelled"),
                                      requested_again=requested_again)
    assert _announcement(operation, waiting=False, rerun=rerun, unsaid="") == said


@pytest.mark.parametrize(("waiting", "then"), [(True, "waiting for it"), (False, "explaind operations wait operations/x waits for it")])
def test_a_job_command_whose_server_does_not_say_whose_queued_job_it_got_says_either_run_s(waiting, then):
    from explaind.client.cli import _announcement

    operation = types.SimpleNamespace(name="operations/x", state="queued", done=False, requested_again=False)
    assert _announcement(operation, waiting=waiting, rerun=True, unsaid="the server does not say which") == (
        f"operations/x, started by this run or by an earlier one with this --request-id (the server does not say which), is queued; {then}")


@pytest.mark.parametrize(("waiting", "then"), [(True, ""), (False, "; explaind operations wait operations/x waits for it")])
def test_a_job_command_whose_server_ignores_request_id_says_it_started_the_job_and_that_a_rerun_starts_another(waiting, then):
    from explaind.client.cli import _announcement

    operation = types.SimpleNamespace(name="operations/x", state="queued", done=False, requested_again=False)
    assert _announcement(operation, waiting=waiting, rerun=True, unsaid=REQUEST_ID_IGNORED) == (
        f"started operations/x; this server ignores --request-id (an older release): running this again starts another job{then}")


def test_an_older_server_s_queued_job_under_a_given_request_id_is_not_said_to_be_started_by_this_run(server, capsys, monkeypatch):
    # A server that does not list requested_again answers an earlier run's queued job under the --request-id as it does a
    # new one: the words said "started operations/...", claiming it for this run.
    metadata = Client.model_metadata
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: dataclasses.replace(
        metadata(self, **kwargs), capabilities=tuple(c for c in metadata(self, **kwargs).capabilities if c != "requested_again")))
    argv = ["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--request-id", str(uuid.uuid4()), "--no-wait"]
    with Client(server.target, timeout=30) as client:
        ahead = client.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the job queues behind it
        try:
            assert main(argv) == 0
        finally:
            ahead.cancel()
        out, err = capsys.readouterr()
        name = out.strip()
        client.operation(name).cancel()
    assert err == (f"{name}, started by this run or by an earlier one with this --request-id (the server does not say which), is queued; "
                   f"explaind operations wait {name} waits for it\n"), err


@pytest.mark.parametrize(("state", "rerun", "requested_again", "capabilities", "unsaid"), [
    ("queued", True, False, ("request_id",), "the server does not say which"),  # an older server: the words cannot say whose
    # One older still starts a job for every run: this run's, and a rerun's another (the words said either run's might be).
    ("queued", True, False, (), REQUEST_ID_IGNORED),
    # The capabilities unread: nor then, and the server was not found to be an older one (the words said it was).
    ("queued", True, False, None, "whether the server says which could not be asked: UNAVAILABLE: connection refused"),
    ("queued", True, False, ("request_id", "requested_again"), ""),  # the server says it is new
    ("queued", True, True, (), ""),  # it was said to be an earlier run's
    ("queued", False, False, (), ""),  # no --request-id: this run's
    ("running", True, False, (), ""),  # running, or ended, the server's queued-or-new answer does not arise: an earlier run's
])
def test_whether_a_job_command_may_not_know_whose_job_it_got(state, rerun, requested_again, capabilities, unsaid):
    from explaind.client import UnavailableError
    from explaind.client.cli import _earlier_run_unsaid

    def model_metadata():
        if capabilities is None:
            raise UnavailableError("connection refused")
        return types.SimpleNamespace(capabilities=capabilities)

    operation = types.SimpleNamespace(name="operations/x", state=state, requested_again=requested_again,
                                      _cancelled_if_interrupted=contextlib.nullcontext)
    assert _earlier_run_unsaid(types.SimpleNamespace(model_metadata=model_metadata), operation, rerun) == unsaid


@pytest.mark.parametrize("options", [["--json"], ["--no-wait"]])
def test_ctrl_c_while_asking_whether_the_server_says_whose_queued_job_it_is_cancels_that_job_and_names_it(server, capsys, monkeypatch, options):
    # The job started, queued under the --request-id, and the server's capabilities were asked for before its name was said:
    # a Ctrl-C there left it queued, neither named nor cancelled, where one inside the start or the wait cancels it.
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt()))
    with Client(server.target, timeout=30) as client:
        ahead = client.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the job queues behind it
        try:
            assert main(["--target", server.target, "visualize", "5", "--method", "no_clip", "--steps", "1", "--request-id", str(uuid.uuid4()),
                         *options]) == 130
        finally:
            ahead.cancel()
        out, err = capsys.readouterr()
        started = re.fullmatch(r"interrupted\n  cancelled (operations/[0-9a-f]{16})\n", err)
        assert started, err
        # --no-wait's name was not printed: the error names the job.
        assert (json.loads(out)["error"]["operation"] if "--json" in options else out) == (started[1] if "--json" in options else ""), out
        assert client.operation(started[1]).state == "cancelled"


def test_a_ranking_job_an_older_server_answers_queued_under_a_given_request_id_is_not_said_to_be_this_run_s(server, capsys, monkeypatch,
                                                                                                            relabelled_set):
    # rank's announce, as the other job commands' words: a server without requested_again does not say whose it is.
    start, metadata, result = Client._start_ranking, Client.model_metadata, Operation.result
    monkeypatch.setattr(Client, "_start_ranking", lambda self, *args, **kwargs: start(self, *args, **{**kwargs, "execution": "operation"}))
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: dataclasses.replace(
        metadata(self, **kwargs), capabilities=tuple(c for c in metadata(self, **kwargs).capabilities if c != "requested_again")))
    with Client(server.target, timeout=30) as client:
        ahead = client.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the job queues behind it

        def ahead_cancelled_first(self, *args, **kwargs):
            ahead.cancel()  # announced: it runs now
            return result(self, *args, **kwargs)

        monkeypatch.setattr(Operation, "result", ahead_cancelled_first)
        try:
            assert main(["--target", server.target, "rank", relabelled_set[0], "--class", "heart", "--stability", "0",
                         "--request-id", str(uuid.uuid4())]) == 0
        finally:
            ahead.cancel()
    first = capsys.readouterr().out.splitlines()[0]
    assert re.fullmatch(r"operations/\S+, started by this run or by an earlier one with this --request-id \(the server does not say "
                        r"which\), is queued; waiting for it", first), first


def test_ranking_job_ctrl_c_while_asking_whether_the_server_says_whose_it_is_cancels_and_names_it(server, capsys, monkeypatch, relabelled_set):
    # As for the other job commands: rank's announce asks the server's capabilities before its wait.
    start = Client._start_ranking
    monkeypatch.setattr(Client, "_start_ranking", lambda self, *args, **kwargs: start(self, *args, **{**kwargs, "execution": "operation"}))
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt()))
    with Client(server.target, timeout=30) as client:
        ahead = client.visualize_neurons([3], method="feature_visualization", steps=10_000)  # one worker: the job queues behind it
        try:
            assert main(["--target", server.target, "rank", relabelled_set[0], "--class", "heart", "--request-id", str(uuid.uuid4()),
                         "--json"]) == 130
        finally:
            ahead.cancel()
        error = json.loads(capsys.readouterr().out)["error"]
        assert error["operation"] and error["notes"] == [f"cancelled {error['operation']}"], error
        assert client.operation(error["operation"]).state == "cancelled"


def test_an_option_s_word_after_a_double_dash_is_an_argument_not_the_option_given():
    from explaind.client.cli import _options_given

    parser = argparse.ArgumentParser()
    parser.add_argument("--sample-set")
    parser.add_argument("files", nargs="*")
    assert _options_given(parser._actions, ["--", "--sample-set"]) == set()
    assert _options_given(parser._actions, ["--sample-set", "s", "--", "x"]) == {"sample_set"}


def test_predict_top_k_beyond_the_classes_is_refused_in_the_option_s_terms(server, capsys, tmp_path):
    # The server's refusal offered "or 0 for the default", which --top-k refuses.
    image = _png(tmp_path / "a.png", 10)
    assert _error(capsys, ["--target", server.target, "predict", image, "--top-k", "7"]) == "error: --top-k: 7 is more than the served model's 6 classes"
    assert main(["--target", server.target, "predict", image, "--top-k", "6", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["labels"]) == 6


def test_predict_of_a_two_class_model_asks_for_both_classes_and_prints_each_prediction_whole(capsys, tmp_path):
    # The default of 3 classes is more than such a model has, which the server refuses.
    import grpc

    from explaind.v1 import inference_pb2, inference_pb2_grpc
    from test_client_sdk import _serve

    class TwoClasses(inference_pb2_grpc.InferenceServiceServicer):
        def GetModelMetadata(self, request, context):
            return inference_pb2.GetModelMetadataResponse(classifier=inference_pb2.ClassifierInfo(class_names=["cat", "dog"]))

        def Predict(self, request, context):
            if request.top_k > 2:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_k: {request.top_k} is more than the model's 2 classes")
            ranked = inference_pb2.Prediction(labels=["dog", "cat"], class_indices=[1, 0], probabilities=[0.75, 0.25])
            return inference_pb2.PredictResponse(predictions=[ranked] * len(request.images), model_version="v1")

    server, target = _serve(TwoClasses(), add=inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    try:
        short, longer = _png(tmp_path / "a.png", 10), _png(tmp_path / "longer.png", 20)
        with Client(target) as client:
            assert client.model_metadata().normalization is None  # a server that does not say
        assert main(["--target", target, "predict", short, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == [
            {"image": short, "labels": ["dog", "cat"], "class_indices": [1, 0], "probabilities": [0.75, 0.25], "model_version": "v1"}]
        assert main(["--target", target, "predict", short, longer]) == 0
        assert capsys.readouterr().out.splitlines() == [f"{name:<{len(longer)}}  dog 0.75, cat 0.25" for name in (short, longer)]
    finally:
        server.stop(0)


def test_predictions_line_up_after_file_names_of_wide_characters_and_combining_accents(capsys):
    # Padded to the longest name in characters, a CJK name (2 columns a character) pushed
    # its predictions right, a decomposed "é" (2 characters, 1 column) pulled them left.
    from explaind.client import Prediction
    from explaind.client.cli import _names_width, _print_prediction

    names = ["\u732b\u732b.png", "abcd.png", "cafe\u0301.png", "x.png"]  # 8, 8, 8 and 5 columns
    width = _names_width(names)
    for name in names:
        _print_prediction(name, Prediction(["dog"], [1], [0.75], None, "v1"), width)
    assert capsys.readouterr().out.splitlines() == ["\u732b\u732b.png  dog 0.75", "abcd.png  dog 0.75", "cafe\u0301.png  dog 0.75", "x.png     dog 0.75"]


def test_a_file_name_refused_before_any_call_is_escaped_too(capsys, tmp_path):
    # `explaind predict *.png` where a directory matched, named with ESC [2J: the usage error
    # cleared the terminal it was printed on.
    (tmp_path / "c\x1b[2J.png").mkdir()
    assert _usage_error(capsys, ["predict", str(tmp_path / "c\x1b[2J.png")]).endswith(
        f"argument images: {tmp_path}/c\\x1b[2J.png is a directory, not a file\n")
    assert _usage_error(capsys, ["predict", str(tmp_path / "a\nb.png")]).endswith(f"argument images: no such file: {tmp_path}/a\\nb.png\n")
    assert _usage_error(capsys, ["sample-set", "create", "--folder", str(tmp_path / "d\x1b[31m")]).endswith(
        f"argument --folder: no such directory: {tmp_path}/d\\x1b[31m\n")
    # Each other problem's words name it escaped too: a file as --folder, a pipe, a loop of links.
    (tmp_path / "e\x1b[2J").write_bytes(b"")
    assert _usage_error(capsys, ["sample-set", "create", "--folder", str(tmp_path / "e\x1b[2J")]).endswith(
        f"argument --folder: not a directory: {tmp_path}/e\\x1b[2J\n")
    os.mkfifo(tmp_path / "f\x1b[2J.png")
    assert _usage_error(capsys, ["predict", str(tmp_path / "f\x1b[2J.png")]).endswith(
        f"argument images: {tmp_path}/f\\x1b[2J.png is not a regular file but a pipe or a device\n")
    (tmp_path / "g\x1b[2J.png").symlink_to(tmp_path / "g\x1b[2J.png")
    assert _usage_error(capsys, ["predict", str(tmp_path / "g\x1b[2J.png")]).endswith(
        f"argument images: cannot read {tmp_path}/g\\x1b[2J.png: Too many levels of symbolic links\n")


def test_predict_escapes_control_characters_of_file_names_on_the_terminal(server, capsys, tmp_path):
    # A downloaded data set's file named with a line break split its prediction's line in
    # two, and one with an escape sequence (ESC [2J) cleared the terminal it was printed on.
    image = np.full((8, 8, 3), 40, np.uint8)
    split, clearing, empty = tmp_path / "a\nb.png", tmp_path / "c\x1b[2J.png", tmp_path / "d\x1b[31m.png"
    Image.fromarray(image).save(split)
    Image.fromarray(image).save(clearing)
    empty.write_bytes(b"")
    assert main(["--target", server.target, "predict", str(split), str(clearing), str(empty), "--keep-going"]) == 3
    printed = capsys.readouterr()
    assert [line.split("  ")[0] for line in printed.out.splitlines()] == [f"{tmp_path}/a\\nb.png", f"{tmp_path}/c\\x1b[2J.png"]
    assert printed.err.startswith(f"error: {tmp_path}/d\\x1b[31m.png: INVALID_ARGUMENT: ")
    assert main(["--target", server.target, "predict", str(empty)]) == 1  # the note naming the file that failed the call
    assert f"  that is file {tmp_path}/d\\x1b[31m.png\n" in capsys.readouterr().err


def _require_utf8(value):
    """``value``, parsed JSON, as a strict parser would take it: UTF-8 throughout, escapes
    included (a "\\udcff" escape, a lone surrogate, is none: Go's and Rust's parsers refuse it)."""
    json.dumps(value, ensure_ascii=False).encode("utf-8", "strict")  # raises on a lone surrogate
    return value


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="the name's bytes are UTF-8's undecodable ones")
def test_json_output_writes_a_file_name_s_undecodable_bytes_as_backslash_x_not_lone_surrogates(server, capsys, tmp_path, monkeypatch):
    # A file named in Latin-1 on a UTF-8 system reached --json as "\udcff", which strict parsers refuse.
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.png")
    _png(name, 0)
    printed = _require_utf8(_json_out(capsys, ["--target", server.target, "predict", name, "--json"]))
    assert printed[0]["image"] == f"{tmp_path}/caf\\xe9.png" and len(printed[0]["labels"]) == 3
    # A failure's words too: the output file it cannot write, refused before any call. (stderr
    # writes its surrogates as the interpreter's own does, not strictly as capsys's.)
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace"))
    grid = os.fsdecode(os.fsencode(str(tmp_path)) + b"/missing/\xff.png")
    assert main(["--target", server.target, "evaluate", "s", "--grid", grid, "--json"]) == 1
    error = _require_utf8(json.loads(capsys.readouterr().out))["error"]
    assert error["message"] == f"cannot write {tmp_path}/missing/\\xff.png: no such directory", error


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="the name's bytes are UTF-8's undecodable ones")
@pytest.mark.parametrize("argv", [["predict", "{name}"], ["predict", "--max-in-flight", "{name}", "x.png"],
                                  ["evaluate", "s", "--grid", "{tmp}/missing/{name}"], ["{name}"]])
def test_stderr_writes_a_file_name_s_undecodable_bytes_as_backslash_x_as_stdout_does(capsys, tmp_path, monkeypatch, argv):
    # stderr showed them "\udce9" (the interpreter's backslashreplace), and an argument
    # quoted in a message ("got '...'") too, where stdout shows "\xe9".
    name = os.fsdecode(b"caf\xe9.png")
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    monkeypatch.setattr(sys, "stderr", stderr)
    with contextlib.suppress(SystemExit):  # argparse's usage errors exit 2
        main(["--target", "127.0.0.1:1", *(a.format(name=name, tmp=tmp_path) for a in argv)])
    written = stderr.buffer.getvalue().decode("utf-8")
    assert "caf\\xe9.png" in written and "udc" not in written, written
    assert stderr.errors == "backslashreplace"  # as it was, for a program calling main in-process


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="the name's bytes are UTF-8's undecodable ones")
def test_every_byte_that_does_not_decode_is_shown_as_backslash_x_the_lowest_and_highest_too():
    # Python holds bytes 0x80..0xff that do not decode as U+DC80..U+DCFF; a lone surrogate
    # below them came from no byte, and is shown as backslashreplace writes it.
    from explaind.client.cli import _shown_text

    assert _shown_text(os.fsdecode(b"\x80caf\xe9\xff.png")) == "\\x80caf\\xe9\\xff.png"
    assert _shown_text("\udc7f.png") == "\\udc7f.png"


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="the name's bytes are UTF-8's undecodable ones")
def test_a_message_quoting_an_argument_rewrites_only_an_undecodable_byte_s_escape_not_what_was_typed():
    # An argument typed with a backslash (caf\udce9, a backslash and five characters) holds no
    # byte that did not decode: quoted, it reads as typed; a backslash before such a byte stays.
    from explaind.client.cli import _quoted

    byte = os.fsdecode(b"\xe9")
    assert _quoted(f"caf{byte}") == "'caf\\xe9'"
    assert _quoted("caf\\udce9") == repr("caf\\udce9")
    assert _quoted(f"caf\\{byte}") == "'caf\\\\\\xe9'"


@pytest.mark.parametrize(("argv", "in_flight"), [([], 4), (["--max-in-flight", "1"], 1), (["--max-in-flight", "9"], 9)])
def test_predict_keeps_max_in_flight_requests_in_flight(server, capsys, tmp_path, monkeypatch, argv, in_flight):
    asked = []
    predictions = Client.predictions

    def recording(self, images, **options):
        asked.append(options["max_in_flight"])
        return predictions(self, images, **options)

    monkeypatch.setattr(Client, "predictions", recording)
    images = [_png(tmp_path / f"{i}.png", 10 + i) for i in range(3)]
    assert main(["--target", server.target, "predict", *images, "--json", *argv]) == 0
    assert asked == [in_flight]
    assert [len(p["labels"]) for p in json.loads(capsys.readouterr().out)] == [3, 3, 3]


def test_an_image_the_server_refuses_is_named_by_its_file(server, capsys, tmp_path):
    good, bad = _png(tmp_path / "good.png", 10), tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["--target", server.target, "predict", good, str(bad)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"  that is file {bad}"
    # The server counts a later request's images from its first: images[1] of the second request is the last file.
    with Client(server.target, timeout=30) as client:
        per_request = client.model_metadata().max_batch_size
    goods = [_png(tmp_path / f"{i}.png", i) for i in range(per_request + 1)]
    assert main(["--target", server.target, "predict", *goods, str(bad)]) == 1
    err = capsys.readouterr().err
    assert "images[1]" in err and err.splitlines()[-1] == f"  that is file {bad}", err
    folder = tmp_path / "folder"
    (folder / "heart").mkdir(parents=True)
    for i in range(3):
        _png(folder / "heart" / f"{i}.png", i)
    (folder / "heart" / "1.png").write_bytes(b"broken")
    assert main(["--target", server.target, "sample-set", "create", "--folder", str(folder)]) == 1
    assert f"  that is file {folder / 'heart' / '1.png'}" in capsys.readouterr().err.splitlines()


def _files_of_two_requests(server, tmp_path) -> tuple[list[str], Path]:
    """A request's worth of good files (the server's batch size), then a good file and an
    unreadable one (its image refused): the second request fails, the first is answered."""
    with Client(server.target, timeout=30) as client:
        per_request = client.model_metadata().max_batch_size
    goods = [_png(tmp_path / f"{i}.png", i) for i in range(per_request + 1)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    return goods, bad


def test_predict_prints_the_files_answered_before_a_failing_request_then_its_error(server, capsys, tmp_path):
    # predict printed nothing until every file was answered: one failing request lost the
    # lines of every file answered before it (a pipeline of 50,000 files saw none for minutes).
    goods, bad = _files_of_two_requests(server, tmp_path)
    assert main(["--target", server.target, "predict", *goods, str(bad)]) == 1
    printed = capsys.readouterr()
    assert [line.split()[0] for line in printed.out.splitlines()] == goods[:-1]
    assert printed.err.splitlines()[-1] == f"  that is file {bad}"


def _written_before_the_second_request(monkeypatch, argv: list[str]) -> tuple[str, io.BytesIO]:
    """What a buffered standard output, as to a pipe (`explaind predict ... | tee`), had
    passed on when the command sent its second request, and all it wrote by its end."""
    written = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(written, encoding="utf-8"))
    out_at_the_second_request = []
    call_at = Client._call_at

    def noting_the_output(self, offset, *args, **kwargs):
        if offset:
            out_at_the_second_request.append(written.getvalue().decode())
        return call_at(self, offset, *args, **kwargs)

    monkeypatch.setattr(Client, "_call_at", noting_the_output)
    assert main(argv) == 0
    sys.stdout.flush()
    return out_at_the_second_request[0], written


def test_predict_writes_each_line_out_before_the_next_request(server, tmp_path, monkeypatch):
    # Printed but not flushed, a line to a pipe reached its reader only once the buffer
    # filled or the command ended.
    goods, _ = _files_of_two_requests(server, tmp_path)
    before, _ = _written_before_the_second_request(monkeypatch, ["--target", server.target, "predict", *goods, "--max-in-flight", "1"])
    assert [line.split()[0] for line in before.splitlines()] == goods[:-1]


def test_predict_interrupted_keeps_the_lines_of_the_files_answered_before(server, capsys, tmp_path, monkeypatch):
    goods, bad = _files_of_two_requests(server, tmp_path)
    call_at = Client._call_at
    calls = []

    def interrupted_at_the_second(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # where Ctrl-C lands while the second request's answer is on its way
        return call_at(self, *args, **kwargs)

    monkeypatch.setattr(Client, "_call_at", interrupted_at_the_second)
    assert main(["--target", server.target, "predict", *goods, str(bad), "--max-in-flight", "1"]) == 130
    printed = capsys.readouterr()
    assert [line.split()[0] for line in printed.out.splitlines()] == goods[:-1] and printed.err == "interrupted\n"


def _json_lines(out: str) -> list[dict]:
    """What --json-lines wrote: one JSON object per line."""
    return [json.loads(line) for line in out.splitlines()]


def test_predict_json_lines_writes_each_file_s_entry_before_the_last_request_is_answered(server, tmp_path, monkeypatch, capsys):
    # --json printed its list only once every file was answered: a script piping thousands
    # of images got nothing until the end.
    goods, _ = _files_of_two_requests(server, tmp_path)
    assert main(["--target", server.target, "predict", *goods, "--max-in-flight", "1", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    before, written = _written_before_the_second_request(
        monkeypatch, ["--target", server.target, "predict", *goods, "--max-in-flight", "1", "--json-lines"])
    assert _json_lines(before) == listed[:-1]  # the two requests' second is the last
    assert _json_lines(written.getvalue().decode()) == listed  # each line the entry of --json's list, in order


def test_predict_json_lines_failing_mid_way_keeps_the_lines_answered_then_the_error_as_the_last(server, capsys, tmp_path, monkeypatch):
    goods, bad = _files_of_two_requests(server, tmp_path)
    assert main(["--target", server.target, "predict", *goods, str(bad), "--json-lines"]) == 1
    *answered, failure = _json_lines(capsys.readouterr().out)
    assert [entry["image"] for entry in answered] == goods[:-1] and all(entry["labels"] for entry in answered)
    assert failure["error"]["code"] == "INVALID_ARGUMENT" and failure["error"]["notes"][-1] == f"that is file {bad}"
    # Ctrl-C as the second request's answer is on its way: the first's lines, then the interrupt's.
    call_at = Client._call_at
    calls = []

    def interrupted_at_the_second(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return call_at(self, *args, **kwargs)

    monkeypatch.setattr(Client, "_call_at", interrupted_at_the_second)
    assert main(["--target", server.target, "predict", *goods, str(bad), "--max-in-flight", "1", "--json-lines"]) == 130
    *answered, failure = _json_lines(capsys.readouterr().out)
    assert [entry["image"] for entry in answered] == goods[:-1] and failure["error"]["code"] == "INTERRUPTED"


def test_predict_json_lines_cut_short_by_ctrl_c_puts_its_error_on_a_line_of_its_own(server, tmp_path, monkeypatch):
    # A line larger than a slow reader's pipe holds, half written as Ctrl-C or SIGTERM came:
    # the error went on after it on the same line, so neither that line nor the error parsed.
    goods, _ = _files_of_two_requests(server, tmp_path)

    class CutAtTheSecondLine(io.StringIO):
        def write(self, text: str) -> int:
            if f'"image": {json.dumps(goods[1])}' in text:
                super().write(text[: len(text) // 2])
                raise KeyboardInterrupt
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", CutAtTheSecondLine())
    assert main(["--target", server.target, "predict", *goods, "--json-lines"]) == 130
    first, cut, failure = sys.stdout.getvalue().splitlines()
    assert json.loads(first)["image"] == goods[0] and cut.startswith('{"image": ') and not cut.endswith("}")
    assert json.loads(failure)["error"]["code"] == "INTERRUPTED"


def test_predict_json_lines_keeping_going_writes_a_failed_file_s_error_entry_in_its_place(server, capsys, tmp_path):
    goods, bad = _files_of_two_requests(server, tmp_path)
    files = [goods[0], str(bad), goods[1]]
    assert main(["--target", server.target, "predict", *files, "--keep-going", "--max-in-flight", "1", "--json"]) == 3
    listed = json.loads(capsys.readouterr().out)
    assert main(["--target", server.target, "predict", *files, "--keep-going", "--max-in-flight", "1", "--json-lines"]) == 3
    lines = _json_lines(capsys.readouterr().out)
    assert lines == listed and [entry["image"] for entry in lines] == files and lines[1]["error"]["code"] == "INVALID_ARGUMENT"


def test_predict_takes_json_or_json_lines_not_both(capsys, tmp_path):
    image = _png(tmp_path / "a.png", 10)
    err = _usage_error(capsys, ["predict", image, "--json", "--json-lines"])
    assert "error: give --json (one list, once every file is answered) or --json-lines" in err and "not both" in err


def test_a_server_error_about_an_image_past_the_files_given_names_no_file():
    # An index beyond the caller's files (a faulty or other server's) must not end in an IndexError.
    from explaind.client import InvalidArgumentError
    from explaind.client.cli import _naming_failing_file

    error = InvalidArgumentError("images[2]: not an image", field_violations=[("images[2]", "not an image")])
    with pytest.raises(InvalidArgumentError) as raised, _naming_failing_file(["a.png", "b.png"]):
        raise error
    assert raised.value is error and not hasattr(error, "__notes__")


def test_a_server_error_about_another_field_quoting_an_image_index_names_no_file():
    # Only a refusal about the field images lists its images[i] in its text: a set's own
    # id that reads so, refused, is no file sent.
    from explaind.client import AlreadyExistsError
    from explaind.client.cli import _naming_failing_file

    error = AlreadyExistsError("sample_set_id: sample set 'images[1]' already exists", field="sample_set_id")
    with pytest.raises(AlreadyExistsError), _naming_failing_file(["a.png", "b.png"]):
        raise error
    assert not hasattr(error, "__notes__")

def test_a_predict_refusal_listing_images_the_model_gives_no_usable_logits_for_names_their_files():
    # The refusal's field is images, its images[i] in the text (counted within the failing
    # request): the command named no file, where it names one for an images[i] field. An
    # older server lists them in the text alone, without precondition violations.
    from explaind.client import FailedPreconditionError
    from explaind.client.cli import _naming_failing_file
    from explaind.engine.core import _unusable_rows

    files = [f"{i}.png" for i in range(8)]
    for bad, note in (([1], "that is file 5.png"), ([0, 3], "those are files 4.png, 7.png")):
        refused = _unusable_rows(bad, "logits", "images")
        error = FailedPreconditionError(str(refused), field=refused.field)
        error.request_offset = 4
        with pytest.raises(FailedPreconditionError), _naming_failing_file(files):
            raise error
        assert error.__notes__ == [note]


def _terminated_after_lines(argv: list[str], stream: str, lines: int) -> subprocess.CompletedProcess:
    """Run the CLI with ``argv`` in a subprocess, send it SIGTERM once it has written
    ``lines`` lines on ``stream`` (it waits on a job by then), and return what it did."""
    command = subprocess.Popen([sys.executable, "-m", "explaind.client.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    written = "".join(getattr(command, stream).readline() for _ in range(lines))
    command.send_signal(signal.SIGTERM)  # what cron's `timeout` and a systemd stop send
    out, err = command.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, command.returncode, out if stream == "stderr" else written + out,
                                       err if stream == "stdout" else written + err)


def test_sigterm_stops_a_wait_as_ctrl_c_does_saying_what_became_of_the_job(server, tmp_path):
    # The CLI died at once with 143: a job it started ran on, and no word said so, nor --json's stdout.
    with Client(server.target, timeout=30) as client:
        job = client.visualize_neurons([3], method="feature_visualization", steps=10_000)
        try:
            watched = _terminated_after_lines(["--target", server.target, "operations", "watch", job.name], "stdout", 1)
            assert watched.returncode == 143, watched
            assert watched.stderr == f"terminated\n  {job.name} goes on; explaind operations cancel {job.name} stops it\n"
            assert not job.refresh().done  # not this command's job: only the waiting stopped
            # Its second line on stderr is the progress of the job it started: it waits on it.
            started = _terminated_after_lines(["--target", server.target, "visualize", "5", "--method", "feature_visualization",
                                               "--steps", "10000", "--out-dir", str(tmp_path), "--json"], "stderr", 2)
            assert started.returncode == 143, started
            error = json.loads(started.stdout)["error"]  # the one JSON value, as a failure's
            name = error["operation"]
            assert (error["code"], error["message"], error["notes"]) == ("INTERRUPTED", "terminated", [f"cancelled {name}"]), error
            assert started.stderr.startswith(f"started {name}\n") and started.stderr.endswith(f"terminated\n  cancelled {name}\n")
            assert client.operation(name).state == "cancelled"  # queued behind the first: it ends at once
        finally:
            job.cancel()


def test_a_second_sigterm_does_not_stop_the_cancel_of_the_job_the_first_stopped(server, capsys, monkeypatch, tmp_path):
    # coreutils' timeout sends SIGTERM to the command and then to its process group: the second,
    # landing in the cancel the first began, ended the command with its job still running and no word.
    watch, cancel = Operation.watch, Operation._cancel_unless_asked_by_another_run

    def watch_until_terminated(self, *args, **kwargs):
        for update in watch(self, *args, **kwargs):
            yield update
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the signal ends it

    def cancel_terminated_again(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # where the second signal's handler runs
        return cancel(self, *args, **kwargs)

    monkeypatch.setattr(Operation, "watch", watch_until_terminated)
    monkeypatch.setattr(Operation, "_cancel_unless_asked_by_another_run", cancel_terminated_again)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--target", server.target, "visualize", "5", "--method", "feature_visualization", "--steps", "10000",
                 "--out-dir", str(tmp_path), "--json"]) == 143
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is before
    error = json.loads(capsys.readouterr().out)["error"]
    name = error["operation"]
    with Client(server.target, timeout=30) as client:
        job = client.operation(name)
        try:
            assert job.cancel_requested and error["notes"] in ([f"cancelled {name}"], [f"cancel requested for {name} (running); it ends at its next check"]), error
        finally:
            job.cancel()


def test_sigterm_stopping_a_job_the_sdk_started_inside_a_command_names_it_as_operation(server, capsys, monkeypatch, world_images, tmp_path):
    # report (and rank) wait through the SDK, which started the job: the --json error's operation was null,
    # its name only in the note.
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:24], (labels[:24] + 1) % 6, sample_set_id="terminated-report")
        name = client.model_metadata().class_names[int((labels[0] + 1) % 6)]
    watch = Operation.watch

    def watch_until_terminated(self, *args, **kwargs):
        for update in watch(self, *args, **kwargs):
            yield update
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the signal ends it

    monkeypatch.setattr(Operation, "watch", watch_until_terminated)
    assert main(["--target", server.target, "report", "--class", name, "--sample-set", "terminated-report", "--neurons", "1",
                 "--steps", "10000", "--stability", "0", "--out", str(tmp_path / "r.html"), "--json"]) == 143
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "INTERRUPTED" and error["operation"] is not None, error
    stopped, *stored = error["notes"]
    assert error["operation"] in stopped, error
    # The edit, the first job watched, may store its version before the cancel reaches it or while the report waits
    # for it to end (on a loaded machine, about one run in three): then that version is named too.
    assert stored == [] or (len(stored) == 1 and re.fullmatch(r"head version v\d+, the suggested edit, stays stored \(not served\); .*",
                                                              stored[0])), error


def test_sigterm_in_the_visualisations_of_a_report_told_to_discard_its_edit_says_it_was_not_kept(server, capsys, monkeypatch, world_images,
                                                                                                 tmp_path):
    # SIGTERM (raised like Ctrl-C) meets --discard-edit: the version deleted before the
    # images stays deleted, the --json error names the visualisation job it stopped and
    # notes its cancel and the command that stores the edit again; exit status 143.
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:24], (labels[:24] + 1) % 6, sample_set_id="terminated-discard")
        name = client.model_metadata().class_names[int((labels[0] + 1) % 6)]
        before = {v.version_id for v in client.head_versions()}
    watch = Operation.watch

    def watch_visualisations_until_terminated(self, *args, **kwargs):
        for update in watch(self, *args, **kwargs):
            yield update
            if self.kind == "visualize_neurons":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)  # the signal ends it

    monkeypatch.setattr(Operation, "watch", watch_visualisations_until_terminated)
    try:
        assert main(["--target", server.target, "report", "--class", name, "--sample-set", "terminated-discard", "--neurons", "1",
                     "--steps", "10000", "--stability", "0", "--out", str(tmp_path / "r.html"), "--discard-edit", "--json"]) == 143
    finally:
        monkeypatch.undo()
        with Client(server.target, timeout=30) as client:
            after = {v.version_id for v in client.head_versions()}
            client.delete_sample_set("terminated-discard")
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["code"], error["message"]) == ("INTERRUPTED", "terminated") and after == before, error
    cancelled, stored_again = error["notes"]
    assert error["operation"] in cancelled and not (tmp_path / "r.html").exists()
    assert re.fullmatch(r"head version v\d+, the suggested edit, was not kept; explaind edit-head terminated-discard .* stores it again",
                        stored_again), stored_again


def _stuck_exits_recorded(monkeypatch, *, grace: bool = False) -> list[int]:
    """The statuses a stuck command's exit would end the process with (os._exit patched to
    record them), its grace after a SIGTERM's deadline none (the test waits for its timer)
    unless ``grace``: a test whose deadline :func:`_deadline_passing_now` passes at once
    keeps it, and checks the timer's length with it."""
    import explaind.client.cli as cli

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    if not grace:
        monkeypatch.setattr(cli, "TERMINATED_GRACE_S", 0.0)
    return exits


def _wait_for_an_exit(exits: list[int]) -> None:
    """Wait up to a minute for the stuck command's exit (os._exit patched to append to ``exits``):
    the close that never returns stands still meanwhile."""
    for _ in range(6000):
        if exits:
            return
        time.sleep(0.01)


def _deadline_passing_now(exits: list[int], timeout: float) -> None:
    """The SIGTERM's deadline (a --timeout the test never reaches) passing now, where the
    command stands still: its exit (os._exit patched: :func:`_stuck_exits_recorded`) comes
    once the command got here, not on a 0.01 s timer, which a loaded machine let fire before
    the command had done what its words then lacked. Once only: an exit ends the process.
    The timer still counting down: a previous command's, cancelled as it ended, may keep its
    thread (of the same name) alive a moment longer on a loaded machine, first in the list.
    Its length checked first: the command's ``timeout`` and TERMINATED_GRACE_S after the signal."""
    import explaind.client.cli as cli

    if not exits:
        [timer] = [thread for thread in threading.enumerate()
                   if thread.name == cli.TERMINATED_DEADLINE_THREAD and not thread.finished.is_set()]
        assert timer.interval == timeout + cli.TERMINATED_GRACE_S > timeout, (timer.interval, timeout)
        timer.cancel()
        timer.function(*timer.args, **timer.kwargs)


def _closing_then_terminated(close: Callable[[Client], None]) -> Callable[[Client], None]:
    """A ``Client.close`` that closes, then takes a SIGTERM (a systemd stop) there."""
    def closing(self: Client) -> None:
        close(self)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the signal ends it
    return closing


def _closing_then_terminated_and_stuck(close: Callable[[Client], None], exits: list[int]) -> Callable[[Client], None]:
    """A ``Client.close`` that takes its SIGTERM and then stands still all the same, until
    the process's exit by its deadline (``exits``: :func:`_stuck_exits_recorded`)."""
    def closing(self: Client) -> None:
        close(self)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # its interrupt lands here
            time.sleep(60)
        finally:
            _wait_for_an_exit(exits)
    return closing


def test_a_command_stuck_after_sigterm_exits_143_all_the_same(monkeypatch, capsys):
    # SIGTERM landing inside gRPC's call setup could leave a lock held that closing the channel waited on forever.
    import explaind.client.cli as cli

    exits = _stuck_exits_recorded(monkeypatch)
    before = signal.getsignal(signal.SIGTERM)
    with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=0.01, json=True)):
        with pytest.raises(cli._Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the signal ends it
        _wait_for_an_exit(exits)
    assert exits == [143] and signal.getsignal(signal.SIGTERM) is before
    out, err = capsys.readouterr()
    assert json.loads(out)["error"] == {"code": "INTERRUPTED", "message": "terminated", "field": None, "option": None,
                                        "option_defaulted": None, "precondition_violations": [], "reason": None, "quota_violations": [], "notes": [], "retry_delay_seconds": None, "operation": None, "requested_again": None}
    assert err.startswith("terminated\n  (the command did not end within 0.01 s of SIGTERM; a job it started may still run"), err
    # A command that ends in time is not cut short afterwards: main called in-process returns to its caller.
    with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=0.01, json=True)), pytest.raises(cli._Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    time.sleep(0.5)  # well past its deadline
    assert exits == [143] and capsys.readouterr() == ("", "")


@pytest.mark.parametrize("stuck_in", ["start_again", "cancel"])
def test_a_search_for_a_sigterm_s_job_cut_short_by_the_exit_still_names_its_request_id_or_job(monkeypatch, capsys, stuck_in):
    # SIGTERM inside a job's start: the search for its job (metadata, the start again, the cancel), each call up to
    # --timeout, outlasted the exit at --timeout + 5 s, whose words named no request_id: only the listing.
    import explaind.client.cli as cli
    from explaind.client._interrupted import started_job

    exits = _stuck_exits_recorded(monkeypatch, grace=True)
    job = types.SimpleNamespace(name="operations/00000000000000bb", state="running", done=False, requested_again=False, _left_for_another_run=False)
    starts: list[str] = []

    def stuck(*_args):  # a server slow to answer: until the exit
        _deadline_passing_now(exits, 600)

    def start(request_id):
        starts.append(request_id)
        if len(starts) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the signal ends it
        if stuck_in == "start_again":
            stuck()
        return job

    job._cancel_unless_asked_by_another_run = stuck
    client = types.SimpleNamespace(model_metadata=lambda: types.SimpleNamespace(capabilities=("request_id",)))
    with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=600, json=True)):
        with pytest.raises(cli._Terminated):
            started_job(client, start, started_by="this command", rerun_hint=False)
    out, err = capsys.readouterr()
    assert exits == [143] and len(starts) == 2, (exits, starts)
    note = (f"a job may have started under request_id {starts[0]}, looked for to cancel it, which was cut short: explaind operations "
            "list shows it, and explaind operations cancel NAME stops it" if stuck_in == "start_again" else
            f"{job.name} may still be running: cancelling it was cut short; explaind operations cancel {job.name} stops it")
    assert err == ("terminated\n  (the command did not end within 605 s of SIGTERM; a job it started may still run: explaind "
                   f"operations list)\n  {note}\n"), err
    error = json.loads(out)["error"]
    assert (error["message"], error["notes"], error["operation"]) == ("terminated", [note], None if stuck_in == "start_again" else job.name)


def test_an_exit_after_the_search_for_a_sigterm_s_job_ended_still_names_what_it_found(monkeypatch, capsys):
    # The search ended (its job not found: a server slow to answer), then the channel's close stood still (a lock a
    # SIGTERM inside gRPC's call setup left held): the exit's words named neither the request_id nor what became of it.
    import explaind.client.cli as cli
    from explaind.client._errors import DeadlineExceededError
    from explaind.client._interrupted import started_job

    exits = _stuck_exits_recorded(monkeypatch, grace=True)
    starts: list[str] = []

    def start(request_id):
        starts.append(request_id)
        if len(starts) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the signal ends it
        raise DeadlineExceededError("no answer")

    client = types.SimpleNamespace(model_metadata=lambda: types.SimpleNamespace(capabilities=("request_id",)))
    with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=600, json=True)):
        with pytest.raises(cli._Terminated):
            try:
                started_job(client, start, started_by="this command", rerun_hint=False)
            finally:
                _deadline_passing_now(exits, 600)  # the channel's close, stuck
    out, err = capsys.readouterr()
    note = (f"a job may have started under request_id {starts[0]}, not found (DEADLINE_EXCEEDED: no answer): explaind operations list "
            "shows it, and explaind operations cancel NAME stops it")
    assert exits == [143] and err.endswith(f"operations list)\n  {note}\n"), err
    assert json.loads(out)["error"]["notes"] == [note]


def test_an_exit_stuck_after_a_sigterm_stopped_a_ctrl_c_s_search_names_what_the_ctrl_c_left(monkeypatch, capsys):
    # The SIGTERM, taken in the Ctrl-C's search as a second interrupt, ended it; the channel's close then stood still.
    import explaind.client.cli as cli
    from explaind.client._interrupted import started_job

    exits = _stuck_exits_recorded(monkeypatch, grace=True)
    starts: list[str] = []

    def start(request_id):
        starts.append(request_id)
        if len(starts) == 1:
            raise KeyboardInterrupt  # Ctrl-C inside the start
        os.kill(os.getpid(), signal.SIGTERM)  # then SIGTERM while the start is sent again
        time.sleep(60)  # the signal ends it

    client = types.SimpleNamespace(model_metadata=lambda: types.SimpleNamespace(capabilities=("request_id",)))
    with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=600, json=True)):
        with pytest.raises(KeyboardInterrupt):
            try:
                started_job(client, start, started_by="this command", rerun_hint=False)
            finally:
                _deadline_passing_now(exits, 600)  # the channel's close, stuck
    out, err = capsys.readouterr()
    note = (f"a job may have started under request_id {starts[0]}, not found (interrupted again): explaind operations list shows it, "
            "and explaind operations cancel NAME stops it")
    assert exits == [143] and err.endswith(f"operations list)\n  {note}\n"), err
    assert json.loads(out)["error"]["notes"] == [note]


def test_a_second_ctrl_c_as_the_search_for_a_start_s_job_ends_leaves_it_followed_no_more(monkeypatch):
    # One landing as the search's words were called off skipped forgetting the interrupt: a later SIGTERM's exit (main
    # called in-process again, from a notebook) printed that stale interrupt's notes as its own.
    import explaind.client._interrupted as _interrupted

    class Timer:  # the search's words, whose calling off the second Ctrl-C lands in
        daemon = False

        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            pass

        def cancel(self):
            raise KeyboardInterrupt

    def start(request_id):
        raise KeyboardInterrupt  # the first Ctrl-C, inside the start

    monkeypatch.setattr(_interrupted, "threading", types.SimpleNamespace(Timer=Timer))
    client = types.SimpleNamespace(model_metadata=lambda: types.SimpleNamespace(capabilities=()))
    with pytest.raises(KeyboardInterrupt):
        _interrupted.started_job(client, start, started_by="the report")
    assert _interrupted.interrupt_being_followed() is None


def test_sigterm_after_ctrl_c_exits_143_as_sigterm_does(monkeypatch, capsys):
    # The SIGTERM, in the Ctrl-C's search for the job its start left, was taken as a second Ctrl-C: exit 130, "interrupted".
    starts: list[str] = []

    def interrupted_then_terminated(self, *args, request_id, **kwargs):
        starts.append(request_id)
        if len(starts) == 1:
            raise KeyboardInterrupt  # Ctrl-C inside the start
        os.kill(os.getpid(), signal.SIGTERM)  # then SIGTERM (a systemd stop) while the start is sent again
        time.sleep(60)  # the signal ends it

    monkeypatch.setattr(Client, "evaluate_sample_set", interrupted_then_terminated)
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: types.SimpleNamespace(capabilities=("request_id",)))
    assert main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "600", "evaluate", "some-set", "--json"]) == 143
    out, err = capsys.readouterr()
    note = (f"a job may have started under request_id {starts[0]}, not found (interrupted again): this command again with --request-id "
            f"{starts[0]} --no-wait names it (starting it if none did), and explaind operations cancel NAME stops it")
    assert err == f"terminated\n  {note}\n", err
    error = json.loads(out)["error"]
    assert (error["code"], error["message"], error["notes"]) == ("INTERRUPTED", "terminated", [note]), error


def test_sigterm_in_the_cancel_of_the_job_a_ctrl_c_s_search_found_names_that_job_as_operation(monkeypatch, capsys):
    # Exit 143 as SIGTERM's, with the Ctrl-C's notes and the job its search found, which a script cancels by name.
    job_name = "operations/00000000000000cc"
    starts: list[str] = []

    def cancel():
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM (a systemd stop) while the job found is cancelled
        time.sleep(60)  # the signal ends it

    job = types.SimpleNamespace(name=job_name, state="running", done=False, requested_again=False, _cancel_unless_asked_by_another_run=cancel, _left_for_another_run=False)

    def interrupted_then_found(self, *args, request_id, **kwargs):
        starts.append(request_id)
        if len(starts) == 1:
            raise KeyboardInterrupt  # Ctrl-C inside the start
        return job  # the start sent again finds its job

    monkeypatch.setattr(Client, "evaluate_sample_set", interrupted_then_found)
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: types.SimpleNamespace(capabilities=("request_id",)))
    assert main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "600", "evaluate", "some-set", "--json"]) == 143
    error = json.loads(capsys.readouterr().out)["error"]
    note = f"{job_name} may still be running: cancelling it failed (interrupted again); explaind operations cancel {job_name} stops it"
    assert (error["code"], error["message"], error["notes"], error["operation"]) == ("INTERRUPTED", "terminated", [note], job_name), error
    assert error["requested_again"] is False


def test_sigterm_in_the_channel_s_close_after_the_json_was_written_prints_no_second_value(server, capsys, monkeypatch):
    # The command's value was out; the error a SIGTERM met closing the channel followed it as a
    # second value, and `explaind info --json | jq` or json.loads of the whole output failed.
    import explaind.client.cli as cli

    close = Client.close

    monkeypatch.setattr(Client, "close", _closing_then_terminated(close))
    assert main(["--target", server.target, "head-versions", "list", "--json"]) == 143  # printed before the client closes
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and isinstance(json.loads(out), list), out  # the value alone
    assert err == "terminated\n", err
    # Nor where the close never ends and the process exits by its deadline: its words say terminated, with no JSON.
    exits = _stuck_exits_recorded(monkeypatch)
    args = argparse.Namespace(timeout=0.01, json=True)
    with cli._terminating_like_ctrl_c(args):
        with pytest.raises(cli._Terminated):
            cli._print_json({"done": True}, args)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the signal ends it
        _wait_for_an_exit(exits)
    out, err = capsys.readouterr()
    assert exits == [143] and out == '{"done": true}\n' and err.startswith("terminated\n"), (out, err)


def test_sigterm_while_the_json_is_written_puts_its_error_on_a_line_of_its_own():
    # A value larger than the pipe holds, its reader slow: the signal cut it, and the error went on
    # the same line, after it, so neither the last line nor the whole output parsed.
    cut = """
import argparse, sys
import explaind.client.cli as cli
args = argparse.Namespace(timeout=5.0, json=True, run=lambda args: cli._print_json({"mistakes": list(range(300_000))}, args))
cli.parse_arguments = lambda argv: args
sys.exit(cli.main([]))
"""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    command = subprocess.Popen([sys.executable, "-c", cut], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    assert command.stdout.read(1) == b"{"  # it writes, and waits for the pipe
    time.sleep(1)  # blocked on the full pipe
    command.send_signal(signal.SIGTERM)
    out, err = command.communicate(timeout=60)
    assert command.returncode == 143, err
    assert json.loads(out.decode().splitlines()[-1])["error"]["code"] == "INTERRUPTED", out[-300:]


def test_sigterm_once_the_command_has_run_does_not_cut_short_the_words_saying_how_it_ended(monkeypatch):
    # Its output (or an error's) being written, a SIGTERM raised there and replaced it with
    # a second outcome, "terminated"; it now only bounds how long they take.
    import explaind.client.cli as cli

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=0.2, json=True)) as ran:
        ran()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs, and raises nothing
    time.sleep(0.5)  # past the bound: the timer was cancelled as the words were out
    assert exits == []


def test_a_command_stuck_after_sigterm_exits_though_nobody_reads_its_output():
    # Its stdout a full pipe whose reader had stopped reading: the safety exit wrote its
    # error there first, and blocked on it like the command.
    stuck = """
import argparse, sys
import explaind.client.cli as cli
cli.TERMINATED_GRACE_S = 0.0
args = argparse.Namespace(timeout=0.5, json=True, run=lambda args: cli._print_json({"mistakes": list(range(300_000))}, args))
cli.parse_arguments = lambda argv: args
sys.exit(cli.main([]))
"""
    command = subprocess.Popen([sys.executable, "-c", stuck], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert command.stdout.read(1) == b"{"  # it writes, and waits for the pipe, which is read no more
    time.sleep(1)
    command.send_signal(signal.SIGTERM)
    try:
        assert command.wait(timeout=30) == 143
    finally:
        command.kill()
        command.communicate()


def test_sigterm_with_a_timeout_beyond_what_a_timer_takes_stops_the_command_without_a_traceback(monkeypatch):
    # --timeout 1e10 (about "none"): the safety timer's thread failed with OverflowError, its traceback on stderr.
    import threading

    import explaind.client.cli as cli

    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda failure: failures.append(failure.exc_value))
    with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=1e10, json=True)), pytest.raises(cli._Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the signal ends it
    time.sleep(0.2)  # the timer's thread has started and, cancelled, ended
    assert failures == []


def test_a_command_whose_sigterm_is_ignored_keeps_ignoring_it():
    # `trap '' TERM` (or a supervisor's SIG_IGN) before the command: the handler undid it and a SIGTERM stopped it.
    import explaind.client.cli as cli

    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=0.01, json=True)):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # where a handler would run
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    except cli._Terminated:  # not KeyboardInterrupt's, which would end the test run
        pytest.fail("a SIGTERM the process ignores stopped the command")
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_command_stuck_after_sigterm_keeps_what_it_printed_before():
    # os._exit skips the flush at exit: a result printed before the stuck close, still in stdout's
    # buffer (a pipe, a file), was lost, where --json's error was flushed.
    stuck = """
import argparse, os, signal, time
import explaind.client.cli as cli
cli.TERMINATED_GRACE_S = 0.0
with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=0.01, json=False)):
    print("the result")
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the signal ends it
    except cli._Terminated:
        time.sleep(60)  # the close that never returns
"""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # stdout buffered, as usual
    ended = subprocess.run([sys.executable, "-c", stuck], capture_output=True, text=True, timeout=60, env=environment)
    assert (ended.returncode, ended.stdout) == (143, "the result\n"), ended


def test_sigterm_handling_gives_back_the_caller_s_handler_and_is_left_alone_off_the_main_thread():
    # main called in-process by a program with a SIGTERM handler of its own gets that one
    # back; run on another thread (which cannot set a handler) the command runs all the same.
    import threading

    import explaind.client.cli as cli

    def own(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, own)
    try:
        with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=1.0, json=False)):
            assert signal.getsignal(signal.SIGTERM) is not own
        assert signal.getsignal(signal.SIGTERM) is own
        ran: list[object] = []

        def command() -> None:
            with cli._terminating_like_ctrl_c(argparse.Namespace(timeout=1.0, json=False)):
                ran.append(signal.getsignal(signal.SIGTERM))

        thread = threading.Thread(target=command)
        thread.start()
        thread.join()
        assert ran == [own]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_error_on_one_item_of_an_option_s_values_names_that_option():
    # The server names the item ("neurons[1]": a neuron out of range); the option the values
    # came from is --neurons, for --json's "option" as for stderr's hint.
    from explaind.client.cli import _option_of_field, _option_setting, parse_arguments

    args = parse_arguments(["edit-head", "s", "--class", "cat", "--neurons", "1", "99999"])
    assert _option_setting(args, "neurons[1]") == _option_of_field(args, "neurons[1]") == "--neurons"
    assert _option_setting(args, "no_such_field[0]") is None


def test_a_predict_refusal_listing_images_as_precondition_violations_names_their_files_from_them():
    # A server that lists them structurally: their names in the message are not read.
    from explaind.client import FailedPreconditionError
    from explaind.client.cli import _naming_failing_file

    files = [f"{i}.png" for i in range(8)]
    error = FailedPreconditionError("images: the served classifier's logits of 2 images of the request hold NaN (images[9], ...)", field="images",
                                    precondition_violations=[("UNUSABLE_LOGITS", "images[0]", ""), ("UNUSABLE_LOGITS", "images[3]", "")])
    error.request_offset = 4
    with pytest.raises(FailedPreconditionError), _naming_failing_file(files):
        raise error
    assert error.__notes__ == ["those are files 4.png, 7.png"]


def test_a_closed_pipe_ends_the_command_quietly(server, world_images):
    # `explaind info | head -1` printed a BrokenPipeError traceback.
    command = subprocess.Popen([sys.executable, "-m", "explaind.client.cli", "--target", server.target, "info"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()  # the reader is gone before the first line is printed
    stderr = command.stderr.read().decode()
    assert command.wait(timeout=120) == 141 and "Traceback" not in stderr, stderr


class _PipeWithoutReaderAsOnWindows(io.FileIO):
    """A pipe's writing end whose reader left, as Windows reports it: a write fails with
    EINVAL, not EPIPE. Once pointed elsewhere (os.devnull), writes go through."""

    def write(self, data):
        if stat.S_ISFIFO(os.fstat(self.fileno()).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return super().write(data)


@pytest.mark.parametrize(("platform", "unbuffered", "code", "err"), [  # unbuffered (PYTHONUNBUFFERED=1): the print itself fails
    ("win32", False, 141, ""), ("win32", True, 141, ""), ("linux", False, 1, "error: cannot write standard output: Invalid argument\n")])
def test_a_closed_pipe_on_windows_ends_the_command_quietly_too(server, capsys, monkeypatch, platform, unbuffered, code, err):
    # There the write fails with EINVAL, and the command said it cannot write standard output
    # and exited 1 where `explaind info | more` stopped early; elsewhere EINVAL is no closed pipe.
    reader, writer = os.pipe()
    os.close(reader)
    pipe = _PipeWithoutReaderAsOnWindows(writer, "w")
    with io.TextIOWrapper(pipe if unbuffered else io.BufferedWriter(pipe), write_through=unbuffered) as stdout:
        monkeypatch.setattr(sys, "platform", platform)
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["--target", server.target, "info"]) == code
        monkeypatch.undo()
    assert capsys.readouterr().err == err


def test_operations_state_must_be_a_known_state(capsys):
    err = _usage_error(capsys, ["operations", "list", "--state", "done"])
    assert "invalid choice: 'done'" in err and "'succeeded'" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 5\n", "unknown key(s) ['prot'] in [server]"),
        ('[server]\nport = "5"\n', "[server].port must be a number, got '5'"),
        (None, "config file not found"),
        # Both were found only once the model loaded, after the server listened.
        ('[classifier]\nloader = "onnx"\npath = "m.onnx"\nimage_size = 224\nresize_size = 200\n',
         "[classifier].resize_size 200 is below the input size 224"),
        ('[classifier]\nloader = "factory"\nfactory = "tiny_net"\nfeature_layer = "layer3"\nhead = "fc"\n',
         "[classifier].factory must be 'package.module:function', got 'tiny_net'"),
    ],
)
def test_serve_with_a_bad_config_says_why_in_one_line(capsys, tmp_path, monkeypatch, text, message):
    _fail_if_serving_starts(monkeypatch)
    config = tmp_path / "bad.toml"
    if text is not None:
        config.write_text(text)
    assert message in _error(capsys, ["serve", "--config", str(config)])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "-1"], "error: --port: [server].port must be at least 0, got -1"),
        (["--port", "70000"], "error: --port: [server].port must be at most 65535, got 70000"),
        (["--metrics-port", "65536"], "error: --metrics-port: [server].metrics_port must be at most 65535, got 65536"),
        (["--health-port", "-5"], "error: --health-port: [server].health_port must be at least 0, got -5"),
        # Past an int32 too: the config's words, not "out of range [-2147483648, 2147483647]", no port's range.
        (["--port", "99999999999"], "error: --port: [server].port must be at most 65535, got 99999999999"),
        (["--health-port", "-3000000000"], "error: --health-port: [server].health_port must be at least 0, got -3000000000"),
        (["--device", "gpu"], "error: --device: [runtime].device must be a torch device such as \"cpu\", \"cuda\" or \"cuda:1\", got 'gpu'"),
        (["--device", ""], "error: --device: [runtime].device must be a torch device"),
        (["--host", ""], "error: --host: [server].host must be an address to listen on"),  # was "cannot bind :0: is another server using the port?"
        (["--port", "7000", "--metrics-port", "7000"], "error: --port: [server].port and .metrics_port are both 7000; each needs a port of its own"),
        (["--otlp-endpoint", "collector:4317"], "error: --otlp-endpoint: [tracing].otlp_endpoint must be an OTLP/gRPC collector's URL"),
        (["--callers-file", "callers", "--admin", "ops", "--admin", "Ops"], "error: --admin: [server].admins: 'Ops' is no caller name"),
        (["--admin", "ops"], "error: --admin: [server].admins names callers of [server].callers_file; set that too"),
    ],
)
def test_serve_flags_are_checked_like_the_config_file(capsys, tmp_path, monkeypatch, flags, message):
    _fail_if_serving_starts(monkeypatch)
    assert message in _error(capsys, ["serve", *flags, "--data-dir", str(tmp_path / "data")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
def test_serving_on_an_absent_gpu_fails_before_it_says_it_is_listening(capsys, tmp_path):
    assert main(["serve", "--device", "cuda", "--port", "0", "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --device: [runtime].device is 'cuda' but CUDA is not available on this machine") and "listening" not in err, err


@pytest.mark.parametrize(("section", "key"), [("classifier", "path"), ("classifier", "class_names_file"), ("clip", "path"), ("diffusion", "path")])
def test_serve_with_a_missing_model_path_fails_before_it_says_it_is_listening(capsys, tmp_path, classifier_dir, section, key):
    # Found as the models loaded in the background, after "listening on", which probes and operators read as started.
    config = write_config(tmp_path / "explaind.toml", classifier_dir, **{section: {key: "absent"}})
    assert main(["serve", "--config", str(config), "--port", "0", "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"^error: \[{section}\]\.{key}( \(.*\))? not found: {re.escape(str(tmp_path / 'absent'))}$", err, re.M), err
    assert "listening" not in err and not (tmp_path / "data").exists(), err


@pytest.mark.parametrize(("unreadable", "mode", "key", "denied"), [
    ("the directory", 0o000, "[classifier].path (a world classifier directory):", "models/classifier"),
    ("the directory, listed but not searched", 0o600, "[classifier].path (a world classifier directory):", "models/classifier"),
    ("a directory above it", 0o600, "[classifier].path (a world classifier directory):", "models"),  # 0o600: listed, not searched
    # Inside a readable directory: found only as the models loaded, after "listening on".
    ("its weights file", 0o000, "[classifier].path:", "models/classifier/model.safetensors"),
    ("a diffusers component's file", 0o000, "[diffusion].path:", "models/diffusion/unet/diffusion_pytorch_model.safetensors"),
    ("CLIP's weights file", 0o000, "[clip].path:", "clip/open_clip_model.safetensors"),
])
def test_serve_with_a_model_path_its_user_may_not_read_fails_before_it_says_it_is_listening(tmp_path, classifier_dir, unreadable, mode, key, denied):
    # Root reads anything: only without its capabilities does the server meet what an operator's user would.
    import shutil

    prefix = _without_root_privileges()
    models = tmp_path / "models"
    shutil.copytree(classifier_dir, models / "classifier")
    (models / "diffusion" / "unet").mkdir(parents=True)
    (models / "diffusion" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    (models / "diffusion" / "unet" / "config.json").write_text("{}")
    (models / "diffusion" / "unet" / "diffusion_pytorch_model.safetensors").write_text("")
    (tmp_path / "clip").mkdir()  # beside models/, which a case denies: its config file is read as the config loads
    (tmp_path / "clip" / "open_clip_config.json").write_text("{}")
    (tmp_path / "clip" / "open_clip_model.safetensors").write_text("")
    config = write_config(tmp_path / "explaind.toml", models / "classifier", diffusion={"path": str(models / "diffusion")},
                          clip={"path": str(tmp_path / "clip")})
    denied_path = tmp_path / denied
    denied_path.chmod(mode)
    try:
        ended = subprocess.run([*prefix, sys.executable, "-m", "explaind.client.cli", "serve", "--config", str(config), "--port", "0",
                                "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    finally:
        denied_path.chmod(0o755)
    assert ended.returncode == 1 and "listening" not in ended.stderr and "Traceback" not in ended.stderr, ended.stderr
    unread = models / "classifier" if unreadable == "a directory above it" else denied_path
    assert ended.stderr.strip().splitlines()[-1] == f"error: {key} cannot read {unread}: Permission denied", ended.stderr


def test_a_file_no_model_loader_opens_unreadable_to_the_servers_user_is_not_checked_before_the_bind(tmp_path, classifier_dir):
    # Every file in a diffusers component folder, and every weights file beside CLIP's, had to be readable:
    # a stray one (notes, an old checkpoint) stopped a start whose models load.
    import shutil

    from explaind.world.assets import clip_dir, t2i_dir

    prefix = _without_root_privileges()
    shutil.copytree(t2i_dir(), tmp_path / "t2i")
    shutil.copytree(clip_dir(), tmp_path / "clip")
    strays = [tmp_path / "t2i" / "unet" / "notes.txt", tmp_path / "clip" / "old_weights.bin"]
    for stray in strays:
        stray.write_text("")
        stray.chmod(0o000)
    config = write_config(tmp_path / "explaind.toml", classifier_dir, diffusion={"path": str(tmp_path / "t2i")}, clip={"path": str(tmp_path / "clip")})
    check = f"from explaind.config import load_config, unusable_model_path; print(unusable_model_path(load_config({str(config)!r})))"
    ended = subprocess.run([*prefix, sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert (ended.returncode, ended.stdout) == (0, "None\n"), ended.stderr


@pytest.mark.parametrize("argv", [["--token", "s3cret", "serve"], ["--target=127.0.0.1:1", "demo"], ["--timeout", "5", "serve", "--port", "0"],
                                  ["--tls", "serve"], ["--ca-file", "ca.pem", "serve"], ["--cert-file=me.pem", "demo"],
                                  ["--key-file", "me.key", "serve"],
                                  # after the command too, where argparse alone says only "unrecognized arguments"
                                  ["serve", "--target", "127.0.0.1:1"], ["demo", "--tls"], ["serve", "--port", "0", "--token=s3cret"]])
def test_client_options_given_to_a_server_command_are_refused_not_ignored(capsys, argv):
    err = _usage_error(capsys, argv)
    command = "demo" if "demo" in argv else "serve"
    flag = next(arg for arg in argv if arg.startswith("--") and arg != "--port").partition("=")[0]
    assert f"{command}: {flag} is an option of the client commands" in err
    if command == "serve":
        assert "address from --host/--port or [server].host/.port and its token from [server].token" in err
    else:  # demo takes no --host/--port: its refusal sent a user to options it does not have
        assert "--host" not in err and "a free loopback port of its own" in err and "--config's [server].token" in err


@pytest.mark.parametrize(("argv", "message"), [(["--tok", "s3cret", "serve"], "invalid choice: 's3cret'"),
                                             (["--targ=127.0.0.1:1", "info"], "unrecognized arguments: --targ=127.0.0.1:1"),
                                             (["serve", "--tok", "s3cret"], "unrecognized arguments: --tok s3cret")])
def test_options_are_never_abbreviated(capsys, argv, message):
    assert message in _usage_error(capsys, argv)  # `--tok` is no `--token`, so serve cannot start without auth by it


# gRPC gives no reason: the message asked whether the port was busy or the host not this
# machine's, of a busy port on 127.0.0.1; the Dockerfile's 0.0.0.0 is every machine's.
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_serve_on_a_busy_port_says_so_in_one_line(capsys, tmp_path, host):
    with socket.socket() as busy:
        busy.bind((host, 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _error(capsys, ["serve", "--host", host, "--port", str(port), "--data-dir", str(tmp_path / "data")])
    assert line == f"error: --port: [server].port: cannot bind {host}:{port}: another process is using the port: stop it, or choose another port"


# The address alone named neither the setting to change nor which of the three ports it was.
@pytest.mark.parametrize(("key", "name", "reason"), [
    ("port", "", "another process is using the port: stop it, or choose another port"),
    ("metrics_port", "metrics ", "another process is using the port: stop it, or choose another port"),
    ("health_port", "health ", "another process is using the port: stop it, or choose another port"),
])
@pytest.mark.parametrize("set_by", ["flag", "config file"])
def test_serve_on_a_busy_port_names_its_key_and_the_flag_that_set_it(capsys, tmp_path, key, name, reason, set_by):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = {"port": 0, key: port}  # the others' ports free
        config = tmp_path / "explaind.toml"
        config.write_text("[server]\n" + "".join(f"{setting} = {value}\n" for setting, value in settings.items() if set_by == "config file"))
        flags = [f"--{setting.replace('_', '-')}={value}" for setting, value in settings.items() if set_by == "flag"]
        argv = ["serve", "--config", str(config), "--host", "127.0.0.1", *flags, "--data-dir", str(tmp_path / "data")]
        first, again = _error(capsys, argv), _error(capsys, argv)  # a second start trips on nothing the first left in the data dir
    flag = f"--{key.replace('_', '-')}: " if set_by == "flag" else ""
    assert first == again == f"error: {flag}[server].{key}: cannot bind {name}127.0.0.1:{port}: {reason}"



# The metrics port binds first, so any host not of this machine failed there: the error led
# with --metrics-port / [server].metrics_port, a setting with nothing wrong in it. gRPC's port
# binds first without a metrics port: its error asked whether the port was busy.
@pytest.mark.parametrize("set_by", ["flag", "config file"])
@pytest.mark.parametrize("key, port, bound", [("metrics_port", 9464, "metrics "), ("port", 50051, "")])
def test_serve_on_a_host_not_of_this_machine_names_the_host_not_the_port(capsys, tmp_path, set_by, key, port, bound):
    host = "192.0.2.1"  # TEST-NET-1 (RFC 5737): no machine's own address
    config = tmp_path / "explaind.toml"
    config.write_text(f'[server]\nhost = "{host}"\n{key} = {port}\n' if set_by == "config file" else "")
    flags = ["--host", host, f"--{key.replace('_', '-')}", str(port)] if set_by == "flag" else []
    grpc_port = ["--port", "0"] if key != "port" else []
    line = _error(capsys, ["serve", "--config", str(config), *flags, *grpc_port, "--data-dir", str(tmp_path / "data")])
    flag = "--host: " if set_by == "flag" else ""
    assert line == f"error: {flag}[server].host: cannot bind {bound}{host}:{port}: '{host}' is not an address of this machine"


# A name no resolver knows fails the probe's getaddrinfo (socket.gaierror, no errno of
# bind's): said as the port's fault in the system's words, it blamed [server].port.
def test_serve_on_a_host_no_name_resolves_names_the_host_not_the_port(capsys, tmp_path):
    host = "no-such-host.invalid"  # RFC 2606: never resolves
    line = _error(capsys, ["serve", "--host", host, "--port", "50051", "--data-dir", str(tmp_path / "data")])
    assert re.fullmatch(rf"error: --host: \[server\]\.host: cannot bind {host}:50051: '{host}' is not an address of this machine \(.+\)", line), line


def test_serve_unprivileged_on_a_low_port_of_an_ipv6_address_not_of_this_machine_names_the_host_not_the_port(tmp_path):
    # IPv6's bind checks a port below 1024 before the address: probed with the port alone,
    # the host's fault was said as the port's "Permission denied" (IPv4's checks the address first).
    prefix = _without_root_privileges("-net_bind_service")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 here: an IPv6 address is refused for its family, not as no address of this machine")
    host = "2001:db8::1"  # the IPv6 documentation prefix (RFC 3849): no machine's own address
    ended = subprocess.run([*prefix, sys.executable, "-m", "explaind.client.cli", "serve", "--host", host, "--port", "80",
                            "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 1 and ended.stderr.strip().splitlines()[-1] == (
        f"error: --host: [server].host: cannot bind [{host}]:80: '{host}' is not an address of this machine"), ended.stderr


def test_the_bind_probe_takes_a_port_a_closed_connection_left_in_time_wait_for_free_as_grpc_does():
    # gRPC binds with SO_REUSEADDR, so a port whose last connection the server closed first
    # (TIME_WAIT) is free to it: probed without, it was said busy by "another process".
    from explaind.service.server import _probe_bind

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as an earlier server's gRPC port had it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the port's side closes first: its end waits in TIME_WAIT
            client.recv(1)
    assert _probe_bind("127.0.0.1", port).errno is None


def test_a_bind_gRPC_refused_on_a_port_free_when_probed_says_so_not_none():
    # Every probe bound (the port freed meanwhile): the OSError has no strerror, which was said as "None".
    from explaind.service.server import _bind

    class Refusing:
        def add_insecure_port(self, address):
            return 0  # as gRPC's failed bind, for no reason the probe finds

    with pytest.raises(OSError) as refused:
        _bind(Refusing(), "127.0.0.1", free_port(), None, key="port")
    assert str(refused.value).endswith(": gRPC gave no reason, and the port was free when checked after: another process may have held it meanwhile")

# gRPC fails only where it could bind none of a name's addresses: localhost as ::1 on a
# host without IPv6 (Docker's default) and 127.0.0.1 with the port busy. The probe said
# the first address's cause, that localhost was not an address of this machine.
def test_serve_on_a_busy_port_of_a_name_with_a_foreign_address_too_says_the_port_is_busy(capsys, tmp_path, monkeypatch):
    resolve = socket.getaddrinfo

    def with_a_foreign_address_first(host, *args, **kwargs):
        found = resolve(host, *args, **kwargs)
        foreign = [(family, kind, protocol, name, ("192.0.2.1", *address[1:])) for family, kind, protocol, name, address in found[:1]]
        return foreign + found if host == "localhost" else found

    monkeypatch.setattr(socket, "getaddrinfo", with_a_foreign_address_first)  # the probe's resolver, not gRPC's
    with socket.socket(socket.AF_INET6) as busy:  # dual-stack: busy on 127.0.0.1 and ::1, both of which gRPC binds for localhost
        busy.bind(("::", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _error(capsys, ["serve", "--host", "localhost", "--port", str(port), "--data-dir", str(tmp_path / "data")])
    assert line == f"error: --port: [server].port: cannot bind localhost:{port}: another process is using the port: stop it, or choose another port"


def test_serve_on_a_busy_ipv4_port_of_the_ipv6_wildcard_where_ipv6_is_off_says_the_port_is_busy(capsys, tmp_path, monkeypatch):
    # gRPC binds "::" as 0.0.0.0 where the kernel has no IPv6: its failure there is the IPv4
    # port's, which the probe said was "Address family not supported by protocol".
    plain_socket = socket.socket

    def without_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return plain_socket(family, *args, **kwargs)

    with plain_socket(socket.AF_INET) as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(socket, "socket", without_ipv6)  # the probe's sockets, not gRPC's
        line = _error(capsys, ["serve", "--host", "::", "--port", str(port), "--data-dir", str(tmp_path / "data")])
    assert line == f"error: --port: [server].port: cannot bind [::]:{port}: another process is using the port: stop it, or choose another port"


# Before the check: at 12 the bind failed, said to be a busy port; at 14 "listening", then
# the classifier's load failed. Tried at 16 (the imports before the check need about 10 on
# their own: a limit nearer may fail there on a loaded machine) and at the floor's last refusal.
@pytest.mark.parametrize("at_the_floor", [False, True])
def test_serve_under_a_too_low_open_file_limit_says_so_in_one_line(tmp_path, at_the_floor):
    from explaind.service.server import MIN_OPEN_FILES

    limit = MIN_OPEN_FILES - 1 if at_the_floor else 16
    # The limit is lowered by the child, which then becomes the server (exec): a preexec_fn
    # would fork this process, whose gRPC threads' fork handlers then ran in the child and
    # aborted it (SIGABRT, "epoll_wait error: Bad file descriptor") when earlier tests had
    # used gRPC here.
    lower_then_serve = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]),) * 2); "
                        "os.execv(sys.executable, [sys.executable, '-m', 'explaind', *sys.argv[2:]])")
    result = subprocess.run([sys.executable, "-c", lower_then_serve, str(limit), "serve", "--host", "127.0.0.1", "--port", str(free_port()),
                             "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120, check=False)
    assert (result.returncode, result.stderr.splitlines()) == (1, [f"error: the open-file limit (ulimit -n) is {limit}, below the {MIN_OPEN_FILES} "
                                                                   "explaind needs (about 16 to start, then one per client connection and stored "
                                                                   "file in use): raise it (ulimit -n, docker run --ulimit nofile=N, the container "
                                                                   "runtime's default)"]), result.stderr[-3000:]


def test_serve_warns_that_the_clients_token_variable_does_not_protect_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLAIND_TOKEN", "s3cret")
    with socket.socket() as busy:  # the warning comes before the server binds; a busy port ends the run there
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--port", str(busy.getsockname()[1]), "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert "warning: EXPLAIND_TOKEN is the clients' token; this server asks for none ([server].token is empty)" in err


def test_a_stop_sent_while_serve_starts_ends_it_before_it_binds(tmp_path):
    # A container's PID 1 ignores a signal it has no handler for, and the handler came only
    # after the imports, the store's recovery and the bind: Kubernetes then waited its grace
    # period out and killed the pod.
    env = {key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"}
    process = subprocess.Popen([sys.executable, "-m", "explaind", "serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data")],
                               stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if signal.SIGTERM in _signals(process.pid, "SigCgt"):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stop requested while starting: exiting before serving" in err and "listening on" not in err


def _signals(pid: int, kind: str) -> set[signal.Signals]:
    """The signals process ``pid`` has of ``kind`` in /proc: "SigCgt" those it handles,
    "SigIgn" those it ignores (bit N-1 for signal N)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next((line.split()[1] for line in status.splitlines() if line.startswith(f"{kind}:")), "0"), 16)
    return {signum for signum in signal.Signals if mask & (1 << (signum - 1))}


@contextlib.contextmanager
def _handing_down(signum: signal.Signals, disposition: signal.Handlers) -> Iterator[None]:
    """Processes started meanwhile inherit ``signum``'s ``disposition``, not the suite's own
    (SIGHUP's SIG_IGN under ``nohup make test``, SIGINT's in a script's ``make test &``),
    which decided what the test saw."""
    inherited = signal.signal(signum, disposition)
    try:
        yield
    finally:
        signal.signal(signum, inherited)


def _started_server(tmp_path: Path, classifier_dir: Path, *, signum: signal.Signals = signal.SIGHUP, disposition: signal.Handlers) -> ServerProcess:
    """A server started with ``signum``'s ``disposition`` (see _handing_down)."""
    with _handing_down(signum, disposition):
        return ServerProcess(write_config(tmp_path / "explaind.toml", classifier_dir), tmp_path / "data", tmp_path / "server.log").start()


def test_serve_stops_gracefully_on_sighup(tmp_path, classifier_dir):
    # A closed terminal's SIGHUP (or an operator used to nginx's reload) killed it mid-job, no grace given.
    server = _started_server(tmp_path, classifier_dir, disposition=signal.SIG_DFL)
    try:
        server.process.send_signal(signal.SIGHUP)
        assert server.process.wait(timeout=60) == 0, server.log_path.read_text()
    finally:
        server.stop()
    assert "shutting down (grace 10.0s)" in server.log_path.read_text()


# nohup ignores SIGHUP; a shell without job control (`explaind serve &` in a script) SIGINT, so
# that a Ctrl-C meant for the script's foreground spares it: our SIGINT handler stopped it.
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT])
def test_serve_started_with_a_signal_ignored_keeps_ignoring_it(tmp_path, classifier_dir, signum):
    server = _started_server(tmp_path, classifier_dir, signum=signum, disposition=signal.SIG_IGN)
    try:
        assert signum in _signals(server.process.pid, "SigIgn")  # as it started, ready now: no handler came since
        server.process.send_signal(signum)  # an ignored signal is discarded as it is sent: nothing to wait for
        with Client(server.target, timeout=5) as client:
            client.wait_until_ready(timeout=5)
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0


def test_serve_is_left_to_stop_on_its_own_signal_handling():
    # The CLI's SIGTERM handler, set before serve's own, took a stop sent in between (which a
    # supervisor, seeing a handler, may send): "terminated", exit 143, not serve's graceful stop.
    from explaind.client.cli import _terminating_like_ctrl_c, parse_arguments

    before = signal.getsignal(signal.SIGTERM)
    with _terminating_like_ctrl_c(parse_arguments(["serve", "--port", "0"])):
        assert signal.getsignal(signal.SIGTERM) is before
    with _terminating_like_ctrl_c(parse_arguments(["info"])):
        assert signal.getsignal(signal.SIGTERM) is not before


def test_serve_says_which_values_of_the_config_file_its_flags_override(capsys, tmp_path):
    # An image's entrypoint passes --port and --data-dir: a config's own port was ignored without a word.
    config = tmp_path / "explaind.toml"
    # Its port is the default: written in the file, it is still the file's (the image's --port overrode 50051 unsaid).
    # Its metrics port is bound before the busy gRPC port fails the start: one of free_port's,
    # not 9100, which another test process's free_port() may have given to its server.
    config.write_text(f'[server]\nport = 50051\nmetrics_port = {free_port()}\nhost = "localhost"\n\n[runtime]\ndevice = "cpu"\n')
    with socket.socket() as busy:  # the warnings come before the server binds; a busy port ends the run there
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--config", str(config), "--port", str(port), "--device", "cpu", "--host", "127.0.0.1",
                     "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    # --port and --host change values the file sets: --device repeats its value,
    # --data-dir sets one it leaves alone.
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: --host 127.0.0.1 overrides [server].host = 'localhost' of {config}",
        f"warning: --port {port} overrides [server].port = 50051 of {config}"]


def test_serve_otlp_endpoint_turns_tracing_on_or_off_over_the_config_file(capsys, tmp_path, monkeypatch):
    # A chart or an entrypoint points the server at its collector without writing a config.
    import explaind.service
    from explaind.config import TracingSection

    served: list[TracingSection] = []
    monkeypatch.setattr(explaind.service, "serve", lambda config, stop_requested: served.append(config.tracing) or 0)
    config = tmp_path / "explaind.toml"
    config.write_text('[tracing]\notlp_endpoint = "http://collector:4317"\nsample_ratio = 0.25\n')
    for flags in (["--config", str(config), "--otlp-endpoint", "https://traces.example:4317"],
                  ["--config", str(config), "--otlp-endpoint", ""], ["--otlp-endpoint", "http://127.0.0.1:4317"]):
        assert main(["serve", *flags]) == 0
    assert served == [TracingSection(otlp_endpoint="https://traces.example:4317", sample_ratio=0.25),
                      TracingSection(otlp_endpoint="", sample_ratio=0.25), TracingSection(otlp_endpoint="http://127.0.0.1:4317")]
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        f"warning: --otlp-endpoint https://traces.example:4317 overrides [tracing].otlp_endpoint = 'http://collector:4317' of {config}",
        f"warning: --otlp-endpoint '' overrides [tracing].otlp_endpoint = 'http://collector:4317' of {config}"]


def test_serve_admin_flags_replace_the_config_files_admins(capsys, tmp_path, monkeypatch):
    # The chart's `admins` value: with callers from a Secret, no config need be written for them.
    import explaind.service

    served: list[tuple[str, ...]] = []
    monkeypatch.setattr(explaind.service, "serve", lambda config, stop_requested: served.append(config.server.admins) or 0)
    config = tmp_path / "explaind.toml"
    config.write_text('[server]\ncallers_file = "callers"\nadmins = ["platform"]\n')
    for flags in (["--config", str(config), "--admin", "ops", "--admin", "dev"], ["--config", str(config)],
                  ["--callers-file", str(tmp_path / "callers"), "--admin", "ops"]):
        assert main(["serve", *flags]) == 0
    assert served == [("ops", "dev"), ("platform",), ("ops",)]
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        f"warning: --admin ops --admin dev overrides [server].admins = ('platform',) of {config}"]


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read {path}: No such file or directory"),
    ("\n  \n", "{path} is empty"),
    ("two\nlines", "{path} holds a character other than printable ASCII"),
    ("s\u00e9cret", "{path} holds a character other than printable ASCII"),
])
def test_serve_with_an_unusable_token_file_says_why_in_one_line_before_serving(capsys, tmp_path, content, message):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    line = _error(capsys, ["serve", "--port", "0", "--token-file", str(token_file), "--data-dir", str(tmp_path / "data")])
    assert line.startswith(f"error: --token-file: [server].token_file: {message.format(path=token_file)}")  # the flag typed, then its key


@pytest.mark.parametrize("key", ["token_file", "callers_file"])
def test_serve_names_the_config_key_alone_for_an_unreadable_file_the_config_file_gave(capsys, tmp_path, key):
    config = tmp_path / "explaind.toml"
    config.write_text(f'[server]\n{key} = "absent"\n')
    line = _error(capsys, ["serve", "--config", str(config), "--port", "0", "--data-dir", str(tmp_path / "data")])
    assert line == f"error: [server].{key}: cannot read {tmp_path / 'absent'}: No such file or directory"


def test_serve_names_the_flag_of_an_unreadable_callers_file(capsys, tmp_path):
    line = _error(capsys, ["serve", "--port", "0", "--callers-file", str(tmp_path / "absent"), "--data-dir", str(tmp_path / "data")])
    assert line == f"error: --callers-file: [server].callers_file: cannot read {tmp_path / 'absent'}: No such file or directory"


@pytest.mark.parametrize("flag", ["--token-file", "--tls-cert-file", "--tls-key-file", "--tls-client-ca-file"])
def test_serve_refuses_an_empty_file_name_rather_than_serving_without_auth_or_tls(capsys, flag):
    assert f"serve: {flag} needs a file name" in _usage_error(capsys, ["serve", flag, ""])


def test_serve_refuses_an_empty_config_file_name_naming_the_flag(capsys):
    # An unset $VAR in `--config "$CONFIG"` was read as the directory ".": "cannot read the config file .: Is a directory".
    assert "serve: --config needs a file name (without --config it serves the shapes world)" in _usage_error(capsys, ["serve", "--config", ""])


def test_serve_refuses_a_token_and_a_token_file_together(capsys, tmp_path):
    config = tmp_path / "explaind.toml"
    config.write_text('[server]\ntoken = "s3cret"\n')
    line = _error(capsys, ["serve", "--config", str(config), "--token-file", str(tmp_path / "token")])
    assert "--token-file: set one of [server].token and [server].token_file, not both" in line


@pytest.mark.parametrize("value", ['["hunter2-secret"]', "123456789"])
def test_a_mistyped_token_is_refused_without_quoting_it(capsys, tmp_path, value):
    # The refusal reaches logs and terminals: it printed the would-be token.
    config = tmp_path / "explaind.toml"
    config.write_text(f"[server]\ntoken = {value}\n")
    line = _error(capsys, ["serve", "--config", str(config)])
    assert "[server].token must be a string, got a value not shown" in line
    assert "hunter2" not in line and "123456789" not in line


def test_serve_log_format_is_text_or_json(capsys):
    assert "argument --log-format: invalid choice: 'xml'" in _usage_error(capsys, ["serve", "--log-format", "xml"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_at_once_and_cleanly_when_asked_while_its_models_load(tmp_path, signum):
    # The signal was heeded only once the load ended: a load of minutes outlasted
    # Kubernetes' grace period, and the pod was killed. Then, heeded at once, the process
    # aborted (SIGABRT, "terminate called without an active exception"): Python's exit
    # ended the load's thread inside a torch call. This factory's load stays in torch's C++
    # (each mm releases the GIL), as a model's warm-up does, until the process ends.
    (tmp_path / "slow_model.py").write_text("import torch\n\ndef build():\n    print('factory running', flush=True)\n"
                                            "    weights = torch.zeros(256, 256)\n    while True:\n        weights.mm(weights)\n")
    config = tmp_path / "explaind.toml"
    config.write_text('[classifier]\nloader = "factory"\nfactory = "slow_model:build"\nfeature_layer = "0"\nhead = "1"\n')
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    with _handing_down(signum, signal.SIG_DFL):
        process = subprocess.Popen([sys.executable, "-m", "explaind.client.cli", "serve", "--config", str(config), "--port", "0",
                                    "--data-dir", str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        lines = []
        while "factory running\n" not in lines:  # after "listening on": the load has begun
            lines.append(process.stdout.readline())
            assert lines[-1], "".join(lines)  # exited before loading
        started = time.monotonic()
        process.send_signal(signum)
        output = "".join(lines) + process.communicate(timeout=60)[0]
    finally:
        process.kill()
    assert process.returncode == 0 and time.monotonic() - started < 30, output
    assert "stop requested while the models load: shutting down" in output and "serving" not in output
    assert "terminate called" not in output
    from explaind.store import SQLiteStore

    SQLiteStore(tmp_path / "data").close()  # the data dir is free and its database whole: the next start may use it


def test_serve_logs_one_json_object_per_line_when_asked(server_factory):
    server = server_factory(server={"log_format": "json"})
    assert server.stop() == 0
    records = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.strip()]  # each line parses
    assert all(set(record) == {"time", "level", "logger", "message"} and record["time"].endswith("Z") for record in records), records
    messages = " | ".join(record["message"] for record in records)
    for expected in ("listening on 127.0.0.1:", f"data dir: {server.data_dir.resolve()})", "serving world:balanced", "shutting down"):
        assert expected in messages, messages  # the data dir resolved: a relative one or a "~" would not say where


def test_json_logging_keeps_our_info_lines_and_libraries_from_warning():
    """configure_logging: explaind's INFO lines (listening, serving, audit) go out, a
    library's INFO chatter (open_clip logs each load step) does not, its warnings do."""
    script = ("import logging\nfrom explaind.logs import configure_logging\nconfigure_logging('json')\n"
              "logging.getLogger('open_clip').info('loading step')\nlogging.getLogger('open_clip').warning('slow load')\n"
              "logging.getLogger('explaind.service').info('serving')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert [(line["logger"], line["level"], line["message"]) for line in map(json.loads, done.stderr.splitlines())] == [
        ("open_clip", "WARNING", "slow load"), ("explaind.service", "INFO", "serving")]


def test_json_logging_prints_huggingface_hub_warnings_once_as_json():
    # huggingface_hub's own stderr handler printed each (a CLIP tag's download retries offline)
    # a second time, as a plain line in the JSON log.
    script = ("from explaind.logs import configure_logging\nconfigure_logging('json')\n"
              "from huggingface_hub.utils import logging\nlogging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert [(line["logger"], line["message"]) for line in map(json.loads, done.stderr.splitlines())] == [
        ("huggingface_hub.utils._http", "Retrying in 1s")], done.stderr


def test_json_logging_prints_torch_s_warnings_once_as_json():
    # torch's loggers had a stderr handler of their own: a .pt file given to the export loader
    # logged "W1207 07:50:14.036000 2931 torch/export/...] Unable to load package" as a plain line.
    script = ("import logging\nimport torch\nfrom explaind.logs import configure_logging\nconfigure_logging('json')\n"  # torch first, as serve imports it
              "logging.getLogger('torch.export.pt2_archive._package').warning('Unable to load package')\n"
              "logging.getLogger('torch._dynamo').warning('recompiling')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert [(line["logger"], line["message"]) for line in map(json.loads, done.stderr.splitlines())] == [
        ("torch.export.pt2_archive._package", "Unable to load package"), ("torch._dynamo", "recompiling")], done.stderr


def test_json_logging_prints_torch_s_warnings_as_json_after_a_factory_called_torch_s_set_logs(tmp_path):
    # torch._logging.set_logs() (a factory asking for dynamo's lines) put torch's own stderr
    # handlers back, and torch's lines were plain ones in the JSON log again.
    (tmp_path / "logging_net.py").write_text(
        "import logging\n\nimport torch._logging\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
        "        self.fc = nn.Linear(4, 3)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.body(x))\n\n"
        "def build():\n"
        "    torch._logging.set_logs(dynamo=logging.INFO)\n"
        "    return Net()\n")
    script = ("import logging\nimport torch\nfrom explaind.logs import configure_logging\nconfigure_logging('json')\n"
              "from explaind.config import ClassifierSection\nfrom explaind.engine.models import load_classifier\n"
              "load_classifier(ClassifierSection(loader='factory', factory='logging_net:build', feature_layer='body.1', head='fc', "
              "image_size=16, class_names=('a', 'b', 'c')))\n"
              "logging.getLogger('torch._dynamo').info('compiling')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join((str(tmp_path), os.environ.get("PYTHONPATH", "")))})
    assert [(line["logger"], line["level"], line["message"]) for line in map(json.loads, done.stderr.splitlines())] == [
        ("torch._dynamo", "INFO", "compiling")], done.stderr


@pytest.mark.parametrize("library", ["diffusers", "transformers"])
def test_json_logging_prints_diffusers_and_transformers_warnings_once_as_json(library):
    # Each puts a stderr handler of its own on its logger and stops its lines there: loading a
    # Stable Diffusion directory (the stable-diffusion extra's transformers) logged, say,
    # "You have disabled the safety checker" as a plain line in the JSON log.
    script = ("from explaind.logs import configure_logging, route_huggingface_loggers\nconfigure_logging('json')\n"
              f"route_huggingface_loggers('{library}')\n"  # as a diffusion model's load does (tests/test_stable_diffusion.py)
              f"from {library}.utils import logging\nlogging.get_logger('{library}.pipelines').warning('safety checker disabled')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert [(line["logger"], line["message"]) for line in map(json.loads, done.stderr.splitlines())] == [
        (f"{library}.pipelines", "safety checker disabled")], done.stderr


def test_a_script_loading_a_model_in_process_keeps_torch_s_and_hugging_face_s_own_logging():
    # The routing is the server's (configure_logging): a script that asked torch for dynamo's INFO lines
    # (torch._logging.set_logs) and then built a classifier through a factory lost them, torch's
    # handlers removed with no root handler to print them.
    script = ("import logging, torch\nfrom explaind.engine.models import load_classifier\nfrom explaind.config import ClassifierSection\n"
              "torch._logging.set_logs(dynamo=logging.INFO)\n"
              "load_classifier(ClassifierSection(loader='factory', factory='torchvision.models:resnet18', factory_kwargs={'num_classes': 3}, feature_layer='avgpool', head='fc', image_size=32))\n"
              "from explaind.logs import route_huggingface_loggers\nfrom huggingface_hub.utils import logging as hub\n"
              "before = list(hub.get_logger().handlers)\nroute_huggingface_loggers('huggingface_hub')\n"
              "assert hub.get_logger().handlers == before and before, before\n"
              "logging.getLogger('torch._dynamo').info('dynamo says')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "dynamo says" in done.stderr, done.stderr


@pytest.mark.parametrize("loader", ["export", "torchscript"])
def test_with_json_logs_a_damaged_model_file_is_one_json_error_and_torch_s_output_json_too(tmp_path, loader):
    # torch printed a traceback (export) or a FutureWarning (torchscript) as plain lines.
    model = tmp_path / "model.pt2"
    model.write_bytes(b"not a model" * 100)
    config = tmp_path / "explaind.toml"
    config.write_text(f'[classifier]\nloader = "{loader}"\npath = "{model}"\n')
    result = subprocess.run([sys.executable, "-m", "explaind", "serve", "--log-format", "json", "--config", str(config),
                             "--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path / "data")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line
    failures = [record for record in records if record["level"] == "ERROR"]
    assert len(failures) == 1 and str(model) in failures[0]["message"] and "Traceback" not in result.stderr, result.stderr

@pytest.mark.parametrize("failure", ["busy port", "bad config", "bad config asking for JSON itself"])
def test_with_json_logs_a_failed_start_is_one_json_object_too(tmp_path, failure):
    # It was the CLI's plain `error:` line, which a JSON log pipeline drops or fails on; so
    # it stayed where the file that failed to load asked for JSON (a Helm chart's config:
    # the chart has no flag for it).
    config = tmp_path / "explaind.toml"
    config.write_text({"busy port": "", "bad config": "[server]\ngrace_period_s = -1\n",
                       "bad config asking for JSON itself": '[server]\nlog_format = "json"\ngrace_period_s = -1\n'}[failure])
    log_format_flag = [] if failure == "bad config asking for JSON itself" else ["--log-format", "json"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        # `python -m explaind`, as the `explaind` command runs: gRPC's C core wrote its own
        # plain line about the port before the JSON, unless GRPC_VERBOSITY was set.
        env = {key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"}
        env["EXPLAIND_TOKEN"] = "s3cret"  # a warning before the bind (the bad config fails before it)
        result = subprocess.run([sys.executable, "-m", "explaind", "serve", *log_format_flag, "--config", str(config),
                                 "--host", "127.0.0.1", "--port", str(busy.getsockname()[1]), "--data-dir", str(tmp_path / "data")],
                                capture_output=True, text=True, timeout=120, check=False, env=env)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line
    failures = [record for record in records if record["level"] == "ERROR"]
    assert len(failures) == 1 and failures[0]["message"].startswith("cannot start: "), result.stderr
    assert ("cannot bind" if failure == "busy port" else "grace_period_s") in failures[0]["message"]
    assert "error:" not in result.stderr
    warned = [record["message"] for record in records if record["level"] == "WARNING"]
    assert ("EXPLAIND_TOKEN is the clients' token; this server asks for none ([server].token is empty)" in warned) == (failure == "busy port")


def test_serve_on_a_busy_metrics_port_of_an_ipv6_host_names_it_in_brackets(capsys, tmp_path):
    # "::1:9090" reads as no address and port: the error names the one a client would dial.
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _error(capsys, ["serve", "--host", "::1", "--port", "0", "--metrics-port", str(port), "--data-dir", str(tmp_path / "data")])
    assert f"cannot bind metrics [::1]:{port}: " in line, line


def test_serve_on_a_data_dir_in_use_is_refused_before_it_touches_the_store(capsys, tmp_path):
    # The second server used to mark the first one's running jobs FAILED, then fail to bind.
    from explaind.store import JobRecord, SQLiteStore

    first = SQLiteStore(tmp_path / "data")
    try:
        first.insert_job(JobRecord(job_id="live", kind="evaluate_sample_set", state="running", create_time=1.0))
        line = _error(capsys, ["serve", "--port", "0", "--data-dir", str(tmp_path / "data")])
        assert line == f"error: --data-dir: [server].data_dir: the data dir {tmp_path / 'data'} is in use by explaind server pid {os.getpid()}; give each server a data dir of its own"
        assert first.get_job("live").state == "running"
    finally:
        first.close()
    (tmp_path / "data" / "explaind.sqlite3").write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "data" / f"explaind.sqlite3{suffix}").unlink(missing_ok=True)
    line = _error(capsys, ["serve", "--port", "0", "--data-dir", str(tmp_path / "data")])
    # With what to do, as a damage the first writes find says.
    assert re.search(r"error: --data-dir: \[server\]\.data_dir: cannot open the store .*explaind.sqlite3: file is not a database; restore its database from a backup$", line), line


def test_serve_on_a_data_dir_under_a_file_names_the_flag_or_the_key(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    expected = f"[server].data_dir: cannot use the data dir {tmp_path / 'a-file' / 'data'}: Not a directory; the server must be able to write there"
    assert _error(capsys, ["serve", "--port", "0", "--data-dir", str(tmp_path / "a-file" / "data")]) == f"error: --data-dir: {expected}"
    config = tmp_path / "explaind.toml"
    config.write_text('[server]\ndata_dir = "a-file/data"\n')
    assert _error(capsys, ["serve", "--config", str(config), "--port", "0"]) == f"error: {expected}"


def _without_root_privileges(capabilities: str = "-dac_override,-dac_read_search,-fowner") -> list[str]:
    """A command prefix under which file permissions (or, dropping ``capabilities``
    "-net_bind_service", the ports below 1024) deny this user as they deny an operator's
    unprivileged server: root keeps its uid (its Python may sit under /root) but loses the
    capabilities that bypass them. Skips where root cannot drop them."""
    if os.geteuid() != 0:
        return []
    if subprocess.run(["setpriv", "--bounding-set", capabilities, "true"], capture_output=True).returncode != 0:  # noqa: PLW1510
        pytest.skip("running as root, and setpriv cannot drop the capabilities that bypass file permissions")
    return ["setpriv", "--bounding-set", capabilities]


@pytest.mark.parametrize(("mode", "message"), [
    (0o000, "cannot use the data dir {data}: Permission denied; the server must be able to write there"),
    # SQLite said "attempt to write a readonly database" of a database file anyone could write: its journal goes beside it.
    (0o555, "cannot open the store {data}/explaind.sqlite3: attempt to write a readonly database; the server's user must be able to "
            "write the data dir and every file in it"),
])
def test_serve_on_a_data_dir_it_may_not_write_says_so_in_one_line(tmp_path, mode, message):
    from explaind.store import SQLiteStore

    prefix = _without_root_privileges()
    data = tmp_path / "data"
    SQLiteStore(data).close()
    data.chmod(mode)
    try:
        ended = subprocess.run([*prefix, sys.executable, "-m", "explaind.client.cli", "serve", "--port", "0", "--data-dir", str(data)],
                               capture_output=True, text=True, timeout=120)
    finally:
        data.chmod(0o755)
    assert ended.returncode == 1 and "Traceback" not in ended.stderr, ended.stderr
    assert ended.stderr.strip().splitlines()[-1] == f"error: --data-dir: [server].data_dir: {message.format(data=data)}", ended.stderr


def test_sample_set_labels_may_be_class_names(server, capsys, tmp_path):
    images = [_png(tmp_path / "a.png", 0), _png(tmp_path / "b.png", 255)]
    assert main(["--target", server.target, "sample-set", "create", "--id", "named", "--images", *images, "--labels", "heart", "2"]) == 0
    assert "created named: 2 samples, per class triangle 1, heart 1" in capsys.readouterr().out
    assert main(["--target", server.target, "sample-set", "create", "--images", images[0], "--labels", "dog"]) == 1
    assert "'dog' is not a class of the served model" in capsys.readouterr().err


def test_an_image_file_unreadable_when_its_turn_comes_is_an_error_line_not_a_traceback(server, capsys, tmp_path, monkeypatch):
    # Files are checked to exist when the command starts, and read as their request is
    # made: one that fails then (gone meanwhile, an I/O error) raised the SDK's OSError
    # through main as a traceback.
    from explaind.client import _images

    images = [_png(tmp_path / f"{name}.png", 0) for name in "abc"]
    read = _images.to_image_message

    def unreadable_c(image):
        if str(image).endswith("c.png"):
            raise PermissionError(13, "Permission denied")
        return read(image)

    monkeypatch.setattr(_images, "to_image_message", unreadable_c)
    assert main(["--target", server.target, "sample-set", "create", "--id", "unreadable", "--images", *images, "--labels", "0", "0", "0"]) == 1
    assert f"error: images[2]: cannot read {images[2]}: Permission denied" in capsys.readouterr().err
    assert _error(capsys, ["--target", server.target, "predict", *images]) == f"error: images[2]: cannot read {images[2]}: Permission denied"


def test_an_upload_that_fails_after_its_first_request_says_under_its_error_what_became_of_the_set(server, capsys, tmp_path, monkeypatch):
    # The SDK's note on the error (the partly uploaded set deleted) must reach the user
    # with the CLI's error line, or they cannot tell whether a set was left behind.
    from explaind.client import _images

    # Requests of 512, each read before the one ahead of it is sent: the last file is read after the first request.
    images = [_png(tmp_path / "a.png", 0)] * 1025 + [_png(tmp_path / "last.png", 0)]
    read = _images.to_image_message
    monkeypatch.setattr(_images, "to_image_message", lambda image: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if str(image).endswith("last.png") else read(image))
    assert main(["--target", server.target, "sample-set", "create", "--id", "partial", "--images", *images, "--labels", *["0"] * 1026]) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"error: images[1025]: cannot read {images[1025]}: Permission denied\n"
                        "  the partly uploaded sample set 'partial' was deleted\n"), err
    # With --json, on stdout too: the note is a CLIENT_ERROR's, the file refused here.
    assert main(["--target", server.target, "sample-set", "create", "--id", "partial", "--images", *images, "--labels", *["0"] * 1026, "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["code"], error["notes"]) == ("CLIENT_ERROR", ["the partly uploaded sample set 'partial' was deleted"]), error
    with Client(server.target, timeout=30) as client:
        assert "partial" not in [s.sample_set_id for s in client.sample_sets()]


@pytest.mark.parametrize("request_id", [None, "00000000-0000-4000-8000-00000000c11a"])
def test_an_append_interrupted_after_its_first_request_says_how_to_go_on_in_the_cli_s_words_too(server, capsys, tmp_path, monkeypatch,
                                                                                               request_id):
    # Its note told a CLI user only of the SDK: "sample_set('cut').sample_count tells which",
    # "run this append_samples again under request_id ..." (no --request-id, no command).
    images = [_png(tmp_path / "a.png", 0)] * 513  # two requests of at most 512
    set_id = f"cut-{bool(request_id)}".lower()
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:1], [0], sample_set_id=set_id)
    call = Client._call

    def interrupted_at_the_second_append(self, service, method, request, **kwargs):
        if method == "AppendSamples" and len(request.samples) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the second request is on its way
        return call(self, service, method, request, **kwargs)

    monkeypatch.setattr(Client, "_call", interrupted_at_the_second_append)
    given = ["--request-id", request_id] if request_id else []
    assert main(["--target", server.target, "sample-set", "append", set_id, "--images", *images, "--labels", *["0"] * 513, *given]) == 130
    err = capsys.readouterr().err
    how = (f"run this append_samples again under request_id {request_id} (the CLI's --request-id; the same images and chunk_size) "
           "to append the rest" if request_id else
           f"sample_set('{set_id}').sample_count (explaind sample-set show {set_id}) tells which; then append the rest "
           "(an append given a request_id, the CLI's --request-id, can be run again as it is instead)")
    assert f"  the first 512 of 513 samples were appended to '{set_id}', and samples 512 to 512 may have been too " \
           f"(their request got no answer): {how}" in err, err


def test_a_folder_that_cannot_be_listed_is_an_error_line_not_a_traceback(capsys, tmp_path, monkeypatch):
    # A folder without read permission (not so for root, hence faked) raised its
    # PermissionError through main.
    from explaind.client import cli

    def unlistable(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(cli, "image_folder", unlistable)
    assert _error(capsys, ["--target", "127.0.0.1:1", "sample-set", "create", "--folder", str(tmp_path)]) == (
        f"error: --folder: cannot read {tmp_path}: Permission denied")


def test_sample_set_from_an_image_folder_tree(server, capsys, tmp_path):
    root = tmp_path / "images"
    for name, count in (("heart", 2), ("circle", 3)):
        (root / name / "nested").mkdir(parents=True)
        for i in range(count):
            _png(root / name / ("nested" if i else "") / f"{i}.PNG", 40 * i)
    (root / "heart" / "notes.txt").write_text("not an image")
    (root / ".thumbnails").mkdir()
    _png(root / ".thumbnails" / "x.png", 0)
    assert main(["--target", server.target, "sample-set", "create", "folder", "--folder", str(root)]) == 0
    assert "created folder: 5 samples, per class circle 3, heart 2" in capsys.readouterr().out
    assert main(["--target", server.target, "sample-set", "append", "folder", "--folder", str(root / "heart" / "nested")]) == 1
    capsys.readouterr()  # images directly in the folder have no class folder: nothing to append
    assert main(["--target", server.target, "sample-set", "append", "folder", "--folder", str(root)]) == 0
    assert "appended 5 samples to folder: now 10 samples, per class circle 6, heart 4" in capsys.readouterr().out
    assert "sample-set append: give a sample set id" in _usage_error(capsys, ["sample-set", "append", "--folder", str(root)])
    for name in ("dog", "n01", "n02", "n03"):  # an ImageNet tree's synset ids: 1000 folders named 3
        (root / name).mkdir()
        _png(root / name / "0.png", 0)
    assert _error(capsys, ["--target", server.target, "sample-set", "create", "--folder", str(root)]) == (
        f"error: --folder: {root / 'dog'}, {root / 'n01'}, {root / 'n02'} and 1 more: a folder's name must be a class of the served model "
        "(circle, square, triangle, star, cross, heart)")
    # Usage errors (exit 2), as a missing --images file is.
    assert f"argument --folder: not a directory: {root / 'dog' / '0.png'}" in _usage_error(capsys, ["sample-set", "create", "--folder", str(root / "dog" / "0.png")])
    assert "--folder: no images in" in _error(capsys, ["--target", server.target, "sample-set", "create", "--folder", str(tmp_path / "images" / "heart" / "nested")])
    assert f"argument --folder: no such directory: {tmp_path / 'nope'}" in _usage_error(capsys, ["sample-set", "create", "--folder", str(tmp_path / "nope")])


def test_a_class_folder_whose_name_macos_decomposed_is_its_class(tmp_path):
    # A folder "café" copied from a Mac is "e" and a combining accent: it was refused as
    # "a folder's name must be a class of the served model (café, dog)".
    from types import SimpleNamespace

    from explaind.client import cli

    (tmp_path / "cafe\u0301").mkdir()
    image = _png(tmp_path / "cafe\u0301" / "0.png", 0)
    served = SimpleNamespace(model_metadata=lambda: SimpleNamespace(class_names=["caf\u00e9", "dog"]))
    assert cli._folder_samples(served, str(tmp_path)) == ([Path(image)], ["cafe\u0301"])


def test_a_class_folder_refused_is_named_with_its_control_characters_escaped(tmp_path):
    # A downloaded tree's folder named with ESC [2J cleared the terminal its refusal was printed on.
    from types import SimpleNamespace

    from explaind.client import cli

    (tmp_path / "c\x1b[2J").mkdir()
    _png(tmp_path / "c\x1b[2J" / "0.png", 0)
    served = SimpleNamespace(model_metadata=lambda: SimpleNamespace(class_names=["dog"]))
    with pytest.raises(cli.CommandError, match=r"^--folder: (.*)/c\\x1b\[2J: a folder's name must be a class of the served model \(dog\)$"):
        cli._folder_samples(served, str(tmp_path))


class _DigitNamedClasses(inference_pb2_grpc.InferenceServiceServicer, neuroinspect_pb2_grpc.NeuroInspectServiceServicer,
                         sample_sets_pb2_grpc.SampleSetServiceServicer):
    """A server of classes named "1" to "3" at indices 0 to 2, "-1", "4" and "7" at 3 to 5,
    that records the class each ranking, visualisation and sample names, then refuses it."""

    names = ["1", "2", "3", "-1", "4", "7"]

    def __init__(self) -> None:
        self.classes: list[tuple[str, str | int]] = []  # (the oneof's field, its value)
        self.metadata_calls = 0

    def GetModelMetadata(self, request, context):
        from explaind.v1 import inference_pb2

        self.metadata_calls += 1
        return inference_pb2.GetModelMetadataResponse(classifier=inference_pb2.ClassifierInfo(class_names=self.names))

    def _record(self, message, context):
        import grpc

        field = message.WhichOneof("target_class")
        self.classes.append((field, getattr(message, field)))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "recorded")

    def RankMistakeNeurons(self, request, context):
        self._record(request, context)

    def VisualizeNeurons(self, request, context):
        for pair in request.pairs[:-1]:
            self.classes.append((pair.WhichOneof("target_class"), getattr(pair, pair.WhichOneof("target_class"))))
        self._record(request.pairs[-1], context)

    def CreateSampleSet(self, request, context):
        import grpc

        self.classes += [("label", sample.label) for sample in request.samples]
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "recorded")


def test_digits_naming_a_class_at_another_index_are_refused_as_ambiguous_and_index_or_name_says_which(capsys, tmp_path):
    # "--class 3" ranked class 3 ("-1") where the user meant the class named "3" (index 2).
    from test_client_sdk import _serve

    def add(servicer, server):
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        neuroinspect_pb2_grpc.add_NeuroInspectServiceServicer_to_server(servicer, server)
        sample_sets_pb2_grpc.add_SampleSetServiceServicer_to_server(servicer, server)

    image = _png(tmp_path / "a.png", 10)
    recorder = _DigitNamedClasses()
    server, target = _serve(recorder, add=add)
    try:
        assert _error(capsys, ["--target", target, "rank", "set", "--class", "3"]) == (
            "error: --class 3 is ambiguous: class 3 is '-1' and class 2 is named '3'; write --class index:3 or --class name:3")
        assert _error(capsys, ["--target", target, "visualize", "8:0", "9:2", "--out-dir", str(tmp_path)]) == (
            "error: 9:2 is ambiguous: class 2 is '3' and class 1 is named '2'; write 9:index:2 or 9:name:2")
        assert _error(capsys, ["--target", target, "sample-set", "create", "s", "--images", image, image, "--labels", "0", "1"]) == (
            "error: --labels 1 is ambiguous: class 1 is '2' and class 0 is named '1'; write --labels index:1 or --labels name:1")
        assert recorder.classes == []  # nothing was sent
        asked = recorder.metadata_calls
        assert main(["--target", target, "rank", "set", "--class", "index:3"]) == 1
        assert recorder.metadata_calls == asked  # no names are needed, so none are asked for
        for given in ("name:3", "name:index:3", "4", "-1", "7", "03"):
            assert main(["--target", target, "rank", "set", "--class", given]) == 1
        assert main(["--target", target, "visualize", "8:index:2", "9:name:2", "7:-1", "--out-dir", str(tmp_path)]) == 1
        assert main(["--target", target, "sample-set", "create", "s", "--images", image, image, image, "--labels", "index:1", "name:1", "-1"]) == 1
        assert recorder.classes == [
            ("class_index", 3), ("class_name", "3"), ("class_name", "index:3"),
            ("class_index", 4),  # the class named "4" is class 4
            ("class_name", "-1"), ("class_name", "7"),  # no index: the class of that name
            ("class_index", 3),  # "03" is no class's name
            ("class_index", 2), ("class_name", "2"), ("class_name", "-1"),
            ("label", 1), ("label", 0), ("label", 3),  # the SDK sends names as indices
        ]
    finally:
        server.stop(0)
    assert _usage_error(capsys, ["--target", target, "rank", "set", "--class", "index:three"]).rstrip().endswith(
        "argument --class: 'index:three': expected index:N with N an integer")
    # An empty name is no class: "8:name:" was sent as 8 with no class, and conditioned on its top classes.
    assert _usage_error(capsys, ["--target", target, "visualize", "8:name:"]).rstrip().endswith(
        "argument NEURON[:CLASS]: 'name:': expected name:X with X a class name")
    assert _usage_error(capsys, ["--target", target, "rank", "set", "--class", "name:"]).rstrip().endswith(
        "argument --class: 'name:': expected name:X with X a class name")


def test_operations_wait_and_get_print_the_result_of_a_finished_job(server, capsys, world_images):
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images, labels, sample_set_id="finished")
        edit = client.edit_head("finished", "heart", [3, 7])
        version_id = edit.result(timeout=60).version.version_id  # v1 only when no earlier test stored a version
    assert main(["--target", server.target, "evaluate", "finished", "--no-wait"]) == 0
    printed = capsys.readouterr()  # the name alone on stdout, for N=$(explaind evaluate ... --no-wait)
    name = printed.out.strip()
    assert re.fullmatch(r"operations/\w+\n", printed.out) and printed.err == f"started {name}; explaind operations wait {name} waits for it\n"
    assert main(["--target", server.target, "operations", "wait", name]) == 0
    waited = capsys.readouterr().out
    assert re.search(r"^accuracy \d\.\d{3} on 48 samples", waited, flags=re.M), waited
    assert "per class: circle" in waited and "artifacts: mistakes.png" in waited
    assert main(["--target", server.target, "operations", "get", name]) == 0
    assert capsys.readouterr().out == waited
    assert main(["--target", server.target, "operations", "get", edit.name]) == 0
    assert re.search(rf"^  {version_id} \S+ probability_ratio heart neurons \[3, 7\], accuracy \d\.\d{{3}} \(was \d\.\d{{3}}\)$",
                     capsys.readouterr().out, flags=re.M)


def _classified_right(client: Client, images: np.ndarray, labels: np.ndarray) -> list[int]:
    """Indices of the images the served model classifies as their label: a set without mistakes."""
    predicted = [prediction.class_indices[0] for prediction in client.predict(images, top_k=1)]
    return [i for i, label in enumerate(labels) if predicted[i] == label]


def test_a_class_without_mistakes_is_ranked_and_reported_as_nothing_to_explain(server, capsys, world_images, tmp_path):
    # It was an error (exit 1): a script looping over classes failed on good news.
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        correct = _classified_right(client, images[:40], labels[:40])
        client.create_sample_set(images[correct], labels[correct], sample_set_id="all-right")
        name = client.model_metadata().class_names[int(labels[correct[0]])]
    assert main(["--target", server.target, "rank", "all-right", "--class", name]) == 0
    assert capsys.readouterr().out == f"no mistakes of {name} in all-right ({len(correct)} samples): nothing to explain\n"
    page = tmp_path / "report.html"
    assert main(["--target", server.target, "report", "--class", name, "--sample-set", "all-right", "--out", str(page)]) == 0
    assert "wrote" in capsys.readouterr().out and f"<p id='no-mistakes'>The classifier makes no mistakes on {name}" in page.read_text()
    assert "<th scope='col'>neuron</th>" not in page.read_text()  # an empty table of ranked neurons stood above it


def test_a_report_on_too_few_samples_for_an_edit_says_why_it_suggests_none(server, capsys, world_images, tmp_path):
    images, _ = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:2], ["heart", "heart"], sample_set_id="too-few")
    assert main(["--target", server.target, "report", "--class", "heart", "--sample-set", "too-few", "--out", str(tmp_path / "report.html"),
                 "--neurons", "1", "--steps", "2"]) == 0
    assert capsys.readouterr().out.endswith("\nno head edit suggested: sample_set_id: needs at least 5 samples to hold out a validation split, "
                                            "or a validation_sample_set_id\n")


def test_a_report_whose_page_is_not_written_names_the_edit_it_stored(server, capsys, world_images, tmp_path, monkeypatch):
    # Ctrl-C while the page was rendered, or a write that failed (a full disk), left a new
    # head version that nothing mentioned.
    import explaind.client.cli as cli
    import explaind.client.report as report

    images, labels = world_images
    mislabelled = (labels + 1) % 6  # every sample a mistake of its class
    with Client(server.target, timeout=30) as client:
        name = client.model_metadata().class_names[int(mislabelled[0])]
        client.create_sample_set(images, mislabelled, sample_set_id="unwritten")
        before = {v.version_id for v in client.head_versions()}

    def interrupted(_report):
        raise KeyboardInterrupt

    def disk_full(path, _data):
        raise cli.CommandError(f"cannot write {path}: No space left on device")

    out = tmp_path / "report.html"
    argv = ["--target", server.target, "report", "--class", name, "--sample-set", "unwritten", "--out", str(out), "--neurons", "1", "--steps", "2"]
    try:
        for module, name_, failing, code, message in ((report, "render_report", interrupted, 130, "interrupted"),
                                                       (cli, "_write", disk_full, 1, f"error: cannot write {out}: No space left on device")):
            with monkeypatch.context() as patched:
                patched.setattr(module, name_, failing)
                assert main(argv) == code
            with Client(server.target, timeout=30) as client:
                (stored,) = {v.version_id for v in client.head_versions()} - before
                client.delete_head_version(stored)
            assert capsys.readouterr().err.endswith(
                f"{message}\n  head version {stored}, the suggested edit, stays stored (not served); explaind head-versions delete {stored} if it is not wanted\n")
            assert not out.exists()
    finally:
        with Client(server.target, timeout=30) as client:
            client.delete_sample_set("unwritten")


def test_a_report_whose_visualisations_fail_on_the_server_is_written_without_them_and_fails(server, capsys, world_images, tmp_path, monkeypatch):
    # A visualisation job out of memory lost the ranking and the edit already made: no page at all.
    import grpc

    from explaind.client import ResourceExhaustedError
    from explaind.client._errors import operation_error

    images, labels = world_images
    mislabelled = (labels + 1) % 6
    with Client(server.target, timeout=30) as client:
        name = client.model_metadata().class_names[int(mislabelled[0])]
        client.create_sample_set(images, mislabelled, sample_set_id="unvisualised")
        before = {v.version_id for v in client.head_versions()}

    failed_jobs = []

    def out_of_memory(self, *args, **kwargs):
        error = operation_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "the GPU ran out of memory <while optimising>")
        error.operation = self.operations(limit=1)[0]  # the job it ended (here the edit's, the newest)
        failed_jobs.append(error.operation.name)
        raise error

    def queue_full(self, *args, **kwargs):
        raise ResourceExhaustedError("job queue is full (1 queued, limit 1); retry later", retry_delay=2.5)

    out = tmp_path / "report.html"
    monkeypatch.setattr(Client, "visualize_neurons", out_of_memory)
    try:
        assert main(["--target", server.target, "report", "--class", name, "--sample-set", "unvisualised", "--out", str(out), "--steps", "2",
                     "--json"]) == 1
        printed = capsys.readouterr()
        assert re.search(r"error: RESOURCE_EXHAUSTED: the visualisations stopped after 0 neurons: the GPU ran out of memory <while optimising>\n"
                         r"  head version (v\d+), the suggested edit, stays stored \(not served\); explaind head-versions delete \1 if it is not wanted\n\Z",
                         printed.err)
        assert json.loads(printed.out)["error"]["operation"] == failed_jobs[0]
        # The server's error, not the CLI's own (CLIENT_ERROR): a full queue's --json error says when to retry.
        monkeypatch.setattr(Client, "visualize_neurons", queue_full)
        assert main(["--target", server.target, "report", "--class", name, "--sample-set", "unvisualised", "--out", str(tmp_path / "full.html"),
                     "--steps", "2", "--json"]) == 1
        error = json.loads(capsys.readouterr().out)["error"]
        assert (error["code"], error["retry_delay_seconds"]) == ("RESOURCE_EXHAUSTED", 2.5), error
        assert error["message"] == "the visualisations stopped after 0 neurons: job queue is full (1 queued, limit 1); retry later", error
    finally:
        monkeypatch.undo()
        with Client(server.target, timeout=30) as client:
            for stored in {v.version_id for v in client.head_versions()} - before:
                client.delete_head_version(stored)
            client.delete_sample_set("unvisualised")
    page = out.read_text()
    assert "<p id='visualization-failed'>The visualisations stopped after 0 of the ranked neurons: RESOURCE_EXHAUSTED: the GPU ran out " \
           "of memory &lt;while optimising&gt;</p>" in page
    assert "<h2>Suggested head edit</h2>" in page and "id='ranking-legend'" in page  # the work before them is kept


def _mislabelled_set(server, world_images, sample_set_id: str) -> tuple[str, set[str]]:
    """A set of 24 images each labelled as the next class (all mistakes, for a report), the
    name of its first label, and the head versions stored before the report."""
    images, labels = world_images
    mislabelled = (labels[:24] + 1) % 6
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:24], mislabelled, sample_set_id=sample_set_id)
        return client.model_metadata().class_names[int(mislabelled[0])], {v.version_id for v in client.head_versions()}


def test_a_report_s_json_names_the_head_version_it_stored_and_its_failure_the_same(server, capsys, world_images, tmp_path):
    # report had no --json: a nightly job parsed "suggested head edit v3" from its text to
    # delete the version each run stores, and a failure left no machine-readable reason.
    name, before = _mislabelled_set(server, world_images, "nightly")
    page = tmp_path / "report.html"
    argv = ["--target", server.target, "report", "--class", name, "--sample-set", "nightly", "--out", str(page), "--neurons", "1",
            "--steps", "2", "--stability", "0", "--json"]
    try:
        assert main(argv) == 0
        printed = capsys.readouterr()
        with Client(server.target, timeout=30) as client:
            (stored,) = {v.version_id for v in client.head_versions()} - before
        value = json.loads(printed.out)  # the JSON alone: the summary lines go to stderr
        assert value == {"file": str(page), "sample_set_id": "nightly", "class_name": name, "mistake_count": value["mistake_count"],
                         "ranked_neurons": value["ranked_neurons"], "visualized_neurons": 1, "head_version": stored,
                         "head_version_kept": True, "edit_command": value["edit_command"], "edit_argv": value["edit_argv"],
                         "evaluated_on": value["evaluated_on"], "no_edit_reason": None, "no_visualization_reason": None}
        assert value["edit_command"].startswith(f"explaind edit-head nightly --class {name} --neurons ")
        assert value["edit_argv"] == shlex.split(value["edit_command"])
        assert value["mistake_count"] > 0 and value["ranked_neurons"] >= 1 and "wrote " in printed.err and page.exists()
        assert main([*argv[:6], "no-such-set", *argv[7:]]) == 1
        assert json.loads(capsys.readouterr().out)["error"]["code"] == "NOT_FOUND"
    finally:
        with Client(server.target, timeout=30) as client:
            for version in {v.version_id for v in client.head_versions()} - before:
                client.delete_head_version(version)
            client.delete_sample_set("nightly")


def test_a_report_with_discard_edit_shows_the_command_that_stores_it_again_as_a_shell_reads_it_back(capsys, monkeypatch, tmp_path):
    # A class named with a control character: its raw line break or escape sequence reached the terminal.
    import explaind.client.report as report_module
    from explaind.client.report import edit_head_command, shown_command

    command = edit_head_command("s", "bad\x1b[2Jclass", [1], "", "", "", ["--target=127.0.0.1:1"])
    edit = types.SimpleNamespace(version=types.SimpleNamespace(version_id="v2", parent_version_id="v1"))
    ranking = types.SimpleNamespace(mistake_count=3, neurons=[1], class_name="bad\x1b[2Jclass")
    report = types.SimpleNamespace(edit=edit, edit_kept=False, edit_command=command, edit_discard_error=None, ranking=ranking, visualizations=[],
                                   evaluated_on="sample set s", no_edit_reason="", edit_at_head_version_limit=False, no_visualization_reason="", visualization_error=None)
    monkeypatch.setattr(report_module, "build_report", lambda *args, **kwargs: report)
    monkeypatch.setattr(report_module, "render_report", lambda report: "<html>")
    argv = ["--target", "127.0.0.1:1", "report", "--class", "x", "--sample-set", "s", "--out", str(tmp_path / "r.html"), "--discard-edit"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"to store the edit again: {shown_command(command)}\n" in out and "\x1b" not in out, out
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edit_command"] == command  # shlex.split reads it back, as scripts do


def test_a_report_s_summary_line_counts_one_mistake_and_one_neuron_in_the_singular(capsys, monkeypatch, tmp_path):
    # It said "wrote report.html: 1 mistakes, 1 ranked neurons, 1 visualised".
    import explaind.client.report as report_module

    ranking = types.SimpleNamespace(mistake_count=1, neurons=[7], class_name="heart")
    report = types.SimpleNamespace(edit=None, edit_kept=None, edit_command=None, edit_discard_error=None, ranking=ranking, visualizations=[object()],
                                   no_edit_reason="", edit_at_head_version_limit=False, no_visualization_reason="", visualization_error=None)
    monkeypatch.setattr(report_module, "build_report", lambda *args, **kwargs: report)
    monkeypatch.setattr(report_module, "render_report", lambda report: "<html>")
    page = tmp_path / "r.html"
    assert main(["--target", "127.0.0.1:1", "report", "--class", "x", "--sample-set", "s", "--out", str(page)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {page}: 1 mistake, 1 ranked neuron, 1 visualised\n")


def test_a_report_with_discard_edit_keeps_no_head_version_and_says_how_to_store_it_again(server, capsys, world_images, tmp_path, monkeypatch):
    # A nightly report piled up one head version per night unless the pipeline deleted each itself.
    import explaind.client.cli as cli

    def disk_full(path, _data):
        raise cli.CommandError(f"cannot write {path}: No space left on device")

    name, before = _mislabelled_set(server, world_images, "discarded")
    page = tmp_path / "report.html"
    argv = ["--target", server.target, "report", "--class", name, "--sample-set", "discarded", "--out", str(page), "--neurons", "1",
            "--steps", "2", "--stability", "0", "--discard-edit"]
    try:
        assert main([*argv, "--json"]) == 0
        printed = capsys.readouterr()
        value = json.loads(printed.out)
        with Client(server.target, timeout=30) as client:
            assert {v.version_id for v in client.head_versions()} == before
        version, command = value["head_version"], value["edit_command"]
        assert value["head_version_kept"] is False and version not in before
        assert command.startswith(f"explaind edit-head discarded --class {name} --neurons ") and " --seed 0 " in command
        assert f"head version {version} is not kept (--discard-edit); to store the edit again: {command}\n" in printed.err
        assert "<span id='edit-not-kept'>" in page.read_text() and "<table class='evaluation' " in page.read_text()
        assert main(argv) == 0  # without --json, the same on stdout
        assert re.search(r"^head version v\d+ is not kept \(--discard-edit\); to store the edit again: explaind edit-head discarded ",
                         capsys.readouterr().out, flags=re.M)
        # A page that cannot be written: the version is gone, and the error says how to store the edit again.
        monkeypatch.setattr(cli, "_write", disk_full)
        assert main(argv) == 1
        assert re.search(r"error: cannot write .*\n  head version v\d+, the suggested edit, was not kept; explaind edit-head discarded "
                         r".* stores it again\n\Z", capsys.readouterr().err)
        monkeypatch.undo()
        with Client(server.target, timeout=30) as client:
            assert {v.version_id for v in client.head_versions()} == before
    finally:
        with Client(server.target, timeout=30) as client:
            for stored in {v.version_id for v in client.head_versions()} - before:
                client.delete_head_version(stored)
            client.delete_sample_set("discarded")


def test_a_report_s_errors_said_in_its_own_words_keep_the_server_s_details():
    # Rebuilt from the code, message and retry delay alone, the error of visualisations a
    # limit stopped lost its reason and quota violation (and field and violations) in --json's error.
    import grpc

    from explaind.client import ResourceExhaustedError, UnavailableError
    from explaind.client._errors import operation_error
    from explaind.client.cli import _failure_json, _require_discarded, _require_whole, parse_arguments

    limit = operation_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "job queue is full", field="neurons", reason="QUEUED_JOBS_PER_CALLER_EXCEEDED",
                            precondition_violations=[("UNUSABLE_FEATURES", "samples[3]", "")],
                            quota_violations=[("caller:nightly", "jobs this caller has queued")])
    limit.retry_delay, limit.operation = 2.5, None
    with pytest.raises(ResourceExhaustedError) as stopped:
        _require_whole(types.SimpleNamespace(visualization_error=limit, visualizations=[]))
    error = _failure_json(stopped.value, parse_arguments(["report", "--class", "heart"]))["error"]
    assert error["message"] == "the visualisations stopped after 0 neurons: job queue is full"
    assert (error["field"], error["reason"], error["quota_violations"], error["precondition_violations"], error["retry_delay_seconds"]) == (
        "neurons", "QUEUED_JOBS_PER_CALLER_EXCEEDED", [{"subject": "caller:nightly", "description": "jobs this caller has queued"}],
        [{"type": "UNUSABLE_FEATURES", "subject": "samples[3]", "description": ""}], 2.5)
    gone = UnavailableError("the server is shutting down", retry_delay=1.0)
    report = types.SimpleNamespace(edit=types.SimpleNamespace(version=types.SimpleNamespace(version_id="v3")), edit_discard_error=gone)
    with pytest.raises(UnavailableError) as undeleted:
        _require_discarded(report, "report.html")
    assert undeleted.value.retry_delay == 1.0 and undeleted.value.details.endswith("so it stays stored: the server is shutting down")


def test_a_report_s_visualisation_error_kept_whole_names_the_option_that_set_its_field(capsys, monkeypatch, tmp_path):
    # Rebuilt from its code, the error lost its field: "--steps 20000" failed the visualisations
    # (steps is at most 10000) with no word of the report's option that set it. (The report
    # now asks the server's limit first; its visualisations' refusal is the fallback.)
    import grpc

    import explaind.client.report as report_module
    from explaind.client._errors import operation_error

    refused = operation_error(grpc.StatusCode.INVALID_ARGUMENT, "steps: 5000 is not in [1, 1000] (0 means 400)",
                              [("steps", "5000 is not in [1, 1000] (0 means 400)")])
    ranking = types.SimpleNamespace(mistake_count=3, neurons=[1], class_name="heart")
    report = types.SimpleNamespace(edit=None, edit_kept=False, edit_command="", edit_discard_error=None, ranking=ranking, visualizations=[],
                                   evaluated_on="", no_edit_reason="", edit_at_head_version_limit=False, no_visualization_reason="",
                                   visualization_error=refused)
    monkeypatch.setattr(report_module, "build_report", lambda *args, **kwargs: report)
    monkeypatch.setattr(report_module, "render_report", lambda report: "<html>")
    argv = ["--target", "127.0.0.1:1", "report", "--class", "x", "--sample-set", "s", "--out", str(tmp_path / "r.html"), "--json"]
    error, err = _json_failure(capsys, [*argv, "--steps", "5000"])
    assert (error["code"], error["field"], error["option"], error["option_defaulted"]) == ("INVALID_ARGUMENT", "steps", "--steps", False)
    assert err.endswith("\n  (steps is --steps here)\n"), err
    error, err = _json_failure(capsys, argv)  # the default's (were it out of range): said to be left out
    assert (error["option"], error["option_defaulted"]) == ("--steps", True) and err.endswith("(steps is --steps here, left out: its default)\n"), err


def test_a_report_whose_edit_cannot_be_discarded_writes_its_page_and_fails_naming_the_version_kept(server, capsys, world_images, tmp_path,
                                                                                                    monkeypatch):
    import grpc

    from explaind.client._errors import error_from_code

    name, before = _mislabelled_set(server, world_images, "undeletable")

    def server_gone(self, version_id):
        raise error_from_code(grpc.StatusCode.UNAVAILABLE, "the server went away")

    page = tmp_path / "report.html"
    monkeypatch.setattr(Client, "delete_head_version", server_gone)
    try:
        assert main(["--target", server.target, "report", "--class", name, "--sample-set", "undeletable", "--out", str(page), "--neurons", "1",
                     "--steps", "2", "--stability", "0", "--discard-edit", "--json"]) == 1
    finally:
        monkeypatch.undo()
        with Client(server.target, timeout=30) as client:
            (stored,) = {v.version_id for v in client.head_versions()} - before  # kept
            client.delete_head_version(stored)
            client.delete_sample_set("undeletable")
    printed = capsys.readouterr()
    # Not "(not served)": the server refuses to delete the served head, so it may be served now.
    message = (f"{page} is written, but deleting head version {stored}, the suggested edit (--discard-edit), failed, so it stays "
               f"stored: the server went away")
    assert printed.err.endswith(f"error: UNAVAILABLE: {message}\n")
    error = json.loads(printed.out)["error"]
    assert (error["code"], error["message"], error["notes"]) == ("UNAVAILABLE", message, [])
    assert "<span id='edit-discard-failed' class='warning'>" in page.read_text() and "<table class='evaluation' " in page.read_text()


@pytest.mark.parametrize("command", [["report", "--class", "heart"], ["rank", "s", "--class", "heart"]])
def test_a_ranking_a_person_reads_comes_with_its_stability_unless_told_not_to(command):
    from explaind.client.cli import parse_arguments

    assert parse_arguments(command).stability == DEFAULT_STABILITY_RESAMPLES > 0
    assert parse_arguments([*command, "--stability", "0"]).stability == 0


def test_a_report_without_sample_set_explains_the_newest_with_the_options_given(server, capsys, world_images, tmp_path):
    images, labels = world_images
    mislabelled = (labels[:24] + 1) % 6
    backgrounds = [{"background": "sand" if i % 2 else "grass"} for i in range(24)]  # what the edit's accuracy is grouped by
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[24:], (labels[24:] + 1) % 6, sample_set_id="newest-validation", attributes=backgrounds)
        client.create_sample_set(images[:24], mislabelled, sample_set_id="newest", attributes=backgrounds)
        name = client.model_metadata().class_names[int(mislabelled[0])]
    page = tmp_path / "report.html"
    assert main(["--target", server.target, "report", "--class", name, "--out", str(page), "--neurons", "1", "--steps", "3",
                 "--validation-sample-set", "newest-validation", "--group-attribute", "background", "--stability", "20"]) == 0
    printed = capsys.readouterr()
    assert "using the newest sample set, newest\n" in printed.err and page.exists()
    assert "<th scope='col'>stability</th>" in page.read_text() and "the share of 20 bootstrap resamples" in page.read_text()
    edit = re.search(r"^suggested head edit (v\d+), evaluated on sample set newest-validation \(24 samples\); they also chose the best epoch",
                     printed.out, flags=re.M)
    assert edit, printed.out
    with Client(server.target, timeout=30) as client:
        (visualized,) = client.operations(kind="visualize_neurons", limit=1)
        assert visualized.result(download=False).steps == 3
        groups = client.head_version(edit[1]).evaluation.group_accuracy  # (class, background) pairs
        assert {group.partition("/")[2] for group in groups} == {"grass", "sand"}
        client.delete_head_version(edit[1])
    # Refused by the server before any work, in the option's words.
    assert main(["--target", server.target, "report", "--class", name, "--out", str(page), "--stability", "1001"]) == 1
    err = capsys.readouterr().err
    assert "stability_resamples: 1001 is not in [0, 1000]" in err and err.endswith("\n  (stability_resamples is --stability here)\n"), err


def test_a_report_without_sample_set_on_a_server_without_any_says_to_create_one(capsys, tmp_path):
    from explaind.v1 import sample_sets_pb2, sample_sets_pb2_grpc
    from test_client_sdk import _serve

    class NoSets(sample_sets_pb2_grpc.SampleSetServiceServicer):
        def ListSampleSets(self, request, context):
            return sample_sets_pb2.ListSampleSetsResponse()

    server, target = _serve(NoSets())
    try:
        assert _error(capsys, ["--target", target, "report", "--class", "heart", "--out", str(tmp_path / "r.html")]) == (
            "error: the server has no sample set; create one (explaind sample-set create) or pass --sample-set")
    finally:
        server.stop(0)
    assert not (tmp_path / "r.html").exists()


def test_an_artifact_goes_to_standard_output_with_dash_and_is_not_fetched_for_an_unwritable_file(server, capsysbinary, world_images, tmp_path, monkeypatch):
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:6], labels[:6], sample_set_id="piped")
        operation = client.evaluate_sample_set("piped")
        operation.wait(60)
        expected = operation.artifact("mistakes.png")
    monkeypatch.chdir(tmp_path)
    assert main(["--target", server.target, "operations", "artifact", operation.name, "mistakes.png", "-o", "-"]) == 0
    out, err = capsysbinary.readouterr()
    assert out == expected and out.startswith(b"\x89PNG") and err == f"wrote {len(out)} bytes to standard output\n".encode()
    assert list(tmp_path.iterdir()) == []  # no file named "-"
    # "-" is standard output even beside a directory named "-", which -o DIR would write into.
    (tmp_path / "-").mkdir()
    assert main(["--target", server.target, "operations", "artifact", operation.name, "mistakes.png", "-o", "-"]) == 0
    assert capsysbinary.readouterr().out == expected and list((tmp_path / "-").iterdir()) == []
    # A file that cannot be written is refused before the download, not after it.
    monkeypatch.setattr(Operation, "artifact", lambda *_: pytest.fail("downloaded for a file it cannot write"))
    unwritable = tmp_path / "missing" / "grid.png"
    assert main(["--target", server.target, "operations", "artifact", operation.name, "mistakes.png", "-o", str(unwritable)]) == 1
    assert capsysbinary.readouterr().err == f"error: cannot write {unwritable}: no such directory\n".encode()


def test_evaluating_a_set_without_some_classes_does_not_score_them_zero(server, capsys, world_images, tmp_path):
    # Absent classes were reported with accuracy 0.00, and the demo went on to explain one.
    images, labels = world_images
    names = ["circle", "square", "triangle", "star", "cross", "heart"]
    chosen = [i for i, label in enumerate(labels) if names[label] in ("circle", "heart")][:8]
    given = [names[labels[i]] for i in chosen]
    wrong = given.index("circle")
    given[wrong] = "heart"  # a circle labelled heart: a mistake
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[chosen], given, sample_set_id="two-classes")
        evaluation = client.evaluate_sample_set("two-classes").result(timeout=60)
    assert set(evaluation.class_accuracy) == {"circle", "heart"}
    assert evaluation.class_names == names and evaluation.class_counts["star"] == 0
    assert evaluation.mistakes and all(evaluation.class_names[label] == given[index] for index, label, _, _ in evaluation.mistakes)
    mistake = evaluation.mistakes[0]  # named fields as well as a tuple
    assert (mistake.sample_index, mistake.label, mistake.predicted_class, mistake.probability) == tuple(mistake)
    assert main(["--target", server.target, "evaluate", "two-classes"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^per class: circle \d\.\d\d, heart \d\.\d\d; no samples of square, triangle, star, cross$", out, flags=re.M), out
    assert re.search(rf"^  mistake: sample {wrong} is heart, predicted circle", out, flags=re.M), out
    assert re.search(r"^most confused: heart as circle \d+(, circle as heart \d+)?$", out, flags=re.M), out
    assert "more mistakes" not in out
    with Client(server.target, timeout=30) as client:  # every label wrong: more mistakes than are printed
        client.create_sample_set(images[:12], [(int(label) + 1) % 6 for label in labels[:12]], sample_set_id="mislabelled")
        mistakes = len(client.evaluate_sample_set("mislabelled").result(timeout=60).mistakes)
    assert main(["--target", server.target, "evaluate", "mislabelled"]) == 0
    out = capsys.readouterr().out
    with Client(server.target, timeout=30) as client:
        cells = client.evaluate_sample_set("mislabelled").result(timeout=60).confusion_cells.tolist()
    pairs = [f"{names[label]} as {names[predicted]} {count}" for label, predicted, count in cells if label != predicted]
    assert len(pairs) > 5 and max(count for _, _, count in cells) > 1  # pairs of the most mistakes first
    assert f"\nmost confused: {', '.join(pairs[:5])} and {len(pairs) - 5} more pair{'s' if len(pairs) > 6 else ''}\n" in out, out
    assert len(re.findall(r"^  mistake: ", out, flags=re.M)) == 5 and mistakes > 5
    assert f"\n  and {mistakes - 5} more mistakes, less confident (evaluate --json lists all)\n" in out
    grid = tmp_path / "grid.png"
    assert main(["--target", server.target, "evaluate", "two-classes", "--json", "--grid", str(grid)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # nothing but the JSON on stdout
    assert result["class_accuracy"] == pytest.approx(evaluation.class_accuracy)
    assert result["class_counts"] == {"circle": given.count("circle"), "heart": given.count("heart")}
    # Keyed by the SDK's field names (rank --json's mistakes also say predicted_class); floats round-trip exactly.
    assert [EvaluatedMistake(*(m[field] for field in EvaluatedMistake._fields)) for m in result["mistakes"]] == evaluation.mistakes
    # The classes' names beside their indices: a script had to look each up in class_names.
    assert all((m["label_name"], m["predicted_class_name"]) == (names[m["label"]], names[m["predicted_class"]]) for m in result["mistakes"])
    assert any(m["sample_index"] == wrong and m["label_name"] == "heart" and m["predicted_class_name"] == "circle" for m in result["mistakes"])
    assert result["confusion_matrix"] == evaluation.confusion_matrix.tolist() and result["class_names"] == names
    assert result["confusion_cells"] == evaluation.confusion_cells.tolist() and sum(count for _, _, count in result["confusion_cells"]) == len(given)
    assert "started operations/" in err and f"wrote {grid}" in err and grid.stat().st_size > 0
    assert f"started {result['operation']}" in err and result["grid_file"] == str(grid)  # what stderr says, in the JSON too
    assert main(["--target", server.target, "evaluate", "two-classes", "--json", "--no-wait"]) == 0
    out, err = capsys.readouterr()
    started = json.loads(out)["name"]
    # Named as evaluate's result names it, and as before; a new job, not an earlier run's under a --request-id.
    assert json.loads(out) == {"operation": started, "name": started, "requested_again": False}
    assert err == ""  # the JSON says it all: no note to wait for it
    with Client(server.target, timeout=30) as client:
        assert client.operation(started).result(timeout=60).confusion_matrix.tolist() == result["confusion_matrix"]
    # --max-grid-images reaches the server (which bounds it); the error names the option too.
    assert main(["--target", server.target, "evaluate", "two-classes", "--max-grid-images", "5000"]) == 1
    assert re.fullmatch(r"error: INVALID_ARGUMENT: max_grid_images: .*\n  \(max_grid_images is --max-grid-images here\)\n", capsys.readouterr().err)
    # A NOT_FOUND carries no field violations: the field its message starts with is mapped too.
    assert main(["--target", server.target, "edit-head", "two-classes", "--class", "heart", "--neurons", "1",
                 "--evaluation-sample-set", "nosuch"]) == 1
    assert capsys.readouterr().err == ("error: NOT_FOUND: evaluation_sample_set_id: no sample set 'nosuch'\n"
                                       "  (evaluation_sample_set_id is --evaluation-sample-set here)\n"
                                       "  (explaind sample-set list shows what there is)\n")


@pytest.mark.parametrize(("argv", "listing"), [(["evaluate", "nosuch"], "explaind sample-set list"),
                                               (["head-versions", "show", "v999999"], "explaind head-versions list"),
                                               (["operations", "get", "operations/0123456789abcdef"], "explaind operations list")])
def test_a_name_not_found_points_to_the_command_that_lists_the_names(server, capsys, argv, listing):
    assert main(["--target", server.target, *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: NOT_FOUND: ") and err.endswith(f"\n  ({listing} shows what there is)\n"), err


def test_an_error_other_than_not_found_points_to_no_listing(server, capsys):
    # The id exists: listing the ids helps nobody.
    for _ in range(2):
        code = main(["--target", server.target, "sample-set", "create", "taken", "--world", "balanced:test:1"])
    assert code == 1
    assert capsys.readouterr().err.endswith(
        "error: ALREADY_EXISTS: sample_set_id: sample set 'taken' already exists; append to it or delete it first\n")


def test_evaluate_grid_of_a_set_without_mistakes_is_not_written_and_the_batch_size_reaches_the_server(server, capsys, world_images, tmp_path):
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        correct = _classified_right(client, images[:12], labels[:12])
        client.create_sample_set(images[correct], labels[correct], sample_set_id="no-mistakes")
    grid = tmp_path / "grid.png"
    assert main(["--target", server.target, "evaluate", "no-mistakes", "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"\nno mistakes: {grid} not written\n") and not grid.exists(), out
    assert main(["--target", server.target, "evaluate", "no-mistakes", "--grid", str(grid), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["grid_file"] is None and err.endswith(f"\nno mistakes: {grid} not written\n") and not grid.exists()
    assert main(["--target", server.target, "evaluate", "no-mistakes", "--batch-size", "-1"]) == 1
    assert capsys.readouterr().err == ("error: INVALID_ARGUMENT: batch_size: must be between 1 and 4096, or 0 for the default\n"
                                       "  (batch_size is --batch-size here)\n")


def test_operations_wait_exits_1_when_the_job_did_not_succeed(server, capsys):
    with Client(server.target, timeout=30) as client:
        job, other = (client.visualize_neurons([3], method="feature_visualization", steps=10000) for _ in range(2))
    cancelled = _json_out(capsys, ["--target", server.target, "operations", "cancel", other.name, "--json"])  # the job as the cancel left it
    assert (cancelled["name"], cancelled["kind"], cancelled["cancel_requested"]) == (other.name, "visualize_neurons", True)
    assert main(["--target", server.target, "operations", "cancel", job.name]) == 0
    said = capsys.readouterr().out  # it printed the operation, whose state still read running
    assert re.fullmatch(rf"(cancelled {job.name}|cancel requested for {job.name} \((queued|running)\); it ends at its next check "
                        rf"\(explaind operations wait {job.name}\))\n", said), said
    assert main(["--target", server.target, "operations", "wait", job.name]) == 1
    waited = capsys.readouterr()
    assert re.match(rf"{job.name} +visualize_neurons +cancelled +\d+/\d+ ", waited.out) and "error:" not in waited.out
    # The outcome, where evaluate's failed job says it; queued behind an earlier test's job, it never started.
    outcome = re.fullmatch(r"error: CANCELLED: (cancelled (by request|before it started))\n", waited.err)
    assert outcome, waited.err
    got = _json_out(capsys, ["--target", server.target, "operations", "get", job.name, "--json"])
    assert got["cancel_requested"] is True and got["error"] == {"code": "CANCELLED", "message": outcome[1], "field": None,  # the message without the code
                                                             "precondition_violations": [], "reason": None, "quota_violations": []}
    assert main(["--target", server.target, "operations", "get", job.name]) == 0
    got = capsys.readouterr().out
    assert got.endswith(waited.err)  # get describes the operation, error included
    assert main(["--target", server.target, "operations", "watch", job.name]) == 1  # ended: its state once, as get prints it
    assert capsys.readouterr() == (waited.out, waited.err)


def test_operations_cancel_of_a_job_that_ended_meanwhile_says_it_finished_not_that_it_was_cancelled(capsys):
    # Read running, ended before the cancel reached it: "cancelled" sent the caller to
    # submit again a job whose result was there.
    from google.longrunning import operations_pb2 as operations_lro
    from google.protobuf import any_pb2

    from explaind.v1 import operations_pb2, operations_pb2_grpc
    from test_client_sdk import _serve

    def operation(name: str, state: int) -> operations_lro.Operation:
        metadata = any_pb2.Any()
        metadata.Pack(operations_pb2.OperationMetadata(kind="edit_head", state=state))
        return operations_lro.Operation(name=name, metadata=metadata, done=state != operations_pb2.OPERATION_STATE_RUNNING)

    class EndingOperations(operations_pb2_grpc.OperationsServiceServicer):
        def GetOperation(self, request, context):
            return operations_pb2.GetOperationResponse(operation=operation(request.name, operations_pb2.OPERATION_STATE_RUNNING))

        def CancelOperation(self, request, context):
            return operations_pb2.CancelOperationResponse(operation=operation(request.name, operations_pb2.OPERATION_STATE_SUCCEEDED))

    server, target = _serve(EndingOperations(), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        assert main(["--target", target, "operations", "cancel", "operations/x"]) == 0
    finally:
        server.stop(0)
    assert capsys.readouterr().out == "operations/x had already finished (succeeded); nothing to cancel\n"


def test_operations_cancel_json_of_a_finished_job_prints_the_job(server, capsys, world_images):
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:4], labels[:4], sample_set_id="cancel-json")
        job = client.evaluate_sample_set("cancel-json")
        job.wait(60)
    cancelled = _json_out(capsys, ["--target", server.target, "operations", "cancel", job.name, "--json"])
    assert (cancelled["name"], cancelled["state"], cancelled["cancel_requested"]) == (job.name, "succeeded", False)
    assert main(["--target", server.target, "operations", "cancel", job.name]) == 0  # without --json: said in words, nothing cancelled
    assert capsys.readouterr().out == f"{job.name} had already finished (succeeded); nothing to cancel\n"


def test_operations_get_shows_a_cancel_requested_the_owner_and_a_result_cut_short(capsys):
    from google.longrunning import operations_pb2 as operations_lro
    from google.protobuf import any_pb2

    from explaind.v1 import inference_pb2, operations_pb2, operations_pb2_grpc
    from test_client_sdk import _serve

    stored = {
        "operations/stopping": operations_pb2.OperationMetadata(
            kind="visualize_neurons", state=operations_pb2.OPERATION_STATE_RUNNING, cancel_requested=True, owner="ops",
            progress=operations_pb2.Progress(step=3, total=10, message="optimising")),
        "operations/cut": operations_pb2.OperationMetadata(  # a result over half the message limit: its leading mistakes only
            kind="evaluate_sample_set", state=operations_pb2.OPERATION_STATE_SUCCEEDED, full_response_artifact="response.binpb"),
    }

    class StoredOperations(operations_pb2_grpc.OperationsServiceServicer):
        def GetOperation(self, request, context):
            metadata, response = any_pb2.Any(), any_pb2.Any()
            metadata.Pack(stored[request.name])
            response.Pack(inference_pb2.EvaluateSampleSetResult(sample_set_id="s", sample_count=1, accuracy=1.0))
            done = stored[request.name].state != operations_pb2.OPERATION_STATE_RUNNING
            return operations_pb2.GetOperationResponse(operation=operations_lro.Operation(
                name=request.name, metadata=metadata, done=done, response=response if done else None))

    server, target = _serve(StoredOperations(), add=operations_pb2_grpc.add_OperationsServiceServicer_to_server)
    try:
        assert main(["--target", target, "operations", "get", "operations/stopping"]) == 0
        line = capsys.readouterr().out
        assert re.fullmatch(r"operations/stopping +visualize_neurons +running +\(cancel requested\) 3/10 optimising  "
                            r"[-\d]+ [:\d]+ \w+  by ops\n", line), line
        assert main(["--target", target, "operations", "get", "operations/cut"]) == 0
        assert ("\nthe result is too large for one message: below are its leading items; "
                "`explaind operations artifact operations/cut response.binpb` has it whole\naccuracy 1.000 on 1 sample") in capsys.readouterr().out
    finally:
        server.stop(0)


def test_an_artifact_goes_to_a_file_of_its_own_name_unless_given_one(server, capsys, world_images, tmp_path, monkeypatch):
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:6], (labels[:6] + 1) % 6, sample_set_id="artifact-file")
        job = client.evaluate_sample_set("artifact-file")
        job.wait(60)
        expected = job.artifact("mistakes.png")
    monkeypatch.chdir(tmp_path)
    assert main(["--target", server.target, "operations", "artifact", job.name, "mistakes.png"]) == 0
    assert capsys.readouterr().out == f"wrote mistakes.png ({len(expected)} bytes)\n" and (tmp_path / "mistakes.png").read_bytes() == expected
    written = _json_out(capsys, ["--target", server.target, "operations", "artifact", job.name, "mistakes.png", "-o", "grid.png", "--json"])
    assert written == {"file": "grid.png", "size_bytes": len(expected)} and (tmp_path / "grid.png").read_bytes() == expected
    # Given a directory (existing, or any path ending in "/"), it writes the artifact's own name in it, as cp does: it was refused.
    (tmp_path / "into").mkdir()
    for directory in ("into", "into/"):
        assert main(["--target", server.target, "operations", "artifact", job.name, "mistakes.png", "-o", directory]) == 0
        assert capsys.readouterr().out == f"wrote {os.path.join(directory, 'mistakes.png')} ({len(expected)} bytes)\n"
        assert (tmp_path / "into" / "mistakes.png").read_bytes() == expected
    assert _error(capsys, ["--target", server.target, "operations", "artifact", job.name, "mistakes.png", "-o", "absent/"]) == (
        "error: cannot write absent/mistakes.png: no such directory")
    # Its own name is checked before the download too.
    (tmp_path / "taken" / "mistakes.png").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "taken")
    monkeypatch.setattr(Operation, "artifact", lambda *_: pytest.fail("downloaded for a file it cannot write"))
    assert _error(capsys, ["--target", server.target, "operations", "artifact", job.name, "mistakes.png"]) == (
        "error: cannot write mistakes.png: it is a directory")
    # A visualisation's name holds its class's, which may hold a "/" (no such directory) or a ":" (Windows: a stream).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Operation, "artifact", lambda _, name: name.encode())
    # A suffix is kept only of letters and digits: any other is made safe with the rest.
    for artifact, file_name in [("03_neuron7_Chihuahua/toy: é.png", "03_neuron7_Chihuahua-toy-e.png"), ("../up", "up"), ("toy.p g", "toy.p-g")]:
        assert main(["--target", server.target, "operations", "artifact", job.name, artifact]) == 0
        assert capsys.readouterr().out.startswith(f"wrote {file_name} (") and (tmp_path / file_name).read_bytes() == artifact.encode()


def test_operations_list_asks_for_the_newest_100_unless_given_a_limit(server, capsys, monkeypatch):
    asked = []
    listed = Client.operations

    def recording(self, **options):
        asked.append(options["limit"])
        return listed(self, **options)

    monkeypatch.setattr(Client, "operations", recording)
    for argv in ([], ["--limit", "7"]):
        assert main(["--target", server.target, "operations", "list", *argv]) == 0
    assert asked == [101, 8]  # one more than it prints: whether to say there are more


def test_operations_watch_prints_each_update_as_operations_list_does(server, capsys, monkeypatch):
    # It printed the SDK's repr, "Operation('operations/...', kind=..., state=...,
    # progress=57/400) optimising 1 images", a line per step.
    watch = Operation.watch

    def cancelled_after_two_updates(self, *args, **kwargs):  # a job that is certainly watched running, then ends
        for seen, update in enumerate(watch(self, *args, **kwargs)):
            yield update
            if seen == 1:
                self.cancel()

    monkeypatch.setattr(Operation, "watch", cancelled_after_two_updates)
    with Client(server.target, timeout=30) as client:
        job = client.visualize_neurons([3], method="feature_visualization", steps=10000)
    assert main(["--target", server.target, "operations", "watch", job.name]) == 1
    lines = capsys.readouterr().out.splitlines()
    updates, final = lines[:-1], lines[-1]
    assert len(updates) >= 2 and all(
        re.fullmatch(rf"{job.name} +visualize_neurons +(queued|running)( \(cancel requested\))? +\d+/\d+ .*  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \w+", line)
        for line in updates), updates
    assert main(["--target", server.target, "operations", "list", "--kind", "visualize_neurons", "--limit", "1"]) == 0
    assert final == capsys.readouterr().out.strip() and " cancelled " in final  # the last state as list shows it


@pytest.fixture
def central_european_time(monkeypatch):
    """This process's local time zone is CET (UTC+1, no tzdata needed) for one test."""
    monkeypatch.setenv("TZ", "CET-1")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_are_printed_in_local_time_with_their_zone(server, capsys, central_european_time):
    # They were UTC without saying so: an hour off, here, from the clock and the server's log.
    target = ["--target", server.target]
    created = _json_out(capsys, [*target, "sample-set", "create", "local-times", "--world", "balanced:test:2", "--json"])
    local = dt.datetime.fromisoformat(created["create_time"]).astimezone(dt.timezone(dt.timedelta(hours=1)))
    shown = f"{local:%Y-%m-%d %H:%M:%S} CET"
    assert main([*target, "sample-set", "show", "local-times"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"created {shown}")
    assert main([*target, "sample-set", "list"]) == 0
    assert f"(updated {shown})" in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("local-times "))
    job = _json_out(capsys, [*target, "evaluate", "local-times", "--no-wait", "--json"])
    operation = _json_out(capsys, [*target, "operations", "wait", job["name"], "--json"])
    local = dt.datetime.fromisoformat(operation["create_time"]).astimezone(dt.timezone(dt.timedelta(hours=1)))
    assert main([*target, "operations", "list", "--limit", "1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"{local:%Y-%m-%d %H:%M:%S} CET")


def test_sample_set_list_says_sample_for_one_and_keeps_its_columns(server, capsys):
    target = ["--target", server.target]
    for set_id, count in (("one-sample", 1), ("two-samples", 2)):
        assert main([*target, "sample-set", "create", set_id, "--world", f"balanced:test:{count}"]) == 0
    capsys.readouterr()
    assert main([*target, "sample-set", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "      1 sample   " in lines["one-sample"] and "      2 samples  " in lines["two-samples"]
    assert lines["one-sample"].index("(updated") == lines["two-samples"].index("(updated")


def test_sample_set_list_marks_unfinished_uploads_names_owners_and_escapes_names(capsys, monkeypatch):
    # Listed as another caller (or an older server that took control characters) stored it.
    from explaind.client import SampleSet

    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    listed = [SampleSet("half", "red\x1b[2J\nforged\u2028too", 512, {0: 512}, now, now, uploading=True, owner="ops")]
    monkeypatch.setattr(Client, "sample_sets", lambda self, owner="": listed)
    assert main(["--target", "127.0.0.1:1", "sample-set", "list"]) == 0
    (line,) = capsys.readouterr().out.splitlines()  # U+2028 (line separator) is a line break to splitlines
    assert re.fullmatch(r"half +512 samples  red\\x1b\[2J\\nforged\\u2028too  \(updated [-\d]+ [:\d]+ \w+, still uploading, by ops\)", line), line


def test_sample_set_list_escapes_a_name_s_bidirectional_controls(capsys, monkeypatch):
    # U+202E (right-to-left override) in a set's name showed the rest of its line, the
    # owner included, reversed on a terminal that lays out bidirectional text.
    from explaind.client import SampleSet

    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    listed = [SampleSet("rtl", "left\u202eright\u2067isolated\u2069", 1, {0: 1}, now, now, owner="ops")]
    monkeypatch.setattr(Client, "sample_sets", lambda self, owner="": listed)
    assert main(["--target", "127.0.0.1:1", "sample-set", "list"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "  left\\u202eright\\u2067isolated\\u2069  (updated " in line and line.endswith(", by ops)"), line


def test_sample_set_show_quotes_the_set_s_name_and_delete_json_says_what_it_deleted(server, capsys):
    target = ["--target", server.target]
    assert main([*target, "sample-set", "create", "named-set", "--name", "red set", "--world", "balanced:test:2"]) == 0
    capsys.readouterr()
    assert main([*target, "sample-set", "show", "named-set"]) == 0
    assert capsys.readouterr().out.startswith("named-set ('red set'): 2 samples, per class ")
    assert _json_out(capsys, [*target, "sample-set", "delete", "named-set", "--json"]) == {"deleted": "named-set"}


def test_a_world_sample_set_keeps_each_sample_s_attributes(server, capsys):
    # What --group-attribute background groups by.
    from explaind.client.cli import _world_samples

    assert main(["--target", server.target, "sample-set", "create", "world-attributes", "--world", "balanced:test:3"]) == 0
    _, _, attributes = _world_samples("balanced", "test", 3)
    with Client(server.target, timeout=30) as client:
        assert [sample.attributes for sample in client.samples("world-attributes")] == list(attributes) and attributes[0]["background"]


def test_a_world_sample_set_s_images_are_drawn_as_they_are_sent_not_all_before(monkeypatch):
    # --world balanced:test:1000000 rendered every image into the CLI's memory first (12 GB).
    from explaind.client.cli import _world_samples
    from explaind.world import render
    from explaind.world.scenarios import get_scenario

    batch = get_scenario("spurious_background").dataset("val", size=5).all()
    drawn = []
    draw = render.render
    monkeypatch.setattr(render, "render", lambda spec: drawn.append(spec) or draw(spec))
    images, labels, attributes = _world_samples("spurious_background", "val", 5)
    assert drawn == [] and len(images) == 5
    streamed = iter(images)
    first = next(streamed)
    assert drawn == [batch.specs[0]] and first.dtype == np.uint8
    rest = list(streamed)
    assert np.array_equal(np.stack([first, *rest]), (batch.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    assert list(labels) == batch.labels.tolist()
    assert list(attributes) == [{name: str(values[i]) for name, values in batch.attributes.items()} for i in range(5)]
    assert [image.shape for image in images.first(2)] == [(64, 64, 3)] * 2


def test_a_world_sample_s_scene_is_made_once_for_its_image_label_and_attributes(monkeypatch):
    # An upload reads each sample's scene thrice, for its image, label and attributes: made
    # each time, the scenes (about 45 µs each) took three times as long.
    from explaind.client.cli import _world_samples
    from explaind.world.render import SHAPES
    from explaind.world.scenarios import WorldDataset

    made = []
    spec = WorldDataset.spec
    monkeypatch.setattr(WorldDataset, "spec", lambda dataset, index: made.append(index) or spec(dataset, index))
    images, labels, attributes = _world_samples("spurious_background", "val", 3)
    for index, image in enumerate(images):  # as an upload reads a sample
        assert image.shape == (64, 64, 3) and labels[index] in range(len(SHAPES)) and attributes[index]["background"]
    assert made == [0, 1, 2]


@pytest.mark.timeout(60)  # read ahead, the count below takes years
def test_a_world_sample_set_s_labels_and_attributes_are_computed_as_they_are_read():
    # --world balanced:test:99999999999999 made every scene's spec (about 45 µs each) before
    # its first request: it ran silently until interrupted.
    from explaind.client.cli import _world_samples
    from explaind.world.render import SHAPES, scene_attributes
    from explaind.world.scenarios import get_scenario

    count = 99_999_999_999_999
    images, labels, attributes = _world_samples("spurious_background", "val", count)
    assert len(images) == len(labels) == len(attributes) == count
    dataset = get_scenario("spurious_background").dataset("val", size=count)
    for index in (0, 7, count - 1):
        spec = dataset.spec(index)
        assert labels[index] == SHAPES.index(spec.shape) and attributes[index] == scene_attributes(spec)
    assert labels[-1] == labels[count - 1] and labels[3:6] == [labels[3], labels[4], labels[5]]
    with pytest.raises(IndexError):
        attributes[count]


def test_uploads_of_more_than_512_samples_show_their_progress_on_stderr(server, capsys, monkeypatch):
    # More than one request's worth (512 by default) takes a while; one request does not.
    # The four uploads send the same first 512 scenes: each is drawn once (a scene is its spec's alone).
    from explaind.world import render

    monkeypatch.setattr(render, "render", functools.cache(render.render))
    for count, shown in ((512, False), (513, True)):
        for action in ("create", "append"):
            assert main(["--target", server.target, "sample-set", action, f"progress-{count}", "--world", f"balanced:test:{count}"]) == 0
            err = capsys.readouterr().err
            assert (f"progress-{count}: uploaded {count}/{count}\n" in err) == shown, err


def test_sample_set_ids_are_positional_like_evaluate_and_global_options_may_follow_the_command(server, capsys, world_images):
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:5], labels[:5], sample_set_id="positional")
    assert main(["sample-set", "show", "positional", "--target", server.target]) == 0
    assert capsys.readouterr().out.startswith("positional: 5 samples")
    assert main(["--target", server.target, "sample-set", "show", "--id", "positional"]) == 0
    assert main(["--target", "127.0.0.1:1", "sample-set", "delete", "positional", "--target", server.target]) == 0
    assert "deleted positional" in capsys.readouterr().out
    assert "sample-set show: give a sample set id" in _usage_error(capsys, ["sample-set", "show"])


def test_operations_kind_must_be_a_known_kind(capsys):
    err = _usage_error(capsys, ["operations", "list", "--kind", "nonsense"])
    assert "invalid choice: 'nonsense'" in err and "'evaluate_sample_set'" in err and "'edit_head'" in err


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_lists_choices_defaults_and_what_special_values_mean(capsys, monkeypatch):
    monkeypatch.setenv("EXPLAIND_TOKEN", "s3cret")
    top = _help(capsys, [])
    assert "go before or after a client command (all but serve and demo)" in top and "s3cret" not in top
    for command_help in (top, _help(capsys, ["predict"])):  # each default stated once, where set_defaults keeps it too
        assert command_help.count("seconds per call (default: 60)") == 1 and "(default: 60.0)" not in command_help
        assert "server address (default: env EXPLAIND_TARGET, else 127.0.0.1:50051) -" in command_help
    operations = _help(capsys, ["operations"])
    assert "--state {queued,running,succeeded,failed,cancelled}" in operations
    assert "--kind {evaluate_sample_set,rank_mistake_neurons,visualize_neurons,edit_head}" in operations
    assert "rollback serves the active version's parent (the version it was edited from)" in _help(capsys, ["head-versions"])
    assert "0: the server's [jobs].evaluate_batch_size" in _help(capsys, ["evaluate"])
    assert "(default: )" not in _help(capsys, ["edit-head"])  # an empty default is no default to state
    serve = _help(capsys, ["serve"])
    assert "gRPC port (default: [server].port, 50051)" in serve and "(default: [server].metrics_port, 0 = off)" in serve
    assert "--top-k TOP_K classes per image (default 3, or all of a classifier with fewer)" in _help(capsys, ["predict"])
    # sample-set's --request-id promised a "first run's job" in the --json error: an upload starts none (operation null).
    assert "first run's job" not in _help(capsys, ["sample-set"])
    assert "INVALID_ARGUMENT, --json's error naming the first run's job as operation" in _help(capsys, ["evaluate"])
    report = " ".join(_help(capsys, ["report"]).split())  # a cost for a stated size: "a fraction of a second" held to ~4k mistakes
    assert "(default: 200; on one server CPU thread 0.1 s for 4,096 mistakes of 2048 features, 0.9 s for 50,000)" in report


def test_help_states_each_options_default_once(capsys):
    # --max-in-flight read "(default 4) (default: 4)": its help said it, and the formatter added it again.
    from explaind.client.cli import build_parser

    subcommands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    for command in subcommands.choices:
        options = re.split(r" (?=-{1,2}[a-z])", _help(capsys, [command]).split(" options: ", 1)[1])
        repeated = [option for option in options if len(re.findall(r"\(default\b", option)) > 1]
        assert not repeated, f"explaind {command} --help: {repeated}"


def test_the_cli_imports_the_report_module_only_for_report():
    # It imported report.py at start-up for --stability's default alone: 5-8 ms on every command.
    script = "import sys, explaind.client.cli\nprint('explaind.client.report' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout == "False\n", done.stderr


def test_help_goes_to_a_redirect_whose_encoding_lacks_its_letters(monkeypatch):
    # On Windows, output redirected to a file or pipe is in the locale's encoding, cp1252,
    # which has no "λ": `explaind edit-head --help > help.txt` ended in UnicodeEncodeError.
    redirected = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(redirected, encoding="cp1252"))
    with pytest.raises(SystemExit) as exited:
        main(["edit-head", "--help"])
    assert exited.value.code == 0
    sys.stdout.flush()
    assert "\\u03bb3, the regulariser's weight" in redirected.getvalue().decode("cp1252")


def test_main_leaves_a_strict_standard_output_strict(capsys, monkeypatch, tmp_path):
    # Escaping what standard output cannot encode set a program's stdout, which calls
    # main in-process, to errors="backslashreplace" for good, whether main returned or raised.
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 1
    assert stdout.errors == "strict"
    with pytest.raises(SystemExit):
        main(["edit-head", "--help"])
    assert stdout.errors == "strict"
    # The help was escaped meanwhile.
    assert "\\u03bb3" in stdout.buffer.getvalue().decode("cp1252")


def test_restoring_a_strict_standard_output_does_not_fail_over_what_main_ended_with(monkeypatch):
    # The restore flushes: the help still buffered for a reader that left (`explaind
    # edit-head --help | head -1`) raised BrokenPipeError over argparse's SystemExit, a
    # traceback where the pipe's end should be quiet; so over an error's exit code.
    reader, writer = os.pipe()
    os.close(reader)
    with io.TextIOWrapper(io.BufferedWriter(io.FileIO(writer, "w")), encoding="utf-8") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        with pytest.raises(SystemExit) as exited:
            main(["edit-head", "--help"])
        assert exited.value.code == 0 and stdout.errors == "strict"
        monkeypatch.undo()


def test_main_leaves_a_standard_output_of_another_error_handler_as_it_was(monkeypatch):
    # surrogateescape, as in a C locale: neither escaped meanwhile nor made strict after.
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdout", stdout)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert stdout.errors == "surrogateescape"


def test_a_closed_pipe_ends_the_command_quietly_whatever_standard_output_s_error_handler(server, world_images):
    # A strict one's restore discards what is left for the reader gone; any other has no
    # restore, so the command's own handling must, or the interpreter's final flush of the
    # buffered output fails ("Exception ignored ... BrokenPipeError", exit code 120).
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # buffered, as by default
    command = subprocess.Popen([sys.executable, "-m", "explaind.client.cli", "--target", server.target, "info"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment | {"PYTHONIOENCODING": "utf-8:surrogateescape"})
    command.stdout.close()
    stderr = command.stderr.read().decode()
    assert command.wait(timeout=120) == 141 and stderr == "", stderr


def test_the_cli_runs_where_there_is_no_standard_output(monkeypatch):
    # pythonw on Windows, and some services, start it with sys.stdout None: escaping what
    # standard output cannot encode must leave it be.
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0

@pytest.fixture(scope="module")
def relabelled_set(server, world_images):
    """A set whose every image is labelled heart: all non-hearts are heart mistakes."""
    images, _ = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images, ["heart"] * len(images), sample_set_id="all-hearts")
        expected = client.rank_mistake_neurons("all-hearts", "heart")
    return "all-hearts", expected


def test_rank_prints_the_ranked_neurons_or_json(server, capsys, relabelled_set):
    sample_set_id, expected = relabelled_set
    assert main(["--target", server.target, "rank", sample_set_id, "--class", "heart", "--show", "3", "--stability", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{expected.mistake_count} mistakes of heart in all-hearts")
    assert "in their top 5 (solver faithful)" in out[0] and out[1].split() == ["neuron", "direction", "insufficient", "excessive", "importance", "top", "classes"]
    assert [int(line.split()[0]) for line in out[2:5]] == [n.neuron for n in expected.neurons[:3]]
    first = expected.neurons[0]
    assert out[2].split()[1:4] == [first.direction, f"{first.insufficient_ratio:.0%}", f"{first.excessive_ratio:.0%}"]
    assert out[5].startswith("predicted as: ") and f"of {expected.mistake_count} counterfactuals flipped" in out[5]
    assert main(["--target", server.target, "rank", sample_set_id, "--class", "5", "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)
    assert [n["neuron"] for n in ranking["neurons"]] == [n.neuron for n in expected.neurons]
    assert ranking["neurons"][0]["rank_ratio"] == expected.neurons[0].rank_ratio and ranking["class_name"] == "heart"
    assert ranking["mistake_count"] == expected.mistake_count > 0 and "mistakes" not in ranking  # not asked for: not an empty list
    assert "omega" not in ranking  # (mistakes x features) floats: the SDK's result or omega.npy has them
    assert ranking["operation"] is None and ranking["requested_again"] is False  # a small set, ranked inline: no job, no earlier run's
    assert main(["--target", server.target, "rank", sample_set_id, "--class", "heart"]) == 0
    out = capsys.readouterr().out.splitlines()  # 10 neurons unless --show says otherwise, how far to trust each unless --stability 0 says not
    assert len(out[2:-2]) == 10 < len(expected.neurons) and out[-1].startswith("predicted as: ")
    assert "stability" in out[1].split() and out[-2].startswith(f"stability: share of {DEFAULT_STABILITY_RESAMPLES} bootstrap resamples")
    assert main(["--target", server.target, "rank", sample_set_id, "--class", "heart", "--show", "2", "--stability", "50"]) == 0
    out = capsys.readouterr().out.splitlines()  # a stability column, and what it is under the table
    assert out[1].split() == ["neuron", "direction", "insufficient", "excessive", "importance", "stability", "top", "classes"]
    assert out[2].split()[5].endswith("%") and out[4].startswith("stability: share of 50 bootstrap resamples")
    stable = _json_out(capsys, ["--target", server.target, "rank", sample_set_id, "--class", "heart", "--stability", "50", "--json"])
    assert stable["stability_resamples"] == 50 and 0 < stable["neurons"][0]["stability"] <= 1
    proximal = _json_out(capsys, ["--target", server.target, "rank", sample_set_id, "--class", "heart", "--solver", "proximal", "--json"])
    assert proximal["solver"] == "proximal"
    for given, said, field in (("circle", "class_name: sample set 'all-hearts' has no sample of class 'circle'", "class_name"),
                               ("-1", "class_index: -1 is not a class index in [0, 6)", "class_index")):  # was "unknown class '-1'"
        assert main(["--target", server.target, "rank", sample_set_id, "--class", given]) == 1
        err = capsys.readouterr().err
        assert said in err and err.endswith(f"\n  ({field} is --class here)\n"), err
        # --json's error names the option as typed beside the API's field, which a script could not map back.
        error, _ = _json_failure(capsys, ["--target", server.target, "rank", sample_set_id, "--class", given, "--json"])
        assert (error["field"], error["option"]) == (field, "--class")
    assert main(["--target", server.target, "rank", sample_set_id, "--class", "heart", "--stability", "1001"]) == 1
    err = capsys.readouterr().err  # the server's range, and which option set the field it names
    assert "stability_resamples: 1001 is not in [0, 1000]" in err and err.endswith("\n  (stability_resamples is --stability here)\n"), err


def _artifact_reads(server) -> float:
    from test_service_api import _metric

    return _metric(server, "explaind_rpc_duration_seconds_count", method="GetArtifact", code="OK")


def test_operations_get_prints_a_ranking_without_downloading_omega_and_delete_forgets_it(server, capsys, relabelled_set):
    sample_set_id, expected = relabelled_set
    with Client(server.target, timeout=30) as client:
        client.rank_mistake_neurons(sample_set_id, "heart", execution="operation")  # an older one, for the list below
        ranking = client.rank_mistake_neurons(sample_set_id, "heart", execution="operation", include_samples=True)
        (operation,) = client.operations(kind="rank_mistake_neurons", limit=1)
        assert ranking.omega.shape == (expected.mistake_count, 128) and ranking.operation == operation.name
        assert operation.result(download=False).omega is None and operation.result(download=False).neurons == ranking.neurons
    reads = _artifact_reads(server)
    assert reads > 0  # the SDK's result() above read ω
    assert main(["--target", server.target, "operations", "get", operation.name]) == 0
    out = capsys.readouterr().out
    assert "artifacts: omega.npy" in out and f"{expected.mistake_count} mistakes of heart in all-hearts" in out
    assert _artifact_reads(server) == reads  # ω can be gigabytes; the printout shows none of it
    summaries = _json_out(capsys, ["--target", server.target, "operations", "get", operation.name, "--json"])["result"]["mistakes"]
    assert len(summaries) == expected.mistake_count  # asked for with include_samples: listed
    assert main(["--target", server.target, "operations", "list", "--kind", "rank_mistake_neurons", "--limit", "1"]) == 0
    listed = capsys.readouterr()
    assert listed.out.split()[0] == operation.name and listed.err == "(the newest 1; --limit N lists more)\n"
    assert main(["--target", server.target, "operations", "list", "--kind", "rank_mistake_neurons", "--limit", "1000"]) == 0
    assert capsys.readouterr().err == ""  # all listed: no hint (it showed whenever the count was the limit)
    assert main(["--target", server.target, "operations", "list", "--state", "queued"]) == 0
    assert capsys.readouterr() == ("", "no queued operations\n")  # what was filtered, not "of that kind or state"
    assert main(["--target", server.target, "operations", "list", "--state", "queued", "--kind", "edit_head"]) == 0
    assert capsys.readouterr() == ("", "no queued edit_head operations\n")
    # Given by its id, it is named as every other command's JSON names it: a script matches them.
    bare = operation.name.removeprefix("operations/")
    assert main(["--target", server.target, "operations", "delete", bare, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": bare, "operation": operation.name}
    assert "NOT_FOUND" in _error(capsys, ["--target", server.target, "operations", "get", operation.name])


def test_visualize_writes_each_image_and_its_masked_version(server, capsys, tmp_path, monkeypatch):
    out_dir = tmp_path / "images"
    assert main(["--target", server.target, "visualize", "3", "5:heart", "--method", "feature_visualization", "--steps", "3",
                 "--out-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("started operations/") and "wrote 4 images to" in out
    with Client(server.target, timeout=30) as client:
        served = client.model_metadata().model_version
    # The settings it ran with, those of its method: the defaults (feature_visualization has no γ or ε).
    assert f"\n2 neurons visualised with feature_visualization, 3 steps (learning rate 0.009, seed 0), against head {served}:\n" in out, out
    names = sorted(p.name for p in out_dir.iterdir())
    assert names[0].startswith("00_neuron3_") and names[2:] == ["01_neuron5_heart.png", "01_neuron5_heart_masked.png"]
    assert Image.open(out_dir / "01_neuron5_heart.png").size == (64, 64)
    assert "'5:' is not NEURON or NEURON:CLASS" in _usage_error(capsys, ["visualize", "5:"])
    assert "'x:heart' is not NEURON or NEURON:CLASS" in _usage_error(capsys, ["visualize", "x:heart"])
    assert "--show: expected an integer >= 0, got '-1'" in _usage_error(capsys, ["rank", "s", "--class", "heart", "--show", "-1"])
    file = out_dir / "01_neuron5_heart.png"
    assert _error(capsys, ["--target", server.target, "visualize", "3", "--out-dir", str(file)]) == f"error: --out-dir: {file} is a file, not a directory"
    assert _error(capsys, ["--target", server.target, "visualize", "3", "--out-dir", str(file / "below")]) == (
        f"error: --out-dir: cannot create {file / 'below'}: Not a directory")
    # The server names the request's pairs[1]; the CLI, the argument that set it.
    assert main(["--target", server.target, "visualize", "3", "999", "--out-dir", str(out_dir)]) == 1
    assert re.fullmatch(r"error: INVALID_ARGUMENT: pairs\[1\]\.neuron: 999 is not a neuron index .*\n"
                        r"  \(pairs\[1\]\.neuron is the NEURON\[:CLASS\] at position 2 here\)\n", capsys.readouterr().err)
    # --no-wait writes no images (nor takes --out-dir); without CLIP the similarity is n/a.
    monkeypatch.chdir(tmp_path / "images")
    assert main(["--target", server.target, "visualize", "3", "--method", "no_clip", "--steps", "2", "--no-wait"]) == 0
    assert len(list(out_dir.iterdir())) == 4
    assert main(["--target", server.target, "operations", "wait", capsys.readouterr().out.strip()]) == 0
    assert re.search(r"CLIP similarity n/a \(no CLIP\), mask area", capsys.readouterr().out)


def test_visualize_sends_classes_per_neuron_and_the_seed_and_makes_a_nested_out_dir(server, capsys, tmp_path):
    runs = [_json_out(capsys, ["--target", server.target, "visualize", "3", "--method", "no_clip", "--steps", "2", "--classes-per-neuron", "2",
                               "--seed", str(seed), "--out-dir", str(tmp_path / "nested" / str(seed)), "--json"]) for seed in (1, 2)]
    assert [len({v["class_name"] for v in run["visualizations"]}) for run in runs] == [2, 2]  # the neuron's top two classes
    assert runs[0]["visualizations"][0]["activation"] != runs[1]["visualizations"][0]["activation"]  # other start images
    # --json has the settings each ran with: no_clip's default γ and learning rate, no ε.
    assert [{name: run[name] for name in ("gamma", "epsilon", "learning_rate", "seed")} for run in runs] == [
        {"gamma": 0.5, "epsilon": None, "learning_rate": 9e-3, "seed": seed} for seed in (1, 2)]
    # --gamma, --learning-rate and --epsilon (what clip_illusion's warning tells to raise)
    # reach the server: this one has no CLIP, so no_clip's job takes the first two, and
    # refuses ε, which only clip_illusion has.
    tuned = _json_out(capsys, ["--target", server.target, "visualize", "3:heart", "--method", "no_clip", "--steps", "1", "--gamma", "0.25",
                               "--learning-rate", "0.02", "--out-dir", str(tmp_path / "tuned"), "--json"])
    assert {name: tuned[name] for name in ("gamma", "epsilon", "learning_rate")} == {"gamma": 0.25, "epsilon": None, "learning_rate": 0.02}
    refused = _error(capsys, ["--target", server.target, "visualize", "3:heart", "--method", "no_clip", "--epsilon", "1.5", "--out-dir", str(tmp_path / "tuned")])
    assert refused.startswith("error: INVALID_ARGUMENT: epsilon: "), refused
    assert sorted(p.name for p in (tmp_path / "nested" / "1").iterdir())[0].startswith("00_neuron3_")


def test_visualize_marks_the_images_whose_clip_similarity_plus_epsilon_is_not_positive(capsys):
    # There CLIP-Illusion's loss rewarded a lower activation: the image is meaningless,
    # and the printed result said nothing of it.
    import dataclasses

    from explaind.client import NeuronVisualization, NeuronVisualizations, cli

    healthy = NeuronVisualization(neuron=8, class_index=1, class_name="square", image=None, masked_image=None, activation=2.5,
                                  logit=20.1, clip_similarity=0.2, core_relevance=0.1, mask_fraction=0.25)
    result = NeuronVisualizations(model_version="m.1", method="clip_illusion", steps=40, gamma=0.5, epsilon=0.05, learning_rate=9e-3, seed=0,
                                  visualizations=[healthy, dataclasses.replace(healthy, neuron=21, clip_similarity=-0.125)])
    cli._print_visualizations(result)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "2 neurons visualised with clip_illusion, 40 steps (gamma 0.5, epsilon 0.05, learning rate 0.009, seed 0), against head m.1:"
    assert [line.endswith(" !") for line in printed[1:3]] == [False, True]
    assert printed[3].startswith("warning: 1 of 2 images ended with clip_similarity + epsilon ≤ 0 (marked !): the loss rewarded a lower activation; raise epsilon")
    cli._print_visualizations(dataclasses.replace(result, epsilon=0.25))
    assert "!" not in capsys.readouterr().out
    # --json (visualize's, and operations get's result) marks the same images, for a script to rerun them.
    assert [v["flipped"] for v in cli._visualizations_json(result)["visualizations"]] == [False, True]
    assert [v["flipped"] for v in cli._RESULT_JSON["visualize_neurons"](dataclasses.replace(result, epsilon=0.25))["visualizations"]] == [False, False]


# A class name of 300 characters in a file name: its first SAFE_FILE_NAME_CHARS (255 bytes
# are the most a file system takes in a name).
_LONG_CLASS_FILE_NAME = "-".join(["long"] * 60)[:SAFE_FILE_NAME_CHARS].rstrip("-")


@pytest.mark.parametrize(("class_name", "stem"), [("heart", "03_neuron7_heart"), ("n02085620 Chihuahua/toy", "03_neuron7_n02085620-Chihuahua-toy"),
                                                 ("../..", "03_neuron7_class"), ("é", "03_neuron7_e"), ("étoile ★", "03_neuron7_etoile"),
                                                 ("星", "03_neuron7_class"), ("long " * 60, "03_neuron7_" + _LONG_CLASS_FILE_NAME)])
def test_visualization_files_are_safe_names_whatever_the_class(class_name, stem):
    from explaind.client.cli import _visualization_stem

    assert _visualization_stem(3, 7, class_name) == stem


@pytest.mark.parametrize("server", ["grace_period_s = -1", 'token_file = "missing-token"'])
def test_demo_with_a_config_it_cannot_use_says_why_in_one_line_before_serving(capsys, tmp_path, monkeypatch, server):
    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: pytest.fail("the demo started a server"))
    config = tmp_path / "explaind.toml"
    config.write_text(f"[server]\n{server}\n")
    line = _error(capsys, ["demo", "--config", str(config)])
    assert ("grace_period_s" if "grace" in server else "missing-token") in line and "Traceback" not in line, line


def test_a_demo_interrupted_while_its_server_loads_kills_a_server_that_ignores_the_stop_and_removes_its_store(capsys, tmp_path, monkeypatch):
    # A server still loading large models acts on SIGTERM only after: the demo must not
    # wait on it for ever, nor leave its store behind.
    import tempfile

    from explaind.client import cli

    done = []

    class LoadingServer:
        def __init__(self, command, env):
            self.store = Path(command[command.index("--data-dir") + 1])
            self.store.mkdir()
            done.append(command)

        def terminate(self):
            done.append("terminate")

        def wait(self, timeout=None):
            done.append(("wait", timeout))
            if timeout is not None:
                raise subprocess.TimeoutExpired("explaind serve", timeout)

        def kill(self):
            done.append("kill")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(subprocess, "Popen", LoadingServer)
    monkeypatch.setattr(cli, "Client", interrupted)
    assert main(["demo", "--scenario", "balanced"]) == 130
    command = done[0]
    assert "--config" not in command  # the balanced classifier is the default config's
    assert done[1:] == ["terminate", ("wait", cli.DEMO_SERVER_STOP_S), "kill", ("wait", None)]
    store = Path(command[command.index("--data-dir") + 1])
    assert store.parent.parent == tmp_path and not store.exists()


@pytest.mark.parametrize(("class_name", "file_name"), [("../../escaped", "report-s-escaped.html"),
                                                      ("n02085620 Chihuahua/toy", "report-s-n02085620-Chihuahua-toy.html"),
                                                      ("long " * 60, f"report-s-{_LONG_CLASS_FILE_NAME}.html")])
def test_the_demo_report_of_any_class_name_is_written_in_its_directory(tmp_path, monkeypatch, class_name, file_name):
    # The demo named its report after the worst class as the server spelled it: a "/" in
    # a class name (a --config classifier's class-names file) wrote elsewhere, or nowhere.
    from types import SimpleNamespace

    from explaind.client import cli, report

    monkeypatch.setattr(report, "build_report", lambda *args, **kwargs: SimpleNamespace(ranking=None, visualization_error=None))
    monkeypatch.setattr(report, "render_report", lambda built: "<html>")
    monkeypatch.setattr(cli, "_print_ranking", lambda ranking: None)
    monkeypatch.setattr(cli, "_print_report_gaps", lambda built: None)
    directory = tmp_path / "a" / "b"
    directory.mkdir(parents=True)
    cli._explain_worst_class(None, SimpleNamespace(worst_class=class_name, worst_class_accuracy=0.5), "s", directory, "s")
    assert [path.relative_to(tmp_path) for path in tmp_path.rglob("*.html")] == [directory.relative_to(tmp_path) / file_name]


def test_a_demo_set_without_mistakes_explains_nothing(capsys, monkeypatch):
    from types import SimpleNamespace

    from explaind.client import cli, report

    monkeypatch.setattr(report, "build_report", lambda *args, **kwargs: pytest.fail("a report on a class without mistakes"))
    cli._explain_worst_class(None, SimpleNamespace(worst_class="heart", worst_class_accuracy=1.0), "s", Path("unused"), "s")
    assert capsys.readouterr().out == "\nno mistakes to explain: every class of the set is classified correctly\n"


def test_a_demo_config_names_clip_only_where_it_is_shipped(tmp_path, monkeypatch):
    # A file's [clip] must load: one naming the world's CLIP where it is not installed failed the demo's server.
    import explaind.config
    from explaind.client.cli import _world_config
    from explaind.config import load_config

    shipped = explaind.config.default_config()
    with_clip = load_config(_world_config("spurious_background", tmp_path))
    assert (with_clip.clip.path, with_clip.classifier.loader) == (shipped.clip.path, "world")
    assert with_clip.clip.default_epsilon() == shipped.clip.default_epsilon() == explaind.config.WORLD_CLIP_ILLUSION_EPSILON
    monkeypatch.setattr(explaind.config, "default_config",
                        lambda: dataclasses.replace(shipped, clip=dataclasses.replace(shipped.clip, path=str(tmp_path / "no-clip"))))
    text = Path(_world_config("spurious_background", tmp_path)).read_text()
    assert "[classifier]" in text and "[clip]" not in text


def test_an_attribute_value_another_caller_stored_reaches_the_terminal_with_its_control_characters_escaped(capsys):
    # Attribute values are kept as given: a worst group named "\x1b[2J" cleared the screen
    # of whoever printed the edit, and a "\n" forged a line of its output.
    import datetime as dt
    from types import SimpleNamespace

    from explaind.client import HeadEdit, HeadVersion, cli

    evaluation = SimpleNamespace(accuracy=0.9, class_accuracy={"heart": 0.5, "circle": 1.0}, worst_class="heart", worst_class_accuracy=0.5,
                                 group_accuracy={"x": 0.5},
                                 worst_group="grass\x1b[2J\nworst class heart 1.000 -> heart 1.000\x9b", worst_group_accuracy=0.25)
    version = HeadVersion(version_id="v1", model_version="m", parent_version_id="v0", method="constrain", class_name="heart", neurons=[1],
                          description="", create_time=dt.datetime.now(dt.timezone.utc), active=False, evaluation=evaluation,
                          parent_evaluation=evaluation)
    cli._print_head_edit(HeadEdit(version, best_epoch=1, epochs_run=2, validation_accuracy=[]))
    printed = capsys.readouterr().out
    assert "  worst group grass\\x1b[2J\\nworst class heart 1.000 -> heart 1.000\\x9b 0.250 -> grass" in printed
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", printed) and printed.count("\n") == 4


def test_edit_head_prints_no_worst_class_where_all_classes_tie(capsys):
    # Every class at 1.000 printed "worst class heart 1.000": the first of equals the server names.
    import datetime as dt
    from types import SimpleNamespace

    from explaind.client import HeadEdit, HeadVersion, cli

    evaluation = SimpleNamespace(accuracy=1.0, class_accuracy={"heart": 1.0, "circle": 1.0}, worst_class="heart", worst_class_accuracy=1.0,
                                 group_accuracy={})
    version = HeadVersion(version_id="v1", model_version="m", parent_version_id="v0", method="constrain", class_name="heart", neurons=[1],
                          description="", create_time=dt.datetime.now(dt.timezone.utc), active=True, evaluation=evaluation,
                          parent_evaluation=evaluation)
    cli._print_head_edit(HeadEdit(version, best_epoch=1, epochs_run=2, validation_accuracy=[]))
    assert capsys.readouterr().out.splitlines()[-1] == "  worst class none: all 2 tie 1.000 -> none: all 2 tie 1.000"


def test_edit_head_stores_a_version_and_promotes_it_on_request(server, capsys, world_images, monkeypatch):
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images, labels, sample_set_id="edit-cli")
        before = client.head_versions()
        served_before = next(v.version_id for v in before if v.active)
    assert main(["--target", server.target, "edit-head", "edit-cli", "--class", "heart", "--neurons", "3", "7"]) == 0
    out = capsys.readouterr().out
    stored = re.search(r"^  (v\d+) ", out, flags=re.M)[1]
    assert f"not served; explaind head-versions promote {stored} serves it" in out and re.search(r"^  worst class (\w+|none: all \d+ tie) \d\.\d{3} -> (\w+|none: all \d+ tie) \d\.\d{3}$", out, flags=re.M), out
    # Its accuracies are on the held-out fifth, not the whole set `evaluate` scores: it says so.
    assert f"\n  evaluated on the {len(range(0, len(images), 5))} samples of edit-cli held out from training (every 5th, from sample 0);" in out, out
    assert main(["--target", server.target, "edit-head", "edit-cli", "--class", "heart", "--neurons", "3", "--method", "constrain",
                 "--promote"]) == 0
    promoted = capsys.readouterr().out
    assert "served now" in promoted
    with Client(server.target, timeout=30) as client:
        versions = client.head_versions()
        assert [v.method for v in versions[len(before):]] == ["probability_ratio", "constrain"]
        assert versions[-1].active
    assert main(["--target", server.target, "head-versions", "promote", served_before]) == 0  # leave the module's server as it was
    assert capsys.readouterr().out == f"serving {served_before} (was {versions[-1].version_id})\n"
    # Promoting it again changes nothing: it says so, not "serving v0 (was v0)".
    assert main(["--target", server.target, "head-versions", "promote", served_before]) == 0
    assert capsys.readouterr().out == f"already serving {served_before}\n"
    for version_id, line in ((versions[-1].version_id, dataclasses.replace(versions[-1], active=False).summary()),
                             (served_before, next(v for v in before if v.active).summary())):
        assert main(["--target", server.target, "head-versions", "show", version_id]) == 0
        assert capsys.readouterr().out == line + "\n"
    # Later, `operations get` of that job says what is served now, not what was at its end:
    # asked of that version alone, not by listing every version.
    monkeypatch.setattr(Client, "head_versions", lambda self: pytest.fail("operations get listed every head version"))
    assert main(["--target", server.target, "operations", "get", promoted.split()[1]]) == 0
    later = capsys.readouterr().out
    monkeypatch.undo()
    assert f"not served; explaind head-versions promote {versions[-1].version_id} serves it" in later
    line = _error(capsys, ["--target", server.target, "edit-head", "edit-cli", "--class", "heart", "--neurons", "9999"])
    assert "neurons" in line and "9999" in line
    # The two versions go again; the served one stays.
    for created in versions[len(before):]:
        assert main(["--target", server.target, "head-versions", "delete", created.version_id]) == 0
        assert capsys.readouterr().out == f"deleted {created.version_id}\n"
    line = _error(capsys, ["--target", server.target, "head-versions", "delete", served_before])
    assert f"FAILED_PRECONDITION: version_id: head version '{served_before}' is" in line
    with Client(server.target, timeout=30) as client:
        assert [v.version_id for v in client.head_versions()] == [v.version_id for v in before]
    assert main(["--target", server.target, "operations", "get", promoted.split()[1]]) == 0  # it offered a promote
    assert capsys.readouterr().out.splitlines()[-1] == f"head version {versions[-1].version_id} has been deleted since"
    got = _json_out(capsys, ["--target", server.target, "operations", "get", promoted.split()[1], "--json"])
    assert got["result"]["version"]["version_id"] == versions[-1].version_id
    assert (got["result"]["version"]["active"], got["result"]["version"]["deleted"]) == (False, True)
    line = _error(capsys, ["--target", server.target, "head-versions", "show", versions[-1].version_id])
    assert f"NOT_FOUND: version_id: no head version '{versions[-1].version_id}'" in line


def test_edit_head_no_wait_prints_the_operation_name_alone(server, capsys, world_images):
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images, labels, sample_set_id="edit-no-wait")
        assert main(["--target", server.target, "edit-head", "edit-no-wait", "--class", "heart", "--neurons", "3", "--no-wait"]) == 0
        printed = capsys.readouterr()
        name = printed.out.strip()
        assert re.fullmatch(r"operations/\w+\n", printed.out) and printed.err == f"started {name}; explaind operations wait {name} waits for it\n"
        edit = client.operation(name).result(timeout=60)
        client.delete_head_version(edit.version.version_id)  # the module's server keeps the versions it had


def test_edit_head_sends_the_group_attribute_and_says_it_was_evaluated_on_the_validation_set(server, capsys):
    target = ["--target", server.target]
    for set_id, spec in (("edit-groups", "balanced:test:40"), ("edit-validation", "balanced:val:20")):
        assert main([*target, "sample-set", "create", set_id, "--world", spec]) == 0
    capsys.readouterr()
    assert main([*target, "edit-head", "edit-groups", "--class", "heart", "--neurons", "3", "--validation-sample-set", "edit-validation",
                 "--group-attribute", "background"]) == 0
    out = capsys.readouterr().out
    with Client(server.target, timeout=30) as client:
        client.delete_head_version(re.search(r"^  (v\d+) ", out, flags=re.M)[1])
    assert re.search(r"^  worst group ([\w/]+|none: all \d+ tie) \d\.\d{3} -> ([\w/]+|none: all \d+ tie) \d\.\d{3}$", out, flags=re.M), out
    # Chosen the best epoch, the validation set is no independent measure.
    assert out.endswith("\n  evaluated on sample set edit-validation (20 samples); they also chose the best epoch, so these numbers lean "
                        "optimistic: --evaluation-sample-set gives an independent set\n"), out


def test_head_versions_list_prints_every_version_and_rollback_serves_the_version_named(server, capsys, world_images):
    images, labels = world_images
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images, labels, sample_set_id="rollback-to")
        served = next(v.version_id for v in client.head_versions() if v.active)
        edited = client.edit_head("rollback-to", "heart", [3]).result(timeout=60).version.version_id
        versions = client.head_versions()
    try:
        assert main(["--target", server.target, "head-versions", "list"]) == 0
        assert capsys.readouterr().out == "".join(f"{v.summary()}\n" for v in versions)
        assert main(["--target", server.target, "head-versions", "rollback", edited]) == 0
        assert capsys.readouterr().out == f"serving {edited} (was {served})\n"
    finally:
        with Client(server.target, timeout=30) as client:
            client.promote_head_version(served)
            client.delete_head_version(edited)


def test_class_counts_fall_back_to_indices_when_the_server_cannot_name_them():
    # The upload was stored; a failed metadata call made the command exit 1 and a rerun hit ALREADY_EXISTS.
    from explaind.client import UnavailableError
    from explaind.client.cli import _named_counts

    class Restarting:
        def model_metadata(self):
            raise UnavailableError("models are still loading")

    assert _named_counts(Restarting(), {5: 2, 0: 3}) == "0 3, 5 2"


def test_info_prints_the_served_models_and_json_with_every_class(server, capsys):
    assert main(["--target", server.target, "info"]) == 0
    text = capsys.readouterr().out
    assert main(["--target", server.target, "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with Client(server.target, timeout=30) as client:
        meta = client.model_metadata()
    assert info["class_names"] == meta.class_names and info["feature_dim"] == meta.feature_dim
    assert info["components"]["classifier"]["loaded"] and info["limits"]["max_images_per_request"] == meta.limits.max_images_per_request
    assert f"{len(meta.class_names)} classes: {', '.join(meta.class_names)}\n" in text  # few enough to name them all
    classifier = meta.components["classifier"]
    assert f"classifier  loaded: {classifier.detail}, from {classifier.source}\n" in text
    assert info["capabilities"] == list(meta.capabilities) and f"supports    {', '.join(meta.capabilities)}\n" in text
    assert info["jpeg_reduced_decode"] is False and "decoded at reduced scale" not in text  # off by default
    # The world's classifier normalises its images itself.
    assert info["normalization"] == {"mean": [], "std": []} and "; pixels in [0, 1], not normalised)\n" in text


def test_info_names_the_first_classes_of_a_large_classifier():
    # An ImageNet classifier's info printed 1000 names on one line.
    from explaind.client._types import Component, ModelMetadata, RequestLimits
    from explaind.client.cli import _print_metadata

    meta = ModelMetadata(
        name="resnet50", loader="export", class_names=[f"c{i}" for i in range(1000)], feature_layer="layer4", head="fc",
        feature_dim=2048, image_size=224, model_version="v", backend="eager", device="cuda", supports_features=True,
        components={"clip": Component("clip", False, "", "not configured")}, max_batch_size=32, limits=RequestLimits(0, 0, 0, 0),
    )
    with contextlib.redirect_stdout(io.StringIO()) as out:
        _print_metadata(meta)
    listed = out.getvalue().splitlines()[1]
    assert listed.startswith("            1000 classes: c0, c1,") and ", c19, ... and 980 more (--json lists them all)" in listed
    assert "c20" not in listed
    with contextlib.redirect_stdout(io.StringIO()) as out:
        _print_metadata(dataclasses.replace(meta, class_names=meta.class_names[:20]))
    assert out.getvalue().splitlines()[1].endswith(", c19")
    assert "clip        not loaded: not configured\n" in out.getvalue()


def test_info_says_how_images_are_fitted_what_the_model_cannot_do_and_the_request_limits():
    from explaind.client._types import ModelMetadata, Normalization, RequestLimits
    from explaind.client.cli import _print_metadata

    meta = ModelMetadata(
        name="resnet50", loader="export", class_names=["cat", "dog"], feature_layer="layer4", head="fc", feature_dim=2048, image_size=224,
        model_version="v", backend="onnxruntime", device="cuda", supports_features=True, components={}, max_batch_size=32,
        limits=RequestLimits(4 * 2**20, 3 * 2**20, 64, 4096, 1000), resize_size=256, interpolation="bicubic",
    )

    def printed(meta: ModelMetadata) -> list[str]:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            _print_metadata(meta)
        return out.getvalue().splitlines()[2:]  # after the classifier and its classes

    assert printed(meta) == [
        "            features: layer4 -> fc (D=2048); no gradients, so no neuron visualisations",
        "            input 224x224 (shorter side resized to 256, centre crop, bicubic)",
        "limits      4 MiB per message, 3 Mi decoded pixels per request, 64 images (or samples) per request, sides up to 4096 px, "
        "1000 samples in one caller's sets",
    ]
    # The per-caller limits a newer server says, each as --json has it: a caller refused at one finds it here.
    assert printed(dataclasses.replace(meta, limits=RequestLimits(4 * 2**20, 3 * 2**20, 64, 4096, 1000, 32, 20)))[2].endswith(
        "1000 samples in one caller's sets, 20 head versions of one caller's edits, 32 Predict or upload calls of one named caller at once")
    # The steps a report's --steps may ask, which a newer server says.
    assert printed(dataclasses.replace(meta, limits=RequestLimits(4 * 2**20, 3 * 2**20, 64, 4096, max_visualization_steps=10000)))[2].endswith(
        "sides up to 4096 px, 10000 steps per visualisation")
    # An older server says no limits (0): no line of zeros.
    assert printed(dataclasses.replace(meta, supports_features=False, resize_size=0, interpolation="", limits=RequestLimits(0, 0, 0, 0))) == [
        "            inference only: no penultimate features, so no ranking or head edits", "            input 224x224 (images stretched to it)"]
    # How pixels are normalised, where the server says: a user checks the mean and std they set.
    imagenet = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert printed(dataclasses.replace(meta, normalization=imagenet))[1] == (
        "            input 224x224 (shorter side resized to 256, centre crop, bicubic; pixels in [0, 1] normalised by mean 0.485, 0.456, 0.406, "
        "std 0.229, 0.224, 0.225)")
    assert printed(dataclasses.replace(meta, normalization=Normalization((), ())))[1] == (
        "            input 224x224 (shorter side resized to 256, centre crop, bicubic; pixels in [0, 1], not normalised)")
    # A JPEG decoded at a reduced scale is fitted from other pixels than the whole image's.
    assert printed(dataclasses.replace(meta, jpeg_reduced_decode=True))[1] == (
        "            input 224x224 (shorter side resized to 256, centre crop, bicubic, JPEG files decoded at reduced scale)")
    assert printed(dataclasses.replace(meta, resize_size=0, interpolation="", jpeg_reduced_decode=True))[1] == (
        "            input 224x224 (images stretched to it, JPEG files decoded at reduced scale)")


def test_per_class_lines_of_a_large_classifier_show_the_worst_classes_and_count_the_rest(capsys):
    import numpy as np

    from explaind.client._operations import Evaluation
    from explaind.client.cli import _named_counts, _print_evaluation

    names = [f"c{i}" for i in range(1000)]
    accuracy = {name: (i % 7) / 7 for i, name in enumerate(names[:300])}  # 300 classes with samples
    _print_evaluation(Evaluation(
        sample_set_id="s", model_version="v", sample_count=600, accuracy=0.4, class_accuracy=accuracy,
        confusion_matrix=np.zeros((1000, 1000), np.int64), mistakes=[(3, 1, 2, 0.9)],
        class_counts={name: 2 if i < 300 else 0 for i, name in enumerate(names)}, class_names=names,
    ))
    line = capsys.readouterr().out.splitlines()[1]
    worst = ", ".join(f"c{i} 0.00" for i in range(0, 140, 7))  # the 20 lowest, in class order among equals
    assert line.startswith(f"per class, the 20 lowest of 300 (evaluate --json gives all): {worst}; no samples of c300, c301,"), line
    assert line.endswith("c309 and 690 more")

    class Server:
        def model_metadata(self):
            return types.SimpleNamespace(class_names=names)

    assert _named_counts(Server(), {i: 1 for i in range(999, -1, -1)}) == ", ".join(f"c{i} 1" for i in range(20)) + ", ... and 980 more classes"
    assert _named_counts(Server(), {i: 1 for i in range(20)}) == ", ".join(f"c{i} 1" for i in range(20))


def test_evaluate_json_names_each_mistake_s_classes_null_past_the_model_s_names():
    # A label or prediction the model has no name for (a server sending fewer names than
    # classes, or none; a negative index, which int32 lets through) is null beside its
    # index, not an IndexError nor another class's name.
    from explaind.client._operations import Evaluation
    from explaind.client.cli import _evaluation_json

    def names_of(class_names: list[str]) -> list[tuple[str | None, str | None]]:
        evaluation = Evaluation(sample_set_id="s", model_version="v", sample_count=3, accuracy=0.0, class_accuracy={},
                                confusion_matrix=np.zeros((3, 3), np.int64), class_names=class_names,
                                mistakes=[EvaluatedMistake(0, 0, 1, 0.9), EvaluatedMistake(1, 1, 2, 0.8), EvaluatedMistake(2, 2, 0, 0.7),
                                          EvaluatedMistake(3, -1, 0, 0.6)])
        return [(mistake["label_name"], mistake["predicted_class_name"]) for mistake in _evaluation_json(evaluation)["mistakes"]]

    assert names_of(["cat", "dog"]) == [("cat", "dog"), ("dog", None), (None, "cat"), (None, "cat")]
    assert names_of([]) == [(None, None)] * 4


def test_an_evaluation_of_20_classes_and_5_mistakes_lists_every_class_and_mistake_with_no_remainder(capsys):
    from explaind.client._operations import Evaluation
    from explaind.client.cli import _print_evaluation

    names = [f"c{i}" for i in range(20)]
    matrix = np.diag([3] * 20)
    for label in range(5):  # one sample of each of c0..c4 taken for the next class
        matrix[label, label] -= 1
        matrix[label, label + 1] += 1
    _print_evaluation(Evaluation(
        sample_set_id="s", model_version="v", sample_count=60, accuracy=55 / 60,
        class_accuracy={name: 2 / 3 if i < 5 else 1.0 for i, name in enumerate(names)},
        confusion_matrix=matrix, mistakes=[(3 * label, label, label + 1, 0.9) for label in range(5)],
        class_counts=dict.fromkeys(names, 3), class_names=names,
    ))
    out = capsys.readouterr().out
    assert "\nper class: c0 0.67, c1 0.67," in out and out.endswith("\n  mistake: sample 12 is c4, predicted c5 (0.90)\n"), out


def _json_out(capsys, argv: list[str]):
    """Run ``argv`` expecting success; its stdout must be one JSON value (strict: no NaN)."""
    assert main(argv) == 0
    out = capsys.readouterr().out

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON: {out}")

    return json.loads(out, parse_constant=refuse)


def test_a_rerun_with_the_request_id_of_an_ended_job_says_so_not_that_it_started_one(server, capsys, world_images):
    # A nightly job rerun after a Ctrl-C read "started operations/X", then CANCELLED, with
    # nothing saying it was the first run's job, nor that only a new --request-id runs it again.
    images, labels = world_images
    target = ["--target", server.target]
    request_id = str(uuid.uuid4())
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:8], labels[:8], sample_set_id="rerun")
        ahead = client.visualize_neurons([3], method="no_clip", steps=1000)  # one worker: the evaluation queues behind it
        try:
            started = _json_out(capsys, [*target, "evaluate", "rerun", "--no-wait", "--json", "--request-id", request_id])
            queued = started["name"]
            # A script read the same JSON for its rerun as for the first start, the job queued both times.
            assert _json_out(capsys, [*target, "evaluate", "rerun", "--no-wait", "--json", "--request-id", request_id]) == {
                **started, "requested_again": True} and started["requested_again"] is False
            # Rerun while still queued: it said "started" as of a new job.
            assert main([*target, "evaluate", "rerun", "--no-wait", "--request-id", request_id]) == 0
            printed = capsys.readouterr()
            assert printed.out == f"{queued}\n" and printed.err == (f"{queued}, started by an earlier run with this --request-id, is queued; "
                                                                     f"explaind operations wait {queued} waits for it\n"), printed.err
            client.operation(queued).cancel()
        finally:
            ahead.cancel()
        assert main([*target, "evaluate", "rerun", "--json", "--request-id", request_id]) == 1
        printed = capsys.readouterr()
        # The earlier run's outcome, which a script tells from this run's failing by requested_again, as stderr's words say.
        assert {key: json.loads(printed.out)["error"][key] for key in ("code", "operation", "requested_again")} == {
            "code": "CANCELLED", "operation": queued, "requested_again": True}
        assert printed.err.startswith(f"{queued}, started by an earlier run with this --request-id, ended already (cancelled); its "
                                      "outcome stays that id's: give a new --request-id to run it again\n"), printed.err
        done = str(uuid.uuid4())
        first = _json_out(capsys, [*target, "evaluate", "rerun", "--json", "--request-id", done])
        assert _json_out(capsys, [*target, "evaluate", "rerun", "--json", "--request-id", done]) == {**first, "requested_again": True}
        assert first["requested_again"] is False  # the result JSON says whose job it is too
        assert main([*target, "evaluate", "rerun", "--request-id", done]) == 0
        assert capsys.readouterr().out.startswith(f"{first['operation']}, started by an earlier run with this --request-id, "
                                                  "ended already (succeeded)\n")
        # The id with another request: refused, naming the id's operation as JSON too (it was null), not in words alone.
        error, _ = _json_failure(capsys, [*target, "evaluate", "rerun", "--batch-size", "8", "--json", "--request-id", done])
        assert (error["code"], error["field"], error["operation"]) == ("INVALID_ARGUMENT", "request_id", first["operation"]), error
        assert error["requested_again"] is False, error  # refused: the command got no job, the id's first one only named
        # --no-wait said "started" of an ended job: its name alone stays on stdout, for N=$(...).
        assert main([*target, "evaluate", "rerun", "--no-wait", "--request-id", request_id]) == 0
        printed = capsys.readouterr()
        assert printed.out == f"{queued}\n"
        assert printed.err == (f"{queued}, started by an earlier run with this --request-id, ended already (cancelled); its outcome stays "
                               f"that id's: give a new --request-id to run it again\n")
        client.delete_sample_set("rerun")


def test_a_rerun_with_the_request_id_of_a_running_job_says_it_waits_on_that_job_not_that_it_started_one(server, capsys, monkeypatch):
    # It printed "started operations/X", as of a new job, where only an ended one's rerun said whose job it was.
    request_id = str(uuid.uuid4())
    rerun = [*["--target", server.target], "visualize", "3", "--method", "no_clip", "--steps", "10000", "--request-id", request_id]
    with Client(server.target, timeout=30) as client:
        running = client.visualize_neurons([3], method="no_clip", steps=10000, request_id=request_id)
        try:
            until_running(running)
            assert main([*rerun, "--no-wait"]) == 0
            printed = capsys.readouterr()
            assert printed.out == f"{running.name}\n"
            assert printed.err == (f"{running.name}, started by an earlier run with this --request-id, is running already; "
                                   f"explaind operations wait {running.name} waits for it\n"), printed.err
            monkeypatch.setattr(Operation, "result", lambda self, **kwargs: None)  # the wait itself is not this test's
            assert main(rerun) == 0
            assert capsys.readouterr().out == f"{running.name}, started by an earlier run with this --request-id, is running already; waiting for it\n"
        finally:
            running.cancel()


def test_a_start_retried_by_the_sdk_that_finds_its_own_job_running_says_it_started_it(server, capsys, monkeypatch):
    # Without --request-id, the SDK's own retry of a start whose answer was lost gets the job its first
    # attempt started, running by then: it was said to be "started by an earlier run with this --request-id".
    request_id = str(uuid.uuid4())
    with Client(server.target, timeout=30) as client:
        running = client.visualize_neurons([3], method="no_clip", steps=10000, request_id=request_id)
        try:
            until_running(running)
            monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(request_id))  # the id of the run, whichever picks it
            assert main(["--target", server.target, "visualize", "3", "--method", "no_clip", "--steps", "10000", "--no-wait"]) == 0
            printed = capsys.readouterr()
            assert printed == (f"{running.name}\n", f"started {running.name}; explaind operations wait {running.name} waits for it\n"), printed
            monkeypatch.setattr(Operation, "result", lambda self, **kwargs: None)  # the wait itself is not this test's
            assert main(["--target", server.target, "visualize", "3", "--method", "no_clip", "--steps", "10000"]) == 0
            assert capsys.readouterr().out == f"started {running.name}\n"
        finally:
            running.cancel()


def test_sample_sets_visualisations_operations_and_head_versions_print_json_alone(server, capsys, world_images, tmp_path):
    images, labels = world_images
    paths = [_png(tmp_path / "a.png", 0), _png(tmp_path / "b.png", 255)]
    target = ["--target", server.target]
    created = _json_out(capsys, [*target, "sample-set", "create", "--id", "json", "--name", "two", "--images", *paths, "--labels", "heart", "2", "--json"])
    assert (created["sample_set_id"], created["display_name"], created["sample_count"]) == ("json", "two", 2)
    assert created["class_counts"] == {"triangle": 1, "heart": 1} and created["create_time"].endswith("+00:00")
    assert _json_out(capsys, [*target, "sample-set", "show", "json", "--json"]) == created
    assert "json" in [s["sample_set_id"] for s in _json_out(capsys, [*target, "sample-set", "list", "--json"])]

    # Without CLIP there is no similarity: null, not NaN. Image files are named, not embedded.
    result = _json_out(capsys, [*target, "visualize", "3", "5:heart", "--method", "no_clip", "--steps", "2", "--out-dir", str(tmp_path), "--json"])
    with Client(server.target, timeout=30) as client:
        served = client.model_metadata().model_version
    assert (result["method"], result["steps"], result["model_version"]) == ("no_clip", 2, served)
    assert result["operation"].startswith("operations/")
    shown = result["visualizations"]
    assert [(v["neuron"], v["class_name"]) for v in shown][1] == (5, "heart") and shown[1]["clip_similarity"] is None
    assert all(Image.open(v["image_file"]).size == Image.open(v["masked_image_file"]).size == (64, 64) for v in shown)
    assert "image" not in shown[0] and shown[0]["activation"] > 0
    assert [v["flipped"] for v in shown] == [False, False]  # no_clip has no ε: nothing flips

    name = _json_out(capsys, [*target, "evaluate", "json", "--no-wait", "--json"])["name"]
    waited = _json_out(capsys, [*target, "operations", "wait", name, "--json"])
    assert (waited["name"], waited["kind"], waited["state"], waited["error"]) == (name, "evaluate_sample_set", "succeeded", None)
    # Every public field of the SDK's Operation but the result, which is waited["result"]; times as ISO 8601.
    sdk_fields = {field for field, value in vars(Operation).items() if isinstance(value, property) and not field.startswith("_")}
    assert set(waited) == sdk_fields | {"result", "operation"}, set(waited) ^ (sdk_fields | {"result", "operation"})
    assert waited["operation"] == name  # the key evaluate's and every job command's JSON names the job by
    assert waited["create_time"] <= waited["start_time"] <= waited["end_time"] and waited["end_time"].endswith("+00:00")
    assert waited["result"]["sample_count"] == 2 and [a["name"] for a in waited["artifacts"]] == ["mistakes.png"]
    assert _json_out(capsys, [*target, "operations", "get", name, "--json"]) == waited
    assert main([*target, "operations", "watch", name, "--json"]) == 0  # done already: one line, the final state
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [waited]
    listed = _json_out(capsys, [*target, "operations", "list", "--kind", "evaluate_sample_set", "--limit", "1", "--json"])
    assert [op["name"] for op in listed] == [op["operation"] for op in listed] == [name] and "result" not in listed[0]
    # A cron job run again with its --request-id (after a timeout, say) gets the first run's operation.
    request_id = str(uuid.uuid4())
    repeated = [_json_out(capsys, [*target, "evaluate", "json", "--no-wait", "--json", "--request-id", request_id])["name"] for _ in range(2)]
    assert repeated[0] == repeated[1] != name
    # A bare list could not say that --limit cut it; --json-object wraps it with whether it did.
    evaluations = [*target, "operations", "list", "--kind", "evaluate_sample_set", "--json"]
    assert _json_out(capsys, [*evaluations, "--limit", "1", "--json-object"]) == {
        "operations": _json_out(capsys, [*evaluations, "--limit", "1"]), "truncated": True}
    every = _json_out(capsys, [*evaluations, "--limit", "100000", "--json-object"])
    assert every["truncated"] is False and [op["operation"] for op in every["operations"]][:2] == [repeated[0], name]
    listed = len(every["operations"])  # a --limit of them all leaves none out; one fewer does
    exactly = _json_out(capsys, [*evaluations, "--limit", str(listed), "--json-object"])
    assert exactly == every, exactly["truncated"]
    assert _json_out(capsys, [*evaluations, "--limit", str(listed - 1), "--json-object"])["truncated"] is True
    upload = str(uuid.uuid4())
    appended = [_json_out(capsys, [*target, "sample-set", "append", "json", "--world", "balanced:test:3", "--request-id", upload, "--json"])
                for _ in range(2)]
    assert appended[0]["sample_count"] == appended[1]["sample_count"] == 5  # appended once

    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images, labels, sample_set_id="edit-json")
        served_before = next(v.version_id for v in client.head_versions() if v.active)
    edit = _json_out(capsys, [*target, "edit-head", "edit-json", "--class", "heart", "--neurons", "3", "--json"])
    version = edit["version"]
    assert version["method"] == "probability_ratio" and version["neurons"] == [3] and version["active"] is False
    assert version["evaluation"]["accuracy"] >= 0 and edit["best_epoch"] <= edit["epochs_run"] and edit["operation"].startswith("operations/")
    assert _json_out(capsys, [*target, "head-versions", "list", "--json"])[-1] == version
    assert _json_out(capsys, [*target, "head-versions", "show", version["version_id"], "--json"]) == version
    # The seed orders the minibatches: another one trains another head.
    reseeded = _json_out(capsys, [*target, "edit-head", "edit-json", "--class", "heart", "--neurons", "3", "--seed", "1", "--json"])
    assert reseeded["version"]["model_version"] != version["model_version"]
    assert _json_out(capsys, [*target, "head-versions", "delete", reseeded["version"]["version_id"], "--json"])
    promoted = _json_out(capsys, [*target, "head-versions", "promote", version["version_id"], "--json"])
    assert promoted == {"version": {**version, "active": True}, "previous_version_id": served_before}
    rolled = _json_out(capsys, [*target, "head-versions", "rollback", "--json"])
    assert (rolled["version"]["version_id"], rolled["previous_version_id"]) == (served_before, version["version_id"])
    assert _json_out(capsys, [*target, "head-versions", "delete", version["version_id"], "--json"]) == {"deleted": version["version_id"]}


def _json_failure(capsys, argv: list[str]) -> tuple[dict, str]:
    """Run ``argv`` expecting exit status 1 with one JSON line on stdout; returns its
    "error" and stderr."""
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out.count("\n") == 1, out
    failure = json.loads(out)
    assert list(failure) == ["error"], failure
    return failure["error"], err


def test_a_failed_command_with_json_prints_its_error_as_json_on_stdout_and_in_words_on_stderr(server, capsys, tmp_path):
    # stdout was empty: `explaind rank ... --json | jq` and a monitoring script saw nothing to parse.
    target = ["--target", server.target]
    error, err = _json_failure(capsys, [*target, "rank", "nosuch", "--class", "heart", "--json"])
    assert error == {"code": "NOT_FOUND", "message": "sample_set_id: no sample set 'nosuch'", "field": "sample_set_id",
                     "precondition_violations": [], "reason": None, "quota_violations": [], "option": None, "option_defaulted": None, "notes": [], "retry_delay_seconds": None, "operation": None, "requested_again": None}
    assert err.startswith("error: NOT_FOUND: sample_set_id: no sample set 'nosuch'\n") and err.endswith(
        "  (explaind sample-set list shows what there is)\n"), err  # the words as without --json
    assert main([*target, "rank", "nosuch", "--class", "heart"]) == 1
    assert capsys.readouterr().out == ""  # without --json, stdout stays empty
    # A refusal here, not the server's: no gRPC code to mistake it for.
    image = _png(tmp_path / "a.png", 0)
    error, err = _json_failure(capsys, [*target, "predict", image, "--top-k", "7", "--json"])
    assert error == {"code": "CLIENT_ERROR", "message": "--top-k: 7 is more than the served model's 6 classes", "field": None,
                     "precondition_violations": [], "reason": None, "quota_violations": [], "option": None, "option_defaulted": None, "notes": [], "retry_delay_seconds": None, "operation": None, "requested_again": None}
    assert err == "error: --top-k: 7 is more than the served model's 6 classes\n"
    # The notes stderr prints under the error, here the file the server refused.
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    error, err = _json_failure(capsys, [*target, "predict", image, str(bad), "--json"])
    assert (error["code"], error["field"], error["notes"]) == ("INVALID_ARGUMENT", "images[1].encoded", [f"that is file {bad}"])
    assert err.splitlines()[-1] == f"  that is file {bad}"


def test_a_failed_command_s_json_error_lists_the_precondition_violations(server, capsys, monkeypatch):
    from explaind.client import FailedPreconditionError, ResourceExhaustedError

    refusal = FailedPreconditionError("samples: the served model's features of 2 samples hold NaN", field="sample_set_id",
                                      precondition_violations=[("UNUSABLE_FEATURES", "samples[3]", ""), ("UNDECODABLE_IMAGE", "samples[7]", "")])
    monkeypatch.setattr(Client, "_start_ranking", lambda self, *args, **kwargs: (_ for _ in ()).throw(refusal))
    error, _ = _json_failure(capsys, ["--target", server.target, "rank", "two", "--class", "heart", "--json"])
    assert error["code"] == "FAILED_PRECONDITION" and error["precondition_violations"] == [
        {"type": "UNUSABLE_FEATURES", "subject": "samples[3]", "description": ""},
        {"type": "UNDECODABLE_IMAGE", "subject": "samples[7]", "description": ""}]
    # A full queue says when to come back (google.rpc.RetryInfo): a script's retry loop reads it.
    busy = ResourceExhaustedError("the job queue is full", retry_delay=2.5)
    monkeypatch.setattr(Client, "_start_ranking", lambda self, *args, **kwargs: (_ for _ in ()).throw(busy))
    error, _ = _json_failure(capsys, ["--target", server.target, "rank", "two", "--class", "heart", "--json"])
    assert (error["code"], error["retry_delay_seconds"], error["operation"]) == ("RESOURCE_EXHAUSTED", 2.5, None)
    # From a server older than the limits' reasons (no ErrorInfo, no QuotaFailure): null and empty, not missing.
    assert (error["reason"], error["quota_violations"]) == (None, [])


def test_a_failed_job_s_json_error_names_its_operation(server, capsys, monkeypatch):
    # The job's name was only in stderr's "started ..." line: a script had to parse words to look at it later.
    with Client(server.target, timeout=30) as client:
        job = client.visualize_neurons([3], method="feature_visualization", steps=10000)
        assert client.operation(job.name).cancel().wait(timeout=60).error.operation.name == job.name  # the SDK's error says which job too
        monkeypatch.setattr(Client, "visualize_neurons", lambda self, *args, **kwargs: self.operation(job.name))  # the CLI waits on that job
    error, err = _json_failure(capsys, ["--target", server.target, "visualize", "3", "--method", "feature_visualization", "--json",
                                        "--request-id", str(uuid.uuid4())])
    assert (error["code"], error["operation"], error["retry_delay_seconds"]) == ("CANCELLED", job.name, None), error
    assert err.startswith(f"{job.name}, ")  # an ended job, as a rerun's --request-id gets: named, not said to be started


def test_operations_watch_that_fails_part_way_ends_its_json_lines_with_the_error(server, capsys, monkeypatch):
    from explaind.client import UnavailableError

    watch = Operation.watch

    def server_gone_after_one_update(self, *args, **kwargs):
        for update in watch(self, *args, **kwargs):
            yield update
            raise UnavailableError("the server is shutting down; no new jobs are accepted")

    monkeypatch.setattr(Operation, "watch", server_gone_after_one_update)
    with Client(server.target, timeout=30) as client:
        job = client.visualize_neurons([3], method="feature_visualization", steps=10000)
        try:
            assert main(["--target", server.target, "operations", "watch", job.name, "--json"]) == 1
        finally:
            client.operation(job.name).cancel()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("name") for line in lines] == [job.name, None]  # one update, then the error: one value a line
    assert lines[-1] == {"error": {"code": "UNAVAILABLE", "message": "the server is shutting down; no new jobs are accepted", "field": None,
                                   "precondition_violations": [], "reason": None, "quota_violations": [], "option": None, "option_defaulted": None, "notes": [], "retry_delay_seconds": None, "operation": None, "requested_again": None}}


def test_operations_watch_json_cut_short_by_ctrl_c_puts_its_error_on_a_line_of_its_own(server, monkeypatch):
    # As predict --json-lines: an update's line half written as Ctrl-C came had the error glued to it.
    class CutAtTheFirstUpdate(io.StringIO):
        def write(self, text: str) -> int:
            if text.startswith('{"operation": '):
                super().write(text[: len(text) // 2])
                raise KeyboardInterrupt
            return super().write(text)

    with Client(server.target, timeout=30) as client:
        job = client.visualize_neurons([3], method="feature_visualization", steps=10000)
        try:
            monkeypatch.setattr(sys, "stdout", CutAtTheFirstUpdate())
            assert main(["--target", server.target, "operations", "watch", job.name, "--json"]) == 130
            out = sys.stdout.getvalue()
            monkeypatch.undo()
        finally:
            client.operation(job.name).cancel()
    cut, failure = out.splitlines()
    assert cut.startswith('{"operation": ') and not cut.endswith("}"), out
    assert json.loads(failure)["error"]["code"] == "INTERRUPTED"


def test_a_json_error_that_cannot_be_written_leaves_the_error_on_stderr(server, capsys, monkeypatch):
    # Standard output fails too (a full disk): the error is said once on stderr, with no traceback and no second try.
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        assert main(["--target", server.target, "rank", "nosuch", "--class", "heart", "--json"]) == 1
        monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.startswith("error: NOT_FOUND: ") and err.count("error:") == 1 and "Traceback" not in err, err
    # Buffered, as by default: the failed JSON line stayed in the buffer, and the interpreter's
    # final flush failed again ("Exception ignored ... No space left on device", exit code 120).
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "explaind.client.cli", "--target", server.target, "rank", "nosuch", "--class", "heart", "--json"],
                              stdout=full, stderr=subprocess.PIPE, text=True, env=environment, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: NOT_FOUND: ") and done.stderr.count("error") == 1, done.stderr


def test_an_artifact_written_to_standard_output_gets_no_json_error_among_its_bytes(server, capsys):
    assert main(["--target", server.target, "operations", "artifact", "operations/0123456789abcdef", "omega.npy", "-o", "-", "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: NOT_FOUND: "), err


def test_edit_head_passes_its_training_options_and_says_the_target_ratio_auto_chose(server, capsys, world_images):
    # The CLI had no way to set λ3, o (or ask for auto), the learning rate, epochs, patience
    # or a description, which the SDK and the API take.
    images, labels = world_images
    target = ["--target", server.target]
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images, labels, sample_set_id="edit-options")
    options = ["--strength", "0.05", "--learning-rate", "0.01", "--max-epochs", "2", "--patience", "1", "--description", "nightly fix"]
    auto = _json_out(capsys, [*target, "edit-head", "edit-options", "--class", "heart", "--neurons", "3", "--target-ratio", "auto", *options, "--json"])
    assert auto["epochs_run"] <= 2 and auto["version"]["description"] == "nightly fix"
    assert auto["target_ratio"] > 0 and auto["target_ratio"] != 1.0
    explicit = _json_out(capsys, [*target, "edit-head", "edit-options", "--class", "heart", "--neurons", "3", "--target-ratio", "2.5", "--json"])
    assert explicit["target_ratio"] == 2.5 and explicit["epochs_run"] > 2  # the defaults: 20 epochs, patience 5
    for option, refused in ((["--strength", "2000"], "strength: 2000.0 is not in [0.0, 1000.0]"),
                            (["--learning-rate", "20"], "learning_rate: 20.0 is not in (0.0, 10.0]"),
                            (["--patience", "1001"], "patience: 1001 is not in [1, 1000]")):
        line = _error(capsys, [*target, "edit-head", "edit-options", "--class", "heart", "--neurons", "3", *option])
        assert refused in line, line
    for created in (auto, explicit):
        assert main([*target, "head-versions", "delete", created["version"]["version_id"]]) == 0
    capsys.readouterr()


def test_counts_of_one_read_in_the_singular():
    # "1 neurons visualised", "and 1 more mistakes".
    from explaind.wording import counted

    assert (counted(1, "neuron"), counted(2, "neuron"), counted(0, "more mistake")) == ("1 neuron", "2 neurons", "0 more mistakes")


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_command_that_runs_the_server_says_where_it_runs_on_windows(capsys, monkeypatch, tmp_path, command):
    # Its store locks with fcntl and its limits use resource: on Windows it ended in ModuleNotFoundError.
    # The config does not exist, so a command that went on would fail at once on it, not start a server.
    monkeypatch.setattr(sys, "platform", "win32")
    assert _error(capsys, [command, "--config", str(tmp_path / "missing.toml")]) == (f"error: {command}: the server runs on Linux and macOS; on Windows run it in WSL or its "
                                         "container (deploy/Dockerfile), and this SDK and CLI against it")


def test_an_error_s_option_is_one_that_sets_the_field_it_names_not_one_of_the_same_name():
    # report's --neurons counts the neurons it visualises: an edit's refused "neurons" (the
    # ones it edits) was said to be that option, which sets no neuron.
    from explaind.client.cli import _option_of_field, parse_arguments

    report = parse_arguments(["report", "--class", "heart", "--neurons", "3"])
    assert (_option_of_field(report, "neurons"), _option_of_field(report, "sample_set_id")) == (None, "--sample-set")
    assert _option_of_field(parse_arguments(["edit-head", "train", "--class", "heart", "--neurons", "1", "2"]), "neurons") == "--neurons"


@pytest.mark.parametrize(("argv", "option", "defaulted"), [
    (["report", "--class", "heart"], "--sample-set", True),  # the newest set, not one the user named
    (["report", "--class", "heart", "--sample-set", "s"], "--sample-set", False),
    (["report", "--class", "heart", "--sample-set=s"], "--sample-set", False),
    (["sample-set", "create", "--id", "s", "--world", "balanced"], "--id", False),  # was null
    (["sample-set", "create", "--id=s", "--world", "balanced"], "--id", False),
    (["sample-set", "create", "s", "--world", "balanced"], None, None),  # the positional ID set it, no option
    (["evaluate", "s"], None, None),
])
def test_a_json_error_s_option_says_whether_the_user_gave_it_or_its_default_set_the_field(argv, option, defaulted):
    # report's --sample-set, left out, was named as if given: a script told the user to fix an option they never typed.
    from explaind.client import NotFoundError
    from explaind.client.cli import _failure_json, parse_arguments

    error = _failure_json(NotFoundError("no sample set 's'", field="sample_set_id"), parse_arguments(argv))["error"]
    assert (error["option"], error["option_defaulted"]) == (option, defaulted)


def test_an_error_on_a_defaulted_option_s_field_says_so_on_stderr(server, capsys, monkeypatch):
    from explaind.client import NotFoundError

    gone = NotFoundError("sample_set_id: no sample set 'newest'", field="sample_set_id")
    monkeypatch.setattr(Client, "sample_sets", lambda self, **kwargs: (_ for _ in ()).throw(gone))
    error, err = _json_failure(capsys, ["--target", server.target, "report", "--class", "heart", "--json"])
    assert (error["option"], error["option_defaulted"]) == ("--sample-set", True)
    assert "  (sample_set_id is --sample-set here, left out: its default)\n" in err, err


def test_sigterm_in_the_channel_s_close_after_a_ctrl_c_keeps_what_the_ctrl_c_left(monkeypatch, capsys):
    # Ctrl-C inside the start; its search found the job and cancelled it; then the channel's close stood still and a SIGTERM
    # (a systemd stop) landed there: its interrupt took the Ctrl-C's place, and the words said "terminated" alone, not
    # which job was cancelled (nor, had the search failed, which request_id to look for).
    starts: list[str] = []
    job = types.SimpleNamespace(name="operations/0123456789abcdef", state="queued", done=False, requested_again=False,
                                _left_for_another_run=False)

    def cancel():
        job.state, job.done = "cancelled", True

    job._cancel_unless_asked_by_another_run = cancel

    def interrupted_once(self, *args, request_id, **kwargs):
        starts.append(request_id)
        if len(starts) == 1:
            raise KeyboardInterrupt  # Ctrl-C inside the start
        return job

    close = Client.close

    monkeypatch.setattr(Client, "evaluate_sample_set", interrupted_once)
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: types.SimpleNamespace(capabilities=("request_id",)))
    monkeypatch.setattr(Client, "close", _closing_then_terminated(close))
    assert main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "600", "evaluate", "some-set", "--json"]) == 143
    out, err = capsys.readouterr()
    assert err == f"terminated\n  cancelled {job.name}\n", err
    error = json.loads(out)["error"]
    assert (error["message"], error["notes"], error["operation"]) == ("terminated", [f"cancelled {job.name}"], job.name), error
    # Nor where the close never ends and the process exits by its deadline: its words name that job too.
    exits = _stuck_exits_recorded(monkeypatch)
    starts.clear()
    job.state, job.done = "queued", False

    monkeypatch.setattr(Client, "close", _closing_then_terminated_and_stuck(close, exits))
    main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "0.01", "evaluate", "some-set", "--json"])
    out, err = capsys.readouterr()
    assert exits == [143] and err.startswith("terminated\n  (the command did not end within 0.01 s of SIGTERM; a job it started may "
                                             f"still run: explaind operations list)\n  cancelled {job.name}\n"), err
    error = json.loads(out.splitlines()[0])["error"]
    assert (error["notes"], error["operation"]) == ([f"cancelled {job.name}"], job.name), error


@pytest.mark.parametrize(("failure", "hints", "field", "option"), [
    ("sdk", ["(explaind sample-set list shows what there is)"], "sample_set_id", None),
    ("option", ["(batch_size is --batch-size here)"], "batch_size", "--batch-size"),
    ("command", [], None, None),
])
def test_sigterm_in_the_channel_s_close_after_an_error_keeps_the_error_s_words(failure, hints, field, option, monkeypatch, capsys):
    # The command failed (its set unknown, an option refused; or the CLI's own CommandError, "error: ...", exit 1); a
    # SIGTERM (a systemd stop) then landed in the channel's close: its interrupt took the error's place, and the words said
    # "terminated" alone, not what had failed; then they kept its words and notes, but not its hints in parentheses, nor
    # the --json error's field and option.
    from explaind.client import InvalidArgumentError, NotFoundError
    from explaind.client.cli import CommandError

    if failure == "sdk":
        gone: Exception = NotFoundError("no sample set 'some-set'", field="sample_set_id")
        gone.add_note("that is the set --id names")
    elif failure == "option":
        gone = InvalidArgumentError("batch_size: at most 64", field="batch_size")
    else:
        gone = CommandError("--class: the served classifier has no class 'hart'")
    close = Client.close

    monkeypatch.setattr(Client, "evaluate_sample_set", lambda self, *args, **kwargs: (_ for _ in ()).throw(gone))
    monkeypatch.setattr(Client, "close", _closing_then_terminated(close))
    argv = ["--target", f"127.0.0.1:{free_port()}", "--timeout", "600", "evaluate", "some-set", "--batch-size", "65", "--json"]
    assert main(argv) == 143
    out, err = capsys.readouterr()
    notes = [f"error: {gone}", *hints, *getattr(gone, "__notes__", ())]
    assert err == "terminated\n" + "".join(f"  {note}\n" for note in notes), err
    error = json.loads(out)["error"]
    assert (error["code"], error["message"], error["notes"]) == ("INTERRUPTED", "terminated", notes), error
    assert (error["field"], error["option"], error["option_defaulted"]) == (field, option, False if option else None), error
    # Nor where the close never ends and the process exits by its deadline: its words say the error too.
    exits = _stuck_exits_recorded(monkeypatch)

    monkeypatch.setattr(Client, "close", _closing_then_terminated_and_stuck(close, exits))
    main([*argv[:3], "0.01", *argv[4:]])
    out, err = capsys.readouterr()
    assert exits == [143] and err.startswith("terminated\n  (the command did not end within 0.01 s of SIGTERM; a job it started may "
                                             "still run: explaind operations list)\n" + "".join(f"  {note}\n" for note in notes)), err
    error = json.loads(out.splitlines()[0])["error"]
    assert (error["notes"], error["field"], error["option"]) == (notes, field, option), error


def test_a_command_interrupted_where_stderr_s_reader_has_gone_still_exits_as_interrupted(monkeypatch, capsys):
    # Its words failed with BrokenPipeError, which left main as a traceback (exit status 1): a script read no interrupt.
    from conftest import stderr_nobody_reads

    def interrupted(self, *args, request_id, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C inside the start

    monkeypatch.setattr(Client, "evaluate_sample_set", interrupted)
    monkeypatch.setattr(Client, "model_metadata", lambda self, **kwargs: types.SimpleNamespace(capabilities=()))
    with stderr_nobody_reads():
        assert main(["--target", f"127.0.0.1:{free_port()}", "evaluate", "some-set", "--json"]) == 130
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["code"], error["message"]) == ("INTERRUPTED", "interrupted"), error
    assert error["notes"][0].startswith("a job may have started under request_id "), error


def test_a_command_failing_where_stderr_s_reader_has_gone_still_exits_1_and_prints_its_json(monkeypatch, capsys):
    # Its "error:" line failed with BrokenPipeError, which left main as a traceback before the
    # --json error on stdout was printed, as an interrupt's (exit 130) is.
    from conftest import stderr_nobody_reads

    from explaind.client import NotFoundError

    def refused(self, *args, **kwargs):
        raise NotFoundError("no sample set 'some-set'", field="sample_set_id")

    monkeypatch.setattr(Client, "evaluate_sample_set", refused)
    with stderr_nobody_reads():
        assert main(["--target", f"127.0.0.1:{free_port()}", "evaluate", "some-set", "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["code"], error["message"]) == ("NOT_FOUND", "no sample set 'some-set'"), error


def test_a_command_stuck_after_sigterm_where_stderr_s_reader_has_gone_still_prints_its_json(monkeypatch, capsys):
    # The exit's words failed with BrokenPipeError in their thread, which then never printed the --json error on stdout.
    import explaind.client.cli as cli
    from conftest import stderr_nobody_reads

    exits = _stuck_exits_recorded(monkeypatch)
    with stderr_nobody_reads(), cli._terminating_like_ctrl_c(argparse.Namespace(timeout=0.01, json=True)):
        with pytest.raises(cli._Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the signal ends it
        _wait_for_an_exit(exits)
    assert exits == [143]
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["code"], error["message"]) == ("INTERRUPTED", "terminated"), error


def test_class_names_with_control_and_bidirectional_characters_are_escaped_on_the_terminal(server_factory, capsys, tmp_path):
    # A class name of the server's config ([classifier].class_names) reached the terminal raw:
    # U+202E showed the rest of info's and sample-set create's lines reversed, and a C1
    # control (U+009B, CSI) is the start of a terminal's escape sequence.
    names = ["circle", "squ\u202eare", "tri\u2067x\u2069", "star", "cross\x9b31m", "heart"]
    raw = re.compile("[\u202e\u2067\u2069\x9b]")
    server = server_factory(classifier={"class_names": names})
    target = ["--target", server.target]
    image = _png(tmp_path / "a.png", 0)
    for argv in (["info"], ["sample-set", "create", "named", "--world", "spurious_background:test:60"], ["sample-set", "show", "named"],
                 ["predict", image, "--top-k", "6"], ["evaluate", "named"], ["rank", "named", "--class", "1", "--stability", "0"],
                 ["edit-head", "named", "--class", "1", "--neurons", "3"], ["head-versions", "list"]):
        assert main([*target, *argv]) == 0, argv
        printed = capsys.readouterr()
        assert not raw.search(printed.out + printed.err), (argv, printed)
        assert "squ\\u202eare" in printed.out, (argv, printed.out)  # every line of them names class 1
    assert main([*target, "info"]) == 0
    assert "6 classes: circle, squ\\u202eare, tri\\u2067x\\u2069, star, cross\\x9b31m, heart\n" in capsys.readouterr().out
