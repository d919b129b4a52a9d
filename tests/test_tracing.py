"""[tracing]: an RPC's server span joins its caller's trace, an operation's span has its
queue wait and stages as children, JSON log lines carry the current span's ids, and
without the configuration (or the packages) nothing of it runs."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import free_port, json_log_lines
from explaind.config import ConfigError, TracingSection, default_config
from explaind.store import FAILED, SUCCEEDED, JobRecord

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Set, so tracing is on; never reached: the spans go to the tests' in-memory exporter.
ENDPOINT = "http://127.0.0.1:4317"
# The Accept header Prometheus scrapes with: OpenMetrics, the exposition with exemplars, first.
PROMETHEUS_ACCEPT = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


@pytest.fixture(scope="module")
def traced(tmp_path_factory, classifier_dir):
    """A server with tracing on, its spans in an in-memory exporter (emptied per test),
    serving the world classifier alone (no CLIP or text-to-image to load): (client,
    exporter, its /metrics URL)."""
    from explaind.client import Client
    from explaind.service import ExplaindServer

    data_dir = tmp_path_factory.mktemp("traced")
    config = (default_config().replace("classifier", path=str(classifier_dir)).replace("clip", path="").replace("diffusion", path="")
              .replace("server", port=0, metrics_port=free_port(), data_dir=str(data_dir), data_dir_reserve_bytes=1 << 20)
              .replace("tracing", otlp_endpoint=ENDPOINT))
    exporter = InMemorySpanExporter()
    server = ExplaindServer(config, span_exporter=exporter)
    port = server.start()
    server.load_models()
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            yield client, exporter, f"http://127.0.0.1:{server.metrics_port}/metrics"
    finally:
        server.stop(0)


@pytest.fixture
def spans(traced):
    _, exporter, _ = traced
    exporter.clear()
    return exporter


@pytest.fixture(scope="module")
def caller():
    """The calling program's tracer: a provider of its own, as an application has."""
    return TracerProvider().get_tracer("pipeline")


def _server_spans(exporter, method):
    return [span for span in exporter.get_finished_spans() if span.name == f"explaind.v1.{method}"]


def _scrape(url: str, accept: str | None = None) -> str:
    """The metrics endpoint's exposition, asked for with ``accept`` (None: as curl asks, the text format)."""
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept} if accept else {}), timeout=10) as response:
        if accept == PROMETHEUS_ACCEPT:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        return response.read().decode()


