"""Integration: a real server in a subprocess, driven through the SDK (one server per module)."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import os
import io
import json
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
import zlib
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import duration_pb2, message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from explaind.client import (
    AlreadyExistsError,
    Client,
    DataLossError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from explaind.client.cli import main as cli_main
from explaind.metrics import Metrics
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


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(batching={"max_images_per_request": 256}, server={"max_pixels_per_request": 1024 * 1024})


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=30) as client:
        yield client


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float -> (N, H, W, 3) uint8, the exact pixels the server sees."""
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _metric(server, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{key}="{value}"' in line for key, value in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_serving_and_reflection_lists_services(server, client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert client.health() == "SERVING"
    assert client.health("explaind.v1.InferenceService") == "SERVING"
    from google.protobuf.descriptor_pool import DescriptorPool

    ours = {f"explaind.v1.{name}Service" for name in ("Inference", "SampleSet", "Operations", "NeuroInspect")}
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert ours | {"grpc.health.v1.Health"} <= services
        # A client without the protos (grpcurl, a Go or Java pipeline's dynamic client)
        # resolves from reflection alone every file the services import, the results
        # operations carry as Any, and the error details in grpc-status-details-bin.
        pool = DescriptorPool(database)
        files = {pool.FindServiceByName(name).file.name for name in ours}
        for name in ("EvaluateSampleSetResult", "NeuronRanking", "VisualizeNeuronsResult", "EditHeadResult", "OperationMetadata"):
            files.add(pool.FindMessageTypeByName(f"explaind.v1.{name}").file.name)
        for name in ("BadRequest", "ErrorInfo", "RetryInfo"):
            assert pool.FindMessageTypeByName(f"google.rpc.{name}").file.name == "google/rpc/error_details.proto"
        assert {"google/longrunning/operations.proto", "google/rpc/status.proto"} <= {
            dependency.name for name in files for dependency in pool.FindFileByName(name).dependencies
        } | {dependency.name for dependency in pool.FindFileByName("google/longrunning/operations.proto").dependencies}


def test_reflection_answers_as_v1_too(server):
    # grpcurl and newer clients ask grpc.reflection.v1 first, some clients only that;
    # its messages are v1alpha's under a new package name.
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="explaind.v1.NeuroInspectService")]
    with grpc.insecure_channel(server.target) as channel:
        info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        listed, described = info(iter(requests), timeout=10)
    assert "explaind.v1.NeuroInspectService" in {service.name for service in listed.list_services_response.service}
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in described.file_descriptor_response.file_descriptor_proto]
    assert "NeuroInspectService" in {service.name for file in files if file.package == "explaind.v1" for service in file.service}


def test_metadata_describes_the_split_classifier(client, world_model, classifier_dir):
    meta = client.model_metadata()
    assert meta.class_names == list(world_model.config.class_names)
    assert (meta.feature_layer, meta.head, meta.feature_dim, meta.image_size, meta.resize_size) == ("layer3", "fc", 128, 64, 0)
    assert not meta.jpeg_reduced_decode  # off unless [classifier].jpeg_reduced_decode chooses it
    assert meta.supports_features and meta.backend == "eager"
    assert meta.components["classifier"].loaded
    assert not meta.components["clip"].loaded and meta.components["clip"].detail == "not configured"
    # What the server fills is reachable (the SDK had dropped these).
    assert meta.source == str(classifier_dir) and (meta.max_queue_size, meta.max_queue_delay_seconds, meta.max_queued_images_per_caller) == (1024, 0.0, 0)


def test_a_resize_size_fits_every_image_by_its_shorter_side_and_centre_crop(server_factory, world_model, capsys):
    # Predict and the jobs on stored samples fit images alike: what the model sees is the
    # centre crop, whatever the image's aspect ratio. A reduced JPEG decode leaves raw
    # pixels (and the PNGs they are stored as) as they are, and info says it is on.
    from explaind.imaging import InputGeometry, decode_array

    server = server_factory(classifier={"resize_size": 80, "jpeg_reduced_decode": True}, batching={"max_queue_delay_ms": 2.0, "max_queued_images_per_caller": 64})
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 96, 3), (120, 70, 3), (80, 80, 3), (50, 200, 3)] * 3]
    labels = [i % 6 for i in range(len(pixels))]
    with torch.inference_mode():
        inputs = torch.stack([decode_array(p, field="x", geometry=InputGeometry(64, 80)) for p in pixels])
        expected = torch.softmax(world_model(inputs), dim=1)
    with Client(server.target, timeout=60) as client:
        meta = client.model_metadata()
        predictions = client.predict(pixels, top_k=6)
        client.create_sample_set(pixels, labels, sample_set_id="shapes-of-all-sizes")
        operation = client.evaluate_sample_set("shapes-of-all-sizes")
        evaluation = operation.result(timeout=60)
        # Results holding arrays compare by value (== raised, an array's truth being ambiguous).
        assert evaluation == operation.result(timeout=60) and predictions == client.predict(pixels, top_k=6)
        assert evaluation != dataclasses.replace(evaluation, confusion_matrix=evaluation.confusion_matrix + 1)
    assert (meta.image_size, meta.resize_size, meta.jpeg_reduced_decode) == (64, 80, True)
    assert (meta.max_queue_delay_seconds, meta.max_queued_images_per_caller) == (0.002, 64)  # the batcher's, in seconds
    for prediction, probabilities in zip(predictions, expected, strict=True):
        np.testing.assert_allclose(prediction.probabilities, probabilities[prediction.class_indices].numpy(), atol=1e-5)
        assert prediction.class_indices[0] == int(probabilities.argmax())
    confusion = np.zeros((6, 6), np.int64)
    np.add.at(confusion, (labels, expected.argmax(1).numpy()), 1)
    np.testing.assert_array_equal(evaluation.confusion_matrix, confusion)
    # Its non-zero cells, most samples first.
    assert [tuple(cell) for cell in evaluation.confusion_cells] == sorted(((l, p, confusion[l, p]) for l, p in zip(*np.nonzero(confusion))),
                                                                          key=lambda cell: -cell[2])
    assert cli_main(["--target", server.target, "info"]) == 0
    assert ("input 64x64 (shorter side resized to 80, centre crop, bilinear, JPEG files decoded at reduced scale; pixels in [0, 1], "
            "not normalised)") in capsys.readouterr().out


def test_a_torchscript_classifier_starts_without_a_futurewarning_in_the_log(server_factory, tmp_path):
    # torch deprecates torch.jit.load, the only reader of a TorchScript file: every start
    # of a torchscript server logged its FutureWarning, which the operator cannot act on
    # but by changing loader.
    with pytest.warns(FutureWarning):  # saving it is deprecated too
        torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))),
                       tmp_path / "tiny.pt")
    server = server_factory(classifier={"loader": "torchscript", "path": str(tmp_path / "tiny.pt"), "image_size": 32})
    log = server.log_path.read_text()
    assert "serving tiny (version" in log and "FutureWarning" not in log, log


