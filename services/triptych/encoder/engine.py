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
from triptych.core.errors import InvalidArgument
from triptych.core.lora import LoraAdapters
from triptych.core.model_store import ModelInfo, ModelStore
from triptych.encoder.textual_inversion import Embedding, EmbeddingFiles, emphasise, substituted, tokenize, with_tokens


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
        self.embedding_files = EmbeddingFiles(store)

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
        parts = self._components(info)
        encoder_names = [name for name in ("text_encoder", "text_encoder_2") if name in parts]
        layers = parts[encoder_names[-1]].config.num_hidden_layers
        # The default layer: SD1.x the last (with final norm); SDXL the penultimate (no final norm).
        default_skip = 0 if info.family == "sd1" else 1
        if job.clip_skip + default_skip >= layers:
            raise InvalidArgument.one(
                "clip_skip", f"must be at most {layers - 1 - default_skip} for {job.model!r} ({layers} layers)"
            )
        embeddings = self._embeddings(job, parts, encoder_names)
        # w >= 0 adds the concept to the positive prompt at emphasis w; w < 0 to the negative at emphasis |w|.
        positive_tis = [(e, w) for e, w in embeddings if w >= 0]
        negative_tis = [(e, -w) for e, w in embeddings if w < 0]
        positive_prompt = with_tokens(job.positive_prompt, [e for e, _ in positive_tis])
        negative_prompt = with_tokens(job.negative_prompt, [e for e, _ in negative_tis])
        encode = self._encode_sd1 if info.family == "sd1" else self._encode_sdxl
        with parts["_lock"], torch.no_grad():
            self.loras.activate(info.family, {name: parts[name] for name in encoder_names}, job.loras)
            positive = encode(parts, positive_prompt, positive_tis, job.clip_skip)
            negative = None
            if job.include_negative:
                if not negative_prompt and info.flag("force_zeros_for_empty_prompt", False):
                    negative = Conditioning(
                        torch.zeros_like(positive.prompt_embeds), torch.zeros_like(positive.pooled_prompt_embeds)
                    )
                else:
                    negative = encode(parts, negative_prompt, negative_tis, job.clip_skip)
        notes = []
        for name, prompt in (("positive_prompt", positive_prompt), ("negative_prompt", negative_prompt)):
            tokenizer = parts.get("tokenizer") or parts["tokenizer_2"]
            count = len(tokenizer(prompt, truncation=False).input_ids) - 2
            if count > tokenizer.model_max_length - 2:
                notes.append(f"{name}: {count} tokens, truncated to {tokenizer.model_max_length - 2}")
        hidden_layer_index = -(job.clip_skip + 1 + default_skip)
        return EncodeResult(positive, negative, hidden_layer_index, info.family_name, notes)

    def _embeddings(self, job: EncodeJob, parts: dict, encoder_names: list[str]) -> list[tuple[Embedding, float]]:
        """Loads the request's embeddings and checks each fits this model's encoders (SD1 vs SDXL files)."""
        loaded, violations = [], []
        for i, (model_id, weight) in enumerate(job.embeddings):
            field_name = f"embeddings[{i}].model"
            embedding = self.embedding_files.get(model_id, field_name)
            halves = set(embedding.vectors)
            fits = set(encoder_names) <= halves and halves - set(encoder_names) <= {"text_encoder"}
            if fits and encoder_names == ["text_encoder"]:
                fits = halves == {"text_encoder"}
            widths = {name: parts[name].get_input_embeddings().embedding_dim for name in encoder_names}
            if not fits:
                kind = "SDXL (clip_l + clip_g)" if "text_encoder_2" in halves else "SD1.x"
                violations.append((field_name, f"{model_id!r} is an {kind} embedding; it does not fit {job.model!r}"))
            elif any(embedding.vectors[name].shape[-1] != width for name, width in widths.items()):
                violations.append((field_name, f"{model_id!r} has vectors of the wrong width for {job.model!r}"))
            loaded.append((embedding, weight))
        if violations:
            raise InvalidArgument(violations)
        return loaded

    @staticmethod
    def _hidden(parts: dict, tok_name: str, enc_name: str, prompt: str, tis: list, **kwargs):
        """One text encoder's forward pass over a prompt; returns (output, A1111 multipliers or None)."""
        tokenizer, encoder = parts[tok_name], parts[enc_name]
        if not tis:  # the exact diffusers path
            ids = tokenizer(
                prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            return encoder(ids, **kwargs), None
        tokenized = tokenize(tokenizer, prompt, enc_name, tis)
        with substituted(encoder, tokenized.substitutions):
            return encoder(tokenized.input_ids, **kwargs), tokenized.multipliers

    def _encode_sd1(self, parts: dict, prompt: str, tis: list, clip_skip: int) -> Conditioning:
        # diffusers StableDiffusionPipeline.encode_prompt (clip skip: hidden_states[-(k+1)], then the final norm)
        if clip_skip == 0:
            output, multipliers = self._hidden(parts, "tokenizer", "text_encoder", prompt, tis)
            hidden = output[0]
        else:
            output, multipliers = self._hidden(
                parts, "tokenizer", "text_encoder", prompt, tis, output_hidden_states=True
            )
            encoder = parts["text_encoder"]
            final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 4 nests it
            hidden = final_norm(output.hidden_states[-(clip_skip + 1)])
        return Conditioning(hidden if multipliers is None else emphasise(hidden, multipliers))

    def _encode_sdxl(self, parts: dict, prompt: str, tis: list, clip_skip: int) -> Conditioning:
        # diffusers StableDiffusionXLPipeline.encode_prompt; a refiner has only tokenizer_2/text_encoder_2.
        embeds, pooled = [], None
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            if enc_name not in parts:
                continue
            output, multipliers = self._hidden(parts, tok_name, enc_name, prompt, tis, output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            hidden = output.hidden_states[-(clip_skip + 2)]
            embeds.append(hidden if multipliers is None else emphasise(hidden, multipliers))
        return Conditioning(torch.cat(embeds, dim=-1), pooled)
