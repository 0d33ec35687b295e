"""ControlNet on FLUX and SD3 through the chain (four processes, real gRPC; the decoder encodes each guide to
latents) against diffusers' FluxControlNetPipeline and StableDiffusion3ControlNetPipeline on the tiny weights,
bit for bit: single and multi-unit, windows, weights, with and without CFG, and both ways an SD3 ControlNet scales
its guide. Bad units name their field and family; DecoderService.EncodeImage on its own."""

from __future__ import annotations

import functools
import json
import shutil

import grpc
import numpy as np
import pytest
import torch
from diffusers import (
    FluxControlNetModel,
    FluxControlNetPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
)

from tests.e2e.reference import Oracle, pipeline
from tests.e2e.test_controlnet import guide, png
from tests.e2e.test_services import runtime_info
from triptych.client import field_violations, open_channel
from triptych.runtime.codec import decode_tensor, encode_tensor
from triptych.v1 import (
    common_pb2,
    decoder_service_pb2,
    decoder_service_pb2_grpc,
    denoiser_service_pb2,
    denoiser_service_pb2_grpc,
    image_service_pb2,
)

BASE = dict(positive_prompt="a red fox", width=64, height=64, steps=4)


@pytest.fixture(scope="module")
def sd3_shifted(model_root):
    """tiny/controlnet-sd3 as a ControlNet that shifts its guide and reads the real pooled projections
    (force_zeros_for_pooled_projection false), the other way StableDiffusion3ControlNetPipeline scales guides."""
    folder = model_root / "controlnet-variants/sd3-shifted"
    shutil.copytree(model_root / "tiny/controlnet-sd3", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "force_zeros_for_pooled_projection": False}))
    yield "controlnet-variants/sd3-shifted"
    shutil.rmtree(model_root / "controlnet-variants")


def reference(oracle: Oracle, model: str, units: list[tuple], seed: int):
    """diffusers' ControlNet pipeline for `model`'s family over its weights; each unit is (net id, image, scale,
    start, end). SD3's pipeline samples its guides from torch's global generator: seeded with the request's seed,
    as the chain does (docs/decisions.md)."""
    pipe_class, net_class = (
        (FluxControlNetPipeline, FluxControlNetModel)
        if model == "tiny/flux"
        else (StableDiffusion3ControlNetPipeline, SD3ControlNetModel)
    )
    ids, images, scales, starts, ends = (list(column) for column in zip(*units, strict=True))
    nets = [net_class.from_pretrained(oracle.root / net) for net in ids]
    one = (lambda values: values) if len(units) > 1 else (lambda values: values[0])
    pipe = pipe_class.from_pipe(oracle.pipe(model), controlnet=one(nets))
    pipe.set_progress_bar_config(disable=True)
    run = functools.partial(
        pipeline(pipe),
        control_image=one(images),
        controlnet_conditioning_scale=one(scales),
        control_guidance_start=one(starts),
        control_guidance_end=one(ends),
    )

    def seeded(scheduler: str, **kwargs):
        torch.manual_seed(seed)
        return run(scheduler, **kwargs)

    return seeded


def unit(model: str, image, **fields) -> common_pb2.ControlNetUnit:
    return common_pb2.ControlNetUnit(model=model, guide_image=png(image), **fields)


def test_flux_single_unit_equals_diffusers(client, oracle, services):
    request = dict(
        model="tiny/flux", seed=5, cfg_scale=3.5, control_net=[unit("tiny/controlnet-flux", guide(1), weight=0.8)]
    )
    request.update(BASE)
    chained = oracle.compare(
        client, request, reference(oracle, "tiny/flux", [("tiny/controlnet-flux", guide(1), 0.8, 0.0, 1.0)], 5)
    )
    plain = Oracle.chain(client, {key: value for key, value in request.items() if key != "control_net"})
    assert not np.array_equal(chained.pixels, plain.pixels), "the tiny FLUX ControlNet must change the image"
    held = {c.component for c in runtime_info(services.addresses["denoiser"]).loaded_components}
    assert "controlnet" in held and "vae" not in held, "the guide was encoded by the decoder, not the denoiser"


