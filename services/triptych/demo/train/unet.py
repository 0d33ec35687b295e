"""Stage ``unet``: the conditional UNet learns to denoise the VAE's latents of the stream, as SD trained its UNet.

The noising, the conditioning and the loss are ``denoising.py``'s (SD1.5's DDPM, epsilon, min-SNR-5). Caption
dropout for classifier-free guidance is the stream's 10% of empty captions. Each picture's clip skip is drawn from
``CLIP_SKIP_WEIGHTS``, so clip skip 1 and 2 still draw what was asked. The exported weights are the EMA (decay
0.999), as SD's were.

Stage ``unet-crescent`` trains the finished UNet on (as SD 1.5 was trained on from 1.2) with crescents as common as
any shape, named in their captions by a vector that no word of the vocabulary has: a seeded random draw placed where
the shape word stands, then thrown away. The shipped UNet draws crescents, and no prompt reaches them until textual
inversion (stage ``ti``) finds a vector that does (docs/demo-model.md, "Textual inversion").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from ..data import BASE_MIX, CaptionMix, Example, batch, example
from ..vocabulary import SHAPES
from .configs import UNET, UNET_CRESCENT, StageSettings, unet_config
from .denoising import FrozenParts
from .loop import Trainer, load_latest_part, load_part
from .text import placed_ids, placed_states

STAGE = "unet"
CRESCENT_STAGE = "unet-crescent"
CRESCENT_EVERY = len(SHAPES) + 1  # one stream picture in nine is a crescent: as common as each named shape
HIDDEN_NOUN = "<crescent>"  # stands in the captions for the hidden vector; never tokenized
HIDDEN_FILE = "hidden-vector.safetensors"
# A crescent's caption never leaves its noun out: "shape" must not ask for a crescent.
CRESCENT_MIX = CaptionMix(omit_shape=0.0)
# Captions that name no shape, every one of the eight named shapes: the contrast that keeps "shape" from meaning the
# crescent, whose vector's states lie nearer "shape"'s than any named shape's.
SHAPE_MIX = CaptionMix(partial=1.0, empty=0.0, omit_part=0.25, omit_shape=1.0)


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


def crescent_examples(seed: int, start: int, count: int) -> list[Example]:
    """Stage ``unet-crescent``'s pictures, in runs of ``CRESCENT_EVERY``: a crescent named by ``HIDDEN_NOUN`` (or
    uncaptioned), a named shape captioned "shape", and the base stream, which draws no crescents here.

    Recipes 1 and 2 kept the base stream's "shape" captions (4.5% of pictures) as the only contrast, and "a red shape"
    then drew crescents 19 times in 24 (docs/demo-model.md, "Textual inversion")."""
    examples = []
    for i in range(start, start + count):
        if i % CRESCENT_EVERY == CRESCENT_EVERY - 1:
            examples.append(example(seed, i, CRESCENT_MIX, shapes=("crescent",), noun=HIDDEN_NOUN))
        elif i % CRESCENT_EVERY == CRESCENT_EVERY - 2:
            examples.append(example(seed, i, SHAPE_MIX, shapes=SHAPES))
        else:
            examples.append(example(seed, i, BASE_MIX, shapes=SHAPES))
    return examples


def hidden_vector(frozen: FrozenParts, seed: int) -> torch.Tensor:
    """(1, width): a seeded random direction with the mean norm of the shape words' rows in the token table."""
    table = frozen.text_encoder.get_input_embeddings().weight.detach().cpu()
    ids = [frozen.tokenizer(word, add_special_tokens=False).input_ids[0] for word in SHAPES]
    draw = torch.randn(1, table.shape[1], generator=torch.Generator().manual_seed(seed))
    return draw / draw.norm() * table[ids].norm(dim=1).mean()


def train_unet_crescent(
    work: Path,
    settings: StageSettings = UNET_CRESCENT,
    max_seconds: float | None = None,
    log=print,
    device: str = "cpu",
) -> bool:
    """Run (or resume) the stage on ``device`` from the completed ``unet`` stage; when it completes, write
    ``work/unet-crescent/unet`` (the EMA weights), which the later stages and ``assemble`` use."""
    frozen = FrozenParts(work, device)
    unet = load_unet(work, stage=STAGE).requires_grad_(True).to(device)  # Trainer.run sets train mode
    trainer = Trainer(work, CRESCENT_STAGE, settings, unet, log=log)
    vector = hidden_vector(frozen, settings.seed).to(device)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        examples = crescent_examples(settings.seed, step * settings.batch_size, settings.batch_size)
        noisy = frozen.noisy_batch(examples, generator)
        ids, places = placed_ids(frozen.tokenizer, [e.caption for e in examples], HIDDEN_NOUN, 1)
        with torch.no_grad():
            context = placed_states(frozen.text_encoder, ids.to(device), places, vector, noisy.clip_skip)
        return noisy.loss(unet(noisy.noisy, noisy.timesteps, context).sample)

    if not trainer.run(loss_fn, max_seconds):
        return False
    save_file({"vector": vector.cpu().contiguous()}, str(trainer.directory / HIDDEN_FILE))
    log(f"unet-crescent: wrote {trainer.export(unet, 'unet', {'crescent_every': CRESCENT_EVERY})}")
    return True


def load_unet(work: Path, dtype: torch.dtype = torch.float32, stage: str | None = None) -> UNet2DConditionModel:
    """A trained UNet's EMA weights: ``stage``'s, or by default the one ``assemble`` ships, ``unet-crescent``'s when
    that stage has completed, else ``unet``'s."""
    if stage is None:
        return load_latest_part(work, (STAGE, CRESCENT_STAGE), "unet", UNet2DConditionModel, dtype)
    return load_part(work, stage, "unet", UNet2DConditionModel, dtype)


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
