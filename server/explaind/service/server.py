"""Server bootstrap: gRPC server, health, reflection, metrics endpoint, graceful shutdown.

Start-up order: the store recovers (jobs left running are marked FAILED), gRPC starts
with health NOT_SERVING, the models load, health turns SERVING. On SIGTERM/SIGINT/SIGHUP
health turns NOT_SERVING, new calls are refused, and in-flight calls and jobs get
``server.grace_period_s`` to finish; calls left are cancelled and jobs left end FAILED
with code ABORTED ("submit it again"), as after a crash.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import importlib
import logging
import os
import resource
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from explaind.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    neuroinspect_pb2,
    neuroinspect_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    sample_sets_pb2,
    sample_sets_pb2_grpc,
)

from ..config import Config, ConfigError, ignored_keys, unusable_model_path
from ..engine import Engine, NeuroInspectEngine
from ..engine.backends import check_backend, check_device
from ..errors import store_remedy
from ..logs import configure_logging
from ..loopback import is_loopback_host
from ..metrics import Metrics
from ..signals import stop_on_signals
from ..store import SQLiteStore, StoreOpenError
from ..tracing import start_tracing
from .auth import BearerToken, NamedCallers, TlsCredentials
from .inference import InferenceServicer
from .interceptors import CallerShares, HeldCalls, ServiceInterceptor
from .neuroinspect import NeuroInspectServicer
from .operations import OperationsServicer
from .sample_sets import SampleSetServicer

log = logging.getLogger("explaind")

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    sample_sets_pb2.DESCRIPTOR.services_by_name["SampleSetService"].full_name,
    operations_pb2.DESCRIPTOR.services_by_name["OperationsService"].full_name,
    neuroinspect_pb2.DESCRIPTOR.services_by_name["NeuroInspectService"].full_name,
)


# Seconds in-flight calls get at shutdown once every job has ended (see ``stop``), and the
# most seconds they wait past the grace period for jobs the shutdown aborts to end.
FINAL_STATE_MARGIN_S = 1.0
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"
ABORTED_JOBS_WAIT_S = 30.0
# How often operations past their retention, abandoned uploads, and the files of deleted
# sets, head versions and operations, are removed (seconds).
SWEEP_INTERVAL_S = 60.0
# The server pings each connection this often, with or without a call open, and drops it
# when a ping goes unanswered this long: a client gone without closing it (its host down, a
# network partition) otherwise held its WatchOperation's or health Watch's thread and
# HeldCalls slot until the job ended or the call's deadline, if any, and an idle connection's
# descriptor until the server stopped.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 60_000
# How often clients may ping, with or without a call open: the SDK pings every 30 s; at
# gRPC's default, 5 minutes, a watch with no update for a minute or two had its connection
# closed (GOAWAY too_many_pings); without a call it permits one ping in 2 hours unless
# keepalive_permit_without_calls is set.
CLIENT_PING_INTERVAL_MIN_MS = 10_000
# The least open-file limit (RLIMIT_NOFILE) serve() starts with: the process holds about 15
# descriptors once started, then one per client connection, scrape, and stored file it
# reads or writes. Below about 16 it could not start, and said why in the wrong words: gRPC
# aborted ("Eventfd wakeup fd is not supported"), the bind blamed the port, the store "unable
# to open database file".
MIN_OPEN_FILES = 64
# The name of the thread serve() loads the models in, which a stop while they load leaves
# running (see end_serving_process).
MODEL_LOAD_THREAD = "load-models"


class ExplaindServer:
    """One explaind process: ``start()`` (health NOT_SERVING), ``load_models()``
    (SERVING), ``stop()``. ``port`` / ``metrics_port`` are the bound ports. With
    ``[tracing]`` on, ``span_exporter`` (an OpenTelemetry SpanExporter) takes the spans
    instead of the OTLP endpoint (explaind.tracing.start_tracing)."""

    def __init__(self, config: Config, *, span_exporter: Any = None) -> None:
        self.config = config
        # ConfigError (an unreadable token or TLS file, tracing without its packages) before the store takes the data dir's lock.
        settings = config.server
        self._token = (NamedCallers(settings.named_callers(), settings.callers_file, settings.admins) if settings.callers_file
                       else BearerToken(settings.bearer_token(), settings.token_file))
        self._tls = TlsCredentials(config.server) if config.server.tls_cert_file else None
        self.tracing = start_tracing(config.tracing, span_exporter)
        self.metrics = Metrics()
        try:
            self.store = SQLiteStore(config.server.data_dir, reserve_bytes=config.server.data_dir_reserve_bytes,
                                     max_samples_per_owner=config.server.max_samples_per_caller,
                                     max_head_versions_per_owner=config.server.max_head_versions_per_caller)
        except StoreOpenError as error:  # no permission, a file in the path, in use, a damaged database
            raise _naming_data_dir(str(error)) from None
        self.metrics.watch_data_dir(self.store.data_dir)
        self.engine = Engine(config, self.store, self.metrics, self.tracing)
        self.neuroinspect = NeuroInspectEngine(self.engine)
        self.health = _HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.serving = False  # models loaded, health SERVING
        self._heap_frozen = False  # load_models froze the start-up heap (gc.freeze); stop() unfreezes it
        # Held by load_models' steps after the engine loaded (the freeze, restore, the first
        # sweep), which stop() waits for once it has set _closing: a stop before the steps
        # skips them; one during them waits up to restore(), the sweep skipped if not begun
        # and cut short, after the chunk of operations or files it is deleting, if begun.
        self._starting = threading.Lock()
        self._starting_thread: int | None = None  # the thread in those steps: a stop() on it would wait for itself
        self._metrics_http = None
        self.health_port = 0
        self._health_grpc: grpc.Server | None = None
        self._grpc: grpc.Server | None = None
        self._stopped = threading.Event()
        self._closing = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="sweeper", daemon=True)

    def start(self) -> int:
        """Serve gRPC (and /metrics); models are not loaded yet. Returns the gRPC port."""
        settings = self.config.server
        try:  # the store's first writes: a read-only or corrupt database fails here
            self.engine.jobs.recover()
            abandoned = self.store.delete_unfinished_uploads()
        except Exception as error:  # noqa: BLE001
            raise _store_failure(settings.data_dir, error) from error
        if abandoned:
            log.warning("deleted %d sample set(s) whose upload an earlier process left unfinished: %s", len(abandoned), ", ".join(abandoned))
        if settings.metrics_port:
            try:
                self._metrics_http, self.metrics_port = self.metrics.serve_http(settings.host, settings.metrics_port)
            except OSError as error:
                raise _bind_refused("metrics_port", settings.host, settings.metrics_port, error) from None
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *keepalive_options(),
        ]
        held_calls = HeldCalls(max(1, settings.max_workers // 2))
        interceptor = ServiceInterceptor(self.metrics, self._token, settings.max_message_bytes, held_calls,
                                         CallerShares(settings.calls_per_caller), self.tracing)
        server = grpc.server(ThreadPoolExecutor(settings.max_workers, thread_name_prefix="rpc"), interceptors=[interceptor], options=options,
                             maximum_concurrent_rpcs=settings.concurrent_rpcs)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.engine, serving=lambda: self.neuroinspect.restored), server)
        sample_sets_pb2_grpc.add_SampleSetServiceServicer_to_server(SampleSetServicer(self.engine), server)
        operations_pb2_grpc.add_OperationsServiceServicer_to_server(OperationsServicer(self.engine.jobs, max_message_bytes=settings.max_message_bytes, held_calls=held_calls), server)
        neuroinspect_pb2_grpc.add_NeuroInspectServiceServicer_to_server(NeuroInspectServicer(self.neuroinspect, max_message_bytes=settings.max_message_bytes, held_calls=held_calls), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _enable_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME))
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = _bind(server, settings.host, settings.port, self._tls.server_credentials() if self._tls else None, key="port")
            if settings.health_port:
                self._health_grpc, self.health_port = self._serve_health(settings.host, settings.health_port)
        except OSError:
            if self.port:  # gRPC frees a port only by stopping a started server
                server.start()
                server.stop(None).wait()
            self._close_metrics_http()
            raise
        server.start()
        self._grpc = server
        return self.port

    def _close_metrics_http(self) -> None:
        """Stop /metrics and free its port (shutdown alone leaves the socket bound)."""
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    def _serve_health(self, host: str, port: int) -> tuple[grpc.Server, int]:
        """Health's Check alone, in plaintext on its own port: probes that cannot speak TLS
        (kubelet's gRPC probes) still see whether a TLS server is SERVING. No Watch: a
        stream would hold one of the port's few threads, which the probes need. Keepalive as
        on the gRPC port: a Client kept on it pings its idle connection, which gRPC's defaults
        answer by closing it (GOAWAY too_many_pings)."""
        server = grpc.server(ThreadPoolExecutor(4, thread_name_prefix="health"), options=[("grpc.so_reuseport", 0), *keepalive_options()])
        health_pb2_grpc.add_HealthServicer_to_server(_ProbeHealth(self.health), server)
        bound = _bind(server, host, port, None, key="health_port")
        server.start()
        return server, bound

    def load_models(self) -> None:
        """Load models (raises ModelLoadError naming the file), serve the stored active
        head version, then report SERVING. A stop() begun meanwhile (serve's, on SIGTERM,
        returns at once while the models load) ends it once the engine's load returns: the
        batcher engine.load started after stop() closed the engine (a thread that ran for
        the process's life) is closed, the jobs left to stop()'s grace, and the store stop()
        closes is left alone, nor is a load that store failed reported."""
        try:
            self.engine.load()
        except Exception:
            if not self._closing.is_set():
                raise
        try:
            # Noted before the lock is taken and cleared once it is let go: a signal handler
            # may run between any two steps, the moment the lock is taken included.
            self._starting_thread = threading.get_ident()
            with self._starting:
                if self._closing.is_set():
                    self.engine.close_batcher()
                    return
                self._serve_loaded_models()
        finally:
            self._starting_thread = None

    def _serve_loaded_models(self) -> None:
        """:meth:`load_models` once the engine has loaded, stop() not begun. A stop() asked
        meanwhile waits for the steps up to restore() (about a second), not for the whole
        sweep after them (operations past retention, then files, 0.1 s per 1000 it deletes):
        it ends after the chunk under way (500 operations or files, or 50,000 cached
        features' rows), the rest left to the next start-up's sweep."""
        if self.engine.models.active.supports_features:  # else no edit or visualisation runs
            # Building a torch.optim optimiser (an edit's Adam, a visualisation's AdamW) imports
            # torch._dynamo, 1-2 s, unless loading CLIP (open_clip) already did: imported here,
            # not by the first such job. Before restore(), while Predict is still refused: the
            # import holds the GIL, and in a background thread it raised Predict's latency tenfold.
            importlib.import_module("torch._dynamo")
        # The modules imported by now (torch, torch._dynamo, grpc, open_clip) leave ~340k
        # objects (~400k with CLIP) that live as long as the process, and every full
        # (generation 2) collection walked them all: 110-300 ms holding the GIL, every thread
        # stalled; the first came within half a minute of serving, the next each time the
        # long-lived objects grew by a quarter, and Predict's longest call took 130-280 ms.
        # Frozen, a full collection takes 3-7 ms (bench/gc_pauses.py, 2-core CPU); collected
        # without the freeze, the first is postponed, no shorter. Collected first (140-190 ms)
        # so that no garbage is frozen; before restore() lets Predict in.
        gc.collect()
        gc.freeze()
        self._heap_frozen = True
        try:  # reads the head versions, which start() did not
            self.neuroinspect.restore()
        except sqlite3.Error as error:
            raise _store_failure(self.config.server.data_dir, error) from error
        if self._closing.is_set():
            return
        # After restore, which may have deleted head versions: their weights are unused now.
        self._sweep_once(everything=True)
        if self._closing.is_set():  # the sweep was cut short by a stop() now waiting for it
            return
        self._sweeper.start()
        active = self.engine.models.active
        # Logged before health says SERVING: a caller that sees SERVING finds this line.
        log.info("serving %s (version %s, %d classes) on %s", active.name, active.version, len(active.class_names), self.engine.device)
        self.serving = True
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _sweep(self) -> None:
        """Every SWEEP_INTERVAL_S, :meth:`_sweep_once`."""
        while not self._closing.wait(SWEEP_INTERVAL_S):
            self._sweep_once()

    def _sweep_once(self, *, everything: bool = False) -> None:
        """Record the ends of operations the store refused (see JobManager._finish), delete
        the operations past ``[jobs].retention_days`` and the uploads idle for
        ``[server].upload_idle_timeout_s``, then the files nothing uses
        any more: only those that lost their last reference before the oldest unfinished
        job was submitted (it may still read a set deleted since); then set the store's
        reserve aside again if it was released. ``everything`` (at
        start-up) also takes every file on disk nothing references, as having lost it
        then; jobs may already run (calls are served while models load). A step that
        fails is logged and retried at the next sweep; the other still runs. Deleting
        operations and files stops between chunks once stop() has begun (it waits for the sweep)."""
        try:
            if recorded := self.engine.jobs.record_unrecorded_ends():
                log.info("recorded the end of %d operation(s) the store had refused (a full data dir, say)", recorded)
        except Exception:  # noqa: BLE001 - serving goes on
            log.exception("recording the ends of operations the store had refused failed")
        try:
            if retention_days := self.config.jobs.retention_days:
                if deleted := self.engine.jobs.delete_ended_before(time.time() - retention_days * 86_400, interrupt=self._closing):
                    log.info("deleted %d operation(s) that ended over %g day(s) ago ([jobs].retention_days)", deleted, retention_days)
        except Exception:  # noqa: BLE001 - serving goes on
            log.exception("deleting operations past their retention failed")
        try:
            if idle_s := self.config.server.upload_idle_timeout_s:
                if abandoned := self.store.delete_unfinished_uploads(idle_s=idle_s):
                    log.warning("deleted %d sample set(s) whose upload had no request for %gs ([server].upload_idle_timeout_s): %s",
                                len(abandoned), idle_s, ", ".join(abandoned))
        except Exception:  # noqa: BLE001
            log.exception("deleting abandoned uploads failed")
        try:
            before = self.engine.jobs.oldest_unfinished_create_time() or self.store.now()  # the stamps' clock, which a wall clock set back does not take back
            if removed := self.store.delete_unused_blobs(before=before, everything=everything, interrupt=self._closing):
                self.metrics.stored_files_deleted.inc(removed)
                log.info("deleted %d stored file(s) nothing uses any more", removed)
            self.store.keep_reserve()  # released when the file system was full; taken again once there is room
        except Exception:  # noqa: BLE001
            log.exception("deleting unused stored files failed")

    def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, give jobs ``grace_s`` (default from
        config) to finish and abort the rest, give in-flight calls a second more once every
        job has ended, then cancel them. Predict's batcher closes only then: a Predict
        accepted before the stop, still decoding its images, is answered, not refused.
        RuntimeError on the thread in load_models' steps after the engine's load (a signal
        handler's stop() interrupting them), which would wait for itself."""
        if self._stopped.is_set():
            return
        grace = self.config.server.grace_period_s if grace_s is None else grace_s
        self._closing.set()
        if self._starting_thread == threading.get_ident():
            raise RuntimeError("stop() was called on the thread running load_models' start-up steps (from a signal handler?), "
                               "and would wait for them forever; set an event there and call stop() from another thread, as serve() does")
        with self._starting:  # waits for a start-up step of load_models under way: what it started, this stops
            pass
        self.health.enter_graceful_shutdown()
        # Calls outlast the jobs, so a client waiting on a job the shutdown aborts receives
        # its final state rather than UNAVAILABLE, however long the job takes to reach its
        # next cancellation check (within ABORTED_JOBS_WAIT_S).
        longest = grace + ABORTED_JOBS_WAIT_S + FINAL_STATE_MARGIN_S
        done = self._grpc.stop(longest) if self._grpc is not None else None  # None: never started, no call to wait for
        self.engine.jobs.shutdown(grace)
        if self._grpc is not None:
            self._grpc.stop(FINAL_STATE_MARGIN_S)  # a later, shorter grace ends the calls sooner
        if done is not None:
            done.wait(longest + 5)
        self.engine.close()  # the batcher, once no call can submit to it (the jobs have ended)
        if self._health_grpc is not None:  # last: probes see NOT_SERVING until the end
            self._health_grpc.stop(0).wait()
        self._close_metrics_http()
        if self._sweeper.is_alive():
            self._sweeper.join()  # before the store closes under it
        self.store.close()
        self.tracing.close()  # after the last call and job: their spans are exported
        if self._heap_frozen:  # frozen objects in cycles are never collected: this stopped server's would stay for the process's life
            gc.unfreeze()
        self._stopped.set()


class _HealthServicer(health.HealthServicer):
    """grpcio's health servicer, forgetting a watched service name once its last Watch
    ends. grpcio's kept an empty entry per name ever watched, and Watch needs no token:
    callers watching names of their own (any size, up to max_message_bytes) grew the
    server's memory without bound, a megabyte a call for a megabyte's name."""

    def _on_close_callback(self, send_response_callback: Callable[[object], None], service: str) -> Callable[[], None]:
        def callback() -> None:
            with self._lock:  # Watch added it under this lock; only its last watcher's callback deletes the entry
                watchers = self._send_response_callbacks[service]
                watchers.discard(send_response_callback)
                if not watchers:
                    del self._send_response_callbacks[service]
            send_response_callback(None)

        return callback


class _ProbeHealth(health_pb2_grpc.HealthServicer):
    """Check from the server's health servicer; Watch and List are UNIMPLEMENTED, refused
    without the traceback the generated stubs' NotImplementedError would log per call."""

    def __init__(self, servicer: health.HealthServicer) -> None:
        self._health = servicer

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:  # noqa: N802
        return self._health.Check(request, context)

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> None:  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the health port serves Check only")

    def List(self, request: health_pb2.HealthListRequest, context: grpc.ServicerContext) -> None:  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the health port serves Check only")


def _enable_reflection(server: grpc.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection as grpc.reflection.v1alpha and as v1, which newer clients ask for
    first and some ask for only. grpcio-reflection has only v1alpha; v1 is the same protocol
    renamed (same messages, same field numbers), so one servicer answers both. Only
    v1alpha is listed: its descriptors are the ones the server holds."""
    servicer = reflection.ReflectionServicer((*service_names, reflection.SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(servicer.ServerReflectionInfo,
                                                 request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                                                 response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE, {"ServerReflectionInfo": info}),))


def keepalive_options() -> list[tuple[str, int]]:
    """The gRPC server options for HTTP/2 keepalive (see KEEPALIVE_TIME_MS)."""
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        # grpcio 1.85 waits for a keepalive ping's answer for the ping timeout, not the keepalive's.
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; "grpc.http2.min_recv_..." is no option.
        ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_INTERVAL_MIN_MS),
        # Pings without a call, the clients' and the server's own (see CLIENT_PING_INTERVAL_MIN_MS).
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _store_failure(data_dir: str, error: Exception) -> StoreOpenError:
    """``error`` of the store met at start-up, naming the data dir and the remedy, if any."""
    return _naming_data_dir(f"cannot use the store in {data_dir}: {error}{store_remedy(error)}")


def _naming_data_dir(problem: str) -> StoreOpenError:
    """The store's start-up ``problem`` led by the key that chose the data dir, as a config
    error is (serve's caller puts the --data-dir flag first where that set it)."""
    return StoreOpenError(f"[server].data_dir: {problem}")


def _host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC and URLs take it, an IPv6 address in brackets ("[::1]:50051"):
    gRPC could not bind "::1:50051" nor ":::50051", and blamed the port."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# Why a port could not be bound where the cause is known to be another process on it.
_ADDRESS_IN_USE = "another process is using the port: stop it, or choose another port"
# The ports serve() binds, by their [server] key: the name each is given in its error.
_PORT_NAMES = {"port": "", "metrics_port": "metrics ", "health_port": "health "}


def _bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None, *, key: str) -> int:
    """Bind ``host:port`` (of ``[server].KEY``) with TLS ``credentials`` or in plaintext;
    the port, or OSError (_bind_refused) with the cause _probe_bind finds, as gRPC says
    no more than that it failed."""
    address = _host_port(host, port)
    try:  # grpcio raises RuntimeError for an address in use; older versions returned 0
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise _bind_refused(key, host, port, _probe_bind(host, port))
    return bound


def _probe_bind(host: str, port: int) -> OSError:
    """Why ``host:port`` cannot be bound, found as gRPC binds it (SO_REUSEADDR): a plain
    socket bound to each of the host's addresses with port 0, which touches no port and
    fails (EADDRNOTAVAIL) only for an address not of this machine, then with ``port``
    (EADDRINUSE for a port another socket listens on, EACCES for a privileged one). Asked
    after gRPC's bind failed, not before it: the answer cannot race the bind it explains,
    and the probe never listens, closed at once. gRPC fails only where it bound none of
    the host's addresses, so an address of this machine's cause comes before another's
    EADDRNOTAVAIL or EAFNOSUPPORT (localhost as ::1 where IPv6 is off and 127.0.0.1's port
    busy: the port is at fault); "::" is probed as 0.0.0.0 too, where gRPC binds it with
    IPv6 off. An OSError without an errno where every probe bound (the port was freed
    meanwhile)."""
    try:
        addresses = socket.getaddrinfo(host.removeprefix("[").removesuffix("]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return error
    if any(family == socket.AF_INET6 and address[0] == "::" for family, *_, address in addresses):
        addresses.append((socket.AF_INET, socket.SOCK_STREAM, 0, "", ("0.0.0.0", port)))  # gRPC's fallback where IPv6 is off
    errors = [error for family, kind, protocol, _, address in addresses if (error := _probe_address(family, kind, protocol, address, port))]
    return next((error for error in errors if error.errno not in _NOT_THIS_ADDRESS), errors[0] if errors else OSError(
        "gRPC gave no reason, and the port was free when checked after: another process may have held it meanwhile"))


# A probe's errors that say the address is not one gRPC could have bound here (not this
# machine's; a family the kernel lacks, IPv6 switched off): another address's cause comes first.
_NOT_THIS_ADDRESS = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def _probe_address(family: int, kind: int, protocol: int, address: tuple, port: int) -> OSError | None:
    """Why a plain socket cannot bind ``address`` with port 0 (not this machine's), then
    with ``port``; None when both bind."""
    for probed_port in (0, port):
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((address[0], probed_port, *address[2:]))
        except OSError as error:
            return error
    return None


def _bind_refused(key: str, host: str, port: int, error: OSError) -> OSError:
    """The bind of ``[server].KEY`` at ``host:port`` failed with ``error``: an address not
    of this machine, or one no name resolves to, blames [server].host (the port is not at
    fault), a port in use says so, any other cause in the system's words."""
    address = _host_port(host, port)
    if isinstance(error, socket.gaierror):
        return _port_refused(key, address, f"{host!r} is not an address of this machine ({error.strerror})", blamed_key="host")
    if error.errno == errno.EADDRNOTAVAIL:
        return _port_refused(key, address, f"{host!r} is not an address of this machine", blamed_key="host")
    return _port_refused(key, address, _ADDRESS_IN_USE if error.errno == errno.EADDRINUSE else (error.strerror or str(error)))


def _port_refused(key: str, address: str, reason: str, *, blamed_key: str | None = None) -> OSError:
    """The bind of ``[server].KEY`` at ``address`` failed for ``reason``: led by the key, as a
    config error is (serve's caller puts the flag first where one set it), which the
    operator changes, or by ``blamed_key`` where another key is at fault (the host); the
    address alone named neither the setting nor, for gRPC's port, which of the three
    ports it was."""
    return OSError(f"[server].{blamed_key or key}: cannot bind {_PORT_NAMES[key]}{address}: {reason}")


def _load_models(server: ExplaindServer, failures: list[Exception]) -> None:
    """:meth:`ExplaindServer.load_models`, its failure appended to ``failures``."""
    try:
        server.load_models()
    except Exception as error:  # noqa: BLE001 - serve() reports it in one line
        failures.append(error)


def check_temporary_directory() -> None:
    """OSError unless Python's tempfile has a writable directory: importing torchvision
    (which CLIP, the torchvision loader and others do) makes torch pick its compile cache
    under it, and without one the model load failed as if a model file were at fault
    ("cannot load CLIP ... No usable temporary directory found"). A read-only root file
    system (Kubernetes' readOnlyRootFilesystem) without a volume at /tmp is the usual cause."""
    try:
        tempfile.gettempdir()
    except FileNotFoundError as error:
        raise OSError(f"no writable temporary directory ({error.strerror}): torch writes there as the models load; with a read-only "
                      "root file system, mount a writable volume at /tmp (the Helm chart mounts an emptyDir) or set TMPDIR "
                      "to a writable directory") from None


def check_open_file_limit() -> None:
    """OSError unless the process may open MIN_OPEN_FILES descriptors (``ulimit -n``; a
    container's nofile limit)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        raise OSError(f"the open-file limit (ulimit -n) is {soft}, below the {MIN_OPEN_FILES} explaind needs (about 16 to start, then one "
                      "per client connection and stored file in use): raise it (ulimit -n, docker run --ulimit nofile=N, the container "
                      "runtime's default)")


def serve(config: Config, stop_requested: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT/SIGHUP (or ``stop_requested``, from :func:`stop_on_signals`
    called before); returns the process exit code. A stop asked for while it starts
    ends it before the store's recovery and the bind, or once bound if it came later. Raises OSError when the
    gRPC or metrics address cannot be bound, StoreOpenError when the data dir is in use
    by another server or its database cannot be opened or written, ConfigError when a
    token or TLS file cannot be read or a model file or directory the config names is missing or unreadable
    (unusable_model_path: only what the load finds in them comes after "listening"), no temporary directory is writable or [tracing] lacks its packages, OSError when the
    open-file limit is below MIN_OPEN_FILES, FailedPrecondition when [runtime].device names an
    absent GPU or [runtime].backend a provider ONNX Runtime lacks here (before binding:
    "listening" must not be the first word of a server that cannot run)."""
    stop_requested = stop_requested or stop_on_signals()
    configure_logging(config.server.log_format)
    for warning in ignored_keys(config):  # in the log's format, once a start
        log.warning("%s", warning)
    check_open_file_limit()  # first: each check after it opens files
    check_device(config.runtime.device)
    check_backend(config.runtime.backend, config.runtime.device, loader=config.classifier.loader)
    check_temporary_directory()
    if problem := unusable_model_path(config):
        raise ConfigError(problem)
    server = ExplaindServer(config)
    if stop_requested.is_set():  # while it imported or checked the device: no need to recover the store and bind
        log.info("stop requested while starting: exiting before serving")
        server.store.close()
        return 0
    try:
        port = server.start()  # OSError (address in use) goes to the caller, before any model loads
    except BaseException:
        server.store.close()  # and with it the data dir's lock
        raise
    metrics = f", metrics http://{_host_port(config.server.host, server.metrics_port)}/metrics" if server.metrics_port else ""
    tls = (" with mutual TLS" if config.server.tls_client_ca_file else " with TLS") if config.server.tls_cert_file else ""
    health_port = f", health (plaintext) {_host_port(config.server.host, server.health_port)}" if server.health_port else ""
    traces = f", traces to {config.tracing.otlp_endpoint}" if config.tracing.otlp_endpoint else ""
    log.info("listening on %s%s%s%s%s (config: %s, data dir: %s)", _host_port(config.server.host, port), tls, metrics, health_port, traces, config.source,
             Path(config.server.data_dir).resolve())
    settings = config.server
    if (settings.token or settings.token_file or settings.callers_file) and not settings.tls_cert_file and not is_loopback_host(settings.host):
        log.warning("callers' tokens reach %s in plaintext: serve with TLS ([server].tls_cert_file), or behind a proxy or "
                    "service mesh that terminates it", _host_port(settings.host, port))
    # Models load in a thread, so a stop asked for meanwhile is heeded at once: a load can
    # take minutes, longer than Kubernetes waits before it kills the pod.
    load_failures: list[Exception] = []
    loaded = threading.Thread(target=_load_models, args=(server, load_failures), name=MODEL_LOAD_THREAD, daemon=True)
    loaded.start()
    while loaded.is_alive() and not stop_requested.wait(0.5):
        pass
    if load_failures:
        log.error("cannot start: %s", load_failures[0])
        server.stop(0)
        return 1
    while not stop_requested.wait(0.5):
        pass
    if server.serving:
        log.info("shutting down (grace %.1fs)", config.server.grace_period_s)
    else:
        log.info("stop requested while the models load: shutting down")
    server.stop()
    return 0


def end_serving_process(code: int) -> int:
    """``code``, for the process that ran :func:`serve` to exit with; or, where serve()
    returned on a stop while the models load, their thread still running, the process ended
    with it at once (os._exit), its logs and output flushed first. Python's exit ends that
    (daemon) thread where it next takes the GIL, with pthread_exit, whose unwinding through
    the torch C++ call it is in (a warm-up's conv2d) calls std::terminate: the process
    aborted (SIGABRT, "terminate called without an active exception", a core dump) in
    place of its graceful exit 0. The thread cannot be stopped inside torch, and waiting
    for the load (minutes with CLIP) would outlast Kubernetes' grace. Python's exit does
    nothing more that is needed: stop() has closed the store, ports and traces, and what the
    load writes to the data dir survives a process killed meanwhile (an ONNX export is
    renamed into place, its scratch folder removed by the next; the feature cache's drop is
    one SQLite transaction).

    Otherwise the heap is frozen once the exit's handlers begin (this one, registered last,
    runs first): Python's finalization runs full collections after them, which walked the
    ~540k objects that stop() had thawed, 0.3-1 s each on a loaded 2-core CPU, and an idle
    server took 1.5-3 s to exit here (3-15 s at a load of 5) after a SIGTERM its stop had
    answered in 0.1-0.3 s. Frozen, they skip it; the process is ending, so nothing more is
    left uncollected than its exit leaves anyway."""
    if not any(thread.name == MODEL_LOAD_THREAD for thread in threading.enumerate()):
        atexit.register(gc.freeze)
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone, a closed stream: the exit status still says it
            stream.flush()
    os._exit(code)
