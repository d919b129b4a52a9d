"""The explaind Python SDK client."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import datetime as dt
import difflib
import functools
import itertools
import numbers
import os
import ssl
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from explaind.class_names import class_name_key
from explaind.loopback import is_loopback_host
from explaind.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    neuroinspect_pb2,
    neuroinspect_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    sample_sets_pb2,
    sample_sets_pb2_grpc,
)

from ._errors import (ExplaindError, FailedPreconditionError, InvalidArgumentError, NotFoundError, PlaintextTokenWarning, ResourceExhaustedError,
                      UnavailableError, UnimplementedError, error_from_code, error_from_status, from_rpc_error, listed_items,
                      named_operation)
from . import _neuroinspect
from ._images import image_count, iter_image_messages, open_image, pixel_count, require_files
from ._neuroinspect import ActiveHeadChange, HeadEdit, HeadVersion, NeuronRanking, NeuronVisualizations, as_scalar, class_fields, class_ref, repeated_pair
from ._operations import LAST_ATTEMPT_S, Evaluation, Operation, ProgressDisplay, RetryTally, checked_timeout, enum_number, require_seconds
from ._types import Component, ModelMetadata, Normalization, Prediction, RequestLimits, Sample, SampleSet, float32_array

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp
    from google.rpc import status_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Calls that change nothing on the server, retried while it answers UNAVAILABLE (it is
# restarting or still loading its models, a connection dropped) until the call's
# deadline, after the delay the server asked for (its RetryInfo; at least
# RETRY_MIN_BACKOFF_S) or with backoff from RETRY_MIN_BACKOFF_S doubling to at most
# RETRY_MAX_BACKOFF_S. A call that creates or changes something is retried only on the
# server's own UNAVAILABLE (its RetryInfo says it did nothing with the call): after a
# dropped connection its first attempt may have taken effect. Except those below. Every
# call is retried alike on a RESOURCE_EXHAUSTED with a RetryInfo (_waits_for_room).
READ_ONLY_METHODS = {
    "explaind.v1.InferenceService": ("Predict", "GetModelMetadata"),
    "explaind.v1.SampleSetService": ("GetSampleSet", "ListSampleSets", "ListSamples"),
    "explaind.v1.OperationsService": ("GetOperation", "ListOperations", "WaitOperation", "GetArtifact"),
    "explaind.v1.NeuroInspectService": ("ListHeadVersions", "GetHeadVersion"),
}
_READ_ONLY = {method for methods in READ_ONLY_METHODS.values() for method in methods}
# Calls an abandoned AsyncClient call cancels in flight (see _Cancellation.abandon): those
# that change nothing, the health check too (not retried as they are: wait_until_ready
# probes again itself).
_CANCELLED_WHEN_ABANDONED = _READ_ONLY | {"Check"}
# Calls that start an operation or upload samples, sent with a request_id (AIP-155: a new
# UUID per call, or per request of an upload, the same in each attempt): retried as the
# read-only ones are when the server, asked after the failed attempt, lists the method's
# capability (REQUEST_ID_CAPABILITIES, else "request_id") in
# GetModelMetadataResponse.capabilities, since it answers a repeat with the operation the
# first attempt started, or the set the first attempt created or appended to (without
# appending again). An older server ignores request_id and would start the operation
# twice, append the samples twice, or refuse the set as ALREADY_EXISTS (make a second one
# when the server names it): there they are not retried.
IDENTIFIED_METHODS = {
    "explaind.v1.InferenceService": ("EvaluateSampleSet",),
    "explaind.v1.NeuroInspectService": ("RankMistakeNeurons", "VisualizeNeurons", "EditHead"),
    "explaind.v1.SampleSetService": ("CreateSampleSet", "AppendSamples"),
}
REQUEST_ID_CAPABILITY = "request_id"
# Listed by a server whose start's answer sets OperationMetadata.requested_again (an older
# one, honouring request_id, leaves it false for a repeat too).
REQUESTED_AGAIN_CAPABILITY = "requested_again"
# Methods whose request_id a server began to honour later than the operations' ("request_id").
REQUEST_ID_CAPABILITIES = {"CreateSampleSet": "sample_set_request_id", "AppendSamples": "sample_set_request_id"}
_IDENTIFIED = {method: REQUEST_ID_CAPABILITIES.get(method, REQUEST_ID_CAPABILITY) for methods in IDENTIFIED_METHODS.values() for method in methods}
# Codes the client's own gRPC library raises when nothing answered: no connection, or
# the deadline passed first (a listener that accepts but never speaks gRPC).
_NO_ANSWER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Errors reading an upload's image files that every run of it meets alike (a file missing,
# unreadable, a folder). Another OSError (EIO of a network mount, a TimeoutError) may pass
# on a run again, or not touch another run reading the same files.
_LASTING_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
RETRY_MIN_BACKOFF_S = 0.1  # also the least pause, whatever delay a server asks for
RETRY_MAX_BACKOFF_S = 2.0
# Predict requests one predict call keeps in flight at once (its max_in_flight): the next is
# sent while the server runs the last, so the round trips overlap and the server's batcher
# can join them, yet one call's requests queue no more than a few batches ahead of others'.
DEFAULT_PREDICT_IN_FLIGHT = 4
# The channel pings the server this often, with or without a call open, and drops the
# connection (an open call fails UNAVAILABLE) when a ping goes unanswered this long: a server
# gone without closing the connection (its host down, a network partition) otherwise left a
# watch silent until its deadline, 24 hours away, and the first call after an idle spell
# waiting for its own ping, 30 s + 60 s; the pings also keep an idle connection alive through
# a NAT or load balancer that forgets flows idle for minutes. No more often than an explaind
# server lets clients ping (its CLIENT_PING_INTERVAL_MIN_MS), or it closes the connection
# (GOAWAY too_many_pings). A server of an earlier release permits no ping without a call: it
# closes an idle connection at the 4th, which the next call opens again, and gRPC doubles
# this interval for the channel each time it does.
# The wait is long enough for a ping's answer queued behind a large response on a slow link.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 60_000


# The gRPC calls of this process's clients under way, a token each: added and discarded
# without a lock, which another thread could hold at a fork and so never release in the child.
_calls_under_way: set[object] = set()
# Whether this process was forked while another thread of its parent (or of an ancestor)
# was in a call: gRPC's C core then skips its fork handlers, and its state copied here is
# not to be used (see _require_usable_grpc).
_forked_amid_calls = False


def _after_fork_in_child() -> None:
    global _forked_amid_calls
    _forked_amid_calls = _forked_amid_calls or bool(_calls_under_way)


if hasattr(os, "register_at_fork"):  # Windows has none, and no fork to track
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _under_way() -> Iterator[None]:
    """Count the block as a gRPC call under way (see _forked_amid_calls)."""
    token = object()
    _calls_under_way.add(token)
    try:
        yield
    finally:
        _calls_under_way.discard(token)


def _require_usable_grpc() -> None:
    """Refuse to use gRPC in a process forked while another thread was in a call, where
    gRPC's C core skipped its fork handlers: 13 of 60 such children hung in their calls
    past the 5 s deadline, and with a channel opened in the child 11 of 60 failed
    DEADLINE_EXCEEDED or died (2026-12-06). A process forked while no call was under way
    gets a connection of its own from gRPC, its parent's left alone."""
    if _forked_amid_calls:
        raise RuntimeError(
            "this process was forked while another thread was in a call of an explaind Client, and gRPC cannot be "
            "used in it: start worker processes before calls begin in other threads, or with multiprocessing's "
            "'spawn' or 'forkserver' start method (a Client pickles, so it can be passed to them)")


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Reconnect to a restarted server within 2 s (gRPC's backoff otherwise grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(RETRY_MAX_BACKOFF_S * 1000)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        # grpcio 1.85 waits for a keepalive ping's answer for the ping timeout, not the keepalive's.
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Ping on through a watch with no update (gRPC stops after 2 pings without data).
        ("grpc.http2.max_pings_without_data", 0),
        # Ping an idle connection too (see KEEPALIVE_TIME_MS).
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _read_pem(path: str | Path | None, name: str) -> bytes | None:
    """A PEM file's bytes (None when there is none); FileNotFoundError or ValueError naming ``name``."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file's path, got {path!r}")
    if not os.fspath(path):  # an unset variable: taken as none, it connected in plaintext
        raise ValueError(f"{name} is empty: give a PEM file's path, or None for none")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no file {path}") from None
    except OSError as error:  # a directory, no permission
        raise OSError(f"{name}: cannot read {path}: {error.strerror}") from None
    except ValueError:  # a NUL in the path
        raise ValueError(f"{name}: {path!r} is no file's path") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{name}: {path} is not a PEM file")
    return data


def _is_local_target(target: str) -> bool:
    """Whether every address of gRPC target ``target`` is on this machine: a Unix socket,
    localhost, or loopback IPs ("host:port", "[::1]:port", "dns:///localhost:port",
    "dns:localhost:port", "ipv4:127.0.0.1:port,..."); a name that may resolve elsewhere is not."""
    scheme, _, rest = target.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme == "dns" and rest.startswith("//"):
        addresses = [rest[2:].partition("/")[2]]  # dns://[authority]/host:port
    elif scheme == "dns":
        addresses = [rest]  # dns:host:port
    elif scheme in ("ipv4", "ipv6"):
        addresses = rest.split(",")
    else:
        addresses = [target]
    return all(_is_loopback_host(address) for address in addresses)


def _is_loopback_host(address: str) -> bool:
    """Whether ``address`` ("host", "host:port", "[v6]:port" or a bare v6 address) is this machine."""
    if address.startswith("["):
        host = address[1:].partition("]")[0]
    elif address.count(":") > 1:  # a bare IPv6 address, no port
        host = address
    else:
        host = address.partition(":")[0]
    return is_loopback_host(host)


def _caller_outside_package() -> int:
    """warnings.warn's ``stacklevel``, from the function calling this one, of the first
    frame outside explaind.client: the line that made a Client, itself or through an
    AsyncClient (skip_file_prefixes, which says so, is Python 3.12's)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(f"{__package__}."):
        frame, level = frame.f_back, level + 1
    return level


def _tls_credentials(root_certificates: str | Path | None, private_key: str | Path | None,
                     certificate_chain: str | Path | None) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files, checked here: gRPC takes a CA file without a
    certificate, or a key of another certificate, and then fails every connection with
    only "Failed to create security handshaker"."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (a client certificate needs both)")
    roots, key, chain = (_read_pem(path, name) for path, name in (
        (root_certificates, "root_certificates"), (private_key, "private_key"), (certificate_chain, "certificate_chain")))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if roots is not None:
        try:
            context.load_verify_locations(cafile=str(root_certificates))  # the file: bundles have non-ASCII comments
        except ssl.SSLError:
            raise ValueError(f"root_certificates: {root_certificates} holds no PEM certificate") from None
    if key is not None:
        # private_key was given (_read_pem read it), so certificate_chain was too (checked above).
        assert certificate_chain is not None
        try:
            context.load_cert_chain(certificate_chain, private_key, password=lambda: b"")  # an encrypted key fails here
        except ssl.SSLError as error:
            raise ValueError(f"private_key: {private_key} is not an unencrypted private key of the certificate in "
                             f"{certificate_chain} ({error.reason or error})") from None
    return grpc.ssl_channel_credentials(roots, key, chain)


def _is_index(value: Any) -> bool:
    """An int or numpy integer, not a bool (a float or string is never truncated to one)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_sequence(value: Any) -> bool:
    """An iterable of items, not a string or a 0-d array or tensor (which iterate over
    characters, or not at all)."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 1) != 0


def _require_count(name: str, value: Any) -> None:
    """Refuse, naming ``name``, a ``value`` that is not an integer of at least 1."""
    if not _is_index(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _as_sequence(name: str, value: Any, items: str) -> Sequence[Any]:
    """``value``, one item per image, as a sequence (an iterator's items in a list);
    refused naming ``name`` if it is none (a dict's keys, a string's characters)."""
    if isinstance(value, Mapping) or not _is_sequence(value):
        raise TypeError(f"{name} must be a sequence of {items}, one per image, got {type(value).__name__}")
    return value if hasattr(value, "__len__") and hasattr(value, "__getitem__") else list(value)


def _time(stamp: Timestamp) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.timezone.utc)


def _sample_set(message: sample_sets_pb2.SampleSet) -> SampleSet:
    return SampleSet(
        sample_set_id=message.sample_set_id,
        display_name=message.display_name,
        sample_count=message.sample_count,
        class_counts=dict(sorted(message.class_counts.items())),
        create_time=_time(message.create_time),
        update_time=_time(message.update_time),
        uploading=message.uploading,
        uid=message.uid,
        owner=message.owner,
    )


T = TypeVar("T", sample_sets_pb2.Sample, common_pb2.Image)
Run = TypeVar("Run")
Call = TypeVar("Call")  # a gRPC future or stream


def _sample_image(sample: sample_sets_pb2.Sample) -> common_pb2.Image:
    return sample.image


def _note_chunk(error: ExplaindError, start: int, total: int | None) -> None:
    """Say where a failed request of a split call began, when its error names
    ``samples[i]`` or ``images[i]`` (as its field, or as the items it lists:
    :func:`listed_items`): the server numbers them within the request, not within the
    caller's list. Also kept as ``error.request_offset`` (item ``request_offset + i`` of
    the caller's list)."""
    error.request_offset = start
    named = [error.field or "", *(field for field, _ in error.field_violations), *listed_items(error)]
    if start and any(field.startswith(("samples[", "images[")) for field in named):  # not, say, a replaced set's sample_set_uid
        of = f" of {total}" if total is not None else ""
        error.add_note(f"the failing request began at item {start}{of}: [i] there is item {start} + i here")


def _waits_for_room(error: ExplaindError) -> bool:
    """Whether ``error`` is the server refusing a call it did nothing with for want of room
    it expects soon (a RESOURCE_EXHAUSTED with a RetryInfo: a full job queue, an image
    decoder out of memory), which the same call may pass after the delay it asks for, as
    OTLP's throttling and Google's clients retry it. A limit's refusal without one (a
    caller's share, its samples or head versions, a response's size) meets it again."""
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay is not None


def _fails_for_an_image(error: ExplaindError) -> bool:
    """Whether a Predict failed whole for images of its own (``images[i]`` its field or
    among the items it lists), which a server honouring partial_failure answers each with
    its error instead: a server that ignored it."""
    return any(name.startswith("images[") for name in (error.field or "", *listed_items(error)))


def _image_error(status: status_pb2.Status, index: int, position: int) -> ExplaindError:
    """The error of image ``index`` of one request of a split partial_failure Predict,
    naming it as the caller's list does, ``images[position]`` (in its message, fields and
    precondition violations). The server names only that image in it, so its name alone
    is replaced; the bracket keeps images[1] from matching images[10]."""
    within, caller_s = f"images[{index}]", f"images[{position}]"
    return error_from_status(status, rename=lambda text: text.replace(within, caller_s))


def _classes_hint(name: str, names: Sequence[str]) -> str:
    """The class names, or for many (an ImageNet model has 1000) their count and the
    closest to ``name``."""
    if len(names) <= 20:
        return ", ".join(names)
    close = difflib.get_close_matches(name, list(dict.fromkeys(names)), n=3)
    return f"{len(names)} classes" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")


def _attribute_map(mapping: Any, index: int) -> dict[str, str]:
    """``attributes[index]`` as a sample message holds it; refused, naming its index,
    unless it maps strings to strings."""
    if not isinstance(mapping, Mapping) or not all(isinstance(item, str) for pair in mapping.items() for item in pair):
        raise TypeError(f"attributes[{index}] must map strings to strings, got {mapping!r}")
    return dict(mapping)


# The longest a call waits. gRPC holds a deadline as nanoseconds since the epoch in an
# int64, which overflows in 2262: a timeout past it (7.4e9 s in 2026) was an immediate
# DEADLINE_EXCEEDED. One this long (about 31 years) is no limit in practice.
MAX_CALL_SECONDS = 1e9

# Images per Predict request where the server states no limit (one before limits existed).
_UNLIMITED = 2**31 - 1
# What a server lists in GetModelMetadataResponse.capabilities when it honours Predict's
# partial_failure; an older one ignores the field and fails the whole request.
PARTIAL_FAILURE_CAPABILITY = "predict_partial_failure"


def _with_last(items: Iterator[Run]) -> Iterator[tuple[Run, bool]]:
    """Each item and whether it is the last, reading one item ahead."""
    current = next(items)
    for following in items:
        yield current, False
        current = following
    yield current, True


class _Cancellation:
    """Ends the requests of a pipelined call still running once it stops (a request
    failed, an image could not be read, a Ctrl-C): their gRPC calls in flight are
    cancelled and their retries' pauses cut short, each then raising
    grpc.FutureCancelledError in its thread, so that the call's threads end with it.

    :meth:`abandon` (an AsyncClient call whose await was cancelled, see
    :data:`_abandonment`) stops them more gently: no further attempt, pauses cut short,
    read-only calls in flight cancelled (a WaitOperation held the thread up to a minute,
    a WatchOperation until the job's next update), but any other attempt in flight runs
    on, as it may have taken effect. A pipeline's own (:meth:`within`) is abandoned with
    the call that runs it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Any, bool] = {}  # each call in flight: whether it is read-only
        self._cancelled = threading.Event()
        self._nested: list[_Cancellation] = []

    @classmethod
    @contextlib.contextmanager
    def within(cls, outer: _Cancellation | None) -> Iterator[_Cancellation]:
        """A new one, abandoned when ``outer`` (None: none) is while the block runs: no
        longer kept by ``outer`` after it (an AsyncClient.to_thread function making many
        split calls kept each one's until it returned)."""
        inner = cls()
        if outer is None:
            yield inner
            return
        with outer._lock:
            outer._nested.append(inner)
            abandoned = outer._cancelled.is_set()
        if abandoned:
            inner.abandon()
        try:
            yield inner
        finally:
            with outer._lock:
                outer._nested.remove(inner)

    def abandon(self) -> None:
        """No further attempt, here or in what is nested; read-only calls in flight are
        cancelled, the others run on."""
        self._stop(everything=False)

    def cancel(self) -> None:
        self._stop(everything=True)

    def _stop(self, *, everything: bool) -> None:
        """No further attempt, here or in what is nested; the calls in flight cancelled,
        all of them (``everything``) or the read-only ones."""
        with self._lock:
            self._cancelled.set()
            nested = list(self._nested)
            calls = [call for call, read_only in self._calls.items() if everything or read_only]
        for inner in nested:
            inner._stop(everything=everything)
        for call in calls:
            call.cancel()

    def require_running(self) -> None:
        """Raise grpc.FutureCancelledError once abandoned: no attempt is to start."""
        if self._cancelled.is_set():
            raise grpc.FutureCancelledError()

    def start(self, start: Callable[[], Call], *, read_only: bool) -> Call:
        """The call (a future or a stream) ``start`` makes, in flight until :meth:`release`:
        a cancel ends it, and so does an abandonment where it is ``read_only``. None is
        made once stopped."""
        with self._lock:
            self.require_running()
            call = start()
            self._calls[call] = read_only
        return call

    def release(self, call: Any) -> None:
        """``call`` is no longer in flight (it ended)."""
        with self._lock:
            self._calls.pop(call, None)

    def result(self, start: Callable[[], grpc.Future], *, read_only: bool) -> Any:
        """The response of the call ``start`` makes (see :meth:`start`), or its error."""
        call = self.start(start, read_only=read_only)
        try:
            return call.result()
        finally:
            self.release(call)

    def sleep(self, seconds: float) -> None:
        """A retry's pause, cut short by a cancel or an abandonment."""
        if self._cancelled.wait(seconds):
            raise grpc.FutureCancelledError()


# The AsyncClient call this thread runs for (set in the context it runs the Client's method
# in): once its await is cancelled, the method's calls make no further attempt (see _call).
_abandonment: contextvars.ContextVar[_Cancellation | None] = contextvars.ContextVar("explaind_abandonment", default=None)


@contextlib.contextmanager
def _despite_abandonment() -> Iterator[None]:
    """Calls made within are made although the AsyncClient call was abandoned: the cleanup
    of what it left half done (a partly uploaded set), as after a Ctrl-C."""
    token = _abandonment.set(None)
    try:
        yield
    finally:
        _abandonment.reset(token)


class Client:
    """A connection to an explaind server.

    ``target`` is its ``host:port`` (127.0.0.1:50051 by default; the CLI's
    ``EXPLAIND_TARGET`` and ``EXPLAIND_TOKEN`` are not read here). ``max_message_bytes``
    (64 MiB, the server's default) bounds each message either way; set it to the
    server's ``[server].max_message_bytes`` where that is larger.

    Every call has a deadline (``timeout`` seconds, 30 by default, unless the method is given its own;
    ``client.timeout = 5`` changes it for later calls, and a pickle carries the latest) and failures raise typed :class:`ExplaindError` subclasses with the server's message.
    With ``retry`` (the default), calls that change nothing (Predict and the Get*, List*
    and WaitOperation calls) are retried while the server is UNAVAILABLE, until their
    deadline, once the server has answered this client (an UNAVAILABLE it sent itself,
    saying it is loading its models, counts): a restart or a model load that ends before the deadline delays them instead
    of failing them, and a wrong address still fails at once. So are the calls that start
    an operation and an upload's requests, sent with a request_id, on a server that
    honours it (see IDENTIFIED_METHODS): a repeat gets the operation the first attempt
    started, or the set it created or appended to, appending nothing again. Every call is
    retried, until its deadline, on a RESOURCE_EXHAUSTED that asks to wait (its
    ``retry_delay``: a full job queue, an image decoder out of memory), after that delay:
    the server did nothing with it. Out of time, the last refusal is raised, noting the
    tries. A limit's refusal without a delay (a caller's share, say) is raised at once.
    ``retry=False`` retries nothing.

    ``token`` is the server's bearer token, or on a server with named callers
    ([server].callers_file) a caller's own: it names the caller, which owns the sets,
    operations and head versions it creates (their ``owner``). Sent without TLS to a
    host other than this machine, it warns (:class:`PlaintextTokenWarning`).

    ``tls`` connects over TLS, trusting the system's CAs or the PEM file
    ``root_certificates``; ``private_key`` and ``certificate_chain`` (PEM files) present
    a client certificate to a server that asks for one (mutual TLS). Any of the three
    implies ``tls``. A file that is missing, holds no certificate, or a key that is not
    the certificate's raises OSError or ValueError naming the argument, here rather than
    at every connection.

    A client may be used across processes. A process forked from its own (a
    ``multiprocessing`` or ``ProcessPoolExecutor`` worker on Linux, a web server's worker
    forked after loading the app) uses it over a connection of its own, unless it was
    forked while another thread was in a call: gRPC cannot be used there, and its calls
    (and a client made there) raise RuntimeError saying so. It pickles (for a ``spawn``
    or ``forkserver`` pool) as its arguments, into a new client that connects at its first
    call: the pickle then holds the token, as the arguments did, and the PEM files' paths,
    read again where it is unpickled (not their contents). A closed client pickles into a
    closed one, without either.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: bool = True,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
    ) -> None:
        # Checked here: a bad one failed every call later, as a deadline or a TypeError
        # (an empty target after gRPC's C core logged its resolver's errors to stderr).
        if not isinstance(target, str):
            raise TypeError(f"target must be the server's address (a host:port string), got {target!r}")
        if not target.strip():
            raise ValueError(f"target must be the server's address (host:port), got {target!r}")
        self.timeout = timeout  # checked by its setter
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or not 0 < max_message_bytes < 2**31:
            # gRPC's channel options are C ints: 2**31 was an OverflowError naming nothing.
            raise ValueError(f"max_message_bytes must be a positive 32-bit integer, got {max_message_bytes!r}")
        # Surrounding whitespace goes, as the server drops it from its token file: a Secret
        # ending in a line break works whether a pod mounts it or gets it as a variable.
        token = token.strip() if isinstance(token, str) else token
        # gRPC metadata carries printable ASCII only: another character failed every call
        # as INTERNAL "Invalid metadata". Never quoted: it is a secret.
        if token and not (isinstance(token, str) and all("!" <= character <= "~" for character in token)):
            raise ValueError("token must be printable ASCII without spaces or line breaks (it travels in a gRPC header)")
        self._target = target
        self._max_message_bytes = max_message_bytes
        self._limits: RequestLimits | None = None
        self._max_batch_size = 0  # the server's [batching].max_batch_size, asked with _limits; 0: unknown
        self._max_queued_images_per_caller = 0  # the server's [batching] one, asked with _limits; 0: no limit or unknown
        self._max_calls_per_caller = 0  # the server's RequestLimits one, asked with _limits; 0: no limit or unknown
        self._capabilities: tuple[str, ...] = ()  # the server's, asked with _limits
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._retry = retry
        _require_usable_grpc()
        options = _channel_options(max_message_bytes)
        if tls or any(path is not None for path in (root_certificates, private_key, certificate_chain)):
            credentials = _tls_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            if token and not _is_local_target(target):
                # At the line that made this client, itself or through an AsyncClient, which
                # no longer wraps it in catch_warnings(): that swapped every thread's filters.
                warnings.warn(PlaintextTokenWarning(
                    f"the token travels to {target} in plaintext, readable by anyone on the network path: connect with tls=True "
                    "(the CLI's --tls), or through a proxy that adds TLS"), stacklevel=_caller_outside_package())
            self._channel = grpc.insecure_channel(target, options=options)
        # What a pickle carries (see __reduce__) besides the current timeout: the arguments, checked above; the files' paths absolute.
        self._arguments: dict[str, Any] = {
            "target": target, "token": token, "max_message_bytes": max_message_bytes, "retry": retry,
            "tls": tls, **{name: None if path is None else os.path.abspath(path) for name, path in (
                ("root_certificates", root_certificates), ("private_key", private_key), ("certificate_chain", certificate_chain))}}
        # Whether the server ever answered: only then is UNAVAILABLE a server restarting,
        # worth waiting for, rather than a wrong address, worth saying at once.
        self._reached = False
        self._closed = False
        # The class its user holds, as its closed error names it: an AsyncClient's Client says "AsyncClient".
        self._shown_as = type(self).__name__
        # This client's run, sent with each start (run_id): a repeat's answer then says whether another run (another
        # client, a second CLI command under the same --request-id) asked for the operation too (requested_by_another_run).
        self._run_id = str(uuid.uuid4())
        self._stubs = {
            "inference": inference_pb2_grpc.InferenceServiceStub(self._channel),
            "sample_sets": sample_sets_pb2_grpc.SampleSetServiceStub(self._channel),
            "operations": operations_pb2_grpc.OperationsServiceStub(self._channel),
            "neuroinspect": neuroinspect_pb2_grpc.NeuroInspectServiceStub(self._channel),
            "health": health_pb2_grpc.HealthStub(self._channel),
        }

    @property
    def target(self) -> str:
        """The server's ``host:port`` this client's connection goes to. Not settable: the
        connection keeps its address, so a new one needs a new Client (set, it went on
        calling the old address, and its errors and pickles named either)."""
        return self._target

    @property
    def timeout(self) -> float:
        """The deadline of each call not given its own, seconds. Settable, checked as the
        argument is; a pickle carries the latest (it carried the constructor's)."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        require_seconds("timeout", seconds)  # a string failed at the next call as a TypeError naming nothing
        self._timeout = seconds

    def __repr__(self) -> str:
        """Which server it calls and how, never its token (it was the default
        ``<explaind.client._client.Client object at 0x...>``, naming no server in a log)."""
        return f"{type(self).__name__}({self._described_arguments()})"

    def _described_arguments(self, **more: object) -> str:
        """The target and the arguments a repr shows: the timeout, TLS, ``more`` (an
        AsyncClient's max_workers), and last closed where it is, so the two reprs read alike."""
        secure = any(self._arguments[name] for name in ("tls", "root_certificates", "private_key", "certificate_chain"))
        return ", ".join([repr(self.target), f"timeout={self.timeout}", *(["tls=True"] if secure else []),
                          *(f"{name}={value!r}" for name, value in more.items()), *(["closed=True"] if self._closed else [])])

    def __reduce__(self) -> tuple[Callable[[], Client], tuple[()], dict[str, Any]]:
        """Pickled as its arguments (see the class): unpickled, a new client that connects
        at its first call, or a closed one for a closed client (an error a worker raises
        holds its operation and so its client, which the worker's with-block closed), of
        the same run (run_id): an operation it started, waited on in a worker, is its own."""
        return functools.partial(type(self), **self._pickled_arguments()), (), self._pickled_state()

    def _pickled_arguments(self) -> dict[str, Any]:
        """The arguments a pickle carries; a closed client's without its token and TLS
        files, which nothing uses through it: unpickled, the token warned of plaintext, and
        files since gone (a rotated key) failed the unpickling of the error that held it."""
        arguments = self._arguments | {"timeout": self.timeout}
        if not self._closed:
            return arguments
        return arguments | {"token": None, "tls": False, "root_certificates": None, "private_key": None, "certificate_chain": None}

    def _pickled_state(self) -> dict[str, Any]:
        """What a pickle carries besides the arguments: whether this client is closed (the
        new one is closed too) and its run (:meth:`_restore_run` takes it)."""
        return {"closed": self._closed, "run_id": self._run_id}

    def _restore_run(self, state: dict[str, Any]) -> None:
        """Take the run of the pickled client's ``state``; a pickle from a release before
        runs keeps this client's own run."""
        self._run_id = state.get("run_id", self._run_id)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._restore_run(state)
        if state["closed"]:
            self.close()

    def close(self) -> None:
        """Close the connection; later calls raise ValueError (as a closed file's do), as
        does a call retrying meanwhile at its next attempt; one awaiting an answer ends
        as cancelled (CancelledError, explaind's)."""
        self._closed = True
        self._channel.close()

    def _require_open(self) -> None:
        if self._closed:  # gRPC's own "Cannot invoke RPC on closed channel!" named no client
            raise ValueError(f"this {self._shown_as} of {self.target} is closed (close(), or the end of its with-block); "
                             f"make a new {self._shown_as}")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # Plumbing ------------------------------------------------------------------------

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Every call's metadata: the token, and the trace context of the caller's current
        OpenTelemetry span (W3C ``traceparent``, through the caller's propagators), so a
        traced server's spans join the caller's trace. Without a current span, or without
        opentelemetry imported (a program with a span has imported it), the token alone."""
        trace = sys.modules.get("opentelemetry.trace")
        if trace is None or not trace.get_current_span().get_span_context().is_valid:
            return self._metadata
        from opentelemetry import propagate

        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return self._metadata + tuple(carrier.items())

    def _call(self, service: str, method: str, request: Any, *, timeout: float | None = None, retry_until: float | None = None,
              cancellation: _Cancellation | None = None, unanswered: list[int] | None = None, retries: RetryTally | None = None) -> Any:
        """One RPC with a deadline ``timeout`` seconds away (default: the client's); a
        read-only one is retried on UNAVAILABLE, any on a RESOURCE_EXHAUSTED asking to
        wait (see the class; that refusal is the server's answer, ``_reached``), the last attempt just
        before the deadline or ``retry_until`` (``time.monotonic()``), whichever is first.
        ``cancellation`` (a pipelined call's, from another thread) ends it early, attempt
        or pause, as grpc.FutureCancelledError; so does an abandoned AsyncClient call
        (:data:`_abandonment`), at a pause, before an attempt, or in a read-only one. ``unanswered``: given, the number of attempts
        before the answer that may have taken effect (no answer came, or one without a
        RetryInfo saying the server did nothing) is appended to it. ``retries``: a wait's or
        watch's tries across its calls, counted on here and said in the note of an error
        that ran out of time (see RetryTally); without, this call's own."""
        deadline = time.monotonic() + min(self.timeout if timeout is None else timeout, MAX_CALL_SECONDS)
        retry_end = deadline if retry_until is None else min(deadline, retry_until)
        backoff = RETRY_MIN_BACKOFF_S
        tally = RetryTally(time.monotonic()) if retries is None else retries
        maybe_taken_effect = 0
        stops = cancellation if cancellation is not None else _abandonment.get()
        while True:
            self._require_open()  # each attempt: one retrying as the client was closed met gRPC's nameless error
            if stops is not None:
                stops.require_running()
            _require_usable_grpc()
            tally.attempts += 1
            try:
                send = getattr(self._stubs[service], method)
                with _under_way():
                    if stops is None:
                        response = send(request, timeout=deadline - time.monotonic(), metadata=self._call_metadata())
                    else:
                        response = stops.result(lambda: send.future(request, timeout=deadline - time.monotonic(), metadata=self._call_metadata()),
                                                read_only=method in _CANCELLED_WHEN_ABANDONED)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                waits_for_room = _waits_for_room(error)
                tally.refusals += waits_for_room
                retryable = error.code == grpc.StatusCode.UNAVAILABLE or waits_for_room
                self._note_if_answered(error)
                wanted = backoff if error.retry_delay is None else max(error.retry_delay, RETRY_MIN_BACKOFF_S)  # 0 s would spin
                pause = min(wanted, retry_end - time.monotonic() - LAST_ATTEMPT_S)
                # A RetryInfo says the server did nothing with the call: safe to repeat whatever it is.
                repeatable = method in _READ_ONLY or error.retry_delay is not None
                maybe_taken_effect += error.retry_delay is None
                identified = not repeatable and method in _IDENTIFIED and bool(request.request_id)
                if not (self._retry and retryable and pause >= 0 and ((repeatable and self._reached) or identified)):
                    # Retried until out of time: not a last attempt that the server answered
                    # with another error (NOT_FOUND, say) just before the deadline.
                    if tally.attempts > 1 and ((retryable and pause < 0) or error.code == grpc.StatusCode.DEADLINE_EXCEEDED):
                        self._note_retries(error, tally)
                    if (name := named_operation(rpc_error)) is not None:
                        error.operation = self._operation_if_kept(name, deadline)
                    raise error from None
            else:
                self._reached = True
                if unanswered is not None:
                    unanswered.append(maybe_taken_effect)
                return response
            self._pause(pause, stops)
            backoff = min(2 * backoff, RETRY_MAX_BACKOFF_S)
            # Whether the server honours the request_id is asked after the pause, not before:
            # the server that answers is the one to get the repeat (one restarted into an
            # older release in the pause would start it again). Its answer counts as the server's.
            if identified and not (self._honours_request_id(retry_end, _IDENTIFIED[method]) and self._reached
                                   and retry_end - time.monotonic() - LAST_ATTEMPT_S >= 0):
                if retry_end - time.monotonic() - LAST_ATTEMPT_S < 0:  # out of time, not a server that would start it twice
                    self._note_retries(error, tally)
                raise error from None

    @staticmethod
    def _pause(seconds: float, cancellation: _Cancellation | None = None) -> None:
        """``time.sleep(seconds)``, cut short as grpc.FutureCancelledError by ``cancellation``
        or, without one, an abandonment of the AsyncClient call (:data:`_abandonment`): a
        retry's pause, or an operation's wait's or watch's."""
        stops = cancellation if cancellation is not None else _abandonment.get()
        if stops is None:
            time.sleep(seconds)
        else:
            stops.sleep(seconds)

    def _note_if_answered(self, error: ExplaindError) -> None:
        """Count ``error`` of a call or a stream as the server's answer (see ``_reached``)
        unless no answer came: a stream's refusal (no thread for it) reached the server as
        a call's error does."""
        if error.code not in _NO_ANSWER or error.retry_delay is not None:
            self._reached = True

    def _waits_out_unavailable(self) -> bool:
        """Whether a wait or watch that met UNAVAILABLE (its call's retries ended) asks
        again within its own timeout: with retries on, for a server this client reached
        before (a restart). One it never reached (a wrong address; an unpickled operation's
        server down at its first call) is said at once, as :meth:`_call` says it: asked
        again, each call failed at once, thousands a second until the wait's end (never,
        without a timeout)."""
        return self._retry and self._reached

    def _note_retries(self, error: ExplaindError, tally: RetryTally) -> None:
        """Say on ``error`` that the call was retried until its time ran out: without it, a
        server restarting for longer than the timeout read as one DEADLINE_EXCEEDED (or
        UNAVAILABLE), as if the SDK had tried once, and a queue full for longer as one
        refusal. ``tally``'s refusals: the attempts the server refused for want of room (see
        :func:`_waits_for_room`)."""
        attempts, refusals = tally.attempts, tally.refusals
        waited = time.monotonic() - tally.started
        why, awaited = "restarting, or loading its models", "it"
        if attempts == 1:  # a call that may have taken effect, sent again only once the server answers again
            tried = f"the call was tried once, the server at {self.target} unavailable then and for the {waited:.1f}s waited for it"
        elif refusals == attempts:
            tried = f"the call was tried {attempts} times over {waited:.1f}s, the server at {self.target} without room for it each time"
            why, awaited = "RESOURCE_EXHAUSTED with a retry delay: it did nothing with the call", "room"
        elif refusals:  # not "did nothing": an attempt that went unanswered may have done something
            times = "once" if refusals == 1 else f"{refusals} times"
            tried = (f"the call was tried {attempts} times over {waited:.1f}s, the server at {self.target} without room for it {times}, "
                     f"unavailable or out of time the other {attempts - refusals}")
            why, awaited = "each refusal a RESOURCE_EXHAUSTED with a retry delay, which it did nothing with", "room"
        else:
            when = "each time" if error.code == grpc.StatusCode.UNAVAILABLE else f"the first {attempts - 1}, the last running out of time"
            tried = f"the call was tried {attempts} times over {waited:.1f}s, the server at {self.target} unavailable {when}"
        error.add_note(f"{tried} ({why}); a larger timeout waits longer for {awaited} "
                       "(timeout= of the Client or of the call; --timeout in the CLI)")

    def _honours_request_id(self, until: float, capability: str) -> bool:
        """Whether the server honours a method's request_id (it lists ``capability``), asked
        by the time ``until`` (``time.monotonic()``): just before a call that may have taken
        effect is sent again, so that the server to get the repeat is the one asked. False
        when it cannot say."""
        try:
            response = self._call("inference", "GetModelMetadata", inference_pb2.GetModelMetadataRequest(),
                                  timeout=max(until - time.monotonic(), 1e-3))
        except ExplaindError:
            return False
        return capability in response.capabilities

    def _shares_upload_sets(self, error: BaseException, created: SampleSet, total: int, upload_id: str | uuid.UUID) -> bool | None:
        """For a failed upload with the caller's request_id: whether the server gives its
        runs one set (it honours upload request_ids), asked once, not retried. None where
        the server did not say, with a note on ``error``: the set is left as it is. Nothing
        answered (UNAVAILABLE, DEADLINE_EXCEEDED): a delete would wait out a second timeout
        (a Ctrl-C then blocked for twice the timeout). Another error (an overloaded server's
        RESOURCE_EXHAUSTED, say): a delete could pull the set from under another run, while
        a set left unfinished is the server's to delete."""
        try:
            response = self._call("inference", "GetModelMetadata", inference_pb2.GetModelMetadataRequest(), retry_until=time.monotonic())
        except ExplaindError as unanswered:
            if unanswered.code in _NO_ANSWER:
                _note_left_uploading(error, created, total, f"the server did not answer ({unanswered.code.name})",
                                     f"run the upload again under request_id {_request_id(upload_id)} to continue it")
            else:
                _note_left_uploading(error, created, total, "the server did not say whether other runs of this upload share it "
                                     f"({unanswered.code.name})", "run the upload again once it is gone")
            return None
        return "sample_set_request_id" in response.capabilities

    def _finished_by_another_run(self, error: BaseException, created: SampleSet) -> bool:
        """For an upload with the caller's request_id that failed to read its images: whether
        another run of it (which read them, before a file went, say) finished the set since,
        which is then kept (noted on ``error``), not deleted under that run's caller. False
        when the set is still uploading, or the server cannot say (the delete then decides)."""
        try:
            now = self.sample_set(created.sample_set_id)
        except ExplaindError:
            return False
        if now.uid != created.uid or now.uploading:
            return False
        error.add_note(f"sample set {created.sample_set_id!r} was kept as another run of this upload (its request_id) "
                       f"finished it, with {now.sample_count} samples")
        return True

    def _stream(self, service: str, method: str, request: Any, *, timeout: float) -> Any:
        """A read-only server stream (WatchOperation), cancelled by an abandonment of the AsyncClient call (:data:`_abandonment`)."""
        self._require_open()
        abandonment = _abandonment.get()
        _require_usable_grpc()
        with _under_way():  # from the call's start, which gRPC reads in a thread of its own, until the stream counts itself
            def start() -> Any:
                return getattr(self._stubs[service], method)(request, timeout=min(timeout, MAX_CALL_SECONDS), metadata=self._call_metadata())

            call = start() if abandonment is None else abandonment.start(start, read_only=True)
            return _ErrorMappingStream(call, self, abandonment)

    # Health and metadata -------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... for the server ("") or one service, asked within
        ``timeout`` seconds (default: the client's)."""
        response = self._call("health", "Check", _request(health_pb2.HealthCheckRequest, service=service), timeout=checked_timeout(timeout))
        return cast(str, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))  # grpc_health has no stubs: Any

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Block until health reports SERVING (models loaded), for at most ``timeout``
        seconds: each probe gets what is left of it, not the client's whole timeout.
        Raises the built-in TimeoutError (not an ExplaindError: no call failed, the server
        was not ready) naming the last probe's error."""
        require_seconds("timeout", timeout, positive=False)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.health(timeout=max(min(self.timeout, deadline - time.monotonic()), 1e-3)) == "SERVING":
                    return
            except ExplaindError as error:  # not up yet
                last = error
            time.sleep(0.1)
        raise TimeoutError(f"{self.target} was not SERVING within {timeout}s (last error: {last})")

    def model_metadata(self, *, timeout: float | None = None) -> ModelMetadata:
        """What the server serves: the classifier (class names, feature dim D, input size
        and how images are fitted to it: ``resize_size``, ``interpolation``,
        ``jpeg_reduced_decode``, ``normalization``; the serving head's ``model_version``),
        its components (CLIP, diffusion), batching and per-request limits. ``timeout``:
        seconds, retries while the server loads included (None: the client's)."""
        response = self._call("inference", "GetModelMetadata", inference_pb2.GetModelMetadataRequest(), timeout=checked_timeout(timeout))
        c = response.classifier
        return ModelMetadata(
            name=c.name,
            loader=c.loader,
            class_names=list(c.class_names),
            feature_layer=c.feature_layer,
            head=c.head,
            feature_dim=c.feature_dim,
            image_size=c.image_size,
            model_version=c.model_version,
            backend=c.backend,
            device=c.device,
            supports_features=c.supports_features,
            components={s.name: Component(s.name, s.loaded, s.source, s.detail) for s in response.components},
            max_batch_size=response.batching.max_batch_size,
            limits=RequestLimits(
                response.limits.max_message_bytes, response.limits.max_pixels_per_request, response.limits.max_images_per_request,
                response.limits.max_image_side, response.limits.max_samples_per_caller, response.limits.max_calls_per_caller,
                response.limits.max_head_versions_per_caller, response.limits.max_visualization_steps,
            ),
            resize_size=c.resize_size,
            interpolation=c.interpolation,
            supports_visualization=c.supports_visualization,
            source=c.source,
            max_queue_delay_seconds=response.batching.max_queue_delay_seconds,
            max_queue_size=response.batching.max_queue_size,
            max_queued_images_per_caller=response.batching.max_queued_images_per_caller,
            capabilities=tuple(response.capabilities),
            normalization=Normalization(tuple(c.normalization.mean), tuple(c.normalization.std)) if c.HasField("normalization") else None,
            jpeg_reduced_decode=c.jpeg_reduced_decode,
        )

    # Predict -------------------------------------------------------------------------

    def predict(self, images: Any, *, top_k: int = 0, return_features: bool = False, timeout: float | None = None,
                max_in_flight: int = DEFAULT_PREDICT_IN_FLIGHT, partial_failure: bool = False) -> list[Prediction]:
        """Every Prediction of :meth:`predictions` (the same arguments, requests and
        errors), in a list once the last request is answered: one per image, in order."""
        return list(self.predictions(images, top_k=top_k, return_features=return_features, timeout=timeout,
                                     max_in_flight=max_in_flight, partial_failure=partial_failure))

    def predictions(self, images: Any, *, top_k: int = 0, return_features: bool = False, timeout: float | None = None,
                    max_in_flight: int = DEFAULT_PREDICT_IN_FLIGHT, partial_failure: bool = False) -> Generator[Prediction, None, None]:
        """Classify images, the ``top_k`` classes each (0: the server's default, 5, or every
        class of a classifier with fewer), yielding each image's Prediction, in order, as
        soon as its request (and every one before it) is answered: a loop over 50,000 files
        sees the first within a request's time, and keeps what it saw when a later request
        fails or it is stopped. ``images``: a list or any iterable (numpy arrays, torch
        tensors, PIL images, paths, encoded bytes, each read as its request is made) or one
        (N, 3, H, W) / (N, H, W, 3) batch. Images go in consecutive requests of at most the
        server's batch size (``model_metadata().max_batch_size``, one forward pass of its
        model, so that each request's time is one batch's whatever the list's length: 800
        images of 224² in one ran past 30 s on a CPU), and within its image, pixel and
        message limits, each with ``timeout`` (seconds; the first, what asking those limits,
        kept once answered, and partial_failure's capability left of it); a head promoted in between shows
        in the predictions' ``model_version``. ``return_features``: each Prediction's
        ``features``, the image's (D,) float32 penultimate features.

        Up to ``max_in_flight`` of those requests are in flight at once (1: one at a time),
        each in a thread of the call's own, and fewer where the server limits a caller's
        calls in progress (``model_metadata().limits.max_calls_per_caller``, half of its
        [server].max_workers) or its images waiting ([batching].max_queued_images_per_caller):
        the next images are read and sent while the server runs the earlier, whose answers
        are taken in order. The first request to fail, in the list's order, raises its
        error when its turn comes (after the predictions of the requests before it) and
        cancels the others. Stopping early (a ``break``, ``close()``, the generator
        dropped, an exception in the loop) cancels the requests in flight and sends no
        more; the call's threads end before ``close()`` returns.

        The arguments, the paths' existence and partial_failure's support are checked
        here, before the first image is read or sent, and raise from this call.
        ``partial_failure``: an image the server cannot answer on its own (it does not
        decode, is not an image, is too large a side, or the model's logits for it are
        unusable) gets a Prediction whose ``error`` is the typed exception (naming it as
        ``images[i]``, i its index in ``images``), the others their classes; only a fault
        of a whole request (a full queue, the deadline, top_k, the pixel limit) still
        raises. A server that does not list the ``"predict_partial_failure"`` capability
        (an older release, which would fail the whole request for one image) is refused
        up front with UnimplementedError. The client keeps the server's capabilities,
        asking again where they lack it (a server upgraded behind the target) and where a
        request fails whole for one image, as only a server that ignores partial_failure
        answers (one downgraded behind it): UnimplementedError then too, from that error,
        and up front from then on."""
        timeout = checked_timeout(timeout)
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a positive integer (requests), got {max_in_flight!r}")
        count = image_count(images)
        require_files(images)  # predictions already yielded would be followed by the error
        asking = time.monotonic()
        if partial_failure and not self._honours_partial_failure(timeout):
            raise self._partial_failure_unsupported()
        return self._answered_predictions(images, count, top_k=top_k, return_features=return_features, timeout=timeout,
                                          max_in_flight=max_in_flight, partial_failure=partial_failure, spent=time.monotonic() - asking)

    def _answered_predictions(self, images: Any, count: int | None, *, top_k: int, return_features: bool, timeout: float | None,
                              max_in_flight: int, partial_failure: bool, spent: float) -> Generator[Prediction, None, None]:
        """The predictions of :meth:`predictions`, whose arguments it checked, as their
        requests are answered; ``spent``: the seconds its ask for the server's capabilities
        took of the first request's timeout."""
        # One image needs no limits: the usual low-latency call, in this thread.
        chunks = self._request_chunks(iter_image_messages(images), _UNLIMITED, lambda image: image, single=count == 1, batch=True,
                                     timeout=timeout, spent=lambda: spent)
        requests = ((_request(inference_pb2.PredictRequest, images=chunk, top_k=top_k, return_features=return_features,
                              partial_failure=partial_failure), len(chunk), chunk_timeout)
                    for chunk, chunk_timeout in chunks)
        offset = 0  # of the next request's first image in the caller's list
        try:
            with contextlib.closing(self._pipelined_calls("inference", "Predict", requests, count,
                                                          1 if count == 1 else max_in_flight)) as responses:
                for response in responses:
                    features = float32_array(response.features) if response.HasField("features") else None
                    for i, p in enumerate(response.predictions):
                        yield Prediction(list(p.labels), list(p.class_indices), list(p.probabilities),
                                         None if features is None else features[i], response.model_version,
                                         _image_error(p.error, i, offset + i) if p.error.code else None)
                    offset += len(response.predictions)
        except ExplaindError as error:
            if not (partial_failure and _fails_for_an_image(error)):
                raise
            try:  # the server behind the target changed since its capabilities were asked: ask again
                self._keep_limits(self.model_metadata(timeout=timeout))
            except ExplaindError:
                raise error from None
            if PARTIAL_FAILURE_CAPABILITY not in self._capabilities:
                raise self._partial_failure_unsupported() from error
            raise

    def _honours_partial_failure(self, timeout: float | None) -> bool:
        """Whether the server lists Predict's partial_failure capability: the kept answer
        if it does, else asked again (within ``timeout``), so a server upgraded behind the
        target is not refused for the client's life; one without it costs a
        GetModelMetadata per refused call."""
        kept = self._limits is not None
        if PARTIAL_FAILURE_CAPABILITY not in self._server_capabilities(timeout) and kept:
            self._keep_limits(self.model_metadata(timeout=timeout))
        return PARTIAL_FAILURE_CAPABILITY in self._capabilities

    def _partial_failure_unsupported(self) -> UnimplementedError:
        return UnimplementedError(f"the server at {self.target} does not honour partial_failure (it lacks the "
                                  f"{PARTIAL_FAILURE_CAPABILITY!r} capability: an older release, which fails the whole request for one "
                                  "image); upgrade it, or predict without partial_failure")

    def _pipelined_calls(self, service: str, method: str, requests: Iterator[tuple[Any, int, float | None]], total: int | None,
                         max_in_flight: int) -> Generator[Any, None, None]:
        """The answers, in order, to the requests of a split call (each with its count of
        items and its timeout, as :meth:`_request_chunks` gives them), up to ``max_in_flight`` of them in flight at once in threads of the call's
        own, and no more than the server's max_calls_per_caller (one more would be refused)
        nor more items than its max_queued_images_per_caller unless one request alone
        (both known once ``requests``, made by :meth:`_request_chunks`, has read the
        server's limits). Each is a :meth:`_call_at` in the caller's context (its trace span). The
        first failure in the requests' order is raised, an error making a request (reading
        its images) once the requests before it have answered, as one at a time; on a
        failure or a close, the calls still in flight are cancelled and the threads end
        before this does, but where the garbage collector closes it in one of them (the
        generator of :meth:`predictions` left in a reference cycle), which cannot wait for
        itself: they end after."""
        offset = 0
        if max_in_flight == 1:  # no thread to start or hand over to
            for request, items, timeout in requests:
                yield self._call_at(offset, total, service, method, request, timeout=timeout)
                offset += items
            return
        in_flight: collections.deque[tuple[Future[Any], int]] = collections.deque()
        unread: Exception | None = None
        own_threads: set[int] = set()
        executor = ThreadPoolExecutor(max_in_flight, thread_name_prefix=f"explaind-{method}",
                                      initializer=lambda: own_threads.add(threading.get_ident()))
        with _Cancellation.within(_abandonment.get()) as cancellation:
            try:
                while True:
                    try:
                        request, items, timeout = next(requests)
                    except StopIteration:
                        break
                    except Exception as error:  # an image unread: the requests before answer or fail first
                        unread = error
                        break
                    while in_flight and (len(in_flight) == max_in_flight or 0 < self._max_calls_per_caller <= len(in_flight)
                                         or 0 < self._max_queued_images_per_caller < items + sum(waiting for _, waiting in in_flight)):
                        yield in_flight.popleft()[0].result()
                    call = executor.submit(contextvars.copy_context().run, self._call_at, offset, total, service, method, request,
                                           timeout=timeout, cancellation=cancellation)
                    in_flight.append((call, items))
                    offset += items
                while in_flight:
                    yield in_flight.popleft()[0].result()
                if unread is not None:
                    raise unread
            finally:
                cancellation.cancel()  # after a failure: the others' calls end now, and the executor's wait with them
                executor.shutdown(wait=threading.get_ident() not in own_threads)

    # Sample sets ---------------------------------------------------------------------

    def _label_indices(self) -> tuple[Callable[[Any, int], int], Callable[[], float]]:
        """A function giving the class index of ``labels[i]`` (a class name or index, or a
        0-d array or tensor), given the label and i; names are resolved with the served
        model's class names, asked once, at the first name, and the server's limits kept
        from that answer (labels checked before the upload: its requests are sized to them,
        not asked again). And one giving the seconds that ask took (0 before it), which count
        against the upload's first request as the ask for the limits would; checking the
        labels does not."""
        names: list[str] = []
        indices: dict[str, int] = {}
        asked_s = 0.0

        def index_of(given: Any, i: int) -> int:
            nonlocal asked_s
            label = class_ref(given, f"labels[{i}]")
            if not isinstance(label, str):
                return label
            if not names:
                asking = time.monotonic()
                metadata = self.model_metadata()
                asked_s = time.monotonic() - asking
                self._keep_limits(metadata)
                names.extend(metadata.class_names)
                indices.update({class_name_key(name): index for index, name in reversed(list(enumerate(names)))})  # the first of a repeated name, as list.index
            if (key := class_name_key(label)) not in indices:
                raise ValueError(f"labels[{i}]: {label!r} is not a class of the served model ({_classes_hint(label, names)})")
            return indices[key]

        return index_of, lambda: asked_s

    def _samples(self, images: Any, labels: Sequence[int | str],
                 attributes: Sequence[Mapping[str, str]] | None) -> tuple[Iterator[sample_sets_pb2.Sample], int, Callable[[], float]]:
        """The samples, made one at a time as they are sent (the images of a large set are
        never all in memory), how many there are (one per label), and a function giving the
        seconds asking the class names of the labels took so far (with the limits: of the first
        request's timeout, see :meth:`_request_chunks`; labels read as they are sent ask while
        the first request is made). Labels and attribute maps in a list, tuple,
        array or tensor are checked before any call; those of another sequence (one
        computed as it is read, which may be too long to read ahead) as their sample is
        made, as an iterable's images are read."""
        labels = _as_sequence("labels", labels, "class names or indices")
        attributes = None if attributes is None else _as_sequence("attributes", attributes, "{name: value} maps")
        count = image_count(images)
        if count is not None and count != len(labels):
            raise ValueError(f"got {count} images but {len(labels)} labels")
        if attributes is not None and len(attributes) != len(labels):
            raise ValueError(f"got {len(labels)} images but {len(attributes)} attribute maps")
        index_of, asked_s = self._label_indices()
        if isinstance(labels, (list, tuple)) or hasattr(labels, "tolist"):  # in memory: all checked now
            labels = [index_of(label, i) for i, label in enumerate(labels.tolist() if hasattr(labels, "tolist") else labels)]
        if isinstance(attributes, (list, tuple)):
            attributes = [_attribute_map(mapping, i) for i, mapping in enumerate(attributes)]
        require_files(images)

        def samples() -> Iterator[sample_sets_pb2.Sample]:
            mismatch = f"the images are not as many as the {len(labels)} labels"  # found once an iterable runs out or over
            made = 0
            for image in iter_image_messages(images):
                if made == len(labels):
                    raise ValueError(mismatch)
                yield sample_sets_pb2.Sample(image=image, label=index_of(labels[made], made),
                                             attributes=_attribute_map(attributes[made], made) if attributes is not None else {})
                made += 1
            if made != len(labels):
                raise ValueError(mismatch)

        return samples(), len(labels), asked_s

    def create_sample_set(
        self,
        images: Any,
        labels: Sequence[int | str],
        *,
        sample_set_id: str = "",
        display_name: str = "",
        attributes: Sequence[Mapping[str, str]] | None = None,
        chunk_size: int = 512,
        progress: bool = False,
        request_id: str | uuid.UUID | None = None,
    ) -> SampleSet:
        """Store labelled images as a named set. ``labels``: one class index or class name
        per image; ``attributes``: optional ``{name: value}`` per image, e.g. for per-group
        accuracy in ``edit_head``. In a list, tuple, array or tensor they are checked before
        any call; in another sequence (one computed as it is read, as a dataset's, which may
        be too long to read ahead) each as its sample is sent.

        Uploaded in requests of at most ``chunk_size`` images and the server's images per
        request, half the smaller of the client's and the server's message limits, and the
        server's decoded-pixel limit (``model_metadata``'s, kept once answered; labels given as
        class names ask them again, with the names, within the first request's time). All or nothing:
        until its last request the set is marked uploading, which jobs refuse and a server
        restart deletes; if a later request fails (or is interrupted), the partly uploaded
        set is deleted before the error is raised (but see ``request_id``). Each request
        carries its own request_id, so on a server that lists ``"sample_set_request_id"``
        in ``model_metadata().capabilities`` one whose answer a dropped connection lost is
        sent again (the server applies it once); an older server's upload fails instead.
        ``request_id`` (a UUID) names the upload, so that the same upload run again (by a
        pipeline that restarted, with the same images, ``chunk_size`` and server) gets
        the set the first created, and appends nothing twice: its requests' ids are drawn
        from it (None: new ones). Runs of it at once (a pipeline retried while it still
        ran) share one set, each image stored once, and all return it. So a run that fails
        for a reason that says nothing of the images (an interrupt, a lost connection, a
        deadline, a transient I/O error) leaves the set, uploading, to the others or to a
        run again, which continues it; unfinished, the server deletes it at its next start
        or after ``[server].upload_idle_timeout_s`` without a request. A failure every run
        meets alike (an image the server refuses, a file missing or unreadable, fewer
        images than labels, a computed label that is no class, the caller's sets at the server's samples limit) deletes it (unless another run finished it meanwhile), so the
        upload run again fixed, under any request_id, creates it anew. ``progress=True``
        shows samples sent as a tqdm bar, or plain lines when stderr is not a terminal."""
        samples, total, spent = self._samples(images, labels, attributes)
        with ProgressDisplay(sample_set_id or "upload", unit="sample") if progress else _NO_DISPLAY as display:
            return self._create_sample_set(samples, total, sample_set_id, display_name, chunk_size, display, request_id, spent)

    def _create_sample_set(self, samples: Iterator[sample_sets_pb2.Sample], total: int, sample_set_id: str, display_name: str,
                           chunk_size: int, display: ProgressDisplay | None, upload_id: str | uuid.UUID | None,
                           spent: Callable[[], float]) -> SampleSet:
        """:meth:`create_sample_set`'s upload of the samples :meth:`_samples` made; ``spent()``:
        the seconds its ask for the class names took (see :meth:`_request_chunks`)."""
        request_ids = _upload_request_ids(upload_id)  # checked before any image is read
        chunks = _with_last(self._request_chunks(samples, chunk_size, _sample_image, spent=spent))  # one chunk read ahead: is it the last?
        (first, first_timeout), last = next(chunks)
        request = _request(sample_sets_pb2.CreateSampleSetRequest, sample_set_id=sample_set_id, display_name=display_name, samples=first,
                           upload_continues=not last, request_id=next(request_ids))
        try:
            created = _sample_set(self._call("sample_sets", "CreateSampleSet", request, timeout=first_timeout).sample_set)
        except BaseException as error:
            # A Ctrl-C as the answer came, or an answer lost: the set may have been created.
            if request.upload_continues and (not isinstance(error, ExplaindError) or error.code in _NO_ANSWER):
                error.add_note("if the server created the set before this, it stays uploading: jobs refuse it, and the server deletes "
                               "it at its next start or after [server].upload_idle_timeout_s without a request (or delete the set)")
            _note_upload_id_reused(error, upload_id, "create_sample_set", 0)
            raise
        # Finished at once although more follows: an earlier run of this upload (the
        # caller's request_id) finished the set, so this run's failure must not delete it.
        finished_before = upload_id is not None and request.upload_continues and not created.uploading
        sent, requests = len(first), 1
        _show_upload(display, sent, total, last)
        unreadable = False  # the images failed to be read as they would for every run, not anything else in this process
        try:
            while True:
                try:  # reading the next chunk's images may fail here too
                    (chunk, chunk_timeout), last = next(chunks)
                except StopIteration:
                    break
                except Exception as error:
                    # Reading may ask the server (a label's name, its limits): its error, or the
                    # abandonment of an AsyncClient call, says nothing of the images.
                    unreadable = (not isinstance(error, (OSError, ExplaindError, grpc.FutureCancelledError))
                                  or isinstance(error, _LASTING_READ_ERRORS))
                    raise
                # The uid: the set this upload created, never another made under its id meanwhile.
                append = _request(sample_sets_pb2.AppendSamplesRequest, sample_set_id=created.sample_set_id, samples=chunk, finish_upload=last,
                                  sample_set_uid=created.uid, request_id=next(request_ids))
                created = _sample_set(self._call_at(sent, total, "sample_sets", "AppendSamples", append, timeout=chunk_timeout).sample_set)
                sent, requests = sent + len(chunk), requests + 1
                _show_upload(display, sent, total, last)
        except BaseException as error:
            _note_upload_id_reused(error, upload_id, "create_sample_set", requests)
            with _despite_abandonment():  # an abandoned upload's part is deleted too: left uploading, the upload run again met ALREADY_EXISTS
                self._settle_failed_upload(error, created, total, upload_id, finished_before=finished_before, unreadable=unreadable)
            raise
        return created

    def _settle_failed_upload(self, error: BaseException, created: SampleSet, total: int, upload_id: str | uuid.UUID | None, *,
                              finished_before: bool, unreadable: bool) -> None:
        """Delete or keep the set of an upload that failed after its create, and say which
        on ``error``. ``finished_before``: an earlier run of the upload (the caller's
        request_id) had finished the set; ``unreadable``: the images failed to be read as
        they would for every run (a file missing or unreadable, fewer images than labels;
        not a transient I/O error).

        Runs of one upload (the caller's request_id) share its set: another (a pipeline
        retried while this run went on) may be filling it, or have finished it. So a failure
        that says nothing of the images (an interrupt, a lost connection, a deadline, a
        pipeline's alarm) keeps the set for that run, or for one run again, which continues
        it. A failure every run meets alike, as each sends the same images under the same ids
        (the server refusing a request's images or labels, or the caller's sets at its
        [server].max_samples_per_caller; this process failing to read them), deletes it, as without request_id, so the upload run again fixed (under any
        request_id) creates it anew instead of meeting ALREADY_EXISTS; unless another run
        finished it meanwhile. A request_id refusal says the set is another run's: kept. An
        older server, which ignores request_id, gives each run its own set: deleted."""
        if finished_before:
            error.add_note(f"sample set {created.sample_set_id!r} was kept as an earlier run of this upload (its request_id) "
                           f"finished it, with {created.sample_count} samples")
            return
        # Another run of this upload deletes the set it shares on a failure of the images:
        # "not by this upload" would be false then.
        deleted_meanwhile = (f"the partly uploaded sample set {created.sample_set_id!r} was deleted meanwhile, "
                             + ("not by this run (by another client, by another run of this upload under the same request_id, "
                                "which deletes it when it cannot read the images or the server refuses one, " if upload_id is not None
                                else "not by this upload (by another client, ")
                             + "or by a server restart, which deletes sets left uploading)")
        if isinstance(error, NotFoundError) or (isinstance(error, FailedPreconditionError) and error.field == "sample_set_uid"):
            error.add_note(deleted_meanwhile)  # the set is not there to keep (nor to delete)
            return
        if upload_id is not None:
            if unreadable and self._finished_by_another_run(error, created):
                return
            # The server refusing the images, or the caller's sets at [server].max_samples_per_caller
            # (field samples): every run is refused there, and the part kept would count against it.
            refused = ((isinstance(error, InvalidArgumentError) and error.field != "request_id")
                       or (isinstance(error, ResourceExhaustedError) and error.field == "samples"))
            if not (refused or unreadable):
                shared = self._shares_upload_sets(error, created, total, upload_id)
                if shared is None:  # the server did not say: the set is left as it is (noted)
                    return
                if shared:
                    error.add_note(f"sample set {created.sample_set_id!r} was kept, not deleted: a run of this upload under the same "
                                   f"request_id {_request_id(upload_id)} (another running now, or this one run again) continues it; "
                                   "left unfinished, it stays uploading until the server deletes it (at its next start or after "
                                   "[server].upload_idle_timeout_s without a request), or delete the set")
                    return
        try:
            self.delete_sample_set(created.sample_set_id, uid=created.uid)
        except (NotFoundError, FailedPreconditionError):  # not there, or its id names another client's set now
            error.add_note(deleted_meanwhile)
        except ExplaindError as undeleted:  # a server gone (killed, restarting) answers no delete either
            _note_left_uploading(error, created, total, f"its delete failed ({undeleted.code.name})", "run the upload again once it is gone")
        else:
            error.add_note(f"the partly uploaded sample set {created.sample_set_id!r} was deleted")

    def append_samples(
        self, sample_set_id: str, images: Any, labels: Sequence[int | str], *, attributes: Sequence[Mapping[str, str]] | None = None,
        chunk_size: int = 512, progress: bool = False, request_id: str | uuid.UUID | None = None, uid: str = "",
    ) -> SampleSet:
        """Add labelled images to an existing set, as in :meth:`create_sample_set` and in
        the same chunks (with the same ``progress`` and ``request_id``, and retried as they
        are); a request that fails raises with a note of how many samples were appended
        before it. Returns the updated set. With ``uid`` (a SampleSet's), only to that set:
        FailedPreconditionError if the id now names another (deleted and created again
        since); without, the first request's set, whichever that is, gets every chunk."""
        samples, total, spent = self._samples(images, labels, attributes)
        request_ids = _upload_request_ids(request_id)
        appended, requests, sending = 0, 0, 0
        try:
            with ProgressDisplay(sample_set_id, unit="sample") if progress else _NO_DISPLAY as display:
                for chunk, chunk_timeout in self._request_chunks(samples, chunk_size, _sample_image, spent=spent):
                    # After the first request, the set it appended to: not one made under its id since.
                    request = _request(sample_sets_pb2.AppendSamplesRequest, sample_set_id=sample_set_id, samples=chunk, sample_set_uid=uid,
                                       request_id=next(request_ids))
                    sending = len(chunk)
                    updated = _sample_set(self._call_at(appended, total, "sample_sets", "AppendSamples", request, timeout=chunk_timeout).sample_set)
                    appended, uid, requests, sending = appended + len(chunk), updated.uid, requests + 1, 0
                    _show_upload(display, appended, total, appended == total)
        except BaseException as error:
            _note_upload_id_reused(error, request_id, "append_samples", requests)
            # A request that got no answer (a server killed or restarting, a deadline, a Ctrl-C) may have been applied.
            unanswered = sending if not isinstance(error, ExplaindError) or error.code in _NO_ANSWER else 0
            _note_appended(error, sample_set_id, appended, unanswered, total, request_id)
            raise
        return updated

    def _request_chunks(self, items: Iterable[T], max_count: int, image_of: Callable[[T], common_pb2.Image], *,
                        single: bool = False, batch: bool = False, timeout: float | None = None,
                        spent: Callable[[], float] = lambda: 0.0) -> Iterator[tuple[list[T], float | None]]:
        """Consecutive runs of at most ``max_count`` items (samples or images) and the server's
        images per request, each with its request's timeout, whose request stays under half
        the smaller of the client's and the server's message limits (raw 224² arrays are 150
        kB each: 512 of them would not fit 64 MiB) and under the server's decoded-pixel limit (512 JPEG photos of 12 MP
        exceed its 128 Mi). An item over either goes alone, for the server to refuse by
        name. Items are taken as the runs are sent, so only one run is in memory; no items
        give one empty run.
        ``single``: there is one item, sent as it is (the common one-image predict skips
        the reads of the server's limits). ``batch``: runs of at most the server's
        [batching].max_batch_size too (a Predict's). ``timeout``: each request's (None: the
        client's), the first's shared with the asks of the server before it, for the limits
        and the ``spent()`` seconds of any other (its capabilities, an upload's class names,
        read when the first run is made): that request gets what the asks left of it, as a server still loading that
        answered an ask just in time would otherwise make the call take twice its timeout."""
        _require_count("chunk_size", max_count)
        if single:
            yield list(items), self._left_of_timeout(timeout, spent())
            return
        asking = time.monotonic()
        limits = self._request_limits(timeout)
        limits_s = time.monotonic() - asking
        first = True
        max_count = min(max_count, limits.max_images_per_request or max_count)  # 0 from an old server: no limit known
        if batch:
            max_count = min(max_count, self._max_batch_size or max_count)
        byte_budget = min(self._max_message_bytes, limits.max_message_bytes or self._max_message_bytes) // 2
        pixel_budget = limits.max_pixels_per_request or float("inf")
        chunk: list[T] = []
        size = pixels = 0
        for item in items:
            item_bytes, item_pixels = item.ByteSize() + 8, pixel_count(image_of(item))  # + field tag and length prefix
            if chunk and (len(chunk) == max_count or size + item_bytes > byte_budget or pixels + item_pixels > pixel_budget):
                yield chunk, self._left_of_timeout(timeout, limits_s + spent()) if first else timeout
                chunk, size, pixels, first = [], 0, 0, False
            chunk.append(item)
            size, pixels = size + item_bytes, pixels + item_pixels
        yield chunk, self._left_of_timeout(timeout, limits_s + spent()) if first else timeout

    def _left_of_timeout(self, timeout: float | None, spent: float) -> float:
        """What ``spent`` seconds left of ``timeout`` (None: the client's): at least 1 ms,
        for a request to be sent at all, unless the timeout itself is less."""
        whole = self.timeout if timeout is None else timeout
        return max(whole - spent, min(whole, 1e-3))

    def _call_at(self, offset: int, total: int | None, service: str, method: str, request: Any, **kwargs: Any) -> Any:
        """One request of a split call (items ``offset`` on of ``total``): its failure says
        where the request began in the caller's list (see :func:`_note_chunk`)."""
        try:
            return self._call(service, method, request, **kwargs)
        except ExplaindError as error:  # the server's, whose samples[i] count within the request; not a Ctrl-C
            _note_chunk(error, offset, total)
            raise

    def _request_limits(self, timeout: float | None = None) -> RequestLimits:
        """The server's limits, asked with its batch size (within ``timeout``, None: the
        client's) until an ask is answered, then kept; all 0 (unknown) when metadata is
        unavailable and the ask was not retried. One retried has waited out ``timeout`` for the server
        already: its error is raised, as the call would wait as long again, noted as the
        ask's (its retries' note says "the call was tried N times": an upload, never sent
        twice without a request_id, read as sent N times)."""
        if self._limits is None:
            try:
                self._keep_limits(self.model_metadata(timeout=timeout))
            except UnavailableError as error:
                if self._waits_out_unavailable():
                    error.add_note("this came asking the server's limits (GetModelMetadata) before the call's first request: "
                                   "no request of the call was sent")
                    raise
                return RequestLimits(0, 0, 0, 0)
        return cast(RequestLimits, self._limits)

    def _server_capabilities(self, timeout: float | None) -> tuple[str, ...]:
        """The server's capabilities, asked with its limits where none are kept, waiting out
        its loading as a call of ``timeout`` would (None: the client's)."""
        if self._limits is None:
            self._keep_limits(self.model_metadata(timeout=timeout))
        return self._capabilities

    def _keep_limits(self, metadata: ModelMetadata) -> None:
        """``_limits`` set last: a call in another thread (an AsyncClient's run in threads)
        that finds it set reads the rest, not a server without capabilities or batch size."""
        self._max_batch_size = metadata.max_batch_size
        self._max_queued_images_per_caller = metadata.max_queued_images_per_caller
        self._max_calls_per_caller = metadata.limits.max_calls_per_caller
        self._capabilities = metadata.capabilities
        self._limits = metadata.limits

    def sample_set(self, sample_set_id: str) -> SampleSet:
        """One set's summary (sample and per-class counts, times); NotFoundError if unknown."""
        return _sample_set(self._call("sample_sets", "GetSampleSet", _request(sample_sets_pb2.GetSampleSetRequest, sample_set_id=sample_set_id)).sample_set)

    def sample_sets(self, *, owner: str = "") -> list[SampleSet]:
        """Every sample set, oldest first; with ``owner``, only those that named caller
        created (a server older than the filter sends every set, and this keeps that
        caller's)."""
        found, token = [], ""
        while True:
            response = self._call("sample_sets", "ListSampleSets", _request(sample_sets_pb2.ListSampleSetsRequest, owner=owner, page_token=token))
            found += [_sample_set(s) for s in response.sample_sets if not owner or s.owner == owner]
            token = response.next_page_token
            if not token:
                return found

    def samples(self, sample_set_id: str, *, start: int = 0) -> Generator[Sample, None, None]:
        """The set's samples in insertion order from index ``start`` (an evaluation's
        ``sample_index``: the image of a mistake, without downloading those before it),
        images as PIL images, turned by their EXIF Orientation as the server turned them."""
        if not _is_index(start) or start < 0:
            raise ValueError(f"start must be a sample index (an int ≥ 0), got {start!r}")
        token = str(start) if start else ""  # a bare offset: a ListSamples page token every release reads (samples are only appended)
        while True:
            request = _request(sample_sets_pb2.ListSamplesRequest, sample_set_id=sample_set_id, page_token=token)
            response = self._call("sample_sets", "ListSamples", request)
            for sample in response.samples:
                # By name: a proto map's order is its hash order, another in each process.
                yield Sample(open_image(sample.image.encoded), sample.label, dict(sorted(sample.attributes.items())))
            token = response.next_page_token
            if not token:
                return

    def delete_sample_set(self, sample_set_id: str, *, uid: str = "") -> None:
        """Delete a set and its samples; finished operations' results and head versions stay.
        With ``uid`` (a SampleSet's), only that set: FailedPreconditionError if the id now
        names another (deleted and created again since)."""
        self._call("sample_sets", "DeleteSampleSet", _request(sample_sets_pb2.DeleteSampleSetRequest, sample_set_id=sample_set_id,
                                                              sample_set_uid=uid))

    # Jobs ----------------------------------------------------------------------------

    def evaluate_sample_set(self, sample_set_id: str, *, batch_size: int = 0, max_grid_images: int = 0,
                            request_id: str | uuid.UUID | None = None) -> Operation[Evaluation]:
        """Start classifying a sample set; ``.result()`` gives an :class:`Evaluation` and the
        operation has a ``mistakes.png`` artifact. ``batch_size``: images per forward pass,
        1..4096 (0: the server's ``[jobs].evaluate_batch_size``); ``max_grid_images``: most
        mistakes drawn in the grid, 1..1024 (0: 64).

        ``request_id`` (this and the other calls that start an operation): a UUID naming
        the request, so that sending it again, after a DeadlineExceededError or from a
        pipeline that restarted (e.g. ``uuid.uuid5(namespace, "nightly/2026-12-03")``),
        gets the operation the first one started instead of a second, on a server that
        lists ``"request_id"`` in ``model_metadata().capabilities``. None: a new one per
        call (repeated only by this call's own retries)."""
        request = _request(inference_pb2.EvaluateSampleSetRequest, sample_set_id=sample_set_id, batch_size=batch_size, max_grid_images=max_grid_images,
                           request_id=_request_id(request_id))
        response, retried = self._start("inference", "EvaluateSampleSet", request)
        return Operation[Evaluation](self, response.operation, retried=retried)

    def _start(self, service: str, method: str, request: Any, **call: Any) -> tuple[Any, bool]:
        """The answer of a call that starts an operation (``call``: :meth:`_call`'s
        options), and whether a retry of it got that answer: an attempt before went
        unanswered, and may have started the operation the retry's answer says an earlier
        request under its request_id started (``requested_again``). One the server refused
        with a RetryInfo did nothing: the answer after it is as the first's. The request goes
        with this client's run_id."""
        request.run_id = self._run_id
        unanswered: list[int] = []
        response = self._call(service, method, request, unanswered=unanswered, **call)
        return response, unanswered != [0]

    def _operation_if_kept(self, name: str, deadline: float) -> Operation | None:
        """The operation an error names, as it is now; None if it is gone (deleted since) or
        cannot be read in one attempt before the failed call's ``deadline``
        (``time.monotonic()``), or the client was closed since the error came: the error is
        the caller's news, not this lookup's, and is held back for no retry of it (a server
        restarting then took the client's whole timeout again)."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        request = _request(operations_pb2.GetOperationRequest, name=name)
        try:  # retried until now: not at all
            return Operation(self, self._call("operations", "GetOperation", request, timeout=left, retry_until=time.monotonic()).operation)
        except (ExplaindError, ValueError):  # ValueError: closed (ours, or gRPC's for a channel closed during the lookup)
            return None

    def operation(self, name: str) -> Operation:
        """An operation by name (``operations/<id>`` or the id)."""
        return Operation(self, self._call("operations", "GetOperation", _request(operations_pb2.GetOperationRequest, name=name)).operation)

    def operations(self, *, kind: str = "", state: str = "", owner: str = "", limit: int = 100) -> list[Operation]:
        """Up to ``limit`` recent operations, newest first, optionally of one kind / state /
        ``owner`` (the named caller that submitted them; a server older than that filter
        sends everyone's, and this keeps that caller's), fetched a page of at most 1000 at a
        time. Listed without their results, which can be megabytes each: ``result()``
        fetches one."""
        state_number = 0 if isinstance(state, str) and not state else enum_number(operations_pb2.OperationState, "OPERATION_STATE_", state, "state")
        _require_count("limit", limit)
        found: list[Operation] = []
        token = ""
        while len(found) < limit:
            request = _request(operations_pb2.ListOperationsRequest, kind=kind, state=state_number, owner=owner,
                               page_size=min(limit - len(found), 1000), page_token=token, view=operations_pb2.OPERATION_VIEW_BASIC)
            response = self._call("operations", "ListOperations", request)
            listed = [Operation(self, op) for op in response.operations]
            found += [operation for operation in listed if not owner or operation.owner == owner]
            token = response.next_page_token
            if not token:
                break
        return found

    def delete_operation(self, name: str) -> None:
        """Forget a finished operation: its result and artifacts (head versions an edit
        created stay). FailedPreconditionError while it is queued or running. The
        request_id that started it is not forgotten with it: a start sent again under it
        is refused (FailedPreconditionError, field request_id) while the server keeps
        request ids, so a late first attempt cannot start it again; one a shutdown
        ended (ABORTED) runs again as before."""
        self._call("operations", "DeleteOperation", _request(operations_pb2.DeleteOperationRequest, name=name))

    # NeuroInspect ----------------------------------------------------------------------

    def rank_mistake_neurons(
        self,
        sample_set_id: str,
        target_class: str | int,
        *,
        solver: str = "faithful",
        l1: float | None = None,
        l2: float | None = None,
        max_iterations: int = 0,
        cut_ratio: float | None = None,
        top_k: int = 0,
        include_samples: bool = False,
        execution: str = "auto",
        progress: bool = False,
        timeout: float | None = None,
        download: bool = True,
        request_id: str | uuid.UUID | None = None,
        stability_resamples: int = 0,
    ) -> NeuronRanking:
        """Rank the neurons behind ``target_class``'s (name or index) mistakes in a sample
        set. Small sets are answered inline; for large ones the server starts an operation
        and this waits for it (``progress=True``: a tqdm bar; Ctrl-C cancels it).
        ``execution``: "auto", "inline" or "operation". ``solver``: "faithful" (SGD, the
        paper's per-sample loop) or "proximal" (accelerated proximal gradient, exact zeros;
        docs/neuroinspect.md compares them). Unset numbers use the server's defaults (l1
        0.1, l2 0.01, ``max_iterations`` 1000, cut 0.03, top_k 5). ``top_k`` is the
        number of neurons taken per mistake and direction, not the number returned: every
        neuron whose share of mistakes passes ``cut_ratio`` is (a class with no mistakes
        gets none, and ``mistake_count`` 0); the ranking's ``top_k`` says which it used.
        ``stability_resamples`` (0-1000, 0: none): each neuron's ``stability`` is then the
        share of that many bootstrap resamples of the mistakes whose own ranking has it in
        its top 5.

        ``timeout`` (seconds) bounds the whole ranking, the operation's wait included:
        DeadlineExceededError names the operation, which keeps running, and holds it as
        ``operation`` to wait on later (``None``: the
        request gets at least 300 s and the operation no limit). ``download=False`` leaves
        a large set's ω (``include_samples``) on the server: ``omega`` is then None.
        ``request_id``: see :meth:`evaluate_sample_set` (only a ranking that runs as an
        operation is remembered). A ranking that ran as an operation names it
        (``ranking.operation``; None inline), and says whether it is the one an earlier
        request under ``request_id`` started (``ranking.requested_again``, as
        :attr:`Operation.requested_again`; False inline)."""
        started = time.monotonic()
        timeout = checked_timeout(timeout)
        answer = self._start_ranking(sample_set_id, target_class, solver=solver, l1=l1, l2=l2, max_iterations=max_iterations,
                                     cut_ratio=cut_ratio, top_k=top_k, include_samples=include_samples, execution=execution,
                                     timeout=timeout, request_id=request_id,
                                     stability_resamples=stability_resamples)
        if not isinstance(answer, Operation):
            return answer
        left = None if timeout is None else max(timeout - (time.monotonic() - started), 1e-3)
        # A refusal when its job ran is an InvalidArgumentError (and an OperationError), as an
        # inline ranking's is: one `except InvalidArgumentError` serves small and large sets.
        return dataclasses.replace(answer.result(progress=progress, timeout=left, download=download), operation=answer.name,
                                   requested_again=answer.requested_again)

    def _start_ranking(self, sample_set_id: str, target_class: str | int, *, solver: str = "faithful", l1: float | None = None,
                       l2: float | None = None, max_iterations: int = 0, cut_ratio: float | None = None, top_k: int = 0,
                       include_samples: bool = False, execution: str = "auto", timeout: float | None = None,
                       request_id: str | uuid.UUID | None = None, stability_resamples: int = 0) -> NeuronRanking | Operation[NeuronRanking]:
        """:meth:`rank_mistake_neurons`' call: the ranking answered inline, or the job that
        computes it, not waited on (the CLI follows a start a Ctrl-C interrupts to its job).
        ``timeout``: the call's, in seconds (None: at least 300)."""
        optional = {k: v for k, v in (("l1", l1), ("l2", l2), ("cut_ratio", cut_ratio)) if v is not None}
        request = _request(neuroinspect_pb2.RankMistakeNeuronsRequest,
            sample_set_id=sample_set_id, solver=enum_number(neuroinspect_pb2.CounterfactualSolver, "COUNTERFACTUAL_SOLVER_", solver, "solver"), max_iterations=max_iterations,
            top_k=top_k, include_samples=include_samples, stability_resamples=stability_resamples, execution=enum_number(neuroinspect_pb2.Execution, "EXECUTION_", execution, "execution", unset="auto"),
            request_id=_request_id(request_id), **class_fields(target_class), **optional,
        )
        response, retried = self._start("neuroinspect", "RankMistakeNeurons", request, timeout=max(self.timeout, 300.0) if timeout is None else timeout)
        outcome = response.WhichOneof("outcome")
        if outcome == "ranking":
            return _neuroinspect.ranking(response.ranking)
        if outcome != "operation":  # an answer a newer server added to the oneof
            raise error_from_code(grpc.StatusCode.UNIMPLEMENTED, "RankMistakeNeurons answered with neither a ranking nor an operation: "
                                  "the server is newer than this explaind SDK; upgrade the SDK")
        return Operation[NeuronRanking](self, response.operation, retried=retried)

    def visualize_neurons(
        self,
        pairs: Sequence[int | tuple[int, str | int | None]],
        *,
        method: str = "clip_illusion",
        steps: int = 0,
        gamma: float | None = None,
        epsilon: float | None = None,
        learning_rate: float | None = None,
        seed: int = 0,
        preview_every: int = 0,
        classes_per_neuron: int = 0,
        request_id: str | uuid.UUID | None = None,
    ) -> Operation[NeuronVisualizations]:
        """Start visualising neurons: each entry is a neuron (conditioned on the class with
        its largest head weight, or on each of the ``classes_per_neuron`` largest) or a
        (neuron, class) pair, 64 images at most, none twice (ValueError; the same image
        optimised twice). ``method``: "clip_illusion",
        "feature_visualization" or "no_clip"; ``steps`` 0 means 400. Unset, ``gamma`` (γ,
        the class logit's weight) is 0.5, ``epsilon`` (ε, CLIP-Illusion's, which needs
        cos + ε > 0) the server's ``[clip].illusion_epsilon`` (unset there, the one its CLIP's
        directory recommends, 1.0 for the shapes world's CLIP, else 0.05), ``learning_rate`` 9e-3; one the
        method ignores is refused. ``seed`` fixes each pair's start image and augmentations;
        ``preview_every``: a progress preview every this many steps (0: 10). ``.result()`` gives
        :class:`NeuronVisualizations`, whose ``visualizations`` hold PIL images, in request
        order, with the settings they were made with; its ``flipped()`` are those whose
        cos + ε ≤ 0 (run them again with a larger ``epsilon``). ``request_id``: see
        :meth:`evaluate_sample_set`."""
        expected = "expected a list of neuron indices or (neuron, class) pairs"
        if not _is_sequence(pairs):
            raise TypeError(f"pairs: {expected}, got {pairs!r}")
        messages = []
        for i, pair in enumerate(pairs):
            neuron, target = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (pair, None)
            neuron = as_scalar(neuron)
            if not _is_index(neuron):
                raise TypeError(f"pairs[{i}] is {pair!r}: {expected}")
            messages.append(neuroinspect_pb2.NeuronClassPair(neuron=int(neuron), **class_fields(target, f"pairs[{i}] class")))
        if repeat := repeated_pair([(m.neuron, m.class_index if m.HasField("class_index") else m.class_name) for m in messages]):
            raise ValueError(f"pairs[{repeat[0]}] repeats pairs[{repeat[1]}] ({pairs[repeat[0]]!r}): the same neuron and class would be "
                             "optimised twice into the same image")
        optional = {k: v for k, v in (("gamma", gamma), ("epsilon", epsilon), ("learning_rate", learning_rate)) if v is not None}
        request = _request(neuroinspect_pb2.VisualizeNeuronsRequest,
            pairs=messages, method=enum_number(neuroinspect_pb2.VisualizationMethod, "VISUALIZATION_METHOD_", method, "method"), steps=steps,
            seed=seed, preview_every=preview_every, classes_per_neuron=classes_per_neuron, request_id=_request_id(request_id), **optional,
        )
        response, retried = self._start("neuroinspect", "VisualizeNeurons", request)
        return Operation[NeuronVisualizations](self, response.operation, retried=retried)

    def edit_head(
        self,
        sample_set_id: str,
        target_class: str | int,
        neurons: Sequence[int],
        *,
        method: str = "probability_ratio",
        validation_sample_set_id: str = "",
        evaluation_sample_set_id: str = "",
        group_attribute: str = "",
        strength: float | None = None,
        target_ratio: float | str | None = None,
        learning_rate: float | None = None,
        max_epochs: int = 0,
        patience: int = 0,
        seed: int = 0,
        promote: bool = False,
        description: str = "",
        request_id: str | uuid.UUID | None = None,
    ) -> Operation[HeadEdit]:
        """Start retraining the head so ``target_class`` relies less on ``neurons``;
        ``.result()`` gives a :class:`HeadEdit` whose new version is served only once
        promoted (or with ``promote=True``). ``method``: "probability_ratio" or
        "constrain"; ``target_ratio`` a number or "auto".

        Sets: an empty ``validation_sample_set_id`` holds out every 5th sample of
        ``sample_set_id`` for early stopping (training on the rest; the set needs at
        least 5 samples); an empty ``evaluation_sample_set_id`` evaluates before/after
        on the validation set. ``group_attribute`` adds per-group accuracy over the
        evaluated samples, which must carry that attribute. ``max_epochs`` 0 means 20 and ``patience`` 0 means 5 epochs without
        a better validation accuracy; unset ``strength``/``learning_rate`` use the
        server's defaults (λ3 0.01 or 1.0 for constrain; Adam lr 1e-3). ``seed`` fixes the
        minibatch order; ``description`` (at most 4096 characters) is kept with the
        version. ``request_id``: see :meth:`evaluate_sample_set` (a repeat stores no second
        version)."""
        optional = {k: v for k, v in (("strength", strength), ("learning_rate", learning_rate)) if v is not None}
        auto_target_ratio = isinstance(target_ratio, str) and target_ratio == "auto"
        if target_ratio is not None and not auto_target_ratio:
            if isinstance(target_ratio, (str, bool)) or not isinstance(target_ratio, numbers.Real):
                raise TypeError(f'target_ratio must be a number or "auto", got {target_ratio!r}')
            optional["target_ratio"] = float(target_ratio)
        if not _is_sequence(neurons):
            raise TypeError(f"neurons must be a sequence of neuron indices, got {neurons!r}")
        neurons = [as_scalar(neuron) for neuron in neurons]  # a tensor's or array's elements as ints
        for i, neuron in enumerate(neurons):
            if not _is_index(neuron):
                raise TypeError(f"neurons[{i}] must be a neuron index (int), got {neuron!r}")
        request = _request(neuroinspect_pb2.EditHeadRequest,
            sample_set_id=sample_set_id, neurons=[int(n) for n in neurons], method=enum_number(neuroinspect_pb2.HeadEditMethod, "HEAD_EDIT_METHOD_", method, "method"),
            validation_sample_set_id=validation_sample_set_id, evaluation_sample_set_id=evaluation_sample_set_id,
            group_attribute=group_attribute, auto_target_ratio=auto_target_ratio, max_epochs=max_epochs, patience=patience,
            seed=seed, promote=promote, description=description, request_id=_request_id(request_id), **class_fields(target_class), **optional,
        )
        response, retried = self._start("neuroinspect", "EditHead", request)
        return Operation[HeadEdit](self, response.operation, retried=retried)

    def head_versions(self) -> list[HeadVersion]:
        """Head versions of the served feature extractor, oldest first. ``active`` marks the
        one served when the last page was read: one version, even if a promote came between pages."""
        found: list[HeadVersion] = []
        for response in self._head_version_pages():
            found += [_neuroinspect.head_version(v) for v in response.versions]
            active_id = response.active_version_id
        return [dataclasses.replace(v, active=v.version_id == active_id) for v in found]

    def head_version(self, version_id: str) -> HeadVersion:
        """One stored head version (e.g. ``"v3"``), ``active`` if it was served when it was
        read. NotFoundError for an unknown or deleted one, InvalidArgumentError for an id
        no version can have (not "v" and a number without leading zeros). A server older
        than GetHeadVersion is asked for its list instead, page by page until the version
        turns up (NotFoundError, naming version_id, when it does not)."""
        request = _request(neuroinspect_pb2.GetHeadVersionRequest, version_id=version_id)
        try:
            return _neuroinspect.head_version(self._call("neuroinspect", "GetHeadVersion", request).version)
        except UnimplementedError:
            pass
        for response in self._head_version_pages():  # each page's `active` is read with it
            for message in response.versions:
                if message.version_id == version_id:
                    return _neuroinspect.head_version(message)
        raise error_from_code(grpc.StatusCode.NOT_FOUND, f"no head version {version_id!r} for the served feature extractor "
                              f"(looked up in ListHeadVersions: the server at {self.target} has no GetHeadVersion)", field="version_id")

    def _head_version_pages(self) -> Iterator[neuroinspect_pb2.ListHeadVersionsResponse]:
        """ListHeadVersions' responses, first page to last, each asked when the one before is used up."""
        token = ""
        while True:
            response = self._call("neuroinspect", "ListHeadVersions", _request(neuroinspect_pb2.ListHeadVersionsRequest, page_token=token))
            yield response
            token = response.next_page_token
            if not token:
                return

    def promote_head_version(self, version_id: str) -> ActiveHeadChange:
        """Serve ``version_id`` (atomically; persists across restarts). The result names
        the version served before, to undo the change with."""
        request = _request(neuroinspect_pb2.PromoteHeadVersionRequest, version_id=version_id)
        return _neuroinspect.active_head_change(self._call("neuroinspect", "PromoteHeadVersion", request))

    def rollback_head_version(self, version_id: str = "") -> ActiveHeadChange:
        """Serve the active version's parent (or ``version_id``), as :meth:`promote_head_version`."""
        request = _request(neuroinspect_pb2.RollbackHeadVersionRequest, version_id=version_id)
        return _neuroinspect.active_head_change(self._call("neuroinspect", "RollbackHeadVersion", request))

    def delete_head_version(self, version_id: str) -> None:
        """Delete a stored head version that is not served (its children take its parent as
        theirs). FailedPreconditionError for the served version, the model file's head, a
        loaded head that versions were edited from, and a version an unfinished edit started
        from or is storing; PermissionDeniedError, with named callers, for another caller's version (unless
        this caller is an admin) and for a loaded head where ``[server].admins`` leaves it out."""
        self._call("neuroinspect", "DeleteHeadVersion", _request(neuroinspect_pb2.DeleteHeadVersionRequest, version_id=version_id))


_FIELD_KINDS = {
    FieldDescriptor.CPPTYPE_INT32: "a 32-bit integer", FieldDescriptor.CPPTYPE_INT64: "a 64-bit integer",
    FieldDescriptor.CPPTYPE_UINT32: "a 32-bit unsigned integer", FieldDescriptor.CPPTYPE_UINT64: "a 64-bit unsigned integer",
    FieldDescriptor.CPPTYPE_DOUBLE: "a number", FieldDescriptor.CPPTYPE_FLOAT: "a number",
    FieldDescriptor.CPPTYPE_BOOL: "a bool", FieldDescriptor.CPPTYPE_STRING: "a string", FieldDescriptor.CPPTYPE_ENUM: "a name",
}


_NO_DISPLAY = contextlib.nullcontext(None)


def _show_upload(display: ProgressDisplay | None, sent: int, total: int, last: bool) -> None:
    if display is not None:
        display.show(sent, total, "uploaded" if last else "uploading")


def _request_id(given: str | uuid.UUID | None) -> str:
    """The request_id (AIP-155) of one call that starts an operation (or one request of
    an upload), the same in each of its attempts: the caller's UUID in the form the server takes (8-4-4-4-12 hex digits;
    any form ``uuid.UUID`` reads is accepted), else a new one."""
    if given is None:
        given = uuid.uuid4()
    if isinstance(given, uuid.UUID):
        return str(given)
    if not isinstance(given, str):
        raise TypeError(f"request_id must be a UUID or its string, got {given!r}")
    try:
        return str(uuid.UUID(given))
    except ValueError:
        raise ValueError(f"request_id must be a UUID (such as 123e4567-e89b-42d3-a456-426614174000), got {given!r}") from None


def _upload_request_ids(given: str | uuid.UUID | None) -> Iterator[str]:
    """The request_id of each request of an upload, in order: new ones, or, for the
    caller's ``given``, ones derived from it (UUIDv5 of its n-th request), so the same
    upload run again repeats the same requests."""
    upload = None if given is None else uuid.UUID(_request_id(given))
    return (_request_id(None if upload is None else uuid.uuid5(upload, str(n))) for n in itertools.count())


def _note_appended(error: BaseException, sample_set_id: str, appended: int, unanswered: int, total: int,
                   upload_id: str | uuid.UUID | None) -> None:
    """Say on a failed ``append_samples``'s error what it stored and how to go on: the
    first ``appended`` of the caller's ``total`` samples for certain, and maybe the
    ``unanswered`` after them (their request got no answer). Nothing when it stored none.
    A refusal (a bad image, a quota) or an unreadable file comes again unless mended first.
    The CLI shows this note too (``sample-set append``), so each SDK step names its command."""
    if not (appended or unanswered):
        return
    stored = f"the first {appended} of {total} samples were appended to {sample_set_id!r}"
    if unanswered:
        stored += f", and samples {appended} to {appended + unanswered - 1} may have been too (their request got no answer)"
    refused = isinstance(error, Exception) and not (isinstance(error, ExplaindError) and error.code in _NO_ANSWER)
    mend = "once what the error names is put right, " if refused else ""
    if upload_id is not None:
        same = "the same chunk_size and, before the failed request, the same images" if refused else "the same images and chunk_size"
        rest = (f"{mend}run this append_samples again under request_id {_request_id(upload_id)} (the CLI's --request-id; {same}) "
                "to append the rest: the requests the server applied are answered without appending again")
    elif unanswered:
        rest = (f"sample_set({sample_set_id!r}).sample_count (explaind sample-set show {sample_set_id}) tells which; then append the rest "
                "(an append given a request_id, the CLI's --request-id, can be run again as it is instead)")
    else:
        rest = f"{mend}append the rest (samples {appended} on)"
    error.add_note(f"{stored}: {rest}")


def _note_left_uploading(error: BaseException, created: SampleSet, total: int, why: str, then: str) -> None:
    """Say on a failed upload's error that its set was left uploading (``why``), what becomes of it, and ``then``, what to do."""
    error.add_note(f"sample set {created.sample_set_id!r} was left with {created.sample_count} of {total} samples, uploading: {why}; "
                   "jobs refuse it, and the server deletes it at its next start or after [server].upload_idle_timeout_s without a "
                   f"request (or delete the set); {then}")


def _note_upload_id_reused(error: BaseException, upload_id: str | uuid.UUID | None, call: str, index: int) -> None:
    """Says, on the server's INVALID_ARGUMENT about the request_id of an upload's request
    ``index`` (an id derived from the caller's ``upload_id``, which the message names, not
    the caller's), what the caller's request_id was reused for."""
    if upload_id is not None and isinstance(error, InvalidArgumentError) and error.field == "request_id":
        error.add_note(f"request {index + 1} of this {call} differs from the one sent before under request_id {_request_id(upload_id)} "
                       "(its requests' ids are derived from it): that id names another upload, or this one with other images, labels, "
                       "attributes or chunks (chunk_size, the server's limits); give a new upload a new request_id")


def _request(message_class: Any, **fields: Any) -> Any:
    """``message_class(**fields)``: the caller's arguments as a request, where a value of
    the wrong type or range raises naming its argument (protobuf's own errors name none:
    "bad argument type for built-in operation")."""
    try:
        return message_class(**fields)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a bool field given 2**63
        for name, value in fields.items():
            try:
                message_class(**{name: value})
            except (TypeError, ValueError, OverflowError) as error:
                field = message_class.DESCRIPTOR.fields_by_name[name]
                kind = _FIELD_KINDS.get(field.cpp_type, f"a {field.message_type.name}" if field.message_type else "another type")
                if field.is_repeated:
                    kind = f"a sequence of which each is {kind}"
                raise (TypeError if isinstance(error, TypeError) else ValueError)(f"{name} must be {kind}, got {value!r}") from None
        raise


class _ErrorMappingStream:
    """Iterates a server stream, raising typed errors; ``cancel()`` ends the call (its one
    caller, Operation.watch, cancels every stream it opens once it is done with it). A
    call under way (see _forked_amid_calls) until it ends or is cancelled: gRPC reads it
    in a thread of its own meanwhile. (A watch refused a stream polls for hours before
    it cancels the ended one.) One that ``abandonment`` cancelled raises
    grpc.FutureCancelledError, as an abandoned call does."""

    def __init__(self, call: Any, client: Client, abandonment: _Cancellation | None) -> None:
        self._call, self._client, self._abandonment = call, client, abandonment
        _calls_under_way.add(self)

    def __iter__(self) -> Iterator[Any]:
        try:
            for response in self._call:
                self._client._reached = True  # a server answering only a watch is one that restarts, not a wrong address
                yield response
        except grpc.RpcError as rpc_error:
            if self._abandonment is not None and rpc_error.code() == grpc.StatusCode.CANCELLED:
                self._abandonment.require_running()  # cancelled by it: nobody awaits the error
            error = from_rpc_error(rpc_error)
            self._client._note_if_answered(error)
            raise error from None
        finally:
            self._ended()

    def cancel(self) -> None:
        self._call.cancel()
        self._ended()

    def _ended(self) -> None:
        _calls_under_way.discard(self)
        if self._abandonment is not None:
            self._abandonment.release(self._call)
