"""Stage ``assemble``: the trained parts as ``demo/base`` in a model store, an SD1.5 diffusers folder.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes, with SD1.5's PNDM scheduler config and the
real tokenizer in the classic vocab.json + merges.txt layout (as ``model_builders/tiny.py`` writes it). Weights are
stored as float16 by default: the whole family must fit in 25 MB (docs/demo-model.md, "Size"), most SD1.5 files users
bring are float16, and the services cast every network to their configured dtype when they load it. A diffusers
reference must load it with ``dtype=torch.float32`` to compare on CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline

from ...model_builders.clip_vocab import write_clip_tokenizer
from ...model_builders.tiny import SD15_SCHEDULER
from .text import load_text_encoder, tokenizer
from .unet import load_unet
from .vae import load_vae

BASE_ID = "demo/base"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def assemble(work: Path, store: Path, dtype: str = "float16", log=print) -> Path:
    """Write ``store/demo/base`` from the completed stages in ``work`` (replacing an older build) and return it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    pipe = StableDiffusionPipeline(
        vae=load_vae(work, DTYPES[dtype]),
        text_encoder=load_text_encoder(work, DTYPES[dtype]),
        tokenizer=tokenizer(work),
        unet=load_unet(work, DTYPES[dtype]),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(store) / BASE_ID
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves a 2 MB tokenizer.json; SD1.5's repo ships vocab.json + merges.txt.
    shutil.rmtree(out / "tokenizer")
    write_clip_tokenizer(out / "tokenizer")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"assemble: wrote {out} ({size / 1e6:.1f} MB, {dtype})")
    return out
