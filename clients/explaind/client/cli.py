"""The ``explaind`` command line: serve, predict, sample sets, operations, demo.

    explaind serve [--config FILE] [--port 50051] [--metrics-port 9464]
    explaind predict cat.png dog.jpg --top-k 3
    explaind sample-set create hearts --world spurious_background:test:300
    explaind sample-set create production --folder images/   # images/<class name>/*.png
    explaind sample-set append production --folder more/
    explaind evaluate hearts                 # progress bar; Ctrl-C cancels the job
    explaind operations list | get | wait | watch | cancel | delete | artifact
    explaind --target host:50051 info        # or: explaind info --target host:50051
    explaind rank hearts --class heart       # the neurons behind the class's mistakes
    explaind visualize 8 21:heart --out-dir images
    explaind edit-head hearts --class heart --neurons 8 21 63 [--promote]
    explaind report --class heart --sample-set hearts --out report.html
    explaind head-versions list | show v1 | promote v1 | rollback | delete v2
    explaind demo                            # a server on the shapes world + a session
"""

from __future__ import annotations

import argparse
import base64
import codecs
import contextlib
import dataclasses
import datetime as dt
import difflib
import errno
import functools
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unicodedata
import uuid
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar, cast, overload

from explaind.class_names import class_name_key
from explaind.wording import counted

from ._client import DEFAULT_PREDICT_IN_FLIGHT, DEFAULT_TARGET, PARTIAL_FAILURE_CAPABILITY, REQUEST_ID_CAPABILITY, REQUESTED_AGAIN_CAPABILITY, Client
from ._errors import (DeadlineExceededError, ExplaindError, NotFoundError, OperationError, PlaintextTokenWarning,
                      UnauthenticatedError, UnavailableError, listed_items, reworded)
from ._images import image_folder
from ._interrupted import followed_ranking, interrupt_being_followed, started_job
from ._neuroinspect import DEFAULT_STABILITY_RESAMPLES, repeated_pair
from ._operations import OPERATION_STATES, Operation, cancel_outcome
from ._types import ModelMetadata, escape_controls

if TYPE_CHECKING:
    import numpy as np
    from explaind.world.render import SceneSpec
    from PIL.Image import Image

    from ._neuroinspect import HeadEdit, NeuronRanking, NeuronVisualizations
    from ._operations import Evaluation
    from ._types import Prediction, SampleSet
    from .report import MistakeReport

_Result = TypeVar("_Result")  # what an Operation[_Result] returns
_Item = TypeVar("_Item")


class CommandError(Exception):
    """A user error the CLI reports as one ``error:`` line on stderr, exit code 1 (with
    --json, also code ``CLIENT_ERROR`` on stdout: :func:`_failure_json`)."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM (cron's ``timeout``, a systemd stop) raised where the command is, as Ctrl-C
    raises KeyboardInterrupt: what handles Ctrl-C handles it (a job the command started is
    cancelled, a wait says its job goes on); exit status 143 (128 + SIGTERM)."""


# Seconds past --timeout that a command stopped by SIGTERM has to end before it exits
# regardless (:func:`_terminating_like_ctrl_c`): --timeout bounds one call, the cancel a
# stopped wait makes. A start stopped inside its call makes up to three (the server's
# metadata, the start again, the cancel: :func:`~explaind.client._interrupted.cancel_interrupted_start`;
# then, for a job that repeat made itself, a wait of up to 2 s for its end and its deletion), which together
# can outlast it (a server slow to answer each): the exit's words then name the request_id, or the job once found.
TERMINATED_GRACE_S = 5.0
# Seconds that exit then waits for its words to be written (stdout may be a pipe nobody reads).
TERMINATED_WORDS_S = 1.0
# The name of the thread whose timer runs that exit (in a thread dump, what the process waits for).
TERMINATED_DEADLINE_THREAD = "explaind-terminated-deadline"


@contextlib.contextmanager
def _terminating_like_ctrl_c(args: argparse.Namespace) -> Iterator[Callable[[], None]]:
    """Raise :class:`_Terminated` on SIGTERM while the command runs (Python's default ends
    the process at once: a job it started kept running, with no word), and restore the
    previous handler after, for a program calling main in-process. Only the main thread
    can set a handler: elsewhere SIGTERM stays as it was, as it does where it is ignored.
    Yields ``ran``, to call once the command has run: a SIGTERM then raises nothing, so
    the words that say how it ended (its output, or a stop's error) are not cut short.

    A stop must end the command: an interrupt that lands inside gRPC as it sets up a call
    can leave a lock held that closing the channel then waits on forever (once in 20
    SIGTERMs sent right after a job started), and its words may block on a pipe nobody
    reads, so the process exits with 143 anyway once --timeout + TERMINATED_GRACE_S
    seconds have passed since the signal. A second SIGTERM (coreutils' timeout sends one
    to the command and one to its process group) raises nothing: it would stop the cancel
    the first began, or skip restoring the handler."""
    if (threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            or getattr(args, "stops_on_its_own_signals", False)):
        # No handler here, SIGTERM ignored on purpose (`trap '' TERM`, a supervisor's choice), or
        # the server's own (its handler would take a SIGTERM sent before the server's came): it stays so.
        yield lambda: None
        return
    deadline: list[threading.Timer] = []
    running = [True]
    # The interrupt that stops the command: the one SIGTERM raised, or the Ctrl-C whose search for its start's job the
    # SIGTERM landed in. Its notes say what the stop did, should the command not end after it (the channel's close stuck).
    stopping: list[KeyboardInterrupt] = []

    def say_why() -> None:
        # A search for the job an interrupted start left, cut short: its notes name the request_id, or the job.
        stopped = _as_terminated(stopping[0], args) if stopping else _Terminated("terminated")
        with contextlib.suppress(OSError):  # its reader gone: the --json error on stdout still says it
            print("terminated\n  (the command did not end within "
                  f"{args.timeout + TERMINATED_GRACE_S:g} s of SIGTERM; a job it started may still run: explaind operations list)",
                  *(f"  {note}" for note in getattr(stopped, "__notes__", ())), sep="\n", file=sys.stderr, flush=True)
        _print_failure_json(stopped, args)
        try:  # what the command printed before (os._exit skips the flush at exit)
            sys.stdout.flush()
        except (OSError, ValueError):  # a reader gone, a full disk; a closed stdout
            pass

    def exit_stuck() -> None:
        # The words may block too, where the command's did: they get a while of their own.
        saying = threading.Thread(target=say_why, name="explaind-terminated", daemon=True)
        saying.start()
        saying.join(TERMINATED_WORDS_S)
        os._exit(128 + signal.SIGTERM)

    def terminated(_signum: int, _frame: object) -> None:
        args.terminated = True  # what the command's end says, where a Ctrl-C's cleanup took the SIGTERM as a second interrupt
        if deadline:  # the first one's stop goes on, bounded by its timer
            return
        # At most what a thread's wait takes (292 years): --timeout 1e10, "no limit", failed the timer's thread.
        deadline.append(threading.Timer(min(args.timeout + TERMINATED_GRACE_S, threading.TIMEOUT_MAX), exit_stuck))
        deadline[0].daemon, deadline[0].name = True, TERMINATED_DEADLINE_THREAD
        deadline[0].start()
        if running[0]:
            terminating = _Terminated("terminated")
            stopping.append(interrupt_being_followed() or terminating)
            raise terminating

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield lambda: running.__setitem__(0, False)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        for timer in deadline:  # ended in time
            timer.cancel()


def _as_terminated(interrupt: KeyboardInterrupt, args: argparse.Namespace) -> _Terminated:
    """``interrupt`` as SIGTERM's: a Ctrl-C whose cleanup a SIGTERM then stopped (taken there
    as a second interrupt) ends as a SIGTERM does, exit status 143, with its notes and job;
    so does SIGTERM's own interrupt where it cut short a Ctrl-C or a failed command on its
    way out (the channel's close, stuck), which it took the place of: that Ctrl-C's notes,
    or the error's words ("error: ..."), hints (:func:`_error_hints`) and notes, first, then
    its own; and the error's request ``field``, for the --json error's field and option."""
    stopped: list[BaseException] = [interrupt]
    terminated = _Terminated("terminated")
    if isinstance(interrupt, _Terminated):
        cut_short = interrupt.__context__
        if isinstance(cut_short, (ExplaindError, CommandError)):
            terminated.add_note(f"error: {cut_short}")
            for hint in _error_hints(args, cut_short):
                terminated.add_note(hint)
            terminated.field = getattr(cut_short, "field", None)  # type: ignore[attr-defined]
        elif not isinstance(cut_short, KeyboardInterrupt) or isinstance(cut_short, _Terminated):
            return interrupt
        stopped.insert(0, cut_short)
    for each in stopped:
        for note in getattr(each, "__notes__", ()):
            terminated.add_note(note)
        if (operation := getattr(each, "operation", None)) is not None:  # the SIGTERM's own, if it has one
            terminated.operation = operation  # type: ignore[attr-defined]
    return terminated


@contextlib.contextmanager
def _naming_interrupted_job(operation: Operation[Any]) -> Iterator[None]:
    """Mark Ctrl-C or SIGTERM met while waiting on or cancelling ``operation`` with it, as
    the SDK's ``result()`` does: the --json error's ``operation``."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        interrupt.operation = operation  # type: ignore[attr-defined]
        raise


def _command_error(error: Exception) -> CommandError:
    """``error`` as the one-line user error, keeping its notes (e.g. what a failed upload
    left behind), which ``main`` prints under it."""
    command_error = CommandError(str(error))
    for note in getattr(error, "__notes__", ()):
        command_error.add_note(note)
    return command_error


def _client(args: argparse.Namespace) -> Client:
    plaintext = (f"{_token_source(args)} travels to {args.target} in plaintext, readable by anyone on the network path: "
                 "add --tls (and --ca-file for a private CA), or connect through a proxy that adds TLS")
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters stay: PYTHONWARNINGS=ignore::UserWarning silences it
            client = Client(args.target, timeout=args.timeout, token=_token(args), tls=args.tls,
                            root_certificates=args.ca_file, private_key=args.key_file, certificate_chain=args.cert_file)
        if any(issubclass(warning.category, PlaintextTokenWarning) for warning in caught):  # one line like the CLI's others
            print(f"warning: {plaintext}", file=sys.stderr)
        return client
    except PlaintextTokenWarning:  # PYTHONWARNINGS=error makes it an error: one line too, not a traceback
        raise CommandError(plaintext) from None
    except (OSError, ValueError) as error:  # a certificate file that is missing or not PEM: "root_certificates: ..."
        if str(error).startswith("token "):  # "token must be printable ASCII ...": which token
            raise CommandError(f"{_token_source(args)}: {error}") from None
        argument, _, problem = str(error).partition(": ")
        flag = {"root_certificates": "--ca-file", "private_key": "--key-file", "certificate_chain": "--cert-file"}.get(argument)
        raise CommandError(f"{flag}: {problem}" if flag else str(error)) from None


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token calls carry: --token, else $EXPLAIND_TOKEN, else none (the
    Client drops surrounding whitespace: one of only spaces is none)."""
    return (args.token or os.environ.get("EXPLAIND_TOKEN") or "").strip() or None


def _token_source(args: argparse.Namespace) -> str:
    """Where :func:`_token` took the token from, for errors about it."""
    return "--token" if args.token else "EXPLAIND_TOKEN"


def _display_width(text: str) -> int:
    """The terminal columns ``text`` takes: two for an East Asian wide or full-width
    character (CJK, most emoji), none for a combining mark."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _escaping_undecodable_bytes(error: UnicodeError) -> tuple[str, int]:
    """The codec error handler ``"explaind.shown"``: a byte of a file name (or argument) that
    did not decode, which Python holds as a lone surrogate U+DC80..U+DCFF, written as that
    byte, ``\\xe9`` (four characters); any other character the encoding lacks as
    ``backslashreplace`` writes it (``\\u03bb``; ``\\ud800`` for a surrogate no byte made)."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c.encode("ascii", "backslashreplace").decode("ascii")
                   for c in error.object[error.start:error.end]), error.end


_SHOWN = "explaind.shown"
codecs.register_error(_SHOWN, _escaping_undecodable_bytes)


def _shown_text(text: str) -> str:
    """A file name (or any text from this machine: an argument) as printed, on a terminal
    or in --json's output: bytes of it that do not decode (held by Python as lone
    surrogates, which a UTF-8 stdout refuses with a traceback, and JSON as ``"\\udcff"``,
    which strict parsers refuse: it is no UTF-8) written ``\\xff``, four characters, as
    stdout and stderr write them (:func:`_showing_undecodable_bytes`)."""
    return text.encode("utf-8", _SHOWN).decode("utf-8")


def _shown_file_name(name: str | Path) -> str:
    """A file name as a terminal line shows it: its control characters escaped as Python
    writes them (``\\n``, ``\\x1b``), as a stored set's name is. A name from a downloaded data
    set (``*.png``) broke its prediction's line in two, or cleared the screen (``\\x1b[2J``)."""
    return escape_controls(_shown_text(str(name)))


# A byte that did not decode, as repr() writes its lone surrogate: "\\udce9" after an even
# number of backslashes (an odd one is an escaped backslash followed by the letters).
_REPR_OF_UNDECODED_BYTE = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")


def _shown_in_reprs(message: str) -> str:
    """``message``, quoting what the user gave as repr() does (argparse's "invalid choice:
    'x'" too), with a byte that did not decode written ``\\xe9`` as :func:`_shown_text`
    writes it, not ``\\udce9``."""
    return _REPR_OF_UNDECODED_BYTE.sub(r"\1\\x\2", message)


def _quoted(text: str) -> str:
    """``repr(text)``, for messages quoting what the user gave: :func:`_shown_in_reprs`."""
    return _shown_in_reprs(repr(text))


class _ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose own usage errors quote an argument (``invalid choice:
    'caf\\udce9'``) shown as :func:`_quoted` shows it."""

    def error(self, message: str) -> NoReturn:
        super().error(_shown_in_reprs(message))


def _names_width(names: Iterable[str]) -> int:
    """The columns of the widest of ``names`` as :func:`_print_prediction` shows them: known
    before any answer, so that each line prints as it comes, aligned with the others."""
    return max(_display_width(_shown_file_name(name)) for name in names)


def _print_prediction(name: str, prediction: Prediction, width: int) -> None:
    """An image's line, as soon as it is answered (flushed: a pipe's reader sees it then
    too), its name escaped (:func:`_shown_file_name`) and padded to ``width`` columns (not
    characters: a file named in CJK shifted its predictions)."""
    name = _shown_file_name(name)
    ranked = ", ".join(f"{escape_controls(label)} {p:.2f}" for label, p in zip(prediction.labels, prediction.probabilities, strict=True))
    print(f"{name}{' ' * (width - _display_width(name))}  {ranked}", flush=True)


def _file_problem(path: str) -> str | None:
    """Why ``path`` is no file to read, or None (a usage error, not a traceback later), the
    path escaped as predict's lines show it (a directory a glob matched, named with ESC [2J)."""
    if not path:  # Path("") is the current directory
        return _EMPTY_PATH
    if Path(path).is_file():
        return None
    shown = _shown_file_name(path)
    if Path(path).is_dir():
        return f"{shown} is a directory, not a file"
    try:
        os.stat(path)
    except OSError as error:  # missing, a link to nothing, a loop of links
        return f"no such file: {shown}" if error.errno == errno.ENOENT else f"cannot read {shown}: {error.strerror}"
    return f"{shown} is not a regular file but a pipe or a device"  # which was called "no such file"


def _directory_problem(path: str) -> str | None:
    """Why ``path`` is no directory to read, or None (a usage error, as a missing --images file is)."""
    if Path(path).is_dir():
        return None
    return f"not a directory: {_shown_file_name(path)}" if Path(path).exists() else f"no such directory: {_shown_file_name(path)}"


_EMPTY_PATH = "expected a path, got ''"


def _path(value: str) -> str:
    """argparse type: a file or directory name, not an empty one (an unset $VAR), which
    was taken as none given or as the current directory: ``--cert-file ""`` connected
    without TLS, ``--grid ""`` wrote no grid, ``--out-dir ""`` wrote into ``.``."""
    if not value:
        raise argparse.ArgumentTypeError(_EMPTY_PATH)
    return value


