"""Prometheus metrics of one server (own registry, so several servers can share a process).

Conventions: base units (seconds), ``_total`` counters, histograms rather than
summaries, label values from bounded sets only (rpc service/method, status code, job
kind, stage and outcome; never sample, neuron or operation ids). With tracing on, the RPC
and job latency histograms carry a sampled trace's id as an exemplar instead.
"""

from __future__ import annotations

import errno
import logging
import math
import shutil
import socket
import threading
import time
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)

log = logging.getLogger(__name__)

# No `_created` series beside each counter and histogram: Prometheus stores them as
# gauges of their own (a tenth more series) that no query of ours reads. Process-wide.
disable_created_metrics()

# RPCs range from sub-millisecond Predict calls to hour-long synchronous waits.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
# Jobs range from a ranking of a few mistakes (milliseconds) to a day of visualisations.
JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600)
# A job on an idle server starts within a millisecond; behind others, after their hours.
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
# A job's stage: from a millisecond (storing its start) to most of a day-long job.
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The RPCs of an upload, the values of sample_set_requests_repeated's ``method``.
UPLOAD_METHODS = ("CreateSampleSet", "AppendSamples")


def exemplar(trace_id: str | None) -> dict[str, str] | None:
    """An observation's exemplar: ``{"trace_id": trace_id}`` (the label Grafana's links from
    exemplars to traces read), None without a trace. Exemplars show in the OpenMetrics
    exposition only (a scraper that asks for it, as Prometheus does); trace ids never go in
    labels, which stay bounded."""
    return None if trace_id is None else {"trace_id": trace_id}


