"""What the denoiser is asked and what it answers, as plain data (the servicer converts protos to and from these)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triptych.rules.control_units import ControlUnit


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None


@dataclass(frozen=True)
class GuideLatents:
    """A ControlNet guide in its VAE's latent space (ControlNetUnit.guide_latents): unscaled samples [B, C, h, w]
    and the VAE's factors, which the family applies as its ControlNet pipeline does."""

    latents: torch.Tensor
    scaling_factor: float
    shift_factor: float | None


@dataclass
class DenoiseJob:
    """One sampling job, already parsed and range-checked."""

    model: str
    positive: Conditioning
    negative: Conditioning | None
    width: int | None
    height: int | None
    steps: int
    guidance_scale: float
    scheduler: str  # a name of the model family's scheduler table; "" or "Default" = the model's own
    seed: int | None
    start_fraction: float = 0.0
    end_fraction: float = 1.0
    latents: torch.Tensor | None = None
    generator_state: bytes = b""
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    loras: tuple[tuple[str, float], ...] = ()
    control_units: tuple[ControlUnit, ...] = ()
    preview_interval_steps: int = 0
    progress_interval_s: float = 0.0


@dataclass
class StepDone:
    step: int
    total_steps: int
    elapsed_seconds: float
    preview_png: bytes = b""


@dataclass
class DenoiseOutcome:
    latents: torch.Tensor
    seed: int
    generator_state: bytes
    scheduler_class: str
    scheduler_options: list[str]
    model_calls: int
    queued_seconds: float = 0.0  # from the call's admission until the model's compute thread took it up
