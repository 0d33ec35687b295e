"""The rows of the validation matrix (tests/e2e/test_validation_matrix.py): one bad input each.

A row is (service, what is wrong, the changes that make a tiny valid request bad, the status code, the field).
Changes map a dotted field path to a value, or to a function of the Context giving the value (for conditioning
made by the real encoder and for payloads too large to build at import); None clears the field.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from PIL import Image

from tests.e2e.stubs import (
    GUIDE_PNG,
    Stubs,
    encode_image,
    set_path,
    tensor,
    tiny_decode,
    tiny_denoise,
    tiny_encode,
    tiny_generate,
)
from tests.e2e.stubs import unit as cn
from triptych.serving.settings import Settings
from triptych.v1 import common_pb2, tensor_pb2
from triptych.v1.decoder_service_pb2 import OUTPUT_FORMAT_JPEG
from triptych.v1.denoiser_service_pb2 import DenoisingWindow
from triptych.v1.image_service_pb2 import Refiner

IA, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_MESSAGE = Settings().max_message_bytes
SD15, SDXL, REFINER = "tiny/sd15", "tiny/sdxl", "tiny/sdxl-refiner"
KOHYA, PEFT = "tiny/lora-sd15-kohya", "tiny/lora-sd15-peft"


@dataclass
class Context:
    """What rows are built from: the stubs and the real encoder's conditioning per model."""

    stubs: Stubs
    encoded: dict

    def embeds(self, model: str = SD15, which: str = "positive") -> tensor_pb2.Tensor:
        return getattr(self.encoded[model], which).prompt_embeds

    def dim(self, model: str = SD15) -> int:
        return int(self.embeds(model).shape[-1])


@dataclass(frozen=True)
class Row:
    role: str  # "gateway", "encoder", "denoiser" or "decoder"
    id: str
    changes: dict[str, Any]
    code: grpc.StatusCode
    field: str | None  # the BadRequest field (INVALID_ARGUMENT) or the field the message starts with (NOT_FOUND)


def build(row: Row, ctx: Context) -> Message:
    """The tiny valid request of the row's service with the row's changes applied."""
    tiny = {"gateway": tiny_generate, "encoder": tiny_encode, "decoder": tiny_decode}
    request = tiny[row.role]() if row.role in tiny else tiny_denoise(ctx.encoded)
    for path, value in row.changes.items():
        set_path(request, path, value(ctx) if callable(value) else value)
    return request


def f32(*shape, fill: float = 0.0) -> tensor_pb2.Tensor:
    return tensor(np.full(shape, fill, np.float32))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height: a decompression bomb if trusted."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