@pytest.mark.parametrize("loader", ["world", "torchscript"])
def test_a_server_without_clip_imports_torch_dynamo_before_it_reports_serving_if_it_can_edit(loader, classifier_dir, tmp_path):
    # Building a torch.optim optimiser imports torch._dynamo (1-2 s). Loading CLIP imports it
    # too; without CLIP the first EditHead paid it. A TorchScript classifier is not split, so
    # it runs no edit: its start-up does without. In a fresh process: this one has imported it.
    classifier = {"loader": "world", "path": str(classifier_dir)}
    if loader == "torchscript":
        with pytest.warns(FutureWarning):  # torch.jit is deprecated, and still served
            torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))),
                           tmp_path / "tiny.pt")
        classifier = {"loader": "torchscript", "path": str(tmp_path / "tiny.pt"), "image_size": 32}
    script = ("import json, sys\nfrom explaind.config import default_config\nfrom explaind.service import ExplaindServer\n"
              "config = (default_config().replace('classifier', **json.loads(sys.argv[1])).replace('clip', path='').replace('diffusion', path='')\n"
              "          .replace('server', port=0, metrics_port=0, data_dir=sys.argv[2], data_dir_reserve_bytes=1 << 20))\n"
              "server = ExplaindServer(config)\nserver.start()\nimported_at_start = 'torch._dynamo' in sys.modules\n"
              "server.load_models()\nprint(imported_at_start, server.serving, 'torch._dynamo' in sys.modules)\nserver.stop(0)\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(classifier), str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["False", "True", str(loader == "world")], done.stderr[-3000:]


def _world_classifier_alone(classifier_dir, tmp_path):
    """A config serving the world classifier alone (no CLIP, no diffusion model) on free
    ports, its data dir under ``tmp_path``: the start-up and stop tests' server."""
    from explaind.config import default_config

    return (default_config().replace("classifier", loader="world", path=str(classifier_dir)).replace("clip", path="").replace("diffusion", path="")
            .replace("server", port=0, metrics_port=0, data_dir=str(tmp_path / "data"), data_dir_reserve_bytes=1 << 20))


def test_a_server_freezes_its_start_up_heap_once_collected_and_unfreezes_it_when_stopped(classifier_dir, tmp_path):
    # Every full collection walked the ~340k objects torch, grpc and open_clip leave, holding
    # the GIL 110-210 ms: Predict stalled. Frozen at start-up, later collections skip them;
    # garbage left then is collected first, not frozen (a frozen cycle is never freed), and
    # a stopped server unfreezes the heap, its own cycles among it.
    from explaind.service import ExplaindServer

    class Cycle:
        pass

    config = _world_classifier_alone(classifier_dir, tmp_path)
    server = ExplaindServer(config)
    server.start()
    gc.disable()  # only the server's own collection may free the garbage
    try:
        garbage = Cycle()
        garbage.itself = garbage
        garbage_alive = weakref.ref(garbage)
        del garbage
        frozen_before = gc.get_freeze_count()
        server.load_models()
        frozen_serving = gc.get_freeze_count()
        assert server.serving and garbage_alive() is None
    finally:
        gc.enable()
        server.stop(0)
    assert frozen_serving > frozen_before and gc.get_freeze_count() == 0, (frozen_before, frozen_serving)


def test_a_servers_start_up_imports_and_collects_while_predict_is_still_refused(classifier_dir, tmp_path, monkeypatch):
    # The torch._dynamo import and the full collection before the freeze hold the GIL for
    # a second or more: run once restore() let Predict in, they stalled its calls. Each
    # step records whether the Inference service would answer Predict then.
    from types import SimpleNamespace

    from explaind.service import ExplaindServer, server as explaind_server

    server = ExplaindServer(_world_classifier_alone(classifier_dir, tmp_path))
    predict_answered_during: dict[str, bool] = {}

    def recorded(step: str, run: Callable) -> Callable:
        def step_then_run(*args):
            predict_answered_during[step] = server.neuroinspect.restored
            return run(*args)
        return step_then_run

    monkeypatch.setattr(explaind_server, "importlib", SimpleNamespace(import_module=recorded("import", importlib.import_module)))
    monkeypatch.setattr(explaind_server, "gc", SimpleNamespace(collect=recorded("collect", gc.collect), freeze=recorded("freeze", gc.freeze),
                                                               unfreeze=gc.unfreeze))
    server.start()
    try:
        server.load_models()
        assert server.serving and server.neuroinspect.restored
    finally:
        server.stop(0)
    assert predict_answered_during == {"import": False, "collect": False, "freeze": False}


def test_a_server_stopped_before_its_models_loaded_leaves_a_heap_frozen_by_others_frozen(classifier_dir, tmp_path):
    # gc.unfreeze() thaws every frozen object, whoever froze it: a server that froze
    # nothing (stopped before load_models) must not thaw the embedding process's heap,
    # whose frozen cycles a collection would then free.
    from explaind.service import ExplaindServer

    class Cycle:
        pass

    config = _world_classifier_alone(classifier_dir, tmp_path)
    frozen_by_others = gc.get_freeze_count()  # another server in this process may hold the heap frozen
    kept = Cycle()
    kept.itself = kept
    kept_alive = weakref.ref(kept)
    gc.freeze()  # the embedding process's own, the cycle with it
    del kept
    try:
        server = ExplaindServer(config)
        server.start()
        server.stop(0)
        gc.collect()
        assert kept_alive() is not None
    finally:
        if not frozen_by_others:  # not left to the tests after
            gc.unfreeze()


def test_a_server_stopped_while_its_models_load_leaves_the_heap_unfrozen(classifier_dir, tmp_path):
    # serve() stops at once on SIGTERM while the models load in their thread, which goes on:
    # frozen after stop() had found nothing to unfreeze, the heap stayed frozen for the
    # embedding process's life, the stopped server's cycles with it.
    from explaind.service import ExplaindServer, server as explaind_server

    config = _world_classifier_alone(classifier_dir, tmp_path)
    server = ExplaindServer(config)
    server.start()
    loaded, stopped, failures = threading.Event(), threading.Event(), []
    load = server.engine.load

    def load_then_wait_for_the_stop() -> None:
        load()
        loaded.set()
        stopped.wait(30)

    server.engine.load = load_then_wait_for_the_stop
    loading = threading.Thread(target=explaind_server._load_models, args=(server, failures))
    frozen_before = gc.get_freeze_count()  # another server in this process may hold the heap frozen
    loading.start()
    try:
        assert loaded.wait(60)
        server.stop(0)
    finally:
        stopped.set()
        loading.join(60)
    frozen = gc.get_freeze_count()
    if frozen > frozen_before:  # not left to the tests after
        gc.unfreeze()
    assert frozen == frozen_before and not server.serving and failures == [], (frozen_before, frozen, failures)


def test_the_serving_process_exits_without_its_last_collections_walking_the_heap_its_stop_thawed():
    # An idle server took 1.5-3 s (3-15 s at a load of 5) to exit after a SIGTERM its stop()
    # answered in 0.1-0.3 s: Python's finalization ran full collections over the ~540k objects
    # stop() had thawed. The child counts what the first collection after the exit's
    # handlers would walk, with 200k long-lived objects standing in for the served heap.
    child = """
import gc, os, sys
from explaind.service.server import end_serving_process
served_heap = [[] for _ in range(200_000)]

def count_walked(phase, info):
    if phase == "start" and info["generation"] == 2:
        gc.callbacks.remove(count_walked)
        os.write(1, str(len(gc.get_objects())).encode())

gc.callbacks.append(count_walked)
sys.exit(end_serving_process(0))
"""
    ended = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert ended.returncode == 0, ended.stderr
    assert int(ended.stdout) < 10_000, ended.stdout


def test_a_server_stopped_inside_its_engines_load_leaves_no_thread_running_and_its_closed_store_untouched(classifier_dir, tmp_path, monkeypatch):
    # serve() stops at once on SIGTERM while the models load in their thread, which goes on:
    # engine.load then started Predict's batcher after stop() had closed the engine, a
    # thread left running for the embedding process's life, and the load went on into the
    # closed store (restore(), the start-up sweep), its error handed to a list nobody reads.
    from explaind.engine import core
    from explaind.service import ExplaindServer, server as explaind_server

    config = _world_classifier_alone(classifier_dir, tmp_path)
    in_load, stopped, failures = threading.Event(), threading.Event(), []
    load_diffusion = core.load_diffusion

    def load_diffusion_after_the_stop(*args, **kwargs):  # the last model engine.load loads before it starts the batcher
        in_load.set()
        stopped.wait(30)
        return load_diffusion(*args, **kwargs)

    monkeypatch.setattr(core, "load_diffusion", load_diffusion_after_the_stop)
    running_before = set(threading.enumerate())
    server = ExplaindServer(config)
    server.start()
    loading = threading.Thread(target=explaind_server._load_models, args=(server, failures))
    loading.start()
    try:
        assert in_load.wait(60)
        server.stop(0)
    finally:
        stopped.set()
        loading.join(60)
    left = [thread.name for thread in set(threading.enumerate()) - running_before if thread.is_alive() and thread is not loading]
    assert not loading.is_alive() and left == [] and failures == [] and not server.serving, (left, failures)


def test_a_stop_begun_while_the_server_restores_its_head_waits_for_the_start_up_steps_and_stops_what_they_started(classifier_dir, tmp_path):
    # stop() waits for load_models' steps after the engine's load: begun under restore(), it
    # closed the store restore() then read (serve()'s load thread handed the error to a list
    # nobody reads), and the sweep and the sweeper started after it. The start-up sweep of
    # stored files, 0.1 s per 1000 it deletes, is not waited for: the next start runs it.
    from explaind.service import ExplaindServer, server as explaind_server

    config = _world_classifier_alone(classifier_dir, tmp_path)
    server = ExplaindServer(config)
    server.start()
    in_restore, restore_may_go, failures = threading.Event(), threading.Event(), []
    restore = server.neuroinspect.restore

    def restore_once_let_go() -> None:
        in_restore.set()
        restore_may_go.wait(30)
        restore()

    server.neuroinspect.restore = restore_once_let_go
    sweeps: list[dict] = []
    server._sweep_once = lambda **kwargs: sweeps.append(kwargs)
    loading, stopping = threading.Thread(target=explaind_server._load_models, args=(server, failures)), threading.Thread(target=server.stop, args=(0,))
    loading.start()
    try:
        assert in_restore.wait(60)
        stopping.start()
        stopping.join(1)  # a stop that does not wait for restore() ends meanwhile
        assert server._closing.wait(30)  # asked before restore() goes on, however late the stop's thread ran
    finally:
        restore_may_go.set()
        loading.join(60)
        stopping.join(60)
    assert not stopping.is_alive() and failures == [] and not server._sweeper.is_alive() and sweeps == [], (failures, sweeps)
    assert gc.get_freeze_count() == 0  # the heap frozen before restore(), unfrozen by the stop that waited


def _load_and_stop_once(server, reached: threading.Event) -> None:
    """Load ``server``'s models in a thread of their own, as serve() does, and stop it from
    another once ``reached`` (a start-up step under way) is set: both end, the load without
    failing, and the server never reports SERVING."""
    from explaind.service import server as explaind_server

    failures: list[BaseException] = []
    loading = threading.Thread(target=explaind_server._load_models, args=(server, failures))
    stopping = threading.Thread(target=server.stop, args=(0,))
    loading.start()
    try:
        assert reached.wait(60)
        stopping.start()
    finally:
        loading.join(60)
        if stopping.ident is not None:
            stopping.join(60)
    assert not loading.is_alive() and not stopping.is_alive() and failures == [] and not server.serving, failures


def test_a_stop_begun_during_the_start_up_sweep_cuts_it_short_and_the_next_start_up_finishes_it(classifier_dir, tmp_path, monkeypatch):
    # The start-up sweep deletes every stored file nothing references, 0.1 s per 1000, under
    # the start-up lock: a stop() begun meanwhile waited for all of them (minutes for a data
    # dir of millions), then found the server reported SERVING and its sweeper started.
    from explaind.service import ExplaindServer
    from explaind.store import sqlite

    monkeypatch.setattr(sqlite, "_SWEEP_CHUNK", 2)  # files per chunk: the sweep's steps, between which it notices a stop
    config = _world_classifier_alone(classifier_dir, tmp_path)
    server = ExplaindServer(config)
    strays = [server.store._blob_path(f"ab{index:062x}") for index in range(6)]  # one directory: the stray files' chunks are per directory
    strays[0].parent.mkdir()
    for stray in strays:
        stray.write_bytes(b"written, never recorded")
    server.start()
    in_sweep = threading.Event()
    delete_unreferenced = server.store._delete_unreferenced

    def delete_once_stopping(chunk: list[str]) -> int:
        if chunk[0].startswith("ab"):  # not another directory's (the head's weights, say)
            in_sweep.set()
            assert server._closing.wait(30)
        return delete_unreferenced(chunk)

    server.store._delete_unreferenced = delete_once_stopping
    _load_and_stop_once(server, in_sweep)
    assert not server._sweeper.is_alive()
    assert sum(stray.exists() for stray in strays) == len(strays) - 2  # the chunk under way, no more
    server = ExplaindServer(config)
    try:
        server.start()
        server.load_models()
        assert server.serving and not any(stray.exists() for stray in strays)
    finally:
        server.stop(0)


def test_a_stop_begun_while_the_start_up_sweep_deletes_operations_past_retention_cuts_that_short_too(classifier_dir, tmp_path, monkeypatch):
    # The start-up sweep deletes the operations past [jobs].retention_days before the files,
    # 0.13 s per 1000 with 20 KB responses, in chunks under the start-up lock: a retention
    # first set or lowered on a server holding years of them kept a stop() waiting for all.
    from explaind.service import ExplaindServer
    from explaind.store import JobRecord, sqlite

    monkeypatch.setattr(sqlite, "_SWEEP_CHUNK", 2)  # operations per chunk
    config = _world_classifier_alone(classifier_dir, tmp_path).replace("jobs", retention_days=1.0)
    server = ExplaindServer(config)
    for index in range(6):
        server.store.insert_job(JobRecord(job_id=f"{index:016x}", kind="evaluate", state="succeeded", create_time=1.0, end_time=2.0))
    server.start()
    in_retention = threading.Event()
    forget_jobs = server.store._forget_jobs

    def forget_once_stopping(*args) -> int:
        in_retention.set()
        assert server._closing.wait(30)
        return forget_jobs(*args)

    server.store._forget_jobs = forget_once_stopping
    _load_and_stop_once(server, in_retention)
    server = ExplaindServer(config)
    try:
        assert len(server.store.list_jobs()) == 4  # the chunk under way went, no more
        server.start()
        server.load_models()
        assert server.serving and not server.store.list_jobs()
    finally:
        server.stop(0)


def test_a_stop_on_the_thread_running_the_start_up_steps_is_refused_not_left_waiting_for_itself(classifier_dir, tmp_path):
    # An embedder's signal handler runs on the thread it interrupts: one that called stop()
    # while that thread restored the head waited for the start-up lock it held, forever.
    from explaind.service import ExplaindServer, server as explaind_server

    server = ExplaindServer(_world_classifier_alone(classifier_dir, tmp_path))
    server.start()
    restore = server.neuroinspect.restore

    def stop_as_a_signal_handler_would() -> None:
        server.stop(0)
        restore()

    server.neuroinspect.restore = stop_as_a_signal_handler_would
    failures: list[Exception] = []
    loading = threading.Thread(target=explaind_server._load_models, args=(server, failures), daemon=True)
    loading.start()
    loading.join(60)
    assert not loading.is_alive() and [type(error) for error in failures] == [RuntimeError], failures
    assert "from another thread" in str(failures[0]) and not server.serving
    stopping = threading.Thread(target=server.stop, args=(0,))  # from another thread, the stop goes through
    stopping.start()
    stopping.join(60)
    assert not stopping.is_alive() and server._stopped.is_set() and gc.get_freeze_count() == 0


def test_a_stop_on_the_start_up_thread_the_moment_it_takes_the_start_up_lock_is_refused_too(classifier_dir, tmp_path):
    # A signal handler runs at the next bytecode boundary: one right after load_models took
    # the lock, before it had noted its thread, waited for the lock its own thread held.
    from explaind.service import ExplaindServer, server as explaind_server

    server = ExplaindServer(_world_classifier_alone(classifier_dir, tmp_path))
    server.start()
    lock = server._starting

    class InterruptedOnceTaken:
        """The start-up lock; on the loading thread, stop() runs as soon as it is taken,
        and an error there lets it go again, as a with statement does."""

        def __enter__(self) -> None:
            lock.acquire()
            if threading.current_thread() is loading and not server._closing.is_set():
                try:
                    server.stop(0)
                except BaseException:
                    lock.release()
                    raise

        def __exit__(self, *exc_info) -> None:
            lock.release()

    server._starting = InterruptedOnceTaken()
    failures: list[Exception] = []
    loading = threading.Thread(target=explaind_server._load_models, args=(server, failures), daemon=True)
    loading.start()
    loading.join(60)
    assert not loading.is_alive() and [type(error) for error in failures] == [RuntimeError], failures
    assert server._starting_thread is None  # a stop() on this thread after load_models is not refused
    stopping = threading.Thread(target=server.stop, args=(0,))
    stopping.start()
    stopping.join(60)
    assert not stopping.is_alive() and server._stopped.is_set()


def test_a_classifier_of_6000_classes_is_evaluated_with_the_cells_of_its_confusion_matrix(server_factory, tmp_path, capsys):
    # 36M counts: over half of the default 64 MiB message limit, so the evaluation was refused.
    classes = 6000
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, classes))
    with pytest.warns(FutureWarning):  # torch.jit is deprecated, and still served
        torch.jit.save(torch.jit.script(model), tmp_path / "wide.pt")
    (tmp_path / "names.txt").write_text("".join(f"c{i}\n" for i in range(classes)))
    server = server_factory(classifier={"loader": "torchscript", "path": str(tmp_path / "wide.pt"),
                                        "class_names_file": str(tmp_path / "names.txt"), "image_size": 32})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, 60)
    with torch.inference_mode():
        predicted = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    with Client(server.target, timeout=60) as client:
        client.create_sample_set(images, labels, sample_set_id="wide")
        evaluation = client.evaluate_sample_set("wide").result(timeout=120)
    assert evaluation.confusion_matrix.shape == (0, 0) and len(evaluation.class_names) == classes
    cells, counts = np.unique(np.stack([labels, predicted], axis=1), axis=0, return_counts=True)
    expected = sorted(([*cell, count] for cell, count in zip(cells.tolist(), counts.tolist())), key=lambda cell: -cell[2])
    assert evaluation.confusion_cells.tolist() == expected
    assert evaluation.mistake_count == int((labels != predicted).sum()) == len(evaluation.mistakes)
    assert cli_main(["--target", server.target, "evaluate", "wide", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["confusion_matrix"] == [] and printed["confusion_cells"] == expected


def test_predict_matches_in_process_forward(client, world_model, world_images):
    images, _ = world_images
    pixels = _uint8(images[:8])
    with torch.inference_mode():
        expected = torch.softmax(world_model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255), dim=1)
    predictions = client.predict(pixels, top_k=3, return_features=True)
    assert len(predictions) == 8
    for prediction, probabilities in zip(predictions, expected):
        top = torch.topk(probabilities, 3)
        assert prediction.class_indices == top.indices.tolist()
        assert prediction.labels == [world_model.config.class_names[i] for i in top.indices]
        np.testing.assert_allclose(prediction.probabilities, top.values.numpy(), atol=1e-5)
        assert prediction.features.shape == (128,)
    # head(features) reproduces the logits: the features really are the penultimate layer.
    features = torch.from_numpy(np.stack([p.features for p in predictions]))
    with torch.inference_mode():
        np.testing.assert_allclose(torch.softmax(world_model.fc(features), 1).numpy(), expected.numpy(), atol=1e-5)


def test_predict_accepts_every_image_encoding_alike(client, world_images):
    pixels = _uint8(world_images[0][:1])[0]
    as_png = client.predict([_png(pixels)], top_k=6)[0]
    as_uint8 = client.predict([pixels], top_k=6)[0]
    as_float_chw = client.predict([pixels.transpose(2, 0, 1).astype(np.float32) / 255], top_k=6)[0]
    as_pil = client.predict([Image.fromarray(pixels)], top_k=6)[0]
    upscaled = client.predict([Image.fromarray(pixels).resize((128, 128), Image.NEAREST)], top_k=6)[0]
    for other in (as_uint8, as_float_chw, as_pil):
        assert other.class_indices == as_png.class_indices
        np.testing.assert_allclose(other.probabilities, as_png.probabilities, atol=1e-5)
    assert upscaled.label == as_png.label  # resized back to 64x64 on the server


def test_predict_sends_other_dtypes_tensors_pil_modes_and_single_images_as_the_same_pixels(client, world_images):
    # float64 (numpy's default) goes as float32, float16 as float16 (its bytes labelled
    # float32 would be other pixels), a torch tensor as its array, a PIL image of any mode
    # as RGB (RGBA went as (H, W, 4)); one image alone, not in a list, is one prediction.
    pixels = _uint8(world_images[0][:1])[0]
    reference = client.predict([pixels], top_k=6)[0]
    chw = pixels.transpose(2, 0, 1) / 255
    for image, atol in ((chw, 1e-5), (chw.astype(np.float16), 1e-2), (torch.from_numpy(chw.astype(np.float32)), 1e-5),
                        (Image.fromarray(pixels).convert("RGBA"), 1e-5), (Image.fromarray(pixels), 1e-5)):
        (prediction,) = client.predict(image, top_k=6)
        assert prediction.label == reference.label, type(image)
        np.testing.assert_allclose(sorted(prediction.probabilities), sorted(reference.probabilities), atol=atol)


def test_a_16_bit_pil_image_is_predicted_as_its_file_is_and_a_float_one_is_refused(client, world_images):
    # Pillow's convert("RGB") made every value above 255 white: the SDK sent a white
    # image and got a confident prediction for it.
    grey = _uint8(world_images[0][:1])[0].mean(axis=2)
    grey16 = (grey * 257).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey16).save(buffer, format="PNG")
    as_file = client.predict([buffer.getvalue()], top_k=6)[0]
    for image in (Image.fromarray(grey16), Image.fromarray(grey16.astype(np.int32))):  # modes I;16 and I
        (prediction,) = client.predict(image, top_k=6)
        assert prediction.class_indices == as_file.class_indices, image.mode
        np.testing.assert_allclose(prediction.probabilities, as_file.probabilities, atol=1e-6)
    with pytest.raises(ValueError, match="mode F"):
        client.predict(Image.fromarray(grey.astype(np.float32) / 255), top_k=1)


def _raw(dtype: int, shape: tuple[int, ...], data: bytes) -> common_pb2.Image:
    return common_pb2.Image(tensor=common_pb2.Tensor(dtype=dtype, shape=list(shape), data=data))


