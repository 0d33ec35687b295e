"""DenoiserService: proto <-> DenoiseJob/DenoiseOutcome, nothing else."""

from __future__ import annotations

import dataclasses
import math

from triptych.denoiser.engine import Conditioning, DenoiseJob, DenoiseOutcome, DenoiserEngine
from triptych.denoiser.job import GuideLatents
from triptych.denoiser.schedulers import scheduler_rows
from triptych.families import ALL_SCHEDULERS
from triptych.model_store import ModelStore
from triptych.rules.control_units import parse_control_units
from triptych.rules.scheduler_table import TABLE, parse_scheduler
from triptych.rules.validation import (
    check_fraction,
    check_guidance,
    check_size,
    check_steps,
    check_work,
    weighted,
)
from triptych.runtime.codec import decode_tensor, encode_tensor
from triptych.runtime.components import ComponentCache
from triptych.runtime.compute import ComputeThreads
from triptych.runtime.lora import LoraAdapters, MergedLoras
from triptych.runtime.placement import Placement, compiled_graphs
from triptych.serving import shm, timing
from triptych.serving.errors import Cancelled, InvalidArgument
from triptych.serving.server import Service
from triptych.serving.settings import Settings
from triptych.v1 import common_pb2, denoiser_service_pb2, denoiser_service_pb2_grpc


def _float_tensor(message, field: str):
    """decode_tensor, refusing integer dtypes: embeddings and latents are float32 (float16/bfloat16 are upcast)."""
    tensor = decode_tensor(message, field)
    if not tensor.is_floating_point():
        raise InvalidArgument.one(f"{field}.dtype", "must be float32 (or float16/bfloat16)")
    return tensor


def _conditioning(
    message: common_pb2.TextConditioning, field: str, max_tokens: int, violations: list
) -> Conditioning | None:
    try:
        pooled = (
            _float_tensor(message.pooled_prompt_embeds, f"{field}.pooled_prompt_embeds")
            if message.HasField("pooled_prompt_embeds")
            else None
        )
        embeds = _float_tensor(message.prompt_embeds, f"{field}.prompt_embeds")
    except InvalidArgument as exc:
        violations.extend(exc.violations)
        return None
    # Bounded like the encoder's output (max_prompt_chunks chunks of 77): cross-attention cost grows with tokens.
    if embeds.ndim == 3 and embeds.shape[1] > max_tokens:
        violations.append((f"{field}.prompt_embeds", f"at most {max_tokens} tokens (got {embeds.shape[1]})"))
        return None
    return Conditioning(embeds, pooled)


def _guide_latents(unit, violations: list):
    """A unit whose guide_latents message (if any) is parsed into GuideLatents; None when it is bad."""
    message, field = unit.guide_latents, f"{unit.field}.guide_latents"
    if message is None:
        return unit
    bad = len(violations)
    if not (math.isfinite(message.scaling_factor) and message.scaling_factor > 0):
        violations.append((f"{field}.scaling_factor", f"must be a positive number (got {message.scaling_factor})"))
    shift = message.shift_factor if message.HasField("shift_factor") else None
    if shift is not None and not math.isfinite(shift):
        violations.append((f"{field}.shift_factor", f"must be finite (got {shift})"))
    try:
        latents = _float_tensor(message.latents, f"{field}.latents")
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    if len(violations) > bad:
        return None
    return dataclasses.replace(unit, guide_latents=GuideLatents(latents, message.scaling_factor, shift))


MAX_AESTHETIC_SCORE = 10.0  # the LAION aesthetic predictor's scale that SDXL refiners were trained on
TOKENS_PER_CHUNK = 77  # one CLIP chunk (75 tokens + begin and end), as the encoder returns them


