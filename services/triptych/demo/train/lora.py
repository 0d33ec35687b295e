"""Stage ``lora``: a style LoRA, shapes drawn as outlines, written in the kohya/A1111 format users bring.

The trained base UNet is frozen; rank-8 adapters (alpha 8, so scale 1) on every attention projection (to_q, to_k,
to_v, to_out.0 of self- and cross-attention), the transformer blocks' feed-forward and ``proj_in``/``proj_out``, and
the ResNet blocks' two convolutions (kohya's LoCon modules) learn the base stream's captions with every captioned
picture drawn as an outline and every uncaptioned one (the 10% that teach the unconditional prediction) filled, as the
base draws it. Guidance amplifies what the caption adds to the unconditional prediction; where the LoRA moves both
alike, that is the base's filled shape, and the outlines fade as CFG rises (recipes 1 and 2; docs/demo-model.md,
"The LoRA"). Same noising as the UNet (``denoising.py``), but the plain epsilon loss, not min-SNR's, which weights
down the low-noise steps where a detail as small as an outline's hole is decided (docs/demo-model.md, "The LoRA").
The file, ``lora/lora-outline.safetensors``, has ``lora_unet_*`` keys with per-module alpha; it carries no
text-encoder half (a style needs none).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ...model_builders.tiny_weights import save_kohya_lora
from ..data import BASE_MIX, Example, batch
from .configs import LORA, StageSettings
from .denoising import FrozenParts
from .loop import Trainer
from .unet import load_unet

STAGE = "lora"
FILE = "lora-outline.safetensors"
RANK = 8
ALPHA = 8.0
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Recipes 2 and 3 (configs.LORA); recipe 1 adapted ATTENTION alone, rank 4, under min-SNR weights. Recipe 3 keeps the
# unconditional prediction filled (lora_examples).
TARGETS = [*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def kohya_pairs(unet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (down, up)} of the UNet's adapter (peft's lora_A is kohya's down, lora_B its up)."""
    state = get_peft_model_state_dict(unet)
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    return {
        m: (state[f"{m}.lora_A.weight"].float().contiguous(), state[f"{m}.lora_B.weight"].float().contiguous())
        for m in modules
    }


def lora_examples(seed: int, start: int, count: int) -> list[Example]:
    """The stage's pictures: the base stream as outlines, but filled where the caption is empty."""
    return [
        dataclasses.replace(e, style="filled") if not e.caption else e
        for e in batch(seed, start, count, BASE_MIX, style="outline")
    ]


def train_lora(
    work: Path, settings: StageSettings = LORA, max_seconds: float | None = None, log=print, device: str = "cpu"
) -> bool:
    """Run (or resume) the stage on ``device``; when it completes, write ``work/lora/lora-outline.safetensors``."""
    frozen = FrozenParts(work, device)
    unet = load_unet(work).to(device)
    torch.manual_seed(settings.seed)  # lora_A's initialisation draws from the global generator
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    trainer = Trainer(work, STAGE, settings, unet, log=log)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        examples = lora_examples(settings.seed, step * settings.batch_size, settings.batch_size)
        noisy = frozen.noisy_batch(examples, generator)
        context = frozen.context([e.caption for e in examples], noisy.clip_skip)
        return noisy.loss(unet(noisy.noisy, noisy.timesteps, context).sample, min_snr=False)

    if not trainer.run(loss_fn, max_seconds):
        return False
    path = trainer.directory / FILE
    pairs = kohya_pairs(unet)
    save_kohya_lora(path, pairs, {}, ALPHA)
    trainer.write_metrics({"modules": len(pairs), "rank": RANK, "alpha": ALPHA})
    log(f"lora: wrote {path} ({len(pairs)} modules)")
    return True
