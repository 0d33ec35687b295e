"""Channels, health waits and readable errors for Triptych services. Torch-free."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from triptych.client.streams import RetriedStream
from triptych.client.transport import CHANNEL_OPTIONS, RETRY_BUFFER_BYTES, SERVICE_CONFIG, BearerToken, channel_target
from triptych.v1 import image_service_pb2, image_service_pb2_grpc

DEFAULT_GATEWAY = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def open_channel(
    address: str,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    auth_token: str | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to one service or to a comma-separated list of its replicas (round-robin; unary calls that fail
    UNAVAILABLE are retried, streams are not: see streams.RetriedStream).

    `credentials` (see `transport.channel_credentials`) makes it TLS; None is plaintext, for loopback only.
    `auth_token` is sent as `authorization: Bearer <token>` on every call. `server_name` is the name the
    server certificate must carry when it differs from the address. The message limits must match the servers'.
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        *CHANNEL_OPTIONS,
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    target = channel_target(address)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    return grpc.intercept_channel(channel, BearerToken(auth_token)) if auth_token else channel


def wait_until_serving(address: str, timeout: float = 60.0, service: str = "", **channel_args) -> None:
    """Blocks until standard gRPC health at `address` reports SERVING; TimeoutError otherwise.

    `channel_args` go to `open_channel` (credentials, server_name); health needs no token.
    """
    deadline = time.monotonic() + timeout
    with open_channel(address, **channel_args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s")
            time.sleep(0.1)


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """The BadRequest field violations carried by an error's google.rpc.Status, if any."""
    status = rpc_status.from_call(error)
    found = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend((v.field, v.description) for v in bad.field_violations)
    return found


def describe_error(error: grpc.RpcError) -> str:
    """One line per problem: the status code, then each offending field."""
    lines = [f"{error.code().name}: {error.details()}"]
    lines += [f"  field {field}: {why}" for field, why in field_violations(error)]
    return "\n".join(lines)


def _copy_with(request: image_service_pb2.GenerateRequest, **fields) -> image_service_pb2.GenerateRequest:
    copy = image_service_pb2.GenerateRequest()
    copy.CopyFrom(request)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


class ImageClient:
    """Calls ImageService.Generate on a gateway."""

    def __init__(self, address: str = DEFAULT_GATEWAY, **channel_args):
        """`channel_args` go to `open_channel`: credentials, auth_token, server_name, max_message_bytes."""
        self.channel = open_channel(address, **channel_args)
        self.stub = image_service_pb2_grpc.ImageServiceStub(self.channel)
        self.max_message_bytes = channel_args.get("max_message_bytes", MAX_MESSAGE_BYTES)

    def stream(
        self, request: image_service_pb2.GenerateRequest, timeout: float | None = None
    ) -> Iterator[image_service_pb2.GenerateResponse]:
        """Progress events and images as they come. A call refused UNAVAILABLE before its first event (a draining or
        unreachable gateway) is made again, on the next replica of a list; the returned object is the call (cancel,
        trailing_metadata ...)."""
        if not request.HasField("max_response_bytes"):  # the gateway refuses up front what this channel cannot take
            request = _copy_with(request, max_response_bytes=self.max_message_bytes)
        return RetriedStream(lambda remaining: self.stub.Generate(request, timeout=remaining), timeout)

    def generate(
        self, request: image_service_pb2.GenerateRequest, timeout: float | None = None
    ) -> list[image_service_pb2.GeneratedImage]:
        """All images of a request, in index order."""
        return [event.image for event in self.stream(request, timeout) if event.HasField("image")]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ImageClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
