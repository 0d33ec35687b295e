"""Admission of the long-lived calls that need no token: Health.Watch and reflection streams.

Each open stream holds one of the server's threads until it ends, and health and reflection are open to anyone:
unbounded, 140 Watch streams on one connection took every thread, and authenticated calls and health checks got
"Concurrent RPC limit exceeded!" (issue 15). They get threads of their own, at most `max_streams` per process and
`max_per_peer` per caller host; one more is RESOURCE_EXHAUSTED at once. Health.Check is unary and not counted.
"""

from __future__ import annotations

import threading
from collections import Counter

import grpc

from triptych.serving.errors import ResourceExhausted


def peer_host(peer: str) -> str:
    """The caller's host from a gRPC peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`, `unix:/path`)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


class ProbeStreams:
    """Counts open probe streams, per process and per caller host, until gRPC reports each one's end."""

    def __init__(self, max_streams: int, max_per_peer: int):
        self.max_streams = max_streams
        self.max_per_peer = max_per_peer
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()

    def admit(self, context: grpc.ServicerContext) -> None:
        host = peer_host(context.peer())
        with self._lock:
            if sum(self._open.values()) >= self.max_streams:
                raise ResourceExhausted(
                    f"this process has its most health-watch and reflection streams open ({self.max_streams}); "
                    "use Health.Check, or close a stream"
                )
            if self._open[host] >= self.max_per_peer:
                raise ResourceExhausted(
                    f"your host has its most health-watch and reflection streams open ({self.max_per_peer}); "
                    "use Health.Check, or close a stream"
                )
            self._open[host] += 1
        if not context.add_callback(lambda: self._done(host)):  # the call has already ended
            self._done(host)

    def _done(self, host: str) -> None:
        with self._lock:
            self._open[host] -= 1
            if self._open[host] <= 0:
                del self._open[host]
