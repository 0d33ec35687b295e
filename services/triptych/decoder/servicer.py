"""DecoderService: proto <-> DecodeJob/images, nothing else."""

from __future__ import annotations

from triptych.decoder.engine import DecodeJob, DecoderEngine
from triptych.decoder.image_encoding import EncodeImageJob
from triptych.decoder.image_io import MIME, encode_image
from triptych.model_store import ModelStore
from triptych.rules.validation import check_size
from triptych.runtime.codec import decode_tensor, encode_tensor
from triptych.runtime.components import ComponentCache
from triptych.runtime.compute import ComputeThreads
from triptych.runtime.placement import Placement, compiled_graphs
from triptych.serving.errors import InvalidArgument
from triptych.serving.server import Service
from triptych.serving.settings import Settings
from triptych.v1 import common_pb2, decoder_service_pb2, decoder_service_pb2_grpc

MAX_SAMPLES = 2  # rows of one EncodeImage: one per half of a CFG batch (SD3's ControlNet guides)
_FORMATS = {
    decoder_service_pb2.OUTPUT_FORMAT_UNSPECIFIED: "png",
    decoder_service_pb2.OUTPUT_FORMAT_PNG: "png",
    decoder_service_pb2.OUTPUT_FORMAT_JPEG: "jpeg",
    decoder_service_pb2.OUTPUT_FORMAT_WEBP: "webp",
}


class DecoderServicer(decoder_service_pb2_grpc.DecoderServiceServicer):
    def __init__(self, engine: DecoderEngine, settings: Settings):
        self.engine = engine
        self.limits = settings.limits

    def Decode(self, request, context):
        violations = []
        fmt = _FORMATS.get(request.output_format)
        if fmt is None:
            violations.append(("output_format", f"unknown format {request.output_format}"))
        quality = request.quality if request.HasField("quality") else 95
        if not 1 <= quality <= 100:
            violations.append(("quality", f"must be between 1 and 100 (got {quality})"))
        # PNG keywords are 1-79 Latin-1 characters (PNG spec 11.3.4); PIL would fail or write a corrupt chunk.
        for key in request.png_text:
            if not 1 <= len(key) <= 79 or not all(32 <= ord(c) <= 126 or 161 <= ord(c) <= 255 for c in key):
                violations.append((f"png_text[{key!r}]", "a PNG text key is 1-79 printable Latin-1 characters"))
        if not request.HasField("latents"):
            violations.append(("latents", "required"))
        if violations:
            raise InvalidArgument(violations)
        latents = decode_tensor(request.latents, "latents")
        if not latents.is_floating_point():
            raise InvalidArgument.one("latents.dtype", "latents must be float32 (or float16/bfloat16)")
        if latents.ndim == 4 and latents.shape[0] > self.limits.max_number_results:
            raise InvalidArgument.one(
                "latents", f"at most {self.limits.max_number_results} latents per call (got {latents.shape[0]})"
            )
        scale = self.engine.scale_factor(request.model, request.vae)
        if latents.ndim == 4 and (
            latents.shape[-1] * scale > self.limits.max_width or latents.shape[-2] * scale > self.limits.max_height
        ):
            raise InvalidArgument.one(
                "latents", f"decodes to more than {self.limits.max_width}x{self.limits.max_height}"
            )
        images = self.engine.decode(DecodeJob(request.model, request.vae, latents), context.is_active)
        return decoder_service_pb2.DecodeResponse(
            images=[
                decoder_service_pb2.EncodedImage(
                    data=encode_image(image, fmt, quality, dict(request.png_text)),
                    mime_type=MIME[fmt],
                    width=image.width,
                    height=image.height,
                )
                for image in images
            ]
        )

    def EncodeImage(self, request, context):
        violations = []
        if not request.image:
            violations.append(("image", "an image is required"))
        elif len(request.image) > self.limits.max_guide_image_bytes:
            violations.append(("image", f"larger than {self.limits.max_guide_image_bytes} bytes"))
        width = request.width if request.HasField("width") else None
        height = request.height if request.HasField("height") else None
        check_size(width, "width", self.limits.max_width, violations)
        check_size(height, "height", self.limits.max_height, violations)
        samples = request.samples or 1
        if samples > MAX_SAMPLES:
            violations.append(("samples", f"at most {MAX_SAMPLES} (got {samples})"))
        if violations:
            raise InvalidArgument(violations)
        seed = request.seed if request.HasField("seed") else None
        job = EncodeImageJob(
            request.model, request.vae, request.image, width, height, samples, seed, request.generator_state
        )
        encoded = self.engine.encode_image(job, context.is_active)
        latents = common_pb2.VaeLatents(latents=encode_tensor(encoded.latents), scaling_factor=encoded.scaling_factor)
        if encoded.shift_factor is not None:
            latents.shift_factor = encoded.shift_factor
        return decoder_service_pb2.EncodeImageResponse(
            latents=latents, seed=encoded.seed, generator_state=encoded.generator_state
        )


def build(settings: Settings) -> Service:
    """The decoder role for the server bootstrap."""
    cache = ComponentCache(settings.max_loaded_models)
    compute = ComputeThreads("decoder", settings.max_loaded_models)
    engine = DecoderEngine(
        ModelStore(settings.model_root, settings.base_models),
        cache,
        compute,
        Placement.from_settings(settings),
        settings.active_compile_mode,
        settings.decoder_queue_per_model,
        settings.decoder_tile_above_pixels,
    )
    servicer = DecoderServicer(engine, settings)
    return Service(
        "decoder",
        ["triptych.v1.DecoderService"],
        lambda server: decoder_service_pb2_grpc.add_DecoderServiceServicer_to_server(servicer, server),
        cache.loaded,
        lambda: {"compiled_graphs": compiled_graphs()},
        warm_up=engine.warm_up,
        readings=lambda: {"decoder_queue_depth": engine.queue.depths()},
    )
