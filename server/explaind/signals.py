"""Stopping the server on SIGTERM/SIGINT, importable before anything heavy is."""

from __future__ import annotations

import signal
import threading


def stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set from now on. As early as it can be: a container's
    PID 1 ignores a signal it has no handler for, so a stop sent while the server starts
    (imports, store recovery) went unheeded until Kubernetes killed the pod."""
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    return stop_requested
