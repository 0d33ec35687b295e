"""ControlNet units: guide-image preparation, per-step windows, control modes and residual merging (the UNet
families; the FLUX and SD3 families use the windows and the merge, with their guides as latents: families/).

Mirrors StableDiffusion(XL)ControlNetPipeline and MultiControlNetModel: guide images go through
VaeImageProcessor(do_convert_rgb=True, do_normalize=False); model call i of T is controlled iff i/T >= start
and (i+1)/T <= end; residuals of several units are summed in order. The mode is per unit (diffusers has one
`guess_mode` per pipeline): BALANCED is plain ControlNet, PROMPT is soft injection (ControlNet's guess_mode
scales, logspace(-1, 0)) on the whole CFG batch, CONTROLNET is soft injection on the conditional half only
with zeros for the unconditional half (diffusers' guess_mode with CFG).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor

from triptych.rules.control_units import CONTROLNET, PROMPT, ControlUnit
from triptych.runtime.guide_images import decode_guide_image


@dataclass
class PreparedUnit:
    net: ControlNetModel
    # What the net takes as controlnet_cond, batch matching its call: UNet families the image [B, 3, H, W] in [0, 1];
    # FLUX and SD3 the guide's scaled latents (FLUX packed).
    image: torch.Tensor
    scale: float
    start: float
    end: float
    mode: str


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


def kept_scale(unit: PreparedUnit, i: int, total: int) -> float:
    """The unit's conditioning scale at model call i of `total`: its weight inside its window, 0 outside (the
    pipelines' controlnet_keep; the ControlNet still runs, as in diffusers)."""
    keep = 1.0 - float(i / total < unit.start or (i + 1) / total > unit.end)
    return unit.scale * keep


def merged(previous: list | None, current: list | None) -> list | None:
    """Block residuals of several units summed in order (Multi*ControlNetModel's merge)."""
    if previous is None or current is None:  # (a ControlNet without blocks of a kind adds nothing to them)
        return current if previous is None else previous
    return [before + added for before, added in zip(previous, current, strict=True)]


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
            conditioning_scale=kept_scale(unit, i, total),
            guess_mode=soft,
            added_cond_kwargs=added,
            return_dict=False,
        )
        if conditional_only:  # add 0 to the unconditional half, as diffusers does
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        mid_sum = mid if mid_sum is None else mid_sum + mid  # MultiControlNetModel's merge
        down_sum = merged(down_sum, down)
    return down_sum, mid_sum
