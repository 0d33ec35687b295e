import diffusers
import pytest

from triptych.denoiser.schedulers import build_scheduler, scheduler_rows
from triptych.rules.scheduler_table import TABLE, parse_scheduler
from triptych.serving.errors import InvalidArgument

SD15_CONFIG = diffusers.PNDMScheduler(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
).config


@pytest.mark.parametrize(
    "name,class_name,options",
    [
        ("Euler a", "EulerAncestralDiscreteScheduler", {}),
        ("euler A", "EulerAncestralDiscreteScheduler", {}),
        ("Euler Ancestral", "EulerAncestralDiscreteScheduler", {}),
        (
            "DPM++ 2M SDE Karras",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        ),
        (
            "DPM++ 3M SDE Exponential",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_exponential_sigmas": True},
        ),
        ("PLMS", "PNDMScheduler", {}),
        ("PNDM", "PNDMScheduler", {}),
        ("EulerDiscrete", "EulerDiscreteScheduler", {}),
        ("UniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
        ("LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ],
)
def test_names_map_to_classes_and_options(name, class_name, options):
    choice = parse_scheduler(name)
    assert (choice.class_name, choice.options) == (class_name, options)


@pytest.mark.parametrize("name", ["", "Default", "default "])
def test_default_is_the_models_own(name):
    assert parse_scheduler(name).class_name is None


def test_unknown_name_lists_valid_ones():
    with pytest.raises(InvalidArgument) as raised:
        parse_scheduler("Eulerish")
    assert "DPM++ 2M" in raised.value.message and raised.value.violations[0][0] == "scheduler"


def test_suffix_the_class_cannot_honour_is_invalid():
    with pytest.raises(InvalidArgument, match="use_karras_sigmas"):
        build_scheduler(parse_scheduler("DDIM Karras"), dict(SD15_CONFIG))


@pytest.mark.parametrize("row", TABLE, ids=[row.name for row in TABLE])
def test_every_row_builds_from_the_models_config(row):
    scheduler = build_scheduler(parse_scheduler(row.name), dict(SD15_CONFIG))
    assert type(scheduler).__name__ == row.class_name
    assert scheduler.config.beta_schedule == "scaled_linear"  # the model's betas survive
    for key, value in row.options.items():
        assert scheduler.config[key] == value


def test_listed_variants_all_build():
    for row, _ in scheduler_rows():
        build_scheduler(parse_scheduler(row.name), dict(SD15_CONFIG))
