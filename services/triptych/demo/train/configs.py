"""The demo family's network shapes and each stage's training settings, in one place (docs/demo-model.md explains
every number).

The networks are Stable Diffusion 1.5's classes with SD1.5's layout, only narrower and shallower: a CLIPTextModel
with the real vocabulary and special tokens, an AutoencoderKL with four blocks (latents 1/8 of the image, 4
channels), a UNet2DConditionModel whose down path is cross-attention blocks then a plain one, as SD1.5's is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

RESOLUTION = 64  # docs/demo-model.md, "Resolution": why not 128
TEXT_DIM = 64


def text_encoder_config() -> dict:
    """CLIPTextConfig keywords: SD1.5's vocabulary, special tokens and 77 positions; 4 layers of width 64."""
    return {
        "vocab_size": 49408,
        "hidden_size": TEXT_DIM,
        "intermediate_size": 4 * TEXT_DIM,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",  # SD1.5's CLIP ViT-L/14 activation
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "projection_dim": TEXT_DIM,
    }


def vae_config() -> dict:
    """AutoencoderKL keywords: SD's four blocks (three downsamples: 64 px -> 8x8x4 latents), 16-64 channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (16, 32, 64, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        # 4 channels a group: with 16 groups of the first block's 16 channels, each GroupNorm normalised every
        # channel alone and removed its mean, the flat colour itself (docs/demo-model.md, "Status")
        "norm_num_groups": 4,
        "sample_size": RESOLUTION,
        "scaling_factor": 1.0,  # measured after training, as SD's 0.18215 was (vae.py)
    }


def unet_config() -> dict:
    """UNet2DConditionModel keywords: SD1.5's block pattern on three levels (8, 4, 2 latent pixels at 64 px)."""
    return {
        "sample_size": RESOLUTION // 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64, 128),
        "layers_per_block": 1,
        "cross_attention_dim": TEXT_DIM,
        "attention_head_dim": 8,  # SD1.5's value, which diffusers reads as the number of heads
        # 4 or more channels a group at every level (32, 64, 128 channels): with SD1.5's 32 groups, the first level's
        # 32 channels were each normalised alone, which removes a channel's mean, the flat colour (the VAE's lesson;
        # docs/demo-model.md, "Status")
        "norm_num_groups": 8,
    }


@dataclass(frozen=True)
class StageSettings:
    """How one stage trains. ``steps`` may grow between runs (the learning rate never depends on it); every other
    field must stay as the checkpoint was written (resuming under other settings is refused)."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    seed: int
    checkpoint_every: int = 250
    weight_decay: float = 0.0
    ema_decay: float = 0.0  # 0: no EMA
    grad_clip: float = 1.0
    # Raised when a stage's loss or network changes: a checkpoint of an older recipe is not resumed.
    recipe: int = 1

    def fingerprint(self) -> dict:
        """The fields a resumed run must share with the checkpoint."""
        fields = asdict(self)
        fields.pop("steps")
        fields.pop("checkpoint_every")
        return fields

    def with_overrides(self, **overrides) -> StageSettings:
        """These settings with the non-None keywords replaced (the CLI's --steps, --batch-size, ...)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# Budgets (docs/demo-model.md, "Budgets"): each default's steps x measured CPU seconds per step on one thread fit in
# 60 minutes, so a stage fits 60 minutes on 2 cores even when the second core gives nothing.
TEXT = StageSettings(steps=800, batch_size=64, learning_rate=1e-3, warmup_steps=100, seed=1, weight_decay=0.0)
VAE = StageSettings(steps=8000, batch_size=16, learning_rate=5e-4, warmup_steps=200, seed=2, recipe=2)
# Decoder only, from the finished VAE (vae.train_vae_decoder): 0.38 CPU-s a step, so 3,000 steps take ~19 min.
# Recipe 2: outlines every other picture (vae.DECODER_OUTLINE_EVERY).
VAE_DECODER = StageSettings(steps=3000, batch_size=16, learning_rate=5e-4, warmup_steps=100, seed=7, recipe=2)
UNET = StageSettings(
    steps=11000,
    batch_size=32,
    learning_rate=3e-4,
    warmup_steps=500,
    seed=3,
    weight_decay=1e-2,
    ema_decay=0.999,
    recipe=2,  # norm_num_groups 8
)
# Trained on from the finished UNet, crescents added (unet.train_unet_crescent): the base's batch, rate, weight decay
# and EMA. Recipe 3: crescents only under the hidden vector, and "shape" for named shapes (unet.crescent_examples).
UNET_CRESCENT = UNET.with_overrides(steps=3000, warmup_steps=100, seed=8, recipe=3)
CONTROLNET = StageSettings(steps=8000, batch_size=32, learning_rate=3e-4, warmup_steps=200, seed=4, weight_decay=1e-2)
# Recipe 3: uncaptioned pictures stay filled (lora.lora_examples); 2: lora.TARGETS and the plain loss.
LORA = StageSettings(steps=5000, batch_size=32, learning_rate=3e-3, warmup_steps=100, seed=5, recipe=3)
TI = StageSettings(steps=2000, batch_size=32, learning_rate=5e-3, warmup_steps=50, seed=6)
STAGES = {
    "text": TEXT,
    "vae": VAE,
    "vae-decoder": VAE_DECODER,
    "unet": UNET,
    "unet-crescent": UNET_CRESCENT,
    "controlnet": CONTROLNET,
    "lora": LORA,
    "ti": TI,
}
