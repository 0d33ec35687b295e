"""Busy time and steps per key (a model id): what the denoiser's metrics report as busy fraction and steps/s.
Torch-free; costs a clock read and a dict update per job and per step."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterator


class WorkMeter:
    """Seconds each key's work has run (a job still running counts up to now) and steps done per key."""

    def __init__(self):
        self._lock = threading.Lock()
        self._finished: Counter[Hashable] = Counter()
        self._running: dict[int, tuple[Hashable, float]] = {}
        self._tickets = itertools.count()
        self.steps: Counter[Hashable] = Counter()

    @contextlib.contextmanager
    def busy(self, key: Hashable) -> Iterator[None]:
        """Counts the block's time as `key`'s work."""
        ticket, started = next(self._tickets), time.monotonic()
        with self._lock:
            self._running[ticket] = (key, started)
        try:
            yield
        finally:
            with self._lock:
                del self._running[ticket]
                self._finished[key] += time.monotonic() - started

    def step(self, key: Hashable) -> None:
        self.steps[key] += 1

    def busy_seconds(self) -> dict[Hashable, float]:
        """Seconds of work per key so far, the running part included."""
        now = time.monotonic()
        with self._lock:
            seconds = dict(self._finished)
            for key, started in self._running.values():
                seconds[key] = seconds.get(key, 0.0) + now - started
        return seconds
