"""Stage ``vae``: the autoencoder learns flat shapes, filled and outlined (the LoRA's style), crescents included.

Loss: L1 on pixels, weighted so that in every picture the shape's pixels weigh as much as the background's
(`foreground_weights`), plus L1 on their horizontal and vertical differences (edges stay sharp without SD's perceptual
and adversarial losses, which need networks we cannot download), plus SD's KL weight 1e-6. When the stage completes its
``scaling_factor`` is measured as SD's 0.18215 was: 1 / std of the latents of 512 stream pictures; and the
classifier reads its reconstructions of the held-out scenes (metrics.json): the UNet cannot draw what the VAE
cannot.

Stage ``vae-decoder`` then trains the decoder alone, the encoder frozen (``train_vae_decoder``), with outlines every
other picture; ``assemble`` ships its VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..classify import read
from ..data import BASE_MIX, Example, example
from ..render import Placement
from ..vocabulary import HELD_OUT
from .configs import RESOLUTION, VAE, VAE_DECODER, StageSettings, vae_config
from .loop import Trainer, load_latest_part, load_part

STAGE = "vae"
DECODER_STAGE = "vae-decoder"
KL_WEIGHT = 1e-6
OUTLINE_EVERY = 5  # stage vae: one stream picture in five is drawn as an outline
# Stage vae-decoder, recipe 2: every other picture. At one in five its decoder drew 60% of the held-out outlines as
# outlines and half the small ones, too few for the LoRA (docs/demo-model.md, "The LoRA").
DECODER_OUTLINE_EVERY = 2


def stream_examples(seed: int, start: int, count: int, outline_every: int = OUTLINE_EVERY) -> list[Example]:
    """The VAE's pictures: the base stream, every ``outline_every``-th drawn as an outline."""
    return [
        example(seed, i, BASE_MIX, style="outline" if i % outline_every == outline_every - 1 else "filled")
        for i in range(start, start + count)
    ]


def to_pixels(pictures: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1], as SD's image processor gives the VAE."""
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_pictures(pixels: torch.Tensor) -> np.ndarray:
    """The inverse of ``to_pixels``, rounded and clipped as SD's image processor does."""
    scaled = ((pixels.clamp(-1, 1) + 1) * 127.5).round()
    return scaled.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def _pictures(examples: list[Example]) -> np.ndarray:
    return np.stack([e.image(RESOLUTION) for e in examples])


def new_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config())


def foreground_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights (n, 1, H, W) of the pixel loss: in each picture the shape's pixels (those off the border's
    median colour) share half the weight and the background's the other half; their mean is 1. Unweighted, the
    background is 78-92% of the loss and the VAE learns it alone, the shapes as blobs (docs/demo-model.md,
    "Status": the first run's round trip read 8% of the shapes' colours; weighted, 93% after 1,000 steps)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    shape = ((x - background).abs().amax(dim=1, keepdim=True) > 0.05).to(x.dtype)
    share = shape.mean(dim=(2, 3), keepdim=True)
    weights = shape * 0.5 / share.clamp(min=1e-6) + (1 - shape) * 0.5 / (1 - share).clamp(min=1e-6)
    return torch.where(share > 0, weights, torch.ones_like(weights))


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def _loss_fn(vae: AutoencoderKL, settings: StageSettings, device: str, outline_every: int = OUTLINE_EVERY):
    """The loss of step k: the stage's stream pictures k*b ... through ``vae``, posterior sampled."""

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        start = step * settings.batch_size
        examples = stream_examples(settings.seed, start, settings.batch_size, outline_every)
        x = to_pixels(_pictures(examples)).to(device)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator)).sample
        edges = sum((a - b).abs().mean() for a, b in zip(_edges(y), _edges(x), strict=True))
        pixels = (foreground_weights(x) * (y - x).abs()).mean()
        return pixels + edges + KL_WEIGHT * posterior.kl().mean()

    return loss_fn


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, style: str = "filled") -> dict[str, float]:
    """The classifier on the VAE's round trip of the held-out scenes (posterior mode): share right per field."""
    examples = [Example(s, Placement(), s.caption(), style=style) for s in HELD_OUT]
    x = to_pixels(_pictures(examples)).to(vae.device)
    pictures = to_pictures(vae.decode(vae.encode(x).latent_dist.mode()).sample.cpu())
    readings = [read(p) for p in pictures]
    fields = ("background", "colour", "shape", "size", "position")
    pairs = list(zip(readings, examples, strict=True))
    accuracy = {f: float(np.mean([getattr(r, f) == getattr(e.scene, f) for r, e in pairs])) for f in fields}
    accuracy["style"] = float(np.mean([r.style == style for r in readings]))
    return accuracy


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, seed: int, count: int = 512) -> float:
    """1 / std of the sampled latents of ``count`` stream pictures (how SD's 0.18215 was chosen)."""
    generator = torch.Generator().manual_seed(seed)
    latents = [
        vae.encode(to_pixels(_pictures(stream_examples(seed, start, 64))).to(vae.device)).latent_dist.sample(generator)
        for start in range(0, count, 64)
    ]
    return float(1.0 / torch.cat(latents).std())


