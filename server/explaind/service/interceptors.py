"""One server interceptor for every RPC: auth, error mapping, metrics, tracing, and the
audit line of a call that changed something (explaind.service.audit).

Servicers raise :class:`~explaind.errors.ExplaindError`; here it becomes the status
code it names with its message, and an error naming a field also carries it in the
status details (:func:`~explaind.errors.subject_detail`, AIP-193), so clients in any
language read the field without parsing the message (and the request items a
FAILED_PRECONDITION lists, as a ``google.rpc.PreconditionFailure``; the limit a
RESOURCE_EXHAUSTED met, as an ErrorInfo reason and a ``google.rpc.QuotaFailure``), and an UNAVAILABLE the
server sends itself, a full job queue or an image decoder out of memory carries a ``google.rpc.RetryInfo`` (AIP-194), and one
about an operation (a reused request_id's) names it in a ``google.rpc.ResourceInfo``. Anything else becomes
INTERNAL with the exception's type and an incident id (its text and traceback go to the
log, never to the caller: they can hold server paths). A response larger than the send limit becomes
RESOURCE_EXHAUSTED here, before gRPC would fail to send it after the call had been
counted OK. With tracing on (explaind.tracing), each call but health's and reflection's
(probes every few seconds would drown the traces) gets a SERVER span, current while its
servicer runs (a stream's, while it makes each message), so the operation it submits is
its child and the lines it logs carry the span's ids; its latency observation carries the
span's trace id as an exemplar when the span is sampled.

A stream whose caller a reload of the token or callers file revokes (explaind.service.auth.Grant)
ends UNAUTHENTICATED before its next message, and one that waits for something to send
(WatchOperation) within its next look at ``context.is_active()``; a unary call already in
progress finishes (WaitOperation at its timeout or deadline).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from ..errors import OPERATION_RESOURCE_TYPE, ExplaindError, PreconditionViolation, Quota, caller_subject, report_unexpected, status_details
from ..metrics import Metrics, exemplar
from ..tracing import NO_TRACING, Tracing, current, trace_id
from .audit import auditing, log_change
from .auth import UNNAMED, BearerToken, Grant, NamedCallers, calling_as

log = logging.getLogger(__name__)

# Reachable without a token: probes and tooling.
_PUBLIC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


# Refusals logged (throttled), naming the caller: at WARNING the server's limits, and a
# caller's attempt to change what another caller owns; at INFO a caller's mistakes, which
# dashboards count by method and code alone (who sends them, and what, is only here).
_LOGGED_REFUSALS = {"RESOURCE_EXHAUSTED": logging.WARNING, "PERMISSION_DENIED": logging.WARNING,
                    "INVALID_ARGUMENT": logging.INFO, "NOT_FOUND": logging.INFO, "ALREADY_EXISTS": logging.INFO,
                    "FAILED_PRECONDITION": logging.INFO}

# Unary calls that hold their thread for long, decoding images (a wait for room in
# [server].max_decode_bytes too), then waiting for the model or writing the samples: a named
# caller may run at most half of [server].max_workers of them at once (``unary_shares``),
# so that its calls cannot take every thread from the other callers.
_THREAD_BOUND_METHODS = {("explaind.v1.InferenceService", "Predict"), ("explaind.v1.SampleSetService", "CreateSampleSet"),
                         ("explaind.v1.SampleSetService", "AppendSamples")}

# What a retry of an inline call may ask less of should it run the host or the model's
# device out of memory (explaind.errors.report_unexpected), by method; any other is told to
# retry later.
_LESS_WORK_BY_METHOD = {"Predict": "fewer images per request", "CreateSampleSet": "fewer samples per request",
                        "AppendSamples": "fewer samples per request", "RankMistakeNeurons": "a smaller sample set"}

# Longest status message sent, in bytes as gRPC percent-encodes it into the grpc-message
# header. Messages quote the caller's ids; a header over gRPC's 8 KiB soft limit made the
# caller see RESOURCE_EXHAUSTED ("received metadata size exceeds ... limit") instead.
MAX_STATUS_MESSAGE_BYTES = 4096
# With BadRequest details the message travels twice more, base64-encoded in
# grpc-status-details-bin (as the Status's message, and the violation's description),
# maybe beside a PreconditionFailure (at most 10 violations of two 64-byte parts, see
# explaind.errors.precondition_failure): 2 KiB + 4/3 · (2 KiB + 512 B + 1.4 KB) stays under 7.5 KB in all.
# A Quota's details (an ErrorInfo of a setting's name and value, a QuotaFailure of two
# 64-byte parts: ~300 B) come with RESOURCE_EXHAUSTED, never with a PreconditionFailure.
MAX_DETAILED_MESSAGE_BYTES = 2048
MAX_VIOLATION_BYTES = 512


def _encoded_size(character: str) -> int:
    """Bytes one character takes percent-encoded: printable ASCII but '%' stays as it is."""
    return 1 if " " <= character <= "~" and character != "%" else 3 * len(character.encode("utf-8", "surrogatepass"))


def _shorten(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``message`` cut to fit ``limit`` bytes percent-encoded (never fewer than its UTF-8
    bytes), keeping its start (the field and the problem) and saying how many characters
    were left out."""
    budget, kept = limit - 64, 0  # room for the note
    for character in message:
        budget -= _encoded_size(character)
        if budget < 0:
            return f"{message[:kept]} ... ({len(message) - kept} characters left out)"
        kept += 1
    return message


