"""Retries: the channel retries unary methods only; a server stream is retried by RetriedStream, before its first
message only (issue 15, finding 1)."""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures

import grpc
import pytest

from triptych.client import open_channel
from triptych.client.streams import RetriedStream
from triptych.client.transport import SERVICE_CONFIG

_METHOD = "/test.Streams/Count"


def test_the_channel_retries_unary_methods_and_no_stream():
    (method_config,) = json.loads(SERVICE_CONFIG)["methodConfig"]
    names = {(name["service"], name.get("method")) for name in method_config["name"]}
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    for unary in [
        ("triptych.v1.TextEncoderService", "Encode"),
        ("triptych.v1.DecoderService", "Decode"),
        ("triptych.v1.DenoiserService", "ListSchedulers"),
        ("grpc.health.v1.Health", "Check"),
    ]:
        assert unary in names
    for stream in [
        ("triptych.v1.DenoiserService", "Denoise"),
        ("triptych.v1.ImageService", "Generate"),
        ("grpc.health.v1.Health", "Watch"),
    ]:
        assert stream not in names
    assert all(method is not None for _, method in names), "no service-wide (or every-method) entry"


class _Server:
    """An in-process server whose stream fails `refusal` (UNAVAILABLE) for its first `refusals` calls, then sends 3
    messages, each after `pause` seconds; with `fail_after_first`, every call sends one message and then fails
    UNAVAILABLE."""

    def __init__(
        self,
        refusals: int = 0,
        fail_after_first: bool = False,
        refusal: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        pause: float = 0.0,
    ):
        self.calls = 0
        self._lock = threading.Lock()

        def count(request: bytes, context):
            with self._lock:
                self.calls += 1
                call = self.calls
            if call <= refusals:
                context.abort(refusal, "draining")
            for i in range(3):
                time.sleep(pause)
                yield bytes([i])
                if fail_after_first:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "gone after a message")

        handler = grpc.method_handlers_generic_handler(
            "test.Streams", {"Count": grpc.unary_stream_rpc_method_handler(count)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stream(self, channel, timeout=None) -> RetriedStream:
        method = channel.unary_stream(_METHOD)
        return RetriedStream(lambda remaining: method(b"", timeout=remaining), timeout)


@pytest.fixture
def channel_to():
    servers, channels = [], []

    def open_(server: _Server):
        servers.append(server)
        channels.append(open_channel(f"127.0.0.1:{server.port}"))
        return channels[-1]

    yield open_
    for channel in channels:
        channel.close()
    for server in servers:
        server.server.stop(0)


def test_a_stream_refused_before_its_first_message_is_opened_again(channel_to):
    server = _Server(refusals=2)
    call = server.stream(channel_to(server))
    assert list(call) == [b"\x00", b"\x01", b"\x02"]
    assert server.calls == 3
    assert call.code() == grpc.StatusCode.OK


def test_a_stream_is_never_retried_after_its_first_message(channel_to):
    server = _Server(fail_after_first=True)
    call = server.stream(channel_to(server))
    received = []
    with pytest.raises(grpc.RpcError) as raised:
        for message in call:
            received.append(message)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert received == [b"\x00"] and server.calls == 1


def test_retries_stop_after_max_attempts(channel_to):
    server = _Server(refusals=100)
    with pytest.raises(grpc.RpcError) as raised:
        list(server.stream(channel_to(server)))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.calls == 5


def test_a_stream_the_server_cancelled_before_its_first_message_is_opened_again(channel_to):
    """A stopping gRPC server cancels the calls it has not handed to a handler yet, and their callers see CANCELLED
    (grpc/grpc#41785): nothing ran, so it is retried as UNAVAILABLE is."""
    server = _Server(refusals=2, refusal=grpc.StatusCode.CANCELLED)
    call = server.stream(channel_to(server))
    assert list(call) == [b"\x00", b"\x01", b"\x02"]
    assert server.calls == 3


def test_a_stream_its_caller_cancelled_is_not_opened_again(channel_to):
    server = _Server(pause=5.0)
    call = server.stream(channel_to(server))
    threading.Timer(0.2, call.cancel).start()
    with pytest.raises(grpc.RpcError) as raised:
        next(call)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert server.calls == 1
