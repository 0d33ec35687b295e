"""Stage ``controlnet``: a ControlNet that draws the shape where a white-on-black guide mask puts it.

SD's ControlNet recipe in miniature: ``ControlNetModel.from_unet`` copies the trained UNet's down path and starts
its outputs at zero, the UNet stays frozen, and the guide is the picture's own filled silhouette
(``Example.guide``) as a [0, 1] image, as diffusers' ControlNet pipelines pass it. Half the captions are empty (the
ControlNet paper's 50%) so that the mask alone places the shape; the rest follow the base mix. Same noising and loss
as the UNet (``denoising.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel

from ..data import CaptionMix, batch
from .configs import CONTROLNET, RESOLUTION, StageSettings
from .denoising import FrozenParts
from .loop import Trainer
from .unet import load_unet

STAGE = "controlnet"
CONTROL_MIX = CaptionMix(partial=0.15, empty=0.5)


def guides(examples) -> torch.Tensor:
    """(n, 3, H, W) float guides in [0, 1]."""
    masks = np.stack([e.guide(RESOLUTION) for e in examples])
    return torch.from_numpy(masks).permute(0, 3, 1, 2).float() / 255.0


def train_controlnet(
    work: Path, settings: StageSettings = CONTROLNET, max_seconds: float | None = None, log=print, device: str = "cpu"
) -> bool:
    """Run (or resume) the stage on ``device``; when it completes, write ``work/controlnet/controlnet``."""
    frozen = FrozenParts(work, device)
    unet = load_unet(work).to(device)
    torch.manual_seed(settings.seed)
    controlnet = ControlNetModel.from_unet(unet).to(device)
    trainer = Trainer(work, STAGE, settings, controlnet, log=log)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        examples = batch(settings.seed, step * settings.batch_size, settings.batch_size, CONTROL_MIX)
        noisy = frozen.noisy_batch(examples, generator)
        context = frozen.context([e.caption for e in examples], noisy.clip_skip)
        down, mid = controlnet(
            noisy.noisy, noisy.timesteps, context, controlnet_cond=guides(examples).to(device), return_dict=False
        )
        predicted = unet(
            noisy.noisy,
            noisy.timesteps,
            context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        return noisy.loss(predicted)

    if not trainer.run(loss_fn, max_seconds):
        return False
    log(f"controlnet: wrote {trainer.export(controlnet, 'controlnet', {})}")
    return True