def _bad_inputs(pixels: np.ndarray) -> dict[str, tuple[list[common_pb2.Image], str, grpc.StatusCode]]:
    png = _png(pixels)
    nan = np.full((3, 64, 64), np.nan, dtype=np.float32)
    return {
        "truncated png": ([common_pb2.Image(encoded=png[: len(png) // 2])], "images[0].encoded", grpc.StatusCode.INVALID_ARGUMENT),
        "not an image": ([common_pb2.Image(encoded=b"hello world")], "images[0].encoded", grpc.StatusCode.INVALID_ARGUMENT),
        "zero-size tensor": ([_raw(common_pb2.DATA_TYPE_UINT8, (0, 64, 3), b"")], "images[0].tensor", grpc.StatusCode.INVALID_ARGUMENT),
        "empty tensor with huge sides": ([_raw(common_pb2.DATA_TYPE_FLOAT32, (2**62, 2**62, 0), b"")], "images[0].tensor.shape: tensor is empty", grpc.StatusCode.INVALID_ARGUMENT),
        "nan tensor": ([_raw(common_pb2.DATA_TYPE_FLOAT32, (3, 64, 64), nan.tobytes())], "NaN", grpc.StatusCode.INVALID_ARGUMENT),
        "wrong dtype": ([_raw(common_pb2.DATA_TYPE_INT64, (64, 64, 3), np.zeros((64, 64, 3), np.int64).tobytes())], "images[0].tensor.dtype", grpc.StatusCode.INVALID_ARGUMENT),
        "unset dtype": ([_raw(0, (64, 64, 3), pixels.tobytes())], "dtype", grpc.StatusCode.INVALID_ARGUMENT),
        # A layout error names the shape, as the other shape errors do.
        "wrong shape": ([_raw(common_pb2.DATA_TYPE_UINT8, (64, 64, 4), np.zeros((64, 64, 4), np.uint8).tobytes())],
                        "images[0].tensor.shape: uint8 images must be (H, W, 3)", grpc.StatusCode.INVALID_ARGUMENT),
        "wrong float shape": ([_raw(common_pb2.DATA_TYPE_FLOAT32, (4, 4, 4), np.zeros((4, 4, 4), np.float32).tobytes())],
                              "images[0].tensor.shape: float images must be (3, H, W) or (H, W, 3)", grpc.StatusCode.INVALID_ARGUMENT),
        "2-d shape": ([_raw(common_pb2.DATA_TYPE_UINT8, (64, 192), pixels.tobytes())], "3 dimensions", grpc.StatusCode.INVALID_ARGUMENT),
        "65-d shape": ([_raw(common_pb2.DATA_TYPE_UINT8, (1,) * 65, b"x")], "images[0].tensor.shape: expected 3 dimensions", grpc.StatusCode.INVALID_ARGUMENT),
        "byte count mismatch": ([_raw(common_pb2.DATA_TYPE_UINT8, (64, 64, 3), pixels.tobytes()[:-1])], "images[0].tensor.data", grpc.StatusCode.INVALID_ARGUMENT),
        # 2^31 x 2^31 x 3 bytes overflows int64 arithmetic; the message must give the true size.
        "forged huge shape": ([_raw(common_pb2.DATA_TYPE_UINT8, (2**31, 2**31, 3), b"x")], f"needs {3 * 2**62} bytes, got 1", grpc.StatusCode.INVALID_ARGUMENT),
        "out of range floats": ([_raw(common_pb2.DATA_TYPE_FLOAT32, (3, 64, 64), np.full((3, 64, 64), 3.0, np.float32).tobytes())], "[0, 1]", grpc.StatusCode.INVALID_ARGUMENT),
        "no data": ([common_pb2.Image()], "images[0]", grpc.StatusCode.INVALID_ARGUMENT),
        "no images": ([], "images", grpc.StatusCode.INVALID_ARGUMENT),
        "10k images": ([common_pb2.Image(encoded=_png(pixels[:16, :16]))] * 10_000, "limit of 256", grpc.StatusCode.INVALID_ARGUMENT),
    }


def test_errors_quoting_a_huge_id_keep_their_code(server):
    # The message quotes the id; uncut, it overflowed gRPC's 16 KiB header limit and the
    # caller got RESOURCE_EXHAUSTED ("received metadata size exceeds hard limit").
    with grpc.insecure_channel(server.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        operations = operations_pb2_grpc.OperationsServiceStub(channel)
        for long_id in ("x" * 20_000, "\U0001F600" * 2_000):
            with pytest.raises(grpc.RpcError) as caught:
                sets.GetSampleSet(sample_sets_pb2.GetSampleSetRequest(sample_set_id=long_id), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no id is that long
            assert caught.value.details().startswith("sample_set_id: '")
            assert re.search(r"\.\.\. \(\d+ characters left out\)$", caught.value.details())
            with pytest.raises(grpc.RpcError) as caught:
                operations.GetOperation(operations_pb2.GetOperationRequest(name=f"operations/{long_id}"), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and caught.value.details().startswith("name: '")
            # An INVALID_ARGUMENT also carries the message in its details: all of it must fit.
            for _ in range(10):
                with pytest.raises(grpc.RpcError) as caught:
                    sets.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id=long_id + "!", samples=[sample_sets_pb2.Sample(image=common_pb2.Image(encoded=_png(np.zeros((8, 8, 3), np.uint8))))]), timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and caught.value.details().startswith("sample_set_id: "), caught.value.details()
                assert sum(len(key) + len(value) for key, value in caught.value.trailing_metadata()) < 6000


def test_fuzzed_bad_inputs_get_documented_codes_and_server_keeps_serving(server, client, world_images):
    pixels = _uint8(world_images[0][:1])[0]
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 256 << 20)]) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for case, (images, mention, code) in _bad_inputs(pixels).items():
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(inference_pb2.PredictRequest(images=images), timeout=30)
            assert caught.value.code() == code, case
            assert mention in caught.value.details(), (case, caught.value.details())
            assert "Traceback" not in caught.value.details()
        # 10k raw images (120 MiB) exceed the 64 MiB message limit itself.
        huge = inference_pb2.PredictRequest(images=[_raw(common_pb2.DATA_TYPE_UINT8, (64, 64, 3), pixels.tobytes())] * 10_000)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(huge, timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    forward_passes = _metric(server, "explaind_batch_size_images_count")
    with pytest.raises(InvalidArgumentError, match="top_k") as refused:
        client.predict([pixels], top_k=7)
    assert refused.value.field == "top_k" and refused.value.field_violations[0][1].startswith("must be between 1 and 6")
    assert _metric(server, "explaind_batch_size_images_count") == forward_passes  # refused before the model ran
    with pytest.raises(NotFoundError, match="no sample set 'missing-set'"):
        client.evaluate_sample_set("missing-set")
    with grpc.insecure_channel(server.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        for rpc, request in (
            (sets.GetSampleSet, sample_sets_pb2.GetSampleSetRequest()),
            (sets.ListSamples, sample_sets_pb2.ListSamplesRequest()),
            (sets.DeleteSampleSet, sample_sets_pb2.DeleteSampleSetRequest()),
            (sets.AppendSamples, sample_sets_pb2.AppendSamplesRequest()),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                rpc(request, timeout=30)
            assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "sample_set_id: required"), rpc
        mislabelled = sample_sets_pb2.CreateSampleSetRequest(sample_set_id="mislabelled", samples=[
            sample_sets_pb2.Sample(image=common_pb2.Image(encoded=_png(pixels)), label=0), sample_sets_pb2.Sample(image=common_pb2.Image(encoded=_png(pixels)), label=9)])
        with pytest.raises(grpc.RpcError) as caught:
            sets.CreateSampleSet(mislabelled, timeout=30)
        assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "samples[1].label: label 9 is not a class index in [0, 6)")
        # The field also travels as a google.rpc.BadRequest in the status details (AIP-193).
        status = status_pb2.Status.FromString(dict(caught.value.trailing_metadata())["grpc-status-details-bin"])
        violation = error_details_pb2.BadRequest()
        assert (status.code, status.message) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], caught.value.details()) and status.details[0].Unpack(violation)
        assert [(v.field, v.description) for v in violation.field_violations] == [("samples[1].label", "label 9 is not a class index in [0, 6)")]
    with pytest.raises(NotFoundError):
        client.operation("operations/0123456789abcdef")
    # A name that no operation can have is the caller's mistake, not an unknown operation.
    for name in ("operations/a/b", "operations/does-not-exist", "operations/\0", "operations/0123456789ABCDEF", "operations/0123456789abcdef\n"):
        with pytest.raises(InvalidArgumentError, match="^INVALID_ARGUMENT: name: .* is not an operation name"):
            client.operation(name)
    assert client.health() == "SERVING"
    assert len(client.predict([pixels])) == 1


# Edge values the schema-driven fuzz sets a request's fields to, by field type.
_FUZZ_STRINGS = ("", " ", "x" * 5000, "a/b", "\0", "a\0b", "é漢字😀", "\t\n", "../../etc/passwd", "v01", "-1", "1e309", "operations/",
                 "sample_sets/1.5/x", "operations/0.0/" + "z" * 300, "9223372036854775808", "12345678-1234-1234-1234-123456789ABC")
_FUZZ_INTEGERS = (0, 1, -1, 7, 4097, 100_001, 2**31 - 1, -(2**31))
# Cases per RPC: each field of the largest request (EditHead's 18) five times or more.
_FUZZ_CASES_PER_RPC = 100
_FUZZ_FLOATS = (0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324, 1000.5, 1e6 + 1)
# What a bad request may be answered with (the codes the .proto files document for one), or
# OK where a fuzzed value happens to be valid; never INTERNAL or UNKNOWN, nor a hang.
_BAD_INPUT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _edge_values(field: FieldDescriptor, names: tuple[str, ...], png: bytes) -> list:
    """Values to set the scalar ``field`` to: its type's edge values, and for strings
    also ``names`` (the ids of resources that exist, sent where other ids belong)."""
    if field.type == FieldDescriptor.TYPE_STRING:
        return [*_FUZZ_STRINGS, *names]
    if field.type == FieldDescriptor.TYPE_BYTES:
        return [b"", b"\0", png[: len(png) // 2], b"GIF89a" + bytes(10), bytes(range(256))]
    if field.type == FieldDescriptor.TYPE_BOOL:
        return [True, False]
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return list(_FUZZ_FLOATS)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return [value.number for value in field.enum_type.values] + [99, -1]
    return [*_FUZZ_INTEGERS, 2**63 - 1, -(2**63)] if field.type == FieldDescriptor.TYPE_INT64 else list(_FUZZ_INTEGERS)


def _field_in(request: Message, path: tuple[str, ...]) -> Message:
    """The message ``path`` leads to from ``request`` (a repeated field's first element,
    added where it is empty)."""
    for name in path:
        value = getattr(request, name)
        request = (value[0] if len(value) else value.add()) if request.DESCRIPTOR.fields_by_name[name].is_repeated else value
    return request


def _replace_repeated(message: Message, name: str, values: list) -> None:
    message.ClearField(name)
    getattr(message, name).extend(values)


def _mutations(message_type: Descriptor, names: tuple[str, ...], png: bytes, path: tuple[str, ...] = ()) -> dict[str, list[Callable[[Message], None]]]:
    """Per field of ``message_type`` and of the messages in it (dotted path), ways to
    mutate a request there: edge values; empty, cleared and 65-fold repeated messages;
    empty, duplicated and 300-long repeated scalars; odd and too many map keys."""
    by_field: dict[str, list[Callable[[Message], None]]] = {}
    for field in message_type.fields:
        at, name = path, field.name
        ways = by_field.setdefault(".".join(path + (name,)), [])
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            keys = _edge_values(field.message_type.fields_by_name["key"], names, png)
            ways += [lambda r, at=at, name=name, key=key: getattr(_field_in(r, at), name).update({key: key}) for key in keys]
            ways.append(lambda r, at=at, name=name: getattr(_field_in(r, at), name).update({f"k{i}": "v" for i in range(65)}))
        elif field.message_type is not None:
            if field.is_repeated:
                empty = message_factory.GetMessageClass(field.message_type)()
                ways.append(lambda r, at=at, name=name: _field_in(r, at).ClearField(name))
                ways.append(lambda r, at=at, name=name, empty=empty: _replace_repeated(_field_in(r, at), name, [empty]))
                ways.append(lambda r, at=at, name=name: getattr(_field_in(r, at), name).extend(list(getattr(_field_in(r, at), name)[:1]) * 65))
            else:
                ways.append(lambda r, at=at, name=name: getattr(_field_in(r, at), name).SetInParent())
                ways.append(lambda r, at=at, name=name: _field_in(r, at).ClearField(name))
            if len(path) < 3:
                by_field.update(_mutations(field.message_type, names, png, path + (name,)))
        elif field.is_repeated:
            values = _edge_values(field, names, png)
            ways += [lambda r, at=at, name=name, value=value: _replace_repeated(_field_in(r, at), name, [value]) for value in values]
            ways.append(lambda r, at=at, name=name: _replace_repeated(_field_in(r, at), name, []))
            ways.append(lambda r, at=at, name=name, value=values[1]: _replace_repeated(_field_in(r, at), name, [value] * 3))
            ways.append(lambda r, at=at, name=name, values=values: _replace_repeated(_field_in(r, at), name, (values * 300)[:300]))
        else:
            ways += [lambda r, at=at, name=name, value=value: setattr(_field_in(r, at), name, value) for value in _edge_values(field, names, png)]
    return by_field


def test_schema_fuzzed_requests_to_every_rpc_get_documented_codes_and_the_server_keeps_serving(server_factory, world_images):
    # Every RPC of the four services, its request read from the .proto descriptors: each
    # case sets one field (every field in turn) and up to two others to an edge value,
    # with a fixed seed; an operation a case starts is cancelled at once.
    fuzzed = server_factory(batching={"max_images_per_request": 256}, server={"max_pixels_per_request": 1024 * 1024})  # its own: cases promote and delete
    pixels, labels = _uint8(world_images[0][:12]), world_images[1][:12].tolist()
    png, rng = _png(pixels[0]), random.Random(0)
    samples = [sample_sets_pb2.Sample(image=common_pb2.Image(encoded=_png(p)), label=label) for p, label in zip(pixels, labels, strict=True)]
    methods = {method.name: method for module in (inference_pb2, sample_sets_pb2, neuroinspect_pb2, operations_pb2)
               for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods}
    with grpc.insecure_channel(fuzzed.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        def call(name: str, request: Message | bytes):
            method = methods[name]
            caller = channel.unary_stream if method.server_streaming else channel.unary_unary
            answer = caller(f"/{method.containing_service.full_name}/{name}", request_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
                            response_deserializer=message_factory.GetMessageClass(method.output_type).FromString)(request, timeout=30)
            return list(answer) if method.server_streaming else answer

        for set_id in ("fuzz-set", "fuzz-doomed"):
            call("CreateSampleSet", sample_sets_pb2.CreateSampleSetRequest(sample_set_id=set_id, samples=samples))
        evaluation = call("EvaluateSampleSet", inference_pb2.EvaluateSampleSetRequest(sample_set_id="fuzz-set")).operation.name
        done = call("WaitOperation", operations_pb2.WaitOperationRequest(name=evaluation, timeout=duration_pb2.Duration(seconds=25))).operation
        metadata = operations_pb2.OperationMetadata()
        assert done.done and done.metadata.Unpack(metadata) and metadata.artifacts
        names = ("fuzz-set", "fuzz-doomed", "v0", "v1", evaluation, evaluation.removeprefix("operations/"), metadata.artifacts[0].name, "circle")
        pair = neuroinspect_pb2.NeuronClassPair(neuron=1, class_index=0)
        bases = {  # a valid request of each RPC, with the least work
            "Predict": inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=png)], top_k=1),
            "GetModelMetadata": inference_pb2.GetModelMetadataRequest(),
            "EvaluateSampleSet": inference_pb2.EvaluateSampleSetRequest(sample_set_id="fuzz-set", batch_size=4, max_grid_images=4),
            "CreateSampleSet": sample_sets_pb2.CreateSampleSetRequest(samples=samples[:1]),
            "AppendSamples": sample_sets_pb2.AppendSamplesRequest(sample_set_id="fuzz-set", samples=samples[:1]),
            "GetSampleSet": sample_sets_pb2.GetSampleSetRequest(sample_set_id="fuzz-set"),
            "ListSampleSets": sample_sets_pb2.ListSampleSetsRequest(page_size=2),
            "ListSamples": sample_sets_pb2.ListSamplesRequest(sample_set_id="fuzz-set", page_size=2),
            "DeleteSampleSet": sample_sets_pb2.DeleteSampleSetRequest(sample_set_id="fuzz-doomed"),
            "RankMistakeNeurons": neuroinspect_pb2.RankMistakeNeuronsRequest(sample_set_id="fuzz-set", class_index=labels[0], max_iterations=20),
            "VisualizeNeurons": neuroinspect_pb2.VisualizeNeuronsRequest(pairs=[pair], method=neuroinspect_pb2.VISUALIZATION_METHOD_NO_CLIP, steps=1),
            "EditHead": neuroinspect_pb2.EditHeadRequest(sample_set_id="fuzz-set", class_index=labels[0], neurons=[1], max_epochs=1, patience=1),
            "ListHeadVersions": neuroinspect_pb2.ListHeadVersionsRequest(page_size=2),
            "GetHeadVersion": neuroinspect_pb2.GetHeadVersionRequest(version_id="v0"),
            "PromoteHeadVersion": neuroinspect_pb2.PromoteHeadVersionRequest(version_id="v0"),
            "RollbackHeadVersion": neuroinspect_pb2.RollbackHeadVersionRequest(version_id="v0"),
            "DeleteHeadVersion": neuroinspect_pb2.DeleteHeadVersionRequest(version_id="v1"),
            "GetOperation": operations_pb2.GetOperationRequest(name=evaluation),
            "ListOperations": operations_pb2.ListOperationsRequest(page_size=2, view=operations_pb2.OPERATION_VIEW_BASIC),
            "CancelOperation": operations_pb2.CancelOperationRequest(name=evaluation),
            "WaitOperation": operations_pb2.WaitOperationRequest(name=evaluation, timeout=duration_pb2.Duration(seconds=0)),
            "WatchOperation": operations_pb2.WatchOperationRequest(name=evaluation),
            "GetArtifact": operations_pb2.GetArtifactRequest(name=evaluation, artifact=metadata.artifacts[0].name, max_bytes=100),
            "DeleteOperation": operations_pb2.DeleteOperationRequest(name=evaluation),
        }
        assert set(bases) == set(methods)  # a new RPC needs its valid request here to be fuzzed
        for name in sorted(methods, key=lambda name: name.startswith("Delete")):  # deletions last: the others' resources stay
            by_field = _mutations(methods[name].input_type, names, png)
            fields = sorted(by_field)
            cases = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))) for _ in range(2)]  # not even a message
            for case in range(_FUZZ_CASES_PER_RPC if fields else 0):
                request = type(bases[name])()
                request.CopyFrom(bases[name])
                for field in [fields[case % len(fields)], *rng.sample(fields, rng.randint(0, min(2, len(fields))))]:
                    rng.choice(by_field[field])(request)
                cases.append(request)
            for request in cases:
                described = f"{name}({request if isinstance(request, bytes) else text_format.MessageToString(request, as_one_line=True)[:300]})"
                try:
                    response = call(name, request)
                except grpc.RpcError as error:
                    code, details, trailing = error.code(), error.details() or "", dict(error.trailing_metadata() or ())
                else:
                    code, details, trailing = grpc.StatusCode.OK, "", {}
                    if not isinstance(response, list) and "operation" in response.DESCRIPTOR.fields_by_name and response.HasField("operation"):
                        call("CancelOperation", operations_pb2.CancelOperationRequest(name=response.operation.name))
                assert code in _BAD_INPUT_CODES, (described, code, details)
                assert "Traceback" not in details and ".py" not in details, (described, details)
                if code == grpc.StatusCode.INVALID_ARGUMENT and not isinstance(request, bytes):  # names the field, in the message and the details
                    status, violations = status_pb2.Status.FromString(trailing.get("grpc-status-details-bin", b"")), error_details_pb2.BadRequest()
                    assert status.details and status.details[0].Unpack(violations), (described, details)
                    field = violations.field_violations[0].field
                    assert details.startswith(f"{field}: ") and re.match(r"\w+", field)[0] in methods[name].input_type.fields_by_name, (described, details)
    log = fuzzed.log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    with Client(fuzzed.target, timeout=30) as client:
        assert client.health() == "SERVING"
        assert len(client.predict([pixels[0]])) == 1


def test_images_pillow_warns_about_are_the_callers_error_not_warning_lines_in_the_log(server):
    # Each was refused INVALID_ARGUMENT, and also logged a WARNING from py.warnings with
    # Pillow's path, or (too many samples per pixel) an ERROR from Pillow's own logger, or
    # (a deflated TIFF strip failing its checksum) libtiff's message on stderr, a line in
    # no log format: a caller's file set off the operator's log alerts, or broke a JSON log.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # 10000x10000 is past Pillow's decompression-bomb warning and below its error.
    declared_huge = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", b"")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "TIFF")
    corrupt_exif = buffer.getvalue()[:40]  # Pillow warns "Corrupt EXIF data" as it gives up on it
    samples_per_pixel = struct.pack("<HHIHH", 277, 3, 1, 3, 0)  # the TIFF tag (a SHORT): 3
    assert buffer.getvalue().count(samples_per_pixel) == 1
    many_samples = buffer.getvalue().replace(samples_per_pixel, struct.pack("<HHIHH", 277, 3, 1, 278, 0))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "TIFF", compression="tiff_deflate")
    with Image.open(buffer) as deflated:
        checksum_end = deflated.tag_v2[273][0] + deflated.tag_v2[279][0]  # the strip's offset and size
    bad_checksum = bytearray(buffer.getvalue())
    bad_checksum[checksum_end - 1] ^= 0xFF
    logged_before = len(server.log_path.read_text())
    with grpc.insecure_channel(server.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for data, message in ((declared_huge, "image is 10000x10000; the largest side allowed is 4096"), (corrupt_exif, "not an image in a supported format"),
                              (many_samples, "not an image in a supported format"), (bytes(bad_checksum), "cannot decode image bytes")):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=data)]), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and caught.value.details().startswith("images[0].encoded: ")
            assert message in caught.value.details()
    log = server.log_path.read_text()
    assert "py.warnings" not in log and "PIL" not in log, log[-2000:]
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line) for line in log[logged_before:].splitlines()), log[logged_before:]


@pytest.mark.parametrize("pillow_library", [dict(), None])
def test_a_pillow_without_libtiff_or_whose_library_cannot_be_loaded_still_starts_the_logging(monkeypatch, pillow_library):
    # Pillow builds without libtiff (no TIFFSet*Handler symbols), or a library ctypes
    # cannot open: the server logs as it would, with libtiff left as it is.
    import ctypes
    from types import SimpleNamespace

    from explaind.logs import _silence_libtiff

    def load(path):
        if pillow_library is None:
            raise OSError(f"{path}: cannot open shared object file")
        return SimpleNamespace(**pillow_library)

    monkeypatch.setattr(ctypes, "CDLL", load)
    _silence_libtiff()


