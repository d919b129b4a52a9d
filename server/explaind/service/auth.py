"""The bearer token calls must carry: fixed ([server].token), or a file's content
([server].token_file) that is read again when the file changes, so a rotated secret
(Kubernetes swaps a mounted Secret's files in place) takes effect without a restart."""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable

from ..config import token_problem

log = logging.getLogger(__name__)

# How often a call may look at the token file's modification time, in seconds.
RECHECK_INTERVAL_S = 1.0


class BearerToken:
    def __init__(self, token: str, path: str = "") -> None:
        """``token`` is the current one ("" = no auth), already read from ``path`` if any."""
        self._token = token
        self._path = path
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._stamp = self._file_stamp()

    def allows(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """Whether the call's metadata carries ``authorization: Bearer <token>``, compared in
        constant time (a caller cannot guess the token from how long a refusal takes)."""
        token = self.current()
        if not token:
            return True
        expected = f"Bearer {token}".encode()
        given = [value.encode() if isinstance(value, str) else value for key, value in metadata or () if key == "authorization"]
        return any(hmac.compare_digest(value, expected) for value in given)

    def current(self) -> str:
        """The token, re-read from the file when it has changed since the last look."""
        if not self._path:
            return self._token
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= RECHECK_INTERVAL_S:
                self._checked_at = now
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    self._stamp = stamp
                    self._reload()
            return self._token

    def _file_stamp(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime ns) of the file, following links; None when there is none."""
        if not self._path:
            return None
        try:
            status = os.stat(self._path)
        except OSError:
            return None
        return status.st_ino, status.st_size, status.st_mtime_ns

    def _reload(self) -> None:
        # A file that cannot be read or is empty keeps the old token: a half-done rotation
        # must not lock every caller out (nor open the server to all).
        try:
            token = open(self._path, encoding="utf-8").read().strip()
        except (OSError, UnicodeDecodeError) as error:
            log.warning("token file %s could not be read (%s); the previous token stays in force", self._path, type(error).__name__)
            return
        if problem := token_problem(token):
            log.warning("token file %s %s; the previous token stays in force", self._path, problem)
            return
        if token != self._token:
            self._token = token
            log.info("token file %s changed; calls now need the new token", self._path)
