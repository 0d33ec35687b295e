"""ControlNet units as requests carry them: fields checked and turned into schedule fractions, torch-free so the
gateway checks them before any downstream work and the denoiser again, with the same words."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from triptych.v1 import common_pb2

BALANCED, PROMPT, CONTROLNET = "balanced", "prompt", "controlnet"


@dataclass(frozen=True)
class ControlUnit:
    """One parsed unit: fractions of the schedule, range-checked by parse_control_units."""

    model: str
    guide_image: bytes
    scale: float
    start: float
    end: float
    mode: str
    field: str  # e.g. "control_net[0]", for error messages
    # The guide in a VAE's latent space (DenoiseRequest only): the VaeLatents message as parsed here; the denoiser
    # replaces it with its tensor (denoiser/servicer.py).
    guide_latents: Any = None


MODES = {
    common_pb2.CONTROL_MODE_UNSPECIFIED: BALANCED,
    common_pb2.CONTROL_MODE_BALANCED: BALANCED,
    common_pb2.CONTROL_MODE_PROMPT: PROMPT,
    common_pb2.CONTROL_MODE_CONTROLNET: CONTROLNET,
}
MAX_CONTROL_WEIGHT = 5.0


def window_edge(unit, group: str, steps: int, field: str, violations: list) -> float | None:
    """A unit's start or end as a fraction: 1-based inclusive step a of N -> (a-1)/N (start) or a/N (end);
    percentage p -> p/100, used as is (never rounded to a step)."""
    which = unit.WhichOneof(group)
    if which is None:
        return 0.0 if group == "start" else 1.0
    value = getattr(unit, which)
    if which.endswith("_step"):
        if steps < 1:
            return None  # steps itself is reported; a step index of no schedule has no fraction
        if not 1 <= value <= steps:
            violations.append((f"{field}.{which}", f"must be a step between 1 and {steps} (got {value})"))
            return None
        return (value - 1) / steps if group == "start" else value / steps
    if not (math.isfinite(value) and 0 <= value <= 100):
        violations.append((f"{field}.{which}", f"must be a percentage between 0 and 100 (got {value})"))
        return None
    return value / 100


def parse_control_units(
    units, steps: int, limits, violations: list, latents_allowed: bool = False
) -> tuple[ControlUnit, ...]:
    """ControlNetUnit messages -> ControlUnits, every bad field reported. `latents_allowed`: a unit may carry its
    guide as guide_latents instead of guide_image (DenoiseRequest; the family decides which one it takes)."""
    if len(units) > limits.max_controlnets:
        violations.append(("control_net", f"at most {limits.max_controlnets} units (got {len(units)})"))
    parsed = []
    for i, unit in enumerate(units):
        field = f"control_net[{i}]"
        has_latents = unit.HasField("guide_latents")
        if not unit.model:
            violations.append((f"{field}.model", "a ControlNet model id is required"))
        if has_latents and not latents_allowed:
            violations.append((f"{field}.guide_latents", "set by the gateway from guide_image: leave it unset"))
        if not unit.guide_image and not (has_latents and latents_allowed):
            violations.append((f"{field}.guide_image", "a guide image is required"))
        elif len(unit.guide_image) > limits.max_guide_image_bytes:
            violations.append((f"{field}.guide_image", f"larger than {limits.max_guide_image_bytes} bytes"))
        weight = unit.weight if unit.HasField("weight") else 1.0
        if not (math.isfinite(weight) and 0 <= weight <= MAX_CONTROL_WEIGHT):
            violations.append((f"{field}.weight", f"must be between 0 and {MAX_CONTROL_WEIGHT:g} (got {weight})"))
        mode = MODES.get(unit.control_mode)
        if mode is None:
            violations.append((f"{field}.control_mode", f"unknown mode {unit.control_mode}"))
        start = window_edge(unit, "start", steps, field, violations)
        end = window_edge(unit, "end", steps, field, violations)
        if start is not None and end is not None and start >= end:
            violations.append((field, f"start ({start:g} of the schedule) must come before end ({end:g})"))
        latents = unit.guide_latents if has_latents and latents_allowed else None
        parsed.append(
            ControlUnit(
                unit.model, unit.guide_image, weight, start or 0.0, end or 1.0, mode or BALANCED, field, latents
            )
        )
    return tuple(parsed)


def family_violations(units: tuple[ControlUnit, ...], family) -> list[tuple[str, str]]:
    """What a model family cannot do with these units: any unit at all, or a unit's mode (FLUX and SD3 take
    balanced only: their diffusers ControlNet pipelines have no guess mode). The gateway checks this once it knows
    the model's family, before the guide images are encoded; the denoiser again."""
    if not units:
        return []
    if not family.supports_controlnet:
        return [("control_net", f"ControlNet units are not supported on {family.name} models")]
    accepted = ", ".join(family.control_modes)
    return [
        (f"{unit.field}.control_mode", f"{family.name} models take the {accepted} mode only (got {unit.mode})")
        for unit in units
        if unit.mode not in family.control_modes
    ]
