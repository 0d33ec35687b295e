"""Field checks shared by the services. Each appends (field, reason) to a list so that every bad field of a
request is reported at once; the caller raises InvalidArgument(violations) when the list is not empty."""

from __future__ import annotations

import math
from collections.abc import Iterable

from triptych.rules.limits import Limits

Violations = list[tuple[str, str]]


def check_prompt(prompt: str, field: str, limits: Limits, violations: Violations) -> None:
    if len(prompt) > limits.max_prompt_chars:
        violations.append((field, f"{len(prompt)} characters; at most {limits.max_prompt_chars}"))


MIN_SIZE = 64  # A1111's smallest width/height; below it a UNet's deepest GroupNorm can see a single value


def check_size(value: int | None, field: str, maximum: int, violations: Violations) -> None:
    """Width/height: unset is fine (the model's default); else a multiple of 8 in [MIN_SIZE, maximum]."""
    if value is None:
        return
    if value < MIN_SIZE or value > maximum or value % 8:
        violations.append((field, f"must be a multiple of 8 between {MIN_SIZE} and {maximum} (got {value})"))


def check_steps(value: int, field: str, limits: Limits, violations: Violations) -> None:
    if not 1 <= value <= limits.max_steps:
        violations.append((field, f"must be between 1 and {limits.max_steps} (got {value})"))


# The size the work budget assumes for an unset width or height: the largest default of any family (SDXL, SD3,
# FLUX); the model's own default is known only once it is loaded, and the budget is checked before that.
UNSET_SIZE = 1024


def check_work(
    width: int | None, height: int | None, steps: int, images: int, field: str, limits: Limits, violations: Violations
) -> None:
    """The work budget: width x height x steps x images at most limits.max_pixel_steps, checked before any work.
    Reported on `field`, the first thing to lower (images, else steps); only when each factor is in range itself."""
    work = (width or UNSET_SIZE) * (height or UNSET_SIZE) * steps * images
    if work > limits.max_pixel_steps:
        violations.append(
            (
                field,
                f"width x height x steps x images = {work} pixel-steps; one request may ask for at most "
                f"{limits.max_pixel_steps} (TRIPTYCH_MAX_PIXEL_STEPS): ask for fewer images, steps or pixels",
            )
        )


def check_guidance(value: float, field: str, limits: Limits, violations: Violations) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= limits.max_cfg_scale):
        violations.append((field, f"must be between 0 and {limits.max_cfg_scale:g} (got {value})"))


def check_fraction(value: float, field: str, violations: Violations, *, low: float = 0.0, high: float = 1.0) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        violations.append((field, f"must be between {low:g} and {high:g} (got {value})"))


def weighted(
    items: Iterable,
    field: str,
    maximum: int,
    weight_range: tuple[float, float],
    violations: Violations,
    by_sign: bool = False,
) -> tuple[tuple[str, float], ...]:
    """Lora/TextualInversion messages -> ((model, weight), ...), weight defaulting to 1.0.

    A model listed twice is refused; with `by_sign` (embeddings: w >= 0 goes to the positive prompt, w < 0 to the
    negative) only twice with the same sign, since once each way is one entry per prompt."""
    items = list(items)
    if len(items) > maximum:
        violations.append((field, f"at most {maximum} entries (got {len(items)})"))
    parsed = []
    low, high = weight_range
    first: dict[tuple[str, bool], int] = {}
    for i, item in enumerate(items):
        weight = item.weight if item.HasField("weight") else 1.0
        key = (item.model, by_sign and weight < 0)
        if not item.model:
            violations.append((f"{field}[{i}].model", "a model id is required"))
        elif key in first:  # diffusers refuses an adapter name twice; one entry, one weight
            violations.append((f"{field}[{i}].model", f"{item.model!r} is already {field}[{first[key]}]"))
        first.setdefault(key, i)
        if not (math.isfinite(weight) and low <= weight <= high):
            violations.append((f"{field}[{i}].weight", f"must be between {low:g} and {high:g} (got {weight})"))
        parsed.append((item.model, weight))
    return tuple(parsed)
