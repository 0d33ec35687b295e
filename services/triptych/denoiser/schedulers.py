"""Builds diffusers scheduler instances from the table, always from the model's own scheduler config."""

from __future__ import annotations

import inspect

import diffusers

from triptych.rules.scheduler_table import SUFFIXES, TABLE, SchedulerChoice, SchedulerRow
from triptych.serving.errors import InvalidArgument


def _accepts(class_name: str, option: str) -> bool:
    return option in inspect.signature(getattr(diffusers, class_name).__init__).parameters


def build_scheduler(choice: SchedulerChoice, config: dict, field: str = "scheduler"):
    """`Class.from_config(<the model's scheduler config>, **options)`; a name suffix the class cannot honour is
    INVALID_ARGUMENT (from_config would drop the option silently)."""
    class_name = choice.class_name or config["_class_name"]
    if choice.suffix_option and not _accepts(class_name, choice.suffix_option):
        raise InvalidArgument.one(field, f"{class_name} has no option {choice.suffix_option} (drop the suffix)")
    return getattr(diffusers, class_name).from_config(config, **choice.options)


def describe_options(choice: SchedulerChoice) -> list[str]:
    return [f"{key}={value!r}" for key, value in sorted(choice.options.items())]


def scheduler_rows(table: tuple[SchedulerRow, ...] = TABLE) -> list[tuple[SchedulerRow, list[str]]]:
    """Every name of `table` with its options, suffixed variants included where the class supports them."""
    rows = []
    for row in table:
        rows.append((row, [f"{k}={v!r}" for k, v in row.options.items()]))
        for suffix, option in SUFFIXES.items():
            if _accepts(row.class_name, option):
                variant = SchedulerRow(
                    f"{row.name} {suffix.capitalize()}", row.class_name, {**row.options, option: True}
                )
                rows.append((variant, [f"{k}={v!r}" for k, v in variant.options.items()]))
    return rows
