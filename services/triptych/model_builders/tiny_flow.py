"""Tiny flow-matching models for offline tests: `tiny/flux` and `tiny/sd3`, shaped like the real ones.

FLUX.1: CLIP-L (pooled only) + T5, a `FluxTransformer2DModel` with a guidance embedding (FLUX.1-dev), packed
16-channel latents, a VAE with a shift factor, FLUX.1-dev's scheduler config (dynamic shifting). SD3: CLIP-L +
CLIP-G + T5, an `SD3Transformer2DModel`, SD3-medium's VAE scaling and scheduler config. The T5 tokenizer is a
Unigram model built here with the `tokenizers` package (no sentencepiece, no download) and loads with the real
`T5TokenizerFast` class. ControlNets shaped like InstantX's for each (the guide enters as VAE latents). Every
parameter is non-trivial (`tiny_weights.perturb_`, the zero-initialised ControlNet layers woken);
deterministic like the rest of the tiny family.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from .clip_vocab import EOS_TOKEN
from .tiny import _SEEDS, _save_pipeline, _seeded, _tokenizer, _vae
from .tiny_weights import _TE_LORA_RE, _lora_pair, peft_layers, wake_controlnet_

T5_DIM = 80  # wider than SD3's two CLIPs together (2 x 32), so SD3's zero padding of the CLIP half is exercised
T5_MAX_LENGTH = 512  # the real FLUX/SD3 T5 tokenizers' model_max_length
# Real FLUX.1-dev scheduler config (black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json).
FLUX_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# Real SD3-medium scheduler config (stabilityai/stable-diffusion-3-medium-diffusers).
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}

# The attention projections LoRAs for FLUX and SD3 transformers touch (diffusers' and kohya's default targets).
_TRANSFORMER_LORA_RE = re.compile(r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$")
# A small deterministic corpus for the T5 tokenizer: prompt words, so prompts tokenize into whole pieces mostly.
_CORPUS = (
    "a an the of on in at with and photo picture painting drawing red green blue yellow orange purple pink white "
    "black gray large small circle square triangle star ring cross diamond heart fox cat dog house tree mountain "
    "river sky cloud sun moon night day city street car boat forest flower garden portrait woman man child old "
    "young beautiful detailed sharp blurry dark bright light shadow left right top bottom center corner background"
)
_WORDS = _CORPUS.split(" ")


def write_t5_tokenizer(directory: Path) -> T5TokenizerFast:
    """Writes a Unigram T5-style tokenizer (<pad> 0, </s> 1, <unk> 2; "</s>" appended, as T5's) and loads it back
    with the real class. The pieces are built, not trained (Unigram training is not byte-for-byte repeatable):
    "▁word" for each corpus word at a higher score than the single characters, which spell anything else."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    characters = sorted(set("".join(_WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-()"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -5.0 - i / 1000) for i, word in enumerate(_WORDS)]
    pieces += [(c, -10.0) for c in characters] + [("▁" + c, -9.0) for c in characters]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )
    fast.save_pretrained(directory)
    return T5TokenizerFast.from_pretrained(directory)


def _lora_pairs(key: str, transformer, text_encoder, rank: int = 4):
    """Seeded LoRA (down, up) pairs for a transformer's attention projections and, optionally, a CLIP encoder's
    self-attention (module paths spelled text_model.encoder.layers.N..., as LoRAs in the wild spell them)."""
    g = torch.Generator().manual_seed(_SEEDS[key])
    pairs = {
        name: _lora_pair(module, rank, g, 0.3)
        for name, module in transformer.named_modules()
        if _TRANSFORMER_LORA_RE.search(name)
    }
    te_pairs = {}
    if text_encoder is not None:
        te_pairs = {
            "text_model." + name.removeprefix("text_model."): _lora_pair(module, rank, g, 0.3)
            for name, module in text_encoder.named_modules()
            if _TE_LORA_RE.search(name)
        }
    return pairs, te_pairs


def _t5(key: str, vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_DIM,
        d_kv=16,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return _seeded(key, lambda: T5EncoderModel(config))


@torch.no_grad()
def build_flux(out: Path, text_config) -> FluxPipeline:
    """tiny/flux: FLUX.1-dev-shaped (guidance embedding), 1 double + 1 single transformer block."""
    t5_tokenizer = write_t5_tokenizer(out / "tokenizer_2")
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER),
        vae=_vae("flux.vae", 0.3611, latent_channels=16, shift_factor=0.1159, quant_convs=False),
        text_encoder=_seeded("flux.text_encoder", lambda: CLIPTextModel(text_config)),
        tokenizer=_tokenizer(out / "tokenizer"),
        text_encoder_2=_t5("flux.text_encoder_2", len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
        transformer=_seeded(
            "flux.transformer",
            lambda: FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=T5_DIM,
                pooled_projection_dim=text_config.hidden_size,
                guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            ),
        ),
    )
    _save_pipeline(pipe, out, {"tokenizer": EOS_TOKEN})
    # A diffusers-format LoRA: the transformer's attention and CLIP-L's self-attention (its pooled output).
    transformer_pairs, te_pairs = _lora_pairs("lora-flux", pipe.transformer, pipe.text_encoder)
    FluxPipeline.save_lora_weights(
        out.parent,
        transformer_lora_layers=peft_layers(transformer_pairs),
        text_encoder_lora_layers=peft_layers(te_pairs),
        weight_name="lora-flux.safetensors",
        safe_serialization=True,
    )
    return pipe


