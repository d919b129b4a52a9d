"""AsyncClient: the Client's calls as coroutines, for asyncio programs."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from ._client import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, Client, _abandonment, _Cancellation
from ._errors import DeadlineExceededError, UnavailableError
from ._operations import WATCH_DEADLINE_S, Operation, ProgressDisplay, RetryTally, checked_timeout

P = ParamSpec("P")
R = TypeVar("R")

# Held while an AsyncClient starts its threads in a forked process (see AsyncClient._threads);
# a new one in each child, as one held by another thread at the fork stays held there.
_threads_lock = threading.Lock()


def _new_threads_lock() -> None:
    global _threads_lock
    _threads_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # Windows has none, and no fork to track
    os.register_at_fork(after_in_child=_new_threads_lock)

# Threads of an AsyncClient, so as many of its calls run at once; more wait their turn.
DEFAULT_MAX_WORKERS = 16
# Longest wait one thread makes for AsyncClient.result: a restart outlasting one wait's
# retries is waited out by the next step's while time is left (see _waits). An await
# cancelled meanwhile cancels the wait at once (see _Cancellation.abandon).
RESULT_STEP_S = 10.0
# How often AsyncClient.result(progress=True) and AsyncClient.watch read the job, seconds.
PROGRESS_STEP_S = 1.0


def _awaitable(method: Callable[Concatenate[Client, P], R]) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, R]]:
    """``method`` of the Client as a coroutine method of the AsyncClient, with the same
    parameters, result and docstring, run on the AsyncClient's threads."""

    @functools.wraps(method)
    async def call(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self.to_thread(method, self.client, *args, **kwargs)

    return call


def _iterated(method: Callable[Concatenate[Client, P], Generator[R, None, None]]) -> Callable[Concatenate[AsyncClient, P], AsyncIterator[R]]:
    """``method`` of the Client, a generator, as an async generator method of the AsyncClient
    with the same parameters, items and docstring: the call and each item are taken on the
    AsyncClient's threads, one at a time, so a loop that stops early reads no further.
    Stopped at an item (a ``break``, ``aclose()``, an exception in the loop), it closes the
    Client's generator on those threads (a pipelined call's requests in flight cancelled,
    its threads ended); cancelled while an item is being taken, that generator ends there
    as an abandoned call does (see the class: its requests in flight, read-only, cancelled). A
    loop left without ``aclosing`` is closed when the event loop finalises it, after an
    enclosing ``async with AsyncClient`` may have closed the client: its threads refuse
    work then, and the requests ended with the channel, so it closes here."""

    @functools.wraps(method)
    async def iterate(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[R]:
        # One for the whole loop: a pipeline the generator made at its first item is abandoned
        # with the await of any later one (its own, kept its first item's, left a Predict held).
        abandonment = _Cancellation()
        items = await self._in_thread(abandonment, method, self.client, *args, **kwargs)
        end: Any = object()  # no item is this
        while (item := await self._in_thread(abandonment, next, items, end)) is not end:
            try:
                yield item
            except BaseException:
                if self.client._closed:  # to_thread's "is closed" error, in a task nobody awaits, left it open
                    items.close()
                else:
                    await self.to_thread(items.close)
                raise

    iterate.__doc__ = (f"{method.__doc__}\n\n        On the AsyncClient, an async generator: what the Client's call checks raises "
                       "at the first item, and ``aclose()`` is its ``close()``.")
    return iterate


def _require_operation(operation: object) -> None:
    """Refuse what is no Operation, such as its name, naming the argument and how to get
    one: a name failed as AttributeError "'str' object has no attribute 'done'"."""
    if not isinstance(operation, Operation):
        raise TypeError(f"operation must be an Operation (await client.operation(name) gets one by its name), got {operation!r}")


class AsyncClient:
    """A :class:`Client` for asyncio: each of its methods, awaitable, with the same
    arguments, results and typed errors; the arguments here are the Client's, and
    ``max_workers``.

    Each call runs the Client's in a thread of this client's own pool of ``max_workers``
    (the event loop's default executor is left alone): that many run at once, and more
    wait their turn, in order, their ``timeout`` counting from when they start. A call
    still waiting its turn that is cancelled (``asyncio.timeout``, a cancelled task) never
    runs; one already running makes no further attempt: a retry's pause (a restarting
    server, a full job queue) ends at once, an upload sends no further samples (its part is
    settled as an interrupted upload's: deleted, without ``request_id``), a read-only
    call in flight (a Predict, a wait for a job, ``rank_mistake_neurons``'s, a watch of its
    progress, a Get or List, a health check) is cancelled, and its thread ends, its result dropped. Any other
    attempt already sent is left to its answer or its deadline (the Client's
    ``timeout``, or the call's own), as it may have taken effect: a start it sent may
    start a job, which keeps running on the server (``await
    client.to_thread(operation.cancel)`` stops it).

    ``async with AsyncClient(...) as client`` closes it at the end of the block, as
    :meth:`close` does. Across processes it is as the Client: a process forked from its
    own uses it with threads of its own, started at its first call there, and it pickles
    as its arguments."""

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
        max_workers: int = DEFAULT_MAX_WORKERS,
    ) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers <= 0:
            raise ValueError(f"max_workers must be a positive integer (threads), got {max_workers!r}")
        # Its PlaintextTokenWarning points past this line, at the caller's.
        self.client = Client(target, timeout=timeout, token=token, max_message_bytes=max_message_bytes, retry=retry, tls=tls,
                             root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain)
        self.client._shown_as = type(self).__name__  # closed, it told an AsyncClient's user to make a new Client
        self._max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="explaind-async")
        self._executor_pid = os.getpid()

    @property
    def timeout(self) -> float:
        """The Client's :attr:`Client.timeout`: settable, for every later call (set here, it
        was an attribute no call read), and carried by a pickle."""
        return self.client.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self.client.timeout = seconds

    def _threads(self) -> ThreadPoolExecutor:
        """This process's pool of threads. In a process forked from the one that started
        it, a new one: the pool copied there counted idle threads that are not there, and
        a call waited for them forever."""
        if self._executor_pid != os.getpid():
            with _threads_lock:
                if self._executor_pid != os.getpid():
                    self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix="explaind-async")
                    self._executor_pid = os.getpid()
        return self._executor

    def __repr__(self) -> str:
        """As :meth:`Client.__repr__`, with its ``max_workers``."""
        return f"{type(self).__name__}({self.client._described_arguments(max_workers=self._max_workers)})"

    def __reduce__(self) -> tuple[Callable[[], AsyncClient], tuple[()], dict[str, Any]]:
        """Pickled as its arguments, as the Client: unpickled, a new client, closed if this
        one is, of the same run (run_id): a start it repeats is its own, not another run's."""
        return (functools.partial(type(self), **self.client._pickled_arguments(), max_workers=self._max_workers), (),
                self.client._pickled_state())

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.client._restore_run(state)
        if state["closed"]:
            self._close()

    async def close(self) -> None:
        """Close the connection, as :meth:`Client.close`: calls still running end as
        cancelled (CancelledError, explaind's; ValueError for one between retries), those
        waiting their turn and later ones raise ValueError; the threads end with them."""
        self._close()

    def _close(self) -> None:
        self.client.close()
        # Not the pool a forked process copied from its parent: it has no threads here, and
        # its lock, held by a parent thread at the fork, would stay held for good.
        if self._executor_pid == os.getpid():
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def to_thread(self, function: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[R]:
        """``function(*args, **kwargs)`` on this client's threads, in the caller's context
        (its OpenTelemetry span, say), as ``asyncio.to_thread`` does: for an Operation's
        blocking methods, ``await client.to_thread(operation.cancel)``. A cancelled await
        stops the Client's calls it makes as it does this client's own (see the class):
        the next one, or a read-only one in flight, raises ``grpc.FutureCancelledError`` in
        ``function``."""
        return self._in_thread(_Cancellation(), function, *args, **kwargs)

    def _in_thread(self, abandonment: _Cancellation, function: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[R]:
        """:meth:`to_thread`, the Client's calls of ``function`` stopped by ``abandonment``,
        which a cancelled await abandons."""
        self.client._require_open()  # a closed pool's own error named no client
        context = contextvars.copy_context()
        context.run(_abandonment.set, abandonment)
        running = asyncio.get_running_loop().run_in_executor(self._threads(), lambda: context.run(function, *args, **kwargs))
        # A cancelled await: the Client's calls in the thread make no further attempt (see _Cancellation.abandon).
        running.add_done_callback(lambda done: abandonment.abandon() if done.cancelled() else None)
        return running

    async def result(self, operation: Operation[R], *, progress: bool = False, timeout: float | None = None,
                     download: bool = True) -> R:
        """``operation.result(progress=progress, timeout=timeout, download=download)``,
        awaited: the job's result, or its OperationError, or DeadlineExceededError (whose
        ``operation`` is this one) when it is not done within ``timeout`` seconds (None: no
        limit). ``progress=True`` shows the job's progress as Operation.result does, read
        every ``PROGRESS_STEP_S``. It waits ``RESULT_STEP_S`` at a time; a cancelled
        await cancels the wait, freeing its thread at once; the job runs on (``await
        client.to_thread(operation.cancel)`` stops it; unlike Operation.result's Ctrl-C, a
        cancelled await does not)."""
        _require_operation(operation)
        timeout = checked_timeout(timeout)  # as Operation.result: a string failed mid-wait, naming no argument
        started = time.monotonic()
        with ProgressDisplay.of_job(operation) if progress else contextlib.nullcontext() as display:
            # With progress, a first look shows where the job stands at once (done already, too), as Operation.result's watch does.
            async for _ in self._waits(operation, timeout, PROGRESS_STEP_S if progress else RESULT_STEP_S, first_look=progress):
                if display is not None:
                    display.show_job(operation)
        if not operation.done:
            raise operation._late(timeout, started)
        return await self.to_thread(operation.result, download=download)

    async def watch(self, operation: Operation[R], *, timeout: float | None = WATCH_DEADLINE_S) -> AsyncIterator[Operation[R]]:
        """Yield ``operation`` as it is now and again whenever its state or progress changes,
        read every ``PROGRESS_STEP_S``, until it is done: ``async for``'s twin of
        Operation.watch (which streams; this polls, and a cancelled loop cancels its wait in
        flight, freeing its thread at once). After ``timeout`` seconds (None: no limit) it ends, though the job
        may still run: see ``operation.done``."""
        _require_operation(operation)
        timeout = checked_timeout(timeout)  # as Operation.watch, and None for no limit
        seen = None
        async for _ in self._waits(operation, timeout, PROGRESS_STEP_S, first_look=True):
            now = (operation.state, operation.progress.step, operation.progress.total, operation.progress.message)
            if now != seen:
                seen = now
                yield operation

    async def _waits(self, operation: Operation[Any], timeout: float | None, step: float, *,
                     first_look: bool = False) -> AsyncIterator[None]:
        """Wait for ``operation`` ``step`` seconds at a time until it is done or ``timeout``
        seconds (None: no limit) pass, yielding after each wait (and, with ``first_look``,
        after reading it once first). A wait that went unanswered (a hung server) ends it
        as late, or raises DeadlineExceededError without a timeout; UNAVAILABLE is retried
        on the next step while there is time."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        outage = RetryTally(time.monotonic())  # across the steps: the last one's UNAVAILABLE counts the whole outage's tries
        if first_look:
            await self.to_thread(operation._look, None)
            yield
        while not operation.done:
            left = deadline - time.monotonic()
            try:
                await self.to_thread(operation._wait, min(left, step), outage)  # 0 or less: one look
            except UnavailableError:  # one step's retries ended, not the wait's
                if not operation._client._waits_out_unavailable() or left <= step:
                    raise
            except DeadlineExceededError:  # a step's call went unanswered: late, as Operation.result says
                if timeout is None:
                    raise
                return
            yield
            if left <= step:
                return

    health = _awaitable(Client.health)
    wait_until_ready = _awaitable(Client.wait_until_ready)
    model_metadata = _awaitable(Client.model_metadata)
    predict = _awaitable(Client.predict)
    predictions = _iterated(Client.predictions)
    create_sample_set = _awaitable(Client.create_sample_set)
    append_samples = _awaitable(Client.append_samples)
    sample_set = _awaitable(Client.sample_set)
    samples = _iterated(Client.samples)
    sample_sets = _awaitable(Client.sample_sets)
    delete_sample_set = _awaitable(Client.delete_sample_set)
    evaluate_sample_set = _awaitable(Client.evaluate_sample_set)
    operation = _awaitable(Client.operation)
    operations = _awaitable(Client.operations)
    delete_operation = _awaitable(Client.delete_operation)
    rank_mistake_neurons = _awaitable(Client.rank_mistake_neurons)
    visualize_neurons = _awaitable(Client.visualize_neurons)
    edit_head = _awaitable(Client.edit_head)
    head_versions = _awaitable(Client.head_versions)
    head_version = _awaitable(Client.head_version)
    promote_head_version = _awaitable(Client.promote_head_version)
    rollback_head_version = _awaitable(Client.rollback_head_version)
    delete_head_version = _awaitable(Client.delete_head_version)
