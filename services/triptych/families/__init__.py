"""The model families Triptych serves, found from a pipeline's `model_index.json` `_class_name` through one registry.

Adding a family = one module with a `Family` subclass + a line in `REGISTRY` + tests. Importing this package loads
no torch (the gateway uses it to check a refiner pairing and to size images).
"""

from __future__ import annotations

from triptych.families import flux, sd1, sd3, sdxl
from triptych.families.base import Family

REGISTRY: tuple[Family, ...] = (sd1.FAMILY, sdxl.FAMILY, sd3.FAMILY, flux.FAMILY)

_BY_PIPELINE = {class_name: family for family in REGISTRY for class_name in family.pipeline_classes}


# Every scheduler name some family accepts: what the gateway checks before it knows the model's family.
ALL_SCHEDULERS = tuple(
    {(row.name, row.class_name): row for family in REGISTRY for row in family.scheduler_table}.values()
)


def for_pipeline(class_name: str) -> Family | None:
    """The family of a diffusers pipeline class (model_index.json `_class_name`), None if we serve no such family."""
    return _BY_PIPELINE.get(class_name)


def for_variant(variant: str) -> Family | None:
    """The family behind a variant name as EncodeResponse.model_family reports it ("sd1", "sdxl-refiner", ...)."""
    for family in REGISTRY:
        if variant == family.name or any(variant in pair for pair in family.refiner_variants()):
            return family
    return None


def can_refine(base_variant: str, refiner_variant: str) -> bool:
    """Whether a model of `base_variant` may hand its denoising window over to one of `refiner_variant`."""
    return any((base_variant, refiner_variant) in family.refiner_variants() for family in REGISTRY)


__all__ = ["ALL_SCHEDULERS", "REGISTRY", "Family", "can_refine", "for_pipeline", "for_variant"]
