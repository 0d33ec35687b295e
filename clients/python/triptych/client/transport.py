"""How a Triptych channel is built: replica lists, load balancing and retries, TLS, bearer tokens. Torch-free.

An address is one `host:port` (or any gRPC target such as `dns:///name:port`), or a comma-separated list of
replicas `10.0.0.1:50061,10.0.0.2:50061`. Every channel balances round-robin over whatever its target
resolves to and retries UNAVAILABLE on another replica: unary methods by the service config below, server
streams before their first message by streams.RetriedStream.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import grpc

from triptych.v1 import (
    decoder_service_pb2,
    denoiser_service_pb2,
    encoder_service_pb2,
    image_service_pb2,
    runtime_service_pb2,
)

# Retried: only UNAVAILABLE (the replica is gone, draining or unreachable), and only for unary methods. Every
# Triptych RPC is deterministic for a given request (seeded), so a second attempt on another replica computes the
# same answer. gRPC does not retry a request bigger than its retry buffer: 256 KiB by default, too small for SDXL
# conditioning (~1.3 MB), so channels raise it to RETRY_BUFFER_BYTES (requests beyond it are not retried).
# Server-streaming methods get no channel retry policy: with grpcio 1.85 a stream retried after a server-sent
# UNAVAILABLE never completes once that server goes away (a drained denoiser left gateway calls hanging, and a
# gateway that could not exit). Streams are retried by our own code instead, before their first message only
# (streams.RetriedStream).
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
RETRY_BUFFER_BYTES = 32 * 1024 * 1024
# Unary methods outside triptych.v1 that our channels call: the health check (Watch streams, so it is not here).
_OTHER_UNARY_METHODS = (("grpc.health.v1.Health", "Check"),)


def unary_methods() -> list[dict[str, str]]:
    """Every unary method of triptych.v1 and the health check, as service-config names (read from the protos, so a
    new streaming method can never be retried by the channel by mistake)."""
    modules = (
        decoder_service_pb2,
        denoiser_service_pb2,
        encoder_service_pb2,
        image_service_pb2,
        runtime_service_pb2,
    )
    names = [{"service": service, "method": method} for service, method in _OTHER_UNARY_METHODS]
    for module in modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if not (method.client_streaming or method.server_streaming):
                    names.append({"service": service.full_name, "method": method.name})
    return names


SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": unary_methods(), "retryPolicy": RETRY_POLICY}],
    }
)
# Reconnection and keepalive for a mesh of our own replicas. gRPC's default reconnect backoff grows to 120 s: a
# replica that restarted stayed out of rotation for seconds to minutes, and when the next replica of a rolling
# update went down, calls failed UNAVAILABLE while the restarted one was serving (issue 15). Capped at 1 s here.
# Keepalive pings find a peer that vanished without a FIN (a killed node, a dropped route) in 20 + 10 s instead of
# the kernel's hours; servers accept them (serving/server.py SERVER_KEEPALIVE_OPTIONS).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _split_host_port(entry: str) -> tuple[str, str]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest.lstrip(":")
    host, _, port = entry.rpartition(":")
    if not host or not port.isdigit():
        return entry, ""  # no port: gRPC's default applies
    return host, port


def address_hosts(address: str) -> list[str]:
    """The hosts an address names (for the loopback check); a unix socket counts as `localhost`."""
    if address.startswith(("unix:", "unix-abstract:")):
        return ["localhost"]
    if address.startswith("dns:"):
        rest = address[len("dns:") :]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]  # drop the DNS server authority
        return [_split_host_port(rest)[0]]
    if address.startswith(("ipv4:", "ipv6:")):
        address = address[5:]
    return [_split_host_port(entry)[0] for entry in address.split(",")]


def channel_target(address: str) -> str:
    """The gRPC target for an address: a replica list becomes a static `ipv4:`/`ipv6:` list.

    Entries of a list must be IP literals (or `localhost`): names would be resolved once and never again. For
    replicas behind a name, give one `dns:///name:port` target; it is balanced round-robin too.
    """
    if address.startswith(_SCHEMES) or "," not in address:
        return address
    entries = []
    for entry in address.split(","):
        host, port = _split_host_port(entry)
        if not port:
            raise ValueError(f"replica list {address!r}: {entry!r} has no port")
        host = "127.0.0.1" if host == "localhost" else host
        try:
            entries.append((ipaddress.ip_address(host), port))
        except ValueError:
            raise ValueError(
                f"replica list {address!r}: {host!r} is not an IP address; list IP addresses, or give one "
                f"dns:///name:port target that resolves to every replica"
            ) from None
    versions = {ip.version for ip, _ in entries}
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in entries)
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in entries)
    raise ValueError(f"replica list {address!r} mixes IPv4 and IPv6 addresses; use one family per list")


def channel_credentials(
    ca_file: str | Path | None = None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: verify servers against `ca_file` (None = the system's roots) and, for servers that
    require client certificates (mTLS), present `cert_file` + `key_file`."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both its certificate file and its key file")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


class _Call(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = getattr(details, "compression", None)


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call. An interceptor rather than call credentials, which
    gRPC sends only over TLS: a loopback deployment with tokens but without TLS works too."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> _Call:
        return _Call(details, [*(details.metadata or []), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)