def test_requests_that_are_not_their_message_or_carry_malformed_ids_or_ignored_options_are_invalid_arguments(server, client, world_images):
    # Each was accepted, or answered NOT_FOUND or INTERNAL (with a traceback in the log).
    with grpc.insecure_channel(server.target) as channel:
        for data in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff"):  # invalid UTF-8 in sample_set_id; no message at all
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary("/explaind.v1.SampleSetService/GetSampleSet")(data, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert "not a valid explaind.v1.SampleSetService/GetSampleSet request message" in caught.value.details()
    assert "Traceback" not in server.log_path.read_text()
    for call in (lambda: client.sample_set("Bad Id!"), lambda: client.delete_sample_set("NOPE!"),
                 lambda: client.evaluate_sample_set("Bad Id!"), lambda: client.rank_mistake_neurons("Bad Id!", 0)):
        with pytest.raises(InvalidArgumentError, match="is not a valid id") as refused:
            call()
        assert refused.value.field == "sample_set_id"
    with pytest.raises(InvalidArgumentError, match="257 characters, more than the 256 allowed") as refused:
        client.create_sample_set(_uint8(world_images[0][:1]), [0], display_name="d" * 257)
    assert refused.value.field == "display_name"
    for options, field in (({"method": "feature_visualization", "gamma": 5.0}, "gamma"),
                           ({"method": "feature_visualization", "epsilon": 3.0}, "epsilon"),
                           ({"method": "no_clip", "epsilon": 3.0}, "epsilon")):
        with pytest.raises(InvalidArgumentError) as refused:
            client.visualize_neurons([1], steps=1, **options)
        assert refused.value.field == field, options
    with pytest.raises(InvalidArgumentError, match="every pair names its class") as refused:
        client.visualize_neurons([(1, 2)], method="no_clip", steps=1, classes_per_neuron=4)
    assert refused.value.field == "classes_per_neuron"
    client.create_sample_set(_uint8(world_images[0][:1]), [0], sample_set_id="one-circle")
    with pytest.raises(InvalidArgumentError, match="at least 5 samples") as refused:  # not "no sample of class"
        client.edit_head("one-circle", 0, [1])
    assert refused.value.field == "sample_set_id"
    client.create_sample_set(_uint8(world_images[0][:6]), world_images[1][:6].tolist(), sample_set_id="six")
    with pytest.raises(InvalidArgumentError, match="4097 characters, more than the 4096 allowed") as refused:
        client.edit_head("six", int(world_images[1][0]), [1], description="d" * 4097)
    assert refused.value.field == "description"


def test_at_its_open_file_limit_the_server_answers_resource_exhausted_and_serves_again_below_it(server_factory):
    """A container's low ``ulimit -n`` with every descriptor taken (by connections, say):
    a call or job that opened a file failed INTERNAL ("internal error (OSError)"), as a
    bug does, with a traceback per call in the log. RESOURCE_EXHAUSTED tells the caller
    to retry, the log line the operator what to raise; nothing is left half stored."""
    import resource

    server = server_factory()
    pid, images = server.process.pid, torch.rand(6, 3, 64, 64)
    with Client(server.target, timeout=30) as client:
        client.create_sample_set(images[:2], [0, 0], sample_set_id="warm")  # what storing and evaluating import, imported
        client.evaluate_sample_set("warm").result(timeout=30)
        client.create_sample_set(images[2:4], [0, 0], sample_set_id="stored")
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(taken) + 1)) - taken)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, limits[1]))  # any file opened now is one too many
        try:
            with pytest.raises(ResourceExhaustedError, match=r"out of file descriptors \(Too many open files\); retry later"):
                client.create_sample_set(images[4:], [0, 0], sample_set_id="new")  # writes its images' files
            with pytest.raises(ResourceExhaustedError, match="out of file descriptors"):
                client.evaluate_sample_set("stored").result(timeout=30)  # reads them
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        assert sorted(stored.sample_set_id for stored in client.sample_sets()) == ["stored", "warm"]
        assert client.create_sample_set(images[4:], [0, 0], sample_set_id="new").sample_count == 2
        assert client.evaluate_sample_set("stored").result(timeout=30).sample_count == 2
    log = server.log_path.read_text()
    assert log.count("out of file descriptors opening ") == 2 and "Traceback" not in log, log[-3000:]


def test_an_upload_refused_for_its_id_display_name_or_set_is_refused_so_before_its_images_are_decoded(server):
    # The samples were decoded first: a malformed id sent with an unreadable image was
    # refused for the image, and a taken id or a missing set cost the decoding (and, on
    # create, the storing) of every image before ALREADY_EXISTS or NOT_FOUND.
    from explaind.client._errors import from_rpc_error

    unreadable = [sample_sets_pb2.Sample(image=common_pb2.Image(encoded=b"no image"), label=0)]
    readable = [sample_sets_pb2.Sample(image=common_pb2.Image(encoded=_png(np.zeros((8, 8, 3), np.uint8))), label=0)]
    refused = (
        ("CreateSampleSet", sample_sets_pb2.CreateSampleSetRequest(sample_set_id="Bad Id!", samples=unreadable),
         grpc.StatusCode.INVALID_ARGUMENT, "sample_set_id"),
        ("CreateSampleSet", sample_sets_pb2.CreateSampleSetRequest(display_name="tab\there", samples=unreadable),
         grpc.StatusCode.INVALID_ARGUMENT, "display_name"),
        ("CreateSampleSet", sample_sets_pb2.CreateSampleSetRequest(sample_set_id="taken", samples=unreadable),
         grpc.StatusCode.ALREADY_EXISTS, "sample_set_id"),
        ("AppendSamples", sample_sets_pb2.AppendSamplesRequest(sample_set_id="never-made", samples=unreadable),
         grpc.StatusCode.NOT_FOUND, "sample_set_id"),
        ("AppendSamples", sample_sets_pb2.AppendSamplesRequest(sample_set_id="taken", samples=unreadable,
                                                               sample_set_uid="123e4567-e89b-52d3-a456-426614174000"),
         grpc.StatusCode.FAILED_PRECONDITION, "sample_set_uid"),
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        taken = stub.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="taken", samples=readable), timeout=30).sample_set
        for method, request, code, field in refused:
            with pytest.raises(grpc.RpcError) as caught:
                getattr(stub, method)(request, timeout=30)
            error = from_rpc_error(caught.value)
            assert (error.code, error.field) == (code, field), (method, request.sample_set_id, error)
        assert stub.GetSampleSet(sample_sets_pb2.GetSampleSetRequest(sample_set_id="taken"), timeout=30).sample_set == taken
        stub.DeleteSampleSet(sample_sets_pb2.DeleteSampleSetRequest(sample_set_id="taken"), timeout=30)


def test_operations_submitted_while_a_client_pages_repeat_none(server, client, world_images):
    client.create_sample_set(_uint8(world_images[0][:2]), [0, 1], sample_set_id="keyset")
    first = [client.evaluate_sample_set("keyset").name for _ in range(5)]
    with grpc.insecure_channel(server.target) as channel:
        operations = operations_pb2_grpc.OperationsServiceStub(channel)
        seen, token = [], ""
        while True:
            response = operations.ListOperations(operations_pb2.ListOperationsRequest(page_size=2, page_token=token), timeout=30)
            seen += [op.name for op in response.operations]
            if len(seen) == 2:  # new jobs arrive between pages: with offsets, page 2 would repeat page 1
                client.evaluate_sample_set("keyset")
                client.evaluate_sample_set("keyset")
            token = response.next_page_token
            if not token:
                break
    assert len(seen) == len(set(seen)) and set(first) <= set(seen)
    assert [op.name for op in client.operations(limit=3)] == [op.name for op in client.operations(limit=1000)][:3]


def test_a_basic_listing_leaves_out_the_responses_and_the_sdk_fetches_one_when_asked(server, client, world_images):
    # A page of full operations was 38 MB on 100k-sample evaluations, for a caller that
    # wanted states and times.
    client.create_sample_set(_uint8(world_images[0][:8]), world_images[1][:8].tolist(), sample_set_id="views")
    evaluated = client.evaluate_sample_set("views").result(timeout=60)
    with grpc.insecure_channel(server.target) as channel:
        operations = operations_pb2_grpc.OperationsServiceStub(channel)
        pages = {view: operations.ListOperations(operations_pb2.ListOperationsRequest(kind="evaluate_sample_set", page_size=1, view=view), timeout=30)
                 for view in (operations_pb2.OPERATION_VIEW_UNSPECIFIED, operations_pb2.OPERATION_VIEW_FULL, operations_pb2.OPERATION_VIEW_BASIC)}
        full, basic = pages[operations_pb2.OPERATION_VIEW_FULL].operations[0], pages[operations_pb2.OPERATION_VIEW_BASIC].operations[0]
        assert pages[operations_pb2.OPERATION_VIEW_UNSPECIFIED].operations[0] == full and full.HasField("response")
        assert basic.done and not basic.HasField("response") and basic.metadata == full.metadata and basic.name == full.name
        with pytest.raises(grpc.RpcError) as caught:
            operations.ListOperations(operations_pb2.ListOperationsRequest(view=7), timeout=30)
        assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                 "view: 7 is not a value of OperationView; use OPERATION_VIEW_BASIC, OPERATION_VIEW_FULL")
    (listed,) = client.operations(kind="evaluate_sample_set", limit=1)
    assert not listed._message.HasField("response")  # the SDK lists the basic view
    assert listed.result().accuracy == evaluated.accuracy and listed.result().mistakes == evaluated.mistakes


def test_uploads_show_their_progress_when_asked(client, world_images, capsys):
    # A 20k-image upload ran for a minute without a word.
    images, labels = _uint8(world_images[0][:7]), world_images[1][:7].tolist()
    client.create_sample_set(images, labels, sample_set_id="progress", chunk_size=3, progress=True)
    client.append_samples("progress", images[:4], labels[:4], chunk_size=2, progress=True)
    client.append_samples("progress", images[:1], labels[:1])  # not asked: nothing shown
    # Not a terminal: a line at the first request, and at the end however soon it comes.
    assert capsys.readouterr().err.splitlines() == ["progress: uploading 3/7", "progress: uploaded 7/7",
                                                    "progress: uploading 2/4", "progress: uploaded 4/4"]
    assert client.sample_set("progress").sample_count == 12

def test_sample_sets_deleted_while_a_client_pages_skip_no_other_set(server, client, world_images):
    # Page tokens were offsets: deleting a set already listed shifted the rest, and the
    # next page started one set too late.
    pixels = _uint8(world_images[0][:1])
    mine = [f"paging-{i}" for i in range(5)]
    for name in mine:
        client.create_sample_set(pixels, [0], sample_set_id=name)
    with grpc.insecure_channel(server.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        seen, token = [], ""
        while True:
            response = sets.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(page_size=2, page_token=token), timeout=30)
            page = [s.sample_set_id for s in response.sample_sets]
            seen += page
            for name in set(page) & set(mine):
                client.delete_sample_set(name)  # each of mine is gone as soon as it was listed
            token = response.next_page_token
            if not token:
                break
    assert [name for name in seen if name in mine] == mine and len(seen) == len(set(seen))


def test_page_tokens_that_are_not_offsets_are_invalid_arguments(server, client, world_images):
    client.create_sample_set(_uint8(world_images[0][:1]), [0], sample_set_id="paged")
    with grpc.insecure_channel(server.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        operations = operations_pb2_grpc.OperationsServiceStub(channel)
        # "9" * 5000 is longer than int() parses (a ValueError: INTERNAL).
        for token in ("9" * 30, "9" * 5000, str(2**63), "+1", " 1", "1_0", "\u0661", "-1", "1.5/", "nan/x", "x/y"):
            for rpc, request in (
                (sets.ListSampleSets, sample_sets_pb2.ListSampleSetsRequest(page_token=token)),
                (sets.ListSamples, sample_sets_pb2.ListSamplesRequest(sample_set_id="paged", page_token=token)),
                (operations.ListOperations, operations_pb2.ListOperationsRequest(page_token=token)),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    rpc(request, timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (token, rpc)
                assert caught.value.details().startswith("page_token: "), caught.value.details()
        # Operations' and sample sets' tokens are "<list>/<create time>/<id>"; float() alone took all of these.
        # "1e999" is written as repr() writes a float but parses to inf: no create time is that.
        for point in ("1_0/x", " 5 /x", "\u0661/x", "-1e300/x", "5.e3/x", "inf/x", "1e999/x"):
            for rpc, request in ((sets.ListSampleSets, sample_sets_pb2.ListSampleSetsRequest(page_token=f"sample_sets/{point}")),
                                 (operations.ListOperations, operations_pb2.ListOperationsRequest(page_token=f"operations/{point}"))):
                with pytest.raises(grpc.RpcError) as caught:
                    rpc(request, timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (point, rpc)
        assert sets.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(page_token="sample_sets/5.0/x"), timeout=30).sample_sets
        largest = sample_sets_pb2.ListSamplesRequest(sample_set_id="paged", page_token=str(2**63 - 1))
        assert sets.ListSamples(largest, timeout=30).samples == []


def test_a_page_token_from_another_list_is_an_invalid_argument(server, client, world_images):
    # Resume points of all three lists looked alike: one list's token in another was
    # taken, and gave an empty last page, so the client read the list as empty.
    client.create_sample_set(_uint8(world_images[0][:1]), [0], sample_set_id="listed")
    client.evaluate_sample_set("listed").result(timeout=120)
    with grpc.insecure_channel(server.target) as channel:
        listings = {
            "sample_sets": (sample_sets_pb2_grpc.SampleSetServiceStub(channel).ListSampleSets, sample_sets_pb2.ListSampleSetsRequest),
            "operations": (operations_pb2_grpc.OperationsServiceStub(channel).ListOperations, operations_pb2.ListOperationsRequest),
            "head_versions": (neuroinspect_pb2_grpc.NeuroInspectServiceStub(channel).ListHeadVersions, neuroinspect_pb2.ListHeadVersionsRequest),
        }
        tokens = {name: rpc(request(page_size=1), timeout=30).next_page_token for name, (rpc, request) in listings.items()}
        assert all(tokens.values()), tokens
        for name, (rpc, request) in listings.items():
            rpc(request(page_token=tokens[name]), timeout=30)  # its own resumes
            for other in set(listings) - {name}:
                with pytest.raises(grpc.RpcError) as refused:
                    rpc(request(page_token=tokens[other]), timeout=30)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, other)
                assert refused.value.details().startswith("page_token: "), refused.value.details()


def test_an_operations_page_token_resumes_only_the_kind_and_state_its_first_page_was_asked_for(server, client, world_images):
    # A token of the succeeded evaluations, sent with other filters, resumed at its time
    # among other operations: a page that was no continuation of the first (AIP-158).
    client.create_sample_set(_uint8(world_images[0][:1]), [0], sample_set_id="filtered")
    for _ in range(2):
        client.evaluate_sample_set("filtered").result(timeout=120)
    succeeded = operations_pb2.OperationState.Value("OPERATION_STATE_SUCCEEDED")
    with grpc.insecure_channel(server.target) as channel:
        operations = operations_pb2_grpc.OperationsServiceStub(channel)

        def listed(**fields: object) -> operations_pb2.ListOperationsResponse:
            return operations.ListOperations(operations_pb2.ListOperationsRequest(page_size=1, **fields), timeout=30)

        filters = {"kind": "evaluate_sample_set", "state": succeeded}
        token = listed(**filters).next_page_token
        assert len(listed(**filters, page_token=token).operations) == 1  # its own listing resumes
        for other, asked in (({}, "everyone's operations"), ({"kind": "evaluate_sample_set"}, "with kind 'evaluate_sample_set'"),
                             ({"state": succeeded}, "with state 'succeeded'"), ({**filters, "owner": "analyst"}, "caller 'analyst'"),
                             ({"kind": "a/b,c@d]"}, "with kind 'a/b,c@d]'")):
            with pytest.raises(grpc.RpcError) as refused:
                listed(**other, page_token=token)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, other
            details = refused.value.details()
            assert details.startswith("page_token: ") and asked in details, details
            assert "is a page token of everyone's operations with kind 'evaluate_sample_set' and state 'succeeded', not of" in details


def test_paging_an_unchanged_set_and_list_gives_every_sample_and_sample_set_once_in_order(server, client, world_images):
    # Each token must resume right after its page: one short would repeat an item per page, a
    # page one item too long would hide the token, and ">=" on the resume time would list the
    # last set of each page again (the test that deletes listed sets cannot see that).
    pixels = _uint8(world_images[0][:7])
    client.create_sample_set(pixels, [0] * 7, sample_set_id="paged-in-threes", attributes=[{"i": str(i)} for i in range(7)])
    mine = [f"listed-once-{i}" for i in range(5)]
    for name in mine:
        client.create_sample_set(pixels[:1], [0], sample_set_id=name)
    with grpc.insecure_channel(server.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        pages, token = [], ""
        while len(pages) < 10:  # bounded: a token that does not advance would loop forever
            response = sets.ListSamples(sample_sets_pb2.ListSamplesRequest(sample_set_id="paged-in-threes", page_size=3, page_token=token), timeout=30)
            pages.append([sample.attributes["i"] for sample in response.samples])
            token = response.next_page_token
            if not token:
                break
        assert pages == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
        seen, token = [], ""
        for _ in range(1000):
            response = sets.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(page_size=2, page_token=token), timeout=30)
            assert len(response.sample_sets) == 2 or not response.next_page_token
            seen += [s.sample_set_id for s in response.sample_sets]
            token = response.next_page_token
            if not token:
                break
    assert len(seen) == len(set(seen)), seen
    assert [name for name in seen if name in mine] == mine and "paged-in-threes" in seen


def test_negative_page_sizes_and_unknown_operation_states_are_invalid_arguments(server, client, world_images):
    # page_size -1 would reach SQLite as LIMIT -1 (no limit); an unknown state, a KeyError (INTERNAL).
    client.create_sample_set(_uint8(world_images[0][:1]), [0], sample_set_id="sized")
    with grpc.insecure_channel(server.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        operations = operations_pb2_grpc.OperationsServiceStub(channel)
        for size in (-1, -(2**31)):
            for rpc, request in (
                (sets.ListSampleSets, sample_sets_pb2.ListSampleSetsRequest(page_size=size)),
                (sets.ListSamples, sample_sets_pb2.ListSamplesRequest(sample_set_id="sized", page_size=size)),
                (operations.ListOperations, operations_pb2.ListOperationsRequest(page_size=size)),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    rpc(request, timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (size, rpc)
                assert caught.value.details() == "page_size: must not be negative", caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            operations.ListOperations(operations_pb2.ListOperationsRequest(state=99), timeout=30)
        assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, (
            "state: 99 is not a value of OperationState; use OPERATION_STATE_QUEUED, OPERATION_STATE_RUNNING, OPERATION_STATE_SUCCEEDED, "
            "OPERATION_STATE_FAILED, OPERATION_STATE_CANCELLED"))


def test_an_enum_number_the_server_does_not_know_is_refused_in_the_protos_terms(server):
    # A client writes enum numbers: "must be one of ('faithful', 'proximal')" named values
    # that appear nowhere in the .proto files.
    with grpc.insecure_channel(server.target) as channel:
        inspect = neuroinspect_pb2_grpc.NeuroInspectServiceStub(channel)
        for rpc, request, message in (
            (inspect.RankMistakeNeurons, neuroinspect_pb2.RankMistakeNeuronsRequest(sample_set_id="s", class_index=1, solver=99),
             "solver: 99 is not a value of CounterfactualSolver; use COUNTERFACTUAL_SOLVER_FAITHFUL, COUNTERFACTUAL_SOLVER_PROXIMAL"),
            (inspect.RankMistakeNeurons, neuroinspect_pb2.RankMistakeNeuronsRequest(sample_set_id="s", class_index=1, execution=-1),
             "execution: -1 is not a value of Execution; use EXECUTION_INLINE, EXECUTION_OPERATION"),
            (inspect.VisualizeNeurons, neuroinspect_pb2.VisualizeNeuronsRequest(pairs=[{"neuron": 3}], method=7),
             "method: 7 is not a value of VisualizationMethod; use VISUALIZATION_METHOD_CLIP_ILLUSION, "
             "VISUALIZATION_METHOD_FEATURE_VISUALIZATION, VISUALIZATION_METHOD_NO_CLIP"),
            (inspect.EditHead, neuroinspect_pb2.EditHeadRequest(sample_set_id="s", class_index=1, neurons=[3], method=3),
             "method: 3 is not a value of HeadEditMethod; use HEAD_EDIT_METHOD_PROBABILITY_RATIO, HEAD_EDIT_METHOD_CONSTRAIN"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                rpc(request, timeout=30)
            assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        predict = inference_pb2_grpc.InferenceServiceStub(channel).Predict
        for dtype, name in ((99, "99"), (common_pb2.DATA_TYPE_INT64, "DATA_TYPE_INT64"), (0, "DATA_TYPE_UNSPECIFIED")):
            with pytest.raises(grpc.RpcError) as caught:
                predict(inference_pb2.PredictRequest(images=[_raw(dtype, (8, 8, 3), bytes(8 * 8 * 3 * 8))]), timeout=30)
            assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, (
                f"images[0].tensor.dtype: {name} is not a pixel type; use DATA_TYPE_UINT8, DATA_TYPE_FLOAT16, DATA_TYPE_FLOAT32"))


def test_page_sizes_are_capped_and_a_full_page_with_its_token_fits_the_message_limit():
    # Unit level: a set of more than 4096 samples is too slow to build here.
    from explaind.service.paging import messages_that_fit, page_limit

    assert page_limit(0, 256, 4096) == 256 and page_limit(4096, 256, 4096) == 4096
    assert page_limit(4097, 256, 4096) == 4096 and page_limit(2**31 - 1, 100, 1000) == 1000
    # A page is filled by estimate; next_page_token (here the longest offset) comes after,
    # so the estimate must leave room for it: a page filled to the limit would go over it.
    limit, token = 20_000, str(2**63 - 1)
    small = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=b"s" * 100))
    paired = 0
    for size in range(limit - 1200, limit - 50, 3):
        big = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=b"b" * size))
        page = messages_that_fit([small, big, small], limit)
        if len(page) > 1:  # one message alone may exceed: the send limit then refuses it
            paired += 1
            assert sample_sets_pb2.ListSamplesResponse(samples=page, next_page_token=token).ByteSize() <= limit, size
    assert paired > 0
    # Many small messages: each costs its field's tag and length besides its own bytes.
    tiny = [sample_sets_pb2.Sample(label=i % 6, image=common_pb2.Image(encoded=b"t" * 8)) for i in range(4000)]
    page = messages_that_fit(tiny, limit)
    assert 0 < len(page) < len(tiny) and sample_sets_pb2.ListSamplesResponse(samples=page, next_page_token=token).ByteSize() <= limit
    # A page is never empty while there is a message, even one over the limit by itself.
    huge = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=b"h" * limit))
    assert messages_that_fit([huge, small], limit) == [huge] and messages_that_fit([small, huge], limit) == [small]


