"""What a model family is: the `Family` every family module implements, and the family-independent latent rules.

A family (SD1.x/2.x, SDXL, ...) says which components each role loads, how prompts become conditioning, the
geometry of its latents, the extra inputs its denoiser takes, its LoRA loader, its preview factors and its
scheduler table. Services ask the family; they never compare family names. Importing a family module loads no
torch (the gateway imports the registry): torch and diffusers are imported inside the methods that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from triptych.rules.scheduler_table import TABLE, SchedulerRow

if TYPE_CHECKING:
    import torch

    from triptych.model_store import ModelInfo
    from triptych.runtime.placement import Placement


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: its tokenizer folder and its encoder folder in a diffusers pipeline."""

    tokenizer: str
    encoder: str


@dataclass(frozen=True)
class PreviewFactors:
    """A linear latent -> RGB approximation (as ComfyUI's latent previews): rgb = latent @ factors + bias."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class DenoiserConditioning:
    """What the denoising network takes besides latents and timestep, CFG batch [negative, positive] when on."""

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None


def vae_scale_factor(vae_config: dict) -> int:
    """How many pixels one latent covers per side: 2 ** (VAE blocks - 1), as diffusers' pipelines compute it."""
    return 2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1)


def unscale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """The VAE's own latents from the denoiser's scaled ones, as the diffusers pipelines undo the scaling before
    `vae.decode`: `latents * std / scaling_factor + mean` where the VAE has latents_mean/std (SDXL VAEs that set
    them), else `latents / scaling_factor + shift_factor` (shift_factor: SD3's and FLUX's VAEs; 0 when absent)."""
    import torch

    config = vae_config if isinstance(vae_config, dict) else dict(vae_config)
    channels = latents.shape[1]
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        return latents * std / config["scaling_factor"] + mean
    latents = latents / config["scaling_factor"]
    shift = config.get("shift_factor")
    return latents + shift if shift is not None else latents


class Family:
    """A model family. Subclasses set the class attributes and override the methods their models need."""

    name: ClassVar[str]  # "sd1", "sdxl"
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s that belong to this family
    text_encoders: ClassVar[tuple[TextEncoderSlot, ...]]
    # The CLIP layer used without clip skip, counted back from the last (SD1.x the last, SDXL the penultimate).
    default_clip_skip: ClassVar[int] = 0
    denoiser_folder: ClassVar[str] = "unet"
    latent_scale: ClassVar[int] = 8  # pixels per latent per side: the family's VAEs downsample by 8
    preview: ClassVar[PreviewFactors]
    scheduler_table: ClassVar[tuple[SchedulerRow, ...]] = TABLE
    lora_loader_name: ClassVar[str]  # the diffusers LoRA loader mixin for the family's pipelines

    # ---- what a model folder is ----
    def variant(self, info: ModelInfo) -> str:
        """The family's name for this model, as EncodeResponse.model_family reports it (e.g. "sdxl-refiner")."""
        return self.name

    def refiner_variants(self) -> tuple[tuple[str, str], ...]:
        """(base variant, refiner variant) pairs that may hand a denoising window over (a refiner request)."""
        return ()

    def encoder_slots(self, info: ModelInfo) -> list[TextEncoderSlot]:
        """The text encoders this model folder has (a refiner has only the second)."""
        return [slot for slot in self.text_encoders if (info.index.get(slot.encoder) or [None])[0] is not None]

    # ---- prompt encoding (encoder service) ----
    def max_clip_skip(self, layers: int) -> int:
        """The largest clip skip the model's encoders allow, given the fewest layers among them."""
        return layers - 1 - self.default_clip_skip

    def hidden_layer_index(self, clip_skip: int) -> int:
        """The hidden_states index the conditioning comes from (EncodeResponse.hidden_layer_index)."""
        return -(clip_skip + 1 + self.default_clip_skip)

    def conditioning_layer(self, output, transformer, row: int, clip_skip: int) -> torch.Tensor:
        """Row `row` of the layer that conditions the denoiser, [1, tokens, dim], a fresh tensor."""
        raise NotImplementedError

    # ---- latents ----
    def latent_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The shape of one image's latents as the denoising network takes them."""
        return (1, channels, height // self.latent_scale, width // self.latent_scale)

    def image_size(self, latent_shape) -> tuple[int, int]:
        """(height, width) in pixels of the image that latents of this shape decode to."""
        return latent_shape[-2] * self.latent_scale, latent_shape[-1] * self.latent_scale

    # ---- the denoiser's extra inputs ----
    def check_prompt_conditioning(self, name: str, conditioning) -> list:
        """Violations (field, reason) of one side's conditioning beyond its prompt_embeds (e.g. SDXL's pooled)."""
        return []

    def check_negative_matches(self, job) -> list:
        """Violations where the negative side's extra conditioning does not match the positive's (CFG batches)."""
        return []

    def check_added_inputs(self, info: ModelInfo, config: dict, job, height: int, width: int) -> list:
        """Violations of the family's added inputs against the denoising network's config (e.g. SDXL's
        text_time features), checked once everything else is valid."""
        return []

    def denoiser_conditioning(
        self, info: ModelInfo, job, do_cfg: bool, height: int, width: int, place: Placement
    ) -> DenoiserConditioning:
        """prompt_embeds (and any added inputs) as the family's diffusers pipeline builds them."""
        import torch

        prompt_embeds = place.tensor(job.positive.prompt_embeds)
        if do_cfg:
            prompt_embeds = torch.cat([place.tensor(job.negative.prompt_embeds), prompt_embeds])
        return DenoiserConditioning(prompt_embeds)

    def zero_conditioning(self, info: ModelInfo, network) -> tuple[Any, Any | None]:
        """(prompt_embeds, pooled or None) of zeros that fit `network`: what a warm-up runs on."""
        import torch

        return torch.zeros(1, 77, network.config.cross_attention_dim), None

    # ---- LoRA ----
    def lora_loader(self):
        """The diffusers loader mixin whose lora_state_dict / load_lora_into_* read this family's LoRA files."""
        import diffusers.loaders

        return getattr(diffusers.loaders, self.lora_loader_name)

    def __repr__(self) -> str:
        return f"<family {self.name}>"
