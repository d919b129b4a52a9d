"""The model registry: which classifier version serves, swapped atomically.

Readers take ``registry.active`` once per batch and use that object throughout, so a
swap (one reference assignment) never lets a batch mix a new head with old features:
every request sees the old pair or the new one; a head version is served by
``engine.activate(engine.models.active.with_head(head))``.
"""

from __future__ import annotations

import threading

from ..errors import Unavailable
from .models import ClassifierVersion


class ModelRegistry:
    """Holds the served :class:`ClassifierVersion`; ``active`` is UNAVAILABLE until one is."""

    def __init__(self) -> None:
        self._active: ClassifierVersion | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> ClassifierVersion:
        active = self._active
        if active is None:
            raise Unavailable("models are still loading; retry when health reports SERVING")
        return active

    def activate(self, version: ClassifierVersion) -> ClassifierVersion | None:
        """Make ``version`` the served one; returns the previous version."""
        with self._lock:
            previous, self._active = self._active, version
        return previous
