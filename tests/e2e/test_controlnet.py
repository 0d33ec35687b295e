"""ControlNet units through the chain vs diffusers' ControlNet pipelines (single, multi, windows, modes)."""

from __future__ import annotations

import functools
import io
import shutil

import grpc
import numpy as np
import pytest
from diffusers import ControlNetModel, StableDiffusionXLPipeline
from diffusers import StableDiffusionControlNetPipeline as SD15ControlNet
from diffusers import StableDiffusionXLControlNetPipeline as SDXLControlNet
from PIL import Image

from tests.e2e.reference import Reference, pipeline, pixels
from tests.e2e.test_services import runtime_info
from triptych.v1 import common_pb2, image_service_pb2

STEPS, SEED = 8, 31
BASE = dict(
    positive_prompt="a red fox", negative_prompt="blurry", width=64, height=64, steps=STEPS, seed=SEED, cfg_scale=7.0
)


def guide(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A deterministic guide image of another size than the output (the chain must resize it as diffusers)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def nets(model_root):
    return {
        name: ControlNetModel.from_pretrained(model_root / f"tiny/{name}")
        for name in ("controlnet-sd15", "controlnet-sdxl")
    }


def soft_everywhere(net: ControlNetModel) -> ControlNetModel:
    """PROMPT mode's stated maths: guess-mode (logspace) scales on the whole CFG batch. diffusers has no such
    mode, so the reference ControlNet forces guess_mode=True while the pipeline feeds it both halves."""
    clone = ControlNetModel.from_config(net.config)
    clone.load_state_dict(net.state_dict())
    original = clone.forward

    def forward(*args, **kwargs):
        kwargs["guess_mode"] = True
        return original(*args, **kwargs)

    clone.forward = forward
    return clone


def controlnet(base_pipe, units: list[tuple], guess_mode=False) -> Reference:
    """diffusers' ControlNet pipeline over `base_pipe`'s weights; each unit is (net, image, scale, start, end)."""
    pipe_class = SDXLControlNet if isinstance(base_pipe, StableDiffusionXLPipeline) else SD15ControlNet
    nets, images, scales, starts, ends = (list(column) for column in zip(*units, strict=True))
    one = (lambda values: values) if len(units) > 1 else (lambda values: values[0])
    pipe = pipe_class.from_pipe(base_pipe, controlnet=one(nets))
    pipe.set_progress_bar_config(disable=True)
    return functools.partial(
        pipeline(pipe),
        image=one(images),
        controlnet_conditioning_scale=one(scales),
        control_guidance_start=one(starts),
        control_guidance_end=one(ends),
        guess_mode=guess_mode,
    )


def request(model: str, units: list[common_pb2.ControlNetUnit]) -> dict:
    return dict(model=model, control_net=units, **BASE)


def chain(client, model: str, units: list[common_pb2.ControlNetUnit]) -> np.ndarray:
    return pixels(client.generate(image_service_pb2.GenerateRequest(**request(model, units)))[0].image.data)


def unit(model: str, image: Image.Image, **fields) -> common_pb2.ControlNetUnit:
    return common_pb2.ControlNetUnit(model=model, guide_image=png(image), **fields)


def test_sd15_single_unit_balanced(client, oracle, nets):
    units = [unit("tiny/controlnet-sd15", guide(1), weight=0.8)]
    reference = controlnet(oracle.pipe("tiny/sd15"), [(nets["controlnet-sd15"], guide(1), 0.8, 0.0, 1.0)])
    got = oracle.compare(client, request("tiny/sd15", units), reference).pixels
    plain = pixels(client.generate(image_service_pb2.GenerateRequest(model="tiny/sd15", **BASE))[0].image.data)
    assert not np.array_equal(got, plain), "the tiny ControlNet must have a visible effect"


def test_sd15_step_window(client, oracle, nets):
    # Steps 2..5 (1-based, inclusive) of 8 -> start (2-1)/8, end 5/8.
    units = [unit("tiny/controlnet-sd15", guide(2), start_step=2, end_step=5)]
    reference = controlnet(oracle.pipe("tiny/sd15"), [(nets["controlnet-sd15"], guide(2), 1.0, 1 / 8, 5 / 8)])
    oracle.compare(client, request("tiny/sd15", units), reference)


def test_sd15_two_units_percentage_windows(client, oracle, nets):
    units = [
        unit("tiny/controlnet-sd15", guide(3), weight=0.6, start_step_percentage=0, end_step_percentage=60),
        unit("tiny/controlnet-sd15", guide(4, (64, 64)), weight=1.2, start_step_percentage=25),
    ]
    net = nets["controlnet-sd15"]
    reference = controlnet(
        oracle.pipe("tiny/sd15"), [(net, guide(3), 0.6, 0.0, 0.6), (net, guide(4, (64, 64)), 1.2, 0.25, 1.0)]
    )
    oracle.compare(client, request("tiny/sd15", units), reference)


def test_the_most_units_keep_their_unet_loaded(client, services, model_root):
    """ControlNets have an LRU of their own: a request with four ControlNets (the most a request may name) leaves
    its UNet in memory, rather than reloading it, and its LoRAs, on every such request."""
    copies = model_root / "controlnet-copies"
    ids = [f"controlnet-copies/{name}" for name in "abcd"]
    for model in ids:
        shutil.copytree(model_root / "tiny/controlnet-sd15", model_root / model)
    try:
        chain(client, "tiny/sd15", [unit(model, guide(i), weight=0.5) for i, model in enumerate(ids)])
        held = {(c.model, c.component) for c in runtime_info(services.addresses["denoiser"]).loaded_components}
        assert ("tiny/sd15", "unet") in held and {(model, "controlnet") for model in ids} <= held, held
    finally:
        shutil.rmtree(copies)


def test_sd15_controlnet_mode_equals_guess_mode(client, oracle, nets):
    units = [unit("tiny/controlnet-sd15", guide(5), control_mode=common_pb2.CONTROL_MODE_CONTROLNET)]
    reference = controlnet(
        oracle.pipe("tiny/sd15"), [(nets["controlnet-sd15"], guide(5), 1.0, 0.0, 1.0)], guess_mode=True
    )
    oracle.compare(client, request("tiny/sd15", units), reference)


def test_sd15_prompt_mode_is_soft_injection_on_both_halves(client, oracle, nets):
    units = [unit("tiny/controlnet-sd15", guide(6), control_mode=common_pb2.CONTROL_MODE_PROMPT)]
    reference = controlnet(
        oracle.pipe("tiny/sd15"), [(soft_everywhere(nets["controlnet-sd15"]), guide(6), 1.0, 0.0, 1.0)]
    )
    got = oracle.compare(client, request("tiny/sd15", units), reference).pixels
    balanced = chain(client, "tiny/sd15", [unit("tiny/controlnet-sd15", guide(6))])
    assert not np.array_equal(got, balanced)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sdxl_single_unit(client, oracle, nets, guess_mode):
    mode = common_pb2.CONTROL_MODE_CONTROLNET if guess_mode else common_pb2.CONTROL_MODE_BALANCED
    units = [unit("tiny/controlnet-sdxl", guide(7), weight=0.9, end_step=6, control_mode=mode)]
    reference = controlnet(
        oracle.pipe("tiny/sdxl"), [(nets["controlnet-sdxl"], guide(7), 0.9, 0.0, 6 / 8)], guess_mode=guess_mode
    )
    oracle.compare(client, request("tiny/sdxl", units), reference)


@pytest.mark.parametrize(
    "model,fields,code,field",
    [
        (
            "tiny/sd15",
            dict(model="tiny/controlnet-sdxl", guide_image=png(guide(1))),
            "INVALID_ARGUMENT",
            "control_net[0].model",
        ),
        (
            "tiny/sd15",
            dict(model="tiny/controlnet-none", guide_image=png(guide(1))),
            "NOT_FOUND",
            "control_net[0].model",
        ),
        ("tiny/sd15", dict(model="tiny/sd15", guide_image=png(guide(1))), "INVALID_ARGUMENT", "control_net[0].model"),
        (
            "tiny/sd15",
            dict(model="tiny/controlnet-sd15", guide_image=b"not an image"),
            "INVALID_ARGUMENT",
            "control_net[0].guide_image",
        ),
        (
            "tiny/sd15",
            dict(model="tiny/controlnet-sd15", guide_image=png(guide(1)), start_step=6, end_step=3),
            "INVALID_ARGUMENT",
            "control_net[0]",
        ),
        (
            "tiny/sd15",
            dict(model="tiny/controlnet-sd15", guide_image=png(guide(1)), end_step=99),
            "INVALID_ARGUMENT",
            "control_net[0].end_step",
        ),
        (
            "tiny/sd15",
            dict(model="tiny/controlnet-sd15", guide_image=png(guide(1)), start_step_percentage=120),
            "INVALID_ARGUMENT",
            "control_net[0].start_step_percentage",
        ),
        (
            "tiny/sd15",
            dict(model="tiny/controlnet-sd15", guide_image=png(guide(1)), weight=-1),
            "INVALID_ARGUMENT",
            "control_net[0].weight",
        ),
    ],
)
def test_bad_units(client, model, fields, code, field):
    with pytest.raises(grpc.RpcError) as raised:
        chain(client, model, [common_pb2.ControlNetUnit(**fields)])
    assert raised.value.code().name == code and field in raised.value.details(), raised.value.details()
    assert chain(client, "tiny/sd15", []).shape == (64, 64, 3)


def test_decompression_bomb_is_refused_before_decoding(client):
    bomb = Image.new("1", (20000, 20000))  # tiny PNG on the wire, 400 Mpixel once decoded
    buffer = io.BytesIO()
    bomb.save(buffer, format="PNG", optimize=True)
    with pytest.raises(grpc.RpcError) as raised:
        chain(
            client,
            "tiny/sd15",
            [common_pb2.ControlNetUnit(model="tiny/controlnet-sd15", guide_image=buffer.getvalue())],
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "guide_image" in raised.value.details()
