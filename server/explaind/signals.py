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
    token, callers and TLS files are reloaded as they change). SIGHUP or SIGINT ignored when
    the server started stays ignored, as Python leaves SIGINT, and as asked: ``nohup``
    ignores SIGHUP, and a shell without job control (``explaind serve &`` in a script)
    SIGINT, so that a Ctrl-C meant for the script's foreground does not stop it too."""
    stop_requested = threading.Event()
    signals = [signal.SIGTERM, *(signum for signum in (signal.SIGINT, signal.SIGHUP) if signal.getsignal(signum) is not signal.SIG_IGN)]
    for signum in signals:
        signal.signal(signum, lambda *_: stop_requested.set())
    return stop_requested
