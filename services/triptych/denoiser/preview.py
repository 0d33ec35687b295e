"""Cheap progress previews: a linear latent -> RGB approximation at latent resolution (no VAE here).

The factors are the widely used approximations for the SD1.x and SDXL VAEs' latent spaces (as in ComfyUI's
latent previews); on other VAEs (or random tiny weights) the preview is only indicative.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

_FACTORS = {
    "sd1": (
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
        [0.1084, -0.0175, -0.0011],
    ),
}


def preview_png(latents: torch.Tensor, family: str) -> bytes:
    """PNG of the first latent of the batch, 1/8 of the image size."""
    factors, bias = _FACTORS.get(family, _FACTORS["sd1"])
    weights = torch.tensor(factors, dtype=torch.float32)
    if latents.shape[1] != weights.shape[0]:
        return b""
    rgb = latents[0].float().cpu().permute(1, 2, 0) @ weights + torch.tensor(bias)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