def test_float16_tensors_decode_as_half_floats_and_raw_samples_count_against_the_pixel_budget():
    # In process: no test sent FLOAT16 or a raw-tensor sample over the budget to a server.
    from explaind.errors import InvalidArgument
    from explaind.imaging import PixelBudget
    from explaind.service import convert

    half = np.linspace(0, 1, 3 * 4 * 5, dtype=np.float16).reshape(3, 4, 5)
    decoded = convert.decode_image(_raw(common_pb2.DATA_TYPE_FLOAT16, half.shape, half.tobytes()), field="images[0]")
    assert torch.equal(decoded, torch.from_numpy(half.astype(np.float32)))
    with pytest.raises(InvalidArgument, match="NaN") as refused:  # errors of the pixels name the tensor, like those of its bytes
        convert.decode_image(_raw(common_pb2.DATA_TYPE_FLOAT16, half.shape, np.full_like(half, np.nan).tobytes()), field="images[2]")
    assert refused.value.field == "images[2].tensor"
    budget = PixelBudget(100, field="samples")
    raw = sample_sets_pb2.Sample(image=_raw(common_pb2.DATA_TYPE_UINT8, (10, 10, 3), bytes(300)))
    convert.new_sample(raw, field="samples[0]", budget=budget, jpeg_min_side=0)
    with pytest.raises(InvalidArgument, match="more than the limit of 100 pixels per request") as refused:
        convert.new_sample(raw, field="samples[1]", budget=budget, jpeg_min_side=0)
    assert refused.value.field == "samples"
    # A raw float sample is stored as a PNG of the nearest levels: rounded, not truncated.
    every_level = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    floats = np.clip((every_level.astype(np.float32) - 0.3) / 255, 0, 1)  # each a little under its level
    stored = convert.new_sample(sample_sets_pb2.Sample(image=_raw(common_pb2.DATA_TYPE_FLOAT32, floats.shape, floats.tobytes())),
                                field="samples[0]", budget=PixelBudget(1000, field="samples"), jpeg_min_side=0)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored.encoded))), every_level)


def test_a_sample_set_message_keeps_when_it_was_created_apart_from_when_it_last_changed():
    from explaind.service import convert
    from explaind.store import SampleSetInfo

    message = convert.sample_set(SampleSetInfo("s", "", 3, {0: 2, 5: 1}, create_time=100.5, update_time=200.25, uploading=True))
    assert (message.create_time.ToNanoseconds(), message.update_time.ToNanoseconds()) == (100_500_000_000, 200_250_000_000)
    assert dict(message.class_counts) == {0: 2, 5: 1} and message.uploading


def test_an_operation_not_yet_started_has_no_start_or_end_time():
    # A time not reached is an unset field, not the epoch (1970) a client would show.
    from explaind.jobs import JobSnapshot
    from explaind.service import convert
    from explaind.store import QUEUED, JobRecord

    metadata = operations_pb2.OperationMetadata()
    assert convert.operation(JobSnapshot(JobRecord("j1", "evaluate", QUEUED, 100.5))).metadata.Unpack(metadata)
    assert metadata.create_time.ToNanoseconds() == 100_500_000_000
    assert not metadata.HasField("start_time") and not metadata.HasField("end_time")


def test_each_job_state_is_sent_as_its_own_operation_state_and_read_back_as_it():
    # A mutant sending a queued job as RUNNING survived every test: a client would show a job
    # waiting for a worker as running, and ListOperations' state filter would read its name back wrong.
    from explaind.jobs import JobSnapshot
    from explaind.service import convert
    from explaind.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord

    for state in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED):
        metadata = operations_pb2.OperationMetadata()
        assert convert.operation(JobSnapshot(JobRecord("j1", "evaluate", state, 100.5, error_code="INTERNAL" if state == FAILED else ""))).metadata.Unpack(metadata)
        assert operations_pb2.OperationState.Name(metadata.state) == f"OPERATION_STATE_{state.upper()}"
        assert convert.STATE_NAMES[metadata.state] == state


def test_an_operation_s_metadata_carries_each_field_of_its_job_record():
    # In process: every value distinct, so a field dropped or read from its neighbour
    # (start_time from create_time, total from step) shows.
    from explaind.jobs import JobSnapshot
    from explaind.service import convert
    from explaind.store import RUNNING, ArtifactRef, JobRecord

    record = JobRecord("00000000000000a1", "edit_head", RUNNING, 100.5, start_time=200.25, end_time=None, step=3, total=7, message="epoch 3",
                       cancel_requested=True, artifacts=(ArtifactRef("grid.png", "image/png", "ab" * 32, 4321),), owner="analyst")
    message = convert.operation(JobSnapshot(record, preview=b"png"))
    metadata = operations_pb2.OperationMetadata()
    assert message.metadata.Unpack(metadata) and message.name == "operations/00000000000000a1" and not message.done
    assert (metadata.kind, metadata.state, metadata.owner, metadata.cancel_requested) == ("edit_head", operations_pb2.OPERATION_STATE_RUNNING, "analyst", True)
    assert (metadata.progress.step, metadata.progress.total, metadata.progress.message, metadata.progress.preview_png) == (3, 7, "epoch 3", b"png")
    assert (metadata.create_time.ToNanoseconds(), metadata.start_time.ToNanoseconds()) == (100_500_000_000, 200_250_000_000)
    assert not metadata.HasField("end_time")
    assert [(a.name, a.media_type, a.digest, a.size_bytes) for a in metadata.artifacts] == [("grid.png", "image/png", "ab" * 32, 4321)]
    ended = convert.operation(JobSnapshot(dataclasses.replace(record, end_time=300.0), preview=b"png"), preview=False)  # a watch sent it already
    assert ended.metadata.Unpack(metadata) and metadata.end_time.ToNanoseconds() == 300_000_000_000 and metadata.progress.preview_png == b""


def test_a_failed_operation_carries_its_code_and_the_field_it_names_as_a_bad_request():
    # In process: the operation's error is what a client gets instead of the call's status.
    from google.protobuf import any_pb2

    from explaind.jobs import JobSnapshot
    from explaind.service import convert
    from explaind.store import CANCELLED, FAILED, JobRecord

    details = any_pb2.Any()
    details.Pack(error_details_pb2.BadRequest(field_violations=[{"field": "target_class", "description": "no such class"}]))
    failed = convert.operation(JobSnapshot(JobRecord("j1", "edit_head", FAILED, 1.0, error_code="INVALID_ARGUMENT", error_message="target_class: no such class",
                                                     result=details.SerializeToString())))
    violation = error_details_pb2.BadRequest()
    assert failed.done and failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and failed.error.details[0].Unpack(violation)
    assert [(v.field, v.description) for v in violation.field_violations] == [("target_class", "no such class")]
    # A record without a code (none is written so now) still reads as its state's code.
    for state, code in ((FAILED, grpc.StatusCode.UNKNOWN), (CANCELLED, grpc.StatusCode.CANCELLED)):
        assert convert.operation(JobSnapshot(JobRecord("j2", "edit_head", state, 1.0))).error.code == code.value[0], state


def test_an_error_naming_no_field_and_no_limit_carries_no_subject_detail():
    # An INVALID_ARGUMENT naming no field must carry no BadRequest: its one violation of
    # field "" would read in the SDK as a field_violations entry of no field.
    from explaind.errors import InvalidArgument, NotFound
    from explaind.jobs import _subject_detail
    from explaind.service.convert import error_status

    for error in (InvalidArgument("the request does not parse"), NotFound("no such thing")):
        assert (list(error_status(error).details), _subject_detail(error)) == ([], b""), error


