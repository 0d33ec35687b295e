"""ImageService: validates a Runware-style request, then chains encoder -> denoiser (-> refiner) -> decoder.

Holds no weights and imports no torch. Deadlines and cancellation propagate to every downstream call;
downstream errors are relayed unchanged (code, message, field violations).
"""

from __future__ import annotations

import json
import math
import secrets
import time

import grpc

from triptych import families
from triptych.client.streams import RetriedStream
from triptych.client.task import task_from_request
from triptych.client.transport import address_hosts
from triptych.gateway.calls import Calls, CancelledByCaller, SharedMemory, Transport
from triptych.gateway.guides import encode_guides
from triptych.gateway.metadata import a1111_parameters
from triptych.gateway.readiness import Backend, Readiness
from triptych.rules.control_units import family_violations, parse_control_units
from triptych.rules.scheduler_table import parse_scheduler
from triptych.rules.validation import (
    check_guidance,
    check_prompt,
    check_size,
    check_steps,
    check_work,
    weighted,
)
from triptych.runtime.admission import BoundedQueue  # torch-free
from triptych.serving import timing
from triptych.serving.errors import InvalidArgument, Relayed
from triptych.serving.security import is_loopback, outgoing_channel
from triptych.serving.server import VERSION, Service
from triptych.serving.settings import Settings
from triptych.v1 import (
    common_pb2,
    decoder_service_pb2,
    decoder_service_pb2_grpc,
    denoiser_service_pb2,
    denoiser_service_pb2_grpc,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
)

BACKEND_SERVICES = {
    "encoder": "triptych.v1.TextEncoderService",
    "denoiser": "triptych.v1.DenoiserService",
    "decoder": "triptych.v1.DecoderService",
}
DEFAULT_STEPS = 20
DEFAULT_CFG_SCALE = 7.0
DEFAULT_SIZE_BOUND = 1024  # an unset width or height: the largest default size of a family we serve (SDXL, FLUX)


