"""A server-wide budget on the memory that requests' images take while they decode
([server].max_decode_bytes): without it each gRPC worker thread could hold several times
the largest message at once, 64 threads 44 GiB (docs/configuration.md, Memory)."""

from __future__ import annotations

import ctypes
import math
import platform
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Gauge, Histogram

from .errors import Cancelled, DeadlineExceeded

MIB = 1024 * 1024
# A decode that may take less is not reserved: it takes no lock, so a Predict of a few
# thumbnails (an image file under 0.6 megapixels) pays nothing, and 64 threads decoding
# that much each hold 1 GiB at most.
UNRESERVED_DECODE_BYTES = 16 * MIB
# What an image file takes while it decodes, per pixel of the size it decodes to (its
# header's, but a JPEG's at reduced scale), at worst: a lossless WebP with alpha turned by
# its EXIF Orientation took 25.2, a phone's JPEG turned upright 14.1, PNGs 10 to 18
# (bench/decode_bytes_per_pixel.py, 4096²). A JPEG libjpeg buffers whole reserves its
# coefficients besides (explaind.imaging's _decode_bytes).
ENCODED_DECODE_BYTES_PER_PIXEL = 26
# What a raw tensor's decode takes per value beside its own bytes: its float32 copy.
TENSOR_DECODE_BYTES_PER_VALUE = 4
# An upload's more per value: the uint8 pixels and their PNG (at most about as large).
UPLOAD_BYTES_PER_VALUE = 2
# How often a waiting call looks whether its caller left (seconds).
_CANCEL_POLL_S = 0.1


def _glibc_malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``: it hands the free memory of every thread's malloc arena
    back to the system. None on other C libraries (musl, macOS), which keep no such arenas."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


# Called once a lease is given back: each worker thread's glibc arena otherwise keeps
# the buffers its large decodes freed, several times the message each
# (docs/configuration.md, Memory; bench/request_memory.py).
_MALLOC_TRIM = _glibc_malloc_trim()


def trim_arenas() -> None:
    """Hand the free memory of every malloc arena back to the system (glibc's
    ``malloc_trim(0)``; nothing elsewhere): 0.04 ms with nothing to free."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM()


class CallContext(Protocol):
    """What a wait needs of a grpc.ServicerContext."""

    def time_remaining(self) -> float | None: ...

    def is_active(self) -> bool: ...


class DecodeMemory:
    """The bytes all calls' decodes may hold at once. A call's :class:`DecodeLease` holds
    the most any of its images needs (they decode one at a time) and waits for room; one
    asking more than the whole budget runs once nothing else holds any, alone. Waits are
    served first come first served: a call never takes room ahead of an earlier waiter, so
    a stream of small reservations cannot starve a large one."""

    def __init__(self, capacity: int, *, held_gauge: Gauge | None = None, wait_seconds: Histogram | None = None) -> None:
        self.capacity = capacity
        self.held = 0
        self._room = threading.Condition()
        self._waiting: deque[object] = deque()  # the waiting leases' tickets, in arrival order
        self._held_gauge, self._wait_seconds = held_gauge, wait_seconds

    def lease(self, context: CallContext, *, trim: bool = True) -> DecodeLease:
        """A call's lease, empty: release it (``with``) once its images are decoded. Given
        back, it trims the arenas (:func:`trim_arenas`) unless ``trim`` is False, for a
        caller that trims once after many decodes: a job's feature pass trimming after each
        of 16 stored 1024² images took 1.28x as long."""
        return DecodeLease(self, context, trim=trim)

    def _fits(self, nbytes: int) -> bool:
        return self.held + nbytes <= self.capacity or self.held == 0

    def _add(self, nbytes: int) -> None:
        """Take ``nbytes`` (give them back if negative); the caller holds the lock."""
        self.held += nbytes
        if self._held_gauge is not None:
            self._held_gauge.set(self.held)

    def _give_back(self, nbytes: int, *, trim: bool) -> None:
        with self._room:
            self._add(-nbytes)
            self._room.notify_all()
        if trim:
            trim_arenas()


class DecodeLease:
    """The decode memory one call holds, grown image by image to the most one needs."""

    def __init__(self, memory: DecodeMemory, context: CallContext, *, trim: bool = True) -> None:
        self._memory, self._context, self._trim = memory, context, trim
        self.held = 0

    def reserve(self, nbytes: int) -> None:
        """Hold at least ``nbytes``, waiting for room within the call's deadline (else
        DEADLINE_EXCEEDED) while the caller stays (else CANCELLED). A lease that must
        wait to grow gives back what it holds first: no call waits holding any, so
        calls never wait on each other in a cycle. The wait is timed however it ends: a
        call that gave up is the one the budget starved most."""
        if nbytes <= self.held or nbytes < UNRESERVED_DECODE_BYTES:
            return
        memory = self._memory
        started = time.monotonic()
        try:
            with memory._room:
                if memory._waiting or not memory._fits(nbytes - self.held):
                    memory._add(-self.held)
                    self.held = 0
                    memory._room.notify_all()
                    self._wait(nbytes, started)
                memory._add(nbytes - self.held)
                self.held = nbytes
        finally:
            if memory._wait_seconds is not None:
                memory._wait_seconds.observe(time.monotonic() - started)

    def _wait(self, nbytes: int, started: float) -> None:
        """Wait, holding the budget's lock, until this lease is the earliest waiter and
        ``nbytes`` fit."""
        memory, ticket = self._memory, object()
        remaining = self._context.time_remaining()
        deadline = started + remaining if remaining is not None and math.isfinite(remaining) and remaining < threading.TIMEOUT_MAX else math.inf
        memory._waiting.append(ticket)
        try:
            while memory._waiting[0] is not ticket or not memory._fits(nbytes):
                if not self._context.is_active():
                    raise Cancelled("the call was cancelled")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"the call's images found no room to decode in [server].max_decode_bytes "
                                           f"({memory.capacity} bytes) before its deadline")
                memory._room.wait(min(left, _CANCEL_POLL_S))
        finally:
            memory._waiting.remove(ticket)
            memory._room.notify_all()  # the next waiter may be first now

    def release(self) -> None:
        if self.held:
            held, self.held = self.held, 0
            self._memory._give_back(held, trim=self._trim)

    def __enter__(self) -> DecodeLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
