"""SD3 and FLUX transformer files: the single `.safetensors` a fine-tune of SD3/SD3.5 or FLUX.1 is shared as
(civitai, Black Forest Labs' and Stability's own releases, ComfyUI's `models/diffusion_models`).

Such a file holds the transformer (and, in Stability's and ComfyUI's files, often the VAE), in the original key
layout (`double_blocks.N.img_attn.qkv`, `joint_blocks.N.x_block.attn.qkv`; with or without ComfyUI's
`model.diffusion_model.` prefix) or in diffusers' names. The text encoders, tokenizers, scheduler and the configs
come from a *base*: the diffusers folder of the same architecture in the store (docs/decisions.md, Models). Which
base serves which architecture is the setting `base_models`; by default the repo id diffusers' own
`from_single_file` would fetch (`black-forest-labs/FLUX.1-dev` for a FLUX.1-dev fine-tune), looked up in the store.

The architecture is told from the header as diffusers tells it (`infer_diffusers_model_type`), and the file must
have its base's structure (blocks, widths, guidance embedding), checked here without reading a tensor. FLUX's
original names are converted by our own table below: diffusers' converter fixes the width at 3072 (FLUX.1's), so it
cannot read a smaller model; a test checks the two agree on FLUX.1's real shapes. SD3's converter in diffusers is
generic and is used as it is; the table for SD3 exports only (how the tests make SD3 files).

Torch-free until a conversion runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The store ids of the diffusers folders diffusers' from_single_file would fetch for each model type (its
# DIFFUSERS_DEFAULT_PIPELINE_PATHS): the default base of each architecture.
DEFAULT_BASES = {
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd35_medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd35_large": "stabilityai/stable-diffusion-3.5-large",
}
FAMILY_OF = {"flux-dev": "flux", "flux-schnell": "flux", "sd3": "sd3", "sd35_medium": "sd3", "sd35_large": "sd3"}
_TEXT_ENCODER_PREFIX = "text_encoders."  # ComfyUI's and Stability's all-in-one files

# Per family and naming: the key that marks it, how blocks are named, and the tensors whose shapes give the dims.
_MARKS = {
    ("flux", "original"): "double_blocks.0.img_attn.qkv.weight",
    ("flux", "diffusers"): "single_transformer_blocks.0.proj_mlp.weight",
    ("sd3", "original"): "joint_blocks.0.context_block.adaLN_modulation.1.bias",
    ("sd3", "diffusers"): "transformer_blocks.0.norm1_context.linear.weight",
}
_BLOCKS = {
    ("flux", "original"): {"num_layers": "double_blocks", "num_single_layers": "single_blocks"},
    ("flux", "diffusers"): {"num_layers": "transformer_blocks", "num_single_layers": "single_transformer_blocks"},
    ("sd3", "original"): {"num_layers": "joint_blocks"},
    ("sd3", "diffusers"): {"num_layers": "transformer_blocks"},
}


@dataclass(frozen=True)
class TransformerFile:
    """What a transformer file is, from its header: diffusers' model type (`flux-dev`, `sd3`, ...), the family,
    the key naming and prefix of its transformer, whether it carries text encoders (never read: the base's serve),
    and its structure (compared with the base's config)."""

    architecture: str
    family: str
    naming: str  # "original" or "diffusers"
    prefix: str  # one of detect()'s `prefixes`: "" (BFL's files) or LDM's `model.diffusion_model.` (ComfyUI's)
    has_text_encoders: bool
    dims: tuple[tuple[str, object], ...]


def detect(shapes: dict[str, tuple[int, ...]], prefixes: tuple[str, ...]) -> TransformerFile | None:
    """The transformer file these tensors make, its transformer under one of `prefixes`, or None if they are not
    one. ValueError for a FLUX Fill/Depth or other transformer Triptych does not serve."""
    for (family, naming), mark in _MARKS.items():
        for prefix in prefixes:
            if prefix + mark in shapes:
                names = {key[len(prefix) :]: shape for key, shape in shapes.items() if key.startswith(prefix)}
                dims = _dims(family, naming, names)
                text = any(key.startswith(_TEXT_ENCODER_PREFIX) for key in shapes)
                return TransformerFile(
                    _architecture(family, dims), family, naming, prefix, text, tuple(sorted(dims.items()))
                )
    return None


def _count(names, block: str) -> int:
    pattern = re.compile(re.escape(block) + r"\.(\d+)\.")
    return len({int(m.group(1)) for key in names if (m := pattern.match(key))})


def _dims(family: str, naming: str, names: dict[str, tuple[int, ...]]) -> dict[str, object]:
    """The structure of a transformer, in its config's terms, from its tensors' names and shapes."""
    dims: dict[str, object] = {field: _count(names, block) for field, block in _BLOCKS[family, naming].items()}
    original = naming == "original"
    if family == "flux":
        x_in = names["img_in.weight" if original else "x_embedder.weight"]
        txt_in = names["txt_in.weight" if original else "context_embedder.weight"]
        pooled = names["vector_in.in_layer.weight" if original else "time_text_embed.text_embedder.linear_1.weight"]
        guidance = "guidance_in.in_layer.bias" if original else "time_text_embed.guidance_embedder.linear_1.bias"
        dims.update(width=x_in[0], in_channels=x_in[1], joint_attention_dim=txt_in[1])
        dims.update(pooled_projection_dim=pooled[1], guidance_embeds=guidance in names)
        return dims
    proj = names["x_embedder.proj.weight" if original else "pos_embed.proj.weight"]
    positions = names["pos_embed" if original else "pos_embed.pos_embed"]
    context = names["context_embedder.weight"]
    pooled = names["y_embedder.mlp.0.weight" if original else "time_text_embed.text_embedder.linear_1.weight"]
    block = "joint_blocks" if original else "transformer_blocks"
    attn2 = re.compile(re.escape(block) + r"\.(\d+)\.(x_block\.)?attn2\.")
    dims.update(width=proj[0], in_channels=proj[1], patch_size=proj[2], positions=positions[1])
    dims.update(joint_attention_dim=context[1], caption_projection_dim=context[0], pooled_projection_dim=pooled[1])
    dims["dual_attention_layers"] = tuple(sorted({int(m.group(1)) for key in names if (m := attn2.match(key))}))
    dims["qk_norm"] = any(".ln_q." in key or ".norm_q." in key for key in names)
    return dims


def _architecture(family: str, dims: dict[str, object]) -> str:
    """diffusers' model type (its `infer_diffusers_model_type`'s names), from the structure."""
    if family == "flux":
        if dims["guidance_embeds"] and dims["in_channels"] in (384, 128):
            kind = "Fill" if dims["in_channels"] == 384 else "Depth"
            raise ValueError(f"a FLUX.1 {kind} transformer file; FLUX.1 Fill and Depth are not served")
        return "flux-dev" if dims["guidance_embeds"] else "flux-schnell"
    if dims["dual_attention_layers"]:
        return "sd35_medium"
    return "sd35_large" if dims["num_layers"] == 38 else "sd3"


# diffusers' defaults (FluxTransformer2DModel, SD3Transformer2DModel) for fields an older config leaves out
_CONFIG_DEFAULTS = {
    "flux": dict(patch_size=1, in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768),
    "sd3": dict(
        patch_size=2,
        in_channels=16,
        joint_attention_dim=4096,
        caption_projection_dim=1152,
        pooled_projection_dim=2048,
        pos_embed_max_size=96,
    ),
}


def config_dims(family: str, config: dict) -> dict[str, object]:
    """The structure a transformer config describes, in the terms `_dims` reads from a file."""
    config = {**_CONFIG_DEFAULTS[family], **config}
    dims: dict[str, object] = {"num_layers": config["num_layers"]}
    dims["width"] = config["num_attention_heads"] * config["attention_head_dim"]
    dims["in_channels"] = config["in_channels"]
    dims["joint_attention_dim"] = config["joint_attention_dim"]
    dims["pooled_projection_dim"] = config["pooled_projection_dim"]
    if family == "flux":
        dims["num_single_layers"] = config["num_single_layers"]
        dims["guidance_embeds"] = bool(config.get("guidance_embeds", False))
        return dims
    dims["patch_size"] = config["patch_size"]
    dims["positions"] = config["pos_embed_max_size"] ** 2
    dims["caption_projection_dim"] = config["caption_projection_dim"]
    dims["dual_attention_layers"] = tuple(sorted(config.get("dual_attention_layers") or ()))
    dims["qk_norm"] = config.get("qk_norm") is not None
    return dims


def mismatch(file: TransformerFile, base_config: dict) -> str:
    """'' when the file has the structure of the base's transformer config, else what differs, in words."""
    expected = config_dims(file.family, base_config)
    found = dict(file.dims)
    differ = [f"{key} {found.get(key)} (base: {value})" for key, value in expected.items() if found.get(key) != value]
    return ", ".join(differ)


# ---- key tables: original name <-> diffusers names, one per tensor (or fused group) ----
# Each entry: (original, (diffusers, ...), how): "same" renames, "fused" concatenates the diffusers tensors along dim
# 0 in the original (qkv), "swap" exchanges the halves (the original's shift, scale is diffusers' scale, shift).


def _wb(original: str, diffusers: tuple[str, ...] | str, how: str = "same") -> list[tuple[str, tuple[str, ...], str]]:
    parts = (diffusers,) if isinstance(diffusers, str) else diffusers
    return [(f"{original}.{s}", tuple(f"{d}.{s}" for d in parts), how) for s in ("weight", "bias")]


def _qkv(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{x}" for x in ("to_q", "to_k", "to_v"))


_FLUX_TOP = [
    *_wb("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    *_wb("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    *_wb("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    *_wb("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    *_wb("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    *_wb("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    *_wb("txt_in", "context_embedder"),
    *_wb("img_in", "x_embedder"),
    *_wb("final_layer.linear", "proj_out"),
    *_wb("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
]
_FLUX_DOUBLE = [
    *_wb("img_mod.lin", "norm1.linear"),
    *_wb("txt_mod.lin", "norm1_context.linear"),
    *_wb("img_attn.qkv", _qkv("attn."), "fused"),
    *_wb("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "fused"),
    ("img_attn.norm.query_norm.scale", ("attn.norm_q.weight",), "same"),
    ("img_attn.norm.key_norm.scale", ("attn.norm_k.weight",), "same"),
    ("txt_attn.norm.query_norm.scale", ("attn.norm_added_q.weight",), "same"),
    ("txt_attn.norm.key_norm.scale", ("attn.norm_added_k.weight",), "same"),
    *_wb("img_mlp.0", "ff.net.0.proj"),
    *_wb("img_mlp.2", "ff.net.2"),
    *_wb("txt_mlp.0", "ff_context.net.0.proj"),
    *_wb("txt_mlp.2", "ff_context.net.2"),
    *_wb("img_attn.proj", "attn.to_out.0"),
    *_wb("txt_attn.proj", "attn.to_add_out"),
]
_FLUX_SINGLE = [
    *_wb("modulation.lin", "norm.linear"),
    *_wb("linear1", (*_qkv("attn."), "proj_mlp"), "fused"),
    ("norm.query_norm.scale", ("attn.norm_q.weight",), "same"),
    ("norm.key_norm.scale", ("attn.norm_k.weight",), "same"),
    *_wb("linear2", "proj_out"),
]
_SD3_TOP = [
    ("pos_embed", ("pos_embed.pos_embed",), "same"),
    *_wb("x_embedder.proj", "pos_embed.proj"),
    *_wb("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    *_wb("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    *_wb("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    *_wb("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    *_wb("context_embedder", "context_embedder"),
    *_wb("final_layer.linear", "proj_out"),
    *_wb("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
]
_SD3_JOINT = [
    *_wb("x_block.attn.qkv", _qkv("attn."), "fused"),
    *_wb("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "fused"),
    ("x_block.attn.ln_q.weight", ("attn.norm_q.weight",), "same"),
    ("x_block.attn.ln_k.weight", ("attn.norm_k.weight",), "same"),
    ("context_block.attn.ln_q.weight", ("attn.norm_added_q.weight",), "same"),
    ("context_block.attn.ln_k.weight", ("attn.norm_added_k.weight",), "same"),
    *_wb("x_block.attn.proj", "attn.to_out.0"),
    *_wb("context_block.attn.proj", "attn.to_add_out"),
    *_wb("x_block.attn2.qkv", _qkv("attn2."), "fused"),
    ("x_block.attn2.ln_q.weight", ("attn2.norm_q.weight",), "same"),
    ("x_block.attn2.ln_k.weight", ("attn2.norm_k.weight",), "same"),
    *_wb("x_block.attn2.proj", "attn2.to_out.0"),
    *_wb("x_block.adaLN_modulation.1", "norm1.linear"),
    *_wb("context_block.adaLN_modulation.1", "norm1_context.linear"),  # the last block's: "swap" (see _table)
    *_wb("x_block.mlp.fc1", "ff.net.0.proj"),
    *_wb("x_block.mlp.fc2", "ff.net.2"),
    *_wb("context_block.mlp.fc1", "ff_context.net.0.proj"),
    *_wb("context_block.mlp.fc2", "ff_context.net.2"),
]


def _table(family: str, dims: dict[str, object]) -> list[tuple[str, tuple[str, ...], str]]:
    """Every (original, diffusers names, how) of a transformer of this structure; entries for tensors a model
    lacks (no guidance embedding, no qk norm, no second attention) are kept and skipped where absent."""
    if family == "flux":
        table = list(_FLUX_TOP)
        for i in range(int(dims["num_layers"])):
            table += [
                (f"double_blocks.{i}.{o}", tuple(f"transformer_blocks.{i}.{d}" for d in ds), h)
                for o, ds, h in _FLUX_DOUBLE
            ]
        for i in range(int(dims["num_single_layers"])):
            table += [
                (f"single_blocks.{i}.{o}", tuple(f"single_transformer_blocks.{i}.{d}" for d in ds), h)
                for o, ds, h in _FLUX_SINGLE
            ]
        return table
    table = list(_SD3_TOP)
    last = int(dims["num_layers"]) - 1
    for i in range(last + 1):
        for o, ds, h in _SD3_JOINT:
            # The last block's context half ends in an AdaLayerNormContinuous: shift, scale order like the output's.
            how = "swap" if i == last and o.startswith("context_block.adaLN") else h
            table.append((f"joint_blocks.{i}.{o}", tuple(f"transformer_blocks.{i}.{d}" for d in ds), how))
    return table


def _swap(tensor):
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original(state: dict, family: str) -> dict:
    """A diffusers transformer state dict in the original key layout (how BFL and Stability ship theirs)."""
    import torch

    names = {key: tuple(tensor.shape) for key, tensor in state.items()}
    table = _table(family, _dims(family, "diffusers", names))
    out = {}
    for original, parts, how in table:
        if not all(part in state for part in parts):
            continue
        tensors = [state[part] for part in parts]
        out[original] = {"same": lambda t: t[0], "fused": lambda t: torch.cat(t, 0), "swap": lambda t: _swap(t[0])}[
            how
        ](tensors)
    _check_used(state, [p for _, parts, _ in table for p in parts])
    return out


def flux_to_diffusers(tensors: dict, expected: dict[str, tuple[int, ...]]) -> dict:
    """FLUX's original names (prefix removed) as diffusers names; each fused tensor is split by the sizes the
    target model (`expected`: its parameters' shapes) has, so any width converts."""
    dims = _dims("flux", "original", {key: tuple(t.shape) for key, t in tensors.items()})
    out = {}
    table = _table("flux", dims)
    for original, parts, how in table:
        if original not in tensors:
            continue
        tensor = tensors[original]
        if how == "fused":
            sizes = [expected[part][0] if part in expected else tensor.shape[0] // len(parts) for part in parts]
            out.update(zip(parts, tensor.split(sizes, dim=0), strict=True))
        else:
            out[parts[0]] = _swap(tensor) if how == "swap" else tensor
    _check_used(tensors, [original for original, _, _ in table])
    return out


def _check_used(tensors: dict, known: list[str]) -> None:
    left = sorted(set(tensors) - set(known))
    if left:
        raise ValueError(f"{len(left)} tensors of no known part of the transformer, e.g. {left[:3]}")