class ImageServicer(image_service_pb2_grpc.ImageServiceServicer):
    def __init__(self, settings: Settings):
        self.limits = settings.limits
        self.max_message_bytes = settings.max_message_bytes

        # Each address may be a replica list: one round-robin channel per role, UNAVAILABLE retried elsewhere;
        # TLS and the gateway's own token (settings.security) apply to every downstream call.
        def channel(address: str):
            return outgoing_channel(settings.security, address, settings.max_message_bytes)

        addresses = {
            "encoder": settings.encoder_address,
            "denoiser": settings.denoiser_address,
            "decoder": settings.decoder_address,
        }
        # Shared memory only when every backend is on this host (they answer SHARED_MEMORY if not after all).
        local = all(is_loopback(host) for address in addresses.values() for host in address_hosts(address))
        self.shared_memory = SharedMemory(settings.shared_memory and local, keep=settings.max_workers)
        channels = {role: channel(address) for role, address in addresses.items()}
        self.encoder = encoder_service_pb2_grpc.TextEncoderServiceStub(channels["encoder"])
        self.denoiser = denoiser_service_pb2_grpc.DenoiserServiceStub(channels["denoiser"])
        self.decoder = decoder_service_pb2_grpc.DecoderServiceStub(channels["decoder"])
        # Admission against the denoisers' capacity, before encoding: a request they would refuse costs nothing.
        capacity = settings.denoiser_queue_per_model * len(address_hosts(settings.denoiser_address))
        self.admission = BoundedQueue(settings.gateway_queue_per_model or capacity, "generate")
        # Ready only while every backend serves (gateway/readiness.py), checked over the same channels.
        self.readiness = Readiness(
            [
                Backend(role, BACKEND_SERVICES[role], channels[role], len(address_hosts(address)))
                for role, address in addresses.items()
            ],
            ["triptych.v1.ImageService"],
        )

    def validate(self, request: image_service_pb2.GenerateRequest) -> None:
        """Every field checked before any downstream work; all violations reported at once."""
        v: list[tuple[str, str]] = []
        if not request.model:
            v.append(("model", "a model id is required"))
        check_prompt(request.positive_prompt, "positive_prompt", self.limits, v)
        check_prompt(request.negative_prompt, "negative_prompt", self.limits, v)
        check_size(request.width if request.HasField("width") else None, "width", self.limits.max_width, v)
        check_size(request.height if request.HasField("height") else None, "height", self.limits.max_height, v)
        steps = _steps(request)
        check_steps(steps, "steps", self.limits, v)
        check_guidance(
            request.cfg_scale if request.HasField("cfg_scale") else DEFAULT_CFG_SCALE, "cfg_scale", self.limits, v
        )
        count = request.number_results if request.HasField("number_results") else 1
        if not 1 <= count <= self.limits.max_number_results:
            v.append(("number_results", f"must be between 1 and {self.limits.max_number_results} (got {count})"))
        elif not v:  # every factor is in range: now their product, the work budget
            size = (
                request.width if request.HasField("width") else None,
                request.height if request.HasField("height") else None,
            )
            check_work(*size, steps, count, "number_results" if count > 1 else "steps", self.limits, v)
        if request.HasField("output_quality") and not 1 <= request.output_quality <= 100:
            v.append(("output_quality", f"must be between 1 and 100 (got {request.output_quality})"))
        if request.output_format not in decoder_service_pb2.OutputFormat.values():
            v.append(("output_format", f"unknown format {request.output_format}"))
        try:
            parse_scheduler(request.scheduler, table=families.ALL_SCHEDULERS)  # the denoiser checks the family
        except InvalidArgument as exc:
            v.extend(exc.violations)
        weighted(request.lora, "lora", self.limits.max_loras, (-10.0, 10.0), v)
        weighted(request.embeddings, "embeddings", self.limits.max_embeddings, (-4.0, 4.0), v, by_sign=True)
        if request.prompt_weighting not in encoder_service_pb2.PromptWeighting.values():
            v.append(("prompt_weighting", f"unknown value {request.prompt_weighting}"))
        parse_control_units(request.control_net, steps, self.limits, v)  # the denoiser's own check, before any work
        # Each image's response carries the request, guide images in base64: in request_json and, for a PNG, in its
        # "triptych-request" text too. Refuse now what would only fail at the end; 16 MiB are left for the image.
        guides = sum(len(unit.guide_image) for unit in request.control_net)
        png = request.output_format in (
            decoder_service_pb2.OUTPUT_FORMAT_UNSPECIFIED,
            decoder_service_pb2.OUTPUT_FORMAT_PNG,
        )
        most = max(0, self.max_message_bytes - (16 << 20)) // (2 if png else 1) // 4 * 3
        if guides > most:
            v.append(("control_net", f"guide images of {guides} bytes in all; the response holds at most {most}"))
        if request.HasField("max_response_bytes") and not v:
            # The worst case of one image's message: uncompressed RGB, the request (guides in base64) once in
            # request_json and once more in a PNG's text, the parameters text, and 64 KiB for the rest.
            side = DEFAULT_SIZE_BOUND
            width = request.width if request.HasField("width") else side
            height = request.height if request.HasField("height") else side
            texts = (2 if png else 1) * 2 * request.ByteSize()  # JSON and base64 at most double it
            bound = width * height * 3 + texts + (64 << 10)
            if bound > request.max_response_bytes:
                why = f"an image of {width}x{height} may take up to {bound} bytes, above the caller's"
                v.append(("max_response_bytes", f"{why} {request.max_response_bytes}: raise the receive limit"))
        if request.HasField("refiner"):
            if not request.refiner.model:
                v.append(("refiner.model", "a refiner model id is required"))
            which = request.refiner.WhichOneof("start")
            fraction = self.refiner_fraction(request)
            steps_zero = which == "start_step" and math.isnan(fraction)  # reported on `steps`
            if which is None:
                v.append(("refiner", "set start_step or start_step_percentage"))
            elif not steps_zero and not (math.isfinite(fraction) and 0 < fraction < 1):
                v.append((f"refiner.{which}", f"the hand-off must fall inside the schedule (got {fraction})"))
        if v:
            raise InvalidArgument(v)

    @staticmethod
    def refiner_fraction(request: image_service_pb2.GenerateRequest) -> float | None:
        which = request.refiner.WhichOneof("start")
        if which == "start_step":
            steps = _steps(request)
            return request.refiner.start_step / steps if steps else math.nan  # steps=0 is reported as such
        if which == "start_step_percentage":
            return request.refiner.start_step_percentage / 100.0
        return None

    def Generate(self, request, context):
        self.validate(request)
        with self.admission.slot(request.model):  # RESOURCE_EXHAUSTED at once when the model's denoisers are full
            transport = Transport(self.shared_memory)
            calls = Calls(context, transport)
            try:
                yield from self._generate(request, calls)
                transport.clean = True  # every downstream call has returned: nothing writes into the region any more
            finally:
                transport.close()
        timing.append(context, calls.clock.metrics())  # the stages; the interceptor adds `total` after them

    def _generate(self, request, calls: Calls):
        steps = _steps(request)
        cfg_scale = request.cfg_scale if request.HasField("cfg_scale") else DEFAULT_CFG_SCALE
        base_seed = request.seed if request.HasField("seed") else secrets.randbits(64)
        count = request.number_results if request.HasField("number_results") else 1
        started = time.perf_counter()

        encode_request = encoder_service_pb2.EncodeRequest(
            model=request.model,
            positive_prompt=request.positive_prompt,
            negative_prompt=request.negative_prompt,
            include_negative=cfg_scale > 1,
            loras=request.lora,
            embeddings=request.embeddings,
            prompt_weighting=request.prompt_weighting,
        )
        if request.HasField("clip_skip"):
            encode_request.clip_skip = request.clip_skip
        if request.HasField("max_sequence_length"):
            encode_request.max_sequence_length = request.max_sequence_length
        encoded = calls.unary("encode", self.encoder.Encode, encode_request, output="encode")
        yield _progress("encode", 1, 1, started, 0)
        refiner_encoded = None
        if request.HasField("refiner"):
            refiner_request = encoder_service_pb2.EncodeRequest()
            refiner_request.CopyFrom(encode_request)
            refiner_request.model = request.refiner.model
            refiner_request.ClearField("loras")  # a LoRA is trained for the base model
            # The encoder names the refiner's id `model`; in GenerateRequest it is `refiner.model`.
            refiner_encoded = calls.unary(
                "encode", self.encoder.Encode, refiner_request, {"model": "refiner.model"}, output="refiner_encode"
            )
            pairing = (encoded.model_family, refiner_encoded.model_family)
            if not families.can_refine(*pairing):
                raise InvalidArgument.one(
                    "refiner.model",
                    f"a refiner needs an SDXL base and an SDXL refiner (got {pairing[0]} -> {pairing[1]})",
                )

        family = families.for_variant(encoded.model_family)
        unit_violations = family_violations(parse_control_units(request.control_net, steps, self.limits, []), family)
        if unit_violations:  # before any guide is encoded
            raise InvalidArgument(unit_violations)
        refiner_notes = refiner_encoded.notes if refiner_encoded is not None else ()
        notes = [*encoded.notes, *(f"refiner: {note}" for note in refiner_notes)]
        for index in range(count):
            seed = (base_seed + index) % 2**64
            denoise_request = denoiser_service_pb2.DenoiseRequest(
                model=request.model,
                positive=encoded.positive,
                steps=steps,
                guidance_scale=cfg_scale,
                scheduler=request.scheduler,
                seed=seed,
                loras=request.lora,
                control_net=request.control_net,
                preview_interval_steps=request.preview_interval_steps,
                progress_interval_ms=request.progress_interval_ms,
            )
            if encoded.HasField("negative"):
                denoise_request.negative.CopyFrom(encoded.negative)
            for field in ("width", "height"):
                if request.HasField(field):
                    setattr(denoise_request, field, getattr(request, field))
            fraction = None
            if refiner_encoded is not None:
                fraction = self.refiner_fraction(request)
                denoise_request.window.end_fraction = fraction
            if request.control_net and family.guide_latents:  # FLUX, SD3: guides as latents, from the decoder
                encode_guides(calls, self.decoder, request, denoise_request, family, seed)
            result = yield from self._denoise(calls, denoise_request, "denoise", index)
            decode_model = request.model
            if refiner_encoded is not None:
                refine_request = denoiser_service_pb2.DenoiseRequest()
                refine_request.CopyFrom(denoise_request)
                refine_request.model = request.refiner.model
                refine_request.positive.CopyFrom(refiner_encoded.positive)
                refine_request.ClearField("negative")
                if refiner_encoded.HasField("negative"):
                    refine_request.negative.CopyFrom(refiner_encoded.negative)
                refine_request.ClearField("loras")
                refine_request.ClearField("control_net")
                refine_request.ClearField("window")
                refine_request.window.start_fraction = fraction
                refine_request.latents.CopyFrom(result.latents)
                refine_request.generator_state = result.generator_state
                result = yield from self._denoise(calls, refine_request, "refine", index)
                decode_model = request.refiner.model

            reproduce = image_service_pb2.GenerateRequest()
            reproduce.CopyFrom(request)
            reproduce.seed = seed
            reproduce.ClearField("number_results")
            request_json = _json(task_from_request(reproduce))
            height, width = family.image_size(result.latents.shape)
            parameters = a1111_parameters(request, seed, steps, cfg_scale, width, height, VERSION)
            decode_started = time.perf_counter()
            decoded = calls.unary(
                "decode",
                self.decoder.Decode,
                decoder_service_pb2.DecodeRequest(
                    model=decode_model,
                    vae=request.vae,
                    latents=result.latents,
                    output_format=request.output_format,
                    quality=request.output_quality if request.HasField("output_quality") else 95,
                    png_text={"parameters": parameters, "triptych-request": request_json},
                ),
            )
            yield _progress("decode", 1, 1, decode_started, index)
            yield image_service_pb2.GenerateResponse(
                image=image_service_pb2.GeneratedImage(
                    task_uuid=request.task_uuid,
                    index=index,
                    image=decoded.images[0],
                    seed=seed,
                    scheduler_class=result.scheduler_class,
                    scheduler_options=result.scheduler_options,
                    hidden_layer_index=encoded.hidden_layer_index,
                    parameters=parameters,
                    request_json=request_json,
                    notes=notes,
                )
            )

    def _denoise(self, calls: Calls, request, stage: str, index: int):
        """Relays a Denoise stream's progress (tagged with stage and image index) and returns its result.

        `stage` ("denoise" or "refine") also names the shared-memory slice the result is written to. A backend
        refuses shared memory before its first message, so the retry in bytes never repeats progress.
        """
        started = time.perf_counter()
        calls.transport.prepare(request, stage)
        try:
            return (yield from self._stream(calls, request, stage, index, started))
        except Relayed as exc:
            if not calls.transport.refused(exc):
                raise
        calls.transport.prepare(request, stage)
        return (yield from self._stream(calls, request, stage, index, started))

    def _stream(self, calls: Calls, request, stage: str, index: int, started: float):
        try:
            # Retried by our own code before its first event (the channel retries unary methods only).
            call = calls.track(
                RetriedStream(lambda remaining: self.denoiser.Denoise(request, timeout=remaining), calls.timeout())
            )
            for event in call:
                if event.HasField("progress"):
                    progress = common_pb2.Progress()
                    progress.CopyFrom(event.progress)
                    progress.stage, progress.image_index = stage, index
                    yield image_service_pb2.GenerateResponse(progress=progress)
                else:
                    calls.clock.record(stage, time.perf_counter() - started, _trailer_after_result(call))
                    return event.result
        except grpc.RpcError as exc:
            raise calls.relayed(exc) from exc
        raise Relayed(CancelledByCaller())


