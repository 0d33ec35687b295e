"""`triptych serve http`: the HTTP API as its own process (uvicorn), beside a gateway it calls over gRPC."""

from __future__ import annotations

import socket

from triptych.http.settings import HTTPSettings
from triptych.serving.security import is_loopback, outgoing_channel_args
from triptych.serving.settings import ConfigurationError, Security


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(1024)  # listening before the SERVING line: a caller that reads it can connect at once
    return sock


def serve_http(settings: HTTPSettings, security: Security) -> int:
    """Serves until SIGINT/SIGTERM (uvicorn finishes the requests in flight). HTTPS with TRIPTYCH_TLS_CERT_FILE
    and _KEY_FILE; plaintext only on loopback unless TRIPTYCH_ALLOW_INSECURE=1, as the gRPC roles."""
    import uvicorn

    from triptych.client import open_channel
    from triptych.http.app import create_app

    if (security.tls_cert_file is None) != (security.tls_key_file is None):
        raise ConfigurationError("TLS needs both TRIPTYCH_TLS_CERT_FILE and TRIPTYCH_TLS_KEY_FILE")
    if security.tls_cert_file is None and not is_loopback(settings.host) and not security.allow_insecure:
        raise ConfigurationError(
            f"refusing to serve plaintext HTTP on {settings.host}: set TLS (see docs/security.md) or "
            "TRIPTYCH_ALLOW_INSECURE=1 on a trusted network"
        )
    channel_args = outgoing_channel_args(security, settings.gateway_address)
    fallback_token = channel_args.pop("auth_token")  # sent per call, so that a caller's own key can replace it
    try:
        channel = open_channel(settings.gateway_address, settings.max_message_bytes, **channel_args)
    except ValueError as exc:  # a malformed replica list
        raise ConfigurationError(str(exc)) from exc
    app = create_app(settings, channel, fallback_token)
    sock = _listen(settings.host, settings.http_port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        log_level="warning",
        ssl_certfile=str(security.tls_cert_file) if security.tls_cert_file else None,
        ssl_keyfile=str(security.tls_key_file) if security.tls_key_file else None,
        timeout_graceful_shutdown=30,
    )
    shown = f"[{host}]" if ":" in host else host
    print(f"triptych http SERVING {shown}:{port}", flush=True)  # as every single role prints it
    uvicorn.Server(config).run(sockets=[sock])
    channel.close()
    return 0
