"""ImageService in-process, chaining the in-process encoder, denoiser and decoder."""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image

from tests.e2e.stubs import tiny_generate
from triptych.client import field_violations


def test_generate_chains_the_three_backends(stubs, in_process):
    events = stubs.call("gateway", tiny_generate(seed=5))
    stages = {e.progress.stage for e in events if e.HasField("progress")}
    [image] = [e.image for e in events if e.HasField("image")]
    assert "denoise" in stages
    assert image.seed == 5 and Image.open(io.BytesIO(image.image.data)).size == (64, 64)


def test_a_bad_cfg_scale_is_invalid_argument_naming_the_field(stubs):
    with pytest.raises(grpc.RpcError) as raised:
        stubs.call("gateway", tiny_generate(cfg_scale=50.5))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(raised.value)] == ["cfg_scale"]
