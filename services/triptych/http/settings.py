"""The HTTP role's settings: environment variables with the TRIPTYCH_ prefix (or `triptych serve http` flags).
TLS and tokens are the shared `Security` settings (docs/security.md)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HTTP_PORT = 8080


class HTTPSettings(BaseSettings):
    """Where the HTTP API listens and which gateway it calls."""

    model_config = SettingsConfigDict(env_prefix="TRIPTYCH_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to bind; loopback unless deployed")
    http_port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535, description="HTTP port (0 = any free)")
    gateway_address: str = Field("127.0.0.1:50051", description="the gateway the HTTP API calls (gRPC)")
    http_default_model: str | None = Field(
        None, description="model id for OpenAI-style requests that name none (unset: `model` is required)"
    )
    http_max_body_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="largest request body accepted (guide images travel in it, base64)"
    )
    http_max_tasks: int = Field(100, ge=1, description="most tasks in one Runware request body (they run at once)")
    http_image_store_bytes: int = Field(
        512 * 1024 * 1024,
        ge=0,
        description="memory for images answered by URL (outputType URL): the oldest are dropped beyond it",
    )
    http_timeout_s: float = Field(600.0, gt=0, description="deadline of each Generate call to the gateway")
    max_message_bytes: int = Field(256 * 1024 * 1024, description="gRPC send/receive limit to the gateway")
