"""All configuration, read in one place: environment variables with the TRIPTYCH_ prefix (or CLI flags).

Every size and count a request can carry has a maximum here, checked before any allocation. The defaults
are what an A1111 or Runware user would expect; an operator raises them with e.g. TRIPTYCH_MAX_STEPS=300.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from triptych.rules.limits import Limits
from triptych.transformer_files import DEFAULT_BASES

DEFAULT_PORTS = {"gateway": 50051, "encoder": 50061, "denoiser": 50062, "decoder": 50063}


class ConfigurationError(Exception):
    """Settings that cannot work together (or are unsafe); the process refuses to start and says why."""


class Security(BaseSettings):
    """TLS, mTLS and bearer tokens (docs/security.md). With none of these set, a process serves and calls
    plaintext on loopback only; any other address needs TLS or TRIPTYCH_ALLOW_INSECURE=1."""

    model_config = SettingsConfigDict(env_prefix="TRIPTYCH_", extra="ignore")

    # Incoming: what this process serves.
    tls_cert_file: Path | None = Field(None, description="server certificate chain (PEM); with tls_key_file = TLS")
    tls_key_file: Path | None = Field(None, description="private key of tls_cert_file (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) for client certificates; set = mTLS: callers without one are refused"
    )
    auth_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="bearer tokens accepted, comma-separated; none = no token required"
    )
    auth_token_file: Path | None = Field(None, description="file of accepted bearer tokens, one per line (# comments)")
    # Outgoing: the gateway's calls to the backends, `triptych generate`'s calls to a gateway.
    tls_ca_file: Path | None = Field(None, description="CA bundle (PEM) to verify servers; set = outgoing TLS")
    tls_client_cert_file: Path | None = Field(None, description="client certificate (PEM) for mTLS servers")
    tls_client_key_file: Path | None = Field(None, description="private key of tls_client_cert_file (PEM)")
    tls_server_name: str | None = Field(None, description="name server certificates must carry, if not the host")
    client_auth_token: SecretStr | None = Field(None, description="bearer token sent on outgoing calls")
    client_auth_token_file: Path | None = Field(None, description="file whose first line is client_auth_token")
    # Both directions.
    allow_insecure: bool = Field(
        False, description="allow plaintext on non-loopback addresses (bind and outgoing): trusted networks only"
    )

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value):
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    def accepted_tokens(self) -> list[str]:
        """Every accepted token: auth_tokens plus the lines of auth_token_file. Empty = auth is off."""
        tokens = [t.get_secret_value() for t in self.auth_tokens]
        if self.auth_token_file is not None:
            tokens += _token_lines(self.auth_token_file, "auth_token_file")
        return tokens

    def outgoing_token(self) -> str | None:
        """The token this process presents to the services it calls, if any."""
        if self.client_auth_token is not None:
            return self.client_auth_token.get_secret_value()
        if self.client_auth_token_file is not None:
            return _token_lines(self.client_auth_token_file, "client_auth_token_file")[0]
        return None


def _token_lines(path: Path, name: str) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as exc:
        raise ConfigurationError(f"{name}: cannot read {path}: {exc.strerror}") from exc
    tokens = [line for line in lines if line and not line.startswith("#")]
    if not tokens:
        raise ConfigurationError(f"{name}: {path} holds no token")
    return tokens


class Settings(BaseSettings):
    """Settings of one Triptych process (any role)."""

    model_config = SettingsConfigDict(env_prefix="TRIPTYCH_", extra="ignore")

    model_root: Path = Field(Path("models"), description="the model store directory")
    host: str = Field("127.0.0.1", description="address to bind; loopback unless deployed")
    device: str = Field(
        "cpu", description='torch device of the text encoders, UNets, ControlNets and VAEs: "cpu", "cuda", "mps"'
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="weights and activations of the networks (fp16 VAEs that overflow stay float32)"
    )
    channels_last: bool = Field(False, description="UNets and ControlNets in channels-last memory format (GPU)")
    compile: bool = Field(
        False,
        description="torch.compile each UNet and ControlNet (denoiser) and VAE decoder (decoder) on first use; a new "
        "shape compiles again",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description='torch.compile mode; "reduce-overhead" adds CUDA graphs'
    )
    lora_mode: Literal["auto", "adapters", "merged"] = Field(
        "auto",
        description="denoiser LoRAs: peft adapter layers beside the weights, or merged into the weights (a LoRA "
        "switch never recompiles a compiled UNet); auto = merged when compile is on",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads per process; 0 = the CPUs this process may use (affinity, cgroup quota) "
        "divided by replicas_per_host",
    )
    replicas_per_host: int = Field(
        1, ge=1, description="torch service processes sharing this host's CPUs (for the default torch_threads)"
    )
    keep_freed_memory: bool = Field(
        True, description="glibc malloc keeps freed memory for reuse (no per-step page faults; RSS stays at its peak)"
    )
    max_workers: int = Field(
        128,
        ge=1,
        description="the most calls a process serves at once, each on its own gRPC thread (a streaming call holds "
        "it to the end): one more is RESOURCE_EXHAUSTED at once, never queued; health checks have 8 threads beyond",
    )
    max_probe_streams: int = Field(
        8,
        ge=1,
        description="Health.Watch and reflection streams open at once per process (they need no token and each "
        "holds a thread of its own, beyond max_workers); one more is RESOURCE_EXHAUSTED",
    )
    max_probe_streams_per_peer: int = Field(
        4, ge=1, description="of max_probe_streams, the most one caller host may hold open"
    )
    max_message_bytes: int = Field(256 * 1024 * 1024, description="gRPC send/receive limit, both ends")
    stream_write_timeout_seconds: float = Field(
        10.0,
        ge=0,
        description="a streamed response (Denoise, Generate) the server cannot write for this long, because its "
        "caller does not read, is cancelled and frees its slot; 0 = wait forever",
    )
    shutdown_grace_seconds: float = Field(30.0, description="time in-flight calls get after SIGTERM")
    max_connection_age_seconds: float = Field(
        0.0,
        ge=0,
        description="a server sends GOAWAY to each connection this old (gRPC adds +-10% jitter), so long-lived "
        "client channels reconnect and re-resolve (dns:///), spreading over replicas added since; 0 = never",
    )
    max_connection_age_grace_seconds: float = Field(
        0.0,
        ge=0,
        description="after that GOAWAY, how long calls still running on the old connection may take before it is "
        "closed; 0 = as long as they take (a Denoise of minutes is never cut)",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve Prometheus metrics at http(s)://metrics_host:PORT/metrics; unset = off (prometheus_client "
        "is then never imported); 0 = any free port (printed at start); HTTPS with tls_cert_file",
    )
    metrics_host: str | None = Field(None, description="address the metrics port binds; unset = host")
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="also serve grpc.health.v1 alone, in plaintext, on this port (kubelet gRPC probes speak no TLS); "
        "unset = off",
    )
    tracing: bool = Field(
        False,
        description="OpenTelemetry spans for every call, W3C traceparent to and from gRPC metadata, trace ids in "
        "logs; exporter, endpoint, sampler and batching from the standard OTEL_* variables",
    )
    otel_traces_exporter: str = Field(
        "otlp",
        validation_alias="OTEL_TRACES_EXPORTER",
        description="with tracing: otlp (OTLP over gRPC, OTEL_EXPORTER_OTLP_ENDPOINT) or console",
    )
    otel_service_name: str | None = Field(
        None, validation_alias="OTEL_SERVICE_NAME", description="with tracing: service.name; unset = triptych-ROLE"
    )
    max_loaded_models: int = Field(
        4,
        description="models kept in memory per service (LRU); the denoiser keeps ControlNets in an LRU of their "
        "own, of at least limits.max_controlnets",
    )
    base_models: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="the diffusers folder (store id) SD3/FLUX transformer files of each architecture are served with, "
        'as "flux-dev=black-forest-labs/FLUX.1-dev,sd3=my/sd3-medium"; architectures: flux-dev, flux-schnell, sd3, '
        "sd35_medium, sd35_large; unset ones default to the repo ids diffusers' from_single_file uses",
    )
    preload_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="model ids, comma-separated, each backend loads and runs once before it serves (the denoiser "
        "2 steps with CFG at the model's default size, compiled under compile); a role skips ids it has no part of",
    )
    denoiser_queue_per_model: int = Field(
        16, description="denoise requests per model admitted at once (running + waiting); more → RESOURCE_EXHAUSTED"
    )
    gateway_queue_per_model: int = Field(
        0,
        ge=0,
        description="Generates per model a gateway admits at once, before any downstream work (more → "
        "RESOURCE_EXHAUSTED, so overload costs no encoding); 0 = denoiser_queue_per_model x the denoiser replicas "
        "in denoiser_address",
    )
    decoder_queue_per_model: int = Field(
        16, description="decode requests per VAE admitted at once (running + waiting); more → RESOURCE_EXHAUSTED"
    )
    decoder_tile_above_pixels: int = Field(
        0,
        ge=0,
        description="decode images of more pixels than this in overlapping tiles (diffusers' VAE tiling: memory "
        "bounded by the tile, seams blended; not bit-identical to a whole decode); 0 = never",
    )
    lora_cache_bytes: int = Field(
        1024**3, description="bytes of LoRA adapters kept injected per model component (LRU beyond it)"
    )
    encoder_cache_bytes: int = Field(
        256 * 1024 * 1024, description="encoder results kept for identical requests (LRU by bytes); 0 = no cache"
    )
    encoder_max_batch_rows: int = Field(
        16, description="77-token chunks the encoder runs in one forward pass (dynamic batching); 1 = no batching"
    )
    encoder_batch_wait_ms: float = Field(
        2.0, description="longest the encoder waits for requests still being prepared to join a batch"
    )
    shared_memory: bool = Field(
        True,
        description="pass tensors through /dev/shm between processes on one host: services accept and write "
        "shared-memory ranges, the gateway offers them when every backend address is loopback or a unix socket "
        "(bytes whenever a backend cannot use them)",
    )
    # Each address may list replicas, comma-separated (IP:port,IP:port) or be one dns:///name:port target:
    # the gateway balances round-robin over them and retries UNAVAILABLE elsewhere.
    encoder_address: str = Field(f"127.0.0.1:{DEFAULT_PORTS['encoder']}", description="gateway → encoder(s)")
    denoiser_address: str = Field(f"127.0.0.1:{DEFAULT_PORTS['denoiser']}", description="gateway → denoiser(s)")
    decoder_address: str = Field(f"127.0.0.1:{DEFAULT_PORTS['decoder']}", description="gateway → decoder(s)")
    gateway_address: str = Field(f"127.0.0.1:{DEFAULT_PORTS['gateway']}", description="`triptych generate` → gateway")
    limits: Limits = Field(default_factory=Limits)
    security: Security = Field(default_factory=Security)

    @field_validator("base_models", mode="before")
    @classmethod
    def _split_bases(cls, value):
        if not isinstance(value, str):
            return value
        bases = {}
        for item in (part.strip() for part in value.split(",")):
            architecture, sep, model_id = item.partition("=")
            if item and (not sep or architecture.strip() not in DEFAULT_BASES or not model_id.strip()):
                known = ", ".join(DEFAULT_BASES)
                raise ValueError(f"{item!r}: want ARCHITECTURE=MODEL_ID, ARCHITECTURE one of {known}")
            if item:
                bases[architecture.strip()] = model_id.strip()
        return bases

    @field_validator("preload_models", mode="before")
    @classmethod
    def _split_models(cls, value):
        return [m.strip() for m in value.split(",") if m.strip()] if isinstance(value, str) else value

    @property
    def active_compile_mode(self) -> str | None:
        """The torch.compile mode networks are compiled with, or None when compile is off (eager)."""
        return self.compile_mode if self.compile else None

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options: the message limits, set on both ends."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
