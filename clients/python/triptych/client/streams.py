"""Retrying a server stream before its first message: our own code, not the channel's retry policy. Torch-free.

The channel retries unary methods only (transport.SERVICE_CONFIG): a stream that gRPC retried after a server-sent
UNAVAILABLE never completed once that server went away (grpcio 1.85). Here each attempt is a new call, which ends
like any call, and a stream is opened again only while nothing has arrived, so no message is ever repeated.

CANCELLED that this caller did not cause is retried too. A gRPC server that stops kills the calls it has received
but not yet handed to a handler, and their callers see CANCELLED, not UNAVAILABLE (grpc/grpc#41785, open; measured
here: a few calls in twenty stops of a loaded server). Nothing ran for them, so another attempt is safe.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from triptych.client.transport import RETRY_POLICY

# The caller's own cancel() sets _cancelled first, so a CANCELLED seen without it came from the server.
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


class RetriedStream:
    """A server-streaming call opened again, on the channel's next replica, when it fails UNAVAILABLE (or CANCELLED
    by the server, not by this caller: see above) before its first message: at most RETRY_POLICY's maxAttempts in
    all, with its jittered exponential backoff, and never past the deadline.
    After the first message an error is final, as for any stream.

    `open_call(timeout)` starts one attempt (`stub.Method(request, timeout=timeout)`). Iterate this object and use
    it as the call itself: cancel(), trailing_metadata(), code(), exception() ... act on the current attempt.
    """

    def __init__(self, open_call: Callable[[float | None], Any], timeout: float | None = None, policy=RETRY_POLICY):
        self._open = open_call
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._attempts_left = policy["maxAttempts"] - 1
        self._backoff = _seconds(policy["initialBackoff"])
        self._max_backoff = _seconds(policy["maxBackoff"])
        self._multiplier = policy["backoffMultiplier"]
        self._received = False
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._call = open_call(timeout)

    def _pause_before_retry(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt, or None when `error` is final."""
        if self._received or self._attempts_left <= 0 or self._cancelled.is_set():
            return None
        if not hasattr(error, "code") or error.code() not in _RETRIED:
            return None
        pause = random.uniform(0, self._backoff)  # gRPC's retry backoff: full jitter
        if self._deadline is not None and time.monotonic() + pause >= self._deadline:
            return None
        self._attempts_left -= 1
        self._backoff = min(self._backoff * self._multiplier, self._max_backoff)
        return pause

    def __iter__(self) -> RetriedStream:
        return self

    def __next__(self):
        while True:
            call = self._call
            try:
                message = next(call)
            except grpc.RpcError as error:
                pause = self._pause_before_retry(error)
                if pause is None:
                    raise
                self._cancelled.wait(pause)
                with self._lock:
                    remaining = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
                    self._call = self._open(remaining)
                    if self._cancelled.is_set():  # cancelled during the pause: this attempt ends CANCELLED at once
                        self._call.cancel()
                continue
            self._received = True
            return message

    def cancel(self) -> bool:
        """Cancels the attempt in flight and any attempt after it."""
        with self._lock:
            self._cancelled.set()
            return self._call.cancel()

    def __getattr__(self, name: str):
        return getattr(self._call, name)