class CallerShares:
    """The calls each named caller holds at once, at most ``limit`` each: so one caller's
    calls cannot take from the others what they share (threads, slots). Calls with no
    named caller (one token, or no auth: one caller in all) are not counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._held_by: dict[str, int] = {}  # named caller -> calls it holds

    def _take(self, caller: str | None) -> bool:
        if caller is None:
            return True
        with self._lock:
            if self._held_by.get(caller, 0) >= self.limit:
                return False
            self._held_by[caller] = self._held_by.get(caller, 0) + 1
            return True

    def _give_back(self, caller: str | None) -> None:
        if caller is None:
            return
        with self._lock:
            self._held_by[caller] -= 1
            if not self._held_by[caller]:
                del self._held_by[caller]

    @contextmanager
    def share(self, caller: str | None) -> Iterator[bool]:
        """Whether ``caller`` had room in its share; the call counts in it until the block ends."""
        taken = self._take(caller)
        try:
            yield taken
        finally:
            if taken:
                self._give_back(caller)


class HeldCalls:
    """The calls that hold a worker thread while they wait on something: server streams
    (WatchOperation, health's Watch), reflection's two-way stream and WaitOperation, and
    inline rankings (RankMistakeNeurons computing in its thread). At
    most ``limit`` at once (half of [server].max_workers), so the other threads always
    serve the short calls: health probes, CancelOperation, Predict. Health's Watch and
    reflection need no token, so without a bound a few idle callers could leave no
    thread for anything else; and they get at most a quarter of the slots
    (``public_limit``), so callers without a token cannot take those of the callers
    with one. A named caller gets at most half of them (``caller_limit``), so one
    caller's watches cannot leave another's none."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.public_limit = max(1, limit // 4)
        self._callers = CallerShares(max(1, limit // 2))
        self.caller_limit = self._callers.limit
        self._slots = threading.BoundedSemaphore(limit)
        self._public_slots = threading.BoundedSemaphore(self.public_limit)

    @contextmanager
    def slot(self, *, public: bool = False, caller: str | None = None) -> Iterator[HeldSlot]:
        """Whether a slot was free (for a call that needs no token: one of the public
        share too; for a named ``caller``: one of its share); it is held until the block
        ends. Refused, the limit that had no room: decided here, as the counts read later
        cannot tell (the caller's share holds this call too until the block ends)."""
        with ExitStack() as taken:  # each part taken is given back at the end, the others not tried
            public_held = not public or _acquired(self._public_slots, taken)
            share_held = public_held and taken.enter_context(self._callers.share(caller))
            held = share_held and _acquired(self._slots, taken)
            yield HeldSlot(None if held else self._limit_met(public_held, share_held, caller))

    def refusal(self, refused: Quota) -> str:
        """Why :meth:`slot` found none free (its ``refused`` limit), for the caller's RESOURCE_EXHAUSTED."""
        most = {"HELD_CALLS_WITHOUT_TOKEN_EXCEEDED": f"{self.public_limit} of them for calls without a token",
                "HELD_CALLS_PER_CALLER_EXCEEDED": f"{self.caller_limit} of them for one caller"}.get(refused.reason, "half of [server].max_workers")
        return f"the streams, waits and inline rankings this server keeps at once are open (at most {self.limit}, {most}); try again later"

    def _limit_met(self, public_held: bool, share_held: bool, caller: str | None) -> Quota:
        """The limit :meth:`slot` found no room in: the public share, the caller's, or all slots."""
        what = "streams, waits and inline rankings open"
        if not public_held:
            return Quota("HELD_CALLS_WITHOUT_TOKEN_EXCEEDED", "[server].max_workers", self.public_limit, "server", f"{what} without a token")
        if not share_held and caller is not None:
            return Quota("HELD_CALLS_PER_CALLER_EXCEEDED", "[server].max_workers", self.caller_limit, caller_subject(caller), what)
        return Quota("HELD_CALLS_EXCEEDED", "[server].max_workers", self.limit, "server", what)


class HeldSlot:
    """What :meth:`HeldCalls.slot` yields: true where a slot was free, else false with
    ``refused``, the limit that had no room."""

    def __init__(self, refused: Quota | None) -> None:
        self.refused = refused

    def __bool__(self) -> bool:
        return self.refused is None


def response_bytes_quota(limit: int) -> Quota:
    """The limit a response larger than ``limit`` bytes ([server].max_message_bytes) met."""
    return Quota("RESPONSE_BYTES_EXCEEDED", "[server].max_message_bytes", limit, "server", "bytes of one response")


def _acquired(semaphore: threading.BoundedSemaphore, taken: ExitStack) -> bool:
    """Whether ``semaphore`` had a slot free, taken then until ``taken`` closes."""
    if not semaphore.acquire(blocking=False):
        return False
    taken.callback(semaphore.release)
    return True


class ThrottledLog:
    """A recurring line logged at most once per ``interval_s``, with how many were left
    out: a misconfigured client retrying fast must not flood the log."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._next_time = 0.0
        self._left_out = 0

    def log(self, level: int, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next_time:
                self._left_out += 1
                return
            left_out, self._left_out, self._next_time = self._left_out, 0, now + self._interval_s
        if left_out:
            message += f" ({left_out} more since the last such line, not logged)"
        log.log(level, message, *args)


class ServiceInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: Metrics, token: BearerToken | NamedCallers, max_send_bytes: int, held_calls: HeldCalls,
                 unary_shares: CallerShares, tracing: Tracing = NO_TRACING) -> None:
        """``unary_shares``: each named caller's share of the threads for the
        ``_THREAD_BOUND_METHODS`` (half of [server].max_workers)."""
        self._metrics = metrics
        self._tracing = tracing
        self._token = token
        self._max_send_bytes = max_send_bytes
        self._held_calls = held_calls
        self._unary_shares = unary_shares
        self._refusals = ThrottledLog()
        # Per method: a flood of Predict must not hide that uploads are refused too.
        self._refusal_logs: dict[tuple[str, str, str], ThrottledLog] = {}
        self._refusal_logs_lock = threading.Lock()

    def _log_refusal(self, service: str, method: str, context: grpc.ServicerContext, code: str, message: str, caller: str | None) -> None:
        """A call refused (one of ``_LOGGED_REFUSALS``), logged at most once a minute per
        method and code: the message names the limit (a full queue, the data dir, the
        streams), which ExplaindOverloaded's on-call engineer otherwise never sees, the
        object and its owner, or the caller's mistake, and the line the caller."""
        with self._refusal_logs_lock:
            throttle = self._refusal_logs.setdefault((service, method, code), ThrottledLog())
        throttle.log(_LOGGED_REFUSALS[code], "refused %s/%s from %s: %s: %s", service, method, who(context, caller), code, message)

    def _refuse_unauthenticated(self, observed: _Observed, service: str, method: str, context: grpc.ServicerContext) -> None:
        self._refusals.log(logging.WARNING, "refused %s/%s from %s: missing or wrong bearer token", service, method, context.peer())
        observed.abort("UNAUTHENTICATED", "missing or wrong bearer token in 'authorization' metadata")

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").partition("/")
        self._metrics.rpcs_started.labels(service, method).inc()
        public = service in _PUBLIC_SERVICES
        grant = None if public else self._token.grant_of(details.invocation_metadata)  # None: refused, or public
        # None: refused; UNNAMED ("") for an unnamed caller (the one token, or no auth).
        caller = UNNAMED if public else grant.caller if grant is not None else None
        authorised = caller is not None
        # The wrappers answer a request that did not parse; a two-way stream's messages
        # (reflection's) keep grpcio's own handling. A refused caller's request is never
        # parsed: a 64 MiB one would cost its copy in memory for nothing.
        parsing = {} if handler.request_deserializer is None else {
            "request_deserializer": _parsing(handler.request_deserializer) if authorised else _unread}
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, service, method, caller), **parsing)
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, service, method, caller, grant), **parsing)
        if handler.stream_stream is not None:  # its request is the stream of the caller's messages
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, service, method, caller, grant))
        return None  # client-streaming, which no service here has and no wrapper guards: UNIMPLEMENTED, not served unchecked

    def _traced(self, service: str) -> Tracing:
        return NO_TRACING if service in _PUBLIC_SERVICES else self._tracing

    def _wrap_unary(self, behaviour: Callable, service: str, method: str, caller: str | None) -> Callable:
        """``caller``: as intercept_service resolved it (None: refused)."""
        thread_bound = (service, method) in _THREAD_BOUND_METHODS

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            with _Observed(self._metrics, service, method, context, self._max_send_bytes, self._log_refusal, self._traced(service),
                           caller=caller or None) as observed:
                if caller is None:
                    self._refuse_unauthenticated(observed, service, method, context)
                observed.refuse_if_unparsed(request)
                with self._unary_shares.share(caller or None) if thread_bound else nullcontext(True) as shared:
                    if not shared:
                        observed.abort("RESOURCE_EXHAUSTED", self._unary_refusal(),
                                       quota=Quota("CALLS_PER_CALLER_EXCEEDED", "[server].max_workers", self._unary_shares.limit,
                                                   caller_subject(caller), "Predict, CreateSampleSet, AppendSamples calls in progress"))
                    return observed.call(behaviour, request, context)

        return handle

    def _unary_refusal(self) -> str:
        """Why a ``_THREAD_BOUND_METHODS`` call found its caller's share full."""
        return (f"this caller's Predict, CreateSampleSet and AppendSamples calls in progress hold its share of the server's threads "
                f"(at most {self._unary_shares.limit} at once, half of [server].max_workers, which the server's operator may raise); "
                "retry once one of them has answered, or send fewer at once")

    def _wrap_stream(self, behaviour: Callable, service: str, method: str, caller: str | None, grant: Grant | None) -> Callable:
        """``grant``: what let the call in (None: refused, or a public service's call),
        which the stream ends UNAUTHENTICATED once a reload revokes."""
        def revocation() -> str:
            return "" if grant is None or self._token.in_force(grant) else grant.revocation

        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with _Observed(self._metrics, service, method, context, self._max_send_bytes, self._log_refusal, self._traced(service),
                           caller=caller or None) as observed:
                if caller is None:
                    self._refuse_unauthenticated(observed, service, method, context)
                observed.refuse_if_unparsed(request)
                public = service in _PUBLIC_SERVICES
                with self._held_calls.slot(public=public, caller=caller or None) as held:
                    if held.refused is not None:
                        observed.abort("RESOURCE_EXHAUSTED", self._held_calls.refusal(held.refused), quota=held.refused)
                    yield from observed.call_stream(behaviour, request, context, revocation)

        return handle


