"""The validation matrix: bad inputs to each of the four services and to the CLI's --request path.

Each row (tests/e2e/matrix_rows.py) names the service, what is wrong, the status code expected and the field
that the google.rpc.BadRequest field violations must name (NOT_FOUND: the field the message starts with).
After each row a small valid request to the same service must still succeed: a bad request never crashes,
wedges or corrupts a service. Several bad fields in one request are all reported at once.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.e2e.matrix_rows import IA, MAX_MESSAGE, NF, REFINER, ROWS, SD15, Context, build, f32
from tests.e2e.stubs import (
    DEADLINE_S,
    answer,
    conditioning,
    encode_image,
    open_stubs,
    serving,
    tiny_decode,
    tiny_denoise,
    tiny_encode,
    tiny_generate,
    tiny_request,
    unit,
)
from triptych.client import field_violations
from triptych.v1 import common_pb2, image_service_pb2, tensor_pb2
from triptych.v1.denoiser_service_pb2 import DenoisingWindow


@pytest.fixture(scope="module")
def ctx(services):
    # The client may send twice the server's limit, so that the server's own limit is what refuses.
    stubs = open_stubs(services, max_message_bytes=2 * MAX_MESSAGE)
    yield Context(stubs, conditioning(stubs))
    stubs.close()


def test_the_matrix_is_large_and_its_rows_distinct():
    assert len(ROWS) >= 60
    assert len({(row.role, row.id) for row in ROWS}) == len(ROWS), "row ids repeat"
    assert {row.role for row in ROWS} == {"gateway", "encoder", "denoiser", "decoder"}


@pytest.mark.parametrize("row", ROWS, ids=[f"{row.role}-{row.id}" for row in ROWS])
def test_bad_input_is_refused_by_field_and_the_service_still_serves(ctx, row):
    request = build(row, ctx)
    with pytest.raises(grpc.RpcError) as raised:
        ctx.stubs.call(row.role, request)
    del request  # the oversized rows hold a few hundred MB
    error = raised.value
    assert error.code() == row.code, f"{error.code()}: {error.details()}"
    if row.code == IA:
        violations = field_violations(error)
        assert row.field in [field for field, _ in violations], f"{row.field!r} not among {violations}"
        assert all(why for _, why in violations), "every violation says why"
    elif row.code == NF:
        assert error.details().startswith(f"{row.field}: "), error.details()
    # The same small request, answered with the same bytes as before any bad one: nothing was corrupted.
    after = answer(row.role, ctx.stubs.call(row.role, tiny_request(row.role, ctx.encoded)))
    assert after == FIRST_ANSWERS.setdefault(row.role, after), f"{row.role} answers differently after {row.id}"


FIRST_ANSWERS: dict[str, bytes] = {}


def test_a_lora_of_another_family_is_refused_and_leaves_the_model_as_it_was(ctx):
    """The sd15 LoRA on SDXL fails half-way through injecting it; SDXL must then compute exactly what it did."""
    sdxl = tiny_generate(model="tiny/sdxl")
    before = answer("gateway", ctx.stubs.call("gateway", sdxl))
    bad = tiny_generate(model="tiny/sdxl", lora=[common_pb2.Lora(model="tiny/lora-sd15-kohya")])
    for _ in range(2):  # and again: nothing half-injected stays behind to make the second attempt differ
        with pytest.raises(grpc.RpcError) as raised:
            ctx.stubs.call("gateway", bad)
        assert raised.value.code() == IA and "lora[0].model" in dict(field_violations(raised.value))
    assert answer("gateway", ctx.stubs.call("gateway", sdxl)) == before


# --- several bad fields at once ------------------------------------------------------------------------------------


def violated(ctx: Context, role: str, request) -> set[str]:
    with pytest.raises(grpc.RpcError) as raised:
        ctx.stubs.call(role, request)
    assert raised.value.code() == IA, raised.value.details()
    return {field for field, _ in field_violations(raised.value)}


def test_every_bad_field_of_a_generate_request_is_reported_at_once(ctx):
    request = tiny_generate(
        width=500,
        height=0,
        steps=0,
        cfg_scale=math.nan,
        scheduler="x",
        number_results=0,
        output_quality=101,
        output_format=9,
        prompt_weighting=7,
        lora=[common_pb2.Lora(model="tiny/lora-sd15-kohya", weight=11)],
        embeddings=[common_pb2.TextualInversion(model="tiny/ti-sd15", weight=5)],
        control_net=[unit(weight=6, end_step_percentage=150)] + [unit()] * 4,
        refiner=image_service_pb2.Refiner(start_step_percentage=100),
    )
    assert violated(ctx, "gateway", request) == {
        "width",
        "height",
        "steps",
        "cfg_scale",
        "scheduler",
        "number_results",
        "output_quality",
        "output_format",
        "prompt_weighting",
        "lora[0].weight",
        "embeddings[0].weight",
        "control_net",
        "control_net[0].weight",
        "control_net[0].end_step_percentage",
        "refiner.model",
        "refiner.start_step_percentage",
    }


def test_every_bad_field_of_an_encode_request_is_reported_at_once(ctx):
    request = tiny_encode(
        positive_prompt="a" * 20_001,
        negative_prompt="b" * 20_001,
        prompt_weighting=3,
        loras=[common_pb2.Lora(weight=20)],
        embeddings=[common_pb2.TextualInversion(model="tiny/ti-sd15", weight=-5)],
    )
    assert violated(ctx, "encoder", request) == {
        "positive_prompt",
        "negative_prompt",
        "prompt_weighting",
        "loras[0].model",
        "loras[0].weight",
        "embeddings[0].weight",
    }


def test_every_bad_field_of_a_denoise_request_is_reported_at_once(ctx):
    request = tiny_denoise(
        ctx.encoded,
        width=12,
        height=4096,
        steps=151,
        guidance_scale=-1,
        scheduler="DDIM Karras Exponential",
        window=DenoisingWindow(start_fraction=0.9, end_fraction=0.1),
        latents=f32(1, 4, 8, 8, fill=math.inf),
        aesthetic_score=-1,
        loras=[common_pb2.Lora(model="tiny/lora-sd15-kohya", weight=-20)],
        control_net=[unit(weight=6, control_mode=7, end_step_percentage=120)],
    )
    request.positive.prompt_embeds.dtype = tensor_pb2.DATA_TYPE_UNSPECIFIED
    request.negative.prompt_embeds.data = b"\0"
    assert violated(ctx, "denoiser", request) == {
        "width",
        "height",
        "steps",
        "guidance_scale",
        "scheduler",
        "window",
        "latents.data",
        "aesthetic_score",
        "loras[0].weight",
        "control_net[0].weight",
        "control_net[0].control_mode",
        "control_net[0].end_step_percentage",
        "positive.prompt_embeds.dtype",
        "negative.prompt_embeds.data",
    }


def test_every_bad_field_of_a_decode_request_is_reported_at_once(ctx):
    request = tiny_decode(output_format=5, quality=0, png_text={"": "x", "\x00": "y"})
    request.ClearField("latents")
    assert violated(ctx, "decoder", request) == {
        "output_format",
        "quality",
        "png_text['']",
        "png_text['\\x00']",
        "latents",
    }


# --- guide images of odd modes: accepted and converted to RGB, as diffusers' do_convert_rgb does ------------------


def odd_guides() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)))
    return {
        "I;16-png": encode_image(Image.fromarray(rng.integers(0, 65536, (24, 20), dtype=np.uint16))),
        "CMYK-jpeg": encode_image(rgb.convert("CMYK"), "JPEG", quality=90),
        "P-with-transparency-png": encode_image(rgb.quantize(16), transparency=3),
        "LA-png": encode_image(rgb.convert("LA")),
        "1-bit-png": encode_image(rgb.convert("1")),
        "RGBA-webp": encode_image(rgba, "WEBP", lossless=True),
    }


ODD_GUIDES = odd_guides()


@pytest.mark.parametrize("name", list(ODD_GUIDES))
def test_guide_images_of_odd_modes_are_converted_to_rgb(ctx, name):
    """Accepted, and the image equals the one made from the RGB guide diffusers' preprocessing makes of it (resized
    in the image's own mode, then converted to RGB), sent at the output size so that the chain's resize is a no-op."""
    from diffusers.image_processor import VaeImageProcessor

    odd = ODD_GUIDES[name]
    assert Image.open(io.BytesIO(odd)).mode == name.split("-")[0]
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    as_rgb = encode_image(processor.resize(Image.open(io.BytesIO(odd)), height=64, width=64).convert("RGB"))
    first, second = (
        [
            np.asarray(Image.open(io.BytesIO(event.image.image.data)))  # pixels: the PNG's metadata names the guide
            for event in ctx.stubs.call("gateway", tiny_generate(control_net=[unit(guide_image=guide)]))
            if event.HasField("image")
        ]
        for guide in (odd, as_rgb)
    )
    assert len(first) == len(second) == 1 and np.array_equal(first[0], second[0])


# --- the CLI's --request path --------------------------------------------------------------------------------------

VALID_TASK = {"positivePrompt": "a red fox", "model": SD15, "width": 64, "height": 64, "steps": 2, "seed": 1}


def task(**changes) -> str:
    return json.dumps({**VALID_TASK, **changes})


# fmt: off
CLI_ROWS = [
    ("seed-negative", task(seed=-1), "INVALID_ARGUMENT", "seed"),
    ("seed-2-to-the-64", task(seed=2**64), "INVALID_ARGUMENT", "seed"),
    ("seed-not-an-integer", task(seed=1.5), "INVALID_ARGUMENT", "seed"),
    ("seed-a-string", task(seed="7"), "INVALID_ARGUMENT", "seed"),
    ("cfg-nan-literal", task(CFGScale=math.nan), "INVALID_ARGUMENT", "CFGScale"),
    ("unknown-key", task(sampler="Euler"), "INVALID_ARGUMENT", "sampler"),
    ("unknown-nested-key", task(lora=[{"model": "tiny/lora-sd15-kohya", "strength": 1}]), "INVALID_ARGUMENT",
     "lora[0].strength"),
    ("unknown-refiner-key", task(refiner={"model": REFINER, "startFrom": 3}), "INVALID_ARGUMENT", "refiner.startFrom"),
    ("guide-image-not-base64", task(controlNet=[{"model": "tiny/controlnet-sd15", "guideImage": "%%%"}]),
     "INVALID_ARGUMENT", "controlNet[0].guideImage"),
    ("guide-image-path-too-long", task(controlNet=[{"model": "tiny/controlnet-sd15", "guideImage": "d/" + "a" * 300}]),
     "INVALID_ARGUMENT", "controlNet[0].guideImage"),
    ("task-type-unsupported", task(taskType="imageUpscale"), "INVALID_ARGUMENT", "taskType"),
    ("second-task-bad", f"[{task()}, {task(seed=-5)}]", "INVALID_ARGUMENT", "[1].seed"),
    ("not-json", "{", "INVALID_ARGUMENT", "task"),
    ("integer-of-5000-digits", '{"steps": 1' + "0" * 5000 + "}", "INVALID_ARGUMENT", "task"),
    ("nested-100000-deep", "[" * 100_000 + "]" * 100_000, "INVALID_ARGUMENT", "task"),
    ("width-not-multiple-of-8-server-side", task(width=500), "INVALID_ARGUMENT", "width"),
    ("scheduler-suffix-server-side", task(scheduler="DDIM Karras"), "INVALID_ARGUMENT", "scheduler"),
    ("model-unknown-server-side", task(model="tiny/none"), "NOT_FOUND", "model"),
]
# fmt: on


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triptych.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("text,code,field", [row[1:] for row in CLI_ROWS], ids=[row[0] for row in CLI_ROWS])
def test_cli_request_file_errors_name_the_code_and_field(services, tmp_path, text, code, field):
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text(text)
    done = run_cli("generate", "--request", str(bad), "-o", str(tmp_path / "bad.png"), "--address", services.gateway)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert code in done.stderr, done.stderr[-2000:]
    assert (f"field {field}:" if code == "INVALID_ARGUMENT" else f"{field}: ") in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "bad.png").exists()
    good.write_text(task())
    done = run_cli("generate", "--request", str(good), "-o", str(tmp_path / "good.png"), "--address", services.gateway)
    assert done.returncode == 0 and (tmp_path / "good.png").exists(), done.stderr[-2000:]


def test_every_bad_key_of_a_request_file_is_reported_at_once(services, tmp_path):
    (tmp_path / "bad.json").write_text(task(seed=-1, CFGScale="high", sampler="x", lora=[{"weight": "1"}]))
    done = run_cli("generate", "--request", str(tmp_path / "bad.json"), "--address", services.gateway)
    assert done.returncode != 0
    for field in ("seed", "CFGScale", "sampler", "lora[0].weight"):
        assert f"field {field}:" in done.stderr, done.stderr


# Bytes that are no protobuf message: a truncated length-delimited field, a field number 0, a truncated varint.
NOT_PROTOBUF = {"truncated-field": b"\x0a\x05ab", "field-zero": b"\x00\x01", "truncated-varint": b"\x08\xff\xff"}
MAIN_METHODS = {
    "encoder": ("/triptych.v1.TextEncoderService/Encode", False),
    "denoiser": ("/triptych.v1.DenoiserService/Denoise", True),
    "decoder": ("/triptych.v1.DecoderService/Decode", False),
    "gateway": ("/triptych.v1.ImageService/Generate", True),
}


@pytest.mark.parametrize("role", list(MAIN_METHODS))
@pytest.mark.parametrize("payload", list(NOT_PROTOBUF))
def test_bytes_that_are_no_request_message_are_invalid_argument(ctx, services, role, payload):
    """grpcio itself answers an unparsable request with INTERNAL; every service answers INVALID_ARGUMENT."""
    method, streaming = MAIN_METHODS[role]
    address = services.gateway if role == "gateway" else services.addresses[role]
    with grpc.insecure_channel(address) as channel:
        call = (channel.unary_stream if streaming else channel.unary_unary)(method)  # raw bytes both ways
        with pytest.raises(grpc.RpcError) as raised:
            response = call(NOT_PROTOBUF[payload], timeout=DEADLINE_S)
            list(response) if streaming else response
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert [f for f, _ in field_violations(raised.value)] == ["request"]
    assert answer(role, ctx.stubs.call(role, tiny_request(role, ctx.encoded))), "and the next request is served"


def test_all_four_processes_still_serve_after_the_matrix(services):
    state = serving(services)
    assert all(state.values()), state
