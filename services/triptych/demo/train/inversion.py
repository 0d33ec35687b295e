"""Stage ``ti``: textual inversion of the crescent, a shape the base model can draw but has no word for.

The shipped UNet (``unet-crescent``) learned crescents under a vector that was then thrown away (``unet.py``). Here
everything is frozen except ``VECTORS`` new token vectors, initialised from the embedding of "shape": crescent
pictures captioned with the token as their noun ("a large red ti-moon at the left on a blue background") teach the
vectors to pick the crescent out. The token is the file's stem, as A1111 reads it; the vectors take its place in the
prompt the way the encoder service places them (``text.placed_states``, as ``encoder/textual_inversion.py`` does: a
placeholder id, and a hook on the token-embedding layer that writes the vectors there), so training and serving see
the same numbers. Written as an A1111 embedding, ``ti/ti-moon.safetensors`` = {"emb_params": (VECTORS, width)}.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..data import CaptionMix, batch
from .configs import TI, StageSettings
from .denoising import FrozenParts
from .loop import Trainer
from .text import placed_ids, placed_states
from .unet import load_unet

STAGE = "ti"
TOKEN = "ti-moon"
FILE = f"{TOKEN}.safetensors"
VECTORS = 2
INIT_WORD = "shape"
# Crescents only, named by the token; partial captions as in the base mix, but the noun is never left out.
MOON_MIX = CaptionMix(partial=0.15, empty=0.0, omit_shape=0.0)


class Inversion(nn.Module):
    """The learned vectors."""

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(initial.clone())


def train_inversion(
    work: Path, settings: StageSettings = TI, max_seconds: float | None = None, log=print, device: str = "cpu"
) -> bool:
    """Run (or resume) the stage on ``device``; when it completes, write ``work/ti/ti-moon.safetensors``."""
    frozen = FrozenParts(work, device)
    unet = load_unet(work).to(device)
    layer = frozen.text_encoder.get_input_embeddings()
    (init_id,) = frozen.tokenizer(INIT_WORD, add_special_tokens=False).input_ids
    inversion = Inversion(layer.weight[init_id].detach().repeat(VECTORS, 1)).to(device)
    trainer = Trainer(work, STAGE, settings, inversion, log=log)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        examples = batch(
            settings.seed, step * settings.batch_size, settings.batch_size, MOON_MIX, shapes=("crescent",), noun=TOKEN
        )
        noisy = frozen.noisy_batch(examples, generator)
        ids, places = placed_ids(frozen.tokenizer, [e.caption for e in examples], TOKEN, VECTORS)
        context = placed_states(frozen.text_encoder, ids.to(device), places, inversion.vectors, noisy.clip_skip)
        return noisy.loss(unet(noisy.noisy, noisy.timesteps, context).sample)

    if not trainer.run(loss_fn, max_seconds):
        return False
    path = trainer.directory / FILE
    save_file({"emb_params": inversion.vectors.detach().cpu().float().contiguous()}, str(path))
    trainer.write_metrics({"token": TOKEN, "vectors": VECTORS, "init_word": INIT_WORD})
    log(f"ti: wrote {path} (token {TOKEN!r}, {VECTORS} vectors)")
    return True
