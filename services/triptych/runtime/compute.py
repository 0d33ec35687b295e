"""One compute thread per model: all of a model's torch work (its loading included) runs on the same thread.

Why not in the gRPC worker threads: on a CPU, torch's OpenMP thread team belongs to the thread that opens a
parallel region. Work that hops between worker threads keeps several teams alive, whose spinning threads
compete for the cores, and spreads allocations over several malloc arenas. Measured here (2 cores, tiny SDXL
VAE decode): 15 ms on one steady thread, 22-31 ms from worker threads. Two models still run side by side, each on
its own thread, so a long job on one model never holds up another model.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from triptych.serving.errors import Cancelled

T = TypeVar("T")
_DONE = object()
POLL_SECONDS = 0.25  # how often a stream waiting for its next item checks that its caller is still there


class ComputeThreads:
    """A single-thread executor per key (a model id), the `keep` most recently used kept; older ones retire
    once their queued work is done."""

    def __init__(self, name: str, keep: int = 8):
        self._name = name
        self._keep = max(1, keep)
        self._executors: OrderedDict[Hashable, ThreadPoolExecutor] = OrderedDict()
        self._lock = threading.Lock()

    def _executor(self, key: Hashable) -> ThreadPoolExecutor:
        with self._lock:
            executor = self._executors.pop(key, None)
            if executor is None:
                executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self._name} {key}")
            self._executors[key] = executor
            while len(self._executors) > self._keep:
                _, retired = self._executors.popitem(last=False)
                retired.shutdown(wait=False)  # what it has queued still runs
            return executor

    def run(self, key: Hashable, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the key's thread; returns its result or raises its exception here."""
        return self._executor(key).submit(fn, *args).result()

    def stream(
        self, key: Hashable, make: Callable[[], Iterator[T]], is_active: Callable[[], bool] | None = None
    ) -> Iterator[T]:
        """Runs the iterator `make()` on the key's thread and yields its items here, as they come.

        Closing this generator (the caller went away) closes the iterator after its current item, on its thread.
        With `is_active`, a wait for the next item (behind other work on the thread, or a long step) that sees it
        turn false raises Cancelled within POLL_SECONDS, so what this caller holds (an admission slot, a gRPC
        worker thread) is freed then; `make()` that has not started yet is expected to check it too.
        """
        items: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        # The only reference the queued task holds to the job: a caller that leaves before it starts takes it
        # back, so what the job carries (tensors, guide images) is freed then, not when the task's turn comes.
        pending = {"make": make}

        def produce() -> None:
            make_now = pending.pop("make", None)
            if make_now is None:
                return  # its caller went away before it started
            try:
                with contextlib.closing(make_now()) as iterator:
                    for item in iterator:
                        items.put((item, None))
                        if stop.is_set():
                            return
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                items.put((None, exc))
                return
            items.put((_DONE, None))

        del make
        task = self._executor(key).submit(produce)
        try:
            while True:
                try:
                    item, error = items.get(timeout=None if is_active is None else POLL_SECONDS)
                except queue.Empty:
                    if not is_active():
                        raise Cancelled("the caller went away (cancelled, or past its deadline)") from None
                    continue
                if error is not None:
                    raise error
                if item is _DONE:
                    return
                yield item
        finally:
            stop.set()
            pending.pop("make", None)
            task.cancel()  # one that has not started is skipped when its turn comes