def test_errors_other_than_invalid_argument_name_their_field_in_an_error_info(server, client):
    # Only an INVALID_ARGUMENT carried its field in the details: a pipeline (and our CLI)
    # parsed "sample_set_id: ..." out of a NOT_FOUND's message.
    from explaind.client import OperationError
    from explaind.client._operations import Operation
    from explaind.errors import NotFound
    from explaind.jobs import JobSnapshot, _subject_detail
    from explaind.service import convert
    from explaind.store import FAILED, JobRecord

    with pytest.raises(NotFoundError) as missing:
        client.evaluate_sample_set("missing-set")
    assert missing.value.field == "sample_set_id" and missing.value.field_violations == []
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        sample_sets_pb2_grpc.SampleSetServiceStub(channel).GetSampleSet(sample_sets_pb2.GetSampleSetRequest(sample_set_id="missing-set"), timeout=30)
    status = status_pb2.Status.FromString(dict(caught.value.trailing_metadata())["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert status.message == caught.value.details() and status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ("NOT_FOUND", "explaind.v1", {"field": "sample_set_id"})
    # A job that fails so carries it in its operation's error, as the call would.
    gone = NotFound("no sample set 'x'", field="sample_set_id")
    record = JobRecord("j1", "evaluate", FAILED, 1.0, error_code=gone.code, error_message=str(gone), result=_subject_detail(gone))
    with pytest.raises(NotFoundError) as failed:
        Operation(None, convert.operation(JobSnapshot(record))).result()  # done: no call is made
    assert isinstance(failed.value, OperationError) and failed.value.field == "sample_set_id"


def test_wait_operation_answers_at_the_sooner_of_its_timeout_and_the_call_deadline(server, client):
    # The wait is bounded by both: a short timeout must not wait out the whole call deadline,
    # and a timeout past the deadline must not leave the caller with DEADLINE_EXCEEDED, not the operation.
    operation = client.visualize_neurons([7], method="no_clip", steps=10_000)  # runs (or queues) far longer than this test
    try:
        with grpc.insecure_channel(server.target) as channel:
            operations = operations_pb2_grpc.OperationsServiceStub(channel)
            start = time.monotonic()
            short = operations.WaitOperation(operations_pb2.WaitOperationRequest(name=operation.name, timeout=duration_pb2.Duration(nanos=300_000_000)), timeout=8)
            waited = time.monotonic() - start
            assert not short.operation.done and 0.29 <= waited < 4, waited
            start = time.monotonic()
            long = operations.WaitOperation(operations_pb2.WaitOperationRequest(name=operation.name, timeout=duration_pb2.Duration(seconds=600)), timeout=2)
            waited = time.monotonic() - start
            assert not long.operation.done and waited >= 1, waited  # answered just before the 2 s deadline
    finally:
        operation.cancel()


def test_wait_operation_rejects_timeouts_outside_the_duration_range(server, client, world_images):
    client.create_sample_set(_uint8(world_images[0][:1]), [0], sample_set_id="waited")
    name = client.evaluate_sample_set("waited").name
    with grpc.insecure_channel(server.target) as channel:
        operations = operations_pb2_grpc.OperationsServiceStub(channel)
        negative, mixed, out_of_range = "timeout: must not be negative", "must have the same sign", "outside google.protobuf.Duration's range"
        for seconds, nanos, says in ((10**15, 0, out_of_range), (-1, 0, negative), (0, -5, negative), (1, 10**9, out_of_range),
                                     (1, -5, mixed), (-1, 5, mixed)):
            request = operations_pb2.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(seconds=seconds, nanos=nanos))
            with pytest.raises(grpc.RpcError) as caught:
                operations.WaitOperation(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (seconds, nanos)
            assert caught.value.details().startswith("timeout: ") and says in caught.value.details(), caught.value.details()
        # The longest valid Duration waits until done (or the call deadline), like no timeout.
        longest = operations_pb2.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(seconds=315_576_000_000))
        assert operations.WaitOperation(longest, timeout=60).operation.done


def test_requests_decoding_to_too_many_pixels_are_refused(server, client):
    # The module's server allows 1024 x 1024 decoded pixels per request, PNG and raw alike.
    black = np.zeros((1024, 1024, 3), np.uint8)
    assert len(client.predict([_png(black)])) == 1
    limit = "the images decode to more than the limit of 1048576 pixels per request"
    images = [common_pb2.Image(encoded=_png(black)), common_pb2.Image(encoded=_png(black[:1, :1]))]
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            inference_pb2_grpc.InferenceServiceStub(channel).Predict(inference_pb2.PredictRequest(images=images), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and raised.value.details().startswith(f"images: {limit}")
        samples = [sample_sets_pb2.Sample(image=image, label=0) for image in images]
        with pytest.raises(grpc.RpcError) as raised:
            sample_sets_pb2_grpc.SampleSetServiceStub(channel).CreateSampleSet(
                sample_sets_pb2.CreateSampleSetRequest(sample_set_id="too-many-pixels", samples=samples), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and raised.value.details().startswith(f"samples: {limit}")
    with pytest.raises(NotFoundError):
        client.sample_set("too-many-pixels")
    # The SDK knows the server's limits and sends the two in separate requests.
    assert client.model_metadata().limits.max_pixels_per_request == 1024 * 1024
    assert len(client.predict([_png(black), black[:1, :1]])) == 2
    assert client.create_sample_set([black, _png(black[:1, :1])], [0, 0], sample_set_id="split-by-pixels").sample_count == 2
    # An image over the limit by itself goes alone, as the first request too (not after an
    # empty one), for the server to refuse by what it decodes to.
    with pytest.raises(InvalidArgumentError, match=re.escape(limit)):
        client.predict([_png(np.zeros((1025, 1024, 3), np.uint8)), black[:1, :1]])


def test_predict_splits_a_long_list_by_the_servers_limits_and_keeps_the_order(server, client, world_images, monkeypatch):
    pixels = np.tile(_uint8(world_images[0]), (6, 1, 1, 1))[:260]  # the module's server takes 256 per request
    metadata = client.model_metadata()
    # Requests of at most one batch of the server's model, within its image limit.
    per_request = min(metadata.limits.max_images_per_request, metadata.max_batch_size)
    assert per_request == 32
    calls = []
    original = client._call
    monkeypatch.setattr(client, "_call", lambda *args, **kwargs: calls.append(args[1]) or original(*args, **kwargs))
    predictions = client.predict(pixels, top_k=1, return_features=True)
    assert calls.count("Predict") == 9 and len(predictions) == 260
    once = client.predict(pixels[250:], top_k=1, return_features=True)
    assert [p.class_indices for p in predictions[250:]] == [p.class_indices for p in once]
    np.testing.assert_allclose(np.stack([p.features for p in predictions[250:]]), np.stack([p.features for p in once]), atol=1e-5)
    with pytest.raises(InvalidArgumentError) as raised:
        client.predict([*pixels[:256], b"not an image"])
    assert raised.value.__notes__ == ["the failing request began at item 256 of 257: [i] there is item 256 + i here"]
    with pytest.raises(InvalidArgumentError) as raised:
        client.predict([pixels[0], b"not an image"])
    # The first request's [i] is the caller's item i already: no note to say so.
    assert raised.value.field == "images[1].encoded" and raised.value.request_offset == 0 and not hasattr(raised.value, "__notes__")


@pytest.fixture(scope="module")
def small_messages(server_factory):
    """A server whose messages are limited to 256 KiB."""
    return server_factory(server={"max_message_bytes": 1 << 18})


def test_list_samples_pages_end_before_the_message_size_limit(small_messages):
    # Ten 150x150 noise PNGs of about 68 kB: the default page of 256 would be 680 kB.
    images = [_png(np.random.default_rng(i).integers(0, 256, (150, 150, 3), dtype=np.uint8)) for i in range(10)]
    with Client(small_messages.target, timeout=30) as client:
        client.create_sample_set(images, list(range(6)) + [0] * 4, sample_set_id="big-images", chunk_size=3)
        assert [s.label for s in client.samples("big-images")] == list(range(6)) + [0] * 4
    with grpc.insecure_channel(small_messages.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        token, pages, listed = "", 0, []
        while True:
            response = sets.ListSamples(sample_sets_pb2.ListSamplesRequest(sample_set_id="big-images", page_token=token), timeout=30)
            assert 1 <= len(response.samples) and response.ByteSize() <= 1 << 18
            listed += [sample.image.encoded for sample in response.samples]
            pages, token = pages + 1, response.next_page_token
            if not token:
                break
            # A page cut short by the size limit: an offset with its format's version and its set too.
            assert re.fullmatch(r"3:samples\[set=big-images\]/[0-9a-f-]{36}/[0-9]+", token), token
    assert listed == images and pages >= 3


def test_an_evaluation_too_large_for_a_message_is_listed_cut_and_read_whole(server_factory, capsys):
    # 1000 mistakes are 12 kB of result, over an 8 KiB limit. Such an operation could be
    # neither fetched nor listed: its list page failed RESOURCE_EXHAUSTED and the pages
    # after it were out of reach.
    limit = 1 << 13
    server = server_factory(server={"max_message_bytes": limit})
    image = _png(np.full((8, 8, 3), 200, np.uint8))
    with Client(server.target, timeout=60) as client:
        predicted = client.predict([image])[0].class_indices[0]
        wrong = (predicted + 1) % len(client.model_metadata().class_names)
        client.create_sample_set([image] * 1000, [wrong] * 1000, sample_set_id="all-wrong")
        client.create_sample_set([image], [wrong], sample_set_id="one-wrong")
        operation = client.evaluate_sample_set("all-wrong")
        ranges = {"service": "explaind.v1.OperationsService", "method": "GetArtifact", "code": "OK"}
        before = _metric(server, "explaind_rpc_duration_seconds_count", **ranges)
        whole = operation.result()
        assert operation.response_cut and len(whole.mistakes) == 1000 == whole.mistake_count
        # In ranges of half the limit: 64 KiB of room made them 1 byte each.
        size = next(a.size_bytes for a in operation.artifacts if a.name == "result.binpb")
        assert _metric(server, "explaind_rpc_duration_seconds_count", **ranges) - before == -(-size // (limit // 2))
        cut = operation.result(download=False)
        assert 0 < len(cut.mistakes) < 1000 and cut.mistake_count == 1000 and cut.mistakes == whole.mistakes[:len(cut.mistakes)]
        assert cut.accuracy == whole.accuracy == 0.0
        assert len(client.evaluate_sample_set("one-wrong").result().mistakes) == 1  # listed after it
        # A ranking's per-mistake summaries are cut likewise, and read whole.
        ranking = client.rank_mistake_neurons("all-wrong", wrong, include_samples=True, execution="operation", max_iterations=20)
        assert ranking.mistake_count == len(ranking.mistakes) == 1000 and ranking.omega.shape == (1000, 128)
        ranked = client.operations(kind="rank_mistake_neurons")[0]
        assert ranked.response_cut and 0 < len(ranked.result(download=False).mistakes) < 1000
    with grpc.insecure_channel(server.target) as channel:
        operations = operations_pb2_grpc.OperationsServiceStub(channel)
        fetched = operations.GetOperation(operations_pb2.GetOperationRequest(name=operation.name), timeout=30)
        assert fetched.ByteSize() <= limit // 2 + 4096
        listed, token = [], ""
        while True:
            page = operations.ListOperations(operations_pb2.ListOperationsRequest(page_token=token), timeout=30)
            listed += [op.name for op in page.operations]
            if not (token := page.next_page_token):
                break
        assert operation.name in listed and len(listed) == 3
    assert cli_main(["--target", server.target, "operations", "get", operation.name]) == 0
    printed = capsys.readouterr().out
    assert "too large for one message" in printed and "and 995 more mistakes" in printed


def test_head_versions_are_listed_in_pages_that_fit_the_message_limit(server_factory):
    # Every version went into one response, each with two evaluations: once they passed
    # max_message_bytes, listing them failed RESOURCE_EXHAUSTED for good.
    limit = 1 << 13
    server = server_factory(server={"max_message_bytes": limit})
    image = _png(np.full((8, 8, 3), 200, np.uint8))
    with Client(server.target, timeout=60) as client:
        classes = len(client.model_metadata().class_names)
        client.create_sample_set([image] * 10, [i % classes for i in range(10)], sample_set_id="train")
        for neuron in range(3):  # a description of 3500 characters: one version to a page (each result fits in half the limit)
            client.edit_head("train", 1, [neuron], max_epochs=1, description=str(neuron) * 3500).result()
        versions = client.head_versions()
        assert [(v.version_id, v.active) for v in versions] == [("v0", True), ("v1", False), ("v2", False), ("v3", False)]
        assert versions[2].description == "1" * 3500

        with grpc.insecure_channel(server.target) as channel:
            stub = neuroinspect_pb2_grpc.NeuroInspectServiceStub(channel)

            def page(size: int = 0, token: str = "") -> neuroinspect_pb2.ListHeadVersionsResponse:
                response = stub.ListHeadVersions(neuroinspect_pb2.ListHeadVersionsRequest(page_size=size, page_token=token), timeout=30)
                assert response.ByteSize() <= limit and response.active_version_id == "v0"
                return response

            pages, token = [], ""
            while True:
                response = page(token=token)
                pages.append([v.version_id for v in response.versions])
                if not (token := response.next_page_token):
                    break
            assert sum(pages, []) == ["v0", "v1", "v2", "v3"] and len(pages) >= 3
            first = page(size=1)
            assert [v.version_id for v in first.versions] == ["v0"] and first.versions[0].active
            second = page(size=1, token=first.next_page_token)
            assert [v.version_id for v in second.versions] == ["v1"]
            client.delete_head_version("v1")  # the token resumes after it all the same
            assert [v.version_id for v in page(size=2, token=second.next_page_token).versions] == ["v2"]
            for request, field in ((neuroinspect_pb2.ListHeadVersionsRequest(page_token="v1"), "page_token"),
                                   (neuroinspect_pb2.ListHeadVersionsRequest(page_size=-1), "page_size")):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ListHeadVersions(request, timeout=30)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.details().startswith(f"{field}: ")


def test_get_head_version_answers_one_version_with_whether_it_is_served(server, client):
    image = _png(np.full((8, 8, 3), 120, np.uint8))
    client.create_sample_set([image] * 10, [i % 2 for i in range(10)], sample_set_id="get-head-version")
    stored = client.edit_head("get-head-version", 1, [0], max_epochs=1).result().version
    listed = {v.version_id: v for v in client.head_versions()}
    served = next(v.version_id for v in listed.values() if v.active)
    with grpc.insecure_channel(server.target) as channel:
        stub = neuroinspect_pb2_grpc.NeuroInspectServiceStub(channel)

        def get(version_id: str) -> neuroinspect_pb2.HeadVersion:
            return stub.GetHeadVersion(neuroinspect_pb2.GetHeadVersionRequest(version_id=version_id), timeout=30).version

        pages = stub.ListHeadVersions(neuroinspect_pb2.ListHeadVersionsRequest(page_size=1000), timeout=30).versions
        assert get(stored.version_id) == next(v for v in pages if v.version_id == stored.version_id)  # evaluations and all
        assert (get(stored.version_id).active, get(served).active) == (False, True)
        with pytest.raises(grpc.RpcError) as unknown:
            get("v9999")
        status = status_pb2.Status.FromString(dict(unknown.value.trailing_metadata())["grpc-status-details-bin"])
        info = error_details_pb2.ErrorInfo()
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and status.details[0].Unpack(info) and info.metadata["field"] == "version_id"
        for malformed, why in (("", "required"), ("v01", "'v01' is not a head version id")):
            with pytest.raises(grpc.RpcError) as refused:
                get(malformed)
            status = status_pb2.Status.FromString(dict(refused.value.trailing_metadata())["grpc-status-details-bin"])
            violation = error_details_pb2.BadRequest()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and status.details[0].Unpack(violation)
            assert [v.field for v in violation.field_violations] == ["version_id"] and why in violation.field_violations[0].description
    assert client.head_version(stored.version_id) == listed[stored.version_id]
    client.delete_head_version(stored.version_id)
    with pytest.raises(NotFoundError) as deleted:
        client.head_version(stored.version_id)
    assert deleted.value.field == "version_id"


def _padded_png(size: int) -> bytes:
    """An 8x8 PNG padded with a text chunk to exactly ``size`` bytes."""
    from PIL import PngImagePlugin

    plain = _png(np.zeros((8, 8, 3), np.uint8))
    info = PngImagePlugin.PngInfo()
    info.add_text("pad", "x" * (size - len(plain) - 12 - len("pad") - 1))  # 12: length, type and CRC
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG", pnginfo=info)
    assert len(buffer.getvalue()) == size
    return buffer.getvalue()


def test_a_sample_alone_over_a_pages_budget_still_goes_out_on_a_page_of_its_own(small_messages):
    # A page stops early where the next sample would pass the budget (the 256 KiB limit
    # less room for the token), but never empty: an empty page whose token points where the
    # request began would send the client round forever. This sample is over the budget yet
    # within the limit, so its page goes out.
    small, big = _png(np.zeros((8, 8, 3), np.uint8)), _padded_png(261_700)
    samples = [sample_sets_pb2.Sample(image=common_pb2.Image(encoded=e)) for e in (small, big, small)]
    with grpc.insecure_channel(small_messages.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        sets.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="one-big-sample", samples=samples), timeout=30)
        pages, tokens, token = [], [], ""
        while len(pages) < 6:
            response = sets.ListSamples(sample_sets_pb2.ListSamplesRequest(sample_set_id="one-big-sample", page_token=token), timeout=30)
            pages.append([len(sample.image.encoded) for sample in response.samples])
            token = response.next_page_token
            tokens.append(token)
            if not token:
                break
    assert pages == [[len(small)], [len(big)], [len(small)]] and [token.rpartition("/")[2] for token in tokens] == ["1", "2", ""]


def test_uploads_are_split_to_fit_the_message_limit_and_all_or_nothing(small_messages):
    # Ten 68 kB PNGs: one request of 680 kB would exceed the 256 KiB limit on both ends.
    images = [_png(np.random.default_rng(i).integers(0, 256, (150, 150, 3), dtype=np.uint8)) for i in range(10)]
    with Client(small_messages.target, timeout=30, max_message_bytes=1 << 18) as client:
        created = client.create_sample_set(images, [0] * 10, sample_set_id="split-upload")
        assert created.sample_count == 10
        stored = [np.asarray(s.image) for s in client.samples("split-upload")]
        assert all(np.array_equal(got, np.asarray(Image.open(io.BytesIO(png)))) for got, png in zip(stored, images, strict=True))
        assert client.append_samples("split-upload", images[:4], [1] * 4).sample_count == 14
        broken = images[:3] + [b"not an image"]
        with pytest.raises(InvalidArgumentError, match=r"samples\[1\].image.encoded: bytes are not an image") as raised:
            client.create_sample_set(broken, [0] * 4, sample_set_id="half-uploaded")
        assert raised.value.__notes__ == ["the failing request began at item 2 of 4: [i] there is item 2 + i here",
                                          "the partly uploaded sample set 'half-uploaded' was deleted"]
        with pytest.raises(NotFoundError):
            client.sample_set("half-uploaded")
        with pytest.raises(InvalidArgumentError) as raised:
            client.append_samples("split-upload", broken, [0] * 4)
        # The bad image is refused again until it is mended: said so, not only "append the rest".
        assert raised.value.__notes__[-1] == ("the first 2 of 4 samples were appended to 'split-upload': once what the error names is put "
                                              "right, append the rest (samples 2 on)")
        upload = "00000000-0000-4000-8000-000000000004"
        with pytest.raises(InvalidArgumentError) as raised:
            client.append_samples("split-upload", broken, [0] * 4, request_id=upload)
        assert raised.value.__notes__[-1] == (
            f"the first 2 of 4 samples were appended to 'split-upload': once what the error names is put right, run this append_samples "
            f"again under request_id {upload} (the CLI's --request-id; the same chunk_size and, before the failed request, the same images) to append the rest: "
            "the requests the server applied are answered without appending again")
        assert client.append_samples("split-upload", images[:3] + images[4:5], [0] * 4, request_id=upload).sample_count == 14 + 2 + 4
        with pytest.raises(ValueError, match="chunk_size must be at least 1"):
            client.create_sample_set(images[:1], [0], chunk_size=0)

        # Images are read as they are sent, from any iterable: a folder of 50,000 files was
        # read into memory whole before the first request.
        read, sent_after = [], []

        def files():
            for i, image in enumerate(images):
                read.append(i)
                yield image

        call = client._call

        def counting(service, method, request, **kwargs):
            if method in ("CreateSampleSet", "AppendSamples"):
                sent_after.append(len(read))
            return call(service, method, request, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(client, "_call", counting)
            streamed = client.create_sample_set(files(), [0] * 10, sample_set_id="streamed")
        assert streamed.sample_count == 10 and [np.asarray(s.image).shape for s in client.samples("streamed")] == [(150, 150, 3)] * 10
        assert len(sent_after) >= 3 and sent_after[0] < 10, sent_after  # the first request went before the last file was read
        assert all(later - earlier <= 2 * 3 for earlier, later in zip([0, *sent_after], sent_after)), sent_after  # at most two runs ahead
        with pytest.raises(ValueError, match=r"^the images are not as many as the 3 labels$"):  # found once the images ran out
            client.create_sample_set(iter(images[:2]), [0] * 3, sample_set_id="short")
        with pytest.raises(NotFoundError):  # the part uploaded by then is deleted
            client.sample_set("short")


def test_paths_that_are_pipes_are_read_and_directories_refused_before_any_request(client, tmp_path):
    # The check of a list's paths took "not a regular file" for missing: a pipe
    # (`cat x.png | ...` as /dev/stdin, or a FIFO) was refused as "no such file".
    import threading

    png = _png(np.full((16, 16, 3), 90, np.uint8))
    pipe = tmp_path / "image.fifo"
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_bytes, args=(png,))
    writer.start()
    try:
        (through_pipe,) = client.predict([pipe])
    finally:
        writer.join(10)
    assert through_pipe.class_indices == client.predict([png])[0].class_indices
    with pytest.raises(IsADirectoryError, match=r"^images\[1\]: a directory, not an image file: "):
        client.predict([png, tmp_path])


def test_a_sample_set_request_carries_at_most_the_images_per_request_and_the_sdk_splits_to_fit(server, client):
    # Tiny images passed the pixel limit by the million: 20,000 samples of 1x1 held a
    # server thread for a minute of durable writes.
    created = client.create_sample_set(np.zeros((300, 8, 8, 3), np.uint8), [0] * 300, sample_set_id="split-by-count")  # chunk_size 512
    assert created.sample_count == 300
    dot = sample_sets_pb2.Sample(image=_raw(common_pb2.DATA_TYPE_UINT8, (1, 1, 3), bytes(3)))
    with grpc.insecure_channel(server.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        for call, request in ((sets.CreateSampleSet, sample_sets_pb2.CreateSampleSetRequest(sample_set_id="too-many", samples=[dot] * 257)),
                              (sets.AppendSamples, sample_sets_pb2.AppendSamplesRequest(sample_set_id="split-by-count", samples=[dot] * 257))):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith("samples: 257 samples exceed the limit of 256 per request"), caught.value.details()
    assert client.sample_set("split-by-count").sample_count == 300
    with pytest.raises(NotFoundError):
        client.sample_set("too-many")


def test_local_files_that_cannot_be_read_stop_an_upload_before_or_without_leaving_anything(client, tmp_path):
    # Images are read as their requests are made, so a missing file failed an append part
    # way through, leaving a part appended; a list of paths is now checked first.
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(_png(np.full((8, 8, 3), 40 * i, np.uint8)))
    created = client.create_sample_set(np.array([str(p) for p in paths[:2]]), [0, 1], sample_set_id="from-files")  # an array of paths is a list
    assert created.sample_count == 2
    missing = paths[:5] + [tmp_path / "gone.png"]
    with pytest.raises(FileNotFoundError, match=r"^images\[5\]: no such file: .*gone.png$"):
        client.append_samples("from-files", missing, [0] * 6, chunk_size=2)
    assert client.sample_set("from-files").sample_count == 2  # nothing was appended

    def files():  # an iterable is read as it goes: the error comes once the upload has begun
        yield from missing

    with pytest.raises(FileNotFoundError, match=r"^images\[5\]: cannot read .*gone.png: No such file or directory\n") as raised:
        client.create_sample_set(files(), [0] * 6, sample_set_id="half-read", chunk_size=2)
    assert raised.value.__notes__ == ["the partly uploaded sample set 'half-read' was deleted"]  # no request failed: no offset note
    assert not hasattr(raised.value, "request_offset")
    with pytest.raises(NotFoundError):
        client.sample_set("half-read")


def test_a_set_being_uploaded_in_several_requests_is_unusable_until_its_last(server, client, world_images):
    # A crash mid-upload used to leave a partial set that jobs ran on as if it were complete.
    from explaind.client import FailedPreconditionError

    pixels, labels = _uint8(world_images[0][:6]), world_images[1][:6].tolist()
    samples = [sample_sets_pb2.Sample(image=common_pb2.Image(encoded=_png(p)), label=l) for p, l in zip(pixels, labels, strict=True)]
    with grpc.insecure_channel(server.target) as channel:
        sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
        created = sets.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="in-flight", samples=samples[:2], upload_continues=True))
        assert created.sample_set.uploading
        sets.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="in-flight", samples=samples[2:4]))
        assert client.sample_set("in-flight").uploading
        for start_job in (lambda: client.evaluate_sample_set("in-flight"), lambda: client.rank_mistake_neurons("in-flight", "heart"),
                          lambda: client.edit_head("in-flight", "heart", [1])):
            with pytest.raises(FailedPreconditionError, match=r"^FAILED_PRECONDITION: sample_set_id: sample set 'in-flight' is still being uploaded \(4 samples so far\)"):
                start_job()
        done = sets.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="in-flight", samples=samples[4:], finish_upload=True))
        assert not done.sample_set.uploading and done.sample_set.sample_count == 6
        sets.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="ended-late", samples=samples[:1], upload_continues=True))
        ended = sets.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="ended-late", finish_upload=True))  # nothing left to send
        assert not ended.sample_set.uploading and ended.sample_set.sample_count == 1
    assert client.evaluate_sample_set("in-flight").result(timeout=60).sample_count == 6
    # The SDK marks its split uploads the same way: uploading until the last request.
    sent = []
    call = client._call
    client._call = lambda service, method, request, **kwargs: (sent.append(request), call(service, method, request, **kwargs))[1]
    try:
        assert not client.create_sample_set(pixels, labels, sample_set_id="sdk-split", chunk_size=4).uploading
    finally:
        client._call = call
    uploads = [r for r in sent if isinstance(r, (sample_sets_pb2.CreateSampleSetRequest, sample_sets_pb2.AppendSamplesRequest))]
    assert [(type(r).__name__, len(r.samples)) for r in uploads] == [("CreateSampleSetRequest", 4), ("AppendSamplesRequest", 2)]
    assert uploads[0].upload_continues and uploads[1].finish_upload
    assert uploads[1].sample_set_uid == client.sample_set("sdk-split").uid  # the set the upload made, nothing else
    assert not client.create_sample_set(pixels[:2], labels[:2], sample_set_id="sdk-one-request").uploading


