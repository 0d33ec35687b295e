"""Admission of the calls that do work, and the graceful drain on shutdown (used by serving/server.py)."""

from __future__ import annotations

import threading

import grpc

from triptych.serving.errors import ResourceExhausted, Unavailable


class Drain:
    """Admission of the calls that do work (all but health checks and reflection). At most `max_calls` run at once;
    one more is RESOURCE_EXHAUSTED at once. Graceful shutdown: once started, new calls get UNAVAILABLE (callers and
    the gateway retry them on another replica) while the calls in flight run to their end; wait() returns when none
    is left or at the deadline."""

    def __init__(self, max_calls: int | None = None):
        self._condition = threading.Condition()
        self._in_flight = 0
        self.handlers = 0  # handler threads running (any call), which outlive a cancelled call until they return
        self._draining = False
        self.max_calls = max_calls

    def admit(self, context: grpc.ServicerContext) -> None:
        """Counts a new call until gRPC reports its end (completed, failed or cancelled); refuses it if draining or
        if max_calls are running."""
        with self._condition:
            if self._draining:
                raise Unavailable("this server is shutting down; retry on another replica")
            if self.max_calls is not None and self._in_flight >= self.max_calls:
                raise ResourceExhausted(
                    f"this process is serving its most calls at once (max_workers {self.max_calls}); "
                    "retry later or on another replica"
                )
            self._in_flight += 1
        if not context.add_callback(self._done):  # the call has already ended
            self._done()

    def _done(self) -> None:
        with self._condition:
            self._in_flight -= 1
            self._condition.notify_all()

    def wait(self, timeout: float) -> bool:
        """Starts draining and waits for the calls in flight; False if some were still running at the deadline."""
        with self._condition:
            self._draining = True
            return self._condition.wait_for(lambda: self._in_flight == 0, timeout)

    def handler_started(self) -> None:
        with self._condition:
            self.handlers += 1

    def handler_finished(self) -> None:
        with self._condition:
            self.handlers -= 1
            self._condition.notify_all()

    def wait_handlers(self, timeout: float) -> bool:
        """Waits for every handler thread to return; False if some still run at the deadline."""
        with self._condition:
            return self._condition.wait_for(lambda: self.handlers == 0, timeout)
