"""The oracle: one request's settings, written once, run through the split chain (the gateway, real processes)
and through diffusers' own pipeline on the tiny weights (in the test process), for pixel-exact comparisons."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

from triptych import families
from triptych.rules.scheduler_table import TABLE, parse_scheduler
from triptych.v1 import image_service_pb2

# A diffusers reference: called with the scheduler name and a pipeline call's keyword arguments, returns the image.
Reference = Callable[..., np.ndarray]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def set_scheduler(pipe, name: str) -> None:
    """The scheduler a name means in the pipeline's family's table: Class.from_config(the model's own config,
    **options), as DESIGN.md says."""
    family = families.for_pipeline(type(pipe).__name__)
    choice = parse_scheduler(name, table=family.scheduler_table if family else TABLE)
    if choice.class_name is not None:
        pipe.scheduler = getattr(diffusers, choice.class_name).from_config(pipe.scheduler.config, **choice.options)


def pipeline(pipe) -> Reference:
    """A diffusers pipeline as a Reference: the named scheduler set on it, then its first image."""

    def run(scheduler: str, **kwargs) -> np.ndarray:
        set_scheduler(pipe, scheduler)
        return np.asarray(pipe(**kwargs).images[0])

    return run


def lora_pipe(root: Path, loras: list[tuple[str, float]], fuse: bool = False) -> diffusers.StableDiffusionPipeline:
    """tiny/sd15 with diffusers' load_lora_weights + set_adapters for [(model, weight)] (`fuse`: the UNet's halves
    fused into its weights): the reference for a request's LoRA list."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "tiny/sd15")
    pipe.set_progress_bar_config(disable=True)
    names = [f"a{i}" for i in range(len(loras))]
    for name, (model, _) in zip(names, loras, strict=True):
        pipe.load_lora_weights(root / "tiny", weight_name=model.split("/")[1] + ".safetensors", adapter_name=name)
    if loras:
        pipe.set_adapters(names, [w for _, w in loras])
        if fuse:
            pipe.fuse_lora(components=["unet"], adapter_names=names)
    return pipe


def diffusers_kwargs(request: dict, **extras) -> dict:
    """A GenerateRequest's fields as diffusers pipeline arguments (`extras` added, and winning). An absent or empty
    negative prompt is negative_prompt=None; CFG defaults to 7.0 as the gateway's; the seed feeds a CPU generator."""
    kwargs = dict(
        prompt=request.get("positive_prompt", ""),
        negative_prompt=request.get("negative_prompt") or None,
        num_inference_steps=request["steps"],
        guidance_scale=request.get("cfg_scale", 7.0),
        width=request.get("width"),
        height=request.get("height"),
        generator=torch.Generator("cpu").manual_seed(request["seed"]),
    )
    if "clip_skip" in request:
        kwargs["clip_skip"] = request["clip_skip"]
    if "prompt_embeds" in extras:  # embeddings computed by the test stand for the prompt, clip skip included
        kwargs.pop("clip_skip", None)
        kwargs["prompt"] = None
    if "negative_prompt_embeds" in extras:
        kwargs["negative_prompt"] = None
    return {**kwargs, **extras}


@dataclass
class Chained:
    """What the chain returned for one request: every event, its one image, and that image's pixels."""

    events: list[image_service_pb2.GenerateResponse]
    image: image_service_pb2.GeneratedImage
    pixels: np.ndarray


class Oracle:
    """Runs a request's settings through the chain and through diffusers; loads each model's pipeline once."""

    def __init__(self, root: Path):
        self.root = root
        self._pipes = {}

    def pipe(self, model: str):
        """The model's own diffusers pipeline, with its original scheduler (a test may have replaced it)."""
        if model not in self._pipes:
            # The refiner as SDXL's text-to-image pipeline; every other model as its model_index.json names it.
            cls = diffusers.StableDiffusionXLPipeline if "sdxl" in model else diffusers.DiffusionPipeline
            pipe = cls.from_pretrained(self.root / model)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[model] = (pipe, pipe.scheduler)
        pipe, original = self._pipes[model]
        pipe.scheduler = original
        return pipe

    def diffusers(self, request: dict, reference: Reference | None = None, **extras) -> np.ndarray:
        """The request through `reference` (default: the request's model's own pipeline), `extras` added to the
        pipeline call."""
        reference = reference or pipeline(self.pipe(request["model"]))
        return reference(request.get("scheduler", ""), **diffusers_kwargs(request, **extras))

    @staticmethod
    def chain(client, request: dict) -> Chained:
        """The request through the gateway `client` talks to; it must answer one image."""
        events = list(client.stream(image_service_pb2.GenerateRequest(**request)))
        images = [event.image for event in events if event.HasField("image")]
        assert len(images) == 1
        return Chained(events, images[0], pixels(images[0].image.data))

    def compare(self, client, request: dict, reference: Reference | None = None, **extras) -> Chained:
        """Asserts that the chain's image equals diffusers' bit for bit; returns the chain's answer."""
        chained = self.chain(client, request)
        expected = self.diffusers(request, reference, **extras)
        assert chained.pixels.shape == expected.shape
        difference = np.abs(chained.pixels.astype(int) - expected.astype(int)).max()
        assert np.array_equal(chained.pixels, expected), f"max diff {difference}"
        return chained