@torch.no_grad()
def build_sd3(out: Path, text_config) -> StableDiffusion3Pipeline:
    """tiny/sd3: SD3-medium-shaped, 2 joint transformer blocks."""
    t5_tokenizer = write_t5_tokenizer(out / "tokenizer_3")
    pipe = StableDiffusion3Pipeline(
        transformer=_seeded(
            "sd3.transformer",
            lambda: SD3Transformer2DModel(
                sample_size=16,
                patch_size=2,
                in_channels=16,
                num_layers=2,
                attention_head_dim=12,  # inner width 48, not FLUX's 32: a FLUX LoRA does not fit, as in real life
                num_attention_heads=4,
                joint_attention_dim=T5_DIM,
                caption_projection_dim=48,
                pooled_projection_dim=2 * text_config.projection_dim,
                out_channels=16,
                pos_embed_max_size=64,
            ),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER),
        vae=_vae("sd3.vae", 1.5305, latent_channels=16, shift_factor=0.0609, quant_convs=False),
        text_encoder=_seeded("sd3.text_encoder", lambda: CLIPTextModelWithProjection(text_config)),
        tokenizer=_tokenizer(out / "tokenizer"),
        text_encoder_2=_seeded("sd3.text_encoder_2", lambda: CLIPTextModelWithProjection(text_config)),
        tokenizer_2=_tokenizer(out / "tokenizer_2", pad_token="!"),
        text_encoder_3=_t5("sd3.text_encoder_3", len(t5_tokenizer)),
        tokenizer_3=t5_tokenizer,
    )
    _save_pipeline(pipe, out, {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"})
    transformer_pairs, _ = _lora_pairs("lora-sd3", pipe.transformer, None)  # SD3 LoRAs: the transformer only
    StableDiffusion3Pipeline.save_lora_weights(
        out.parent,
        transformer_lora_layers=peft_layers(transformer_pairs),
        weight_name="lora-sd3.safetensors",
        safe_serialization=True,
    )
    return pipe


# The layers a fresh FLUX / SD3 ControlNet zero-initialises (diffusers' zero_module): a tiny one must change the image.
_FLUX_CONTROLNET_ZEROS = ("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_x_embedder.")
_SD3_CONTROLNET_ZEROS = ("controlnet_blocks.", "pos_embed_input.")


@torch.no_grad()
def _save_controlnet(key: str, factory, zero_layers: tuple[str, ...], out: Path) -> None:
    """A seeded ControlNet whose zero-initialised layers are woken, saved as safetensors."""
    net = _seeded(key, factory)
    wake_controlnet_(net, _SEEDS[key] + 20_000, scale=0.1, targets=zero_layers)
    net.save_pretrained(out, safe_serialization=True)


def build_flux_controlnet(out: Path, transformer: FluxTransformer2DModel) -> None:
    """tiny/controlnet-flux: InstantX-shaped (the guide as packed VAE latents through `controlnet_x_embedder`; no
    XLabs hint block, not a union), with the tiny transformer's widths, guidance embedding and position axes."""
    shared = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim")
    shared += ("pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    config = {name: transformer.config[name] for name in shared}
    factory = functools.partial(FluxControlNetModel, num_layers=1, num_single_layers=1, **config)
    _save_controlnet("controlnet-flux", factory, _FLUX_CONTROLNET_ZEROS, out)


def build_sd3_controlnet(out: Path, transformer: SD3Transformer2DModel) -> None:
    """tiny/controlnet-sd3: InstantX-shaped (its own sin-cos position embedding, the prompt's tokens, zero pooled
    projections and unshifted guide latents: force_zeros_for_pooled_projection), one joint block for the tiny
    transformer's two, as InstantX's has fewer blocks than SD3's."""
    shared = ("sample_size", "patch_size", "in_channels", "attention_head_dim", "num_attention_heads")
    shared += ("joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels")
    config = {name: transformer.config[name] for name in (*shared, "pos_embed_max_size")}
    factory = functools.partial(SD3ControlNetModel, num_layers=1, **config)
    _save_controlnet("controlnet-sd3", factory, _SD3_CONTROLNET_ZEROS, out)