def who(context: grpc.ServicerContext, caller: str | None) -> str:
    """The peer of a call, and its named caller if it has one, for log lines."""
    return f"{context.peer()} (caller {caller})" if caller else context.peer()


class _Unparsed:
    """What a request that is not its method's message becomes, so the call can answer
    INVALID_ARGUMENT (grpcio's own answer is INTERNAL, with a traceback in the log)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


_UNREAD = object()  # a refused call's request (grpcio takes a deserializer's None for a failure)


def _unread(_data: bytes) -> object:
    """The request of a call refused before it is read."""
    return _UNREAD


def _parsing(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, or whatever a deserializer raises
            return _Unparsed(error)

    return parse


class _RevocableContext:
    """A stream's context whose ``is_active()`` also turns False once its caller is
    revoked, so a servicer looping while its caller is there stops; the rest is the
    context's own."""

    def __init__(self, context: grpc.ServicerContext, revocation: Callable[[], str]) -> None:
        self._context = context
        self._revocation = revocation

    def is_active(self) -> bool:
        return self._context.is_active() and not self._revocation()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Observed:
    """Times one call, counts it in flight, records its final status code, and with
    ``tracing`` on makes its span."""

    def __init__(self, metrics: Metrics, service: str, method: str, context: grpc.ServicerContext, max_send_bytes: int,
                 log_refusal: Callable[[str, str, grpc.ServicerContext, str, str, str | None], None] | None = None, tracing: Tracing = NO_TRACING,
                 *, caller: str | None = None) -> None:
        """``caller``: the named caller (None: none), which the call's log lines name."""
        self._metrics, self._service, self._method, self._context = metrics, service, method, context
        self._caller = caller
        self._max_send_bytes = max_send_bytes
        self._log_refusal = log_refusal
        self._tracing = tracing
        self._code = "OK"

    def __enter__(self) -> _Observed:
        self._start = time.perf_counter()
        self._metrics.rpcs_in_flight.labels(self._service, self._method).inc()
        self._span = self._tracing.rpc_span(self._service, self._method, self._context.invocation_metadata()) if self._tracing.enabled else None
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        if kind is not None and self._code == "OK":
            self._code = self._context.code().name if self._context.code() is not None else (self._gone() if kind is GeneratorExit else "UNKNOWN")
        elif kind is None and not self._context.is_active():
            self._code = self._gone()
        self._metrics.rpcs_in_flight.labels(self._service, self._method).dec()
        self._metrics.rpc_duration.labels(self._service, self._method, self._code).observe(time.perf_counter() - self._start, exemplar(trace_id(self._span)))
        if self._span is not None:
            Tracing.end_rpc(self._span, grpc.StatusCode[self._code])

    def _gone(self) -> str:
        """The code of a call whose caller is gone: its deadline passed, or it cancelled.
        Dashboards must tell server timeouts from callers that gave up."""
        remaining = self._context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"

    def abort(self, code: str, message: str, *, field: str | None = None, description: str = "", retry_delay_s: float | None = None,
              violations: Sequence[PreconditionViolation] = (), operation: str | None = None, quota: Quota | None = None) -> None:
        self._code = code
        status_code = grpc.StatusCode[code]
        details = status_details(code, field=field and _shorten(field, MAX_VIOLATION_BYTES), description=_shorten(description, MAX_VIOLATION_BYTES),
                                 quota=quota, violations=violations)
        if retry_delay_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(round(retry_delay_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if operation:
            details.append(error_details_pb2.ResourceInfo(resource_type=OPERATION_RESOURCE_TYPE, resource_name=operation))
        message = _shorten(message, MAX_DETAILED_MESSAGE_BYTES if details else MAX_STATUS_MESSAGE_BYTES)
        if code in _LOGGED_REFUSALS and self._log_refusal is not None:
            self._log_refusal(self._service, self._method, self._context, code, message, self._caller)
        if details:
            status = status_pb2.Status(code=status_code.value[0], message=message)
            for detail in details:
                status.details.add().Pack(detail)
            # What grpcio-status's abort_with_status sends: the message must match the status's.
            self._context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
        self._context.abort(status_code, message)

    def refuse_if_unparsed(self, request: Any) -> None:
        if isinstance(request, _Unparsed):
            self.abort("INVALID_ARGUMENT", f"the request is not a valid {self._service}/{self._method} request message "
                       f"({request.error}); is the client built from the same .proto?")

    def _abort_with(self, error: ExplaindError) -> None:
        self.abort(error.code, str(error), field=error.field, description=error.description, retry_delay_s=error.retry_delay_s,
                   violations=error.violations, operation=error.operation, quota=error.quota)

    @contextmanager
    def _serving(self) -> Iterator[None]:
        """While the servicer runs: the call's span current, and its named caller."""
        with current(self._span), calling_as(self._caller):
            yield

    def call(self, behaviour: Callable, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            with self._serving(), auditing() as audited:
                response = behaviour(request, context)
        except ExplaindError as error:
            self._abort_with(error)
        except Exception as error:
            self._map_unexpected(error)
        else:
            sendable = self._sendable(response)
            if audited.changed:
                with current(self._span):  # the audit line carries the call's trace id
                    log_change(self._service, self._method, request, sendable, self._caller)
            return sendable

    def call_stream(self, behaviour: Callable, request: Any, context: grpc.ServicerContext, revocation: Callable[[], str]) -> Iterator[Any]:
        """``revocation``: why the caller may no longer be served ("" while it may), asked
        before each message and by the servicer's ``context.is_active()``, so a stream that
        waits for something to send stops too."""
        try:
            with self._serving():
                responses = iter(behaviour(request, _RevocableContext(context, revocation)))
            while True:
                # Current while the servicer makes each message, as for a unary call, but
                # not across the yield: a generator cannot leave them set in between (it
                # may be resumed in another thread's context, or closed by the collector).
                with self._serving():
                    try:
                        response = next(responses)
                    except StopIteration:
                        response = None  # the servicer is done
                if why := revocation():
                    log.info("ended %s/%s of %s: %s", self._service, self._method, who(self._context, self._caller), why)
                    self.abort("UNAUTHENTICATED", why)
                if response is None:
                    return
                yield self._sendable(response)
        except ExplaindError as error:
            self._abort_with(error)
        except Exception as error:
            self._map_unexpected(error)

    def _sendable(self, response: Any) -> Any:
        size = response.ByteSize()
        if size > self._max_send_bytes:
            self.abort("RESOURCE_EXHAUSTED", f"the response is {size} bytes, more than the server's limit of {self._max_send_bytes} ([server].max_message_bytes)",
                       quota=response_bytes_quota(self._max_send_bytes))
        return response

    def _map_unexpected(self, error: Exception) -> None:
        """``error`` as the caller's status; the code counted is :meth:`__exit__`'s to record."""
        if self._context.code() is not None:  # the servicer aborted on its own, or set its status
            if isinstance(error, NotImplementedError):  # a generated stub (health's List): no traceback to log, per call, for anyone
                self._context.abort(self._context.code(), self._context.details() or "")
            raise error
        if isinstance(error, grpc.RpcError) and not self._context.is_active():
            # A two-way stream's request iterator raises this once the caller has left
            # (reflection's, when a client closes its channel): no failure of the server's,
            # counted as any call whose caller is gone.
            return
        self.abort(*report_unexpected(log, f"unexpected error in {self._service}/{self._method}", error,
                                      less_work=_LESS_WORK_BY_METHOD.get(self._method, "")))
