"""Full-size SD1.5, SD2.1, SDXL and SDXL-refiner pipelines: the real architectures, with random weights for memory
and speed figures, or without weights as the configs a single-file checkpoint is served with (checkpoint.py).

Nothing here is downloaded: the configs are those of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0 and stable-diffusion-xl-refiner-1.0
(diffusers layout), the tokenizer is the real CLIP BPE, and the weights are seeded random numbers. A random-weight
network costs exactly what a trained one does (same shapes, same FLOPs, same bytes), so benchmarks and memory
figures hold for real checkpoints; the images are noise.

    triptych models build-full-size sd15 --model-root models   # writes models/full-size/sd15 (4.3 GB, fp32)
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from triptych.model_store import readable_by_all

from .clip_vocab import EOS_TOKEN, write_clip_tokenizer
from .tiny import SD15_SCHEDULER, SDXL_SCHEDULER, _fresh, _save_pipeline, _tokenizer

FULL_SIZE_DIR = "full-size"
ARCHITECTURES = ("sd15", "sd21", "sdxl", "sdxl-refiner")
# Real SD2.1 scheduler config (stabilityai/stable-diffusion-2-1): DDIM, v-prediction.
SD21_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
# The pad token of each tokenizer folder (SD2's and SDXL's OpenCLIP tokenizers pad with "!").
TOKENIZER_PADS = {
    "sd15": {"tokenizer": EOS_TOKEN},
    "sd21": {"tokenizer": "!"},
    "sdxl": {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"},
    "sdxl-refiner": {"tokenizer_2": "!"},
}


def _clip(
    hidden: int, layers: int, heads: int, act: str = "quick_gelu", projection: int = 768, ids=(49406, 49407, 49407)
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        projection_dim=projection,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=ids[0],
        eos_token_id=ids[1],
        pad_token_id=ids[2],
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


def sd21_unet() -> UNet2DConditionModel:
    """SD2.1's UNet (865M parameters): OpenCLIP-H conditioning, linear projections, upcast attention."""
    return UNet2DConditionModel(
        sample_size=96,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
    )


def refiner_unet() -> UNet2DConditionModel:
    """SDXL refiner's UNet (2.3B parameters)."""
    return UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(384, 768, 1536, 1536),
        transformer_layers_per_block=4,
        attention_head_dim=(6, 12, 24, 24),
        cross_attention_dim=1280,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,
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


def sd21_pipeline(out: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=_vae(0.18215, 768, force_upcast=True),
        # OpenCLIP ViT-H without its last layer (SD2 conditions on the penultimate one); the ids are its config's.
        text_encoder=CLIPTextModel(_clip(1024, 23, 16, act="gelu", projection=512, ids=(0, 2, 1))),
        tokenizer=_tokenizer(out / "tokenizer", pad_token="!"),
        unet=sd21_unet(),
        scheduler=DDIMScheduler.from_config(SD21_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def refiner_pipeline(out: Path) -> StableDiffusionXLImg2ImgPipeline:
    torch.manual_seed(0)
    return StableDiffusionXLImg2ImgPipeline(
        vae=_vae(0.13025, 1024, force_upcast=True),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection(_clip(1280, 32, 20, act="gelu", projection=1280)),
        tokenizer=None,
        tokenizer_2=_tokenizer(out / "tokenizer_2", pad_token="!"),
        unet=refiner_unet(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


_PIPELINES = {"sd15": sd15_pipeline, "sd21": sd21_pipeline, "sdxl": sdxl_pipeline, "sdxl-refiner": refiner_pipeline}


def write_configs(architecture: str, out: Path) -> Path:
    """Writes a real architecture's diffusers folder without weights: model_index.json, each component's config
    and the tokenizers. Built on the meta device, so nothing is allocated; what a single-file checkpoint of that
    architecture is served with."""
    from accelerate import init_empty_weights

    out.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():  # parameters on the meta device; schedulers' tables stay real
        pipe = _PIPELINES[architecture](out)
    pipe.save_config(out)  # model_index.json
    for name, component in pipe.components.items():
        if component is None or name.startswith("tokenizer"):
            continue
        target = out / name
        if hasattr(component, "save_config"):
            component.save_config(target)  # diffusers models and schedulers
        else:
            component.config.save_pretrained(target)  # transformers models
    for name, pad in TOKENIZER_PADS[architecture].items():
        write_clip_tokenizer(out / name, pad_token=pad)
    return out


def build_full_size(
    root: Path, family: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Path:
    """Writes root/full-size/<family> (safetensors in `dtype`, the diffusers folder layout) and returns its path.

    `device` is where the random weights are drawn: a GPU draws SDXL's 2.6B parameters in a second or two.
    """
    out = _fresh(root / FULL_SIZE_DIR / family)
    out.mkdir(parents=True)
    with torch.device(device):
        pipe = _PIPELINES[family](out)
    if dtype != torch.float32:  # (the networks are built in float32)
        pipe.to(dtype=dtype)
    _save_pipeline(pipe, out, TOKENIZER_PADS[family])
    readable_by_all(out)
    return out
