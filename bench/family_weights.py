"""The split's memory argument from the real architectures: parameter bytes each role holds for SD3-medium and
FLUX.1-dev, counted on the meta device (no weights, no download), from the published configs (written out here).

    python -m bench.family_weights

The denoiser holds the transformer alone; the encoder the text encoders (T5-XXL is most of it); the decoder the VAE.
"""

from __future__ import annotations

import torch

CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
)
VAE16 = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)


def _parameters(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def roles() -> dict[str, dict[str, int]]:
    """{model: {role: parameter count}}."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_l = _parameters(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))
    clip_l_projected = _parameters(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
    clip_g = _parameters(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
    t5 = _parameters(lambda: T5EncoderModel(T5Config(**T5_XXL)))
    vae = _parameters(lambda: AutoencoderKL(**VAE16))
    return {
        "FLUX.1-dev": {
            "encoder": clip_l + t5,
            "denoiser": _parameters(lambda: FluxTransformer2DModel(**FLUX_DEV)),
            "decoder": vae,
        },
        "SD3-medium": {
            "encoder": clip_l_projected + clip_g + t5,
            "denoiser": _parameters(lambda: SD3Transformer2DModel(**SD3_MEDIUM)),
            "decoder": vae,
        },
    }


def main() -> dict:
    report = roles()
    print("| model | role | parameters | bf16 GB | fp32 GB |")
    print("|---|---|---|---|---|")
    for model, per_role in report.items():
        for role, count in per_role.items():
            print(f"| {model} | {role} | {count / 1e9:.2f} B | {count * 2 / 1e9:.1f} | {count * 4 / 1e9:.1f} |")
        total = sum(per_role.values())
        print(f"| {model} | one process, all | {total / 1e9:.2f} B | {total * 2 / 1e9:.1f} | {total * 4 / 1e9:.1f} |")
    return report


if __name__ == "__main__":
    main()
