"""The demo family through the split chain equals diffusers' StableDiffusionPipeline on the same files, bit for bit
(fp32, CPU): its float16 weights are cast to float32 by both sides the same way. Skipped only while assets/demo is
absent."""

from __future__ import annotations

import pytest

FIELDS = ("positive_prompt", "negative_prompt", "seed", "scheduler", "steps", "cfg_scale")
CASES = [
    ("a large red star at the top left on a blue background", "", 0, "", 20, 7.5),  # the model card's settings
    ("a small green ring in the center on a white background", "red", 11, "DPM++ 2M", 12, 5.0),
]


@pytest.mark.parametrize("case", CASES, ids=["default", "dpm-negative"])
def test_demo_chain_equals_diffusers(demo_root, client, oracle, case):
    request = dict(model="demo/base", width=64, height=64, **dict(zip(FIELDS, case, strict=True)))
    chained = oracle.compare(client, request)
    assert (chained.image.image.width, chained.image.image.height) == (64, 64)
