"""ControlNet units as requests carry them: fields checked and turned into schedule fractions, torch-free so the
gateway checks them before any downstream work and the denoiser again, with the same words."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def parse_control_units(units, steps: int, limits, violations: list) -> tuple[ControlUnit, ...]:
    """ControlNetUnit messages -> ControlUnits, every bad field reported."""
    if len(units) > limits.max_controlnets:
        violations.append(("control_net", f"at most {limits.max_controlnets} units (got {len(units)})"))
    parsed = []
    for i, unit in enumerate(units):
        field = f"control_net[{i}]"
        if not unit.model:
            violations.append((f"{field}.model", "a ControlNet model id is required"))
        if not unit.guide_image:
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
        parsed.append(
            ControlUnit(unit.model, unit.guide_image, weight, start or 0.0, end or 1.0, mode or BALANCED, field)
        )
    return tuple(parsed)
