"""The denoiser's engine: loads denoising networks on demand, checks jobs against what a model's files show, and
runs each job's window of sampling (denoiser/state.py builds a job's state, denoiser/step.py steps it).

Never imports grpc and never loads a text encoder or a VAE.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator

import diffusers
import torch

from triptych.denoiser.job import Conditioning, DenoiseJob, DenoiseOutcome, StepDone
from triptych.denoiser.state import output_size, prepare_state
from triptych.denoiser.step import Stepper
from triptych.model_store import ModelInfo, ModelStore
from triptych.rules.control_units import ControlUnit, family_violations
from triptych.rules.scheduler_table import parse_scheduler
from triptych.runtime.admission import BoundedQueue
from triptych.runtime.components import ComponentCache, LoadedModel
from triptych.runtime.compute import ComputeThreads
from triptych.runtime.generators import generator_state
from triptych.runtime.lora import LoraAdapters
from triptych.runtime.placement import CPU_FLOAT32, Placement, compile_in_place
from triptych.runtime.work_meter import WorkMeter
from triptych.serving.errors import Cancelled, InvalidArgument, ModelLoadFailed

__all__ = ["Conditioning", "DenoiseJob", "DenoiseOutcome", "DenoiserEngine", "StepDone"]


class DenoiserEngine:
    """Loads UNets on demand and runs sampling jobs."""

    def __init__(
        self,
        store: ModelStore,
        cache: ComponentCache,
        loras: LoraAdapters,
        queue_per_model: int = 16,
        compute: ComputeThreads | None = None,
        placement: Placement = CPU_FLOAT32,
        compile_mode: str | None = None,
        controlnets: ComponentCache | None = None,
    ):
        self.store = store
        self.placement = placement
        self.compile_mode = compile_mode  # None = eager; else a torch.compile mode for every UNet and ControlNet
        self.cache = cache
        # ControlNets have an LRU of their own: a request's units never evict its own UNet (or each other).
        self.controlnets = controlnets or ComponentCache(4)
        self.loras = loras
        self.compute = compute or ComputeThreads("denoiser")
        self.queue = BoundedQueue(queue_per_model, "denoise")
        self.counters = Counter()  # steps, cancelled: reported through RuntimeService
        self.meter = WorkMeter()  # busy seconds and steps per model, for the metrics

    def resolve(self, model_id: str, field: str = "model") -> ModelInfo:
        """The model's store entry, without loading it: NOT_FOUND / INVALID_ARGUMENT before any queueing."""
        info = self.store.resolve(model_id, field)
        if not info.is_text_to_image:
            raise InvalidArgument.one(field, f"{model_id!r} is not a text-to-image model ({info.what})")
        return info

    def warm_up(self, model_id: str) -> bool:
        """Loads a model's UNet and runs one 2-step CFG job at its default size on zero conditioning, as a
        request would (so a compiled UNet is compiled for that shape). False for an id that is no pipeline."""
        info = self.store.resolve(model_id, "model")
        if not info.is_text_to_image:
            return False
        network = self.compute.run(model_id, lambda: self._parts(info)[info.family.denoiser_folder])
        zero = Conditioning(*info.family.zero_conditioning(info, network))
        job = DenoiseJob(model_id, zero, zero, None, None, steps=2, guidance_scale=7.0, scheduler="", seed=0)
        for _ in self.denoise(job):
            pass
        return True

    def _parts(self, info: ModelInfo) -> LoadedModel:
        """The resolved model's denoising network (loaded once, then cached) and scheduler config."""

        def load() -> LoadedModel:
            network = self.placement.module(info.family.load_network(info))
            if self.compile_mode is not None:
                compile_in_place(network, self.compile_mode)
            config = json.loads((info.path / "scheduler" / "scheduler_config.json").read_text())
            return LoadedModel({info.family.denoiser_folder: network}, {"scheduler": config})

        return self.cache.get(info.model_id, load)

    def denoise(
        self, job: DenoiseJob, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[StepDone | DenoiseOutcome]:
        """Yields a StepDone after each step, then one DenoiseOutcome. Stops with CANCELLED when
        is_active() turns false (checked before every step)."""
        info = self.resolve(job.model)
        self.check(info, job)  # what the model's files show is wrong is refused before the request queues
        # Admission first, in the caller's thread (refused at once when full); then the model's compute thread,
        # where requests for one model run one at a time (LoRA state lives in the shared UNet).
        with self.queue.slot(job.model):
            admitted = time.perf_counter()
            yield from self.compute.stream(job.model, lambda: self._run(job, info, is_active, admitted), is_active)

    def _run(
        self, job: DenoiseJob, info: ModelInfo, is_active: Callable[[], bool], admitted: float
    ) -> Iterator[StepDone | DenoiseOutcome]:
        queued = time.perf_counter() - admitted
        if not is_active():  # cancelled while it waited for the compute thread
            raise Cancelled("the caller went away before the job started")
        parts = self._parts(info)
        with parts.lock, self.meter.busy(job.model):
            folder = info.family.denoiser_folder
            if info.family.supports_loras:  # also with no LoRAs: switches off the last request's
                self.loras.activate(info.family, {folder: parts[folder]}, job.loras)
            for event in self._sample(info, parts, job, is_active):
                if isinstance(event, DenoiseOutcome):
                    event.queued_seconds = queued
                yield event

    def _sample(self, info: ModelInfo, parts: LoadedModel, job: DenoiseJob, is_active: Callable[[], bool]):
        family = info.family
        network = parts[family.denoiser_folder]
        place = self.placement
        height, width = output_size(network.config, job, family)
        nets = self._control_nets(job, family)
        do_cfg = family.uses_cfg(network.config, job.guidance_scale)
        control = family.prepare_control(job.control_units, nets, do_cfg, height, width, place)
        state = prepare_state(info, network, parts.configs["scheduler"], job, place, control, height, width)
        # CUDA graphs reuse their output memory from one step to the next: the stepper marks each step's start and
        # copies the UNet's output before a scheduler keeps it.
        stepper = Stepper(network, self.compile_mode == "reduce-overhead", lambda: self._count_step(job.model))
        yield from stepper.run(state, is_active)
        yield DenoiseOutcome(
            latents=state.wire_latents().to(device="cpu", dtype=torch.float32),  # the wire's latents are float32
            seed=state.seed,
            generator_state=generator_state(state.generator),
            scheduler_class=type(state.scheduler).__name__,
            scheduler_options=state.scheduler_options,
            model_calls=len(state.timesteps),
        )

    def _count_step(self, model: str) -> None:
        self.counters["denoise_steps"] += 1
        self.meter.step(model)

    def _control_nets(self, job: DenoiseJob, family) -> list:
        """Loads each unit's ControlNet (cached, in an LRU apart from the UNets'); check() has seen that it fits."""
        nets = []
        net_class = getattr(diffusers, family.controlnet_class_name)
        for unit in job.control_units:
            info = self._control_net_info(unit)

            def load(path=info.path) -> LoadedModel:
                net = self.placement.module(net_class.from_pretrained(path, use_safetensors=True).eval())
                if self.compile_mode is not None:
                    compile_in_place(net, self.compile_mode)
                return LoadedModel({"controlnet": net})

            nets.append(self.controlnets.get(unit.model, load)["controlnet"])
        return nets

    def _control_net_info(self, unit: ControlUnit) -> ModelInfo:
        field = f"{unit.field}.model"
        info = self.store.resolve(unit.model, field)
        if info.kind != "controlnet":
            raise InvalidArgument.one(field, f"{unit.model!r} is not a ControlNet folder ({info.kind})")
        return info

    def _control_unit_violations(self, family, config: dict, job: DenoiseJob, height: int, width: int) -> list:
        """Each unit's ControlNet id, class and config against the base model's family and network config, and its
        guide (image or latents) against what the family takes; nothing loaded."""
        violations = []
        do_cfg = family.uses_cfg(config, job.guidance_scale)
        for unit in job.control_units:
            field = f"{unit.field}.model"
            try:
                info = self._control_net_info(unit)
            except InvalidArgument as exc:
                violations.extend(exc.violations)
                continue
            if info.index.get("_class_name") != family.controlnet_class_name:
                violations.append((field, f"{unit.model!r} was not built for this base model's family"))
            else:
                net_class = getattr(diffusers, family.controlnet_class_name)
                why = family.controlnet_violation(net_class.extract_init_dict(info.index)[0], config)
                if why is not None:
                    violations.append((field, f"{unit.model!r} {why}"))
            violations += family.control_unit_violations(unit, config, height, width, do_cfg)
        return violations

    def check(self, info: ModelInfo, job: DenoiseJob) -> None:
        """Everything about a request that the model's files show without loading it: the conditioning's shapes
        against the UNet's config, a window's latents, each ControlNet's id. Runs before the request queues, so
        a malformed one is refused at once instead of after the jobs ahead of it."""
        family = info.family
        try:
            config = family.network_config(info)
        except (OSError, ValueError) as exc:  # a damaged config.json: the store needs fixing, not the request
            raise ModelLoadFailed(info.model_id, exc) from exc
        height, width = output_size(config, job, family)
        do_cfg = family.uses_cfg(config, job.guidance_scale)
        expected = family.text_width(config)
        violations = self._family_violations(family, job, height, width)
        pairs = [("positive", job.positive)] + ([("negative", job.negative)] if do_cfg else [])
        for name, cond in pairs:
            if cond is None:
                violations.append((name, "required when guidance_scale > 1"))
                continue
            embeds = cond.prompt_embeds
            if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[-1] != expected:
                violations.append(
                    (
                        f"{name}.prompt_embeds",
                        f"expected [1, tokens, {expected}] for {job.model!r}, got {list(embeds.shape)}",
                    )
                )
            violations += family.check_prompt_conditioning(name, cond)
        if do_cfg and not violations:
            if job.negative.prompt_embeds.shape != job.positive.prompt_embeds.shape:
                violations.append(("negative.prompt_embeds", "must have the same shape as positive.prompt_embeds"))
            violations += family.check_negative_matches(job)
        if not violations:
            violations += family.check_added_inputs(info, config, job, height, width)
        if job.start_fraction > 0:
            shape = list(family.latent_shape(config["in_channels"], height, width))
            if job.latents is None:
                violations.append(("latents", "a window with start_fraction > 0 needs the previous latents"))
            elif list(job.latents.shape) != shape:
                violations.append(("latents", f"expected shape {shape}, got {list(job.latents.shape)}"))
        if job.control_units and family.supports_controlnet:
            violations += self._control_unit_violations(family, config, job, height, width)
        if violations:
            raise InvalidArgument(violations)

    @staticmethod
    def _family_violations(family, job: DenoiseJob, height: int, width: int) -> list[tuple[str, str]]:
        """What the model's family cannot do with this job: its scheduler table, sizes, windows, units, LoRAs."""
        violations = []
        try:
            parse_scheduler(job.scheduler, table=family.scheduler_table, family=family.name)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
        for name, side in (("height", height), ("width", width)):
            if side % family.size_multiple:
                violations.append((name, f"must be a multiple of {family.size_multiple} for {family.name} models"))
        if (job.start_fraction > 0 or job.end_fraction < 1) and not family.supports_windows:
            violations.append(("window", f"{family.name} models run the whole schedule (no refiner hand-off)"))
        violations += family_violations(job.control_units, family)
        if job.loras and not family.supports_loras:
            violations.append(("loras", f"LoRAs are not supported on {family.name} models yet"))
        return violations
