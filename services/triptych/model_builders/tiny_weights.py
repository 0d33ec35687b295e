"""Seeded weight helpers for the tiny test model family (see ``tiny.py``).

Default initialisations leave many tensors at exactly 0 or 1 (biases, norm
affines, ControlNet zero-convs, LoRA up-matrices). Such values hide bugs: a
dropped bias or an unapplied ControlNet residual changes nothing. These helpers
make every tensor non-trivial while keeping magnitudes small enough that a
20-step denoise stays finite.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# LoRA targets: the attention projections kohya/A1111 and diffusers LoRAs touch most.
_UNET_LORA_RE = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# transformers 5 names CLIP modules without the legacy "text_model." prefix; LoRA files keep the legacy names.
_TE_LORA_RE = re.compile(r"(^|\.)encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj$")


@torch.no_grad()
def perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Make every parameter of ``model`` non-trivial, deterministically, in place.

    Norm layers get ``weight = 1 + 0.1·n`` and ``bias = 0.1 + 0.1·n``: the non-zero
    bias mean matters because CLIP's final layer norm bias sets the mean of the
    prompt embeddings, which A1111-style emphasis rescaling divides by. Every
    other parameter gets ``+ 0.02·n`` so that zero-initialised biases become
    non-zero. ``n`` is standard normal noise from a generator seeded with ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    for _, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm))
        for pname, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if is_norm and pname == "weight":
                p.copy_(1.0 + 0.1 * noise)
            elif is_norm and pname == "bias":
                p.copy_(0.1 + 0.1 * noise)
            else:
                p.add_(0.02 * noise)
    return model


_UNET_CONTROLNET_ZEROS = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")


@torch.no_grad()
def wake_controlnet_(
    controlnet: nn.Module, seed: int, scale: float = 0.05, targets: tuple[str, ...] = _UNET_CONTROLNET_ZEROS
) -> nn.Module:
    """Replace the ControlNet zero-convs with seeded noise so the guide has a visible effect.

    A UNet ControlNet's ``controlnet_down_blocks``, ``controlnet_mid_block`` and the conditioning
    embedding's ``conv_out`` are zero-initialised by design (a fresh ControlNet is
    a no-op); a tiny test model must instead change the image when used. `targets`: the
    parameter-name prefixes to wake (another ControlNet class's zero layers).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in controlnet.named_parameters():
        if name.startswith(targets):
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return controlnet


def lora_targets(unet: nn.Module, text_encoder: nn.Module) -> tuple[list[tuple[str, nn.Linear]], ...]:
    """Return ``(unet_targets, te_targets)``: ``(module_path, Linear)`` pairs a LoRA adapts.

    Text-encoder paths are spelled ``text_model.encoder.layers.N...`` as in every
    LoRA in the wild: transformers 5 dropped the ``text_model`` wrapper from
    ``CLIPTextModel`` and diffusers strips the prefix again on load.
    """
    unet_t = [(n, m) for n, m in unet.named_modules() if _UNET_LORA_RE.search(n)]
    te_t = [
        ("text_model." + n.removeprefix("text_model."), m)
        for n, m in text_encoder.named_modules()
        if _TE_LORA_RE.search(n)
    ]
    if not unet_t or not te_t:  # an empty half would silently make a LoRA that does nothing
        raise RuntimeError("no LoRA target modules found")
    return unet_t, te_t


def _lora_pair(linear: nn.Linear, rank: int, g: torch.Generator, up_scale: float) -> tuple[torch.Tensor, ...]:
    """Seeded ``(down, up)`` pair; ``up`` is non-zero (unlike training init) so the LoRA acts."""
    down = torch.randn(rank, linear.in_features, generator=g) / linear.in_features**0.5
    up = torch.randn(linear.out_features, rank, generator=g) * up_scale
    return down.contiguous(), up.contiguous()


def make_lora_pairs(
    unet: nn.Module, text_encoder: nn.Module, seed: int, rank: int = 4, up_scale: float = 0.3
) -> tuple[dict[str, tuple[torch.Tensor, ...]], dict[str, tuple[torch.Tensor, ...]]]:
    """Seeded LoRA ``{module_path: (down, up)}`` for the UNet and the text encoder."""
    g = torch.Generator().manual_seed(seed)
    unet_t, te_t = lora_targets(unet, text_encoder)
    unet_pairs = {n: _lora_pair(m, rank, g, up_scale) for n, m in unet_t}
    te_pairs = {n: _lora_pair(m, rank, g, up_scale) for n, m in te_t}
    return unet_pairs, te_pairs


def save_kohya_lora(
    path: Path,
    unet_pairs: dict[str, tuple[torch.Tensor, ...]],
    te_pairs: dict[str, tuple[torch.Tensor, ...]],
    alpha: float,
) -> None:
    """Write a kohya-ss / A1111 LoRA: ``lora_unet_*`` / ``lora_te_*`` keys with per-module alpha."""
    sd: dict[str, torch.Tensor] = {}
    for prefix, pairs in (("lora_unet_", unet_pairs), ("lora_te_", te_pairs)):
        for module_path, (down, up) in pairs.items():
            name = prefix + module_path.replace(".", "_")
            sd[f"{name}.lora_down.weight"] = down
            sd[f"{name}.lora_up.weight"] = up
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    # One metadata key only: safetensors writes ``__metadata__`` from a Rust HashMap, so
    # two or more keys come out in a random order and the file bytes change per run.
    # (kohya's ss_* training metadata is optional; loaders read alpha from the tensors.)
    save_file(sd, str(path), metadata={"format": "pt"})


def peft_layers(pairs: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA keys (``<module>.lora_A.weight`` / ``.lora_B.weight``) without prefix."""
    out: dict[str, torch.Tensor] = {}
    for module_path, (down, up) in pairs.items():
        out[f"{module_path}.lora_A.weight"] = down
        out[f"{module_path}.lora_B.weight"] = up
    return out


def ti_vectors(seed: int, num_vectors: int, dim: int, scale: float = 0.05) -> torch.Tensor:
    """Seeded textual-inversion vectors, ``(num_vectors, dim)`` fp32."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_vectors, dim, generator=g) * scale).contiguous()
