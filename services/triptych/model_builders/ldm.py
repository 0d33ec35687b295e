"""A diffusers SD1.x/SD2.x/SDXL folder as one single-file checkpoint in the original (LDM) key layout: how civitai
files are made (Stability's and kohya's trainers save this layout; diffusers' scripts
`convert_diffusers_to_original_stable_diffusion.py` and `..._sdxl.py` write it from a folder).

The mapping here is the exact inverse of diffusers' own single-file import (`single_file_utils`:
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`), written for any block count so that the tiny models can be exported too:

- UNet under `model.diffusion_model.`: `input_blocks.N.{0: resnet, 1: attention}` with `N.0.op` downsamplers,
  `middle_block.{0,1,2}`, `output_blocks.N.{0,1}` with upsamplers at `.1.conv` (no attention) or `.2.conv`.
- VAE under `first_stage_model.`: `down.i.block.j`, `up.(n-1-i).block.j`, `mid.block_1/2`, `mid.attn_1` with
  1x1-convolution weights for q, k, v and proj_out.
- CLIP ViT-L in the Hugging Face layout under `cond_stage_model.transformer.` (SD1) or
  `conditioner.embedders.0.transformer.` (SDXL); OpenCLIP encoders (SD2's, SDXL's second, the refiner's) under
  `cond_stage_model.model.` / `conditioner.embedders.1.model.` / `conditioner.embedders.0.model.` with fused
  `in_proj` attention weights and a transposed `text_projection`.

`embed_configs=True` writes the folder's configs into the file's metadata (`triptych.configs`): a checkpoint
whose architecture is not one of the real ones (the tiny family's) then says how to build it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from triptych.checkpoint import CONFIGS_METADATA_KEY, TEXT_ENCODER_PREFIXES, UNET_PREFIX, VAE_PREFIXES, layout_of

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet_key(rest: str) -> str:
    for ours, theirs in _RESNET:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the LDM layout (without the `model.diffusion_model.` prefix)."""
    per_block = config["layers_per_block"]
    up_attends = [block.startswith("CrossAttn") for block in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        parts = key.split(".")
        if module in _UNET_FIXED:
            new = f"{_UNET_FIXED[module]}.{leaf}"
        elif parts[0] == "down_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            base = 1 + block * (per_block + 1)
            if kind == "resnets":
                new = f"input_blocks.{base + index}.0.{_resnet_key(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{base + index}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{base + per_block}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * index}.{_resnet_key(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            base = block * (per_block + 1)
            if kind == "resnets":
                new = f"output_blocks.{base + index}.0.{_resnet_key(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{base + index}.1.{rest}"
            else:  # upsamplers.0.conv.*: after the block's last layer, behind its attention if it has one
                new = f"output_blocks.{base + per_block}.{2 if up_attends[block] else 1}.conv.{parts[-1]}"
        else:
            raise ValueError(f"no LDM name for UNet tensor {key!r}")
        out[new] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM layout (without the `first_stage_model.` prefix)."""
    blocks = len(config["up_block_types"])
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if parts[1] == "down_blocks":
            index, kind = parts[2], parts[3]
            rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{parts[0]}.down.{index}.{'block.' + parts[4] if kind == 'resnets' else 'downsample'}.{rest}"
        elif parts[1] == "up_blocks":
            index, kind = blocks - 1 - int(parts[2]), parts[3]
            rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{parts[0]}.up.{index}.{'block.' + parts[4] if kind == 'resnets' else 'upsample'}.{rest}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:]).replace(
                "conv_shortcut", "nin_shortcut"
            )
        elif parts[1] == "mid_block":  # attentions.0.<module>.<leaf>
            module, leaf = ".".join(parts[4:-1]), parts[-1]
            new = f"{parts[0]}.mid.attn_1.{attention[module]}.{leaf}"
            if tensor.ndim == 2:  # linear in diffusers, 1x1 convolution in LDM
                tensor = tensor[:, :, None, None]
        out[new] = tensor
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict as LDM checkpoints hold it (the Hugging Face layout under
    `text_model.`; transformers >= 5.6 saves CLIPTextModel without that level)."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": tensor for key, tensor in state.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model state dict in OpenCLIP's layout (fused q/k/v, transposed projection)."""
    state = {key.removeprefix("text_model."): tensor for key, tensor in state.items()}
    fixed = {
        "embeddings.position_embedding.weight": "positional_embedding",
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    renames = (
        ("encoder.layers.", "transformer.resblocks."),
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        (".fc1.", ".c_fc."),
        (".fc2.", ".c_proj."),
        (".self_attn.", ".attn."),
    )
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key in fixed:
            out[fixed[key]] = tensor
            continue
        if key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
            continue
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        for projection in ("q_proj", "k_proj", "v_proj"):
            if f".attn.{projection}." in key:
                head, leaf = key.split(f".attn.{projection}.")
                fused.setdefault(f"{head}.attn.in_proj_{leaf}", {})[projection] = tensor
                break
        else:
            out[key] = tensor
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q_proj"], qkv["k_proj"], qkv["v_proj"]])
    return out


def pipeline_kind(folder: Path) -> str:
    """ "sd1", "sd2", "sdxl" or "sdxl-refiner": which checkpoint layout a diffusers folder exports to."""
    index = json.loads((folder / "model_index.json").read_text())
    text = folder / "text_encoder" / "config.json"
    return layout_of(index, json.loads(text.read_text()) if text.exists() else None)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


def _configs(folder: Path, kind: str) -> dict:
    """Everything a checkpoint of a non-standard architecture needs to be rebuilt: model_index.json, the
    components' configs and the tokenizers' configs (their vocabulary is always the CLIP BPE)."""
    configs = {"model_index": json.loads((folder / "model_index.json").read_text())}
    for name in ("unet", "vae", "scheduler", *TEXT_ENCODER_PREFIXES[kind]):
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        configs[name] = json.loads((folder / name / file).read_text())
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name).is_dir():
            configs[name] = json.loads((folder / name / "tokenizer_config.json").read_text())
    return configs


def export_checkpoint(folder: Path, out: Path, embed_configs: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Writes the pipeline folder `folder` as one LDM-layout .safetensors file `out` (optionally cast to `dtype`)."""
    folder, out = Path(folder), Path(out)
    kind = pipeline_kind(folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(_weights(folder / "unet"), unet_config).items()}
    state.update({VAE_PREFIXES[0] + k: v for k, v in vae_to_ldm(_weights(folder / "vae"), vae_config).items()})
    for name, (prefix, layout) in TEXT_ENCODER_PREFIXES[kind].items():
        weights = _weights(folder / name)
        converted = clip_to_ldm(weights) if layout == "clip" else open_clip_to_ldm(weights)
        state.update({prefix + k: v for k, v in converted.items()})
    if dtype is not None:
        state = {key: tensor.to(dtype) for key, tensor in state.items()}
    metadata = {"format": "pt"}
    if embed_configs:
        metadata[CONFIGS_METADATA_KEY] = json.dumps(_configs(folder, kind), sort_keys=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(out), metadata=metadata)
    return out


def export_transformer_file(
    folder: Path,
    out: Path,
    naming: str = "original",
    prefix: str = "",
    vae_prefix: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes an SD3/FLUX pipeline folder's transformer as one .safetensors file `out`, as such fine-tunes are
    shared: in the original key layout (`naming="original"`, transformer_files.to_original; BFL's FLUX files have no
    prefix, ComfyUI's and Stability's `model.diffusion_model.`) or in diffusers' names; with the VAE in the LDM
    layout under `vae_prefix` (Stability's SD3 files: `first_stage_model.`) or without one."""
    from triptych.transformer_files import to_original

    folder, out = Path(folder), Path(out)
    family = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}[
        json.loads((folder / "model_index.json").read_text())["_class_name"]
    ]
    weights = _weights(folder / "transformer")
    converted = to_original(weights, family) if naming == "original" else weights
    state = {prefix + key: tensor for key, tensor in converted.items()}
    if vae_prefix is not None:
        vae_config = json.loads((folder / "vae" / "config.json").read_text())
        state.update({vae_prefix + k: v for k, v in vae_to_ldm(_weights(folder / "vae"), vae_config).items()})
    if dtype is not None:
        state = {key: tensor.to(dtype) for key, tensor in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(out), metadata={"format": "pt"})
    return out
