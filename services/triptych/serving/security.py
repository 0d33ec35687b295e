"""Transport security and caller authentication, for every role: TLS/mTLS credentials from settings, the
plaintext-on-loopback-only rule, the bearer-token interceptor and the outgoing channels. See docs/security.md.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from pathlib import Path

import grpc

from triptych.client.connection import open_channel
from triptych.client.transport import address_hosts, channel_credentials
from triptych.serving.errors import Unauthenticated
from triptych.serving.observe import client_interceptors
from triptych.serving.settings import ConfigurationError, Security, Settings

log = logging.getLogger("triptych")

# Open without a token: health (load balancers and supervisors probe it) and reflection (it describes the
# API, which is public in protos/ anyway). Everything else, RuntimeService included, needs a token when set.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_INSECURE_HINT = "set TLS (see docs/security.md) or TRIPTYCH_ALLOW_INSECURE=1 on a trusted network"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals (127.0.0.0/8, ::1); names other than localhost are not."""
    if host.startswith("unix:"):  # a unix socket never leaves the host
        return True
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: Path, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{name}: cannot read {path}: {exc.strerror}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (mTLS when tls_client_ca_file is set) for the listening port; None = plaintext, where allowed."""
    sec = settings.security
    if (sec.tls_cert_file is None) != (sec.tls_key_file is None):
        raise ConfigurationError("TLS needs both TRIPTYCH_TLS_CERT_FILE and TRIPTYCH_TLS_KEY_FILE")
    if sec.tls_cert_file is None:
        if sec.tls_client_ca_file is not None:
            raise ConfigurationError(
                "TRIPTYCH_TLS_CLIENT_CA_FILE (mTLS) needs TLS: set TRIPTYCH_TLS_CERT_FILE, _KEY_FILE"
            )
        if not is_loopback(settings.host):
            if not sec.allow_insecure:
                raise ConfigurationError(f"refusing to serve plaintext on {settings.host}: {_INSECURE_HINT}")
            log.warning("serving plaintext on %s (TRIPTYCH_ALLOW_INSECURE=1)", settings.host)
        return None
    key, chain = _read(sec.tls_key_file, "tls_key_file"), _read(sec.tls_cert_file, "tls_cert_file")
    client_ca = _read(sec.tls_client_ca_file, "tls_client_ca_file") if sec.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def outgoing_credentials(security: Security) -> grpc.ChannelCredentials | None:
    """TLS credentials for calls this process makes (None = plaintext): tls_ca_file turns TLS on."""
    client_cert = security.tls_client_cert_file is not None or security.tls_client_key_file is not None
    if security.tls_ca_file is None:
        if client_cert:
            raise ConfigurationError("a client certificate needs TLS: set TRIPTYCH_TLS_CA_FILE too")
        return None
    try:
        return channel_credentials(security.tls_ca_file, security.tls_client_cert_file, security.tls_client_key_file)
    except ValueError as exc:
        raise ConfigurationError(f"{exc}: set TRIPTYCH_TLS_CLIENT_CERT_FILE and TRIPTYCH_TLS_CLIENT_KEY_FILE") from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot read {exc.filename}: {exc.strerror}") from exc


def outgoing_channel_args(security: Security, address: str) -> dict:
    """`open_channel` keyword arguments for calls from this process to `address`: TLS, token, server name.

    Plaintext to a non-loopback address is refused unless allow_insecure: a prompt, an image or a token must
    not cross a network in the clear by accident.
    """
    credentials = outgoing_credentials(security)
    try:
        hosts = address_hosts(address)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc
    if credentials is None and not security.allow_insecure:
        remote = [host for host in hosts if not is_loopback(host)]
        if remote:
            raise ConfigurationError(f"refusing to call {remote[0]} in plaintext: {_INSECURE_HINT}")
    return {
        "credentials": credentials,
        "auth_token": security.outgoing_token(),
        "server_name": security.tls_server_name,
    }


def outgoing_channel(security: Security, address: str, max_message_bytes: int) -> grpc.Channel:
    """A channel to `address` (one service or a replica list) with this process's TLS and token."""
    channel_args = outgoing_channel_args(security, address)
    try:
        channel = open_channel(address, max_message_bytes, **channel_args)
    except ValueError as exc:  # a malformed replica list
        raise ConfigurationError(str(exc)) from exc
    interceptors = client_interceptors()  # tracing's traceparent, when on (serving/observe.py)
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def check_serves_and_calls(security: Security) -> None:
    """`triptych serve` runs the backends and a gateway that calls them with the same settings: the client
    half must match the server half, else every request would fail. Says which setting is missing."""
    if security.tls_cert_file is not None and security.tls_ca_file is None:
        raise ConfigurationError(
            "the gateway verifies the backends' certificate: set TRIPTYCH_TLS_CA_FILE to the CA that signed "
            "TRIPTYCH_TLS_CERT_FILE"
        )
    if security.tls_client_ca_file is not None and security.tls_client_cert_file is None:
        raise ConfigurationError(
            "the backends require client certificates (mTLS): set TRIPTYCH_TLS_CLIENT_CERT_FILE and "
            "TRIPTYCH_TLS_CLIENT_KEY_FILE for the gateway"
        )
    if security.accepted_tokens() and security.outgoing_token() is None:
        raise ConfigurationError(
            "the backends require a bearer token: set TRIPTYCH_CLIENT_AUTH_TOKEN(_FILE) for the gateway"
        )


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for every call without `authorization: Bearer <one of the accepted tokens>`, except
    health and reflection. Placed inside ErrorInterceptor, so the refusal is mapped like any typed error."""

    def __init__(self, tokens: list[str]):
        self._tokens = [token.encode() for token in tokens]

    def _accepts(self, token: str | None) -> bool:
        if token is None:
            return False
        offered = token.encode()
        # compare_digest against every token: the time taken does not say how much of a token matched.
        return sum(hmac.compare_digest(offered, known) for known in self._tokens) > 0

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES) or self._accepts(_bearer(handler_call_details.invocation_metadata)):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return None if handler is None else _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler that raises Unauthenticated without reading the request: a request-streaming one whatever the
    method's kind, so that gRPC never asks for the request message (up to max_message_bytes) of a refused call."""

    def refuse(requests, context):
        raise Unauthenticated("missing or invalid bearer token: send metadata 'authorization: Bearer <token>'")

    def refuse_stream(requests, context):
        refuse(requests, context)
        yield  # pragma: no cover - makes this a generator, as a streaming handler must be

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    return grpc.stream_unary_rpc_method_handler(refuse)


def describe(settings: Settings) -> str:
    """One line for the log: how this process's port is protected."""
    sec = settings.security
    transport = "plaintext" if sec.tls_cert_file is None else ("mTLS" if sec.tls_client_ca_file else "TLS")
    return f"{transport}, {'bearer tokens required' if sec.accepted_tokens() else 'no token required'}"


def server_interceptors(settings: Settings) -> list[grpc.ServerInterceptor]:
    """The interceptors security adds (after ErrorInterceptor): the token check when tokens are set."""
    tokens = settings.security.accepted_tokens()
    return [BearerTokenInterceptor(tokens)] if tokens else []
