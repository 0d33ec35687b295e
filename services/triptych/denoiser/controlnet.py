"""ControlNet units: guide-image preparation, per-step windows, control modes and residual merging.

Mirrors StableDiffusion(XL)ControlNetPipeline and MultiControlNetModel: guide images go through
VaeImageProcessor(do_convert_rgb=True, do_normalize=False); model call i of T is controlled iff i/T >= start
and (i+1)/T <= end; residuals of several units are summed in order. The mode is per unit (diffusers has one
`guess_mode` per pipeline): BALANCED is plain ControlNet, PROMPT is soft injection (ControlNet's guess_mode
scales, logspace(-1, 0)) on the whole CFG batch, CONTROLNET is soft injection on the conditional half only
with zeros for the unconditional half (diffusers' guess_mode with CFG).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from triptych.rules.control_units import CONTROLNET, PROMPT, ControlUnit
from triptych.serving.errors import InvalidArgument

MAX_GUIDE_PIXELS = 4096 * 4096  # checked from the header, before decoding (decompression bombs)
# What the proto promises, and all PIL may try: no TIFF, BMP, GIF, PSD, EPS ... decoders reachable from a request.
GUIDE_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass
class PreparedUnit:
    net: ControlNetModel
    image: torch.Tensor  # [B, 3, H, W] in [0, 1], B matching the batch the net is called with
    scale: float
    start: float
    end: float
    mode: str


def decode_guide_image(data: bytes, field: str) -> Image.Image:
    """Opens an encoded guide image; INVALID_ARGUMENT if it is not a decodable image or too large."""
    try:
        image = Image.open(io.BytesIO(data), formats=GUIDE_FORMATS)
        width, height = image.size
        if width * height > MAX_GUIDE_PIXELS:
            raise InvalidArgument.one(field, f"{width}x{height} exceeds {MAX_GUIDE_PIXELS} pixels")
        image.load()
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise InvalidArgument.one(field, f"not a decodable PNG/JPEG/WEBP image ({type(exc).__name__})") from exc
    return image


def check_family(net: ControlNetModel, unet, field: str, model: str) -> None:
    """A ControlNet must be built for the base model's UNet (cross-attention width, added conditioning)."""
    mismatch = (
        net.config.cross_attention_dim != unet.config.cross_attention_dim
        or net.config.addition_embed_type != unet.config.addition_embed_type
        or net.config.in_channels != unet.config.in_channels
    )
    if mismatch:
        raise InvalidArgument.one(field, f"{model!r} was not built for this base model's family")


def prepare_units(
    units: list[ControlUnit],
    nets: list[ControlNetModel],
    width: int,
    height: int,
    do_cfg: bool,
    device: torch.device,
    dtype: torch.dtype,
    latent_scale: int,
) -> list[PreparedUnit]:
    """Decodes and resizes each guide image as the pipelines' prepare_image does."""
    processor = VaeImageProcessor(vae_scale_factor=latent_scale, do_convert_rgb=True, do_normalize=False)
    prepared = []
    for unit, net in zip(units, nets, strict=True):
        image = decode_guide_image(unit.guide_image, f"{unit.field}.guide_image")
        tensor = processor.preprocess(image, height=height, width=width).to(device=device, dtype=dtype)
        # As prepare_image: repeat_interleave copies the channels-last view preprocess returns into a standard
        # layout. Convolutions round differently on the two layouts, so this is needed for bit equality.
        tensor = tensor.repeat_interleave(1, dim=0)
        if do_cfg and unit.mode != CONTROLNET:
            tensor = torch.cat([tensor] * 2)
        prepared.append(PreparedUnit(net, tensor, unit.scale, unit.start, unit.end, unit.mode))
    return prepared


def residuals(
    units: list[PreparedUnit],
    i: int,
    total: int,
    t,
    latents: torch.Tensor,
    latent_model_input: torch.Tensor,
    scale_model_input,
    prompt_embeds: torch.Tensor,
    added_cond_kwargs: dict | None,
    do_cfg: bool,
):
    """Summed (down, mid) residuals of every unit for model call i of `total`, as the pipelines compute them."""
    down_sum, mid_sum = None, None
    for unit in units:
        keep = 1.0 - float(i / total < unit.start or (i + 1) / total > unit.end)
        soft = unit.mode in (PROMPT, CONTROLNET)
        conditional_only = unit.mode == CONTROLNET and do_cfg
        if conditional_only:
            sample = scale_model_input(latents, t)
            embeds = prompt_embeds.chunk(2)[1]
            added = None if added_cond_kwargs is None else {k: v.chunk(2)[1] for k, v in added_cond_kwargs.items()}
        else:
            sample, embeds, added = latent_model_input, prompt_embeds, added_cond_kwargs
        down, mid = unit.net(
            sample,
            t,
            encoder_hidden_states=embeds,
            controlnet_cond=unit.image,
            conditioning_scale=unit.scale * keep,
            guess_mode=soft,
            added_cond_kwargs=added,
            return_dict=False,
        )
        if conditional_only:  # add 0 to the unconditional half, as diffusers does
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        if down_sum is None:
            down_sum, mid_sum = down, mid
        else:  # MultiControlNetModel's merge
            down_sum = [previous + current for previous, current in zip(down_sum, down, strict=True)]
            mid_sum = mid_sum + mid
    return down_sum, mid_sum