def _integer(value: str, bits: int | None = 32, low: int | None = None) -> int:
    """argparse type: an integer that a request's int32 (int64) field holds; protobuf
    refuses a larger one with a ValueError, which reached the user as a traceback.
    ``bits`` None: any integer, for a setting the config bounds in its own words; ``low``:
    the option's own least value, which the range stated names rather than the field's."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {_quoted(value)}") from None
    if bits is not None:
        lowest = -(2 ** (bits - 1)) if low is None else low
        if not lowest <= number < 2 ** (bits - 1):
            raise argparse.ArgumentTypeError(f"{value} is out of range [{lowest}, {2 ** (bits - 1) - 1}]")
    return number


def _int64(value: str) -> int:
    """argparse type: an integer an int64 field holds (a seed)."""
    return _integer(value, 64)


class _BareIndex(int):
    """A class given as digits alone: an index, unless a class at another index is named
    by those digits (see ``_resolved_class``). ``text`` is the value as typed ("03")."""

    text: str

    def __new__(cls, text: str) -> _BareIndex:
        index = super().__new__(cls, _integer(text))
        index.text = text
        return index


def _class_ref(value: str) -> str | int:
    """argparse type: ``name:X`` a class name, ``index:N`` a class index, else digits an
    index (a negative one is the server's to refuse as an index, not as an unknown name) and
    anything else a name."""
    if value.startswith("name:"):
        if value == "name:":  # an empty name is no class: a pair's would be conditioned on its top classes instead
            raise argparse.ArgumentTypeError(f"{_quoted(value)}: expected name:X with X a class name")
        return value.removeprefix("name:")
    if value.startswith("index:"):
        if not value.removeprefix("index:").removeprefix("-").isdecimal():
            raise argparse.ArgumentTypeError(f"{_quoted(value)}: expected index:N with N an integer")
        return _integer(value.removeprefix("index:"))
    return _BareIndex(value) if value.removeprefix("-").isdecimal() else value


def _resolved_class(ref: str | int, names: Sequence[str], prefix: str) -> str | int:
    """``ref`` as the server should read it. Digits that name a class at another index
    would silently explain the wrong class ("--class 3" where the classes are named "1" to
    "10"): refused, asking for ``index:`` or ``name:``. Digits that are no index but a
    class's name ("-1") are that name."""
    if not isinstance(ref, _BareIndex):
        return ref
    named = next((index for index, name in enumerate(names) if class_name_key(name) == ref.text), None)
    if named is None or named == ref:
        return int(ref)
    if not 0 <= ref < len(names):
        return ref.text
    raise CommandError(f"{prefix}{ref.text} is ambiguous: class {int(ref)} is {names[ref]!r} and class {named} is named "
                       f"{_quoted(ref.text)}; write {prefix}index:{ref.text} or {prefix}name:{ref.text}")


def _target_class(client: Client, args: argparse.Namespace) -> str | int:
    """``--class`` as the server should read it."""
    return _resolved_class(args.target_class, _class_names_for(client, [args.target_class]), "--class ")


def _class_names_for(client: Client, refs: Iterable[str | int]) -> list[str]:
    """The served class names where digits among ``refs`` need them (``_resolved_class``),
    else none: no call for names and plain indices."""
    return client.model_metadata().class_names if any(isinstance(ref, _BareIndex) for ref in refs) else []


def _request_id(value: str) -> str:
    """argparse type: a UUID (any form ``uuid.UUID`` reads), as the request_id the SDK sends."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a UUID (e.g. from uuidgen), got {_quoted(value)}") from None


def _non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    if not value.isdecimal():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {_quoted(value)}")
    return _integer(value, low=0)


def _positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    if not value.isdecimal() or int(value) < 1:  # not isdigit(): "²" is a digit that int() does not read
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {_quoted(value)}")
    return _integer(value, low=1)


def _number_or_nan(value: str) -> float:
    """``float(value)``, NaN where ``value`` is no number: each argparse type below then
    refuses it, with what it expects, as it refuses a number out of its range."""
    try:
        return float(value)
    except ValueError:
        return float("nan")


def _positive_seconds(value: str) -> float:
    """argparse type: a number of seconds > 0."""
    seconds = _number_or_nan(value)
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {_quoted(value)}")
    return seconds


def _finite_number(value: str) -> float:
    """argparse type: a finite number (the server checks its range and names the field)."""
    number = _number_or_nan(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {_quoted(value)}")
    return number


def _target_ratio(value: str) -> float | str:
    """argparse type of ``edit-head --target-ratio``: a number, or auto (named in the error,
    which said only "a finite number" to one who typed Auto)."""
    if value == "auto":
        return "auto"
    number = _number_or_nan(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number or auto, got {_quoted(value)}")
    return number


def _neuron_pair(spec: str) -> int | tuple[int, str | int]:
    """argparse type: ``NEURON`` or ``NEURON:CLASS`` (class name or index)."""
    neuron, colon, target = spec.partition(":")
    if not neuron.isdecimal() or (colon and not target):
        raise argparse.ArgumentTypeError(f"{_quoted(spec)} is not NEURON or NEURON:CLASS, e.g. 8 or 8:heart")
    return (_integer(neuron), _class_ref(target)) if target else _integer(neuron)


def _scenario(name: str) -> str:
    """argparse type: a shapes-world scenario name."""
    from explaind.world.scenarios import scenario_names

    if name not in scenario_names():
        raise argparse.ArgumentTypeError(f"unknown scenario {_quoted(name)}; known: {', '.join(scenario_names())}")
    return name


def _world_spec(spec: str) -> tuple[str, str, int]:
    """argparse type: ``scenario[:split[:count]]`` (split test, count 64 by default), checked."""
    from explaind.world.scenarios import SPLITS

    parts = spec.split(":")
    if len(parts) > 3:
        raise argparse.ArgumentTypeError(f"{_quoted(spec)} is not scenario[:split[:count]]")
    scenario, split, count = parts + ["test", "64"][len(parts) - 1 :]
    _scenario(scenario)
    if split not in SPLITS:
        raise argparse.ArgumentTypeError(f"unknown split {_quoted(split)}; known: {', '.join(SPLITS)}")
    if not count.isdecimal() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"count must be a positive integer, got {_quoted(count)}")
    return scenario, split, int(count)


@contextlib.contextmanager
def _naming_failing_file(files: list[str] | list[Path] | None) -> Iterator[None]:
    """Add the file names to a server error about ``images[i]`` / ``samples[i]``, as its
    field or as the items it lists (:func:`listed_items`: a Predict of images the model
    gives no usable logits for): the index counts within the failing request, which may
    not be the first (``request_offset``)."""
    try:
        yield
    except ExplaindError as error:
        item = re.compile(r"(?:images|samples)\[(\d+)\]")
        items = [error.field] if error.field and item.match(error.field) else listed_items(error)
        indices = [getattr(error, "request_offset", 0) + int(match.group(1)) for name in items if (match := item.match(name))]
        named = [_shown_file_name(files[index]) for index in indices if files and index < len(files)]
        if len(named) == 1:
            error.add_note(f"that is file {named[0]}")
        elif named:
            error.add_note(f"those are files {', '.join(named)}")
        raise


def _write(path: str | Path, data: bytes) -> None:
    """Write an output file whole or not at all: into a temporary file beside it, renamed
    over it once complete, so a failed write (a full disk) or Ctrl-C leaves no partial file
    and an older one as it was. A device or pipe (/dev/stdout), or a file in a directory
    that takes no new file, is written in place. A missing directory or no permission is a
    user error."""
    target = Path(os.path.realpath(path))  # through a symbolic link: the file it names is replaced, not the link
    try:
        if target.exists() and not target.is_file():
            target.write_bytes(data)
            return
        kept_mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            # O_BINARY: Windows opens a descriptor in text mode otherwise, writing each "\n" byte of a PNG as "\r\n".
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            descriptor = os.open(temporary, flags, 0o666)  # a new file's mode: as the umask allows
        except PermissionError:
            target.write_bytes(data)
            return
        try:
            with os.fdopen(descriptor, "wb") as file:
                if kept_mode is not None and hasattr(os, "fchmod"):  # none on Windows before Python 3.13, whose files have no mode but read-only
                    os.fchmod(file.fileno(), kept_mode)
                file.write(data)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error.strerror or error}") from None


def _require_writable(path: str) -> None:
    """Refuse an output file that could not be written, before any work is done for it.
    Tried, not asked of ``os.access``, which says yes to root on a read-only file system
    or in /sys: an existing file is opened for appending (and left unchanged), a new one
    is created and removed again. A symbolic link is followed, as :func:`_write` follows it."""
    target = Path(os.path.realpath(path))  # a link to a file not made yet was refused as "File exists"
    if target.is_dir():
        raise CommandError(f"cannot write {path}: it is a directory")
    if not target.parent.is_dir():
        raise CommandError(f"cannot write {path}: no such directory")
    try:
        if target.is_file():
            with target.open("ab"):
                pass
        elif not target.exists():  # not a device or a pipe such as /dev/stdout, which opening could block on
            target.touch(exist_ok=False)
            target.unlink()
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error.strerror or error}") from None


DEFAULT_TIMEOUT_S = 60.0  # per call: longer than the SDK's 30 s, for a person on a slow link
DEFAULT_PREDICT_CLASSES = 3  # predict's lines per image, when --top-k is not given
# predict --keep-going's exit status when some files were answered and printed and others
# failed; with none answered it is 1, as any failure's, so a script tells "some output" from none.
EXIT_SOME_FAILED = 3
UPLOAD_PROGRESS_SAMPLES = 512  # sample-set create/append show progress above this many samples
DEMO_SERVER_STOP_S = 30.0  # the demo's server, sent SIGTERM, is killed if it has not ended by then


def _folder_samples(client: Client, folder: str) -> tuple[list[Path], list[str]]:
    """:func:`image_folder`, its errors naming ``--folder``, and a class folder whose name
    is no class of the served model named as the folder it is."""
    try:
        images, labels = image_folder(folder)
    except (NotADirectoryError, ValueError) as error:
        raise CommandError(f"--folder: {error}") from None
    except OSError as error:  # a folder it may not list (no permission), an I/O error
        raise CommandError(f"--folder: cannot read {error.filename or folder}: {error.strerror or error}") from None
    names = _served_class_names(client)
    known = {class_name_key(name) for name in names}  # a macOS folder "café" is "e" and a combining accent
    if names and (unknown := sorted(label for label in set(labels) if class_name_key(label) not in known)):  # an ImageNet tree of synset ids: 1000, named 3
        folders = ", ".join(_shown_file_name(Path(folder) / name) for name in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise CommandError(f"--folder: {folders}: a folder's name must be a class of the served model "
                           f"({_first_classes(names, ' classes: explaind info --json lists them')})")
    return images, labels


def _world_samples(scenario: str, split: str, count: int) -> tuple[_WorldImages, Sequence[int], Sequence[dict[str, str]]]:
    """(images, labels, attributes) of the first ``count`` scenes of a shapes-world split,
    each computed when it is read: an upload of a million scenes starts sending at once."""
    from explaind.world.render import SHAPES, scene_attributes
    from explaind.world.scenarios import get_scenario

    dataset = get_scenario(scenario).dataset(split, size=count)
    specs = _Computed(count, functools.lru_cache(maxsize=4)(dataset.spec))  # ~45 µs each; a sample reads its own thrice
    return _WorldImages(specs), _Computed(count, lambda i: SHAPES.index(specs[i].shape)), _Computed(count, lambda i: scene_attributes(specs[i]))


class _Computed(Sequence[_Item]):
    """A read-only sequence of ``length`` items, the i-th ``item(i)``, computed each time
    it is read (none is kept)."""

    def __init__(self, length: int, item: Callable[[int], _Item]) -> None:
        self._length = length
        self._item = item

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> _Item: ...

    @overload
    def __getitem__(self, index: slice) -> list[_Item]: ...

    def __getitem__(self, index: int | slice) -> _Item | list[_Item]:
        positions = range(self._length)
        if isinstance(index, slice):
            return [self._item(i) for i in positions[index]]
        return self._item(positions[index])  # a negative index from the end; IndexError past it, as a list's


class _WorldImages:
    """Shapes-world scenes' images, (H, W, 3) uint8 each, drawn when read (~1 ms each):
    an upload streams them to the server a request at a time, so a set of a million
    samples takes no more memory than one request's."""

    def __init__(self, specs: Sequence[SceneSpec]) -> None:
        self._specs = specs

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[np.ndarray]:
        from explaind.world.render import render

        return (render(spec).image for spec in self._specs)

    def first(self, count: int) -> list[np.ndarray]:
        return list(itertools.islice(self, count))


# Commands ----------------------------------------------------------------------------


# serve flags -> the config key each one overrides.
_SERVE_OVERRIDES = {
    "host": ("server", "--host"), "port": ("server", "--port"), "metrics_port": ("server", "--metrics-port"),
    "health_port": ("server", "--health-port"),
    "data_dir": ("server", "--data-dir"), "backend": ("runtime", "--backend"), "device": ("runtime", "--device"),
    "token_file": ("server", "--token-file"), "log_format": ("server", "--log-format"),
    "tls_cert_file": ("server", "--tls-cert-file"), "tls_key_file": ("server", "--tls-key-file"),
    "tls_client_ca_file": ("server", "--tls-client-ca-file"), "callers_file": ("server", "--callers-file"),
    "admins": ("server", "--admin"), "otlp_endpoint": ("tracing", "--otlp-endpoint"),
}


def _as_typed(key: str, value: object) -> str:
    """A serve override as its flags were typed: ``--admin ops --admin dev`` for a list
    key (one flag a value), quoted so ``--otlp-endpoint ''`` reads as a flag with a value."""
    flag = _SERVE_OVERRIDES[key][1]
    return " ".join(f"{flag} {shlex.quote(str(item))}" for item in (value if isinstance(value, tuple) else (value,)))


def _require_server_platform(command: str) -> None:
    """Refuse, saying where it runs, a command that runs the server on Windows, whose
    store and limits need POSIX (fcntl locks, resource): it failed with ModuleNotFoundError."""
    if sys.platform == "win32":
        raise CommandError(f"{command}: the server runs on Linux and macOS; on Windows run it in WSL or its container "
                           "(deploy/Dockerfile), and this SDK and CLI against it")


def cmd_serve(args: argparse.Namespace) -> int:
    _require_server_platform("serve")
    from explaind.signals import stop_on_signals

    stop_requested = stop_on_signals()  # before the seconds of imports below: a container's PID 1 ignored SIGTERM then
    from explaind.config import ConfigError, load_config, requested_log_format
    from explaind.errors import FailedPrecondition
    from explaind.service import serve
    from explaind.service.server import end_serving_process
    from explaind.store import StoreOpenError

    try:
        config = load_config(args.config)
    except ConfigError as error:  # the format the file asks for, unless the flag overrides it
        log_format = args.log_format or (requested_log_format(args.config) if args.config else None)
        return _start_failed(str(error), json_logs=log_format == "json")
    # One replace per section, so flags that only go together (--tls-cert-file and
    # --tls-key-file) are checked together; an error names the flag of the key it quotes.
    changes: dict[str, dict[str, object]] = {}
    for key, (section, _flag) in _SERVE_OVERRIDES.items():
        if (value := getattr(args, key)) is not None:  # a repeated flag's list is the config's tuple
            changes.setdefault(section, {})[key] = tuple(value) if isinstance(value, list) else value
    json_logs = (args.log_format or config.server.log_format) == "json"
    start_warnings = []
    # A flag over a key the file sets: a container's entrypoint passes --port,
    # --data-dir..., and the file's own value for one went unused without a word.
    for section, values in changes.items():
        for key, value in values.items():
            given = getattr(getattr(config, section), key)
            if f"{section}.{key}" in config.file_keys and given != value:
                start_warnings.append(f"{_as_typed(key, value)} overrides [{section}].{key} = {given!r} of {args.config}")
        try:
            config = config.replace(section, **values)
        except ConfigError as error:  # a value the config file would not allow either
            message = str(error).removeprefix(f"{config.source}: ")
            return _start_failed(_naming_flag(message, {section: values}) or f"{_SERVE_OVERRIDES[next(iter(values))][1]}: {message}",
                                 json_logs=json_logs)
    if os.environ.get("EXPLAIND_TOKEN") and not (config.server.token or config.server.token_file or config.server.callers_file):
        start_warnings.append("EXPLAIND_TOKEN is the clients' token; this server asks for none ([server].token is empty)")
    for warning in start_warnings:
        if json_logs:
            _json_log().warning(warning)
        else:
            print(f"warning: {warning}", file=sys.stderr)
    try:
        return end_serving_process(serve(config, stop_requested))
    except (OSError, StoreOpenError, ConfigError, FailedPrecondition) as error:  # an address or the data dir in use, a corrupt database, a token file, no GPU
        return _start_failed(_naming_flag(str(error), changes) or str(error), json_logs=json_logs)


def _naming_flag(message: str, changes: dict[str, dict[str, object]]) -> str | None:
    """``message`` led by the flag whose key it quotes ("--token-file: [server].token_file:
    cannot read ..."), the flag being what the operator typed; None when it quotes no key
    a flag set (the key then came from the config file, which the message names alone)."""
    quoted = [key for section, values in changes.items() for key in values if re.search(rf"\[{section}\]\.{key}\b", message)]
    return f"{_SERVE_OVERRIDES[quoted[0]][1]}: {message}" if quoted else None


def _start_failed(message: str, *, json_logs: bool) -> int:
    """Report why ``serve`` cannot start: the CLI's ``error:`` line, or with JSON logs one
    JSON object like every other line, which log pipelines parse. Exit code 1."""
    if not json_logs:
        raise CommandError(message)
    _json_log().error("cannot start: %s", message)
    return 1


def _json_log() -> Any:
    """The server's logger, writing JSON (as it does once the server configured it)."""
    import logging

    from explaind.logs import configure_logging

    configure_logging("json")  # changes nothing where the server configured logging already
    return logging.getLogger("explaind")


def cmd_predict(args: argparse.Namespace) -> int:
    with _client(args) as client, _naming_failing_file(args.images):
        # Unset: 3 classes, or all of a classifier with fewer (more would be refused).
        metadata = client.model_metadata()
        classes = len(metadata.class_names)
        if args.keep_going and PARTIAL_FAILURE_CAPABILITY not in metadata.capabilities:  # the SDK's refusal says "without partial_failure"
            raise CommandError(f"--keep-going: the server at {args.target} lacks the {PARTIAL_FAILURE_CAPABILITY!r} capability (an older "
                               "release, which fails the whole request for one file); upgrade it, or run without --keep-going")
        if args.top_k and args.top_k > classes:  # said here: the server's refusal offers a 0 that --top-k does not take
            raise CommandError(f"--top-k: {args.top_k} is more than the served model's {classes} classes")
        top_k = args.top_k or min(DEFAULT_PREDICT_CLASSES, classes)
        width = _names_width(args.images)
        entries: list[dict[str, Any]] = []  # --json's, printed once all are in: valid JSON needs its end
        failed = 0
        predictions = _predictions_of_files(client, args.images, top_k=top_k, max_in_flight=args.max_in_flight,
                                            partial_failure=args.keep_going)
        with contextlib.closing(predictions):  # a Ctrl-C or failure cancels the requests in flight before the client closes
            for name, prediction in zip(args.images, predictions, strict=True):
                if prediction.error is not None:  # --keep-going: each file the server could not answer is named on stderr
                    failed += 1
                    print(f"error: {_shown_file_name(name)}: {prediction.error}", file=sys.stderr)
                if args.json:
                    entries.append(_prediction_json(name, prediction))
                elif args.json_lines:  # as it is answered, like a text line: a failure or Ctrl-C keeps the lines before it
                    _print_json_line(_prediction_json(name, prediction))
                elif prediction.error is None:
                    _print_prediction(name, prediction, width)
    if args.json:
        _print_json(entries, args)
    if not failed:
        return 0
    return EXIT_SOME_FAILED if failed < len(args.images) else 1


def _prediction_json(name: str, prediction: Prediction) -> dict[str, Any]:
    """A file's entry of predict's --json list, and its line with --json-lines: its classes,
    or with --keep-going the error the server answered it with."""
    if prediction.error is not None:
        return {"image": name, "error": _error_json(prediction.error)}
    return {"image": name, "labels": prediction.labels, "class_indices": prediction.class_indices,
            "probabilities": prediction.probabilities, "model_version": prediction.model_version}


def _predictions_of_files(client: Client, files: list[str], **options: Any) -> Generator[Prediction, None, None]:
    """:meth:`Client.predictions` of the files, as they are answered; a file unreadable
    when its turn came (gone meanwhile, an I/O error) is a user error."""
    try:
        yield from client.predictions([Path(file) for file in files], **options)
    except OSError as error:
        raise _command_error(error) from None


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        meta = client.model_metadata()
    if args.json:
        _print_json(meta, args)
    else:
        _print_metadata(meta)
    return 0


# An ImageNet classifier has 1000 classes: the text view names this many, --json all.
_CLASSES_SHOWN = 20


def _first_classes(texts: list[str], more: str) -> str:
    """The first ``_CLASSES_SHOWN`` of ``texts``, then how many more (followed by ``more``)."""
    shown = ", ".join(texts[:_CLASSES_SHOWN])
    return shown + (f", ... and {len(texts) - _CLASSES_SHOWN} more{more}" if len(texts) > _CLASSES_SHOWN else "")


def _print_metadata(meta: ModelMetadata) -> None:
    print(f"classifier  {meta.name} ({meta.loader}), version {meta.model_version}, backend {meta.backend} on {meta.device}")
    print(f"            {len(meta.class_names)} classes: {_first_classes([escape_controls(n) for n in meta.class_names], ' (--json lists them all)')}")
    fit = f"shorter side resized to {meta.resize_size}, centre crop" if meta.resize_size else "images stretched to it"
    fit += f", {meta.interpolation}" if meta.interpolation else ""
    fit += ", JPEG files decoded at reduced scale" if meta.jpeg_reduced_decode else ""
    if (normalization := meta.normalization) is not None:  # an older server does not say
        fit += (f"; pixels in [0, 1] normalised by mean {', '.join(f'{v:g}' for v in normalization.mean)}, "
                f"std {', '.join(f'{v:g}' for v in normalization.std)}") if normalization.mean else "; pixels in [0, 1], not normalised"
    if meta.supports_features:
        gradients = "" if meta.supports_visualization else "; no gradients, so no neuron visualisations"
        print(f"            features: {meta.feature_layer} -> {meta.head} (D={meta.feature_dim}){gradients}")
    else:
        print("            inference only: no penultimate features, so no ranking or head edits")
    print(f"            input {meta.image_size}x{meta.image_size} ({fit})")
    for component in meta.components.values():
        origin = f", from {component.source}" if component.loaded and component.source else ""
        print(f"{component.name:<11} {'loaded' if component.loaded else 'not loaded'}: {component.detail}{origin}")
    limits = meta.limits
    if limits.max_message_bytes:
        print(f"limits      {limits.max_message_bytes / 2**20:g} MiB per message, {limits.max_pixels_per_request / 2**20:g} Mi decoded pixels "
              f"per request, {limits.max_images_per_request} images (or samples) per request, sides up to {limits.max_image_side} px"
              + (f", {limits.max_samples_per_caller} samples in one caller's sets" if limits.max_samples_per_caller else "")
              + (f", {limits.max_head_versions_per_caller} head versions of one caller's edits" if limits.max_head_versions_per_caller else "")
              + (f", {limits.max_calls_per_caller} Predict or upload calls of one named caller at once" if limits.max_calls_per_caller else "")
              + (f", {limits.max_visualization_steps} steps per visualisation" if limits.max_visualization_steps else ""))
    if meta.capabilities:  # what makes retries safe and what its answers say (README: the SDK's retries); an older server lists none
        print(f"supports    {', '.join(meta.capabilities)}")


def _served_class_names(client: Client) -> list[str]:
    """The served model's class names; none where it cannot say (a set is stored, whatever the names)."""
    try:
        return client.model_metadata().class_names
    except ExplaindError:
        return []


def _counts_by_name(names: list[str], counts: dict[int, int]) -> dict[str, int]:
    """``{0: 20, 5: 3}`` as ``{"circle": 20, "heart": 3}`` (by index where ``names`` has no such class)."""
    return {names[label] if 0 <= label < len(names) else str(label): count for label, count in sorted(counts.items())}


def _named_counts(client: Client, counts: dict[int, int]) -> str:
    """The counts as "circle 20, heart 3": the first ``_CLASSES_SHOWN`` classes and how many more."""
    counted = [f"{escape_controls(name)} {count}" for name, count in _counts_by_name(_served_class_names(client), counts).items()]
    return _first_classes(counted, " classes") or "none"


def cmd_sample_set(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action in ("create", "append"):
            images: _WorldImages | list[Path]
            labels: Sequence[int | str]
            attributes: Sequence[dict[str, str]] | None
            if args.world:
                images, labels, attributes = _world_samples(*args.world)
            elif args.folder:
                images, labels = _folder_samples(client, args.folder)
                attributes = None
            else:  # parse_arguments saw as many --labels
                names = _class_names_for(client, args.labels)
                images, labels, attributes = [Path(p) for p in args.images], [_resolved_class(label, names, "--labels ") for label in args.labels], None
            try:
                with _naming_failing_file(None if args.world else cast("list[Path]", images)):  # not the world's array
                    progress = len(labels) > UPLOAD_PROGRESS_SAMPLES  # more than one request, by default
                    if args.action == "create":
                        stored = client.create_sample_set(images, labels, sample_set_id=args.id or "", display_name=args.name or "",
                                                          attributes=attributes, progress=progress, request_id=args.request_id)
                    else:
                        stored = client.append_samples(args.id, images, labels, attributes=attributes, progress=progress,
                                                       request_id=args.request_id)
            except (ValueError, OSError) as error:  # a label that is no class of the served model; a file unreadable when its turn came
                raise _command_error(error) from None
            if args.json:
                _print_json(_sample_set_json(_served_class_names(client), stored), args)
                return 0
            # An append says how many it added, then the set's new total: not one count for the other.
            done = "created" if args.action == "create" else f"appended {counted(len(labels), 'sample')} to"
            total = "now " if args.action == "append" else ""
            print(f"{done} {stored.sample_set_id}: {total}{counted(stored.sample_count, 'sample')}, per class {_named_counts(client, stored.class_counts)}")
        elif args.action == "list":
            listed = client.sample_sets(owner=args.owner or "")
            if args.json:
                names = _served_class_names(client)  # once for every set
                _print_json([_sample_set_json(names, s) for s in listed], args)
                return 0
            for s in listed:
                uploading = ", still uploading" if s.uploading else ""
                owner = f", by {s.owner}" if s.owner else ""
                print(f"{s.sample_set_id:<24} {s.sample_count:>7} {'sample ' if s.sample_count == 1 else 'samples'}  {escape_controls(s.display_name)}  (updated {_local_time(s.update_time)}{uploading}{owner})")
            if not listed:
                print(f"no sample sets of {args.owner}" if args.owner else "no sample sets (explaind sample-set create makes one)", file=sys.stderr)
        elif args.action == "show":
            s = client.sample_set(args.id)
            if args.json:
                _print_json(_sample_set_json(_served_class_names(client), s), args)
                return 0
            named = f" ({s.display_name!r})" if s.display_name else ""
            print(f"{s.sample_set_id}{named}: {counted(s.sample_count, 'sample')}, per class {_named_counts(client, s.class_counts)}, "
                  f"created {_local_time(s.create_time)}")
        else:  # delete: the last of the action's choices
            client.delete_sample_set(args.id)
            if args.json:
                _print_json({"deleted": args.id}, args)
            else:
                print(f"deleted {args.id}")
    return 0


def _local_time(moment: dt.datetime) -> str:
    """A server time (UTC) as this machine's clock reads it, with its zone ("2026-12-04
    20:39:56 CET"): a bare UTC time read as local time is hours off, and the server's
    own log lines are in local time."""
    return f"{moment.astimezone():%Y-%m-%d %H:%M:%S %Z}"


def _sample_set_json(names: list[str], sample_set: SampleSet) -> dict[str, Any]:
    """A sample set as JSON, its ``class_counts`` keyed by class name like ``evaluate``'s."""
    return {**_json_value(sample_set), "class_counts": _counts_by_name(names, sample_set.class_counts)}


# Results --json commands leave out: images (their files are named instead) and ω, which
# can be (mistakes x features) floats (the SDK's result(), or its omega.npy artifact, has it).
_NOT_IN_JSON = ("image", "masked_image", "preview", "omega")


def _json_value(value: Any) -> Any:
    """An SDK result as a JSON value: dataclasses as objects (``_NOT_IN_JSON`` fields left
    out), times in ISO 8601, NaN or infinity as null, since JSON has neither (a
    visualisation without CLIP has no similarity), and text as :func:`_shown_text` (a file
    name's undecodable bytes as ``\\xff``, not lone surrogates: the output is UTF-8). No
    array reaches it: an evaluation's (its confusion matrix) goes through
    ``_evaluation_json``, a ranking's ω is left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_value(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in _NOT_IN_JSON}
    if isinstance(value, dict):
        return {_shown_text(str(key)): _json_value(item) for key, item in value.items()}
    if isinstance(value, str):
        return _shown_text(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def _json_text(value: Any) -> str:
    """``value`` (:func:`_json_value`) as one line of JSON, the form of every --json output."""
    return json.dumps(_json_value(value))


def _print_json(value: Any, args: argparse.Namespace) -> None:
    """Print the command's --json value, its last: any error after it (a SIGTERM in the
    channel's close) prints no second value (:func:`_print_failure_json`)."""
    print(_json_text(value))
    args.json_written = True


def _print_json_line(value: Any) -> None:
    """Print ``value`` as a line of a stream of JSON values (predict's --json-lines, a
    watch's --json updates), at once: a Ctrl-C or SIGTERM cutting it short puts the error
    on a line of its own (:func:`_print_failure_json`)."""
    print(_json_text(value), flush=True)


# The most confident mistakes an evaluation prints.
MISTAKES_SHOWN = 5


# (true, predicted) class pairs ``evaluate`` prints, those of the most mistakes.
CONFUSIONS_SHOWN = 5


def _print_evaluation(report: Evaluation) -> None:
    print(f"accuracy {report.accuracy:.3f} on {counted(report.sample_count, 'sample')} (model {report.model_version})")
    # Class names as the server's config wrote them: a control or bidi character escaped (escape_controls), not run.
    absent = [escape_controls(name) for name, count in report.class_counts.items() if not count]
    listed = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
    scored = list(report.class_accuracy.items())
    heading = "per class"
    if len(scored) > _CLASSES_SHOWN:  # the classes to look at first: the worst, stable in class order
        heading = f"per class, the {_CLASSES_SHOWN} lowest of {len(scored)} (evaluate --json gives all)"
        scored = sorted(scored, key=lambda item: item[1])[:_CLASSES_SHOWN]
    print(f"{heading}: " + ", ".join(f"{escape_controls(name)} {acc:.2f}" for name, acc in scored) + (f"; no samples of {listed}" if absent else ""))
    names = [escape_controls(name) for name in report.class_names]
    # Where the mistakes concentrate: the class to explain first (explaind rank --class).
    confusions = [(label, predicted, count) for label, predicted, count in report.confusion_cells.tolist() if label != predicted]
    if confusions:
        print("most confused: " + ", ".join(f"{names[label]} as {names[predicted]} {count}" for label, predicted, count in confusions[:CONFUSIONS_SHOWN])
              + (f" and {counted(len(confusions) - CONFUSIONS_SHOWN, 'more pair')}" if len(confusions) > CONFUSIONS_SHOWN else ""))
    for index, label, predicted, probability in report.mistakes[:MISTAKES_SHOWN]:
        print(f"  mistake: sample {index} is {names[label]}, predicted {names[predicted]} ({probability:.2f})")
    if report.mistake_count > MISTAKES_SHOWN:
        print(f"  and {counted(report.mistake_count - MISTAKES_SHOWN, 'more mistake')}, less confident (evaluate --json lists all)")


# Operations ``operations list`` prints unless given --limit.
OPERATIONS_LISTED = 100
# Ranked neurons printed by default (rank --show, operations get).
RANKING_LINES = 10
_STABILITY_HELP = ("a stability column: each neuron's share of N bootstrap resamples of the mistakes (0-1000) whose own ranking has it in its top 5, "
                   f"how far to trust its place; 0: none (default: {DEFAULT_STABILITY_RESAMPLES}; on one server CPU thread 0.1 s "
                   "for 4,096 mistakes of 2048 features, 0.9 s for 50,000)")


def _print_ranking(ranking: NeuronRanking, limit: int = RANKING_LINES) -> None:
    print(ranking.summary(limit))


def _print_visualizations(result: NeuronVisualizations) -> None:
    print(result.summary())


def _print_head_edit(edit: HeadEdit) -> None:
    print(edit.summary())


# What ``operations get/wait/watch`` print for a succeeded operation, by kind (--json:
# ``_RESULT_JSON``, else every field).
_RESULT_PRINTERS: dict[str, Callable[[Any], None]] = {
    "evaluate_sample_set": _print_evaluation,
    "rank_mistake_neurons": _print_ranking,
    "visualize_neurons": _print_visualizations,
    "edit_head": _print_head_edit,
}


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.grid:
        _require_writable(args.grid)
    notes = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON alone
    with _client(args) as client:
        operation = started_job(client, lambda request_id: client.evaluate_sample_set(
            args.id, batch_size=args.batch_size, max_grid_images=args.max_grid_images, request_id=request_id), args.request_id, started_by="this command")
        evaluation = _announce_and_wait(client, operation, args)
        if evaluation is None:
            return 0
        if not args.json:
            _print_evaluation(evaluation)
        if args.grid and not evaluation.mistakes:
            print(f"no mistakes: {args.grid} not written", file=notes)
        elif args.grid:
            _write(args.grid, operation.artifact("mistakes.png"))
            print(f"wrote {args.grid}", file=notes)
        if args.json:  # with what the notes on stderr say: the operation, and the grid file where one was written
            grid = {"grid_file": args.grid if evaluation.mistakes else None} if args.grid else {}
            _print_json({**_started_json(operation), **_evaluation_json(evaluation), **grid}, args)
    return 0


def _evaluation_json(evaluation: Evaluation) -> dict[str, Any]:
    """The evaluation as JSON: classes without samples are left out of ``class_counts``
    and ``class_accuracy`` (thousands of zeros for an ImageNet model), mistakes are
    objects with their classes' names beside the indices (``label_name``,
    ``predicted_class_name``; null for an index the model has no name for), the confusion matrix is rows of counts (true label by row; none where the
    server sent only its cells) and its cells [label, predicted, count], most samples first."""
    names = evaluation.class_names

    def name(index: int) -> str | None:
        return names[index] if 0 <= index < len(names) else None

    # The SDK's field names, as rank's mistakes have them, and the names a script otherwise looks up in class_names.
    mistakes = [{**mistake._asdict(), "label_name": name(mistake.label), "predicted_class_name": name(mistake.predicted_class)}
                for mistake in evaluation.mistakes]
    return {
        "sample_set_id": evaluation.sample_set_id, "model_version": evaluation.model_version,
        "sample_count": evaluation.sample_count, "accuracy": evaluation.accuracy,
        "class_accuracy": evaluation.class_accuracy,
        "class_counts": {name: count for name, count in evaluation.class_counts.items() if count},
        "class_names": evaluation.class_names, "mistakes": mistakes, "confusion_matrix": evaluation.confusion_matrix.tolist(),
        "confusion_cells": evaluation.confusion_cells.tolist(),
    }


def cmd_rank(args: argparse.Namespace) -> int:
    def announce(job: Operation[NeuronRanking]) -> None:
        """Say, as the other job commands do, where the job is an earlier run's, or may be (a
        new one is not named: the ranking's --json names it)."""
        rerun = args.request_id is not None
        unsaid = _earlier_run_unsaid(client, job, rerun)
        if unsaid or _started_by_earlier_run(job, rerun):
            print(_announcement(job, waiting=True, rerun=True, unsaid=unsaid), file=sys.stderr if args.json else sys.stdout)

    with _client(args) as client:
        target_class = _target_class(client, args)
        # The ranking inline (a small set), or its job, followed to it should a Ctrl-C land inside the start;
        # progress goes to stderr, so --json's stdout stays JSON alone.
        ranking = followed_ranking(client, args.id, target_class, args.request_id, started_by="this command", progress=True,
                                   announce=announce, solver=args.solver, stability_resamples=args.stability)
    if args.json:  # with the ranking's requested_again, as the other job commands give it (false inline: no job, no earlier run's)
        _print_json(_ranking_json(ranking), args)
        return 0
    _print_ranking(ranking, args.show)
    return 0


def _ranking_json(ranking: NeuronRanking) -> dict[str, Any]:
    """The ranking with each neuron's rank ratio; its per-mistake summaries only where it
    has them (the SDK's include_samples): an empty list would read as "no mistakes"."""
    value = {**_json_value(ranking), "neurons": [{**_json_value(n), "rank_ratio": n.rank_ratio} for n in ranking.neurons]}
    if not ranking.mistakes:
        del value["mistakes"]
    return value


def _visualizations_json(result: NeuronVisualizations) -> dict[str, Any]:
    """The visualisations as JSON, each with ``flipped``: whether its clip_similarity +
    epsilon ≤ 0, the image the text output marks ! (the SDK's ``flipped()`` decides)."""
    return {**_json_value(result), "visualizations": [{**_json_value(v), "flipped": result._flips(v)} for v in result.visualizations]}


# Results whose --json differs from their fields (see each function); the rest print every field.
_RESULT_JSON: dict[str, Callable[[Any], Any]] = {"evaluate_sample_set": _evaluation_json, "rank_mistake_neurons": _ranking_json,
                                                 "visualize_neurons": _visualizations_json}


def _started_by_earlier_run(operation: Operation[Any], rerun: bool) -> bool:
    """Whether a job command's ``operation`` is an earlier run's under the --request-id
    the user gave (``rerun``): the server answers a new job QUEUED, so one running or ended
    is, as is one still queued that the server says it had started (``requested_again``;
    not from an older server, nor for a start the SDK retried after a lost answer, whose
    first attempt may have started it); without one, this run's own, which the SDK's retry
    of a start whose answer was lost found running or ended."""
    return rerun and (operation.state != "queued" or operation.requested_again)


# What _earlier_run_unsaid answers for a server that does not list the request_id capability
# (an older release): it starts a new job for every run, so the job is this run's, and the
# --request-id given to make a rerun safe is not.
REQUEST_ID_IGNORED = "this server ignores --request-id (an older release): running this again starts another job"


def _earlier_run_unsaid(client: Client, operation: Operation[Any], rerun: bool) -> str:
    """Why a job command's queued ``operation``, got under the --request-id the user gave
    (``rerun``), may be an earlier run's without the server saying so ("" when it would
    say): one that does not list the requested_again capability (an older server)
    answers an earlier run's queued job as it does a new one, so "started" would claim it
    for this run. Where asking for that list fails, the server may say it or not: the
    words say that the asking failed, not that the server is an older one. One that does
    not list request_id either: REQUEST_ID_IGNORED."""
    if not rerun or operation.state != "queued" or operation.requested_again:
        return ""
    # Its name not said yet: a Ctrl-C in the call cancels the job, as one inside its start does.
    with operation._cancelled_if_interrupted():
        try:
            capabilities = client.model_metadata().capabilities
        except ExplaindError as error:
            return f"whether the server says which could not be asked: {error}"
    if REQUEST_ID_CAPABILITY not in capabilities:
        return REQUEST_ID_IGNORED
    return "" if REQUESTED_AGAIN_CAPABILITY in capabilities else "the server does not say which"


def _announcement(operation: Operation[Any], waiting: bool, rerun: bool, unsaid: str) -> str:
    """What a job command says of the ``operation`` it got: started by this run, or by an
    earlier one (:func:`_started_by_earlier_run`), queued, running or ended; or, queued,
    by either, where the server does not say which (``unsaid``, why: :func:`_earlier_run_unsaid`)."""
    wait = f"explaind operations wait {operation.name} waits for it"
    if unsaid == REQUEST_ID_IGNORED:
        return f"started {operation.name}; {unsaid}" + ("" if waiting else f"; {wait}")
    if unsaid:
        return (f"{operation.name}, started by this run or by an earlier one with this --request-id ({unsaid}), "
                f"is queued; {'waiting for it' if waiting else wait}")
    if not _started_by_earlier_run(operation, rerun):
        return f"started {operation.name}" + ("" if waiting else f"; {wait}")
    earlier = f"{operation.name}, started by an earlier run with this --request-id,"
    if operation.done:
        again = "" if operation.state == "succeeded" else "; its outcome stays that id's: give a new --request-id to run it again"
        return f"{earlier} ended already ({operation.state}){again}"
    now = "is queued" if operation.state == "queued" else "is running already"
    return f"{earlier} {now}; {'waiting for it' if waiting else wait}"


def _announce_and_wait(client: Client, operation: Operation[_Result], args: argparse.Namespace) -> _Result | None:
    """Print the operation's name, then (unless --no-wait) wait for its result with a
    progress bar; None with --no-wait. With --no-wait, stdout gets the name alone
    (``N=$(explaind evaluate s --no-wait)``), or {"operation": ..., "name": ...,
    "requested_again": ...} with --json (``operation`` as every command's JSON names a
    job; ``name`` kept for scripts that read it; see :func:`_started_json`), and the note
    goes to stderr; with --json, stdout gets only the JSON."""
    rerun = args.request_id is not None
    unsaid = "" if args.no_wait and args.json else _earlier_run_unsaid(client, operation, rerun)
    if args.no_wait:
        if args.json:
            _print_json({"operation": operation.name, "name": operation.name, "requested_again": operation.requested_again}, args)
        else:
            print(operation.name)
            print(_announcement(operation, waiting=False, rerun=rerun, unsaid=unsaid), file=sys.stderr)
        return None
    print(_announcement(operation, waiting=True, rerun=rerun, unsaid=unsaid), file=sys.stderr if args.json else sys.stdout)
    with _naming_interrupted_job(operation):
        return operation.result(progress=True)


def _started_json(operation: Operation[Any]) -> dict[str, Any]:
    """The keys a job command's --json gives its job by: ``operation``, its name, and
    ``requested_again``, whether it is an earlier run's under the same --request-id (the
    SDK's :attr:`Operation.requested_again`), which a script cannot tell from a queued job's
    state alone as the text's "started" or "started by an earlier run" tells a reader."""
    return {"operation": operation.name, "requested_again": operation.requested_again}


def cmd_visualize(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir or ".")
    created: list[Path] = []  # the directories made for the images, deepest first
    if not args.no_wait:  # before the job runs, so a bad directory does not waste it
        if out_dir.exists() and not out_dir.is_dir():  # mkdir would say only "File exists"
            raise CommandError(f"--out-dir: {out_dir} is a file, not a directory")
        created = [directory for directory in (out_dir, *out_dir.parents) if not directory.exists()]
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CommandError(f"--out-dir: cannot create {out_dir}: {error.strerror or error}") from None
    try:
        with _client(args) as client:
            names = _class_names_for(client, [pair[1] for pair in args.neurons if isinstance(pair, tuple)])
            neurons = [(pair[0], _resolved_class(pair[1], names, f"{pair[0]}:")) if isinstance(pair, tuple) else pair for pair in args.neurons]
            if repeat := repeated_pair([pair if isinstance(pair, tuple) else (pair, None) for pair in neurons]):
                raise CommandError(f"the NEURON[:CLASS] at position {repeat[0] + 1} repeats the one at position {repeat[1] + 1}: "
                                   "the same neuron and class would be optimised twice into the same image")
            operation = started_job(client, lambda request_id: client.visualize_neurons(
                neurons, method=args.method, steps=args.steps, classes_per_neuron=args.classes_per_neuron, gamma=args.gamma,
                epsilon=args.epsilon, learning_rate=args.learning_rate, seed=args.seed, request_id=request_id), args.request_id, started_by="this command")
            result = _announce_and_wait(client, operation, args)
    except BaseException:  # no images to write (no server, a refused request, Ctrl-C): no empty directories left either
        for directory in created:
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
                directory.rmdir()
        raise
    if result is None:
        return 0
    if not args.json:
        _print_visualizations(result)
    value = _visualizations_json(result)
    for i, (v, shown) in enumerate(zip(result.visualizations, value["visualizations"])):
        stem = _visualization_stem(i, v.neuron, v.class_name)
        for key, suffix, image in (("image_file", "", v.image), ("masked_image_file", "_masked", v.masked_image)):
            path = out_dir / f"{stem}{suffix}.png"
            buffer = io.BytesIO()
            cast("Image", image).save(buffer, format="PNG")  # downloaded: result() without download=False
            _write(path, buffer.getvalue())
            shown[key] = str(path)
    if args.json:
        _print_json({**_started_json(operation), **value}, args)
    else:
        print(f"wrote {2 * len(result.visualizations)} images to {out_dir}")
    return 0


def _visualization_stem(index: int, neuron: int, class_name: str) -> str:
    """File name stem numbered like the server's artifacts (a pair may repeat), with the
    class name made safe for any file system ("n02085620 Chihuahua/toy" -> "n02085620-Chihuahua-toy")."""
    return f"{index:02d}_neuron{neuron}_{_safe_file_name(class_name)}"


# The most of a class name a file name takes: a file system takes names of 255 bytes at
# most, and a longer class name (the server bounds none) failed the write after the job.
SAFE_FILE_NAME_CHARS = 100


def _safe_file_name(class_name: str) -> str:
    """A class name (the server's) as part of a file name: no "/" or ".." to leave the
    directory by, nothing a file system refuses ("n02085620 Chihuahua/toy" -> "n02085620-Chihuahua-toy"),
    ASCII, accents dropped rather than their letters ("étoile" -> "etoile", not "toile"),
    its first SAFE_FILE_NAME_CHARS characters."""
    ascii_name = unicodedata.normalize("NFKD", class_name).encode("ascii", "ignore").decode()
    return re.sub(r'[^A-Za-z0-9_.-]+', '-', ascii_name)[:SAFE_FILE_NAME_CHARS].strip('.-') or 'class'


def _artifact_file_name(artifact: str) -> str:
    """The file in the current directory an artifact is written to without --output: its
    name, whose stem is made safe as a class name's (:func:`_safe_file_name`): a
    visualisation's name holds its class's ("03_neuron7_Chihuahua/toy.png"), whose "/"
    made the write fail with "no such directory", and whose ":" Windows takes for a stream
    of another file. A suffix of letters and digits (".png") is kept."""
    stem, dot, suffix = artifact.rpartition(".")
    if not dot or not re.fullmatch(r"[A-Za-z0-9]{1,10}", suffix):
        stem, suffix = artifact, ""
    return _safe_file_name(stem) + (f".{suffix}" if suffix else "")


def cmd_edit_head(args: argparse.Namespace) -> int:
    with _client(args) as client:
        target_class = _target_class(client, args)
        operation = started_job(client, lambda request_id: client.edit_head(
            args.id, target_class, args.neurons, method=args.method, validation_sample_set_id=args.validation_sample_set,
            evaluation_sample_set_id=args.evaluation_sample_set, group_attribute=args.group_attribute, strength=args.strength,
            target_ratio=args.target_ratio, learning_rate=args.learning_rate, max_epochs=args.max_epochs, patience=args.patience,
            seed=args.seed, promote=args.promote, description=args.description, request_id=request_id,
        ), args.request_id, started_by="this command")
        edit = _announce_and_wait(client, operation, args)
        if edit is not None and args.json:
            _print_json({**_started_json(operation), **_json_value(edit)}, args)
        elif edit is not None:
            from .report import edit_evaluated_on

            _print_head_edit(edit)
            # Its accuracies are not the set's: `evaluate` of the same head and set prints another.
            print(f"  evaluated on {edit_evaluated_on(client, args.id, args.evaluation_sample_set, args.validation_sample_set)}")
    return 0


def cmd_operations(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            limit = args.limit or OPERATIONS_LISTED
            listed = client.operations(kind=args.kind or "", state=args.state or "", owner=args.owner or "",
                                       limit=limit + 1)  # one more: are there more?
            if args.json:
                shown = [_operation_json(op) for op in listed[:limit]]
                _print_json({"operations": shown, "truncated": len(listed) > limit} if args.json_object else shown, args)
            else:
                for op in listed[:limit]:
                    print(_operation_line(op))
            if len(listed) > limit:
                print(f"(the newest {limit}; --limit N lists more)", file=sys.stderr)
            elif not listed:
                # Named as filtered ("no failed edit_head operations"), not "of that kind or state".
                filtered = "".join(f"{value} " for value in (args.state, args.kind) if value)
                print(f"no {filtered}operations" + (f" of {args.owner}" if args.owner else ""), file=sys.stderr)
            return 0
        if args.action == "delete":
            client.delete_operation(args.name)
            # "deleted" as given (operations/ID or ID); "operation" as every other command names a job.
            operation_name = f"{OPERATION_NAME_PREFIX}{args.name.removeprefix(OPERATION_NAME_PREFIX)}"
            if args.json:
                _print_json({"deleted": args.name, "operation": operation_name}, args)
            else:
                print(f"deleted {args.name}")
            return 0
        operation = client.operation(args.name)
        if args.action == "cancel":
            if operation.done and not args.json:
                print(f"{operation.name} had already finished ({operation.state}); nothing to cancel")
                return 0
            if not operation.done:
                with _naming_interrupted_job(operation):
                    operation.cancel()
                if not args.json:  # a queued job ends at once, a running one at its next check
                    print(cancel_outcome(operation) + ("" if operation.done else f" (explaind operations wait {operation.name})"))
                    return 0
        elif args.action in ("wait", "watch"):
            with _naming_interrupted_job(operation):
                try:
                    if args.action == "wait":
                        operation.wait()
                    else:
                        for update in operation.watch():
                            if not update.done:  # the last state is printed below, with the result
                                if args.json:
                                    _print_json_line(_operation_json(update))
                                else:
                                    print(_operation_line(update), flush=True)
                except KeyboardInterrupt as interrupt:  # only the waiting stops: the job is not this command's
                    interrupt.add_note(f"{operation.name} goes on; explaind operations cancel {operation.name} stops it")
                    raise
        elif args.action == "artifact":
            output = args.output or _artifact_file_name(args.artifact)
            # As cp: the artifact's own name in a directory; "-" stays standard output beside a directory "-".
            if args.output not in (None, "-") and (args.output.endswith(("/", os.sep)) or os.path.isdir(args.output)):
                output = os.path.join(args.output, _artifact_file_name(args.artifact))
            if output != "-":  # before the download, which may be large (a ranking's omega.npy)
                _require_writable(output)
            data = operation.artifact(args.artifact)
            if output == "-":  # the bytes alone on stdout, for a pipe
                sys.stdout.buffer.write(data)
                print(f"wrote {len(data)} bytes to standard output", file=sys.stderr)
                return 0
            _write(output, data)
            if args.json:
                _print_json({"file": output, "size_bytes": len(data)}, args)
            else:
                print(f"wrote {output} ({len(data)} bytes)")
            return 0
        result: Any
        result, deleted_version = None, False
        if operation.state == "succeeded" and operation.kind in _RESULT_PRINTERS:
            result = operation.result(download=False)  # the printers show no ω or images
            if operation.kind == "edit_head":  # stored when the job ended; the served head may have changed since
                try:
                    stored = client.head_version(result.version.version_id)
                except NotFoundError:
                    deleted_version = True
                else:
                    result = dataclasses.replace(result, version=dataclasses.replace(result.version, active=stored.active))
        if args.json:
            value = _operation_json(operation, result)
            if deleted_version:
                value["result"]["version"].update(active=False, deleted=True)
            _print_json(value, args)
        else:
            print(_operation_line(operation))
            if operation.artifacts:
                print(f"artifacts: {', '.join(a.name for a in operation.artifacts)}")
            if operation.response_cut:
                print(f"the result is too large for one message: below are its leading items; "
                      f"`explaind operations artifact {operation.name} {operation.metadata.full_response_artifact}` has it whole")
            if operation.error is not None:  # for wait and watch the outcome, on stderr as other commands' failed jobs
                print(f"error: {operation.error}", file=sys.stderr if args.action in ("wait", "watch") else sys.stdout)
            elif deleted_version:
                print(f"head version {result.version.version_id} has been deleted since")
            elif result is not None:
                _RESULT_PRINTERS[operation.kind](result)
    # Like `kubectl wait`: a script waiting on a job learns from the exit code that it failed.
    return 1 if args.action in ("wait", "watch") and operation.state != "succeeded" else 0


# The server's operation names, "operations/<id>"; the CLI's operation commands also take the id alone.
OPERATION_NAME_PREFIX = "operations/"


def _operation_line(operation: Operation[Any]) -> str:
    """An operation as one line of `operations list` (and get, wait, watch): name, kind,
    state, progress and its message, created, owner."""
    progress, owner = operation.progress, f"  by {operation.owner}" if operation.owner else ""
    cancelling = " (cancel requested)" if operation.cancel_requested and not operation.done else ""
    return (f"{operation.name:<30} {operation.kind:<22} {operation.state:<10}{cancelling} {progress.step}/{progress.total} {progress.message}  "
            f"{_local_time(operation.create_time)}{owner}")


def _operation_json(operation: Operation[Any], result: Any = None) -> dict[str, Any]:
    """An operation as JSON: its name as ``operation`` (the key every command's JSON names
    a job by) and as ``name`` (the SDK's, kept), state, progress and artifacts; its error as
    :func:`_error_json`; ``result`` (when given) as the kind's command prints it with --json."""
    error = operation.error
    value = {
        "operation": operation.name, "name": operation.name, "kind": operation.kind, "state": operation.state, "done": operation.done,
        "cancel_requested": operation.cancel_requested, "response_cut": operation.response_cut, "owner": operation.owner,
        "requested_again": operation.requested_again,
        "progress": _json_value(operation.progress), "create_time": _json_value(operation.create_time),
        "start_time": _json_value(operation.start_time), "end_time": _json_value(operation.end_time),
        "artifacts": _json_value(operation.artifacts),
        "error": _error_json(error) if error is not None else None,
    }
    if result is not None:
        value["result"] = _RESULT_JSON.get(operation.kind, _json_value)(result)
    return value


def _error_json(error: ExplaindError) -> dict[str, Any]:
    """A server's error as JSON: its gRPC code, message, the request field it names (None
    if none) and the request items it was refused for (``precondition_violations``: e.g.
    {"type": "UNUSABLE_FEATURES", "subject": "samples[3]", "description": ""} for a sample
    the model gives NaN features for, type "UNDECODABLE_IMAGE" for one whose stored image
    does not decode now; empty from a server older than them), and the limit it met:
    ``reason``, e.g. "HEAD_VERSIONS_PER_CALLER_EXCEEDED" (None where the error is no limit's,
    or from a server older than the reasons), and ``quota_violations``, e.g.
    {"subject": "caller:alice", "description": "head versions this caller holds"}, so that a
    script tells the limits apart, and a full queue from them, without parsing the message."""
    return {"code": error.code.name, "message": error.details, "field": error.field,
            "precondition_violations": [{"type": kind, "subject": subject, "description": description}
                                        for kind, subject, description in error.precondition_violations],
            "reason": error.reason,
            "quota_violations": [{"subject": subject, "description": description} for subject, description in error.quota_violations]}


# The code of a failed command's --json error that no server sent (a CommandError: a file
# that cannot be written, an option the served model cannot take): none of gRPC's, so a
# script that retries on UNAVAILABLE or reports INVALID_ARGUMENT tells this machine's from them.
CLIENT_ERROR_CODE = "CLIENT_ERROR"
# The code of the --json error of a command stopped by Ctrl-C (message "interrupted") or
# SIGTERM ("terminated"), whose notes say what became of its job.
INTERRUPTED_CODE = "INTERRUPTED"


def _failure_json(error: ExplaindError | CommandError | KeyboardInterrupt, args: argparse.Namespace) -> dict[str, Any]:
    """What a failed command prints on stdout with --json, as its one value (or, after
    ``operations watch``'s lines and ``predict --json-lines``', its last): {"error": ...} as :func:`_error_json` has it,
    code :data:`CLIENT_ERROR_CODE` for a CommandError, :data:`INTERRUPTED_CODE` for Ctrl-C
    or SIGTERM (their ``reason`` null and ``quota_violations`` empty: no limit of the
    server's), with the notes stderr prints under
    it (e.g. "that is file a.png", what a failed upload left behind), the command's
    ``option`` that set its ``field`` (``--class`` for ``class_name``; null where no option
    did) and ``option_defaulted``, whether that option was left out so that its default set
    the field (null where ``option`` is), the seconds the server
    asked to wait before retrying (``retry_delay_seconds``, null if it did not say), and the
    ``operation`` the error ended or gave up waiting for, which stderr names as the command
    started it, or that an earlier request under a reused --request-id created (its name,
    null if none), with its ``requested_again`` as :func:`_started_json` gives it (a rerun of
    a failed job under its --request-id fails again: a script tells that from a new failure)."""
    server = error if isinstance(error, ExplaindError) else None
    if server is not None:
        value = _error_json(server)
    else:
        interrupted = isinstance(error, KeyboardInterrupt)
        # A SIGTERM's that cut short a server's error names that error's field (_as_terminated).
        value = {"code": INTERRUPTED_CODE if interrupted else CLIENT_ERROR_CODE, "message": _failure_words(error), "field": getattr(error, "field", None),
                 "precondition_violations": [], "reason": None, "quota_violations": []}
    # A server error's; an interrupt's, the job its wait was on (the SDK's result(), _naming_interrupted_job).
    job: Operation[Any] | None = getattr(error, "operation", None)
    operation = None if job is None else job.name
    field = value["field"]
    return {"error": {**value, "option": _option_setting(args, field) if field else None,
                      "option_defaulted": _option_defaulted(args, field) if field else None, "notes": list(getattr(error, "__notes__", ())),
                      "retry_delay_seconds": None if server is None else server.retry_delay, "operation": operation,
                      "requested_again": None if job is None else job.requested_again}}


def _failure_words(error: BaseException) -> str:
    """What stderr's first line says of a failure: the error, "interrupted" for Ctrl-C,
    "terminated" for SIGTERM."""
    return (str(error) or "interrupted") if isinstance(error, KeyboardInterrupt) else str(error)


def _print_failure_json(error: ExplaindError | CommandError | KeyboardInterrupt, args: argparse.Namespace) -> None:
    """With --json (or predict's --json-lines, as its last line), :func:`_failure_json` on stdout, unless stdout holds an artifact's bytes,
    or the command's own value, whole (:func:`_print_json`: a SIGTERM met closing the channel
    after it made a second value, which a reader of one JSON value refuses), or it cannot be
    written itself (a reader gone, a full disk: stderr said it all). On a line
    of its own where Ctrl-C or SIGTERM cut the command's own JSON or JSON line short (a value larger
    than a slow reader's pipe holds): after it on the same line, the error did not parse."""
    json_output = getattr(args, "json", False) or getattr(args, "json_lines", False)
    if json_output and getattr(args, "output", None) != "-" and not getattr(args, "json_written", False):
        cut_short = isinstance(error, KeyboardInterrupt) and any(
            frame.f_code in (_print_json.__code__, _print_json_line.__code__) for frame, _line in traceback.walk_tb(error.__traceback__))
        try:
            print(("\n" if cut_short else "") + _json_text(_failure_json(error, args)), flush=True)
        except OSError:
            _discard_output(sys.stdout)


def _ports_below_the_ephemeral_range() -> range:
    """Loopback ports the kernel hands out to no one unasked: a port from ``bind(("", 0))``
    may be handed out again as soon as it is released (two such probes in a row gave CI's
    test server the same gRPC and metrics port), or to another process's bind of port 0
    before the server started on it binds it seconds later."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: 32768 is below the others' ranges too
        ephemeral_low = 32768
    return range(1024, ephemeral_low)


def _bindable_port(candidates: Iterable[int]) -> int | None:
    """The first of ``candidates`` that 127.0.0.1 can bind now (an iterator is consumed up to
    it), or None."""
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


def _free_port() -> int:
    """A loopback port free now for a server to bind, below the kernel's ephemeral range."""
    below = _ports_below_the_ephemeral_range()
    # Drawn, not the first free one: demos started together would probe the same port.
    # SystemRandom, not the global generator, which a caller may have seeded.
    if (port := _bindable_port(random.SystemRandom().sample(below, min(100, len(below))))) is not None:
        return port
    with socket.socket() as probe:  # none below the range (it starts at 1024), or all tried are taken
        probe.bind(("127.0.0.1", 0))
        return cast(int, probe.getsockname()[1])  # (host, port) of an AF_INET socket


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the shapes world on a loopback port and run a client session against it."""
    _require_server_platform("demo")
    token = ""
    if args.config:  # the session must send the token the config's server will ask for
        from explaind.config import ConfigError, load_config

        try:
            settings = load_config(args.config).server
            token = settings.bearer_token()
            if callers := settings.named_callers():  # as an admin where there is one: the session may change the head
                token = callers[(settings.admins or tuple(callers))[0]]
        except ConfigError as error:
            raise CommandError(str(error)) from None
        if settings.tls_cert_file:
            raise CommandError("demo serves on loopback without TLS; for a config with [server].tls_cert_file, "
                               "run `explaind serve --config ...` and the client commands with --tls")
    port = _free_port()
    data_dir = tempfile.mkdtemp(prefix="explaind-demo-")  # the report and grid it writes stay; the server's store goes
    store = Path(data_dir) / "store"
    command = [sys.executable, "-m", "explaind.client.cli", "serve", "--port", str(port), "--data-dir", str(store)]
    config = args.config or _world_config(args.scenario, Path(data_dir))
    if config:
        command += ["--config", config]
    print(f"$ {' '.join(command)}")
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with Client(f"127.0.0.1:{port}", timeout=60, token=token or None) as client:
            started = time.monotonic()
            client.wait_until_ready(timeout=300)
            print(f"\nserver ready in {time.monotonic() - started:.1f}s")
            meta = client.model_metadata()
            _print_metadata(meta)
            images, labels, attributes = _world_samples(args.scenario, "test", args.count)
            print(f"\npredictions for {args.scenario} test images (true label first):")
            names = [f"{meta.class_names[l]} ({a['background']})" for l, a in zip(labels[:12], attributes[:12], strict=True)]
            width = _names_width(names)
            for name, prediction in zip(names, client.predictions(images.first(12), top_k=3), strict=True):
                _print_prediction(name, prediction, width)
            created = client.create_sample_set(images, labels, sample_set_id="demo", display_name=f"{args.scenario} test", attributes=attributes)
            print(f"\nsample set {created.sample_set_id}: {counted(created.sample_count, 'sample')}; evaluating it as a job:")
            operation = client.evaluate_sample_set(created.sample_set_id, batch_size=32)
            _print_evaluation(operation.result(progress=True))
            grid = Path(data_dir) / "mistakes.png"
            _write(grid, operation.artifact("mistakes.png"))
            print(f"mistakes grid: {grid}")
            _explain_worst_class(client, operation.result(), created.sample_set_id, Path(data_dir), args.scenario)
    finally:
        server.terminate()
        try:
            server.wait(timeout=DEMO_SERVER_STOP_S)
        except subprocess.TimeoutExpired:  # e.g. still loading large models: it acts on SIGTERM after
            server.kill()
            server.wait()
        shutil.rmtree(store, ignore_errors=True)
    return 0


def _world_config(scenario: str, directory: Path) -> str | None:
    """A config serving the shapes-world classifier of ``scenario`` (None: the default, balanced)."""
    if scenario == "balanced":
        return None
    from explaind.config import default_config
    from explaind.world.assets import classifier_dir

    path = directory / "explaind.toml"
    text = f'[classifier]\nloader = "world"\npath = "{classifier_dir(scenario)}"\n'
    clip = default_config().clip  # the world's (its directory gives its ε); a file's [clip] must load, so only when shipped
    if (Path(clip.path) / "open_clip_config.json").is_file():
        text += f'\n[clip]\npath = "{clip.path}"\n'
    _write(path, text.encode())
    return str(path)


def _explain_worst_class(client: Client, evaluation: Evaluation, sample_set_id: str, directory: Path, scenario: str) -> None:
    """The debugging loop on the class with the lowest accuracy: rank, visualise, edit, report."""
    from .report import build_report, render_report

    worst, accuracy = evaluation.worst_class, evaluation.worst_class_accuracy
    if accuracy == 1.0:
        print("\nno mistakes to explain: every class of the set is classified correctly")
        return
    print(f"\nexplaining the mistakes of '{worst}' (accuracy {accuracy:.2f}):")
    report = build_report(client, worst, sample_set_id, steps=60, group_attribute="background", progress=True)
    _print_ranking(report.ranking)
    out = directory / f"report-{scenario}-{_safe_file_name(worst)}.html"
    _write(out, render_report(report).encode("utf-8"))
    _print_report_gaps(report)
    print(f"HTML report (ranked neurons, visualisations, suggested head edit): {out}")
    _require_whole(report)


def _require_whole(report: MistakeReport) -> None:
    """The server's error when the report's visualisations stopped part way (its page is
    written without the rest): a pipeline must not take it as done. All but its message
    stay the server's (:func:`reworded`: code, field, violations, a limit's reason, a full
    job queue's retry delay, job), not the CLI's own CLIENT_ERROR."""
    if (error := report.visualization_error) is not None:
        raise reworded(error, f"the visualisations stopped after {len(report.visualizations)} neurons: {error.details}")


def _print_report_gaps(report: MistakeReport, file: TextIO | None = None) -> None:
    """Why a report lacks its head edit or its visualisations, where it does: a warning on
    stderr where the caller's head-version limit refused the edit, which a nightly job's
    operator must act on (the command still exits 0: the page is written)."""
    if report.edit_at_head_version_limit:
        print(f"warning: no head edit evaluated: {report.no_edit_reason}", file=sys.stderr)
    elif report.no_edit_reason:
        print(f"no head edit suggested: {report.no_edit_reason}", file=file)
    if report.no_visualization_reason:
        print(f"no visualisations: {report.no_visualization_reason}", file=file)


def _argument_json(argument: str) -> str | dict[str, str]:
    """A command's argument as --json gives it without loss: the string, or where it is no
    UTF-8 (a TLS file named in Latin-1, whose bytes the string edit_command writes ``\\xff``)
    ``{"base64": its bytes}``, which ``base64.b64decode`` gives back for subprocess.run."""
    try:
        argument.encode("utf-8")
    except UnicodeEncodeError:
        return {"base64": base64.b64encode(os.fsencode(argument)).decode("ascii")}
    return argument


def _report_json(report: MistakeReport, out: str, sample_set_id: str) -> dict[str, Any]:
    """What --json prints for a written report: the page, what it holds, the head version
    its suggested edit stored (null if none), whether that version is kept (false after
    --discard-edit deleted it; null without an edit) and the ``edit-head`` command that
    stores the edit again (null without one), as shell words and as a list of arguments
    (:func:`_argument_json`); a reason is null where there is no gap."""
    edit = report.edit
    return {"file": out, "sample_set_id": sample_set_id, "class_name": report.ranking.class_name,
            "mistake_count": report.ranking.mistake_count, "ranked_neurons": len(report.ranking.neurons),
            "visualized_neurons": len(report.visualizations),
            "head_version": None if edit is None else edit.version.version_id,
            "head_version_kept": None if edit is None else report.edit_kept,
            "edit_command": report.edit_command or None,
            "edit_argv": [_argument_json(word) for word in shlex.split(report.edit_command)] if report.edit_command else None,
            "evaluated_on": report.evaluated_on or None, "no_edit_reason": report.no_edit_reason or None,
            "no_visualization_reason": report.no_visualization_reason or None}


def _require_discarded(report: MistakeReport, out: str) -> None:
    """The error of a --discard-edit whose deletion failed (its page written, saying so),
    with the server's code and details, so that a nightly job sees it and its version is not forgotten.
    Raised outside ``noting_stored_edit``, whose "(not served)" may be false here: the
    server refuses to delete the served head, so someone may have promoted it."""
    if (error := report.edit_discard_error) is not None:
        version = cast("HeadEdit", report.edit).version.version_id
        raise reworded(error, f"{out} is written, but deleting head version {version}, the suggested edit "
                              f"(--discard-edit), failed, so it stays stored: {error.details}")


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report, noting_stored_edit, render_report, shown_command

    _require_writable(args.out)
    with _client(args) as client:
        sample_set_id = args.sample_set
        if not sample_set_id:
            sets = client.sample_sets()
            if not sets:
                raise CommandError("the server has no sample set; create one (explaind sample-set create) or pass --sample-set")
            sample_set_id = sets[-1].sample_set_id
            print(f"using the newest sample set, {sample_set_id}", file=sys.stderr)
        report = build_report(
            client, _target_class(client, args), sample_set_id, max_neurons=args.neurons_visualized or None, steps=args.steps, group_attribute=args.group_attribute,
            evaluation_sample_set_id=args.evaluation_sample_set, validation_sample_set_id=args.validation_sample_set, progress=True,
            stability_resamples=args.stability, keep_edit=not args.discard_edit,
        )
    notes = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON alone
    with noting_stored_edit(report.edit, kept=report.edit_kept, command=report.edit_command, discard_error=report.edit_discard_error):
        _write(args.out, render_report(report).encode("utf-8"))
        print(f"wrote {args.out}: {counted(report.ranking.mistake_count, 'mistake')}, {counted(len(report.ranking.neurons), 'ranked neuron')}, "
              f"{len(report.visualizations)} visualised", file=notes)
        if report.edit is not None:
            print(f"suggested head edit {report.edit.version.version_id}, evaluated on {report.evaluated_on}", file=notes)
            if not report.edit_kept:
                print(f"head version {report.edit.version.version_id} is not kept (--discard-edit); to store the edit again: "
                      f"{shown_command(report.edit_command)}", file=notes)
        _print_report_gaps(report, notes)
        _require_whole(report)  # its error names the stored edit, which --json's output would not
    _require_discarded(report, args.out)
    if args.json:
        _print_json(_report_json(report, args.out, sample_set_id), args)
    return 0


def cmd_head_versions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action in ("promote", "rollback"):
            change = client.promote_head_version(args.version) if args.action == "promote" else client.rollback_head_version(args.version or "")
            if args.json:
                _print_json(change, args)
            else:
                served = change.version.version_id
                print(f"already serving {served}" if served == change.previous_version_id else f"serving {served} (was {change.previous_version_id})")
        elif args.action == "delete":
            client.delete_head_version(args.version)
            if args.json:
                _print_json({"deleted": args.version}, args)
            else:
                print(f"deleted {args.version}")
        elif args.action == "show":
            version = client.head_version(args.version)
            if args.json:
                _print_json(version, args)
            else:
                print(version.summary())
        elif args.json:
            _print_json(client.head_versions(), args)
        else:
            for v in client.head_versions():
                print(v.summary())
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to options with a real default (not None, False or "") whose
    help does not state it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "" or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _global_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # Their defaults live in build_parser's set_defaults (a command's own copy must not
    # overwrite a value given before the command), so the help states them.
    parser.add_argument("--target", help=f"server address (default: env EXPLAIND_TARGET, else {DEFAULT_TARGET})")
    parser.add_argument("--token", help="bearer token; a named caller's own where the server names callers "
                                        "(default: env EXPLAIND_TOKEN)")
    parser.add_argument("--timeout", type=_positive_seconds,
                        help=f"seconds per call (default: {DEFAULT_TIMEOUT_S:g}); waiting for a job to end (evaluate, rank, "
                             "visualize, edit-head, report, operations wait/watch) is not bounded by it: Ctrl-C or "
                             f"SIGTERM stops that (after SIGTERM the command exits within this + "
                             f"{TERMINATED_GRACE_S + TERMINATED_WORDS_S:g} s at the latest)")
    parser.add_argument("--tls", action="store_true", help="connect over TLS (implied by the three options below)")
    parser.add_argument("--ca-file", dest="ca_file", type=_path, help="PEM file of the CAs to trust (default: the system's)")
    parser.add_argument("--cert-file", dest="cert_file", type=_path, help="PEM client certificate, for a server that asks for one (with --key-file)")
    parser.add_argument("--key-file", dest="key_file", type=_path, help="PEM private key of --cert-file")
    return parser


def _json_option(parser: argparse.ArgumentParser, output: str) -> None:
    """A client command's --json: ``output`` says what it prints, the rest what a failure prints."""
    parser.add_argument("--json", action="store_true",
                        help=f'{output}; if the command fails (exit status 1), {{"error": {{"code": ..., "message": ..., ...}}}}, '
                             f'its code a gRPC status name, {CLIENT_ERROR_CODE} (a file or option refused here) or {INTERRUPTED_CODE} '
                             '(Ctrl-C, exit status 130, or SIGTERM, 143), its "option" the option that set its "field" ("option_defaulted": true where it was left at its default), a job named as "operation"')


def build_parser() -> argparse.ArgumentParser:
    parser = _global_options(_ArgumentParser(
        prog="explaind", description="Serve an image classifier and explain its mistakes.", formatter_class=_HelpFormatter,
        allow_abbrev=False,  # `--tok T serve` must be refused like `--token T serve`, not slip past the check
        epilog="The options above (--target, --token, --timeout, --tls and its files) go before or after a client command "
               "(all but serve and demo). "
               "'explaind COMMAND --help' lists a command's options.",
    ))
    parser.set_defaults(target=os.environ.get("EXPLAIND_TARGET", DEFAULT_TARGET), timeout=DEFAULT_TIMEOUT_S, tls=False,
                        ca_file=None, cert_file=None, key_file=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Client commands also take the options after their name; unset there, the top level's hold.
    after = _global_options(argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS))

    def command(name: str, help: str, *, client: bool = True) -> argparse.ArgumentParser:
        # No abbreviations here either: `serve --tok T` must not be taken as --token-file T.
        return commands.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter, allow_abbrev=False,
                                   parents=[after] if client else [])

    serve = command("serve", "run the server (the shapes world without --config)", client=False)
    serve.add_argument("--config", help="TOML config file (default: the shapes world; see README, Configuration)")
    serve.add_argument("--host", help="listen address (default: the config's [server].host, 127.0.0.1)")
    # Ports: any integer, refused beyond 65535 as the config's key is, not as an int32 ("out of range [-2147483648, ...]").
    port = functools.partial(_integer, bits=None)
    serve.add_argument("--port", type=port, help="gRPC port (default: [server].port, 50051)")
    serve.add_argument("--metrics-port", type=port, dest="metrics_port", help="Prometheus /metrics port (default: [server].metrics_port, 0 = off)")
    serve.add_argument("--health-port", type=port, dest="health_port",
                       help="plaintext gRPC health port, for probes that cannot speak TLS (default: [server].health_port, 0 = off)")
    serve.add_argument("--data-dir", dest="data_dir", help="sample sets, jobs and artifacts (default: [server].data_dir, var/explaind)")
    serve.add_argument("--backend", choices=("eager", "compile", "onnxruntime", "tensorrt"), help="inference backend (default: [runtime].backend, eager)")
    serve.add_argument("--device", help="torch device, e.g. cuda or cuda:1 (default: [runtime].device, cpu)")
    serve.add_argument("--token-file", dest="token_file",
                       help="file holding the bearer token calls must carry, e.g. a mounted secret (default: [server].token_file)")
    serve.add_argument("--callers-file", dest="callers_file",
                       help="file of named callers, one 'NAME TOKEN' a line, instead of one token (default: [server].callers_file)")
    serve.add_argument("--admin", dest="admins", action="append", metavar="NAME",
                       help="a caller of the callers file that may change any caller's objects and promote or roll back the "
                            "served head; repeat it for more, which replace [server].admins (default: [server].admins, none)")
    serve.add_argument("--tls-cert-file", dest="tls_cert_file", help="serve TLS with this PEM certificate chain (default: [server].tls_cert_file)")
    serve.add_argument("--tls-key-file", dest="tls_key_file", help="the PEM private key of --tls-cert-file (default: [server].tls_key_file)")
    serve.add_argument("--tls-client-ca-file", dest="tls_client_ca_file",
                       help="require client certificates this PEM CA signed: mutual TLS (default: [server].tls_client_ca_file)")
    serve.add_argument("--otlp-endpoint", dest="otlp_endpoint",
                       help="OTLP/gRPC collector that spans go to, http://host:4317 or https://host:4317; '' turns tracing off "
                            "(default: [tracing].otlp_endpoint, off)")
    serve.add_argument("--log-format", dest="log_format", choices=("text", "json"),
                       help="log lines on stderr: text, or one JSON object per line (default: [server].log_format, text)")
    serve.set_defaults(run=cmd_serve, stops_on_its_own_signals=True)  # explaind.signals: a graceful stop, exit 0

    predict = command("predict", "classify image files")
    predict.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    predict.add_argument("--top-k", type=_positive_int, help=f"classes per image (default {DEFAULT_PREDICT_CLASSES}, or all of a classifier with fewer)")
    predict.add_argument("--max-in-flight", type=_positive_int, default=DEFAULT_PREDICT_IN_FLIGHT,
                         help=f"requests of the server's batch size in flight at once; 1 sends the next only after "
                              f"the last answered (default: {DEFAULT_PREDICT_IN_FLIGHT})")
    predict.add_argument("--keep-going", dest="keep_going", action="store_true",
                         help="print the files the server can answer when others fail (do not decode, unusable logits): each "
                              "failed file's error on stderr (with --json, an \"error\" entry for it); exit status "
                              f"{EXIT_SOME_FAILED} if some failed and others were printed, 1 (as for any error) if every file failed "
                              "(needs a server with the predict_partial_failure capability)")
    _json_option(predict, "print JSON once every file is answered (with --keep-going the list, each failed file an \"error\" entry, "
                          "even where every file failed: exit status 1)")
    predict.add_argument("--json-lines", dest="json_lines", action="store_true",
                         help="print each file's entry of --json's list as a line of its own as soon as it is answered, in the "
                              "order given (a failed file's \"error\" entry too, with --keep-going); if the command fails, its "
                              "--json error as the last line")
    predict.set_defaults(run=cmd_predict)

    info = command("info", "what the server serves")
    _json_option(info, "print JSON (with every class name)")
    info.set_defaults(run=cmd_info)

    sample_set = command("sample-set", "create, append to, list, show, delete sample sets")
    sample_set.add_argument("action", choices=("create", "append", "list", "show", "delete"))
    sample_set.add_argument("id", nargs="?", help="sample set id (create: optional, the server picks one)")
    sample_set.add_argument("--id", dest="id_option", metavar="ID", help="same as the positional ID")
    sample_set.add_argument("--name", help="display name (create)")
    sample_set.add_argument("--world", type=_world_spec, help="scenario[:split[:count]] of the shapes world, e.g. balanced:test:200; split test "
                            "and 64 samples by default (create, append)")
    sample_set.add_argument("--folder", type=_path, help="create or append from DIR/<class name>/**/*.png|jpg... (the ImageFolder layout, subfolders included); folder names are class names")
    sample_set.add_argument("--images", nargs="*", help="image files (create, append; with --labels)")
    sample_set.add_argument("--labels", nargs="*", type=_class_ref, help="a class name or index per --images file (name:X, index:N where classes are named by digits)")
    sample_set.add_argument("--owner", metavar="NAME", help="list only the sets this named caller created")
    _json_option(sample_set, "print the set (create, append, show) or the sets (list) as JSON")
    sample_set.set_defaults(run=cmd_sample_set)

    evaluate = command("evaluate", "classify a sample set (a job with progress; Ctrl-C cancels it)")
    evaluate.add_argument("id", help="sample set id")
    evaluate.add_argument("--batch-size", type=_integer, default=0, help="images per batch; 0: the server's [jobs].evaluate_batch_size (64 unless configured)")
    evaluate.add_argument("--grid", type=_path, help="write the mistakes grid PNG here")
    evaluate.add_argument("--max-grid-images", type=_integer, default=0, help="mistakes drawn in the --grid PNG, 1..1024; 0: 64")
    evaluate.add_argument("--no-wait", action="store_true", help="print the operation name and return (then: operations wait NAME)")
    _json_option(evaluate, "print the result as JSON (every class with samples, every mistake with its label_name and "
                           "predicted_class_name, the confusion matrix)")
    evaluate.set_defaults(run=cmd_evaluate)

    rank = command("rank", "rank the neurons behind a class's mistakes in a sample set (NeuroInspect)")
    rank.add_argument("id", help="sample set id")
    rank.add_argument("--class", dest="target_class", type=_class_ref, required=True, help="the true class whose mistakes are explained: a name or index (name:X, index:N where classes are named by digits)")
    rank.add_argument("--solver", choices=("faithful", "proximal"), default="faithful", help="counterfactual solver")
    rank.add_argument("--show", type=_non_negative_int, default=RANKING_LINES, help="neurons to print; 0: all")
    rank.add_argument("--stability", type=_non_negative_int, default=DEFAULT_STABILITY_RESAMPLES, metavar="N", help=_STABILITY_HELP)
    _json_option(rank, "print the whole ranking as JSON")
    rank.set_defaults(run=cmd_rank)

    visualize = command("visualize", "optimise images of what neurons respond to (a job with progress; Ctrl-C cancels it)")
    visualize.add_argument("neurons", nargs="+", type=_neuron_pair, metavar="NEURON[:CLASS]",
                           help="a neuron, conditioned on its top classes by head weight, or on CLASS (name or index; 8:name:3 or 8:index:3 where classes are named by digits)")
    visualize.add_argument("--method", choices=("clip_illusion", "feature_visualization", "no_clip"), default="clip_illusion",
                           help="clip_illusion needs the server's CLIP")
    visualize.add_argument("--steps", type=_integer, default=0, help="optimisation steps; 0: 400")
    visualize.add_argument("--classes-per-neuron", dest="classes_per_neuron", type=_integer, default=0,
                           help="images per neuron without a CLASS, one per top class; 0: 1")
    visualize.add_argument("--seed", type=_int64, default=0, help="random seed of the start images and augmentations")
    visualize.add_argument("--gamma", type=_finite_number, help="weight of the class logit against the activation (default 0.5; not for feature_visualization)")
    visualize.add_argument("--epsilon", type=_finite_number,
                           help="clip_illusion's ε, which keeps clip_similarity + ε positive (default: the server's [clip].illusion_epsilon)")
    visualize.add_argument("--learning-rate", dest="learning_rate", type=_finite_number, help="AdamW's learning rate in (0, 10] (default 9e-3)")
    visualize.add_argument("--out-dir", dest="out_dir", type=_path, help="directory for <i>_neuron<N>_<class>.png and its _masked.png (default: .)")
    visualize.add_argument("--no-wait", action="store_true", help="print the operation name and return (then: operations wait NAME)")
    _json_option(visualize, "print the visualisations and the files written as JSON")
    visualize.set_defaults(run=cmd_visualize)

    edit_head = command("edit-head", "retrain the head so a class relies less on some neurons (a new head version)")
    edit_head.add_argument("id", help="training sample set id")
    edit_head.add_argument("--class", dest="target_class", type=_class_ref, required=True, help="class name or index (name:X, index:N where classes are named by digits)")
    edit_head.add_argument("--neurons", nargs="+", type=_integer, required=True, help="neuron indices, e.g. from explaind rank")
    edit_head.add_argument("--method", choices=("probability_ratio", "constrain"), default="probability_ratio", help="the regulariser")
    edit_head.add_argument("--validation-sample-set", dest="validation_sample_set", default="",
                           help="early-stopping set (default: every 5th sample of the training set, held out)")
    edit_head.add_argument("--evaluation-sample-set", dest="evaluation_sample_set", default="",
                           help="set for the before/after evaluation (default: the validation set)")
    edit_head.add_argument("--group-attribute", dest="group_attribute", default="",
                           help="sample attribute for per-group accuracy of the evaluated samples, e.g. background")
    edit_head.add_argument("--strength", type=_finite_number, help="λ3, the regulariser's weight in [0, 1000] (default: 0.01, or 1.0 for constrain)")
    edit_head.add_argument("--target-ratio", dest="target_ratio", type=_target_ratio, metavar="O|auto",
                           help="probability_ratio's o in (0, 1e6] (default 1), or auto: (min importance - 1) / 3 + 1")
    edit_head.add_argument("--learning-rate", dest="learning_rate", type=_finite_number, help="Adam's learning rate in (0, 10] (default 1e-3)")
    edit_head.add_argument("--max-epochs", dest="max_epochs", type=_non_negative_int, default=0, help="epochs at most, 1..1000; 0: 20")
    edit_head.add_argument("--patience", type=_non_negative_int, default=0,
                           help="epochs without a better validation score before stopping, 1..1000; 0: 5")
    edit_head.add_argument("--description", default="", help="a note kept with the version (at most 4096 characters)")
    edit_head.add_argument("--seed", type=_int64, default=0, help="random seed of the minibatch order (the same seed: the same head)")
    edit_head.add_argument("--promote", action="store_true", help="serve the new version at once")
    edit_head.add_argument("--no-wait", action="store_true", help="print the operation name and return (then: operations wait NAME)")
    _json_option(edit_head, "print the new head version and its evaluations as JSON")
    edit_head.set_defaults(run=cmd_edit_head)

    names_the_job = ", --json's error naming the first run's job as operation"
    for repeatable, first_run_made, refusal_names in (
            (sample_set, "the set the first run created or appended to, appending nothing twice", ""),  # an upload starts no job
            (evaluate, "the operation the first run started, not a second one", names_the_job),
            (rank, "the operation the first run started (a large set's ranking runs as one; a small "
                   "one is answered at once, remembering nothing), not a second one", names_the_job),
            (visualize, "the operation the first run started, not a second one", names_the_job),
            (edit_head, "the operation the first run started, not a second head version", names_the_job)):
        repeatable.add_argument("--request-id", dest="request_id", type=_request_id, metavar="UUID",
                                help=f"names this request: the command run again with it (after a timeout or a crash, say) gets "
                                     f"{first_run_made} (default: a new UUID per run); other options under it are INVALID_ARGUMENT"
                                     f"{refusal_names}")

    operations = command("operations", "list, get, wait, watch, cancel, delete jobs; fetch artifacts")
    operations.add_argument("action", choices=("list", "get", "wait", "watch", "cancel", "delete", "artifact"),
                            help="wait and watch exit 1 unless the job succeeded")
    operations.add_argument("name", nargs="?", help="operation name (operations/ID or ID); all actions but list")
    operations.add_argument("artifact", nargs="?", help="artifact name for the artifact action, as operations get lists them (an evaluation's grid: mistakes.png)")
    operations.add_argument("--kind", choices=tuple(_RESULT_PRINTERS), help="list only this kind")
    operations.add_argument("--state", choices=OPERATION_STATES, help="list only this state")
    operations.add_argument("--owner", metavar="NAME", help="list only the operations this named caller submitted")
    operations.add_argument("--limit", type=_positive_int, help=f"list at most this many, newest first (default {OPERATIONS_LISTED})")
    operations.add_argument("--json-object", dest="json_object", action="store_true",
                            help='list --json: print {"operations": [...], "truncated": true|false} instead of the bare list, '
                                 "truncated saying whether --limit (or its default) left older operations out")
    operations.add_argument("-o", "--output", type=_path, help="file for the artifact, or a directory for it under its name (default: its name, in the current directory, with what a file name cannot hold as \"-\"; - for standard output)")
    _json_option(operations, "print JSON, each operation's name as \"operation\" (and \"name\"): the operations (list; --json-object says "
                             "whether --limit cut it), the operation with its result or its \"error\" (wait and watch exit with status 1 where the job did not succeed), one per line as it changes (watch, whose failure is its last line)")
    operations.set_defaults(run=cmd_operations)

    report = command("report", "write one self-contained HTML report on a class's mistakes")
    report.add_argument("--class", dest="target_class", type=_class_ref, required=True, help="class name or index (name:X, index:N where classes are named by digits)")
    report.add_argument("--sample-set", dest="sample_set", help="sample set id (default: the newest sample set)")
    report.add_argument("--out", type=_path, default="report.html", help="HTML file to write")
    report.add_argument("--neurons", dest="neurons_visualized", type=_non_negative_int, default=0, help="ranked neurons to visualise, from the top; 0: every one")
    report.add_argument("--steps", type=_positive_int, default=100, help="visualisation steps, at most the server's limit (explaind info; 10000 on every release to date)")
    report.add_argument("--stability", type=_non_negative_int, default=DEFAULT_STABILITY_RESAMPLES, metavar="N", help=_STABILITY_HELP)
    report.add_argument("--group-attribute", dest="group_attribute", default="", help="sample attribute for per-group accuracy, e.g. background")
    report.add_argument(
        "--evaluation-sample-set", dest="evaluation_sample_set", default="",
        help="held-out set for the suggested edit's before/after table (default: the validation samples)",
    )
    report.add_argument(
        "--validation-sample-set", dest="validation_sample_set", default="",
        help="set for the suggested edit's early stopping (default: every 5th sample of --sample-set, which the edit does not train on)",
    )
    report.add_argument(
        "--discard-edit", dest="discard_edit", action="store_true",
        help="delete the suggested edit's head version once evaluated (the page keeps its before/after numbers and the edit-head "
             "command that stores it again); if the deletion fails, the page is written, says so, and the command exits 1 with the "
             "server's error, the version kept. Default: keep it (stored, not served)")
    _json_option(report, "print JSON: the file written, the mistakes, neurons ranked and visualised, the head_version the suggested edit "
                         "stored (null if none), head_version_kept (false after --discard-edit deleted it, null without an edit), "
                         "edit_command (the edit-head command that stores the edit again, null without one), edit_argv (its arguments, "
                         "one that is no UTF-8 as {\"base64\": its bytes}) and why an edit or the "
                         "visualisations are missing (null if they are not)")
    report.set_defaults(run=cmd_report)

    head_versions = command("head-versions", "list, show, promote, roll back or delete classifier head versions")
    head_versions.add_argument(
        "action", choices=("list", "show", "promote", "rollback", "delete"),
        help="show VERSION prints its line of list (whether it is served now); promote VERSION serves it; "
             "rollback serves the active version's parent (the version it was edited from), or VERSION; "
             "delete VERSION removes a version not served",
    )
    head_versions.add_argument("version", nargs="?", help="a version id from list, e.g. v1")
    _json_option(head_versions, "print the versions (list), the version (show) or the served version as JSON")
    head_versions.set_defaults(run=cmd_head_versions)

    demo = command("demo", "serve the shapes world and run a client session end to end", client=False)
    demo.add_argument("--config", type=_path, help="serve this config instead of the scenario's classifier")
    demo.add_argument("--scenario", type=_scenario, default="spurious_background", help="shapes-world scenario whose classifier is served")
    demo.add_argument("--count", type=_positive_int, default=240, help="test images in the demo's sample set")
    demo.set_defaults(run=cmd_demo)
    return parser


# gRPC's target schemes, whose "scheme:" alone is no host with an empty port.
_TARGET_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock")


def _address_problem(target: str) -> str | None:
    """Why ``target`` (host:port) has no host or no port, or None: gRPC dials a port past
    65535 modulo 65536 (127.0.0.1:99999 dialled port 34463, :-3 port 65533), perhaps
    another server's, and an empty one (``"$HOST:$PORT"`` with PORT unset) as 443; an
    empty host (``"$HOST:$PORT"`` with HOST unset) failed each call as UNAVAILABLE."""
    host, _, port = target.rpartition(":")
    if target.startswith(":") and target.count(":") == 1:  # not a bare IPv6 address such as ::1
        return f"{_quoted(target)} has no host before its ':' (e.g. localhost{target})"
    if host and not port and host not in _TARGET_SCHEMES:
        return f"{_quoted(target)} has no port after its ':'"
    if re.fullmatch(r"[-+]?\d+", port) and not 0 < int(port) < 2**16:
        return f"port {port} is out of range [1, 65535]"
    return None


def _option_guesses(unrecognized: list[str], actions: list[argparse.Action], command: str) -> str:
    """"; did you mean --top-k?" for the unrecognized options that look like a typo of one
    of ``actions``' (``--topk``, ``--gird=x``), or "" for none. One that is ``command``'s
    own came before it (``explaind --json report``), where only the options all commands
    share are read: it is told to move, not offered itself."""
    options = [flag for action in actions for flag in action.option_strings if flag.startswith("--")]
    flags = [arg.partition("=")[0] for arg in unrecognized if arg.startswith("--") and arg != "--"]  # "--" is no option's typo
    if misplaced := [flag for flag in flags if flag in options]:
        return f"; {', '.join(misplaced)} {'is an option' if len(misplaced) == 1 else 'are options'} of {command}: give {'it' if len(misplaced) == 1 else 'them'} after {command}"
    guesses = [(flag, close[0]) for flag in flags if (close := difflib.get_close_matches(flag, options, n=1))]
    if len(guesses) == 1:
        return f"; did you mean {guesses[0][1]}?"
    return "; did you mean " + ", ".join(f"{guess} for {flag}" for flag, guess in guesses) + "?" if guesses else ""


# Commands that run a server rather than call one.
_SERVER_COMMANDS = ("serve", "demo")
_CLIENT_OPTIONS = ("--target", "--token", "--timeout", "--tls", "--ca-file", "--cert-file", "--key-file")


def _give_late_positionals(args: argparse.Namespace, actions: list[argparse.Action], unrecognized: list[str]) -> list[str]:
    """Give the words argparse left unrecognized to the command's optional positionals it
    left empty, in order, and return the rest. Python's argparse before 3.12.7 (CPython
    gh-59317) fills an optional positional only beside the one before it, so the NAME of
    `operations get --json NAME`, the ID of `sample-set create --world W ID`, came back
    unrecognized there (a usage error) and parsed on later Pythons. As they read them, an
    option unknown is left out (`--wrld balanced`: "unrecognized arguments: --wrld", not
    "--wrld balanced"), and a first ``--`` is the separator: dropped, the words after it
    positional (`sample-set create --images a.png b.png -- ID` ends --images' list)."""
    empty = [action for action in actions if not action.option_strings and action.nargs == "?" and getattr(args, action.dest) is None]
    left: list[str] = []
    separated = False
    for word in unrecognized:
        if word == "--" and empty and not separated:
            separated = True
        elif empty and (separated or not word.startswith("-")):
            setattr(args, empty.pop(0).dest, word)
        else:
            left.append(word)
    return left


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command line as main() runs it: parsed, and refused (a usage error, SystemExit 2)
    where argparse alone would let a mistake through."""
    parser = build_parser()
    args, unrecognized = parser.parse_known_args(argv)  # `serve --target X` is refused below, in words
    subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    # For errors that name a request field: the option, or the positional's metavar, that set it.
    command_actions = subcommands.choices[args.command]._actions
    args.option_names = {action.dest: max(action.option_strings, key=len) for action in command_actions if action.option_strings}
    args.argument_names = {action.dest: action.metavar or action.dest for action in command_actions if not action.option_strings}
    args.options_given = _options_given(command_actions, argv)
    unrecognized = _give_late_positionals(args, command_actions, unrecognized)
    if args.command in _SERVER_COMMANDS:
        # Silently ignored, `explaind --token T serve` would start a server without auth.
        given = [flag for flag in _CLIENT_OPTIONS if any(arg == flag or arg.startswith(flag + "=") for arg in argv)]
        if given:
            # demo has no --host/--port: it picks its server's port and sends the token its --config asks for.
            served_from = ("demo serves on a free loopback port of its own, and its session sends the token of --config's "
                           "[server].token, .token_file or .callers_file" if args.command == "demo" else
                           "a server takes its address from --host/--port or [server].host/.port and its token from "
                           "[server].token or --token-file")
            parser.error(f"{args.command}: {', '.join(given)} {'are options' if len(given) > 1 else 'is an option'} of the client "
                         f"commands; {served_from}")
    # The command's own usage with its mistakes, not the list of every command.
    usage_error = subcommands.choices[args.command].error
    target_given = any(arg == "--target" or arg.startswith("--target=") for arg in argv)
    if args.command not in _SERVER_COMMANDS and not args.target.strip():  # gRPC printed its C core's errors for it
        if target_given:
            usage_error(f"argument --target: empty; give the server's host:port, or leave --target out for {DEFAULT_TARGET}")
        usage_error(f"EXPLAIND_TARGET is empty; set it to the server's host:port, or unset it for {DEFAULT_TARGET}")
    if args.command not in _SERVER_COMMANDS and (problem := _address_problem(args.target)):
        usage_error(f"{'argument --target' if target_given else 'EXPLAIND_TARGET'}: {problem}")
    if args.command not in _SERVER_COMMANDS and bool(args.cert_file) != bool(args.key_file):  # the SDK's error named its parameters
        usage_error("--cert-file and --key-file go together: a client certificate needs its private key")
    if unrecognized:
        usage_error(f"unrecognized arguments: {' '.join(unrecognized)}{_option_guesses(unrecognized, command_actions, args.command)}")
    if args.command == "predict" and args.json and args.json_lines:
        usage_error("give --json (one list, once every file is answered) or --json-lines (a line per file, as it is answered), not both")
    # Files are checked once every option is known: in `predict --topk 2 a.png` the "2" is
    # the mistyped option's value, and "no such file: 2" would hide the typo.
    images = "images" if args.command == "predict" else "--images"
    checked = [(images, _file_problem(path)) for path in getattr(args, "images", None) or []]
    checked.append(("--folder", getattr(args, "folder", None) and _directory_problem(args.folder)))
    if refused := next(((argument, problem) for argument, problem in checked if problem), None):
        usage_error(f"argument {refused[0]}: {refused[1]}")  # as argparse words a value it refuses
    if args.command == "sample-set":
        if "" in (args.id, args.id_option):  # an unset $VAR: create made a set of an id the server picked
            usage_error(f"sample-set {args.action}: the sample set id is empty"
                        + ("; leave it out for one the server picks" if args.action == "create" else ""))
        if args.id and args.id_option and args.id != args.id_option:
            usage_error(f"sample-set {args.action}: two ids, {_quoted(args.id)} and --id {_quoted(args.id_option)}; give one")
        args.id = args.id or args.id_option
        if not args.id_option:  # the positional ID set sample_set_id, or none did (create: the server picks it), not --id
            del args.option_names["id_option"]
        if args.action in ("append", "show", "delete") and not args.id:
            usage_error(f"sample-set {args.action}: give a sample set id")
        if args.action == "list" and args.id:
            usage_error("sample-set list takes no sample set id")
        sources = [flag for flag, value in (("--world", args.world), ("--folder", args.folder), ("--images", args.images)) if value]
        if len(sources) > 1:
            usage_error(f"sample-set {args.action}: give only one of --world, --folder and --images (got {' and '.join(sources)})")
        if args.action in ("list", "show", "delete") and (sources or args.labels or args.name or args.request_id):
            usage_error(f"sample-set {args.action}: --world, --folder, --images, --labels and --request-id are options of create and append, "
                        "--name of create")
        if args.action == "append" and args.name:
            usage_error("sample-set append: --name is an option of create")
        if args.action != "list" and args.owner:
            usage_error(f"sample-set {args.action}: --owner is an option of list")
        if args.action in ("create", "append"):
            if not sources:
                usage_error(f"sample-set {args.action}: give --world SPEC, --folder DIR, or --images FILE... with as many --labels CLASS...")
            if args.labels and not args.images:
                usage_error(f"sample-set {args.action}: --labels goes with --images ({sources[0]} brings its own labels)")
            if args.images and len(args.images) != len(args.labels or []):
                usage_error(f"sample-set {args.action}: {len(args.images)} --images but {len(args.labels or [])} --labels; give one label per image")
    # What a job's result fills in is not written when the command does not wait for it.
    for command, option, later in (("evaluate", "grid", "operations artifact NAME mistakes.png --output FILE"),
                                   ("visualize", "out_dir", "operations artifact NAME ARTIFACT (operations get NAME lists them)")):
        if args.command == command and args.no_wait and getattr(args, option):
            usage_error(f"{command}: --{option.replace('_', '-')} needs the result, which --no-wait does not wait for; "
                        f"drop --no-wait, or fetch the files later: explaind {later}")
    # An empty id (an unset $VAR) was taken as none given: rollback "" served the parent, report --sample-set "" the newest set.
    if args.command == "head-versions" and args.version == "":
        usage_error(f"head-versions {args.action}: the version id is empty"
                    + ("; leave it out to roll back to the served version's parent" if args.action == "rollback" else ""))
    if args.command == "report" and args.sample_set == "":
        usage_error("argument --sample-set: empty; leave it out for the newest sample set")
    if getattr(args, "owner", None) == "":  # listed every caller's, though a caller was meant
        usage_error("argument --owner: empty; leave it out to list every caller's")
    if args.command == "head-versions" and args.action in ("show", "promote", "delete") and not args.version:
        usage_error(f"head-versions {args.action}: give a version id")
    if args.command == "head-versions" and args.action == "list" and args.version:
        usage_error("head-versions list takes no version id")
    if args.command == "operations" and args.action == "list" and args.name:
        usage_error("operations list takes no operation name (filter with --kind, --state or --owner)")
    if args.command == "operations" and args.action != "list" and (args.kind or args.state or args.owner or args.limit or args.json_object):
        usage_error(f"operations {args.action}: --kind, --state, --owner, --limit and --json-object are options of list")
    if args.command == "operations" and args.json_object and not args.json:
        usage_error("operations list: --json-object shapes --json's output; add --json")
    if args.command == "operations" and args.action != "list" and not args.name:
        usage_error("operations: give an operation name")
    if args.command == "operations" and args.action == "artifact" and not args.artifact:
        usage_error("operations artifact: give an artifact name (operations get NAME lists its artifacts)")
    if args.command == "operations" and args.action != "artifact" and (args.artifact or args.output):
        extra = f"{_quoted(args.artifact)}" if args.artifact else "--output"
        usage_error(f"operations {args.action} takes one operation name, got {extra} as well (artifacts: operations artifact NAME FILE)")
    if args.command == "serve":  # an unset $VAR would silently serve without auth or TLS
        for key in ("token_file", "callers_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            if getattr(args, key) == "":
                usage_error(f"serve: {_SERVE_OVERRIDES[key][1]} needs a file name")
        if args.config == "":  # read as the directory ".": "cannot read the config file .: Is a directory"
            usage_error("serve: --config needs a file name (without --config it serves the shapes world)")
    return args


def _options_given(actions: Iterable[argparse.Action], argv: Sequence[str]) -> set[str]:
    """The dests of the options among ``actions`` that ``argv`` gives (``--flag``,
    ``--flag=value``, ``-oVALUE``), not left at their default. Read as argparse reads them:
    a word that is an option string is that option, wherever it stands, but after ``--``."""
    typed = argv[:argv.index("--")] if "--" in argv else argv
    return {action.dest for action in actions for flag in action.option_strings for arg in typed
            if arg == flag or arg.startswith(flag + "=") or (not flag.startswith("--") and arg.startswith(flag))}


# Request fields whose option is not named after them (a command has one of them at most).
_OPTION_DESTS = {"class_name": ("target_class",), "class_index": ("target_class",), "sample_set_id": ("sample_set", "id_option"),
                 "stability_resamples": ("stability",)}
# Repeated request fields that hold a positional argument's values, one item each.
_ARGUMENT_DESTS = {"pairs": "neurons"}


def _option_of_field(args: argparse.Namespace, field: str) -> str | None:
    """The command's option that set the request ``field`` an error names (``batch_size``:
    --batch-size, ``evaluation_sample_set_id``: --evaluation-sample-set), or the argument
    (``pairs[2].neuron``: the NEURON[:CLASS] at position 3), if it has one."""
    name = re.split(r"[.\[]", field, maxsplit=1)[0]
    item = re.match(rf"{re.escape(name)}\[(\d+)\]", field)
    if item and (dest := _ARGUMENT_DESTS.get(name)) in args.argument_names:
        return f"the {args.argument_names[dest]} at position {int(item[1]) + 1}"
    return _option_setting(args, field)


def _option_setting(args: argparse.Namespace, field: str) -> str | None:
    """The command's option (``--class``), not a positional argument, that set the request
    ``field`` (``class_name``), or None: the --json error's ``option``."""
    dest = _option_dest(args, field)
    return None if dest is None else args.option_names[dest]


def _option_defaulted(args: argparse.Namespace, field: str) -> bool | None:
    """Whether the option that set ``field`` was left out, so its default set it (report's
    --sample-set: the newest set), or None where no option did: the --json error's
    ``option_defaulted``."""
    dest = _option_dest(args, field)
    return None if dest is None else dest not in args.options_given


def _option_dest(args: argparse.Namespace, field: str) -> str | None:
    """The dest of the command's option that set the request ``field``, or None."""
    name = re.split(r"[.\[]", field, maxsplit=1)[0]
    return next((dest for dest in (name, name.removesuffix("_id"), *_OPTION_DESTS.get(name, ())) if dest in args.option_names), None)


def _fields_named(error: Exception) -> list[str]:
    """The request fields ``error`` names: its field violations (INVALID_ARGUMENT), else the
    one field another error is about (e.g. the set id of a NOT_FOUND)."""
    if violations := getattr(error, "field_violations", ()):
        return list(dict(violations))
    return [cast(str, getattr(error, "field"))] if getattr(error, "field", None) else []


def _error_hints(args: argparse.Namespace, error: Exception) -> list[str]:
    """The parenthesised lines stderr prints under a failed command's "error:" line: the
    option (or argument) that set each request field it names, then what to check or where
    to look it up."""
    hints = []
    for field in _fields_named(error):
        if option := _option_of_field(args, field):
            left_out = ", left out: its default" if _option_defaulted(args, field) else ""
            hints.append(f"({field} is {option} here{left_out})")
    if hint := _connection_hint(args, error) or _listing_hint(error):
        hints.append(f"({hint})")
    return hints


def _connection_hint(args: argparse.Namespace, error: Exception) -> str | None:
    """What to check when the call never reached the server, or it refused the caller, or
    it went unanswered for --timeout seconds."""
    details = str(error)
    # gRPC's "Deadline Exceeded" named no option. Not a job that ran past the server's limit, or one still running.
    if isinstance(error, DeadlineExceededError) and not isinstance(error, OperationError) and error.operation is None:
        return f"no answer within {args.timeout:g} s, the --timeout of each call: a busy server or a slow link may need more"
    if isinstance(error, UnauthenticatedError):
        if _token(args):
            return f"the server refused the token of {_token_source(args)}: was it rotated?"
        return "the server asks for a token: --token or EXPLAIND_TOKEN"
    if "Failed to create channel" in details:  # gRPC could not parse the target (UNKNOWN)
        return (f"{_quoted(args.target)} is no gRPC target: --target or EXPLAIND_TARGET is host:port, or a URI such as "
                "dns:///host:port, ipv4:10.0.0.7:50051 or unix:///run/explaind.sock")
    if not isinstance(error, UnavailableError):
        return None
    tls = args.tls or args.ca_file or args.cert_file
    if "certificate has expired" in details or "certificate is not yet valid" in details:
        return (f"the certificate of {args.target} is outside its validity period: its operator must renew it, "
                "unless this machine's clock is wrong")
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return f"the certificate of {args.target} is not signed by a CA this client trusts: --ca-file names the CA that signed it"
    if "Hostname Verification Check failed" in details:
        return f"the certificate of {args.target} does not list the host --target names: name one it lists"
    if tls and "WRONG_VERSION_NUMBER" in details:
        return f"{args.target} does not speak TLS: drop --tls (and its files) for a plaintext server"
    if tls and "Socket closed" in details:  # the server ended the handshake: it wants a client certificate it trusts
        if args.cert_file:
            return f"{args.target} refused the client certificate of --cert-file: is it signed by the CA the server trusts, and valid?"
        return f"if {args.target} asks for a client certificate (mutual TLS), --cert-file and --key-file name one its CA signed"
    if not tls and "Socket closed" in details:
        return f"if {args.target} serves TLS, add --tls (and --ca-file for a private CA)"
    if "Connection refused" in details:
        return f"is a server running at {args.target}? --target or EXPLAIND_TARGET names another"
    if "DNS resolution failed" in details or "errors resolving" in details:  # gRPC's resolvers (c-ares, native) word it so
        return f"cannot resolve the host of {args.target}: is it spelled right, and is DNS reachable? --target or EXPLAIND_TARGET names it"
    return None


# The command that lists what a NOT_FOUND about a request field could have named. (An
# unknown artifact's error lists the operation's artifacts itself.)
_LISTINGS = {"sample_set_id": "explaind sample-set list", "evaluation_sample_set_id": "explaind sample-set list",
             "validation_sample_set_id": "explaind sample-set list", "version_id": "explaind head-versions list",
             "name": "explaind operations list"}


def _listing_hint(error: Exception) -> str | None:
    """Where to look up the right id after a NOT_FOUND."""
    listing = _LISTINGS.get(getattr(error, "field", None) or "")
    return f"{listing} shows what there is" if isinstance(error, NotFoundError) and listing else None


# What a write to a full, broken or over-quota output raises.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG})


def _standard_output_failed(error: OSError) -> bool:
    """Whether ``error`` came from writing standard output: buffered output fails again
    when flushed; unbuffered output (PYTHONUNBUFFERED) failed in the write itself, as an
    error of a full or broken device that names no file (the files this command writes
    go through :func:`_write`, which names them)."""
    try:
        sys.stdout.flush()
    except OSError:
        return True
    unbuffered = getattr(sys.stdout, "write_through", False)
    return unbuffered and error.filename is None and (error.errno in _OUTPUT_ERRNOS or _reader_went_away(error))


def _reader_went_away(error: OSError) -> bool:
    """Whether ``error``, met writing standard output, says its reader closed the pipe
    (`explaind operations list | head -1`): a BrokenPipeError, or on Windows, where such a
    write fails with EINVAL instead, that."""
    return isinstance(error, BrokenPipeError) or (sys.platform == "win32" and error.errno == errno.EINVAL)


@contextlib.contextmanager
def _showing_undecodable_bytes(stream: TextIO | None) -> Iterator[None]:
    """Write to ``stream`` (stdout or stderr) with :func:`_escaping_undecodable_bytes`: a
    file name's byte that does not decode as ``\\xe9``, not as the traceback of a strict
    stdout or the ``\\udce9`` of the interpreter's stderr (an error naming a file, argparse's
    too), and a character the encoding lacks as an escape (``\\u03bb``), not a failure with
    UnicodeEncodeError: on Windows, output redirected to a file or pipe is in the locale's
    encoding (cp1252), which has no "λ" of the help or "≤" of a warning, and no letter of
    many class names. An encoding's own handler (surrogateescape in a C locale) stays, and
    the handler before is back afterwards, for a program calling main in-process."""
    if not (isinstance(stream, io.TextIOWrapper) and stream.errors in ("strict", "backslashreplace")):
        yield
        return
    before = stream.errors
    stream.reconfigure(errors=_SHOWN)
    try:
        yield
    finally:
        try:
            stream.reconfigure(errors=before)  # flushes first
        except OSError:  # what an error or --help left buffered for a reader gone or a full disk: not over main's outcome
            _discard_output(stream)
            stream.reconfigure(errors=before)


def _discard_output(stream: TextIO) -> None:
    """Point ``stream``'s (stdout's, stderr's) file descriptor at os.devnull, so that what it
    still holds, and the interpreter's final flush, go nowhere instead of failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    with _showing_undecodable_bytes(sys.stdout), _showing_undecodable_bytes(sys.stderr):
        return _run_command(sys.argv[1:] if argv is None else argv)


def _run_command(argv: list[str]) -> int:
    args = parse_arguments(argv)
    with _terminating_like_ctrl_c(args) as ran:  # until its words are out
        return _command_outcome(args, ran)


def _command_outcome(args: argparse.Namespace, ran: Callable[[], None]) -> int:
    """Run the command of ``args``, calling ``ran`` once it has ended, and say how it ended:
    its exit status, with an error's words on stderr (and JSON on stdout)."""
    try:
        try:
            code: int = args.run(args)
        finally:
            ran()
        sys.stdout.flush()  # a full disk or a closed pipe fails here, where it is handled, not at the interpreter's exit
        return code
    except (ExplaindError, CommandError) as error:
        try:
            print(f"error: {error}", file=sys.stderr)
            for line in _error_hints(args, error):
                print(f"  {line}", file=sys.stderr)
            for note in getattr(error, "__notes__", ()):  # e.g. what a failed upload left behind
                print(f"  {note}", file=sys.stderr)
        except OSError:  # its reader gone (`2>&1 | head -1`): the command failed all the same, which its status and --json say
            _discard_output(sys.stderr)
        _print_failure_json(error, args)
        return 1
    except OSError as error:
        if not (isinstance(error, BrokenPipeError) or _standard_output_failed(error)):
            raise
        _discard_output(sys.stdout)
        if _reader_went_away(error):  # stop quietly like other tools
            return 141  # 128 + SIGPIPE, what the shell reports for a command the pipe ended
        # The output failed (`explaind info > /dev/full`); files are named where they are written.
        print(f"error: cannot write standard output: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM as _Terminated
        if getattr(args, "terminated", False):  # a SIGTERM after a Ctrl-C: it stopped the command (130 read as the user's stop)
            interrupt = _as_terminated(interrupt, args)
        try:
            print(_failure_words(interrupt), file=sys.stderr)
            for note in getattr(interrupt, "__notes__", ()):  # e.g. a partly uploaded set deleted, a job cancelled or going on
                print(f"  {note}", file=sys.stderr)
        except OSError:  # its reader gone (`2>&1 | head -1`): the command was interrupted all the same, which its status says
            _discard_output(sys.stderr)
        _print_failure_json(interrupt, args)
        return 128 + signal.SIGTERM if isinstance(interrupt, _Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
