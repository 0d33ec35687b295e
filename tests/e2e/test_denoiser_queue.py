"""A full per-model denoise queue, and a process at its call limit, answer RESOURCE_EXHAUSTED at once instead of
hanging; a waiting request whose caller went away gives its place back."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.processes import serve_role
from triptych.client import open_channel
from triptych.v1 import denoiser_service_pb2, denoiser_service_pb2_grpc, encoder_service_pb2, encoder_service_pb2_grpc


@pytest.fixture(scope="module")
def small_queue_denoiser(model_root):
    # Two denoise requests per model (one running, one waiting) and three calls in flight in the whole process.
    env = {"TRIPTYCH_DENOISER_QUEUE_PER_MODEL": "2", "TRIPTYCH_MAX_WORKERS": "3"}
    with serve_role("denoiser", model_root, env=env) as (_, address):
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


def refused_at_once(call) -> tuple[grpc.StatusCode, str]:
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert time.perf_counter() - started < 2.0, "refused at once, not after waiting"
    settle()
    return raised.value.code(), raised.value.details()


def settle() -> None:
    """A call that has just answered still counts against max_workers on the server for a moment
    (docs/decisions.md): this process runs at its limit, so let it go before the next call."""
    time.sleep(0.25)


def waiting(call) -> bool:
    """Whether a Denoise stream was admitted and still waits (not refused, not finished) a second later."""
    time.sleep(1.0)
    return not call.done()


def test_full_queue_is_refused_at_once_and_other_models_still_run(services, small_queue_denoiser):
    sdxl, sd15 = conditioning(services, "tiny/sdxl"), conditioning(services, "tiny/sd15")
    with open_channel(small_queue_denoiser) as channel:
        stub = denoiser_service_pb2_grpc.DenoiserServiceStub(channel)
        long_call = stub.Denoise(request(sdxl, "tiny/sdxl", 150, 512))
        next(long_call)  # the first progress event: the long job runs
        queued = stub.Denoise(request(sdxl, "tiny/sdxl", 2, 64))
        assert waiting(queued), "the second request waits its turn"
        code, details = refused_at_once(lambda: list(stub.Denoise(request(sdxl, "tiny/sdxl", 2, 64))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue for 'tiny/sdxl' is full" in details
        # A malformed request (SD1.5 conditioning for an SDXL UNet) is told so at once, before it would queue.
        code, details = refused_at_once(lambda: list(stub.Denoise(request(sd15, "tiny/sdxl", 2, 64))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "positive.prompt_embeds" in details
        results = [e for e in stub.Denoise(request(sd15, "tiny/sd15", 2, 64)) if e.HasField("result")]
        assert len(results) == 1, "another model's queue is independent"
        settle()

        # A waiting request whose caller went away gives its place back at once, not when its turn comes.
        queued.cancel()
        time.sleep(0.75)
        queued_again = stub.Denoise(request(sdxl, "tiny/sdxl", 2, 64))
        assert waiting(queued_again)

        # Three calls in flight (the process's max_workers): a fourth is refused at once, never queued behind
        # them, health checks are still answered, and the process serves again once one ends.
        other = stub.Denoise(request(sd15, "tiny/sd15", 150, 512))
        next(other)
        listing = denoiser_service_pb2.ListSchedulersRequest()
        code, details = refused_at_once(lambda: stub.ListSchedulers(listing))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_workers 3" in details
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, "probes are answered at the limit"
        other.cancel()
        time.sleep(0.75)
        assert stub.ListSchedulers(listing).schedulers

        long_call.cancel()
        results = [e for e in queued_again if e.HasField("result")]
        assert len(results) == 1, "the waiting request runs once the long job was cancelled"