def test_an_upload_never_adds_to_a_set_made_under_its_id_by_another_client(server, client, world_images):
    # A deleted and re-made "x" took the rest of another client's upload, which then
    # reported success: 3 samples of its own and 10 of the other's, and no error for either.
    from explaind.client import FailedPreconditionError

    pixels, labels = _uint8(world_images[0][:20]), world_images[1][:20].tolist()

    def interrupted_by_another_client():
        for i, image in enumerate(pixels):
            if i == 15:  # the chunks are read ahead of their requests: by now the first request (at least) was sent
                other.delete_sample_set("x")
                other.create_sample_set(pixels[:3], labels[:3], sample_set_id="x", display_name="the other client's")
            yield image

    with Client(server.target, timeout=30) as other:
        with pytest.raises(FailedPreconditionError) as refused:
            client.create_sample_set(interrupted_by_another_client(), labels, sample_set_id="x", chunk_size=5)
        theirs = client.sample_set("x")
        assert (theirs.display_name, theirs.sample_count, theirs.uploading) == ("the other client's", 3, False)
        assert refused.value.field == "sample_set_uid" and "it was deleted and created again since" in str(refused.value)
        assert refused.value.__notes__ == ["the partly uploaded sample set 'x' was deleted meanwhile, not by this upload "
                                           "(by another client, or by a server restart, which deletes sets left uploading)"]
        # Through the API: a set's uid tells it from an earlier one of its id, and a request that names one acts on it only.
        with grpc.insecure_channel(server.target) as channel:
            sets = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
            one = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=_png(pixels[0])), label=labels[0])
            first = sets.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="y", samples=[one])).sample_set
            sets.DeleteSampleSet(sample_sets_pb2.DeleteSampleSetRequest(sample_set_id="y", sample_set_uid=first.uid))
            second = sets.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="y", samples=[one])).sample_set
            assert first.uid != second.uid and client.sample_set("y").uid == second.uid
            for rpc, request in ((sets.AppendSamples, sample_sets_pb2.AppendSamplesRequest(sample_set_id="y", samples=[one], sample_set_uid=first.uid)),
                                 (sets.DeleteSampleSet, sample_sets_pb2.DeleteSampleSetRequest(sample_set_id="y", sample_set_uid=first.uid))):
                with pytest.raises(grpc.RpcError) as caught:
                    rpc(request, timeout=30)
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert caught.value.details().startswith(f"sample_set_uid: sample set 'y' is not the set of uid {first.uid} any more")
            with pytest.raises(grpc.RpcError) as caught:
                sets.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="y", samples=[one], sample_set_uid="v1"), timeout=30)
            assert (caught.value.code(), caught.value.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT, "sample_set_uid: 'v1' is not a sample set uid (a lowercase UUID, as SampleSet.uid)")
            appended = sets.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="y", samples=[one], sample_set_uid=second.uid))
            assert appended.sample_set.sample_count == 2 and appended.sample_set.uid == second.uid
    for name in ("x", "y"):
        client.delete_sample_set(name)


def test_a_queued_job_does_not_run_on_a_set_made_under_its_id_after_it_was_submitted(server, client, world_images):
    # It evaluated the new 10-sample set and succeeded, for a request about a 100-sample one.
    from explaind.client import FailedPreconditionError, OperationError

    pixels, labels = _uint8(world_images[0][:12]), world_images[1][:12].tolist()
    client.create_sample_set(pixels, labels, sample_set_id="replaced")
    uid = client.sample_set("replaced").uid
    busy = client.visualize_neurons([3], method="feature_visualization", steps=10_000)  # holds the one job worker
    try:
        with grpc.insecure_channel(server.target) as channel:  # the SDK waits for a ranking: the stub only starts it
            ranking = neuroinspect_pb2_grpc.NeuroInspectServiceStub(channel).RankMistakeNeurons(neuroinspect_pb2.RankMistakeNeuronsRequest(
                sample_set_id="replaced", class_name="heart", execution=neuroinspect_pb2.EXECUTION_OPERATION), timeout=30)
        queued = [client.evaluate_sample_set("replaced"), client.operation(ranking.operation.name), client.edit_head("replaced", "heart", [1])]
        client.delete_sample_set("replaced")
        client.create_sample_set(pixels[:10], labels[:10], sample_set_id="replaced")
    finally:
        busy.cancel()
    for operation in queued:
        with pytest.raises(OperationError) as failed:
            operation.result(timeout=120)
        assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION, failed.value
        assert f"sample set 'replaced' is not the set of uid {uid} any more" in str(failed.value)
    with pytest.raises(FailedPreconditionError):  # the old set's uid, named in a delete, spares the new set
        client.delete_sample_set("replaced", uid=uid)
    client.delete_sample_set("replaced")


def test_an_artifact_larger_than_the_servers_message_limit_downloads_in_ranges_that_fit(small_messages, world_images):
    # 624 images all labelled heart: about 520 mistakes, so omega.npy is (M, 128) float32 > 256 KiB.
    pixels = np.tile(_uint8(world_images[0]), (13, 1, 1, 1))
    with Client(small_messages.target, timeout=60) as client:
        client.create_sample_set(pixels, ["heart"] * len(pixels), sample_set_id="wide-omega")
        ranking = client.rank_mistake_neurons("wide-omega", "heart", execution="operation", include_samples=True)
    assert ranking.omega.shape == (ranking.mistake_count, 128) and ranking.omega.nbytes > 1 << 18