TRUNCATED_PNG = encode_image(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
# Images PIL decodes, but in a format the proto does not promise (PNG, JPEG, WEBP): refused, not decoded.
OTHER_FORMATS = {fmt: encode_image(Image.new("RGB", (64, 64), (1, 2, 3)), fmt) for fmt in ("GIF", "BMP", "TIFF")}


def cond_of(model: str) -> dict[str, Any]:
    """Changes that make a DenoiseRequest use `model` with that model's own (valid) conditioning."""
    return {
        "model": model,
        "positive": lambda ctx: ctx.encoded[model].positive,
        "negative": lambda ctx: ctx.encoded[model].negative,
    }


def lora(model: str, **weight) -> list:
    return [common_pb2.Lora(model=model, **weight)]


def ti(model: str, **weight) -> list:
    return [common_pb2.TextualInversion(model=model, **weight)]


def oversized_text(ctx: Context) -> str:
    return "x" * (MAX_MESSAGE + 1024)


def window(**fractions) -> dict[str, Any]:
    """A window starting past 0 with valid previous latents, unless the row overrides them."""
    return {"window": DenoisingWindow(**fractions), "latents": f32(1, 4, 8, 8)}


# fmt: off
GATEWAY = [
    ("width-not-multiple-of-8", {"width": 500}, IA, "width"),
    ("width-0", {"width": 0}, IA, "width"),
    ("width-below-64", {"width": 56}, IA, "width"),
    ("width-too-large", {"width": 2056}, IA, "width"),
    ("height-uint32-max", {"height": 2**32 - 1}, IA, "height"),
    ("steps-0", {"steps": 0}, IA, "steps"),
    ("steps-above-max", {"steps": 151}, IA, "steps"),
    ("steps-beyond-what-lcm-can-run", {"scheduler": "LCM", "steps": 51}, IA, "steps"),
    ("cfg-negative", {"cfg_scale": -0.5}, IA, "cfg_scale"),
    ("cfg-above-50", {"cfg_scale": 50.01}, IA, "cfg_scale"),
    ("cfg-nan", {"cfg_scale": math.nan}, IA, "cfg_scale"),
    ("cfg-inf", {"cfg_scale": math.inf}, IA, "cfg_scale"),
    ("cfg-minus-inf", {"cfg_scale": -math.inf}, IA, "cfg_scale"),
    ("scheduler-unknown", {"scheduler": "Eulerish"}, IA, "scheduler"),
    ("scheduler-suffix-ddim-karras", {"scheduler": "DDIM Karras"}, IA, "scheduler"),
    ("scheduler-suffix-lcm-exponential", {"scheduler": "LCM Exponential"}, IA, "scheduler"),
    ("scheduler-suffix-alone", {"scheduler": "Karras"}, IA, "scheduler"),
    ("number-results-0", {"number_results": 0}, IA, "number_results"),
    ("number-results-too-many", {"number_results": 21}, IA, "number_results"),
    ("model-empty", {"model": ""}, IA, "model"),
    ("model-unknown", {"model": "tiny/nope"}, NF, "model"),
    ("model-dotdot", {"model": "../etc"}, IA, "model"),
    ("model-absolute", {"model": "/etc/passwd"}, IA, "model"),
    ("model-escaping", {"model": "tiny/../../secret"}, IA, "model"),
    ("model-id-longer-than-a-file-name", {"model": "tiny/" + "m" * 300}, IA, "model"),
    ("model-is-a-lora-file", {"model": KOHYA}, IA, "model"),
    ("model-is-a-controlnet", {"model": "tiny/controlnet-sd15"}, IA, "model"),
    ("model-is-a-vae", {"model": "tiny/vae-alt"}, IA, "model"),
    ("lora-is-a-model-folder", {"lora": lora(SD15)}, IA, "lora[0].model"),
    ("lora-unknown", {"lora": lora("tiny/nolora")}, NF, "lora[0].model"),
    ("lora-dotdot", {"lora": lora("../lora")}, IA, "lora[0].model"),
    ("lora-weight-11", {"lora": lora(KOHYA, weight=11)}, IA, "lora[0].weight"),
    ("lora-weight-nan", {"lora": lora(KOHYA, weight=math.nan)}, IA, "lora[0].weight"),
    ("lora-too-many", {"lora": lora(KOHYA) * 9}, IA, "lora"),
    ("lora-listed-twice", {"lora": lora(KOHYA) + lora(KOHYA, weight=0.5)}, IA, "lora[1].model"),
    ("embedding-listed-twice", {"embeddings": ti("tiny/ti-sd15") + ti("tiny/ti-sd15", weight=0.5)}, IA,
     "embeddings[1].model"),
    ("lora-of-another-family", {"model": SDXL, "lora": lora(KOHYA)}, IA, "lora[0].model"),
    ("embedding-weight-above-4", {"embeddings": ti("tiny/ti-sd15", weight=4.5)}, IA, "embeddings[0].weight"),
    ("embedding-weight-below-minus-4", {"embeddings": ti("tiny/ti-sd15", weight=-4.01)}, IA, "embeddings[0].weight"),
    ("embedding-unknown", {"embeddings": ti("tiny/noti")}, NF, "embeddings[0].model"),
    ("embedding-sdxl-on-sd15", {"embeddings": ti("tiny/ti-sdxl")}, IA, "embeddings[0].model"),
    ("embedding-is-a-model-folder", {"embeddings": ti(SD15)}, IA, "embeddings[0].model"),
    ("vae-unknown", {"vae": "tiny/novae"}, NF, "vae"),
    ("vae-is-a-lora-file", {"vae": KOHYA}, IA, "vae"),
    ("vae-absolute", {"vae": "/tmp"}, IA, "vae"),
    ("clip-skip-too-deep", {"clip_skip": 9}, IA, "clip_skip"),
    ("output-quality-0", {"output_quality": 0}, IA, "output_quality"),
    ("output-format-unknown", {"output_format": 9}, IA, "output_format"),
    ("prompt-weighting-unknown", {"prompt_weighting": 7}, IA, "prompt_weighting"),
    ("prompt-too-many-characters", {"positive_prompt": "a" * 20_001}, IA, "positive_prompt"),
    ("negative-prompt-too-many-chunks", {"negative_prompt": "fox " * 800, "cfg_scale": 7.0}, IA, "negative_prompt"),
    ("refiner-on-sd15-base", {"refiner": Refiner(model=REFINER, start_step=1)}, IA, "refiner.model"),
    ("refiner-is-an-sdxl-base", {"model": SDXL, "refiner": Refiner(model=SDXL, start_step=1)}, IA, "refiner.model"),
    ("refiner-unknown", {"model": SDXL, "refiner": Refiner(model="tiny/nor", start_step=1)}, NF, "refiner.model"),
    ("refiner-model-empty", {"model": SDXL, "refiner": Refiner(start_step=1)}, IA, "refiner.model"),
    ("refiner-without-start", {"model": SDXL, "refiner": Refiner(model=REFINER)}, IA, "refiner"),
    ("refiner-start-step-0", {"model": SDXL, "refiner": Refiner(model=REFINER, start_step=0)}, IA,
     "refiner.start_step"),
    ("refiner-start-beyond-steps", {"model": SDXL, "refiner": Refiner(model=REFINER, start_step=3)}, IA,
     "refiner.start_step"),
    ("refiner-start-step-with-steps-0", {"model": SDXL, "steps": 0, "refiner": Refiner(model=REFINER, start_step=1)},
     IA, "steps"),
    ("refiner-start-percentage-150", {"model": SDXL, "refiner": Refiner(model=REFINER, start_step_percentage=150)},
     IA, "refiner.start_step_percentage"),
    ("refiner-start-percentage-nan", {"model": SDXL, "refiner": Refiner(model=REFINER, start_step_percentage=math.nan)},
     IA, "refiner.start_step_percentage"),
    ("controlnet-weight-above-5", {"control_net": [cn(weight=5.5)]}, IA, "control_net[0].weight"),
    ("controlnet-weight-negative", {"control_net": [cn(weight=-1)]}, IA, "control_net[0].weight"),
    ("controlnet-start-after-end", {"control_net": [cn(start_step=2, end_step=1)]}, IA, "control_net[0]"),
    ("controlnet-end-step-beyond-steps", {"control_net": [cn(end_step=3)]}, IA, "control_net[0].end_step"),
    ("controlnet-start-percentage-above-100", {"control_net": [cn(start_step_percentage=101)]}, IA,
     "control_net[0].start_step_percentage"),
    ("controlnet-end-percentage-nan", {"control_net": [cn(end_step_percentage=math.nan)]}, IA,
     "control_net[0].end_step_percentage"),
    ("controlnet-percentages-reversed", {"control_net": [cn(start_step_percentage=80, end_step_percentage=20)]}, IA,
     "control_net[0]"),
    ("controlnet-mode-unknown", {"control_net": [cn(control_mode=9)]}, IA, "control_net[0].control_mode"),
    ("controlnet-guide-missing", {"control_net": [cn(guide_image=b"")]}, IA, "control_net[0].guide_image"),
    # Each within max_guide_image_bytes, but the image's response carries them twice in base64: over 256 MiB.
    ("controlnet-guides-too-large-together", {"control_net": [cn(guide_image=bytes(32 << 20))] * 3}, IA,
     "control_net"),
    ("controlnet-guides-too-large-together-jpeg", {"control_net": [cn(guide_image=bytes(32 << 20))] * 4,
                                                   "output_format": OUTPUT_FORMAT_JPEG},
     IA, "control_net[0].guide_image"),  # within what a JPEG's response holds: the denoiser finds no image in it
    ("controlnet-guide-undecodable", {"control_net": [cn(guide_image=b"not an image")]}, IA,
     "control_net[0].guide_image"),
    ("controlnet-guide-truncated-png", {"control_net": [cn(guide_image=TRUNCATED_PNG)]}, IA,
     "control_net[0].guide_image"),
    *(
        (f"controlnet-guide-{fmt.lower()}", {"control_net": [cn(guide_image=data)]}, IA, "control_net[0].guide_image")
        for fmt, data in OTHER_FORMATS.items()
    ),
    ("controlnet-guide-bomb-20000x20000", {"control_net": [cn(guide_image=png_header_only(20_000, 20_000))]}, IA,
     "control_net[0].guide_image"),
    ("controlnet-guide-5000x5000-header", {"control_net": [cn(guide_image=png_header_only(5_000, 5_000))]}, IA,
     "control_net[0].guide_image"),
    ("controlnet-guide-over-max-bytes", {"control_net": [cn(guide_image=GUIDE_PNG + bytes(32 << 20))]}, IA,
     "control_net[0].guide_image"),
    ("controlnet-unknown", {"control_net": [cn(model="tiny/nocontrolnet")]}, NF, "control_net[0].model"),
    ("controlnet-is-a-model-folder", {"control_net": [cn(model=SD15)]}, IA, "control_net[0].model"),
    ("controlnet-sdxl-on-sd15", {"control_net": [cn(model="tiny/controlnet-sdxl")]}, IA, "control_net[0].model"),
    ("controlnet-too-many-units", {"control_net": [cn()] * 5}, IA, "control_net"),
    ("message-over-max-size", {"positive_prompt": oversized_text}, RE, None),
]

ENCODER = [
    ("model-empty", {"model": ""}, IA, "model"),
    ("model-unknown", {"model": "tiny/nope"}, NF, "model"),
    ("model-dotdot", {"model": "tiny/../../etc"}, IA, "model"),
    ("model-is-a-vae", {"model": "tiny/vae-alt"}, IA, "model"),
    ("model-is-a-lora-file", {"model": PEFT}, IA, "model"),
    ("model-id-longer-than-a-file-name", {"model": "tiny/" + "m" * 300}, IA, "model"),
    ("clip-skip-too-deep", {"clip_skip": 5}, IA, "clip_skip"),
    ("lora-too-many", {"loras": lora(KOHYA) * 9}, IA, "loras"),
    ("lora-model-empty", {"loras": lora("")}, IA, "loras[0].model"),
    ("lora-listed-twice", {"loras": lora(PEFT) + lora(KOHYA) + lora(PEFT, weight=0.5)}, IA, "loras[2].model"),
    ("lora-weight-below-minus-10", {"loras": lora(KOHYA, weight=-11)}, IA, "loras[0].weight"),
    ("lora-is-a-controlnet", {"loras": lora("tiny/controlnet-sd15")}, IA, "loras[0].model"),
    ("lora-is-a-model-weights-file", {"loras": lora("tiny/sd15/text_encoder/model")}, IA, "loras[0].model"),
    ("embedding-is-a-text-file", {"embeddings": ti("tiny/README.txt")}, IA, "embeddings[0].model"),
    ("embedding-weight-inf", {"embeddings": ti("tiny/ti-sd15", weight=math.inf)}, IA, "embeddings[0].weight"),
    ("embedding-sdxl-on-sd15", {"embeddings": ti("tiny/ti-sdxl")}, IA, "embeddings[0].model"),
    ("embedding-sd15-on-sdxl", {"model": SDXL, "embeddings": ti("tiny/ti-sd15")}, IA, "embeddings[0].model"),
    ("embedding-unknown", {"embeddings": ti("tiny/x")}, NF, "embeddings[0].model"),
    ("prompt-weighting-unknown", {"prompt_weighting": 3}, IA, "prompt_weighting"),
    ("negative-prompt-too-many-characters", {"negative_prompt": "b" * 20_001}, IA, "negative_prompt"),
    ("prompt-too-many-chunks", {"positive_prompt": "fox " * 800}, IA, "positive_prompt"),
    ("message-over-max-size", {"positive_prompt": oversized_text}, RE, None),
]

DENOISER = [
    ("embeds-data-shorter-than-shape", {"positive.prompt_embeds.data": lambda ctx: ctx.embeds().data[:-4]}, IA,
     "positive.prompt_embeds.data"),
    ("embeds-data-longer-than-shape", {"positive.prompt_embeds.data": lambda ctx: ctx.embeds().data + bytes(4)}, IA,
     "positive.prompt_embeds.data"),
    ("embeds-dtype-unspecified", {"positive.prompt_embeds.dtype": tensor_pb2.DATA_TYPE_UNSPECIFIED}, IA,
     "positive.prompt_embeds.dtype"),
    ("embeds-dtype-unknown-enum", {"negative.prompt_embeds.dtype": 99}, IA, "negative.prompt_embeds.dtype"),
    ("embeds-dtype-int64", {"positive.prompt_embeds": lambda ctx: tensor(np.zeros((1, 77, ctx.dim()), np.int64))},
     IA, "positive.prompt_embeds.dtype"),
    ("embeds-dtype-uint8", {"negative.prompt_embeds": lambda ctx: tensor(np.zeros((1, 77, ctx.dim()), np.uint8))},
     IA, "negative.prompt_embeds.dtype"),
    ("embeds-negative-dimension", {"positive.prompt_embeds.shape": [1, -77, 32]}, IA, "positive.prompt_embeds.shape"),
    ("embeds-shape-overflowing-int64", {"positive.prompt_embeds.shape": [2**62, 2**62, 4]}, IA,
     "positive.prompt_embeds.data"),
    ("embeds-empty-but-strides-overflow", {"positive.prompt_embeds.shape": [2**62, 2**62, 0],
                                           "positive.prompt_embeds.data": b""}, IA, "positive.prompt_embeds.shape"),
    ("embeds-wrong-width-for-model", {"positive.prompt_embeds": lambda ctx: f32(1, 77, ctx.dim() + 1)}, IA,
     "positive.prompt_embeds"),
    ("embeds-batch-2", {"positive.prompt_embeds": lambda ctx: f32(2, 77, ctx.dim()),
                        "negative.prompt_embeds": lambda ctx: f32(2, 77, ctx.dim())}, IA, "positive.prompt_embeds"),
    ("embeds-2d", {"positive.prompt_embeds": lambda ctx: f32(77, ctx.dim())}, IA, "positive.prompt_embeds"),
    ("embeds-too-many-tokens", {"positive.prompt_embeds": lambda ctx: f32(1, 77 * 11, ctx.dim())}, IA,
     "positive.prompt_embeds"),
    ("embeds-nan", {"positive.prompt_embeds": lambda ctx: f32(1, 77, ctx.dim(), fill=math.nan)}, IA,
     "positive.prompt_embeds.data"),
    ("embeds-inf", {"negative.prompt_embeds": lambda ctx: f32(1, 77, ctx.dim(), fill=-math.inf)}, IA,
     "negative.prompt_embeds.data"),
    ("negative-shape-differs", {"negative.prompt_embeds": lambda ctx: f32(1, 154, ctx.dim())}, IA,
     "negative.prompt_embeds"),
    ("positive-missing", {"positive": None}, IA, "positive"),
    ("negative-missing-with-cfg", {"negative": None}, IA, "negative"),
    ("sd15-conditioning-on-sdxl", {"model": SDXL}, IA, "positive.prompt_embeds"),
    ("sdxl-pooled-missing", {**cond_of(SDXL), "positive.pooled_prompt_embeds": None}, IA,
     "positive.pooled_prompt_embeds"),
    ("sdxl-pooled-wrong-width", {**cond_of(SDXL), "positive.pooled_prompt_embeds": f32(1, 5),
                                 "negative.pooled_prompt_embeds": f32(1, 5)}, IA, "positive.pooled_prompt_embeds"),
    ("sdxl-pooled-widths-differ", {**cond_of(SDXL), "negative.pooled_prompt_embeds": f32(1, 5)}, IA,
     "negative.pooled_prompt_embeds"),
    ("sdxl-pooled-nan", {**cond_of(SDXL), "negative.pooled_prompt_embeds.data": lambda ctx: np.full(
        list(ctx.encoded[SDXL].negative.pooled_prompt_embeds.shape), np.nan, np.float32).tobytes()}, IA,
     "negative.pooled_prompt_embeds.data"),
    ("sdxl-conditioning-on-refiner", {**cond_of(SDXL), "model": REFINER}, IA, "positive.prompt_embeds"),
    ("aesthetic-score-nan", {**cond_of(REFINER), "aesthetic_score": math.nan}, IA, "aesthetic_score"),
    ("negative-aesthetic-score-huge", {**cond_of(REFINER), "negative_aesthetic_score": 1e39}, IA,
     "negative_aesthetic_score"),
    ("window-start-after-end", window(start_fraction=0.6, end_fraction=0.5), IA, "window"),
    ("window-empty", {"window": DenoisingWindow(end_fraction=0.0)}, IA, "window"),
    ("window-start-negative", {"window": DenoisingWindow(start_fraction=-0.1)}, IA, "window.start_fraction"),
    ("window-end-nan", {"window": DenoisingWindow(end_fraction=math.nan)}, IA, "window.end_fraction"),
    ("window-start-without-latents", {"window": DenoisingWindow(start_fraction=0.5)}, IA, "latents"),
    ("latents-wrong-shape", {**window(start_fraction=0.5), "latents": f32(1, 4, 16, 16)}, IA, "latents"),
    ("latents-wrong-channels", {**window(start_fraction=0.5), "latents": f32(1, 3, 8, 8)}, IA, "latents"),
    ("latents-nan", {**window(start_fraction=0.5), "latents": f32(1, 4, 8, 8, fill=math.nan)}, IA, "latents.data"),
    ("latents-int64", {**window(start_fraction=0.5), "latents": tensor(np.zeros((1, 4, 8, 8), np.int64))}, IA,
     "latents.dtype"),
    ("generator-state-corrupt", {"generator_state": b"garbage"}, IA, "generator_state"),
    ("generator-state-right-size-garbage", {"generator_state": bytes(range(256)) * 19 + bytes(192)}, IA,
     "generator_state"),
    ("steps-0", {"steps": 0}, IA, "steps"),
    ("steps-too-few-for-plms-on-sdxl", {**cond_of(SDXL), "scheduler": "PLMS", "steps": 3}, IA, "steps"),
    ("guidance-negative", {"guidance_scale": -1.0}, IA, "guidance_scale"),
    ("height-not-multiple-of-8", {"height": 65}, IA, "height"),
    ("width-0", {"width": 0}, IA, "width"),
    ("height-below-64-without-cfg", {"height": 16, "guidance_scale": 1.0}, IA, "height"),
    ("scheduler-suffix-ddim-karras", {"scheduler": "DDIM Karras"}, IA, "scheduler"),
    ("scheduler-unknown", {"scheduler": "Euler b"}, IA, "scheduler"),
    ("model-empty", {"model": ""}, IA, "model"),
    ("model-unknown", {"model": "tiny/nope"}, NF, "model"),
    ("model-is-a-lora-file", {"model": KOHYA}, IA, "model"),
    ("lora-is-a-vae", {"loras": lora("tiny/vae-alt")}, IA, "loras[0].model"),
    ("lora-weight-inf", {"loras": lora(PEFT, weight=math.inf)}, IA, "loras[0].weight"),
    ("lora-listed-twice", {"loras": lora(KOHYA) * 2}, IA, "loras[1].model"),
    ("controlnet-end-step-beyond-steps", {"control_net": [cn(end_step=5)]}, IA, "control_net[0].end_step"),
    ("controlnet-step-with-steps-0", {"steps": 0, "control_net": [cn(start_step=1)]}, IA, "steps"),
    ("lora-is-a-unet-weights-file", {"loras": lora("tiny/sd15/unet/diffusion_pytorch_model")}, IA, "loras[0].model"),
    ("controlnet-guide-undecodable", {"control_net": [cn(guide_image=b"\x89PNG\r\n\x1a\nxx")]}, IA,
     "control_net[0].guide_image"),
    ("message-over-max-size",
     {"latents": lambda ctx: tensor_pb2.Tensor(dtype=1, shape=[1], data=bytes(MAX_MESSAGE + 1024))}, RE, None),
]

DECODER = [
    ("latents-missing", {"latents": None}, IA, "latents"),
    ("latents-wrong-channels", {"latents": f32(1, 3, 8, 8)}, IA, "latents"),
    ("latents-3d", {"latents": f32(4, 8, 8)}, IA, "latents"),
    ("latents-batch-0", {"latents": f32(0, 4, 8, 8)}, IA, "latents"),
    ("latents-zero-height-width", {"latents": f32(1, 4, 0, 0)}, IA, "latents"),
    ("latents-batch-above-max", {"latents": f32(21, 4, 1, 1)}, IA, "latents"),
    ("latents-decode-too-large", {"latents": f32(1, 4, 257, 8)}, IA, "latents"),
    ("latents-nan", {"latents": f32(1, 4, 8, 8, fill=math.nan)}, IA, "latents.data"),
    ("latents-int64", {"latents": tensor(np.zeros((1, 4, 8, 8), np.int64))}, IA, "latents.dtype"),
    ("latents-data-short", {"latents.data": bytes(10)}, IA, "latents.data"),
    ("latents-dtype-unspecified", {"latents.dtype": tensor_pb2.DATA_TYPE_UNSPECIFIED}, IA, "latents.dtype"),
    ("output-format-unknown", {"output_format": 7}, IA, "output_format"),
    ("quality-0", {"quality": 0}, IA, "quality"),
    ("quality-above-100", {"quality": 101}, IA, "quality"),
    ("png-text-key-not-latin-1", {"png_text": {"ключ": "x"}}, IA, "png_text['ключ']"),
    ("png-text-key-empty", {"png_text": {"": "x"}}, IA, "png_text['']"),
    ("model-unknown", {"model": "tiny/nope"}, NF, "model"),
    ("model-dotdot", {"model": ".."}, IA, "model"),
    ("vae-id-longer-than-a-file-name", {"vae": "v" * 256}, IA, "vae"),
    ("model-is-a-controlnet", {"model": "tiny/controlnet-sd15"}, IA, "model"),
    ("vae-unknown", {"vae": "tiny/novae"}, NF, "vae"),
    ("vae-is-a-lora-file", {"vae": PEFT}, IA, "vae"),
    ("message-over-max-size", {"png_text": lambda ctx: {"k": oversized_text(ctx)}}, RE, None),
]
# fmt: on

ROWS = [
    Row(role, *row)
    for role, table in (("gateway", GATEWAY), ("encoder", ENCODER), ("denoiser", DENOISER), ("decoder", DECODER))
    for row in table
]
