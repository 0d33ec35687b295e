"""Request limits: every size and count a request can carry has a maximum, checked before any allocation.

The defaults are what an A1111 or Runware user would expect; an operator raises them with e.g. TRIPTYCH_MAX_STEPS=300.
Torch-free: the gateway checks them before any downstream work, each backend again.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


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
    max_prompt_chunks: int = 10  # 75-token chunks per prompt (750 tokens); more -> INVALID_ARGUMENT on the prompt
    max_guide_image_bytes: int = 32 * 1024 * 1024
    # The work budget: width x height x steps x images one request may ask for. Each maximum above alone is fine,
    # all at once (20 images at 2048² and 150 steps) are about a day on CPU. Default: one image at every maximum.
    max_pixel_steps: int = 2048 * 2048 * 150