def _exemplar_trace_ids(openmetrics: str, name: str, **labels: str) -> set[str]:
    """The trace_id of each exemplar on the ``name`` samples with ``labels``."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    return {sample.exemplar.labels["trace_id"] for family in text_string_to_metric_families(openmetrics) for sample in family.samples
            if sample.name == name and sample.exemplar is not None and labels.items() <= sample.labels.items()}


def test_a_call_in_a_callers_span_is_a_server_span_of_its_trace(traced, spans, caller):
    client, *_ = traced
    with caller.start_as_current_span("evaluate model") as parent:
        client.model_metadata()
    (span,) = _server_spans(spans, "InferenceService/GetModelMetadata")
    assert span.kind == SpanKind.SERVER
    assert span.parent is not None and span.parent.is_remote
    assert (span.context.trace_id, span.parent.span_id) == (parent.get_span_context().trace_id, parent.get_span_context().span_id)
    assert span.attributes["rpc.grpc.status_code"] == 0 and span.attributes["rpc.service"] == "explaind.v1.InferenceService"
    assert span.resource.attributes["service.name"] == "explaind"
    client.model_metadata()  # no span current in the caller: a trace of its own
    assert _server_spans(spans, "InferenceService/GetModelMetadata")[1].parent is None


def test_a_failed_call_records_its_code(traced, spans):
    from explaind.client import NotFoundError

    client, *_ = traced
    with pytest.raises(NotFoundError):
        client.sample_set("nothing-here")
    (span,) = _server_spans(spans, "SampleSetService/GetSampleSet")
    assert span.attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND: the caller's, so the span's status stays unset
    assert span.status.is_unset
    assert "nothing-here" not in json.dumps(dict(span.attributes))


def test_a_partially_failed_predict_counts_its_failed_images_on_its_ok_span(traced, spans, world_images):
    client, *_ = traced
    images, _ = world_images
    predictions = client.predict([images[0], b"not an image", images[1]], partial_failure=True)
    assert [p.error is None for p in predictions] == [True, False, True]
    client.predict([b"not an image", images[0], b"nor this"], partial_failure=True)  # the count, not a flag
    client.predict([images[0]], partial_failure=True)
    one_failed, two_failed, answered = _server_spans(spans, "InferenceService/Predict")
    assert one_failed.attributes["rpc.grpc.status_code"] == 0 and one_failed.attributes["explaind.predict.failed_images"] == 1
    assert two_failed.attributes["explaind.predict.failed_images"] == 2
    assert "explaind.predict.failed_images" not in answered.attributes


def test_health_checks_make_no_spans(traced, spans):
    # Probes call it every few seconds: their spans would drown the traces.
    client, *_ = traced
    assert client.health() == "SERVING"
    client.model_metadata()
    assert [span.name for span in spans.get_finished_spans() if span.kind == SpanKind.SERVER] == ["explaind.v1.InferenceService/GetModelMetadata"]


def test_an_operation_has_a_span_from_queue_to_end_with_its_stages_under_the_call_that_submitted_it(traced, spans, caller, world_images):
    client, *_ = traced
    images = (world_images[0][:4].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    sample_set = client.create_sample_set(images, world_images[1][:4].tolist(), sample_set_id="traced-set")
    with json_log_lines("explaind.jobs") as lines, json_log_lines("explaind.service.audit") as audit_lines:
        with caller.start_as_current_span("nightly evaluation"):
            operation = client.evaluate_sample_set(sample_set.sample_set_id)
        operation.result(download=False)
    finished = spans.get_finished_spans()
    (submitted,) = _server_spans(spans, "InferenceService/EvaluateSampleSet")
    (span,) = [span for span in finished if span.name == "operation evaluate_sample_set"]
    assert span.parent.span_id == submitted.context.span_id and span.context.trace_id == submitted.context.trace_id
    assert dict(span.attributes) == {"explaind.operation.id": operation.name.removeprefix("operations/"),
                                     "explaind.operation.kind": "evaluate_sample_set",
                                     "explaind.operation.state": "succeeded", "explaind.operation.code": "OK"}
    children = sorted((child for child in finished if child.parent is not None and child.parent.span_id == span.context.span_id),
                      key=lambda child: child.start_time)
    assert [child.name for child in children] == ["queued", "start", "inference", "images", "finish"]
    # Back to back, from the submission to the end: the queue wait and each stage.
    assert children[0].start_time >= span.start_time and children[-1].end_time <= span.end_time
    assert all(before.end_time == after.start_time for before, after in zip(children[1:], children[2:]))
    assert not any("traced-set" in json.dumps(dict(traced_span.attributes)) for traced_span in finished)
    # The job's log lines lead to its spans: queued in the submitting call's, started in the operation's.
    queued = [(line.get("trace_id"), line.get("span_id")) for line in lines if re.fullmatch(r"operation \w+ \(\w+\) queued", line["message"])]
    started = [(line.get("trace_id"), line.get("span_id")) for line in lines if " started after " in line["message"]]
    assert queued == [(f"{submitted.context.trace_id:032x}", f"{submitted.context.span_id:016x}")]
    assert [(line["action"], line["trace_id"], line["span_id"]) for line in audit_lines] == [
        ("submit_operation", f"{submitted.context.trace_id:032x}", f"{submitted.context.span_id:016x}")]
    assert started == [(f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")]


def test_latency_observations_link_to_their_sampled_trace_by_an_exemplar_in_openmetrics_only(traced, spans, world_images):
    """A latency panel's exemplar opens the trace of the call or the job it timed."""
    client, _, metrics_url = traced
    client.sample_sets()
    images = (world_images[0][:2].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    sample_set = client.create_sample_set(images, world_images[1][:2].tolist(), sample_set_id="exemplar-set")
    client.evaluate_sample_set(sample_set.sample_set_id).result(download=False)
    (listed,) = _server_spans(spans, "SampleSetService/ListSampleSets")
    (operation,) = [span for span in spans.get_finished_spans() if span.name == "operation evaluate_sample_set"]
    call_trace, job_trace = f"{listed.context.trace_id:032x}", f"{operation.context.trace_id:032x}"
    openmetrics = _scrape(metrics_url, PROMETHEUS_ACCEPT)
    assert call_trace in _exemplar_trace_ids(openmetrics, "explaind_rpc_duration_seconds_bucket", method="ListSampleSets", code="OK")
    job = {"kind": "evaluate_sample_set"}
    for name in ("explaind_job_duration_seconds_bucket", "explaind_job_queue_wait_seconds_bucket"):
        assert job_trace in _exemplar_trace_ids(openmetrics, name, **job), name
    for stage in ("start", "inference", "finish"):
        assert job_trace in _exemplar_trace_ids(openmetrics, "explaind_job_stage_duration_seconds_bucket", **job, stage=stage), stage
    # Never a label (the series stay bounded), and not in the text format at all.
    assert call_trace not in openmetrics.replace(f'# {{trace_id="{call_trace}"}}', "")
    assert "trace_id" not in _scrape(metrics_url)


def test_an_unsampled_call_has_no_exemplar(traced, spans):
    """A caller's trace that is not kept (its sampled flag off) has nothing to link to."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    client, _, metrics_url = traced
    with TracerProvider(sampler=ALWAYS_OFF).get_tracer("pipeline").start_as_current_span("unkept"):
        client.head_versions()
    assert _server_spans(spans, "NeuroInspectService/ListHeadVersions") == []
    openmetrics = _scrape(metrics_url, PROMETHEUS_ACCEPT)
    assert 'explaind_rpc_duration_seconds_count{code="OK",method="ListHeadVersions",service="explaind.v1.NeuroInspectService"} 1.0' in openmetrics
    assert _exemplar_trace_ids(openmetrics, "explaind_rpc_duration_seconds_bucket", method="ListHeadVersions") == set()


def test_json_log_lines_carry_the_current_spans_ids_and_none_without_one():
    from explaind.logs import JsonFormatter

    record = logging.LogRecord("explaind", logging.INFO, __file__, 1, "hello", None, None)
    assert set(json.loads(JsonFormatter().format(record))) == {"time", "level", "logger", "message"}
    with TracerProvider().get_tracer("test").start_as_current_span("work") as span:
        line = json.loads(JsonFormatter().format(record))
    assert (line["trace_id"], line["span_id"]) == (trace.format_trace_id(span.get_span_context().trace_id),
                                                   trace.format_span_id(span.get_span_context().span_id))


def test_a_json_lines_time_is_utc_to_the_millisecond_and_an_unsampled_span_leaves_no_ids():
    """RFC 3339 in UTC with a Z, to the millisecond (lines of one call sort in order); the
    ids of a span whose trace is not kept would lead nowhere."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from explaind.logs import JsonFormatter

    record = logging.LogRecord("explaind", logging.INFO, __file__, 1, "hello", None, None)
    record.created = 1_764_929_106.25
    assert json.loads(JsonFormatter().format(record))["time"] == "2025-12-05T10:05:06.250Z"
    with TracerProvider(sampler=ALWAYS_OFF).get_tracer("test").start_as_current_span("unkept"):
        assert set(json.loads(JsonFormatter().format(record))) == {"time", "level", "logger", "message"}


def test_tracing_configured_without_its_packages_stops_the_start_naming_the_extra(tmp_path, monkeypatch):
    from explaind.service import ExplaindServer

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the extra were not installed
    config = default_config().replace("server", port=0, data_dir=str(tmp_path / "data")).replace("tracing", otlp_endpoint=ENDPOINT)
    with pytest.raises(ConfigError, match=r"^\[tracing\].otlp_endpoint is set but the OpenTelemetry packages are not installed "
                                          r"\(.*opentelemetry.sdk.trace.*\): install the tracing extra, pip install 'explaind\[tracing\]', "
                                          r"or leave \[tracing\].otlp_endpoint empty$"):
        ExplaindServer(config)
    assert not (tmp_path / "data").exists()  # refused before the store took the data dir


def test_without_tracing_nothing_imports_opentelemetry_and_calls_and_jobs_run(tmp_path, monkeypatch):
    """Off (the default) the server makes no span: it runs with opentelemetry unimportable,
    and its latency observations have no exemplar."""
    from explaind.tracing import NO_TRACING, start_tracing

    # A platform's variable (often an OTLP/HTTP port) turns nothing on: the key or the flag does.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert start_tracing(TracingSection()) is NO_TRACING
    assert NO_TRACING.rpc_span("explaind.v1.InferenceService", "Predict", ()) is None  # off: no span, for a caller that does not check enabled first
    script = textwrap.dedent(f"""
        import sys
        import urllib.request
        sys.modules["opentelemetry"] = None  # any import of it fails
        from google.protobuf import empty_pb2
        from explaind.client import Client, NotFoundError
        from explaind.config import default_config
        from explaind.service import ExplaindServer

        server = ExplaindServer(default_config().replace("server", port=0, metrics_port={free_port()}, data_dir={str(tmp_path)!r}))
        port = server.start()
        try:
            with Client(f"127.0.0.1:{{port}}", timeout=30) as client:
                try:
                    client.sample_set("nothing-here")
                except NotFoundError:
                    pass
            job = server.engine.jobs.submit("noop", lambda context: (context.stage("work"), empty_pb2.Empty())[1])
            assert server.engine.jobs.wait(job.record.job_id, timeout=30).record.state == "succeeded"
            scrape = urllib.request.Request(f"http://127.0.0.1:{{server.metrics_port}}/metrics", headers={{"Accept": {PROMETHEUS_ACCEPT!r}}})
            print(urllib.request.urlopen(scrape, timeout=10).read().decode())
        finally:
            server.stop(0)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stderr[-3000:]
    openmetrics = done.stdout.removesuffix("ok\n")
    assert 'explaind_rpc_duration_seconds_count{code="NOT_FOUND",method="GetSampleSet",service="explaind.v1.SampleSetService"} 1.0' in openmetrics
    assert 'explaind_job_duration_seconds_count{kind="noop",outcome="succeeded"} 1.0' in openmetrics
    assert "# {" not in openmetrics  # no exemplar


def test_spans_reach_the_configured_otlp_endpoint_once_tracing_closes():
    """The production path: the OTLP/gRPC exporter, batched, to a collector in plaintext."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from explaind.tracing import Tracing, start_tracing

    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        tracing = start_tracing(TracingSection(otlp_endpoint=f"http://127.0.0.1:{port}", service_name="explaind-test"))
        Tracing.end_rpc(tracing.rpc_span("explaind.v1.InferenceService", "Predict", ()), grpc.StatusCode.INTERNAL)
        tracing.close()  # as the server's stop does: the batch goes out
    finally:
        collector.stop(None)
    (resource_spans,) = [spans for request in received for spans in request.resource_spans]
    assert {attribute.key: attribute.value.string_value for attribute in resource_spans.resource.attributes}["service.name"] == "explaind-test"
    (span,) = [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert span.name == "explaind.v1.InferenceService/Predict" and span.status.code == span.status.STATUS_CODE_ERROR


def test_a_streamed_response_is_produced_inside_its_calls_span(traced, spans, monkeypatch, world_images):
    """WatchOperation's servicer runs between the messages it sends: what it logs (or the
    spans it starts) then belongs to its call's span, as a unary servicer's does."""
    from explaind.jobs import JobManager
    from explaind.logs import JsonFormatter

    client, *_ = traced
    lines: list[dict] = []
    watch = JobManager.watch

    def logging_watch(self, job_id, **options):
        for snapshot in watch(self, job_id, **options):
            lines.append(json.loads(JsonFormatter().format(logging.LogRecord("explaind.jobs", logging.INFO, __file__, 1, "sent", None, None))))
            yield snapshot

    monkeypatch.setattr(JobManager, "watch", logging_watch)
    images = (world_images[0][:2].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    sample_set = client.create_sample_set(images, world_images[1][:2].tolist(), sample_set_id="watched-set")
    operation = client.evaluate_sample_set(sample_set.sample_set_id)
    assert list(operation.watch())[-1].done
    watched = _server_spans(spans, "OperationsService/WatchOperation")
    assert lines and len(watched) >= 1
    ids = {(f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}") for span in watched}
    assert {(line.get("trace_id"), line.get("span_id")) for line in lines} <= ids


def test_an_rpc_span_is_an_error_for_the_servers_failures_only_and_names_its_method():
    """OpenTelemetry's gRPC conventions: a server span's status is ERROR for the codes
    that are the server's failures, unset for the caller's (a bad argument, a missing id)."""
    from explaind.tracing import Tracing, start_tracing

    exporter = InMemorySpanExporter()
    tracing = start_tracing(TracingSection(otlp_endpoint=ENDPOINT), exporter=exporter)
    for code in grpc.StatusCode:
        Tracing.end_rpc(tracing.rpc_span("explaind.v1.OperationsService", "GetOperation", ()), code)
    tracing.close()
    spans = exporter.get_finished_spans()
    assert len(spans) == len(grpc.StatusCode)
    assert {span.attributes["rpc.grpc.status_code"] for span in spans if not span.status.is_unset} == {
        code.value[0] for code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                                   grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS)}
    assert {(span.name, span.attributes["rpc.system"], span.attributes["rpc.service"], span.attributes["rpc.method"]) for span in spans} == {
        ("explaind.v1.OperationsService/GetOperation", "grpc", "explaind.v1.OperationsService", "GetOperation")}


def test_an_operations_stages_follow_each_other_without_a_gap_and_none_starts_once_it_ended():
    """Time between stages (stage None) goes to the next stage named, so the children
    cover the operation back to back; a stage named after the end makes no span."""
    from explaind.tracing import start_tracing

    exporter = InMemorySpanExporter()
    tracing = start_tracing(TracingSection(otlp_endpoint=ENDPOINT), exporter=exporter)
    operations = [tracing.operation(job_id, "evaluate_sample_set") for job_id in ("0000000000000001", "0000000000000002")]
    for operation, state, code in zip(operations, (SUCCEEDED, FAILED), ("", "INTERNAL")):
        operation.stage("start")
        operation.stage(None)
        operation.stage("run")
        operation.end(JobRecord(job_id="", kind="evaluate_sample_set", state=state, create_time=0.0, error_code=code))
        operation.stage("late")
        operation.stage(None)
    tracing.close()
    spans = exporter.get_finished_spans()
    assert "late" not in [span.name for span in spans]
    for operation, state, code in zip(operations, (SUCCEEDED, FAILED), ("OK", "INTERNAL")):
        children = [span for span in spans if span.parent is not None and span.parent.span_id == operation.span.get_span_context().span_id]
        assert [child.name for child in children] == ["queued", "start", "run"]
        assert children[1].start_time == children[0].end_time and children[2].start_time == children[1].end_time
        (ended,) = [span for span in spans if span.context.span_id == operation.span.get_span_context().span_id]
        assert (ended.attributes["explaind.operation.state"], ended.attributes["explaind.operation.code"]) == (state, code)
        assert ended.status.is_unset == (state == SUCCEEDED)


def test_a_trace_id_is_32_hex_digits_of_a_sampled_trace_and_a_current_span_is_current_only_inside_its_block():
    from explaind.tracing import current, trace_id

    def span(flags):
        return NonRecordingSpan(SpanContext(trace_id=0xABC, span_id=1, is_remote=False, trace_flags=TraceFlags(flags)))

    assert trace_id(span(TraceFlags.SAMPLED)) == "00000000000000000000000000000abc"
    assert trace_id(span(TraceFlags.DEFAULT)) is None and trace_id(None) is None
    outer = span(TraceFlags.SAMPLED)
    with current(outer):
        with current(span(TraceFlags.SAMPLED)):
            pass
        assert trace.get_current_span() is outer
    assert trace.get_current_span() is not outer


def test_a_servers_stop_shuts_its_span_export_down_once_after_its_last_call(tmp_path):
    """The production exporter sends in batches: only the provider's shutdown at the stop
    sends the last ones. A second stop must not shut it down again."""
    from explaind.service import ExplaindServer

    class CountingExporter(InMemorySpanExporter):
        def __init__(self) -> None:
            super().__init__()
            self.shutdowns = 0

        def shutdown(self) -> None:
            self.shutdowns += 1
            super().shutdown()

    config = (default_config().replace("clip", path="").replace("diffusion", path="")
              .replace("server", port=0, metrics_port=0, data_dir=str(tmp_path / "data"), data_dir_reserve_bytes=1 << 20)
              .replace("tracing", otlp_endpoint=ENDPOINT))
    exporter = CountingExporter()
    server = ExplaindServer(config, span_exporter=exporter)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:  # the models are not loaded
                channel.unary_unary("/explaind.v1.InferenceService/GetModelMetadata")(b"", timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)
    assert exporter.shutdowns == 1
    assert [span.name for span in exporter.get_finished_spans()] == ["explaind.v1.InferenceService/GetModelMetadata"]
    server.stop(0)
    assert exporter.shutdowns == 1
