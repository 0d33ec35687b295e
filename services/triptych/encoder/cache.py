"""A least-recently-used cache bounded by bytes, for encoder results (tensors that are never modified)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class ByteBoundedLRU:
    """Keeps values while their total size is at most `max_bytes` (0 disables caching); counts hits/misses."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, max_bytes)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> Any | None:
        """The value stored under `key` (now the most recently used), or None (counted only when enabled)."""
        if self.max_bytes == 0:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        """Stores `value` (`size` bytes), evicting the least recently used; a value larger than the bound is
        not stored."""
        if self.max_bytes == 0 or size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.bytes -= previous[1]
            self._entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted
                self.evictions += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
