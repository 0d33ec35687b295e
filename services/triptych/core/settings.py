"""All configuration, read in one place: environment variables with the TRIPTYCH_ prefix (or CLI flags).

Every size and count a request can carry has a maximum here, checked before any allocation. The defaults
are what an A1111 or Runware user would expect; an operator raises them with e.g. TRIPTYCH_MAX_STEPS=300.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORTS = {"gateway": 50051, "encoder": 50061, "denoiser": 50062, "decoder": 50063}


class Limits(BaseSettings):
    """Request limits, shared by every service so a caller meets the same bounds wherever it enters."""

    model_config = SettingsConfigDict(env_prefix="TRIPTYCH_", extra="ignore")

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_cfg_scale: float = 50.0
    max_number_results: int = 20
    max_loras: int = 8
    max_embeddings: int = 8
    max_controlnets: int = 4
    max_prompt_chars: int = 20_000
    max_guide_image_bytes: int = 32 * 1024 * 1024


class Settings(BaseSettings):
    """Settings of one Triptych process (any role)."""

    model_config = SettingsConfigDict(env_prefix="TRIPTYCH_", extra="ignore")

    model_root: Path = Field(Path("models"), description="the model store directory")
    host: str = Field("127.0.0.1", description="address to bind; loopback unless deployed")
    torch_threads: int = Field(0, description="torch intra-op threads per process; 0 = torch's default")
    max_workers: int = Field(16, description="gRPC worker threads per process")
    max_message_bytes: int = Field(256 * 1024 * 1024, description="gRPC send/receive limit, both ends")
    shutdown_grace_seconds: float = Field(30.0, description="time in-flight calls get after SIGTERM")
    max_loaded_models: int = Field(4, description="models kept in memory per service (LRU)")
    denoiser_queue_per_model: int = Field(
        16, description="denoise requests per model admitted at once (running + waiting); more → RESOURCE_EXHAUSTED"
    )
    max_cached_loras: int = Field(16, description="LoRA adapters kept injected per model component (LRU)")
    encoder_address: str = Field(f"127.0.0.1:{DEFAULT_PORTS['encoder']}", description="gateway → encoder")
    denoiser_address: str = Field(f"127.0.0.1:{DEFAULT_PORTS['denoiser']}", description="gateway → denoiser")
    decoder_address: str = Field(f"127.0.0.1:{DEFAULT_PORTS['decoder']}", description="gateway → decoder")
    limits: Limits = Field(default_factory=Limits)

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options: the message limits, set on both ends."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
