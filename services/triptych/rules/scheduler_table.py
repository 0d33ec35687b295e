"""The scheduler table: A1111/Runware names -> diffusers classes and options (diffusers' own A1111 mapping).

Pure data, no torch: the gateway validates names with it before any work, the denoiser builds instances.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from triptych.serving.errors import InvalidArgument


@dataclass(frozen=True)
class SchedulerRow:
    """One row: canonical name, other spellings, diffusers class and from_config options."""

    name: str
    class_name: str
    options: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


TABLE: tuple[SchedulerRow, ...] = (
    SchedulerRow("DDIM", "DDIMScheduler"),
    SchedulerRow("Euler", "EulerDiscreteScheduler"),
    SchedulerRow("Euler a", "EulerAncestralDiscreteScheduler", aliases=("Euler Ancestral",)),
    SchedulerRow("Heun", "HeunDiscreteScheduler"),
    SchedulerRow("LMS", "LMSDiscreteScheduler"),
    SchedulerRow("PLMS", "PNDMScheduler"),
    SchedulerRow("UniPC", "UniPCMultistepScheduler"),
    SchedulerRow("DEIS", "DEISMultistepScheduler"),
    SchedulerRow("DPM++ 2M", "DPMSolverMultistepScheduler"),
    SchedulerRow("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    SchedulerRow(
        "DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    ),
    SchedulerRow("DPM++ SDE", "DPMSolverSinglestepScheduler"),
    SchedulerRow("DPM2", "KDPM2DiscreteScheduler"),
    SchedulerRow("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    SchedulerRow("LCM", "LCMScheduler"),
)

# Name suffix -> the from_config option it sets ("DPM++ 2M Karras").
SUFFIXES = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}


@dataclass(frozen=True)
class SchedulerChoice:
    """A parsed scheduler name. class_name None means the model's own scheduler."""

    class_name: str | None
    options: dict = field(default_factory=dict)
    suffix_option: str | None = None  # set by a name suffix; the denoiser checks the class accepts it


def _lookup(name: str, table: tuple[SchedulerRow, ...]) -> SchedulerRow | None:
    key = name.lower()
    for row in table:
        if key in (row.name.lower(), *(a.lower() for a in row.aliases)):
            return row
        # Class names work with or without "Scheduler".
        if key in (row.class_name.lower(), row.class_name.lower().removesuffix("scheduler")):
            return SchedulerRow(row.class_name, row.class_name)
    return None


def parse_scheduler(
    name: str, field_name: str = "scheduler", table: tuple[SchedulerRow, ...] = TABLE, family: str = ""
) -> SchedulerChoice:
    """Parses a scheduler name (case-insensitive) against `table` (a family's own; the DDPM-family table by
    default); INVALID_ARGUMENT listing the valid names if unknown."""
    cleaned = " ".join(name.split())
    if cleaned.lower() in ("", "default"):
        return SchedulerChoice(None)
    row, suffix_option = _lookup(cleaned, table), None
    if row is None:
        base, _, suffix = cleaned.rpartition(" ")
        if suffix.lower() in SUFFIXES and base:
            row, suffix_option = _lookup(base, table), SUFFIXES[suffix.lower()]
    if row is None:
        valid = ", ".join(r.name for r in table)
        model = f" for {family} models" if family else ""
        raise InvalidArgument.one(
            field_name,
            f"unknown scheduler {name!r}{model}; valid: Default, {valid} (optionally + ' Karras' or ' Exponential'), "
            "or a diffusers class name",
        )
    options = dict(row.options)
    if suffix_option:
        options[suffix_option] = True
    return SchedulerChoice(row.class_name, options, suffix_option)
