"""A request's denoising as data: `DenoiseState` holds everything one window of sampling carries from step to step
(latents, its own scheduler instance, generator, the window's timesteps and position, conditioning, control units),
and `prepare_state` builds it as the diffusers pipelines prepare their loops.

Mirrors the preparation in diffusers' StableDiffusionPipeline, StableDiffusionXLPipeline (denoising_end) and
StableDiffusionXLImg2ImgPipeline (denoising_start): set_timesteps, get_timesteps, prepare_latents,
prepare_extra_step_kwargs; the family does the rest (families/).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from triptych.denoiser.controlnet import PreparedUnit
from triptych.denoiser.job import DenoiseJob
from triptych.denoiser.schedulers import build_scheduler, describe_options
from triptych.families import Family
from triptych.families.base import DenoiserConditioning
from triptych.model_store import ModelInfo
from triptych.rules.scheduler_table import parse_scheduler
from triptych.runtime.generators import cpu_generator
from triptych.runtime.placement import Placement
from triptych.serving.errors import InvalidArgument


@dataclass
class DenoiseState:
    """One request's sampling over a window of its schedule; `step.denoise_step` advances it by one model call."""

    job: DenoiseJob
    family: Family
    height: int
    width: int
    latents: torch.Tensor  # as the network takes them (FLUX: packed)
    scheduler: object
    scheduler_options: list[str]  # the options the request's scheduler name set, as the response reports them
    generator: torch.Generator
    seed: int
    timesteps: torch.Tensor  # the window's part of scheduler.timesteps
    first_call: int  # index of the window's first model call in the whole schedule
    schedule_length: int  # model calls in the whole schedule (ControlNet windows are fractions of it)
    do_cfg: bool
    conditioning: DenoiserConditioning
    control: list[PreparedUnit] = field(default_factory=list)
    extra_step_kwargs: dict = field(default_factory=dict)
    index: int = 0  # model calls of the window done so far

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    def wire_latents(self) -> torch.Tensor:
        """The latents as the denoiser returns them (unpacked), on the device they are on."""
        return self.family.wire_latents(self.latents, self.height, self.width)


def output_size(config, job: DenoiseJob, family: Family) -> tuple[int, int]:
    """(height, width): the request's, else the model's default size, as diffusers."""
    default_size = family.default_size(config)
    return job.height or default_size, job.width or default_size


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
    """The CPU generator (diffusers' randn_tensor with a CPU generator) and the seed to report."""
    return cpu_generator(job.seed, job.generator_state)


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
    choice = parse_scheduler(job.scheduler, table=family.scheduler_table)
    scheduler = build_scheduler(choice, scheduler_config)
    do_cfg = family.uses_cfg(network.config, job.guidance_scale)
    generator, seed = _generator(job)
    shape = family.latent_shape(network.config.in_channels, height, width)
    try:
        family.set_timesteps(scheduler, job.steps, shape, network.config, place.device)
        schedule_length = len(scheduler.timesteps)
        timesteps, first_call = window_timesteps(scheduler, job.start_fraction, job.end_fraction)
    except ValueError as exc:  # e.g. PNDM with PRK steps needs >= 4, LCM <= its original_inference_steps
        raise InvalidArgument.one("steps", f"{type(scheduler).__name__} cannot run {job.steps} steps ({exc})") from exc
    if job.start_fraction > 0:  # the engine's check() saw latents of this shape
        latents = place.tensor(job.latents).clone()
    else:
        latents = family.initial_latents(shape, generator, place, scheduler)
    conditioning = family.denoiser_conditioning(info, network, job, do_cfg, height, width, place)
    step_params = set(inspect.signature(scheduler.step).parameters)
    extra_step_kwargs = {}
    if "eta" in step_params:
        extra_step_kwargs["eta"] = 0.0
    if "generator" in step_params:
        extra_step_kwargs["generator"] = generator
    return DenoiseState(
        job=job,
        family=family,
        height=height,
        width=width,
        latents=latents,
        scheduler=scheduler,
        scheduler_options=describe_options(choice),
        generator=generator,
        seed=seed,
        timesteps=timesteps,
        first_call=first_call,
        schedule_length=schedule_length,
        do_cfg=do_cfg,
        conditioning=conditioning,
        control=control,
        extra_step_kwargs=extra_step_kwargs,
    )
