"""TextEncoderService in-process: conditioning shapes per model family, and a bad request named by its field."""

from __future__ import annotations

import grpc
import pytest

from tests.e2e.stubs import tiny_encode
from triptych.client import field_violations


@pytest.mark.parametrize(
    "model,embeds,pooled",
    [("tiny/sd15", [1, 77, 32], []), ("tiny/sdxl", [1, 77, 64], [1, 32]), ("tiny/sdxl-refiner", [1, 77, 32], [1, 32])],
)
def test_encode_returns_the_models_conditioning(stubs, model, embeds, pooled):
    reply = stubs.encoder.Encode(tiny_encode(model=model), timeout=60)
    for conditioning in (reply.positive, reply.negative):
        assert list(conditioning.prompt_embeds.shape) == embeds
        assert list(conditioning.pooled_prompt_embeds.shape) == pooled
        assert len(conditioning.prompt_embeds.data) == 4 * 77 * embeds[-1]  # float32, as the shape says


def test_a_bad_clip_skip_is_invalid_argument_naming_the_field(stubs):
    with pytest.raises(grpc.RpcError) as raised:
        stubs.encoder.Encode(tiny_encode(clip_skip=9), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(raised.value)] == ["clip_skip"]
