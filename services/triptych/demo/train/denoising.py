"""What every stage that trains against the noise does the same way: the UNet, the ControlNet, the LoRA and the
textual inversion all turn a batch of stream pictures into noisy latents, condition on captions, and score the
predicted noise as SD's trainers do.

SD1.5's DDPM schedule (scaled-linear betas, 1000 steps, epsilon prediction), a uniform timestep per picture,
sampled VAE latents times the scaling factor, min-SNR-5 loss weights (Hang et al. 2023: the same optimum, reached
sooner). Every random draw is made on the CPU from the step's generator, in a fixed order, and moved to the device:
a GPU run draws the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from ...model_builders.tiny import SD15_SCHEDULER
from ..data import Example
from .configs import RESOLUTION
from .text import hidden_states, load_text_encoder, token_ids, tokenizer
from .vae import load_vae, to_pixels

CLIP_SKIP_WEIGHTS = (0.8, 0.1, 0.1)  # clip skip 0, 1, 2: so that clip skip 1 and 2 still draw what was asked
MIN_SNR_GAMMA = 5.0


def noise_scheduler() -> DDPMScheduler:
    """SD1.5's training schedule (its scheduler config, read by DDPM as SD's trainers do)."""
    return DDPMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": "epsilon"})


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """min(SNR, gamma) / SNR per timestep: the epsilon-loss weights of min-SNR-gamma."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


@dataclass
class NoisyBatch:
    """One step's inputs: noisy latents at ``timesteps``, the ``noise`` to predict, each picture's loss weight and
    clip skip."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    weights: torch.Tensor
    clip_skip: torch.Tensor

    def loss(self, predicted: torch.Tensor, min_snr: bool = True) -> torch.Tensor:
        """The mean squared error of the predicted noise, min-SNR-weighted unless ``min_snr`` is False."""
        errors = ((predicted - self.noise) ** 2).mean(dim=(1, 2, 3))
        return (errors * self.weights).mean() if min_snr else errors.mean()


class FrozenParts:
    """The trained tokenizer, text encoder and VAE of ``work``, frozen on ``device``, and the noise schedule."""

    def __init__(self, work: Path, device: str = "cpu"):
        self.device = torch.device(device)
        self.tokenizer = tokenizer(work)
        self.text_encoder = load_text_encoder(work).to(self.device)
        self.vae = load_vae(work).to(self.device)
        self.scheduler = noise_scheduler()

    @torch.no_grad()
    def noisy_batch(self, examples: list[Example], generator: torch.Generator) -> NoisyBatch:
        """Draws, in this order: the latents' posterior sample, each picture's clip skip, the noise, the timesteps."""
        pictures = np.stack([e.image(RESOLUTION) for e in examples])
        posterior = self.vae.encode(to_pixels(pictures).to(self.device)).latent_dist
        latents = posterior.sample(generator) * self.vae.config.scaling_factor
        clip_skip = torch.multinomial(torch.tensor(CLIP_SKIP_WEIGHTS), len(examples), True, generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(examples),), generator=generator)
        weights = min_snr_weights(self.scheduler, timesteps).to(self.device)
        timesteps = timesteps.to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return NoisyBatch(noisy, timesteps, noise, weights, clip_skip)

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return token_ids(self.tokenizer, captions).to(self.device)

    @torch.no_grad()
    def context(self, captions: list[str], clip_skip: torch.Tensor) -> torch.Tensor:
        """The captions' encoder states, each at its clip skip."""
        return hidden_states(self.text_encoder, self.token_ids(captions), clip_skip)
