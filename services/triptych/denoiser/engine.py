"""The sampling loop for SD1.x/2.x and SDXL (base and refiner), over a window of the schedule.

Mirrors the denoising loops of diffusers' StableDiffusionPipeline, StableDiffusionXLPipeline (denoising_end)
and StableDiffusionXLImg2ImgPipeline (denoising_start); equality is proven in tests/e2e. Never imports grpc
and never loads a text encoder or a VAE.
"""

from __future__ import annotations

import inspect
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from triptych.denoiser.controlnet import ControlUnit, check_family, prepare_units, residuals
from triptych.denoiser.preview import preview_png
from triptych.denoiser.schedulers import build_scheduler, describe_options
from triptych.model_store import ModelInfo, ModelStore
from triptych.rules.scheduler_table import SchedulerChoice
from triptych.runtime.admission import BoundedQueue
from triptych.runtime.components import ComponentCache
from triptych.runtime.compute import ComputeThreads
from triptych.runtime.lora import LoraAdapters
from triptych.runtime.placement import CPU_FLOAT32, Placement, compile_in_place
from triptych.serving.errors import Cancelled, InvalidArgument

VAE_SCALE = 8  # every supported family's VAE downsamples by 8


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None


@dataclass
class DenoiseJob:
    """One sampling job, already parsed and range-checked."""

    model: str
    positive: Conditioning
    negative: Conditioning | None
    width: int | None
    height: int | None
    steps: int
    guidance_scale: float
    scheduler: SchedulerChoice
    seed: int | None
    start_fraction: float = 0.0
    end_fraction: float = 1.0
    latents: torch.Tensor | None = None
    generator_state: bytes = b""
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    loras: tuple[tuple[str, float], ...] = ()
    control_units: tuple[ControlUnit, ...] = ()
    preview_interval_steps: int = 0
    progress_interval_s: float = 0.0


@dataclass
class StepDone:
    step: int
    total_steps: int
    elapsed_seconds: float
    preview_png: bytes = b""


@dataclass
class DenoiseOutcome:
    latents: torch.Tensor
    seed: int
    generator_state: bytes
    scheduler_class: str
    scheduler_options: list[str]
    model_calls: int
    queued_seconds: float = 0.0  # from the call's admission until the model's compute thread took it up


def sdxl_time_ids(
    info: ModelInfo, height: int, width: int, aesthetic_score: float, negative_aesthetic_score: float
) -> tuple[list[float], list[float]]:
    """SDXL's added time ids (positive, negative) as StableDiffusionXL(Img2Img)Pipeline._get_add_time_ids builds
    them: original = target = (h, w), crop (0, 0); a refiner takes its aesthetic scores instead of the target."""
    if info.flag("requires_aesthetics_score", False):
        return [height, width, 0, 0, aesthetic_score], [height, width, 0, 0, negative_aesthetic_score]
    time_ids = [height, width, 0, 0, height, width]
    return time_ids, time_ids


def unet_config(info: ModelInfo) -> dict:
    """A pipeline's UNet arguments from its config.json, defaults filled in as diffusers fills them, unloaded."""
    config = UNet2DConditionModel.load_config(info.path / "unet")
    return UNet2DConditionModel.extract_init_dict(config)[0]


