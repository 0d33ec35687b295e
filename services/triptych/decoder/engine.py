"""VAE decoding: undoes the latent scaling, decodes, and post-processes exactly as the diffusers pipelines.

Mirrors the decode step of StableDiffusionPipeline / StableDiffusionXLPipeline (output_type="pil"). Never
imports grpc and never loads a text encoder or a UNet.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from triptych import checkpoint
from triptych.decoder.image_encoding import EncodeImageJob, ImageLatents, encode_image, image_size
from triptych.families.base import unscale_latents, vae_scale_factor
from triptych.model_store import ModelInfo, ModelStore
from triptych.runtime.admission import BoundedQueue
from triptych.runtime.components import ComponentCache, LoadedModel
from triptych.runtime.compute import ComputeThreads
from triptych.runtime.placement import CPU_FLOAT32, Placement, compile_in_place
from triptych.serving.errors import Cancelled, InvalidArgument


@dataclass(frozen=True)
class VaeSource:
    """Where a decode's VAE comes from: the cache key, the folder of its config.json, and the model it is part of
    (whose `weights` is the single file holding its tensors, if any)."""

    key: str
    config_folder: Path
    info: ModelInfo

    def load(self) -> AutoencoderKL:
        return checkpoint.load(AutoencoderKL, self.info, "vae", self.config_folder)


@dataclass(frozen=True)
class DecodeJob:
    model: str
    vae: str
    latents: torch.Tensor  # [B, C, h, w], scaled as output_type="latent" returns them


class DecoderEngine:
    """Loads VAEs on demand (a model's own `vae` subfolder, or a standalone VAE folder) and decodes."""

    def __init__(
        self,
        store: ModelStore,
        cache: ComponentCache,
        compute: ComputeThreads | None = None,
        placement: Placement = CPU_FLOAT32,
        compile_mode: str | None = None,
        queue_per_model: int = 16,
        tile_above_pixels: int = 0,
    ):
        self.store = store
        self.tile_above_pixels = tile_above_pixels  # 0 = never tile
        # Admitted decodes per VAE (running + waiting); one more is RESOURCE_EXHAUSTED at once, never queued.
        self.queue = BoundedQueue(queue_per_model, "decode")
        self.cache = cache
        self.placement = placement
        self.compile_mode = compile_mode  # None = eager; else a torch.compile mode for every VAE decoder
        self.compute = compute or ComputeThreads("decoder")

    def _vae(self, model_id: str, field: str, model: str = "") -> VaeSource:
        """The VAE `model_id` names (a pipeline's own, a VAE folder or a VAE file), without loading it.
        A VAE file holds weights only: it decodes with the configuration (scaling) of `model`'s own VAE."""
        info = self.store.resolve(model_id, field)
        if info.kind == "vae" and info.weights is not None:
            if not model:
                raise InvalidArgument.one(
                    "model", f"required with a VAE file ({model_id!r}): its scaling comes from the model's own VAE"
                )
            base = self._vae(model, "model")
            return VaeSource(f"{model_id}\0{model}", base.config_folder, info)
        folder = _vae_folder(info)
        if folder is None:
            raise InvalidArgument.one(field, f"{model_id!r} has no VAE (it is {info.what})")
        return VaeSource(info.cache_id("vae"), folder, info)

    def warm_up(self, model_id: str) -> bool:
        """Loads a model's VAE (or a VAE folder) and decodes zeros at its default size. False if it has no VAE."""
        info = self.store.resolve(model_id, "model")
        folder = _vae_folder(info)
        if folder is None or (info.kind == "vae" and info.weights is not None):  # a VAE file needs its model
            return False
        config = json.loads((folder / "config.json").read_text())
        size = config.get("sample_size")
        side = (size if isinstance(size, int) else 512) // vae_scale_factor(config)
        self.decode(DecodeJob(model_id, "", torch.zeros(1, config.get("latent_channels", 4), side, side)))
        return True

    def scale_factor(self, model: str, vae: str) -> int:
        """Pixels per latent per side of the VAE that decodes (model, vae), from its config (nothing loaded)."""
        return _config_scale(self._source(model, vae).config_folder)

    def decode(self, job: DecodeJob, is_active: Callable[[], bool] = lambda: True) -> list[Image.Image]:
        """Checks the VAE exists here, takes a slot of its queue, then loads it (once) and decodes on its compute
        thread, one image at a time: when is_active() turns false (the caller left) it stops between images."""
        source = self._source(job.model, job.vae)
        with self.queue.slot(source.key):
            return self.compute.run(source.key, self._decode, source, job, is_active)

    def _source(self, model: str, vae: str) -> VaeSource:
        """The VAE a decode uses: `vae` when set, else the model's own."""
        return self._vae(vae, "vae", model) if vae else self._vae(model, "model")

    def encode_image(self, job: EncodeImageJob, is_active: Callable[[], bool] = lambda: True) -> ImageLatents:
        """Encodes one image with the VAE a decode of (model, vae) would use (loaded once), on its compute thread,
        after a slot of its queue; the size is checked (and an unset one read from the model) before the queue."""
        source = self._source(job.model, job.vae)
        scale = _config_scale(source.config_folder)
        width, height = image_size(self.store, job, scale)
        with self.queue.slot(source.key):
            if not is_active():
                raise Cancelled("the caller went away before the image was encoded")
            return self.compute.run(source.key, lambda: encode_image(self._loaded(source), job, width, height, scale))

    def _loaded(self, source: VaeSource) -> AutoencoderKL:
        """The source's VAE: loaded once, then cached; placed on the device (fp16 VAEs that overflow stay float32)."""

        def load() -> LoadedModel:
            vae = source.load()
            place = self.placement
            if place.dtype == torch.float16 and vae.config.force_upcast:
                # fp16 VAEs that overflow stay float32, as the diffusers pipelines upcast them to decode.
                place = dataclasses.replace(place, dtype=torch.float32)
            vae = place.module(vae, convolutional=False)
            if self.compile_mode is not None:
                compile_in_place(vae.decoder, self.compile_mode)  # the encoder half is never used here
            return LoadedModel({"vae": vae})

        return self.cache.get(source.key, load)["vae"]

    def _decode(self, source: VaeSource, job: DecodeJob, is_active: Callable[[], bool]) -> list[Image.Image]:
        vae = self._loaded(source)
        latents = job.latents
        channels = vae.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != channels or min(latents.shape[0], *latents.shape[2:]) < 1:
            raise InvalidArgument.one(
                "latents", f"expected [B, {channels}, h, w] with B, h, w >= 1, got {list(latents.shape)}"
            )
        processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae.config))
        images = []
        # One image at a time: a batch decodes as its images alone would, holds one image's activations, and
        # stops between images when its caller has gone.
        for index in range(latents.shape[0]):
            if not is_active():
                raise Cancelled(f"the caller went away; decoding stopped after {index} of {latents.shape[0]} images")
            with torch.no_grad():
                one = unscale_latents(latents[index : index + 1].to(device=vae.device, dtype=vae.dtype), vae.config)
                pixels = one.shape[-2] * one.shape[-1] * vae_scale_factor(vae.config) ** 2
                if self.tile_above_pixels and pixels > self.tile_above_pixels:
                    image = vae.tiled_decode(one, return_dict=False)[0].cpu()  # as vae.enable_tiling() decodes
                else:
                    image = vae.decode(one, return_dict=False)[0].cpu()
            images += processor.postprocess(image, output_type="pil", do_denormalize=[True])
        return images


@functools.lru_cache(maxsize=256)
def _config_scale(folder: Path) -> int:
    """A VAE folder's scale factor, its config read once (a loaded VAE is never reloaded either)."""
    return vae_scale_factor(json.loads((folder / "config.json").read_text()))


def _vae_folder(info: ModelInfo) -> Path | None:
    """A model's own `vae` subfolder, or a standalone VAE folder; None if it has no VAE."""
    if info.kind == "pipeline" and (info.path / "vae").is_dir():
        return info.path / "vae"
    return info.path if info.kind == "vae" else None