def test_flux_two_units_with_windows_equal_diffusers(client, oracle):
    """FluxMultiControlNetModel: each guide sampled from the request's generator in turn, then the noise."""
    units = [
        unit("tiny/controlnet-flux", guide(2), weight=0.6, end_step_percentage=60),
        unit("tiny/controlnet-flux", guide(3, (64, 64)), weight=1.2, start_step=2),
    ]
    request = dict(model="tiny/flux", seed=7, cfg_scale=4.0, control_net=units, **BASE)
    expected = [
        ("tiny/controlnet-flux", guide(2), 0.6, 0.0, 0.6),
        ("tiny/controlnet-flux", guide(3, (64, 64)), 1.2, 0.25, 1.0),
    ]
    oracle.compare(client, request, reference(oracle, "tiny/flux", expected, 7))


def test_sd3_single_unit_with_cfg_equals_diffusers(client, oracle):
    """InstantX-shaped: unshifted guide latents, zero pooled projections; with CFG each half has its own sample."""
    units = [unit("tiny/controlnet-sd3", guide(4), weight=0.9, start_step=2, end_step=3)]
    request = dict(model="tiny/sd3", seed=9, cfg_scale=5.0, negative_prompt="blurry", control_net=units, **BASE)
    expected = [("tiny/controlnet-sd3", guide(4), 0.9, 0.25, 0.75)]
    chained = oracle.compare(client, request, reference(oracle, "tiny/sd3", expected, 9))
    plain = Oracle.chain(client, {key: value for key, value in request.items() if key != "control_net"})
    assert not np.array_equal(chained.pixels, plain.pixels), "the tiny SD3 ControlNet must change the image"


def test_sd3_two_shifted_units_without_cfg_equal_diffusers(client, oracle, sd3_shifted):
    """SD3MultiControlNetModel, one sample per guide (no CFG) drawn from one stream; shifted guides, real pooled."""
    units = [unit(sd3_shifted, guide(5), weight=0.7), unit(sd3_shifted, guide(6, (64, 64)), end_step=2)]
    request = dict(model="tiny/sd3", seed=11, cfg_scale=1.0, control_net=units, **BASE)
    expected = [(sd3_shifted, guide(5), 0.7, 0.0, 1.0), (sd3_shifted, guide(6, (64, 64)), 1.0, 0.0, 0.5)]
    oracle.compare(client, request, reference(oracle, "tiny/sd3", expected, 11))


@pytest.mark.parametrize(
    "model, fields, field, words",
    [
        ("tiny/flux", dict(model="tiny/controlnet-flux", control_mode=2), "control_net[0].control_mode", "flux"),
        ("tiny/sd3", dict(model="tiny/controlnet-sd3", control_mode=3), "control_net[0].control_mode", "sd3"),
        ("tiny/flux", dict(model="tiny/controlnet-sd3"), "control_net[0].model", "not built for"),
        ("tiny/sd3", dict(model="tiny/controlnet-sd15"), "control_net[0].model", "not built for"),
        ("tiny/sd15", dict(model="tiny/controlnet-flux"), "control_net[0].model", "not built for"),
        ("tiny/flux", dict(model="tiny/controlnet-flux", guide_image=b"no image"), "control_net[0].guide_image", ""),
        (
            "tiny/sd3",
            dict(model="tiny/controlnet-sd3", guide_latents=common_pb2.VaeLatents(scaling_factor=1.0)),
            "control_net[0].guide_latents",
            "gateway",
        ),
    ],
    ids=["flux-prompt-mode", "sd3-controlnet-mode", "flux-sd3-net", "sd3-sd15-net", "sd15-flux-net", "bad-image",
         "latents-in-generate"],
)  # fmt: skip
def test_bad_units_name_the_field_and_the_service_keeps_serving(client, model, fields, field, words):
    units = [common_pb2.ControlNetUnit(**{"guide_image": png(guide(1)), **fields})]
    with pytest.raises(grpc.RpcError) as error:
        client.generate(image_service_pb2.GenerateRequest(model=model, seed=1, control_net=units, **BASE))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    violations = dict(field_violations(error.value))
    assert field in violations and words in violations[field], violations
    good = [unit("tiny/controlnet-flux", guide(1))]
    (image,) = client.generate(image_service_pb2.GenerateRequest(model="tiny/flux", seed=1, control_net=good, **BASE))
    assert image.image.width == 64