def output_size(config, job: DenoiseJob) -> tuple[int, int]:
    """(height, width): the request's, else the model's default size, as diffusers."""
    default_size = config["sample_size"] * VAE_SCALE
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

    def resolve(self, model_id: str, field: str = "model") -> ModelInfo:
        """The model's store entry, without loading it: NOT_FOUND / INVALID_ARGUMENT before any queueing."""
        info = self.store.resolve(model_id, field)
        if not info.is_text_to_image:
            raise InvalidArgument.one(field, f"{model_id!r} is not a text-to-image model folder ({info.kind})")
        return info

    def warm_up(self, model_id: str) -> bool:
        """Loads a model's UNet and runs one 2-step CFG job at its default size on zero conditioning, as a
        request would (so a compiled UNet is compiled for that shape). False for an id that is no pipeline."""
        info = self.store.resolve(model_id, "model")
        if not info.is_text_to_image:
            return False
        unet = self.compute.run(model_id, lambda: self._parts(info)["unet"])
        pooled = None
        if info.family == "sdxl":
            time_ids = len(sdxl_time_ids(info, 0, 0, 0.0, 0.0)[0])
            features = unet.add_embedding.linear_1.in_features - unet.config.addition_time_embed_dim * time_ids
            pooled = torch.zeros(1, features)
        zero = Conditioning(torch.zeros(1, 77, unet.config.cross_attention_dim), pooled)
        job = DenoiseJob(
            model_id, zero, zero, None, None, steps=2, guidance_scale=7.0, scheduler=SchedulerChoice(None), seed=0
        )
        for _ in self.denoise(job):
            pass
        return True

    def _parts(self, info: ModelInfo) -> dict:
        """The resolved model's UNet (loaded once, then cached) and scheduler config."""

        def load() -> dict:
            unet = UNet2DConditionModel.from_pretrained(info.path / "unet", use_safetensors=True).eval()
            unet = self.placement.module(unet)
            if self.compile_mode is not None:
                compile_in_place(unet, self.compile_mode)
            config = json.loads((info.path / "scheduler" / "scheduler_config.json").read_text())
            return {"unet": unet, "scheduler_config": config}

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
        with parts["_lock"]:
            self.loras.activate(info.family, {"unet": parts["unet"]}, job.loras)
            for event in self._sample(info, parts, job, is_active):
                if isinstance(event, DenoiseOutcome):
                    event.queued_seconds = queued
                yield event

    def _sample(self, info: ModelInfo, parts: dict, job: DenoiseJob, is_active: Callable[[], bool]):
        unet: UNet2DConditionModel = parts["unet"]
        place = self.placement
        scheduler = build_scheduler(job.scheduler, parts["scheduler_config"])
        height, width = output_size(unet.config, job)
        do_cfg = uses_cfg(unet.config, job)

        # A continued generator state without a seed draws from that state alone: there is no seed to report.
        random_seed = 0 if job.generator_state else secrets.randbits(64)
        seed = job.seed if job.seed is not None else random_seed
        generator = torch.Generator("cpu").manual_seed(seed)
        if job.generator_state:
            try:
                generator.set_state(torch.frombuffer(bytearray(job.generator_state), dtype=torch.uint8))
            except RuntimeError as exc:
                raise InvalidArgument.one("generator_state", f"not a CPU generator state ({exc})") from exc

        try:
            scheduler.set_timesteps(job.steps, device=place.device)
            schedule_length = len(scheduler.timesteps)
            timesteps, first_call = window_timesteps(scheduler, job.start_fraction, job.end_fraction)
        except ValueError as exc:  # e.g. PNDM with PRK steps needs >= 4, LCM <= its original_inference_steps
            raise InvalidArgument.one(
                "steps", f"{type(scheduler).__name__} cannot run {job.steps} steps ({exc})"
            ) from exc
        shape = (1, unet.config.in_channels, height // VAE_SCALE, width // VAE_SCALE)
        if job.start_fraction > 0:  # check() saw latents of this shape
            latents = place.tensor(job.latents).clone()
        else:
            # Noise from the CPU generator in the UNet's dtype, then moved: the same numbers on every device, as
            # diffusers' randn_tensor gives them for a CPU generator.
            latents = randn_tensor(shape, generator=generator, device=place.device, dtype=place.dtype)
            latents = latents * scheduler.init_noise_sigma

        prompt_embeds, added_cond_kwargs = self._unet_conditioning(info, unet, job, do_cfg, height, width, place)
        nets = self._control_nets(job, unet)
        control = prepare_units(list(job.control_units), nets, width, height, do_cfg, place.device, place.dtype)
        timestep_cond = None  # a guidance-distilled (LCM) UNet takes the guidance scale as an embedding, not CFG
        if unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(job.guidance_scale - 1).repeat(1)
            timestep_cond = guidance_scale_embedding(guidance, unet.config.time_cond_proj_dim).to(
                device=place.device, dtype=latents.dtype
            )
        step_params = set(inspect.signature(scheduler.step).parameters)
        extra_step_kwargs = {}
        if "eta" in step_params:
            extra_step_kwargs["eta"] = 0.0
        if "generator" in step_params:
            extra_step_kwargs["generator"] = generator

        started = last_sent = time.perf_counter()
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                if not is_active():
                    raise Cancelled(f"cancelled before step {i + 1} of {len(timesteps)}")
                if self.compile_mode == "reduce-overhead":
                    # CUDA graphs reuse their output memory from one step to the next: a step (ControlNets, then
                    # the UNet) begins here, and the UNet's output is copied below before a scheduler keeps it.
                    torch.compiler.cudagraph_mark_step_begin()
                latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
                latent_model_input = scheduler.scale_model_input(latent_model_input, t)
                down, mid = None, None
                if control:
                    # A unit's window is a fraction of the whole schedule, not of this window: diffusers' SDXL
                    # ControlNet pipeline sets controlnet_keep before it applies denoising_end.
                    down, mid = residuals(
                        control,
                        first_call + i,
                        schedule_length,
                        t,
                        latents,
                        latent_model_input,
                        scheduler.scale_model_input,
                        prompt_embeds,
                        added_cond_kwargs,
                        do_cfg,
                    )
                noise_pred = unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=None,
                    added_cond_kwargs=added_cond_kwargs,
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                    return_dict=False,
                )[0]
                if self.compile_mode == "reduce-overhead":
                    noise_pred = noise_pred.clone()
                if do_cfg:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + job.guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                self.counters["denoise_steps"] += 1
                preview = b""
                if job.preview_interval_steps and (i + 1) % job.preview_interval_steps == 0:
                    preview = preview_png(latents, info.family)
                now = time.perf_counter()
                if preview or i + 1 == len(timesteps) or now - last_sent >= job.progress_interval_s:
                    last_sent = now
                    yield StepDone(i + 1, len(timesteps), now - started, preview)

        yield DenoiseOutcome(
            latents=latents.to(device="cpu", dtype=torch.float32),  # the wire's latents are float32
            seed=seed,
            generator_state=generator.get_state().numpy().tobytes(),
            scheduler_class=type(scheduler).__name__,
            scheduler_options=describe_options(job.scheduler),
            model_calls=len(timesteps),
        )

    def _control_nets(self, job: DenoiseJob, unet) -> list[ControlNetModel]:
        """Loads each unit's ControlNet (cached, in an LRU apart from the UNets') and checks it fits the base model."""
        nets = []
        for unit in job.control_units:
            field = f"{unit.field}.model"
            info = self._control_net_info(unit)

            def load(path=info.path) -> dict:
                net = self.placement.module(ControlNetModel.from_pretrained(path, use_safetensors=True).eval())
                if self.compile_mode is not None:
                    compile_in_place(net, self.compile_mode)
                return {"controlnet": net}

            net = self.controlnets.get(unit.model, load)["controlnet"]
            check_family(net, unet, field, unit.model)
            nets.append(net)
        return nets

    def _control_net_info(self, unit: ControlUnit) -> ModelInfo:
        field = f"{unit.field}.model"
        info = self.store.resolve(unit.model, field)
        if info.kind != "controlnet":
            raise InvalidArgument.one(field, f"{unit.model!r} is not a ControlNet folder ({info.kind})")
        return info

    def check(self, info: ModelInfo, job: DenoiseJob) -> None:
        """Everything about a request that the model's files show without loading it: the conditioning's shapes
        against the UNet's config, a window's latents, each ControlNet's id. Runs before the request queues, so
        a malformed one is refused at once instead of after the jobs ahead of it."""
        config = unet_config(info)
        height, width = output_size(config, job)
        do_cfg = uses_cfg(config, job)
        expected = config["cross_attention_dim"]
        violations = []
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
            if info.family == "sdxl":
                pooled = cond.pooled_prompt_embeds
                if pooled is None or pooled.ndim != 2 or pooled.shape[0] != 1:
                    violations.append((f"{name}.pooled_prompt_embeds", "required [1, dim] for an SDXL model"))
        if do_cfg and not violations:
            if job.negative.prompt_embeds.shape != job.positive.prompt_embeds.shape:
                violations.append(("negative.prompt_embeds", "must have the same shape as positive.prompt_embeds"))
            pooled = job.negative.pooled_prompt_embeds, job.positive.pooled_prompt_embeds
            if info.family == "sdxl" and pooled[0].shape != pooled[1].shape:
                violations.append(
                    ("negative.pooled_prompt_embeds", "must have the same shape as positive.pooled_prompt_embeds")
                )
        if info.family == "sdxl" and not violations:
            # The added embedding (diffusers' text_time): the time ids and the pooled text embeddings, concatenated.
            time_ids, _ = sdxl_time_ids(info, height, width, job.aesthetic_score, job.negative_aesthetic_score)
            added = config["projection_class_embeddings_input_dim"]
            passed = config["addition_time_embed_dim"] * len(time_ids) + job.positive.pooled_prompt_embeds.shape[-1]
            if added != passed:
                violations.append(
                    (
                        "positive.pooled_prompt_embeds",
                        f"{job.model!r} expects {added} added-embedding features, got {passed}",
                    )
                )
        if job.start_fraction > 0:
            shape = [1, config["in_channels"], height // VAE_SCALE, width // VAE_SCALE]
            if job.latents is None:
                violations.append(("latents", "a window with start_fraction > 0 needs the previous latents"))
            elif list(job.latents.shape) != shape:
                violations.append(("latents", f"expected shape {shape}, got {list(job.latents.shape)}"))
        for unit in job.control_units:
            try:
                self._control_net_info(unit)
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        if violations:
            raise InvalidArgument(violations)

    @staticmethod
    def _unet_conditioning(
        info: ModelInfo, unet, job: DenoiseJob, do_cfg: bool, height: int, width: int, place: Placement
    ):
        """prompt_embeds and added_cond_kwargs as the diffusers pipelines build them, CFG batch [neg, pos]."""
        positive, negative = job.positive, job.negative
        prompt_embeds = place.tensor(positive.prompt_embeds)
        if do_cfg:
            prompt_embeds = torch.cat([place.tensor(negative.prompt_embeds), prompt_embeds])
        if info.family != "sdxl":
            return prompt_embeds, None
        time_ids, negative_time_ids = sdxl_time_ids(
            info, height, width, job.aesthetic_score, job.negative_aesthetic_score
        )
        add_text_embeds = place.tensor(positive.pooled_prompt_embeds)
        add_time_ids = place.tensor(torch.tensor([time_ids], dtype=torch.float32))
        if do_cfg:
            add_text_embeds = torch.cat([place.tensor(negative.pooled_prompt_embeds), add_text_embeds])
            add_time_ids = torch.cat(
                [place.tensor(torch.tensor([negative_time_ids], dtype=torch.float32)), add_time_ids]
            )
        return prompt_embeds, {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
