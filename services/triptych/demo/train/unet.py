"""Stage ``unet``: the conditional UNet learns to denoise the VAE's latents of the stream, as SD trained its UNet.

Per step: the stream's pictures through the frozen VAE (a sampled latent times the scaling factor), SD1.5's DDPM
noise schedule (scaled-linear betas, 1000 steps, epsilon prediction), a uniform timestep per picture, and the
captions through the frozen text encoder. Caption dropout for classifier-free guidance is the stream's 10% of empty
captions. Each picture's clip skip is drawn from ``CLIP_SKIP_WEIGHTS``, so clip skip 1 and 2 still draw what was
asked. Loss: MSE on the noise with min-SNR-5 weights (Hang et al. 2023: the same optimum, reached sooner). The
exported weights are the EMA (decay 0.999), as SD's were.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from ...model_builders.tiny import SD15_SCHEDULER
from ..data import BASE_MIX, batch
from .configs import RESOLUTION, UNET, StageSettings, unet_config
from .loop import Trainer, load_part
from .text import hidden_states, load_text_encoder, token_ids, tokenizer
from .vae import load_vae, to_pixels

STAGE = "unet"
CLIP_SKIP_WEIGHTS = (0.8, 0.1, 0.1)  # clip skip 0, 1, 2
MIN_SNR_GAMMA = 5.0


def new_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config())


def noise_scheduler() -> DDPMScheduler:
    """SD1.5's training schedule (its scheduler config, read by DDPM as SD's trainers do)."""
    return DDPMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": "epsilon"})


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """min(SNR, gamma) / SNR per timestep: the epsilon-loss weights of min-SNR-gamma."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(
    work: Path, settings: StageSettings = UNET, max_seconds: float | None = None, log=print, device: str = "cpu"
) -> bool:
    """Run (or resume) the stage on ``device``; when it completes, write ``work/unet/unet`` (the EMA weights).

    Every random draw is made on the CPU from the step's generator and moved: a GPU run draws the same noise."""
    tok = tokenizer(work)
    text_encoder, vae = load_text_encoder(work).to(device), load_vae(work).to(device)
    scaling_factor = vae.config.scaling_factor
    scheduler = noise_scheduler()
    unet = new_unet(settings.seed).to(device)
    trainer = Trainer(work, STAGE, settings, unet, log=log)
    skip_weights = torch.tensor(CLIP_SKIP_WEIGHTS)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        examples = batch(settings.seed, step * settings.batch_size, settings.batch_size, BASE_MIX)
        n = len(examples)
        with torch.no_grad():
            pictures = np.stack([e.image(RESOLUTION) for e in examples])
            latents = vae.encode(to_pixels(pictures).to(device)).latent_dist.sample(generator) * scaling_factor
            clip_skip = torch.multinomial(skip_weights, n, replacement=True, generator=generator)
            ids = token_ids(tok, [e.caption for e in examples]).to(device)
            context = hidden_states(text_encoder, ids, clip_skip)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
        weights = min_snr_weights(scheduler, timesteps).to(device)
        timesteps = timesteps.to(device)
        predicted = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, context).sample
        return (((predicted - noise) ** 2).mean(dim=(1, 2, 3)) * weights).mean()

    if not trainer.run(loss_fn, max_seconds):
        return False
    log(f"unet: wrote {trainer.export(unet, 'unet', {})}")
    return True


def load_unet(work: Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The trained UNet (EMA weights) of a completed ``unet`` stage."""
    return load_part(work, STAGE, "unet", UNet2DConditionModel, dtype)
