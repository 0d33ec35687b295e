"""The `server-timing` trailer through the real processes: each service's handler time, and the gateway's
stages and hops (serving/timing.py)."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from tests.e2e.processes import serve_role
from tests.e2e.stubs import DEADLINE_S, conditioning, open_stubs, tiny_decode, tiny_denoise, tiny_encode, tiny_generate
from triptych.client import ImageClient, field_violations, open_channel, server_timing
from triptych.v1 import denoiser_service_pb2_grpc, image_service_pb2

STAGES = ["encode", "encode-hop", "denoise", "denoise-queue", "denoise-hop", "decode", "decode-hop"]


@pytest.fixture(scope="module")
def stubs(services):
    opened = open_stubs(services)
    yield opened
    opened.close()


def check_stages(timing: dict[str, float], stages: list[str]) -> None:
    assert list(timing) == [*stages, "gateway", "total"]  # in the order the gateway ran them
    assert all(value >= 0 for value in timing.values()), timing
    for stage in stages:
        if "-" not in stage:
            assert timing[f"{stage}-hop"] + timing.get(f"{stage}-queue", 0.0) <= timing[stage], timing
    # The stages and the gateway's own time are disjoint parts of the handler's time.
    parts = sum(value for name, value in timing.items() if "-" not in name and name != "total")
    assert parts <= timing["total"] + 1e-5, timing


def test_generate_names_each_stage_its_hop_and_the_gateway_in_its_trailer(client):
    started = time.perf_counter()
    call = client.stream(tiny_generate(steps=3), timeout=DEADLINE_S)
    assert [event for event in call if event.HasField("image")]
    observed = time.perf_counter() - started
    timing = server_timing(call)
    check_stages(timing, STAGES)
    assert timing["denoise"] > 0 and timing["total"] <= observed


def test_a_refiner_and_two_images_add_up_per_stage(client):
    request = tiny_generate(
        model="tiny/sdxl",
        steps=4,
        number_results=2,
        refiner=image_service_pb2.Refiner(model="tiny/sdxl-refiner", start_step=2),
    )
    call = client.stream(request, timeout=DEADLINE_S)
    events = list(call)
    assert len([event for event in events if event.HasField("image")]) == 2
    # Base and refiner encodes count as encode; both images' passes sum into denoise, refine and decode.
    refined = [*STAGES[:5], "refine", "refine-queue", "refine-hop", *STAGES[5:]]
    timing = server_timing(call)
    check_stages(timing, refined)
    # Progress times count from the start of their stage (common.proto), not of the call: the two decodes'
    # events together take no longer than the decode stage as the gateway timed it.
    decodes = [e.progress.elapsed_seconds for e in events if e.progress.stage == "decode"]
    assert len(decodes) == 2 and sum(decodes) <= timing["decode"] + 1e-3, (decodes, timing)


@pytest.mark.parametrize("role", ["encoder", "denoiser", "decoder"])
def test_each_service_reports_its_handler_time(stubs, role):
    if role == "encoder":
        started = time.perf_counter()
        _, call = stubs.encoder.Encode.with_call(tiny_encode(), timeout=DEADLINE_S)
    elif role == "decoder":
        started = time.perf_counter()
        _, call = stubs.decoder.Decode.with_call(tiny_decode(), timeout=DEADLINE_S)
    else:
        request = tiny_denoise(conditioning(stubs))
        started = time.perf_counter()
        call = stubs.denoiser.Denoise(request, timeout=DEADLINE_S)
        assert any(event.HasField("result") for event in call)
    observed = time.perf_counter() - started
    timing = server_timing(call)
    assert list(timing) == (["queue", "total"] if role == "denoiser" else ["total"])
    assert 0 < timing["total"] <= observed
    assert 0 <= timing.get("queue", 0.0) < timing["total"]


def test_a_denoise_behind_another_on_the_same_model_reports_its_wait_as_queue(stubs):
    # One compute thread per model: the second job waits for the first to finish its steps.
    request = tiny_denoise(conditioning(stubs), steps=12)
    calls = [stubs.denoiser.Denoise(request, timeout=DEADLINE_S) for _ in range(2)]
    waits = []
    for call in calls:
        assert any(event.HasField("result") for event in call)
        timing = server_timing(call)
        waits.append((timing["queue"], timing["total"] - timing["queue"]))
    (first_queue, first_work), (second_queue, _) = sorted(waits)
    assert first_queue < 0.5 * first_work < second_queue, waits


def test_a_refused_call_carries_its_error_not_a_timing(stubs):
    with pytest.raises(grpc.RpcError) as caught:
        stubs.encoder.Encode(tiny_encode(clip_skip=99), timeout=DEADLINE_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(caught.value)] == ["clip_skip"]
    assert server_timing(caught.value) == {}


class LingeringDenoiser(denoiser_service_pb2_grpc.DenoiserServiceServicer):
    """A denoiser written elsewhere against our protos: relays the real one, then holds its stream open after
    the result, and sends no timing."""

    def __init__(self, address: str, linger_s: float):
        self.channel = open_channel(address)
        self.real = denoiser_service_pb2_grpc.DenoiserServiceStub(self.channel)
        self.linger_s = linger_s

    def Denoise(self, request, context):
        yield from self.real.Denoise(request, timeout=DEADLINE_S)
        time.sleep(self.linger_s)


def test_a_backend_that_holds_its_stream_open_after_the_result_costs_a_second_not_the_deadline(services, model_root):
    linger_s = 8.0
    server = grpc.server(futures.ThreadPoolExecutor(4))
    denoiser = LingeringDenoiser(services.addresses["denoiser"], linger_s)
    denoiser_service_pb2_grpc.add_DenoiserServiceServicer_to_server(denoiser, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    links = (
        f"--encoder-address={services.addresses['encoder']}",
        f"--denoiser-address=127.0.0.1:{port}",
        f"--decoder-address={services.addresses['decoder']}",
    )
    try:
        with serve_role("gateway", model_root, args=links) as (_, gateway), ImageClient(gateway) as client:
            started = time.perf_counter()
            call = client.stream(tiny_generate(), timeout=DEADLINE_S)
            assert [event for event in call if event.HasField("image")]
            assert time.perf_counter() - started < linger_s / 2
            timing = server_timing(call)
            assert "denoise" in timing and "denoise-hop" not in timing, timing  # its handler's time is unknown
            assert "decode-hop" in timing
    finally:
        server.stop(0)
        denoiser.channel.close()
