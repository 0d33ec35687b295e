"""A full per-model denoise queue answers RESOURCE_EXHAUSTED at once instead of hanging."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.e2e.processes import serve_role
from triptych.client import open_channel
from triptych.v1 import denoiser_service_pb2, denoiser_service_pb2_grpc, encoder_service_pb2, encoder_service_pb2_grpc


@pytest.fixture(scope="module")
def small_queue_denoiser(model_root):
    with serve_role("denoiser", model_root, env={"TRIPTYCH_DENOISER_QUEUE_PER_MODEL": "1"}) as (_, address):
        yield address


def conditioning(services, model: str) -> encoder_service_pb2.EncodeResponse:
    with open_channel(services.addresses["encoder"]) as channel:
        return encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode(
            encoder_service_pb2.EncodeRequest(model=model, positive_prompt="a fox", include_negative=True)
        )


def request(encoded, model: str, steps: int, size: int) -> denoiser_service_pb2.DenoiseRequest:
    return denoiser_service_pb2.DenoiseRequest(
        model=model,
        positive=encoded.positive,
        negative=encoded.negative,
        steps=steps,
        guidance_scale=7.0,
        seed=1,
        width=size,
        height=size,
    )


def test_full_queue_is_refused_at_once_and_other_models_still_run(services, small_queue_denoiser):
    sdxl, sd15 = conditioning(services, "tiny/sdxl"), conditioning(services, "tiny/sd15")
    with open_channel(small_queue_denoiser) as channel:
        stub = denoiser_service_pb2_grpc.DenoiserServiceStub(channel)
        long_call = stub.Denoise(request(sdxl, "tiny/sdxl", 150, 256))
        next(long_call)  # the first progress event: the long job holds the only slot
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Denoise(request(sdxl, "tiny/sdxl", 2, 64)))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.perf_counter() - started < 2.0, "refused at once, not after waiting"
        results = [e for e in stub.Denoise(request(sd15, "tiny/sd15", 2, 64)) if e.HasField("result")]
        assert len(results) == 1, "another model's queue is independent"
        long_call.cancel()
        time.sleep(0.5)
        results = [e for e in stub.Denoise(request(sdxl, "tiny/sdxl", 2, 64)) if e.HasField("result")]
        assert len(results) == 1, "the slot is free again once the long job was cancelled"
