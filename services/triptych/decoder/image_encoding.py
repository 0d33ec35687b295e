"""Images to VAE latents (DecoderService.EncodeImage): the guide preparation and encoding of diffusers'
FluxControlNetPipeline and StableDiffusion3ControlNetPipeline (prepare_image, then
`vae.encode(image).latent_dist.sample(generator)`), which is also the first step of img2img.

The latents are returned unscaled, with the VAE's factors: how a denoiser scales them depends on the ControlNet
(InstantX's SD3 ControlNets skip the shift), which only the denoiser loads. Never imports grpc.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor

from triptych.runtime.generators import cpu_generator, generator_state
from triptych.runtime.guide_images import decode_guide_image
from triptych.serving.errors import InvalidArgument


@dataclass(frozen=True)
class EncodeImageJob:
    """One image to encode, already range-checked; width and height None = the model's default output size."""

    model: str
    vae: str
    image: bytes
    width: int | None
    height: int | None
    samples: int  # rows: copies of the image encoded as one batch, each sampled with its own noise
    seed: int | None
    generator_state: bytes


@dataclass(frozen=True)
class ImageLatents:
    """Samples of the image's latent distribution [samples, C, h, w] (float32, CPU), the VAE's factors, and the
    generator after the draw."""

    latents: torch.Tensor
    scaling_factor: float
    shift_factor: float | None
    seed: int
    generator_state: bytes


def image_size(store, job: EncodeImageJob, scale: int) -> tuple[int, int]:
    """(width, height) to encode at: the job's, else the model's default output size (read from its denoising
    network's config, as the denoiser reads it); each a multiple of the VAE's scale factor."""
    width, height = job.width, job.height
    if width is None or height is None:
        info = store.resolve(job.model, "model")
        if not info.is_text_to_image:
            unset = [side for side, value in (("width", width), ("height", height)) if value is None]
            raise InvalidArgument([(side, f"required: {job.model!r} has no default output size") for side in unset])
        default = info.family.default_size(info.family.network_config(info))
        width, height = width or default, height or default
    violations = [
        (side, f"must be a multiple of the VAE's scale factor {scale} (got {value})")
        for side, value in (("width", width), ("height", height))
        if value % scale
    ]
    if violations:
        raise InvalidArgument(violations)
    return width, height


def image_batch(data: bytes, width: int, height: int, samples: int, scale: int, vae) -> torch.Tensor:
    """The pipelines' prepare_image: VaeImageProcessor.preprocess (RGB, Lanczos resize, [-1, 1]), repeat_interleave
    (which copies preprocess's channels-last view into a standard layout: convolutions round differently on the two),
    the VAE's device and dtype, then `samples` copies as one batch (SD3's CFG doubling)."""
    image = decode_guide_image(data, "image")
    processor = VaeImageProcessor(vae_scale_factor=scale, do_convert_rgb=True)
    pixels = processor.preprocess(image, height=height, width=width)
    pixels = pixels.repeat_interleave(1, dim=0).to(device=vae.device, dtype=vae.dtype)
    return torch.cat([pixels] * samples) if samples > 1 else pixels


def encode_image(vae, job: EncodeImageJob, width: int, height: int, scale: int) -> ImageLatents:
    """The image's VAE latents, sampled with the job's generator (seeded, or continued from its state)."""
    generator, seed = cpu_generator(job.seed, job.generator_state)
    pixels = image_batch(job.image, width, height, job.samples, scale, vae)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator)
    return ImageLatents(
        latents=latents.to(device="cpu", dtype=torch.float32),
        scaling_factor=vae.config.scaling_factor,
        shift_factor=vae.config.get("shift_factor"),
        seed=seed,
        generator_state=generator_state(generator),
    )
