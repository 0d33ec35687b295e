"""A second port that serves grpc.health.v1 alone, in plaintext (settings.health_port; off by default).

Kubernetes' gRPC probes speak no TLS: against a port that serves TLS (docs/security.md) they fail their handshake.
This port answers the same health names from the same servicer (`liveness`, readiness `""` and each service name,
NOT_SERVING from the start of a drain) and nothing else, so nothing a caller sends or receives ever crosses it.
Watch streams are bounded as on the main port (serving/probes.py).
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from triptych.serving.message_limits import SMALL_REQUEST_BYTES
from triptych.serving.settings import Settings


def start_health_port(health_servicer: health.HealthServicer, settings: Settings) -> grpc.Server | None:
    """Starts the health-only server on settings.host:health_port; None when the setting is unset."""
    if settings.health_port is None:
        return None
    from triptych.serving.drain import Drain
    from triptych.serving.probes import ProbeStreams
    from triptych.serving.server import PROBE_RESERVE, SERVER_KEEPALIVE_OPTIONS, ErrorInterceptor
    from triptych.serving.settings import ConfigurationError

    threads = settings.max_probe_streams + PROBE_RESERVE
    probe_streams = ProbeStreams(settings.max_probe_streams, settings.max_probe_streams_per_peer)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="health"),
        interceptors=[ErrorInterceptor(Drain(), probe_streams)],
        options=[("grpc.max_receive_message_length", SMALL_REQUEST_BYTES), *SERVER_KEEPALIVE_OPTIONS],
        maximum_concurrent_rpcs=threads,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ConfigurationError(f"TRIPTYCH_HEALTH_PORT: cannot bind {settings.host}:{settings.health_port}")
    server.start()
    return server


def probe(port: int, service: str = "") -> bool:
    """Whether 127.0.0.1:port answers SERVING for `service` (the image's HEALTHCHECK: `python3 -m
    triptych.serving.health_port PORT [SERVICE]`)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=3)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    import sys

    sys.exit(0 if probe(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "") else 1)
