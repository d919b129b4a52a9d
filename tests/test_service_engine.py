"""Engine pieces in-process: batcher, registry swaps, loaders and the split, backends,
feature cache, jobs, config errors, health before load, auth."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import errno
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import struct
import sqlite3
import stat
import sys
import threading
import time
import tracemalloc
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from prometheus_client import generate_latest
from torch import nn

from explaind.config import ClassifierSection, ConfigError, default_config, load_config
from explaind.engine import DynamicBatcher, Engine, NewSample
from explaind.engine.core import BLOB_WRITE_THREADS, rows_by_digest
from explaind.engine.models import Preprocess, load_classifier
from explaind.errors import (AlreadyExists, DataLoss, DeadlineExceeded, FailedPrecondition, InvalidArgument, ModelLoadError, NotFound,
                             PermissionDenied, ResourceExhausted, Unavailable)
from explaind.imaging import DECODING_VERSION, InputGeometry, decode_array, decode_encoded, encode_png
from explaind.jobs import JobCancelled, JobManager
from explaind.metrics import Metrics
from explaind.service.convert import error_status
from explaind.store import ArtifactRef, JobRecord, RequestKey, SampleRecord, SQLiteStore, StoreOpenError

from conftest import DIVIDES_BY_MEAN_CLASSIFIER, TINY_VIT_CLASSIFIER, default_device_meta, divides_by_mean, json_log_lines, limit_details, torch_threads, trailing_status, until_running, vm_steps, write_config


def _engine(tmp_path: Path, classifier_dir: Path, *, load: bool = True, **runtime) -> Engine:
    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", data_dir=str(tmp_path / "data"))
    if runtime:
        config = config.replace("runtime", **runtime)
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    if load:
        engine.load()
    return engine


@pytest.fixture(scope="module", autouse=True)
def _open_clip_tokenizers_built_once() -> Iterator[None]:
    """open_clip builds a tokenizer from its gzipped BPE vocabulary at each call, some 40 % of
    loading an Engine, and this module loads hundreds with the world CLIP's: each tokenizer
    is built once per name and arguments. It is pure (its one state a memo of BPE results),
    so a shared one encodes as a fresh one would."""
    import functools

    import open_clip

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(open_clip, "get_tokenizer", functools.cache(open_clip.get_tokenizer))
        yield


@pytest.fixture
def engine(tmp_path, classifier_dir):
    engine = _engine(tmp_path, classifier_dir)
    yield engine
    engine.close()


def test_every_test_starts_from_the_same_global_random_state():
    # torch seeds its global generator differently in every process, and many tests draw
    # their inputs from it (torch.rand): they ran on other inputs at every run, and on
    # inputs that depended on which tests ran before. conftest seeds it before each test.
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(0)))
    assert np.random.randint(2**31) == np.random.RandomState(0).randint(2**31)
    assert random.random() == random.Random(0).random()


def test_warming_up_a_new_feature_version_draws_nothing_from_the_global_random_generator(engine):
    # The backend is warmed up on random images: drawn from the global generator, they moved
    # the stream of a process that had seeded it (an embedding script, a test).
    other = dataclasses.replace(engine.models.active, feature_version="another")
    torch.manual_seed(7)
    engine.activate(other)
    assert other.feature_cache_key in engine._feature_fns  # built and warmed up for it
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(7)))


def test_loading_the_engine_draws_nothing_from_the_global_random_generator(tmp_path, classifier_dir):
    # Building the classifier and CLIP initialises their layers from the global generator
    # before the weights replace them: an embedding script that seeded torch drew other numbers.
    torch.manual_seed(7)
    engine = _engine(tmp_path, classifier_dir)
    try:
        assert engine.components["classifier"].loaded
        assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(7)))
    finally:
        engine.close()


# Batcher -------------------------------------------------------------------------------


def _sizes_batcher(delay: float = 0.0, max_queue: int = 1024, run=None) -> tuple[DynamicBatcher, list[int]]:
    sizes: list[int] = []

    def default_run(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.005)
        return x.flatten(1).sum(1)

    batcher = DynamicBatcher(run or default_run, lambda out, sizes, _options: list(out.split(sizes)), max_batch_size=16, max_queue_delay_s=delay, max_queue_size=max_queue, on_batch=sizes.append)
    return batcher, sizes


def test_batcher_forms_batches_under_load_and_routes_results():
    batcher, sizes = _sizes_batcher()
    requests = [torch.full((2, 1, 1, 1), float(i)) for i in range(64)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda r: batcher.submit(r).result(timeout=10), requests))
    batcher.close()
    for i, result in enumerate(results):
        assert result.tolist() == [float(i), float(i)]
    assert sum(sizes) == 128 and max(sizes) <= 16 and max(sizes) > 2  # batches formed, capped


def test_batcher_queue_limit_and_cancelled_requests():
    gate, entered = threading.Event(), threading.Event()
    batcher, sizes = _sizes_batcher(max_queue=4, run=lambda x: (entered.set(), gate.wait(10), x.flatten(1).sum(1))[2])
    with ThreadPoolExecutor(1) as caller:  # the model is idle: this request runs in its caller's thread, blocked on the gate
        first = caller.submit(lambda: batcher.submit(torch.ones(1, 1, 1, 1)).result(10))
        assert entered.wait(5)  # not a sleep: on a loaded machine the next submits ran first, in this thread
        queued = [batcher.submit(torch.ones(2, 1, 1, 1)) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="queue is full"):
            batcher.submit(torch.ones(1, 1, 1, 1))
        assert queued[1].cancel() and queued[0].cancel()  # not only the first in line
        # Their places are free at once: they counted as waiting until the worker reached them.
        assert batcher.queue_depth == 0
        queued += [batcher.submit(torch.ones(2, 1, 1, 1)) for _ in range(2)]
        gate.set()
        assert first.result(10).tolist() == [1.0] and queued[2].result(10).tolist() == queued[3].result(10).tolist() == [1.0, 1.0]
    batcher.close()
    assert sum(sizes) == 5  # the cancelled requests never ran


def test_batcher_keeps_each_named_caller_to_its_share_of_the_queue():
    # One pipeline's burst filled the whole queue and every other caller's Predict was
    # RESOURCE_EXHAUSTED until it drained.
    batcher, sizes, gate, entered = _gated_batcher(max_queue_size=14, max_queued_per_caller=4)
    with ThreadPoolExecutor(1) as caller:
        first = caller.submit(lambda: batcher.submit(torch.ones(1, 1, 1, 1), caller="monitoring").result(10))
        assert entered.wait(5)  # the model is busy: what follows queues
        mine = [batcher.submit(torch.ones(2, 1, 1, 1), caller="monitoring") for _ in range(2)]
        with pytest.raises(ResourceExhausted) as refused:
            batcher.submit(torch.ones(1, 1, 1, 1), caller="monitoring")
        assert str(refused.value) == ("prediction queue is full for caller 'monitoring' (4 of its images waiting, limit 4, "
                                      "[batching].max_queued_images_per_caller); retry with backoff")
        assert limit_details(error_status(refused.value)) == (
            "QUEUED_IMAGES_PER_CALLER_EXCEEDED", {"setting": "[batching].max_queued_images_per_caller", "limit": "4"},
            [("caller:monitoring", "images this caller has waiting")])
        with pytest.raises(ResourceExhausted, match=r"^prediction queue is full for caller 'monitoring' \(4 of its"):
            batcher.check_room(1, caller="monitoring")  # as a Predict asks before it decodes its images
        batcher.check_room(10, caller="analyst")  # room, and none taken by asking
        # Another caller still gets in, and a caller with nothing waiting may queue one
        # request past its share: no request within the per-request limit waits for ever.
        theirs = [batcher.submit(torch.ones(3, 1, 1, 1), caller="analyst"), batcher.submit(torch.ones(5, 1, 1, 1), caller="reports")]
        with pytest.raises(ResourceExhausted, match="for caller 'reports'"):
            batcher.submit(torch.ones(1, 1, 1, 1), caller="reports")
        anonymous = batcher.submit(torch.ones(2, 1, 1, 1))  # no named caller: max_queue_size alone
        with pytest.raises(ResourceExhausted, match=r"^prediction queue is full \(14 images waiting, limit 14\)") as full:
            batcher.submit(torch.ones(1, 1, 1, 1), caller="dashboards")
        assert limit_details(error_status(full.value)) == ("QUEUED_IMAGES_EXCEEDED", {"setting": "[batching].max_queue_size", "limit": "14"},
                                                           [("server", "images waiting")])
        assert mine[0].cancel()  # a cancelled request frees its caller's share at once
        mine.append(batcher.submit(torch.ones(2, 1, 1, 1), caller="monitoring"))
        gate.set()
        assert first.result(10).tolist() == [1.0]
        assert [future.result(10).tolist() for future in (*mine[1:], *theirs, anonymous)] == [[1.0] * 2] * 2 + [[1.0] * 3, [1.0] * 5, [1.0] * 2]
    # Taken batches return the shares too: the same caller queues its full share again.
    assert batcher._queued_by == {} and batcher.queue_depth == 0
    batcher.close()
    assert sum(sizes) == 1 + 2 + 2 + 3 + 5 + 2


def test_batcher_without_a_per_caller_limit_lets_a_named_caller_queue_up_to_the_queue_size():
    # max_queued_per_caller 0 (the default) is no limit: read as a limit of 0, a named
    # caller with one request waiting would have every further Predict refused.
    batcher, sizes, gate, entered = _gated_batcher(max_queue_size=6)
    with ThreadPoolExecutor(1) as caller:
        first = caller.submit(lambda: batcher.submit(torch.ones(1, 1, 1, 1), caller="monitoring").result(10))
        assert entered.wait(5)  # the model is busy: what follows queues
        mine = [batcher.submit(torch.ones(2, 1, 1, 1), caller="monitoring") for _ in range(3)]
        with pytest.raises(ResourceExhausted, match=r"^prediction queue is full \(6 images waiting, limit 6\)"):
            batcher.submit(torch.ones(1, 1, 1, 1), caller="monitoring")  # only the queue's own limit applies
        gate.set()
        assert first.result(10).tolist() == [1.0] and [future.result(10).tolist() for future in mine] == [[1.0, 1.0]] * 3
    batcher.close()
    assert sum(sizes) == 1 + 3 * 2


def test_batcher_runs_a_lone_request_in_the_callers_thread_and_one_forward_at_a_time():
    running, overlaps, threads = [0], [], set()
    lock = threading.Lock()

    def run(x: torch.Tensor) -> torch.Tensor:
        with lock:
            running[0] += 1
            overlaps.append(running[0])
            threads.add(threading.current_thread().name)
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return x.flatten(1).sum(1)

    batcher, sizes = _sizes_batcher(run=run)
    assert batcher.submit(torch.ones(1, 1, 1, 1)).done()  # resolved before submit returned
    assert batcher.submit(torch.ones(16, 1, 1, 1)).done()  # so is a lone request of max_batch_size images
    assert threads == {threading.current_thread().name}
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: batcher.submit(torch.full((1, 1, 1, 1), float(i))).result(10), range(200)))
    batcher.close()
    assert [r.item() for r in results] == [float(i) for i in range(200)]
    assert max(overlaps) == 1  # the caller's-thread path never runs beside the worker
    assert "batcher" in threads and max(sizes) > 1  # under load the worker batched the queue

    delayed, _ = _sizes_batcher(delay=0.01)
    assert not delayed.submit(torch.ones(1, 1, 1, 1)).done()  # a configured delay always goes through the queue
    delayed.close()


def _gated_batcher(**options) -> tuple[DynamicBatcher, list[int], threading.Event, threading.Event]:
    """A batcher whose model blocks on ``gate``; ``entered`` is set once a forward started."""
    sizes: list[int] = []
    gate, entered = threading.Event(), threading.Event()

    def run(x: torch.Tensor) -> torch.Tensor:
        entered.set()
        gate.wait(10)
        return x.flatten(1).sum(1)

    options.setdefault("max_batch_size", 16)
    batcher = DynamicBatcher(run, lambda out, sizes, _options: list(out.split(sizes)), on_batch=sizes.append, **options)
    return batcher, sizes, gate, entered


def test_batcher_frees_the_model_after_a_forward_raises():
    # A forward that fails (an OOM, say) must still free the model: otherwise every later
    # request queues behind a forward that never ends, and Predict hangs for good.
    calls = [0]

    def run(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return x.flatten(1).sum(1)

    batcher, _ = _sizes_batcher(run=run)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        batcher.submit(torch.ones(1, 1, 1, 1)).result(timeout=2)  # the caller that hit it hears about it
    # A bounded wait: a model left marked busy would queue these forever.
    assert [batcher.submit(torch.full((2, 1, 1, 1), float(i))).result(timeout=2).tolist() for i in range(3)] == [[float(i)] * 2 for i in range(3)]
    batcher.close()  # only reached when the worker is not stuck: close() would wait on it


def test_batcher_queue_depth_returns_to_zero_once_batches_are_taken():
    # Images leave the queue when the worker takes them: if they still counted, the
    # depth gauge would only grow and the queue limit would soon refuse every request.
    depths: list[int] = []
    batcher = DynamicBatcher(lambda x: x.flatten(1).sum(1), lambda out, sizes, _options: list(out.split(sizes)), max_batch_size=16,
                             max_queue_delay_s=0.001, max_queue_size=4, on_queue_depth=depths.append)  # a delay: every request queues
    for i in range(10):  # 20 images in all, 2 at a time: five times the queue limit
        assert batcher.submit(torch.full((2, 1, 1, 1), float(i))).result(timeout=2).tolist() == [float(i)] * 2
        assert batcher.queue_depth == 0 and depths[-1] == 0
    assert max(depths) == 2  # the gauge saw each request queue, then leave
    batcher.close()


def test_batcher_close_still_answers_requests_queued_before_it():
    # close() stops new requests but must run those already queued: an abandoned future
    # never resolves and its caller hangs until its deadline.
    batcher, sizes, gate, entered = _gated_batcher()
    with ThreadPoolExecutor(1) as caller:
        first = caller.submit(lambda: batcher.submit(torch.ones(1, 1, 1, 1)).result(10))
        assert entered.wait(5)  # the model is busy with the first request: the next two queue
        queued = [batcher.submit(torch.full((2, 1, 1, 1), float(i))) for i in (2, 3)]
        closer = threading.Thread(target=batcher.close)
        closer.start()
        try:
            closer.join(0.2)  # time enough for a worker that wrongly gives up on its queue to quit
            assert closer.is_alive()  # close() waits for the queued requests, which cannot run yet
            with pytest.raises(Unavailable, match="shutting down"):
                batcher.submit(torch.ones(1, 1, 1, 1))
        finally:
            gate.set()
        assert first.result(5).tolist() == [1.0]
        assert [future.result(timeout=5).tolist() for future in queued] == [[2.0, 2.0], [3.0, 3.0]]
    closer.join(5)
    assert not closer.is_alive() and sizes == [1, 4]


def test_batcher_never_merges_requests_past_max_batch_size():
    # Requests are merged whole, and only while they fit: 15 + 2 images would be a batch
    # of 17 with a maximum of 16 (more memory than the model was sized for).
    batcher, sizes, gate, entered = _gated_batcher(max_batch_size=16)
    with ThreadPoolExecutor(1) as caller:
        first = caller.submit(lambda: batcher.submit(torch.ones(1, 1, 1, 1)).result(10))
        assert entered.wait(5)  # the model is busy: the rest queue, and the worker takes them together
        counts = [15, 2, 9, 7]
        queued = [batcher.submit(torch.full((n, 1, 1, 1), float(i))) for i, n in enumerate(counts)]
        gate.set()
        assert first.result(5).tolist() == [1.0]
        for i, (n, future) in enumerate(zip(counts, queued, strict=True)):
            assert future.result(timeout=5).tolist() == [float(i)] * n
    batcher.close()
    assert sizes == [1, 15, 11, 7] and max(sizes) <= 16  # 15 | 2 + 9 | 7: the next request never pushed past 16


def test_batcher_with_a_queue_delay_waits_for_more_requests_to_batch():
    # max_queue_delay is what lets a request that arrives a little after another share
    # its forward: the worker holds the first for up to the delay instead of running it alone.
    batcher, sizes, gate, entered = _gated_batcher(max_batch_size=16, max_queue_delay_s=2.0)
    gate.set()  # the model does not block here
    first = batcher.submit(torch.full((8, 1, 1, 1), 1.0))
    # Not a race to submit the second before the worker wakes: a worker that ignored the
    # delay runs the first alone at once, which ends this wait early.
    assert not entered.wait(0.2)  # well inside the 2 s delay, nothing ran yet
    second = batcher.submit(torch.full((8, 1, 1, 1), 2.0))
    # 8 + 8 fill the batch, so it runs now rather than when the delay ends.
    assert first.result(timeout=1).tolist() == [1.0] * 8 and second.result(timeout=1).tolist() == [2.0] * 8
    batcher.close()
    assert sizes == [16]


def test_batcher_close_does_not_wait_out_the_queue_delay():
    # A worker holding a batch open for its delay stops waiting when the batcher closes:
    # shutdown (and each registry swap that closes a batcher) would otherwise take the full delay.
    batcher, sizes = _sizes_batcher(delay=5.0)
    queued = batcher.submit(torch.ones(3, 1, 1, 1))
    started = time.monotonic()
    batcher.close()
    assert time.monotonic() - started < 2.0  # far less than the 5 s delay
    assert queued.result(timeout=0).tolist() == [1.0, 1.0, 1.0] and sizes == [3]  # and the held request still ran


def _held_first_then_queued(later_forward: Callable[[torch.Tensor], torch.Tensor], queued_sizes: tuple[int, ...], *,
                            split: Callable[[torch.Tensor, list[int], list], list] = lambda out, sizes, _options: list(out.split(sizes)),
                            ) -> tuple[DynamicBatcher, Future, list[Future], list[int]]:
    """A one-image request runs in a caller's thread and is held inside its forward while
    requests of ``queued_sizes`` images queue; then it is let go, and they run as one
    batch. Forwards after the first run ``later_forward``. (batcher, the first's future,
    the queued ones' futures, the images of each forward)."""
    gate, entered = threading.Event(), threading.Event()
    forwards: list[int] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        forwards.append(len(x))
        if len(forwards) > 1:
            return later_forward(x)
        entered.set()
        gate.wait(10)
        return x.flatten(1).sum(1)

    batcher = DynamicBatcher(run, split, max_batch_size=16)
    caller = ThreadPoolExecutor(1)
    first = caller.submit(lambda: batcher.submit(torch.ones(1, 1, 1, 1)).result(10))
    caller.shutdown(wait=False)
    assert entered.wait(5)  # the model is busy: the next ones queue, and run as one batch
    queued = [batcher.submit(torch.ones(n, 1, 1, 1)) for n in queued_sizes]
    gate.set()
    return batcher, first, queued, forwards


def test_a_forward_that_raises_fails_every_request_batched_into_it():
    # Each caller whose images were in the failed forward must hear of it: one left
    # unanswered waits until its deadline (or for ever, without one).
    def out_of_memory(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    batcher, first, queued, forwards = _held_first_then_queued(out_of_memory, (1, 2, 3))
    assert first.result(5).tolist() == [1.0]
    for future in queued:
        with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
            future.result(timeout=5)
    batcher.close()
    assert forwards == [1, 6]


def test_a_split_returning_the_wrong_count_fails_its_callers_and_the_worker_goes_on():
    # A split that loses a request's output must fail that batch's callers, queued and run
    # in the caller's own thread alike, not end the worker: later requests still run.
    splits: list[list[int]] = []

    def split(out: torch.Tensor, sizes: list[int], _options: list) -> list[torch.Tensor]:
        splits.append(sizes)
        return list(out.split(sizes))[:-1] if len(splits) <= 2 else list(out.split(sizes))

    batcher, first, queued, forwards = _held_first_then_queued(lambda x: x.flatten(1).sum(1), (1, 2), split=split)
    with pytest.raises(RuntimeError, match="split returned 0 outputs for 1 requests"):
        first.result(5)
    for future in queued:
        with pytest.raises(RuntimeError, match="split returned 1 outputs for 2 requests"):
            future.result(timeout=5)
    assert batcher.submit(torch.full((2, 1, 1, 1), 2.0)).result(timeout=5).tolist() == [2.0, 2.0]
    batcher.close()
    assert forwards == [1, 3, 2]


def test_a_split_may_fail_one_request_of_a_batch_and_answer_the_others():
    # An exception split gives a request (Predict's for an image its model gives NaN for)
    # is that request's alone: the callers batched with it get their outputs.
    def split(out: torch.Tensor, sizes: list[int], _options: list) -> list[object]:
        return [ValueError(f"{len(part)} images refused") if len(part) == 3 else part for part in out.split(sizes)]

    batcher, first, queued, forwards = _held_first_then_queued(lambda x: x.flatten(1).sum(1), (1, 3, 2), split=split)
    assert first.result(5).tolist() == [1.0]
    assert queued[0].result(timeout=5).tolist() == [1.0] and queued[2].result(timeout=5).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="^3 images refused$"):
        queued[1].result(timeout=5)
    assert batcher.submit(torch.full((2, 1, 1, 1), 2.0)).result(timeout=5).tolist() == [2.0, 2.0]  # the worker goes on
    batcher.close()
    assert forwards == [1, 6, 2]


def test_a_batch_whose_requests_were_all_cancelled_frees_the_model():
    # The worker may take requests whose callers cancel before their forward starts: it
    # runs none of them, and must still free the model, or every later request waits.
    sizes: list[int] = []
    submitted, taken = threading.Event(), threading.Event()
    first, cancelled_once_taken = [], []

    def on_queue_depth(depth: int) -> None:
        if depth == 0 and threading.current_thread().name == "batcher" and not taken.is_set():
            submitted.wait(5)  # the worker took the first request: cancel it before its forward starts
            cancelled_once_taken.append(first[0].cancel())
            taken.set()

    batcher = DynamicBatcher(lambda x: x.flatten(1).sum(1), lambda out, sizes, _options: list(out.split(sizes)), max_batch_size=16,
                             max_queue_delay_s=0.001, on_batch=sizes.append, on_queue_depth=on_queue_depth)
    first.append(batcher.submit(torch.ones(2, 1, 1, 1)))
    submitted.set()
    assert taken.wait(5)  # the next request is not in that batch
    # A bounded wait: a model left marked busy would queue this for ever.
    assert batcher.submit(torch.full((3, 1, 1, 1), 2.0)).result(timeout=5).tolist() == [2.0] * 3
    batcher.close()
    assert cancelled_once_taken == [True] and sizes == [3]


def test_a_request_arriving_as_the_model_frees_queues_behind_those_already_waiting():
    # A request runs in its caller's thread only when nothing is queued: one arriving in
    # the moment between a forward's end and the worker taking the queue would otherwise
    # run before requests that waited longer (and, under load, keep them waiting).
    gates = [threading.Event(), threading.Event()]
    entered = [threading.Event(), threading.Event()]
    forwards: list[list[float]] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        forwards.append(x.flatten().tolist())
        if len(forwards) <= 2:
            entered[len(forwards) - 1].set()
            gates[len(forwards) - 1].wait(10)
        return x.flatten(1).sum(1)

    batcher = DynamicBatcher(run, lambda out, sizes, _options: list(out.split(sizes)), max_batch_size=16)
    late: list = []
    with ThreadPoolExecutor(1) as caller:
        first = caller.submit(lambda: batcher.submit(torch.full((1, 1, 1, 1), 1.0)).result(10))
        assert entered[0].wait(5)  # the first runs in its caller's thread; the second queues for the worker
        second = batcher.submit(torch.full((1, 1, 1, 1), 2.0))
        gates[0].set()
        assert entered[1].wait(5)  # the worker runs the second; the third queues behind it
        third = batcher.submit(torch.full((1, 1, 1, 1), 3.0))
        # The second's end frees the model before its caller hears of it (in the worker's
        # thread): the fourth is submitted then, with the model idle and the third waiting.
        second.add_done_callback(lambda _future: late.append(batcher.submit(torch.full((1, 1, 1, 1), 4.0))))
        gates[1].set()
        assert first.result(5).tolist() == [1.0] and second.result(5).tolist() == [2.0] and third.result(5).tolist() == [3.0]
        assert late[0].result(5).tolist() == [4.0]
    batcher.close()
    assert [value for forward in forwards for value in forward] == [1.0, 2.0, 3.0, 4.0]


def test_a_request_sent_as_the_last_one_is_answered_finds_the_model_free():
    # The worker frees the model before it tells a forward's callers: one that sends its
    # next request as soon as it hears (here in the future's callback) runs at once, not
    # through the queue behind a forward that has ended.
    batcher, sizes, gate, entered = _gated_batcher()
    follow_ups: list[tuple[bool, Future]] = []
    sent = threading.Event()

    def send_the_next(_answered: Future) -> None:
        future = batcher.submit(torch.full((3, 1, 1, 1), 3.0))
        follow_ups.append((future.done(), future))
        sent.set()

    with ThreadPoolExecutor(1) as caller:
        first = caller.submit(lambda: batcher.submit(torch.ones(1, 1, 1, 1)).result(10))
        assert entered.wait(5)  # the model is busy: the second queues for the worker
        second = batcher.submit(torch.full((2, 1, 1, 1), 2.0))
        second.add_done_callback(send_the_next)
        gate.set()
        assert first.result(5).tolist() == [1.0] and second.result(5).tolist() == [2.0, 2.0]
    # A future wakes its waiters before it runs its callbacks: closing as soon as the result
    # is read raced the callback's submit (now and then refused: "the server is shutting down").
    assert sent.wait(5)
    batcher.close()
    assert [(done, future.result(0).tolist()) for done, future in follow_ups] == [(True, [3.0] * 3)]
    assert sizes == [1, 2, 3]


# Registry, split, cache ------------------------------------------------------------------


def test_a_predict_before_the_models_load_is_unavailable(tmp_path, classifier_dir):
    # A server answers calls while its models load: a Predict then must be UNAVAILABLE
    # (which clients retry), not an error about a missing model.
    engine = _engine(tmp_path, classifier_dir, load=False)
    try:
        with pytest.raises(Unavailable, match="models are still loading"):
            engine.predict(torch.rand(1, 3, 32, 32))
    finally:
        engine.close()


def test_the_registry_hands_back_the_version_each_activation_replaced(engine):
    # The engine keeps the feature cache when the replaced version had the same features.
    from explaind.engine import ModelRegistry

    registry, version = ModelRegistry(), engine.models.active
    with pytest.raises(Unavailable, match="models are still loading"):
        registry.active
    edited = version.with_head(_constant_head(2))
    assert registry.activate(version) is None and registry.active is version
    assert registry.activate(edited) is version and registry.active is edited


def test_a_predict_larger_than_max_batch_size_runs_in_forwards_of_at_most_that_many_images(tmp_path, classifier_dir):
    """One request may carry up to max_images_per_request images: its forward runs in
    slices, so activations stay those of max_batch_size images, and it answers as the
    images one at a time would."""
    config = (default_config().replace("classifier", path=str(classifier_dir)).replace("server", data_dir=str(tmp_path / "data"))
              .replace("batching", max_batch_size=4))
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    engine.load()
    try:
        key = engine.models.active.feature_cache_key
        extract, forwards = engine._feature_fns[key], []
        engine._feature_fns[key] = lambda images: (forwards.append(len(images)), extract(images))[1]
        images = torch.rand(10, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        together = engine.predict(images, top_k=6, return_features=True)
        assert forwards == [4, 4, 2]
        assert engine.metrics.registry.get_sample_value("explaind_predicted_images_total") == 10  # images, not requests
        # explaind_batch_size_images counts forwards, as its help says: it said one of 10.
        assert engine.metrics.registry.get_sample_value("explaind_batch_size_images_count") == 3
        assert engine.metrics.registry.get_sample_value("explaind_batch_size_images_sum") == 10
        alone = [engine.predict(image[None], top_k=6, return_features=True) for image in images]
        assert together.class_indices.tolist() == [output.class_indices[0].tolist() for output in alone]
        torch.testing.assert_close(torch.as_tensor(together.features), torch.cat([torch.as_tensor(output.features) for output in alone]))
        # An inference-only classifier (TorchScript, an ONNX graph that cannot be split) is sliced alike.
        version, sizes = engine.models.active, []

        def logits_of(images: torch.Tensor) -> torch.Tensor:
            sizes.append(len(images))
            return version.logits(version.features(images))

        engine.models.activate(dataclasses.replace(version, feature_extractor=None, head=None, predict_fn=logits_of))
        assert engine.predict(images, top_k=6).class_indices.tolist() == together.class_indices.tolist() and sizes == [4, 4, 2]
    finally:
        engine.close()


def test_the_engine_exports_the_model_it_serves_and_its_predict_queue_as_it_fills_and_drains(tmp_path, classifier_dir):
    # What dashboards and alerts read: the backend and device of the served model, and the
    # images waiting for it, each named caller kept to [batching].max_queued_images_per_caller.
    config = (default_config().replace("classifier", path=str(classifier_dir)).replace("server", data_dir=str(tmp_path / "data"))
              .replace("batching", max_queued_images_per_caller=2))
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    engine.load()
    value = engine.metrics.registry.get_sample_value
    [info] = [sample.labels for family in engine.metrics.registry.collect() if family.name == "explaind_model" for sample in family.samples]
    assert (info["backend"], info["device"]) == engine.runtime(engine.models.active) == ("eager", "cpu")
    batcher = engine._batcher
    forward, gate, entered = batcher._run, threading.Event(), threading.Event()

    def held_forward(images: torch.Tensor):
        entered.set()
        gate.wait(30)
        return forward(images)

    batcher._run = held_forward
    pool = ThreadPoolExecutor(1)
    try:
        busy = pool.submit(engine.predict, torch.rand(1, 3, 64, 64))
        assert entered.wait(30)
        waiting = engine.submit_predict(torch.rand(2, 3, 64, 64), caller="analyst")
        assert value("explaind_predict_queue_depth_images") == 2
        with pytest.raises(ResourceExhausted, match="prediction queue is full for caller 'analyst' \\(2 of its images waiting, limit 2"):
            engine.check_predict_room(1, caller="analyst")
        engine.check_predict_room(2, caller="monitoring")  # another caller's share is its own
        gate.set()
        assert len(busy.result(60).class_indices) == 1 and len(waiting.result(60).class_indices) == 2
        assert value("explaind_predict_queue_depth_images") == 0
    finally:
        gate.set()
        pool.shutdown()
        engine.close()


def _constant_head(klass: int) -> nn.Linear:
    head = nn.Linear(128, 6)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(klass), 6).float() * 10)
    return head


def test_head_swaps_are_atomic_per_batch(engine):
    base = engine.models.active
    versions = [base.with_head(_constant_head(0)), base.with_head(_constant_head(1))]
    expected_class = {v.version: k for k, v in enumerate(versions)}
    engine.activate(versions[0])  # no request may see the base head, which maps to neither class
    stop = threading.Event()

    def swap() -> None:
        i = 1
        while not stop.is_set():
            engine.activate(versions[i % 2])
            i += 1

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(lambda _: engine.predict(torch.rand(4, 3, 64, 64), top_k=1), range(200)))
    finally:
        stop.set()
        swapper.join()
    seen = set()
    for output in outputs:
        klass = expected_class[output.model_version]
        assert output.class_indices[:, 0].tolist() == [klass] * 4  # never a mix of heads
        seen.add(klass)
    assert seen == {0, 1}


def test_a_predict_names_the_head_version_that_answered_it_not_one_promoted_since(engine):
    # A batch answered by one head, whose caller is handed its answer after a promote, still
    # names that head: its classes and its model_version come from the same version.
    base = engine.models.active
    answering, promoted = base.with_head(_constant_head(0)), base.with_head(_constant_head(1))
    engine.activate(answering)
    batch_output = engine.submit_predict(torch.rand(2, 3, 64, 64), top_k=1).result(timeout=60)
    engine.activate(promoted)
    output = engine.finish_predict(batch_output)
    assert output.class_indices[:, 0].tolist() == [0, 0]
    assert output.model_version == answering.version != promoted.version


def test_a_predict_orders_classes_of_equal_probability_by_class_index(engine):
    # topk's kernel orders exact ties as it likes (classes 1, 4, 3 of these three tied on
    # a CPU): equal probabilities are listed by class index, as a ranking's top_ids lists
    # them, and the k-th place of a tie that k cuts goes to the smallest index.
    base = engine.models.active
    for bias in ([0.0, 5.0, 0.0, 5.0, 5.0, 0.0], [1.0] * 6):
        head = nn.Linear(128, 6)
        nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.copy_(torch.tensor(bias))
        engine.activate(base.with_head(head))
        by_probability_then_index = sorted(range(6), key=lambda klass: (-bias[klass], klass))
        for top_k in (1, 2, 4, 6):
            output = engine.predict(torch.rand(2, 3, 64, 64), top_k=top_k)
            assert output.class_indices.tolist() == [by_probability_then_index[:top_k]] * 2, (bias, top_k)
            assert (np.diff(output.probabilities, axis=1) <= 0).all()


def test_a_predict_orders_classes_a_model_masks_with_minus_infinity_by_class_index(engine):
    # Ranked by logit, classes of logit -inf tied below every number: topk took classes 4
    # and 5 of the four masked here for a top 4, where their probabilities, 0, had been
    # ordered by class index.
    base = engine.models.active
    bias = [0.0, 1.0, -math.inf, -math.inf, -math.inf, -math.inf]
    head = nn.Linear(128, 6)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(torch.tensor(bias))
    engine.activate(base.with_head(head))
    for top_k in (3, 4, 5, 6):
        output = engine.predict(torch.rand(2, 3, 64, 64), top_k=top_k)
        assert output.class_indices.tolist() == [[1, 0, 2, 3, 4, 5][:top_k]] * 2, top_k
        assert (output.probabilities[:, 2:] == 0).all()


def test_predict_and_an_evaluation_take_the_larger_of_two_logits_their_softmax_rounds_to_one_probability(engine, monkeypatch):
    # Logits 2^-26 apart: their probabilities round to one float32, whose max (and a
    # ranking by probability) took the lower class, where the head, a ranking's mistakes
    # and an edit's evaluation (predicted_classes) take the larger logit.
    from explaind.engine.evaluation import evaluate
    from explaind.methods.neuroinspect._probability import predicted_classes

    head = nn.Linear(128, 6)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 2.0**-26, -5.0, -5.0, -5.0, -5.0]))
    probabilities = torch.softmax(head.bias.detach()[None], dim=1)[0]
    assert head.bias[1] > head.bias[0] and probabilities[0] == probabilities[1]  # the case the test is about
    assert predicted_classes(head.weight, head.bias, torch.rand(3, 128)).tolist() == [1, 1, 1]
    engine.activate(engine.models.active.with_head(head))
    output = engine.predict(torch.rand(2, 3, 64, 64), top_k=3)
    assert output.class_indices.tolist() == [[1, 0, 2]] * 2
    np.testing.assert_array_equal(output.probabilities, probabilities[[1, 0, 2]].expand(2, 3).numpy())
    logits, labels = head.bias.detach().expand(4, 6), torch.tensor([1, 1, 0, 0])
    monkeypatch.setattr(engine, "sample_set_logits", lambda *args, **kwargs: (logits, labels, [f"d{i}" for i in range(4)]))
    monkeypatch.setattr(engine, "sample_grid", lambda shown, captions, job=None: np.zeros((4, 4, 3), np.uint8))
    result = evaluate(engine, _EvaluationContext(), "tied", "uid of tied", 4, engine.models.active, 0, 2, dense_confusion=True)
    assert [(m.sample_index, m.label, m.predicted) for m in result.mistakes] == [(2, 0, 1), (3, 0, 1)]
    assert [m.probability for m in result.mistakes] == [probabilities[1].item()] * 2 and result.accuracy == 0.5


def test_split_reproduces_the_model_and_exposes_feature_maps(engine, world_model):
    version = engine.models.active
    images = torch.rand(5, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(version.logits(version.features(images)), world_model(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(version.feature_maps(images), world_model.feature_maps(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(version.feature_maps(images).mean((2, 3)), version.features(images), atol=1e-5, rtol=1e-5)
    # Another head is another model version; the features, and so their cache, stay.
    edited = version.with_head(_constant_head(2))
    assert edited.feature_version == version.feature_version and edited.head_version != version.head_version and edited.version != version.version


def test_the_feature_layers_output_is_kept_only_while_its_maps_are_read(engine):
    # Its hook holds a batch's activation maps: kept after the call, they stay in memory
    # until that thread's next forward.
    import gc

    version, outputs = engine.models.active, []
    layer = version.feature_extractor.trunk.get_submodule(version.feature_layer)
    handle = layer.register_forward_hook(lambda module, inputs, output: outputs.append(weakref.ref(output)))
    try:
        version.feature_maps(torch.rand(4, 3, 64, 64))
        version.features(torch.rand(4, 3, 64, 64))
    finally:
        handle.remove()
    gc.collect()
    assert len(outputs) == 2 and [ref() for ref in outputs] == [None, None]


class _SoftmaxAfterHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(self.body(x)), 1)


class _Tiny(_SoftmaxAfterHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return _Tiny()


def softmax_net() -> nn.Module:
    return _SoftmaxAfterHead()


class _SlicedAfterHead(nn.Module):
    """fc's outputs cut to ``kept`` columns: h_b (fc replaced by Identity) cuts the features instead."""

    def __init__(self, classes: int, kept: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc, self.kept = nn.Linear(4, classes), kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))[:, :self.kept]


def sliced_net(classes: int, kept: int) -> nn.Module:
    return _SlicedAfterHead(classes, kept)


class _BackboneNamedModule(nn.Module):
    """A model whose backbone is called ``module``, as DataParallel calls the model it wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.module(x))


def backbone_named_module() -> nn.Module:
    return _BackboneNamedModule()


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")  # what the torchscript loader is for
def test_loaders_split_or_explain_why_not(tmp_path):
    good = ClassifierSection(loader="factory", factory=f"{__name__}:tiny_net", feature_layer="body.0", head="fc", image_size=32, class_names=("a", "b", "c"))
    version = load_classifier(good)
    assert version.feature_dim == 4 and version.class_names == ("a", "b", "c")
    assert load_classifier(dataclasses.replace(good, image_size=0)).image_size == 224  # a factory's model fixes no size
    with pytest.raises(ModelLoadError, match="no module named 'classifier'"):
        load_classifier(ClassifierSection(loader="factory", factory=f"{__name__}:tiny_net", feature_layer="body.0", head="classifier", image_size=32))
    with pytest.raises(ModelLoadError, match="not the last operation"):
        load_classifier(ClassifierSection(loader="factory", factory=f"{__name__}:softmax_net", feature_layer="body.0", head="fc", image_size=32))
    # An operation after the head that changes the width of h_b's features (2 of 4), or of
    # the logits (4 of 6), is named as such, not as a shape error from inside torch.
    for classes, kept in ((3, 2), (6, 4)):
        with pytest.raises(ModelLoadError, match=r":sliced_net: 'fc' is not the last operation of the model"):
            load_classifier(ClassifierSection(loader="factory", factory=f"{__name__}:sliced_net", factory_kwargs={"classes": classes, "kept": kept},
                                              feature_layer="body.0", head="fc", image_size=32))
    # Configured names are checked against the head once it is found, not against no head.
    with pytest.raises(ModelLoadError, match="no module named 'classifier'"):
        load_classifier(dataclasses.replace(good, head="classifier"))
    # What the loader needs, and the factory's form, are said even without a config file's checks.
    with pytest.raises(ModelLoadError, match=r"^\[classifier\] loader 'factory' needs feature_layer"):
        load_classifier(ClassifierSection(loader="factory", factory=f"{__name__}:tiny_net", head="fc"))
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].factory must be 'package.module:function', got 'tiny_net'$"):
        load_classifier(dataclasses.replace(good, factory="tiny_net"))
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match=re.escape(f"[classifier].path (a world classifier directory) not found: {missing}")):
        load_classifier(ClassifierSection(loader="world", path=str(missing)))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not torchscript")
    with pytest.raises(ModelLoadError, match="broken.pt"):
        load_classifier(ClassifierSection(loader="torchscript", path=str(broken)))
    # A TorchScript model predicts as it is; what would explain it is said where it is refused.
    scripted = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(tiny_net().eval(), torch.rand(1, 3, 32, 32)), scripted)
    served = load_classifier(ClassifierSection(loader="torchscript", path=str(scripted), image_size=32))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(served.predict_fn(images), tiny_net().eval()(images))
    with pytest.raises(FailedPrecondition, match=r"^return_features: the torchscript classifier is inference-only, and features need .*: a TorchScript "
                                                 r"model cannot be split .* \[classifier\]\.loader = 'export'") as refused:
        served.require_split("features need a split classifier", field="return_features")
    assert refused.value.field == "return_features"
    version.require_split("anything")  # a split one passes


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")  # making the file
def test_a_torchscript_load_neither_warns_nor_drops_a_filter_another_thread_adds_meanwhile(tmp_path, monkeypatch):
    # torch.jit.load's FutureWarning (a WARNING line at every start) was ignored inside
    # catch_warnings(), which swaps the process's filters for the load: a filter another
    # thread added meanwhile was gone at its exit. Here one is added during each load.
    scripted = tmp_path / "tiny.pt"
    with pytest.warns(FutureWarning, match="jit.save"):
        torch.jit.save(torch.jit.trace(tiny_net().eval(), torch.rand(1, 3, 32, 32)), scripted)
    jit_load = torch.jit.load

    def load_while_another_thread_adds_a_filter(*args: object, **kwargs: object) -> torch.jit.ScriptModule:
        warnings.filterwarnings("ignore", "another thread's warning")
        return jit_load(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", load_while_another_thread_adds_a_filter)
    with warnings.catch_warnings(record=True) as caught:  # the filters as they are, the test's own restored after
        for _ in range(2):
            load_classifier(ClassifierSection(loader="torchscript", path=str(scripted), image_size=32))
        patterns = [message.pattern for _, message, *_ in warnings.filters if message is not None]
    assert [str(warning.message) for warning in caught] == []
    # The other thread's filter stays, and the loads' own is there once, not once a load.
    assert (patterns.count("another thread's warning"), sum("jit\\.load" in pattern for pattern in patterns)) == (1, 1), patterns


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")  # making the file
def test_an_operators_warning_filter_still_decides_whether_torch_jit_load_warns(tmp_path):
    # The loader's filter goes last: one the operator set (python -W always::FutureWarning) matches first.
    scripted = tmp_path / "tiny.pt"
    with pytest.warns(FutureWarning, match="jit.save"):
        torch.jit.save(torch.jit.trace(tiny_net().eval(), torch.rand(1, 3, 32, 32)), scripted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        load_classifier(ClassifierSection(loader="torchscript", path=str(scripted), image_size=32))
    assert [str(warning.message) for warning in caught if "jit.load" in str(warning.message)] == [
        "`torch.jit.load` is deprecated. Please switch to `torch.export`."]


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")  # what the torchscript loader is for
def test_a_torchscript_classifier_reports_its_own_runtime_on_the_cpu_whatever_the_config_says(tmp_path):
    # ClassifierInfo.backend: "torchscript" for TorchScript, whatever the config says;
    # .device: "cpu" for an inference-only classifier.
    from explaind.service.inference import InferenceServicer
    from explaind.v1 import inference_pb2

    scripted = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(tiny_net().eval(), torch.rand(1, 3, 32, 32)), scripted)
    config = (default_config().replace("classifier", loader="torchscript", path=str(scripted), image_size=32)
              .replace("runtime", backend="compile").replace("server", data_dir=str(tmp_path / "data"))
              .replace("clip", path="").replace("diffusion", path=""))  # loading those would only slow the test
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    engine.load()
    try:
        meta = InferenceServicer(engine, serving=lambda: True).GetModelMetadata(inference_pb2.GetModelMetadataRequest(), None).classifier
        assert (meta.loader, meta.backend, meta.device, meta.supports_features) == ("torchscript", "torchscript", "cpu", False)
    finally:
        engine.close()


class _Overflowing(_Tiny):
    """tiny_net with its features scaled past float32's range: infinite for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x) * 1e30 * 1e30)


def non_finite_net(kind: str) -> nn.Module:
    """:class:`_Overflowing` ("overflowing"), or tiny_net with a NaN in its head's weight or bias ("weight", "bias")."""
    if kind == "overflowing":
        return _Overflowing()
    model = tiny_net()
    with torch.no_grad():
        getattr(model.fc, kind).view(-1)[0] = math.nan
    return model


def ruling_out_net(every: bool = False) -> nn.Module:
    """tiny_net whose head's bias is -inf for class 2 (for ``every`` class): a model that rules that class out."""
    model = tiny_net()
    with torch.no_grad():
        model.fc.bias[slice(None) if every else 2] = -math.inf
    return model


def test_a_split_model_whose_head_rules_out_a_class_with_a_minus_infinite_bias_is_refused_saying_how_to_serve_it():
    # Its -inf logits are a class ruled out, which Predict and EvaluateSampleSet take: it was
    # said to have "NaN or infinite weights, which would make every prediction NaN".
    section = ClassifierSection(loader="factory", factory=f"{__name__}:ruling_out_net", feature_layer="body.0", head="fc", image_size=32)
    with pytest.raises(ModelLoadError, match=re.escape(":ruling_out_net: head 'fc' has a bias of -infinity for some classes (it rules them "
                                                       "out), and rankings and head edits need a finite head; serve the model "
                                                       "inference-only (loader 'torchscript' or 'onnx')")):
        load_classifier(section)


def test_a_head_whose_bias_rules_out_every_class_is_refused_as_one_no_prediction_of_which_is_of_use(tmp_path):
    # Its logits are -inf for every class, so every Predict is refused: the ONNX loader
    # served it inference-only, and the torch loaders sent the operator to do so.
    refused = re.escape("head 'fc' has NaN or infinite weights, which would make every prediction NaN")
    section = ClassifierSection(loader="factory", factory=f"{__name__}:ruling_out_net", factory_kwargs={"every": True},
                                feature_layer="body.0", head="fc", image_size=32)
    with pytest.raises(ModelLoadError, match=f":ruling_out_net: {refused}"):
        load_classifier(section)
    path = _export_onnx(ruling_out_net(every=True), tmp_path / "ruling_out_every_class.onnx")
    with pytest.raises(ModelLoadError, match=f"^{re.escape(f'[classifier].path: {path}: ')}head '.+' has NaN or infinite weights"):
        load_classifier(ClassifierSection(loader="onnx", path=path, image_size=64))


def test_a_model_with_a_nan_head_or_non_finite_logits_for_the_probe_images_is_refused_saying_so(tmp_path):
    # NaN equals nothing: both were refused as "'fc' is not the last operation of the model",
    # sending the operator to rename a head that was named right.
    section = ClassifierSection(loader="factory", factory=f"{__name__}:non_finite_net", feature_layer="body.0", head="fc", image_size=32)
    for kind in ("weight", "bias"):
        with pytest.raises(ModelLoadError, match=re.escape(":non_finite_net: head 'fc' has NaN or infinite weights, which would make every prediction NaN")):
            load_classifier(dataclasses.replace(section, factory_kwargs={"kind": kind}))
    with pytest.raises(ModelLoadError, match=re.escape(":non_finite_net: the model's logits for the 2 random images its split is checked on are NaN "
                                                       "or infinite (a float16 overflow, a division by zero?)")):
        load_classifier(dataclasses.replace(section, factory_kwargs={"kind": "overflowing"}))


def test_a_factory_model_is_loaded_with_its_weights_file_keeping_keys_that_only_some_start_with_module(tmp_path):
    # Only a state dict whose every key starts with "module." is a DataParallel module's.
    torch.manual_seed(1)
    trained = backbone_named_module().state_dict()
    torch.save(trained, tmp_path / "weights.pth")
    version = load_classifier(ClassifierSection(loader="factory", factory=f"{__name__}:backbone_named_module", weights=str(tmp_path / "weights.pth"),
                                                feature_layer="module.0", head="fc", image_size=16))
    assert torch.equal(version.head.weight, trained["fc.weight"]) and version.source == str(tmp_path / "weights.pth")
    assert torch.equal(version.feature_extractor.trunk.module[0].weight, trained["module.0.weight"])
    # Weights of another model than the factory builds are refused in one line naming what does not fit, not torch's list of keys.
    other = {"fc.weight": trained["fc.weight"][:, :1], "head.bias": trained["fc.bias"]}
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / 'other.pth'} does not fit the model {__name__}:backbone_named_module builds: its state "
                                                       "dict has 3 missing (first: module.0.weight, module.0.bias, fc.bias); 1 unexpected (first: head.bias); "
                                                       f"1 of another shape (first: fc.weight {tuple(other['fc.weight'].shape)} for "
                                                       f"{tuple(trained['fc.weight'].shape)}); make [classifier].factory and .factory_kwargs build")):
        load_classifier(ClassifierSection(loader="factory", factory=f"{__name__}:backbone_named_module", weights=str(tmp_path / "other.pth"),
                                          feature_layer="module.0", head="fc", image_size=16))


def test_torchvision_loader(tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    model = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(model.state_dict(), weights)
    section = ClassifierSection(
        loader="torchvision", name="resnet18", weights=str(weights), image_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    version = load_classifier(section)
    assert (version.feature_layer, version.head_name, version.feature_dim, len(version.class_names)) == ("layer4", "fc", 512, 3)
    assert version.normalization == (section.mean, section.std)  # what GetModelMetadata says
    # Images in [0, 1] reach the model normalised as configured: (x - mean) / std.
    images = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(section.mean).view(1, 3, 1, 1), torch.tensor(section.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        torch.testing.assert_close(version.logits(version.features(images)), model((images - mean) / std))
    assert version.feature_maps(torch.rand(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    # Its maps are one per feature: a layer of another width is refused at load, not when a visualisation runs.
    with pytest.raises(ModelLoadError, match=r"feature_layer 'layer3': the feature layer's output \(2, 256, 4, 4\) cannot be read as maps of 512"):
        load_classifier(dataclasses.replace(section, feature_layer="layer3"))


def test_torchvision_weights_served_without_normalisation_are_a_warning(tmp_path, caplog):
    # torchvision's models do not normalise their images: weights trained on normalised
    # images, served with mean and std unset, predicted quietly worse (here one class for
    # most images) and nothing said why.
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "weights.pth")
    section = ClassifierSection(loader="torchvision", name="resnet18", weights=str(tmp_path / "weights.pth"), image_size=32)
    with caplog.at_level(logging.WARNING, logger="explaind"):
        assert load_classifier(section).normalization == ((), ())
    assert f"{tmp_path / 'weights.pth'}: served without normalisation ([classifier].mean and .std unset), but torchvision's " \
           "resnet18 does not normalise its images itself: set the mean and std it was trained with" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="explaind"):
        load_classifier(dataclasses.replace(section, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert "normalisation" not in caplog.text


def test_torchvision_loader_reads_a_training_checkpoints_state_dict(tmp_path):
    # A fine-tuned model's file is often its training checkpoint, not model.state_dict():
    # these failed with "class_names or class_names_file is required", or torch's advice
    # to pass weights_only=False, which no key does.
    import argparse

    import torchvision

    state = torchvision.models.resnet18(num_classes=3).state_dict()
    checkpoints = {
        "reference.pth": {"model": state, "epoch": 3},  # torchvision's reference scripts
        "ddp.pth": {"state_dict": {f"module.{key}": value for key, value in state.items()}},  # a DistributedDataParallel module
        "tutorial.pth": {"model_state_dict": state, "epoch": 3},
        "named.pth": {"model": "resnet18", "model_state_dict": state},  # "model" naming the architecture, not holding it
    }
    for name, checkpoint in checkpoints.items():
        torch.save(checkpoint, tmp_path / name)
        version = load_classifier(ClassifierSection(loader="torchvision", name="resnet18", weights=str(tmp_path / name), image_size=32))
        assert len(version.class_names) == 3 and torch.equal(version.head.weight, state["fc.weight"]), name
    from safetensors.torch import save_file

    save_file(state, tmp_path / "weights.safetensors")  # the format the Hugging Face Hub serves weights in
    version = load_classifier(ClassifierSection(loader="torchvision", name="resnet18", weights=str(tmp_path / "weights.safetensors"), image_size=32))
    assert torch.equal(version.head.weight, state["fc.weight"])
    torch.save({"state_dict": {f"model.{key}": value for key, value in state.items()}}, tmp_path / "lightning.pth")
    with pytest.raises(ModelLoadError, match=r"lightning.pth: no 'fc.weight' in the state dict, so it is not one of torchvision's resnet18 "
                                             r"with head 'fc' \(its first keys: \['model.conv1.weight'"):
        load_classifier(ClassifierSection(loader="torchvision", name="resnet18", weights=str(tmp_path / "lightning.pth")))
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "with_args.pth")
    with pytest.raises(ModelLoadError, match=r"with_args.pth holds objects other than tensors \(Unsupported global: GLOBAL argparse.Namespace\), "
                                             r".*torch.save\(checkpoint\['model'\], 'weights.pth'\)$"):
        load_classifier(ClassifierSection(loader="torchvision", name="resnet18", weights=str(tmp_path / "with_args.pth")))
    # A whole model saved with torch.save(model) is told to save its state dict, not a checkpoint's entry it has none of.
    torch.save(torchvision.models.resnet18(num_classes=3), tmp_path / "whole_model.pth")
    with pytest.raises(ModelLoadError, match=r"whole_model.pth holds objects other than tensors \(Unsupported global: GLOBAL "
                                             r"torchvision.models.resnet.ResNet\), as a whole model saved with torch.save\(model\), .*"
                                             r"e.g. torch.save\(model.state_dict\(\), 'weights.pth'\)"):
        load_classifier(ClassifierSection(loader="torchvision", name="resnet18", weights=str(tmp_path / "whole_model.pth")))
    for name, content in (("tensor.pth", state["fc.weight"]), ("list.pth", list(state.values()))):  # weights_only loads these too
        torch.save(content, tmp_path / name)
        with pytest.raises(ModelLoadError, match=rf"{name} holds a {type(content).__name__}, not a state dict \(layer names to tensors\); "
                                                 r"save the model's state dict, e.g. torch.save\(model.state_dict\(\), 'weights.pth'\)$"):
            load_classifier(ClassifierSection(loader="torchvision", name="resnet18", weights=str(tmp_path / name)))


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")  # GoogLeNet's and Inception's, built untrained
@pytest.mark.parametrize(("architecture", "head", "feature_layer"), [
    ("mobilenet_v3_small", "classifier.3", "classifier.1"), ("efficientnet_b0", "classifier.1", "features"),
    ("regnet_x_400mf", "fc", "trunk_output"), ("shufflenet_v2_x0_5", "fc", "conv5"), ("resnet18", "fc", "layer4"),
    ("googlenet", "fc", "inception5b"),  # built in training mode, when it returns its auxiliary logits too
])
def test_a_torchvision_architecture_splits_where_its_table_says_without_head_or_feature_layer_set(tmp_path, architecture, head, feature_layer):
    # Every one but a ResNet needed both keys set: the defaults were ResNet's whatever the name.
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(architecture, weights=None, num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    version = load_classifier(ClassifierSection(loader="torchvision", name=architecture, weights=str(tmp_path / "weights.pth"), image_size=64))
    assert (version.head_name, version.feature_layer) == (head, feature_layer)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(version.logits(version.features(images)), model(images))


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")  # GoogLeNet's and Inception's, built untrained
@pytest.mark.parametrize(("architecture", "head", "feature_layer"), [
    ("resnext50_32x4d", "fc", "layer4"), ("wide_resnet50_2", "fc", "layer4"), ("inception_v3", "fc", "Mixed_7c"),
    ("efficientnet_v2_s", "classifier.1", "features"), ("mobilenet_v2", "classifier.1", "features"), ("mnasnet0_5", "classifier.1", "layers"),
    ("mobilenet_v3_large", "classifier.3", "classifier.1"), ("convnext_tiny", "classifier.2", "features"), ("densenet121", "classifier", "features"),
    ("swin_t", "head", "features"), ("vgg11", "classifier.6", "classifier.4"), ("alexnet", "classifier.6", "classifier.5"),
    ("vit_b_16", "heads.head", "encoder"), ("maxvit_t", "classifier.5", "classifier.4"),
])
def test_each_row_of_the_torchvision_table_names_a_linear_head_and_a_layer_run_before_it_of_its_width(architecture, head, feature_layer):
    # The rows docs/configuration.md gives, checked on the meta device (shapes, no weights):
    # the ones not loaded in full above would only fail at a user's start-up.
    import torchvision

    from explaind.engine.models import torchvision_split
    from explaind.methods.neuroinspect import channel_maps

    assert torchvision_split(architecture) == (head, feature_layer)
    with torch.device("meta"):
        model = torchvision.models.get_model(architecture, weights=None, num_classes=3).eval()
    runs = []
    for name in (feature_layer, head):
        model.get_submodule(name).register_forward_hook(lambda module, inputs, output, name=name: runs.append((name, output)))
    size = 299 if architecture == "inception_v3" else 224
    model(torch.empty(2, 3, size, size, device="meta"))
    linear = model.get_submodule(head)
    assert isinstance(linear, nn.Linear) and [name for name, _ in runs] == [feature_layer, head]
    assert channel_maps(runs[0][1], linear.in_features).shape[:2] == (2, linear.in_features)


def test_torchvision_weights_of_another_architecture_are_refused_naming_what_does_not_fit(tmp_path):
    # resnet18's weights served as name = "resnet34" (or resnet50) stopped start-up with
    # torch's list of every missing key, some 2,000 characters and no word of [classifier].name.
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "resnet18.pth")
    section = ClassifierSection(loader="torchvision", name="resnet34", weights=str(tmp_path / "resnet18.pth"), image_size=32)
    with pytest.raises(ModelLoadError, match=r"resnet18.pth does not fit torchvision's resnet34: its state dict has 80 missing "
                                             r"\(first: layer1.2.conv1.weight, layer1.2.bn1.weight, layer1.2.bn1.bias\); "
                                             r"set \[classifier\].name to the architecture the weights were saved from$"):
        load_classifier(section)
    # Extra keys and resized layers are counted too (wide_resnet50_2's weights as resnet18).
    torch.save(torchvision.models.wide_resnet50_2(num_classes=3).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ModelLoadError, match=r"wide.pth does not fit torchvision's resnet18: its state dict has \d+ unexpected "
                                             r"\(first: layer1.0.conv3.weight, .*\); \d+ of another shape \(first: layer1.0.conv1.weight "
                                             r"\(128, 64, 1, 1\) for \(64, 64, 3, 3\), .*\); set \[classifier\].name"):
        load_classifier(dataclasses.replace(section, name="resnet18", weights=str(tmp_path / "wide.pth")))


def test_torchvision_models_not_named_like_a_resnet_are_split_where_the_config_says_or_told_why_not(tmp_path):
    # A head set wrong: the refusal listed the state dict's first keys (the stem's) and,
    # for a mistyped module, its last ones only; SqueezeNet's convolution head was "expected nn.Linear".
    import torchvision

    torch.manual_seed(0)
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=3).eval()  # classifier: Linear, Hardswish, Dropout, Linear
    torch.save(mobilenet.state_dict(), tmp_path / "mobilenet.pth")
    section = ClassifierSection(loader="torchvision", name="mobilenet_v3_small", weights=str(tmp_path / "mobilenet.pth"), image_size=64)
    with pytest.raises(ModelLoadError, match=r"no 'fc.weight' in the state dict, .* its last linear layers: \['classifier.0', 'classifier.3'\]\); "
                                             r"set \[classifier\].head"):
        load_classifier(dataclasses.replace(section, head="fc"))
    # The last modules are where a head and the layers before it are.
    with pytest.raises(ModelLoadError, match=r"no module named 'feature' for \[classifier\].feature_layer; close matches are \['features',"
                                             r".*; last modules are \['features.12.1', .*'classifier.3'\]$"):
        load_classifier(dataclasses.replace(section, head="classifier.3", feature_layer="feature"))
    for holder, verb in (("classifier", "holds"), ("classifier.3", "is")):  # "does not run in the model's forward", though it did
        with pytest.raises(ModelLoadError, match=rf"\[classifier\].feature_layer '{holder}' {verb} the head 'classifier.3'; name a layer"):
            load_classifier(dataclasses.replace(section, head="classifier.3", feature_layer=holder))
    # A layer whose channels are not the head's inputs (576 of 1024, before classifier.0) is refused as it loads, not when maps are read.
    with pytest.raises(ModelLoadError, match=r"feature_layer 'features': the feature layer's output \(2, 576, 2, 2\) cannot be read as maps of "
                                             r"1024 channels .*; name the layer whose channels the head reads$"):
        load_classifier(dataclasses.replace(section, head="classifier.3", feature_layer="features"))
    version = load_classifier(dataclasses.replace(section, head="classifier.3", feature_layer="classifier.1"))
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(version.logits(version.features(images)), mobilenet(images))
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), tmp_path / "squeezenet.pth")
    with pytest.raises(ModelLoadError, match=r"head 'classifier.1' is a Conv2d, not an nn.Linear: .* served inference-only, with loader 'torchscript' or 'onnx'"):
        load_classifier(ClassifierSection(loader="torchvision", name="squeezenet1_1", weights=str(tmp_path / "squeezenet.pth"),
                                          head="classifier.1", feature_layer="features", image_size=64))


def test_an_exported_program_is_served_at_the_input_size_it_fixes(tmp_path):
    # It was probed at 224 and refused with "export it with a dynamic batch", which it had.
    model = torch.nn.Sequential()
    model.layer4 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model.fc = torch.nn.Linear(4, 2)
    path = tmp_path / "at16.pt2"
    torch.export.save(torch.export.export(model.eval(), (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    version = load_classifier(ClassifierSection(loader="export", path=str(path)))
    # Named by its file, as no architecture is; split where a ResNet is, unless configured.
    assert (version.image_size, version.name, version.head_name, version.feature_layer) == (16, "at16", "fc", "layer4")
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].image_size is 32 but .*at16.pt2 takes 16x16 images: leave it unset \(0\)"):
        load_classifier(ClassifierSection(loader="export", path=str(path), image_size=32))


def test_an_exported_program_whose_outputs_move_with_its_batch_by_rounding_is_not_taken_for_training_mode(tmp_path):
    # Kernels can block a batch of 3 otherwise than one image and round its outputs apart;
    # the check allows 1e-4 for that (not float32's epsilon): training mode moves them by far more.
    class RoundingWithItsBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer4 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(4, 2)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            features = self.layer4(images)
            return self.fc(features + 1e-3 * features.mean(dim=0))  # its batch moves it by about 1e-5

    path = tmp_path / "rounding.pt2"
    model = RoundingWithItsBatch().eval()
    torch.export.save(torch.export.export(model, (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    version = load_classifier(ClassifierSection(loader="export", path=str(path)))
    images = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(version.logits(version.features(images)), model(images))


def test_an_exported_programs_head_may_be_nested_but_must_be_linear_and_its_input_square_images(tmp_path):
    def exported(model: nn.Module, name: str, shape: tuple[int, ...] = (2, 3, 16, 16)) -> str:
        path = tmp_path / f"{name}.pt2"
        torch.export.save(torch.export.export(model.eval(), (torch.rand(*shape),), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
        return str(path)

    torch.manual_seed(0)
    model = nn.Sequential()
    model.layer4 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 2))  # as torchvision's EfficientNet
    version = load_classifier(ClassifierSection(loader="export", path=exported(model, "nested"), head="classifier.1"))
    images = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(version.logits(version.features(images)), model(images))
    model.classifier[1] = nn.Conv2d(4, 2, 1)
    model.classifier.insert(1, nn.Unflatten(1, (4, 1, 1)))
    model.classifier.append(nn.Flatten())
    with pytest.raises(ModelLoadError, match=r"head 'classifier.2' has parameters \{'bias': \(2,\), 'weight': \(2, 4, 1, 1\)\}, not a linear layer's"):
        load_classifier(ClassifierSection(loader="export", path=exported(model, "conv_head"), head="classifier.2"))
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].path: .*wide.pt2 takes 16x24 images; explaind feeds square ones$"):
        load_classifier(ClassifierSection(loader="export", path=exported(model, "wide", (2, 3, 16, 24)), head="classifier.2"))

    class ScaledLinear(nn.Linear):  # a linear layer's weight and bias, and a parameter no nn.Linear has
        def __init__(self) -> None:
            super().__init__(4, 2)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * self.scale

    model.classifier = nn.Sequential(nn.Dropout(0.2), ScaledLinear())
    with pytest.raises(ModelLoadError, match=r"head 'classifier.1' has parameters \{'bias': \(2,\), 'scale': \(\), 'weight': \(2, 4\)\}, not a linear layer's"):
        load_classifier(ClassifierSection(loader="export", path=exported(model, "scaled_head"), head="classifier.1"))


def test_an_exported_program_taking_anything_but_one_batch_of_images_is_refused_naming_its_inputs(tmp_path):
    def exported(model: nn.Module, name: str, *inputs: torch.Tensor) -> str:
        path = tmp_path / f"{name}.pt2"
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(model.eval(), inputs, dynamic_shapes=tuple({0: batch} for _ in inputs)), str(path))
        return str(path)

    class Signals(nn.Module):  # (N, 3, L): its second dimension alone looks like images'
        def __init__(self) -> None:
            super().__init__()
            self.layer4 = nn.Sequential(nn.Conv1d(3, 4, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten())
            self.fc = nn.Linear(4, 2)

        def forward(self, signals: torch.Tensor) -> torch.Tensor:
            return self.fc(self.layer4(signals))

    with pytest.raises(ModelLoadError, match=r"^\[classifier\].path: the input 'signals' of .*signals.pt2 has shape \['\w+', 3, 16\]; "
                                             r"explaind feeds it images \(N, 3, S, S\), channels first$"):
        load_classifier(ClassifierSection(loader="export", path=exported(Signals(), "signals", torch.rand(2, 3, 16))))

    grey = nn.Sequential()  # one channel: it was probed with three, and told to export a dynamic batch, which it has
    grey.layer4 = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    grey.fc = nn.Linear(4, 2)
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].path: the input '\w+' of .*grey.pt2 has shape \['\w+', 1, 16, 16\]; "
                                             r"explaind feeds it images \(N, 3, S, S\), channels first$"):
        load_classifier(ClassifierSection(loader="export", path=exported(grey, "grey", torch.rand(2, 1, 16, 16))))

    class WithMetadata(nn.Module):  # images and a second input: its probe was told to export a dynamic batch, which it has
        def __init__(self) -> None:
            super().__init__()
            self.layer4 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(4, 2)

        def forward(self, images: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
            return self.fc(self.layer4(images) + metadata)

    path = exported(WithMetadata(), "with_metadata", torch.rand(2, 3, 16, 16), torch.rand(2, 4))
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].path: .*with_metadata.pt2 takes inputs \['images', 'metadata'\], "
                                             r"where explaind feeds it one tensor, images \(N, 3, S, S\)$"):
        load_classifier(ClassifierSection(loader="export", path=path))


def half_tiny_net(dtype: str = "float16") -> nn.Module:
    return tiny_net().to(getattr(torch, dtype))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")  # what the torchscript loader is for
def test_a_half_precision_torchscript_model_is_fed_float16_images_and_served_float32_scores(tmp_path):
    """A TorchScript model traced after ``model.half()`` stopped start-up: its probe was
    fed float32 images ("Input type (float) and bias type (c10::Half) should be the same")."""
    model, fixed = tiny_net().eval(), tiny_net().eval()
    with torch.no_grad():  # probabilities whose float16 roundings sum to 1 - 2.4e-4, past float32's 1e-4
        fixed.fc.weight.zero_(), fixed.fc.bias.copy_(torch.tensor([0.0, 0.8, 0.1]))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name, scores in (("logits", model), ("probabilities", nn.Sequential(fixed, nn.Softmax(dim=1)))):
        path = tmp_path / f"{name}.pt"
        torch.jit.save(torch.jit.trace(copy.deepcopy(scores).half(), torch.rand(1, 3, 32, 32).half()), path)
        served = load_classifier(ClassifierSection(loader="torchscript", path=str(path), image_size=32)).predict_fn(images)
        assert served.dtype == torch.float32
        with torch.no_grad():
            want = scores(images)
        # Probabilities summing to 1 to float16's precision are found so, and served as their logarithms.
        torch.testing.assert_close(served.exp() if name == "probabilities" else served, want, atol=2e-3, rtol=2e-3)


class _DroppingTiny(_Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.body(x)))


class _Scores(nn.Module):
    """tiny_net's logits turned into ``kind`` of scores: a shift that makes each row sum to
    1 ("centred"), probabilities with exact zeros ("zeros"), or no scores at all."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.model, self.kind = tiny_net().eval(), kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.kind == "centred":
            return (logits - logits.mean(dim=1, keepdim=True)) * 100 + 1 / 3
        if self.kind == "zeros":
            return torch.softmax(torch.cat([logits, logits[:, :1] - 1000], dim=1), dim=1)
        return logits.max(dim=1).values if self.kind == "best" else logits.argsort(dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")  # what the torchscript loader is for
def test_a_torchscript_model_runs_in_eval_mode_on_its_normalised_images_at_224_unless_configured(tmp_path):
    # Scripted in training mode, its dropout would zero half its features at random.
    torch.manual_seed(0)
    model = _DroppingTiny()
    path = tmp_path / "dropping.pt"
    torch.jit.save(torch.jit.script(model.train()), path)
    section = ClassifierSection(loader="torchscript", path=str(path), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    served = load_classifier(section)
    assert (served.image_size, served.class_names) == (224, ("class_0", "class_1", "class_2"))
    assert served.normalization == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(served.predict_fn(images), model.eval()((images - 0.5) / 0.25))
    # Its version is its file's and its normalisation's: another std is another model.
    assert served.feature_version != load_classifier(dataclasses.replace(section, std=(0.5, 0.5, 0.5))).feature_version
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].resize_size 16 is below the input size 32"):
        load_classifier(dataclasses.replace(section, image_size=32, resize_size=16))


def test_a_model_files_digest_covers_all_of_it_not_only_its_first_chunk(tmp_path):
    # An inference-only model's version is its file's digest, read in 1 MiB chunks: a
    # retrained model may differ only past the first.
    from explaind.engine.models import _hash_file

    start = bytes(1 << 20)
    (tmp_path / "a.pt").write_bytes(start + b"a")
    (tmp_path / "b.pt").write_bytes(start + b"b")
    assert _hash_file(tmp_path / "a.pt") != _hash_file(tmp_path / "b.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")  # what the torchscript loader is for
def test_an_inference_only_models_scores_are_served_as_logits_and_other_outputs_are_refused(tmp_path):
    def served(kind: str):
        path = tmp_path / f"{kind}.pt"
        torch.jit.save(torch.jit.trace(_Scores(kind), torch.rand(1, 3, 32, 32)), path)
        return load_classifier(ClassifierSection(loader="torchscript", path=str(path), image_size=32)).predict_fn

    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        # Rows that sum to 1 but hold negatives are logits, not probabilities: served as they are.
        torch.testing.assert_close(served("centred")(images), _Scores("centred")(images))
        # A probability that underflowed to 0 is a very low logit, not -inf.
        logits = served("zeros")(images)
        assert logits.isfinite().all() and (logits[:, 3] < logits[:, :3].min(dim=1).values - 80).all()
    for kind, output in (("best", r"torch.float32 of shape \(2,\)"), ("ranks", r"torch.int64 of shape \(2, 3\)")):
        with pytest.raises(ModelLoadError, match=rf"output for 2 images is {output}, not scores \(N, classes\)"):
            served(kind)


def test_a_probability_models_row_of_only_zeros_is_served_as_unusable_not_as_uniform():
    # A row that underflowed everywhere (or a model giving no class) named every class
    # equally likely, top class 0: now NaN, which Predict and evaluation refuse naming it.
    from explaind.engine.models import _logarithm_of

    logits = _logarithm_of(lambda images: images)(torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 0.0]]))
    assert logits[0].isfinite().all() and logits[0, 1] > logits[0, 0] > logits[0, 2] and logits[1].isnan().all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_exported_or_factory_model_is_split_into_float32_features_and_head(tmp_path, dtype):
    """A program exported after ``model.half()`` (or a factory's half model) stopped
    start-up: its probe was fed float32 images (and a bfloat16 one's hash met numpy, which
    has no bfloat16). Its features, maps and head are served as float32, and the head
    stays trainable (cast outside inference mode) for edits."""
    model = tiny_net().eval()
    path = tmp_path / "half.pt2"
    torch.export.save(torch.export.export(half_tiny_net(dtype).eval(), (torch.rand(2, 3, 32, 32).to(getattr(torch, dtype)),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_features, want_logits = model.body(images), model(images)
    for section in (ClassifierSection(loader="export", path=str(path), feature_layer="body.0", head="fc"),
                    ClassifierSection(loader="factory", factory=f"{__name__}:half_tiny_net", factory_kwargs={"dtype": dtype}, feature_layer="body.0",
                                      head="fc", image_size=32)):
        version = load_classifier(section)
        assert version.supports_features and version.head.weight.dtype == torch.float32 and not version.head.weight.is_inference()
        features = version.features(images)
        assert features.dtype == version.feature_maps(images).dtype == torch.float32
        torch.testing.assert_close(features, want_features, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(version.logits(features), want_logits, atol=1e-2, rtol=1e-2)


def test_a_float16_state_dict_is_loaded_into_the_float32_torchvision_architecture(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    weights = tmp_path / "resnet18.pth"
    torch.save({key: value.half() if value.is_floating_point() else value for key, value in model.state_dict().items()}, weights)
    version = load_classifier(ClassifierSection(loader="torchvision", name="resnet18", weights=str(weights), image_size=32))
    assert {parameter.dtype for parameter in version.feature_extractor.parameters()} == {version.head.weight.dtype} == {torch.float32}
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(version.logits(version.features(images)), model.half().float()(images))


def test_torch_export_s_other_log_lines_pass_while_a_program_loads(tmp_path, monkeypatch):
    # Only the tracebacks torch logs for a file it cannot read are held back (their error
    # is ModelLoadError's message); a warning about a program it reads still reaches the log.
    from explaind.engine.models import _read_exported_program

    program, seen = object(), []

    def load(path):
        logging.getLogger("torch.export").warning("a note about %s", path)
        return program

    class Seen(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("torch.export")
    handler = Seen()
    logger.addHandler(handler)
    monkeypatch.setattr(torch.export, "load", load)
    try:
        assert _read_exported_program(tmp_path / "model.pt2") is program
    finally:
        logger.removeHandler(handler)
    assert seen == [f"a note about {tmp_path / 'model.pt2'}"]


def test_a_damaged_or_foreign_model_file_is_named_without_torch_s_traceback(tmp_path, capfd):
    # A Git LFS pointer checked out as the weights was "holds objects other than tensors ...
    # save the model's state dict alone"; a damaged .pt2 logged torch's traceback, then
    # said "check the warnings above".
    pointer = tmp_path / "resnet18.pth"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 46830571\n")
    with pytest.raises(ModelLoadError, match=r"resnet18.pth is not a file torch.save wrote \(Unsupported operand 118\): it is damaged or "
                                             r"another format, such as a Git LFS pointer"):
        load_classifier(ClassifierSection(loader="torchvision", name="resnet18", weights=str(pointer)))
    state_dict = tmp_path / "state_dict.pt2"  # a zip, as a .pt2 is, but no program
    torch.save(tiny_net().state_dict(), state_dict)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(state_dict.read_bytes()[:200])
    for path in (state_dict, truncated):
        with pytest.raises(ModelLoadError, match=f"^\\[classifier\\].path: cannot read {re.escape(str(path))} as a torch.export program "
                                                 r"\(a .pt2 file from torch.export.save\): it is damaged or another format \(RuntimeError: "):
            load_classifier(ClassifierSection(loader="export", path=str(path)))
    assert "Traceback" not in capfd.readouterr().err

def test_a_vit_splits_at_its_class_token_without_keeping_its_other_tokens():
    vit = ClassifierSection(**TINY_VIT_CLASSIFIER)
    features = load_classifier(vit).features(torch.rand(3, 3, 32, 32))
    # Cached as they are: a view of the class token would hold all 17 tokens' memory.
    assert features.shape == (3, 16) and features.untyped_storage().nbytes() == features.numel() * 4
    attention = "encoder.layers.encoder_layer_0.self_attention"  # returns (output, weights)
    with pytest.raises(ModelLoadError, match=f"feature_layer '{attention}' does not run in the model's forward or returns no single tensor"):
        load_classifier(dataclasses.replace(vit, feature_layer=attention))


def test_a_feature_version_changes_with_the_normalisation_in_front_of_the_model(tmp_path):
    # Cached features and head versions are keyed by it: a changed [classifier].mean
    # served features of the old normalisation.
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    versions = [load_classifier(ClassifierSection(loader="torchvision", name="resnet18", weights=str(weights), image_size=32, **normalisation))
                for normalisation in ({}, {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}, {"mean": (0.4, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})]
    assert len({v.feature_version for v in versions}) == 3
    # Without one, h_b's state (and so its hash) is the model's alone, as it was before
    # normalisation could be configured: the features cached under it stay valid.
    assert not [key for key in versions[0].feature_extractor.state_dict() if key.startswith("preprocess.")]


_onnx_exports: dict[tuple[object, ...], bytes] = {}


def _model_key(model: torch.nn.Module) -> tuple[object, ...]:
    """What an export of ``model`` depends on: its modules' classes, their configuration and its weights."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return tuple(type(module) for module in model.modules()), repr(model), weights.hexdigest()


def _export_onnx(model: torch.nn.Module, path: Path, *, batch: int | None = None, external_data: bool = False,
                 dtype: torch.dtype = torch.float32) -> str:
    """``model`` as ONNX with a dynamic batch, or a fixed ``batch``; a ``dtype`` other than
    float32 exports a copy cast to it, taking and giving tensors of that type.

    A dynamo export takes seconds and this module's tests export the same models many times:
    a file of one piece is exported once per model, batch and dtype and written again after
    that (with ``external_data`` its weights file is named after ``path``, so it is exported
    each time). The export draws nothing from the global generator, so a test's own draws
    are the same whether its file was exported or written again."""
    key = None if external_data else (_model_key(model), batch, dtype)
    if key in _onnx_exports:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_onnx_exports[key])
        return str(path)
    dynamic = {} if batch else {"dynamic_shapes": ({0: torch.export.Dim("n")},)}
    cast = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.onnx.export(cast.eval(), (torch.rand(batch or 2, 3, 64, 64, dtype=dtype),), str(path), input_names=["images"], dynamo=True,
                          external_data=external_data, verbose=False, **dynamic)
    if key is not None:
        _onnx_exports[key] = path.read_bytes()
    return str(path)


def test_onnx_models_are_told_apart_by_their_external_weights_and_checked_against_their_class_names(tmp_path, world_model):
    retrained = copy.deepcopy(world_model)
    with torch.no_grad():
        retrained.fc.weight.mul_(2.0)  # large enough to be stored outside the graph file
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = (load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(model, tmp_path / name / "model.onnx", external_data=True),
                                                       image_size=64))
                     for model, name in ((world_model, "a"), (retrained, "b")))
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()  # only the weights differ
    assert first.feature_version != second.feature_version and first.supports_features
    names = ("circle", "square", "triangle")
    with pytest.raises(ModelLoadError, match=re.escape("the model has 6 outputs but [classifier].class_names gives 3 class names; give one per output")):
        load_classifier(ClassifierSection(loader="onnx", path=str(tmp_path / "a" / "model.onnx"), image_size=64, class_names=names))
    # A file of names is named, as the key that set them.
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(ModelLoadError, match=re.escape(f"the model has 6 outputs but class names file {tmp_path / 'classes.txt'} gives 3 class names")):
        load_classifier(ClassifierSection(loader="onnx", path=str(tmp_path / "a" / "model.onnx"), image_size=64,
                                          class_names_file=str(tmp_path / "classes.txt")))


@pytest.mark.parametrize("batch", [1, 4])
def test_an_onnx_model_with_a_fixed_batch_loads_and_runs_batches_of_any_size(tmp_path, world_model, batch):
    """torch.onnx.export without dynamic axes fixes the traced batch; the batcher and
    evaluations send other sizes, which run in slices of it, the last one padded."""
    split = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(world_model, tmp_path / "split.onnx", batch=batch), image_size=64))
    ending_in_softmax = torch.nn.Sequential(world_model, torch.nn.Softmax(dim=1))
    whole = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(ending_in_softmax, tmp_path / "whole.onnx", batch=batch), image_size=64))
    assert split.supports_features and not whole.supports_features
    for count in (1, 9):
        images = torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(count))
        with torch.no_grad():
            expected = world_model(images)
        torch.testing.assert_close(split.logits(split.features(images)), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(whole.predict_fn(images).exp(), torch.softmax(expected, dim=1), atol=1e-4, rtol=1e-4)


def test_a_float16_onnx_classifier_is_fed_float16_images_and_served_float32_logits_features_and_head(
        tmp_path, classifier_dir, world_model, world_images, engine):
    """A model exported after ``model.half()`` takes and gives float16 tensors: it was
    refused at start-up (ONNX Runtime's "Unexpected input data type"). Split, its head is
    float32 and agrees with the graph to float16's precision, not float32's 1e-4."""
    images, _ = world_images
    want = engine.predict(images, top_k=1, return_features=True)
    split = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(world_model, tmp_path / "split.onnx", dtype=torch.float16),
                                              image_size=64))
    assert split.supports_features, split.inference_only_reason
    assert split.head.weight.dtype == torch.float32
    onnx_engine = _engine(tmp_path / "onnx", classifier_dir)
    onnx_engine.activate(split)
    got = onnx_engine.predict(images, top_k=1, return_features=True)
    np.testing.assert_array_equal(got.class_indices, want.class_indices)
    assert got.features.dtype == np.float32
    np.testing.assert_allclose(got.features, want.features, rtol=1e-2, atol=1e-2)

    ending_in_softmax = torch.nn.Sequential(world_model, torch.nn.Softmax(dim=1))
    whole = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(ending_in_softmax, tmp_path / "whole.onnx", dtype=torch.float16),
                                              image_size=64))
    assert not whole.supports_features
    onnx_engine.activate(whole)
    got = onnx_engine.predict(images, top_k=1)
    np.testing.assert_array_equal(got.class_indices, want.class_indices)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=2e-3)
    onnx_engine.close()


def test_a_classifier_on_its_own_runtime_says_that_runtime_backend_does_not_apply_to_it(tmp_path, classifier_dir, world_model, caplog):
    # An operator who set backend = "onnxruntime" for an inference-only ONNX classifier
    # would otherwise read it as served by the configured backend.
    ending_in_softmax = torch.nn.Sequential(world_model, torch.nn.Softmax(dim=1))
    whole = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(ending_in_softmax, tmp_path / "whole.onnx"), image_size=64))
    for backend, warned in (("eager", False), ("onnxruntime", True)):
        engine = _engine(tmp_path / backend, classifier_dir, load=False, backend=backend)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="explaind"):
            engine.activate(whole)
        said = "the onnx classifier runs on its own runtime; [runtime].backend applies to PyTorch classifiers only"
        assert (said in caplog.text) is warned, caplog.text
        assert engine.runtime(whole) == ("onnxruntime", "cpu")
        engine.close()


def test_a_float16_onnx_classifier_whose_logits_sit_far_from_0_on_its_bias_is_split(tmp_path, world_model):
    # The graph rounds its logits to float16 where they are: around 1000, to 0.5. The
    # check's bound scales with each logit's terms, the bias among them.
    shifted = copy.deepcopy(world_model)
    with torch.no_grad():
        shifted.fc.bias.add_(1000.0)  # the same softmax
    split = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(shifted, tmp_path / "shifted.onnx", dtype=torch.float16)))
    assert split.supports_features, split.inference_only_reason
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        want = torch.softmax(world_model(images), dim=1)
    torch.testing.assert_close(torch.softmax(split.logits(split.features(images)), dim=1), want, atol=1e-2, rtol=0)  # float16 features


def _export_pixels_onnx(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.uint8) -> str:
    """``model`` behind its own preprocessing, as ONNX taking (n, 64, 64, 3) pixels 0-255 of
    ``dtype`` channels last, as a graph converted from TensorFlow does."""
    class Pixels(torch.nn.Module):
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return model(pixels.permute(0, 3, 1, 2).float() / 255)

    torch.onnx.export(Pixels().eval(), (torch.zeros(2, 64, 64, 3, dtype=dtype),), str(path), input_names=["images"], dynamo=True, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("n")},))
    return str(path)


def test_an_onnx_classifier_taking_uint8_pixels_channels_last_is_fed_them_and_served_like_its_pytorch_model(
        tmp_path, classifier_dir, world_model, world_images, engine):
    """Such a graph was refused at start-up ("explaind feeds it float32 or float16 images"):
    it is fed each image rounded to its nearest pixel values, and split like any other."""
    pixels = (world_images[0] * 255).round()
    images = (pixels + torch.empty_like(pixels).uniform_(-0.45, 0.45)) / 255  # each off its pixel value, by less than half a step
    want = engine.predict(pixels / 255, top_k=3, return_features=True)
    split = load_classifier(ClassifierSection(loader="onnx", path=_export_pixels_onnx(world_model, tmp_path / "split.onnx")))
    assert split.image_size == 64 and split.supports_features, split.inference_only_reason
    whole = load_classifier(ClassifierSection(loader="onnx", path=_export_pixels_onnx(
        torch.nn.Sequential(world_model, torch.nn.Softmax(dim=1)), tmp_path / "whole.onnx")))
    assert not whole.supports_features
    onnx_engine = _engine(tmp_path / "onnx", classifier_dir)
    try:
        for classifier in (split, whole):
            onnx_engine.activate(classifier)
            got = onnx_engine.predict(images, top_k=3, return_features=classifier.supports_features)
            np.testing.assert_array_equal(got.class_indices, want.class_indices)
            np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-5)
            if classifier.supports_features:
                np.testing.assert_allclose(got.features, want.features, atol=1e-4)
    finally:
        onnx_engine.close()


def test_an_onnx_model_taking_images_of_another_type_or_pixels_and_a_mean_is_refused_naming_the_key(tmp_path, world_model):
    doubles = _export_pixels_onnx(world_model, tmp_path / "float64.onnx", dtype=torch.float64)
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].path: the input 'images' of .*float64.onnx is tensor\(double\); "
                                             "explaind feeds it float32, float16 or uint8 images$"):
        load_classifier(ClassifierSection(loader="onnx", path=doubles))
    pixels = _export_pixels_onnx(world_model, tmp_path / "uint8.onnx")
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].mean: the input 'images' of .*uint8.onnx takes uint8 pixels \(0-255\), "
                                             "which the graph normalises itself: leave mean and std unset$"):
        load_classifier(ClassifierSection(loader="onnx", path=pixels, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)))


def test_an_onnx_models_input_size_and_layout_are_its_own_and_another_size_or_layout_is_refused_naming_the_key(tmp_path, world_model):
    path = _export_onnx(world_model, tmp_path / "model.onnx")  # (n, 3, 64, 64)
    assert load_classifier(ClassifierSection(loader="onnx", path=path)).image_size == 64  # was 224, failing ONNX Runtime's shape check
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].image_size is 32 but .* takes 64x64 images"):
        load_classifier(ClassifierSection(loader="onnx", path=path, image_size=32))

    class ChannelsLast(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return world_model(images.permute(0, 3, 1, 2))

    channels_last = tmp_path / "channels_last.onnx"
    torch.onnx.export(ChannelsLast().eval(), (torch.rand(2, 64, 64, 3),), str(channels_last), input_names=["images"], dynamo=True, verbose=False)
    images = torch.rand(5, 3, 64, 64)
    loaded = load_classifier(ClassifierSection(loader="onnx", path=str(channels_last)))  # was refused: "(N, 3, S, S), channels first"
    assert loaded.image_size == 64 and loaded.supports_features, loaded.inference_only_reason
    with torch.no_grad():  # its batch is fixed at 2: 5 images run in 3 slices
        np.testing.assert_allclose(loaded.head(loaded.onnx_features(images)).numpy(), world_model(images).numpy(), atol=1e-4)

    class Grey(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return world_model(images.expand(-1, 3, -1, -1))

    grey = tmp_path / "grey.onnx"
    torch.onnx.export(Grey().eval(), (torch.rand(2, 1, 64, 64),), str(grey), input_names=["images"], dynamo=True, verbose=False)
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].path: the input 'images' of .* has shape \[2, 1, 64, 64\]; "
                                             r"explaind feeds it images \(N, 3, S, S\) or \(N, S, S, 3\)$"):
        load_classifier(ClassifierSection(loader="onnx", path=str(grey)))


@pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")  # one Dim for height and width: square images
def test_an_onnx_model_of_dynamic_input_size_is_served_at_224_unless_configured(tmp_path, world_model):
    path = tmp_path / "any_size.onnx"
    side = torch.export.Dim("side", min=16, max=512)
    torch.onnx.export(world_model.eval(), (torch.rand(2, 3, 64, 64),), str(path), input_names=["images"], dynamo=True, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("n"), 2: side, 3: side},))
    # The size it was traced at is not its own: nothing fixes one, so the documented default.
    loaded = load_classifier(ClassifierSection(loader="onnx", path=str(path)))
    assert loaded.image_size == 224 and loaded.supports_features, loaded.inference_only_reason
    assert load_classifier(ClassifierSection(loader="onnx", path=str(path), image_size=96)).image_size == 96


def test_an_onnx_classifier_is_split_on_its_normalised_images(tmp_path, world_model):
    # Its probe compared the whole graph on raw images with the cut one on normalised ones.
    normalisation = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    split = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(world_model, tmp_path / "split.onnx"), **normalisation))
    assert split.supports_features, split.inference_only_reason
    assert split.normalization == (normalisation["mean"], normalisation["std"])
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        want = world_model((images - 0.5) / 0.25)
    torch.testing.assert_close(split.logits(split.features(images)), want, atol=1e-4, rtol=1e-4)


def test_an_onnx_model_whose_first_output_is_not_its_scores_is_refused(tmp_path, world_model):
    class LabelsFirst(torch.nn.Module):  # as many exporters order them: labels, then scores
        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = world_model(images)
            return logits.argmax(dim=1), logits

    path = _export_onnx(LabelsFirst(), tmp_path / "labels_first.onnx")
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].path: .*'s \(first\) output for 2 images is torch.int64 of shape \(2,\), not scores"):
        load_classifier(ClassifierSection(loader="onnx", path=path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_on_a_cuda_device_without_onnxruntime_gpu_only_a_splittable_onnx_model_is_refused(tmp_path, world_model):
    ending_in_softmax = torch.nn.Sequential(world_model, torch.nn.Softmax(dim=1))
    whole = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(ending_in_softmax, tmp_path / "softmax.onnx"), image_size=64),
                            device="cuda")
    assert not whole.supports_features  # served inference-only on the CPU, as before
    with pytest.raises(ModelLoadError, match="needs onnxruntime-gpu"):
        load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(world_model, tmp_path / "split.onnx"), image_size=64), device="cuda")


def test_a_cuda_device_index_past_the_machines_gpus_is_refused_before_serving(monkeypatch):
    from explaind.engine.backends import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda") == torch.device("cuda") and check_device("cuda:0") == torch.device("cuda:0")
    # Else the first .to("cuda:1") failed with "invalid device ordinal", after the server was listening.
    with pytest.raises(FailedPrecondition, match=r"'cuda:1' but this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        check_device("cuda:1")


def test_torchvision_weights_by_name_bring_their_classes_size_and_normalisation(tmp_path, monkeypatch):
    # weights = "DEFAULT" was read as a file next to the config ("weights file not found").
    import torchvision
    from torchvision.models._api import WeightsEnum

    # The download is the one part replaced: its state dict comes from a fresh model.
    downloads = []
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda weights, *a, **k: downloads.append(weights) or torchvision.models.resnet18().state_dict())
    config = tmp_path / "explaind.toml"
    config.write_text('[classifier]\nloader = "torchvision"\nname = "resnet18"\nweights = "DEFAULT"\n')
    section = load_config(config).classifier
    assert section.weights == "DEFAULT"
    version = load_classifier(section)
    assert downloads == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    assert (len(version.class_names), version.class_names[0], version.image_size, version.source) == (1000, "tench", 224, "ResNet18_Weights.IMAGENET1K_V1")
    assert (version.resize_size, version.interpolation) == (256, "bilinear")  # the weights' evaluation transform
    assert version.feature_extractor.preprocess.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    explicit = load_classifier(dataclasses.replace(section, weights="ResNet18_Weights.IMAGENET1K_V1", class_names=tuple(f"c{i}" for i in range(1000)), image_size=64))
    assert (explicit.class_names[0], explicit.image_size, explicit.resize_size) == ("c0", 64, 73)  # 256:224 at 64
    assert load_classifier(dataclasses.replace(section, resize_size=240)).resize_size == 240
    assert load_classifier(dataclasses.replace(section, resize_size=0)).resize_size == 0  # a config may still stretch
    assert load_classifier(dataclasses.replace(section, resize_size=224)).resize_size == 224  # a crop of the whole image fits
    configured = load_classifier(dataclasses.replace(section, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))).feature_extractor.preprocess
    assert (configured.mean.flatten().tolist(), configured.std.flatten().tolist()) == ([0.5] * 3, [0.25] * 3)  # over the weights' own
    larger = load_classifier(dataclasses.replace(section, image_size=288))
    assert (larger.image_size, larger.resize_size) == (288, 329)  # the weights' 256:224, at 288
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].resize_size 200 is below the input size 224: the centre crop would not fit"):
        load_classifier(dataclasses.replace(section, resize_size=200))
    assert load_classifier(dataclasses.replace(section, interpolation="bicubic")).interpolation == "bicubic"
    with monkeypatch.context() as patch:
        patch.setattr(WeightsEnum, "get_state_dict", lambda weights, *a, **k: torchvision.models.efficientnet_b0().state_dict())
        bicubic = load_classifier(ClassifierSection(loader="torchvision", name="efficientnet_b0", weights="DEFAULT", feature_layer="features", head="classifier.1"))
    assert (bicubic.image_size, bicubic.resize_size, bicubic.interpolation) == (224, 256, "bicubic")
    with pytest.raises(ModelLoadError, match=r"\[classifier\].weights 'IMAGENET1K_V9' is neither a file nor a weights name of torchvision's resnet18 \(IMAGENET1K_V1, DEFAULT\)"):
        load_classifier(dataclasses.replace(section, weights="IMAGENET1K_V9"))
    with pytest.raises(ModelLoadError, match=r"\[classifier\].name: torchvision has no model 'resnet19'"):
        load_classifier(dataclasses.replace(section, name="resnet19"))
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda *a, **k: (_ for _ in ()).throw(OSError("Name or service not known")))
    with pytest.raises(ModelLoadError, match=r"cannot get torchvision weights .* so the first start needs the network\): OSError"):
        load_classifier(section)
    (tmp_path / "DEFAULT").write_bytes(b"")  # a file of that name next to the config is a file again
    assert load_config(config).classifier.weights == str(tmp_path / "DEFAULT")
    for relative in ("models/resnet18.pth", "resnet18.pth"):  # paths stay relative to the config, existing or not
        config.write_text(f'[classifier]\nloader = "torchvision"\nname = "resnet18"\nweights = "{relative}"\n')
        assert load_config(config).classifier.weights == str(tmp_path / relative)


def test_an_exported_program_splits_like_the_eager_model_it_came_from(tmp_path, world_model, engine):
    from explaind.errors import ModelLoadError

    path = tmp_path / "world.pt2"
    world_model.eval()
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(world_model, (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},)), str(path))
    section = ClassifierSection(loader="export", path=str(path), image_size=64, feature_layer="layer3", class_names=engine.models.active.class_names)
    version = load_classifier(section)
    eager = engine.models.active
    assert (version.feature_layer, version.head_name, version.feature_dim) == ("layer3", "fc", eager.feature_dim)
    images = torch.rand(5, 3, 64, 64)
    torch.testing.assert_close(version.features(images), eager.features(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(version.feature_maps(images), eager.feature_maps(images), atol=1e-5, rtol=1e-5)
    assert isinstance(version.head, torch.nn.Linear) and version.head_version == eager.head_version  # head edits apply as-is
    config = engine.config.replace("classifier", **dataclasses.asdict(section)).replace("server", data_dir=str(tmp_path / "served"))
    served = Engine(config, SQLiteStore(tmp_path / "served"), Metrics())
    served.load()
    try:
        got, want = served.predict(images, top_k=6, return_features=True), engine.predict(images, top_k=6, return_features=True)
        np.testing.assert_array_equal(got.class_indices, want.class_indices)
        np.testing.assert_allclose(got.features, want.features, atol=1e-5)
    finally:
        served.close()

    static = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(world_model, (torch.rand(2, 3, 64, 64),)), str(static))
    with pytest.raises(ModelLoadError, match=r"static.pt2: the program does not run on \(1 \| 3, 3, 64, 64\) images .* dynamic batch"):
        load_classifier(dataclasses.replace(section, path=str(static)))
    training = tmp_path / "training.pt2"
    torch.export.save(torch.export.export(copy.deepcopy(world_model).train(), (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},)), str(training))
    with pytest.raises(ModelLoadError, match=r"training.pt2: an image's output depends on the rest of its batch; .* model.eval\(\)"):
        load_classifier(dataclasses.replace(section, path=str(training)))
    with pytest.raises(ModelLoadError, match=r"head 'layer3' has parameters \{\}, not a linear layer's weight \(C, D\) and bias: .* inference-only"):
        load_classifier(dataclasses.replace(section, head="layer3"))
    with pytest.raises(ModelLoadError, match=r"no module named 'classifier' for \[classifier\].head"):
        load_classifier(dataclasses.replace(section, head="classifier"))

    class Doubled(torch.nn.Linear):  # a head with a linear layer's parameters that is not one
        def forward(self, features):
            return 2 * super().forward(features)

    doubled_head = torch.nn.Sequential()
    doubled_head.layer4 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    doubled_head.fc = Doubled(4, 2)
    doubled = tmp_path / "doubled.pt2"
    torch.export.save(torch.export.export(doubled_head.eval(), (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: batch},)), str(doubled))
    with pytest.raises(ModelLoadError, match=r"doubled.pt2: head 'fc' is not a plain linear layer"):
        load_classifier(ClassifierSection(loader="export", path=str(doubled), image_size=16))


def test_a_head_without_bias_gets_a_zero_one_so_edits_and_versions_work(tmp_path):
    from explaind.engine.models import split_classifier
    from explaind.engine.neuroinspect import NeuroInspectEngine

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.layer4 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model.fc = torch.nn.Linear(4, 2, bias=False)
    images = torch.rand(3, 3, 16, 16)
    expected = model(images)
    version = split_classifier(model, name="tiny", loader="factory", source="tiny", feature_layer="layer4", head="fc",
                               class_names=("a", "b"), image_size=16, preprocess=Preprocess())
    assert version.head.bias is not None and not version.head.bias.any()
    torch.testing.assert_close(version.logits(version.features(images)), expected)
    engine = Engine(default_config().replace("server", data_dir=str(tmp_path)), SQLiteStore(tmp_path), Metrics())
    engine.activate(version)
    inspect = NeuroInspectEngine(engine)
    inspect.restore()  # stores v0: its weights and bias are serialised
    assert [r.version_id for r in inspect.head_versions()[0]] == ["v0"]
    engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_exported_program_with_baked_in_devices_is_placed_on_the_gpu(tmp_path):
    class WithConstants(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.full((1, 3, 1, 1), 0.5), persistent=False)  # a lifted constant
            self.layer4 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, images):
            features = self.layer4(images * self.scale) + torch.ones(images.shape[0], 4, device=images.device)  # device baked in
            return self.fc(features)

    path = tmp_path / "constants.pt2"
    model = WithConstants().eval()
    torch.export.save(torch.export.export(model, (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    version = load_classifier(ClassifierSection(loader="export", path=str(path), image_size=16), device="cuda")
    images = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(version.logits(version.features(images.cuda())).cpu(), model(images), atol=1e-4, rtol=1e-4)


def test_an_onnx_classifier_is_split_into_features_and_head_or_else_served_inference_only(tmp_path, classifier_dir, world_model, engine):
    images = torch.rand(3, 3, 64, 64)
    want = engine.predict(images, top_k=6, return_features=True)
    onnx_engine = _engine(tmp_path / "onnx", classifier_dir)
    split = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(world_model, tmp_path / "world.onnx"), image_size=64))
    assert split.supports_features and not split.differentiable and split.feature_dim == world_model.fc.in_features
    onnx_engine.activate(split)
    got = onnx_engine.predict(images, top_k=6, return_features=True)
    np.testing.assert_array_equal(got.class_indices, want.class_indices)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-4)
    np.testing.assert_allclose(got.features, want.features, atol=1e-4)
    assert onnx_engine.runtime(split) == ("onnxruntime", "cpu")

    # A graph that ends in a softmax has no linear layer to split at: predictions only,
    # with its own probabilities (not flattened by a second softmax).
    ending_in_softmax = torch.nn.Sequential(world_model, torch.nn.Softmax(dim=1)).eval()
    whole = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(ending_in_softmax, tmp_path / "softmax.onnx"), image_size=64))
    assert not whole.supports_features
    onnx_engine.activate(whole)
    got = onnx_engine.predict(images, top_k=6)
    np.testing.assert_array_equal(got.class_indices, want.class_indices)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-4)
    with pytest.raises(FailedPrecondition, match="inference-only, and features need a split classifier: its graph could not be split before a "
                                                 "final linear layer: its logits come from a Softmax node"):
        onnx_engine.predict(images, return_features=True)
    # [runtime].device names where split classifiers run; an inference-only ONNX Runtime CPU
    # session takes CPU tensors whatever it says (any non-CPU device would fail the same way as meta).
    onnx_engine.device = torch.device("meta")
    np.testing.assert_array_equal(onnx_engine.predict(images, top_k=6).class_indices, want.class_indices)
    assert onnx_engine.runtime(whole) == ("onnxruntime", "cpu")
    onnx_engine.close()


def test_an_onnx_classifier_whose_cut_head_does_not_give_its_logits_is_served_inference_only(tmp_path, world_model, monkeypatch):
    # Whatever the cut misreads (here its head's bias), the probe finds it: that head would
    # rank and edit logits the graph does not give.
    from explaind.engine import models

    cut = models.split_onnx_classifier

    def misread(path):
        split = cut(path)
        return dataclasses.replace(split, bias=split.bias + torch.arange(len(split.bias)))

    monkeypatch.setattr(models, "split_onnx_classifier", misread)
    version = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(world_model, tmp_path / "world.onnx"), image_size=64))
    assert not version.supports_features
    assert version.inference_only_reason == ("its graph could not be split before a final linear layer: its final linear layer, "
                                             "applied to the features before it, does not give its logits")


def test_an_onnx_classifier_with_non_finite_logits_for_the_probe_images_says_so_as_why_it_is_not_split_and_one_with_a_nan_head_is_refused(tmp_path):
    # NaN equals nothing: both were said to be a final linear layer that does not give the
    # graph's logits. The overflowing graph may still serve images it does not overflow on;
    # a NaN in the head makes every prediction NaN, and was served so, inference-only.
    section = ClassifierSection(loader="onnx", path=_export_onnx(_Overflowing(), tmp_path / "overflowing.onnx"), image_size=64)
    assert load_classifier(section).inference_only_reason == ("its graph could not be split before a final linear layer: its logits for the 2 "
                                                              "random images the split is checked on are NaN or infinite (a float16 overflow, "
                                                              "a division by zero?)")
    nan_bias = _export_onnx(non_finite_net("bias"), tmp_path / "nan_bias.onnx")
    with pytest.raises(ModelLoadError, match=f"^{re.escape(f'[classifier].path: {nan_bias}: head ')}'.+' has NaN or infinite weights, which would "
                                             "make every prediction NaN; its training diverged or the file is damaged$"):
        load_classifier(dataclasses.replace(section, path=nan_bias))


def test_an_onnx_classifier_whose_final_linear_layer_rules_out_a_class_with_a_minus_infinite_bias_is_served_inference_only(tmp_path):
    # A logit of -inf is a class the model rules out: the graph's predictions are of use.
    # Start-up was refused, its head said to have "NaN or infinite weights, which would make
    # every prediction NaN"; rankings and head edits need a finite head, so it is not cut.
    masking = tiny_net().eval()
    with torch.no_grad():
        masking.fc.bias[2] = -math.inf
    version = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(masking, tmp_path / "masking.onnx"), image_size=64))
    assert version.inference_only_reason == ("its graph could not be split before a final linear layer: its final linear layer's bias is "
                                             "-infinity for some classes (it rules them out), and rankings and head edits need a finite head")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = masking(images)
    assert torch.isneginf(version.predict_fn(images)[:, 2]).all()
    torch.testing.assert_close(version.predict_fn(images)[:, :2], expected[:, :2], rtol=1e-4, atol=1e-5)


def test_why_an_onnx_classifier_is_not_split_tells_callers_nothing_of_the_server(tmp_path, world_model, monkeypatch):
    # The reason goes into every refusal's message: another error's text (e.g. a missing
    # external-data file) can name server paths, which only the log may show.
    from explaind.engine import models

    def failing(path):
        raise OSError(f"cannot read {path}.data")

    monkeypatch.setattr(models, "split_onnx_classifier", failing)
    path = _export_onnx(world_model, tmp_path / "world.onnx")
    version = load_classifier(ClassifierSection(loader="onnx", path=path, image_size=64))
    assert version.inference_only_reason == "its graph could not be split before a final linear layer: OSError (the server log says more)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_onnx_classifier_computes_its_features_on_the_gpu(tmp_path, world_model):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    version = load_classifier(ClassifierSection(loader="onnx", path=_export_onnx(world_model, tmp_path / "world.onnx"), image_size=64), device="cuda")
    images = torch.rand(5, 3, 64, 64)
    features = version.features(images.cuda())
    assert features.is_cuda and version.supports_features
    with torch.no_grad():
        torch.testing.assert_close(version.logits(features.cpu()), world_model(images), atol=1e-4, rtol=1e-4)


def test_the_compile_backend_serves_every_batch_size_and_thread_without_tracing_again(tmp_path, classifier_dir, engine, monkeypatch):
    # Warmed on one batch of 2, torch.compile traced again for the first batch of 1 and of
    # 16 or more: 12 s on the CPU for the first single-image Predict after a start. Warmed in
    # the thread that loads the model, it traced again in the batcher's and the jobs' threads:
    # h_b's feature-layer hook read a thread-local, which dynamo guarded on. Dynamo alone
    # decides when to trace again, so a backend that counts its graphs and runs them eagerly
    # stands in (dynamo's error_on_recompile is thread-local: it never reached the batcher).
    import functools

    graphs = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    torch._dynamo.reset()
    compiled = _engine(tmp_path / "compiled", classifier_dir, backend="compile")
    try:
        warmed = len(graphs)
        most = max(compiled.config.batching.max_batch_size, compiled.config.jobs.evaluate_batch_size)
        for batch_size in (1, 3, 15, 16, 17, 31, most):
            images = torch.rand(batch_size, 3, 64, 64)
            got = compiled.predict(images, top_k=1, return_features=True)
            want = engine.predict(images, top_k=1, return_features=True)
            np.testing.assert_allclose(got.features, want.features, atol=1e-4)
        compiled.models.active.feature_maps(torch.rand(2, 3, 64, 64))  # arms the hook in this thread, as ranking does in a job's
        rng = np.random.default_rng(0)
        compiled.create_sample_set("jobs", "", [NewSample.from_array(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), i % 6) for i in range(20)])
        assert compiled.jobs.wait(compiled.evaluate_sample_set("jobs").record.job_id, 60).record.state == "succeeded"
        assert len(graphs) == warmed
    finally:
        compiled.close()
        torch._dynamo.reset()


def test_onnxruntime_backend_matches_eager_on_the_configured_threads(tmp_path, classifier_dir, engine, monkeypatch):
    import onnxruntime

    session_threads = []
    real_session = onnxruntime.InferenceSession

    def recording_session(path, sess_options=None, **kwargs):
        session_threads.append(sess_options.intra_op_num_threads)
        return real_session(path, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    with torch_threads(2):  # the engine sets them process-wide: from these 2 to the 1 configured
        ort_engine = _engine(tmp_path / "ort", classifier_dir, backend="onnxruntime", num_threads=1)
        assert torch.get_num_threads() == 1
    assert session_threads == [1]  # [runtime].num_threads caps ONNX Runtime too
    images = torch.rand(6, 3, 64, 64)
    got = ort_engine.predict(images, top_k=6, return_features=True)
    want = engine.predict(images, top_k=6, return_features=True)
    np.testing.assert_allclose(got.features, want.features, atol=1e-4)
    np.testing.assert_array_equal(got.class_indices, want.class_indices)
    assert any((tmp_path / "ort" / "data" / "compiled").glob("features-*.onnx"))
    ort_engine.close()
    ort_engine.store.close()
    # A restart at another input size exports again: the cached graph's height and width are fixed.
    config = ort_engine.config.replace("classifier", image_size=48)
    smaller = Engine(config, SQLiteStore(tmp_path / "ort" / "data"), Metrics())
    smaller.load()
    assert smaller.predict(torch.rand(2, 3, 48, 48), top_k=1, return_features=True).features.shape == (2, 128)
    assert len(list((tmp_path / "ort" / "data" / "compiled").glob("features-*.onnx"))) == 2
    smaller.close()
    smaller.store.close()
    # So does one with another h_b at the same size (here its normalisation): the cached graph computes the old one's.
    config = ort_engine.config.replace("classifier", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    normalised = Engine(config, SQLiteStore(tmp_path / "ort" / "data"), Metrics())
    normalised.load()
    images = torch.rand(2, 3, 64, 64)
    got = normalised.predict(images, top_k=1, return_features=True).features
    np.testing.assert_allclose(got, normalised.models.active.features(images).numpy(), atol=1e-4)
    assert len(list((tmp_path / "ort" / "data" / "compiled").glob("features-*.onnx"))) == 3
    normalised.close()
    normalised.store.close()



def test_the_tensorrt_backend_builds_each_exported_graphs_engines_in_a_folder_of_its_name(tmp_path, engine, monkeypatch):
    """With ONNX Runtime's CPU provider standing in for TensorRT's (no GPU here): the engine
    folder TensorRT is given is per exported graph, so per model version and input size."""
    from explaind.engine import backends

    asked, cpu_providers = [], backends.execution_providers("onnxruntime", "cpu")

    def cpu_in_place_of_tensorrt(backend, device, **options):
        asked.append((backend, device, options))
        return cpu_providers

    monkeypatch.setattr(backends, "execution_providers", cpu_in_place_of_tensorrt)
    version = engine.models.active
    features = backends.build_feature_fn(version, "tensorrt", "cpu", tmp_path, num_threads=1, max_batch_size=4)
    (graph,) = tmp_path.glob("features-*.onnx")
    assert asked == [("tensorrt", "cpu", {"image_size": version.image_size, "max_batch_size": 4,
                                          "engine_cache_dir": tmp_path / f"{graph.stem}.tensorrt"})]
    images = torch.rand(10, 3, version.image_size, version.image_size)
    torch.testing.assert_close(features(images), version.features(images), atol=1e-4, rtol=1e-4)


def test_an_onnx_classifier_runs_its_sessions_on_the_configured_threads(tmp_path, world_model, monkeypatch):
    import onnxruntime

    session_threads = []
    real_session = onnxruntime.InferenceSession

    def recording_session(path, sess_options=None, **kwargs):
        session_threads.append(None if sess_options is None else sess_options.intra_op_num_threads)
        return real_session(path, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    classifier = ClassifierSection(loader="onnx", path=_export_onnx(world_model, tmp_path / "model.onnx"), image_size=64)
    config = default_config().replace("classifier", **dataclasses.asdict(classifier)).replace("server", data_dir=str(tmp_path / "data"))
    engine = Engine(config.replace("runtime", num_threads=1), SQLiteStore(tmp_path / "data"), Metrics())
    with torch_threads():  # the engine sets them process-wide
        engine.load()
    assert engine.models.active.supports_features
    assert session_threads == [1, 1]  # the whole graph's session and the cut feature graph's: [runtime].num_threads caps both
    engine.close()
    engine.store.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
@pytest.mark.parametrize("runtime", [{"device": "cuda"}, {"backend": "tensorrt", "device": "cuda"}])
def test_gpu_only_settings_fail_clearly_without_cuda(tmp_path, classifier_dir, runtime):
    with pytest.raises(FailedPrecondition, match="CUDA"):
        _engine(tmp_path, classifier_dir, **runtime)
    assert not list(tmp_path.rglob("*.onnx"))  # it fails before exporting anything


def test_feature_cache_is_per_feature_version(engine):
    rng = np.random.default_rng(0)
    samples = [NewSample.from_array(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), i % 6) for i in range(10)]
    engine.create_sample_set("cached", "", samples)
    hits = engine.metrics.feature_cache_hits._value.get()
    first = engine.sample_set_features("cached")
    assert engine.metrics.feature_cache_hits._value.get() == hits  # all ten computed: none was a hit
    again = engine.sample_set_features("cached")
    assert engine.metrics.feature_cache_hits._value.get() == hits + 10
    torch.testing.assert_close(first.features, again.features)
    version = engine.models.active
    engine.activate(version.with_head(_constant_head(2)))  # head edit: cached features stay valid
    assert len(engine.store.get_features(version.feature_cache_key, first.digests)) == 10
    cropped = dataclasses.replace(version, resize_size=80)  # same h_b, images fitted otherwise: other features
    assert cropped.feature_version == version.feature_version and cropped.feature_cache_key != version.feature_cache_key
    assert dataclasses.replace(version, image_size=48).feature_cache_key != version.feature_cache_key  # features at another size
    engine.activate(cropped)
    assert engine.store.get_features(version.feature_cache_key, first.digests) == {}
    assert not torch.allclose(engine.sample_set_features("cached").features, first.features)
    engine.activate(version)
    torch.testing.assert_close(engine.sample_set_features("cached").features, first.features)
    changed = version.feature_extractor
    with torch.no_grad():
        changed.trunk.stem[0].weight.mul_(0.5)
    from explaind.engine.models import _hash_module

    new_version = dataclasses.replace(version, feature_version=_hash_module(changed))
    engine.activate(new_version)  # new feature extractor: the old cache is dropped
    assert engine.store.get_features(version.feature_cache_key, first.digests) == {}
    recomputed = engine.sample_set_features("cached")
    assert not torch.allclose(recomputed.features, first.features)


def test_features_an_earlier_release_cached_from_differently_decoded_pixels_are_not_reused(engine):
    # The cache is keyed by an image's bytes; the release before EXIF Orientation turned a
    # file's pixels cached a phone's photo's features computed sideways, under the key below.
    # Reused, an evaluation saw it sideways while Predict on the same file saw it upright.
    import hashlib

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG", exif=exif)
    engine.create_sample_set("photos", "", [NewSample(buffer.getvalue(), 1)])
    version = engine.models.active
    digest = engine.store.list_samples("photos")[0].digest
    earlier_key = hashlib.sha256(f"{version.feature_version}:{version.input_geometry}".encode()).hexdigest()
    engine.store.put_features(earlier_key, {digest: np.full(version.feature_dim, 7.0, dtype=np.float32)})
    upright = version.features(engine.load_sample_image(digest)[None].to(engine.device))
    torch.testing.assert_close(engine.sample_set_features("photos").features, upright)


def test_features_of_a_jpeg_decoded_at_a_reduced_scale_are_cached_apart_and_are_those_predict_computes(engine):
    # [classifier].jpeg_reduced_decode moves a JPEG's pixels slightly: features cached with
    # one setting must not serve the other, and an evaluation must see what Predict sees.
    from explaind.service.convert import decode_image
    from explaind.v1 import common_pb2

    rows, columns = np.mgrid[0:288, 0:320]  # at least twice 2 x 64 a side: decoded at 1/2
    buffer = io.BytesIO()
    Image.fromarray(np.stack([columns % 256, rows % 256, (rows + columns) % 256], axis=-1).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    engine.create_sample_set("photos", "", [NewSample(buffer.getvalue(), 1)])
    version = engine.models.active
    reduced = load_classifier(dataclasses.replace(default_config().classifier, jpeg_reduced_decode=True))
    assert reduced.input_geometry == dataclasses.replace(version.input_geometry, jpeg_reduced_decode=True)
    assert reduced.feature_version == version.feature_version and reduced.feature_cache_key != version.feature_cache_key
    # Off, the key is the one releases before the option made: their cached features stay in use.
    earlier = f"InputGeometry(size={version.image_size}, resize_size={version.resize_size}, interpolation={version.interpolation!r})"
    assert version.feature_cache_key == hashlib.sha256(f"{version.feature_version}:{earlier}:decoding {DECODING_VERSION}".encode()).hexdigest()
    whole = engine.sample_set_features("photos").features
    engine.activate(reduced)
    predicted = reduced.features(decode_image(common_pb2.Image(encoded=buffer.getvalue()), field="images[0]",
                                              geometry=engine.models.active.input_geometry)[None].to(engine.device))
    evaluated = engine.sample_set_features("photos").features
    torch.testing.assert_close(evaluated, predicted)
    assert not torch.allclose(evaluated, whole)


def test_an_uploaded_jpeg_is_checked_at_the_scale_the_served_classifier_decodes_it(engine, monkeypatch):
    # With [classifier].jpeg_reduced_decode the upload check still decoded a JPEG whole:
    # 73-99 ms for 12 MP, against 27 ms reduced (bench/jpeg_reduced_decode.py), which refuses
    # the same damaged files (test_service_imaging).
    from explaind.service import convert
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    rows, columns = np.mgrid[0:288, 0:320]  # at least twice 2 x 64 a side: decoded at 1/2
    buffer = io.BytesIO()
    Image.fromarray(np.stack([columns % 256, rows % 256, (rows + columns) % 256], axis=-1).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    photo = buffer.getvalue()
    decoded: list[tuple[int, ...]] = []
    decode_pixels = convert.decode_pixels

    def recording_decode(*args, **kwargs) -> np.ndarray:
        pixels = decode_pixels(*args, **kwargs)
        decoded.append(pixels.shape)
        return pixels

    monkeypatch.setattr(convert, "decode_pixels", recording_decode)
    servicer = SampleSetServicer(engine)

    def upload(sample_set_id: str, data: bytes) -> None:
        sample = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=data), label=1)
        servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id=sample_set_id, samples=[sample]), _CallerWaits())

    upload("whole", photo)
    engine.activate(dataclasses.replace(engine.models.active, jpeg_reduced_decode=True))
    upload("reduced", photo)
    assert decoded == [(288, 320, 3), (144, 160, 3)]
    with pytest.raises(InvalidArgument, match="image file is truncated") as refused:
        upload("truncated", photo[:len(photo) * 2 // 3])
    assert refused.value.field == "samples[0].image.encoded"
    assert [info.sample_set_id for info in engine.store.list_sample_sets()] == ["whole", "reduced"]


def test_features_of_jpeg_files_reduced_to_another_side_are_cached_apart(engine, monkeypatch):
    # How far a JPEG is reduced (JPEG_REDUCED_DECODE_MARGIN times the fitted side) moves its
    # pixels: a release that changes the margin must not serve features cached at the old one.
    from explaind import imaging

    reduced = dataclasses.replace(engine.models.active, jpeg_reduced_decode=True)
    key, side = reduced.feature_cache_key, reduced.input_geometry.jpeg_min_side
    monkeypatch.setattr(imaging, "JPEG_REDUCED_DECODE_MARGIN", imaging.JPEG_REDUCED_DECODE_MARGIN + 1)
    wider = dataclasses.replace(reduced)  # the same model and geometry, its key made afresh
    assert wider.input_geometry == reduced.input_geometry and wider.input_geometry.jpeg_min_side > side
    assert wider.feature_cache_key != key


def test_features_an_earlier_release_cached_are_dropped_at_the_first_start(tmp_path, classifier_dir):
    # Keyed by what they depend on, an earlier release's rows are never read again: left,
    # they filled the data dir with every upgrade (a classifier change drops them, a head
    # edit does not), so the start drops the rows of every other key.
    import hashlib

    engine = _engine(tmp_path, classifier_dir)
    version = engine.models.active
    digest = _digest(b"a stored image")
    earlier_key = hashlib.sha256(f"{version.feature_version}:{version.input_geometry}".encode()).hexdigest()
    vector = np.ones(version.feature_dim, dtype=np.float32)
    engine.store.put_features(earlier_key, {digest: vector})
    engine.store.put_features(version.feature_cache_key, {digest: vector})
    engine.close()
    engine.store.close()
    restarted = _engine(tmp_path, classifier_dir)
    try:
        assert restarted.store.get_features(earlier_key, [digest]) == {}
        assert list(restarted.store.get_features(version.feature_cache_key, [digest])) == [digest]  # this release's kept
    finally:
        restarted.close()


def test_cached_features_are_all_found_however_many_are_asked_for_at_once(tmp_path):
    # The store reads them in chunks of 500 (SQLite's bound on a statement's parameters):
    # one lost at a chunk's edge is computed again for every evaluation of a large set.
    store = SQLiteStore(tmp_path)
    digests = [f"{index:064x}" for index in range(1001)]
    store.put_features("v", {digest: np.full(2, index, np.float32) for index, digest in enumerate(digests)})
    found = store.get_features("v", [*digests, digests[0]])  # one asked for twice
    assert sorted(found) == digests and all(found[digest].tolist() == [index, index] for index, digest in enumerate(digests))
    assert store.get_features("other version", digests) == {}
    store.close()


def test_a_set_holding_one_image_several_times_computes_its_features_once(engine):
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    engine.create_sample_set("repeats", "", [NewSample.from_array(p, 0) for p in (a, b, a, a)])
    misses = engine.metrics.feature_cache_misses._value.get()
    features = engine.sample_set_features("repeats").features
    assert engine.metrics.feature_cache_misses._value.get() == misses + 2  # two distinct images, not four
    assert torch.equal(features[0], features[2]) and torch.equal(features[0], features[3])
    # Stored images are fitted to the version a job was given, not whichever is active by then.
    other_size = dataclasses.replace(engine.models.active, image_size=48)
    assert engine.load_sample_image(engine.store.list_samples("repeats")[0].digest, other_size).shape == (3, 48, 48)


def test_a_set_holding_one_image_several_times_is_classified_once_per_image_by_an_inference_only_model(engine):
    # An inference-only model caches nothing: each image is decoded and classified where
    # the set holds it once, and its logits given to every sample holding it.
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    engine.create_sample_set("repeats-whole", "", [NewSample.from_array(p, i) for i, p in enumerate((a, b, a, a))])
    split, classified = engine.models.active, []
    whole = dataclasses.replace(split, feature_extractor=None, head=None,
                                predict_fn=lambda images: classified.append(len(images)) or split.logits(split.features(images)))
    logits, labels, digests = engine.sample_set_logits("repeats-whole", version=whole)
    assert sum(classified) == 2 and labels.tolist() == [0, 1, 2, 3] and len(set(digests)) == 2
    assert torch.equal(logits[0], logits[2]) and torch.equal(logits[0], logits[3]) and not torch.equal(logits[0], logits[1])


def test_a_set_s_cached_features_are_read_a_chunk_at_a_time_into_one_array(engine, monkeypatch):
    # All of them read at once and then stacked were twice a set's features: 1.6 GB for
    # 100,000 samples of D = 2048.
    from explaind.engine import core

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(7)]
    engine.create_sample_set("chunked", "", [NewSample.from_array(images[i % 7], 0) for i in range(9)])  # two images twice
    whole = engine.sample_set_features("chunked").features  # computes and caches the seven
    asked: list[int] = []
    get_features = engine.store.get_features
    monkeypatch.setattr(engine.store, "get_features", lambda version, digests: asked.append(len(digests)) or get_features(version, digests))
    monkeypatch.setattr(core, "FEATURE_READ_ROWS", 3)
    hits = engine.metrics.feature_cache_hits._value.get()
    chunked = engine.sample_set_features("chunked").features
    assert asked == [3, 3, 1] and engine.metrics.feature_cache_hits._value.get() == hits + 9
    assert torch.equal(chunked, whole) and torch.equal(chunked[7], chunked[0]) and torch.equal(chunked[8], chunked[1])


def _rows_cached(engine, monkeypatch) -> list[np.ndarray]:
    """The feature rows the engine caches from now on, as it hands them to the store."""
    cached: list[np.ndarray] = []
    put_features = engine.store.put_features

    def recording(version: str, features: dict[str, np.ndarray]) -> bool:
        cached.extend(features.values())
        return put_features(version, features)

    monkeypatch.setattr(engine.store, "put_features", recording)
    return cached


def test_a_set_never_seen_is_computed_straight_into_the_array_its_features_come_back_in(engine, monkeypatch):
    # The computed rows had an array of their own beside the set's: twice its features while
    # a new set's were computed. Where some are cached or repeated, they are copied over.
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(7)]
    computed = _rows_cached(engine, monkeypatch)
    engine.create_sample_set("fresh", "", [NewSample.from_array(image, 0) for image in images[:5]])
    fresh = engine.sample_set_features("fresh", batch_size=2).features
    assert len(computed) == 5 and all(np.shares_memory(row, fresh.numpy()) for row in computed)
    computed.clear()
    engine.create_sample_set("partly", "", [NewSample.from_array(image, 0) for image in (images[5], images[0], images[6], images[5])])
    partly = engine.sample_set_features("partly", batch_size=2).features
    assert len(computed) == 2 and not any(np.shares_memory(row, partly.numpy()) for row in computed)
    assert torch.equal(partly[1], fresh[0]) and torch.equal(partly[3], partly[0])
    torch.testing.assert_close(partly[[0, 2]], torch.from_numpy(np.stack(computed)))


def test_a_jobs_logits_are_those_of_the_set_as_it_was_submitted_not_of_samples_appended_since(engine):
    # An evaluation reads the first ``count`` samples, the set it was submitted for, whether
    # the classifier is split (logits from cached features) or inference-only (the whole model).
    rng = np.random.default_rng(3)
    samples = [NewSample.from_array(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), i % 6) for i in range(5)]
    uid = engine.create_sample_set("grown", "", samples[:3]).uid
    engine.append_samples("grown", samples[3:])
    split = engine.models.active
    whole = dataclasses.replace(split, feature_extractor=None, head=None, predict_fn=lambda images: split.logits(split.features(images)))
    every_logits, every_label, every_digest = engine.sample_set_logits("grown", version=split)
    assert len(every_digest) == 5
    for version in (split, whole):
        logits, labels, digests = engine.sample_set_logits("grown", version=version, uid=uid, count=3)
        assert digests == every_digest[:3] and labels.tolist() == [0, 1, 2]
        torch.testing.assert_close(logits, every_logits[:3])
    # Labels are made on the host, as the logits are, whatever torch's default device (a
    # GPU default put them beside CPU logits).
    with default_device_meta():
        labelled = [engine.sample_set_logits("grown", version=version)[1] for version in (split, whole)] + [engine.sample_set_features("grown").labels]
    assert [labels.device.type for labels in labelled] == ["cpu"] * 3


def test_a_stored_image_that_does_not_decode_now_is_refused_naming_the_samples_holding_it_the_first_ten(engine, monkeypatch):
    # The error named the image (field "sample <digest12>") and no sample: a set may hold
    # it several times, and its owner could not tell which samples to replace. Split
    # (features) and inference-only (the whole model's logits) read the set's images alike.
    from explaind import imaging

    rng = np.random.default_rng(5)
    wide, narrow = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    samples = [NewSample.from_array(narrow if row == 5 else wide, row % 6) for row in range(12)]
    engine.create_sample_set("widened", "", samples)
    digest = engine.store.list_samples("widened")[0].digest
    monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)  # a server stricter than the one it was uploaded to
    split = engine.models.active
    whole = dataclasses.replace(split, feature_extractor=None, head=None, predict_fn=lambda images: split.logits(split.features(images)))
    for version in (split, whole):
        with pytest.raises(FailedPrecondition) as refused:
            engine.sample_set_logits("widened", version=version)
        assert str(refused.value) == (f"sample_set_id: the image {digest[:12]} of 11 samples of sample set 'widened' (sample_index 0, 1, 2, 3, 4, "
                                      "6, 7, 8, 9, 10 and 1 more) does not decode now: image is 32x32; the largest side allowed is 24; "
                                      "use a set without them")
        assert refused.value.violations == tuple(("UNDECODABLE_IMAGE", f"samples[{row}]") for row in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10))
    # Asked for under another field, the error names that one.
    with pytest.raises(FailedPrecondition, match=r"^validation_sample_set_id: the image .* \(sample_index 0, 1, 2, 3, 4, 6, 7, 8, 9, 10 and 1 more\)"):
        engine.sample_set_features("widened", field="validation_sample_set_id")
    # One sample holding it: said in the singular.
    engine.create_sample_set("widened-once", "", [NewSample.from_array(narrow, 0), NewSample.from_array(wide, 1)])
    with pytest.raises(FailedPrecondition) as refused:
        engine.sample_set_features("widened-once")
    assert str(refused.value) == (f"sample_set_id: the image {digest[:12]} of 1 sample of sample set 'widened-once' (sample_index 1) "
                                  "does not decode now: image is 32x32; the largest side allowed is 24; use a set without it")


def test_a_read_bound_to_fail_on_an_image_that_does_not_decode_now_reports_its_progress_to_the_end(engine, monkeypatch):
    # Past a batch holding such an image, the read decodes the rest (the model idle) to name
    # them all: its job's progress counts those batches too, not stuck where the first was.
    from explaind import imaging

    rng = np.random.default_rng(9)
    engine.create_sample_set("wide-first", "", [NewSample.from_array(rng.integers(0, 256, (32, 32, 3) if row == 0 else (16, 16, 3), dtype=np.uint8), 0)
                                                for row in range(6)])
    monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)
    split = engine.models.active
    whole = dataclasses.replace(split, feature_extractor=None, head=None, predict_fn=lambda images: split.logits(split.features(images)))
    context = _EvaluationContext()
    with pytest.raises(FailedPrecondition, match=r"of 1 sample of sample set 'wide-first' \(sample_index 0\) does not decode now"):
        engine.sample_set_logits("wide-first", version=whole, batch_size=2, context=context)
    assert [step for step, _, _ in context.progress] == [0, 2, 4]


def test_a_read_names_every_stored_image_that_does_not_decode_now_not_only_the_first(engine, monkeypatch):
    # Only the first image a read failed on was named: the others showed on the next run,
    # so a set's owner replaced its images one a run. Each is named with its first three
    # samples and its refusal, the violations list the first ten samples of them all, and
    # the model runs on no batch once the read is bound to fail (the first is in batch 0).
    from explaind import imaging

    rng = np.random.default_rng(6)
    narrow = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    wide = {side: rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for side in (32, 30, 28)}
    side_of_row = {1: 32, 4: 32, 9: 32, 12: 32, 13: 32, 2: 30, 7: 28}
    samples = [NewSample.from_array(wide[side_of_row[row]] if row in side_of_row else narrow, row % 6) for row in range(14)]
    engine.create_sample_set("several", "", samples)
    digests = [record.digest for record in engine.store.list_samples("several")]
    engine.create_sample_set("many", "", [NewSample.from_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 0) for _ in range(13)])
    monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)
    split = engine.models.active
    batches = []
    whole = dataclasses.replace(split, feature_extractor=None, head=None,
                                predict_fn=lambda images: batches.append(len(images)) or split.logits(split.features(images)))
    for version in (split, whole):
        with pytest.raises(FailedPrecondition) as refused:
            engine.sample_set_logits("several", version=version, batch_size=2)
        assert str(refused.value) == (
            f"sample_set_id: 3 images of 7 samples of sample set 'several' do not decode now; use a set without them: "
            f"[{digests[1][:12]}, sample_index 1, 4, 9 and 2 more: image is 32x32; the largest side allowed is 24], "
            f"[{digests[2][:12]}, sample_index 2: image is 30x30; the largest side allowed is 24], "
            f"[{digests[7][:12]}, sample_index 7: image is 28x28; the largest side allowed is 24]")
        assert refused.value.violations == tuple(("UNDECODABLE_IMAGE", f"samples[{row}]") for row in (1, 2, 4, 7, 9, 12, 13))
    assert batches == []
    # An evaluation's mistakes grid (its features cached, the set classified undecoded) alike.
    with pytest.raises(FailedPrecondition) as drawn, engine.reading_images_of("several", "sample_set_id", rows_by_digest(digests)):
        engine.sample_grid([digests[row] for row in (0, 7, 1, 2, 1)])
    assert str(drawn.value) == str(refused.value) and drawn.value.violations == refused.value.violations
    # Past ten images, the rest are counted; past ten samples, the violations stop.
    with pytest.raises(FailedPrecondition, match=r"^sample_set_id: 13 images of 13 samples .*, \[[0-9a-f]{12}, sample_index 9: [^]]*\] "
                                                 r"and 3 more images$") as refused:
        engine.sample_set_features("many", batch_size=4)
    assert str(refused.value).count("[") == 10
    assert refused.value.violations == tuple(("UNDECODABLE_IMAGE", f"samples[{row}]") for row in range(10))


def test_a_read_past_ten_stored_images_that_do_not_decode_counts_the_rest_in_the_singular_for_one(engine, monkeypatch):
    # Eleven such images said "and 1 more images"; ten name them all and count none.
    from explaind import imaging

    rng = np.random.default_rng(7)
    for count in (10, 11):
        engine.create_sample_set(f"wide{count}", "", [NewSample.from_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 0)
                                                      for _ in range(count)])
    monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)
    with pytest.raises(FailedPrecondition, match=r"^sample_set_id: 10 images of 10 samples .*; use a set without them: .*sample_index 9: [^]]*\]$"):
        engine.sample_set_features("wide10")
    with pytest.raises(FailedPrecondition, match=r"^sample_set_id: 11 images of 11 samples .*sample_index 9: [^]]*\] "
                                                 r"and 1 more image$") as refused:
        engine.sample_set_features("wide11")
    assert str(refused.value).count("[") == 10 and len(refused.value.violations) == 10


def test_a_mistakes_grid_looking_for_more_stored_images_that_do_not_decode_ends_once_its_job_is_cancelled(engine, monkeypatch):
    # Past the first image that did not decode, the grid decoded every other one (up to
    # 1024) to name them all, none of them checking the job: a cancelled job ran on.
    from explaind import imaging

    rng = np.random.default_rng(8)
    engine.create_sample_set("wide", "", [NewSample.from_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 0) for _ in range(4)])
    digests = [record.digest for record in engine.store.list_samples("wide")]
    monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)
    context, loaded = _EvaluationContext(), []
    load = engine.load_sample_image

    def load_then_cancel(digest, *args, **kwargs):
        loaded.append(digest)
        context.cancel()
        return load(digest, *args, **kwargs)

    monkeypatch.setattr(engine, "load_sample_image", load_then_cancel)
    with pytest.raises(JobCancelled):
        engine.sample_grid(digests, job=context)
    assert loaded == digests[:1]


def _set_whose_second_image_does_not_decode_now(engine, monkeypatch, sample_set_id: str, size: int) -> list[str]:
    """The digests of a new set of ``size`` random images whose second (32 px) a server
    allowing 24 px at most, as this one now is, refuses; the others are 16 px."""
    from explaind import imaging

    rng = np.random.default_rng(10)
    engine.create_sample_set(sample_set_id, "", [NewSample.from_array(rng.integers(0, 256, (32, 32, 3) if row == 1 else (16, 16, 3), dtype=np.uint8), 0)
                                                 for row in range(size)])
    monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)
    return [record.digest for record in engine.store.list_samples(sample_set_id)]


def test_a_mistakes_grid_bound_to_fail_keeps_no_tile_and_decodes_a_refused_image_once(engine, monkeypatch):
    # Once an image is refused the grid cannot be drawn: the tiles decoded before it, and
    # those after, are let go as it looks for the other refused images (up to 1024 tiles
    # held for nothing), and one met again is not decoded again.
    import explaind.engine.core as core
    from explaind import imaging

    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "one-wide", 5)
    tiles, loaded = [], []

    def tracked_tile(image):
        tile = imaging.to_uint8_hwc(image)
        tiles.append(weakref.ref(tile))
        return tile

    load = engine.load_sample_image

    def load_counting_live_tiles(digest, *args, **kwargs):
        loaded.append((digest, sum(tile() is not None for tile in tiles)))
        return load(digest, *args, **kwargs)

    monkeypatch.setattr(core, "to_uint8_hwc", tracked_tile)
    monkeypatch.setattr(engine, "load_sample_image", load_counting_live_tiles)
    with pytest.raises(InvalidArgument, match="image is 32x32"):
        engine.sample_grid([digests[0], digests[1], digests[2], digests[1], digests[3], digests[4]])
    assert loaded == [(digests[0], 0), (digests[1], 1), (digests[2], 0), (digests[3], 0), (digests[4], 0)]


def test_a_read_bound_to_fail_on_an_image_that_does_not_decode_stops_on_a_decoder_out_of_memory_still_naming_it(engine, monkeypatch):
    # Past the first image that does not decode, a read decodes the rest only to name any
    # others: a decoder out of memory there made the read RESOURCE_EXHAUSTED ("retry
    # later"), losing the refusal it had already met, which any retry meets again. It stops
    # there, naming the images met; within the batch it met both in, whatever their order.
    from explaind import imaging

    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "mixed", 6)
    load, loaded = engine.load_sample_image, []

    for out_of_memory_row in (0, 2, 4):  # before the refused image in its batch, after it, in the next batch
        def load_out_of_memory(digest, *args, out_of_memory_row=out_of_memory_row, **kwargs):
            loaded.append(digest)
            if digest == digests[out_of_memory_row]:
                raise imaging.DecodeOutOfMemory("the server ran out of memory decoding the image; retry later", field="image")
            return load(digest, *args, **kwargs)

        monkeypatch.setattr(engine, "load_sample_image", load_out_of_memory)
        loaded.clear()
        with pytest.raises(FailedPrecondition, match=r"^sample_set_id: the image [0-9a-f]{12} of 1 sample .*\(sample_index 1\) does not decode now"):
            engine.sample_set_features("mixed", batch_size=3)
        if out_of_memory_row < 3:  # the read stopped at the batch out of memory, the next one not decoded
            assert set(loaded) == set(digests[:3])
        with pytest.raises(FailedPrecondition, match=r"\(sample_index 1\) does not decode now"), \
                engine.reading_images_of("mixed", "sample_set_id", rows_by_digest(digests)):
            engine.sample_grid(digests[1:])
    # Out of memory before any image was refused (row 4's, last patched), the read is RESOURCE_EXHAUSTED as before.
    with pytest.raises(ResourceExhausted, match="retry later"), engine.reading_images_of("mixed", "sample_set_id", rows_by_digest(digests)):
        engine.sample_grid([digests[row] for row in (0, 4, 1)])


def test_a_read_bound_to_fail_looks_for_more_images_that_do_not_decode_for_a_bounded_time_saying_where_it_stopped(engine, monkeypatch):
    # Past the first image that does not decode, a read decoded every other image of the set
    # to name any more (hours for a large set of large images, its job's worker held). It
    # looks for UNDECODABLE_SEARCH_SECONDS at most; one that stops says how far it looked,
    # and counts those found as "at least", not as all of them.
    import explaind.engine.core as core

    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "long", 8)
    rng = np.random.default_rng(11)
    engine.create_sample_set("long-several", "", [NewSample.from_array(rng.integers(0, 256, (32 if row in (0, 1, 6) else 16,) * 2 + (3,), dtype=np.uint8), 0)
                                                  for row in range(8)])
    several = [record.digest for record in engine.store.list_samples("long-several")]
    load, loaded = engine.load_sample_image, []
    monkeypatch.setattr(engine, "load_sample_image", lambda digest, *args, **kwargs: loaded.append(digest) or load(digest, *args, **kwargs))
    with pytest.raises(FailedPrecondition, match=r"^sample_set_id: 3 images of 3 samples of sample set 'long-several' do not decode now; use"):
        engine.sample_set_features("long-several", batch_size=2)  # within the time: all found
    monkeypatch.setattr(core, "UNDECODABLE_SEARCH_SECONDS", 0.0)
    loaded.clear()
    with pytest.raises(FailedPrecondition) as refused:
        engine.sample_set_features("long", batch_size=2)
    assert str(refused.value) == (f"sample_set_id: the image {digests[1][:12]} of 1 sample of sample set 'long' (sample_index 1) does not decode now: "
                                  "image is 32x32; the largest side allowed is 24; use a set without it "
                                  "(the only one found checking 2 of the 8 images read; the rest were not checked)")
    assert sorted(loaded) == sorted(digests[:2])  # the next batch was not decoded
    with pytest.raises(FailedPrecondition) as refused:
        engine.sample_set_features("long-several", batch_size=2)
    assert str(refused.value).startswith("sample_set_id: at least 2 images of 2 samples of sample set 'long-several' do not decode now "
                                         "(found checking 2 of the 8 images read; the rest were not checked); use a set without them: "
                                         f"[{several[0][:12]}, sample_index 0: image is 32x32")
    assert refused.value.violations == (("UNDECODABLE_IMAGE", "samples[0]"), ("UNDECODABLE_IMAGE", "samples[1]"))
    # A mistakes grid alike, image by image.
    loaded.clear()
    with pytest.raises(FailedPrecondition, match=r"\(the only one found checking 2 of the 4 images read; the rest were not checked\)$"), \
            engine.reading_images_of("long", "sample_set_id", rows_by_digest(digests)):
        engine.sample_grid(digests[:4])
    assert loaded == digests[:2]


def test_a_read_bound_to_fail_stops_looking_before_a_batch_that_would_end_past_its_time_counted_from_the_first_image_refused(engine, monkeypatch):
    # The search's UNDECODABLE_SEARCH_SECONDS run from the first image refused, not the
    # latest, and a batch is not begun that would end past them (each takes as long as the
    # last). Each image takes 1 s of core's clock here: 5 s allow the batches up to 6 s,
    # [2, 3] and [4, 5] after the first refusal (at 2 s), not [6, 7].
    import types

    import explaind.engine.core as core
    from explaind import imaging

    rng = np.random.default_rng(12)
    engine.create_sample_set("paced", "", [NewSample.from_array(rng.integers(0, 256, (32 if row in (1, 3) else 16,) * 2 + (3,), dtype=np.uint8), 0)
                                           for row in range(10)])
    monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)
    clock = [0.0]
    monkeypatch.setattr(core, "time", types.SimpleNamespace(**{**{name: value for name, value in vars(time).items() if not name.startswith("__")},
                                                               "monotonic": lambda: clock[0]}))
    monkeypatch.setattr(core, "UNDECODABLE_SEARCH_SECONDS", 5.0)
    load = engine.load_sample_image

    def load_in_a_second(digest, *args, **kwargs):
        clock[0] += 1.0
        return load(digest, *args, **kwargs)

    monkeypatch.setattr(engine, "load_sample_image", load_in_a_second)
    with pytest.raises(FailedPrecondition, match=r"^sample_set_id: at least 2 images of 2 samples of sample set 'paced' do not decode now "
                                                 r"\(found checking 6 of the 10 images read; the rest were not checked\)"):
        engine.sample_set_features("paced", batch_size=2)


def test_a_read_bound_to_fail_whose_job_is_cancelled_as_its_search_stops_ends_cancelled(engine, monkeypatch):
    # A cancel that came in the batch where the search for more such images stopped ended
    # the job FAILED on the images found, not CANCELLED as asked.
    import explaind.engine.core as core

    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "dropped", 6)
    monkeypatch.setattr(core, "UNDECODABLE_SEARCH_SECONDS", 0.0)
    load = engine.load_sample_image
    for grid in (False, True):
        context = _OutOfTimeContext()

        def load_then_cancel(digest, *args, context=context, **kwargs):
            if digest == digests[1]:
                context.cancel()
            return load(digest, *args, **kwargs)

        monkeypatch.setattr(engine, "load_sample_image", load_then_cancel)
        with pytest.raises(JobCancelled), engine.reading_images_of("dropped", "sample_set_id", rows_by_digest(digests)):
            if grid:
                engine.sample_grid(digests[:3], job=context)
            else:
                engine.sample_set_features("dropped", batch_size=2, context=context)


def test_a_read_bound_to_fail_that_runs_out_of_time_names_the_images_that_do_not_decode_it_found(engine, monkeypatch):
    # Its job's run-time limit (or its call's deadline) passing while it looked for more
    # such images ended it DEADLINE_EXCEEDED (or CANCELLED), losing those it had found, which
    # any retry meets again: it stops looking when the time left is short, naming them.
    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "late", 6)
    load = engine.load_sample_image
    for deadline, grid in ((_OutOfTimeContext(), False), (_OutOfTimeCall(), False), (_OutOfTimeContext(), True)):  # a job's mistakes grid alike
        def load_running_out_of_time(digest, *args, deadline=deadline, **kwargs):
            if digest == digests[1]:
                deadline.remaining = 0.0
            return load(digest, *args, **kwargs)

        monkeypatch.setattr(engine, "load_sample_image", load_running_out_of_time)
        with pytest.raises(FailedPrecondition, match=r"\(sample_index 1\) does not decode now: .* \(the only one found checking 2 of the "
                                                     rf"{3 if grid else 6} images read; the rest were not checked\)$"), \
                engine.reading_images_of("late", "sample_set_id", rows_by_digest(digests)):
            if grid:
                engine.sample_grid(digests[:3], job=deadline)
            elif isinstance(deadline, _OutOfTimeContext):
                engine.sample_set_features("late", batch_size=2, context=deadline)
            else:
                engine.sample_set_features("late", batch_size=2, call=deadline)


def test_a_read_bound_to_fail_whose_wait_for_decode_memory_passes_the_deadline_names_the_images_found(engine, monkeypatch):
    # A wait for decode memory past the job's run-time limit (or the call's deadline) after
    # the first image that does not decode ended the read DEADLINE_EXCEEDED, losing the
    # images found, which any retry meets again; a set read and a mistakes grid alike.
    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "waited", 6)
    load = engine.load_sample_image

    def load_past_the_deadline(digest, *args, **kwargs):
        if digest == digests[3]:
            raise DeadlineExceeded("the job ran longer than the server allows an operation")
        return load(digest, *args, **kwargs)

    monkeypatch.setattr(engine, "load_sample_image", load_past_the_deadline)
    with pytest.raises(FailedPrecondition, match=r"\(sample_index 1\) does not decode now: .* \(the only one found checking 3 of the 6 images read; "
                                                 r"the rest were not checked\)$"):
        engine.sample_set_features("waited", batch_size=2)
    with pytest.raises(FailedPrecondition, match=r"\(the only one found checking 3 of the 5 images read; the rest were not checked\)$"), \
            engine.reading_images_of("waited", "sample_set_id", rows_by_digest(digests)):
        engine.sample_grid(digests[:5])


def test_a_calls_read_bound_to_fail_waiting_for_decode_memory_ends_before_the_calls_deadline_naming_the_images_found(engine, monkeypatch):
    # Past the first image that does not decode, an inline read's next images waited for
    # decode memory until the call's own deadline, where gRPC ends the call: its caller
    # heard DEADLINE_EXCEEDED (the server CANCELLED), not the images found, which any
    # retry meets again. The wait ends early enough for the error naming them to come first.
    import explaind.decode_memory as decode_memory
    import explaind.engine.core as core

    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "starved", 6)
    monkeypatch.setattr(core, "_DECODE_THREADS", 1)  # the images decode in order
    monkeypatch.setattr(decode_memory, "UNRESERVED_DECODE_BYTES", 0)  # each decode reserves
    call, taken = _CallWithDeadline(2.0), engine.decode_memory.lease(core._JobDecodeWait(None))
    load = engine.load_sample_image

    def load_then_take_the_memory(digest, *args, **kwargs):
        try:
            return load(digest, *args, **kwargs)
        finally:
            if digest == digests[1]:  # refused: the other calls' decodes take every byte from now on
                time.sleep(0.2)  # a batch long enough for the margin to outlast the thread's wake-up
                taken.reserve(engine.decode_memory.capacity)

    monkeypatch.setattr(engine, "load_sample_image", load_then_take_the_memory)
    try:
        with pytest.raises(FailedPrecondition, match=r"\(sample_index 1\) does not decode now: .* \(the only one found checking 2 of the 6 images read; "
                                                     r"the rest were not checked\)$"):
            engine.sample_set_features("starved", batch_size=2, call=call)
        assert call.is_active()  # told while the caller still waits
    finally:
        taken.release()


def _out_of_time_once_loading(engine, monkeypatch, digest: str) -> "_OutOfTimeContext":
    """A job's context whose run-time limit passes as the image ``digest`` is loaded."""
    context, load = _OutOfTimeContext(), engine.load_sample_image

    def load_running_out_of_time(loaded, *args, **kwargs):
        if loaded == digest:
            context.remaining = 0.0
        return load(loaded, *args, **kwargs)

    monkeypatch.setattr(engine, "load_sample_image", load_running_out_of_time)
    return context


def test_a_read_whose_first_image_that_does_not_decode_is_in_its_last_batch_past_the_run_time_limit_names_it(engine, monkeypatch):
    # The job's run-time limit passing as its last batch decoded ended it DEADLINE_EXCEEDED
    # at its next check, losing the image found in that batch, which any retry meets again.
    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "last-late", 2)
    context = _out_of_time_once_loading(engine, monkeypatch, digests[1])
    with pytest.raises(FailedPrecondition, match=r"\(sample_index 1\) does not decode now: image is 32x32; the largest side allowed is 24; "
                                                 r"use a set without it$"):
        engine.sample_set_features("last-late", batch_size=1, context=context)


def test_a_read_bound_to_fail_expects_its_next_batch_to_take_as_long_as_its_slowest_not_its_last(engine, monkeypatch):
    # The margin before the deadline was twice the last batch's time: a quick batch (the
    # refused image's, 1 s of core's clock) after a slow one (3 s) let the read begin one
    # as slow, ending past the call's deadline, where gRPC has ended the call.
    import types

    import explaind.engine.core as core

    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "uneven", 6)
    clock = [0.0]
    monkeypatch.setattr(core, "time", types.SimpleNamespace(**{**{name: value for name, value in vars(time).items() if not name.startswith("__")},
                                                               "monotonic": lambda: clock[0]}))
    load, loaded = engine.load_sample_image, []

    def load_slow_but_the_refused(digest, *args, **kwargs):
        loaded.append(digest)
        clock[0] += 1.0 if digest == digests[1] else 3.0
        return load(digest, *args, **kwargs)

    class CallOfCoresClock:
        def time_remaining(self):
            return max(0.0, 6.5 - clock[0])

        def is_active(self):
            return self.time_remaining() > 0

    monkeypatch.setattr(engine, "load_sample_image", load_slow_but_the_refused)
    with pytest.raises(FailedPrecondition, match=r"\(the only one found checking 2 of the 6 images read; the rest were not checked\)$"):
        engine.sample_set_features("uneven", batch_size=1, call=CallOfCoresClock())
    assert loaded == digests[:2]


@contextlib.contextmanager
def _decode_memory_taken_once_refused(engine, monkeypatch, refused: str) -> Iterator[None]:
    """Every byte of decode memory taken by other work once the image ``refused`` was
    loaded (and refused), given back 20 s later: a read waiting for it that long, past its
    search's UNDECODABLE_SEARCH_SECONDS (0.5 s here), is what the caller is kept from."""
    import explaind.decode_memory as decode_memory
    import explaind.engine.core as core

    monkeypatch.setattr(core, "UNDECODABLE_SEARCH_SECONDS", 0.5)
    monkeypatch.setattr(decode_memory, "UNRESERVED_DECODE_BYTES", 0)  # each decode reserves
    taken = engine.decode_memory.lease(core._JobDecodeWait(None))
    freed = threading.Timer(20.0, taken.release)
    load = engine.load_sample_image

    def load_then_take_the_memory(digest, *args, **kwargs):
        try:
            return load(digest, *args, **kwargs)
        finally:
            if digest == refused:
                taken.reserve(engine.decode_memory.capacity)
                freed.start()

    monkeypatch.setattr(engine, "load_sample_image", load_then_take_the_memory)
    try:
        yield
    finally:
        freed.cancel()
        freed.join()
        taken.release()


@pytest.mark.parametrize("run_time_limit", [False, True])
def test_a_jobs_read_bound_to_fail_waits_for_decode_memory_no_longer_than_its_search_may_last(engine, monkeypatch, run_time_limit):
    # A job without a run-time limit (or with one far off), past the first image that does
    # not decode, waited for decode memory as long as other work held it (or its limit allowed),
    # past UNDECODABLE_SEARCH_SECONDS. The search ends first, having checked the first batch.
    import explaind.engine.core as core

    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "starved-job", 6)
    monkeypatch.setattr(core, "_DECODE_THREADS", 1)  # the images decode in order
    with _decode_memory_taken_once_refused(engine, monkeypatch, digests[1]), \
            pytest.raises(FailedPrecondition, match=r"\(sample_index 1\) does not decode now: .* \(the only one found checking 2 of the 6 images read; "
                                                    r"the rest were not checked\)$"):
        engine.sample_set_features("starved-job", batch_size=2, context=_OutOfTimeContext() if run_time_limit else _EvaluationContext())


def test_a_jobs_grid_bound_to_fail_waits_for_decode_memory_no_longer_than_its_search_may_last(engine, monkeypatch):
    # As a set read's: past the image refused, a job without a run-time limit waited for
    # decode memory as long as other work held it, past UNDECODABLE_SEARCH_SECONDS.
    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "starved-grid", 4)
    with _decode_memory_taken_once_refused(engine, monkeypatch, digests[1]), \
            pytest.raises(FailedPrecondition, match=r"\(the only one found checking 2 of the 4 images read; the rest were not checked\)$"), \
            engine.reading_images_of("starved-grid", "sample_set_id", rows_by_digest(digests)):
        engine.sample_grid(digests, job=_EvaluationContext())


def test_a_grid_bound_to_fail_counts_the_images_it_checked_not_its_tiles(engine, monkeypatch):
    # A grid showing an image in several tiles said it stopped "checking 3 of the 6 images
    # read" of 4 images, one checked twice; an image checked is not decoded again.
    import explaind.engine.core as core

    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "tiled", 4)
    monkeypatch.setattr(core, "UNDECODABLE_SEARCH_SECONDS", 0.0)
    load, loaded = engine.load_sample_image, []
    monkeypatch.setattr(engine, "load_sample_image", lambda digest, *args, **kwargs: loaded.append(digest) or load(digest, *args, **kwargs))
    with pytest.raises(FailedPrecondition, match=r"\(the only one found checking 2 of the 4 images read; the rest were not checked\)$"), \
            engine.reading_images_of("tiled", "sample_set_id", rows_by_digest(digests)):
        engine.sample_grid([digests[row] for row in (0, 0, 1, 1, 0, 2, 3)])
    assert loaded == [digests[0], digests[0], digests[1]]
    # Within its time, it names them all, decoding each image once past the first refused.
    monkeypatch.setattr(core, "UNDECODABLE_SEARCH_SECONDS", 30.0)
    loaded.clear()
    with pytest.raises(FailedPrecondition, match=r"\(sample_index 1\) does not decode now: image is 32x32; the largest side allowed is 24; "
                                                 r"use a set without it$"), \
            engine.reading_images_of("tiled", "sample_set_id", rows_by_digest(digests)):
        engine.sample_grid([digests[row] for row in (0, 1, 1, 0, 2, 3, 2)])
    assert loaded == digests


def test_a_grid_whose_last_image_to_check_does_not_decode_past_the_run_time_limit_names_it_whatever_tiles_follow(engine, monkeypatch):
    # Every image checked, the one refused last and past the job's run-time limit, a tile
    # showing an image met before still followed: its cancellation check ended the grid
    # DEADLINE_EXCEEDED, losing the image found, which any retry meets again.
    digests = _set_whose_second_image_does_not_decode_now(engine, monkeypatch, "tiled-late", 2)
    context = _out_of_time_once_loading(engine, monkeypatch, digests[1])
    with pytest.raises(FailedPrecondition, match=r"\(sample_index 1\) does not decode now: image is 32x32; the largest side allowed is 24; "
                                                 r"use a set without it$"), \
            engine.reading_images_of("tiled-late", "sample_set_id", rows_by_digest(digests)):
        engine.sample_grid([digests[row] for row in (0, 1, 0)], job=context)


def test_a_decoder_out_of_memory_is_resource_exhausted_with_a_retry_hint_not_an_image_that_does_not_decode_now(engine, monkeypatch):
    # A MemoryError inside the decoder read as the file's fault: INVALID_ARGUMENT for a sent
    # image, and for a stored one FAILED_PRECONDITION "does not decode now", telling its
    # owner to replace an image that decodes once the server has memory again.
    from PIL import ImageFile

    from explaind import imaging

    engine.create_sample_set("fine", "", [NewSample.from_array(np.zeros((32, 32, 3), np.uint8), 0)])

    # Pillow's C decoders say so with an OSError of their own words (IMAGING_CODEC_MEMORY).
    for raised in (MemoryError(), ImageFile._get_oserror(-9, encoder=False)):
        def out_of_memory(image, orientation, raised=raised):
            raise raised

        monkeypatch.setattr(imaging, "_as_viewed", out_of_memory)
        with pytest.raises(ResourceExhausted, match="ran out of memory decoding the image; retry later") as refused:
            engine.sample_set_features("fine")
        assert refused.value.retry_delay_s is not None and refused.value.retry_delay_s > 0 and not refused.value.violations
    # Another of their errors is still the file's.
    def broken(image, orientation):
        raise ImageFile._get_oserror(-2, encoder=False)

    monkeypatch.setattr(imaging, "_as_viewed", broken)
    with pytest.raises(FailedPrecondition, match=r"does not decode now: cannot decode image bytes \(OSError: broken data stream"):
        engine.sample_set_features("fine")


def test_features_of_a_set_for_an_inference_only_classifier_are_refused_saying_why(engine):
    # An explanation method handed such a version is told so, not given features it has none of.
    engine.create_sample_set("whole", "", [NewSample.from_array(np.zeros((64, 64, 3), np.uint8), 0)])
    split = engine.models.active
    whole = dataclasses.replace(split, feature_extractor=None, head=None, predict_fn=lambda images: split.logits(split.features(images)),
                                inference_only_reason="a stand-in without its layers")
    with pytest.raises(FailedPrecondition, match="inference-only, and explanation methods need a split classifier: a stand-in without its layers"):
        engine.sample_set_features("whole", version=whole)


def test_a_set_replaced_under_its_id_while_a_job_lists_its_samples_is_refused_not_read(engine, monkeypatch):
    # The set is checked before its samples are listed: one made under its id in between
    # must not be read as the set the job was submitted for.
    pixels = np.zeros((64, 64, 3), np.uint8)
    uid = engine.create_sample_set("swapped", "", [NewSample.from_array(pixels, 0)]).uid
    list_samples = engine.store.list_samples

    def replaced_first(sample_set_id: str, **options):
        monkeypatch.setattr(engine.store, "list_samples", list_samples)  # once
        engine.delete_sample_set(sample_set_id)
        engine.create_sample_set(sample_set_id, "", [NewSample.from_array(pixels, 1)] * 2)
        return list_samples(sample_set_id, **options)

    monkeypatch.setattr(engine.store, "list_samples", replaced_first)
    with pytest.raises(FailedPrecondition, match=f"sample set 'swapped' is not the set of uid {uid} any more") as refused:
        engine.sample_set_features("swapped", uid=uid)
    assert refused.value.field == "sample_set_id"


def test_a_jobs_feature_progress_counts_each_batch_as_it_starts_and_ends_with_all_ready(engine):
    # What WatchOperation shows while a job computes a set's features: the samples done as
    # each batch starts, then all of them ready, not the last batch's start left standing.
    rng = np.random.default_rng(4)
    engine.create_sample_set("progress", "", [NewSample.from_array(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), 0) for _ in range(5)])

    class Recording:
        def __init__(self) -> None:
            self.reports: list[tuple[int, int, str]] = []

        def raise_if_cancelled(self) -> None:
            pass

        def report_progress(self, step: int, total: int, message: str) -> None:
            self.reports.append((step, total, message))

    context = Recording()
    engine.sample_set_features("progress", batch_size=2, context=context)
    assert context.reports == [(0, 5, "computing features 0/5"), (2, 5, "computing features 2/5"), (4, 5, "computing features 4/5"),
                               (5, 5, "features ready")]
    # Progress: "0 of 0 when all are cached".
    cached = Recording()
    engine.sample_set_features("progress", batch_size=2, context=cached)
    assert cached.reports == [(0, 0, "features ready")]


def test_computed_features_are_rows_of_one_array_not_one_array_a_batch(engine, monkeypatch):
    """Each batch's own output, kept to the end of a feature computation, pinned the
    allocator's heap between the batches' freed temporaries: a 50,000-sample evaluation
    left the server 1.2 GB larger. The rows are copied into one array instead."""
    rng = np.random.default_rng(2)
    engine.create_sample_set("rows", "", [NewSample.from_array(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), 0) for _ in range(5)])
    cached = _rows_cached(engine, monkeypatch)
    features = engine.sample_set_features("rows", batch_size=2).features  # three batches
    assert len(cached) == 5 and len({id(row.base) for row in cached}) == 1
    torch.testing.assert_close(torch.from_numpy(np.stack(cached)), features)


def test_uint8_pixels_decode_to_exactly_the_reference_floats():
    """Raw and PNG uint8 pixels reach the model as the plain x / 255 floats, bit for bit,
    in a contiguous (3, H, W) tensor; the fast path must not change a prediction."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    reference = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255
    request_bytes = np.frombuffer(pixels.tobytes(), dtype=np.uint8).reshape(pixels.shape)  # read-only, like a request's
    for decoded in (decode_array(request_bytes, field="x"), decode_encoded(encode_png(pixels), field="x")):
        assert decoded.is_contiguous() and decoded.dtype == torch.float32
        assert torch.equal(decoded, reference)


def _encoded(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def test_captioned_grid_tiles_are_wide_enough_for_their_captions():
    # 64 px tiles cut "triangle>square" to "triangle>s".
    from explaind.imaging import image_grid

    tiles = [np.zeros((64, 64, 3), np.uint8)] * 3
    grid = image_grid(tiles, ["triangle>square"] * 3, columns=2)
    assert grid.shape == (2 * (128 + 12), 2 * 128, 3)
    caption = grid[128:140, :128]  # under the first tile
    inked = np.nonzero((caption < 128).all(axis=2).any(axis=0))[0]
    assert inked.max() > 6 * len("triangle>s")  # drawn past where the cut one ended
    assert image_grid(tiles).shape == (64, 3 * 64, 3)  # without captions, as they are


def test_16_bit_greyscale_files_are_scaled_not_clipped():
    # Pillow's convert("RGB") turned every 16-bit value above 255 into white.
    grey16 = np.random.default_rng(0).integers(0, 65536, (8, 8)).astype(np.uint16)
    grey8 = ((grey16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    expected = decode_array(np.repeat(grey8[:, :, None], 3, axis=2), field="x")
    for data in (_encoded(grey16, "PNG"), _encoded(grey16, "TIFF"), _encoded(grey16.astype(np.int32), "TIFF")):
        assert torch.equal(decode_encoded(data, field="images[0].encoded"), expected)
    with pytest.raises(InvalidArgument, match=r"^images\[0\].encoded: integer greyscale pixels must lie in \[0, 65535\], got \[0, 70000\]"):
        decode_encoded(_encoded(np.array([[0, 70000]], np.int32), "TIFF"), field="images[0].encoded")
    with pytest.raises(InvalidArgument, match=r"^images\[0\].encoded: floating-point image files are not supported"):
        decode_encoded(_encoded(np.full((4, 4), 0.5, np.float32), "TIFF"), field="images[0].encoded")
    # 65535 is the top of the 16-bit range, white: valid, not out of range.
    assert torch.equal(decode_encoded(_encoded(np.array([[0, 65535]], np.uint16), "PNG"), field="x")[:, 0], torch.tensor([[0.0, 1.0]] * 3))


@pytest.mark.parametrize("weights", ["ResNet18_Weights", "EfficientNet_B0_Weights"])  # bilinear, bicubic
@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (333, 333), (256, 256), (224, 224), (150, 200), (1000, 257)])
def test_resize_and_centre_crop_give_what_torchvisions_evaluation_transform_gives(weights, height, width, world_images):
    # Images were only ever stretched to the input square: an ImageNet model saw other
    # aspect ratios distorted, unlike in the pipeline its accuracy was measured with.
    import torchvision

    reference = getattr(torchvision.models, weights).DEFAULT.transforms()  # Resize(256), CenterCrop(224), normalise
    mean, std = torch.tensor(reference.mean)[:, None, None], torch.tensor(reference.std)[:, None, None]
    scene = torch.nn.functional.interpolate(world_images[0][:1], size=(height, width), mode="bilinear")[0]  # a picture, not noise
    pictures = [scene.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()]
    if reference.interpolation.value == "bilinear":  # and noise, but not for bicubic, see below
        pictures.append(np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    geometry = InputGeometry(reference.crop_size[0], reference.resize_size[0], reference.interpolation.value)
    for pixels in pictures:
        expected = reference(torch.from_numpy(pixels).permute(2, 0, 1)) * std + mean  # back to [0, 1]
        for ours in (decode_encoded(encode_png(pixels), field="x", geometry=geometry), decode_array(pixels, field="x", geometry=geometry),
                     decode_array(pixels.astype(np.float32) / 255, field="x", geometry=geometry)):
            # torchvision resizes uint8 in float and rounds; we resize uint8 as uint8 (a large
            # image never becomes float): at most one level of 255 apart. (Bicubic overshoots
            # on pixel noise, and the uint8 kernel clips between its two passes: up to 10
            # levels on 0.3 % of a noise image's pixels.)
            assert ours.shape == (3, 224, 224) and (ours - expected).abs().max() <= 1 / 255 + 1e-6


def test_an_extreme_aspect_ratio_resizes_only_the_middle_the_crop_keeps(monkeypatch):
    # A 1x4096 strip was resized whole to 256x1048576 first: 3 s and 2 GiB for one image.
    import explaind.imaging

    geometry = InputGeometry(224, 256)
    resized, interpolate = [], torch.nn.functional.interpolate

    def recording(*args, **kwargs):
        output = interpolate(*args, **kwargs)
        resized.append(tuple(output.shape[-2:]))
        return output

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "interpolate", recording)
        strip = decode_encoded(encode_png(np.full((1, 4096, 3), 200, np.uint8)), field="x", geometry=geometry)
        float_strip = decode_array(np.full((3, 4096, 1), 0.5, np.float32), field="x", geometry=geometry)
    assert strip.shape == float_strip.shape == (3, 224, 224) and float_strip.is_contiguous()
    assert len(resized) == 2 and all(max(size) <= 4096 for size in resized), resized
    # Where the whole image can still be resized, the middle alone gives nearly what it gives.
    for pixels in (np.random.default_rng(0).integers(0, 256, (30, 3000, 3), dtype=np.uint8),
                   np.random.default_rng(1).integers(0, 256, (2999, 31, 3), dtype=np.uint8)):
        middle = decode_array(pixels, field="x", geometry=geometry)
        monkeypatch.setattr(explaind.imaging, "_MAX_RESIZED_SIDE", 10**9)
        whole = decode_array(pixels, field="x", geometry=geometry)
        monkeypatch.undo()
        assert (middle - whole).abs().max() <= 3 / 255 and (middle - whole).abs().mean() < 0.5 / 255


def test_the_centre_crop_takes_the_middle_of_the_resized_image():
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    cropped = decode_array(pixels, field="x", geometry=InputGeometry(200, 300))  # the shorter side is already 300: no resampling
    assert torch.equal(cropped, decode_array(np.ascontiguousarray(pixels[50:250, 100:300]), field="x"))
    # An odd margin splits as CenterCrop splits it: int(round(203 / 2)) = 102 pixels on the left, not 101.
    odd = np.random.default_rng(1).integers(0, 256, (300, 403, 3), dtype=np.uint8)
    assert torch.equal(decode_array(odd, field="x", geometry=InputGeometry(200, 300)), decode_array(np.ascontiguousarray(odd[50:250, 102:302]), field="x"))
    stretched = decode_array(pixels, field="x", geometry=InputGeometry(200))
    assert stretched.shape == (3, 200, 200) and not torch.equal(stretched, cropped)


def test_float_pixels_stay_in_0_1_after_a_bicubic_resize():
    # Bicubic overshoots at sharp edges; uint8 saturates, floats must be clamped back to [0, 1].
    squares = np.kron(np.indices((8, 8)).sum(axis=0) % 2, np.ones((8, 8))).astype(np.float32)  # a 64 px checkerboard of 0 and 1
    for geometry in (InputGeometry(24, 0, "bicubic"), InputGeometry(24, 28, "bicubic")):
        fitted = decode_array(np.stack([squares] * 3), field="x", geometry=geometry)
        assert fitted.shape == (3, 24, 24) and float(fitted.min()) >= 0.0 and float(fitted.max()) <= 1.0


def test_float_pixels_are_checked_for_range_side_and_budget_like_uint8_ones():
    from explaind.imaging import PixelBudget

    with pytest.raises(InvalidArgument, match=r"^x: float pixels must lie in \[0, 1\], got \[-0.5, "):
        decode_array(np.full((3, 4, 4), -0.5, np.float32), field="x")  # negative: normalised on the client, not raw
    # Within the 1e-3 tolerance for rounding, but the model still sees [0, 1].
    nearly = decode_array(np.array([[[-4e-4, 1.0004]]] * 3, np.float32), field="x")
    assert torch.equal(nearly, torch.tensor([[[0.0, 1.0]]] * 3))
    for shape in ((3, 1, 4097), (4097, 1, 3)):
        with pytest.raises(InvalidArgument, match="the largest side allowed is 4096"):
            decode_array(np.zeros(shape, np.float16), field="x")
    with pytest.raises(InvalidArgument, match=r"float images must be \(3, H, W\) or \(H, W, 3\), got shape \(4, 5, 6\)"):
        decode_array(np.zeros((4, 5, 6), np.float32), field="x")
    # (3, H, 3) could be either layout: it is read as (3, H, W), as its size was checked.
    ambiguous = np.random.default_rng(0).random((3, 5, 3), dtype=np.float32)
    assert torch.equal(decode_array(ambiguous, field="x"), torch.from_numpy(ambiguous))
    budget = PixelBudget(100, field="images")
    decode_array(np.zeros((3, 10, 10), np.float32), field="x", budget=budget)
    with pytest.raises(InvalidArgument, match="more than the limit of 100 pixels per request") as refused:
        decode_array(np.zeros((1, 1, 3), np.float32), field="x", budget=budget)
    assert refused.value.field == "images"


def test_a_large_image_is_resized_before_it_becomes_float():
    # A 4096x4096 image as float32 is 192 MiB; decoded straight to the model's size it
    # never exists (its uint8 pixels are 48 MiB).
    data = encode_png(np.zeros((4096, 4096, 3), np.uint8))
    tracemalloc.start()
    try:
        image = decode_encoded(data, field="images[0].encoded", geometry=InputGeometry(64, 80))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert peak < 150 * 2**20, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.filterwarnings("ignore")  # Pillow warns about the corrupt files
def test_image_bytes_of_any_format_fail_as_invalid_argument_naming_the_field():
    # Malformed files of Pillow's rarer formats used to escape as NotImplementedError /
    # AttributeError (INTERNAL); only the common formats are decoded now.
    rng, mutate = np.random.default_rng(0), random.Random(1)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for format, image in (("PNG", Image.fromarray(pixels)), ("JPEG", Image.fromarray(pixels)), ("TIFF", Image.fromarray(pixels)),
                          ("GIF", Image.fromarray(pixels)), ("DDS", Image.fromarray(pixels)), ("SPIDER", Image.fromarray(pixels[..., 0]).convert("F"))):
        buffer = io.BytesIO()
        image.save(buffer, format=format)
        data = buffer.getvalue()
        if format in ("DDS", "SPIDER"):
            with pytest.raises(InvalidArgument, match=r"^images\[0\].encoded: bytes are not an image in a supported format"):
                decode_encoded(data, field="images[0].encoded")
        for _ in range(300):
            broken = bytearray(data)
            for _ in range(mutate.randint(1, 6)):
                broken[mutate.randrange(len(broken))] = mutate.randrange(256)
            if mutate.random() < 0.2:
                broken = broken[: mutate.randrange(1, len(broken))]
            try:
                decode_encoded(bytes(broken), field="images[0].encoded")
            except InvalidArgument as error:
                assert error.field == "images[0].encoded"


def _progressive_jpeg_with_extra_scans(side: int, extra: int) -> bytes:
    """A progressive JPEG whose last scan is repeated ``extra`` more times: libjpeg only
    warns and decodes each over the whole image (the "scan bomb")."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda"):-2]  # up to the EOI marker
    return data[:-2] + last_scan * extra + data[-2:]


def test_a_gif_with_more_extension_blocks_than_encoders_write_is_refused_before_pillow_reads_them():
    # 60,000 empty comments (300 KB) added 2.8 s to opening a GIF, block by block in Python.
    from explaind.imaging import MAX_GIF_BLOCKS, decode_pixels

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "GIF", comment=b"made by a camera")
    plain = buffer.getvalue()
    first_image = plain.index(b"\x2c\x00\x00\x00\x00")  # the image descriptor at (0, 0)

    def with_comments(count: int, sub_blocks: int = 0) -> bytes:
        comment = b"\x21\xfe" + b"\x01c" * sub_blocks + b"\x00"
        return plain[:first_image] + comment * count + plain[first_image:]

    assert decode_pixels(plain, field="f")[0, 0].tolist() == [200, 10, 10]
    assert decode_pixels(with_comments(MAX_GIF_BLOCKS // 2 - 8), field="f").shape == (8, 8, 3)
    with pytest.raises(InvalidArgument, match=rf"^images\[0\].encoded: GIF has over {MAX_GIF_BLOCKS} extension blocks before its image"):
        decode_pixels(with_comments(MAX_GIF_BLOCKS + 1), field="images[0].encoded")
    with pytest.raises(InvalidArgument, match="GIF has over"):  # one comment of many one-byte sub-blocks
        decode_pixels(with_comments(1, sub_blocks=MAX_GIF_BLOCKS), field="f")


def _tiff_of_strips(strips: int, *, big: bool = False, order: str = "<", tags: tuple[int, int] = (273, 279)) -> bytes:
    """An 8x8 greyscale TIFF (BigTIFF with ``big``; ``order``: struct's "<" or ">") of
    ``strips`` strips, all of the one 8-row block: a valid file, whose every strip's
    offset and byte count Pillow reads. ``tags``: those of the offsets and the byte
    counts (TileOffsets and TileByteCounts, 324 and 325, make a file that lacks its tiles' size)."""
    count, offset = ("Q", "Q") if big else ("H", "I")  # a directory's entry count; an offset or an entry's count of values
    header = (b"II" if order == "<" else b"MM") + (struct.pack(f"{order}HHHQ", 43, 8, 0, 16) if big else struct.pack(f"{order}HI", 42, 8))
    fields = [(256, 8), (257, 8), (258, 8), (259, 1), (262, 1), (tags[0], None), (277, 1), (278, 8), (tags[1], None)]  # None: one LONG per strip
    entry_bytes, offset_bytes = 4 + 2 * struct.calcsize(offset), struct.calcsize(offset)
    pixels_at = len(header) + struct.calcsize(count) + len(fields) * entry_bytes + offset_bytes
    arrays = {tags[0]: pixels_at + 64, tags[1]: pixels_at + 64 + 4 * strips}  # where the offsets and the byte counts lie

    def entry(tag: int, value: int | None) -> bytes:
        if value is None:  # LONGs at an offset
            return struct.pack(f"{order}HH{offset}{offset}", tag, 4, strips, arrays[tag])
        return struct.pack(f"{order}HH{offset}", tag, 4, 1) + struct.pack(f"{order}I", value).ljust(offset_bytes, b"\x00")  # one LONG, inline

    directory = struct.pack(f"{order}{count}", len(fields)) + b"".join(entry(tag, value) for tag, value in fields) + bytes(offset_bytes)
    return header + directory + bytes(range(64)) + struct.pack(f"{order}{strips}I", *[pixels_at] * strips) + struct.pack(f"{order}{strips}I", *[8] * strips)


def test_a_tiff_with_more_strips_than_its_image_can_need_is_refused_before_pillow_reads_them():
    # A million strips of one 8x8 image (8 MB) took 5.6 s and 270 MB to open and decode,
    # each strip's offset read into a Python tuple and decoded one at a time.
    from explaind.imaging import MAX_TIFF_DIRECTORY_ENTRIES, MAX_TIFF_STRIPS, decode_pixels

    for big, order in ((False, "<"), (False, ">"), (True, "<")):
        assert decode_pixels(_tiff_of_strips(3, big=big, order=order), field="f")[:, :, 0].ravel().tolist() == list(range(64))
        with pytest.raises(InvalidArgument, match=rf"^images\[0\].encoded: TIFF has {MAX_TIFF_STRIPS + 1} strips or tiles; at most {MAX_TIFF_STRIPS}"):
            decode_pixels(_tiff_of_strips(MAX_TIFF_STRIPS + 1, big=big, order=order), field="images[0].encoded")
        with pytest.raises(InvalidArgument, match=rf"^f: TIFF has {MAX_TIFF_STRIPS + 1} strips or tiles"):
            decode_pixels(_tiff_of_strips(MAX_TIFF_STRIPS + 1, big=big, order=order, tags=(324, 325)), field="f")
    assert decode_pixels(_tiff_of_strips(MAX_TIFF_STRIPS), field="f").shape == (8, 8, 3)
    # A BigTIFF directory's entry count is 64 bits: Pillow would read each entry in Python.
    many_entries = bytearray(_tiff_of_strips(1, big=True))
    for entries in (2**40, MAX_TIFF_DIRECTORY_ENTRIES + 1):
        many_entries[16:24] = struct.pack("<Q", entries)
        with pytest.raises(InvalidArgument, match=rf"^f: TIFF directory has {entries} entries; at most {MAX_TIFF_DIRECTORY_ENTRIES}"):
            decode_pixels(bytes(many_entries), field="f")


def _bigtiff_with_values_at_one_place(values: int, size: int) -> bytes:
    """``_tiff_of_strips(3, big=True)`` whose directory also has ``values`` private tags,
    each of the same ``size`` bytes appended after its pixels."""
    stored = _tiff_of_strips(3, big=True)
    entries = [stored[24 + 20 * index:44 + 20 * index] for index in range(struct.unpack("<Q", stored[16:24])[0])]
    entries += [struct.pack("<HHQQ", 65000 + index, 7, size, len(stored)) for index in range(values)]  # UNDEFINED bytes, sorted last
    return stored[:8] + struct.pack("<Q", len(stored) + size) + stored[16:] + bytes(size) + struct.pack("<Q", len(entries)) + b"".join(entries) + bytes(8)


def test_a_bigtiff_whose_tag_values_add_up_to_more_than_the_file_is_refused():
    # BigTIFF's entries are read in its own layout (8-byte counts and offsets): in classic
    # TIFF's, its tags' values were not found at all.
    from explaind.imaging import decode_pixels

    assert decode_pixels(_bigtiff_with_values_at_one_place(1, 4096), field="f")[:, :, 0].ravel().tolist() == list(range(64))
    values = 3 * 4096 + 2 * 3 * 4  # and the three strips' offsets and byte counts, LONGs
    with pytest.raises(InvalidArgument, match=rf"^f: TIFF tag values add up to {values} bytes, more than the file's \d+"):
        decode_pixels(_bigtiff_with_values_at_one_place(3, 4096), field="f")


def test_a_tiff_header_pillow_reads_in_another_layout_is_checked_in_that_layout():
    # Pillow opens version 42 written in the other byte order (II 00 2A, MM 2A 00) as TIFF,
    # and reads a big-endian BigTIFF header (MM 00 2B) as classic TIFF's: a file of a
    # million strips under these headers decoded unchecked, or was checked as BigTIFF.
    from explaind.imaging import MAX_TIFF_STRIPS, decode_pixels

    for order, version in (("<", b"\x00*"), (">", b"*\x00"), (">", b"\x00+")):
        def headed(strips: int) -> bytes:
            data = _tiff_of_strips(strips, order=order)
            return data[:2] + version + data[4:]

        assert decode_pixels(headed(3), field="f")[:, :, 0].ravel().tolist() == list(range(64))
        with pytest.raises(InvalidArgument, match=rf"^f: TIFF has {MAX_TIFF_STRIPS + 1} strips or tiles; at most {MAX_TIFF_STRIPS}"):
            decode_pixels(headed(MAX_TIFF_STRIPS + 1), field="f")
    # Checked as BigTIFF too, should Pillow read it as BigTIFF.
    with pytest.raises(InvalidArgument, match=rf"^f: TIFF has {MAX_TIFF_STRIPS + 1} strips or tiles; at most {MAX_TIFF_STRIPS}"):
        decode_pixels(_tiff_of_strips(MAX_TIFF_STRIPS + 1, big=True, order=">"), field="f")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow's word for the missing offset
def test_a_tiff_directory_that_ends_the_file_is_checked_to_its_last_entry():
    # Pillow reads a directory cut off before its next-directory offset, keeping every
    # entry it read: the last entry, ending the file, counts as much as any other.
    from explaind.imaging import MAX_TIFF_STRIPS, decode_pixels

    def strip_offsets_last(strips: int) -> bytes:
        directory_at = 8 + 64 + 4 * strips  # after the header, the 8x8 pixels and the offsets
        fields = [(256, 8), (257, 8), (258, 8), (259, 1), (262, 1), (277, 1), (278, 8), (273, 8 + 64)]
        return (b"II" + struct.pack("<HI", 42, directory_at) + bytes(range(64)) + struct.pack(f"<{strips}I", *[8] * strips)
                + struct.pack("<H", len(fields))
                + b"".join(struct.pack("<HHII", tag, 4, strips if tag == 273 else 1, value) for tag, value in fields))

    assert decode_pixels(strip_offsets_last(3), field="f")[:, :, 0].ravel().tolist() == list(range(64))
    with pytest.raises(InvalidArgument, match=rf"^f: TIFF has {MAX_TIFF_STRIPS + 1} strips or tiles; at most {MAX_TIFF_STRIPS}"):
        decode_pixels(strip_offsets_last(MAX_TIFF_STRIPS + 1), field="f")


def test_a_jpeg_with_more_scans_than_any_encoder_writes_is_refused_before_it_is_decoded():
    # 1000 repeated scans (122 KB at 4096x4096) took 15 s to decode against 0.2 s for the
    # plain file; 10000 (330 KB) would take minutes. Ordinary progressive files still decode.
    from explaind.imaging import MAX_JPEG_SCANS, decode_pixels

    rng = np.random.default_rng(0)
    for options in ({"progressive": True}, {"progressive": True, "subsampling": 0}, {}):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", **options)
        assert decode_pixels(buffer.getvalue(), field="f").shape == (64, 64, 3)
    assert decode_pixels(_progressive_jpeg_with_extra_scans(64, 10), field="f").shape == (64, 64, 3)
    with pytest.raises(InvalidArgument, match=rf"^images\[0\].encoded: JPEG has {MAX_JPEG_SCANS + 6} scans; at most {MAX_JPEG_SCANS}"):
        decode_pixels(_progressive_jpeg_with_extra_scans(64, MAX_JPEG_SCANS), field="images[0].encoded")


def test_jpeg_scans_are_counted_in_the_image_s_own_stream_not_in_its_metadata_or_appended_data():
    # Bytes FF DA were counted anywhere in the file: a phone's motion photo (a video of a
    # few MB appended after the JPEG: 8 MB held about 120 such pairs by chance), or an
    # EXIF thumbnail or profile holding them, was refused as a scan bomb.
    from explaind.imaging import MAX_JPEG_MARKERS, MAX_JPEG_SCANS, decode_pixels

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", progressive=True)
    plain = buffer.getvalue()
    pairs = b"\xff\xda" * (MAX_JPEG_SCANS + 1)
    app1 = b"\xff\xe1" + (2 + len(pairs)).to_bytes(2, "big") + pairs  # as an EXIF thumbnail's bytes
    for data in (plain[:2] + app1 + plain[2:], plain + pairs):
        assert data.count(b"\xff\xda") > MAX_JPEG_SCANS
        assert decode_pixels(data, field="f").shape == (64, 64, 3)
    # Cut off in the fill bytes before a marker (after a comment, where EOI was): the walk
    # ends there, and the decoder, not an index out of range, judges the file.
    baseline = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(baseline, "JPEG")
    assert decode_pixels(baseline.getvalue()[:-2] + b"\xff\xfe\x00\x02\xff", field="f").shape == (64, 64, 3)
    # The walk is bounded: a file of empty comment segments before its end is refused.
    padded = plain[:-2] + b"\xff\xfe\x00\x02" * MAX_JPEG_MARKERS + plain[-2:]
    with pytest.raises(InvalidArgument, match=rf"^f: JPEG has over {MAX_JPEG_MARKERS} markers"):
        decode_pixels(padded, field="f")


def test_a_multi_picture_jpeg_with_more_scans_than_any_encoder_writes_is_refused_too():
    # Pillow opens a JPEG with an MPF segment (cameras' multi-picture files) as format
    # MPO, which the scan count skipped: 1000 repeated scans of a 1024² image decoded in
    # 0.9 s, and a 4096² one would take 16 times as long.
    from explaind.imaging import MAX_JPEG_SCANS, decode_pixels

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))], progressive=True)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "MPO"
    assert decode_pixels(data, field="f").shape == (64, 64, 3)
    first_end = data.index(b"\xff\xd9")  # the first picture's EOI: the one decoded
    last_scan = data[data.rindex(b"\xff\xda", 0, first_end):first_end]
    with pytest.raises(InvalidArgument, match=rf"^f: JPEG has \d+ scans; at most {MAX_JPEG_SCANS}"):
        decode_pixels(data[:first_end] + last_scan * MAX_JPEG_SCANS + data[first_end:], field="f")


def test_run_length_encoded_bmp_files_are_refused_before_pillow_decodes_them_in_python():
    # Pillow's RLE decoder runs in Python a pixel at a time: 17 KB (one pixel, then end of
    # line, for each of 4096 rows) took 5.8 s to decode to 4096x4096.
    import struct

    from explaind.imaging import decode_pixels

    def bmp(bits: int, compression: int, rows: bytes, side: int = 64) -> bytes:
        palette = b"".join(bytes((i, i, i, 0)) for i in range(1 << bits))
        header = struct.pack("<IiiHHIIiiII", 40, side, side, 1, bits, compression, len(rows), 2835, 2835, 1 << bits, 0)
        offset = 14 + len(header) + len(palette)
        return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + header + palette + rows

    assert decode_pixels(bmp(8, 0, bytes(64 * 64)), field="f").shape == (64, 64, 3)
    for bits, compression in ((8, 1), (4, 2)):
        with pytest.raises(InvalidArgument, match=r"^images\[0\].encoded: run-length encoded \(RLE4/RLE8\) BMP files are not supported"):
            decode_pixels(bmp(bits, compression, b"\x01\x07\x00\x00" * 64 + b"\x00\x01"), field="images[0].encoded")


def test_png_chunks_pillow_inflates_while_opening_are_bounded():
    # 300 iCCP chunks of 1 MB zeros each (670 KB) took 4.7 s to open; 63 zTXt chunks 3.5 s.
    import struct
    import zlib

    from explaind.imaging import MAX_PNG_CHUNKS, MAX_PNG_COMPRESSED_TEXT_CHUNKS, decode_pixels

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    plain = buffer.getvalue()

    def with_chunks(*chunks: bytes) -> bytes:
        return plain[:33] + b"".join(chunks) + plain[33:]  # after IHDR

    profile = chunk(b"iCCP", b"p\x00\x00" + zlib.compress(bytes(1000)))
    text = chunk(b"zTXt", b"k\x00\x00" + zlib.compress(bytes(1000)))
    assert decode_pixels(with_chunks(profile, *[text] * MAX_PNG_COMPRESSED_TEXT_CHUNKS), field="f").shape == (8, 8, 3)
    with pytest.raises(InvalidArgument, match=r"^images\[0\].encoded: PNG has 2 or more iCCP \(colour profile\) chunks; at most one"):
        decode_pixels(with_chunks(profile, profile), field="images[0].encoded")
    with pytest.raises(InvalidArgument, match=rf"^images\[0\].encoded: PNG has over {MAX_PNG_COMPRESSED_TEXT_CHUNKS} zTXt/iTXt chunks"):
        decode_pixels(with_chunks(*[text] * (MAX_PNG_COMPRESSED_TEXT_CHUNKS + 1)), field="images[0].encoded")
    # After the image data too: Pillow reads those chunks at the end of its load.
    with pytest.raises(InvalidArgument, match=r"PNG has 2 or more iCCP"):
        decode_pixels(plain[:-12] + profile + profile + plain[-12:], field="f")
    # Counted as chunks, not as bytes: a profile's name, or compressed data, may spell another chunk's type.
    named = chunk(b"iCCP", b"iCCP zTXt\x00\x00" + zlib.compress(bytes(1000)))
    assert decode_pixels(with_chunks(named, *[chunk(b"tEXt", b"k\x00zTXt iCCP")] * 20), field="f").shape == (8, 8, 3)
    # Image data cut into one-byte chunks, which Pillow handles one by one in Python.
    data = zlib.compress(bytes(1 + 8 * 3) * 8)
    many = plain[:33] + b"".join(chunk(b"IDAT", data[i:i + 1]) for i in range(len(data))) + chunk(b"IEND", b"")
    assert decode_pixels(many, field="f").shape == (8, 8, 3)
    padded = plain[:33] + chunk(b"tEXt", b"k\x00v") * MAX_PNG_CHUNKS + plain[33:]
    with pytest.raises(InvalidArgument, match=rf"PNG has over {MAX_PNG_CHUNKS} chunks"):
        decode_pixels(padded, field="f")


def test_engine_rejects_bad_samples_and_empty_sets(engine):
    with pytest.raises(InvalidArgument, match=r"samples\[0\].label"):
        engine.create_sample_set("bad", "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 6)])
    for bad_id in ("Bad", "-bad", "bad\n", "bad/x", "b" * 64):  # "bad\n" got through a "$"-anchored pattern
        with pytest.raises(InvalidArgument, match=r"^sample_set_id: .* is not a valid id"):
            engine.create_sample_set(bad_id, "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)])
    # Attributes are bounded: a sample's record is read back with every page of its set.
    pixels = np.zeros((8, 8, 3), np.uint8)
    for attributes, field, message in (
        ({f"a{i}": "x" for i in range(65)}, "samples[1].attributes", "65 attributes, more than the 64 allowed"),
        ({"n" * 129: "x"}, "samples[1].attributes", "an attribute name of 129 characters"),
        ({"source": "u" * 1025}, 'samples[1].attributes["source"]', "1025 characters, more than the 1024 allowed"),
        ({"it's": "u" * 1025}, 'samples[1].attributes["it\'s"]', "1025 characters, more than the 1024 allowed"),
        ({"": "x"}, "samples[1].attributes", "an attribute without a name"),
    ):
        with pytest.raises(InvalidArgument, match=re.escape(message)) as refused:
            engine.create_sample_set("attributes", "", [NewSample.from_array(pixels, 0), NewSample.from_array(pixels, 0, attributes)])
        assert refused.value.field == field
    at_the_limits = {"n" * 128: "u" * 1024, **{f"a{i}": "u" * 1024 for i in range(63)}}  # each bound itself is allowed
    engine.create_sample_set("attributes", "", [NewSample.from_array(pixels, 0, at_the_limits)])
    # A display name is printed as it is by the CLI's listing, for every caller: a hostile
    # one's terminal escapes, line breaks or NULs were stored and listed back.
    for name, shown in (("\x1b[2Jred", "(U+001B) at 0"), ("two\nlines", "(U+000A) at 3"), ("nul\x00", "(U+0000) at 3"), ("c1\x9b31m", "(U+009B) at 2"),
                        ("del\x7f", "(U+007F) at 3")):
        with pytest.raises(InvalidArgument, match="control character .*" + re.escape(shown)) as refused:
            engine.create_sample_set("named", name, [NewSample.from_array(pixels, 0)])
        assert refused.value.field == "display_name"
    # Nor bidirectional overrides, embeddings or isolates ("Trojan Source"): U+202E showed
    # the rest of the listing row, "by <owner>" included, reversed.
    for name, shown in (("ab\u202ecd", "bidirectional-control character '\\u202e' (U+202E) at 2"), ("\u202aa", "U+202A) at 0"),
                        ("x\u2066y", "U+2066) at 1"), ("xy\u2069", "U+2069) at 2"),
                        # Nor the line and paragraph separators, line breaks to str.splitlines.
                        ("one\u2028two", "line-separator character '\\u2028' (U+2028) at 3"),
                        ("\u2029p", "paragraph-separator character '\\u2029' (U+2029) at 0")):
        with pytest.raises(InvalidArgument, match=re.escape(shown)) as refused:
            engine.create_sample_set("named", name, [NewSample.from_array(pixels, 0)])
        assert refused.value.field == "display_name"
    assert engine.create_sample_set("named", "Café ✓ 🙂 tab-free", [NewSample.from_array(pixels, 0)]).display_name == "Café ✓ 🙂 tab-free"
    # Right-to-left letters, and the LRM/RLM marks that open nothing, are names people write.
    # U+202F (narrow no-break space, French "1\u202f000"), just past the overrides, is text.
    for i, name in enumerate(("مجموعة ١", "קבוצה\u200f 2", "a\u200eb", "lot 1\u202f000")):
        assert engine.create_sample_set(f"rtl{i}", name, [NewSample.from_array(pixels, 0)]).display_name == name
    for top_k in (9, -1):  # a negative k reached topk() and failed as INTERNAL
        with pytest.raises(InvalidArgument, match="top_k"):
            engine.predict(torch.rand(1, 3, 64, 64), top_k=top_k)


def test_a_closed_engine_refuses_predictions_and_jobs_as_shutting_down(tmp_path, classifier_dir):
    # Not a hang, nor a forward or a job run on a server whose models are going away.
    engine = _engine(tmp_path, classifier_dir)
    engine.create_sample_set("kept", "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)])
    engine.close()
    with pytest.raises(Unavailable, match="shutting down"):
        engine.predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(Unavailable, match="shutting down"):
        engine.evaluate_sample_set("kept")


def test_the_default_top_k_of_a_classifier_of_fewer_classes_ranks_them_all(tmp_path):
    # top_k 0 means 5, or every class of a classifier of fewer: a 3-class model failed in topk().
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    config = (default_config().replace("classifier", loader="torchvision", path="", name="resnet18", weights=str(weights), image_size=32)
              .replace("server", data_dir=str(tmp_path / "data")))
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    engine.load()
    try:
        output = engine.predict(torch.rand(2, 3, 32, 32), top_k=0)
        assert sorted(output.class_indices[0].tolist()) == [0, 1, 2] and output.probabilities.sum(axis=1) == pytest.approx([1.0, 1.0])
    finally:
        engine.close()


def test_a_set_created_without_an_id_gets_one_of_its_own_of_the_documented_form(engine):
    # CreateSampleSetRequest.sample_set_id: "Empty: the server picks one ("set-<12 hex>")".
    pixels = np.zeros((8, 8, 3), np.uint8)
    ids = [engine.create_sample_set("", "", [NewSample.from_array(pixels, 0)]).sample_set_id for _ in range(3)]
    assert all(re.fullmatch(r"set-[0-9a-f]{12}", set_id) for set_id in ids) and len(set(ids)) == 3, ids


def test_the_checks_before_an_upload_decodes_its_images_count_samples_against_the_sets_owner(tmp_path, classifier_dir):
    # Asked before a CreateSampleSet or AppendSamples decodes its images (which a refused one
    # would pay for in full): an admin's append to another caller's set counts against its
    # owner, whose sets are full, not against the admin's own.
    callers = tmp_path / "callers"
    callers.write_text("analyst tokenANA\nroot tokenROOT\n")
    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", data_dir=str(tmp_path / "data"), callers_file=str(callers), admins=("root",))
    engine = Engine(config, SQLiteStore(tmp_path / "data", max_samples_per_owner=2), Metrics())
    engine.load()
    try:
        engine.create_sample_set("full", "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)] * 2, caller="analyst")
        for check in (lambda: engine.check_append("full", 1, caller="root"), lambda: engine.check_create("", 1, caller="analyst")):
            with pytest.raises(ResourceExhausted, match="caller 'analyst' holds 2 samples in its sample sets, and 1 more would pass"):
                check()
        engine.check_create("", 2, caller="root")  # the admin's own sets have room
    finally:
        engine.close()


def test_a_create_past_the_check_to_an_id_another_caller_took_is_told_to_choose_another(tmp_path, classifier_dir):
    # Two creates of one id passing check_create at once: the store's own check told the
    # one that lost, of another caller's set, "append to it or delete it first", which
    # it may not do. Worded as check_create words it now, for the owner, an admin, another.
    callers = tmp_path / "callers"
    callers.write_text("monitoring tokenMON\nanalyst tokenANA\nroot tokenROOT\n")
    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", data_dir=str(tmp_path / "data"), callers_file=str(callers), admins=("root",))
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    engine.load()
    sample = NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)
    try:
        engine.create_sample_set("train", "", [sample], caller="monitoring")
        for caller, advice in (("analyst", "exists, owned by caller 'monitoring'; choose another id"),
                               ("monitoring", "exists; append to it or delete it first"), ("root", "exists; append to it or delete it first")):
            for create in (lambda: engine.check_create("train", 1, caller=caller),
                           lambda: engine.create_sample_set("train", "", [sample], caller=caller)):  # the store's check
                with pytest.raises(AlreadyExists) as taken:
                    create()
                assert (taken.value.field, taken.value.description) == ("sample_set_id", f"sample set 'train' already {advice}")
    finally:
        engine.close()


def test_an_evaluation_sent_again_is_answered_with_its_job_even_once_its_set_is_gone(engine):
    # A retry of an EvaluateSampleSet whose answer was lost gets the operation the first
    # started, not NOT_FOUND for the set that operation has since finished with.
    engine.create_sample_set("once", "", [NewSample.from_array(np.zeros((64, 64, 3), np.uint8), 0)])
    request = RequestKey("00000000-0000-4000-8000-000000000001", "evaluate once")
    first = engine.evaluate_sample_set("once", request=request)
    assert engine.jobs.wait(first.record.job_id, 60).record.state == "succeeded"
    engine.delete_sample_set("once")
    assert engine.evaluate_sample_set("once", request=request).record.job_id == first.record.job_id


def test_an_upload_is_finished_by_an_append_of_no_samples_and_nothing_else_appends_none(engine):
    pixels = np.zeros((8, 8, 3), np.uint8)
    assert engine.create_sample_set("up", "", [NewSample.from_array(pixels, 0)], uploading=True).uploading
    with pytest.raises(FailedPrecondition, match=re.escape("sample set 'up' is still being uploaded (1 sample so far)")):  # not "1 samples"
        engine.evaluate_sample_set("up")  # no job runs on part of a set
    with pytest.raises(InvalidArgument, match="no samples to append") as refused:
        engine.append_samples("up", [])
    assert refused.value.field == "samples"
    finished = engine.append_samples("up", [], finish_upload=True)
    assert not finished.uploading and finished.sample_count == 1


def test_a_sample_set_whose_caller_stopped_waiting_is_not_stored(engine):
    # A CreateSampleSet past its deadline went on writing, and the set its caller was told
    # had failed turned up later: a retry then met ALREADY_EXISTS.
    from explaind.errors import Cancelled
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    rounds = 3  # of BLOB_WRITE_THREADS images written at once, the caller asked before each
    samples = [NewSample.from_array(np.full((8, 8, 3), i, np.uint8), 0) for i in range(rounds * BLOB_WRITE_THREADS)]
    answers = iter([True, True, False])
    with pytest.raises(Cancelled, match="nothing was stored"):
        engine.create_sample_set("left", "", samples, caller_waits=lambda: next(answers))
    with pytest.raises(NotFound):
        engine.store.get_sample_set("left")
    assert engine.store.delete_unused_blobs() == 2 * BLOB_WRITE_THREADS  # the images written before it stopped
    engine.create_sample_set("kept", "", samples[:1])
    answers = iter([True] * rounds + [False])  # gone while the last round was written
    with pytest.raises(Cancelled):
        engine.append_samples("kept", samples[1:], caller_waits=lambda: next(answers))
    assert engine.store.get_sample_set("kept").sample_count == 1

    class CallerGone:
        def is_active(self) -> bool:
            return False

    dot = sample_sets_pb2.Sample(image=common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[1, 1, 3], data=bytes(3))))
    servicer = SampleSetServicer(engine)
    with pytest.raises(Cancelled):
        servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="gone", samples=[dot]), CallerGone())
    with pytest.raises(Cancelled):
        servicer.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="kept", samples=[dot]), CallerGone())
    assert [info.sample_set_id for info in engine.store.list_sample_sets()] == ["kept"]
    assert engine.store.get_sample_set("kept").sample_count == 1


def test_a_sample_set_whose_caller_stopped_waiting_for_the_store_is_not_stored(engine, monkeypatch):
    # The caller was asked only before the store's transaction: a CreateSampleSet waiting
    # there (behind another's transaction) past its caller's deadline stored the set after
    # all. Its retry had made the set meanwhile, and the upload went on, failed and deleted
    # it: the late first attempt, its request_id forgotten with that set, made it again.
    from explaind.errors import Cancelled

    gone = threading.Event()
    transaction = engine.store._transaction

    @contextmanager
    def waited_for() -> Iterator[sqlite3.Connection]:
        gone.set()  # the caller's deadline passes as the request waits for the store
        with transaction() as db:
            yield db

    monkeypatch.setattr(engine.store, "_transaction", waited_for)
    samples = [NewSample.from_array(np.full((8, 8, 3), i, np.uint8), 0) for i in range(2)]
    key = RequestKey("123e4567-e89b-42d3-a456-426614174000", "fingerprint")
    with pytest.raises(Cancelled, match="nothing was stored"):
        engine.create_sample_set("late", "", samples, uploading=True, caller_waits=lambda: not gone.is_set(), request=key)
    with pytest.raises(NotFound):
        engine.store.get_sample_set("late")
    assert engine.store.sample_set_of_request(key) is None
    monkeypatch.undo()
    engine.create_sample_set("kept", "", samples[:1])
    gone.clear()
    monkeypatch.setattr(engine.store, "_transaction", waited_for)
    with pytest.raises(Cancelled, match="nothing was stored"):
        engine.append_samples("kept", samples[1:], caller_waits=lambda: not gone.is_set())
    assert engine.store.get_sample_set("kept").sample_count == 1


def test_a_sample_set_without_samples_is_refused_naming_samples_and_not_stored(engine):
    # An upload continued later starts with its first samples too: an empty set is a mistake.
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    for upload_continues in (False, True):
        request = sample_sets_pb2.CreateSampleSetRequest(sample_set_id="empty", upload_continues=upload_continues)
        with pytest.raises(InvalidArgument, match="a sample set needs at least one sample") as refused:
            SampleSetServicer(engine).CreateSampleSet(request, _CallerWaits())
        assert refused.value.field == "samples"
    assert engine.store.list_sample_sets() == []


def test_top_k_zero_means_five_labels_and_may_be_every_class(engine):
    images = torch.rand(2, 3, 64, 64)
    assert engine.predict(images, top_k=0).class_indices.shape == (2, 5)
    assert engine.predict(images, top_k=6).class_indices.shape == (2, 6)  # all six classes of the world classifier


def test_requests_batched_together_each_get_their_own_top_k_and_features(engine, monkeypatch):
    # The batcher ranks a batch once, as deep as its deepest request; each request gets
    # its own k, and features only if it asked.
    run, entered, gate, batch_sizes = engine._batcher._run, threading.Event(), threading.Event(), []

    def held_run(images):
        batch_sizes.append(len(images))
        entered.set()
        assert gate.wait(30)
        return run(images)

    monkeypatch.setattr(engine._batcher, "_run", held_run)
    images = [torch.rand(n, 3, 64, 64) for n in (1, 2, 3, 2)]
    options = [{}, {"top_k": 1}, {"top_k": 6, "return_features": True}, {"top_k": 0}]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(engine.predict, images[0])  # holds the model: the rest queue
        assert entered.wait(5)
        futures = [engine.submit_predict(x, **o) for x, o in zip(images[1:], options[1:], strict=True)]
        gate.set()
        first.result(30)
        batched = [engine.finish_predict(future.result(30)) for future in futures]
    assert batch_sizes == [1, 7]
    monkeypatch.setattr(engine._batcher, "_run", run)
    for x, o, output in zip(images[1:], options[1:], batched, strict=True):
        alone = engine.predict(x, **o)
        assert output.class_indices.shape == (len(x), o["top_k"] or 5)
        assert output.class_indices.tolist() == alone.class_indices.tolist()
        assert output.labels == alone.labels
        np.testing.assert_allclose(output.probabilities, alone.probabilities, rtol=1e-5, atol=1e-6)
        assert (output.features is None) == (not o.get("return_features"))
    np.testing.assert_allclose(batched[1].features, engine.predict(images[2], return_features=True).features, rtol=1e-4, atol=1e-5)


def test_a_stored_set_the_served_classifier_cannot_use_is_refused_saying_why(engine):
    # Labels are checked at upload, but a data dir outlives its classifier: a set uploaded
    # for seven classes, or left empty, reaches the jobs only through the store.

    with engine.store.writing_blobs() as put:
        digest = put(encode_png(np.zeros((8, 8, 3), np.uint8)))
        engine.store.create_sample_set("seven-classes", "", [SampleRecord(digest, 0), SampleRecord(digest, 6)])
        engine.store.create_sample_set("empty", "", [])
    with pytest.raises(InvalidArgument, match="has labels up to 6, but the served classifier has 6 classes") as refused:
        engine.evaluate_sample_set("seven-classes")
    assert refused.value.field == "sample_set_id"
    with pytest.raises(InvalidArgument, match="sample set 'empty' is empty"):
        engine.evaluate_sample_set("empty")
    # Checked again when a job runs (the set may be gone by then), naming the request's field.
    with pytest.raises(NotFound) as missing:
        engine.sample_set_features("gone", field="validation_sample_set_id")
    assert missing.value.field == "validation_sample_set_id"


def test_model_metadata_gives_the_queue_delay_in_seconds_and_the_request_limits(engine):
    # The config's delay is in milliseconds; the default 0 hid a wrong conversion.
    from explaind.imaging import MAX_IMAGE_SIDE
    from explaind.service.inference import InferenceServicer
    from explaind.v1 import inference_pb2

    engine.config = engine.config.replace("batching", max_queue_delay_ms=250, max_images_per_request=77).replace("server", max_pixels_per_request=12345)
    meta = InferenceServicer(engine, serving=lambda: True).GetModelMetadata(inference_pb2.GetModelMetadataRequest(), None)
    assert meta.batching.max_queue_delay_seconds == pytest.approx(0.25)
    limits = meta.limits
    assert (limits.max_images_per_request, limits.max_pixels_per_request, limits.max_image_side) == (77, 12345, MAX_IMAGE_SIDE)


def test_model_metadata_gives_the_served_geometry_queue_and_limits_as_configured(tmp_path, classifier_dir):
    # Each field from its own setting, none at its default: a field dropped or read from
    # another setting answers a value the client then sizes its requests by.
    from explaind.service import convert
    from explaind.service.inference import InferenceServicer
    from explaind.v1 import inference_pb2

    config = (default_config().replace("classifier", path=str(classifier_dir), resize_size=80, interpolation="bicubic").replace("clip", path="")
              .replace("server", data_dir=str(tmp_path / "data"), max_message_bytes=5 << 20, max_samples_per_caller=99)
              .replace("batching", max_batch_size=3, max_queue_size=9, max_images_per_request=7, max_queued_images_per_caller=4))
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    engine.load()
    try:
        meta = InferenceServicer(engine, serving=lambda: True).GetModelMetadata(inference_pb2.GetModelMetadataRequest(), None)
    finally:
        engine.close()
    classifier, batching, limits = meta.classifier, meta.batching, meta.limits
    assert (classifier.image_size, classifier.resize_size, classifier.interpolation) == (64, 80, "bicubic")
    assert (classifier.feature_layer, classifier.head, classifier.feature_dim, classifier.backend, classifier.device) == ("layer3", "fc", 128, "eager", "cpu")
    assert (batching.max_batch_size, batching.max_queue_size, batching.max_queued_images_per_caller) == (3, 9, 4)
    assert (limits.max_message_bytes, limits.max_samples_per_caller, limits.max_images_per_request) == (5 << 20, 99, 7)
    loaded = {component.name: component.loaded for component in meta.components}
    assert loaded["classifier"] and not loaded["clip"] and tuple(meta.capabilities) == convert.CAPABILITIES


def test_predict_and_evaluate_are_unavailable_until_the_served_head_is_final(engine):
    # The model file's head is loaded before the stored active head version replaces it:
    # an answer meanwhile would come from a head about to go, though the engine could give one.
    from explaind.errors import Unavailable
    from explaind.service.inference import InferenceServicer
    from explaind.v1 import common_pb2, inference_pb2

    engine.create_sample_set("loading", "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)])
    predict = inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8)))])
    evaluate = inference_pb2.EvaluateSampleSetRequest(sample_set_id="loading")
    restoring = InferenceServicer(engine, serving=lambda: False)
    with pytest.raises(Unavailable, match="models are still loading"):
        restoring.Predict(predict, None)
    with pytest.raises(Unavailable, match="models are still loading"):
        restoring.EvaluateSampleSet(evaluate, None)
    assert engine.store.list_jobs() == []  # nothing was queued
    assert restoring.GetModelMetadata(inference_pb2.GetModelMetadataRequest(), None).classifier.feature_dim == 128  # what a client asks first


def test_evaluate_sample_set_passes_its_batch_size_and_grid_size_on_to_be_checked(engine):
    # A request's options the servicer dropped would run with the defaults, silently.
    from explaind.service.inference import InferenceServicer
    from explaind.v1 import inference_pb2

    engine.create_sample_set("options", "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)])
    servicer = InferenceServicer(engine, serving=lambda: True)
    for field, value in (("batch_size", 4097), ("max_grid_images", 1025)):
        with pytest.raises(InvalidArgument, match="must be between 1 and") as refused:
            servicer.EvaluateSampleSet(inference_pb2.EvaluateSampleSetRequest(sample_set_id="options", **{field: value}), None)
        assert refused.value.field == field
    assert engine.store.list_jobs() == []


def test_a_predict_past_its_deadline_is_deadline_exceeded_and_its_queued_batch_is_dropped(engine, monkeypatch):
    # The caller's own deadline hides the server's code from it; the server's code is what
    # its metrics and logs count, and the queued request must not still run.
    from concurrent.futures import Future

    from explaind.errors import DeadlineExceeded
    from explaind.service.inference import InferenceServicer
    from explaind.v1 import common_pb2, inference_pb2

    never = Future()
    monkeypatch.setattr(engine, "submit_predict", lambda images, **options: never)

    class Context:
        def add_callback(self, callback):
            pass

        def time_remaining(self):
            return 0.05

    request = inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8)))])
    with pytest.raises(DeadlineExceeded):
        InferenceServicer(engine, serving=lambda: True).Predict(request, Context())
    assert never.cancelled()


def test_a_predict_whose_caller_left_is_cancelled_and_its_queued_batch_dropped(engine, monkeypatch):
    # gRPC runs a call's callbacks when its caller goes: the queued prediction must go with
    # it, not wait out the call's deadline and then run for no one.
    from concurrent.futures import Future

    from explaind.errors import Cancelled
    from explaind.service.inference import InferenceServicer
    from explaind.v1 import common_pb2, inference_pb2

    queued = Future()
    monkeypatch.setattr(engine, "submit_predict", lambda images, **options: queued)

    class CallerGone:
        def add_callback(self, callback):
            callback()  # gone already

        def time_remaining(self):
            return 0.05

    request = inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8)))])
    with pytest.raises(Cancelled, match="the call was cancelled"):
        InferenceServicer(engine, serving=lambda: True).Predict(request, CallerGone())
    assert queued.cancelled()


def test_a_predict_without_a_deadline_waits_for_a_busy_model(engine, monkeypatch):
    # gRPC gives a call without a deadline 9.2e18 s to go, which no lock's wait takes: every
    # such Predict (grpcurl's, a Go client's, raw stubs') queued behind another failed INTERNAL
    # with "OverflowError: timestamp out of range"; a lone one ran at once and hid it.
    from concurrent.futures import Future

    from explaind.service.inference import InferenceServicer
    from explaind.v1 import common_pb2, inference_pb2

    submit = engine.submit_predict

    def busy(images, **options):
        ran, later = submit(images, **options), Future()
        threading.Timer(0.05, lambda: later.set_result(ran.result())).start()  # behind another batch
        return later

    monkeypatch.setattr(engine, "submit_predict", busy)

    class Context:
        def add_callback(self, callback):
            pass

        def time_remaining(self):
            return 9.223372035058369e18  # what grpc's servicer context says without a deadline

    request = inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8)))], top_k=2)
    response = InferenceServicer(engine, serving=lambda: True).Predict(request, Context())
    assert len(response.predictions) == 1 and len(response.predictions[0].labels) == 2


def test_sample_set_listings_use_the_documented_default_and_largest_page_sizes(engine, monkeypatch):
    # ListSampleSets: 0 means 100, at most 1000; ListSamples: 0 means 256, at most 4096.
    # Unit level: thousands of sets or samples are too slow to build here.
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    engine.create_sample_set("paged", "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)])
    limits = []
    list_sets, list_samples = engine.store.list_sample_sets, engine.store.list_samples
    monkeypatch.setattr(engine.store, "list_sample_sets", lambda *, limit, **where: limits.append(limit) or list_sets(limit=limit, **where))
    monkeypatch.setattr(engine.store, "list_samples", lambda set_id, offset, limit, uid=None: limits.append(limit) or list_samples(set_id, offset, limit, uid=uid))
    servicer = SampleSetServicer(engine)
    for page_size in (0, 1000, 1001):
        servicer.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(page_size=page_size), None)
    for page_size in (0, 4096, 4097):
        servicer.ListSamples(sample_sets_pb2.ListSamplesRequest(sample_set_id="paged", page_size=page_size), None)
    assert limits == [100, 1000, 1000, 256, 4096, 4096]


class _EvaluationContext:
    """What ``evaluate`` asks of its job: the stages it enters and progress it reports;
    ``cancel()`` makes the next cancellation check end the job, as a CancelOperation would."""

    def __init__(self):
        self.stages, self.progress, self.cancelled = [], [], False

    def cancel(self):
        self.cancelled = True

    def raise_if_cancelled(self):
        if self.cancelled:
            raise JobCancelled("evaluation")

    def run_time_remaining(self):
        return None  # no run-time limit

    def ran_too_long(self):
        return DeadlineExceeded("the job ran longer than the server allows an operation")

    def stage(self, name):
        self.stages.append(name)

    def report_progress(self, step, total=None, message=""):
        self.progress.append((step, total, message))

    def save_image(self, name, pixels):
        assert name == "mistakes.png"


class _OutOfTimeContext(_EvaluationContext):
    """A job with ``remaining`` seconds left of its run-time limit, ended by its next
    cancellation check once none is, as a JobContext is (DEADLINE_EXCEEDED)."""

    def __init__(self):
        super().__init__()
        self.remaining = 600.0

    def raise_if_cancelled(self):
        super().raise_if_cancelled()
        if not self.remaining:
            raise DeadlineExceeded("the job ran longer than the server allows an operation")

    def run_time_remaining(self):
        return self.remaining


class _OutOfTimeCall:
    """An RPC (a CallContext) with ``remaining`` seconds left before its deadline."""

    def __init__(self):
        self.remaining = 600.0

    def time_remaining(self):
        return self.remaining

    def is_active(self):
        return self.remaining > 0


class _CallWithDeadline:
    """An RPC (a CallContext) whose deadline is ``seconds`` from now, ended then as gRPC ends it."""

    def __init__(self, seconds):
        self.deadline = time.monotonic() + seconds

    def time_remaining(self):
        return max(0.0, self.deadline - time.monotonic())

    def is_active(self):
        return time.monotonic() < self.deadline


def test_an_evaluation_reports_confusion_by_true_row_and_mistakes_most_confident_first(engine, monkeypatch):
    # Sums and the diagonal are the same for a transposed matrix or mistakes in any order;
    # fixed logits pin which cell, which order, which captions.
    from explaind.engine.evaluation import evaluate

    labels = torch.tensor([0, 0, 1, 1, 2])
    logits = torch.full((5, 6), -5.0)
    for row, (predicted, value) in enumerate([(0, 5.0), (1, 1.0), (1, 5.0), (2, 3.0), (1, 0.0)]):
        logits[row, predicted] = value  # mistakes: 1 (circle as square), 3 (square as triangle, surest), 4 (triangle as square, least sure)
    digests = [f"d{i}" for i in range(5)]
    monkeypatch.setattr(engine, "sample_set_logits", lambda *args, **kwargs: (logits, labels, digests))
    grids = []
    monkeypatch.setattr(engine, "sample_grid", lambda shown, captions, job=None: grids.append((shown, captions)) or np.zeros((4, 4, 3), np.uint8))
    version = engine.models.active
    context = _EvaluationContext()
    result = evaluate(engine, context, "fixed", "uid of fixed", 5, version, 0, 2, dense_confusion=True)
    # The stages it timed are the ones the engine exports at zero before its first evaluation.
    exported = {sample.labels["stage"] for family in engine.metrics.registry.collect() if family.name == "explaind_job_stage_duration_seconds"
                for sample in family.samples if sample.labels.get("kind") == "evaluate_sample_set"}
    assert exported == {"start", *context.stages, "finish"} and context.stages
    assert context.progress == [(5, 5, "drawing 2 mistakes")]  # every sample classified by then: progress never goes back
    assert (result.sample_set_id, result.model_version, result.sample_count) == ("fixed", version.version, 5)
    assert not result.confusion_cells
    confusion = np.array(result.confusion_matrix).reshape(6, 6)
    assert (confusion[0, 1], confusion[1, 2], confusion[2, 1]) == (1, 1, 1) and confusion[1, 0] == confusion[2, 0] == 0
    assert [(m.sample_index, m.label, m.predicted) for m in result.mistakes] == [(3, 1, 2), (1, 0, 1), (4, 2, 1)]
    confidence = torch.softmax(logits, dim=1).max(dim=1).values
    assert [m.probability for m in result.mistakes] == pytest.approx(confidence[[3, 1, 4]].tolist())
    assert [(c.count, c.accuracy) for c in result.per_class[:3]] == [(2, 0.5), (2, 0.5), (1, 0.0)]  # by true label (predicted: 1, 3, 1)
    assert all(c.count == 0 and np.isnan(c.accuracy) for c in result.per_class[3:])  # absent classes are not scored 0
    assert result.accuracy == 2 / 5  # exactly, as a head version's evaluation has it (float32 gave 0.4000000059604645)
    # The grid: the max_grid_images most confident mistakes, captioned true>predicted.
    assert grids == [(["d3", "d1"], ["square>triangle", "circle>square"])]
    # Its non-zero cells instead (a matrix too large for a response), the rest alike:
    # most samples first, then row-major.
    sparse = evaluate(engine, _EvaluationContext(), "fixed", "uid of fixed", 5, version, 0, 2, dense_confusion=False)
    assert not sparse.confusion_matrix
    assert [(c.label, c.predicted, c.count) for c in sparse.confusion_cells] == [(0, 0, 1), (0, 1, 1), (1, 1, 1), (1, 2, 1), (2, 1, 1)]
    sparse.ClearField("confusion_cells")
    result.ClearField("confusion_matrix")
    assert sparse == result
    # A grid of one mistake says so, not "drawing 1 mistakes".
    alone = _EvaluationContext()
    evaluate(engine, alone, "fixed", "uid of fixed", 5, version, 0, 1, dense_confusion=True)
    assert alone.progress == [(5, 5, "drawing 1 mistake")]
    labels = torch.tensor([2, 0, 2, 1, 5])
    logits = torch.nn.functional.one_hot(torch.tensor([1, 0, 1, 1, 5]), 6).float()
    sparse = evaluate(engine, _EvaluationContext(), "fixed", "uid of fixed", 5, version, 0, 2, dense_confusion=False)
    assert [(c.label, c.predicted, c.count) for c in sparse.confusion_cells] == [(2, 1, 2), (0, 0, 1), (1, 1, 1), (5, 5, 1)]
    # Every one of the 36 cells, a few twice: ties keep row-major order however many there
    # are (an unstable sort keeps it for a few cells and reorders 17 or more).
    labels = torch.cat([torch.arange(36) // 6, torch.tensor([4, 2, 4])])
    predicted = torch.cat([torch.arange(36) % 6, torch.tensor([0, 3, 0])])
    logits, digests = torch.nn.functional.one_hot(predicted, 6).float(), [f"d{i}" for i in range(len(labels))]
    sparse = evaluate(engine, _EvaluationContext(), "fixed", "uid of fixed", len(labels), version, 0, 2, dense_confusion=False)
    counts = collections.Counter(zip(labels.tolist(), predicted.tolist()))
    assert [(c.label, c.predicted, c.count) for c in sparse.confusion_cells] == sorted(((*cell, n) for cell, n in counts.items()), key=lambda cell: (-cell[2], cell[:2]))


def test_an_evaluation_lists_equally_confident_mistakes_in_sample_order(engine, monkeypatch):
    # Identical images (a set of blank ones, a sample uploaded twice) are mistaken with the
    # same confidence: an unstable sort kept their order for up to 16 and scrambled 17 or
    # more, in the mistakes and the grid, as it did the confusion cells.
    from explaind.engine.evaluation import evaluate

    labels = torch.zeros(20, dtype=torch.long)
    logits = torch.nn.functional.one_hot(torch.ones(20, dtype=torch.long), 6).float()
    digests = [f"d{i}" for i in range(20)]
    monkeypatch.setattr(engine, "sample_set_logits", lambda *args, **kwargs: (logits, labels, digests))
    grids = []
    monkeypatch.setattr(engine, "sample_grid", lambda shown, captions, job=None: grids.append(shown) or np.zeros((4, 4, 3), np.uint8))
    result = evaluate(engine, _EvaluationContext(), "blank", "uid of blank", 20, engine.models.active, 0, 20, dense_confusion=True)
    assert [m.sample_index for m in result.mistakes] == list(range(20))
    assert grids == [digests]


def test_an_evaluation_cancelled_during_its_last_batch_draws_no_grid(engine, monkeypatch):
    # The inference checks for a cancel before each batch: one that comes during the
    # last must still stop the job before it decodes and draws up to 64 mistakes.
    from explaind.engine.evaluation import evaluate

    context = _EvaluationContext()

    def classify_then_cancel(*args, **kwargs):
        context.cancel()  # as a CancelOperation during the last batch's forward
        return torch.eye(6)[[1, 0]], torch.tensor([0, 1]), ["d0", "d1"]

    monkeypatch.setattr(engine, "sample_set_logits", classify_then_cancel)
    monkeypatch.setattr(engine, "sample_grid", lambda *args, **kwargs: pytest.fail("a cancelled evaluation drew its mistakes"))
    with pytest.raises(JobCancelled):
        evaluate(engine, context, "fixed", "uid of fixed", 2, engine.models.active, 0, 2, dense_confusion=True)


def test_an_evaluation_reports_the_version_it_ran_not_the_one_served_when_it_ends(engine, monkeypatch):
    # The job runs the version served when it was submitted: a head activated since
    # (an edit's, say) must not be named as the model that scored it.
    from explaind.engine.evaluation import evaluate

    evaluated = engine.models.active
    engine.activate(evaluated.with_head(_constant_head(2)))
    monkeypatch.setattr(engine, "sample_set_logits", lambda *args, **kwargs: (torch.eye(6)[[0, 1]], torch.tensor([0, 1]), ["d0", "d1"]))
    monkeypatch.setattr(engine, "sample_grid", lambda *args, **kwargs: np.zeros((4, 4, 3), np.uint8))
    result = evaluate(engine, _EvaluationContext(), "fixed", "uid of fixed", 2, evaluated, 0, 2, dense_confusion=True)
    assert result.model_version == evaluated.version != engine.models.active.version


def test_evaluation_options_are_bounded_and_zero_means_the_default(engine, monkeypatch):
    import explaind.engine.evaluation

    rng = np.random.default_rng(0)
    engine.create_sample_set("bounds", "", [NewSample.from_array(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 0)])
    started = []
    monkeypatch.setattr(explaind.engine.evaluation, "evaluate", lambda engine, context, set_id, uid, count, version, batch_size, grid, dense_confusion: started.append((batch_size, grid)))
    monkeypatch.setattr(engine.jobs, "submit", lambda kind, run, **options: run(None))  # run the job's function at once
    for batch_size, grid in ((4096, 1024), (0, 0)):
        engine.evaluate_sample_set("bounds", batch_size=batch_size, max_grid_images=grid)
    assert started == [(4096, 1024), (0, 64)]
    for options, field in (({"batch_size": 4097}, "batch_size"), ({"batch_size": -1}, "batch_size"),
                           ({"max_grid_images": 1025}, "max_grid_images"), ({"max_grid_images": -1}, "max_grid_images")):
        with pytest.raises(InvalidArgument) as refused:
            engine.evaluate_sample_set("bounds", **options)
        assert refused.value.field == field, options


def test_an_evaluation_whose_confusion_matrix_cannot_fit_a_response_sends_its_cells(engine, monkeypatch):
    # A (C, C) matrix takes at least C² bytes: with 21k classes the job classified the whole
    # set (and built a list of 441M ints) before failing for its result's size; then it
    # was refused before it ran, and a classifier of that many classes had no evaluation.
    from explaind.engine import evaluation

    engine.create_sample_set("wide", "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)])
    classes = len(engine.models.active.class_names)
    submitted, dense = [], []
    monkeypatch.setattr(engine.jobs, "submit", lambda kind, run, **options: submitted.append((kind, options["cut_lists"])) or run(None))
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, dense_confusion: dense.append(dense_confusion))
    for most in (classes * classes - 1, classes * classes, None):
        monkeypatch.setattr(engine.jobs, "max_result_bytes", most)
        engine.evaluate_sample_set("wide")
    assert dense == [False, True, True]
    # Cut to fit, a response keeps the cells of the most samples, as the most confident mistakes.
    assert submitted == [("evaluate_sample_set", ("mistakes", "confusion_cells"))] * 3


def test_an_evaluation_sends_its_cells_where_the_matrix_fits_a_response_but_not_beside_the_per_class_rows(engine, monkeypatch):
    # C² bytes fit the limit for up to 5,792 classes at the default, but the per-class
    # rows (a name each) come too: an evaluation of 5,780 classes with 70-character names
    # failed with a 33.9 MB result over the 33.5 MB limit, its confusion cells 8 bytes.
    from google.protobuf import any_pb2

    from explaind.engine.evaluation import evaluate

    labels, logits = torch.tensor([0, 1]), torch.nn.functional.one_hot(torch.tensor([0, 2]), 6).float()
    monkeypatch.setattr(engine, "sample_set_logits", lambda *args, **kwargs: (logits, labels, ["d0", "d1"]))
    monkeypatch.setattr(engine, "sample_grid", lambda shown, captions, job=None: np.zeros((4, 4, 3), np.uint8))
    version = engine.models.active
    sparse = evaluate(engine, _EvaluationContext(), "fixed", "uid of fixed", 2, version, 0, 2, dense_confusion=False)
    packed = any_pb2.Any()
    packed.Pack(sparse)
    monkeypatch.setattr(engine.jobs, "max_result_bytes", packed.ByteSize())
    assert len(version.class_names) ** 2 <= engine.jobs.max_result_bytes  # the submit lets it try the matrix
    result = evaluate(engine, _EvaluationContext(), "fixed", "uid of fixed", 2, version, 0, 2, dense_confusion=True)
    assert result == sparse
    engine.jobs.require_result_fits(result)
    # With room for the matrix beside the rows, it is sent whole.
    monkeypatch.setattr(engine.jobs, "max_result_bytes", None)
    dense = evaluate(engine, _EvaluationContext(), "fixed", "uid of fixed", 2, version, 0, 2, dense_confusion=True)
    assert not dense.confusion_cells and np.array(dense.confusion_matrix).reshape(6, 6)[1, 2] == 1

def _divides_by_mean_engine(tmp_path: Path) -> Engine:
    """An engine serving conftest's divides_by_mean."""
    config = default_config().replace("classifier", **DIVIDES_BY_MEAN_CLASSIFIER).replace("server", data_dir=str(tmp_path / "data"))
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    engine.load()
    return engine


def test_a_job_on_samples_the_model_gives_nan_or_infinite_features_for_fails_naming_them(tmp_path):
    # Named by the sample set field the job was given and the samples' indices in the set:
    # a NaN row's argmax is class 0, so an evaluation counted the black images (label a)
    # as rightly classified.
    engine = _divides_by_mean_engine(tmp_path)
    try:
        rng = np.random.default_rng(0)
        pixels = rng.integers(1, 256, (6, 16, 16, 3), dtype=np.uint8)
        pixels[[1, 4]] = 0
        engine.create_sample_set("dark", "", [NewSample.from_array(p, 0) for p in pixels])
        with pytest.raises(FailedPrecondition) as refused:
            engine.sample_set_features("dark", field="validation_sample_set_id")
        assert refused.value.field == "validation_sample_set_id"
        assert refused.value.description == ("the served classifier's penultimate features of 2 samples of sample set 'dark' are NaN or infinite "
                                             "(sample_index 1, 4): the model overflows or divides by zero on their images; use a set without "
                                             "them, or mend the model")
        job = engine.jobs.wait(engine.evaluate_sample_set("dark").record.job_id, 60).record
        assert (job.state, job.error_code) == ("failed", "FAILED_PRECONDITION")
        assert job.error_message == f"sample_set_id: {refused.value.description}"
    finally:
        engine.close()
        engine.store.close()


def test_features_too_large_to_sum_in_float32_but_finite_are_taken(tmp_path):
    # A float32 model's activations may be near its largest value: finite, and usable.
    engine = _divides_by_mean_engine(tmp_path)
    try:
        pixels = np.random.default_rng(0).integers(1, 256, (3, 16, 16, 3), dtype=np.uint8)
        engine.create_sample_set("bright", "", [NewSample.from_array(p, 0) for p in pixels])
        version = engine.models.active
        large = np.full(version.feature_dim, 3e38, dtype=np.float32)
        engine.store.put_features(version.feature_cache_key, {digest: large for digest in engine.sample_set_features("bright").digests})
        np.testing.assert_array_equal(engine.sample_set_features("bright").features.numpy(), np.stack([large] * 3))
    finally:
        engine.close()
        engine.store.close()


def test_a_sets_logits_that_are_nan_or_infinite_are_refused_naming_the_samples_split_or_inference_only(tmp_path):
    # What an evaluation classifies a set by: finite features through a head that overflows
    # float32, or an inference-only model (no features to check) dividing by a black
    # image's mean, gave rows whose argmax, class 0, it counted.
    engine = _divides_by_mean_engine(tmp_path)
    try:
        rng = np.random.default_rng(1)
        pixels = rng.integers(1, 256, (12, 16, 16, 3), dtype=np.uint8)
        engine.create_sample_set("bright", "", [NewSample.from_array(p, 0) for p in pixels])
        pixels[[1, 4]] = 0
        engine.create_sample_set("dark", "", [NewSample.from_array(p, 0) for p in pixels[:6]])
        split = engine.models.active
        overflowing = torch.nn.Linear(split.feature_dim, 3)  # finite weights; these images' features are about -0.06, -0.4, 0, -0.2
        with torch.no_grad():
            overflowing.weight.fill_(-3e38)
            overflowing.bias.fill_(3e38)
        whole = dataclasses.replace(split, feature_extractor=None, head=None, predict_fn=torch.no_grad()(divides_by_mean()))
        for version, set_id, samples in ((split.with_head(overflowing), "bright", "12 samples of sample set 'bright' hold NaN or +infinity, "
                                          "or are -infinity for every class (sample_index 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more): the model "
                                          "overflows, divides by zero or rules out every class on their images"),
                                         (whole, "dark", "2 samples of sample set 'dark' hold NaN or +infinity, or are -infinity for every class (sample_index 1, 4)")):
            with pytest.raises(FailedPrecondition, match=re.escape(f"sample_set_id: the served classifier's logits of {samples}")):
                engine.sample_set_logits(set_id, version=version)
    finally:
        engine.close()
        engine.store.close()


def test_a_predict_of_an_image_a_split_model_gives_nan_for_is_refused_naming_it(tmp_path):
    # Its probabilities were served as NaN: a caller reading the top class took class 0.
    # With features asked for too (their row is infinite); one image alone is named so.
    engine = _divides_by_mean_engine(tmp_path)
    try:
        images = torch.rand(4, 3, 16, 16)
        images[[1, 3]] = 0
        for sent, named in ((images, "2 images of the request hold NaN or +infinity, or are -infinity for every class (images[1], images[3]): "
                                     "the model overflows, divides by zero or rules out every class on their images; send the request "
                                     "without them, or mend the model"),
                            (images[1:3], "1 image of the request hold")):
            with pytest.raises(FailedPrecondition) as refused:
                engine.predict(sent, top_k=3, return_features=True)
            assert refused.value.field == "images" and refused.value.description.startswith(f"the served classifier's logits of {named}")
        served = engine.predict(images[[0, 2]], top_k=3)
        with torch.no_grad():
            expected = torch.softmax(divides_by_mean()(images[[0, 2]]), 1).sort(1, descending=True)
        np.testing.assert_allclose(served.probabilities, expected.values.numpy(), rtol=1e-5)
    finally:
        engine.close()
        engine.store.close()


class _Masking(nn.Module):
    """tiny_net's 4 classes, class 2 always ruled out (-inf), as a model restricted to some
    labels masks the others; a black image gets ``black`` for every class."""

    def __init__(self, black: float) -> None:
        super().__init__()
        self.model, self.black = tiny_net().eval(), black
        self.model.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).masked_fill(torch.tensor([False, False, True, False]), -math.inf)
        is_black = (x.amax(dim=(1, 2, 3)) == 0)[:, None]
        return torch.where(is_black, torch.full_like(logits, self.black), logits)


@contextmanager
def _masking_engine(tmp_path: Path, black: float, **batching) -> Iterator[Engine]:
    """An engine serving :class:`_Masking` as TorchScript (inference-only) on 16 px images."""
    path = tmp_path / f"masking {black}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated: what the torchscript loader is for
        torch.jit.save(torch.jit.script(_Masking(black).eval()), path)
    config = (default_config().replace("classifier", loader="torchscript", path=str(path), image_size=16, class_names=("a", "b", "c", "d"))
              .replace("server", data_dir=str(tmp_path / f"data {black}")).replace("batching", **batching)
              .replace("clip", path="").replace("diffusion", path=""))
    engine = Engine(config, SQLiteStore(tmp_path / f"data {black}"), Metrics())
    engine.load()
    try:
        yield engine
    finally:
        engine.close()
        engine.store.close()


def test_an_inference_only_model_that_rules_out_classes_with_minus_infinity_is_predicted_and_evaluated(tmp_path):
    # Its masked classes have probability 0, listed last by class index; an evaluation
    # refused every sample as "NaN or infinite", where it classifies them by largest logit.
    from explaind.engine.evaluation import evaluate

    with _masking_engine(tmp_path, -math.inf) as engine:
        assert not engine.models.active.supports_features
        images = torch.rand(3, 3, 16, 16)
        with torch.no_grad():
            logits = _Masking(-math.inf)(images)
        served = engine.predict(images, top_k=4)
        assert served.class_indices[:, 3].tolist() == [2] * 3 and (served.probabilities[:, 3] == 0).all()
        np.testing.assert_allclose(served.probabilities[:, :3], torch.softmax(logits, 1).sort(1, descending=True).values[:, :3].numpy(), rtol=1e-5)
        pixels = np.random.default_rng(0).integers(1, 256, (8, 16, 16, 3), dtype=np.uint8)
        engine.create_sample_set("bright", "", [NewSample.from_array(p, i % 4) for i, p in enumerate(pixels)])
        logits, labels, _ = engine.sample_set_logits("bright", version=engine.models.active)
        assert torch.isneginf(logits[:, 2]).all()
        result = evaluate(engine, _EvaluationContext(), "bright", engine.store.get_sample_set("bright").uid, 8, engine.models.active, 0, 8,
                          dense_confusion=True)
        predicted = logits.argmax(1)
        assert result.accuracy == (predicted == labels).double().mean().item() and 2 not in predicted.tolist()
        assert [m.sample_index for m in result.mistakes] and all(0 < m.probability <= 1 for m in result.mistakes)
        assert np.array(result.confusion_matrix).reshape(4, 4)[:, 2].sum() == 0 and result.per_class[2].accuracy == 0  # class c: 2 samples, both wrong
        job = engine.jobs.wait(engine.evaluate_sample_set("bright").record.job_id, 60).record
        assert job.state == "succeeded", job.error_message


@pytest.mark.parametrize("black", [-math.inf, math.nan, math.inf])
def test_an_image_an_inference_only_model_gives_nan_or_infinite_logits_for_is_refused_and_its_batch_mates_answered(tmp_path, black):
    # NaN, +inf or -inf for every class: softmax gave the image NaN probabilities. The
    # request holding it is refused naming it; another batched with it is answered as alone.
    # A batch runs once it holds 5 images (waiting for them up to a minute): each forward
    # below is as the test means it, however late a loaded machine runs a thread.
    with _masking_engine(tmp_path, black, max_batch_size=5, max_queue_delay_ms=60_000) as engine:
        images = torch.rand(4, 3, 16, 16)
        images[[1, 3]] = 0
        alone = engine.predict(images[[0]].expand(5, -1, -1, -1), top_k=4)  # five of the image, a batch of their own
        refused_request = engine.submit_predict(images, top_k=2)
        answered_request = engine.submit_predict(images[[0]], top_k=4)
        with pytest.raises(FailedPrecondition) as refused:
            refused_request.result(timeout=60)
        assert refused.value.field == "images"
        assert refused.value.description.startswith("the served classifier's logits of 2 images of the request hold NaN or +infinity, or are "
                                                    "-infinity for every class (images[1], images[3])")
        answered = engine.finish_predict(answered_request.result(timeout=60))
        assert answered.class_indices.tolist() == alone.class_indices[:1].tolist()
        np.testing.assert_array_equal(answered.probabilities, alone.probabilities[:1])
        batches = engine.metrics.registry.get_sample_value("explaind_batch_size_images_count")
        assert (batches, engine.metrics.registry.get_sample_value("explaind_batch_size_images_sum")) == (2, 10)  # alone, then both in one forward
        pixels = np.random.default_rng(0).integers(1, 256, (4, 16, 16, 3), dtype=np.uint8)
        pixels[2] = 0
        engine.create_sample_set("dark", "", [NewSample.from_array(p, 0) for p in pixels])
        job = engine.jobs.wait(engine.evaluate_sample_set("dark").record.job_id, 60).record
        assert (job.state, job.error_code) == ("failed", "FAILED_PRECONDITION")
        assert job.error_message.startswith("sample_set_id: the served classifier's logits of 1 sample of sample set 'dark' hold NaN or "
                                            "+infinity, or are -infinity for every class (sample_index 2): the model overflows, divides by "
                                            "zero or rules out every class on its image; use a set without it, or mend the model")


def test_a_request_refused_in_a_batch_after_another_names_its_images_by_their_place_in_it(tmp_path):
    # Its images are rows 2 and 4 of the batch's forward, after a request of two images;
    # the caller sent them as its images[1] and images[3].
    with _masking_engine(tmp_path, math.nan, max_batch_size=6, max_queue_delay_ms=60_000) as engine:  # run once it holds both
        images = torch.rand(4, 3, 16, 16)
        images[[1, 3]] = 0
        answered_request = engine.submit_predict(images[[0, 2]], top_k=1)
        refused_request = engine.submit_predict(images, top_k=1)
        with pytest.raises(FailedPrecondition) as refused:
            refused_request.result(timeout=60)
        assert "of 2 images of the request hold NaN or +infinity, or are -infinity for every class (images[1], images[3])" in refused.value.description
        assert engine.finish_predict(answered_request.result(timeout=60)).class_indices.shape == (2, 1)
        assert engine.metrics.registry.get_sample_value("explaind_batch_size_images_count") == 1  # both in one forward


@pytest.mark.parametrize(("unusable", "more"), [(10, ""), (11, " and 1 more")])
def test_a_predict_refusal_names_ten_images_and_counts_the_rest(tmp_path, unusable, more):
    # Exactly ten are all named, with no "and 0 more".
    engine = _divides_by_mean_engine(tmp_path)
    try:
        images = torch.rand(12, 3, 16, 16)
        images[:unusable] = 0
        with pytest.raises(FailedPrecondition) as refused:
            engine.predict(images, top_k=1)
        named = ", ".join(f"images[{i}]" for i in range(10))
        assert f"logits of {unusable} images of the request hold NaN or +infinity, or are -infinity for every class ({named}{more}): " in refused.value.description
        assert refused.value.violations == tuple(("UNUSABLE_LOGITS", f"images[{i}]") for i in range(10))  # the same ten, whatever more
    finally:
        engine.close()
        engine.store.close()


# Jobs and store --------------------------------------------------------------------------


def jobs_ended(metrics: Metrics, *labels: tuple[str, str, str]) -> list[float | None]:
    """explaind_jobs_ended_total for each (kind, outcome, code)."""
    return [metrics.registry.get_sample_value("explaind_jobs_ended_total", dict(zip(("kind", "outcome", "code"), each))) for each in labels]


def test_jobs_fail_with_their_code_cancel_when_queued_and_bound_the_queue(tmp_path):
    store, metrics = SQLiteStore(tmp_path), Metrics()
    jobs = JobManager(store, metrics, max_queued=2, workers=1)
    gate = threading.Event()
    blocker = jobs.submit("block", lambda ctx: (gate.wait(10), _empty())[1])
    while jobs.get(blocker.record.job_id).record.state != "running":  # not a sleep: still queued, it fills the queue early
        time.sleep(0.01)
    failing = jobs.submit("fail", lambda ctx: (_ for _ in ()).throw(InvalidArgument("bad thing", field="x")))
    waiting = jobs.submit("wait", lambda ctx: _empty())
    with pytest.raises(ResourceExhausted, match="job queue is full"):
        jobs.submit("overflow", lambda ctx: _empty())
    jobs.cancel(waiting.record.job_id)
    gate.set()
    assert jobs.wait(blocker.record.job_id, 10).record.state == "succeeded"
    failed = jobs.wait(failing.record.job_id, 10).record
    assert (failed.state, failed.error_code, failed.error_message) == ("failed", "INVALID_ARGUMENT", "x: bad thing")
    # Its result names the field as the call's error would (google.rpc.BadRequest), for the operation's error.
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2

    violation = error_details_pb2.BadRequest()
    assert any_pb2.Any.FromString(failed.result).Unpack(violation)
    assert [(v.field, v.description) for v in violation.field_violations] == [("x", "bad thing")]
    assert jobs.wait(waiting.record.job_id, 10).record.state == "cancelled"
    crashing = jobs.submit("crash", lambda ctx: 1 / 0)
    assert jobs.wait(crashing.record.job_id, 10).record.error_code == "INTERNAL"
    # The ended counter carries each operation's code, so an alert can tell a server fault
    # from a refused input.
    assert jobs_ended(metrics, ("block", "succeeded", "OK"), ("fail", "failed", "INVALID_ARGUMENT"),
                      ("wait", "cancelled", "CANCELLED"), ("crash", "failed", "INTERNAL")) == [1.0] * 4
    jobs.shutdown(1)


@pytest.fixture
def jobs_clock(monkeypatch) -> list[float]:
    """``[seconds]`` explaind.jobs' monotonic clock is ahead of the real one: a job adds to
    it to have run that long (:func:`_taking`). Wait for the jobs without a timeout: a
    jump of the clock past a wait's deadline ends it with the job still running."""
    import types

    import explaind.jobs

    skipped = [0.0]
    clock = types.SimpleNamespace(**{name: value for name, value in vars(time).items() if not name.startswith("__")})
    clock.monotonic = lambda: time.monotonic() + skipped[0]
    monkeypatch.setattr(explaind.jobs, "time", clock)
    return skipped


def _taking(jobs_clock: list[float], seconds: float) -> Callable:
    """A job that runs ``seconds`` by the ``jobs_clock`` fixture's clock, and succeeds."""
    def job(ctx):
        jobs_clock[0] += seconds
        return _empty()
    return job


def test_a_full_queue_asks_callers_to_retry_about_when_a_worker_frees(tmp_path, jobs_clock):
    # A full queue's refusal said "retry later" and no when (no google.rpc.RetryInfo): a
    # pipeline's retry loop could only guess, hammering the server or idling long after a
    # worker had freed. Its delay: the median run time of recent jobs over the workers,
    # 1 to 60 s, and 10 s before any job has ended. The jobs' clock is moved by the jobs.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), max_queued=1, max_queued_per_caller=1, workers=2)

    def taking(seconds: float) -> Callable:
        return _taking(jobs_clock, seconds)

    def run_one_at_a_time(seconds: float, count: int) -> None:
        for _ in range(count):
            assert jobs.wait(jobs.submit("evaluate", taking(seconds)).record.job_id).record.state == "succeeded"

    def refusals_of_a_full_queue() -> tuple[float | None, float | None]:
        """The retry delays of a caller at its own limit and of a call past the queue's (both workers busy)."""
        gate = threading.Event()
        busy = []
        for _ in range(2):  # one at a time: a job not yet running fills the queue
            busy.append(jobs.submit("block", lambda ctx: (gate.wait(10), _empty())[1]))
            while jobs.get(busy[-1].record.job_id).record.state != "running":
                time.sleep(0.01)
        queued = jobs.submit("evaluate", taking(0), owner="analyst")
        with pytest.raises(ResourceExhausted, match="job queue is full for caller 'analyst'") as mine:
            jobs.submit("evaluate", taking(0), owner="analyst")
        with pytest.raises(ResourceExhausted, match=r"job queue is full \(1 queued") as everyone:
            jobs.submit("evaluate", taking(0))
        assert limit_details(error_status(mine.value)) == ("QUEUED_JOBS_PER_CALLER_EXCEEDED", {"setting": "[jobs].max_queued_per_caller", "limit": "1"},
                                                           [("caller:analyst", "jobs this caller has queued")])
        assert limit_details(error_status(everyone.value)) == ("QUEUED_JOBS_EXCEEDED", {"setting": "[jobs].max_queued", "limit": "1"},
                                                               [("server", "jobs queued")])
        gate.set()
        for job in (*busy, queued):
            jobs.wait(job.record.job_id)
        return mine.value.retry_delay_s, everyone.value.retry_delay_s

    assert refusals_of_a_full_queue() == (10.0, 10.0)  # no job has ended: nothing to go by
    assert refusals_of_a_full_queue() == (1.0, 1.0)  # three jobs that took no time: no retry sooner than a second
    run_one_at_a_time(40.0, 7)  # six jobs ran 0 s (the two queues'), seven 40 s: the median, 40 s, over two workers
    assert refusals_of_a_full_queue() == (pytest.approx(20.0, abs=0.5),) * 2
    run_one_at_a_time(500.0, 16)  # the last 16 jobs took 500 s: a caller still looks again within a minute
    assert refusals_of_a_full_queue() == (60.0, 60.0)
    run_one_at_a_time(30.0, 10)  # the last 16: ten of 30 s, three of 500 s, three of 0 s (all 45 jobs': 40 s)
    assert refusals_of_a_full_queue() == (pytest.approx(15.0, abs=0.5),) * 2
    # Sixteen exactly: of the last 16, five of 30 s, three of 0 s and eight of 100 s, whose
    # median (65 s) one job more or less (30 s, or 100 s) would move.
    run_one_at_a_time(100.0, 8)
    assert refusals_of_a_full_queue() == (pytest.approx(32.5, abs=0.5),) * 2
    jobs.shutdown(1)


def test_a_full_queue_s_retry_delay_goes_by_jobs_that_succeeded_not_by_ones_refused_or_cancelled_early(tmp_path, jobs_clock):
    # Jobs refused at once (a sample set that does not exist, say) or cancelled just after
    # they started counted their run times of ~0 s: a burst of them made the median, and so
    # the delay, a second while the worker stayed busy with jobs of 30 s.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), max_queued=1, workers=1)
    for _ in range(3):
        assert jobs.wait(jobs.submit("evaluate", _taking(jobs_clock, 30.0)).record.job_id).record.state == "succeeded"

    def refused(ctx):
        raise InvalidArgument("sample set 'gone' does not exist", field="sample_set_id")

    def until_cancelled(ctx):
        started.set()
        while True:
            ctx.raise_if_cancelled()
            time.sleep(0.01)

    for _ in range(4):
        assert jobs.wait(jobs.submit("evaluate", refused).record.job_id).record.state == "failed"
        started = threading.Event()
        stopped = jobs.submit("evaluate", until_cancelled).record.job_id
        assert started.wait(10)
        jobs.cancel(stopped)
        assert jobs.wait(stopped).record.state == "cancelled"
    running, gate = _started_after_a_gate(jobs, None)
    queued = jobs.submit("evaluate", _taking(jobs_clock, 0.0))
    with pytest.raises(ResourceExhausted, match=r"job queue is full \(1 queued") as full:
        jobs.submit("evaluate", _taking(jobs_clock, 0.0))
    assert full.value.retry_delay_s == pytest.approx(30.0, abs=0.5)  # the three that ran to success; not 1 s, the clamp of 0 s
    gate.set()
    for job_id in (running, queued.record.job_id):
        jobs.wait(job_id)
    jobs.shutdown(1)


def test_a_full_queue_s_retry_delay_counts_jobs_that_ran_to_the_run_time_limit(tmp_path, jobs_clock):
    # A job ended DEADLINE_EXCEEDED at [jobs].max_run_seconds held its worker all that while:
    # left out as a failure, the delay went by the short jobs alone while the workers stayed
    # busy with ones running to the limit.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), max_queued=1, workers=1, max_run_s=50.0)
    assert jobs.wait(jobs.submit("evaluate", _taking(jobs_clock, 2.0)).record.job_id).record.state == "succeeded"

    def past_the_limit(ctx):
        jobs_clock[0] += 50.5
        ctx.raise_if_cancelled()

    for _ in range(2):
        record = jobs.wait(jobs.submit("evaluate", past_the_limit).record.job_id).record
        assert (record.state, record.error_code) == ("failed", "DEADLINE_EXCEEDED")
    running, gate = _started_after_a_gate(jobs, None)
    queued = jobs.submit("evaluate", _taking(jobs_clock, 0.0))
    with pytest.raises(ResourceExhausted, match=r"job queue is full \(1 queued") as full:
        jobs.submit("evaluate", _taking(jobs_clock, 0.0))
    assert full.value.retry_delay_s == pytest.approx(50.5, abs=0.5)  # the median of 2, 50.5 and 50.5 s; not 2 s
    gate.set()
    for job_id in (running, queued.record.job_id):
        jobs.wait(job_id)
    jobs.shutdown(1)


def test_a_job_waiting_for_a_lock_another_holds_ends_at_the_run_time_limit_without_taking_it(tmp_path, jobs_clock):
    # A job waiting for a lock (a visualisation for another's move of CLIP onto the device)
    # heard neither its cancel nor [jobs].max_run_seconds until the holder let go.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1, max_run_s=50.0)
    lock, waiting, took = threading.Lock(), threading.Event(), []

    def wait_for_the_lock(ctx):
        waiting.set()
        with ctx.holding(lock):
            took.append(ctx.job_id)
        return _empty()

    with lock:
        job_id = jobs.submit("evaluate", wait_for_the_lock).record.job_id
        assert waiting.wait(timeout=60)
        jobs_clock[0] += 50.5
        record = jobs.wait(job_id, 30).record
    assert (record.state, record.error_code, took) == ("failed", "DEADLINE_EXCEEDED", []), record
    jobs.shutdown(1)


def test_a_job_cancelled_as_the_lock_it_waits_for_frees_ends_cancelled_without_running_under_it(tmp_path):
    # A cancel that came while the job's wait for the lock ran, the lock freeing in that
    # wait, let the job take it and run the block under it (a second move of CLIP).
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    lock, submitted, took = threading.Lock(), threading.Event(), []

    class FreeingAsTheCancelComes:
        """The lock, the job's cancel arriving within its wait for it."""

        def acquire(self, *args, **kwargs):
            assert submitted.wait(timeout=60)
            jobs.cancel(job_id)
            return lock.acquire(*args, **kwargs)

        def release(self):
            lock.release()

    def wait_for_the_lock(ctx):
        with ctx.holding(FreeingAsTheCancelComes()):
            took.append(ctx.job_id)
        return _empty()

    job_id = jobs.submit("evaluate", wait_for_the_lock).record.job_id
    submitted.set()
    record = jobs.wait(job_id, 30).record
    assert (record.state, took, lock.locked()) == ("cancelled", [], False), record
    jobs.shutdown(1)


@pytest.mark.parametrize(("running_owner", "queued_owners", "expected"), [
    # A caller at [jobs].max_queued_per_caller got the delay of a full queue, when the next
    # worker frees; but a place of its frees only when a worker takes its own queued job,
    # on its turn: after the jobs of the callers before it in the fair order. The
    # monitoring job is next, when the running one ends; the analyst's third, three ends
    # of 10 s away.
    ("pipeline", ("monitoring", "labeller", "analyst"), {"monitoring": 10.0, "analyst": 30.0}),
    # The analyst's queued job was submitted first, but the analyst's running job took the
    # latest turn: the callers that have had none go before it, so its place frees after
    # theirs, not at the next end (its place in submission order).
    ("analyst", ("analyst", "monitoring", "labeller"), {"analyst": 30.0}),
])
def test_a_caller_at_its_own_queue_limit_is_asked_to_wait_for_its_turn_in_the_fair_order(tmp_path, jobs_clock, running_owner, queued_owners,
                                                                                          expected):
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), max_queued_per_caller=1, workers=1)
    for _ in range(3):
        assert jobs.wait(jobs.submit("evaluate", _taking(jobs_clock, 10.0)).record.job_id).record.state == "succeeded"
    running, gate = _started_after_a_gate(jobs, running_owner)
    queued = [jobs.submit("evaluate", _taking(jobs_clock, 0.0), owner=owner) for owner in queued_owners]
    delays = {}
    for owner in expected:
        with pytest.raises(ResourceExhausted, match=f"job queue is full for caller '{owner}'") as mine:
            jobs.submit("evaluate", _taking(jobs_clock, 0.0), owner=owner)
        delays[owner] = mine.value.retry_delay_s
    assert delays == {owner: pytest.approx(delay, abs=0.5) for owner, delay in expected.items()}
    gate.set()
    for job_id in (running, *(job.record.job_id for job in queued)):
        jobs.wait(job_id)
    jobs.shutdown(1)


def test_a_job_deleted_as_soon_as_a_waiter_sees_it_end_is_deleted(tmp_path, monkeypatch):
    # Between storing a job's end (which wakes its waiters) and leaving the live jobs, a
    # waiter's delete read it as a job whose end the store had refused: 7 of 600 deletes
    # right after result() failed so. The moment is widened here to make it certain.
    from explaind.store import FINISHED_STATES

    store_end = JobManager._update

    def slow_after_the_end(self, live, **changes):
        store_end(self, live, **changes)
        if changes.get("state") in FINISHED_STATES:
            time.sleep(0.2)

    monkeypatch.setattr(JobManager, "_update", slow_after_the_end)
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    job_id = jobs.submit("evaluate", lambda ctx: _empty()).record.job_id
    assert jobs.wait(job_id, 10).done
    jobs.delete(job_id)
    with pytest.raises(NotFound):
        jobs.get(job_id)
    jobs.shutdown(1)


def test_a_watch_or_wait_ends_with_the_end_of_a_job_deleted_before_its_next_read(tmp_path):
    # A job's end wakes all its readers at once: one of them (another client) may delete
    # it before another's next read, and that watcher, waiting for the end, got NOT_FOUND
    # "no operation ..." instead of the end it was waiting for.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)

    def ended_and_deleted(job_id: str, gate: threading.Event):
        gate.set()
        end = jobs.wait(job_id, 10)
        jobs.delete(job_id)
        with pytest.raises(NotFound, match=f"no operation '{job_id}'"):
            jobs.get(job_id)
        return end

    def running_job() -> tuple[str, threading.Event]:
        gate = threading.Event()
        job_id = jobs.submit("evaluate", lambda ctx: (gate.wait(10), _empty())[1]).record.job_id
        while jobs.get(job_id).record.state != "running":
            time.sleep(0.01)
        return job_id, gate

    job_id, gate = running_job()
    watch = jobs.watch(job_id, poll_s=0.01)
    assert next(watch).record.state == "running"  # the watch is between two reads
    end = ended_and_deleted(job_id, gate)
    assert end.record.state == "succeeded" and [snapshot.record for snapshot in watch] == [end.record]

    job_id, gate = running_job()
    ends = []

    def still_waiting() -> bool:  # asked after each read of the running job: between two reads
        if not ends:
            ends.append(ended_and_deleted(job_id, gate))
        return True

    waited = jobs.wait(job_id, 10, is_active=still_waiting)
    assert waited.record == ends[0].record and waited.record.state == "succeeded"
    jobs.shutdown(1)


def test_listing_by_state_leaves_out_a_job_that_moved_on_between_the_stored_and_the_live_read(tmp_path, monkeypatch):
    # A job listed from the store as queued had started by the time its live state was
    # read: `state=QUEUED` returned it RUNNING.
    store = SQLiteStore(tmp_path)
    jobs, gate = JobManager(store, Metrics(), workers=1), threading.Event()
    first = jobs.submit("visualize", lambda ctx: (gate.wait(10), _empty())[1])
    second = jobs.submit("visualize", lambda ctx: (gate.wait(10), _empty())[1])
    while jobs.get(first.record.job_id).record.state != "running":
        time.sleep(0.01)
    stored = store.list_jobs(state="queued", limit=100)  # as the listing reads them, just before the second starts
    assert [record.job_id for record in stored] == [second.record.job_id]
    jobs.cancel(first.record.job_id)
    gate.set()
    while jobs.get(second.record.job_id).record.state == "queued":
        time.sleep(0.01)
    monkeypatch.setattr(store, "list_jobs", lambda **query: stored if query["state"] == "queued" else [])
    assert [snapshot.record.state for snapshot in jobs.list(state="queued")] == []
    jobs.shutdown(1)


def test_each_operation_s_queueing_cancel_and_end_is_a_log_line_with_its_id(tmp_path, caplog):
    # An operator had only metrics: no line said which operation ended how.
    caplog.set_level(logging.INFO, logger="explaind.jobs")
    jobs, gate = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1), threading.Event()
    done = jobs.submit("evaluate", lambda ctx: _empty())
    refused = jobs.submit("rank", lambda ctx: (_ for _ in ()).throw(InvalidArgument("bad thing", field="x")))
    crashed = jobs.submit("crash", lambda ctx: 1 / 0)
    cancelled = jobs.submit("visualize", lambda ctx: (gate.wait(10), ctx.raise_if_cancelled(), _empty())[2])
    while jobs.get(cancelled.record.job_id).record.state != "running":
        time.sleep(0.01)
    jobs.cancel(cancelled.record.job_id)
    gate.set()
    for snapshot in (done, refused, crashed, cancelled):
        jobs.wait(snapshot.record.job_id, 10)
    lines = [(record.levelname, record.getMessage()) for record in caplog.records if record.name == "explaind.jobs"]
    ids = {name: snapshot.record.job_id for name, snapshot in dict(done=done, refused=refused, crashed=crashed, cancelled=cancelled).items()}
    for name, job_id in ids.items():
        assert ("INFO", f"operation {job_id} ({jobs.get(job_id).record.kind}) queued") in lines
    assert any(level == "INFO" and re.fullmatch(rf"operation {ids['done']} \(evaluate\) succeeded in \d+\.\d\d s", line) for level, line in lines)
    assert any(level == "INFO" and line.startswith(f"operation {ids['refused']} (rank) failed after") and line.endswith("INVALID_ARGUMENT x: bad thing")
               for level, line in lines)  # the caller's mistake: not a warning
    assert any(level == "WARNING" and line.startswith(f"operation {ids['crashed']} (crash) failed after") and "INTERNAL" in line
               for level, line in lines)
    assert ("INFO", f"operation {ids['cancelled']} (visualize): cancel requested") in lines
    # A stalled queue: the job holding the worker is the one started and not ended.
    started = [line for _, line in lines if re.fullmatch(rf"operation {ids['cancelled']} \(visualize\) started after \d+\.\d\d s queued", line)]
    assert len(started) == 1 and lines.index(("INFO", started[0])) < lines.index(("INFO", f"operation {ids['cancelled']} (visualize): cancel requested"))
    assert any(line.startswith(f"operation {ids['cancelled']} (visualize) cancelled after") for _, line in lines)
    jobs.shutdown(1)


def test_a_watch_sends_each_change_once_and_an_artifact_saved_again_replaces_its_namesake(tmp_path):
    # WatchOperation polls the job: a job that does not change must not be resent at each
    # poll. And a job that saves an artifact again under its name (a refreshed image)
    # lists it once, with the new content.
    store = SQLiteStore(tmp_path)
    jobs, gate = JobManager(store, Metrics(), workers=1), threading.Event()

    def job(ctx):
        ctx.save_artifact("preview.png", b"first")
        gate.wait(10)
        ctx.save_artifact("preview.png", b"second")
        return _empty()

    job_id = jobs.submit("visualize", job).record.job_id
    seen = []
    watcher = threading.Thread(target=lambda: seen.extend(jobs.watch(job_id, poll_s=0.01)))
    watcher.start()
    time.sleep(0.5)  # some 50 polls while the job waits
    gate.set()
    watcher.join(10)
    assert seen[-1].done and all(before != after for before, after in zip(seen, seen[1:]))
    assert len(seen) <= 6, [s.record.state for s in seen]  # queued, running, first artifact, second, succeeded (and one more at most)
    artifacts = jobs.get(job_id).record.artifacts
    assert [a.name for a in artifacts] == ["preview.png"] and store.get_blob(artifacts[0].digest) == b"second"
    jobs.shutdown(1)


def test_a_watch_sends_each_preview_once_and_the_sdk_keeps_the_last(tmp_path):
    # Every progress message carried the current preview: 16 neurons' 224² grid streamed
    # 55 MB for a 5 s job. Now a preview goes in the stream's first message and where it
    # changes; the SDK's watch shows the last one in between, as before.
    from explaind.client._operations import Operation
    from explaind.jobs import JobSnapshot
    from explaind.service.interceptors import HeldCalls
    from explaind.service.operations import OperationsServicer
    from explaind.v1 import operations_pb2

    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    try:
        record = jobs.wait(jobs.submit("visualize", lambda ctx: _empty()).record.job_id, 30).record
        running = dataclasses.replace(record, state="running")
        first, second = encode_png(np.zeros((4, 4, 3), np.uint8)), encode_png(np.full((4, 4, 3), 255, np.uint8))
        stream = [JobSnapshot(running, first), JobSnapshot(running, first), JobSnapshot(running, second), JobSnapshot(running, second),
                  JobSnapshot(record)]

        class Jobs:
            def watch(self, job_id, *, is_active):
                return iter(stream)

        class Context:
            def is_active(self):
                return True

        servicer = OperationsServicer(Jobs(), max_message_bytes=1 << 20, held_calls=HeldCalls(1))
        messages = [response.operation for response in
                    servicer.WatchOperation(operations_pb2.WatchOperationRequest(name=f"operations/{record.job_id}"), Context())]

        def preview(operation):
            metadata = operations_pb2.OperationMetadata()
            operation.metadata.Unpack(metadata)
            return metadata.progress.preview_png

        assert [preview(m) for m in messages] == [first, b"", second, b"", b""]

        operation = Operation(None, messages[0])  # the client is needed only to call the server
        seen = []
        for message in messages:
            operation._update(message, keep_preview=True)
            seen.append(operation.metadata.progress.preview_png)
        assert seen == [first, first, second, second, b""]  # none once the job is done
    finally:
        jobs.shutdown(5)


def test_a_watch_sends_progress_at_most_every_interval_and_the_end(tmp_path):
    # A 1500-step visualisation sent 1500 messages (33 MB with its previews) to each
    # watcher; one that read slowly saw the end 28 s after it.
    from explaind.jobs import WATCH_PROGRESS_INTERVAL_S

    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)

    def job(ctx):
        for step in range(1, 301):
            ctx.report_progress(step, 300, f"step {step}")
            time.sleep(0.002)
        return _empty()

    started = time.monotonic()
    seen = list(jobs.watch(jobs.submit("visualize", job).record.job_id, poll_s=0.01))
    took = time.monotonic() - started
    running = [s.record.step for s in seen if s.record.state == "running"]
    assert seen[-1].done and running == sorted(running) and len(set(running)) == len(running)
    assert len(running) <= took / WATCH_PROGRESS_INTERVAL_S + 2, (len(running), took)  # not one per step
    jobs.shutdown(1)


def test_a_watch_holding_back_progress_sends_an_end_that_came_before_its_wait_at_once(tmp_path, monkeypatch):
    # The watch slept out the progress interval without looking again: an end (or a
    # preview) between its read and that sleep had woken no one, and waited for it.
    import explaind.jobs

    monkeypatch.setattr(explaind.jobs, "WATCH_PROGRESS_INTERVAL_S", 60.0)  # progress alone is always held back here
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    contexts, reported, finish, ended, missed_ends = [], threading.Event(), threading.Event(), threading.Event(), []

    class SaysWhatNoWakeUpEnds(threading.Condition):
        def wait(self, timeout=None):
            if threading.current_thread() is threading.main_thread() and job_id not in jobs._live:
                missed_ends.append(timeout)  # the job ended before this sleep: only its timeout ends it
                return False
            return super().wait(timeout)

    monkeypatch.setattr(jobs, "_changed", SaysWhatNoWakeUpEnds())
    end_job = JobManager._end

    def says_when_ended(self, live, **changes):
        end_job(self, live, **changes)
        ended.set()

    monkeypatch.setattr(JobManager, "_end", says_when_ended)

    def job(ctx):
        contexts.append(ctx)
        ctx.report_progress(1, 3)
        reported.set()
        finish.wait(10)
        return _empty()

    job_id = jobs.submit("visualize", job).record.job_id
    assert reported.wait(10)
    watch = jobs.watch(job_id)
    assert next(watch).record.step == 1
    contexts[0].report_progress(2, 3)  # progress alone, within the interval: held back
    read_again = jobs._read_again

    def ends_after_this_read(*args):
        snapshot = read_again(*args)
        if snapshot[0].record.step == 2 and not finish.is_set():
            finish.set()
            assert ended.wait(10)  # the job ends between this read and the watch's next sleep
        return snapshot

    monkeypatch.setattr(jobs, "_read_again", ends_after_this_read)
    assert [snapshot.record.state for snapshot in watch] == ["succeeded"]
    assert missed_ends == []
    jobs.shutdown(1)


def _evaluation_with_mistakes(count: int):
    from explaind.v1 import inference_pb2

    return inference_pb2.EvaluateSampleSetResult(
        sample_set_id="big", sample_count=count, confusion_matrix=[0, count, 0, 0],
        per_class=[inference_pb2.ClassAccuracy(class_name=name, count=count // 2) for name in ("a", "b")],
        mistakes=[inference_pb2.Mistake(sample_index=i, label=0, predicted=1, probability=1 - i / count) for i in range(count)])


@pytest.mark.timeout(30)  # a cut that drops nothing would loop forever: fail here, not at the suite's 600 s
def test_leading_items_that_fit_cuts_the_named_lists_only_and_keeps_their_heads():
    from explaind.messages import leading_items_that_fit

    result = _evaluation_with_mistakes(3000)
    for limit in (20_000, 5_000, 1_000):
        cut = leading_items_that_fit(result, limit, ("mistakes",))
        kept = len(cut.mistakes)
        assert cut.ByteSize() <= limit and 0 < kept < 3000
        assert list(cut.mistakes) == list(result.mistakes[:kept])  # the most confident, in order
        assert cut.ByteSize() > 0.98 * limit  # not much more cut than needed
        cut.ClearField("mistakes")
        whole = type(result)()
        whole.CopyFrom(result)
        whole.ClearField("mistakes")
        assert cut == whole
    assert leading_items_that_fit(result, result.ByteSize(), ("mistakes",)) == result
    # Other lists stay whole (per_class gives the confusion matrix its shape): no fit is None.
    rest = result.ByteSize() - sum(m.ByteSize() + 2 for m in result.mistakes)
    assert len(leading_items_that_fit(result, rest, ("mistakes",)).mistakes) == 0
    assert leading_items_that_fit(result, rest - 1, ("mistakes",)) is None
    assert leading_items_that_fit(result, result.ByteSize() - 1, ()) is None
    # Of several named lists, the longest in bytes loses items first.
    from explaind.v1 import neuroinspect_pb2

    ranking = neuroinspect_pb2.NeuronRanking(neurons=[neuroinspect_pb2.RankedNeuron(neuron=i) for i in range(100)],
                                             mistakes=[neuroinspect_pb2.MistakeSummary(sample_index=i) for i in range(300)])
    cut = leading_items_that_fit(ranking, ranking.ByteSize() - 100, ("mistakes", "neurons"))
    assert len(cut.neurons) == 100 and 250 < len(cut.mistakes) < 300
    # Longest in bytes, not in items: 20 neurons with long class lists outweigh 300 bare mistakes.
    heavy = neuroinspect_pb2.NeuronRanking(neurons=[neuroinspect_pb2.RankedNeuron(neuron=i, top_classes=list(range(40))) for i in range(20)],
                                           mistakes=[neuroinspect_pb2.MistakeSummary(sample_index=i) for i in range(300)])
    assert sum(n.ByteSize() for n in heavy.neurons) > sum(m.ByteSize() for m in heavy.mistakes)
    cut = leading_items_that_fit(heavy, heavy.ByteSize() - 100, ("mistakes", "neurons"))
    assert len(cut.mistakes) == 300 and len(cut.neurons) < 20


def test_leading_items_that_fit_keeps_every_item_that_fits():
    # Items under 128 bytes cost their size plus a 1-byte tag and a 1-byte length, so the
    # cut is exact: one more item back would not fit.
    from explaind.messages import leading_items_that_fit

    result = _evaluation_with_mistakes(3000)
    for limit in (20_000, 5_000, 1_000):
        cut = leading_items_that_fit(result, limit, ("mistakes",))
        kept = len(cut.mistakes)
        assert cut.ByteSize() <= limit
        cut.mistakes.append(result.mistakes[kept])
        assert cut.ByteSize() > limit


@pytest.mark.parametrize(("dtype", "data_type"), [(np.uint8, "DATA_TYPE_UINT8"), (np.float16, "DATA_TYPE_FLOAT16"),
                                                  (np.float32, "DATA_TYPE_FLOAT32"), (np.int64, "DATA_TYPE_INT64")])
@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_an_array_becomes_a_tensor_of_its_type_and_shape_in_little_endian_row_major_bytes(dtype, data_type, byte_order):
    from explaind.messages import array_to_tensor
    from explaind.v1 import common_pb2

    array = np.arange(24).reshape(2, 3, 4).astype(np.dtype(dtype).newbyteorder(byte_order)).transpose(2, 0, 1)  # not contiguous: rows follow its shape
    tensor = array_to_tensor(array)
    assert tensor.dtype == getattr(common_pb2, data_type) and list(tensor.shape) == [4, 2, 3]
    decoded = np.frombuffer(tensor.data, np.dtype(dtype).newbyteorder("<")).reshape(tensor.shape)
    np.testing.assert_array_equal(decoded, array)


def test_a_result_too_large_for_a_message_is_cut_to_fit_and_stored_whole_as_an_artifact(tmp_path):
    # An operation larger than the message limit could be neither fetched nor listed (its
    # page failed RESOURCE_EXHAUSTED, and the pages after it were out of reach).
    from google.protobuf import any_pb2

    from explaind.jobs import RESULT_ARTIFACT, JobSnapshot

    store = SQLiteStore(tmp_path)
    jobs = JobManager(store, Metrics(), workers=1, max_result_bytes=4096)
    result = _evaluation_with_mistakes(2000)
    big = jobs.wait(jobs.submit("evaluate", lambda ctx: result, cut_lists=("mistakes",)).record.job_id, 10).record
    small = jobs.wait(jobs.submit("evaluate", lambda ctx: _evaluation_with_mistakes(10), cut_lists=("mistakes",)).record.job_id, 10).record
    # A result that does not fit even cut fails, and says where the whole of it is.
    uncut = jobs.wait(jobs.submit("evaluate", lambda ctx: result).record.job_id, 10).record
    assert (uncut.state, uncut.error_code) == ("failed", "RESOURCE_EXHAUSTED") and RESULT_ARTIFACT in uncut.error_message
    from explaind.service import convert  # the operation's error names the limit as a call's refusal would

    assert limit_details(convert.operation(JobSnapshot(uncut)).error) == (
        "RESULT_BYTES_EXCEEDED", {"setting": "[server].max_message_bytes", "limit": "4096"}, [("server", "bytes of an operation's result")])
    assert type(result).FromString(store.get_blob(uncut.artifacts[0].digest)) == result
    assert big.state == "succeeded" and len(big.result) <= 4096
    response = any_pb2.Any.FromString(big.result)
    cut = type(result)()
    assert response.Unpack(cut) and 0 < len(cut.mistakes) < 2000 and list(cut.mistakes) == list(result.mistakes[:len(cut.mistakes)])
    [artifact] = big.artifacts
    assert (artifact.name, artifact.media_type) == (RESULT_ARTIFACT, "application/x-protobuf")
    assert type(result).FromString(store.get_blob(artifact.digest)) == result
    assert small.artifacts == () and any_pb2.Any.FromString(small.result).Unpack(cut) and len(cut.mistakes) == 10
    jobs.shutdown(1)
    # A response of exactly max_result_bytes fits: it is neither cut nor stored again.
    exact = any_pb2.Any()
    exact.Pack(result)
    jobs = JobManager(store, Metrics(), workers=1, max_result_bytes=exact.ByteSize())
    whole = jobs.wait(jobs.submit("evaluate", lambda ctx: result, cut_lists=("mistakes",)).record.job_id, 10).record
    assert (whole.state, whole.artifacts, whole.result) == ("succeeded", (), exact.SerializeToString())
    jobs.shutdown(1)
    # The operation points at the whole result once it has ended: the artifact is saved a
    # moment before, while it still runs without a response.
    from explaind.v1 import operations_pb2

    for state, expected in (("running", ""), ("succeeded", RESULT_ARTIFACT)):
        metadata = operations_pb2.OperationMetadata()
        convert.operation(JobSnapshot(dataclasses.replace(big, state=state))).metadata.Unpack(metadata)
        assert metadata.full_response_artifact == expected


def test_a_job_s_queue_wait_is_timed_when_it_starts_and_registered_kinds_export_zeros(tmp_path):
    metrics, gate = Metrics(), threading.Event()
    jobs = JobManager(SQLiteStore(tmp_path), metrics, workers=1)
    value = metrics.registry.get_sample_value
    jobs.register_kinds("visualize")
    # Before any job: a rate over these sees the first one (a series born with it would not).
    assert value("explaind_job_queue_wait_seconds_count", {"kind": "visualize"}) == 0
    assert value("explaind_jobs_running", {"kind": "visualize"}) == 0
    assert jobs_ended(metrics, ("visualize", "succeeded", "OK"), *(("visualize", "failed", code) for code in ("INTERNAL", "UNKNOWN", "DATA_LOSS"))) == [0.0] * 4
    # And the time in each of its stages (they were born with the kind's first job): the
    # manager's own for a kind that names none, else the ones it declares.
    jobs.register_kinds("staged", stages=("a", "b"))

    def stage_counts(kind: str, *stages: str) -> list[float | None]:
        return [value("explaind_job_stage_duration_seconds_count", {"kind": kind, "stage": stage}) for stage in stages]

    assert stage_counts("visualize", "start", "run", "finish") == [0.0] * 3
    assert stage_counts("staged", "start", "a", "b", "finish", "run") == [0.0] * 4 + [None]
    blocker = jobs.submit("block", lambda ctx: (gate.wait(10), _empty())[1])
    while jobs.get(blocker.record.job_id).record.state != "running":
        time.sleep(0.01)
    queued = jobs.submit("visualize", lambda ctx: _empty())
    time.sleep(0.3)
    gate.set()
    assert jobs.wait(queued.record.job_id, 10).record.state == "succeeded"
    assert value("explaind_job_queue_wait_seconds_count", {"kind": "visualize"}) == 1
    assert value("explaind_job_queue_wait_seconds_sum", {"kind": "visualize"}) >= 0.3  # it waited for the blocker
    assert value("explaind_job_queue_wait_seconds_count", {"kind": "block"}) == 1
    jobs.shutdown(1)


def test_a_job_s_duration_is_timed_on_a_clock_a_wall_clock_step_does_not_move(tmp_path, monkeypatch):
    # Timed by the wall clock, a job during which NTP stepped it back an hour observed
    # -3600 s: the histogram's sum went down, and rate() read it as a counter reset.
    metrics = Metrics()
    jobs = JobManager(SQLiteStore(tmp_path), metrics, workers=1)
    wall = time.time

    def stepped_back(ctx):
        monkeypatch.setattr(time, "time", lambda: wall() - 3600)
        return _empty()

    assert jobs.wait(jobs.submit("visualize", stepped_back).record.job_id, 10).record.state == "succeeded"
    monkeypatch.undo()
    assert 0 <= metrics.registry.get_sample_value("explaind_job_duration_seconds_sum", {"kind": "visualize", "outcome": "succeeded"}) < 60
    jobs.shutdown(1)


def test_a_job_s_stages_are_timed_once_each_also_when_it_fails_and_unnamed_time_is_run(tmp_path):
    metrics = Metrics()
    jobs = JobManager(SQLiteStore(tmp_path), metrics, workers=1)
    value = metrics.registry.get_sample_value

    def staged(ctx):
        for stage in ("a", "b", "a"):  # back to a: a's two visits are one observation
            ctx.stage(stage)
            time.sleep(0.05)
        raise InvalidArgument("refused")

    failed = jobs.submit("staged", staged)
    plain = jobs.submit("plain", lambda ctx: (time.sleep(0.05), _empty())[1])
    assert jobs.wait(failed.record.job_id, 10).record.state == "failed"
    assert jobs.wait(plain.record.job_id, 10).record.state == "succeeded"
    jobs.shutdown(1)
    for kind, stages in (("staged", ("start", "a", "b", "finish")), ("plain", ("start", "run", "finish"))):
        outcome = "failed" if kind == "staged" else "succeeded"
        seconds = {stage: value("explaind_job_stage_duration_seconds_sum", {"kind": kind, "stage": stage}) for stage in stages}
        assert [value("explaind_job_stage_duration_seconds_count", {"kind": kind, "stage": stage}) for stage in stages] == [1] * len(stages)
        duration = value("explaind_job_duration_seconds_sum", {"kind": kind, "outcome": outcome})
        assert sum(seconds.values()) <= duration + 1e-3 and sum(seconds.values()) >= duration - 0.1 - 0.1 * duration
    assert value("explaind_job_stage_duration_seconds_sum", {"kind": "staged", "stage": "a"}) >= 0.1
    assert value("explaind_job_stage_duration_seconds_sum", {"kind": "plain", "stage": "run"}) >= 0.05


def test_a_job_s_run_is_in_the_metrics_once_a_waiter_sees_it_end(tmp_path, monkeypatch):
    # Its time, its stages' and the running count were recorded after its end woke the
    # waiters: a worker preempted there left a caller that read the metrics once its result
    # was in a job still running and no duration.
    end_and_record = JobManager._finish
    read = threading.Event()

    def held_after_the_end(self, *args, **kwargs):
        end_and_record(self, *args, **kwargs)
        read.wait(10)  # as a worker preempted right after setting the end

    monkeypatch.setattr(JobManager, "_finish", held_after_the_end)
    metrics = Metrics()
    jobs = JobManager(SQLiteStore(tmp_path), metrics, workers=1)
    value = metrics.registry.get_sample_value
    try:
        assert jobs.wait(jobs.submit("visualize", lambda ctx: _empty()).record.job_id, 10).record.state == "succeeded"
        assert value("explaind_jobs_running", {"kind": "visualize"}) == 0
        assert value("explaind_job_duration_seconds_count", {"kind": "visualize", "outcome": "succeeded"}) == 1
        assert [value("explaind_job_stage_duration_seconds_count", {"kind": "visualize", "stage": stage}) for stage in ("start", "run", "finish")] == [1] * 3
    finally:
        read.set()
        jobs.shutdown(1)


def test_a_job_whose_work_calls_sys_exit_ends_failed_internal_and_its_worker_runs_the_next(tmp_path):
    # SystemExit is no Exception: it passed the job's handlers, and the job stayed running
    # to its waiters until a restart, its running gauge counted down as if it had ended.
    def exits(context):
        sys.exit("a library gave up")

    metrics = Metrics()
    jobs = JobManager(SQLiteStore(tmp_path), metrics, workers=1)
    try:
        ended = jobs.wait(jobs.submit("visualize", exits).record.job_id, 10).record
        assert (ended.state, ended.error_code) == ("failed", "INTERNAL") and "(SystemExit)" in ended.error_message
        assert metrics.registry.get_sample_value("explaind_job_duration_seconds_count", {"kind": "visualize", "outcome": "failed"}) == 1
        assert jobs.wait(jobs.submit("visualize", lambda ctx: _empty()).record.job_id, 10).record.state == "succeeded"
    finally:
        jobs.shutdown(1)

def test_each_json_line_about_an_operation_or_logged_by_its_run_carries_its_id_and_kind(tmp_path):
    # Only their messages named them: a log pipeline joined an operation's lines, its
    # traceback (under an incident id) and an engine's warning from its run to the
    # operation, and to its audit line's operation_id, by parsing text.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    gate = threading.Event()

    def warns_and_fails(context):
        logging.getLogger("explaind.engine").warning("a warning from the run")
        gate.wait(10)
        raise RuntimeError("a bug")

    try:
        with json_log_lines("explaind") as lines:
            failing = jobs.submit("visualize_neurons", warns_and_fails)
            while jobs.get(failing.record.job_id).record.state != "running":
                time.sleep(0.01)
            queued = jobs.submit("evaluate_sample_set", lambda ctx: _empty())
            jobs.cancel(queued.record.job_id)  # its end is logged in this thread, not a worker's
            gate.set()
            assert jobs.wait(failing.record.job_id, 10).record.state == "failed"
    finally:
        jobs.shutdown(1)
    kinds = {failing.record.job_id: "visualize_neurons", queued.record.job_id: "evaluate_sample_set"}
    for line in lines:
        (job_id,) = [job_id for job_id in kinds if job_id in line["message"]] or [failing.record.job_id]  # the warning names none
        assert (line.get("operation_id"), line.get("kind")) == (job_id, kinds[job_id]), line
    # Queued, started, the run's warning, the traceback, the end; queued and cancelled.
    assert [line.get("operation_id") for line in lines].count(failing.record.job_id) == 5 and len(lines) == 7, lines
    assert any("RuntimeError: a bug" in line.get("exception", "") for line in lines)


def test_cancelling_a_queued_job_ends_it_at_once_and_frees_its_queue_slot(tmp_path):
    store, metrics, gate, ran = SQLiteStore(tmp_path), Metrics(), threading.Event(), []
    jobs = JobManager(store, metrics, max_queued=1, workers=1)
    blocker = jobs.submit("block", lambda ctx: (gate.wait(10), _empty())[1])
    while jobs.get(blocker.record.job_id).record.state != "running":
        time.sleep(0.01)
    queued = jobs.submit("queued", lambda ctx: (ran.append("queued"), _empty())[1])
    cancelled = jobs.cancel(queued.record.job_id)
    assert cancelled.done and cancelled.record.cancel_requested
    assert (cancelled.record.state, cancelled.record.error_message) == ("cancelled", "cancelled before it started")
    assert store.get_job(queued.record.job_id).state == "cancelled"
    assert metrics.registry.get_sample_value("explaind_jobs_queued") == 0
    after = jobs.submit("after", lambda ctx: _empty())  # max_queued 1: the slot is free again
    gate.set()
    assert jobs.wait(after.record.job_id, 10).record.state == "succeeded"
    assert ran == [] and jobs.get(queued.record.job_id).record.state == "cancelled"
    assert metrics.registry.get_sample_value("explaind_jobs_queued") == 0
    # It never ran, so only the ended counter sees it (job_duration counts jobs that ran).
    assert jobs_ended(metrics, ("queued", "cancelled", "CANCELLED"), ("block", "succeeded", "OK"), ("after", "succeeded", "OK")) == [1.0] * 3
    assert metrics.registry.get_sample_value("explaind_job_duration_seconds_count", {"kind": "queued", "outcome": "cancelled"}) is None
    jobs.shutdown(1)


def test_a_queued_job_says_its_place_and_what_runs_as_the_queue_moves_without_a_store_write(tmp_path, monkeypatch):
    # Behind a 30-minute visualisation a job said "queued" and nothing more: not how many
    # were ahead of it, nor which job held the worker, nor how far that one had got.
    store, gates = SQLiteStore(tmp_path), [threading.Event() for _ in range(2)]
    jobs = JobManager(store, Metrics(), workers=1)

    def blocking(gate: threading.Event):
        def job(ctx):
            ctx.report_progress(120, 400, "optimising")
            gate.wait(10)
            return _empty()
        return job

    first = jobs.submit("visualize_neurons", blocking(gates[0])).record.job_id
    while jobs.get(first).record.step != 120:
        time.sleep(0.01)
    second = jobs.submit("rank_mistake_neurons", blocking(gates[1]))
    third = jobs.submit("evaluate_sample_set", lambda ctx: _empty())
    writes = []
    monkeypatch.setattr(store, "update_job", lambda record: writes.append(record))  # none while the queue is read
    holder = rf"visualize_neurons {first} \(step 120/400, under a minute\)"
    assert re.fullmatch(rf"queued: next; running: {holder}", second.record.message)  # the submitting call's answer says it too
    assert re.fullmatch(rf"queued: 1 ahead; running: {holder}", third.record.message)
    assert re.fullmatch(rf"queued: 1 ahead; running: {holder}", jobs.list(state="queued")[0].record.message)
    assert writes == [] and store.get_job(third.record.job_id).message == "queued"  # what a restart reads: no place that would be stale
    monkeypatch.undo()
    jobs.cancel(first)
    assert re.fullmatch(rf"queued: 1 ahead; running: visualize_neurons {first} \(step 120/400, under a minute, cancel requested\)",
                        jobs.get(third.record.job_id).record.message)
    gates[0].set()
    while jobs.get(second.record.job_id).record.step != 120:
        time.sleep(0.01)
    assert jobs.get(third.record.job_id).record.message == f"queued: next; running: rank_mistake_neurons {second.record.job_id} (step 120/400, under a minute)"
    gates[1].set()
    assert jobs.wait(third.record.job_id, 10).record.message == "done"
    jobs.shutdown(1)


def test_a_wall_clock_set_back_does_not_make_the_running_job_a_queued_one_names_run_for_negative_minutes(tmp_path, monkeypatch):
    # NTP setting the clock back an hour: the job holding the worker "ran -60 min".
    jobs, gate = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1), threading.Event()
    running = jobs.submit("evaluate", lambda ctx: (gate.wait(10), _empty())[1]).record.job_id
    while jobs.get(running).record.state != "running":
        time.sleep(0.01)
    set_back = time.time() - 3600
    monkeypatch.setattr(time, "time", lambda: set_back)
    queued = jobs.submit("evaluate", lambda ctx: _empty())
    assert queued.record.message == f"queued: next; running: evaluate {running} (under a minute)"
    gate.set()
    jobs.wait(queued.record.job_id, 10)
    jobs.shutdown(1)


def _started_after_a_gate(jobs: JobManager, owner: str | None) -> tuple[str, threading.Event]:
    """A job of ``owner`` that holds the only worker until the returned gate is set, running."""
    gate = threading.Event()
    job_id = jobs.submit("visualize_neurons", lambda ctx: (gate.wait(10), _empty())[1], owner=owner).record.job_id
    while jobs.get(job_id).record.state != "running":
        time.sleep(0.01)
    return job_id, gate


def test_callers_take_turns_in_the_job_queue_and_a_queued_job_counts_its_place_in_their_order(tmp_path):
    # An analyst's 50 visualisations made a monitoring pipeline's evaluation, submitted
    # after them, wait for all of them: the queue was first in, first out across callers.
    jobs, started = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1), []
    running, gate = _started_after_a_gate(jobs, "analyst")

    def submit(owner: str, name: str) -> str:
        return jobs.submit("evaluate_sample_set", lambda ctx: (started.append(name), _empty())[1], owner=owner).record.job_id

    queued = {name: submit(owner, name) for owner, name in (("analyst", "a1"), ("analyst", "a2"), ("analyst", "a3"),
                                                             ("monitoring", "m1"), ("monitoring", "m2"), ("ci", "c1"))}
    # Those none of whose jobs has started go first (the pipeline's oldest job is older
    # than ci's), then the callers take turns, each its oldest job first.
    order = ["m1", "c1", "a1", "m2", "a2", "a3"]
    assert {name: jobs.get(job_id).record.message for name, job_id in queued.items()} == {
        name: f"queued: {f'{place} ahead' if place else 'next'}; running: visualize_neurons {running} (under a minute)"
        for place, name in enumerate(order)}
    gate.set()
    for job_id in queued.values():
        assert jobs.wait(job_id, 10).record.state == "succeeded"
    assert started == order
    jobs.shutdown(1)


def test_a_caller_beyond_max_queued_per_caller_is_refused_and_others_are_not(tmp_path):
    config = default_config().replace("server", data_dir=str(tmp_path)).replace("jobs", max_queued_per_caller=2)
    engine = Engine(config, SQLiteStore(tmp_path), Metrics())
    jobs = engine.jobs
    running, gate = _started_after_a_gate(jobs, "analyst")  # running: no longer queued, so not counted
    analysts = [jobs.submit("evaluate_sample_set", lambda ctx: _empty(), owner="analyst") for _ in range(2)]
    with pytest.raises(ResourceExhausted) as refused:
        jobs.submit("evaluate_sample_set", lambda ctx: _empty(), owner="analyst")
    assert str(refused.value) == ("job queue is full for caller 'analyst' (2 of its jobs queued, limit 2, "
                                  "[jobs].max_queued_per_caller); retry later")
    monitoring = jobs.submit("evaluate_sample_set", lambda ctx: _empty(), owner="monitoring")
    # Without named callers there is no caller to limit: [jobs].max_queued alone bounds the queue.
    anonymous = [jobs.submit("evaluate_sample_set", lambda ctx: _empty()) for _ in range(3)]
    jobs.cancel(analysts[0].record.job_id)  # a slot of the analyst's is free again
    again = jobs.submit("evaluate_sample_set", lambda ctx: _empty(), owner="analyst")
    gate.set()
    for job in (analysts[1], monitoring, *anonymous, again):
        assert jobs.wait(job.record.job_id, 10).record.state == "succeeded"
    engine.close()


def test_a_job_past_max_run_seconds_fails_deadline_exceeded_at_its_next_check_and_frees_the_worker(tmp_path):
    # One runaway job held the only worker for hours; the jobs behind it said "queued".
    config = default_config().replace("server", data_dir=str(tmp_path)).replace("jobs", max_run_seconds=0.05)
    unlimited = Engine(default_config().replace("server", data_dir=str(tmp_path / "default")), SQLiteStore(tmp_path / "default"), Metrics())
    assert unlimited.jobs.max_run_s is None  # the default: off
    unlimited.close()
    metrics = Metrics()
    engine = Engine(config, SQLiteStore(tmp_path), metrics)
    jobs = engine.jobs
    checks = []

    def endless(ctx):
        for _ in range(3000):  # 30 s, the wait below: a limit not enforced fails the test rather than hang the run's exit
            ctx.raise_if_cancelled()
            checks.append(ctx.job_id)
            time.sleep(0.01)
        return _empty()

    runaway = jobs.submit("visualize_neurons", endless)
    behind = jobs.submit("evaluate_sample_set", lambda ctx: (ctx.raise_if_cancelled(), _empty())[1])  # checks at once: in budget
    ended = jobs.wait(runaway.record.job_id, 30).record
    assert (ended.state, ended.error_code) == ("failed", "DEADLINE_EXCEEDED") and checks
    assert ended.error_message == ("the job ran longer than the server allows an operation, 0.05 s ([jobs].max_run_seconds); "
                                   "ask for less work (fewer samples, steps or pairs), or for a higher limit")
    assert jobs.wait(behind.record.job_id, 30).record.state == "succeeded"
    assert jobs_ended(metrics, ("visualize_neurons", "failed", "DEADLINE_EXCEEDED")) == [1.0]
    engine.close()


def test_a_jobs_run_time_remaining_reads_0_once_past_its_limit_and_none_without_one(tmp_path, jobs_clock):
    # A ranking stops its resamples, keeping the shares drawn, when this reads 0: a negative
    # count past the limit went on to the next check, which failed the whole ranking instead.
    jobs, remaining = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1, max_run_s=50.0), []

    def job(ctx):
        remaining.append(ctx.run_time_remaining())
        jobs_clock[0] += 50.5
        remaining.append(ctx.run_time_remaining())
        return _empty()

    assert jobs.wait(jobs.submit("evaluate", job).record.job_id).record.state == "succeeded"
    assert remaining == [pytest.approx(50.0, abs=1.0), 0.0]
    unlimited = JobManager(SQLiteStore(tmp_path / "unlimited"), Metrics(), workers=1)
    assert unlimited.wait(unlimited.submit("evaluate", lambda ctx: (remaining.append(ctx.run_time_remaining()), _empty())[1]).record.job_id).record.state == "succeeded"
    assert remaining[-1] is None  # no [jobs].max_run_seconds: no limit to count down to
    for manager in (jobs, unlimited):
        manager.shutdown(1)


def test_shutdown_aborts_unfinished_jobs_like_a_restart_does(tmp_path):
    store, metrics, ran = SQLiteStore(tmp_path), Metrics(), []

    def checks_until_stopped(ctx):
        while True:
            ctx.raise_if_cancelled()
            time.sleep(0.01)

    jobs = JobManager(store, metrics, workers=1)
    running = jobs.submit("running", checks_until_stopped)
    while jobs.get(running.record.job_id).record.state != "running":
        time.sleep(0.01)
    queued = jobs.submit("queued", lambda ctx: (ran.append("queued"), _empty())[1])
    jobs.shutdown(0.1)
    for job, when in ((running, "while this job was running"), (queued, "before this job started")):
        record = store.get_job(job.record.job_id)
        assert (record.state, record.error_code, record.cancel_requested) == ("failed", "ABORTED", False)
        assert record.error_message == f"the server shut down {when}; submit it again"
    assert ran == [] and metrics.registry.get_sample_value("explaind_jobs_queued") == 0
    # Nor is one taken after: it would be stored queued with no worker left to run it.
    with pytest.raises(Unavailable, match="the server is shutting down"):
        jobs.submit("late", lambda ctx: _empty())
    assert {s.record.job_id for s in jobs.list()} == {running.record.job_id, queued.record.job_id}


def test_shutdown_lets_a_running_job_end_within_its_grace(tmp_path, monkeypatch):
    # The grace is what keeps a job a moment from its end from being aborted, its work lost.
    store = SQLiteStore(tmp_path)
    jobs = JobManager(store, Metrics(), workers=1)
    started, finish, grace_begun = threading.Event(), threading.Event(), threading.Event()

    class SaysWhenWaited(threading.Condition):
        def wait(self, timeout=None):
            grace_begun.set()  # only shutdown waits here in this test
            return super().wait(timeout)

    monkeypatch.setattr(jobs, "_changed", SaysWhenWaited())

    def almost_done(ctx):
        started.set()
        finish.wait(10)
        ctx.raise_if_cancelled()
        return _empty()

    job_id = jobs.submit("evaluate", almost_done).record.job_id
    assert started.wait(10)
    stopping = threading.Thread(target=jobs.shutdown, args=(30,))
    stopping.start()
    try:
        assert grace_begun.wait(10)
    finally:
        finish.set()
        stopping.join(30)
    assert not stopping.is_alive() and store.get_job(job_id).state == "succeeded"


def test_a_lost_file_the_store_still_references_is_data_loss_and_logged_not_not_found(tmp_path, caplog):
    """NOT_FOUND blamed the caller and no alert saw it; a set whose image is gone failed
    every job on it without the operator hearing of it."""
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        held, orphan = put(b"an image"), put(b"an image of a deleted set")
        store.create_sample_set("s", "", [SampleRecord(held, 0)])
    for digest in (held, orphan):
        store._blob_path(digest).unlink()
    with caplog.at_level(logging.ERROR, logger="explaind.store.sqlite"), pytest.raises(DataLoss, match="missing from the server's data dir"):
        store.get_blob(held)
    assert f"{store._blob_path(held)} is missing" in caplog.text
    with pytest.raises(NotFound):  # what a sweep removes after a delete: the caller's race, not a loss
        store.get_blob(orphan)
    store.close()


def test_a_store_written_before_sample_sets_had_an_upload_state_opens_with_its_sets_usable(tmp_path):
    with sqlite3.connect(tmp_path / "explaind.sqlite3") as old:
        old.execute("CREATE TABLE sample_sets (id TEXT PRIMARY KEY, display_name TEXT NOT NULL, create_time REAL NOT NULL, update_time REAL NOT NULL)")
        old.execute("INSERT INTO sample_sets VALUES ('old', 'from before', 1.0, 1.0)")
    old.close()
    store = SQLiteStore(tmp_path)
    try:
        assert store.get_sample_set("old").uploading is False and store.delete_unfinished_uploads() == []
        assert store.create_sample_set("new", "", [], uploading=True).uploading
        assert store.delete_unfinished_uploads() == ["new"] and [i.sample_set_id for i in store.list_sample_sets(limit=10)] == ["old"]
    finally:
        store.close()
    # ... and the release before still writes to it after this one opened it (a rollback).
    with sqlite3.connect(tmp_path / "explaind.sqlite3") as previous:
        previous.execute("INSERT INTO sample_sets VALUES ('written-by-the-previous-release', '', 2.0, 2.0)")
    previous.close()


def test_a_data_dir_that_cannot_be_written_or_locked_is_one_clear_error(tmp_path, monkeypatch):
    import fcntl

    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreOpenError, match=r"cannot use the data dir .*a-file/data: Not a directory; the server must be able to write there"):
        SQLiteStore(tmp_path / "a-file" / "data")
    (tmp_path / "locked-out" / "explaind.lock").mkdir(parents=True)  # the lock file cannot be opened (root ignores permissions)
    with pytest.raises(StoreOpenError, match=r"cannot use the data dir .*locked-out: Is a directory; the server must be able to write there"):
        SQLiteStore(tmp_path / "locked-out")
    monkeypatch.setattr(fcntl, "flock", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))))
    with pytest.raises(StoreOpenError, match=r"cannot lock the data dir .*: No locks available; use a local file system"):
        SQLiteStore(tmp_path / "nfs")


def test_a_store_that_fails_its_first_writes_stops_the_start_with_one_error(tmp_path, classifier_dir, monkeypatch):
    # Deleting unfinished uploads on a damaged database escaped as a traceback.
    from explaind.service import ExplaindServer
    from explaind.store import StoreOpenError

    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path))
    server = ExplaindServer(config)
    monkeypatch.setattr(server.store, "delete_unfinished_uploads", lambda: (_ for _ in ()).throw(sqlite3.DatabaseError("database disk image is malformed")))
    try:
        with pytest.raises(StoreOpenError, match=rf"^\[server\]\.data_dir: cannot use the store in {re.escape(str(tmp_path))}: database disk image is malformed; restore its database from a backup$"):
            server.start()
    finally:
        server.store.close()


def test_a_start_deletes_the_uploads_an_earlier_process_left_unfinished_and_says_which(tmp_path, classifier_dir, caplog):
    # A set mid-upload when the process died can never be finished (its client's stream is gone).
    from explaind.service import ExplaindServer

    store = SQLiteStore(tmp_path)
    store.create_sample_set("finished", "", [])
    store.create_sample_set("half-sent", "", [], uploading=True)
    store.close()
    server = ExplaindServer(default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path)))
    try:
        with caplog.at_level(logging.WARNING, logger="explaind"):
            server.start()
        assert [s.sample_set_id for s in server.store.list_sample_sets(limit=10)] == ["finished"]
        assert "deleted 1 sample set(s) whose upload an earlier process left unfinished: half-sent" in caplog.text
    finally:
        server.stop(0)


def test_serve_exits_with_code_1_when_the_models_fail_to_load_after_it_bound(tmp_path, caplog):
    # A load fails only once gRPC listens (calls are answered NOT_SERVING meanwhile); the
    # process must still exit non-zero, so an orchestrator restarts it and says why. A
    # directory whose files are no classifier: a missing or unreadable one is refused
    # before the bind.
    from explaind.config import WORLD_CLASSIFIER_FILES
    from explaind.service.server import serve

    (tmp_path / "no-classifier").mkdir()
    for name in WORLD_CLASSIFIER_FILES:
        (tmp_path / "no-classifier" / name).write_bytes(b"not a classifier")
    config = default_config().replace("classifier", path=str(tmp_path / "no-classifier")).replace(
        "server", host="127.0.0.1", port=0, data_dir=str(tmp_path / "data"))
    with caplog.at_level(logging.INFO, logger="explaind"):
        assert serve(config, threading.Event()) == 1
    assert "listening on 127.0.0.1:" in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][0].startswith("cannot start: ")
    assert "no-classifier" in caplog.text


def test_serve_logs_once_each_key_of_its_file_that_goes_unused(tmp_path, classifier_dir, caplog):
    # A path beside loader "torchvision", a sample ratio without an endpoint: unused without a word.
    from explaind.service.server import serve

    config = load_config(write_config(tmp_path / "c.toml", classifier_dir, tracing={"sample_ratio": 0.5})).replace(
        "server", host="127.0.0.1", port=0, data_dir=str(tmp_path / "data"))
    stop = threading.Event()
    stop.set()  # it stops before it binds: the warning comes first
    with caplog.at_level(logging.WARNING, logger="explaind"):
        assert serve(config, stop) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{tmp_path / 'c.toml'}: [tracing].sample_ratio is ignored without [tracing].otlp_endpoint: nothing is traced"]


def test_serve_given_a_config_built_in_code_with_an_unknown_loader_says_why_it_cannot_start(tmp_path, caplog):
    # A Config built in code is not checked as a file is: the loader's name is refused as
    # the model loads. The unused-key warnings looked the loader up first and raised a
    # KeyError out of serve, a traceback in place of the line naming it.
    from explaind.service.server import serve

    config = default_config().replace("server", host="127.0.0.1", port=0, data_dir=str(tmp_path / "data"))
    config = dataclasses.replace(config, classifier=dataclasses.replace(config.classifier, loader="onnxx"))
    with caplog.at_level(logging.ERROR, logger="explaind"):
        assert serve(config, threading.Event()) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][0].startswith("cannot start: cannot load classifier (onnxx)")


def test_a_stopped_server_leaves_none_of_its_threads_running(tmp_path, classifier_dir):
    # An embedding process (a test suite, a notebook) starts and stops servers in one
    # process: each stop must end the Predict batcher's worker and the sweeper it started.
    from explaind.service import ExplaindServer

    server = ExplaindServer(default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path)))
    server.start()
    server.load_models()
    threads = {"batcher": server.engine._batcher._worker, "sweeper": server._sweeper}
    assert all(thread.is_alive() for thread in threads.values())
    server.stop(0)
    assert [name for name, thread in threads.items() if thread.is_alive()] == []


def test_serve_that_cannot_bind_releases_the_data_dir_for_the_next_try(tmp_path):
    # An embedding process (or a supervisor retrying in one process) must find the data
    # dir's lock free once serve() has raised, not "in use by another server".
    import socket

    from explaind.service.server import serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = default_config().replace("server", host="127.0.0.1", port=busy.getsockname()[1], data_dir=str(tmp_path / "data"))
        with pytest.raises(OSError, match="cannot bind"):
            serve(config, threading.Event())
    SQLiteStore(tmp_path / "data").close()


def test_a_damaged_database_page_met_while_the_models_load_names_the_data_dir_and_what_to_do(tmp_path, classifier_dir):
    # Start-up said only "cannot start: database disk image is malformed": no file, no remedy.
    from explaind.service import ExplaindServer
    from explaind.store import HeadVersionRecord, SQLiteStore, StoreOpenError

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        weights = put(b"weights")
        for number in range(40):  # head versions over several pages, which only the load reads
            store.insert_head_version(HeadVersionRecord("features", f"v{number}", "hash", weights, "v0", float(number), {"notes": "x" * 2000}))
    store.close()
    database = tmp_path / "explaind.sqlite3"
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = [row[0] for row in db.execute("SELECT pageno FROM dbstat WHERE name = 'sqlite_autoindex_head_versions_1'")]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    with open(database, "r+b") as file:
        for page in pages:
            file.seek((page - 1) * page_size)
            file.write(b"\xff" * page_size)
    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, metrics_port=0, data_dir=str(tmp_path))
    server = ExplaindServer(config)
    try:
        server.start()
        with pytest.raises(StoreOpenError, match=rf"^\[server\]\.data_dir: cannot use the store in {re.escape(str(tmp_path))}: database disk image is malformed; "
                                                  "restore its database from a backup"):
            server.load_models()
    finally:
        server.stop(0)


def test_a_failed_commit_is_rolled_back_so_the_next_write_works(tmp_path):
    from explaind.store import JobRecord

    store = SQLiteStore(tmp_path)

    class CommitFailsOnce:  # SQLITE_BUSY / disk I/O error at COMMIT
        def __init__(self, connection):
            self.connection, self.failed = connection, False

        def execute(self, sql, *args):
            if sql == "COMMIT" and not self.failed:
                self.failed = True
                raise sqlite3.OperationalError("database is locked")
            return self.connection.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.connection, name)

    real, store._db = store._db, CommitFailsOnce(store._db)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.insert_job(JobRecord(job_id="a", kind="k", state="queued", create_time=1.0))
    store.insert_job(JobRecord(job_id="b", kind="k", state="queued", create_time=2.0))  # "cannot start a transaction within a transaction" before
    store._db = real
    assert store.get_job("b").state == "queued"
    with pytest.raises(NotFound):
        store.get_job("a")
    store.close()


class _FailingWrites(SQLiteStore):
    """A store whose job writes fail once ``failures`` is set (a disk that just filled)."""

    failures = 0

    def update_job(self, record):
        if self.failures and record.state in ("succeeded", "failed"):
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return super().update_job(record)


@pytest.mark.parametrize("failures", [1, 2])
def test_a_job_whose_end_cannot_be_stored_reads_failed_never_succeeded(tmp_path, failures, caplog):
    # The record in memory used to run ahead of the store: the operation read SUCCEEDED,
    # the store said running, nothing was logged, and shutdown waited out its grace.
    store, metrics = _FailingWrites(tmp_path), Metrics()
    jobs = JobManager(store, metrics, workers=1)
    store.failures = failures
    job = jobs.submit("evaluate", lambda ctx: _empty())
    record = jobs.wait(job.record.job_id, 10).record
    assert (record.state, record.error_code) == ("failed", "INTERNAL")
    assert record.error_message == "the job ended succeeded but the store failed to record it (OperationalError); submit it again"
    # A write failure the store gives no reason for keeps its traceback, the failure's too.
    tracebacks = [(line.getMessage(), type(line.exc_info[1])) for line in caplog.records if line.name == "explaind.jobs" and line.exc_info]
    assert tracebacks == [(f"job {job.record.job_id} (evaluate): storing its end (succeeded) failed", sqlite3.OperationalError),
                          (f"job {job.record.job_id}: storing its failure failed too", sqlite3.OperationalError)][:failures]
    # Stored FAILED when the second write worked; else still "running" there until the
    # store takes it (a sweep, a delete), no longer until a restart.
    assert store.get_job(job.record.job_id).state == ("failed" if failures == 1 else "running")
    if failures == 2:
        store.failures = 1  # still refused: cancelling and waiting cannot help, say what does
        with pytest.raises(FailedPrecondition, match=r"ended failed but the store failed to record its end \(disk I/O error\); "
                                                     "it can be deleted once the store takes it, or after the server restarts"):
            jobs.delete(job.record.job_id)
        store.failures = 1
        assert jobs.record_unrecorded_ends() == 0 and store.get_job(job.record.job_id).state == "running"
        assert jobs.record_unrecorded_ends() == 1  # the server's sweep, once space is freed
        assert store.get_job(job.record.job_id).state == "failed" and jobs.get(job.record.job_id).record == store.get_job(job.record.job_id)
        assert jobs.record_unrecorded_ends() == 0
    # One end, counted once: storing it late is no second end (an alert's rate doubled).
    assert jobs_ended(metrics, ("evaluate", "failed", "INTERNAL"), ("evaluate", "succeeded", "OK")) == [1.0, None]
    jobs.delete(job.record.job_id)
    started = time.monotonic()
    jobs.shutdown(5)
    assert time.monotonic() - started < 4  # not the 5 s grace waited out; 1 s was a loaded machine's to miss


def test_a_job_whose_start_the_store_fails_to_write_fails_internal_and_logs_the_traceback(tmp_path, caplog):
    # Unlike a full data dir's refusal (below), a failure with no reason is the operator's
    # to investigate: its traceback is logged, once.
    class FailingStarts(SQLiteStore):
        def update_job(self, record):
            if record.state == "running":
                raise sqlite3.OperationalError("disk I/O error")
            return super().update_job(record)

    jobs = JobManager(FailingStarts(tmp_path), Metrics(), workers=1)
    try:
        job = jobs.submit("evaluate", lambda ctx: _empty())
        record = jobs.wait(job.record.job_id, 10).record
        assert (record.state, record.error_code) == ("failed", "INTERNAL")
        assert record.error_message == "the job could not be started: the store failed to record it (OperationalError); submit it again"
        tracebacks = [(line.getMessage(), type(line.exc_info[1])) for line in caplog.records if line.name == "explaind.jobs" and line.exc_info]
        assert tracebacks == [(f"job {job.record.job_id} (evaluate): storing its start failed", sqlite3.OperationalError)]
    finally:
        jobs.shutdown(5)


@pytest.mark.parametrize(("refused", "said"), [("succeeded", "the job ended succeeded but"), ("running", "the job could not be started:")])
def test_a_job_whose_end_or_start_a_full_data_dir_refuses_fails_resource_exhausted_naming_it(tmp_path, refused, said, caplog):
    # It failed INTERNAL, "the store failed to record it (ResourceExhausted)": no word of
    # the full data dir the caller can do nothing about but wait, nor of the operator's cue.
    # So did a job queued while the data dir filled, at its start.
    class FullForState(SQLiteStore):
        def update_job(self, record):
            if record.state == refused:
                raise self._full("database or disk is full")
            return super().update_job(record)

    store = FullForState(tmp_path)
    jobs = JobManager(store, Metrics(), workers=1)
    job = jobs.submit("evaluate", lambda ctx: _empty())
    record = jobs.wait(job.record.job_id, 10).record
    assert (record.state, record.error_code) == ("failed", "RESOURCE_EXHAUSTED")
    assert record.error_message == (f"{said} the store could not record it: the server's data dir {tmp_path} is full "
                                    "(database or disk is full); the operator must free space there; submit it again")
    assert store.get_job(job.record.job_id).error_code == "RESOURCE_EXHAUSTED"
    # Its end line says so, at WARNING; an ERROR traceback of the refusal, per job while
    # the disk was full (two for a start refused), only repeated it.
    assert [(line.levelname, line.exc_info) for line in caplog.records if line.name == "explaind.jobs" and line.levelno >= logging.WARNING
            and job.record.job_id in line.getMessage()] == [("WARNING", None)]
    jobs.delete(job.record.job_id)
    jobs.shutdown(5)
    store.close()


def test_a_job_whose_end_was_refused_is_deleted_without_a_restart_once_the_store_takes_it(tmp_path):
    # "It can be deleted after the server restarts": freeing space in a full data dir did
    # not help, and the store said running until then.
    store = _FailingWrites(tmp_path)
    jobs = JobManager(store, Metrics(), workers=1)
    store.failures = 2
    job_id = jobs.submit("evaluate", lambda ctx: _empty()).record.job_id
    assert jobs.wait(job_id, 10).record.state == "failed" and store.get_job(job_id).state == "running"
    jobs.delete(job_id)  # the store takes its end now
    with pytest.raises(NotFound):
        jobs.get(job_id)
    jobs.shutdown(5)
    store.close()


def test_cancelling_a_job_that_ended_but_whose_end_the_store_refused_changes_nothing(tmp_path):
    # Its end is live only, FAILED: the cancel was taken for a running job's, stored the
    # ended record with cancel_requested set and, with the store still refusing, failed
    # CancelOperation with the store's error (INTERNAL) for an operation that had ended.
    store, metrics = _FailingWrites(tmp_path), Metrics()
    jobs = JobManager(store, metrics, workers=1)
    store.failures = 2
    job_id = jobs.submit("evaluate", lambda ctx: _empty()).record.job_id
    ended = jobs.wait(job_id, 10).record
    assert ended.state == "failed" and store.get_job(job_id).state == "running"
    store.failures = 1  # the store still refuses its end
    assert jobs.cancel(job_id).record == ended
    assert store.failures == 1 and store.get_job(job_id).state == "running"  # no write was tried
    assert jobs.record_unrecorded_ends() == 0 and jobs.record_unrecorded_ends() == 1
    assert store.get_job(job_id) == ended and not ended.cancel_requested
    assert jobs_ended(metrics, ("evaluate", "failed", "INTERNAL")) == [1.0]
    jobs.shutdown(1)


def test_a_cancelled_job_ends_cancelled_however_slow_the_store(tmp_path):
    # The job could see the cancel before the request was recorded and end FAILED/ABORTED
    # as if the server had shut down (seen with a store write in between).
    class SlowCancelWrites(SQLiteStore):
        def update_job(self, record):
            if record.cancel_requested and record.state == "running":
                time.sleep(0.3)
            return super().update_job(record)

    jobs = JobManager(SlowCancelWrites(tmp_path), Metrics(), workers=1)

    def checks_until_stopped(ctx):
        while True:
            ctx.raise_if_cancelled()
            time.sleep(0.001)

    job = jobs.submit("spin", checks_until_stopped)
    while jobs.get(job.record.job_id).record.state != "running":
        time.sleep(0.01)
    jobs.cancel(job.record.job_id)
    record = jobs.wait(job.record.job_id, 10).record
    assert (record.state, record.error_code) == ("cancelled", "CANCELLED")
    jobs.shutdown(1)


def _empty():
    from google.protobuf import empty_pb2

    return empty_pb2.Empty()


def test_progress_without_a_total_keeps_the_last_one_and_a_total_of_zero_says_unknown(tmp_path):
    # A job whose next phase has no known size reports total 0: it kept the last phase's
    # total, and read "step 0 of 10" for work that had not been counted.
    jobs, seen = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1), []

    def job(ctx):
        for progress in ((3, 10, "reading"), (4, None, "still reading"), (0, 0, "counting")):
            ctx.report_progress(*progress)
            record = jobs.get(ctx.job_id).record
            seen.append((record.step, record.total, record.message))
        return _empty()

    assert jobs.wait(jobs.submit("evaluate", job).record.job_id, 10).record.state == "succeeded"
    assert seen == [(3, 10, "reading"), (4, 10, "still reading"), (0, 0, "counting")]
    jobs.shutdown(1)


def test_a_preview_is_read_live_until_the_next_one_and_progress_without_one_keeps_it(tmp_path):
    jobs, previews = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1), []

    def job(ctx):
        for progress in (dict(step=1), dict(step=2, preview=b"first"), dict(step=3), dict(step=4, preview=b"second")):
            ctx.report_progress(total=4, **progress)
            previews.append(jobs.get(ctx.job_id).preview)
        return _empty()

    ended = jobs.wait(jobs.submit("visualize", job).record.job_id, 10)
    assert previews == [b"", b"first", b"first", b"second"]
    assert ended.preview == b""  # live only: the stored record has none
    jobs.shutdown(1)


def test_an_artifact_is_in_the_stored_record_as_soon_as_it_is_saved(tmp_path):
    # Listed only in memory until the next due progress write, a crash then lost the
    # artifact of a job that had saved it (its blob stored, its listing not).
    store = SQLiteStore(tmp_path)
    jobs, stored = JobManager(store, Metrics(), workers=1), []

    def job(ctx):
        for number in (1, 2):
            saved = ctx.save_artifact(f"grid{number}.png", f"image {number}".encode(), "image/png")
            stored.append(store.get_job(ctx.job_id).artifacts)
            assert store.get_blob(saved.digest) == f"image {number}".encode()
        return _empty()

    assert jobs.wait(jobs.submit("visualize", job).record.job_id, 10).record.state == "succeeded"
    assert [[(a.name, a.media_type, a.size_bytes) for a in artifacts] for artifacts in stored] == [
        [("grid1.png", "image/png", 7)], [("grid1.png", "image/png", 7), ("grid2.png", "image/png", 7)]]
    jobs.shutdown(1)


def test_progress_is_stored_when_a_write_is_due_and_not_at_every_step(tmp_path, monkeypatch):
    # A job of thousands of steps wrote each one to the database; the store gets progress
    # once a PERSIST_INTERVAL_S has passed since its last write (a monotonic clock, here stepped by hand).
    import types

    import explaind.jobs

    clock = [1000.0]
    monkeypatch.setattr(explaind.jobs, "time", types.SimpleNamespace(time=time.time, monotonic=lambda: clock[0]))
    store = SQLiteStore(tmp_path)
    jobs, stored = JobManager(store, Metrics(), workers=1), []

    def job(ctx):
        for step in (1, 2, 3, 4, 5):
            if step == 4:
                clock[0] += explaind.jobs.PERSIST_INTERVAL_S
            ctx.report_progress(step, 5)
            stored.append(store.get_job(ctx.job_id).step)
        return _empty()

    assert jobs.wait(jobs.submit("evaluate", job).record.job_id, 10).record.step == 5
    assert stored == [0, 0, 0, 4, 4]  # the start's write, then the first step due
    jobs.shutdown(1)


def test_the_workers_each_take_their_own_queued_job(tmp_path, monkeypatch):
    # A worker that took a job before starting it left it first in the queue's order for
    # the next worker, which took it too: one ran it, the other ran nothing, and the job
    # behind it stayed queued until another was submitted.
    import contextlib

    import explaind.jobs

    both_taken = threading.Barrier(2, timeout=10)

    @contextlib.contextmanager
    def once_both_turns_took_a_job(span):
        both_taken.wait()
        yield

    monkeypatch.setattr(explaind.jobs, "current", once_both_turns_took_a_job)
    jobs, ran = JobManager(SQLiteStore(tmp_path), Metrics(), workers=2), []
    job_ids = [jobs.submit("evaluate", lambda ctx, name=name: (ran.append(name), _empty())[1]).record.job_id for name in ("a", "b")]
    assert [jobs.wait(job_id, 10).record.state for job_id in job_ids] == ["succeeded", "succeeded"]
    assert sorted(ran) == ["a", "b"]
    jobs.shutdown(1)


def test_a_job_cancelled_as_a_worker_takes_it_never_runs(tmp_path, monkeypatch):
    import contextlib

    import explaind.jobs

    taken, resume = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def paused_once_taken(span):
        taken.set()
        assert resume.wait(10)
        yield

    monkeypatch.setattr(explaind.jobs, "current", paused_once_taken)
    store, metrics, ran = SQLiteStore(tmp_path), Metrics(), []
    jobs = JobManager(store, metrics, workers=1)
    job_id = jobs.submit("evaluate", lambda ctx: (ran.append("cancelled"), _empty())[1]).record.job_id
    assert taken.wait(10)
    assert jobs.cancel(job_id).record.state == "cancelled"
    resume.set()
    after = jobs.submit("evaluate", lambda ctx: _empty()).record.job_id  # the one worker's next turn: the taken one's is over
    assert jobs.wait(after, 10).record.state == "succeeded"
    assert ran == [] and store.get_job(job_id).state == "cancelled"
    assert metrics.registry.get_sample_value("explaind_jobs_queued") == 0
    jobs.shutdown(1)


def test_a_running_job_counts_in_jobs_running_and_its_cancel_is_stored_before_it_stops(tmp_path):
    store, metrics, gate, running = SQLiteStore(tmp_path), Metrics(), threading.Event(), []
    jobs = JobManager(store, metrics, workers=1)

    def job(ctx):
        running.append(metrics.registry.get_sample_value("explaind_jobs_running", {"kind": "visualize"}))
        gate.wait(10)
        ctx.raise_if_cancelled()
        return _empty()

    job_id = jobs.submit("visualize", job).record.job_id
    while jobs.get(job_id).record.state != "running":
        time.sleep(0.01)
    assert jobs.cancel(job_id).record.cancel_requested
    assert (store.get_job(job_id).state, store.get_job(job_id).cancel_requested) == ("running", True)
    gate.set()
    assert jobs.wait(job_id, 10).record.state == "cancelled"
    assert running == [1.0] and metrics.registry.get_sample_value("explaind_jobs_running", {"kind": "visualize"}) == 0
    jobs.shutdown(1)


def test_a_callers_waits_beyond_its_share_of_the_held_slots_answer_at_once_and_anothers_still_wait(tmp_path, monkeypatch):
    """WaitOperation holds a slot of the caller's share (HeldCalls.caller_limit): one
    caller's waits cannot take every slot; past its share it gets the state at once."""
    from google.protobuf import duration_pb2

    from explaind.service.auth import calling_as
    from explaind.service.interceptors import HeldCalls
    from explaind.service.operations import OperationsServicer
    from explaind.store import JobRecord
    from explaind.v1 import operations_pb2

    store = SQLiteStore(tmp_path, reserve_bytes=0)
    store.insert_job(JobRecord(job_id="0" * 16, kind="evaluate", state="succeeded", create_time=1000.0, end_time=1001.0))
    jobs = JobManager(store, Metrics(), workers=1)
    waited, wait = [], jobs.wait
    monkeypatch.setattr(jobs, "wait", lambda job_id, timeout, **options: waited.append(timeout) or wait(job_id, timeout, **options))

    class Context:
        def time_remaining(self):
            return None

        def is_active(self):
            return True

    try:
        held_calls = HeldCalls(2)  # one slot per caller
        servicer = OperationsServicer(jobs, max_message_bytes=4 << 20, held_calls=held_calls)
        request = operations_pb2.WaitOperationRequest(name="operations/" + "0" * 16, timeout=duration_pb2.Duration(seconds=5))
        with held_calls.slot(caller="analyst") as held:
            assert held
            for caller in ("analyst", "monitoring"):
                with calling_as(caller):
                    assert servicer.WaitOperation(request, Context()).operation.done
        assert waited == [0.0, 5.0]
    finally:
        jobs.shutdown(5)


def test_a_watch_or_wait_whose_caller_left_ends_with_the_job_still_running(tmp_path):
    # A client that hung up kept a thread watching (or waiting) until the job ended.
    jobs, gate = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1), threading.Event()
    job_id = jobs.submit("visualize", lambda ctx: (gate.wait(10), _empty())[1]).record.job_id
    while jobs.get(job_id).record.state != "running":
        time.sleep(0.01)
    assert [snapshot.record.state for snapshot in jobs.watch(job_id, is_active=lambda: False)] == ["running"]
    assert jobs.wait(job_id, is_active=lambda: False).record.state == "running"
    gate.set()
    assert jobs.wait(job_id, 10).record.state == "succeeded"
    jobs.shutdown(1)


def test_a_waiter_is_woken_by_the_job_s_end_not_by_its_next_poll(tmp_path, monkeypatch):
    # Without the wake-up a waiter or watcher saw each change only at its next poll.
    jobs, gate, ended = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1), threading.Event(), []

    class OnlyAWakeUpEndsTheWaitersSleep(threading.Condition):
        def wait(self, timeout=None):
            return super().wait(None if threading.current_thread().name == "waiter" else timeout)

    monkeypatch.setattr(jobs, "_changed", OnlyAWakeUpEndsTheWaitersSleep())
    job_id = jobs.submit("evaluate", lambda ctx: (gate.wait(10), _empty())[1]).record.job_id
    waiter = threading.Thread(target=lambda: ended.append(jobs.wait(job_id)), name="waiter", daemon=True)
    waiter.start()
    gate.set()
    waiter.join(10)
    assert [snapshot.record.state for snapshot in ended] == ["succeeded"]
    jobs.shutdown(1)


def test_restart_marks_unfinished_jobs_failed(tmp_path, caplog):
    from explaind.store import JobRecord

    store = SQLiteStore(tmp_path)
    store.insert_job(JobRecord(job_id="a", kind="k", state="running", create_time=1.0))
    store.insert_job(JobRecord(job_id="b", kind="k", state="succeeded", create_time=2.0))
    store.insert_job(JobRecord(job_id="c", kind="k", state="queued", create_time=3.0))
    store.close()
    reopened = SQLiteStore(tmp_path)
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger="explaind.jobs"):
        assert sorted(JobManager(reopened, metrics).recover()) == ["a", "c"]
    assert "left queued or running FAILED (ABORTED): " in caplog.text and "a (k)" in caplog.text  # which ones, not only how many
    # Counted by the process that ended them: the crashed one never did.
    assert jobs_ended(metrics, ("k", "failed", "ABORTED"), ("k", "succeeded", "OK")) == [2.0, None]
    assert reopened.get_job("a").state == "failed" and "restart" in reopened.get_job("a").error_message
    assert reopened.get_job("b").state == "succeeded"


# Config, health, auth --------------------------------------------------------------------


def test_config_errors_name_the_file_and_key(tmp_path, classifier_dir):
    path = write_config(tmp_path / "bad.toml", classifier_dir, batching={"max_batch_sise": 3})
    with pytest.raises(ConfigError, match=r"bad.toml.*max_batch_sise"):
        load_config(path)
    path = write_config(tmp_path / "type.toml", classifier_dir, server={"port": "fifty"})
    with pytest.raises(ConfigError, match=r"\[server\].port must be a number"):
        load_config(path)
    good = load_config(write_config(tmp_path / "good.toml", classifier_dir, runtime={"backend": "onnxruntime"}))
    assert good.runtime.backend == "onnxruntime" and good.classifier.path == str(classifier_dir) and good.clip.path == ""
    assert good.classifier.resize_size is None  # unset: the model's own
    assert load_config(write_config(tmp_path / "crop.toml", classifier_dir, classifier={"resize_size": 0})).classifier.resize_size == 0


@pytest.mark.parametrize(
    ("sections", "error"),
    [
        ({"jobs": {"evaluate_batch_size": 0}}, r"\[jobs\].evaluate_batch_size must be at least 1, got 0"),
        ({"jobs": {"gpu_workers": 0}}, r"\[jobs\].gpu_workers must be at least 1, got 0"),
        ({"jobs": {"max_queued": -1}}, r"\[jobs\].max_queued must be at least 1, got -1"),
        ({"batching": {"max_images_per_request": 0}}, r"\[batching\].max_images_per_request must be at least 1"),
        ({"server": {"max_workers": 0}}, r"\[server\].max_workers must be at least 2"),
        ({"server": {"max_pixels_per_request": 0}}, r"\[server\].max_pixels_per_request must be at least 1"),
        ({"server": {"grace_period_s": -5}}, r"\[server\].grace_period_s must be at least 0, got -5.0"),
        ({"jobs": {"gpu_workers": 1.5}}, r"\[jobs\].gpu_workers must be an integer, got 1.5"),
        ({"jobs": {"retention_days": -1}}, r"\[jobs\].retention_days must be at least 0, got -1.0"),
        ({"jobs": {"retention_days": float("nan")}}, r"\[jobs\].retention_days must be a number, got nan"),  # it meant keep forever
        ({"jobs": {"max_run_seconds": -1}}, r"\[jobs\].max_run_seconds must be at least 0, got -1.0"),
        ({"classifier": {"factory_kwargs": "oops"}}, r"\[classifier\].factory_kwargs must be a table, got 'oops'"),
        ({"runtime": {"device": "gpu0"}}, r"\[runtime\].device must be a torch device such as \"cpu\", \"cuda\" or \"cuda:1\", got 'gpu0'"),
        # torch parses these, but "meta" loaded no weights (every Predict failed) and MPS lacks float64.
        ({"runtime": {"device": "meta"}}, r"\[runtime\].device must be .* got 'meta': explaind runs on the CPU or CUDA GPUs"),
        ({"runtime": {"device": "mps"}}, r"\[runtime\].device must be .* got 'mps': explaind runs on the CPU or CUDA GPUs"),
        ({"runtime": {"backend": "tensorrt"}}, r"\[runtime\].backend \"tensorrt\" runs on a GPU: set \[runtime\].device to \"cuda\" or \"cuda:N\", got 'cpu'"),
        ({"classifier": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, r"\[classifier\].std must hold positive numbers"),
        ({"classifier": {"resize_size": -1}}, r"\[classifier\].resize_size must be at least 0, got -1"),
        ({"classifier": {"resize_size": "256"}}, r"\[classifier\].resize_size must be a number, got '256'"),
        ({"classifier": {"resize_size": 256.5}}, r"\[classifier\].resize_size must be an integer, got 256.5"),
        ({"classifier": {"interpolation": "nearest"}}, r"\[classifier\].interpolation must be one of 'bilinear' or 'bicubic', got 'nearest'"),
        ({"batching": {"max_queue_size": 64}}, r"\[batching\].max_images_per_request \(1024\) must not exceed "
                                                r"\[batching\].max_queue_size \(64\)"),
        ({"server": {"max_concurrent_rpcs": 32}}, r"\[server\].max_concurrent_rpcs \(32\) must be at least \[server\].max_workers \(64\)"),
        ({"server": {"max_concurrent_rpcs": 2**31}}, r"\[server\].max_concurrent_rpcs must be at most 2147483647"),
        # Upper bounds: each of these started, then failed later (the batcher thread died at the
        # first Predict, SIGTERM raised tracebacks, grpc or torch overflowed at start-up, and
        # every clip_illusion request without an ε was refused for an ε it never sent).
        ({"batching": {"max_queue_delay_ms": float("inf")}}, r"\[batching\].max_queue_delay_ms must be at most 60000.0, got inf"),
        ({"server": {"grace_period_s": float("inf")}}, r"\[server\].grace_period_s must be at most 86400.0, got inf"),
        ({"server": {"max_message_bytes": 2**31}}, r"\[server\].max_message_bytes must be at most 2147483647, got 2147483648"),
        ({"runtime": {"num_threads": 2**31}}, r"\[runtime\].num_threads must be at most 2147483647"),
        ({"clip": {"illusion_epsilon": 1001}}, r"\[clip\].illusion_epsilon must be at most 1000.0, got 1001.0"),
        ({"clip": {"illusion_epsilon": -0.5}}, r"\[clip\].illusion_epsilon must be at least 0, got -0.5"),
        ({"batching": {"max_queue_size": 2**31}}, r"\[batching\].max_queue_size must be at most 2147483647"),  # RequestLimits' int32
        ({"server": {"max_samples_per_caller": 2**31}}, r"\[server\].max_samples_per_caller must be at most 2147483647"),  # RequestLimits' int32
        ({"classifier": {"class_names": [1, 2]}}, r"\[classifier\].class_names must be a list of strings, got \[1, 2\]"),
        ({"classifier": {"mean": ["a", "b", "c"], "std": [1, 1, 1]}}, r"\[classifier\].mean must be a list of numbers, got \['a', 'b', 'c'\]"),
        ({"clip": {"path": "/models/clip", "model": "ViT-B-32"}}, r"set \[clip\].path \(an open_clip directory\) or \[clip\].model and .checkpoint, not both"),
        ({"clip": {"checkpoint": "/models/clip.safetensors"}}, r"\[clip\].checkpoint needs \[clip\].model"),
        ({"server": {"port": 5000, "metrics_port": 5000}}, r"\[server\].port and .metrics_port are both 5000; each needs a port of its own"),
        ({"server": {"port": 0, "metrics_port": 6000, "health_port": 6000}}, r"\[server\].metrics_port and .health_port are both 6000"),
        ({"server": {"host": ""}}, r"\[server\].host must be an address to listen on \(127.0.0.1, or 0.0.0.0 for every interface\), got ''"),
        ({"tracing": {"sample_ratio": 1.5}}, r"\[tracing\].sample_ratio must be at most 1.0, got 1.5"),
        ({"tracing": {"sample_ratio": -0.1}}, r"\[tracing\].sample_ratio must be at least 0, got -0.1"),
        # Without a scheme the OTLP exporter speaks TLS, which a plaintext collector refuses: the scheme says which.
        ({"tracing": {"otlp_endpoint": "collector:4317"}}, r"\[tracing\].otlp_endpoint must be an OTLP/gRPC collector's URL, "
                                                            r"\"http://host:4317\" \(plaintext\) or \"https://host:4317\" \(TLS\), got 'collector:4317': the scheme must be http or https"),
        ({"tracing": {"otlp_endpoint": "http://collector:4317/v1/traces"}}, r"\[tracing\].otlp_endpoint .* a path, which gRPC has no use for"),
        ({"tracing": {"service_name": " "}}, r"\[tracing\].service_name must name the service in traces, got ' '"),
        # Each of these started listening, then failed as the models loaded.
        ({"classifier": {"path": ""}}, r"\[classifier\] loader 'world' needs path \(a world classifier directory\)"),
        ({"classifier": {"loader": "onnx", "path": ""}}, r"\[classifier\] loader 'onnx' needs path \(an ONNX file\)"),
        ({"classifier": {"loader": "torchvision"}}, r"\[classifier\] loader 'torchvision' needs name \(an architecture, e.g. 'resnet18'\)"),
        ({"classifier": {"loader": "torchvision", "name": "resnet18"}}, r"\[classifier\] loader 'torchvision' needs weights \(a state-dict file"),
        ({"classifier": {"loader": "factory", "factory": "models:build", "head": "fc"}}, r"\[classifier\] loader 'factory' needs feature_layer"),
    ],
)
def test_config_values_that_would_fail_later_are_refused_naming_the_key(tmp_path, classifier_dir, sections, error):
    with pytest.raises(ConfigError, match=r"bad.toml: " + error):
        load_config(write_config(tmp_path / "bad.toml", classifier_dir, **sections))


def test_config_files_that_cannot_be_read_and_home_relative_paths(tmp_path, classifier_dir, monkeypatch):
    # A directory or a non-UTF-8 file gave a traceback; "~/data" made a folder named "~".
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match=r"^cannot read the config file .*dir.toml: Is a directory$"):
        load_config(tmp_path / "dir.toml")
    (tmp_path / "latin1.toml").write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte 20\), as TOML must be$"):
        load_config(tmp_path / "latin1.toml")
    (tmp_path / "broken.toml").write_text('[server]\nhost = "unterminated\n')  # tomllib's own words say where
    with pytest.raises(ConfigError, match=r"broken.toml: invalid TOML: .*\(at line 2, column \d+\)$"):
        load_config(tmp_path / "broken.toml")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "sub").mkdir()
    config = load_config(write_config(tmp_path / "sub" / "home.toml", classifier_dir, server={"data_dir": "~/explaind"}))
    assert config.server.data_dir == str(tmp_path / "home" / "explaind")
    with pytest.raises(ConfigError, match=r"home.toml: \[server\].data_dir: cannot expand '~nosuchuser/x': no such user or home directory$"):
        load_config(write_config(tmp_path / "sub" / "home.toml", classifier_dir, server={"data_dir": "~nosuchuser/x"}))


def test_the_world_loader_takes_a_class_names_file(tmp_path, classifier_dir):
    # It read only class_names, and served the model's own names without a word.
    (tmp_path / "names.txt").write_text("a\nb \n\tc\r\nd\ne\nf")  # one a line, whatever the spaces around it
    section = ClassifierSection(loader="world", path=str(classifier_dir), class_names_file=str(tmp_path / "names.txt"))
    assert load_classifier(section).class_names == ("a", "b", "c", "d", "e", "f")
    with pytest.raises(ModelLoadError, match=r"^class names file not found: .*missing.txt$"):
        load_classifier(dataclasses.replace(section, class_names_file=str(tmp_path / "missing.txt")))
    (tmp_path / "names.txt").write_text("a\nb\n")
    with pytest.raises(ModelLoadError, match="the head has 6 outputs but 2 class names were given"):
        load_classifier(section)
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\ne\nf\ng\n")  # too many, as well as too few
    with pytest.raises(ModelLoadError, match="the head has 6 outputs but 7 class names were given"):
        load_classifier(section)
    (tmp_path / "names.txt").write_text("\n  \n")  # was "class_names or class_names_file is required"
    with pytest.raises(ModelLoadError, match=r"class names file .*names.txt holds no class names \(one per line\)$"):
        load_classifier(section)
    # Keras' ImageNet list names two classes "crane": a report ranked the second and edited the first.
    (tmp_path / "names.txt").write_text("a\ncrane\nc\nd\ne\ncrane\n")
    with pytest.raises(ModelLoadError, match=r"class names file .*names.txt: 'crane' names both class 1 and class 5; class names must be unique"):
        load_classifier(section)
    inline = ClassifierSection(loader="world", path=str(classifier_dir), class_names=["a", "b", "c", "a", "e", "f"])
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].class_names: 'a' names both class 0 and class 3"):
        load_classifier(inline)
    alike = dataclasses.replace(inline, class_names=["caf\u00e9", "b", "c", "d", "e", "cafe\u0301"])  # shown alike, matched alike
    with pytest.raises(ModelLoadError, match=r"^\[classifier\].class_names: 'cafe\u0301' names both class 0 and class 5 \(in other Unicode "):
        load_classifier(alike)


def test_the_world_loader_takes_the_configs_layers_input_size_and_normalisation_over_the_classifiers_own(classifier_dir, world_model):
    section = ClassifierSection(loader="world", path=str(classifier_dir), feature_layer="layer3.0", image_size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    version = load_classifier(section)
    assert (version.feature_layer, version.image_size) == ("layer3.0", 48)
    images = torch.rand(2, 3, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(version.logits(version.features(images)), world_model((images - 0.5) / 0.25), atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelLoadError, match=r"no module named 'classifier' for \[classifier\].head"):
        load_classifier(dataclasses.replace(section, head="classifier"))


def test_a_class_names_file_is_read_as_utf_8_whatever_the_locale_and_without_its_byte_order_mark(tmp_path, classifier_dir, monkeypatch):
    # Read in the locale's encoding, a Latin-1 locale made "café" "cafÃ©"; Windows Notepad's
    # byte order mark began the first class's name, which no --class or folder then matched.
    monkeypatch.setattr(io, "text_encoding", lambda encoding, stacklevel=2: encoding or "latin-1")  # a Latin-1 locale, as pathlib sees it
    names = ["café", "straße", "猫", "d", "e", "f"]
    (tmp_path / "names.txt").write_bytes("\ufeff".encode() + "\n".join(names).encode())
    section = ClassifierSection(loader="world", path=str(classifier_dir), class_names_file=str(tmp_path / "names.txt"))
    assert load_classifier(section).class_names == tuple(names)
    (tmp_path / "names.txt").write_bytes("\n".join(names).encode("latin-1", "replace"))
    with pytest.raises(ModelLoadError, match=r"^class names file .*names.txt: not UTF-8 text \(byte 3\)$"):
        load_classifier(section)
    (tmp_path / "names.txt").write_bytes("\ufeff".encode() + "\n".join(names).encode("latin-1", "replace"))
    with pytest.raises(ModelLoadError, match=r"^class names file .*names.txt: not UTF-8 text \(byte 6\)$"):  # the file's byte, its mark counted
        load_classifier(section)


def test_config_replace_checks_the_result_like_a_loaded_file():
    with pytest.raises(ConfigError, match=r"\[batching\].max_batch_size must be at least 1, got 0"):
        default_config().replace("batching", max_batch_size=0)
    with pytest.raises(ConfigError, match=r"\[server\].port must be at most 65535"):
        default_config().replace("server", port=65536)
    assert default_config().replace("server", port=65535).server.port == 65535
    with pytest.raises(ConfigError, match=r"\[server\].data_dir must name a directory, got ''"):  # `--data-dir "$UNSET"`: the working directory
        default_config().replace("server", data_dir="")


def test_the_readme_config_examples_parse(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    assert examples
    for i, example in enumerate(examples):
        (tmp_path / f"{i}.toml").write_text(example)
        assert load_config(tmp_path / f"{i}.toml").source.endswith(f"{i}.toml")


def test_clip_illusion_epsilon_is_the_papers_unless_the_clip_needs_more(tmp_path, classifier_dir):
    # A configured CLIP gets the paper's ε; the world CLIP, whose cosines go negative, gets 1.
    assert load_config(write_config(tmp_path / "a.toml", classifier_dir, clip={"model": "ViT-B-32", "checkpoint": "openai"})).clip.default_epsilon() == 0.05
    assert default_config().clip.default_epsilon() == 1.0
    tuned = load_config(write_config(tmp_path / "b.toml", classifier_dir, clip={"model": "ViT-B-32", "checkpoint": "openai", "illusion_epsilon": 0.3}))
    assert tuned.clip.default_epsilon() == 0.3


def test_health_is_not_serving_until_models_load_and_token_is_enforced(tmp_path, classifier_dir, caplog):
    import grpc
    from google.rpc import status_pb2

    from explaind.client import Client, UnauthenticatedError, UnavailableError
    from explaind.service import ExplaindServer
    from explaind.v1 import operations_pb2, operations_pb2_grpc, sample_sets_pb2, sample_sets_pb2_grpc

    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path), token="s3cret")
    server = ExplaindServer(config)
    port = server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10, token="s3cret") as client, Client(f"127.0.0.1:{port}", timeout=10) as anonymous:
            assert client.health() == "NOT_SERVING"
            with Client(f"127.0.0.1:{port}", timeout=10, token="s3cret", retry=False) as unretried, \
                    pytest.raises(UnavailableError, match="loading") as loading:
                unretried.model_metadata()
            assert loading.value.retry_delay == 0.5  # a RetryInfo: the server answered, the call is worth repeating
            # So a client's first call waits for the load instead of failing at once.
            loader = threading.Timer(1.0, server.load_models)
            loader.start()
            with Client(f"127.0.0.1:{port}", timeout=30, token="s3cret") as first_call:
                assert first_call.model_metadata().feature_dim == 128
            loader.join()
            assert client.health() == "SERVING" and anonymous.health() == "SERVING"
            with caplog.at_level(logging.WARNING, logger="explaind.service.interceptors"):
                for _ in range(3):
                    with pytest.raises(UnauthenticatedError, match="token"):
                        anonymous.model_metadata()
            # Server streams too: a job's progress is as private as its result.
            job = client.visualize_neurons([3], method="feature_visualization", steps=10_000)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                watch = operations_pb2_grpc.OperationsServiceStub(channel).WatchOperation(
                    operations_pb2.WatchOperationRequest(name=job.name), timeout=10)
                with pytest.raises(grpc.RpcError) as refused:
                    next(watch)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            job.cancel()
            # Only INVALID_ARGUMENT carries a BadRequest (AIP-193); a NOT_FOUND names its field in an ErrorInfo.
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as missing:
                sample_sets_pb2_grpc.SampleSetServiceStub(channel).GetSampleSet(
                    sample_sets_pb2.GetSampleSetRequest(sample_set_id="nothing-here"), timeout=10, metadata=(("authorization", "Bearer s3cret"),))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND and missing.value.details().startswith("sample_set_id: ")
            details = status_pb2.Status.FromString(dict(missing.value.trailing_metadata())["grpc-status-details-bin"]).details
            assert [detail.type_url for detail in details] == ["type.googleapis.com/google.rpc.ErrorInfo"]
    finally:
        server.stop(0)
    assert server.health._server_status[""] == 2  # NOT_SERVING after graceful shutdown
    # The operator sees who was refused, once a minute however fast a client retries.
    refusals = [record.getMessage() for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) == 1 and re.match(r"refused explaind\.v1\.InferenceService/GetModelMetadata from ipv4:127\.0\.0\.1:\d+: "
                                           r"missing or wrong bearer token$", refusals[0])
    assert "s3cret" not in caplog.text


def test_a_health_watch_that_ends_leaves_nothing_of_its_service_name_behind(tmp_path, classifier_dir):
    # grpcio's health servicer kept an entry per service name ever watched: callers
    # without a token, watching names of their own, grew the server without bound (a
    # megabyte a call for a megabyte's name, in a soak: 50 calls, 50 MB kept).
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from explaind.service import ExplaindServer

    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path))
    server = ExplaindServer(config)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            kept = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(kept).status == health_pb2.HealthCheckResponse.NOT_SERVING
            for number in range(20):
                call = stub.Watch(health_pb2.HealthCheckRequest(service=f"{number}-" + "x" * 100_000), timeout=10)
                assert next(call).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                call.cancel()
            deadline = time.monotonic() + 10
            while len(server.health._send_response_callbacks) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert list(server.health._send_response_callbacks) == [""]  # the watch still open
            server.health.set("", health_pb2.HealthCheckResponse.SERVING)  # and it still hears of changes
            assert next(kept).status == health_pb2.HealthCheckResponse.SERVING
            kept.cancel()
            deadline = time.monotonic() + 10
            while server.health._send_response_callbacks and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not server.health._send_response_callbacks
    finally:
        server.stop(0)


def test_a_refused_caller_s_request_is_never_parsed(tmp_path, classifier_dir, monkeypatch):
    # It was parsed before the token was checked: 24 callers without one sending 60 MiB
    # each took the server from 0.6 to 3.2 GB.
    import grpc

    from explaind.service import ExplaindServer, interceptors
    from explaind.v1 import sample_sets_pb2, sample_sets_pb2_grpc

    parsed, parsing = [], interceptors._parsing
    monkeypatch.setattr(interceptors, "_parsing", lambda deserialize: lambda data: (parsed.append(len(data)), parsing(deserialize)(data))[1])
    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path), token="s3cret")
    server = ExplaindServer(config)
    port = server.start()
    request = sample_sets_pb2.GetSampleSetRequest(sample_set_id="x" * 1000)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetSampleSet(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and parsed == []
            with pytest.raises(grpc.RpcError) as answered:
                stub.GetSampleSet(request, timeout=10, metadata=(("authorization", "Bearer s3cret"),))
            assert answered.value.code() == grpc.StatusCode.INVALID_ARGUMENT and parsed == [request.ByteSize()]
    finally:
        server.stop(0)


@pytest.mark.parametrize("character", ["x", " ", "~", "%", "é", "\U0001F600"])
def test_a_long_status_message_is_cut_to_its_percent_encoded_budget(character):
    # gRPC percent-encodes the message into the grpc-message header: '%' and anything
    # outside printable ASCII take 3 bytes per UTF-8 byte. Counted as one, a message of
    # '%'s went out at three times the budget, past gRPC's 8 KiB soft limit.
    from explaind.service.interceptors import MAX_STATUS_MESSAGE_BYTES, _shorten

    def header_bytes(text: str) -> int:
        return sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in text.encode("utf-8"))

    message = "sample_set_id: " + character * 20_000
    cut = _shorten(message)
    assert header_bytes(cut) <= MAX_STATUS_MESSAGE_BYTES
    kept, left_out = re.fullmatch(r"(.*) \.\.\. \((\d+) characters left out\)", cut, re.DOTALL).groups()
    assert kept.startswith("sample_set_id: " + character * 100) and message.startswith(kept) and int(left_out) == len(message) - len(kept)
    assert header_bytes(cut) > MAX_STATUS_MESSAGE_BYTES - 64 - 12  # cut where the budget ends, not far before
    assert _shorten("fits") == "fits"
    fits = "x" * (MAX_STATUS_MESSAGE_BYTES - 64)  # all the budget, less the note's room
    assert _shorten(fits) == fits and _shorten(fits + "x") == fits + " ... (1 characters left out)"


class _AbortingContext:
    """What the interceptor uses of a grpc.ServicerContext; ``abort`` raises, as grpc's does."""

    def __init__(self) -> None:
        self.status, self.details, self.trailing_metadata = None, "", ()

    def abort(self, code, details):
        self.status, self.details = code, details
        raise RuntimeError("aborted")

    def code(self):
        return self.status

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float:
        return 10.0

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing_metadata = metadata


def test_an_error_naming_a_field_has_its_message_field_and_description_cut_to_their_budgets():
    # With BadRequest details the message travels twice more, base64-encoded in
    # grpc-status-details-bin: each part is cut so the headers stay under gRPC's limit.
    from google.rpc import error_details_pb2, status_pb2

    from explaind.service.interceptors import MAX_DETAILED_MESSAGE_BYTES, MAX_VIOLATION_BYTES, _Observed

    context = _AbortingContext()

    def fail(request, context):
        raise InvalidArgument("y" * 10_000, field="x" * 10_000)

    with pytest.raises(RuntimeError, match="aborted"), _Observed(Metrics(), "explaind.v1.Svc", "Get", context, 1000) as observed:
        observed.call(fail, None, context)
    assert context.details.endswith(" characters left out)") and MAX_DETAILED_MESSAGE_BYTES - 76 < len(context.details) <= MAX_DETAILED_MESSAGE_BYTES
    (key, value), = context.trailing_metadata
    status = status_pb2.Status.FromString(value)
    violation = error_details_pb2.BadRequest()
    assert key == "grpc-status-details-bin" and status.message == context.details and status.details[0].Unpack(violation)
    (field_violation,) = violation.field_violations
    for part, character in ((field_violation.field, "x"), (field_violation.description, "y")):
        assert part.startswith(character * 100) and part.endswith(" characters left out)") and len(part) <= MAX_VIOLATION_BYTES


def test_a_limit_s_details_beside_a_long_field_and_caller_name_stay_within_the_status_header_budget():
    # A quota's ErrorInfo and QuotaFailure travel in grpc-status-details-bin beside the
    # message and the field: a caller's name of kilobytes must not take it past 8 KiB.
    import base64

    from explaind.errors import MAX_VIOLATION_PART_BYTES, Quota, ResourceExhausted, caller_subject
    from explaind.service.interceptors import _Observed

    context = _AbortingContext()
    name = "é" * 5_000

    def fail(request, context):
        raise ResourceExhausted(f"caller {name!r} holds too many", field="x" * 10_000,
                                quota=Quota("SAMPLES_PER_CALLER_EXCEEDED", "[server].max_samples_per_caller", 2**31 - 1, caller_subject(name), name))

    with pytest.raises(RuntimeError, match="aborted"), _Observed(Metrics(), "explaind.v1.Svc", "Get", context, 1000) as observed:
        observed.call(fail, None, context)
    (key, value), = context.trailing_metadata
    assert key == "grpc-status-details-bin" and len(base64.b64encode(value)) + len(context.details.encode()) < 8192
    reason, metadata, [(subject, description)] = limit_details(trailing_status(context.trailing_metadata))
    assert (reason, metadata["setting"], metadata["limit"], metadata["field"][:3]) == ("SAMPLES_PER_CALLER_EXCEEDED", "[server].max_samples_per_caller",
                                                                                      "2147483647", "xxx")
    assert subject.startswith("caller:é") and all(len(part.encode()) <= MAX_VIOLATION_PART_BYTES for part in (subject, description))


def test_an_error_listing_many_long_precondition_violations_sends_the_first_ten_cut_to_their_budget():
    # The interceptor cut an error's message and field to their budgets but sent its
    # violations whole: a list of thousands, or a subject of kilobytes, took the status
    # header past gRPC's 8 KiB limit (the caller saw RESOURCE_EXHAUSTED, not the error).
    import base64

    from google.rpc import error_details_pb2, status_pb2

    from explaind.errors import MAX_PRECONDITION_VIOLATIONS, MAX_VIOLATION_PART_BYTES, FailedPrecondition, PreconditionViolation
    from explaind.service.interceptors import _Observed

    context = _AbortingContext()
    violations = [PreconditionViolation("T" * 5_000, f"images[{index}]" + "é" * 5_000) for index in range(1_000)]

    def fail(request, context):
        raise FailedPrecondition("z" * 10_000, field="images", violations=violations)

    with pytest.raises(RuntimeError, match="aborted"), _Observed(Metrics(), "explaind.v1.Svc", "Get", context, 1000) as observed:
        observed.call(fail, None, context)
    (key, value), = context.trailing_metadata
    assert key == "grpc-status-details-bin" and len(base64.b64encode(value)) + len(context.details.encode()) < 8192
    failure = error_details_pb2.PreconditionFailure()
    assert any(detail.Unpack(failure) for detail in status_pb2.Status.FromString(value).details)
    assert len(failure.violations) == MAX_PRECONDITION_VIOLATIONS
    for index, violation in enumerate(failure.violations):
        assert violation.type.startswith("TTT") and violation.subject.startswith(f"images[{index}]é")
        assert all(len(part.encode()) <= MAX_VIOLATION_PART_BYTES and part.endswith("...") for part in (violation.type, violation.subject))


def test_a_precondition_violation_cut_inside_a_character_keeps_the_whole_characters_before_it():
    # Cut at a byte count, a part ending inside a multi-byte character must drop that
    # character, not mangle it: a string field's bytes must be valid UTF-8.
    from explaind.errors import MAX_VIOLATION_PART_BYTES, PreconditionViolation, precondition_failure

    for padding in range(4):  # the cut falls at each byte of a 4-byte character
        text = "x" * padding + "\U0001F600" * 100
        (violation,) = precondition_failure([PreconditionViolation(text, text)]).violations
        for part in (violation.type, violation.subject):
            kept = part.removesuffix("...")
            assert text.startswith(kept) and len(part.encode()) <= MAX_VIOLATION_PART_BYTES
            assert len(text[: len(kept) + 1].encode()) > MAX_VIOLATION_PART_BYTES - 3  # no whole character more fitted


def test_a_streamed_response_over_the_send_limit_is_resource_exhausted_like_a_unary_one():
    # A server stream's messages skipped the size check: gRPC then failed the call itself,
    # after the metric had counted it OK; once checked, the abort must not turn INTERNAL.
    import grpc

    from explaind.service.interceptors import _Observed
    from explaind.v1 import common_pb2

    metrics, context = Metrics(), _AbortingContext()

    def watch(request, context):
        yield common_pb2.Image(encoded=b"x" * 997)  # 1000 bytes: at the limit, sent
        yield common_pb2.Image(encoded=b"x" * 2000)

    sent = []
    with pytest.raises(RuntimeError, match="aborted"), _Observed(metrics, "explaind.v1.Svc", "Watch", context, 1000) as observed:
        sent.extend(observed.call_stream(watch, None, context, lambda: ""))
    assert len(sent) == 1 and context.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert context.details.startswith("the response is 2003 bytes, more than the server's limit of 1000")
    over_the_limit = ("RESPONSE_BYTES_EXCEEDED", {"setting": "[server].max_message_bytes", "limit": "1000"}, [("server", "bytes of one response")])
    assert limit_details(trailing_status(context.trailing_metadata)) == over_the_limit
    labels = {"service": "explaind.v1.Svc", "method": "Watch", "code": "RESOURCE_EXHAUSTED"}
    assert metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", labels) == 1
    unary = _AbortingContext()
    with pytest.raises(RuntimeError, match="aborted"), _Observed(metrics, "explaind.v1.Svc", "Get", unary, 1000) as observed:
        observed.call(lambda request, context: common_pb2.Image(encoded=b"x" * 2000), None, unary)
    assert unary.status == grpc.StatusCode.RESOURCE_EXHAUSTED and unary.details.startswith("the response is 2003 bytes, more than the server's limit of 1000")
    assert limit_details(trailing_status(unary.trailing_metadata)) == over_the_limit


@pytest.mark.parametrize(("remaining_s", "code"), [(10.0, "CANCELLED"), (0.0, "DEADLINE_EXCEEDED")])
def test_a_two_way_stream_whose_caller_left_is_counted_cancelled_or_timed_out_not_internal(caplog, remaining_s, code):
    # Its request iterator raises grpc.RpcError once the caller has left (reflection's,
    # when a client closes its channel or its deadline passes): no failure of the server's,
    # nothing to log, and counted as any call whose caller left.
    import grpc

    from explaind.service.interceptors import _Observed

    metrics, context = Metrics(), _AbortingContext()
    context.is_active = lambda: False
    context.time_remaining = lambda: remaining_s

    def reflect(requests, context):
        raise grpc.RpcError()
        yield

    with caplog.at_level(logging.INFO), _Observed(metrics, "grpc.reflection.v1.ServerReflection", "ServerReflectionInfo", context, 1000) as observed:
        assert list(observed.call_stream(reflect, iter(()), context, lambda: "")) == []
    assert context.status is None and not [record for record in caplog.records if record.levelno >= logging.WARNING]
    labels = {"service": "grpc.reflection.v1.ServerReflection", "method": "ServerReflectionInfo", "code": code}
    assert metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", labels) == 1


def test_a_grpc_error_while_the_caller_is_still_there_is_internal_not_a_caller_that_left(caplog):
    # Only a caller that is gone makes a failed request iterator no failure of the server's:
    # taken for one while the call is active, a server fault would end the stream OK, unlogged.
    import grpc

    from explaind.service.interceptors import _Observed

    metrics, context = Metrics(), _AbortingContext()

    def reflect(requests, context):
        raise grpc.RpcError()
        yield

    with pytest.raises(RuntimeError, match="aborted"), \
            _Observed(metrics, "grpc.reflection.v1.ServerReflection", "ServerReflectionInfo", context, 1000) as observed:
        list(observed.call_stream(reflect, iter(()), context, lambda: ""))
    assert context.status == grpc.StatusCode.INTERNAL and "incident" in context.details
    assert [record.levelno for record in caplog.records if "unexpected error" in record.getMessage()] == [logging.ERROR]
    labels = {"service": "grpc.reflection.v1.ServerReflection", "method": "ServerReflectionInfo", "code": "INTERNAL"}
    assert metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", labels) == 1


@pytest.mark.parametrize(("remaining_s", "code"), [(10.0, "CANCELLED"), (0.0, "DEADLINE_EXCEEDED")])
def test_a_stream_whose_caller_left_is_counted_as_cancelled_or_timed_out(remaining_s, code):
    # gRPC closes the generator of a stream whose caller is gone (GeneratorExit, with no
    # status set): as for a unary call, dashboards must tell timeouts from callers that gave up.
    from explaind.service.interceptors import _Observed
    from explaind.v1 import common_pb2

    metrics, context = Metrics(), _AbortingContext()
    context.time_remaining = lambda: remaining_s

    def watch(request, context):
        while True:
            yield common_pb2.Image(encoded=b"x")

    def handle():
        with _Observed(metrics, "explaind.v1.Svc", "Watch", context, 1000) as observed:
            yield from observed.call_stream(watch, None, context, lambda: "")

    stream = handle()
    next(stream)
    stream.close()
    labels = {"service": "explaind.v1.Svc", "method": "Watch"}
    assert metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", {**labels, "code": code}) == 1
    assert metrics.registry.get_sample_value("explaind_rpcs_in_flight", labels) == 0


def test_a_token_file_is_enforced_like_a_token_and_a_rotated_one_takes_effect_without_a_restart(tmp_path, classifier_dir, caplog):
    from explaind.client import Client, UnauthenticatedError
    from explaind.service import ExplaindServer

    (tmp_path / "secrets").mkdir()
    token_file = tmp_path / "secrets" / "token"
    token_file.write_text("s3cret\n")  # as `kubectl create secret` or an editor leaves it
    # Relative to the config file, like every path in it.
    config = load_config(write_config(tmp_path / "explaind.toml", classifier_dir,
                                      server={"token_file": "secrets/token", "port": 0, "data_dir": str(tmp_path / "data")}))
    assert config.server.token_file == str(tmp_path / "secrets" / "token")
    server = ExplaindServer(config)
    port = server.start()
    try:
        server.load_models()
        with Client(f"127.0.0.1:{port}", timeout=10, token="s3cret") as client, Client(f"127.0.0.1:{port}", timeout=10) as anonymous:
            assert client.model_metadata().feature_dim == 128
            assert anonymous.health() == "SERVING"  # probes need no token
            with pytest.raises(UnauthenticatedError, match="token"):
                anonymous.model_metadata()
            # Rotation as Kubernetes does it: a new file swapped in under the same name.
            (tmp_path / "secrets" / "new").write_text("r0tated")
            os.replace(tmp_path / "secrets" / "new", token_file)
            with Client(f"127.0.0.1:{port}", timeout=10, token="r0tated") as rotated:
                deadline = time.monotonic() + 10
                while not _authorised(rotated) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert _authorised(rotated) and not _authorised(client)
                # A rotation caught half-way (an empty file) keeps the token in force.
                token_file.write_text("")
                time.sleep(1.5)
                assert _authorised(rotated) and "is empty; what was in force stays in force" in caplog.text
    finally:
        server.stop(0)


def test_a_token_rewritten_at_its_size_with_its_old_modification_time_is_read_again(tmp_path, monkeypatch):
    # `cp -p` or a restore keeps the time; inode, size and modification time missed it.
    from explaind.service import auth

    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    path = tmp_path / "token"
    path.write_text("tokenSEV")
    token = auth.BearerToken("tokenSEV", str(path))
    before = path.stat()
    time.sleep(0.05)  # past the clock tick of the file system's status change time
    path.write_text("tokenEGT")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert token.grant_of([("authorization", "Bearer tokenEGT")]) is not None


def test_json_log_lines_carry_the_exception_and_any_text():
    from explaind.logs import JsonFormatter

    try:
        raise RuntimeError("store refused")
    except RuntimeError:
        record = logging.LogRecord("explaind.jobs", logging.ERROR, __file__, 1, "job %s failed: \"%s\"\n", ("j1", "ü"), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line  # one record, one line
    parsed = json.loads(line)
    assert (parsed["level"], parsed["logger"], parsed["message"]) == ("ERROR", "explaind.jobs", 'job j1 failed: "ü"\n')
    assert parsed["exception"].startswith("Traceback") and "RuntimeError: store refused" in parsed["exception"]


def test_json_log_lines_carry_the_log_fields_of_their_block_only_and_their_own_fields_first():
    from explaind.logs import FIELDS, JsonFormatter, log_fields

    def logged(**extra: object) -> dict:
        record = logging.LogRecord("explaind.jobs", logging.INFO, __file__, 1, "line", None, None)
        record.__dict__.update(extra)
        return json.loads(JsonFormatter().format(record))

    with log_fields(operation_id="0123", kind="edit_head"):
        assert (logged()["operation_id"], logged()["kind"]) == ("0123", "edit_head")
        assert logged(**{FIELDS: {"kind": "evaluate_sample_set"}})["kind"] == "evaluate_sample_set"
    # A worker's next line, after its job's block, belongs to no operation.
    assert set(logged()) == {"time", "level", "logger", "message"}
    # Nor after a block a failure left: the worker's next job would log under this one's id.
    with pytest.raises(RuntimeError), log_fields(operation_id="0456", kind="edit_head"):
        raise RuntimeError("a job's failure")
    assert set(logged()) == {"time", "level", "logger", "message"}


def test_a_bad_token_is_refused_at_start_up_before_the_store_is_locked(tmp_path, classifier_dir):
    from explaind.service import ExplaindServer

    with pytest.raises(ConfigError, match=r"\[server\].token holds a character other than printable ASCII"):
        load_config(write_config(tmp_path / "a.toml", classifier_dir, server={"token": "two words"}))
    config = default_config().replace("server", data_dir=str(tmp_path / "data"), token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read"):
        ExplaindServer(config)
    SQLiteStore(tmp_path / "data").close()  # the data dir is free: the failed server never locked it


def test_no_writable_temporary_directory_is_refused_at_start_up_before_serving(tmp_path, monkeypatch, caplog):
    """A read-only root file system without a volume at /tmp: importing torchvision (CLIP's
    load does) asks tempfile for a directory, and the start failed as "cannot load CLIP"
    after "listening". Now it stops before binding, saying what to mount."""
    import tempfile

    from explaind.service.server import serve

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() looks again (and sets it: monkeypatch restores it)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "read-only")])
    stop = threading.Event()
    threading.Timer(10, stop.set).start()  # a server that started anyway stops, and the test fails
    config = default_config().replace("server", port=0, data_dir=str(tmp_path / "data"))
    with caplog.at_level(logging.INFO, logger="explaind"), pytest.raises(OSError, match="no writable temporary directory .*mount a writable volume at /tmp"):
        serve(config, stop)
    stop.set()
    assert "listening" not in caplog.text
    SQLiteStore(tmp_path / "data").close()  # the data dir is free


def test_an_onnx_runtime_backend_without_its_gpu_provider_is_refused_before_serving(tmp_path, monkeypatch, caplog):
    """ONNX Runtime without onnxruntime-gpu, as on an H200 machine here: the server said
    "listening", then stopped as the models loaded. Now it stops before binding."""
    import onnxruntime

    from explaind.service.server import serve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    stop = threading.Event()
    threading.Timer(10, stop.set).start()  # a server that started anyway stops, and the test fails
    config = default_config().replace("server", port=0, data_dir=str(tmp_path / "data")).replace("runtime", backend="onnxruntime", device="cuda")
    with caplog.at_level(logging.INFO, logger="explaind"), pytest.raises(
            FailedPrecondition, match=r"device 'cuda' with backend 'onnxruntime' needs onnxruntime-gpu \(CUDAExecutionProvider\); providers here: \['CPUExecutionProvider'\]"):
        serve(config, stop)
    stop.set()
    assert "listening" not in caplog.text
    # A classifier on its own runtime ignores [runtime].backend, so nothing is asked of it.
    from explaind.engine.backends import check_backend

    check_backend("onnxruntime", "cuda", loader="torchscript")


def test_the_compile_backend_without_a_cpp_compiler_is_refused_before_serving(tmp_path, monkeypatch, caplog):
    """torch.compile on the CPU without a C++ compiler (the Docker image has none): the
    server said "listening", then stopped at its first warm-up batch with torch's error alone."""
    from torch._inductor import config as inductor_config

    from explaind.service.server import serve

    monkeypatch.setattr(inductor_config.cpp, "cxx", (str(tmp_path / "no-such-g++"),))
    stop = threading.Event()
    stopper = threading.Timer(10, stop.set)  # a server that started anyway stops, and the test fails
    stopper.start()
    config = default_config().replace("server", port=0, data_dir=str(tmp_path / "data")).replace("runtime", backend="compile")
    try:
        with caplog.at_level(logging.INFO, logger="explaind"), pytest.raises(
                FailedPrecondition, match=r"\[runtime\].backend is 'compile', .*C\+\+ compiler .*none works here \(.*no-such-g\+\+.*\); install one or use backend = \"eager\""):
            serve(config, stop)
    finally:
        stopper.cancel()  # else its thread outlived the test by 10 s
    assert "listening" not in caplog.text
    from explaind.engine.backends import check_backend

    check_backend("compile", "cpu", loader="torchscript")  # a classifier on its own runtime ignores [runtime].backend


def test_the_compile_backend_on_cuda_without_a_c_compiler_is_refused_before_serving(tmp_path, monkeypatch):
    # Triton builds its launcher with a C compiler at the first compiled batch: the image
    # has none, so a CUDA server said "listening", then died at its warm-up, and its pod
    # restarted in a loop. check_backend runs before the device is opened: no GPU needed.
    from explaind.engine.backends import check_backend

    compiler = tmp_path / "bin" / "gcc"
    compiler.parent.mkdir()
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FailedPrecondition, match=r"^\[runtime\].backend is 'compile', whose CUDA kernels Triton builds with a C compiler, "
                                                 r"and neither gcc nor clang is on the PATH; install one \(or name it in \$CC\)"):
        check_backend("compile", "cuda", loader="factory")
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(FailedPrecondition, match="\\$CC is 'no-such-cc', which is not an executable"):
        check_backend("compile", "cuda:0", loader="factory")
    monkeypatch.setenv("CC", str(compiler))
    check_backend("compile", "cuda", loader="factory")
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(compiler.parent))
    check_backend("compile", "cuda", loader="factory")
    check_backend("eager", "cuda", loader="factory")  # only compile builds code
    clang = tmp_path / "clang_only" / "clang"  # Triton's fallback where there is no gcc
    clang.parent.mkdir()
    shutil.copy(compiler, clang)
    monkeypatch.setenv("PATH", str(clang.parent))
    check_backend("compile", "cuda", loader="factory")
    monkeypatch.setenv("CC", "no-such-cc")  # Triton runs $CC where it is set, and no other compiler
    with pytest.raises(FailedPrecondition, match="\\$CC is 'no-such-cc', which is not an executable"):
        check_backend("compile", "cuda", loader="factory")


def test_the_compile_backend_warms_up_on_1_each_power_of_two_and_the_largest_batch_and_others_on_one_small_batch():
    # torch.compile traces again for a batch size outside the ranges its graphs guard on,
    # split at powers of two: a batch the warm-up skips stalls the first Predict of its size.
    from explaind.engine.backends import warm_up_batch_sizes

    assert warm_up_batch_sizes("compile", 48) == (1, 2, 4, 8, 16, 32, 48)
    assert warm_up_batch_sizes("compile", 32) == (1, 2, 4, 8, 16, 32)
    assert warm_up_batch_sizes("compile", 1) == (1,)
    assert warm_up_batch_sizes("onnxruntime", 48) == warm_up_batch_sizes("eager", 48) == (2,)


def test_bearer_token_matches_the_whole_authorization_value_only():
    from explaind.service.auth import BearerToken

    assert BearerToken("").grant_of(None) is not None  # no token: no auth
    token = BearerToken("s3cret")
    assert token.grant_of([("x-trace", "1"), ("authorization", "Bearer s3cret")]) is not None
    # The scheme is case-insensitive (RFC 7235); "bearer s3cret" was refused. The token is not.
    for scheme in ("bearer", "BEARER", "bEaReR"):
        assert token.grant_of([("authorization", f"{scheme} s3cret")]) is not None, scheme
    for metadata in (None, [], [("authorization", "Bearer s3cret2")], [("authorization", "Bearer s3cre")],
                     [("authorization", "s3cret")], [("x-authorization", "Bearer s3cret")], [("authorization", "Bearer S3CRET")],
                     [("authorization", "Bearer  s3cret")], [("authorization", "Bearers3cret")], [("authorization", "Basic s3cret")]):
        assert token.grant_of(metadata) is None, metadata


def _authorised(client) -> bool:
    from explaind.client import UnauthenticatedError

    try:
        client.model_metadata()
    except UnauthenticatedError:
        return False
    return True


def test_a_client_waiting_on_a_job_the_shutdown_aborts_gets_its_final_state(tmp_path, classifier_dir):
    # The calls were cancelled at the same deadline as the jobs: the waiter saw UNAVAILABLE.
    from explaind.client import Client
    from explaind.service import ExplaindServer

    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path))
    server = ExplaindServer(config)
    port = server.start()
    server.load_models()
    with Client(f"127.0.0.1:{port}", timeout=30) as client:
        operation = client.visualize_neurons([3], method="feature_visualization", steps=10_000)
        until_running(operation)
        seen = _waited_through_a_shutdown(server, operation)
    assert seen["state"] == "failed" and seen["error"].code.name == "ABORTED", seen


def _waited_through_a_shutdown(server, operation) -> dict:
    """The state and error a client waiting on ``operation`` sees when ``server`` stops
    (a grace of 0.5 s) while it waits."""
    import threading

    seen = {}
    waiter = threading.Thread(target=lambda: seen.update(state=operation.wait(timeout=30).state, error=operation.error))
    waiter.start()
    # Not a sleep: a wait that reached the server only after the stop began (0.4 s late on a
    # loaded machine) met a closed port and retried it for 30 s.
    waiting = {"service": "explaind.v1.OperationsService", "method": "WaitOperation"}
    deadline = time.monotonic() + 30
    while server.metrics.registry.get_sample_value("explaind_rpcs_in_flight", waiting) != 1:
        assert time.monotonic() < deadline and waiter.is_alive(), "the wait never reached the server"
        time.sleep(0.01)
    server.stop(0.5)
    waiter.join(30)
    return seen


def test_a_job_that_reaches_its_cancellation_check_late_still_reaches_its_waiter(tmp_path, classifier_dir):
    # Calls were cut a second after the grace period: a job whose next check came later
    # (a long step) ended ABORTED after its waiter had been told UNAVAILABLE.
    import threading

    from explaind.client import Client
    from explaind.service import ExplaindServer

    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path))
    server = ExplaindServer(config)
    port = server.start()
    server.load_models()
    started = threading.Event()

    def long_steps(ctx):
        started.set()
        while True:
            ctx.raise_if_cancelled()
            time.sleep(3.0)  # one step: past the grace (0.5 s) and the second calls get after it

    job_id = server.engine.jobs.submit("long_steps", long_steps).record.job_id
    with Client(f"127.0.0.1:{port}", timeout=30) as client:
        operation = client.operation(f"operations/{job_id}")
        assert started.wait(10)
        seen = _waited_through_a_shutdown(server, operation)
    assert seen["state"] == "failed" and seen["error"].code.name == "ABORTED", seen


def test_a_predict_accepted_before_a_shutdown_is_answered_not_refused(tmp_path, classifier_dir, monkeypatch):
    # The stop closed Predict's batcher first: a Predict still decoding its images when
    # SIGTERM came was refused UNAVAILABLE at once, though in-flight calls get the grace.
    import grpc
    from explaind.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    from explaind.service import ExplaindServer, convert

    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path))
    server = ExplaindServer(config)
    port = server.start()
    server.load_models()
    decoding, stopping, answered = threading.Event(), threading.Event(), threading.Event()
    decode, shutdown_jobs = convert.decode_image, server.engine.jobs.shutdown

    def decode_once_the_stop_began(*args, **kwargs):
        decoding.set()
        stopping.wait(30)
        return decode(*args, **kwargs)

    def shutdown_jobs_once_the_predict_is_answered(grace_s):
        stopping.set()
        answered.wait(30)
        shutdown_jobs(grace_s)

    monkeypatch.setattr(convert, "decode_image", decode_once_the_stop_began)
    monkeypatch.setattr(server.engine.jobs, "shutdown", shutdown_jobs_once_the_predict_is_answered)
    outcome = {}

    def predict() -> None:
        image = common_pb2.Image(encoded=encode_png(np.zeros((32, 32, 3), np.uint8)))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # no deadline, as a Go client's
                response = inference_pb2_grpc.InferenceServiceStub(channel).Predict(inference_pb2.PredictRequest(images=[image]))
                outcome.update(code="OK", predictions=len(response.predictions))
        except grpc.RpcError as error:
            outcome.update(code=error.code().name, details=error.details())
        finally:
            answered.set()

    caller = threading.Thread(target=predict)
    caller.start()
    try:
        assert decoding.wait(30)
    finally:
        server.stop(0.5)
        caller.join(30)
    assert outcome == {"code": "OK", "predictions": 1}


def test_waits_for_a_job_never_starve_the_probes_cancel_or_predict(tmp_path, classifier_dir, world_images):
    # Each WaitOperation held a worker thread for its whole wait: 64 clients waiting on one
    # job left none, and health checks, cancels and Predict timed out.
    import grpc
    from explaind.v1 import operations_pb2, operations_pb2_grpc
    from google.protobuf import duration_pb2

    from explaind.client import Client
    from explaind.service import ExplaindServer

    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, data_dir=str(tmp_path), max_workers=4)  # two threads may wait or stream at once
    server = ExplaindServer(config)
    port = server.start()
    server.load_models()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as client, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            operation = client.visualize_neurons([3], method="feature_visualization", steps=10_000)
            stub = operations_pb2_grpc.OperationsServiceStub(channel)
            request = operations_pb2.WaitOperationRequest(name=operation.name, timeout=duration_pb2.Duration(seconds=30))
            held = [stub.WaitOperation.future(request, timeout=60) for _ in range(2)]
            waiting = {"service": "explaind.v1.OperationsService", "method": "WaitOperation"}
            deadline = time.monotonic() + 30
            while server.metrics.registry.get_sample_value("explaind_rpcs_in_flight", waiting) != 2:
                assert time.monotonic() < deadline, "the two waits never reached the server"
                time.sleep(0.02)
            started = time.monotonic()
            answered = stub.WaitOperation(request, timeout=10)  # a third answers at once
            assert time.monotonic() - started < 5 and not answered.operation.done
            assert not any(future.done() for future in held)
            assert client.health() == "SERVING"
            assert len(client.predict(world_images[0][:2].numpy())) == 2
            # The SDK's wait polls a busy server with backoff and keeps its own timeout.
            def waits() -> float:
                labels = {"service": "explaind.v1.OperationsService", "method": "WaitOperation", "code": "OK"}
                return server.metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", labels)

            before, started = waits(), time.monotonic()
            assert not operation.wait(timeout=1.5).done
            assert 1.4 < time.monotonic() - started < 5 and waits() - before <= 8  # not a busy loop
            # A watch finds no thread for its stream either: it polls instead of failing.
            assert next(operation.watch(timeout=10)).state == "running"
            operation.cancel()
            assert {future.result(timeout=30).operation.done for future in held} == {True}
    finally:
        server.stop(0)


def test_idle_reflection_streams_without_a_token_never_starve_the_callers_with_one(tmp_path, classifier_dir):
    # Reflection is public and its call a two-way stream, which the bound on held calls did
    # not cover: as many idle streams as worker threads left no thread for anyone.
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from explaind.client import Client
    from explaind.service import ExplaindServer

    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, data_dir=str(tmp_path), max_workers=4, token="s3cret")
    server = ExplaindServer(config)
    port = server.start()
    server.load_models()
    idle = threading.Event()

    def nothing_more():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        idle.wait(60)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, Client(f"127.0.0.1:{port}", timeout=10, token="s3cret") as client:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            held = []
            # max_workers 4: 2 slots, 1 of them for calls without a token.
            for _ in range(1):  # one after the other: which of streams started together get the slots is up to the server
                held.append(stub.ServerReflectionInfo(nothing_more(), timeout=60))
                assert next(held[-1]).list_services_response.service  # answered; the stream holds its thread
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as refused:
                    next(stub.ServerReflectionInfo(nothing_more(), timeout=60))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            started = time.monotonic()
            assert client.model_metadata().feature_dim == 128 and client.health() == "SERVING"
            assert time.monotonic() - started < 5
    finally:
        idle.set()
        server.stop(0)


def test_reflection_needs_no_token_under_either_of_its_names(tmp_path, classifier_dir):
    # The server answers reflection as v1alpha and as v1 (newer clients ask for v1 first,
    # some only for it); tooling reaches both without a token, as it reaches health.
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2

    from explaind.service import ExplaindServer

    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path), token="s3cret")
    server = ExplaindServer(config)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for service in ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"):
                info = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                             request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                             response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                (listed,) = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
                assert "explaind.v1.InferenceService" in {listed_service.name for listed_service in listed.list_services_response.service}, service
            with pytest.raises(grpc.RpcError) as refused:  # what is not public still needs the token
                channel.unary_unary("/explaind.v1.InferenceService/GetModelMetadata")(b"", timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


def test_list_operations_pages_end_before_the_message_size_limit(tmp_path):
    # Operations are listed with their results (an evaluation's confusion matrix is C²
    # counts): a page of them could exceed the send limit, and every later page with it.
    from explaind.service.interceptors import HeldCalls
    from explaind.service.operations import OperationsServicer
    from explaind.v1 import operations_pb2

    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    try:
        submitted = [jobs.submit("evaluate", lambda context, i=i: operations_pb2.Progress(message=str(i) * 5000)).record.job_id
                     for i in range(5)]
        for job_id in submitted:
            assert jobs.wait(job_id, 30).record.state == "succeeded"
        servicer = OperationsServicer(jobs, max_message_bytes=16 * 1024, held_calls=HeldCalls(1))
        token, pages, listed = "", 0, []
        while True:
            response = servicer.ListOperations(operations_pb2.ListOperationsRequest(page_token=token), None)
            assert 1 <= len(response.operations) and response.ByteSize() <= 16 * 1024
            listed += [operation.name.removeprefix("operations/") for operation in response.operations]
            pages, token = pages + 1, response.next_page_token
            if not token:
                break
        assert sorted(listed) == sorted(submitted) and pages >= 2
    finally:
        jobs.shutdown(5)


def test_list_operations_pages_hold_100_by_default_and_at_most_1000(tmp_path):
    """ListOperationsRequest.page_size: "0 means 100; at most 1000"; the last page has no token."""
    from explaind.service.interceptors import HeldCalls
    from explaind.service.operations import OperationsServicer
    from explaind.store import JobRecord
    from explaind.v1 import operations_pb2

    store = SQLiteStore(tmp_path, reserve_bytes=0)
    for i in range(1001):
        store.insert_job(JobRecord(job_id=f"{i:016x}", kind="evaluate", state="succeeded", create_time=1000.0 + i, end_time=1001.0 + i))
    jobs = JobManager(store, Metrics(), workers=1)
    try:
        servicer = OperationsServicer(jobs, max_message_bytes=4 << 20, held_calls=HeldCalls(1))
        default = servicer.ListOperations(operations_pb2.ListOperationsRequest(), None)
        assert len(default.operations) == 100 and default.next_page_token
        most = servicer.ListOperations(operations_pb2.ListOperationsRequest(page_size=5000), None)
        assert len(most.operations) == 1000 and most.next_page_token
        last = servicer.ListOperations(operations_pb2.ListOperationsRequest(page_size=5000, page_token=most.next_page_token), None)
        assert len(last.operations) == 1 and last.next_page_token == ""
        assert {operation.name for operation in [*most.operations, *last.operations]} == {f"operations/{i:016x}" for i in range(1001)}
    finally:
        jobs.shutdown(5)


def test_operations_created_at_the_same_time_are_listed_by_id_and_paged_through_once_each(tmp_path):
    """ListOperationsResponse.operations: "Newest first (by create time, then id)": a tie
    in create time goes by id, and pages of one resume past it, skipping and repeating none."""
    from explaind.service.interceptors import HeldCalls
    from explaind.service.operations import OperationsServicer
    from explaind.store import JobRecord
    from explaind.v1 import operations_pb2

    store = SQLiteStore(tmp_path, reserve_bytes=0)
    times = {"00000000000000c0": 1000.0, "00000000000000b2": 2000.0, "00000000000000a1": 2000.0, "00000000000000b1": 2000.0}
    for job_id, create_time in times.items():
        store.insert_job(JobRecord(job_id=job_id, kind="evaluate", state="succeeded", create_time=create_time, end_time=create_time + 1))
    jobs = JobManager(store, Metrics(), workers=1)
    try:
        servicer = OperationsServicer(jobs, max_message_bytes=4 << 20, held_calls=HeldCalls(1))
        expected = ["operations/00000000000000a1", "operations/00000000000000b1", "operations/00000000000000b2", "operations/00000000000000c0"]
        assert [o.name for o in servicer.ListOperations(operations_pb2.ListOperationsRequest(), None).operations] == expected
        paged, token = [], ""
        for _ in range(len(times)):
            page = servicer.ListOperations(operations_pb2.ListOperationsRequest(page_size=1, page_token=token), None)
            paged += [o.name for o in page.operations]
            token = page.next_page_token
        assert paged == expected
    finally:
        jobs.shutdown(5)


def test_list_operations_reads_only_the_responses_it_sends(tmp_path):
    # A page of up to 1000 operations read every one's stored response (up to half the
    # message limit each) before sending none (OPERATION_VIEW_BASIC) or the few that fit:
    # one small request cost the server gigabytes.
    import tracemalloc

    from google.protobuf import any_pb2
    from google.rpc import status_pb2

    from explaind.service.interceptors import HeldCalls
    from explaind.service.operations import OperationsServicer
    from explaind.store import JobRecord
    from explaind.v1 import operations_pb2

    store = SQLiteStore(tmp_path, reserve_bytes=0)
    response = any_pb2.Any(type_url="type.googleapis.com/x", value=b"r" * (1 << 20)).SerializeToString()
    detail = any_pb2.Any()
    detail.Pack(status_pb2.Status(message="the field"))
    for i in range(60):
        store.insert_job(JobRecord(job_id=f"{i:016x}", kind="evaluate", state="succeeded", create_time=1000.0 + i, end_time=1001.0 + i,
                                   result=response))
    store.insert_job(JobRecord(job_id="f" * 16, kind="evaluate", state="failed", create_time=2000.0, end_time=2001.0,
                               error_code="INVALID_ARGUMENT", error_message="bad", result=detail.SerializeToString()))
    jobs = JobManager(store, Metrics(), workers=1)
    try:
        servicer = OperationsServicer(jobs, max_message_bytes=4 << 20, held_calls=HeldCalls(1))
        pages = {}
        for view in (operations_pb2.OPERATION_VIEW_BASIC, operations_pb2.OPERATION_VIEW_FULL):
            tracemalloc.start()
            pages[view] = servicer.ListOperations(operations_pb2.ListOperationsRequest(page_size=1000, view=view), None)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 8 << 20, f"{operations_pb2.OperationView.Name(view)}: {peak >> 20} MiB"
        basic, full = pages[operations_pb2.OPERATION_VIEW_BASIC], pages[operations_pb2.OPERATION_VIEW_FULL]
        assert len(basic.operations) == 61 and not any(operation.HasField("response") for operation in basic.operations)
        assert basic.operations[0].error.details[0] == detail  # a failed one's error keeps its details
        assert 2 <= len(full.operations) < 5 and full.operations[1].response.SerializeToString() == response
        assert full.next_page_token
    finally:
        jobs.shutdown(5)


def test_list_operations_leaves_out_an_operation_deleted_before_its_response_is_read(tmp_path):
    # The page is listed without responses and each is read as the page fills: one deleted
    # in between was sent as succeeded with an empty response (no type), which the SDK's
    # result() failed to unpack with a KeyError.
    from google.protobuf import any_pb2

    from explaind.service.interceptors import HeldCalls
    from explaind.service.operations import OperationsServicer
    from explaind.service.paging import resume_point
    from explaind.store import JobRecord
    from explaind.v1 import operations_pb2

    store = SQLiteStore(tmp_path, reserve_bytes=0)
    response = any_pb2.Any(type_url="type.googleapis.com/x", value=b"r").SerializeToString()
    for i in range(3):
        store.insert_job(JobRecord(job_id=f"{i:016x}", kind="evaluate", state="succeeded", create_time=1000.0 + i, end_time=1001.0 + i,
                                   result=response))
    jobs = JobManager(store, Metrics(), workers=1)
    listed = jobs.list

    def list_then_delete(**kwargs):
        snapshots = listed(**kwargs)
        store.delete_job(f"{1:016x}")
        return snapshots

    jobs.list = list_then_delete
    try:
        servicer = OperationsServicer(jobs, max_message_bytes=4 << 20, held_calls=HeldCalls(1))
        page = servicer.ListOperations(operations_pb2.ListOperationsRequest(page_size=3, view=operations_pb2.OPERATION_VIEW_FULL), None)
        assert [operation.name for operation in page.operations] == [f"operations/{2:016x}", f"operations/{0:016x}"]
        assert all(operation.response.SerializeToString() == response for operation in page.operations)
        # A full page still says where the next one starts: after the last one listed.
        assert resume_point(page.next_page_token, "operations") == (1000.0, f"{0:016x}")
    finally:
        jobs.shutdown(5)


def test_a_data_dir_whose_database_is_lost_is_refused_not_swept_clean(tmp_path):
    # A missing or empty database (a bad restore, a wrong mount) was created afresh, and the
    # start-up sweep deleted every image, artifact and head weight as unused.
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("kept", "", [SampleRecord(put(b"an image"), 0, {})])
    store.close()
    database = tmp_path / "explaind.sqlite3"
    for lose in (lambda: database.unlink(), lambda: database.write_bytes(b"")):
        for journal in tmp_path.glob("explaind.sqlite3-*"):
            journal.unlink()
        lose()
        with pytest.raises(StoreOpenError, match=r"holds stored files \(\w+, \.\.\.\) but its database .*explaind.sqlite3 is missing or empty: "
                                                 r"restore the database, or move .*artifacts away"):
            SQLiteStore(tmp_path)
        assert store._blob_path(_digest(b"an image")).read_bytes() == b"an image"
    shutil.rmtree(tmp_path / "artifacts")
    SQLiteStore(tmp_path).close()  # afresh, as the message says


def test_a_damaged_stored_file_is_data_loss_said_to_the_operator(tmp_path, caplog):
    # A flipped byte in a promoted head's weights was served, a truncated image was the
    # caller's INVALID_ARGUMENT, and a truncated artifact was sent as complete.
    store = SQLiteStore(tmp_path)
    try:
        with store.writing_blobs() as put:
            digest = put(b"0123456789")
            store.create_sample_set("s", "", [SampleRecord(digest, 0, {})])
        path = store._blob_path(digest)
        path.write_bytes(b"0123456788")
        with pytest.raises(DataLoss, match=rf"the stored file of '{digest}' is damaged \(its content does not match its digest\)"):
            store.get_blob(digest)
        path.write_bytes(b"01234")
        assert store.get_blob(digest, offset=1, length=3) == b"123"  # no size to check a range against
        with pytest.raises(DataLoss, match=r"is damaged \(it holds 5 bytes of 10\)"):
            store.get_blob(digest, offset=0, length=10, size=10)
        path.write_bytes(b"0123456789 and more")  # longer is no stored file either
        with pytest.raises(DataLoss, match=r"is damaged \(it holds 19 bytes of 10\)"):
            store.get_blob(digest, offset=0, length=5, size=10)
        assert [r.levelname for r in caplog.records if "is damaged" in r.message] == ["ERROR", "ERROR", "ERROR"]
    finally:
        store.close()


def test_a_lost_or_damaged_stored_file_names_what_holds_it_in_the_log_and_the_message(tmp_path, caplog):
    # The ERROR line named only the file's path and the message said "delete what holds
    # it": the operator could not tell which sample set or operation to delete.
    store = SQLiteStore(tmp_path)
    try:
        with store.writing_blobs() as put:
            shared, artifact = put(b"an image in many sets"), put(b"a mistakes grid")
            for index in range(7):
                store.create_sample_set(f"set{index}", "", [SampleRecord(shared, 0, {})])
            store.insert_job(JobRecord("ab12", "evaluate_sample_set", "succeeded", time.time(),
                                       artifacts=(ArtifactRef("mistakes.png", "image/png", artifact, 15),)))
        store._blob_path(artifact).write_bytes(b"a mistakes gri")
        with pytest.raises(DataLoss, match=re.escape("(operation operations/ab12 (explaind operations delete NAME))")):
            store.get_blob(artifact, offset=0, length=15, size=15)
        store._blob_path(shared).write_bytes(b"damaged")
        with caplog.at_level(logging.ERROR, logger="explaind.store.sqlite"), pytest.raises(DataLoss) as damaged:
            store.get_blob(shared)
        held = "sample sets 'set0', 'set1', 'set2', 'set3', 'set4' and 2 more (explaind sample-set delete ID)"
        assert str(damaged.value).endswith(f"delete what holds it ({held})")
        assert caplog.records[-1].levelname == "ERROR" and caplog.records[-1].getMessage().endswith(f"held by {held}")
        store._blob_path(shared).unlink()
        with pytest.raises(DataLoss, match=re.escape(f"({held})")):
            store.get_blob(shared)
        assert caplog.records[-1].getMessage().endswith(f"held by {held}")
    finally:
        store.close()


def test_the_files_of_a_write_that_failed_go_at_the_next_sweep(tmp_path):
    # A CreateSampleSet whose id was taken left its images on disk until a restart.
    from explaind.errors import AlreadyExists


    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("taken", "", [SampleRecord(put(b"kept image"), 0, {})])
    with pytest.raises(AlreadyExists), store.writing_blobs() as put:
        store.create_sample_set("taken", "", [SampleRecord(put(b"kept image"), 0, {}), SampleRecord(put(b"new image"), 1, {})])
    assert store.delete_unused_blobs() == 1
    assert store.get_blob(_digest(b"kept image")) == b"kept image"
    with pytest.raises(NotFound):
        store.get_blob(_digest(b"new image"))


def test_until_the_stored_head_is_restored_predict_and_evaluate_wait_and_the_start_up_sweep_spares_running_jobs(tmp_path, classifier_dir, world_images):
    # Between loading the model file and restoring the promoted head version, Predict
    # answered with the file's head; and the start-up sweep, which assumed no job ran
    # yet, deleted the images of a set an accepted evaluation was about to read.
    import grpc

    from explaind.client import Client
    from explaind.service import ExplaindServer

    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path))
    server = ExplaindServer(config)
    port = server.start()
    try:
        server.engine.load()
        with Client(f"127.0.0.1:{port}", timeout=30, retry=False) as client:
            for call in (lambda: client.predict(world_images[0][:1].numpy()), lambda: client.evaluate_sample_set("any")):
                with pytest.raises(Exception) as refused:
                    call()
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "models are still loading" in refused.value.details
            server.neuroinspect.restore()
            assert len(client.predict(world_images[0][:1].numpy())) == 1
            client.create_sample_set(world_images[0][:8].numpy(), world_images[1][:8].numpy(), sample_set_id="deleted-soon")
            reading, swept = threading.Event(), threading.Event()
            load = server.engine.load_sample_image

            def load_after_the_sweep(digest, version=None, **options):  # the job has read the set's records, not yet its images
                reading.set()
                swept.wait(30)
                return load(digest, version, **options)

            server.engine.load_sample_image = load_after_the_sweep
            evaluation = client.evaluate_sample_set("deleted-soon")
            assert reading.wait(30)
            client.delete_sample_set("deleted-soon")
            server._sweep_once(everything=True)
            swept.set()
            assert evaluation.wait(timeout=60).state == "succeeded", evaluation.error
    finally:
        server.stop(0)


def test_artifacts_reach_the_disk_before_the_database_can_point_at_them(tmp_path, monkeypatch):
    store = SQLiteStore(tmp_path)
    synced, named = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), named.append(store._blob_path(_digest(b"artifact bytes")).exists()),
                                                 real_fsync(fd)))
    with store.writing_blobs() as put:
        digest = put(b"artifact bytes")
        again = put(b"other bytes" * 1000)
    path, other = store._blob_path(digest), store._blob_path(again)
    assert path.parent != other.parent
    # Its new directory's entry, the file's data, then the directory entry of the rename;
    # the second blob's directory is new too.
    assert synced == [inode(store.blob_dir), inode(path), inode(path.parent), inode(store.blob_dir), inode(other), inode(other.parent)]
    # Under its digest only once whole: a crash while writing leaves no half file there,
    # which a later put of the same bytes would take for stored.
    assert named[:3] == [False, False, True]
    assert store.get_blob(digest) == b"artifact bytes"
    assert not list(tmp_path.rglob("*.tmp"))
    synced.clear()
    neighbour = next(data for data in (b"neighbour %d" % n for n in range(10_000)) if _digest(data)[:2] == digest[:2])
    with store.writing_blobs() as put:  # into a directory made already: not synced again
        put(neighbour)
    assert synced == [inode(store._blob_path(_digest(neighbour))), inode(path.parent)]


def inode(path: Path) -> int:
    return path.stat().st_ino


def test_a_new_data_dir_puts_its_blob_directories_entries_on_disk_before_any_put(tmp_path, monkeypatch):
    # A put syncs artifacts/sha256 and below; artifacts/sha256 made at the open, its entry
    # in artifacts/ and that one's in the data dir were never synced.
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    store = SQLiteStore(tmp_path / "data")
    try:
        assert synced == [inode(tmp_path / "data" / "artifacts"), inode(tmp_path / "data")]
    finally:
        store.close()


@contextmanager
def _a_put_paused_at_a_sync(monkeypatch, store: SQLiteStore, data: bytes, paused: Callable[[int], bool],
                            seen: Callable[[int], None]) -> Iterator[None]:
    """A put of ``data`` on a thread named "first", stopped at its first fsync(fd) that
    ``paused`` picks until the block ends; ``seen`` hears every thread's fsync(fd)."""
    reached, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd):
        seen(fd)
        if threading.current_thread().name == "first" and not reached.is_set() and paused(fd):
            reached.set()
            assert release.wait(30)
        real_fsync(fd)

    def put_first():
        with store.writing_blobs() as put:
            put(data)

    monkeypatch.setattr(os, "fsync", fsync)
    first = threading.Thread(target=put_first, name="first")
    first.start()
    try:
        assert reached.wait(30)
        yield
    finally:
        release.set()
        first.join(30)
    assert not first.is_alive()


def test_a_put_of_bytes_another_put_has_renamed_but_not_synced_writes_them_itself(tmp_path, monkeypatch):
    # Its record could otherwise commit before the other put's rename reached the disk.
    store = SQLiteStore(tmp_path)
    regular_syncs = []

    def seen(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            regular_syncs.append(threading.current_thread().name)

    def renamed(fd):  # its directory's sync, the rename done
        return not stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_ino != inode(store.blob_dir)

    with _a_put_paused_at_a_sync(monkeypatch, store, b"shared image", renamed, seen):
        assert store._blob_path(_digest(b"shared image")).exists()
        with store.writing_blobs() as put:
            put(b"shared image")
    assert regular_syncs == ["first", "MainThread"]
    with store.writing_blobs() as put:  # synced now: stored
        put(b"shared image")
    assert regular_syncs == ["first", "MainThread"]
    assert store.get_blob(_digest(b"shared image")) == b"shared image" and not list(tmp_path.rglob("*.tmp"))


def test_a_put_of_bytes_whose_rename_a_failed_directory_sync_left_unconfirmed_writes_them_itself(tmp_path, monkeypatch):
    # The file stays in place after that put fails: taken for stored, the next put's
    # record could commit before its rename reached the disk.
    store = SQLiteStore(tmp_path)
    digest = _digest(b"image")
    regular_syncs, failures = [], [OSError(errno.EIO, os.strerror(errno.EIO))]
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            regular_syncs.append(fd)
        elif os.fstat(fd).st_ino != inode(store.blob_dir) and failures:  # its directory's sync, the rename done
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)), store.writing_blobs() as put:
        put(b"image")
    assert store._blob_path(digest).exists() and len(regular_syncs) == 1
    with store.writing_blobs() as put:
        store.create_sample_set("s", "", _samples(put, b"image"))
    assert len(regular_syncs) == 2
    with store.writing_blobs() as put:  # synced now: stored
        put(b"image")
    assert len(regular_syncs) == 2
    assert [sample.digest for sample in store.list_samples("s")] == [digest] and store.get_blob(digest) == b"image"
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_put_into_a_directory_another_put_has_made_but_not_synced_syncs_its_entry_itself(tmp_path, monkeypatch):
    # The directory's entry in artifacts/sha256 reaches the disk with that sync: skipped
    # for a directory that merely exists, this put's record could commit before it did.
    store = SQLiteStore(tmp_path)
    syncs = []
    digest = _digest(b"first image")
    neighbour, later = [data for data in (b"neighbour %d" % n for n in range(10_000)) if _digest(data)[:2] == digest[:2]][:2]

    def of_blob_dir(fd):  # its directory made, the entry's sync to come
        return os.fstat(fd).st_ino == inode(store.blob_dir)

    def seen(fd):
        if of_blob_dir(fd):
            syncs.append(threading.current_thread().name)

    with _a_put_paused_at_a_sync(monkeypatch, store, b"first image", of_blob_dir, seen):
        assert store._blob_path(digest).parent.is_dir()
        with store.writing_blobs() as put:
            put(neighbour)
    assert syncs == ["first", "MainThread"]
    with store.writing_blobs() as put:  # synced now: not again
        put(later)
    assert syncs == ["first", "MainThread"]
    assert [store.get_blob(_digest(data)) for data in (b"first image", neighbour, later)] == [b"first image", neighbour, later]


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _blob_files(store: SQLiteStore) -> set[str]:
    return {path.name for path in store.blob_dir.glob("*/*")}


def _samples(put, *images: bytes) -> list:
    return [SampleRecord(put(image), 0, {}) for image in images]


def test_a_sweep_removes_the_images_and_features_only_deleted_sets_used(tmp_path):
    # They stayed on disk for good: a pipeline that uploads new sets and deletes old ones
    # filled the disk.
    from explaind.store import ArtifactRef, HeadVersionRecord, JobRecord

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("old", "", _samples(put, b"shared", b"only-old"))
        store.create_sample_set("new", "", _samples(put, b"shared", b"only-new"))
        artifact = put(b"only-old")  # identical bytes saved as a job's artifact too
        store.insert_job(JobRecord(job_id="j", kind="evaluate", state="succeeded", create_time=0.0, artifacts=(ArtifactRef("a", "x", artifact, 8),)))
        weights = put(b"head weights")
        store.insert_head_version(HeadVersionRecord("f", "v1", "h", weights, "", 0.0))
    for version in ("v", "a", "z"):  # the cache of three feature versions
        store.put_features(version, {digest: np.ones(2, np.float32) for digest in _blob_files(store)})
    kept = _blob_files(store)
    store.delete_sample_set("new")
    assert _blob_files(store) == kept  # deleting is quick: the files go in a sweep
    assert store.delete_unused_blobs() == 1 and kept - _blob_files(store) == {_digest(b"only-new")}
    assert all(store.get_features(version, [_digest(b"only-new")]) == {} for version in ("v", "a", "z"))
    assert set(store.get_features("v", [_digest(b"shared")])) == {_digest(b"shared")}
    # A job artifact keeps its blob; a deleted head version's weights go.
    store.delete_sample_set("old")
    store.delete_head_version("f", "v1")
    assert store.delete_unused_blobs() == 2 and _blob_files(store) == {artifact}
    # At start-up every file is checked, and killed writers' scratch files go.
    with store.writing_blobs() as put:
        put(b"written but never referenced")  # e.g. a request that failed after writing its images
    scratch = store.blob_dir / "ab" / f"{'ab' * 32}.99999999.1.tmp"
    scratch.parent.mkdir(exist_ok=True)
    scratch.write_bytes(b"half")
    # An earlier server's, though it had this pid: in a container every server is pid 1.
    (scratch.parent / f"{'ab' * 32}.{os.getpid()}.1.tmp").write_bytes(b"half")
    store.put_features("v", {_digest(b"only-old"): np.ones(2, np.float32)})  # cached by a job after the sweep
    assert store.delete_unused_blobs() == 0
    assert store.delete_unused_blobs(everything=True) == 1 and _blob_files(store) == {artifact}
    assert store.get_features("v", [_digest(b"only-old"), _digest(b"shared")]) == {}


def test_a_sweep_interrupted_returns_after_its_chunk_and_the_next_sweep_deletes_the_rest(tmp_path, monkeypatch):
    # The server's stop() waits for a sweep under way: the sweep must return after the
    # chunk it is deleting, leaving records and files a later sweep finds again.
    from explaind.store import sqlite

    monkeypatch.setattr(sqlite, "_SWEEP_CHUNK", 2)
    store = SQLiteStore(tmp_path)
    interrupt = threading.Event()
    delete_unreferenced = store._delete_unreferenced

    def delete_as_a_stop_begins(chunk: list[str]) -> int:
        interrupt.set()
        return delete_unreferenced(chunk)

    try:
        with store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, *(b"image %d" % index for index in range(5))))
        store.delete_sample_set("s")
        store._delete_unreferenced = delete_as_a_stop_begins
        assert store.delete_unused_blobs(interrupt=interrupt) == 2 and len(_blob_files(store)) == 3
        interrupt.clear()
        assert store.delete_unused_blobs(interrupt=interrupt) == 2 and len(_blob_files(store)) == 1
        # At start-up the files nothing references, checked per directory, stop likewise.
        strays = [store._blob_path(f"cd{index:062x}") for index in range(5)]
        strays[0].parent.mkdir()
        for stray in strays:
            stray.write_bytes(b"written, never recorded")
        interrupt.clear()
        assert store.delete_unused_blobs(everything=True, interrupt=interrupt) == 2 and len(_blob_files(store)) == 4
        del store._delete_unreferenced
        interrupt.clear()
        assert store.delete_unused_blobs(everything=True, interrupt=interrupt) == 4 and not _blob_files(store)
    finally:
        store.close()


def test_a_start_up_sweep_interrupted_before_it_begins_reads_nothing_and_leaves_everything_to_the_next(tmp_path):
    # A stop begun during the sweep's earlier steps (retention) found the start-up sweep
    # still scanning every cached feature for those of no set first (2.3 s per million).
    store = SQLiteStore(tmp_path)
    stray = store._blob_path(f"cd{0:062x}")
    stray.parent.mkdir()
    stray.write_bytes(b"written, never recorded")
    store.put_features("v", {_digest(b"in no set"): np.ones(4, dtype=np.float32)})
    interrupt = threading.Event()
    interrupt.set()
    try:
        assert store.delete_unused_blobs(everything=True, interrupt=interrupt) == 0
        assert stray.exists() and store.get_features("v", [_digest(b"in no set")])
        assert store.delete_unused_blobs(everything=True) == 1
        assert not stray.exists() and not store.get_features("v", [_digest(b"in no set")])
    finally:
        store.close()


def test_the_start_up_sweep_scans_cached_features_in_chunks_letting_requests_in_and_a_stop_between_them(tmp_path, monkeypatch):
    # One statement scanned every cached feature for those of images no set holds, with the
    # store's lock held (2.3 s for a million rows, every request waiting) and deaf to a stop.
    from explaind.store import sqlite

    monkeypatch.setattr(sqlite, "_FEATURE_SCAN_ROWS", 2)  # rows per chunk
    store = SQLiteStore(tmp_path)

    class StopAfterFirstChunk(threading.Event):
        """Asked between chunks: notes whether a request's thread could take the store's
        lock then (the sweep's own thread re-enters it), and is set from the second ask."""
        def __init__(self) -> None:
            super().__init__()
            self.lock_free: list[bool] = []

        def is_set(self) -> bool:
            def take_the_lock() -> None:
                if free := store._lock.acquire(blocking=False):
                    store._lock.release()
                self.lock_free.append(free)

            request = threading.Thread(target=take_the_lock)
            request.start()
            request.join()
            return len(self.lock_free) > 1

    try:
        with store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, b"kept"))
        strays = [_digest(bytes([index])) for index in range(5)]
        store.put_features("v", {digest: np.ones(4, dtype=np.float32) for digest in (_digest(b"kept"), *strays)})  # rowids 1 to 6
        stopping = StopAfterFirstChunk()
        store.delete_unused_blobs(everything=True, interrupt=stopping)
        assert len(stopping.lock_free) >= 2 and all(stopping.lock_free)
        assert sorted(store.get_features("v", [_digest(b"kept"), *strays])) == sorted([_digest(b"kept"), *strays[1:]])  # rows 1-2 checked
        store.delete_unused_blobs(everything=True)
        assert list(store.get_features("v", [_digest(b"kept"), *strays])) == [_digest(b"kept")]
    finally:
        store.close()

def test_the_start_up_sweep_checks_every_cached_feature_whatever_its_rowid_and_the_chunk_size(tmp_path, monkeypatch):
    # Chunked by rowid, the scan must check what the one statement did: the first and the
    # last row, a row on a chunk's edge, and a row a re-cache moved past the others.
    from explaind.store import sqlite

    for rows_per_chunk in (1, 2, 3, 5):
        monkeypatch.setattr(sqlite, "_FEATURE_SCAN_ROWS", rows_per_chunk)
        store = SQLiteStore(tmp_path / str(rows_per_chunk))
        try:
            with store.writing_blobs() as put:
                store.create_sample_set("s", "", _samples(put, b"kept"))
            strays = [_digest(bytes([index])) for index in range(7)]
            store.put_features("v", {digest: np.ones(4, dtype=np.float32) for digest in (*strays, _digest(b"kept"))})  # rowids 1 to 8
            store.put_features("v", {strays[3]: np.ones(4, dtype=np.float32)})  # replaced: rowid 9, none left at 4
            store.delete_unused_blobs(everything=True)
            assert list(store.get_features("v", [_digest(b"kept"), *strays])) == [_digest(b"kept")], rows_per_chunk
        finally:
            store.close()


def test_a_blob_file_the_sweep_cannot_delete_is_logged_not_counted_and_the_others_go(tmp_path, caplog):
    # The count feeds explaind_stored_files_deleted_total: a file left on disk is no file deleted.
    store = SQLiteStore(tmp_path)
    try:
        with store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, b"deletable", b"stuck"))
        store.delete_sample_set("s")
        stuck = store._blob_path(_digest(b"stuck"))
        stuck.unlink()
        stuck.mkdir()  # unlink() refuses a directory, whoever runs it
        assert store.delete_unused_blobs() == 1
        assert _blob_files(store) == {stuck.name}
        assert f"cannot delete the unused blob {stuck.name}: Is a directory" in caplog.text
        assert store.delete_unused_blobs() == 0  # its records are gone: not retried every sweep
    finally:
        store.close()


def test_the_server_s_start_up_sweep_deletes_blob_files_nothing_references(tmp_path, classifier_dir):
    # A file an earlier process wrote but never recorded (it died between the two) is
    # referenced by nothing, so no later sweep would ever meet it: the start-up sweep must.
    from explaind.service import ExplaindServer

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        (kept,) = _samples(put, b"kept")
        store.create_sample_set("s", "", [kept])
    stray = store._blob_path(_digest(b"written, never recorded"))
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"written, never recorded")
    store.close()
    server = ExplaindServer(default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path)))
    try:
        server.start()
        server.load_models()
        files = _blob_files(server.store)
        assert kept.digest in files and stray.name not in files
    finally:
        server.stop(0)


def test_a_sweep_makes_its_records_durable_before_it_deletes_their_files(tmp_path, monkeypatch):
    # The database commits with synchronous=NORMAL: a power cut may undo its last commits.
    # Were the sweep's among them, the set's records would come back pointing at deleted files.
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        (sample,) = _samples(put, b"image")
        store.create_sample_set("s", "", [sample])
    store.delete_sample_set("s")
    events: list[str] = []
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda path, *args, **kwargs: (events.append(f"unlink {path.name}"), real_unlink(path, *args, **kwargs))[1])
    store._db.set_trace_callback(events.append)
    assert store.delete_unused_blobs() == 1
    store._db.set_trace_callback(None)
    full = events.index("PRAGMA synchronous=FULL")
    committed = events.index("COMMIT", full)
    assert full < committed < events.index(f"unlink {sample.digest}")
    assert "PRAGMA synchronous=NORMAL" in events[committed:]  # and back for the writes after it
    store.close()


def test_the_start_up_sweep_of_files_all_in_use_writes_nothing(tmp_path):
    # It recorded every stored file as a candidate, then checked each: a write per file at
    # every start, which on a full data dir took what its reserve freed for deletes.
    store = SQLiteStore(tmp_path)
    try:
        with store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, *(f"image {i}".encode() for i in range(50))))
        store.put_features("v", {digest: np.ones(2, np.float32) for digest in _blob_files(store)})
        changes = store._db.total_changes
        assert store.delete_unused_blobs(everything=True) == 0
        assert store._db.total_changes == changes and len(_blob_files(store)) == 50
        assert len(store.get_features("v", sorted(_blob_files(store)))) == 50  # the set's cached features too
    finally:
        store.close()


def test_a_full_data_dir_is_resource_exhausted_and_a_failed_blob_write_leaves_no_scratch_file(tmp_path, monkeypatch):
    # A full disk was INTERNAL on every write call, and left half-written scratch files,
    # which only a restart under another pid removed.
    store = SQLiteStore(tmp_path)
    full = f"the server's data dir {tmp_path} is full"
    real_fsync = os.fsync

    def failing_at_the_data(error: OSError) -> Callable[[int], None]:  # its scratch file written, not at its directory's sync before that
        return lambda fd: (_ for _ in ()).throw(error) if stat.S_ISREG(os.fstat(fd).st_mode) else real_fsync(fd)

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", failing_at_the_data(OSError(28, "No space left on device")))
        with pytest.raises(ResourceExhausted, match=re.escape(f"{full} (No space left on device)")), store.writing_blobs() as put:
            put(b"image")
    assert not list(store.blob_dir.rglob("*.tmp")) and not list(store.blob_dir.rglob(_digest(b"image")))
    with monkeypatch.context() as patched:  # another error is the caller's as it is (INTERNAL), no scratch file left either
        patched.setattr(os, "fsync", failing_at_the_data(OSError(errno.EIO, os.strerror(errno.EIO))))
        with pytest.raises(OSError, match=os.strerror(errno.EIO)), store.writing_blobs() as put:
            put(b"image")
    assert not list(store.blob_dir.rglob("*.tmp")) and not list(store.blob_dir.rglob(_digest(b"image")))
    # The database full: SQLite's own SQLITE_FULL, here from a page limit.
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(ResourceExhausted, match=re.escape(f"{full} (database or disk is full)")), store.writing_blobs() as put:
        store.create_sample_set("s", "x" * 100_000, _samples(put, b"image"))


def test_a_full_data_dir_releases_its_reserve_to_start_and_to_delete(tmp_path, monkeypatch, caplog):
    # Full, a data dir could neither restart (SQLite in WAL mode needs room even to read)
    # nor be freed through the API (a delete is a write): the operator's only way out was
    # by hand. Here the file system is full while the reserve is held.
    from explaind.store.sqlite import RESERVE_FILE

    size = 1 << 20
    store = SQLiteStore(tmp_path, reserve_bytes=size)
    reserve = tmp_path / RESERVE_FILE
    assert reserve.stat().st_blocks * 512 >= size  # allocated, not a sparse file
    with store.writing_blobs() as put:
        store.create_sample_set("s", "", _samples(put, b"image"))
    transaction = store._transaction
    monkeypatch.setattr(store, "_transaction", lambda: transaction() if not reserve.exists() else (_ for _ in ()).throw(
        store._full("database or disk is full")))
    with pytest.raises(ResourceExhausted):  # what fills it is still refused
        store.insert_job(JobRecord(job_id="t", kind="k", state="queued", create_time=1.0))
    assert reserve.exists()
    with caplog.at_level(logging.WARNING, "explaind.store.sqlite"):
        store.delete_sample_set("s")  # the reserve goes, so that this can
    assert not reserve.exists() and f"the data dir {tmp_path} is full: released its reserve of {size} bytes for a delete" in caplog.text
    with pytest.raises(NotFound):
        store.get_sample_set("s")
    # What it freed is for deletes and bookkeeping: no new files, no cached features.
    monkeypatch.setattr(store, "_free_bytes", lambda: size)  # still less than twice the reserve
    with pytest.raises(ResourceExhausted, match="is full \\(what is left is kept for deletes\\)"), store.writing_blobs() as put:
        put(b"new")
    store.put_features("v", {_digest(b"image"): np.ones(2, np.float32)})
    assert store.get_features("v", [_digest(b"image")]) == {}
    monkeypatch.setattr(store, "_transaction", lambda: (_ for _ in ()).throw(store._full("database or disk is full")))
    with pytest.raises(ResourceExhausted):  # still full, and nothing left to release
        store.delete_job("j")
    monkeypatch.undo()
    store.keep_reserve()  # a sweep, once deletes made room
    assert reserve.stat().st_size == size
    with store.writing_blobs() as put:
        store.create_sample_set("u", "", _samples(put, b"new"))
    store.close()

    # Restarted full: the reserve goes before SQLite opens.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "explaind.store.sqlite"):
        SQLiteStore(tmp_path, reserve_bytes=size).close()
    assert not reserve.exists() and "released its reserve of 1048576 bytes at start-up" in caplog.text
    # Without a reserve to release, a store that cannot open says the file system is full.
    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kwargs: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error")))
    with pytest.raises(StoreOpenError, match=re.escape(f"disk I/O error; its file system is full ({size - 1} bytes free): free space there")):
        SQLiteStore(tmp_path, reserve_bytes=size)
    # A reserve configured far beyond the free space (any size is taken) does not make every failure a full disk's.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 30))
    with pytest.raises(StoreOpenError) as refused:
        SQLiteStore(tmp_path, reserve_bytes=1 << 40)
    assert "disk I/O error" in str(refused.value) and "is full" not in str(refused.value)
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size * 3 // 2))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "explaind.store.sqlite"):
        SQLiteStore(tmp_path, reserve_bytes=size).close()  # room, but not twice the reserve: still not set aside
    assert not reserve.exists()
    assert f"has {size * 3 // 2} bytes free, less than twice its reserve of {size} bytes: no reserve is set aside" in caplog.text  # it was silent
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size * 3))
    monkeypatch.setattr(os, "posix_fallocate", lambda *args: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO))))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "explaind.store.sqlite"):
        SQLiteStore(tmp_path, reserve_bytes=size).close()  # room, but the allocation failed: that is what it says
    assert "cannot set 1048576 bytes aside" in caplog.text and "less than twice" not in caplog.text
    monkeypatch.undo()
    SQLiteStore(tmp_path, reserve_bytes=size).close()  # room again: set aside at start-up
    assert reserve.stat().st_size == size
    SQLiteStore(tmp_path).close()  # no reserve configured: none kept
    assert not reserve.exists()
    monkeypatch.delattr(os, "posix_fallocate")  # as on macOS
    SQLiteStore(tmp_path, reserve_bytes=size + 5).close()
    assert reserve.stat().st_size == size + 5 and reserve.stat().st_blocks * 512 >= size


def test_a_reserve_configured_larger_than_the_free_space_refuses_nothing_and_keeps_the_one_held(tmp_path, monkeypatch, caplog):
    # A reserve grown past the free space released the smaller one held at start-up, logged
    # "the data dir is full", and refused every upload until the volume held twice the new size.
    from explaind.store.sqlite import RESERVE_FILE

    reserve = tmp_path / RESERVE_FILE
    SQLiteStore(tmp_path, reserve_bytes=1 << 20).close()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=16 << 20))
    with caplog.at_level(logging.WARNING, "explaind.store.sqlite"):
        store = SQLiteStore(tmp_path, reserve_bytes=1 << 40)
    try:
        with store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, b"image"))
        assert reserve.stat().st_size == 1 << 20 and "is full" not in caplog.text
        assert (f"has {16 << 20} bytes free, less than twice its reserve of {1 << 40} bytes: the {1 << 20} bytes set aside "
                "under an earlier setting stay until there is room") in caplog.text
    finally:
        store.close()
    monkeypatch.undo()
    SQLiteStore(tmp_path, reserve_bytes=2 << 20).close()  # room for the size configured now: it replaces the one held
    assert reserve.stat().st_size == 2 << 20


def test_the_server_s_sweep_sets_a_released_reserve_aside_again(tmp_path):
    from explaind.service import ExplaindServer
    from explaind.store.sqlite import RESERVE_FILE

    server = ExplaindServer(default_config().replace("server", port=0, data_dir=str(tmp_path), data_dir_reserve_bytes=1 << 20))
    try:
        assert (tmp_path / RESERVE_FILE).stat().st_size == 1 << 20
        server.store._release_reserve("for a test")
        server._sweep_once()
        assert (tmp_path / RESERVE_FILE).stat().st_size == 1 << 20
        with server.store.writing_blobs() as put:
            put(b"new file")
    finally:
        server.store.close()


def test_a_full_data_dir_releases_its_reserve_to_record_a_job_s_failure_and_to_change_the_head(tmp_path, monkeypatch):
    # Full with the reserve held, a job's failure could not be stored (the store said
    # running until a restart, and the operation could not be deleted), nor could a
    # rollback away from a bad head: only deletes released the reserve.
    import dataclasses

    from explaind.store.sqlite import RESERVE_FILE

    store = SQLiteStore(tmp_path, reserve_bytes=1 << 20)
    reserve = tmp_path / RESERVE_FILE
    running = JobRecord(job_id="a", kind="k", state="running", create_time=1.0)
    store.insert_job(running)
    store.insert_job(dataclasses.replace(running, job_id="b"))
    transaction = store._transaction
    monkeypatch.setattr(store, "_transaction", lambda: transaction() if not reserve.exists() else (_ for _ in ()).throw(
        store._full("database or disk is full")))
    try:
        with pytest.raises(ResourceExhausted):  # a response is no bookkeeping: it may be as large as the reserve
            store.update_job(dataclasses.replace(running, state="succeeded", result=b"response"))
        with pytest.raises(ResourceExhausted):  # nor is progress
            store.update_job(dataclasses.replace(running, step=1))
        assert reserve.exists()
        store.update_job(dataclasses.replace(running, state="failed", error_code="RESOURCE_EXHAUSTED"))
        assert not reserve.exists() and store.get_job("a").state == "failed"
        store.keep_reserve()
        store.set_active_head_version("features", "v1")
        assert not reserve.exists() and store.active_head_version("features") == "v1"
        store.keep_reserve()  # a cancelled end is bookkeeping too
        store.update_job(dataclasses.replace(running, job_id="b", state="cancelled", cancel_requested=True))
        assert not reserve.exists() and store.get_job("b").state == "cancelled"
    finally:
        monkeypatch.undo()
        store.close()


@pytest.mark.parametrize(("delete", "done"), [
    pytest.param(lambda store: store.delete_job("j"), lambda store, _: not store.list_jobs(), id="delete_job"),
    pytest.param(lambda store: store.delete_jobs_ended_before(3.0), lambda store, deleted: deleted == 1 and not store.list_jobs(),
                 id="delete_jobs_ended_before"),
    pytest.param(lambda store: store.delete_head_version("f", "v1"), lambda store, _: not store.list_head_versions("f"), id="delete_head_version"),
    pytest.param(lambda store: store.delete_unused_blobs(), lambda store, deleted: deleted == 1 and _blob_files(store) == {_digest(b"head weights")},
                 id="delete_unused_blobs"),
])
def test_every_delete_releases_the_reserve_of_a_full_data_dir(tmp_path, monkeypatch, delete, done):
    # A delete is a write: with the file system full and the reserve held, any delete an
    # operator frees space with (an operation, a head version, the sweep) must go through.
    from explaind.store import HeadVersionRecord
    from explaind.store.sqlite import RESERVE_FILE

    store = SQLiteStore(tmp_path, reserve_bytes=1 << 20)
    reserve = tmp_path / RESERVE_FILE
    store.insert_job(JobRecord(job_id="j", kind="evaluate", state="succeeded", create_time=1.0, end_time=2.0))
    with store.writing_blobs() as put:
        store.insert_head_version(HeadVersionRecord("f", "v1", "h", put(b"head weights"), "", 0.0))
        store.create_sample_set("s", "", _samples(put, b"image"))
    store.delete_sample_set("s")  # its image: a candidate for the sweep
    transaction = store._transaction
    monkeypatch.setattr(store, "_transaction", lambda: transaction() if not reserve.exists() else (_ for _ in ()).throw(
        store._full("database or disk is full")))
    try:
        deleted = delete(store)
        assert not reserve.exists()
    finally:
        monkeypatch.undo()
    assert done(store, deleted)
    store.close()


def test_a_full_data_dir_releases_its_reserve_to_record_a_cancel_request(tmp_path, monkeypatch):
    # CancelOperation was RESOURCE_EXHAUSTED on a full data dir (the request is a write to a
    # running job's record): the job ran on to an end the store refused in turn.
    from explaind.store.sqlite import RESERVE_FILE

    store = SQLiteStore(tmp_path, reserve_bytes=1 << 20)
    reserve = tmp_path / RESERVE_FILE
    jobs, started, gate = JobManager(store, Metrics(), workers=1), threading.Event(), threading.Event()

    def job(ctx):
        started.set()
        gate.wait(10)
        ctx.raise_if_cancelled()
        return _empty()

    job_id = jobs.submit("evaluate", job).record.job_id
    assert started.wait(10)
    transaction = store._transaction
    monkeypatch.setattr(store, "_transaction", lambda: transaction() if not reserve.exists() else (_ for _ in ()).throw(
        store._full("database or disk is full")))
    try:
        assert jobs.cancel(job_id).record.cancel_requested and not reserve.exists()
        gate.set()
        assert jobs.wait(job_id, 10).record.state == "cancelled" and store.get_job(job_id).state == "cancelled"
    finally:
        gate.set()
        jobs.shutdown(5)
        monkeypatch.undo()
        store.close()


def test_a_full_data_dir_releases_its_reserve_to_mark_a_failed_write_s_files_for_the_sweep(tmp_path, monkeypatch):
    # A write that failed for want of space could not mark its files for deletion either:
    # they took space until a restart's sweep, when the sweep was what a full disk needed.
    from explaind.store.sqlite import RESERVE_FILE

    store = SQLiteStore(tmp_path, reserve_bytes=1 << 20)
    reserve = tmp_path / RESERVE_FILE
    transaction = store._transaction
    monkeypatch.setattr(store, "_transaction", lambda: transaction() if not reserve.exists() else (_ for _ in ()).throw(
        store._full("database or disk is full")))
    try:
        with pytest.raises(ResourceExhausted), store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, b"an image whose set the full disk refused"))
        assert not reserve.exists()
        monkeypatch.undo()
        assert store.delete_unused_blobs() == 1 and not _blob_files(store)
    finally:
        monkeypatch.undo()
        store.close()


@pytest.mark.parametrize("full", [True, False])
def test_a_failed_write_whose_files_cannot_be_marked_either_raises_its_own_error_and_leaves_them_to_a_restart(tmp_path, monkeypatch, caplog, full):
    # Full with no reserve to release, or a disk error: the caller hears why its write
    # failed, not that the bookkeeping after it failed too; the files wait for the start-up sweep.
    store = SQLiteStore(tmp_path)
    transaction = store._transaction

    def refused():
        raise store._full("database or disk is full") if full else sqlite3.OperationalError("disk I/O error")

    try:
        with pytest.raises(AlreadyExists, match="taken"), store.writing_blobs() as put:
            put(b"an image whose set was refused")
            monkeypatch.setattr(store, "_transaction", refused)
            raise AlreadyExists("sample set 'taken' already exists")
        monkeypatch.setattr(store, "_transaction", transaction)
        said = f"the server's data dir {tmp_path} is full" if full else "disk I/O error"
        assert f"cannot mark 1 blob(s) of a failed write for deletion: {said}" in caplog.text
        assert store.delete_unused_blobs() == 0 and store.delete_unused_blobs(everything=True) == 1 and not _blob_files(store)
    finally:
        monkeypatch.undo()
        store.close()


def test_a_database_whose_stored_files_are_all_missing_is_refused_at_start_up(tmp_path):
    # A database restored without artifacts/ (or a volume mounted wrong) started and served:
    # the active edited head fell back to the loaded one, and every set lacked its images.
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("s", "", _samples(put, b"image"))
    store.close()
    shutil.rmtree(tmp_path / "artifacts")
    with pytest.raises(StoreOpenError, match=re.escape(f"the database {tmp_path / 'explaind.sqlite3'} references stored files (")
                       + r"[0-9a-f]{64}, \.\.\.\) but .*/artifacts holds none: restore it from the same backup"):
        SQLiteStore(tmp_path)
    SQLiteStore(tmp_path / "new").close()  # a new data dir references nothing: no refusal


def test_a_released_reserve_is_set_aside_again_before_a_new_file_is_refused(tmp_path):
    # Space freed outside the server (a filler file removed, the volume grown) refused
    # every upload and job artifact as "full" until the next sweep, up to a minute later.
    from explaind.store.sqlite import RESERVE_FILE

    store = SQLiteStore(tmp_path, reserve_bytes=1 << 20)
    try:
        store._release_reserve("for a test")
        with store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, b"a new file"))
        assert (tmp_path / RESERVE_FILE).stat().st_size == 1 << 20 and not store._reserve_released
    finally:
        store.close()


def test_a_released_reserve_is_kept_for_deletes_not_for_new_operations_or_samples(tmp_path, monkeypatch):
    # Only new files were refused: operations started on a full data dir (each job's rows
    # and progress in the database's log) and sets of images already stored took what the
    # reserve freed, and the data dir could then neither delete nor restart.
    from explaind.store.sqlite import RESERVE_FILE

    size = 1 << 20
    store = SQLiteStore(tmp_path, reserve_bytes=size)
    try:
        with store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, b"stored"), uploading=True)
        store._release_reserve("for a test")
        monkeypatch.setattr(store, "_free_bytes", lambda: size)  # less than twice the reserve: it stays released
        refused = "is full \\(what is left is kept for deletes\\)"
        for write in (lambda: store.insert_job(JobRecord(job_id="j", kind="k", state="queued", create_time=1.0)),
                      lambda: store.create_sample_set("t", "", [SampleRecord(_digest(b"stored"), 0)]),
                      lambda: store.append_samples("s", [SampleRecord(_digest(b"stored"), 1)])):
            with pytest.raises(ResourceExhausted, match=refused):
                write()
        assert store.append_samples("s", [], finish_upload=True).sample_count == 1  # bookkeeping goes on
        monkeypatch.setattr(store, "_free_bytes", lambda: 3 * size)  # space freed outside the server
        store.insert_job(JobRecord(job_id="j", kind="k", state="queued", create_time=1.0))
        assert (tmp_path / RESERVE_FILE).stat().st_size == size and store.get_job("j").state == "queued"
    finally:
        store.close()


def test_an_upload_no_request_continues_is_deleted_with_its_images_by_the_sweep(tmp_path, monkeypatch):
    # Only a restart deleted it: a server that ran for weeks kept every image a client
    # that died mid-upload had sent.
    from explaind.service import ExplaindServer

    server = ExplaindServer(default_config().replace("server", port=0, data_dir=str(tmp_path), upload_idle_timeout_s=600))
    store = server.store
    try:
        with store.writing_blobs() as put:
            abandoned_image, continued_image, only_abandoned = put(b"abandoned"), put(b"continued"), put(b"only in the abandoned set")
            only_finished = put(b"only in the finished set")
            store.create_sample_set("abandoned", "", [SampleRecord(abandoned_image, 0), SampleRecord(only_abandoned, 0)], uploading=True)
            store.create_sample_set("continued", "", [SampleRecord(continued_image, 0)], uploading=True)
            store.create_sample_set("finished", "", [SampleRecord(abandoned_image, 1), SampleRecord(only_finished, 1)])
        later, later_clock = time.time() + 601, time.monotonic() + 601
        monkeypatch.setattr(time, "time", lambda: later)
        monkeypatch.setattr(time, "monotonic", lambda: later_clock)  # idle by the clock no one sets
        store.append_samples("continued", [SampleRecord(continued_image, 1)])  # a request: still alive
        server._sweep_once()
        assert [(s.sample_set_id, s.uploading) for s in store.list_sample_sets()] == [("continued", True), ("finished", False)]
        store.delete_sample_set("finished")
        monkeypatch.setattr(time, "time", lambda: later + 1)
        server._sweep_once()  # its images lost their last reference at the first sweep
        assert not store._blob_path(abandoned_image).exists() and store._blob_path(continued_image).exists()
        assert not store._blob_path(only_abandoned).exists()  # the set's deletion alone made it a candidate
        assert not store._blob_path(only_finished).exists()
        assert server.metrics.registry.get_sample_value("explaind_stored_files_deleted_total") == 3  # per file, not per sweep
        server.config = server.config.replace("server", upload_idle_timeout_s=0)  # 0: only a restart deletes it
        monkeypatch.setattr(time, "time", lambda: later + 10**6)
        monkeypatch.setattr(time, "monotonic", lambda: later_clock + 10**6)
        server._sweep_once()
        assert [s.sample_set_id for s in store.list_sample_sets()] == ["continued"]
    finally:
        store.close()


def test_a_wall_clock_set_forward_does_not_make_an_upload_that_just_had_a_request_idle(tmp_path, monkeypatch):
    # A container's clock corrected three days forward: every upload under way "had no
    # request for three days", and the next sweep deleted it under its client.
    from explaind.service import ExplaindServer

    server = ExplaindServer(default_config().replace("server", port=0, data_dir=str(tmp_path), upload_idle_timeout_s=600))
    store, created = server.store, time.monotonic() + 3600
    try:
        monkeypatch.setattr(time, "monotonic", lambda: created)  # an hour after the store opened
        with store.writing_blobs() as put:
            store.create_sample_set("uploading", "", _samples(put, b"image"), uploading=True)
        set_forward = time.time() + 3 * 86_400
        monkeypatch.setattr(time, "time", lambda: set_forward)
        server._sweep_once()
        assert [s.sample_set_id for s in store.list_sample_sets()] == ["uploading"]
        monkeypatch.setattr(time, "monotonic", lambda: created + 601)
        server._sweep_once()  # no request for 601 s, by the clock no one sets
        assert store.list_sample_sets() == []
    finally:
        store.close()


def test_the_sweep_deletes_the_operations_that_ended_over_retention_days_ago_and_keeps_the_others(tmp_path, monkeypatch):
    # [jobs].retention_days is in days: an operation that ended a day less an hour ago is
    # still there for its caller to read, one that ended a day and an hour ago is gone.
    from explaind.service import ExplaindServer

    server = ExplaindServer(default_config().replace("server", port=0, data_dir=str(tmp_path)).replace("jobs", retention_days=1.0))
    store, now = server.store, time.time()
    try:
        for job_id, ended_hours_ago in (("0000000000000001", 25), ("0000000000000002", 23)):
            end_time = now - ended_hours_ago * 3600
            store.insert_job(JobRecord(job_id=job_id, kind="evaluate", state="succeeded", create_time=end_time - 1, end_time=end_time))
        monkeypatch.setattr(time, "time", lambda: now)
        server._sweep_once()
        assert [record.job_id for record in store.list_jobs()] == ["0000000000000002"]
    finally:
        store.close()


def test_a_server_stopped_before_it_started_frees_its_data_dir(tmp_path, monkeypatch):
    # An embedding program whose own start-up failed after building the server stops it:
    # the data dir's lock must go, for the next server there. It waited for the calls of a
    # gRPC server it never had: the whole wait for aborted jobs (30 s; here made an hour).
    from explaind.service import ExplaindServer, server as server_module

    monkeypatch.setattr(server_module, "ABORTED_JOBS_WAIT_S", 3600.0)
    server = ExplaindServer(default_config().replace("server", port=0, data_dir=str(tmp_path)))
    stopping = threading.Thread(target=server.stop, args=(0,), daemon=True)
    stopping.start()
    stopping.join(120)
    assert not stopping.is_alive(), "stop() waits for calls although the server never started"
    SQLiteStore(tmp_path).close()


def test_a_sweep_step_that_fails_is_logged_and_the_other_steps_still_run(tmp_path, monkeypatch, caplog):
    # The sweep is what records the ends a full data dir refused and frees its space; one
    # step's store error must not stop the others, nor end the sweeper's thread.
    from explaind.service import ExplaindServer
    from explaind.store.sqlite import RESERVE_FILE

    config = default_config().replace("server", port=0, data_dir=str(tmp_path), upload_idle_timeout_s=1e-9, data_dir_reserve_bytes=1 << 20)
    server = ExplaindServer(config.replace("jobs", retention_days=1.0))
    store, jobs, reserve = server.store, server.engine.jobs, tmp_path / RESERVE_FILE
    refused = sqlite3.OperationalError("database is locked")

    def fail(*args, **kwargs):
        raise refused

    try:
        store.insert_job(JobRecord(job_id="0000000000000001", kind="evaluate", state="succeeded", create_time=1.0, end_time=2.0))
        with store.writing_blobs() as put:
            store.create_sample_set("abandoned", "", _samples(put, b"abandoned"), uploading=True)
        update_job = store.update_job
        monkeypatch.setattr(store, "update_job", lambda record: fail() if record.state in ("succeeded", "failed") else update_job(record))
        job = jobs.submit("evaluate", lambda ctx: _empty())
        jobs.wait(job.record.job_id, 10)
        monkeypatch.setattr(store, "update_job", update_job)
        assert store.get_job(job.record.job_id).state == "running"  # its end refused
        store._release_reserve("for a test")
        with monkeypatch.context() as patched, caplog.at_level(logging.INFO, logger="explaind"):
            patched.setattr(jobs, "record_unrecorded_ends", fail)
            patched.setattr(store, "delete_unfinished_uploads", fail)
            server._sweep_once()
        assert "recording the ends of operations the store had refused failed" in caplog.text
        assert "deleting abandoned uploads failed" in caplog.text
        assert [record.job_id for record in store.list_jobs()] == [job.record.job_id] and reserve.exists()
        assert store.get_job(job.record.job_id).state == "running" and store.list_sample_sets()
        store._release_reserve("for a test")
        caplog.clear()
        with monkeypatch.context() as patched, caplog.at_level(logging.INFO, logger="explaind"):
            patched.setattr(jobs, "delete_ended_before", fail)
            patched.setattr(store, "keep_reserve", fail)
            server._sweep_once()
        assert "deleting operations past their retention failed" in caplog.text and "deleting unused stored files failed" in caplog.text
        assert "recorded the end of 1 operation(s) the store had refused" in caplog.text
        assert store.get_job(job.record.job_id).state != "running" and not store.list_sample_sets() and not reserve.exists()
    finally:
        server.engine.jobs.shutdown(0)
        store.close()


@pytest.mark.parametrize("never", [0.0, math.inf])
def test_an_infinite_or_0_retention_or_upload_timeout_keeps_everything(tmp_path, monkeypatch, caplog, never):
    # TOML's inf reads as "never" (docs/configuration.md), as 0 does; a sweep that turned
    # inf into a time (int(inf), a datetime) would fail every round, logged, and keep
    # nothing else tidy, and one that took 0 as a time would delete every ended operation.
    from explaind.service import ExplaindServer

    config = default_config().replace("server", port=0, data_dir=str(tmp_path), upload_idle_timeout_s=never)
    server = ExplaindServer(config.replace("jobs", retention_days=never))
    store, now = server.store, time.time()
    try:
        store.insert_job(JobRecord(job_id="0000000000000001", kind="evaluate", state="succeeded", create_time=0.0, end_time=1.0))
        with store.writing_blobs() as put:
            store.create_sample_set("abandoned", "", [SampleRecord(put(b"abandoned"), 0)], uploading=True)
        monkeypatch.setattr(time, "time", lambda: now + 10**9)
        with caplog.at_level(logging.INFO, logger="explaind"):
            server._sweep_once()
        assert [record.job_id for record in store.list_jobs()] == ["0000000000000001"]
        assert [s.sample_set_id for s in store.list_sample_sets()] == ["abandoned"]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        store.close()


def test_an_infinite_max_run_seconds_is_no_limit(tmp_path):
    engine = Engine(default_config().replace("server", data_dir=str(tmp_path)).replace("jobs", max_run_seconds=math.inf),
                    SQLiteStore(tmp_path), Metrics())
    try:
        job = engine.jobs.submit("evaluate_sample_set", lambda ctx: (ctx.raise_if_cancelled(), _empty())[1])
        assert engine.jobs.wait(job.record.job_id, 30).record.state == "succeeded"
    finally:
        engine.close()


def test_a_reserve_an_earlier_server_died_setting_aside_is_removed_at_start_up(tmp_path):
    # Its scratch file, as large as the reserve, stayed in the data dir for good.
    from explaind.store.sqlite import RESERVE_FILE

    stale = tmp_path / f"{RESERVE_FILE}.0123456789ab.tmp"
    stale.write_bytes(bytes(1 << 16))
    store = SQLiteStore(tmp_path, reserve_bytes=1 << 20)
    try:
        assert not stale.exists() and (tmp_path / RESERVE_FILE).stat().st_size == 1 << 20
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(RESERVE_FILE)] == [RESERVE_FILE]
    finally:
        store.close()


@pytest.fixture
def small_file_system(tmp_path):
    """A 4 MiB tmpfs at tmp_path / "fs" (skips where mounting is not allowed)."""
    import subprocess

    mount = tmp_path / "fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_data_dir_on_a_full_file_system_restarts_and_frees_space_by_deleting(small_file_system):
    # A real full file system: without the reserve, the store failed to open ("disk I/O
    # error") and every delete was RESOURCE_EXHAUSTED.
    data_dir = small_file_system / "data"
    store = SQLiteStore(data_dir, reserve_bytes=1 << 20)
    with store.writing_blobs() as put:
        store.create_sample_set("s", "", _samples(put, os.urandom(256 << 10)))
    store.close()  # a clean close removes SQLite's -wal and -shm, which the next open must make again
    with open(small_file_system / "filler", "wb") as filler:  # the file system fills up
        try:
            while True:
                filler.write(bytes(64 << 10))
                filler.flush()
        except OSError as error:
            assert error.errno == 28
    store = SQLiteStore(data_dir, reserve_bytes=1 << 20)
    assert not (data_dir / "explaind.reserve").exists()
    image = os.urandom(256 << 10)
    with pytest.raises(ResourceExhausted, match="kept for deletes"), store.writing_blobs() as put:
        store.create_sample_set("t", "", _samples(put, image))
    store.delete_sample_set("s")
    assert store.delete_unused_blobs() == 1 and shutil.disk_usage(small_file_system).free >= 256 << 10
    (small_file_system / "filler").unlink()
    store.keep_reserve()
    assert (data_dir / "explaind.reserve").stat().st_size == 1 << 20
    with store.writing_blobs() as put:
        store.create_sample_set("t", "", _samples(put, image))
    store.close()


def test_each_latency_histogram_s_buckets_span_the_durations_it_times():
    """Seconds from the shortest to the longest of what each histogram times (its comment in
    explaind.metrics): past the last finite bucket an observation is only +Inf, and under the
    first one a quantile cannot tell a fast server from a faster one."""
    metrics = Metrics()
    histograms = {"explaind_rpc_duration_seconds": (metrics.rpc_duration.labels("s", "m", "OK"), 0.0005, 4 * 3600),  # Predict .. a long wait
                  "explaind_job_duration_seconds": (metrics.job_duration.labels("k", "succeeded"), 0.005, 24 * 3600),  # a small ranking .. a day
                  "explaind_job_queue_wait_seconds": (metrics.job_queue_wait.labels("k"), 0.001, 24 * 3600),
                  "explaind_job_stage_duration_seconds": (metrics.job_stage_duration.labels("k", "start"), 0.001, 24 * 3600)}
    for histogram, *_ in histograms.values():
        histogram.observe(1.0)
    for family in metrics.registry.collect():
        if family.name in histograms:
            _, shortest, longest = histograms.pop(family.name)
            bounds = sorted(float(sample.labels["le"]) for sample in family.samples if sample.name.endswith("_bucket"))
            assert bounds[0] <= shortest and longest <= bounds[-2] < math.inf == bounds[-1], (family.name, bounds)
    assert not histograms


def test_the_data_dir_s_free_space_is_read_at_each_scrape(tmp_path):
    metrics = Metrics()
    metrics.watch_data_dir(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    assert metrics.registry.get_sample_value("explaind_data_dir_size_bytes") == usage.total
    assert abs(metrics.registry.get_sample_value("explaind_data_dir_free_bytes") - usage.free) < 64 << 20  # others write meanwhile


def test_a_data_dir_that_cannot_be_read_leaves_its_gauges_nan_and_the_scrape_whole(tmp_path):
    # statvfs failing (a stale NFS handle, a failing disk) failed the whole /metrics answer.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    metrics = Metrics()
    metrics.watch_data_dir(data_dir)
    metrics.predicted_images.inc()
    data_dir.rmdir()
    exposition = generate_latest(metrics.registry).decode()
    assert "explaind_data_dir_free_bytes NaN" in exposition and "explaind_data_dir_size_bytes NaN" in exposition
    assert "explaind_predicted_images_total 1.0" in exposition


def test_a_sweep_keeps_what_lost_its_reference_after_before(tmp_path):
    # A job submitted before a set was deleted may still be reading its images: the
    # server sweeps only what lost its last reference before the oldest unfinished job.
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("s", "", _samples(put, b"image"))
    job_submitted = time.time()
    store.delete_sample_set("s")
    assert store.delete_unused_blobs(before=job_submitted) == 0 and _blob_files(store) == {_digest(b"image")}
    # Checking every file on disk, too: a file nothing ever referenced goes, but not one
    # that waits for its ``before``.
    with store.writing_blobs() as put:
        put(b"stray")
    assert store.delete_unused_blobs(before=job_submitted, everything=True) == 1 and _blob_files(store) == {_digest(b"image")}
    assert store.delete_unused_blobs(before=time.time()) == 1 and _blob_files(store) == set()


def test_the_oldest_unfinished_job_bounds_the_sweep(tmp_path):
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    gate = threading.Event()
    assert jobs.oldest_unfinished_create_time() is None
    running = jobs.submit("block", lambda ctx: (gate.wait(10), _empty())[1])
    queued = jobs.submit("queued", lambda ctx: _empty())
    assert jobs.oldest_unfinished_create_time() == running.record.create_time <= queued.record.create_time
    gate.set()
    jobs.wait(queued.record.job_id, 10)
    assert jobs.oldest_unfinished_create_time() is None
    jobs.shutdown(1)


def test_a_wall_clock_set_back_while_a_job_runs_does_not_sweep_the_images_of_a_set_deleted_since(tmp_path, monkeypatch):
    # NTP setting the clock back an hour: the set deleted after the job was submitted lost
    # its images "an hour before" it, and the sweep removed them while the job read them.
    from explaind.service import ExplaindServer

    server = ExplaindServer(default_config().replace("server", port=0, data_dir=str(tmp_path)))
    store, jobs, gate = server.store, server.engine.jobs, threading.Event()
    try:
        with store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, b"image"))
        running = jobs.submit("evaluate", lambda ctx: (gate.wait(10), _empty())[1])
        set_back = running.record.create_time - 3600
        monkeypatch.setattr(time, "time", lambda: set_back)
        store.delete_sample_set("s")
        server._sweep_once()
        assert _blob_files(store) == {_digest(b"image")}
        gate.set()
        jobs.wait(running.record.job_id, 10)
        monkeypatch.setattr(time, "time", lambda: running.record.create_time + 1)
        server._sweep_once()  # the job ended and the clock caught up: they go
        assert _blob_files(store) == set()
    finally:
        gate.set()
        server.engine.jobs.shutdown(1)
        store.close()


def test_a_wall_clock_set_back_does_not_keep_the_images_of_a_set_deleted_since_until_it_catches_up(tmp_path, monkeypatch):
    # No job running, the sweep compared the store's stamps (which do not go back) with the
    # wall clock: a set deleted within an hour of NTP setting it back an hour kept its images
    # on disk until the clock caught up.
    from explaind.service import ExplaindServer

    server = ExplaindServer(default_config().replace("server", port=0, data_dir=str(tmp_path)))
    store = server.store
    try:
        with store.writing_blobs() as put:
            store.create_sample_set("s", "", _samples(put, b"image"))
        set_back = time.time() - 3600
        monkeypatch.setattr(time, "time", lambda: set_back)
        store.delete_sample_set("s")
        server._sweep_once()
        assert _blob_files(store) == set()
    finally:
        server.engine.jobs.shutdown(1)
        store.close()


def test_a_wall_clock_set_back_keeps_the_operations_newest_first(tmp_path, monkeypatch):
    # NTP setting the clock back an hour: the jobs submitted then listed below the one
    # submitted before it, and a client paging from the top missed them.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    submitted = [jobs.submit("evaluate", lambda ctx: _empty()).record.job_id]
    set_back = time.time() - 3600
    monkeypatch.setattr(time, "time", lambda: set_back)
    submitted += [jobs.submit("evaluate", lambda ctx: _empty()).record.job_id for _ in range(5)]
    for job_id in submitted:
        jobs.wait(job_id, 10)
    assert [snapshot.record.job_id for snapshot in jobs.list()] == submitted[::-1]
    jobs.shutdown(1)


def test_a_wall_clock_set_back_never_puts_an_operation_s_times_out_of_order(tmp_path, monkeypatch):
    # NTP setting the clock back an hour: the job running then ended an hour before it
    # started, and one submitted then could start before its submission.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    started, gate = threading.Event(), threading.Event()
    running = jobs.submit("evaluate", lambda ctx: (started.set(), gate.wait(10), _empty())[2])
    assert started.wait(10)
    set_back = time.time() - 3600
    monkeypatch.setattr(time, "time", lambda: set_back)
    submitted_after = jobs.submit("evaluate", lambda ctx: _empty())
    gate.set()
    for job in (running, submitted_after):
        record = jobs.wait(job.record.job_id, 10).record
        assert record.create_time <= record.start_time <= record.end_time
    jobs.shutdown(1)


def test_a_deleted_job_frees_the_artifacts_only_it_used(tmp_path):
    from explaind.store import ArtifactRef, JobRecord

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        shared, own = put(b"shared"), put(b"own")
        store.create_sample_set("s", "", [_samples(put, b"shared")[0]])
        store.insert_job(JobRecord("done", "k", "succeeded", 0.0, end_time=1.0,
                                   artifacts=(ArtifactRef("a", "x", own, 3), ArtifactRef("b", "x", shared, 6))))
        store.insert_job(JobRecord("running", "k", "running", 0.0))
    with pytest.raises(FailedPrecondition, match="operations/running is running; cancel it"):
        store.delete_job("running")
    with pytest.raises(NotFound, match="no operation 'gone'"):
        store.delete_job("gone")
    store.delete_job("done")
    with pytest.raises(NotFound):
        store.get_job("done")
    assert store.get_job("running").state == "running"
    assert store.delete_unused_blobs() == 1 and _blob_files(store) == {shared}


def test_artifacts_of_jobs_an_earlier_release_stored_keep_their_blobs(tmp_path):
    # The sweep asks an index of job artifacts, which releases before it did not keep:
    # opening the store indexes the jobs they stored, and its triggers those such a
    # release stores when rolled back to.
    from explaind.store import ArtifactRef, JobRecord

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("s", "", _samples(put, b"image"))
        store.insert_job(JobRecord("old", "k", "succeeded", 0.0, end_time=1.0, artifacts=(ArtifactRef("a", "x", _digest(b"image"), 5),)))
    store.close()
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # as the earlier release left it
        db.execute("DELETE FROM job_artifacts")
        db.execute("DROP TRIGGER job_artifacts_on_insert")
        db.execute("DROP TRIGGER job_artifacts_on_update")
    store = SQLiteStore(tmp_path)
    store.delete_sample_set("s")
    assert store.delete_unused_blobs(everything=True) == 0 and store.get_blob(_digest(b"image")) == b"image"
    with store.writing_blobs() as put:
        rolled_back = put(b"rolled back")
    store.close()
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # rolled back to, it stores another
        db.execute("INSERT INTO jobs SELECT 'older', kind, state, create_time, start_time, end_time, step, total, message, "
                   "cancel_requested, error_code, error_message, result, ? FROM jobs WHERE id = 'old'",
                   (json.dumps([dataclasses.asdict(ArtifactRef("a", "x", rolled_back, 11))]),))
    store = SQLiteStore(tmp_path)
    assert store.delete_unused_blobs(everything=True) == 0 and store.get_blob(rolled_back) == b"rolled back"
    # An artifact replaced under the same name keeps its first blob until the job goes.
    with store.writing_blobs() as put:
        job = store.get_job("old")
        store.update_job(dataclasses.replace(job, artifacts=(ArtifactRef("a", "x", put(b"new"), 3),)))
    assert store.delete_unused_blobs(everything=True) == 0
    store.delete_job("old")
    store.delete_job("older")
    assert store.delete_unused_blobs() == 3 and _blob_files(store) == set()


def _user_version(path: Path) -> int:
    with closing(sqlite3.connect(path / "explaind.sqlite3")) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


def test_a_store_records_its_schema_version_and_a_newer_one_is_refused_before_its_records_or_files_change(tmp_path):
    from explaind.store.sqlite import SCHEMA_VERSION

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("partial", "", _samples(put, b"image"), uploading=True)
    store.close()
    assert _user_version(tmp_path) == SCHEMA_VERSION >= 1
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.execute("ALTER TABLE sample_sets RENAME COLUMN display_name TO title")  # what a later release might do
    before = (tmp_path / "explaind.sqlite3").read_bytes()
    # It opened such a store, deleted its unfinished upload and swept the files, then failed
    # every ListSampleSets with INTERNAL.
    with pytest.raises(StoreOpenError, match=rf"^the data dir {re.escape(str(tmp_path))} was written by a newer explaind "
                                             rf"\(store schema {SCHEMA_VERSION + 1}; this release reads {SCHEMA_VERSION} and older\)"):
        SQLiteStore(tmp_path)
    assert (tmp_path / "explaind.sqlite3").read_bytes() == before and any((tmp_path / "artifacts").rglob("*/*/*"))
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # the lock is free again
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("ALTER TABLE sample_sets RENAME COLUMN title TO display_name")
    SQLiteStore(tmp_path).close()


def test_a_store_from_before_versioning_is_migrated_naming_the_uploads_an_old_column_left(tmp_path, caplog):
    # For a day an unfinished upload was a column of sample_sets, which releases since read
    # as finished: such a set may have been appended to and used since, so marking it
    # unfinished would have deleted it at the same start; it is named instead.
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:
        db.executescript("""CREATE TABLE sample_sets (id TEXT PRIMARY KEY, display_name TEXT NOT NULL, create_time REAL NOT NULL,
                                                      update_time REAL NOT NULL, uploading INTEGER NOT NULL DEFAULT 0);
                            INSERT INTO sample_sets VALUES ('partial', '', 1.0, 1.0, 1), ('complete', '', 2.0, 2.0, 0);""")
    with caplog.at_level(logging.WARNING, logger="explaind.store.sqlite"):
        store = SQLiteStore(tmp_path)
    assert {info.sample_set_id: info.uploading for info in store.list_sample_sets()} == {"partial": False, "complete": False}
    assert [record.getMessage() for record in caplog.records] == [
        f"store {tmp_path}: sample set(s) partial were left uploading by a release of 2026-12-01 and are served as complete; "
        "check their sample counts, or delete them"]
    store.create_sample_set("new", "", [])  # the old column takes its default
    store.close()
    from explaind.store.sqlite import SCHEMA_VERSION
    assert _user_version(tmp_path) == SCHEMA_VERSION

def test_a_migration_of_an_existing_store_is_logged_and_a_new_or_current_store_logs_none(tmp_path, caplog):
    # An operator upgrading could not tell from the log that the store was migrated: the
    # line went (8609b274) as if schema 0 were only ever a new file.
    from explaind.store.sqlite import SCHEMA_VERSION

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    with closing(sqlite3.connect(old / "explaind.sqlite3", isolation_level=None)) as db:  # a release's before versions
        db.execute("CREATE TABLE sample_sets (id TEXT PRIMARY KEY, display_name TEXT NOT NULL, create_time REAL NOT NULL, "
                   "update_time REAL NOT NULL)")

    def migration_lines(data_dir: Path) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="explaind.store.sqlite"):
            SQLiteStore(data_dir).close()
        return [record.getMessage() for record in caplog.records if "migrated" in record.getMessage()]

    assert migration_lines(old) == [f"store {old}: migrated from schema 0 (none recorded: a release before 2026-12-03) "
                                    f"to {SCHEMA_VERSION}"]
    assert migration_lines(old) == [] and _user_version(old) == SCHEMA_VERSION
    assert migration_lines(new) == [] and _user_version(new) == SCHEMA_VERSION


def test_a_migration_whose_commit_fails_is_not_logged_as_done(tmp_path, monkeypatch, caplog):
    # The line was logged before the migration's COMMIT, which a full file system fails (WAL writes its pages then): the
    # log said the store was migrated, then that it could not be opened, and the store was still the older one.
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # a release's before versions
        db.execute("CREATE TABLE sample_sets (id TEXT PRIMARY KEY, display_name TEXT NOT NULL, create_time REAL NOT NULL, "
                   "update_time REAL NOT NULL)")

    class CommitFails(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return super().execute(sql, *args)

    with monkeypatch.context() as patch, caplog.at_level(logging.INFO, logger="explaind.store.sqlite"):
        patch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, factory=CommitFails))
        with pytest.raises(StoreOpenError, match="database or disk is full"):
            SQLiteStore(tmp_path)
    assert [record.getMessage() for record in caplog.records if "migrated" in record.getMessage()] == []
    assert _user_version(tmp_path) == 0


def test_a_migration_cut_short_midway_leaves_the_store_as_it_was_and_the_next_start_migrates_it(tmp_path, monkeypatch, caplog):
    # The tables the release adds were committed before the migration's transaction: one that
    # failed after them left an older release's store holding this one's tables, README's
    # "one transaction" notwithstanding.
    from explaind.store.sqlite import SCHEMA_VERSION

    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # a release's before versions
        db.executescript("""CREATE TABLE sample_sets (id TEXT PRIMARY KEY, display_name TEXT NOT NULL, create_time REAL NOT NULL,
                                                      update_time REAL NOT NULL);
                            INSERT INTO sample_sets VALUES ('kept', 'old', 1.0, 1.0);""")

    def schema() -> list[tuple]:
        with closing(sqlite3.connect(tmp_path / "explaind.sqlite3")) as db:
            return db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()

    before = schema()

    class LastStepFails(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("DELETE FROM deleted_job_requests"):  # the migration's last step, all the others done
                raise sqlite3.OperationalError("disk I/O error")
            return super().execute(sql, *args)

    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, factory=LastStepFails))
        with pytest.raises(StoreOpenError, match="disk I/O error"):
            SQLiteStore(tmp_path)
    assert schema() == before and _user_version(tmp_path) == 0
    with caplog.at_level(logging.INFO, logger="explaind.store.sqlite"):
        store = SQLiteStore(tmp_path)
    assert [info.display_name for info in store.list_sample_sets()] == ["old"]
    store.close()
    assert [record.getMessage() for record in caplog.records if "migrated" in record.getMessage()] == [
        f"store {tmp_path}: migrated from schema 0 (none recorded: a release before 2026-12-03) to {SCHEMA_VERSION}"]
    assert _user_version(tmp_path) == SCHEMA_VERSION


def test_the_schema_is_run_statement_by_statement_as_executescript_would_and_a_last_one_without_its_semicolon_is_refused():
    # The migration runs the schema a statement at a time, in its transaction; a statement
    # added last without its ';' would have been dropped unseen (executescript ran it).
    from explaind.store.sqlite import _SCHEMA, _statements

    with closing(sqlite3.connect(":memory:")) as by_script, closing(sqlite3.connect(":memory:")) as by_statement:
        by_script.executescript(_SCHEMA)
        for statement in _statements(_SCHEMA):
            by_statement.execute(statement)
        master = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        assert by_statement.execute(master).fetchall() == by_script.execute(master).fetchall() != []
    assert list(_statements("CREATE TABLE a (x);\n-- a closing comment\n")) == ["CREATE TABLE a (x);\n"]
    with pytest.raises(ValueError, match="CREATE TABLE b"):
        list(_statements("CREATE TABLE a (x);\nCREATE TABLE b (y)\n"))


def test_a_new_store_whose_creation_was_cut_short_is_not_logged_as_migrated_from_an_older_release(tmp_path, monkeypatch, caplog):
    # Its tables were made before its version: a first start that failed in between (a full disk, a kill) left a schema 0
    # store, which the next start logged as migrated from a release before versions.
    from explaind.store.sqlite import SCHEMA_VERSION

    def cut_short(self, version, *, existing):
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(SQLiteStore, "_migrate", cut_short)
        with pytest.raises(StoreOpenError, match="disk I/O error"):
            SQLiteStore(tmp_path)
    with caplog.at_level(logging.INFO, logger="explaind.store.sqlite"):
        SQLiteStore(tmp_path).close()
    assert [record.getMessage() for record in caplog.records if "migrated" in record.getMessage()] == []
    assert _user_version(tmp_path) == SCHEMA_VERSION


def test_an_artifact_whose_file_a_sweep_removes_while_it_is_read_is_not_found(tmp_path, monkeypatch):
    # The file was checked, then opened: a sweep in between made GetArtifact INTERNAL.
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        digest = put(b"artifact")
    store._blob_path(digest).unlink()  # as the sweep does, right after any check
    monkeypatch.setattr(Path, "is_file", lambda path: True)
    with pytest.raises(NotFound, match="no artifact with digest"):
        store.get_blob(digest)


def test_retention_deletes_the_jobs_that_ended_before_the_cut_in_chunks(tmp_path, monkeypatch):
    import explaind.store.sqlite as sqlite_store
    from explaind.store import ArtifactRef, JobRecord

    monkeypatch.setattr(sqlite_store, "_SWEEP_CHUNK", 3)
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        for end in range(1, 8):
            artifact = ArtifactRef("a", "x", put(f"artifact {end}".encode()), 10)
            store.insert_job(JobRecord(f"ended-{end}", "k", ("succeeded", "failed", "cancelled")[end % 3], 0.0, end_time=float(end), artifacts=(artifact,)))
        store.insert_job(JobRecord("queued", "k", "queued", 0.0))
        store.insert_job(JobRecord("running", "k", "running", 0.0, start_time=1.0))
    assert store.delete_jobs_ended_before(6.5) == 6  # two full chunks and none left over
    assert sorted(job.job_id for job in store.list_jobs()) == ["ended-7", "queued", "running"]
    assert store.delete_unused_blobs() == 6 and len(_blob_files(store)) == 1
    assert store.delete_jobs_ended_before(6.5) == 0
    assert store.delete_jobs_ended_before(7.0) == 0  # ended at the cut, not before it


def test_retention_interrupted_returns_after_its_chunk_and_the_next_sweep_deletes_the_rest(tmp_path, monkeypatch):
    # A stopping server's sweep stops between chunks (stop() waits for it): a retention
    # that went on through every chunk held up the shutdown for as long as it had jobs.
    import explaind.store.sqlite as sqlite_store
    from explaind.store import JobRecord

    monkeypatch.setattr(sqlite_store, "_SWEEP_CHUNK", 2)
    store = SQLiteStore(tmp_path)
    for end in range(1, 6):
        store.insert_job(JobRecord(f"ended-{end}", "k", "succeeded", 0.0, end_time=float(end)))
    interrupt = threading.Event()
    interrupt.set()
    assert store.delete_jobs_ended_before(10.0, interrupt=interrupt) == 2  # the chunk under way
    assert sorted(job.job_id for job in store.list_jobs()) == ["ended-3", "ended-4", "ended-5"]
    assert store.delete_jobs_ended_before(10.0) == 3 and not store.list_jobs()
    store.close()


def test_an_edit_that_did_not_succeed_is_kept_while_the_version_it_stored_is(tmp_path):
    # Restore drops such a version by its job's state; with the job gone it stayed for good.
    from explaind.store import EDIT_JOB_ID, HeadVersionRecord, JobRecord

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        weights = put(b"weights")
        store.insert_job(JobRecord("failed-edit", "edit_head", "failed", 0.0, end_time=1.0))
        store.insert_job(JobRecord("good-edit", "edit_head", "succeeded", 0.0, end_time=1.0))
        store.insert_head_version(HeadVersionRecord("f", "v1", "h", weights, "", 0.0, details={EDIT_JOB_ID: "failed-edit"}))
        store.insert_head_version(HeadVersionRecord("f", "v2", "h", weights, "v1", 0.0, details={EDIT_JOB_ID: "good-edit"}))
    with pytest.raises(FailedPrecondition, match="operations/failed-edit stored head version v1 but did not succeed"):
        store.delete_job("failed-edit")
    store.delete_job("good-edit")  # a succeeded edit's operation goes when asked; its version stays
    assert store.get_head_version("f", "v2").details == {EDIT_JOB_ID: "good-edit"}
    assert store.delete_jobs_ended_before(10.0) == 0 and store.get_job("failed-edit").state == "failed"
    store.delete_head_version("f", "v1")  # as restore does
    assert store.delete_jobs_ended_before(10.0) == 1


def test_deleting_the_active_head_version_makes_its_parent_active(tmp_path):
    # Restore deletes an edit's version whose job did not succeed; promoted by the edit
    # (promote=True) before the server died, it was the active one, and start-up then
    # found the active version missing and served the model file's head.
    from explaind.store import HeadVersionRecord

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        weights = put(b"weights")
        store.insert_head_version(HeadVersionRecord("f", "v0", "h0", weights, "", 0.0))
        store.insert_head_version(HeadVersionRecord("f", "v1", "h1", weights, "v0", 1.0))
        store.insert_head_version(HeadVersionRecord("f", "v2", "h2", weights, "v1", 2.0))
    store.set_active_head_version("f", "v1")
    store.delete_head_version("f", "v1")
    assert store.active_head_version("f") == "v0" and store.get_head_version("f", "v2").parent_version_id == "v0"
    store.delete_head_version("f", "v2")  # not the active one: the active stays
    assert store.active_head_version("f") == "v0"
    with pytest.raises(NotFound, match="no head version 'v2' for the served feature extractor") as deleted_twice:
        store.delete_head_version("f", "v2")
    assert deleted_twice.value.field == "version_id" and [v.version_id for v in store.list_head_versions("f")] == ["v0"]


def test_deleted_head_versions_keep_one_row_not_one_per_deletion(tmp_path):
    # A pipeline that edits, compares and deletes the version kept a row per deletion for
    # ever (400 after 400 edits), read whole at every edit; the highest deleted id is all
    # that keeps ids from being given out again.
    from explaind.store import HeadVersionRecord

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        weights = put(b"weights")
        for number in range(12):
            store.insert_head_version(HeadVersionRecord("f", f"v{number}", f"h{number}", weights, "", float(number)))
    store.insert_head_version(HeadVersionRecord("g", "v5", "h", weights, "", 0.0))
    for number in (10, 2, 11, 9, 3):  # v10 before v2 and v9: ordered by number, not as text
        store.delete_head_version("f", f"v{number}")
    store.delete_head_version("g", "v5")
    assert sorted(store._db.execute("SELECT * FROM deleted_head_versions")) == [("f", "v11"), ("g", "v5")]
    # A new version's number is above every id stored or deleted; an id not vN takes none.
    store.insert_head_version(HeadVersionRecord("g", "v20x", "h", weights, "", 1.0))
    assert [store.next_head_version_number(f) for f in ("f", "g", "h")] == [12, 6, 0]


def test_head_version_lookups_go_oldest_first_and_find_the_versions_of_failed_and_cancelled_edits(tmp_path):
    # Start-up serves the oldest version of the loaded head's hash (an edit that came back
    # to it later is another version), and drops the versions of edits that failed or were
    # cancelled; a delete names a version's children in list order.
    from explaind.store import CANCELLED, EDIT_JOB_ID, FAILED, SUCCEEDED, HeadVersionRecord

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        weights = put(b"weights")
        for job_id, state in (("failed-edit", FAILED), ("cancelled-edit", CANCELLED), ("good-edit", SUCCEEDED)):
            store.insert_job(JobRecord(job_id, "edit_head", state, 0.0, end_time=1.0))
        store.insert_head_version(HeadVersionRecord("f", "v0", "loaded", weights, "", 0.0))
        # Inserted out of time order: the order is by create time, not by insertion.
        store.insert_head_version(HeadVersionRecord("f", "v3", "loaded", weights, "v0", 3.0, details={EDIT_JOB_ID: "good-edit"}))
        store.insert_head_version(HeadVersionRecord("f", "v2", "h2", weights, "v0", 2.0, details={EDIT_JOB_ID: "cancelled-edit"}))
        store.insert_head_version(HeadVersionRecord("f", "v1", "h1", weights, "v0", 1.0, details={EDIT_JOB_ID: "failed-edit"}))
    assert store.first_head_version_of_hash("f", "loaded").version_id == "v0"
    assert store.first_head_version_of_hash("f", "h2").version_id == "v2" and store.first_head_version_of_hash("f", "other") is None
    assert store.first_head_version_of_hash("g", "loaded") is None
    assert store.head_version_children("f", "v0") == ["v1", "v2", "v3"]
    assert store.head_versions_of_failed_edits("f") == [("v1", "failed-edit"), ("v2", "cancelled-edit")]
    assert store.head_versions_of_failed_edits("g") == []


def test_the_active_and_file_head_versions_are_replaced_by_each_change_and_kept_across_a_reopen(tmp_path):
    # Each promote or rollback replaces the served version, and each start whose model
    # file changed replaces the file's: a pointer kept at its first value would serve the
    # first promoted head after every restart, and take every later start for a changed file.
    store = SQLiteStore(tmp_path)
    assert store.active_head_version("f") is None and store.file_head_version("f") is None
    for version_id in ("v0", "v1", "v0"):  # promote, then roll back
        store.set_active_head_version("f", version_id)
    store.set_active_head_version("g", "v7")  # per feature extractor
    store.set_file_head_version("f", "v0")
    store.set_file_head_version("f", "v2")
    assert [store.active_head_version(f) for f in ("f", "g")] == ["v0", "v7"] and store.file_head_version("f") == "v2"
    store.set_active_head_version("f", "v2")
    store.close()
    store = SQLiteStore(tmp_path)
    assert [store.active_head_version(f) for f in ("f", "g")] == ["v2", "v7"] and store.file_head_version("f") == "v2"
    assert store.file_head_version("g") is None
    store.close()


def test_a_head_version_id_taken_is_already_exists_naming_version_id_and_leaves_the_stored_version(tmp_path):
    # Not the database's constraint error, which a caller would get as INTERNAL.
    from explaind.errors import AlreadyExists
    from explaind.store import HeadVersionRecord

    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.insert_head_version(HeadVersionRecord("f", "v1", "first", put(b"weights"), "", 1.0))
        with pytest.raises(AlreadyExists, match="head version 'v1' already exists") as taken:
            store.insert_head_version(HeadVersionRecord("f", "v1", "second", put(b"other weights"), "", 2.0))
        store.insert_head_version(HeadVersionRecord("g", "v1", "third", put(b"weights"), "", 3.0))  # another feature extractor's ids are its own
    assert taken.value.field == "version_id"
    assert [store.get_head_version(f, "v1").head_hash for f in ("f", "g")] == ["first", "third"]
    store.close()


def test_listing_skips_a_job_deleted_between_the_page_and_its_live_state(tmp_path, monkeypatch):
    # A running job that ended and was deleted while the page was read failed the whole page.
    from explaind.store import JobRecord

    store = SQLiteStore(tmp_path)
    jobs = JobManager(store, Metrics(), workers=1)
    done = jobs.submit("quick", lambda ctx: _empty()).record.job_id
    jobs.wait(done, 10)
    listed = store.list_jobs
    monkeypatch.setattr(store, "list_jobs", lambda **query: [JobRecord("gone", "k", "running", 1e12)] + listed(**query))
    assert [s.record.job_id for s in jobs.list()] == [done]
    jobs.shutdown(1)


def test_a_page_missing_a_job_deleted_while_it_was_read_is_filled_from_the_next(tmp_path, monkeypatch):
    # The page came back short, which a caller reads as the last: ListOperations gave no
    # next_page_token and the older jobs were out of reach.
    from explaind.store import JobRecord

    store = SQLiteStore(tmp_path)
    jobs = JobManager(store, Metrics(), workers=1)
    done = [jobs.submit("quick", lambda ctx: _empty()).record.job_id for _ in range(3)]
    for job_id in done:
        jobs.wait(job_id, 10)
    newest_first = done[::-1]
    listed = store.list_jobs

    def a_deleted_job_first(*, after=None, limit=100, **query):  # as read just before that running job ended and was deleted
        if after is not None:
            return listed(after=after, limit=limit, **query)
        return [JobRecord("gone", "k", "running", 1e12)] + listed(limit=limit - 1, **query)

    monkeypatch.setattr(store, "list_jobs", a_deleted_job_first)
    first = jobs.list(limit=2)
    assert [s.record.job_id for s in first] == newest_first[:2]
    last = first[-1].record
    assert [s.record.job_id for s in jobs.list(after=(last.create_time, last.job_id), limit=2)] == newest_first[2:]
    jobs.shutdown(1)


def test_a_job_manager_deletes_a_job_only_once_it_ended(tmp_path):
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    gate = threading.Event()
    running = jobs.submit("block", lambda ctx: (gate.wait(10), ctx.raise_if_cancelled(), _empty())[2]).record.job_id
    queued = jobs.submit("queued", lambda ctx: _empty()).record.job_id
    for job_id in (running, queued):
        with pytest.raises(FailedPrecondition, match=f"operations/{job_id} is (queued|running)"):
            jobs.delete(job_id)
    # A refused delete leaves the job as it was, still live: its cancel reaches it (the
    # store's record alone cannot stop it).
    assert jobs.cancel(running).record.cancel_requested
    gate.set()
    assert jobs.wait(running, 10).record.state == "cancelled"
    jobs.wait(queued, 10)
    jobs.delete(running)
    assert [s.record.job_id for s in jobs.list()] == [queued]
    jobs.shutdown(1)


def test_finishing_an_upload_that_is_finished_changes_nothing(tmp_path):
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        created = store.create_sample_set("s", "", _samples(put, b"image"), uploading=True)
        time.sleep(0.01)
        finished = store.append_samples("s", [], finish_upload=True)
        time.sleep(0.01)
        again = store.append_samples("s", [], finish_upload=True)  # used to move update_time
    assert created.uploading and not finished.uploading and finished.update_time > created.update_time
    assert again == finished


def test_a_wall_clock_set_back_keeps_the_sample_sets_in_the_order_they_were_made(tmp_path, monkeypatch):
    # NTP setting the clock back an hour: the set made then listed first (oldest first),
    # and a request to a set made before it gave it an update_time before its create_time.
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("made before", "", _samples(put, b"image"), uploading=True)
        set_back = time.time() - 3600
        monkeypatch.setattr(time, "time", lambda: set_back)
        store.create_sample_set("made after", "", _samples(put, b"image"))
        appended = store.append_samples("made before", _samples(put, b"image"))
    assert [info.sample_set_id for info in store.list_sample_sets()] == ["made before", "made after"]
    assert appended.update_time >= appended.create_time
    store.close()


def test_the_store_keeps_the_last_request_of_the_sets_still_uploading_only(tmp_path):
    # With [server].upload_idle_timeout_s 0 the sweep never asks which uploads are idle:
    # the time of the last request of every set ever uploaded, or appended to, stayed in
    # memory for as long as the server ran.
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        for set_id in ("finished", "deleted", "uploading"):
            store.create_sample_set(set_id, "", _samples(put, b"image"), uploading=True)
        store.create_sample_set("complete", "", _samples(put, b"image"))
        store.append_samples("finished", _samples(put, b"image"), finish_upload=True)
        store.append_samples("complete", _samples(put, b"image"))
        store.delete_sample_set("deleted")
    assert set(store._upload_requests) == {"uploading"}
    store.close()


def test_the_unfinished_uploads_deleted_are_named_in_id_order(tmp_path):
    # The server logs the ids it deleted: in id order, so one start's line reads as another's.
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        for set_id in ("b", "c", "a"):
            store.create_sample_set(set_id, "", _samples(put, b"image"), uploading=set_id != "c")
    assert store.delete_unfinished_uploads() == ["a", "b"]
    assert [info.sample_set_id for info in store.list_sample_sets()] == ["c"]


def test_an_upload_a_store_opened_on_counts_as_idle_since_the_open_not_since_the_clock_began(tmp_path, monkeypatch):
    # A store opened on a data dir holding an unfinished upload (the server deletes those
    # first; a tool opening the store need not) has no request of it: the idle sweep
    # counts from the open, or an upload left by a moment ago would look idle for as long
    # as the host has been up.
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("uploading", "", _samples(put, b"image"), uploading=True)
    store.close()
    store = SQLiteStore(tmp_path)
    clock[0] += 60
    assert store.delete_unfinished_uploads(idle_s=600) == []
    clock[0] += 600
    assert store.delete_unfinished_uploads(idle_s=600) == ["uploading"]
    store.close()


def test_a_request_adding_no_samples_passes_a_sample_limit_its_owner_is_over(tmp_path):
    # [server].max_samples_per_caller refuses a request whose samples would pass it; one
    # adding none (an upload's finishing request) passes nothing, even for a caller over a
    # limit lowered since its sets were made: refused, its upload could never finish.
    store = SQLiteStore(tmp_path, max_samples_per_owner=2)
    with store.writing_blobs() as put:
        store.create_sample_set("big", "", _samples(put, b"a", b"b"), uploading=True, owner="analyst")
    store.max_samples_per_owner = 1
    with pytest.raises(ResourceExhausted, match="caller 'analyst' holds 2 samples"):
        store.append_samples("big", [SampleRecord(_digest(b"a"), 0, {})])
    assert store.append_samples("big", [], finish_upload=True).uploading is False
    assert store.create_sample_set("empty", "", [], owner="analyst").sample_count == 0
    store.close()


def test_a_delete_leaves_the_blobs_a_writer_is_about_to_reference(tmp_path):
    # A blob is written before the record that references it; in between nothing points at it.
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        store.create_sample_set("old", "", _samples(put, b"image"))
    with store.writing_blobs() as put:
        records = _samples(put, b"image")  # the same image, uploaded again
        store.delete_sample_set("old")
        assert store.delete_unused_blobs() == 0 and store.delete_unused_blobs(everything=True) == 0
        store.create_sample_set("new", "", records)
    assert store.delete_unused_blobs() == 0
    assert store.get_blob(records[0].digest) == b"image"
    # Kept, not forgotten: once its writer ends without referencing it, the next sweep takes it.
    store.delete_sample_set("new")
    with store.writing_blobs() as put:
        put(b"image")
        assert store.delete_unused_blobs() == 0
    assert store.delete_unused_blobs() == 1 and _blob_files(store) == set()


def test_the_start_up_sweep_leaves_the_scratch_file_of_a_blob_being_written(tmp_path, monkeypatch):
    # Calls are served while the models load, so an upload may be writing while the
    # start-up sweep removes the scratch files killed writers left: only theirs may go.
    store = SQLiteStore(tmp_path)
    killed_writer = store.blob_dir / "ab" / f"{'ab' * 32}.0123456789ab.1.tmp"
    killed_writer.parent.mkdir()
    killed_writer.write_bytes(b"half")
    fsync, swept = os.fsync, []

    def sweep_mid_write(fd):
        if not swept and stat.S_ISREG(os.fstat(fd).st_mode):  # the blob's data is written, its rename to come (not its directory's sync)
            swept.append(store.delete_unused_blobs(everything=True))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", sweep_mid_write)
    with store.writing_blobs() as put:
        store.create_sample_set("s", "", _samples(put, b"image"))
    assert swept == [0] and not killed_writer.exists() and store.get_blob(_digest(b"image")) == b"image"
    store.close()


def test_a_clip_named_in_a_config_file_must_load_but_the_defaults_may_lack_theirs(tmp_path, classifier_dir):
    # A server started from a file that names a CLIP it cannot load stops, naming the key;
    # started without one (the shapes world) it serves the methods that need none.
    missing = tmp_path / "no-clip"
    config = load_config(write_config(tmp_path / "explaind.toml", classifier_dir, clip={"path": str(missing)}, server={"data_dir": str(tmp_path / "file")}))
    with pytest.raises(ModelLoadError, match=re.escape(f"[clip].path not found: {missing}")):
        Engine(config, SQLiteStore(tmp_path / "file"), Metrics()).load()
    defaults = default_config().replace("classifier", path=str(classifier_dir)).replace("clip", path=str(missing))
    engine = Engine(defaults.replace("server", data_dir=str(tmp_path / "defaults")), SQLiteStore(tmp_path / "defaults"), Metrics())
    engine.load()
    try:
        assert not engine.components["clip"].loaded and engine.components["classifier"].loaded
        # Its dashboard says so too: explaind_component_loaded said 1 whatever loaded.
        loaded = {name: engine.metrics.registry.get_sample_value("explaind_component_loaded", {"component": name}) for name in engine.components}
        assert loaded == {"classifier": 1, "clip": 0, "diffusion": 0}
    finally:
        engine.close()


def test_clip_sources_are_a_directory_a_file_or_a_pretrained_tag_and_errors_name_the_key(tmp_path):
    from explaind.config import ClipSection
    from explaind.engine.models import load_clip
    from explaind.world.clip import CHECKPOINT_NAME, clip_dir, register_world_clip_config

    missing = load_clip(ClipSection(path=str(tmp_path / "nope")), required=False)
    assert not missing.loaded and missing.detail == f"[clip].path not found: {tmp_path / 'nope'}"
    unknown = load_clip(ClipSection(model="RN50", checkpoint="nonsense"), required=False)
    assert not unknown.loaded
    assert "[clip].checkpoint 'nonsense' is neither a file nor a pretrained tag of 'RN50' (tags: openai, " in unknown.detail
    # A directory without weights loaded as a random CLIP, reported as loaded.
    (tmp_path / "no_weights").mkdir()
    shutil.copy(clip_dir() / "open_clip_config.json", tmp_path / "no_weights")
    unweighted = load_clip(ClipSection(path=str(tmp_path / "no_weights")), required=False)
    assert not unweighted.loaded
    assert unweighted.detail.startswith(f"cannot load CLIP ([clip]) from {tmp_path / 'no_weights'}: ModelLoadError: [clip].path "
                                        f"{tmp_path / 'no_weights'} has no weights file (open_clip_model.safetensors, ")
    with pytest.raises(ModelLoadError, match="has no weights file"):
        load_clip(ClipSection(path=str(tmp_path / "no_weights")), required=True)
    # The weights file set as path, where open_clip said "Directory specified via 'local-dir:' schema not found".
    weights_as_path = load_clip(ClipSection(path=str(clip_dir() / CHECKPOINT_NAME)), required=False)
    assert weights_as_path.detail == (f"cannot load CLIP ([clip]) from {clip_dir() / CHECKPOINT_NAME}: ModelLoadError: [clip].path "
                                      f"{clip_dir() / CHECKPOINT_NAME} is not a directory holding open_clip_config.json; a weights "
                                      "file alone is [clip].checkpoint, with its architecture as [clip].model")
    # A weights file of another architecture than model: open_clip's words alone did not say which key to change.
    mismatched = load_clip(ClipSection(model="RN50", checkpoint=str(clip_dir() / CHECKPOINT_NAME)), required=False)
    assert not mismatched.loaded and mismatched.detail.startswith(f"cannot load CLIP ([clip]) from {clip_dir() / CHECKPOINT_NAME}: ")
    assert mismatched.detail.endswith("; is [clip].model 'RN50' the architecture the checkpoint was saved from?")
    name = register_world_clip_config()
    from_file = load_clip(ClipSection(model=name, checkpoint=str(clip_dir() / CHECKPOINT_NAME)), required=True)
    assert from_file.loaded and from_file.model[0].encode_text(from_file.model[2](["a photo of a heart"])).shape[0] == 1


def test_a_pretrained_tag_that_fails_to_load_is_not_blamed_on_its_architecture(monkeypatch):
    # Offline, open_clip says "Pretrained weights (openai) not found for model RN50." as a
    # RuntimeError, as it says a mismatched file's: the tag is RN50's own, so asking whether
    # [clip].model is the checkpoint's architecture would send the user to the wrong key.
    import open_clip

    from explaind.config import ClipSection
    from explaind.engine.models import load_clip

    def offline(model_name, pretrained):
        raise RuntimeError(f"Pretrained weights ({pretrained}) not found for model {model_name}.")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    failed = load_clip(ClipSection(model="RN50", checkpoint="openai"), required=False)
    assert failed.detail == "cannot load CLIP ([clip]) from openai: RuntimeError: Pretrained weights (openai) not found for model RN50."


def test_an_empty_clip_section_is_not_configured_even_where_models_must_load_and_a_model_needs_its_checkpoint():
    from explaind.config import ClipSection
    from explaind.engine.models import load_clip

    # A config file that leaves [clip] empty starts without CLIP: nothing to load is no load error.
    unconfigured = load_clip(ClipSection(), required=True)
    assert (unconfigured.loaded, unconfigured.source, unconfigured.detail) == (False, "", "not configured")
    # Without the check, the empty checkpoint was reported as an unknown pretrained tag ''.
    with pytest.raises(ModelLoadError, match=re.escape("[clip].model needs [clip].checkpoint (a weights file or an open_clip pretrained tag)")):
        load_clip(ClipSection(model="RN50"), required=True)


@pytest.mark.parametrize("suffix", [".bin", ".pth"])
def test_a_clip_directory_whose_weights_torch_saved_loads_them_for_inference(tmp_path, suffix):
    from safetensors.torch import load_file

    from explaind.config import ClipSection
    from explaind.engine.models import load_clip
    from explaind.world.clip import CHECKPOINT_NAME, clip_dir

    # open_clip's local directories hold .bin and .pth weights as well as .safetensors ones;
    # the check for a directory without weights must count them.
    shutil.copy(clip_dir() / "open_clip_config.json", tmp_path)
    weights = load_file(clip_dir() / CHECKPOINT_NAME)
    torch.save(weights, tmp_path / f"open_clip_pytorch_model{suffix}")
    status = load_clip(ClipSection(path=str(tmp_path)), required=True)
    model = status.model[0]
    assert status.loaded and all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
    assert not model.training  # open_clip builds it in training mode


def test_a_diffusion_directory_without_model_index_json_needs_all_of_vae_unet_and_scheduler(tmp_path):
    from explaind.config import DiffusionSection
    from explaind.engine.models import ComponentStatus, load_diffusion

    no_clip = ComponentStatus("clip", False, "", "not configured")
    # The parts it lacks, and those it has: a copy that left out one said only "nor vae/, unet/, scheduler/".
    for parts, said in (((), "nor vae/, unet/, scheduler/"), (("unet",), "nor vae/, scheduler/; it has unet/"),
                        (("unet", "vae"), "nor scheduler/; it has vae/, unet/")):
        directory = tmp_path / ("-".join(parts) or "empty")
        directory.mkdir()
        for part in parts:
            (directory / part).mkdir()
        status = load_diffusion(DiffusionSection(path=str(directory)), no_clip, required=False)
        # Not "takes CLIP's text encoder": without its other parts it is no pipeline at all.
        assert not status.loaded and status.detail == f"[diffusion].path: not found: {directory / 'model_index.json'} ({said})"


def test_a_diffusers_directory_whose_components_need_an_absent_package_names_it_before_diffusers_loads(tmp_path):
    # A Stable Diffusion directory's text encoder and tokenizer are transformers', which explaind does not
    # install: diffusers failed with "AttributeError: 'super' object has no attribute '__getattr__'".
    from explaind.config import DiffusionSection
    from explaind.engine.models import ComponentStatus, load_diffusion

    index = {"_class_name": "StableDiffusionPipeline", "feature_extractor": ["own_code", "Extractor"], "vae": ["diffusers", "AutoencoderKL"],
             "safety_checker": [None, None], "text_encoder": ["no_such_package_x", "CLIPTextModel"],
             "tokenizer": ["no_such_package_x", "CLIPTokenizer"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "feature_extractor").mkdir()
    (tmp_path / "feature_extractor" / "own_code.py").write_text("")  # a component of the directory's own code: diffusers imports it
    no_clip = ComponentStatus("clip", False, "", "not configured")
    said = (f"[diffusion].path: {tmp_path / 'model_index.json'} loads text_encoder (CLIPTextModel), tokenizer (CLIPTokenizer) with the "
            "'no_such_package_x' package, which is not installed: pip install no_such_package_x")
    status = load_diffusion(DiffusionSection(path=str(tmp_path)), no_clip, required=False)
    assert not status.loaded and status.detail == said
    with pytest.raises(ModelLoadError, match=f"^{re.escape(said)}$"):
        load_diffusion(DiffusionSection(path=str(tmp_path)), no_clip, required=True)


def test_a_stable_diffusion_directory_without_transformers_says_to_install_the_stable_diffusion_extra(tmp_path, monkeypatch):
    # The extra, not `pip install transformers`: that would take whichever release is newest, not the range
    # explaind declares for its diffusers.
    import importlib.util

    from explaind.config import DiffusionSection
    from explaind.engine.models import ComponentStatus, load_diffusion

    index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "transformers" else find_spec(name, *args))
    status = load_diffusion(DiffusionSection(path=str(tmp_path)), ComponentStatus("clip", False, "", "not configured"), required=False)
    assert not status.loaded and status.detail == (
        f"[diffusion].path: {tmp_path / 'model_index.json'} loads text_encoder (CLIPTextModel), tokenizer (CLIPTokenizer) with the "
        "'transformers' package, which is not installed: pip install 'explaind[stable-diffusion]'")


def _diffusion_load_importing_kernels(tmp_path: Path, monkeypatch, checkout_kernels: dict[str, str], hugging_faces: str | None,
                                      *, editable: bool = False, wrapped: bool = False):
    """The diffusion component's status where loading the pipeline imports ``kernels`` as
    transformers' hub_kernels does, with Python run in a checkout whose kernels/ holds
    ``checkout_kernels`` (file name -> source), and Hugging Face's kernels 0.19.1 installed
    further on sys.path: its metadata, and its package of source ``hugging_faces`` (None:
    none), beside the metadata or, ``editable`` (maturin's .pth), in a source directory
    after it; ``wrapped``, its import error raised from as diffusers' lazy imports do. Returns
    the status and the checkout's and the installed package's directories."""
    from importlib.machinery import PathFinder

    import diffusers

    from explaind.config import DiffusionSection
    from explaind.engine.models import ComponentStatus, load_diffusion

    checkout = tmp_path / "checkout"  # the directory Python runs in
    (checkout / "kernels").mkdir(parents=True)
    for name, source in checkout_kernels.items():
        (checkout / "kernels" / name).write_text(source)
    site = tmp_path / "site"
    (site / "kernels-0.19.1.dist-info").mkdir(parents=True)
    (site / "kernels-0.19.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    package = (tmp_path / "source" if editable else site) / "kernels"
    if editable:  # its .pth, which site.py puts on sys.path (below), listed in its RECORD; a directory before its own holds no kernels
        (site / "kernels.pth").write_text(f"{tmp_path / 'other-source'}\n{package.parent}\n")
        (site / "kernels-0.19.1.dist-info" / "RECORD").write_text("kernels.pth,,\nkernels-0.19.1.dist-info/METADATA,,\n")
    if hugging_faces is not None:
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(hugging_faces)

    def from_pretrained(path: str) -> object:  # what transformers' hub_kernels does as diffusers imports a model
        try:
            from kernels import CUDAProperties
        except ImportError as error:
            if wrapped:
                raise RuntimeError(f"Failed to import diffusers.models.unets because of the following error: {error}") from error
            raise
        return CUDAProperties

    # DiffusionPipeline imported before the checkout comes first: its import takes the installed kernels, as a
    # server's does, and leaves no half-imported module to the tests after this one.
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", from_pretrained)
    repository = Path(__file__).resolve().parents[1]  # whose kernels/ (python -m pytest at the root) would take a hand-over
    # The stand-in install comes before the real site-packages, and the hand-over's search sees only the stand-ins: a
    # venv with Hugging Face's kernels installed (a fresh one's, transformers 5.25 on) would otherwise give its
    # distribution, or its package, to the hand-over.
    monkeypatch.setattr(sys, "path", [str(checkout), str(site), *([str(package.parent)] if editable else []),
                                      *(entry for entry in sys.path if Path(entry or ".").resolve() != repository)])
    find_spec = PathFinder.find_spec

    def among_the_stand_ins(name, path=None, target=None):
        if name == "kernels" and path is not None:  # the hand-over's own search (an import's passes no path)
            path = [entry for entry in path if Path(entry).resolve().is_relative_to(tmp_path.resolve())]
        return find_spec(name, path, target)

    monkeypatch.setattr(PathFinder, "find_spec", staticmethod(among_the_stand_ins))
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    hidden = sys.modules.pop("kernels", None)  # python -m pytest at the root: transformers imported a `kernels` already
    try:
        status = load_diffusion(DiffusionSection(path=str(tmp_path / "sd")), ComponentStatus("clip", False, "", "not configured"), required=False)
    finally:
        for name in [name for name in sys.modules if name == "kernels" or name.startswith("kernels.")]:
            del sys.modules[name]
        if hidden is not None:
            sys.modules["kernels"] = hidden
    return status, checkout / "kernels", package


@pytest.mark.parametrize("editable", [False, True])
def test_a_diffusers_load_failing_on_a_kernels_directory_hiding_hugging_faces_says_so(tmp_path, monkeypatch, editable):
    # transformers 5.25 and later import Hugging Face's `kernels` package (installed beside them); Python run in a
    # directory whose kernels/ does not hand the name over (an explaind checkout's from before it did: explaind's own
    # is tests/test_kernels.py's) finds that first, and diffusers then failed to import any model with "cannot import
    # name 'CUDAProperties' from 'kernels'", which says nothing of the cause.
    import types

    from explaind.engine.models import _directory_hiding_kernels

    old_checkout = {"__init__.py": '"""Engines that run the classifier\'s feature extractor h_b outside eager PyTorch."""\n'}
    # Installed editable, its package is not beside its metadata but hidden all the same, not missing.
    status, hiding, _ = _diffusion_load_importing_kernels(tmp_path, monkeypatch, old_checkout, "class CUDAProperties:\n    pass\n",
                                                          editable=editable)
    assert not status.loaded and f"Hugging Face's kernels package, which transformers imports, is hidden by {hiding}" in status.detail
    assert "run explaind from another directory" in status.detail and "CUDAProperties" in status.detail
    # A `kernels` module without a spec (find_spec's ValueError) is no hidden package, not a second error.
    monkeypatch.setitem(sys.modules, "kernels", types.ModuleType("kernels"))
    assert _directory_hiding_kernels() is None


def test_only_a_module_s_own_code_under_kernels_counts_as_its_import_failing_not_a_function_it_defined(tmp_path, monkeypatch):
    # A kernels function failing as transformers calls it (no GPU, say) is no broken install to reinstall.
    import importlib

    from explaind.engine.models import _imports_from

    (tmp_path / "broken_at_import.py").write_text("raise ImportError('half installed')\n")
    (tmp_path / "failing_when_called.py").write_text("def call():\n    raise RuntimeError('no GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("broken_at_import", "failing_when_called"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError) as at_import:
        importlib.import_module("broken_at_import")
    with pytest.raises(RuntimeError) as when_called:
        importlib.import_module("failing_when_called").call()
    assert _imports_from(at_import.value.__traceback__, tmp_path) and not _imports_from(when_called.value.__traceback__, tmp_path)


# This checkout's kernels/, which hands the name over, its engines stood in for: a directory of its own.
_HANDING_OVER = {"__init__.py": (Path(__file__).resolve().parents[1] / "kernels" / "__init__.py").read_text(),
                 "_onnx_runtime.py": "".join(f"{name} = None\n" for name in (
                     "FLOAT_TYPES", "ONNX_BACKENDS", "ImageInput", "OnnxClassifierSplit", "UnsplittableGraph", "execution_providers",
                     "export_onnx", "fixed_batch_size", "onnx_runtime_features", "require_providers", "run_in_batches",
                     "split_onnx_classifier"))}


# wrapped: diffusers' lazy import raises its own error from kernels': only the cause's traceback runs kernels' import.
@pytest.mark.parametrize(("editable", "wrapped"), [(False, False), (True, False), (False, True)])
def test_a_diffusers_load_failing_in_hugging_faces_kernels_own_import_says_so_with_its_error_not_that_a_directory_hides_it(tmp_path,
                                                                                                                           monkeypatch,
                                                                                                                           editable,
                                                                                                                           wrapped):
    # Hugging Face's kernels, installed but broken (its import raises), found through the checkout's kernels/ that hands
    # the name over: its error came without a word of kernels, and where it named the checkout's kernels/ it was put
    # down to "an explaind checkout's from before", whose advice (another directory) changes nothing.
    broken = "from huggingface_hub import no_such_name\n\nclass CUDAProperties:\n    pass\n"
    status, _, package = _diffusion_load_importing_kernels(tmp_path, monkeypatch, _HANDING_OVER, broken, editable=editable, wrapped=wrapped)
    error = "RuntimeError: Failed to import diffusers.models.unets because of the following error: " if wrapped else "ImportError: "
    assert not status.loaded and (
        f"Hugging Face's kernels package, which transformers imports, is installed ({package}) but its own import fails with the error "
        "that follows (no kernels directory hides it): repair that install (pip install --force-reinstall 'kernels==0.19.1', its "
        f"dependencies too); {error}cannot import name 'no_such_name' from 'huggingface_hub'") in status.detail, status.detail
    assert "hidden by" not in status.detail


def test_a_diffusers_load_where_hugging_faces_kernels_is_installed_without_its_package_says_so_not_that_a_directory_hides_it(tmp_path,
                                                                                                                             monkeypatch):
    # Its metadata without its package (a half-removed install): the checkout's kernels/ finds nothing to hand the
    # name to and serves its own engines, so "cannot import name 'CUDAProperties' from 'kernels' (checkout/kernels/
    # __init__.py)" was put down to an old checkout's kernels/ hiding it.
    status, hiding, package = _diffusion_load_importing_kernels(tmp_path, monkeypatch, _HANDING_OVER, None)
    assert not status.loaded and (
        f"Hugging Face's kernels distribution 0.19.1, which transformers imports, is installed without its package ({package / '__init__.py'} "
        f"is missing), so Python took {hiding} for it: repair that install") in status.detail, status.detail
    assert "CUDAProperties" in status.detail and "hidden by" not in status.detail


def test_a_diffusers_load_failing_for_another_reason_where_kernels_is_hidden_does_not_blame_kernels(tmp_path, monkeypatch):
    # Only an error naming the hiding kernels/ is put down to it: any other failure, with the
    # repository's kernels/ found first all the same, is reported as it is.
    import diffusers

    from explaind.config import DiffusionSection
    from explaind.engine import models
    from explaind.engine.models import ComponentStatus, load_diffusion

    def from_pretrained(path: str) -> object:
        raise OSError(f"Error no file named diffusion_pytorch_model.safetensors found in directory {path}/unet.")

    monkeypatch.setattr(models, "_directory_hiding_kernels", lambda: tmp_path / "kernels")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", from_pretrained)
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    status = load_diffusion(DiffusionSection(path=str(tmp_path / "sd")), ComponentStatus("clip", False, "", "not configured"), required=False)
    assert not status.loaded and status.detail == (f"cannot load the diffusion pipeline ([diffusion].path) from {tmp_path / 'sd'}: OSError: Error no file "
                                                   f"named diffusion_pytorch_model.safetensors found in directory {tmp_path / 'sd'}/unet.")


def test_a_kernels_namespace_package_is_no_package_hiding_hugging_faces(monkeypatch):
    # A `kernels` found as a namespace package (a directory without __init__.py) has no file
    # to name: no hidden package, not a TypeError out of the diffusion load.
    import importlib.machinery
    import importlib.metadata
    import importlib.util

    from explaind.engine.models import _directory_hiding_kernels

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: object())  # Hugging Face's kernels, installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: importlib.machinery.ModuleSpec(name, None, is_package=True))
    assert _directory_hiding_kernels() is None


@pytest.mark.parametrize("index", [[], "StableDiffusionPipeline", None], ids=["list", "string", "null"])
def test_a_diffusers_index_that_is_no_json_object_is_left_to_diffusers_to_report(tmp_path, index):
    # The check for absent packages reads only an object's components: anything else is
    # diffusers' to refuse, not an AttributeError out of the server's start.
    from explaind.config import DiffusionSection
    from explaind.engine.models import ComponentStatus, load_diffusion

    (tmp_path / "model_index.json").write_text(json.dumps(index))
    status = load_diffusion(DiffusionSection(path=str(tmp_path)), ComponentStatus("clip", False, "", "not configured"), required=False)
    assert not status.loaded and status.detail.startswith(f"cannot load the diffusion pipeline ([diffusion].path) from {tmp_path}: "), status.detail


def test_a_diffusers_component_of_a_dotted_absent_library_is_named_not_a_module_not_found_error(tmp_path):
    # find_spec("a.b") imports "a" and raises ModuleNotFoundError where it is absent: the
    # package checked, and named to install, is the library's first name (a module of it was
    # named, "pip install a.b"), and diffusers.pipelines is looked in only for a plain name.
    from explaind.config import DiffusionSection
    from explaind.engine.models import ComponentStatus, load_diffusion

    index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["no_such_package_x.models", "TextModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    status = load_diffusion(DiffusionSection(path=str(tmp_path)), ComponentStatus("clip", False, "", "not configured"), required=False)
    assert not status.loaded and status.detail == (f"[diffusion].path: {tmp_path / 'model_index.json'} loads text_encoder (TextModel) with the "
                                                   "'no_such_package_x' package, which is not installed: pip install no_such_package_x")


def test_a_diffusers_directory_whose_component_is_a_diffusers_pipeline_module_is_loaded_not_refused_as_a_package(tmp_path):
    # Stable Diffusion 1.x's model_index.json names its safety checker ["stable_diffusion", ...]: diffusers' own
    # diffusers.pipelines.stable_diffusion, no package. It was refused "pip install stable_diffusion", a name on PyPI
    # that is not diffusers', where transformers was installed.
    from explaind.config import DiffusionSection
    from explaind.engine.models import ComponentStatus, load_diffusion

    index = {"_class_name": "StableDiffusionPipeline", "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "scheduler": ["diffusers", "PNDMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    status = load_diffusion(DiffusionSection(path=str(tmp_path)), ComponentStatus("clip", False, "", "not configured"), required=False)
    # Given to diffusers, which fails on the missing component directories, not before.
    assert not status.loaded and status.detail.startswith(f"cannot load the diffusion pipeline ([diffusion].path) from {tmp_path}: "), status.detail


def test_a_diffusers_directory_that_fails_to_load_is_reported_or_refused_as_required(tmp_path):
    # Optional, the server starts without it and says why; required, it does not start.
    from explaind.config import DiffusionSection
    from explaind.engine.models import ComponentStatus, load_diffusion

    (tmp_path / "model_index.json").write_text("<html>a failed download</html>")
    no_clip = ComponentStatus("clip", False, "", "not configured")  # a diffusers pipeline brings its own text encoder
    said = re.escape(f"cannot load the diffusion pipeline ([diffusion].path) from {tmp_path}: OSError: ") + r".*model_index.json. is not a valid JSON file\."
    status = load_diffusion(DiffusionSection(path=str(tmp_path)), no_clip, required=False)
    assert not status.loaded and re.fullmatch(said, status.detail), status.detail
    with pytest.raises(ModelLoadError, match=said):
        load_diffusion(DiffusionSection(path=str(tmp_path)), no_clip, required=True)


_SECRET_TEXT = "cannot open /srv/models/private/head.pt"


def _unexpected_failure(*args):
    raise RuntimeError(_SECRET_TEXT)


def _incident_in(message: str, log_text: str) -> None:
    """The caller's message names the exception type and an incident id, never its text;
    the log holds the text and the traceback under the same id."""
    found = re.fullmatch(r"internal error \(RuntimeError\); the server log has the details under incident ([0-9a-f]{8})", message)
    assert found, message
    assert f"(incident {found.group(1)})" in log_text and _SECRET_TEXT in log_text and "Traceback" in log_text


def test_an_unexpected_job_failure_reaches_the_caller_without_server_internals(tmp_path, caplog):
    # The exception's text (it can hold server paths) used to be the operation's error message.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    try:
        record = jobs.wait(jobs.submit("evaluate", _unexpected_failure).record.job_id, 10).record
        assert (record.state, record.error_code) == ("failed", "INTERNAL")
        _incident_in(record.error_message, caplog.text)
    finally:
        jobs.shutdown(5)


def test_a_generated_stub_s_unimplemented_method_is_answered_without_a_traceback(caplog):
    # Health's List, say: the stub sets UNIMPLEMENTED and raises NotImplementedError, which
    # grpcio would log with its traceback on every call, for anyone.
    import grpc

    def unimplemented(request, context):
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")

    server, port = _intercepted_server(Metrics(), unimplemented)
    server.start()
    try:
        with caplog.at_level(logging.INFO), grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/test.Service/Call")(b"", timeout=10)
    finally:
        server.stop(None)
    assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]


def test_a_method_the_server_does_not_have_is_unimplemented_and_makes_no_metric_series():
    # Anyone may name any method: one series per name sent would grow /metrics without bound.
    import grpc

    metrics = Metrics()
    server, port = _intercepted_server(metrics, lambda request, context: request)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/test.Service/Missing")(b"", timeout=10)
    finally:
        server.stop(None)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not [sample for family in metrics.registry.collect() for sample in family.samples if sample.labels.get("method") == "Missing"]


def test_a_client_streaming_method_which_the_interceptor_cannot_guard_is_refused_not_served_past_its_token_check():
    # No service here has one; a method added with one was handed back as it was: served to
    # a caller without the token, unmetered.
    import grpc

    served = []
    method = grpc.stream_unary_rpc_method_handler(lambda requests, context: served.append(list(requests)) or b"",
                                                  response_serializer=bytes)
    server, port = _intercepted_server(Metrics(), lambda request, context: pytest.fail("a unary method called"), token="s3cret")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Upload", {"Upload": method})])
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
            channel.stream_unary("/test.Upload/Upload")(iter([b"x"]), timeout=10)
    finally:
        server.stop(None)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED and not served


def test_a_request_that_is_not_its_method_s_message_is_invalid_argument_and_never_served():
    # grpcio's own answer to a request its deserializer refuses is INTERNAL, with a traceback in the log.
    import grpc

    from explaind.v1 import common_pb2

    served = []
    server, port = _intercepted_server(Metrics(), lambda request, context: served.append(request) or request, common_pb2.Image.FromString)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/test.Service/Call")(b"\xff\xff\xff", timeout=10)  # a truncated field tag
    finally:
        server.stop(None)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and served == []
    assert refused.value.details().startswith("the request is not a valid test.Service/Call request message (")


def _intercepted_server(metrics: Metrics, behaviour, request_deserializer=None, *, token: str = ""):
    """A gRPC server on a free port with unary methods ``/test.Service/Call`` and ``/test.Service/Other``,
    both ``behaviour``, behind the service interceptor (asking for ``token``, none by default)."""
    import grpc

    from explaind.service.auth import BearerToken
    from explaind.service.interceptors import CallerShares, HeldCalls, ServiceInterceptor

    method = grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=request_deserializer,
                                                 response_serializer=lambda message: message.SerializeToString())
    handler = grpc.method_handlers_generic_handler("test.Service", {"Call": method, "Other": method})
    interceptor = ServiceInterceptor(metrics, BearerToken(token), max_send_bytes=1 << 20, held_calls=HeldCalls(1), unary_shares=CallerShares(1))
    server = grpc.server(ThreadPoolExecutor(2), interceptors=[interceptor], handlers=[handler])
    return server, server.add_insecure_port("127.0.0.1:0")


@pytest.mark.parametrize(("refusal", "level"), [
    (ResourceExhausted("prediction queue is full (8 images waiting, limit 8); retry with backoff"), "WARNING"),
    (InvalidArgument("not an image in a supported format", field="images[3]"), "INFO"),
    (NotFound("no sample set 'x'", field="sample_set_id"), "INFO"),
    (AlreadyExists("sample set 'x' already exists", field="sample_set_id"), "INFO"),
    (FailedPrecondition("the head has no neurons to edit", field="neurons"), "INFO"),
    (PermissionDenied("sample set 'x' is owned by caller 'a'", field="sample_set_id"), "WARNING"),
])
def test_refused_calls_are_logged_with_the_caller_and_message_once_a_minute_per_method(caplog, refusal, level):
    # A client flooding Predict until the queue was full left the log silent: the alert's
    # "the refusals' messages say which limit" pointed at messages only callers saw. And
    # dashboards count a caller's mistakes per method and code alone: who sent what was
    # nowhere on the server.
    import grpc

    def refuse(*args):
        raise refusal

    server, port = _intercepted_server(Metrics(), refuse)
    server.start()
    try:
        with caplog.at_level(logging.INFO, logger="explaind.service.interceptors"), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary("/test.Service/Call")(b"", timeout=10)
                assert caught.value.code().name == refusal.code
            with pytest.raises(grpc.RpcError):  # per method: a flood of one must not hide another's refusals
                channel.unary_unary("/test.Service/Other")(b"", timeout=10)
    finally:
        server.stop(None)
    refusals = [record for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) == 2 and {record.levelname for record in refusals} == {level}
    assert refusals[1].getMessage().startswith("refused test.Service/Other from ")
    assert re.match(rf"refused test\.Service/Call from ipv4:127\.0\.0\.1:\d+: {refusal.code}: {re.escape(str(refusal))}$", refusals[0].getMessage())


def test_an_unexpected_rpc_failure_reaches_the_caller_without_server_internals(caplog):
    import grpc

    server, port = _intercepted_server(Metrics(), _unexpected_failure)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Service/Call")(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        _incident_in(caught.value.details(), caplog.text)
    finally:
        server.stop(None)


def test_a_damaged_database_found_while_serving_is_data_loss_for_calls_and_jobs(tmp_path, caplog):
    # A page of the database corrupted after start-up answered every call INTERNAL, as a bug.
    import grpc

    def damaged(*args):
        raise sqlite3.DatabaseError("database disk image is malformed")

    message = r"^the server's database is damaged \(database disk image is malformed\); the operator must restore it from a backup \(the server log has the details under incident [0-9a-f]{8}\)$"
    metrics = Metrics()
    server, port = _intercepted_server(metrics, damaged)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Service/Call")(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS and re.match(message, caught.value.details())
        assert metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", {"service": "test.Service", "method": "Call", "code": "DATA_LOSS"}) == 1
    finally:
        server.stop(None)
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    try:
        record = jobs.wait(jobs.submit("evaluate", damaged).record.job_id, 10).record
        assert (record.state, record.error_code) == ("failed", "DATA_LOSS") and re.match(message, record.error_message)
    finally:
        jobs.shutdown(5)
    assert caplog.text.count("Traceback") == 2  # the operator's log keeps both


def test_a_device_out_of_memory_is_resource_exhausted_for_calls_and_jobs(tmp_path, caplog):
    # A CUDA out-of-memory error (a large Predict, a VisualizeNeurons job beside it) was INTERNAL, reported as a bug.
    import grpc

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB")

    message = (r"^the model's device ran out of memory; retry later "
               r"\(the server log has the details under incident [0-9a-f]{8}\)$")
    server, port = _intercepted_server(Metrics(), out_of_memory)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Service/Call")(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and re.match(message, caught.value.details())
    finally:
        server.stop(None)
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    try:
        record = jobs.wait(jobs.submit("evaluate", out_of_memory).record.job_id, 10).record
        assert (record.state, record.error_code) == ("failed", "RESOURCE_EXHAUSTED") and re.match(message, record.error_message)
    finally:
        jobs.shutdown(5)
    assert caplog.text.count("Traceback") == 2 and "GPU 0 has a total capacity" in caplog.text  # the operator's log keeps the allocator's report


def test_out_of_memory_advises_less_of_what_the_work_at_hand_takes_not_always_fewer_images(engine, monkeypatch):
    # The host or device out of memory said "retry with fewer images or a smaller batch"
    # to any call or job: no advice to one that sends no images, or none to cut. A job says
    # what its kind may ask less of; a call, its method's; any other, to retry later.
    import grpc

    from explaind.engine import evaluation
    from explaind.errors import report_unexpected
    from explaind.service.auth import BearerToken
    from explaind.service.interceptors import CallerShares, HeldCalls, ServiceInterceptor

    logger = logging.getLogger("explaind.test")
    incident = r" \(the server log has the details under incident [0-9a-f]{8}\)$"
    assert re.match(r"^the server ran out of memory; retry with fewer pairs, or later" + incident,
                    report_unexpected(logger, "a run", MemoryError(), less_work="fewer pairs")[1])
    assert re.match(r"^the server ran out of memory; retry later" + incident, report_unexpected(logger, "a run", MemoryError())[1])

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(evaluation, "evaluate", out_of_memory)
    engine.create_sample_set("evaluated", "", [NewSample.from_array(np.zeros((16, 16, 3), np.uint8), 0)])
    record = engine.jobs.wait(engine.evaluate_sample_set("evaluated").record.job_id, 60).record
    assert (record.state, record.error_code) == ("failed", "RESOURCE_EXHAUSTED")
    assert re.match(r"^the server ran out of memory; retry with a smaller batch_size or sample set, or later" + incident, record.error_message)
    # A call's method says what a retry may cut: Predict's images; another's nothing.
    handler = grpc.unary_unary_rpc_method_handler(out_of_memory, response_serializer=lambda message: message.SerializeToString())
    interceptor = ServiceInterceptor(Metrics(), BearerToken(""), max_send_bytes=1 << 20, held_calls=HeldCalls(1), unary_shares=CallerShares(1))
    server = grpc.server(ThreadPoolExecutor(2), interceptors=[interceptor],
                         handlers=[grpc.method_handlers_generic_handler("test.Service", {"Predict": handler, "GetArtifact": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method, retry in (("Predict", "retry with fewer images per request, or later"), ("GetArtifact", "retry later")):
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary(f"/test.Service/{method}")(b"", timeout=10)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert re.match(f"^the server ran out of memory; {retry}" + incident, caught.value.details()), method
    finally:
        server.stop(None)


def test_calls_whose_caller_is_gone_are_counted_as_timed_out_or_cancelled():
    # Both were counted CANCELLED: a dashboard could not tell server timeouts from callers that gave up.
    import grpc

    metrics = Metrics()
    started = threading.Event()
    server, port = _intercepted_server(metrics, lambda request, context: (started.set(), time.sleep(1.0), _empty())[2])
    server.start()
    def counts() -> dict[str, float | None]:
        return {code: metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", {"service": "test.Service", "method": "Call", "code": code})
                for code in ("DEADLINE_EXCEEDED", "CANCELLED", "OK")}

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)  # the deadline must not be spent connecting
            call = channel.unary_unary("/test.Service/Call")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=0.3)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            started.clear()
            future = call.future(b"", timeout=30)
            assert started.wait(10)  # cancelled while its handler runs
            future.cancel()
        deadline = time.monotonic() + 10
        while None in (counts()["DEADLINE_EXCEEDED"], counts()["CANCELLED"]) and time.monotonic() < deadline:
            time.sleep(0.05)  # both handlers return after their 1 s
    finally:
        server.stop(None)
    assert counts() == {"DEADLINE_EXCEEDED": 1.0, "CANCELLED": 1.0, "OK": None}


def test_a_throttled_line_counts_the_lines_it_left_out_since_the_last_one(caplog, monkeypatch):
    # A client retrying fast gets one line a minute; the next one says how many it stands for.
    from types import SimpleNamespace

    from explaind.service import interceptors

    now = [1000.0]
    monkeypatch.setattr(interceptors, "time", SimpleNamespace(monotonic=lambda: now[0]))
    throttled = interceptors.ThrottledLog(interval_s=60.0)
    with caplog.at_level(logging.INFO, logger="explaind.service.interceptors"):
        for now[0] in (1000.0, 1001.0, 1059.0, 1060.0, 1070.0, 1120.0, 1500.0):
            throttled.log(logging.WARNING, "refused %s", "Predict")
    assert [record.getMessage() for record in caplog.records] == [
        "refused Predict", "refused Predict (2 more since the last such line, not logged)",
        "refused Predict (1 more since the last such line, not logged)", "refused Predict"]


def test_refusals_of_one_method_are_logged_once_a_minute_per_code(caplog):
    # A flood of RESOURCE_EXHAUSTED must not hide that the same method also refuses a caller's mistakes.
    import grpc

    refusals = [ResourceExhausted("prediction queue is full"), ResourceExhausted("prediction queue is full"),
                InvalidArgument("not an image", field="images[0]"), InvalidArgument("not an image", field="images[0]")]

    def refuse(*args):
        raise refusals.pop(0)

    server, port = _intercepted_server(Metrics(), refuse)
    server.start()
    try:
        with caplog.at_level(logging.INFO, logger="explaind.service.interceptors"), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(4):
                with pytest.raises(grpc.RpcError):
                    channel.unary_unary("/test.Service/Call")(b"", timeout=10)
    finally:
        server.stop(None)
    logged = [(record.levelname, record.getMessage().split(": ", 1)[1]) for record in caplog.records if "refused" in record.getMessage()]
    assert logged == [("WARNING", "RESOURCE_EXHAUSTED: prediction queue is full"), ("INFO", "INVALID_ARGUMENT: images[0]: not an image")]


def test_a_call_is_in_flight_while_its_handler_runs_and_not_after_it_ends_either_way():
    # explaind_rpcs_in_flight is the server's load on a dashboard: a call that ended must leave it.
    import grpc

    metrics = Metrics()
    labels = {"service": "test.Service", "method": "Call"}
    seen = []

    def behaviour(request, context):
        seen.append(metrics.registry.get_sample_value("explaind_rpcs_in_flight", labels))
        if len(seen) == 2:
            raise NotFound("no sample set 'x'", field="sample_set_id")
        return _empty()

    server, port = _intercepted_server(metrics, behaviour)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            channel.unary_unary("/test.Service/Call")(b"", timeout=10)
            with pytest.raises(grpc.RpcError):
                channel.unary_unary("/test.Service/Call")(b"", timeout=10)
    finally:
        server.stop(None)
    assert seen == [1.0, 1.0] and metrics.registry.get_sample_value("explaind_rpcs_in_flight", labels) == 0
    assert [metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", {**labels, "code": code}) for code in ("OK", "NOT_FOUND")] == [1, 1]
    assert metrics.registry.get_sample_value("explaind_rpcs_started_total", labels) == 2


def test_listing_by_an_unknown_kind_is_refused_naming_the_kinds(tmp_path):
    # A misspelt kind listed nothing, as if no such job had ever run.
    store = SQLiteStore(tmp_path)
    jobs = JobManager(store, Metrics(), workers=1)
    jobs.register_kinds("edit_head")
    assert jobs.list(kind="edit_head") == []
    with pytest.raises(InvalidArgument, match="unknown kind 'edit-head'; the kinds are edit_head") as raised:
        jobs.list(kind="edit-head")
    assert raised.value.field == "kind"
    jobs.wait(jobs.submit("quick", lambda ctx: _empty()).record.job_id, 10)
    assert [s.record.kind for s in jobs.list(kind="quick")] == ["quick"]
    jobs.shutdown(1)
    store.close()
    # After a restart whose engines no longer run "quick", its stored jobs still list.
    restarted = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    restarted.register_kinds("edit_head")
    assert [s.record.kind for s in restarted.list(kind="quick")] == ["quick"]
    with pytest.raises(InvalidArgument, match="unknown kind 'edit-head'"):
        restarted.list(kind="edit-head")
    restarted.shutdown(1)


def test_features_are_decoded_ahead_in_order_and_a_cancel_stops_the_decoding(engine):
    rng = np.random.default_rng(3)
    samples = [NewSample.from_array(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), i % 6) for i in range(10)]
    engine.create_sample_set("ahead", "", samples)
    version = engine.models.active
    digests = [record.digest for record in engine.store.list_samples("ahead")]
    decoded, alive_while_running, running_alive = {}, [], []  # weak references to each decoded image; live ones counted in each forward
    load, forward = engine.load_sample_image, engine._feature_fns[version.feature_cache_key]

    def loading(digest, version=None, **options):
        image = load(digest, version, **options)
        decoded[digest] = weakref.ref(image)
        return image

    def running(images):
        batch = digests[3 * len(alive_while_running):][:3]
        running_alive.append(sum(decoded[digest]() is not None for digest in batch))
        alive_while_running.append(sum(ref() is not None for ref in decoded.values()))
        return forward(images)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "load_sample_image", loading)
        patch.setitem(engine._feature_fns, version.feature_cache_key, running)
        computed = engine.sample_set_features("ahead", batch_size=3)  # 4 batches, decoded by the pool
    # While the model runs on a batch, only the next one's images exist one by one: the
    # running batch lives in its stacked tensor alone (its single images are let go).
    assert len(alive_while_running) == 4 and max(alive_while_running) <= 3, alive_while_running
    assert running_alive == [0, 0, 0, 0]  # a loop variable kept one alive
    with torch.no_grad():
        expected = version.features(torch.stack([engine.load_sample_image(d) for d in computed.digests]))
    torch.testing.assert_close(computed.features, expected, rtol=0, atol=1e-5)

    class CancelledAfterOneBatch:
        checks = 0

        def raise_if_cancelled(self):
            self.checks += 1
            if self.checks > 1:
                raise JobCancelled("job")

        def report_progress(self, *args, **kwargs):
            pass

    engine.store.retain_features("")
    with pytest.raises(JobCancelled) as cancelled:  # held: its traceback keeps the job's frames alive, as a job's error handling may
        engine.sample_set_features("ahead", batch_size=3, context=CancelledAfterOneBatch())
    assert len(engine.store.get_features(version.feature_cache_key, computed.digests)) == 3  # the first batch only
    assert not [t for t in threading.enumerate() if t.name.startswith("explaind-decode")], cancelled  # the pool is gone


@pytest.mark.parametrize("data_dir_full", [False, True])
def test_features_computed_for_a_call_stop_at_the_next_batch_once_its_caller_leaves(engine, data_dir_full):
    # An inline ranking's features went on, batch after batch, for a caller past its
    # deadline or gone (its decodes' waits for room aside): up to 4096 stored images
    # decoded and forwarded for nobody, holding the RPC's thread and its held call's slot.
    from types import SimpleNamespace

    from explaind.errors import Cancelled

    rng = np.random.default_rng(4)
    samples = [NewSample.from_array(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), i % 6) for i in range(10)]
    engine.create_sample_set("left", "", samples)
    version = engine.models.active
    forward, forwarded = engine._feature_fns[version.feature_cache_key], []
    answers = iter([True])  # the caller waits for the first batch, then leaves

    def running(images):
        forwarded.append(len(images))
        return forward(images)

    call = SimpleNamespace(is_active=lambda: next(answers, False), time_remaining=lambda: None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(engine._feature_fns, version.feature_cache_key, running)
        if data_dir_full:  # put_features skips the batches then: nothing is cached
            patch.setattr(engine.store, "_reserve_released", True)
        with pytest.raises(Cancelled) as refused:
            engine.sample_set_features("left", batch_size=3, call=call)
        assert forwarded == [3]  # the first batch only, of 4
        assert not [t for t in threading.enumerate() if t.name.startswith("explaind-decode")]  # the pool is gone
        # It said "nothing was stored", the first batch's features cached all the same, and
        # the message that replaced it must not say they are cached where they were not.
        assert str(refused.value) == "the caller stopped waiting (its deadline passed, or it left); " + (
            "nothing was stored" if data_dir_full else
            "the features of the 3 images computed before it stopped are cached: a retry on the same model computes only the other 7")
        engine.sample_set_features("left", batch_size=3, call=SimpleNamespace(is_active=lambda: True, time_remaining=lambda: None))
    assert forwarded == ([3, 3, 3, 3, 1] if data_dir_full else [3, 3, 3, 1])  # the retry computed all 10 again, or only the rest


# Request identification (AIP-155) ------------------------------------------------------


def test_a_request_id_submitted_again_gets_the_first_job_racing_or_after_a_restart(tmp_path):
    # A job-starting call was not safe to repeat: after a dropped connection a client could
    # not tell whether its job was created, and sending it again ran (an edit: stored) it twice.
    jobs, gate, runs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1), threading.Event(), []

    def job(ctx):
        runs.append(ctx.job_id)
        gate.wait(10)
        return _empty()

    key = RequestKey("123e4567-e89b-42d3-a456-426614174000", "fingerprint")
    assert jobs.submitted(key) is None
    with ThreadPoolExecutor(8) as pool:  # repeats racing each other
        snapshots = list(pool.map(lambda _: jobs.submit("evaluate", job, request=key), range(8)))
    job_id = snapshots[0].record.job_id
    assert {snapshot.record.job_id for snapshot in snapshots} == {job_id} and jobs.submitted(key).record.job_id == job_id
    other = jobs.submit("evaluate", job, request=RequestKey("00000000-0000-4000-8000-000000000000", "fingerprint"))
    assert other.record.job_id != job_id
    with pytest.raises(InvalidArgument, match=f"request_id {key.request_id} was sent with another request, which created operations/{job_id}") as caught:
        jobs.submitted(RequestKey(key.request_id, "another fingerprint"))
    assert (caught.value.field, caught.value.operation) == ("request_id", f"operations/{job_id}")  # for clients to read
    with pytest.raises(InvalidArgument):
        jobs.submit("evaluate", job, request=RequestKey(key.request_id, "another fingerprint"))
    gate.set()
    assert jobs.wait(job_id, 10).record.state == "succeeded" and jobs.wait(other.record.job_id, 10).done
    jobs.shutdown(1)
    jobs.store.close()
    assert sorted(runs) == sorted([job_id, other.record.job_id])

    # Counted once per answered repeat (7 racing, 1 asked): the operator's sign of dropped answers.
    assert jobs.metrics.registry.get_sample_value("explaind_job_requests_repeated_total", {"kind": "evaluate"}) == 8

    restarted = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    restarted.register_kinds("evaluate")
    assert restarted.metrics.registry.get_sample_value("explaind_job_requests_repeated_total", {"kind": "evaluate"}) == 0
    again = restarted.submit("evaluate", job, request=key)
    assert again.record.job_id == job_id and again.record.state == "succeeded" and len(runs) == 2
    assert restarted.metrics.registry.get_sample_value("explaind_job_requests_repeated_total", {"kind": "evaluate"}) == 1
    restarted.shutdown(5)


def test_a_repeat_says_whether_another_run_asked_for_its_job(tmp_path):
    # A run's interrupted start, sending itself again to find its job, could not tell its own from one another run under
    # the same request_id made or waited on: it cancelled that run's. The repeat's answer says so, across a restart too.
    store = SQLiteStore(tmp_path)
    jobs = JobManager(store, Metrics(), workers=1)
    request_id, mine, theirs = "123e4567-e89b-42d3-a456-426614174000", "00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"
    jobs.submit("evaluate", lambda ctx: _empty(), request=RequestKey(request_id, "fingerprint", run_id=mine))
    assert not jobs.submitted(RequestKey(request_id, "fingerprint", run_id=mine)).requested_by_another_run  # its own
    assert jobs.submitted(RequestKey(request_id, "fingerprint")).requested_by_another_run  # an unnamed run's: can't tell
    assert jobs.submitted(RequestKey(request_id, "fingerprint", run_id=mine)).requested_by_another_run  # which asked for it since
    unnamed = RequestKey("123e4567-e89b-42d3-a456-426614174002", "fingerprint")  # run_id "": a client that names no run
    jobs.submit("evaluate", lambda ctx: _empty(), request=unnamed)
    assert jobs.submitted(unnamed).requested_by_another_run  # two runs naming none may be two: not surely the one that made it
    older = RequestKey("123e4567-e89b-42d3-a456-426614174001", "fingerprint", run_id=theirs)
    older_job = jobs.submit("evaluate", lambda ctx: _empty(), request=older).record.job_id
    store._db.execute("DELETE FROM job_request_runs WHERE job_id = ?", (older_job,))  # as a release before recording runs left it
    jobs.shutdown(5)
    store.close()
    restarted = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    assert restarted.submitted(RequestKey(request_id, "fingerprint", run_id=theirs)).requested_by_another_run
    assert restarted.submitted(older).requested_by_another_run  # made by a run nothing recorded, not surely this one
    restarted.shutdown(5)


_RUN_A, _RUN_B = "00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"


@contextmanager
def _jobs_queued_behind_a_busy_worker(store: SQLiteStore) -> Iterator[tuple[JobManager, Callable[[str], tuple[RequestKey, str]]]]:
    """A JobManager whose one worker is held, so jobs stay queued, and ``made_by(run_id)``:
    a new request_id's job submitted by that run, with its key."""
    jobs, running, release = JobManager(store, Metrics(), workers=1), threading.Event(), threading.Event()
    jobs.submit("evaluate", lambda ctx: (running.set(), release.wait(30), _empty())[2])
    assert running.wait(30)  # its start recorded: nothing else writes while a test's store fails

    def made_by(run_id: str) -> tuple[RequestKey, str]:
        key = RequestKey(str(uuid.uuid4()), "fingerprint", run_id=run_id)
        return key, jobs.submit("evaluate", lambda ctx: _empty(), request=key).record.job_id

    try:
        yield jobs, made_by
    finally:
        release.set()
        jobs.shutdown(5)


def test_a_cancel_unless_another_run_asked_leaves_a_job_another_run_asked_for_under_its_request_id(tmp_path):
    # An interrupted run's cancel (in its start or its wait) ended the job another run under the same request_id made or
    # waited on: what its start's answer said of other runs went stale as soon as another joined. The server decides at
    # the cancel, under the lock its starts record runs under.
    store = SQLiteStore(tmp_path)
    with _jobs_queued_behind_a_busy_worker(store) as (jobs, made_by):
        key, joined = made_by(_RUN_A)
        jobs.submitted(dataclasses.replace(key, run_id=_RUN_B))  # a second command under the same --request-id
        for run in (_RUN_A, _RUN_B):  # neither run's interrupt ends the other's wait
            left, changed = jobs.request_cancel(joined, unless_asked_by_another_run_than=run)
            assert (left.record.state, left.record.cancel_requested, left.requested_by_another_run, changed) == ("queued", False, True, False)
        _, own = made_by(_RUN_A)
        jobs.submitted(RequestKey(key.request_id, key.fingerprint, run_id=_RUN_A))  # its own run again
        cancelled = jobs.request_cancel(own, unless_asked_by_another_run_than=_RUN_A)[0]
        assert (cancelled.record.state, cancelled.requested_by_another_run) == ("cancelled", False)
        unnamed = jobs.submit("evaluate", lambda ctx: _empty()).record.job_id  # no request_id: no other run can ask for it
        assert jobs.request_cancel(unnamed, unless_asked_by_another_run_than=_RUN_A)[0].record.state == "cancelled"
        _, older = made_by(_RUN_A)
        store._db.execute("DELETE FROM job_request_runs WHERE job_id = ?", (older,))  # as a release before recording runs left it
        assert jobs.request_cancel(older, unless_asked_by_another_run_than=_RUN_A)[0].requested_by_another_run
        assert jobs.cancel(joined).record.state == "cancelled"  # a plain cancel (explaind operations cancel): unconditional


@pytest.mark.parametrize("store_fails", ["full", "read-only"])
def test_a_repeat_whose_run_the_store_cannot_record_is_answered_and_the_run_kept_in_memory(tmp_path, monkeypatch, caplog, store_fails):
    # A repeat was a read: recording its run made a full (or read-only) data dir refuse the repeat it answered before.
    store = SQLiteStore(tmp_path, reserve_bytes=0)
    with _jobs_queued_behind_a_busy_worker(store) as (jobs, made_by):
        key, job_id = made_by(_RUN_A)
        with monkeypatch.context() as failing:
            if store_fails == "full":
                @contextmanager
                def full():
                    raise store._full("database or disk is full")
                    yield

                failing.setattr(store, "_transaction", full)
            else:
                store._db.execute("PRAGMA query_only = 1")
            with caplog.at_level(logging.WARNING, logger="explaind.store.sqlite"):
                repeat = jobs.submitted(dataclasses.replace(key, run_id=_RUN_B))
            store._db.execute("PRAGMA query_only = 0")
        assert (repeat.record.job_id, repeat.requested_again, repeat.requested_by_another_run) == (job_id, True, True)
        assert f"could not record that run '{_RUN_B}' asked for operation {job_id} again" in caplog.text
        assert store.request_runs(job_id) == {_RUN_A, _RUN_B}  # kept, though not in the database
        assert jobs.request_cancel(job_id, unless_asked_by_another_run_than=_RUN_A)[0].record.state == "queued"


def test_a_request_id_whose_job_was_deleted_is_refused_until_retention_would_have_dropped_the_job(tmp_path):
    # Forgotten with its operation, a request_id started a new job for its request arriving
    # late: the CLI's interrupted start had found the job by sending it again, cancelled and
    # deleted it, and then the first request came, its job waited on and cancelled by nobody.
    store, runs = SQLiteStore(tmp_path), []
    jobs = JobManager(store, Metrics(), workers=1)
    key = RequestKey("123e4567-e89b-42d3-a456-426614174000", "fingerprint")
    job_id = jobs.submit("evaluate", lambda ctx: runs.append(ctx.job_id) or _empty(), request=key).record.job_id
    ended = jobs.wait(job_id, 10).record.end_time
    jobs.delete(job_id)
    refusal = (f"^request_id: request_id {key.request_id} started operations/{job_id}, which was deleted since \\(DeleteOperation\\), so this request is "
               "not run again: to run it, send it with a new request_id \\(a new UUID\\)$")
    with pytest.raises(FailedPrecondition, match=refusal) as refused:
        jobs.submit("evaluate", lambda ctx: runs.append(ctx.job_id) or _empty(), request=key)
    assert refused.value.field == "request_id"
    # Another request under its id is the id reused, whatever the RPC.
    with pytest.raises(InvalidArgument, match=f"request_id {key.request_id} was sent with another request, which created operations/{job_id}"):
        jobs.submitted(RequestKey(key.request_id, "another fingerprint"))
    with store.writing_blobs() as put, pytest.raises(InvalidArgument, match=f"request_id {key.request_id} was sent with another request"):
        store.create_sample_set("s", "", [SampleRecord(put(b"image"), 0)], request=RequestKey(key.request_id, "a set's"))
    jobs.shutdown(5)
    store.close()

    restarted = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)  # kept as request records are
    try:
        restarted.delete_ended_before(ended)  # retention up to the job's end: the job would still be kept
        with pytest.raises(FailedPrecondition, match=refusal):
            restarted.submitted(key)
        restarted.delete_ended_before(ended + 1)  # the job would have gone now: so does what its id started
        assert restarted.submitted(key) is None
        again = restarted.submit("evaluate", lambda ctx: runs.append(ctx.job_id) or _empty(), request=key).record.job_id
        assert restarted.wait(again, 10).record.state == "succeeded" and runs == [job_id, again]
        # Retention's deletes leave nothing under the id: only a caller's delete says it was deleted.
        restarted.delete_ended_before(math.inf)
        assert restarted.submitted(key) is None
    finally:
        restarted.shutdown(5)
        restarted.store.close()


def test_a_request_id_whose_job_a_shutdown_aborted_runs_again_after_that_job_is_deleted_too(tmp_path):
    # Such a job keeps no id (operations.proto: "the repeat starts a new one"); deleting it
    # (tidying up before submitting again) left the id refused as a deleted job's.
    key = RequestKey("123e4567-e89b-42d3-a456-426614174000", "fingerprint")
    with closing(SQLiteStore(tmp_path)) as store:
        store.insert_job(JobRecord("aborted", "evaluate", "running", 1.0), request=key)
        store.fail_unfinished_jobs("the server restarted")
        store.delete_job("aborted")
        assert store.job_of_request(key) is None
        store.insert_job(JobRecord("again", "evaluate", "queued", 2.0), request=key)
        assert store.job_of_request(key) == "again"


def test_a_deleted_job_s_request_id_sent_by_another_caller_with_another_request_does_not_name_that_job(tmp_path):
    # As for a job still kept: the error names the operation only to the caller that made it
    # (or where none is named), so another caller's id collision leaks no operation name.
    key = RequestKey("123e4567-e89b-42d3-a456-426614174000", "fingerprint", caller="alice")
    with closing(SQLiteStore(tmp_path)) as store:
        store.insert_job(JobRecord("alices", "evaluate", "succeeded", 1.0, end_time=2.0, owner="alice"), request=key)
        store.delete_job("alices")
        with pytest.raises(InvalidArgument, match="was sent with another request by another caller;") as refused:
            store.job_of_request(RequestKey(key.request_id, "bob's request", caller="bob"))
        assert refused.value.operation is None
        with pytest.raises(InvalidArgument, match="was sent with another request, which created operations/alices;"):
            store.job_of_request(RequestKey(key.request_id, "alice's other request", caller="alice"))


def test_the_store_refuses_a_job_inserted_under_a_deleted_job_s_request_id_not_only_its_look_up(tmp_path):
    # Store.insert_job's contract: the refusal holds for an insert not preceded by job_of_request too.
    key = RequestKey("123e4567-e89b-42d3-a456-426614174000", "fingerprint")
    with closing(SQLiteStore(tmp_path)) as store:
        store.insert_job(JobRecord("first", "evaluate", "succeeded", 1.0, end_time=2.0), request=key)
        store.delete_job("first")
        with pytest.raises(FailedPrecondition, match="started operations/first, which was deleted since") as refused:
            store.insert_job(JobRecord("second", "evaluate", "queued", 3.0), request=key)
        assert refused.value.field == "request_id" and store.list_jobs() == []


def test_a_request_whose_operation_the_sweep_deletes_as_it_is_looked_up_is_new_again(tmp_path, monkeypatch):
    # The retention sweep deletes ended operations without the job manager's lock: between
    # finding a request's operation and reading it, it may be gone.
    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    key = RequestKey("123e4567-e89b-42d3-a456-426614174000", "fingerprint")
    store = jobs.store
    try:
        first = jobs.submit("evaluate", lambda ctx: _empty(), request=key)
        assert jobs.wait(first.record.job_id, 10).record.state == "succeeded"
        look_up = store.job_of_request

        def deleted_meanwhile(request):
            job_id = look_up(request)
            store.delete_jobs_ended_before(math.inf)  # the sweep, on its thread
            return job_id

        monkeypatch.setattr(store, "job_of_request", deleted_meanwhile)
        assert jobs.submitted(key) is None
        again = jobs.submit("evaluate", lambda ctx: _empty(), request=key)
        assert again.record.job_id != first.record.job_id and jobs.wait(again.record.job_id, 10).record.state == "succeeded"
    finally:
        jobs.shutdown(1)
        store.close()


def test_a_request_id_whose_job_a_restart_aborted_starts_it_again(tmp_path):
    # The repeat got the ABORTED operation back, whose message says to submit it again: a
    # pipeline with a fixed request_id could not, until retention deleted the operation.
    key, started = RequestKey("123e4567-e89b-42d3-a456-426614174000", "fingerprint"), threading.Event()

    def job(ctx):
        started.set()
        while True:  # until the shutdown cancels it
            ctx.raise_if_cancelled()
            time.sleep(0.01)

    jobs = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    first = jobs.submit("evaluate", job, request=key).record.job_id
    assert started.wait(10)
    jobs.shutdown(0)
    jobs.store.close()
    restarted = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1)
    aborted = restarted.get(first).record
    assert (aborted.state, aborted.error_code) == ("failed", "ABORTED") and restarted.submitted(key) is None
    again = restarted.submit("evaluate", lambda ctx: _empty(), request=key).record.job_id
    assert again != first and restarted.submit("evaluate", job, request=key).record.job_id == again  # now the id's job
    assert restarted.wait(again, 10).record.state == "succeeded" and restarted.get(first).record.state == "failed"
    restarted.shutdown(5)


def test_a_request_id_whose_job_failed_or_was_cancelled_gets_that_job_not_a_new_run(tmp_path):
    # Only the shutdown's ABORTED runs again: a job that failed on its own (its input, say)
    # or that its caller cancelled is the answer a repeat of its request gets, as AIP-155 asks.
    jobs, runs, started = JobManager(SQLiteStore(tmp_path), Metrics(), workers=1), [], threading.Event()

    def refused(ctx):
        runs.append(ctx.job_id)
        raise InvalidArgument("no such class", field="class_index")

    def until_cancelled(ctx):
        runs.append(ctx.job_id)
        started.set()
        while True:
            ctx.raise_if_cancelled()
            time.sleep(0.01)

    failing, cancelled = (RequestKey(f"123e4567-e89b-42d3-a456-42661417400{n}", "fingerprint") for n in (1, 2))
    failed = jobs.submit("evaluate", refused, request=failing).record.job_id
    assert (jobs.wait(failed, 10).record.state, jobs.get(failed).record.error_code) == ("failed", "INVALID_ARGUMENT")
    stopped = jobs.submit("evaluate", until_cancelled, request=cancelled).record.job_id
    assert started.wait(10)
    jobs.cancel(stopped)
    assert jobs.wait(stopped, 10).record.state == "cancelled"
    assert jobs.submit("evaluate", refused, request=failing).record.job_id == failed
    assert jobs.submit("evaluate", until_cancelled, request=cancelled).record.job_id == stopped
    jobs.shutdown(5)
    jobs.store.close()
    assert runs == [failed, stopped]  # neither ran again


def test_a_request_id_is_given_to_a_second_job_only_after_its_first_failed_aborted(tmp_path):
    # The store's check is what keeps two racing submits of one request to one job: a job
    # that failed on its own keeps its request_id; only the shutdown's ABORTED gives it up.
    from explaind.errors import AlreadyExists
    from explaind.store import ABORTED, FAILED

    store = SQLiteStore(tmp_path)
    request = RequestKey("123e4567-e89b-42d3-a456-426614174000", "fingerprint")
    store.insert_job(JobRecord("first", "evaluate", FAILED, 1.0, error_code="INVALID_ARGUMENT"), request=request)
    with pytest.raises(AlreadyExists, match="was given to operations/first") as refused:
        store.insert_job(JobRecord("second", "evaluate", "queued", 2.0), request=request)
    assert (refused.value.field, refused.value.operation) == ("request_id", "operations/first") and store.job_of_request(request) == "first"
    # Another request under the id, inserted without asking job_of_request first: the id
    # reused, not the request's own operation to wait on.
    with pytest.raises(InvalidArgument, match="was sent with another request, which created operations/first") as reused:
        store.insert_job(JobRecord("second", "evaluate", "queued", 2.0), request=RequestKey(request.request_id, "another fingerprint"))
    assert (reused.value.field, reused.value.operation) == ("request_id", "operations/first")
    store.update_job(JobRecord("first", "evaluate", FAILED, 1.0, error_code=ABORTED))
    store.insert_job(JobRecord("second", "evaluate", "queued", 2.0), request=request)
    assert store.job_of_request(request) == "second"
    store.close()


def test_a_request_id_s_refusal_names_what_it_went_to_only_to_the_caller_that_made_it(tmp_path):
    # Two callers deriving the same ids got each other's operation named in the refusal
    # (a google.rpc.ResourceInfo: the SDK's error.operation), and sample set in its message,
    # each read as their own; two processes racing (ALREADY_EXISTS) alike.
    store = SQLiteStore(tmp_path)
    job_request, set_request = "123e4567-e89b-42d3-a456-426614174000", "123e4567-e89b-42d3-a456-426614174001"
    store.insert_job(JobRecord("first", "evaluate", "queued", 1.0, owner="analyst"), request=RequestKey(job_request, "analyst's", "analyst"))
    with store.writing_blobs() as put:
        sample = SampleRecord(put(b"an image"), 0)
    store.create_sample_set("analysts", "", [sample], request=RequestKey(set_request, "analyst's", "analyst"), owner="analyst")
    for caller, named in (("analyst", True), ("pipeline", False)):
        refusals = []
        for refused in (lambda: store.job_of_request(RequestKey(job_request, "another", caller)),
                        lambda: store.create_sample_set("other", "", [sample], request=RequestKey(job_request, "another", caller)),
                        lambda: store.insert_job(JobRecord("second", "evaluate", "queued", 2.0), request=RequestKey(job_request, "racing", caller)),
                        lambda: store.create_sample_set("other", "", [sample], request=RequestKey(set_request, "another", caller)),
                        lambda: store.insert_job(JobRecord("second", "evaluate", "queued", 2.0), request=RequestKey(set_request, "another", caller))):
            with pytest.raises((InvalidArgument, AlreadyExists)) as caught:
                refused()
            refusals.append((caught.value.field, caught.value.operation, "first" in str(caught.value), "analysts" in str(caught.value)))
        job, sample_set = ("request_id", "operations/first" if named else None, named, False), ("request_id", None, False, named)
        assert refusals == [job, job, job, sample_set, sample_set], caller
    with pytest.raises(InvalidArgument, match=f"^request_id: request_id {job_request} was sent with another request by another caller; "
                                              "give each request its own request_id"):
        store.job_of_request(RequestKey(job_request, "another", "pipeline"))
    with pytest.raises(InvalidArgument, match="which created operations/first"):  # without named callers, as before
        store.job_of_request(RequestKey(job_request, "another"))
    store.close()


def test_a_request_id_s_refusal_names_what_it_went_to_to_every_caller_when_no_named_caller_made_it(tmp_path):
    # A job or set made before named callers has no owner and is open to every caller
    # (explaind.ownership); a caller's request under its id (the fingerprint now has the
    # caller's name, so even the same request is another) was told the id was sent "by
    # another caller", which none was, and lost the operation to wait on (error.operation).
    store = SQLiteStore(tmp_path)
    job_request, set_request = "123e4567-e89b-42d3-a456-426614174000", "123e4567-e89b-42d3-a456-426614174001"
    store.insert_job(JobRecord("first", "evaluate", "queued", 1.0), request=RequestKey(job_request, "before callers"))
    with store.writing_blobs() as put:
        sample = SampleRecord(put(b"an image"), 0)
    store.create_sample_set("before", "", [sample], request=RequestKey(set_request, "before callers"))
    with pytest.raises(InvalidArgument, match="which created operations/first") as refused:
        store.job_of_request(RequestKey(job_request, "pipeline's", "pipeline"))
    assert refused.value.operation == "operations/first"
    with pytest.raises(InvalidArgument, match="which was applied to sample set 'before'"):
        store.create_sample_set("other", "", [sample], request=RequestKey(set_request, "pipeline's", "pipeline"))
    store.close()


def test_a_request_id_s_refusal_names_the_set_to_the_caller_that_sent_the_request_not_the_set_s_owner(tmp_path):
    # An admin appending to another caller's set under its own request_id, then sending
    # the id with another request, was told "by another caller": the store kept the set's
    # owner, not each request's sender. The owner, who never sent it, is not told the set.
    store = SQLiteStore(tmp_path)
    created, appended = "123e4567-e89b-42d3-a456-426614174000", "123e4567-e89b-42d3-a456-426614174001"
    with store.writing_blobs() as put:
        sample = SampleRecord(put(b"an image"), 0)
    store.create_sample_set("analysts", "", [sample], request=RequestKey(created, "analyst's", "analyst"), owner="analyst")
    store.append_samples("analysts", [sample], request=RequestKey(appended, "root's", "root"))
    for caller, named in (("root", True), ("analyst", False), ("pipeline", False), (None, True)):  # None: callers no longer named
        with pytest.raises(InvalidArgument) as caught:
            store.append_samples("analysts", [sample, sample], request=RequestKey(appended, "another", caller))
        assert ("which was applied to sample set 'analysts'" in str(caught.value)) is named, caller
    with pytest.raises(InvalidArgument, match="which was applied to sample set 'analysts'"):  # a job's request under the id alike
        store.insert_job(JobRecord("job", "evaluate", "queued", 1.0, owner="root"), request=RequestKey(appended, "a job", "root"))
    with pytest.raises(InvalidArgument, match="which was applied to sample set 'analysts'"):  # the owner's own request still names it
        store.append_samples("analysts", [sample], request=RequestKey(created, "another", "analyst"))
    store.close()


def test_a_request_s_sender_is_kept_in_a_store_the_previous_release_wrote_and_still_opens(tmp_path):
    """sample_set_request_senders is added without a schema version: a store the release
    before left opens, its requests' refusals named as before (to the set's owner), and a
    set deleted as that release deletes one takes its requests' senders along."""
    from explaind.store.sqlite import SCHEMA_VERSION

    before, after = "123e4567-e89b-42d3-a456-426614174000", "123e4567-e89b-42d3-a456-426614174001"
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        sample = SampleRecord(put(b"an image"), 0)
    store.create_sample_set("analysts", "", [sample], request=RequestKey(before, "analyst's", "analyst"), owner="analyst")
    store.close()
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # as the release before left it
        db.execute("DROP TABLE sample_set_request_senders")
    store = SQLiteStore(tmp_path)
    with pytest.raises(InvalidArgument, match="which was applied to sample set 'analysts'"):  # no sender kept: the owner's
        store.append_samples("analysts", [sample], request=RequestKey(before, "another", "analyst"))
    store.append_samples("analysts", [sample], request=RequestKey(after, "root's", "root"))
    with pytest.raises(InvalidArgument, match="which was applied to sample set 'analysts'"):
        store.append_samples("analysts", [sample, sample], request=RequestKey(after, "another", "root"))
    store.close()
    assert _user_version(tmp_path) == SCHEMA_VERSION == 1  # what the release before reads
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # the release before deletes the set
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM sample_sets WHERE id = 'analysts'")
        assert db.execute("SELECT COUNT(*) FROM sample_set_request_senders").fetchone() == (0,)


def test_request_ids_are_kept_in_a_store_the_previous_release_wrote_and_still_opens(tmp_path):
    """job_requests is added without a schema version (a rollback must still open the data
    dir): the table appears in a store the release before left, and a job deleted as that
    release deletes one (it never reads the table) takes its request id along."""
    from explaind.errors import AlreadyExists
    from explaind.store.sqlite import SCHEMA_VERSION

    request_id = "123e4567-e89b-42d3-a456-426614174000"
    store = SQLiteStore(tmp_path)
    store.insert_job(JobRecord("old", "evaluate", "succeeded", 1.0, end_time=2.0))
    store.close()
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # as the release before left it
        db.execute("DROP TABLE job_requests")
    store = SQLiteStore(tmp_path)
    assert store.get_job("old").state == "succeeded" and store.job_of_request(RequestKey(request_id, "f")) is None
    store.insert_job(JobRecord("new", "evaluate", "queued", 3.0), request=RequestKey(request_id, "f"))
    with pytest.raises(AlreadyExists, match=f"request_id {request_id} was given to operations/new") as caught:
        store.insert_job(JobRecord("twice", "evaluate", "queued", 4.0), request=RequestKey(request_id, "f"))
    assert caught.value.field == "request_id"
    with pytest.raises(NotFound):  # the refused insert left no job behind
        store.get_job("twice")
    store.close()
    assert _user_version(tmp_path) == SCHEMA_VERSION == 1  # what the release before reads
    store = SQLiteStore(tmp_path)
    assert store.job_of_request(RequestKey(request_id, "f")) == "new"
    store.close()
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # the release before deletes the job
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM jobs WHERE id = 'new'")
    with closing(SQLiteStore(tmp_path)) as store:
        assert store.job_of_request(RequestKey(request_id, "f")) is None


def test_a_deleted_job_s_request_id_is_kept_in_a_store_the_previous_release_wrote_and_still_opens(tmp_path):
    """deleted_job_requests is added without a schema version: a store the release before
    left opens with the table, and a job deleted then (no row of it kept) leaves its id
    free, as that release did; the rows are retention's to delete, by their own time."""
    from explaind.store.sqlite import SCHEMA_VERSION

    old, new = RequestKey("123e4567-e89b-42d3-a456-426614174000", "f"), RequestKey("123e4567-e89b-42d3-a456-426614174001", "f")
    store = SQLiteStore(tmp_path)
    store.insert_job(JobRecord("old", "evaluate", "succeeded", 1.0, end_time=2.0), request=old)
    store.close()
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # as the release before left it
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DROP TABLE deleted_job_requests")
        db.execute("DELETE FROM jobs WHERE id = 'old'")  # as it deletes a job
    store = SQLiteStore(tmp_path)
    assert store.job_of_request(old) is None
    store.insert_job(JobRecord("new", "evaluate", "succeeded", 3.0, end_time=4.0), request=new)
    store.delete_job("new")
    with pytest.raises(FailedPrecondition, match="started operations/new, which was deleted since"):
        store.job_of_request(new)
    store.close()
    assert _user_version(tmp_path) == SCHEMA_VERSION == 1  # what the release before reads
    with closing(SQLiteStore(tmp_path)) as store:
        store.delete_jobs_ended_before(4.5)
        assert store.job_of_request(new) is None


def test_a_job_the_previous_release_started_under_a_deleted_job_s_request_id_supersedes_its_refusal(tmp_path):
    """Rolled back, the release before (it never reads deleted_job_requests) starts a job
    under a request_id this one refused for a deleted job; upgraded again, that job is the
    id's: its repeat once a shutdown ABORTED it runs again, as for any aborted job, and
    deleting it ABORTED leaves the id free, not the earlier job's refusal."""
    repeated, deleted = (RequestKey(f"123e4567-e89b-42d3-a456-42661417400{n}", "f") for n in (0, 1))
    store = SQLiteStore(tmp_path)
    for request in (repeated, deleted):
        store.insert_job(JobRecord(f"first-{request.request_id}", "evaluate", "succeeded", 1.0, end_time=2.0), request=request)
        store.delete_job(f"first-{request.request_id}")
    store.close()
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # rolled back: the release before
        refusals = db.execute("SELECT * FROM deleted_job_requests").fetchall()
        db.execute("DELETE FROM deleted_job_requests")  # unread there: its inserts are this one's without the rows
    with closing(SQLiteStore(tmp_path)) as store:
        for request in (repeated, deleted):
            store.insert_job(JobRecord(f"old-{request.request_id}", "evaluate", "queued", 3.0), request=request)
        store.fail_unfinished_jobs("stopped")  # the upgrade's shutdown: ABORTED
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:
        db.executemany("INSERT INTO deleted_job_requests VALUES (?, ?, ?, ?, ?)", refusals)
    with closing(SQLiteStore(tmp_path)) as store:  # upgraded again
        assert store.job_of_request(repeated) == f"old-{repeated.request_id}"
        store.insert_job(JobRecord("again", "evaluate", "queued", 4.0), request=repeated)  # the aborted job's repeat runs again
        assert store.job_of_request(repeated) == "again"
        store.delete_job(f"old-{deleted.request_id}")
        assert store.job_of_request(deleted) is None


def test_a_failed_jobs_error_details_live_in_a_table_the_previous_release_neither_needs_nor_loses(tmp_path):
    """A failed job's precondition violations (JobRecord.error_details) are a table of their
    own, schema version kept: a store the release before left opens with its jobs read as
    they were; that release opens one with details, reads each job's field from its
    result alone, leaves the details for the next upgrade, and deletes them with their job."""
    from explaind.store.sqlite import SCHEMA_VERSION

    store = SQLiteStore(tmp_path)
    store.insert_job(JobRecord("before", "evaluate", "failed", 1.0, end_time=2.0, error_code="FAILED_PRECONDITION", result=b"field"))
    store.close()
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # as the release before left it
        db.execute("DROP TABLE job_error_details")
    store = SQLiteStore(tmp_path)
    assert (store.get_job("before").result, store.get_job("before").error_details) == (b"field", b"")
    store.insert_job(JobRecord("failed", "evaluate", "running", 3.0))
    store.update_job(JobRecord("failed", "evaluate", "failed", 3.0, end_time=4.0, error_code="FAILED_PRECONDITION", result=b"field",
                               error_details=b"violations"))
    assert store.get_job("failed").error_details == b"violations"
    assert [job.error_details for job in store.list_jobs(responses=False)] == [b"violations", b""]
    store.close()
    assert _user_version(tmp_path) == SCHEMA_VERSION == 1  # what the release before reads
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # the release before reads and deletes
        assert db.execute("SELECT result FROM jobs WHERE id = 'failed'").fetchone() == (b"field",)
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM jobs WHERE id = 'before'")
    with closing(SQLiteStore(tmp_path)) as store:  # upgraded again: nothing lost
        assert store.get_job("failed").error_details == b"violations"
        # A failure whose end the store refused is stored again without them (JobManager._finish).
        store.update_job(JobRecord("failed", "evaluate", "failed", 3.0, end_time=4.0, error_code="INTERNAL"))
        assert store.get_job("failed").error_details == b""
        store.delete_job("failed")
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3")) as db:
        assert db.execute("SELECT COUNT(*) FROM job_error_details").fetchone() == (0,)


def test_upload_requests_answered_as_repeats_are_counted_by_method_from_zero(engine):
    # Operations' repeats were counted (explaind_job_requests_repeated_total), an upload's
    # not: resends after dropped answers, and uploads run again, went unseen.
    def repeats(method: str) -> float | None:
        return engine.metrics.registry.get_sample_value("explaind_sample_set_requests_repeated_total", {"method": method})

    assert (repeats("CreateSampleSet"), repeats("AppendSamples")) == (0, 0)  # exported before the first
    pixels = np.zeros((8, 8, 3), np.uint8)
    created, appended = RequestKey("123e4567-e89b-42d3-a456-426614174000", "c"), RequestKey("123e4567-e89b-42d3-a456-426614174001", "a")
    assert engine.repeated_sample_set_request(created, "CreateSampleSet") is None  # new: not counted
    info = engine.create_sample_set("counted", "", [NewSample.from_array(pixels, 0)], uploading=True, request=created)
    assert engine.append_samples("counted", [NewSample.from_array(pixels, 1)], finish_upload=True, request=appended).sample_count == 2
    assert (repeats("CreateSampleSet"), repeats("AppendSamples")) == (0, 0)
    # Found before the images are decoded (the service asks first)...
    assert engine.repeated_sample_set_request(created, "CreateSampleSet").uid == info.uid
    assert engine.repeated_sample_set_request(appended, "AppendSamples").sample_count == 2
    # ...or, racing the first (both asked before either was applied), in the store's transaction.
    assert engine.create_sample_set("counted", "", [NewSample.from_array(pixels, 0)], uploading=True, request=created).uid == info.uid
    for _ in range(2):
        engine.append_samples("counted", [NewSample.from_array(pixels, 1)], finish_upload=True, request=appended)
    assert (repeats("CreateSampleSet"), repeats("AppendSamples")) == (2, 3)
    with pytest.raises(InvalidArgument):  # another request under the id: refused, not a repeat
        engine.append_samples("counted", [NewSample.from_array(pixels, 2)], request=RequestKey(appended.request_id, "other"))
    assert (repeats("CreateSampleSet"), repeats("AppendSamples")) == (2, 3) and engine.store.get_sample_set("counted").sample_count == 2


def test_an_upload_request_sent_again_is_answered_with_the_set_it_was_applied_to_not_one_made_under_its_id_since(
        tmp_path, classifier_dir, monkeypatch):
    # The repeat was looked up, then its set read by id in a second hold of the store: a
    # set deleted and made again in between answered the repeat, as if the request had
    # created it or appended to it (an append pinned to the first set's uid included).
    import grpc

    from explaind.client._errors import from_rpc_error
    from explaind.service import ExplaindServer
    from explaind.v1 import common_pb2, sample_sets_pb2, sample_sets_pb2_grpc

    server = ExplaindServer(default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path)))
    port = server.start()
    server.load_models()
    store, looked_up = server.store, server.store.sample_set_of_request
    with store.writing_blobs() as put:
        other = SampleRecord(put(encode_png(np.zeros((8, 8, 3), np.uint8))), 5)
    racing: list[str] = []  # the set another client deletes and makes again right after the next lookup

    def made_again_after_the_lookup(request: RequestKey):
        found = looked_up(request)
        for set_id in racing:
            store.delete_sample_set(set_id)
            store.create_sample_set(set_id, "another client's", [other])
        racing.clear()
        return found

    def request(message, number: int, **fields):
        return message(samples=[sample_sets_pb2.Sample(image=common_pb2.Image(encoded=encode_png(np.full((8, 8, 3), 200, np.uint8))), label=1)],
                       request_id=str(uuid.UUID(int=number)), **fields)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = sample_sets_pb2_grpc.SampleSetServiceStub(channel)
            create = request(sample_sets_pb2.CreateSampleSetRequest, 1, sample_set_id="created")
            created = stub.CreateSampleSet(create, timeout=30).sample_set
            uid = stub.CreateSampleSet(request(sample_sets_pb2.CreateSampleSetRequest, 2, sample_set_id="appended", upload_continues=True),
                                       timeout=30).sample_set.uid
            append = request(sample_sets_pb2.AppendSamplesRequest, 3, sample_set_id="appended", finish_upload=True, sample_set_uid=uid)
            appended = stub.AppendSamples(append, timeout=30).sample_set
            with monkeypatch.context() as patch:
                patch.setattr(store, "sample_set_of_request", made_again_after_the_lookup)
                racing.append("created")
                assert stub.CreateSampleSet(create, timeout=30).sample_set == created
                racing.append("appended")
                assert stub.AppendSamples(append, timeout=30).sample_set == appended
            # Their ids went with their sets: sent again now, neither is taken as applied to
            # the other client's set, nor applied to it.
            for call, message, code, field in ((stub.CreateSampleSet, create, grpc.StatusCode.ALREADY_EXISTS, "sample_set_id"),
                                               (stub.AppendSamples, append, grpc.StatusCode.FAILED_PRECONDITION, "sample_set_uid")):
                with pytest.raises(grpc.RpcError) as caught:
                    call(message, timeout=30)
                error = from_rpc_error(caught.value)
                assert (error.code, error.field) == (code, field), error
            for set_id in ("created", "appended"):
                now = stub.GetSampleSet(sample_sets_pb2.GetSampleSetRequest(sample_set_id=set_id), timeout=30).sample_set
                assert (now.display_name, now.sample_count, dict(now.class_counts)) == ("another client's", 1, {5: 1})
    finally:
        server.stop(0)


def test_an_upload_request_applied_again_with_its_request_id_changes_nothing_and_goes_with_its_set(tmp_path):
    """CreateSampleSet and AppendSamples repeated with their request_id (a resend after a
    dropped answer) get the set as it is, without a second set, ALREADY_EXISTS or doubled
    samples; another request under the id is INVALID_ARGUMENT naming request_id. The ids
    live in a table of their own (schema version kept, so a rollback still opens the data
    dir) and are deleted with their set, also by the release before, which never reads them."""
    from explaind.store.base import sample_set_uid
    from explaind.store.sqlite import SCHEMA_VERSION

    created_id, appended_id = "123e4567-e89b-42d3-a456-426614174000", "123e4567-e89b-42d3-a456-426614174001"
    store = SQLiteStore(tmp_path)
    with store.writing_blobs() as put:
        first, second = SampleRecord(put(b"first"), 0), SampleRecord(put(b"second"), 1)
    for _ in range(2):
        info = store.create_sample_set("up", "", [first], uploading=True, request=RequestKey(created_id, "c"))
        assert (info.sample_count, info.uploading) == (1, True)
    assert store.sample_set_of_request(RequestKey(created_id, "c")).sample_set_id == "up"
    uid = sample_set_uid("up", info.create_time)
    for _ in range(2):
        info = store.append_samples("up", [second], finish_upload=True, uid=uid, request=RequestKey(appended_id, "a"))
        assert (info.sample_count, info.uploading, info.class_counts) == (2, False, {0: 1, 1: 1})
    job_id = "123e4567-e89b-42d3-a456-426614174002"
    store.insert_job(JobRecord("evaluating", "evaluate", "queued", 1.0), request=RequestKey(job_id, "j"))
    # An id names one request whatever its RPC: an upload's and an operation's are one namespace.
    for call, outcome in ((lambda: store.create_sample_set("other", "", [first], request=RequestKey(created_id, "another")),
                           "was applied to sample set 'up'"),
                          (lambda: store.append_samples("up", [second], request=RequestKey(appended_id, "another")),
                           "was applied to sample set 'up'"),
                          (lambda: store.insert_job(JobRecord("again", "evaluate", "queued", 2.0), request=RequestKey(created_id, "j")),
                           "was applied to sample set 'up'"),
                          (lambda: store.append_samples("up", [second], request=RequestKey(job_id, "a")),
                           "created operations/evaluating")):
        with pytest.raises(InvalidArgument, match=f"was sent with another request, which {outcome}") as caught:
            call()
        assert caught.value.field == "request_id"
    assert store.get_sample_set("up").sample_count == 2 and [s.sample_set_id for s in store.list_sample_sets()] == ["up"]
    with pytest.raises(NotFound):  # the refused insert left no job behind
        store.get_job("again")
    store.close()
    assert _user_version(tmp_path) == SCHEMA_VERSION == 1
    with closing(sqlite3.connect(tmp_path / "explaind.sqlite3", isolation_level=None)) as db:  # the release before deletes the set
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM sample_sets WHERE id = 'up'")
    with closing(SQLiteStore(tmp_path)) as store:
        assert store.sample_set_of_request(RequestKey(created_id, "c")) is None and store.sample_set_of_request(RequestKey(appended_id, "a")) is None
        # Forgotten with its set: the request is new again.
        assert store.create_sample_set("up", "", [first], request=RequestKey(created_id, "c")).sample_count == 1
        store.delete_sample_set("up")
        assert store.sample_set_of_request(RequestKey(created_id, "c")) is None


def test_a_large_sample_sets_summary_last_page_and_append_cost_what_a_small_ones_do(tmp_path):
    """A monitoring pipeline uploads sets of tens of thousands of samples: GetSampleSet
    (and each set of a list page, and each append's answer) counted every sample per
    class, an append counted them again for its next position, and ListSamples' page
    at offset n stepped over n samples (OFFSET), all under the store's lock."""
    store = SQLiteStore(tmp_path)
    records = [SampleRecord(f"{i:064x}", i % 6) for i in range(2000)]
    store.create_sample_set("small", "", records[:10])
    store.create_sample_set("large", "", records)
    calls = {"get": lambda set_id: store.get_sample_set(set_id),
             "last page": lambda set_id: store.list_samples(set_id, store.get_sample_set(set_id).sample_count - 1, 1),
             "append": lambda set_id: store.append_samples(set_id, records[:1])}
    for name, call in calls.items():
        small, large = vm_steps(store, lambda: call("small")), vm_steps(store, lambda: call("large"))
        assert large < 2 * small, (name, small, large)
    assert store.get_sample_set("large").class_counts == {0: 335, 1: 334, 2: 333, 3: 333, 4: 333, 5: 333}
    assert store.list_samples("large", 1999, 5) == [records[1999], records[0]] and store.list_samples("large", 2001) == []
    assert [info.sample_count for info in store.list_sample_sets()] == [11, 2001]
    store.close()


def _store_of_many(path: Path, count: int) -> SQLiteStore:
    """A store holding ``count`` sample sets, finished operations and head versions (and
    one running operation), as months of a monitoring pipeline leave it."""
    from explaind.store import HeadVersionRecord

    store = SQLiteStore(path)
    for i in range(count):
        store.create_sample_set(f"set-{i:04d}", "", [SampleRecord(f"{i:064x}", i % 6)])
        store.insert_job(JobRecord(f"job-{i:04d}", "evaluate_sample_set", "succeeded", float(i), end_time=float(i) + 1, result=b"r" * 100,
                                   artifacts=(ArtifactRef("mistakes.png", "image/png", f"{i:064x}", 1),)))
        store.insert_head_version(HeadVersionRecord("f", f"v{i}", "h", "", "", float(i), {"method": "edit"}))
    store.insert_job(JobRecord("live", "evaluate_sample_set", "running", float(count)))
    return store


def test_list_pages_filters_and_sweeps_cost_the_same_with_many_stored_objects(tmp_path):
    """Months of a pipeline leave thousands of sets, operations and head versions: a set
    page sorted every set, an operations page read up to every operation (one OR, so no
    seek: the second page of 20,000 read all of them), a head versions page sorted every
    version, and listing by state read every operation, all under the store's lock. Each
    minute's retention sweep must keep to its end-time index, not the state one."""
    small, large = _store_of_many(tmp_path / "small", 12), _store_of_many(tmp_path / "large", 300)

    def pages(store: SQLiteStore, sets: int) -> dict[str, Callable[[], object]]:
        set_rows = [(info.create_time, info.sample_set_id) for info in store.list_sample_sets(limit=sets)]
        job_rows = [(job.create_time, job.job_id) for job in store.list_jobs(limit=sets + 1)]
        head_rows = [(head.create_time, head.version_id) for head in store.list_head_versions("f")]
        return {"first set page": lambda: store.list_sample_sets(limit=5),
                "second set page": lambda: store.list_sample_sets(after=set_rows[4], limit=5),
                "last set page": lambda: store.list_sample_sets(after=set_rows[-6], limit=5),
                "second operations page": lambda: store.list_jobs(after=job_rows[4], limit=5),
                "last operations page": lambda: store.list_jobs(after=job_rows[-6], limit=5),
                "last operations page of a kind": lambda: store.list_jobs(kind="evaluate_sample_set", after=job_rows[-6], limit=5),
                "running operations": lambda: store.list_jobs(state="running", limit=5),
                "second head versions page": lambda: store.list_head_versions("f", after=head_rows[4], limit=5),
                "last head versions page": lambda: store.list_head_versions("f", after=head_rows[-6], limit=5),
                "retention sweep, none due": lambda: store.delete_jobs_ended_before(0.5),
                "unfinished operations at start-up": lambda: store.fail_unfinished_jobs("restart")}

    small_pages, large_pages = pages(small, 12), pages(large, 300)
    for name, call in small_pages.items():
        small_steps, large_steps = vm_steps(small, call), vm_steps(large, large_pages[name])
        assert large_steps < 2 * small_steps, (name, small_steps, large_steps)
    assert [info.sample_set_id for info in large.list_sample_sets(after=(large.get_sample_set("set-0294").create_time, "set-0294"))] == [
        f"set-{i:04d}" for i in range(295, 300)]
    assert [job.job_id for job in large.list_jobs(after=(5.0, "job-0005"), limit=3)] == ["job-0004", "job-0003", "job-0002"]
    assert [head.version_id for head in large.list_head_versions("f", after=(296.0, "v296"))] == ["v297", "v298", "v299"]
    assert large.get_job("live").state == "failed" and large.list_jobs(state="running") == []


def test_sample_set_and_head_version_pages_resume_among_ties_in_create_time_by_id(tmp_path, monkeypatch):
    # Sets made within one clock tick share a create_time (as an earlier release stamped
    # them; the store's clock now moves on at each): a page that ends among them resumes
    # after its last id, neither skipping the others of that time nor repeating it, and
    # holds no more than its limit.
    from explaind.store import HeadVersionRecord

    store = SQLiteStore(tmp_path)
    monkeypatch.setattr(store, "now", lambda: 100.0)
    with store.writing_blobs() as put:
        for set_id in ("b", "d", "a", "c"):
            store.create_sample_set(set_id, "", _samples(put, b"image"))
        weights = put(b"weights")
        for version_id in ("v2", "v0", "v3", "v1"):
            store.insert_head_version(HeadVersionRecord("f", version_id, "h", weights, "", 7.0))
    pages, after = [], None
    while page := store.list_sample_sets(after=after, limit=3):
        pages.append([info.sample_set_id for info in page])
        after = (page[-1].create_time, page[-1].sample_set_id)
    assert pages == [["a", "b", "c"], ["d"]]
    assert [head.version_id for head in store.list_head_versions("f", after=(7.0, "v1"), limit=2)] == ["v2", "v3"]


def test_deleting_a_failed_operation_and_the_retention_sweep_read_no_head_version_but_its_own(tmp_path):
    """Whether a failed operation stored a head version (which keeps it until a start
    deletes that version) was asked of every version's details: each delete of a failed
    operation and each retention sweep that found one due read them all."""
    small, large = _store_of_many(tmp_path / "small", 12), _store_of_many(tmp_path / "large", 300)
    for store in (small, large):
        for job_id in ("asked", "due"):
            store.insert_job(JobRecord(job_id, "edit_head", "failed", 0.0, end_time=0.25))
    for name, call in {"delete": lambda store: store.delete_job("asked"), "retention": lambda store: store.delete_jobs_ended_before(0.5)}.items():
        small_steps, large_steps = vm_steps(small, lambda: call(small)), vm_steps(large, lambda: call(large))
        assert large_steps < 2 * small_steps, (name, small_steps, large_steps)
    with pytest.raises(NotFound):
        large.get_job("due")


def test_opening_a_store_reads_none_of_its_operations(tmp_path):
    """Every start indexed the artifacts of operations a release without job_artifacts had
    stored by reading every operation's artifact list, and all its response before it
    (373 MiB for 20,000 evaluations of 20 KB): triggers keep the index now, filled once."""
    from explaind.store.sqlite import SCHEMA_VERSION

    small, large = _store_of_many(tmp_path / "small", 12), _store_of_many(tmp_path / "large", 300)
    small_steps, large_steps = (vm_steps(store, lambda: store._migrate(SCHEMA_VERSION, existing=True)) for store in (small, large))  # what opening runs
    assert large_steps < 2 * small_steps, (small_steps, large_steps)
    assert large._referenced([f"{i:064x}" for i in (0, 299, 300)]) == {f"{i:064x}" for i in (0, 299)}


def test_class_counts_are_filled_in_a_store_the_previous_release_wrote_and_kept_right_by_it(tmp_path):
    """The per-class counts are a table a trigger keeps: a store the release before left
    gets them when opened, and samples that release appends or deletes with their set
    (it never reads the table) are counted, without a new schema version."""
    from explaind.store.sqlite import SCHEMA_VERSION

    path = tmp_path / "explaind.sqlite3"
    with closing(SQLiteStore(tmp_path)) as store:
        with store.writing_blobs() as put:
            a, b, c, d = (put(data) for data in (b"a", b"b", b"c", b"d"))
        store.create_sample_set("kept", "", [SampleRecord(a, 0), SampleRecord(b, 2)])
        store.create_sample_set("gone", "", [SampleRecord(c, 1), SampleRecord(d, 1)])
    with closing(sqlite3.connect(path, isolation_level=None)) as db:  # as the release before left it
        db.execute("DROP TRIGGER samples_counted")
        db.execute("DROP TABLE sample_class_counts")
    with closing(SQLiteStore(tmp_path)) as store:
        assert store.get_sample_set("kept").class_counts == {0: 1, 2: 1} and store.get_sample_set("gone").class_counts == {1: 2}
    assert _user_version(tmp_path) == SCHEMA_VERSION == 1  # what the release before reads
    with closing(sqlite3.connect(path, isolation_level=None)) as db:  # the release before appends and deletes
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("INSERT INTO samples VALUES ('kept', 2, ?, 2, '{}')", (d,))
        db.execute("DELETE FROM sample_sets WHERE id = 'gone'")
        assert db.execute("SELECT set_id, label, count FROM sample_class_counts ORDER BY label").fetchall() == [("kept", 0, 1), ("kept", 2, 2)]
    with closing(SQLiteStore(tmp_path)) as store:
        info = store.get_sample_set("kept")
        assert (info.sample_count, info.class_counts) == (3, {0: 1, 2: 2})


def test_the_write_ahead_log_is_cut_back_after_a_large_transaction(tmp_path, monkeypatch):
    # It kept the largest transaction's size until the server stopped (40 MiB after a
    # sweep of 50,000 samples' features), on the volume the data dir's reserve guards.
    from explaind.store import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "WAL_SIZE_LIMIT_BYTES", 2**20)
    wal = tmp_path / "explaind.sqlite3-wal"
    with closing(SQLiteStore(tmp_path)) as store:
        store.put_features("large", {f"{i:064x}": np.zeros(1024, np.float32) for i in range(2000)})  # 8 MB
        assert wal.stat().st_size > 4 * 2**20
        store.put_features("small", {"0" * 64: np.zeros(16, np.float32)})  # the next write after the checkpoint
        assert wal.stat().st_size <= 2**20

class _CallerWaits:
    """A servicer context whose caller still waits for the answer."""

    def is_active(self) -> bool:
        return True


def test_an_upload_request_id_is_the_same_request_in_either_case_of_its_hex_digits(engine):
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    servicer = SampleSetServicer(engine)
    request_id = str(uuid.UUID(int=0xABCDEF))
    sample = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8))), label=1)
    create = sample_sets_pb2.CreateSampleSetRequest(sample_set_id="cased", samples=[sample], request_id=request_id.upper())
    created = servicer.CreateSampleSet(create, _CallerWaits()).sample_set
    create.request_id = request_id  # AIP-155 ids are UUIDs, whose hex digits have no case
    assert servicer.CreateSampleSet(create, _CallerWaits()).sample_set == created
    assert engine.store.get_sample_set("cased").sample_count == 1


def test_upload_requests_sent_again_are_answered_before_their_images_are_decoded(engine, monkeypatch):
    # A repeat is answered from the store at once: decoding a 64 MiB upload again would
    # cost a retrying client what the first attempt did.
    from explaind.service import convert
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    servicer = SampleSetServicer(engine)
    sample = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8))), label=1)
    create = sample_sets_pb2.CreateSampleSetRequest(sample_set_id="sent-again", samples=[sample], upload_continues=True, request_id=str(uuid.UUID(int=1)))
    append = sample_sets_pb2.AppendSamplesRequest(sample_set_id="sent-again", samples=[sample], finish_upload=True, request_id=str(uuid.UUID(int=2)))
    servicer.CreateSampleSet(create, _CallerWaits())
    finished = servicer.AppendSamples(append, _CallerWaits()).sample_set
    decoded = []
    monkeypatch.setattr(convert, "new_sample", lambda sample, *, field, budget: decoded.append(field))
    assert servicer.AppendSamples(append, _CallerWaits()).sample_set == finished
    assert servicer.CreateSampleSet(create, _CallerWaits()).sample_set == finished  # the set as it is now
    assert decoded == [] and engine.store.get_sample_set("sent-again").sample_count == 2


def test_an_upload_under_a_request_id_is_not_taken_for_another_whose_samples_serialise_to_the_same_bytes(engine):
    # Sample 1 then 2 serialise, end to end, to the bytes of one sample holding both
    # attributes: each sample is hashed with its length, so the two requests differ.
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    servicer = SampleSetServicer(engine)
    image = common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8)))
    joined = sample_sets_pb2.Sample(image=image, label=1, attributes={"a": "1", "b": "2"})
    split = [sample_sets_pb2.Sample(image=image, label=1, attributes={"a": "1"}), sample_sets_pb2.Sample(attributes={"b": "2"})]
    assert b"".join(s.SerializeToString(deterministic=True) for s in split) == joined.SerializeToString(deterministic=True)
    request_id = str(uuid.uuid4())
    servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="joined", samples=[joined], request_id=request_id), _CallerWaits())
    with pytest.raises(InvalidArgument) as refused:
        servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="joined", samples=split, request_id=request_id), _CallerWaits())
    assert refused.value.field == "request_id"
    assert engine.store.get_sample_set("joined").sample_count == 1


def test_an_uploaded_file_that_is_no_image_is_refused_naming_its_sample_and_nothing_is_stored(engine):
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    servicer = SampleSetServicer(engine)
    good = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8))), label=1)
    bad = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=b"\x89PNG\r\n\x1a\n but no more"), label=1)
    with pytest.raises(InvalidArgument) as refused:
        servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="refused", samples=[good, bad]), _CallerWaits())
    assert refused.value.field == "samples[1].image.encoded"
    servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="kept", samples=[good], upload_continues=True), _CallerWaits())
    with pytest.raises(InvalidArgument) as refused:
        servicer.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="kept", samples=[bad, good]), _CallerWaits())
    assert refused.value.field == "samples[0].image.encoded"
    assert [info.sample_set_id for info in engine.store.list_sample_sets()] == ["kept"]
    assert engine.store.get_sample_set("kept").sample_count == 1


def test_a_samples_label_and_attributes_are_listed_as_uploaded_whether_its_image_was_a_file_or_a_tensor(engine):
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    servicer = SampleSetServicer(engine)
    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    file = io.BytesIO()
    Image.fromarray(pixels).save(file, format="PNG", compress_level=0)  # not the bytes the server's own PNG encoder writes
    assert file.getvalue() != encode_png(pixels)
    encoded = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=file.getvalue()), label=2, attributes={"background": "water"})
    tensor = sample_sets_pb2.Sample(image=common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[8, 8, 3], data=pixels.tobytes())),
                                    label=3, attributes={"background": "land", "n": "1"})
    servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="kinds", samples=[encoded, tensor]), _CallerWaits())
    listed = servicer.ListSamples(sample_sets_pb2.ListSamplesRequest(sample_set_id="kinds"), _CallerWaits()).samples
    assert [(s.label, dict(s.attributes)) for s in listed] == [(2, {"background": "water"}), (3, {"background": "land", "n": "1"})]
    assert listed[0].image.encoded == encoded.image.encoded  # a file is kept as sent


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_each_ask_the_server_to_stop(signum):
    # Kubernetes stops a pod with SIGTERM, a terminal with SIGINT (Ctrl-C): either must set the event serve() waits on.
    import signal

    from explaind.signals import stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for number in before:
            signal.signal(number, lambda *_: None)  # a signal stop_on_signals does not take is then ignored, not a KeyboardInterrupt
        stop_requested = stop_on_signals()
        assert not stop_requested.is_set()
        signal.raise_signal(getattr(signal, signum))
        assert stop_requested.is_set()
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_a_sample_set_uid_in_any_form_but_its_own_is_a_bad_request_not_another_set(engine):
    # SampleSet.uid is a lowercase UUID: "{...}", "urn:uuid:..." and capitals name no set's uid.
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    servicer = SampleSetServicer(engine)
    sample = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8))), label=1)
    uid = servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="pinned", samples=[sample], upload_continues=True),
                                   _CallerWaits()).sample_set.uid
    for other_form in (uid.upper(), "{" + uid + "}", "urn:uuid:" + uid, uid.replace("-", "")):
        with pytest.raises(InvalidArgument) as refused:
            servicer.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="pinned", sample_set_uid=other_form, samples=[sample]), _CallerWaits())
        assert refused.value.field == "sample_set_uid"
        with pytest.raises(InvalidArgument) as refused:
            servicer.DeleteSampleSet(sample_sets_pb2.DeleteSampleSetRequest(sample_set_id="pinned", sample_set_uid=other_form), _CallerWaits())
        assert refused.value.field == "sample_set_uid"
    appended = servicer.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="pinned", sample_set_uid=uid, samples=[sample],
                                                                           finish_upload=True), _CallerWaits()).sample_set
    assert (appended.uid, appended.sample_count) == (uid, 2)


def test_an_upload_of_max_images_per_request_samples_is_taken_and_one_more_is_refused(engine, monkeypatch):
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    monkeypatch.setattr(engine, "config", engine.config.replace("batching", max_images_per_request=2))
    servicer = SampleSetServicer(engine)
    sample = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8))), label=1)
    with pytest.raises(InvalidArgument, match="^samples: 3 samples exceed the limit of 2 per request"):
        servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="full", samples=[sample] * 3), _CallerWaits())
    servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="full", samples=[sample] * 2, upload_continues=True), _CallerWaits())
    with pytest.raises(InvalidArgument, match="^samples: 3 samples exceed the limit of 2 per request"):
        servicer.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="full", samples=[sample] * 3), _CallerWaits())
    servicer.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="full", samples=[sample] * 2, finish_upload=True), _CallerWaits())
    assert engine.store.get_sample_set("full").sample_count == 4


def test_an_append_to_a_set_made_again_while_its_images_were_decoded_is_refused_naming_sample_set_uid(engine, monkeypatch):
    # The uid is checked before the images are decoded and again as they are stored: the
    # set may be deleted and made again by another client in between.
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import common_pb2, sample_sets_pb2

    servicer = SampleSetServicer(engine)
    sample = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8))), label=1)
    first = servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="made-again", samples=[sample]), _CallerWaits()).sample_set
    check_append = engine.check_append

    def made_again_once_checked(*args, **kwargs):
        check_append(*args, **kwargs)
        engine.delete_sample_set("made-again")
        engine.create_sample_set("made-again", "another client's", [NewSample.from_array(np.ones((8, 8, 3), np.uint8), 0)])

    monkeypatch.setattr(engine, "check_append", made_again_once_checked)
    append = sample_sets_pb2.AppendSamplesRequest(sample_set_id="made-again", samples=[sample], sample_set_uid=first.uid)
    with pytest.raises(FailedPrecondition, match="is not the set of uid") as refused:
        servicer.AppendSamples(append, _CallerWaits())
    assert refused.value.field == "sample_set_uid"
    assert engine.store.get_sample_set("made-again").sample_count == 1


def test_a_sample_set_listing_ends_with_its_last_page_not_an_empty_one_after_it(engine):
    # AIP-158: an empty next_page_token is the end; a token on a short page cost every client one more call.
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    for set_id in ("a", "b", "c"):
        engine.create_sample_set(set_id, "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)])
    servicer = SampleSetServicer(engine)
    first = servicer.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(page_size=2), None)
    assert [s.sample_set_id for s in first.sample_sets] == ["a", "b"] and first.next_page_token
    last = servicer.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(page_size=2, page_token=first.next_page_token), None)
    assert [s.sample_set_id for s in last.sample_sets] == ["c"] and last.next_page_token == ""
    whole = servicer.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(page_size=3), None)
    assert len(whole.sample_sets) == 3 and whole.next_page_token  # a full page cannot tell it is the last


def test_a_predict_of_max_images_per_request_images_is_answered_and_one_more_is_refused(engine, monkeypatch):
    from explaind.service.inference import InferenceServicer
    from explaind.v1 import common_pb2, inference_pb2

    class Context:
        def add_callback(self, callback):
            pass

        def time_remaining(self):
            return 60.0

    monkeypatch.setattr(engine, "config", engine.config.replace("batching", max_images_per_request=2))
    servicer = InferenceServicer(engine, serving=lambda: True)
    image = common_pb2.Image(encoded=encode_png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(InvalidArgument, match="^images: 3 images exceed the limit of 2 per request"):
        servicer.Predict(inference_pb2.PredictRequest(images=[image] * 3), Context())
    assert len(servicer.Predict(inference_pb2.PredictRequest(images=[image] * 2), Context()).predictions) == 2


def test_a_sample_set_listing_refuses_an_owner_that_is_no_caller_name_and_tokens_not_of_its_making(engine):
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    engine.create_sample_set("listed", "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), 0)])
    servicer = SampleSetServicer(engine)
    with pytest.raises(InvalidArgument, match="^owner: 'no caller/name' is no caller name") as refused:
        servicer.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(owner="no caller/name"), None)
    assert refused.value.field == "owner"
    # A token without the id of the set it resumes after, one whose listing is no
    # listing's name (not described back as one, as if it were a caller's list), and times
    # no token has: repr() of a create time is finite and not negative.
    for token in ("sample_sets/0.0/", "sample_sets@Eve Smith!/0.0/listed", "sample_sets/1e999/listed", "sample_sets/-1.0/listed"):
        with pytest.raises(InvalidArgument) as refused:
            servicer.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(page_token=token), None)
        assert (refused.value.field, refused.value.description) == ("page_token", f"{token[:40]!r} is not a page token from a previous response")


@pytest.mark.parametrize(("listing", "second_page", "written"), [
    ("ListSampleSets", ["b"], "2:sample_sets/"),
    # ListSamples' offsets carried none either: a later release could not change them
    # (tie one to its set's uid, as this one does) without misreading this one's. Tied,
    # they are version 3: under 2, the release before took one for a damaged token.
    ("ListSamples", [1], "3:samples[set=a]/"),
])
def test_a_page_token_says_its_format_version_and_one_of_an_unknown_version_is_refused_asking_to_list_from_the_start(engine, listing, second_page, written):
    # Tokens carried no version: a release changing what they hold would have misread
    # this one's. Those handed out before versions (none) still resume, as a client may
    # hold one across an upgrade.
    from explaind.service.paging import PAGE_TOKEN_VERSION, SAMPLES_PAGE_TOKEN_VERSION
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    for sample_set_id in ("a", "b", "c"):
        engine.create_sample_set(sample_set_id, "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), label) for label in range(3)])
    servicer = SampleSetServicer(engine)

    def page(token: str) -> tuple[list[str | int], str]:
        if listing == "ListSampleSets":
            sets = servicer.ListSampleSets(sample_sets_pb2.ListSampleSetsRequest(page_size=1, page_token=token), None)
            return [s.sample_set_id for s in sets.sample_sets], sets.next_page_token
        samples = servicer.ListSamples(sample_sets_pb2.ListSamplesRequest(sample_set_id="a", page_size=1, page_token=token), None)
        return [s.label for s in samples.samples], samples.next_page_token

    token = page("")[1]
    prefix, _, _ = written.partition(":")
    prefix += ":"
    assert token.startswith(written)
    # The unversioned one of the releases before: a resume point, or a bare offset.
    unversioned = token.removeprefix(prefix) if listing == "ListSampleSets" else token.rpartition("/")[2]
    assert page(token)[0] == page(unversioned)[0] == second_page
    if listing == "ListSamples":  # and version 2's offset, which named no set
        assert page(f"{PAGE_TOKEN_VERSION}:{unversioned}")[0] == second_page
    for version in (SAMPLES_PAGE_TOKEN_VERSION + 1, 999999999):
        unknown = f"{version}:{token.removeprefix(prefix)}"
        with pytest.raises(InvalidArgument) as refused:
            page(unknown)
        assert refused.value.field == "page_token", refused.value
        assert refused.value.description == (f"{unknown[:40]!r} is a page token of format version {version}, which this server does not read "
                                             f"(it writes version {prefix[:-1]}): list from the start, without a page_token")
    # No server wrote a version below its own with a prefix: not "a version this server
    # does not read" of version 1, which it reads (unprefixed), but no token of ours; nor
    # is a prefix with nothing after it (an offset's: not the first page), nor the other
    # listings' version around this one's body (a version this server knows).
    other = {"2:": "3:", "3:": "2:"}[prefix]
    for forged in (f"0:{token.removeprefix(prefix)}", f"1:{token.removeprefix(prefix)}", prefix, other + token.removeprefix(prefix)):
        with pytest.raises(InvalidArgument) as refused:
            page(forged)
        assert (refused.value.field, refused.value.description) == ("page_token", f"{forged[:40]!r} is not a page token from a previous response")


def test_a_list_samples_page_token_pages_only_its_own_set_and_not_one_created_again_under_its_id(engine):
    # An offset alone: set a's token sent for set b (or for a set a created again since)
    # silently paged that other set from a's offset.
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    def create(sample_set_id: str) -> None:
        engine.create_sample_set(sample_set_id, "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), label) for label in range(3)])

    for sample_set_id in ("a", "b"):
        create(sample_set_id)
    servicer = SampleSetServicer(engine)

    def page(sample_set_id: str, token: str = "") -> sample_sets_pb2.ListSamplesResponse:
        return servicer.ListSamples(sample_sets_pb2.ListSamplesRequest(sample_set_id=sample_set_id, page_size=1, page_token=token), None)

    token = page("a").next_page_token
    assert [s.label for s in page("a", token).samples] == [1]
    with pytest.raises(InvalidArgument) as refused:
        page("b", token)
    assert refused.value.field == "page_token"
    assert refused.value.description == f"{token[:40]!r} is a page token of sample set 'a''s samples, not of 'b''s: page a set with the tokens of its own listing"
    old_uid = engine.store.get_sample_set("a").uid
    engine.delete_sample_set("a")
    create("a")
    new_uid = engine.store.get_sample_set("a").uid
    with pytest.raises(InvalidArgument) as refused:
        page("a", token)
    assert refused.value.field == "page_token"
    assert refused.value.description == (f"{token[:40]!r} is a page token of an earlier sample set 'a' (uid {old_uid}), deleted since and "
                                         f"created again (uid {new_uid}): list its samples from the start, without a page_token")
    # Offsets that name no set are read as ever, in any set: the SDK's start=, and tokens of the releases before.
    for untied in ("1", "2:1"):
        assert [s.label for s in page("b", untied).samples] == [1]
    # No release wrote a set's token without its version, nor one whose uid is no uid;
    # malformed, it is the request's mistake, for an unknown set too (as a negative size is).
    for forged in (token.removeprefix("3:"), token.replace(old_uid, old_uid.upper()), "3:samples[set=A]/" + token.partition("]/")[2]):
        for sample_set_id in ("a", "unknown"):
            with pytest.raises(InvalidArgument) as refused:
                page(sample_set_id, forged)
            assert (refused.value.field, refused.value.description) == ("page_token", f"{forged[:40]!r} is not a page token from a previous response")
    with pytest.raises(InvalidArgument, match="^page_size: must not be negative$"):
        servicer.ListSamples(sample_sets_pb2.ListSamplesRequest(sample_set_id="unknown", page_size=-1), None)


def test_a_list_samples_page_token_is_not_read_into_a_set_made_again_between_its_check_and_the_read(engine, monkeypatch):
    # The token was checked against the uid read first; the samples read after it were of
    # whichever set held the id then: one made again in between was paged from the earlier one's offset.
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    def create(labels: range) -> None:
        engine.create_sample_set("a", "", [NewSample.from_array(np.zeros((8, 8, 3), np.uint8), label) for label in labels])

    create(range(3))
    servicer = SampleSetServicer(engine)
    request = sample_sets_pb2.ListSamplesRequest(sample_set_id="a", page_size=1)
    token = servicer.ListSamples(request, None).next_page_token
    get_sample_set = engine.store.get_sample_set

    def made_again_once_read(sample_set_id):
        info = get_sample_set(sample_set_id)
        monkeypatch.setattr(engine.store, "get_sample_set", get_sample_set)
        engine.delete_sample_set("a")
        create(range(3, 6))
        return info

    monkeypatch.setattr(engine.store, "get_sample_set", made_again_once_read)
    request.page_token = token
    with pytest.raises(FailedPrecondition, match="^sample_set_id: sample set 'a' is not the set of uid .* any more: it was deleted and created again since"):
        servicer.ListSamples(request, None)
    assert [s.label for s in servicer.ListSamples(sample_sets_pb2.ListSamplesRequest(sample_set_id="a", page_size=1), None).samples] == [3]


def test_only_a_damaged_database_is_data_loss_and_sqlites_other_errors_stay_internal():
    # A locked, full or misused database is no reason to restore a backup.
    from explaind.errors import report_unexpected

    logger = logging.getLogger("explaind.test")
    assert report_unexpected(logger, "read", sqlite3.DatabaseError("database disk image is malformed"))[0] == "DATA_LOSS"
    for error in (sqlite3.OperationalError("database is locked"), sqlite3.OperationalError("database or disk is full"),
                  sqlite3.IntegrityError("UNIQUE constraint failed"), sqlite3.ProgrammingError("Cannot operate on a closed database.")):
        code, message = report_unexpected(logger, "read", error)
        assert (code, "backup" in message) == ("INTERNAL", False), error


def test_out_of_memory_advice_is_kept_for_methods_the_api_has():
    # The interceptor looks the advice up by a method's bare name; a name the API lacks (a typo,
    # a renamed RPC) would fall back to "retry later" with no test noticing.
    from explaind.service import interceptors
    from explaind.v1 import inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2
    methods = {method.name for module in (inference_pb2, sample_sets_pb2, neuroinspect_pb2, operations_pb2)
               for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods}
    assert set(interceptors._LESS_WORK_BY_METHOD) <= methods
    assert {"Predict", "CreateSampleSet", "AppendSamples", "RankMistakeNeurons"} <= set(interceptors._LESS_WORK_BY_METHOD)
