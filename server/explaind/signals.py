"""Stopping the server on SIGTERM/SIGINT/SIGHUP, importable before anything heavy is."""

from __future__ import annotations

import signal
import threading


def stop_on_signals() -> threading.Event:
    """An event SIGTERM, SIGINT and SIGHUP set from now on. As early as it can be: a
    container's PID 1 ignores a signal it has no handler for, so a stop sent while the
    server starts (imports, store recovery) went unheeded until Kubernetes killed the pod.
    SIGHUP (its terminal closed, or an operator used to nginx's reload) killed the process
    mid-job: it stops gracefully as SIGTERM does, there being nothing to reload by hand (the
    token, callers and TLS files are reloaded as they change). One ignored when the server
    started (``nohup``) stays ignored, as ``nohup`` asked."""
    stop_requested = threading.Event()
    signals = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    for signum in signals:
        signal.signal(signum, lambda *_: stop_requested.set())
    return stop_requested
