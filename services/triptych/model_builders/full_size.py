"""Full-size SD1.5 and SDXL pipelines with random weights: the real architectures, for memory and speed figures.

Nothing here is downloaded: the configs are those of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 (diffusers layout), the tokenizer is the real CLIP BPE, and the weights
are seeded random numbers. A random-weight network costs exactly what a trained one does (same shapes, same
FLOPs, same bytes), so benchmarks and memory figures hold for real checkpoints; the images are noise.

    triptych models build-full-size sd15 --model-root models   # writes models/full-size/sd15 (4.3 GB, fp32)
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .clip_vocab import EOS_TOKEN
from .tiny import SD15_SCHEDULER, SDXL_SCHEDULER, _fresh, _save_pipeline, _tokenizer

FULL_SIZE_DIR = "full-size"


def _clip(hidden: int, layers: int, heads: int, act: str = "quick_gelu", projection: int = 768) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        projection_dim=projection,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae(scaling_factor: float, sample_size: int, force_upcast: bool) -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def sd15_unet() -> UNet2DConditionModel:
    """SD1.5's UNet (860M parameters)."""
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def sdxl_unet() -> UNet2DConditionModel:
    """SDXL base's UNet (2.6B parameters)."""
    return UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def sd15_pipeline(out: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=_vae(0.18215, 512, force_upcast=True),
        text_encoder=CLIPTextModel(_clip(768, 12, 12)),
        tokenizer=_tokenizer(out / "tokenizer"),
        unet=sd15_unet(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(out: Path) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025, 1024, force_upcast=True),
        text_encoder=CLIPTextModel(_clip(768, 12, 12)),
        text_encoder_2=CLIPTextModelWithProjection(_clip(1280, 32, 20, act="gelu", projection=1280)),
        tokenizer=_tokenizer(out / "tokenizer"),
        tokenizer_2=_tokenizer(out / "tokenizer_2", pad_token="!"),
        unet=sdxl_unet(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_full_size(
    root: Path, family: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Path:
    """Writes root/full-size/<family> (safetensors in `dtype`, the diffusers folder layout) and returns its path.

    `device` is where the random weights are drawn: a GPU draws SDXL's 2.6B parameters in a second or two.
    """
    out = _fresh(root / FULL_SIZE_DIR / family)
    out.mkdir(parents=True)
    with torch.device(device):
        pipe = sd15_pipeline(out) if family == "sd15" else sdxl_pipeline(out)
    if dtype != torch.float32:  # (the networks are built in float32)
        pipe.to(dtype=dtype)
    tokenizers = {"tokenizer": EOS_TOKEN} if family == "sd15" else {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}
    _save_pipeline(pipe, out, tokenizers)
    return out
