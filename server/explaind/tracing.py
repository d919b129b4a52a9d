"""Optional OpenTelemetry tracing: a span per RPC and per operation, exported over OTLP.

With ``[tracing].otlp_endpoint`` set, :func:`start_tracing` builds a tracer on its own
provider (the process-wide one stays the application's: an embedding program keeps its
own) and the interceptor and the JobManager make:

* per RPC, a SERVER span "explaind.v1.Service/Method", child of the caller's W3C
  ``traceparent`` metadata when it sends one, with ``rpc.grpc.status_code`` (and, of a
  partial_failure Predict that answered some images with an error, their number as
  ``explaind.predict.failed_images``: the call is OK, so its code does not tell);
* per operation, a span "operation <kind>" from its submission to its end, child of the
  RPC that submitted it, with a child "queued" (submission to start) and one per stage
  the job's time goes to (the stages ``explaind_job_stage_duration_seconds`` times).

Attributes are bounded: method, kind, operation id, codes and states; never sample ids,
images or neuron ids. A sampled trace's id (:func:`trace_id`) is the exemplar of the
latency observations of its call and operation, so a dashboard's latency panel opens it.
Off (the default), :data:`NO_TRACING` answers every hook with a branch: the
opentelemetry packages (the ``tracing`` extra) are not imported.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from .config import ConfigError, TracingSection
from .store import FAILED, JobRecord

if TYPE_CHECKING:
    import grpc
    from opentelemetry.trace import Span, Tracer

# The codes OpenTelemetry's gRPC conventions mark a server span's status ERROR for: the
# server's failures, not the caller's (INVALID_ARGUMENT, NOT_FOUND... leave it unset).
SERVER_ERROR_CODES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
MISSING_PACKAGES = ("[tracing].otlp_endpoint is set but the OpenTelemetry packages are not installed ({error}): "
                    "install the tracing extra, pip install 'explaind[tracing]', or leave [tracing].otlp_endpoint empty")


class Tracing:
    """The spans one server makes, or none (``enabled`` False: no provider, every hook a
    branch). Made by :func:`start_tracing`; ``close`` flushes and stops the export."""

    def __init__(self, tracer: Tracer | None = None, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider
        self.enabled = tracer is not None

    def rpc_span(self, service: str, method: str, metadata: Sequence[tuple[str, Any]] | None) -> Span | None:
        """A started SERVER span for the call to ``service``/``method``, child of the
        trace context the caller sent in ``metadata``; None when off."""
        if self._tracer is None:
            return None
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        parent = propagate.extract({key: value for key, value in metadata or () if isinstance(value, str)})
        return self._tracer.start_span(f"{service}/{method}", context=parent, kind=SpanKind.SERVER,
                                       attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})

    @staticmethod
    def end_rpc(span: Span, code: grpc.StatusCode) -> None:
        """End an RPC's span with its final status ``code``."""
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code.name in SERVER_ERROR_CODES:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()

    def operation(self, job_id: str, kind: str) -> OperationTrace | None:
        """The spans of an operation submitted now, children of the current span (the RPC
        that submits it); None when off."""
        if self._tracer is None:
            return None
        return OperationTrace(self._tracer, job_id, kind)

    def close(self) -> None:
        """Export the spans still buffered and stop (at the server's stop)."""
        if self._provider is not None:
            self._provider.shutdown()


NO_TRACING = Tracing()
_NOT_CURRENT = nullcontext()


def trace_id(span: Span | None) -> str | None:
    """The id of ``span``'s trace as 32 hex digits when the trace is sampled (exported, so
    a link to it leads somewhere), for the metrics' exemplars; None for no span (tracing
    off: a branch) or an unsampled one."""
    if span is None:
        return None
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.trace_flags.sampled else None


def count_on_current_span(attribute: str, count: int) -> None:
    """Set ``attribute`` to ``count`` on the current span (inside a servicer, its call's);
    nothing without one, or when opentelemetry was never imported (tracing off: nothing
    imported)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is not None:
        trace.get_current_span().set_attribute(attribute, count)


def current(span: Span | None) -> AbstractContextManager[object]:
    """A context manager making ``span`` the current span in its block (operations
    submitted in it are its children, log lines carry its ids); for None a shared no-op."""
    return _NOT_CURRENT if span is None else _current(span)


@contextmanager
def _current(span: Span) -> Iterator[None]:
    from opentelemetry import context, trace

    token = context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        context.detach(token)


class OperationTrace:
    """One operation's span and its children, one open at a time: "queued", then one per
    stage the job enters (a stage entered again gets another)."""

    def __init__(self, tracer: Tracer, job_id: str, kind: str) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self.span = tracer.start_span(f"operation {kind}", attributes={"explaind.operation.id": job_id, "explaind.operation.kind": kind})
        self._inside = trace.set_span_in_context(self.span)
        self._open: Span | None = tracer.start_span("queued", context=self._inside)
        self._since_ns = 0  # when the last child ended, while none is open (epoch ns)

    def stage(self, name: str | None) -> None:
        """The job's time goes to stage ``name`` from now, or, for None, from now to the
        next stage named, as :class:`explaind.jobs._Stages` counts it (the time before a
        job's first stage is that stage's). Nothing once the operation has ended."""
        now = time.time_ns()
        if self._open is not None:
            self._open.end(end_time=now)
            self._open, self._since_ns = None, now
        if name is not None and self.span.is_recording():
            self._open = self._tracer.start_span(name, context=self._inside, start_time=self._since_ns)

    def end(self, record: JobRecord) -> None:
        """End the open child and the operation's span, with its outcome: its state and
        status code (a failed operation's span has status ERROR)."""
        from opentelemetry.trace import Status, StatusCode

        self.stage(None)
        self.span.set_attribute("explaind.operation.state", record.state)
        self.span.set_attribute("explaind.operation.code", record.error_code or "OK")
        if record.state == FAILED:
            self.span.set_status(Status(StatusCode.ERROR, record.error_code))
        self.span.end()


def start_tracing(section: TracingSection, exporter: Any = None) -> Tracing:
    """The tracing ``section`` asks for: :data:`NO_TRACING` without an endpoint, else
    spans exported over OTLP/gRPC to it in batches (``exporter``, e.g. an in-memory one,
    replaces the OTLP one, each span exported as it ends). The SDK reads the rest of its
    settings from the standard OTEL_* variables: headers, certificates, timeout,
    compression, batch sizes, resource attributes. ConfigError naming the extra when the
    packages are not installed."""
    if not section.otlp_endpoint:
        return NO_TRACING
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as error:
        raise ConfigError(MISSING_PACKAGES.format(error=error)) from None
    # A caller's sampled (or not) trace keeps its decision; a trace starting here is kept
    # with probability sample_ratio.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: section.service_name}),
                              sampler=ParentBased(TraceIdRatioBased(section.sample_ratio)))
    if exporter is None:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=section.otlp_endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider.get_tracer("explaind"), provider)
