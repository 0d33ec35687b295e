"""Prompt encoding for SD1.x/2.x and SDXL (base and refiner), with clip skip applied to both prompts.

Mirrors diffusers' StableDiffusionPipeline.encode_prompt and StableDiffusionXLPipeline.encode_prompt, except
that clip skip also applies to the negative prompt (as A1111) and SD1.x clip skip works with transformers 5
(diffusers#14124). Never imports grpc and never loads a UNet or a VAE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from triptych.core.components import ComponentCache
from triptych.core.errors import InvalidArgument, Unimplemented
from triptych.core.lora import LoraAdapters
from triptych.core.model_store import ModelInfo, ModelStore


@dataclass(frozen=True)
class EncodeJob:
    """One request's prompts, already parsed from the wire."""

    model: str
    positive_prompt: str
    negative_prompt: str = ""
    include_negative: bool = True
    clip_skip: int = 0
    loras: tuple[tuple[str, float], ...] = ()
    embeddings: tuple[tuple[str, float], ...] = ()


@dataclass
class Conditioning:
    """prompt_embeds [1, 77, dim] and, for SDXL, pooled_prompt_embeds [1, dim]."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None


@dataclass
class EncodeResult:
    positive: Conditioning
    negative: Conditioning | None
    hidden_layer_index: int
    model_family: str
    notes: list[str] = field(default_factory=list)


class TextEncoderEngine:
    """Loads tokenizers + text encoders on demand and encodes prompts."""

    def __init__(self, store: ModelStore, cache: ComponentCache, loras: LoraAdapters):
        self.store = store
        self.cache = cache
        self.loras = loras

    def _components(self, info: ModelInfo) -> dict:
        def load() -> dict:
            parts: dict = {}
            for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
                entry = info.index.get(enc_name)
                if not entry or entry[0] is None:
                    continue
                encoder_class = (
                    CLIPTextModelWithProjection if entry[1] == "CLIPTextModelWithProjection" else CLIPTextModel
                )
                parts[tok_name] = CLIPTokenizer.from_pretrained(info.path / tok_name)
                parts[enc_name] = encoder_class.from_pretrained(info.path / enc_name, use_safetensors=True).eval()
            return parts

        return self.cache.get(info.model_id, load)

    def encode(self, job: EncodeJob) -> EncodeResult:
        info = self.store.resolve(job.model, "model")
        if info.kind != "pipeline" or info.family is None:
            raise InvalidArgument.one("model", f"{job.model!r} is not a text-to-image model folder ({info.kind})")
        if job.embeddings:
            raise Unimplemented("embeddings: textual inversion is not supported by this encoder yet")
        parts = self._components(info)
        encoders = [parts[name] for name in ("text_encoder", "text_encoder_2") if name in parts]
        layers = encoders[-1].config.num_hidden_layers
        # The default layer: SD1.x the last (with final norm); SDXL the penultimate (no final norm).
        default_skip = 0 if info.family == "sd1" else 1
        if job.clip_skip + default_skip >= layers:
            raise InvalidArgument.one(
                "clip_skip", f"must be at most {layers - 1 - default_skip} for {job.model!r} ({layers} layers)"
            )
        hidden_layer_index = -(job.clip_skip + 1 + default_skip)
        with parts["_lock"], torch.no_grad():
            text_encoders = {name: parts[name] for name in ("text_encoder", "text_encoder_2") if name in parts}
            self.loras.activate(info.family, text_encoders, job.loras)
            if info.family == "sd1":
                positive = self._encode_sd1(parts, job.positive_prompt, job.clip_skip)
                negative = self._encode_sd1(parts, job.negative_prompt, job.clip_skip) if job.include_negative else None
            else:
                positive = self._encode_sdxl(parts, job.positive_prompt, job.clip_skip)
                negative = None
                if job.include_negative:
                    if not job.negative_prompt and info.flag("force_zeros_for_empty_prompt", False):
                        negative = Conditioning(
                            torch.zeros_like(positive.prompt_embeds), torch.zeros_like(positive.pooled_prompt_embeds)
                        )
                    else:
                        negative = self._encode_sdxl(parts, job.negative_prompt, job.clip_skip)
        notes = []
        for name, prompt in (("positive_prompt", job.positive_prompt), ("negative_prompt", job.negative_prompt)):
            tokenizer = parts.get("tokenizer") or parts["tokenizer_2"]
            count = len(tokenizer(prompt, truncation=False).input_ids) - 2
            if count > tokenizer.model_max_length - 2:
                notes.append(f"{name}: {count} tokens, truncated to {tokenizer.model_max_length - 2}")
        return EncodeResult(positive, negative, hidden_layer_index, info.family_name, notes)

    @staticmethod
    def _ids(tokenizer: CLIPTokenizer, prompt: str) -> torch.Tensor:
        return tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def _encode_sd1(self, parts: dict, prompt: str, clip_skip: int) -> Conditioning:
        # diffusers StableDiffusionPipeline.encode_prompt
        encoder = parts["text_encoder"]
        ids = self._ids(parts["tokenizer"], prompt)
        if clip_skip == 0:
            return Conditioning(encoder(ids)[0])
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 4 nests it
        return Conditioning(final_norm(hidden))

    def _encode_sdxl(self, parts: dict, prompt: str, clip_skip: int) -> Conditioning:
        # diffusers StableDiffusionXLPipeline.encode_prompt; a refiner has only tokenizer_2/text_encoder_2.
        embeds, pooled = [], None
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            if enc_name not in parts:
                continue
            output = parts[enc_name](self._ids(parts[tok_name], prompt), output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            embeds.append(output.hidden_states[-(clip_skip + 2)])
        return Conditioning(torch.cat(embeds, dim=-1), pooled)
