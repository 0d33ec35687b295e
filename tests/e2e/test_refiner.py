"""SDXL base -> refiner through the chain vs diffusers' ensemble of expert denoisers."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from tests.e2e.reference import Reference, set_scheduler
from tests.e2e.stubs import conditioning, encode_image, open_stubs, tiny_denoise, tiny_generate
from triptych.v1 import common_pb2, denoiser_service_pb2, image_service_pb2

# What this file's comparisons with diffusers share: tiny SDXL at 64x64, with a negative prompt.
FOX = dict(model="tiny/sdxl", positive_prompt="a red fox", negative_prompt="blurry", width=64, height=64)


@pytest.fixture(scope="module")
def pipes(model_root):
    base = StableDiffusionXLPipeline.from_pretrained(model_root / "tiny/sdxl")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(model_root / "tiny/sdxl-refiner")
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def ensemble(pipes, fraction: float, **base_kwargs) -> Reference:
    """diffusers' ensemble of expert denoisers, handing over at `fraction`; base_kwargs go to the base (a ControlNet
    pipeline when they name a controlnet)."""

    def run(scheduler: str, **kwargs) -> np.ndarray:
        # Views of the loaded pipelines (shared weights) whose scheduler this call may replace: no test leaves its
        # scheduler to the next.
        if "controlnet" in base_kwargs:
            base = StableDiffusionXLControlNetPipeline.from_pipe(pipes[0], controlnet=base_kwargs["controlnet"])
        else:
            base = StableDiffusionXLPipeline.from_pipe(pipes[0])
        refiner = StableDiffusionXLImg2ImgPipeline.from_pipe(pipes[1])
        for pipe in (base, refiner):
            pipe.set_progress_bar_config(disable=True)
            set_scheduler(pipe, scheduler)
        # One generator object across both (kwargs holds it), as diffusers' docs do.
        extra = {k: v for k, v in base_kwargs.items() if k != "controlnet"}
        latents = base(**kwargs, denoising_end=fraction, output_type="latent", **extra).images
        del kwargs["width"], kwargs["height"]
        return np.asarray(refiner(**kwargs, denoising_start=fraction, image=latents).images[0])

    return run


@pytest.mark.parametrize(
    "scheduler,steps,refiner_start",
    [
        ("", 15, {"start_step_percentage": 80}),
        ("Euler a", 10, {"start_step_percentage": 70}),  # ancestral: the generator state must travel
        ("DPM++ 2M SDE", 10, {"start_step": 6}),
        ("Heun", 8, {"start_step_percentage": 50}),  # second order: diffusers' +1 adjustment
    ],
)
def test_base_to_refiner_equals_diffusers(client, oracle, pipes, scheduler, steps, refiner_start):
    refiner = image_service_pb2.Refiner(model="tiny/sdxl-refiner", **refiner_start)
    request = dict(FOX, seed=21, steps=steps, scheduler=scheduler, refiner=refiner)
    fraction = refiner_start.get("start_step_percentage", 0) / 100 or refiner_start.get("start_step", 0) / steps
    events = oracle.compare(client, request, ensemble(pipes, fraction)).events
    stages = {e.progress.stage for e in events if e.HasField("progress")}
    assert {"denoise", "refine"} <= stages


def test_refiner_base_gets_eleven_of_fifteen_steps_at_80_percent(client):
    refiner = image_service_pb2.Refiner(model="tiny/sdxl-refiner", start_step_percentage=80)
    events = list(client.stream(tiny_generate(model="tiny/sdxl", positive_prompt="x", steps=15, refiner=refiner)))
    totals = {e.progress.stage: e.progress.total_steps for e in events if e.HasField("progress")}
    assert totals["denoise"] == 11 and totals["refine"] == 4


@pytest.mark.parametrize(
    "base,refiner", [("tiny/sd15", "tiny/sdxl-refiner"), ("tiny/sdxl", "tiny/sdxl"), ("tiny/sdxl", "tiny/sd15")]
)
def test_refiner_needs_an_sdxl_base_and_an_sdxl_refiner(client, base, refiner):
    import grpc

    with pytest.raises(grpc.RpcError) as raised:
        client.generate(
            image_service_pb2.GenerateRequest(
                model=base,
                positive_prompt="x",
                seed=1,
                steps=4,
                width=64,
                height=64,
                refiner=image_service_pb2.Refiner(model=refiner, start_step_percentage=50),
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "refiner.model" in raised.value.details()


def test_controlnet_window_is_a_fraction_of_the_whole_schedule(client, oracle, pipes, model_root):
    """The base's ControlNet unit ends at 50% of all 10 steps (5 model calls), not of the 8 calls the base runs
    before an 80% hand-off: diffusers' SDXL ControlNet pipeline sets controlnet_keep before denoising_end."""
    guide = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    unit = common_pb2.ControlNetUnit(
        model="tiny/controlnet-sdxl", guide_image=encode_image(guide), end_step_percentage=50, weight=2.0
    )
    refiner = image_service_pb2.Refiner(model="tiny/sdxl-refiner", start_step_percentage=80)
    request = dict(FOX, seed=5, steps=10, control_net=[unit], refiner=refiner)
    net = ControlNetModel.from_pretrained(model_root / "tiny/controlnet-sdxl")
    reference = ensemble(
        pipes, 0.8, controlnet=net, image=guide, controlnet_conditioning_scale=2.0, control_guidance_end=0.5
    )
    oracle.compare(client, request, reference)


def test_a_continued_generator_state_without_a_seed_reports_none(services):
    """A second window that continues generator_state draws from that state alone: the same latents whatever
    seed it names or omits, and a result seed of 0 when it names none (no seed reproduces that noise)."""
    stubs = open_stubs(services)
    try:
        first = tiny_denoise(conditioning(stubs), "tiny/sd15", steps=6, scheduler="Euler a", seed=9)
        first.window.end_fraction = 0.5
        base = [e.result for e in stubs.call("denoiser", first) if e.HasField("result")][0]

        def second(**seed) -> denoiser_service_pb2.DenoiseResult:
            request = denoiser_service_pb2.DenoiseRequest()
            request.CopyFrom(first)
            request.ClearField("seed")
            request.window.Clear()
            request.window.start_fraction = 0.5
            request.latents.CopyFrom(base.latents)
            request.generator_state = base.generator_state
            for name, value in seed.items():
                setattr(request, name, value)
            return [e.result for e in stubs.call("denoiser", request) if e.HasField("result")][0]

        unseeded, seeded, other = second(), second(seed=9), second(seed=123)
        assert unseeded.seed == 0 and seeded.seed == 9
        assert unseeded.latents.data == seeded.latents.data == other.latents.data
    finally:
        stubs.close()