def test_encode_image_rpc(services):
    """DecoderService.EncodeImage alone: rows sampled with their own noise, the VAE's factors, a seed that
    reproduces the draw, a state that continues it; bad fields named."""
    with open_channel(services.addresses["decoder"]) as channel:
        stub = decoder_service_pb2_grpc.DecoderServiceStub(channel)

        def encode(**fields):
            request = {**dict(model="tiny/sd3", image=png(guide(1)), width=64, height=80), **fields}
            return stub.EncodeImage(decoder_service_pb2.EncodeImageRequest(**request))

        first = encode(samples=2, seed=3)
        latents = decode_tensor(first.latents.latents, "latents")
        assert list(latents.shape) == [2, 16, 10, 8] and not torch.equal(latents[0], latents[1])
        assert (first.latents.scaling_factor, first.latents.shift_factor, first.seed) == (1.5305, 0.0609, 3)
        assert encode(samples=2, seed=3).latents.latents.data == first.latents.latents.data
        continued = encode(generator_state=first.generator_state)
        assert continued.latents.latents.data != encode(seed=3).latents.latents.data
        for fields, field in ((dict(samples=3), "samples"), (dict(width=70), "width"), (dict(image=b"x"), "image")):
            with pytest.raises(grpc.RpcError) as error:
                encode(**fields)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in dict(field_violations(error.value)), field_violations(error.value)


@pytest.mark.parametrize(
    "model, width, guide, field",
    [
        ("tiny/flux", 80, dict(guide_image=png(guide(1))), "control_net[0].guide_latents"),
        ("tiny/flux", 80, dict(guide_latents=[1, 16, 4, 4]), "control_net[0].guide_latents.latents"),
        ("tiny/sd3", 80, dict(guide_latents=[3, 16, 8, 8]), "control_net[0].guide_latents.latents"),
        ("tiny/sd15", 32, dict(guide_latents=[1, 4, 8, 8]), "control_net[0].guide_latents"),
    ],
    ids=["flux-image", "flux-shape", "sd3-rows", "sd15-latents"],
)
def test_denoiser_checks_the_guide_the_family_takes(services, model, width, guide, field):
    """A direct DenoiseRequest: FLUX and SD3 units take latents of the output's shape (SD3: 1 or, with CFG, 2 rows),
    SD1.x/SDXL units the image; refused before the job queues."""
    if "guide_latents" in guide:
        latents = encode_tensor(torch.zeros(guide["guide_latents"]))
        guide = dict(guide_latents=common_pb2.VaeLatents(latents=latents, scaling_factor=1.0))
    pooled = encode_tensor(torch.zeros(1, 64 if model == "tiny/sd3" else 32))
    positive = common_pb2.TextConditioning(prompt_embeds=encode_tensor(torch.zeros(1, 8, width)))
    if model != "tiny/sd15":
        positive.pooled_prompt_embeds.CopyFrom(pooled)
    request = denoiser_service_pb2.DenoiseRequest(
        model=model, positive=positive, negative=positive, steps=2, width=64, height=64, guidance_scale=4.0, seed=1,
        control_net=[common_pb2.ControlNetUnit(model="tiny/controlnet-" + model.split("/")[1], **guide)],
    )  # fmt: skip
    with open_channel(services.addresses["denoiser"]) as channel, pytest.raises(grpc.RpcError) as error:
        list(denoiser_service_pb2_grpc.DenoiserServiceStub(channel).Denoise(request))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in field_violations(error.value)] == [field], field_violations(error.value)
