"""One denoising step as a function of a `DenoiseState`, and the stepper that drives states to the end.

A step is: prepare the model input (CFG batch, scheduler scaling) -> ControlNet residuals, when units are set ->
the denoising network's call -> guidance -> the scheduler's step; the stepper then runs the after-step hook
(counting, previews, progress). It mirrors the body of the diffusers pipelines' denoising loops. The stepper runs
one state at a time; img2img strength, inpaint blending or step-level batching across requests are changes here,
not new loops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from triptych.denoiser.controlnet import residuals
from triptych.denoiser.job import StepDone
from triptych.denoiser.preview import preview_png
from triptych.denoiser.state import DenoiseState
from triptych.serving.errors import Cancelled


def model_input(state: DenoiseState, t: torch.Tensor) -> torch.Tensor:
    """The latents as the network takes them at timestep t: doubled for CFG, scaled by the scheduler."""
    latents = torch.cat([state.latents] * 2) if state.do_cfg else state.latents
    return state.scheduler.scale_model_input(latents, t)


def control_residuals(state: DenoiseState, t: torch.Tensor, latent_model_input: torch.Tensor):
    """The summed ControlNet residuals (down, mid) for this model call, (None, None) without units."""
    if not state.control:
        return None, None
    # A unit's window is a fraction of the whole schedule, not of this window: diffusers' SDXL ControlNet
    # pipeline sets controlnet_keep before it applies denoising_end.
    return residuals(
        state.control,
        state.first_call + state.index,
        state.schedule_length,
        t,
        state.latents,
        latent_model_input,
        state.scheduler.scale_model_input,
        state.conditioning.prompt_embeds,
        state.conditioning.added_cond_kwargs,
        state.do_cfg,
    )


def guided(state: DenoiseState, noise_pred: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance as diffusers computes it: uncond + s * (cond - uncond)."""
    if not state.do_cfg:
        return noise_pred
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    return noise_pred_uncond + state.job.guidance_scale * (noise_pred_text - noise_pred_uncond)


def denoise_step(state: DenoiseState, network, cuda_graphs: bool = False) -> None:
    """Advances `state` by one model call of its window. With cuda_graphs (torch.compile "reduce-overhead"),
    marks where a step begins and copies the network's output, whose memory the next replay reuses."""
    t = state.timesteps[state.index]
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    latent_model_input = model_input(state, t)
    down, mid = control_residuals(state, t, latent_model_input)
    noise_pred = network(
        latent_model_input,
        t,
        encoder_hidden_states=state.conditioning.prompt_embeds,
        timestep_cond=state.timestep_cond,
        cross_attention_kwargs=None,
        added_cond_kwargs=state.conditioning.added_cond_kwargs,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]
    if cuda_graphs:
        noise_pred = noise_pred.clone()
    noise_pred = guided(state, noise_pred)
    state.latents = state.scheduler.step(noise_pred, t, state.latents, **state.extra_step_kwargs, return_dict=False)[0]
    state.index += 1


class Stepper:
    """Drives denoise states to the end of their windows, one state at a time, and reports each step."""

    def __init__(self, network, cuda_graphs: bool = False, on_step: Callable[[], None] = lambda: None):
        self.network = network
        self.cuda_graphs = cuda_graphs
        self.on_step = on_step  # counts steps for RuntimeService

    def run(self, state: DenoiseState, is_active: Callable[[], bool]) -> Iterator[StepDone]:
        """Yields a StepDone after a step when a preview is due, the progress interval has passed, or the window
        ends. Stops with CANCELLED when is_active() turns false (checked before every step)."""
        job, total = state.job, len(state.timesteps)
        started = last_sent = time.perf_counter()
        with torch.no_grad():
            while not state.done:
                if not is_active():
                    raise Cancelled(f"cancelled before step {state.index + 1} of {total}")
                denoise_step(state, self.network, self.cuda_graphs)
                self.on_step()
                preview = b""
                if job.preview_interval_steps and state.index % job.preview_interval_steps == 0:
                    preview = preview_png(state.latents, state.family.preview)
                now = time.perf_counter()
                if preview or state.done or now - last_sent >= job.progress_interval_s:
                    last_sent = now
                    yield StepDone(state.index, total, now - started, preview)
