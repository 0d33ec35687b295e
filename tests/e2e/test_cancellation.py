"""Cancellation and deadlines propagate through the gateway and stop the denoiser within a step; previews."""

from __future__ import annotations

import io
import time

import grpc
import pytest
from PIL import Image

from tests.e2e.stubs import tiny_generate
from tests.e2e.test_services import runtime_info
from triptych.v1 import image_service_pb2

LONG = dict(model="tiny/sdxl", positive_prompt="a red fox", width=256, height=256, steps=150, seed=3)


SHORT = {**LONG, "steps": 2, "width": 64, "height": 64}


def denoiser_counter(services, name: str) -> int:
    return runtime_info(services.addresses["denoiser"]).counters[name]


def wait_until_stable(services, name: str, seconds: float = 0.6) -> int:
    """The counter's value once it stopped moving for `seconds` (the denoiser has stopped stepping)."""
    value = denoiser_counter(services, name)
    while True:
        time.sleep(seconds)
        now = denoiser_counter(services, name)
        if now == value:
            return now
        value = now


def test_cancel_mid_run_stops_the_denoiser_within_a_step(client, services):
    cancelled_before = denoiser_counter(services, "denoise_cancelled")
    call = client.stream(image_service_pb2.GenerateRequest(**LONG))
    seen = 0
    for event in call:
        if event.HasField("progress") and event.progress.stage == "denoise":
            seen = event.progress.step
            if seen >= 3:
                steps_at_cancel = denoiser_counter(services, "denoise_steps")
                call.cancel()
                break
    assert seen >= 3
    settled = wait_until_stable(services, "denoise_steps")
    assert settled - steps_at_cancel <= 2, "the loop must stop at the next step (one may be in flight)"
    assert denoiser_counter(services, "denoise_cancelled") == cancelled_before + 1
    assert (
        len(client.generate(image_service_pb2.GenerateRequest(**{**LONG, "steps": 2, "width": 64, "height": 64}))) == 1
    )


def test_deadline_propagates_to_the_denoiser(client, services):
    cancelled_before = denoiser_counter(services, "denoise_cancelled")
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(image_service_pb2.GenerateRequest(**LONG), timeout=2.0)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_stable(services, "denoise_steps")
    assert denoiser_counter(services, "denoise_cancelled") == cancelled_before + 1
    assert (
        len(client.generate(image_service_pb2.GenerateRequest(**{**LONG, "steps": 2, "width": 64, "height": 64}))) == 1
    )


def test_progress_reports_every_step_and_previews_on_request(client):
    events = list(client.stream(tiny_generate(steps=6, scheduler="Euler", preview_interval_steps=2)))
    denoise = [e.progress for e in events if e.HasField("progress") and e.progress.stage == "denoise"]
    assert [p.step for p in denoise] == [1, 2, 3, 4, 5, 6] and {p.total_steps for p in denoise} == {6}
    assert all(b.elapsed_seconds >= a.elapsed_seconds for a, b in zip(denoise, denoise[1:], strict=False))
    previews = [p.step for p in denoise if p.preview_png]
    assert previews == [2, 4, 6]
    assert Image.open(io.BytesIO(denoise[1].preview_png)).size == (8, 8)  # 1/8 of the image
    assert events[-1].HasField("image")


def test_progress_interval_sends_fewer_events_but_always_the_last_and_the_previews(client):
    request = tiny_generate(steps=6, scheduler="Euler")
    every_step = list(client.stream(request))
    request.progress_interval_ms = 60_000
    request.preview_interval_steps = 4
    sparse = list(client.stream(request))
    denoise = [e.progress for e in sparse if e.HasField("progress") and e.progress.stage == "denoise"]
    assert [(p.step, bool(p.preview_png)) for p in denoise] == [(4, True), (6, False)]
    assert sparse[-1].image.image.data == every_step[-1].image.image.data, "the same image"