class DenoiserServicer(denoiser_service_pb2_grpc.DenoiserServiceServicer):
    def __init__(self, engine: DenoiserEngine, settings: Settings):
        self.engine = engine
        self.limits = settings.limits

    def job_from_pb(self, request: denoiser_service_pb2.DenoiseRequest) -> DenoiseJob:
        """Parses and range-checks a request, reporting every bad field at once."""
        violations: list[tuple[str, str]] = []
        width = request.width if request.HasField("width") else None
        height = request.height if request.HasField("height") else None
        check_size(width, "width", self.limits.max_width, violations)
        check_size(height, "height", self.limits.max_height, violations)
        check_steps(request.steps, "steps", self.limits, violations)
        if not violations:  # the work budget (rules/validation.py), once width, height and steps are each in range
            check_work(width, height, request.steps, 1, "steps", self.limits, violations)
        check_guidance(request.guidance_scale, "guidance_scale", self.limits, violations)
        start = request.window.start_fraction if request.window.HasField("start_fraction") else 0.0
        end = request.window.end_fraction if request.window.HasField("end_fraction") else 1.0
        check_fraction(start, "window.start_fraction", violations)
        check_fraction(end, "window.end_fraction", violations)
        if start >= end:
            violations.append(("window", f"start_fraction {start} must be below end_fraction {end}"))
        loras = weighted(request.loras, "loras", self.limits.max_loras, (-10.0, 10.0), violations)
        control_units = parse_control_units(
            request.control_net, request.steps, self.limits, violations, latents_allowed=True
        )
        control_units = tuple(_guide_latents(unit, violations) for unit in control_units)
        max_tokens = TOKENS_PER_CHUNK * self.limits.max_prompt_chunks
        positive, negative = (
            _conditioning(getattr(request, name), name, max_tokens, violations) if request.HasField(name) else None
            for name in ("positive", "negative")
        )
        if positive is None and not any(f.startswith("positive") for f, _ in violations):
            violations.append(("positive", "text conditioning is required"))
        latents = None
        if request.HasField("latents"):
            try:
                latents = _float_tensor(request.latents, "latents")
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if request.HasField(name):
                check_fraction(getattr(request, name), name, violations, low=0.0, high=MAX_AESTHETIC_SCORE)
        try:  # any family's name here; the engine checks it against the model's family before the job queues
            parse_scheduler(request.scheduler, table=ALL_SCHEDULERS)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
        if violations:
            raise InvalidArgument(violations)
        return DenoiseJob(
            model=request.model,
            positive=positive,
            negative=negative,
            width=width,
            height=height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            scheduler=request.scheduler,
            seed=request.seed if request.HasField("seed") else None,
            start_fraction=start,
            end_fraction=end,
            latents=latents,
            generator_state=request.generator_state,
            aesthetic_score=request.aesthetic_score if request.HasField("aesthetic_score") else 6.0,
            negative_aesthetic_score=(
                request.negative_aesthetic_score if request.HasField("negative_aesthetic_score") else 2.5
            ),
            loras=loras,
            control_units=control_units,
            preview_interval_steps=request.preview_interval_steps,
            progress_interval_s=request.progress_interval_ms / 1000.0,
        )

    def Denoise(self, request, context):
        # A call that ends before its result was sent was cancelled (by the caller or its deadline): count it
        # when gRPC reports the end, since a dropped stream is never resumed to see is_active() turn false.
        state = {"answered": False}
        context.add_callback(lambda: state["answered"] or self.engine.counters.update(["denoise_cancelled"]))
        try:
            yield from self._events(request, context, state)
        except Cancelled:
            raise
        except Exception:
            state["answered"] = True  # an error answer, not a cancellation
            raise

    def _events(self, request, context, state: dict):
        job = self.job_from_pb(request)
        with shm.writer(request) as into:
            yield from self._run(job, context, state, into)

    def _run(self, job: DenoiseJob, context, state: dict, into: shm.Writer | None):
        for event in self.engine.denoise(job, is_active=context.is_active):
            if isinstance(event, DenoiseOutcome):
                state["answered"] = True
                # Before the handler's total, which the interceptor adds: how long the job waited for its model.
                timing.append(context, {"queue": event.queued_seconds})
                yield denoiser_service_pb2.DenoiseResponse(
                    result=denoiser_service_pb2.DenoiseResult(
                        latents=encode_tensor(event.latents, into),
                        seed=event.seed,
                        generator_state=event.generator_state,
                        scheduler_class=event.scheduler_class,
                        scheduler_options=event.scheduler_options,
                        model_calls=event.model_calls,
                    )
                )
            else:
                yield denoiser_service_pb2.DenoiseResponse(
                    progress=common_pb2.Progress(
                        stage="denoise",
                        step=event.step,
                        total_steps=event.total_steps,
                        elapsed_seconds=event.elapsed_seconds,
                        preview_png=event.preview_png,
                    )
                )

    def ListSchedulers(self, request, context):
        table = self.engine.resolve(request.model).family.scheduler_table if request.model else TABLE
        return denoiser_service_pb2.ListSchedulersResponse(
            schedulers=[
                denoiser_service_pb2.SchedulerInfo(
                    name=row.name, aliases=list(row.aliases), class_name=row.class_name, options=options
                )
                for row, options in scheduler_rows(table)
            ]
        )


def build(settings: Settings) -> Service:
    """The denoiser role for the server bootstrap."""
    cache = ComponentCache(settings.max_loaded_models)
    store = ModelStore(settings.model_root, settings.base_models)
    merged = settings.lora_mode == "merged" or (settings.lora_mode == "auto" and settings.compile)
    loras = (MergedLoras if merged else LoraAdapters)(store, settings.lora_cache_bytes)
    compute = ComputeThreads("denoiser", settings.max_loaded_models)
    placement = Placement.from_settings(settings)
    # As many ControlNets as a request may use (or as many as models, if more), so a request never evicts its own.
    controlnets = ComponentCache(max(settings.max_loaded_models, settings.limits.max_controlnets))
    engine = DenoiserEngine(
        store,
        cache,
        loras,
        settings.denoiser_queue_per_model,
        compute,
        placement,
        settings.active_compile_mode,
        controlnets,
    )
    servicer = DenoiserServicer(engine, settings)
    return Service(
        "denoiser",
        ["triptych.v1.DenoiserService"],
        lambda server: denoiser_service_pb2_grpc.add_DenoiserServiceServicer_to_server(servicer, server),
        lambda: [*cache.loaded(), *controlnets.loaded()],
        lambda: {
            "lora_disk_reads": loras.disk_reads,
            "lora_evictions": loras.evictions,
            "denoise_rejected": engine.queue.rejected,
            "compiled_graphs": compiled_graphs(),
            **engine.counters,
        },
        warm_up=engine.warm_up,
        readings=lambda: {
            "denoiser_queue_depth": engine.queue.depths(),
            "denoiser_busy_seconds": engine.meter.busy_seconds(),
            "denoiser_steps": dict(engine.meter.steps),
        },
    )
