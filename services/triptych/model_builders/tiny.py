"""A deterministic family of tiny Stable Diffusion models for offline tests.

``build_tiny_family(root)`` writes SD1.5, SDXL base/refiner, FLUX and SD3 (tiny_flow.py), ControlNets, an
alternative VAE, LoRAs (kohya and diffusers/peft formats) and textual
inversions under ``root/tiny``. Everything uses the real tokenizer and the real
scheduler configs but ~32-channel networks, so a 20-step 128×128 denoise takes
well under a second per step on a laptop CPU. Same bytes on every run: each
model is built after ``torch.manual_seed`` and perturbed with its own seeded
generator (see ``tiny_weights.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from triptych.model_store import readable_by_all

from .clip_vocab import EOS_TOKEN, write_clip_tokenizer
from .tiny_weights import (
    make_lora_pairs,
    peft_layers,
    perturb_,
    save_kohya_lora,
    ti_vectors,
    wake_controlnet_,
)

TINY_DIR = "tiny"
TEXT_DIM = 32  # hidden size of every tiny CLIP text encoder
TIME_EMBED_DIM = 8  # SDXL addition_time_embed_dim
LORA_RANK = 4
LORA_ALPHA = 4.0

# Real SD1.5 scheduler config (runwayml/stable-diffusion-v1-5 scheduler_config.json).
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "trained_betas": None,
}
# Real SDXL base/refiner scheduler config (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
    "trained_betas": None,
}

# Seeds: one per model so that every model differs and can be rebuilt alone.
_SEEDS = {
    "sd15.text_encoder": 101,
    "sd15.unet": 102,
    "sd15.vae": 103,
    "sdxl.text_encoder": 201,
    "sdxl.text_encoder_2": 202,
    "sdxl.unet": 203,
    "sdxl.vae": 204,
    "refiner.text_encoder_2": 301,
    "refiner.unet": 302,
    "refiner.vae": 303,
    "controlnet-sd15": 401,
    "controlnet-sdxl": 402,
    "vae-alt": 501,
    "lora-sd15-kohya": 601,
    "lora-sd15-peft": 602,
    "ti-sd15": 701,
    "ti-sdxl.clip_l": 702,
    "ti-sdxl.clip_g": 703,
    "flux.text_encoder": 801,
    "flux.text_encoder_2": 802,
    "flux.transformer": 803,
    "flux.vae": 804,
    "lora-flux": 811,
    "controlnet-flux": 821,
    "sd3.text_encoder": 901,
    "sd3.text_encoder_2": 902,
    "sd3.text_encoder_3": 903,
    "sd3.transformer": 904,
    "sd3.vae": 905,
    "lora-sd3": 911,
    "controlnet-sd3": 921,
}


def _seeded(key: str, factory):
    """Construct a model after seeding the global RNG, then perturb it (seed offset by 10000)."""
    torch.manual_seed(_SEEDS[key])
    model = factory()
    return perturb_(model, _SEEDS[key] + 10_000).eval()


@torch.no_grad()
def _unet(key: str, factory) -> UNet2DConditionModel:
    """Seeded UNet whose noise prediction has roughly unit std, like a trained one.

    At default init eps has std ~0.45; doubling ``conv_out`` makes the UNet (and so
    the prompt, LoRAs and ControlNet residuals) matter more next to the initial
    noise, which dominates the final latents of an untrained model.
    """
    unet = _seeded(key, factory)
    unet.conv_out.weight.mul_(2.0)
    unet.conv_out.bias.mul_(2.0)
    return unet


def _text_config() -> CLIPTextConfig:
    """Tiny CLIP text config with the real vocabulary and special-token ids."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        projection_dim=TEXT_DIM,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae(
    key: str,
    scaling_factor: float = 0.18215,
    force_upcast: bool = True,
    latent_channels: int = 4,
    shift_factor: float | None = None,
    quant_convs: bool = True,
) -> AutoencoderKL:
    """Four-block VAE: three downsamples, so latents are 1/8 of the image like real SD. FLUX and SD3 VAEs: 16 latent
    channels, a shift factor, no quant convs."""
    return _seeded(
        key,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=32,
            sample_size=128,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            force_upcast=force_upcast,
            use_quant_conv=quant_convs,
            use_post_quant_conv=quant_convs,
        ),
    )


