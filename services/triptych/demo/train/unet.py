"""Stage ``unet``: the conditional UNet learns to denoise the VAE's latents of the stream, as SD trained its UNet.

The noising, the conditioning and the loss are ``denoising.py``'s (SD1.5's DDPM, epsilon, min-SNR-5). Caption
dropout for classifier-free guidance is the stream's 10% of empty captions. Each picture's clip skip is drawn from
``CLIP_SKIP_WEIGHTS``, so clip skip 1 and 2 still draw what was asked. The exported weights are the EMA (decay
0.999), as SD's were.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..data import BASE_MIX, batch
from .configs import UNET, StageSettings, unet_config
from .denoising import FrozenParts
from .loop import Trainer, load_part

STAGE = "unet"


def new_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config())


def train_unet(
    work: Path, settings: StageSettings = UNET, max_seconds: float | None = None, log=print, device: str = "cpu"
) -> bool:
    """Run (or resume) the stage on ``device``; when it completes, write ``work/unet/unet`` (the EMA weights)."""
    frozen = FrozenParts(work, device)
    unet = new_unet(settings.seed).to(device)
    trainer = Trainer(work, STAGE, settings, unet, log=log)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        examples = batch(settings.seed, step * settings.batch_size, settings.batch_size, BASE_MIX)
        noisy = frozen.noisy_batch(examples, generator)
        context = frozen.context([e.caption for e in examples], noisy.clip_skip)
        return noisy.loss(unet(noisy.noisy, noisy.timesteps, context).sample)

    if not trainer.run(loss_fn, max_seconds):
        return False
    log(f"unet: wrote {trainer.export(unet, 'unet', {})}")
    return True


def load_unet(work: Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The trained UNet (EMA weights) of a completed ``unet`` stage."""
    return load_part(work, STAGE, "unet", UNet2DConditionModel, dtype)


def snapshot(work: Path, out: Path) -> Path:
    """A work folder ``out`` whose ``unet`` stage is the running ``unet`` stage's EMA as of its last checkpoint
    (and whose ``text`` and ``vae`` are ``work``'s, linked): the ControlNet can start training against it while the
    UNet goes on, as ControlNets trained on a base model serve its fine-tunes (docs/demo-model.md, "Schedule")."""
    from .loop import CHECKPOINT

    state = torch.load(Path(work) / STAGE / CHECKPOINT, map_location="cpu", weights_only=True)
    unet = new_unet(0)
    unet.load_state_dict({**unet.state_dict(), **state["ema"]})
    out = Path(out)
    (out / STAGE).mkdir(parents=True, exist_ok=True)
    for stage in ("text", "vae"):
        if not (out / stage).exists():
            (out / stage).symlink_to((Path(work) / stage).resolve())
    unet.save_pretrained(out / STAGE / "unet", safe_serialization=True)
    (out / STAGE / "snapshot.json").write_text(json.dumps({"unet_step": state["step"]}) + "\n")
    return out / STAGE / "unet"
