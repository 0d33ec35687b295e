"""Stage ``assemble``: the trained parts as ``demo/base`` in a model store, an SD1.5 diffusers folder, beside the
adapters whose stages have completed: ``demo/controlnet-mask`` (a ControlNetModel folder),
``demo/lora-outline.safetensors`` (kohya) and ``demo/ti-moon.safetensors`` (A1111).

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes, with SD1.5's betas in an Euler scheduler (SD1.5's
own PNDM at 20 steps draws this UNet's pictures wrong: docs/demo-model.md, "The UNet") and the
real tokenizer in the classic vocab.json + merges.txt layout (as ``model_builders/tiny.py`` writes it). Weights are
stored as float16 by default: the whole family must fit in 25 MB (docs/demo-model.md, "Size"), most SD1.5 files users
bring are float16, and the services cast every network to their configured dtype when they load it. A plain
``from_pretrained`` gives float32 everywhere (``_compute_in_float32``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionPipeline

from ...model_builders.clip_vocab import write_clip_tokenizer
from ...model_builders.tiny import SD15_SCHEDULER
from .text import load_text_encoder, tokenizer
from .unet import load_unet
from .vae import load_shipped_vae

BASE_ID = "demo/base"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def assemble(work: Path, store: Path, dtype: str = "float16", log=print) -> Path:
    """Write ``store/demo/base`` from the completed stages in ``work`` (replacing an older build) and return it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    pipe = StableDiffusionPipeline(
        vae=load_shipped_vae(work, DTYPES[dtype]),
        text_encoder=load_text_encoder(work, DTYPES[dtype]),
        tokenizer=tokenizer(work),
        unet=load_unet(work, DTYPES[dtype]),
        scheduler=EulerDiscreteScheduler.from_config(SD15_SCHEDULER),
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
    _compute_in_float32(out / "text_encoder" / "config.json")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"assemble: wrote {out} ({size / 1e6:.1f} MB, {dtype})")
    for written in _adapters(Path(work), Path(store) / "demo", DTYPES[dtype]):
        log(f"assemble: wrote {written}")
    return out


def _compute_in_float32(config_path: Path) -> None:
    """Stored in float16, computed in float32: transformers loads a model in its config's ``dtype`` by default, while
    diffusers loads its models in float32, so a plain ``from_pretrained`` would pair a float16 text encoder with a
    float32 UNet and fail on CPU."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _adapters(work: Path, demo: Path, dtype: torch.dtype) -> list[Path]:
    """Copy each completed adapter stage's output into the store (the ControlNet in ``dtype``; the LoRA and the
    embedding are a few hundred kB and stay float32)."""
    from .controlnet import STAGE as CONTROLNET
    from .inversion import FILE as TI_FILE
    from .inversion import STAGE as TI
    from .lora import FILE as LORA_FILE
    from .lora import STAGE as LORA

    written = []
    if (work / CONTROLNET / "controlnet").exists():
        target = demo / "controlnet-mask"
        if target.exists():
            shutil.rmtree(target)
        ControlNetModel.from_pretrained(work / CONTROLNET / "controlnet", dtype=dtype).save_pretrained(target)
        written.append(target)
    for stage, name in ((LORA, LORA_FILE), (TI, TI_FILE)):
        if (work / stage / name).exists():
            shutil.copyfile(work / stage / name, demo / name)
            written.append(demo / name)
    return written
