"""TextEncoderService: proto <-> EncodeJob/EncodeResult and the catalogue, nothing else."""

from __future__ import annotations

from triptych.encoder.catalog import list_catalog
from triptych.encoder.chunks import CHUNK_TOKENS
from triptych.encoder.engine import Conditioning, EncodeJob, TextEncoderEngine
from triptych.model_store import ModelStore
from triptych.rules.validation import check_prompt, weighted
from triptych.runtime.codec import encode_tensor
from triptych.runtime.components import ComponentCache
from triptych.runtime.lora import LoraAdapters
from triptych.runtime.placement import Placement
from triptych.serving import shm
from triptych.serving.errors import InvalidArgument
from triptych.serving.server import Service
from triptych.serving.settings import Settings
from triptych.v1 import common_pb2, encoder_service_pb2, encoder_service_pb2_grpc

_WEIGHTINGS = {
    encoder_service_pb2.PROMPT_WEIGHTING_UNSPECIFIED: "literal",
    encoder_service_pb2.PROMPT_WEIGHTING_A1111: "a1111",
}


def _conditioning_to_pb(conditioning: Conditioning, into: shm.Writer | None) -> common_pb2.TextConditioning:
    message = common_pb2.TextConditioning(prompt_embeds=encode_tensor(conditioning.prompt_embeds, into))
    if conditioning.pooled_prompt_embeds is not None:
        message.pooled_prompt_embeds.CopyFrom(encode_tensor(conditioning.pooled_prompt_embeds, into))
    return message


class TextEncoderServicer(encoder_service_pb2_grpc.TextEncoderServiceServicer):
    def __init__(self, engine: TextEncoderEngine, settings: Settings):
        self.engine = engine
        self.limits = settings.limits

    def Encode(self, request, context):
        violations: list[tuple[str, str]] = []
        check_prompt(request.positive_prompt, "positive_prompt", self.limits, violations)
        check_prompt(request.negative_prompt, "negative_prompt", self.limits, violations)
        loras = weighted(request.loras, "loras", self.limits.max_loras, (-10.0, 10.0), violations)
        embeddings = weighted(
            request.embeddings, "embeddings", self.limits.max_embeddings, (-4.0, 4.0), violations, by_sign=True
        )
        weighting = _WEIGHTINGS.get(request.prompt_weighting)
        if weighting is None:
            violations.append(("prompt_weighting", f"unknown value {request.prompt_weighting}"))
        if violations:
            raise InvalidArgument(violations)
        job = EncodeJob(
            model=request.model,
            positive_prompt=request.positive_prompt,
            negative_prompt=request.negative_prompt,
            include_negative=request.include_negative,
            clip_skip=request.clip_skip,
            loras=loras,
            embeddings=embeddings,
            prompt_weighting=weighting,
            max_sequence_length=request.max_sequence_length,
        )
        with shm.writer(request) as into:
            result = self.engine.encode(job)
            response = encoder_service_pb2.EncodeResponse(
                positive=_conditioning_to_pb(result.positive, into),
                hidden_layer_index=result.hidden_layer_index,
                notes=result.notes,
                model_family=result.model_family,
            )
            if result.negative is not None:
                response.negative.CopyFrom(_conditioning_to_pb(result.negative, into))
        return response

    def ListTextEncoders(self, request, context):
        models, embeddings = list_catalog(self.engine.store)
        return encoder_service_pb2.ListTextEncodersResponse(
            models=[
                encoder_service_pb2.TextEncoderModel(
                    model=m.model,
                    family=m.family,
                    encoders=[encoder_service_pb2.TextEncoderComponent(**vars(e)) for e in m.encoders],
                    max_clip_skip=m.max_clip_skip,
                    zeros_for_empty_negative=m.zeros_for_empty_negative,
                )
                for m in models
            ],
            embeddings=[encoder_service_pb2.EmbeddingFile(**vars(e)) for e in embeddings],
            max_prompt_chunks=self.limits.max_prompt_chunks,
            chunk_tokens=CHUNK_TOKENS,
        )


def build(settings: Settings) -> Service:
    """The encoder role for the server bootstrap."""
    cache = ComponentCache(settings.max_loaded_models)
    store = ModelStore(settings.model_root, settings.base_models)
    loras = LoraAdapters(store, settings.lora_cache_bytes)
    engine = TextEncoderEngine(
        store,
        cache,
        loras,
        settings.limits,
        result_cache_bytes=settings.encoder_cache_bytes,
        max_batch_rows=settings.encoder_max_batch_rows,
        batch_wait_s=settings.encoder_batch_wait_ms / 1000.0,
        placement=Placement.from_settings(settings),
    )
    servicer = TextEncoderServicer(engine, settings)
    return Service(
        "encoder",
        ["triptych.v1.TextEncoderService"],
        lambda server: encoder_service_pb2_grpc.add_TextEncoderServiceServicer_to_server(servicer, server),
        cache.loaded,
        lambda: {"lora_disk_reads": loras.disk_reads, "lora_evictions": loras.evictions, **engine.counters()},
        warm_up=engine.warm_up,
        readings=lambda: {"encoder_batch_requests": {str(n): c for n, c in engine.batcher.batch_sizes.items()}},
    )
