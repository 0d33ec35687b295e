"""A bound on writing one message of a server stream: a caller that stops reading loses its call.

gRPC blocks the handler's thread in its send while the caller's flow-control window is full, and that thread holds
what the call holds: 16 Denoise streams whose caller never read them kept a model's queue full for 40+ s with the
denoiser idle (issue 15). Each message a tracked stream yields is registered here until gRPC asks for the next
one; one still unwritten after `timeout` seconds gets its call cancelled, which ends the send, closes the handler
and frees its slot.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

log = logging.getLogger("triptych")


class WriteBound:
    """One watchdog thread per process, started on first use, for every stream's message in flight."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._writing: dict[grpc.ServicerContext, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def writing(self, context: grpc.ServicerContext, method: str) -> None:
        """A message of `context`'s stream was handed to gRPC to write."""
        if self.timeout <= 0:
            return
        with self._lock:
            self._writing[context] = (time.monotonic() + self.timeout, method)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="write-bound", daemon=True)
                self._thread.start()

    def written(self, context: grpc.ServicerContext) -> None:
        """gRPC asked for the next message (or the stream ended): the last one left."""
        with self._lock:
            self._writing.pop(context, None)

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.5, self.timeout / 4))
            now = time.monotonic()
            with self._lock:
                overdue = [(c, m) for c, (deadline, m) in self._writing.items() if deadline <= now]
                for context, _ in overdue:
                    del self._writing[context]
            for context, method in overdue:
                log.warning("%s: the caller read nothing for %.0f s; call cancelled", method, self.timeout)
                context.cancel()
