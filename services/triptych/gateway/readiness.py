"""The gateway's readiness: SERVING only while every backend it chains answers its health check SERVING.

A gateway that reported SERVING with no denoiser behind it took traffic it could only fail (issue 15). Health names
on a gateway: "" and `triptych.v1.ImageService` = ready (every backend serving); each backend's service name
(`triptych.v1.DenoiserService`, ...) = that dependency, as the gateway sees it; `liveness` (serving/server.py) = the
process runs, whatever its backends. Probe readiness to route traffic and liveness to restart: a gateway whose
denoiser is down must be taken out of rotation, never restarted for it.
"""

from __future__ import annotations

import logging
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger("triptych")

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
# How often each backend's health is checked, and how long one check may take.
POLL_SECONDS = 1.0


class Backend:
    """One dependency: its role, the service its health is checked for, the gateway's channel to it, and how many
    replicas its address lists (a list is serving while any of them is)."""

    def __init__(self, role: str, service: str, channel: grpc.Channel, replicas: int):
        self.role, self.service, self.replicas = role, service, max(1, replicas)
        self._health = health_pb2_grpc.HealthStub(channel)

    def serving(self) -> bool:
        # Round-robin: each check may reach another replica; a draining one answers NOT_SERVING.
        for _ in range(min(self.replicas, 4)):
            try:
                reply = self._health.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=POLL_SECONDS)
                if reply.status == SERVING:
                    return True
            except grpc.RpcError:
                pass
        return False


class Readiness:
    """Sets the gateway's health from its backends', now and every POLL_SECONDS, on a thread of its own."""

    def __init__(self, backends: list[Backend], own_services: list[str]):
        self.backends = backends
        self.own_services = ["", *own_services]
        self._stop = threading.Event()
        self._last: dict[str, bool] = {}

    def start(self, health_servicer: health.HealthServicer) -> None:
        for name in [*self.own_services, *(backend.service for backend in self.backends)]:
            health_servicer.set(name, NOT_SERVING)
        threading.Thread(target=self._run, args=(health_servicer,), name="readiness", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, health_servicer: health.HealthServicer) -> None:
        while True:
            self.poll(health_servicer)
            if self._stop.wait(POLL_SECONDS):
                return

    def poll(self, health_servicer: health.HealthServicer) -> None:
        """One round: each backend's status, then the gateway's own (once draining, health ignores both)."""
        states = {backend.role: backend.serving() for backend in self.backends}
        for backend in self.backends:
            health_servicer.set(backend.service, SERVING if states[backend.role] else NOT_SERVING)
            if self._last.get(backend.role) != states[backend.role]:
                log.info("%s %s", backend.role, "serving" if states[backend.role] else "NOT serving: gateway not ready")
        self._last = states
        ready = SERVING if all(states.values()) else NOT_SERVING
        for name in self.own_services:
            health_servicer.set(name, ready)
