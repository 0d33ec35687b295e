"""diffusers reference pipelines on the tiny weights (in the test process), for pixel-exact comparisons."""

from __future__ import annotations

import io
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

from triptych.rules.scheduler_table import parse_scheduler


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def set_scheduler(pipe, name: str) -> None:
    """The scheduler a name means: Class.from_config(the model's own config, **options), as DESIGN.md says."""
    choice = parse_scheduler(name)
    if choice.class_name is not None:
        pipe.scheduler = getattr(diffusers, choice.class_name).from_config(pipe.scheduler.config, **choice.options)


class References:
    """Loads each reference pipeline once; pipelines keep their original scheduler config."""

    def __init__(self, root: Path):
        self.root = root
        self._pipes = {}

    def pipe(self, model: str):
        if model not in self._pipes:
            cls = diffusers.StableDiffusionXLPipeline if "sdxl" in model else diffusers.StableDiffusionPipeline
            pipe = cls.from_pretrained(self.root / model)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[model] = (pipe, pipe.scheduler)
        pipe, original = self._pipes[model]
        pipe.scheduler = original
        return pipe

    def image(
        self,
        model: str,
        *,
        prompt: str,
        seed: int,
        scheduler: str = "",
        steps: int = 20,
        cfg_scale: float = 7.0,
        width: int | None = None,
        height: int | None = None,
        negative_prompt: str | None = None,
        **kwargs,
    ) -> np.ndarray:
        pipe = self.pipe(model)
        set_scheduler(pipe, scheduler)
        result = pipe(
            prompt=None if "prompt_embeds" in kwargs else prompt,
            negative_prompt=None if "negative_prompt_embeds" in kwargs else (negative_prompt or None),
            num_inference_steps=steps,
            guidance_scale=cfg_scale,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),
            **kwargs,
        )
        return np.asarray(result.images[0])
