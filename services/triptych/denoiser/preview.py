"""Cheap progress previews: a linear latent -> RGB approximation at latent resolution (no VAE here).

The factors are each family's (`Family.preview`, as in ComfyUI's latent previews); on other VAEs (or random tiny
weights) the preview is only indicative.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from triptych.families.base import PreviewFactors


def preview_png(latents: torch.Tensor, preview: PreviewFactors) -> bytes:
    """PNG of the first latent of the batch, at latent resolution; b"" when the factors do not fit its channels."""
    weights = torch.tensor(preview.factors, dtype=torch.float32)
    if latents.shape[1] != weights.shape[0]:
        return b""
    rgb = latents[0].float().cpu().permute(1, 2, 0) @ weights + torch.tensor(preview.bias)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
