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

from triptych.denoiser.job import StepDone
from triptych.denoiser.preview import preview_png
from triptych.denoiser.state import DenoiseState
from triptych.serving.errors import Cancelled


def denoise_step(state: DenoiseState, network, cuda_graphs: bool = False) -> None:
    """Advances `state` by one model call of its window: the family's guided prediction (model input ->
    ControlNet residuals -> network -> guidance), then the scheduler's step. With cuda_graphs (torch.compile
    "reduce-overhead"), marks where a step begins and has the network's output copied, as the next replay reuses
    its memory."""
    t = state.timesteps[state.index]
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    noise_pred = state.family.predict(state, network, t, copy_output=cuda_graphs)
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
                    preview = preview_png(state.wire_latents(), state.family.preview)
                now = time.perf_counter()
                if preview or state.done or now - last_sent >= job.progress_interval_s:
                    last_sent = now
                    yield StepDone(state.index, total, now - started, preview)