def _steps(request: image_service_pb2.GenerateRequest) -> int:
    """The request's `steps`, or the default when unset."""
    return request.steps if request.HasField("steps") else DEFAULT_STEPS


def _trailer_after_result(call, wait_s: float = 1.0):
    """The stream's trailing metadata, which follows its last message (the result) at once; None (no hop for the
    stage) from a backend that holds its stream open after the result, which then costs this call `wait_s`, not
    its deadline."""
    try:
        call.exception(timeout=wait_s)  # returns when the call has ended, whatever its status
    except (grpc.FutureTimeoutError, grpc.FutureCancelledError):
        return None
    return call.trailing_metadata()


def _progress(stage: str, step: int, total: int, started: float, index: int) -> image_service_pb2.GenerateResponse:
    return image_service_pb2.GenerateResponse(
        progress=common_pb2.Progress(
            stage=stage,
            step=step,
            total_steps=total,
            elapsed_seconds=time.perf_counter() - started,
            image_index=index,
        )
    )


def _json(task: dict) -> str:
    return json.dumps(task, sort_keys=True, separators=(",", ":"))


def build(settings: Settings) -> Service:
    """The gateway role for the server bootstrap."""
    servicer = ImageServicer(settings)
    return Service(
        "gateway",
        ["triptych.v1.ImageService"],
        lambda server: image_service_pb2_grpc.add_ImageServiceServicer_to_server(servicer, server),
        readiness=servicer.readiness.start,
        readings=lambda: {"gateway_admitted": servicer.admission.depths()},
    )