class Metrics:
    """The server's Prometheus series, in their own registry (so tests can start several
    servers in one process); ``serve_http`` exposes them at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The process's own series (process_resident_memory_bytes, process_cpu_seconds_total,
        # process_start_time_seconds, ...): an operator's first look at a leak or a restart.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.rpc_duration = Histogram(
            "explaind_rpc_duration_seconds", "Server-side RPC latency.", ("service", "method", "code"), buckets=RPC_BUCKETS, registry=r
        )
        # Counted when a call arrives, before its request is read: started minus the calls in
        # rpc_duration are those gRPC failed before any handler ran (a request over
        # [server].max_message_bytes, one that does not parse), which no handler can time.
        self.rpcs_started = Counter("explaind_rpcs_started_total", "RPCs received.", ("service", "method"), registry=r)
        self.rpcs_in_flight = Gauge("explaind_rpcs_in_flight", "RPCs being handled.", ("service", "method"), registry=r)
        self.job_duration = Histogram(
            "explaind_job_duration_seconds", "Job run time from start to end.", ("kind", "outcome"), buckets=JOB_BUCKETS, registry=r
        )
        # Every job's end, also those that never ran (cancelled or aborted while queued),
        # which job_duration does not see. ``code`` is the operation's status code (OK when
        # it succeeded), so alerts can tell the server's failures (INTERNAL) from refused
        # input (INVALID_ARGUMENT) or restarts (ABORTED).
        self.jobs_ended = Counter(
            "explaind_jobs_ended_total", "Jobs that reached a final state.", ("kind", "outcome", "code"), registry=r
        )
        # Where a job's time went, observed at its end (also a failed or cancelled one's):
        # its seconds in each stage it entered, summed over its visits. ``stage`` comes from
        # a few fixed names per kind (JobContext.stage) plus start, run and finish, which the
        # job manager times; a job's stages add up to its job_duration. A registered kind's
        # (JobManager.register_kinds) are exported at zero from the start.
        self.job_stage_duration = Histogram(
            "explaind_job_stage_duration_seconds", "Job run time spent in each stage.", ("kind", "stage"), buckets=STAGE_BUCKETS, registry=r
        )
        # Observed when a job starts: with job_duration, the whole wait a caller sees.
        self.job_queue_wait = Histogram(
            "explaind_job_queue_wait_seconds", "Time from a job's submission to its start.", ("kind",), buckets=QUEUE_WAIT_BUCKETS, registry=r
        )
        # A client sent a job-starting request again under its request_id and got the first
        # one's operation: the SDK's retries after a dropped connection (a rise is a flaky
        # network), or a caller's own request_id sent again (a pipeline run again).
        self.job_requests_repeated = Counter(
            "explaind_job_requests_repeated_total", "Job-starting requests answered with the operation of an earlier one of their request_id.",
            ("kind",), registry=r,
        )
        # The same for an upload's requests (CreateSampleSet, AppendSamples) answered with the
        # set an earlier one of their request_id was applied to, appending nothing: resends
        # after dropped answers, and an upload run again (or two runs of it at once) under
        # the caller's request_id. Both methods from start-up, at zero.
        self.sample_set_requests_repeated = Counter(
            "explaind_sample_set_requests_repeated_total",
            "Upload requests answered with the set an earlier one of their request_id was applied to.", ("method",), registry=r,
        )
        for method in UPLOAD_METHODS:
            self.sample_set_requests_repeated.labels(method=method)
        self.jobs_queued = Gauge("explaind_jobs_queued", "Jobs waiting for an executor slot.", registry=r)
        self.jobs_running = Gauge("explaind_jobs_running", "Jobs running.", ("kind",), registry=r)
        self.batch_size = Histogram("explaind_batch_size_images", "Images per forward pass of Predict's batcher (jobs' forwards are not counted).", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("explaind_predict_queue_depth_images", "Images waiting for the model.", registry=r)
        # [server].max_decode_bytes: held near it, with waits rising, the budget binds (calls
        # queue for room to decode their images); observed for each reservation of 16 MiB or
        # more, one that gave up (DEADLINE_EXCEEDED, CANCELLED) included.
        self.decode_memory_held = Gauge("explaind_decode_memory_bytes", "Decode memory the calls and jobs decoding images hold.", registry=r)
        self.decode_memory_wait = Histogram("explaind_decode_memory_wait_seconds", "Time a call or job waited for room to decode its images, those that gave up included.",
                                            buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.predicted_images = Counter("explaind_predicted_images_total", "Images classified by Predict.", registry=r)
        # Images a partial_failure Predict answered with an error rather than failing the
        # call, by the status code of that error (INVALID_ARGUMENT: it did not decode;
        # FAILED_PRECONDITION: its logits were unusable). Calls that failed whole are in
        # rpc_duration's code, not here.
        self.predict_image_errors = Counter("explaind_predict_image_errors_total", "Images a partial_failure Predict answered with an error.",
                                            ("code",), registry=r)
        for code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):  # exported at zero, so a rate over them starts at once
            self.predict_image_errors.labels(code=code)
        self.feature_cache_hits = Counter("explaind_feature_cache_hits_total", "Sample features served from the cache.", registry=r)
        self.feature_cache_misses = Counter("explaind_feature_cache_misses_total", "Sample features computed.", registry=r)
        self.operations_deleted = Counter(
            "explaind_operations_deleted_total", "Finished operations deleted, by DeleteOperation or retention.", ("reason",), registry=r
        )
        self.stored_files_deleted = Counter(
            "explaind_stored_files_deleted_total", "Stored files (images, artifacts, head weights) the sweeps removed.", registry=r
        )
        self.model_info = Info("explaind_model", "The served classifier.", registry=r)
        self.component_loaded = Gauge("explaind_component_loaded", "1 when the model component is loaded.", ("component",), registry=r)
        # Read at each scrape: a full data dir refuses every write (RESOURCE_EXHAUSTED),
        # and the image has no node exporter to warn of it first.
        self.data_dir_free = Gauge("explaind_data_dir_free_bytes", "Free space on the data dir's file system.", registry=r)
        self.data_dir_size = Gauge("explaind_data_dir_size_bytes", "Size of the data dir's file system.", registry=r)

    def watch_data_dir(self, path: Path) -> None:
        self.data_dir_free.set_function(lambda: _disk_usage_bytes(path, "free"))
        self.data_dir_size.set_function(lambda: _disk_usage_bytes(path, "total"))

    def serve_http(self, host: str, port: int) -> tuple[object, int]:
        """Expose ``/metrics`` on ``host:port`` (0 picks a free port); returns (server, port).

        A wildcard host listens on IPv6 and IPv4 alike, as gRPC does on it: an IPv6-only
        cluster's Prometheus scrapes the pod's IPv6 address."""
        host = host.removeprefix("[").removesuffix("]")  # "[::1]", as gRPC takes it, is no address to getaddrinfo
        wildcard, server = host in ("0.0.0.0", "::"), None
        if wildcard and socket.has_ipv6:
            try:
                server = make_server("::", port, make_wsgi_app(self.registry), _DualStackServer, handler_class=_QuietHandler)
            except OSError as error:  # IPv6 off in the kernel or the pod: IPv4 only; a port in use is the caller's
                if error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
        if server is None:  # a named host, or a wildcard with IPv6 off: IPv4's
            family, _, _, _, address = socket.getaddrinfo("0.0.0.0" if wildcard else host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            server_class = type("_MetricsServerOfFamily", (_MetricsServer,), {"address_family": family})
            server = make_server(str(address[0]), port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server, server.server_address[1]


def _disk_usage_bytes(path: Path, field: str) -> float:
    """``shutil.disk_usage(path)``'s ``field`` ("free" or "total"), in bytes; NaN when the
    file system cannot be read (a stale NFS handle, a failing disk, the dir gone). Raised,
    the error failed the whole scrape, every other series with it, when they are most
    needed, and printed a traceback outside the JSON log at each scrape."""
    try:
        return float(getattr(shutil.disk_usage(path), field))
    except OSError:
        return math.nan


# Seconds /metrics waits before it accepts again once the process is at its open-file
# limit (EMFILE) or the system's (ENFILE); gRPC's listener waits 1 s.
ACCEPT_RETRY_S = 0.5


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape; at the open-file limit it waits ACCEPT_RETRY_S before it
    accepts again, and says so once. Why: the scrape waiting in the backlog kept the
    listener readable and each accept failed at once, so serve_forever spun a core at
    100 % (measured: 4.5 CPU s in 5 s) until descriptors were freed."""

    daemon_threads = True
    _at_fd_limit = False

    def get_request(self) -> tuple[socket.socket, object]:
        try:
            accepted = super().get_request()
        except OSError as error:
            if error.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            if not self._at_fd_limit:
                log.warning("/metrics cannot accept a scrape: %s (raise the open-file limit, ulimit -n); retrying every %gs",
                            error.strerror, ACCEPT_RETRY_S)
                self._at_fd_limit = True
            time.sleep(ACCEPT_RETRY_S)
            raise
        if self._at_fd_limit:
            log.info("/metrics accepts scrapes again")
            self._at_fd_limit = False
        return accepted


class _DualStackServer(_MetricsServer):
    """An IPv6 socket that also takes IPv4 (mapped) connections, whatever the system's
    ``bindv6only`` default."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape."""

    def log_message(self, format: str, *args: object) -> None:
        pass
