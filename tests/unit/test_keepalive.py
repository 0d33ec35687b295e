"""Keepalive between our channels and our servers: a stream that sends nothing for longer than a few client pings
survives. Scaled down (pings every second, gRPC's shortest, against a 0.1 s minimum) so that it takes seconds, with
the servers' own option keys; with a key gRPC does not know, the server's 5-minute default applies and the third
ping ends the connection with "Too many pings", which is what happened to minute-long Generate streams before."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from triptych.client.transport import CHANNEL_OPTIONS
from triptych.serving.server import server_keepalive_options


class _QuietStream(health_pb2_grpc.HealthServicer):
    def Watch(self, request, context):
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        time.sleep(4.0)  # nothing sent for four client pings
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _watch(server_options) -> int:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options)
    health_pb2_grpc.add_HealthServicer_to_server(_QuietStream(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client_options = [(k, 1000 if k == "grpc.keepalive_time_ms" else v) for k, v in CHANNEL_OPTIONS]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=client_options) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=20)
            return len(list(stream))
    finally:
        server.stop(None)


def test_a_quiet_stream_survives_the_clients_keepalive_pings():
    assert _watch(server_keepalive_options(min_ping_interval_ms=100)) == 2


def test_without_the_servers_permission_the_same_stream_is_cut():
    """The check above can fail: the server's default policy cuts the same stream."""
    try:
        _watch([("grpc.keepalive_permit_without_calls", 1)])
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "ping" in error.details().lower()
    else:
        raise AssertionError("the stream survived a server that forbids frequent pings")
