"""The family layer: the registry, latent geometry and the decoder's unscaling (SD3/FLUX's shift_factor)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

from triptych import families
from triptych.decoder.engine import DecodeJob, DecoderEngine
from triptych.families.base import unscale_latents, vae_scale_factor
from triptych.model_store import ModelStore
from triptych.runtime.components import ComponentCache


def test_the_registry_finds_families_by_pipeline_class_and_variant():
    assert families.for_pipeline("StableDiffusionPipeline").name == "sd1"
    assert families.for_pipeline("StableDiffusionXLImg2ImgPipeline").name == "sdxl"
    assert families.for_pipeline("SomeOtherPipeline") is None
    assert families.for_variant("sdxl-refiner").name == "sdxl"
    assert families.can_refine("sdxl", "sdxl-refiner")
    assert not families.can_refine("sd1", "sdxl-refiner") and not families.can_refine("sdxl", "sdxl")


def test_latent_geometry_comes_from_the_family_and_the_vae_config():
    sd1 = families.for_pipeline("StableDiffusionPipeline")
    assert sd1.latent_shape(4, 128, 96) == (1, 4, 16, 12)
    assert sd1.image_size([1, 4, 16, 12]) == (128, 96)
    assert vae_scale_factor({"block_out_channels": [32, 32, 32, 32]}) == 8
    assert vae_scale_factor({"block_out_channels": [32, 32]}) == 2


def test_unscaling_applies_shift_factor_or_latents_mean_and_std():
    latents = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unscale_latents(latents, {"scaling_factor": 0.5}), latents / 0.5)
    shifted = unscale_latents(latents, {"scaling_factor": 0.3611, "shift_factor": 0.1159})
    assert torch.equal(shifted, latents / 0.3611 + 0.1159)  # StableDiffusion3Pipeline / FluxPipeline
    mean, std = [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]
    normed = unscale_latents(latents, {"scaling_factor": 0.5, "latents_mean": mean, "latents_std": std})
    expected = latents * torch.tensor(std).view(1, 4, 1, 1) / 0.5 + torch.tensor(mean).view(1, 4, 1, 1)
    assert torch.equal(normed, expected)


def test_the_decoder_applies_a_vaes_shift_factor(tmp_path):
    """A 16-channel VAE with shift_factor (as SD3's and FLUX's) decodes as the diffusers pipelines decode it."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=16,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()
    vae.save_pretrained(tmp_path / "vae16")
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    engine = DecoderEngine(ModelStore(tmp_path), ComponentCache(1))
    (image,) = engine.decode(DecodeJob("", "vae16", latents))
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    (expected,) = VaeImageProcessor(vae_scale_factor=2).postprocess(decoded, output_type="pil")
    assert image.size == (16, 16) and engine.scale_factor("", "vae16") == 2
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    # Without the shift the image differs: the test sees whether the decoder applies it.
    with torch.no_grad():
        unshifted = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    (wrong,) = VaeImageProcessor(vae_scale_factor=2).postprocess(unshifted, output_type="pil")
    assert not np.array_equal(np.asarray(image), np.asarray(wrong))