def test_a_response_over_the_send_limit_is_counted_with_the_code_the_caller_gets(small_messages):
    # 600 images with their 128 features are a 350 kB response; the request is only 50 kB.
    request = inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=_png(np.zeros((16, 16, 3), np.uint8)))] * 600, return_features=True)
    labels = {"service": "explaind.v1.InferenceService", "method": "Predict", "code": "RESOURCE_EXHAUSTED"}
    before = _metric(small_messages, "explaind_rpc_duration_seconds_count", **labels)
    with grpc.insecure_channel(small_messages.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            inference_pb2_grpc.InferenceServiceStub(channel).Predict(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _metric(small_messages, "explaind_rpc_duration_seconds_count", **labels) == before + 1
    assert "more than the server's limit of 262144" in caught.value.details()


def test_a_request_over_the_limit_is_counted_as_started_though_no_handler_runs(small_messages):
    # gRPC refuses it before the handler (RESOURCE_EXHAUSTED), so rpc_duration never sees it.
    request = sample_sets_pb2.CreateSampleSetRequest(sample_set_id="too-big", samples=[
        sample_sets_pb2.Sample(image=common_pb2.Image(encoded=bytes(300_000)))])
    labels = {"service": "explaind.v1.SampleSetService", "method": "CreateSampleSet"}
    refused = {**labels, "code": "RESOURCE_EXHAUSTED"}
    started, handled = _metric(small_messages, "explaind_rpcs_started_total", **labels), _metric(small_messages, "explaind_rpc_duration_seconds_count", **refused)
    with grpc.insecure_channel(small_messages.target, options=[("grpc.max_send_message_length", 1 << 20)]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            sample_sets_pb2_grpc.SampleSetServiceStub(channel).CreateSampleSet(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _metric(small_messages, "explaind_rpcs_started_total", **labels) == started + 1
    assert _metric(small_messages, "explaind_rpc_duration_seconds_count", **refused) == handled


def test_the_client_honours_its_deadline(client, world_images):
    with pytest.raises(DeadlineExceededError):
        client.predict(_uint8(world_images[0][:32]), timeout=1e-4)
    assert len(client.predict(_uint8(world_images[0][:1]))) == 1


def test_sample_set_lifecycle(client, world_images):
    images, labels = world_images
    pixels = _uint8(images[:10])
    created = client.create_sample_set(pixels[:6], labels[:6].tolist(), sample_set_id="lifecycle", display_name="first six", attributes=[{"i": str(i)} for i in range(6)], chunk_size=4)
    assert (created.sample_set_id, created.display_name, created.sample_count) == ("lifecycle", "first six", 6)
    appended = client.append_samples("lifecycle", [_png(p) for p in pixels[6:]], labels[6:10].tolist())
    assert appended.sample_count == 10
    assert sum(appended.class_counts.values()) == 10
    assert "lifecycle" in [s.sample_set_id for s in client.sample_sets()]
    samples = list(client.samples("lifecycle"))
    assert [s.label for s in samples] == labels[:10].tolist()
    assert samples[3].attributes == {"i": "3"}
    for sample, expected in zip(samples, pixels):
        np.testing.assert_array_equal(np.asarray(sample.image.convert("RGB")), expected)
    # From an index (an evaluation's sample_index), without the samples before it.
    assert [s.attributes for s in client.samples("lifecycle", start=4)] == [s.attributes for s in samples[4:]]
    assert list(client.samples("lifecycle", start=10)) == []
    with pytest.raises(ValueError, match="start must be a sample index"):
        next(client.samples("lifecycle", start=-1))
    with pytest.raises(AlreadyExistsError, match="lifecycle"):
        client.create_sample_set(pixels[:1], [0], sample_set_id="lifecycle")
    with pytest.raises(InvalidArgumentError, match="sample_set_id"):
        client.create_sample_set(pixels[:1], [0], sample_set_id="Not Valid!")
    with pytest.raises(InvalidArgumentError, match=r"samples\[1\].label"):
        client.create_sample_set(pixels[:2], [0, 99])
    with pytest.raises(InvalidArgumentError, match="at least one sample"):
        client.create_sample_set([], [])
    with pytest.raises(InvalidArgumentError, match=r"samples\[0\].image.encoded"):
        client.append_samples("lifecycle", [b"\x89PNG broken"], [0])
    assert client.sample_set("lifecycle").sample_count == 10  # nothing half-written
    client.delete_sample_set("lifecycle")
    with pytest.raises(NotFoundError):
        client.sample_set("lifecycle")


def test_evaluate_job_result_matches_in_process_and_has_artifact(client, world_model, world_images):
    images, labels = world_images
    pixels = _uint8(images)
    client.create_sample_set(pixels, labels.tolist(), sample_set_id="evaluate")
    operation = client.evaluate_sample_set("evaluate", batch_size=16)
    report = operation.result(timeout=120)
    with torch.inference_mode():
        predicted = world_model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).argmax(1)
    assert operation.state == "succeeded"
    assert report.sample_count == len(labels)
    assert report.accuracy == pytest.approx(float((predicted == labels).float().mean()))
    assert report.confusion_matrix.sum() == len(labels)
    assert np.trace(report.confusion_matrix) == int((predicted == labels).sum())
    assert {m[0] for m in report.mistakes} == set(torch.nonzero(predicted != labels).flatten().tolist())
    grid = operation.artifact_image("mistakes.png")
    assert grid.width > 0 and [a.name for a in operation.artifacts] == ["mistakes.png"]
    with pytest.raises(NotFoundError, match=re.escape("artifact: operation has no artifact 'grid.png'; it has ['mistakes.png']")):
        operation.artifact("grid.png")
    with pytest.raises(InvalidArgumentError, match=re.escape("artifact: required; the operation has ['mistakes.png']")):
        operation.artifact("")
    assert operation.name in [op.name for op in client.operations(kind="evaluate_sample_set", state="succeeded")]


def test_artifacts_are_read_in_ranges_and_checked_against_their_digest(server, client, world_images, monkeypatch):
    from explaind.client import _operations

    images, labels = world_images
    client.create_sample_set(_uint8(images), labels.tolist(), sample_set_id="artifact-ranges")
    operation = client.evaluate_sample_set("artifact-ranges", batch_size=16)
    operation.wait(120)
    whole = operation.artifact("mistakes.png")
    (listed,) = operation.artifacts
    assert len(whole) == listed.size_bytes > 40
    with grpc.insecure_channel(server.target) as channel:
        stub = operations_pb2_grpc.OperationsServiceStub(channel)

        def read(**fields):
            return stub.GetArtifact(operations_pb2.GetArtifactRequest(name=operation.name, artifact="mistakes.png", **fields), timeout=30)

        assert read().content == whole
        middle = read(offset=10, max_bytes=20)
        assert middle.content == whole[10:30] and middle.artifact.size_bytes == len(whole)
        assert read(offset=len(whole) - 5, max_bytes=20).content == whole[-5:]
        assert read(offset=len(whole)).content == b""
        for fields, message in (({"offset": len(whole) + 1}, f"offset: {len(whole) + 1} is not in [0, {len(whole)}]"),
                                ({"offset": -1}, "offset: -1 is not in"), ({"max_bytes": -3}, "max_bytes: must not be negative")):
            with pytest.raises(grpc.RpcError) as raised:
                read(**fields)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.details()

    calls = []
    original = client._call
    monkeypatch.setattr(client, "_call", lambda *args, **kwargs: calls.append(args[1]) or original(*args, **kwargs))
    monkeypatch.setattr(_operations, "ARTIFACT_RANGE_BYTES", 16)
    assert operation.artifact("mistakes.png") == whole
    assert calls.count("GetArtifact") == -(-len(whole) // 16)

    blob = next(server.data_dir.glob(f"artifacts/sha256/*/{listed.digest}"))
    blob.write_bytes(bytes(len(whole)))  # same size, other bytes: a corrupted disk
    try:
        with pytest.raises(DataLossError, match="does not match its digest"):
            operation.artifact("mistakes.png")
        # Cut short, it was sent as OK (the size its record gives, fewer bytes), unlogged.
        blob.write_bytes(whole[:40])
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as raised:
            operations_pb2_grpc.OperationsServiceStub(channel).GetArtifact(
                operations_pb2.GetArtifactRequest(name=operation.name, artifact="mistakes.png"), timeout=30)
        assert raised.value.code() == grpc.StatusCode.DATA_LOSS and f"it holds 40 bytes of {len(whole)}" in raised.value.details()
        assert "is damaged: it holds 40 bytes" in server.log_path.read_text()
    finally:  # content-addressed: other operations may share the blob
        blob.write_bytes(whole)


def test_an_artifact_range_larger_than_a_message_is_refused_not_cut():
    from conftest import limit_details
    from explaind.errors import ResourceExhausted
    from explaind.service.convert import error_status
    from explaind.service.interceptors import HeldCalls
    from explaind.service.operations import OperationsServicer

    servicer = OperationsServicer(None, max_message_bytes=128 * 1024 + 1000, held_calls=HeldCalls(1))  # 64 KiB of room
    whole = operations_pb2.GetArtifactRequest(name="operations/x", artifact="a")
    assert servicer._artifact_range(whole, 64 * 1024 + 1000) == (0, 64 * 1024 + 1000)
    with pytest.raises(ResourceExhausted, match=r"max_bytes: 66537 bytes do not fit in one response \(at most 66536\)") as refused:
        servicer._artifact_range(whole, 64 * 1024 + 1001)
    assert limit_details(error_status(refused.value)) == (  # the field beside the limit, in one ErrorInfo
        "RESPONSE_BYTES_EXCEEDED", {"field": "max_bytes", "setting": "[server].max_message_bytes", "limit": "66536"}, [("server", "bytes of one response")])
    assert servicer._artifact_range(operations_pb2.GetArtifactRequest(offset=1, max_bytes=1000), 5000) == (1, 1000)
    # Under 128 KiB, half the limit is left for the rest: 64 KiB of room left 1-byte ranges under 64 KiB.
    small = OperationsServicer(None, max_message_bytes=8192, held_calls=HeldCalls(1))
    assert small._artifact_range(whole, 4096) == (0, 4096)
    with pytest.raises(ResourceExhausted, match=r"at most 4096"):
        small._artifact_range(whole, 4097)


def test_an_artifact_range_past_the_end_is_cut_at_the_end_and_any_negative_max_bytes_is_refused():
    """max_bytes past the artifact's end reads to the end (so a range near the end of a
    large artifact fits in a small message); -1 is as negative as -3."""
    from explaind.errors import InvalidArgument
    from explaind.service.interceptors import HeldCalls
    from explaind.service.operations import OperationsServicer

    small = OperationsServicer(None, max_message_bytes=8192, held_calls=HeldCalls(1))  # ranges of at most 4096 bytes
    assert small._artifact_range(operations_pb2.GetArtifactRequest(offset=9000, max_bytes=100_000), 10_000) == (9000, 1000)
    with pytest.raises(InvalidArgument, match=r"^max_bytes: must not be negative, got -1"):
        small._artifact_range(operations_pb2.GetArtifactRequest(max_bytes=-1), 10)


def test_job_progress_goes_to_logs_as_lines_when_stderr_is_not_a_terminal(client, world_images, capsys):
    images, labels = world_images
    client.create_sample_set(_uint8(images), labels.tolist(), sample_set_id="progress-lines")
    report = client.evaluate_sample_set("progress-lines", batch_size=8).result(progress=True, timeout=120)
    assert report.sample_count == len(labels)
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert all(line.startswith("evaluate_sample_set: ") for line in lines), lines
    # Updates a fast job coalesces are skipped; the last line is the outcome, shown once.
    assert lines[-1] == f"evaluate_sample_set: succeeded {len(labels)}/{len(labels)} done", lines
    assert len(lines) == len(set(lines))


def test_metrics_count_calls_exactly(server, client, world_images):
    pixels = _uint8(world_images[0][:1])
    labels = {"service": "explaind.v1.InferenceService", "method": "Predict"}
    ok_before = _metric(server, "explaind_rpc_duration_seconds_count", **labels, code="OK")
    bad_before = _metric(server, "explaind_rpc_duration_seconds_count", **labels, code="INVALID_ARGUMENT")
    images_before = _metric(server, "explaind_predicted_images_total")
    jobs_before = _metric(server, "explaind_job_duration_seconds_count", kind="evaluate_sample_set", outcome="succeeded")
    for _ in range(7):
        client.predict(pixels)
    for _ in range(3):
        with pytest.raises(InvalidArgumentError):
            client.predict([b"junk"])
    client.create_sample_set(pixels, [0], sample_set_id="metrics")
    client.evaluate_sample_set("metrics").result(timeout=60)
    assert _metric(server, "explaind_rpc_duration_seconds_count", **labels, code="OK") == ok_before + 7
    assert _metric(server, "explaind_rpc_duration_seconds_count", **labels, code="INVALID_ARGUMENT") == bad_before + 3
    assert _metric(server, "explaind_predicted_images_total") == images_before + 7
    assert _metric(server, "explaind_job_duration_seconds_count", kind="evaluate_sample_set", outcome="succeeded") == jobs_before + 1
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert re.search(r'explaind_rpc_duration_seconds_bucket\{code="OK",le="14400.0",method="Predict",service="explaind.v1.InferenceService"\}', text)
    for family in ("explaind_batch_size_images_bucket", "explaind_predict_queue_depth_images", "explaind_rpcs_in_flight", "explaind_model_info", "explaind_jobs_queued"):
        assert family in text
    # The process's own series: the server's registry had none, so no memory or restart alert.
    resident = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE)
    assert resident and float(resident[1]) > 100 * 2**20  # torch and the models are loaded
    assert re.search(r"^process_start_time_seconds \S+$", text, re.MULTILINE) and "python_gc_collections_total" in text


# What explaind_job_stage_duration_seconds shows for a job of each kind that succeeds: its
# own stages, between the job manager's start and finish.
JOB_STAGES = {
    "evaluate_sample_set": {"start", "inference", "images", "finish"},
    "rank_mistake_neurons": {"start", "features", "solve", "response", "finish"},
    "visualize_neurons": {"start", "setup", "optimise", "preview", "images", "finish"},
    "edit_head": {"start", "features", "training", "evaluation", "storing", "finish"},
}


def _samples(server) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_time_each_stage_of_a_job_and_the_stages_add_up_to_its_duration(server, client, world_images):
    images, labels = world_images
    client.create_sample_set(_uint8(images), ((labels + 1) % 6).numpy(), sample_set_id="stages")  # every sample a mistake
    # Each kind's stages are exported from the start, before its first job: a dashboard's
    # rate reads 0, not "no data".
    exported = {(dict(labels)["kind"], dict(labels)["stage"]) for name, labels in _samples(server)
                if name == "explaind_job_stage_duration_seconds_count"}
    assert {(kind, stage) for kind, stages in JOB_STAGES.items() for stage in stages} <= exported
    jobs = {
        "evaluate_sample_set": lambda: client.evaluate_sample_set("stages").result(timeout=60),
        "rank_mistake_neurons": lambda: client.rank_mistake_neurons("stages", 0, execution="operation", include_samples=True),
        "visualize_neurons": lambda: client.visualize_neurons([3], method="no_clip", steps=2).result(timeout=60),
        "edit_head": lambda: client.edit_head("stages", 0, [1, 2], max_epochs=2).result(timeout=60),
    }
    for kind, run in jobs.items():
        before = _samples(server)
        run()
        after = _samples(server)

        def added(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0.0) - before.get(key, 0.0)

        stages = {dict(labels)["stage"] for name, labels in after if name == "explaind_job_stage_duration_seconds_count"
                  and dict(labels)["kind"] == kind and added(name, **dict(labels))}
        assert stages == JOB_STAGES[kind]
        assert added("explaind_job_duration_seconds_count", kind=kind, outcome="succeeded") == 1
        duration = added("explaind_job_duration_seconds_sum", kind=kind, outcome="succeeded")
        seconds = {stage: added("explaind_job_stage_duration_seconds_sum", kind=kind, stage=stage) for stage in stages}
        for stage in stages:  # once per job, however often it went back to a stage (a visualisation's previews)
            assert added("explaind_job_stage_duration_seconds_count", kind=kind, stage=stage) == 1, stage
            assert 0 <= seconds[stage] <= duration + 1e-3, (kind, stage, seconds, duration)
        # No unaccounted time: the stages run back to back from the job's start to its end.
        assert duration - 0.1 - 0.1 * duration <= sum(seconds.values()) <= duration + 1e-3, (kind, seconds, duration)


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_metrics_on_a_wildcard_host_answer_ipv6_and_ipv4():
    """gRPC listens on both for 0.0.0.0, so /metrics must too: an IPv6-only cluster's
    Prometheus scrapes the pod's IPv6 address."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    metrics = Metrics()
    http, port = metrics.serve_http("0.0.0.0", 0)
    try:
        for host in ("127.0.0.1", "[::1]"):
            assert b"explaind_rpcs_in_flight" in urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read()
        with pytest.raises(OSError):  # a port in use is still an error, not a quiet IPv4-only fallback
            metrics.serve_http("0.0.0.0", port)
    finally:
        http.shutdown()
        http.server_close()


def test_metrics_on_a_wildcard_host_without_ipv6_listen_on_ipv4(monkeypatch):
    import errno

    import explaind.metrics

    tried, make_server = [], explaind.metrics.make_server

    def no_ipv6(host, *args: object, **kwargs: object) -> object:
        if host != "::":  # IPv4's
            return make_server(host, *args, **kwargs)
        tried.append(host)
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(explaind.metrics, "make_server", no_ipv6)
    for host in ("[::]", "::", "0.0.0.0"):  # IPv6's spellings were handed to prometheus_client, which cannot resolve "[::]"
        http, port = Metrics().serve_http(host, 0)
        try:
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).status == 200
        finally:
            http.shutdown()
            http.server_close()
    assert tried == ["::"] * 3  # each a wildcard: IPv6 and IPv4 alike where the kernel has IPv6


def test_metrics_on_a_named_host_listen_there_alone():
    """Only a wildcard host takes the dual-stack socket: [server].host = 127.0.0.1 keeps
    /metrics off the machine's other addresses."""
    http, port = Metrics().serve_http("127.0.0.1", 0)
    try:
        assert http.server_address[:2] == ("127.0.0.1", port)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).status == 200
    finally:
        http.shutdown()
        http.server_close()


def test_metrics_at_the_open_file_limit_wait_before_accepting_again(monkeypatch, caplog):
    """A scrape waiting while the process is at its open-file limit (a container's
    ``ulimit -n``): each accept fails with EMFILE at once while the scrape keeps the
    listener readable, so /metrics spun a core at 100 % until descriptors were freed.
    It waits ACCEPT_RETRY_S between tries, says so once, and answers once it can."""
    import errno
    import logging
    import threading

    import explaind.metrics

    monkeypatch.setattr(explaind.metrics, "ACCEPT_RETRY_S", 0.05)
    http, port = Metrics().serve_http("127.0.0.1", 0)
    listener, tries, at_limit = http.socket, [], threading.Event()

    class AtTheLimit:
        """The listener, its accept failing as the kernel's does at RLIMIT_NOFILE."""

        def fileno(self) -> int:
            return listener.fileno()

        def accept(self) -> tuple[socket.socket, object]:
            tries.append(time.monotonic())
            if at_limit.is_set():
                raise OSError(errno.EMFILE, "Too many open files")
            return listener.accept()

    http.socket = AtTheLimit()
    try:
        with caplog.at_level(logging.INFO, logger=explaind.metrics.__name__):
            for episode in (1, 2):  # the second time at the limit is told of again
                tries.clear()
                at_limit.set()
                with socket.create_connection(("127.0.0.1", port), timeout=10) as scrape:
                    deadline = time.monotonic() + 10
                    while len(tries) < 4 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    at_limit.clear()
                    scrape.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    assert scrape.makefile("rb").readline().startswith(b"HTTP/1.0 200 ")
                gaps = [later - earlier for earlier, later in zip(tries[:4], tries[1:4])]
                assert len(gaps) == 3 and min(gaps) >= 0.05, gaps
                warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
                assert len(warnings) == episode and "Too many open files" in warnings[-1] and "ulimit -n" in warnings[-1], warnings
                assert caplog.messages.count("/metrics accepts scrapes again") == episode
    finally:
        http.socket = listener
        http.shutdown()
        http.server_close()


def test_cli_predict_and_info(server, tmp_path, world_images, capsys):
    path = tmp_path / "image.png"
    path.write_bytes(_png(_uint8(world_images[0][:1])[0]))
    assert cli_main(["--target", server.target, "predict", str(path), "--top-k", "2"]) == 0
    assert cli_main(["--target", server.target, "info"]) == 0
    assert cli_main(["--target", server.target, "sample-set", "show", "--id", "nope"]) == 1
    out, err = capsys.readouterr()
    assert str(path) in out and "layer3 -> fc" in out
    # The module's server: 64 MiB messages, 1 Mi pixels, 256 images per Predict.
    assert "limits      64 MiB per message, 1 Mi decoded pixels per request, 256 images (or samples) per request, sides up to 4096 px" in out
    assert "NOT_FOUND" in err
    # --json carries every field of a prediction; unset --top-k gives 3 classes.
    assert cli_main(["--target", server.target, "predict", str(path), "--json"]) == 0
    (printed,) = json.loads(capsys.readouterr().out)
    assert printed.keys() == {"image", "labels", "class_indices", "probabilities", "model_version"}
    assert len(printed["labels"]) == len(printed["class_indices"]) == 3 and printed["model_version"]
    class_names = Client(server.target).model_metadata().class_names
    assert [class_names[i] for i in printed["class_indices"]] == printed["labels"]


def test_torch_inputs_as_torchvision_and_tensor_ops_give_them_are_taken(client, world_images):
    # A uint8 (3, H, W) tensor (torchvision.io.decode_image's layout) was refused, and so
    # were a class as a 0-d tensor and neurons as a tensor (`for c in labels.unique()`).
    pixels = torch.from_numpy(_uint8(world_images[0][:4]))  # (N, H, W, 3) uint8
    expected = client.predict(pixels.numpy())
    # (N, 3, H, W), (3, H, W); as numpy arrays too, which were refused while tensors were taken.
    channels_first = ((pixels.permute(0, 3, 1, 2), expected), (pixels[0].permute(2, 0, 1), expected[:1]))
    for given, wanted in channels_first + tuple((tensor.numpy(), wanted) for tensor, wanted in channels_first):
        got = client.predict(given)
        assert [p.class_indices for p in got] == [p.class_indices for p in wanted]
        np.testing.assert_allclose([p.probabilities for p in got], [p.probabilities for p in wanted], rtol=1e-4, atol=1e-7)
    labels = world_images[1]
    client.create_sample_set(pixels.numpy(), labels[:4], sample_set_id="tensor-args")
    ranking = client.rank_mistake_neurons("tensor-args", labels[:4].unique()[0])
    assert ranking.class_index == int(labels[:4].unique()[0])
    visualized = client.visualize_neurons(torch.tensor([3, 5]), method="feature_visualization", steps=1).result()
    assert [v.neuron for v in visualized.visualizations] == [3, 5]
    with pytest.raises(TypeError, match=r"target_class must be a class name \(str\) or index \(int\), got 1.5"):
        client.rank_mistake_neurons("tensor-args", torch.tensor(1.5))


def test_returned_arrays_are_writable_and_long_results_print_short():
    # Arrays over a message's bytes were read-only (`features -= mean` failed), and a
    # notebook cell showing an evaluation printed every mistake.
    from explaind.client._neuroinspect import ranking as ranking_from
    from explaind.client._operations import EvaluatedMistake, Evaluation
    from explaind.client._types import float32_array
    from explaind.v1 import neuroinspect_pb2

    tensor = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT32, shape=[2, 3], data=np.arange(6, dtype="<f4").tobytes())
    array = float32_array(tensor)
    array -= 1
    assert array.tolist() == [[-1, 0, 1], [2, 3, 4]]
    omega = ranking_from(neuroinspect_pb2.NeuronRanking(omega=tensor)).omega
    omega *= 2
    mistakes = [EvaluatedMistake(i, 0, 1, 0.9) for i in range(5000)]
    names = [f"class {i}" for i in range(1000)]
    evaluation = Evaluation("s", "m", 5000, 0.0, {name: 0.0 for name in names}, np.zeros((1000, 1000), np.int64), mistakes,
                            class_counts={name: 5 for name in names}, class_names=names)
    assert len(repr(evaluation)) < 500 and "'class 7': 5, ... 992 more}" in repr(evaluation), repr(evaluation)
    # Nor did the metadata of a 1000-class model print every class, or a prediction every feature.
    from explaind.client._types import ModelMetadata, Prediction, RequestLimits

    metadata = ModelMetadata("m", "torchvision", names, "layer4", "fc", 2048, 224, "v", "eager", "cpu", True, {}, 32, RequestLimits(0, 0, 0, 0))
    assert len(repr(metadata)) < 800 and "class_names=['class 0'," in repr(metadata) and "... 992 more]" in repr(metadata), repr(metadata)
    prediction = Prediction(["a"], [0], [1.0], np.zeros(2048, np.float32), "v")
    assert repr(prediction) == "Prediction(labels=['a'], class_indices=[0], probabilities=[1.0], features=array(shape=(2048,), dtype=float32), model_version='v')"


def test_a_predict_of_an_image_the_model_gives_nan_logits_for_is_refused_over_grpc_naming_it_without_a_traceback(tmp_path):
    # The refusal is raised in the batcher's thread and handed over through the request's
    # future: the caller gets FAILED_PRECONDITION on the field images, as the engine words it.
    from conftest import DIVIDES_BY_MEAN_CLASSIFIER
    from explaind.config import default_config
    from explaind.service import ExplaindServer

    config = (default_config().replace("classifier", **DIVIDES_BY_MEAN_CLASSIFIER).replace("clip", path="").replace("diffusion", path="")
              .replace("server", port=0, metrics_port=0, data_dir=str(tmp_path / "data"), data_dir_reserve_bytes=1 << 20))
    server = ExplaindServer(config)
    try:
        server.start()
        server.load_models()
        images = [common_pb2.Image(encoded=_png(np.full((16, 16, 3), shade, np.uint8))) for shade in (90, 0)]
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                inference_pb2_grpc.InferenceServiceStub(channel).Predict(inference_pb2.PredictRequest(images=images, top_k=1), timeout=30)
            answered = inference_pb2_grpc.InferenceServiceStub(channel).Predict(inference_pb2.PredictRequest(images=images[:1], top_k=1), timeout=30)
    finally:
        server.stop(0)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == ("images: the served classifier's logits of 1 image of the request hold NaN or +infinity, or are -infinity "
                                       "for every class (images[1]): the model overflows, divides by zero or rules out every class on its "
                                       "image; send the request without it, or mend the model")
    assert len(answered.predictions) == 1 and 0 < answered.predictions[0].probabilities[0] <= 1