def _sd15_unet() -> UNet2DConditionModel:
    """Tiny SD1.5-style UNet (cross-attention on the 32-d CLIP hidden states)."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=32,
    )


def _sdxl_unet(cross_attention_dim: int, num_time_ids: int) -> UNet2DConditionModel:
    """Tiny SDXL-style UNet with ``text_time`` added conditioning.

    The base model conditions on 6 time ids (original size, crop, target size),
    the refiner on 5 (aesthetic score replaces target size); both add the pooled
    ``text_encoder_2`` projection (``TEXT_DIM``).
    """
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=num_time_ids * TIME_EMBED_DIM + TEXT_DIM,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    )


def _tokenizer(directory: Path, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Write the real CLIP tokenizer to ``directory`` and load it back."""
    write_clip_tokenizer(directory, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(directory)


def _fresh(path: Path) -> Path:
    """Remove a previous build at ``path`` so that stale files cannot survive a rebuild."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def _save_pipeline(pipe, out: Path, tokenizers: dict[str, str]) -> None:
    """``save_pretrained`` then rewrite tokenizer folders in the classic vocab/merges layout.

    transformers 5 saves a 2 MB ``tokenizer.json`` per tokenizer; the real SD repos
    ship vocab.json + merges.txt, which is what ``write_clip_tokenizer`` produces.
    """
    pipe.save_pretrained(out, safe_serialization=True)
    for sub, pad in tokenizers.items():
        shutil.rmtree(out / sub)
        write_clip_tokenizer(out / sub, pad_token=pad)


def _build_sd15(out: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=_vae("sd15.vae"),
        text_encoder=_seeded("sd15.text_encoder", lambda: CLIPTextModel(_text_config())),
        tokenizer=_tokenizer(out / "tokenizer"),
        unet=_unet("sd15.unet", _sd15_unet),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_pipeline(pipe, out, {"tokenizer": EOS_TOKEN})
    return pipe


def _build_sdxl(out: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(
        vae=_vae("sdxl.vae", scaling_factor=0.13025),
        text_encoder=_seeded("sdxl.text_encoder", lambda: CLIPTextModel(_text_config())),
        text_encoder_2=_seeded("sdxl.text_encoder_2", lambda: CLIPTextModelWithProjection(_text_config())),
        tokenizer=_tokenizer(out / "tokenizer"),
        tokenizer_2=_tokenizer(out / "tokenizer_2", pad_token="!"),
        # Both encoders' penultimate hidden states are concatenated: 32 + 32.
        unet=_unet("sdxl.unet", lambda: _sdxl_unet(2 * TEXT_DIM, num_time_ids=6)),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    _save_pipeline(pipe, out, {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"})
    return pipe


def _build_refiner(out: Path) -> None:
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae("refiner.vae", scaling_factor=0.13025),
        text_encoder=None,
        text_encoder_2=_seeded("refiner.text_encoder_2", lambda: CLIPTextModelWithProjection(_text_config())),
        tokenizer=None,
        tokenizer_2=_tokenizer(out / "tokenizer_2", pad_token="!"),
        unet=_unet("refiner.unet", lambda: _sdxl_unet(TEXT_DIM, num_time_ids=5)),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    _save_pipeline(pipe, out, {"tokenizer_2": "!"})


def _build_controlnet(key: str, unet: UNet2DConditionModel, out: Path) -> None:
    """ControlNet initialised from ``unet``; the default 4-block cond embedding downsamples by 8."""
    torch.manual_seed(_SEEDS[key])
    controlnet = ControlNetModel.from_unet(unet)
    perturb_(controlnet, _SEEDS[key] + 10_000)
    wake_controlnet_(controlnet, _SEEDS[key] + 20_000, scale=0.1)
    controlnet.save_pretrained(out, safe_serialization=True)


def _build_loras(sd15: StableDiffusionPipeline, tiny: Path) -> None:
    """kohya and diffusers/peft LoRAs for tiny/sd15 (UNet attention + text-encoder self-attention).

    The tensors are built directly rather than through ``unet.add_adapter`` so that
    no peft layers are ever attached to the base models being saved.
    """
    unet_pairs, te_pairs = make_lora_pairs(sd15.unet, sd15.text_encoder, _SEEDS["lora-sd15-kohya"], LORA_RANK)
    save_kohya_lora(_fresh(tiny / "lora-sd15-kohya.safetensors"), unet_pairs, te_pairs, LORA_ALPHA)

    unet_pairs, te_pairs = make_lora_pairs(sd15.unet, sd15.text_encoder, _SEEDS["lora-sd15-peft"], LORA_RANK)
    # No alpha is stored: diffusers then uses lora_alpha = rank, i.e. scale 1.
    StableDiffusionPipeline.save_lora_weights(
        tiny,
        unet_lora_layers=peft_layers(unet_pairs),
        text_encoder_lora_layers=peft_layers(te_pairs),
        weight_name=_fresh(tiny / "lora-sd15-peft.safetensors").name,
        safe_serialization=True,
    )


def _build_tis(tiny: Path) -> None:
    """A1111-style textual inversions with 2 vectors each."""
    save_file(
        {"emb_params": ti_vectors(_SEEDS["ti-sd15"], 2, TEXT_DIM)},
        str(_fresh(tiny / "ti-sd15.safetensors")),
    )
    save_file(
        {
            "clip_g": ti_vectors(_SEEDS["ti-sdxl.clip_g"], 2, TEXT_DIM),
            "clip_l": ti_vectors(_SEEDS["ti-sdxl.clip_l"], 2, TEXT_DIM),
        },
        str(_fresh(tiny / "ti-sdxl.safetensors")),
    )


_README = """\
Tiny random-weight Stable Diffusion family for tests (built by triptych.model_builders.tiny).
Real CLIP tokenizer and scheduler configs; ~32-channel networks; latents are 1/8 of the image.

sd15/                 StableDiffusionPipeline
sdxl/                 StableDiffusionXLPipeline (force_zeros_for_empty_prompt=True)
sdxl-refiner/         StableDiffusionXLImg2ImgPipeline (text_encoder_2 only, aesthetic score)
flux/                 FluxPipeline (CLIP-L + T5, guidance-distilled transformer, 16-channel VAE with shift)
sd3/                  StableDiffusion3Pipeline (CLIP-L + CLIP-G + T5, SD3 transformer, 16-channel VAE)
controlnet-sd15/      ControlNetModel for sd15
controlnet-sdxl/      ControlNetModel for sdxl
controlnet-flux/      FluxControlNetModel for flux (InstantX-shaped: the guide as VAE latents)
controlnet-sd3/       SD3ControlNetModel for sd3 (InstantX-shaped: zero pooled projection, unshifted latents)
vae-alt/              AutoencoderKL, drop-in for sd15's VAE
lora-sd15-kohya.safetensors  kohya/A1111 LoRA for sd15 (UNet + text encoder), rank 4, alpha 4
lora-sd15-peft.safetensors   diffusers/peft LoRA for sd15 (UNet + text encoder), rank 4
lora-flux.safetensors  diffusers LoRA for flux (transformer attention + CLIP-L), rank 4
lora-sd3.safetensors   diffusers LoRA for sd3 (transformer attention), rank 4
ti-sd15.safetensors   A1111 textual inversion {"emb_params": (2, 32)}
ti-sdxl.safetensors   SDXL textual inversion {"clip_l": (2, 32), "clip_g": (2, 32)}
Weights are random: images are noise-like, but deterministic and finite.
"""

TINY_IDS = [
    "tiny/sd15",
    "tiny/sdxl",
    "tiny/sdxl-refiner",
    "tiny/flux",
    "tiny/sd3",
    "tiny/controlnet-sd15",
    "tiny/controlnet-sdxl",
    "tiny/controlnet-flux",
    "tiny/controlnet-sd3",
    "tiny/vae-alt",
    "tiny/lora-sd15-kohya.safetensors",
    "tiny/lora-sd15-peft.safetensors",
    "tiny/lora-flux.safetensors",
    "tiny/lora-sd3.safetensors",
    "tiny/ti-sd15.safetensors",
    "tiny/ti-sdxl.safetensors",
]


@torch.no_grad()
def build_tiny_family(root: Path) -> list[str]:
    """Write the tiny model family under ``root/tiny`` and return the ids written.

    Ids are paths relative to ``root`` (``"tiny/sd15"``, ``"tiny/lora-sd15-kohya.safetensors"``,
    ...; see ``TINY_IDS``). Deterministic: two builds produce byte-identical files.
    Existing entries with the same names are replaced; other files are left alone.
    """
    tiny = Path(root) / TINY_DIR
    tiny.mkdir(parents=True, exist_ok=True)

    sd15 = _build_sd15(_fresh(tiny / "sd15"))
    sdxl = _build_sdxl(_fresh(tiny / "sdxl"))
    _build_refiner(_fresh(tiny / "sdxl-refiner"))
    from .tiny_flow import build_flux, build_flux_controlnet, build_sd3, build_sd3_controlnet  # uses this module

    flux = build_flux(_fresh(tiny / "flux"), _text_config())
    sd3 = build_sd3(_fresh(tiny / "sd3"), _text_config())
    build_flux_controlnet(_fresh(tiny / "controlnet-flux"), flux.transformer)
    build_sd3_controlnet(_fresh(tiny / "controlnet-sd3"), sd3.transformer)
    _build_controlnet("controlnet-sd15", sd15.unet, _fresh(tiny / "controlnet-sd15"))
    _build_controlnet("controlnet-sdxl", sdxl.unet, _fresh(tiny / "controlnet-sdxl"))
    _vae("vae-alt").save_pretrained(_fresh(tiny / "vae-alt"), safe_serialization=True)
    _build_loras(sd15, tiny)
    _build_tis(tiny)
    (tiny / "README.txt").write_text(_README, encoding="utf-8")
    readable_by_all(tiny)
    return list(TINY_IDS)
