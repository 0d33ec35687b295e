"""What a model family is: the `Family` every family module implements, and the family-independent latent rules.

A family (SD1.x/2.x, SDXL, ...) says which components each role loads, how prompts become conditioning, the
geometry of its latents, the extra inputs its denoiser takes, its LoRA loader, its preview factors and its
scheduler table. Services ask the family; they never compare family names. Importing a family module loads no
torch (the gateway imports the registry): torch and diffusers are imported inside the methods that need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from triptych.rules.control_units import BALANCED
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
    """What the denoising network takes besides latents and timestep, CFG batch [negative, positive] when on:
    prompt_embeds, SDXL's added_cond_kwargs, and family-specific inputs in `extra` (LCM's timestep_cond, FLUX's
    pooled projections, text/image ids and guidance)."""

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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

    name: ClassVar[str]  # "sd1", "sdxl", "sd3", "flux"
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s that belong to this family
    text_encoders: ClassVar[tuple[TextEncoderSlot, ...]]
    # The CLIP layer used without clip skip, counted back from the last (SD1.x the last, SDXL the penultimate).
    default_clip_skip: ClassVar[int] = 0
    denoiser_folder: ClassVar[str] = "unet"
    latent_scale: ClassVar[int] = 8  # pixels per latent per side: the family's VAEs downsample by 8
    preview: ClassVar[PreviewFactors]
    scheduler_table: ClassVar[tuple[SchedulerRow, ...]] = TABLE
    lora_loader_name: ClassVar[str]  # the diffusers LoRA loader mixin for the family's pipelines
    network_class_name: ClassVar[str]  # the diffusers class of the denoising network
    supports_windows: ClassVar[bool] = False  # denoising windows (base -> refiner hand-off)
    supports_controlnet: ClassVar[bool] = False
    controlnet_class_name: ClassVar[str] = ""  # the diffusers class of the family's ControlNets
    control_modes: ClassVar[tuple[str, ...]] = (BALANCED,)  # the ControlNet unit modes the family can do
    # True: ControlNet guides reach the denoiser as VAE latents (ControlNetUnit.guide_latents), which the gateway has
    # the decoder encode first (the denoiser holds no VAE); False: as the guide image itself.
    guide_latents: ClassVar[bool] = False
    # With guide_latents: True where the pipeline samples the guides with the request's generator and then draws the
    # initial noise from it (FLUX), so the denoiser continues the generator state after the guides.
    guides_share_generator: ClassVar[bool] = False
    supports_loras: ClassVar[bool] = True
    # True: prompts are CLIP-encoded in A1111-style 75-token chunks with weighting and textual inversion
    # (encoder/engine.py); False: the family encodes a prompt itself (`encode_prompt`), as its diffusers pipeline.
    chunked_clip_prompts: ClassVar[bool] = True
    size_multiple: ClassVar[int] = 8  # width and height must be multiples of this
    takes_negative_prompt: ClassVar[bool] = True  # False: guidance-distilled, the negative prompt is ignored
    clip_skip_has_effect: ClassVar[bool] = True  # False: the family reads no CLIP hidden layer (FLUX: pooled only)

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

    def network_config(self, info: ModelInfo) -> dict:
        """The denoising network's arguments from its config.json, defaults filled in as diffusers fills them."""
        import diffusers

        network_class = getattr(diffusers, self.network_class_name)
        config = network_class.load_config(info.path / self.denoiser_folder)
        return network_class.extract_init_dict(config)[0]

    def load_network(self, info: ModelInfo):
        """The denoising network, from safetensors only (its folder, or its tensors in a single-file checkpoint), in
        eval mode (on the CPU, float32)."""
        import diffusers

        from triptych import checkpoint

        return checkpoint.load(getattr(diffusers, self.network_class_name), info, self.denoiser_folder)

    def text_width(self, config: dict) -> int:
        """The width of the prompt embeddings the network takes."""
        raise NotImplementedError

    def default_size(self, config: dict) -> int:
        """Width and height in pixels when a request leaves them unset, as the family's diffusers pipeline."""
        raise NotImplementedError

    def uses_cfg(self, config: dict, guidance_scale: float) -> bool:
        """Whether a request at this guidance scale runs classifier-free guidance (an unconditional pass)."""
        raise NotImplementedError

    def set_timesteps(self, scheduler, steps: int, latent_shape, network_config: dict, device) -> None:
        """The scheduler's timesteps for `steps` steps, as the family's pipeline sets them."""
        raise NotImplementedError

    def initial_latents(self, shape, generator, place: Placement, scheduler):
        """Initial noise of `shape` (latent_shape) from the CPU generator, as the network takes it."""
        raise NotImplementedError

    def predict(self, state, network, t, copy_output: bool = False):
        """The guided noise (or velocity) prediction at timestep t for a DenoiseState; copy_output copies the
        network's output before guidance (CUDA graphs reuse its memory)."""
        raise NotImplementedError

    def wire_latents(self, latents, height: int, width: int):
        """Latents as the denoiser returns them: [1, channels, height / scale, width / scale], scaled as the
        pipeline's output_type="latent" (FLUX unpacks its sequence here)."""
        return latents

    def denoiser_conditioning(
        self, info: ModelInfo, network, job, do_cfg: bool, height: int, width: int, place: Placement
    ) -> DenoiserConditioning:
        """prompt_embeds (and any added inputs) as the family's diffusers pipeline builds them."""
        import torch

        prompt_embeds = place.tensor(job.positive.prompt_embeds)
        if do_cfg:
            prompt_embeds = torch.cat([place.tensor(job.negative.prompt_embeds), prompt_embeds])
        return DenoiserConditioning(prompt_embeds)

    def zero_conditioning(self, info: ModelInfo, network) -> tuple[Any, Any | None]:
        """(prompt_embeds, pooled or None) of zeros that fit `network`: what a warm-up runs on."""
        raise NotImplementedError

    # ---- ControlNet units ----
    def guide_samples(self, guidance_scale: float) -> int:
        """Rows of guide latents a unit takes at this guidance scale (DecoderService.EncodeImage `samples`)."""
        return 1

    def controlnet_violation(self, net_config: dict, network_config: dict) -> str | None:
        """Why a ControlNet (its config, defaults filled in) cannot control this family's network, or None."""
        return None

    def control_unit_violations(self, unit, network_config: dict, height: int, width: int, do_cfg: bool) -> list:
        """Violations of one unit's guide (the image, or latents of the right shape) for this family."""
        if unit.guide_latents is not None:
            return [(f"{unit.field}.guide_latents", f"{self.name} ControlNets take guide_image, not latents")]
        if not unit.guide_image:
            return [(f"{unit.field}.guide_image", "a guide image is required")]
        return []

    def prepare_control(self, units, nets, do_cfg: bool, height: int, width: int, place) -> list:
        """Each unit's ControlNet input, as the family's ControlNet pipeline prepares its control images
        (denoiser/controlnet.PreparedUnit)."""
        raise NotImplementedError

    # ---- prompts the family encodes itself (chunked_clip_prompts False) ----
    def encode_prompt(self, parts, prompt: str, clip_skip: int, max_sequence_length: int):
        """(prompt_embeds [1, tokens, dim], pooled [1, dim], notes) for one prompt, as the pipeline's encode_prompt."""
        raise NotImplementedError

    @staticmethod
    def guided(state, noise_pred):
        """Classifier-free guidance over a [negative, positive] batch, as diffusers computes it:
        uncond + s * (cond - uncond); the prediction as is without CFG."""
        if not state.do_cfg:
            return noise_pred
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        return noise_pred_uncond + state.job.guidance_scale * (noise_pred_text - noise_pred_uncond)

    @staticmethod
    def pooled_violations(name: str, conditioning, family_label: str) -> list:
        """A required pooled embedding [1, dim] (SDXL, SD3, FLUX)."""
        pooled = conditioning.pooled_prompt_embeds
        if pooled is None or pooled.ndim != 2 or pooled.shape[0] != 1:
            return [(f"{name}.pooled_prompt_embeds", f"required [1, dim] for {family_label} model")]
        return []

    @staticmethod
    def pooled_mismatch(job) -> list:
        """The negative pooled embedding must match the positive's shape (one CFG batch)."""
        if job.negative.pooled_prompt_embeds.shape != job.positive.pooled_prompt_embeds.shape:
            return [("negative.pooled_prompt_embeds", "must have the same shape as positive.pooled_prompt_embeds")]
        return []

    # ---- LoRA ----
    def lora_loader(self):
        """The diffusers loader mixin whose lora_state_dict / load_lora_into_* read this family's LoRA files."""
        import diffusers.loaders

        return getattr(diffusers.loaders, self.lora_loader_name)

    def read_lora(self, path) -> tuple[dict, dict | None, dict | None]:
        """(state_dict, network_alphas, metadata) of a LoRA file, normalised by the family's diffusers loader
        (kohya, diffusers and peft layouts alike)."""
        return self.lora_loader().lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)

    def inject_lora(self, component: str, module, state_dict: dict, alphas, name: str, metadata) -> None:
        """Injects a LoRA's weights for `component` into `module` as adapter `name`, as load_lora_weights does."""
        loader = self.lora_loader()
        if component == self.denoiser_folder:
            self.inject_network_lora(loader, module, dict(state_dict), alphas, name, metadata)
        else:
            loader.load_lora_into_text_encoder(
                dict(state_dict), alphas, module, prefix=component, adapter_name=name, metadata=metadata
            )

    def inject_network_lora(self, loader, network, state_dict: dict, alphas, name: str, metadata) -> None:
        """The denoising network's half of a LoRA (load_lora_into_unet / load_lora_into_transformer)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}>"