def train_vae(
    work: Path, settings: StageSettings = VAE, max_seconds: float | None = None, log=print, device: str = "cpu"
) -> bool:
    """Run (or resume) the stage on ``device``; when it completes, write ``work/vae/vae`` (scaling factor set) and
    metrics."""
    vae = new_vae(settings.seed).to(device)
    trainer = Trainer(work, STAGE, settings, vae, log=log)

    if not trainer.run(_loss_fn(vae, settings, device), max_seconds):
        return False
    vae.eval()
    scaling_factor = measure_scaling_factor(vae, settings.seed + 1000)
    vae.register_to_config(scaling_factor=scaling_factor)
    metrics = {"scaling_factor": scaling_factor, **_round_trips(vae)}
    trainer.export(vae, "vae", metrics)
    log(f"vae: scaling factor {scaling_factor:.4f}; round trip {metrics['held_out_round_trip']}")
    return True


def _round_trips(vae: AutoencoderKL) -> dict:
    return {
        "held_out_round_trip": reconstruction_accuracy(vae),
        "held_out_round_trip_outline": reconstruction_accuracy(vae, style="outline"),
    }


def train_vae_decoder(
    work: Path, settings: StageSettings = VAE_DECODER, max_seconds: float | None = None, log=print, device: str = "cpu"
) -> bool:
    """Stage ``vae-decoder``: the completed VAE's decoder trained on with the same loss, its encoder frozen, as
    Stability trained SD's ft-EMA/ft-MSE VAEs: the latents stay bit for bit what they were, so the UNet, ControlNet,
    LoRA and TI (trained on the ``vae`` stage's encoder) need nothing redone, and the stage can train beside them on
    another core. Writes ``work/vae-decoder/vae`` (same config and scaling factor), which ``assemble`` ships."""
    vae = load_part(work, STAGE, "vae", AutoencoderKL).to(device)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    trainer = Trainer(work, DECODER_STAGE, settings, vae, log=log)
    if not trainer.run(_loss_fn(vae, settings, device, DECODER_OUTLINE_EVERY), max_seconds):
        return False
    vae.eval()
    metrics = _round_trips(vae)
    trainer.export(vae, "vae", metrics)
    log(f"vae-decoder: round trip {metrics['held_out_round_trip']}")
    return True


def load_vae(work: Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The trained, frozen VAE of a completed ``vae`` stage: what the later stages encode their pictures with."""
    return load_part(work, STAGE, "vae", AutoencoderKL, dtype)


def load_shipped_vae(work: Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The VAE ``assemble`` ships: the ``vae-decoder`` stage's when it has completed (the same encoder, a decoder
    trained longer), else the ``vae`` stage's."""
    return load_latest_part(work, (STAGE, DECODER_STAGE), "vae", AutoencoderKL, dtype)
