"""Dynamic batching: concurrent submissions that share a key run in one call.

One worker thread takes the oldest waiting submission, gathers the others with the same key (oldest first,
up to `max_rows` rows in all; a submission larger than that runs alone), waits for more to come (at most
`max_wait_s` after the oldest arrived, and only while a caller has announced one that is still being
prepared, so a lone caller never waits), then calls `run(key, works)` once for all of them. Submissions with
another key wait for a later call. The key is whatever makes a shared call correct (for the encoder: the loaded model
and the LoRA set, which are per-model state); everything else is handled per row by `run`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Pending:
    key: Hashable
    work: Any
    rows: int
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


@dataclass
class _Ticket:
    preparing: bool = True


class Batcher:
    """Runs `run(key, works) -> results` (one result per work, in order; an Exception instance fails only that
    work) for batches of concurrent submissions."""

    def __init__(self, run: Callable[[Hashable, list], Sequence], max_rows: int, max_wait_s: float, name: str):
        self._run = run
        self._max_rows = max(1, max_rows)
        self._max_wait_s = max(0.0, max_wait_s)
        self._name = name
        self._queue: deque[_Pending] = deque()
        self._condition = threading.Condition()
        self._worker: threading.Thread | None = None
        self._preparing = 0  # callers inside announced() that have not submitted yet
        self.calls = 0  # calls of `run`
        self.works = 0  # submissions served
        self.rows = 0  # rows served
        self.shared_calls = 0  # calls that served more than one submission
        self.batch_sizes: Counter[int] = Counter()  # calls by how many submissions they served

    @contextlib.contextmanager
    def announced(self):
        """Marks a submission as on its way while the caller prepares it, so batches wait for it; yields the
        `submit(key, work, rows)` to use. Leaving the block without submitting (an error, a cache hit) ends
        the announcement too."""
        ticket = _Ticket()
        with self._condition:
            self._preparing += 1
        try:
            yield functools.partial(self._submit, ticket)
        finally:
            with self._condition:
                self._arrived(ticket)

    def submit(self, key: Hashable, work: Any, rows: int):
        """Blocks until `work` has run (with whatever joined it) and returns its result or raises its error."""
        return self._submit(None, key, work, rows)

    def _arrived(self, ticket: _Ticket | None) -> None:
        """Ends an announcement (callers hold the condition)."""
        if ticket is not None and ticket.preparing:
            ticket.preparing = False
            self._preparing -= 1
            self._condition.notify_all()

    def _submit(self, ticket: _Ticket | None, key: Hashable, work: Any, rows: int):
        pending = _Pending(key, work, rows)
        with self._condition:
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._worker.start()
            self._arrived(ticket)
            self._queue.append(pending)
            self._condition.notify_all()
        return pending.future.result()

    def _gather(self, key: Hashable) -> tuple[list[_Pending], int]:
        """The queued submissions with `key` that fit in one call, oldest first (the oldest always fits)."""
        batch, rows = [], 0
        for pending in self._queue:
            if pending.key == key and (not batch or rows + pending.rows <= self._max_rows):
                batch.append(pending)
                rows += pending.rows
        return batch, rows

    def _next_batch(self) -> list[_Pending]:
        with self._condition:
            while not self._queue:
                self._condition.wait()
            oldest = self._queue[0]
            deadline = oldest.arrived + self._max_wait_s
            while True:
                batch, rows = self._gather(oldest.key)
                remaining = deadline - time.monotonic()
                if rows >= self._max_rows or remaining <= 0 or self._preparing == 0:
                    break
                self._condition.wait(remaining)
            for pending in batch:
                self._queue.remove(pending)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            self.calls += 1
            self.batch_sizes[len(batch)] += 1  # submissions per call, for the metrics' histogram
            self.works += len(batch)
            self.rows += sum(pending.rows for pending in batch)
            self.shared_calls += len(batch) > 1
            try:
                results = list(self._run(batch[0].key, [pending.work for pending in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} submissions")
            except Exception as exc:  # noqa: BLE001 - the error belongs to every caller in the batch
                results = [exc] * len(batch)
            for pending, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
