"""DenoiserService in-process: latents of the requested size, progress per step, and a bad size named."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.e2e.stubs import tiny_denoise
from triptych.client import field_violations
from triptych.v1 import denoiser_service_pb2


@pytest.mark.parametrize("model,width,height", [("tiny/sd15", 64, 64), ("tiny/sdxl", 96, 64)])
def test_denoise_streams_progress_then_latents_of_the_requested_size(stubs, encoded, model, width, height):
    request = tiny_denoise(encoded, model, width=width, height=height, steps=2, scheduler="Euler")
    events = stubs.call("denoiser", request)
    steps = [(e.progress.step, e.progress.total_steps) for e in events if e.HasField("progress")]
    result = events[-1].result
    assert steps == [(1, 2), (2, 2)] and events[-1].HasField("result")
    assert list(result.latents.shape) == [1, 4, height // 8, width // 8]
    assert np.isfinite(np.frombuffer(result.latents.data, np.float32)).all()
    assert result.seed == 1


def test_a_bad_width_is_invalid_argument_naming_the_field(stubs, encoded):
    with pytest.raises(grpc.RpcError) as raised:
        stubs.call("denoiser", tiny_denoise(encoded, width=500))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(raised.value)] == ["width"]


def test_list_schedulers_names_the_table(stubs):
    rows = stubs.denoiser.ListSchedulers(denoiser_service_pb2.ListSchedulersRequest(), timeout=60).schedulers
    assert {"Euler", "Euler a", "DPM++ 2M Karras"} <= {row.name for row in rows}
