"""A request's denoising as data: `DenoiseState` holds everything one window of sampling carries from step to step
(latents, its own scheduler instance, generator, the window's timesteps and position, conditioning, control units),
and `prepare_state` builds it as the diffusers pipelines prepare their loops.

Mirrors the preparation in diffusers' StableDiffusionPipeline, StableDiffusionXLPipeline (denoising_end) and
StableDiffusionXLImg2ImgPipeline (denoising_start): set_timesteps, get_timesteps, prepare_latents,
get_guidance_scale_embedding, prepare_extra_step_kwargs.
"""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from triptych.denoiser.controlnet import PreparedUnit
from triptych.denoiser.job import DenoiseJob
from triptych.denoiser.schedulers import build_scheduler
from triptych.families import Family
from triptych.families.base import DenoiserConditioning
from triptych.model_store import ModelInfo
from triptych.runtime.placement import Placement
from triptych.serving.errors import InvalidArgument


@dataclass
class DenoiseState:
    """One request's sampling over a window of its schedule; `step.denoise_step` advances it by one model call."""

    job: DenoiseJob
    family: Family
    latents: torch.Tensor
    scheduler: object
    generator: torch.Generator
    seed: int
    timesteps: torch.Tensor  # the window's part of scheduler.timesteps
    first_call: int  # index of the window's first model call in the whole schedule
    schedule_length: int  # model calls in the whole schedule (ControlNet windows are fractions of it)
    do_cfg: bool
    conditioning: DenoiserConditioning
    timestep_cond: torch.Tensor | None = None  # a guidance-distilled (LCM) UNet's guidance embedding
    control: list[PreparedUnit] = field(default_factory=list)
    extra_step_kwargs: dict = field(default_factory=dict)
    index: int = 0  # model calls of the window done so far

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)


def output_size(config, job: DenoiseJob, family: Family) -> tuple[int, int]:
    """(height, width): the request's, else the model's default size, as diffusers."""
    default_size = config["sample_size"] * family.latent_scale
    return job.height or default_size, job.width or default_size


def uses_cfg(config, job: DenoiseJob) -> bool:
    """Classifier-free guidance runs above scale 1, except on a guidance-distilled (LCM) UNet."""
    return job.guidance_scale > 1 and config["time_cond_proj_dim"] is None


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """diffusers' get_guidance_scale_embedding (the pipelines' `timestep_cond` for a UNet with time_cond_proj_dim):
    sinusoidal features of 1000 w, [len(w), embedding_dim], float32."""
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float32) * -emb)
    emb = w.to(torch.float32)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def window_timesteps(scheduler, start_fraction: float, end_fraction: float) -> tuple[torch.Tensor, int]:
    """The part of scheduler.timesteps a window runs, by timestep value as diffusers cuts it, and the index of its
    first model call in the whole schedule."""
    timesteps = scheduler.timesteps
    t_start = 0
    train = scheduler.config.num_train_timesteps
    if start_fraction > 0:  # StableDiffusionXLImg2ImgPipeline.get_timesteps(denoising_start=...)
        cutoff = int(round(train - start_fraction * train))
        count = int((timesteps < cutoff).sum().item())
        if scheduler.order == 2 and count % 2 == 0:
            count += 1
        t_start = len(timesteps) - count
        timesteps = timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
    if end_fraction < 1:  # StableDiffusionXLPipeline: "Apply denoising_end"
        cutoff = int(round(train - end_fraction * train))
        timesteps = timesteps[: len([t for t in timesteps if t >= cutoff])]
    return timesteps, t_start


def _generator(job: DenoiseJob) -> tuple[torch.Generator, int]:
    """The CPU generator (diffusers' randn_tensor with a CPU generator) and the seed to report: a continued
    generator state without a seed draws from that state alone, and there is no seed to report."""
    random_seed = 0 if job.generator_state else secrets.randbits(64)
    seed = job.seed if job.seed is not None else random_seed
    generator = torch.Generator("cpu").manual_seed(seed)
    if job.generator_state:
        try:
            generator.set_state(torch.frombuffer(bytearray(job.generator_state), dtype=torch.uint8))
        except RuntimeError as exc:
            raise InvalidArgument.one("generator_state", f"not a CPU generator state ({exc})") from exc
    return generator, seed


def prepare_state(
    info: ModelInfo,
    network,
    scheduler_config: dict,
    job: DenoiseJob,
    place: Placement,
    control: list[PreparedUnit],
    height: int,
    width: int,
) -> DenoiseState:
    """Everything the loop needs before its first step, in the order the diffusers pipelines prepare it."""
    family = info.family
    scheduler = build_scheduler(job.scheduler, scheduler_config)
    do_cfg = uses_cfg(network.config, job)
    generator, seed = _generator(job)
    try:
        scheduler.set_timesteps(job.steps, device=place.device)
        schedule_length = len(scheduler.timesteps)
        timesteps, first_call = window_timesteps(scheduler, job.start_fraction, job.end_fraction)
    except ValueError as exc:  # e.g. PNDM with PRK steps needs >= 4, LCM <= its original_inference_steps
        raise InvalidArgument.one("steps", f"{type(scheduler).__name__} cannot run {job.steps} steps ({exc})") from exc
    if job.start_fraction > 0:  # the engine's check() saw latents of this shape
        latents = place.tensor(job.latents).clone()
    else:
        # Noise from the CPU generator in the network's dtype, then moved: the same numbers on every device, as
        # diffusers' randn_tensor gives them for a CPU generator.
        shape = family.latent_shape(network.config.in_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=place.device, dtype=place.dtype)
        latents = latents * scheduler.init_noise_sigma
    conditioning = family.denoiser_conditioning(info, job, do_cfg, height, width, place)
    timestep_cond = None  # a guidance-distilled (LCM) UNet takes the guidance scale as an embedding, not CFG
    if network.config.time_cond_proj_dim is not None:
        guidance = torch.tensor(job.guidance_scale - 1).repeat(1)
        timestep_cond = guidance_scale_embedding(guidance, network.config.time_cond_proj_dim).to(
            device=place.device, dtype=latents.dtype
        )
    step_params = set(inspect.signature(scheduler.step).parameters)
    extra_step_kwargs = {}
    if "eta" in step_params:
        extra_step_kwargs["eta"] = 0.0
    if "generator" in step_params:
        extra_step_kwargs["generator"] = generator
    return DenoiseState(
        job=job,
        family=family,
        latents=latents,
        scheduler=scheduler,
        generator=generator,
        seed=seed,
        timesteps=timesteps,
        first_call=first_call,
        schedule_length=schedule_length,
        do_cfg=do_cfg,
        conditioning=conditioning,
        timestep_cond=timestep_cond,
        control=control,
        extra_step_kwargs=extra_step_kwargs,
    )
