"""Dynamic batching in front of the model.

Requests (each a few images) queue up; one worker thread takes as many as fit in
``max_batch_size`` images, runs them as one forward pass and hands each caller its
slice. With ``max_queue_delay_s == 0`` the worker takes whatever is queued at that
moment: a lone request never waits, and under load batches form by themselves while
the previous batch runs. A positive delay waits up to that long for a fuller batch.

One forward runs at a time. With no delay configured, a request that finds the model
idle and nothing queued runs at once in the caller's own thread: the two thread
handoffs to and from the worker (about 0.15 ms on CPU) are most of the latency a
lone request would otherwise add. Requests arriving meanwhile queue for the worker,
which starts as soon as that forward ends.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from ..errors import Quota, ResourceExhausted, Unavailable, caller_subject
from ..wording import counted

Output = TypeVar("Output")


@dataclass(eq=False)  # found in the queue by identity: comparing image tensors would raise
class _Request:
    images: torch.Tensor
    future: Future
    caller: str | None = None
    options: Any = None


class DynamicBatcher(Generic[Output]):
    """``run(images (N, 3, S, S)) -> outputs`` batched across callers.

    ``split(outputs, sizes, options)`` cuts a batch's outputs back into one per request,
    given each request's image count and the ``options`` it was submitted with (what it
    needs of the outputs), or an exception for a request its outputs cannot answer: that
    request's future raises it, the others of the batch get theirs. Both run in the
    batcher's thread.
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor], Output],
        split: Callable[[Output, list[int], list[Any]], list[Any]],
        *,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 1024,
        max_queued_per_caller: int = 0,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        name: str = "batcher",
    ) -> None:
        self._run = run
        self._split = split
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.max_queued_per_caller = max_queued_per_caller
        self._on_batch = on_batch or (lambda size: None)
        self._on_queue_depth = on_queue_depth or (lambda depth: None)
        self._pending: deque[_Request] = deque()
        self._queued_images = 0
        self._queued_by: dict[str, int] = {}  # named caller -> its images waiting
        self._model_busy = False
        self._condition = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Images waiting for the model."""
        return self._queued_images

    def submit(self, images: torch.Tensor, *, caller: str | None = None, options: Any = None) -> Future:
        """Queue images (n, 3, S, S); the future resolves to this request's slice of outputs,
        cut by ``split`` with ``options``.

        Raises :class:`ResourceExhausted` when the queue is full, or when the named
        ``caller`` already has images waiting and these would take it past
        ``max_queued_per_caller`` (0: no such limit): one caller cannot fill the queue
        for all, and a caller with nothing waiting may always queue one request, so no
        request within the per-request limit is refused for ever. Cancelling the future
        before its batch starts drops the request. A request run in the caller's thread
        (see the module docstring) returns a future that is already done.
        """
        request = _Request(images, Future(), caller, options)
        with self._condition:
            if self._closed:
                raise Unavailable("the server is shutting down")
            run_here = not self._model_busy and not self._pending and self.max_queue_delay_s <= 0 and len(images) <= self.max_batch_size
            if run_here:
                self._model_busy = True
            else:
                self._require_room(len(images), caller)
                self._pending.append(request)
                self._count_queued(request, +1)
                self._condition.notify()
        if not run_here:
            request.future.add_done_callback(lambda _future: self._forget_if_cancelled(request))
        if run_here:
            request.future.set_running_or_notify_cancel()
            self._run_live([request])
        return request.future

    def check_room(self, count: int, *, caller: str | None = None) -> None:
        """Raise :class:`ResourceExhausted` as :meth:`submit` would now for ``count``
        images of ``caller``: a request can be refused before its images are decoded.
        The queue may fill or drain before the submit, which checks again."""
        with self._condition:
            self._require_room(count, caller)

    def _require_room(self, count: int, caller: str | None) -> None:
        """The queue's limits for ``count`` more images of ``caller``; hold the condition.
        An empty queue takes any request within [batching].max_images_per_request, which
        config keeps within max_queue_size."""
        mine = self._queued_by.get(caller, 0) if caller is not None else 0
        if mine and self.max_queued_per_caller and mine + count > self.max_queued_per_caller:
            raise ResourceExhausted(f"prediction queue is full for caller {caller!r} ({mine} of its images waiting, limit "
                                    f"{self.max_queued_per_caller}, [batching].max_queued_images_per_caller); retry with backoff",
                                    quota=Quota("QUEUED_IMAGES_PER_CALLER_EXCEEDED", "[batching].max_queued_images_per_caller",
                                                self.max_queued_per_caller, caller_subject(caller), "images this caller has waiting"))
        if self._queued_images + count > self.max_queue_size:
            raise ResourceExhausted(f"prediction queue is full ({counted(self._queued_images, 'image')} waiting, limit {self.max_queue_size}); retry with backoff",
                                    quota=Quota("QUEUED_IMAGES_EXCEEDED", "[batching].max_queue_size", self.max_queue_size, "server", "images waiting"))

    def _count_queued(self, request: _Request, sign: int) -> None:
        """Add (+1) or remove (-1) ``request``'s images from the waiting counts; hold the condition."""
        self._queued_images += sign * len(request.images)
        if request.caller is not None:
            if mine := self._queued_by.get(request.caller, 0) + sign * len(request.images):
                self._queued_by[request.caller] = mine
            else:
                del self._queued_by[request.caller]
        self._on_queue_depth(self._queued_images)

    def _forget_if_cancelled(self, request: _Request) -> None:
        """A caller that left frees its place in the queue at once, not when the worker
        reaches it: until then its images would refuse live callers as "queue full"."""
        if not request.future.cancelled():
            return
        with self._condition:
            if request in self._pending:  # else the worker took it already (and skips it)
                self._pending.remove(request)
                self._count_queued(request, -1)

    def close(self) -> None:
        """Stop accepting; requests already queued still run."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._worker.join()

    def _take_batch(self) -> list[_Request] | None:
        """Wait for the model to be free and a request queued; mark the model busy."""
        with self._condition:
            while not self._pending or self._model_busy:
                if self._closed and not self._pending:
                    return None
                self._condition.wait()
            self._model_busy = True
            batch = [self._pending.popleft()]
            size = len(batch[0].images)
            deadline = time.monotonic() + self.max_queue_delay_s
            while size < self.max_batch_size:
                if self._pending:
                    if size + len(self._pending[0].images) > self.max_batch_size:
                        break
                    request = self._pending.popleft()
                    batch.append(request)
                    size += len(request.images)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._condition.wait(remaining)
            for request in batch:
                self._count_queued(request, -1)
        return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = [request for request in batch if request.future.set_running_or_notify_cancel()]
            if live:
                self._run_live(live)
            else:
                self._release_model()

    def _run_live(self, live: list[_Request]) -> None:
        """One forward for ``live`` (futures already running); frees the model after."""
        try:
            images = live[0].images if len(live) == 1 else torch.cat([request.images for request in live])
            self._on_batch(len(images))
            outputs = list(self._split(self._run(images), [len(request.images) for request in live], [request.options for request in live]))
            if len(outputs) != len(live):  # checked here: past the try it would end the worker and strand every caller
                raise RuntimeError(f"split returned {len(outputs)} outputs for {len(live)} requests")
        except BaseException as error:  # noqa: BLE001 - every caller must hear about it
            self._release_model()
            for request in live:
                request.future.set_exception(error)
            return
        self._release_model()
        for request, output in zip(live, outputs):
            if isinstance(output, BaseException):
                request.future.set_exception(output)
            else:
                request.future.set_result(output)

    def _release_model(self) -> None:
        with self._condition:
            self._model_busy = False
            self._condition.notify()
