"""Bounded admission per key (model): a request beyond the bound is refused at once, never left to hang."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter

from triptych.serving.errors import ResourceExhausted


class BoundedQueue:
    """Counts requests per key (running + waiting); RESOURCE_EXHAUSTED when a key already has `limit`."""

    def __init__(self, limit: int, what: str):
        self.limit = max(1, limit)
        self.what = what
        self.rejected = 0
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def depths(self) -> dict[str, int]:
        """Requests admitted per key now (running + waiting); keys with none are left out (a gateway's keys are the
        model ids callers send, so only those in flight make a metrics series)."""
        with self._lock:
            return {key: count for key, count in self._counts.items() if count > 0}

    @contextlib.contextmanager
    def slot(self, key: str):
        with self._lock:
            if self._counts[key] >= self.limit:
                self.rejected += 1
                raise ResourceExhausted(
                    f"{self.what} queue for {key!r} is full ({self.limit} requests); retry later or on another replica"
                )
            self._counts[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[key] -= 1
                if not self._counts[key]:
                    del self._counts[key]  # keys come from callers (the gateway's model ids): keep only those in use
