"""Prompt encoding for SD1.x/2.x and SDXL (base and refiner): clip skip, long prompts, weighting, embeddings.

Mirrors diffusers' StableDiffusionPipeline.encode_prompt and StableDiffusionXLPipeline.encode_prompt, except
that clip skip also applies to the negative prompt (as A1111) and SD1.x clip skip works with transformers 5
(diffusers#14124). Prompts longer than 75 tokens are encoded in A1111-style chunks (encoder/chunks.py); a
prompt of at most 75 tokens is one chunk with diffusers' own ids, so its output is diffusers' bit for bit.
Identical requests are answered from a cache; concurrent ones share forward passes (encoder/batching.py).
Never imports grpc and never loads a UNet or a VAE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from triptych import checkpoint
from triptych.encoder.batching import Batcher
from triptych.encoder.cache import ByteBoundedLRU
from triptych.encoder.chunks import CHUNK_TOKENS, Chunk, empty_chunk, placed_tokens, split_into_chunks
from triptych.encoder.forward import encode_rows, make_rows_independent, project_pooled
from triptych.encoder.prompt_syntax import Fragment, PromptSyntaxError, literal, parse_weighted
from triptych.encoder.textual_inversion import Embedding, EmbeddingFiles, emphasise
from triptych.encoder.whole_prompts import check_whole_prompt_job, encode_whole
from triptych.families import Family
from triptych.model_store import ModelInfo, ModelStore
from triptych.rules.limits import Limits
from triptych.runtime.codec import all_finite
from triptych.runtime.components import ComponentCache, LoadedModel
from triptych.runtime.lora import LoraAdapters, resolve_lora
from triptych.runtime.placement import CPU_FLOAT32, Placement
from triptych.serving.errors import InvalidArgument

PROMPT_WEIGHTINGS = ("literal", "a1111")  # literal: the prompt as diffusers reads it; a1111: (word:1.2) syntax


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
    prompt_weighting: str = "literal"
    max_sequence_length: int = 0  # T5 tokens (FLUX, SD3); 0 = the family's diffusers default


@dataclass
class Conditioning:
    """prompt_embeds [1, 77·chunks, dim] and, for SDXL, pooled_prompt_embeds [1, dim] (from the first chunk)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None

    def to_host(self) -> Conditioning:
        """float32 on the CPU (no copy when it already is)."""
        pooled = self.pooled_prompt_embeds
        return Conditioning(
            self.prompt_embeds.to(device="cpu", dtype=torch.float32),
            None if pooled is None else pooled.to(device="cpu", dtype=torch.float32),
        )


@dataclass
class EncodeResult:
    positive: Conditioning
    negative: Conditioning | None
    hidden_layer_index: int
    model_family: str
    notes: list[str] = field(default_factory=list)

    def nbytes(self) -> int:
        tensors = [t for c in (self.positive, self.negative) if c for t in (c.prompt_embeds, c.pooled_prompt_embeds)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class _Prompt:
    """One prompt's chunks per text encoder component."""

    field: str
    chunks: dict[str, list[Chunk]]
    token_count: int


@dataclass
class _Work:
    """What one request asks of a shared forward pass."""

    parts: LoadedModel
    family: Family
    encoder_names: list[str]
    clip_skip: int
    prompts: list[_Prompt]


class TextEncoderEngine:
    """Loads tokenizers + text encoders on demand and encodes prompts."""

    def __init__(
        self,
        store: ModelStore,
        cache: ComponentCache,
        loras: LoraAdapters,
        limits: Limits,
        *,
        result_cache_bytes: int = 0,
        max_batch_rows: int = 1,
        batch_wait_s: float = 0.0,
        placement: Placement = CPU_FLOAT32,
    ):
        self.store = store
        self.placement = placement
        self.cache = cache
        self.loras = loras
        self.limits = limits
        self.embedding_files = EmbeddingFiles(store)
        self.results = ByteBoundedLRU(result_cache_bytes)
        self.batcher = Batcher(self._run_batch, max_batch_rows, batch_wait_s, name="encoder-batcher")

    def counters(self) -> dict[str, int]:
        """Monotonic counters for RuntimeService: cache hits/misses and how forward passes were shared."""
        return {
            "encode_cache_hits": self.results.hits,
            "encode_cache_misses": self.results.misses,
            "encode_cache_evictions": self.results.evictions,
            "encode_forward_passes": self.batcher.calls,
            "encode_batched_requests": self.batcher.works,
            "encode_batched_chunks": self.batcher.rows,
            "encode_shared_forward_passes": self.batcher.shared_calls,
        }

    def components(self, info: ModelInfo) -> LoadedModel:
        """The model's tokenizers and text encoders by folder name, loaded on first use."""

        def load() -> LoadedModel:
            parts: dict = {}
            for slot in info.family.encoder_slots(info):
                # The classes the model_index.json names (CLIPTextModel(WithProjection), T5EncoderModel, ...).
                tokenizer_class = getattr(transformers, info.index[slot.tokenizer][1])
                encoder_class = getattr(transformers, info.index[slot.encoder][1])
                parts[slot.tokenizer] = tokenizer_class.from_pretrained(info.path / slot.tokenizer)
                encoder = checkpoint.load(encoder_class, info, slot.encoder)  # a folder's or a single file's
                parts[slot.encoder] = self.placement.module(encoder, convolutional=False)
                if isinstance(encoder, CLIPTextModel | CLIPTextModelWithProjection):
                    make_rows_independent(parts[slot.encoder])  # so a row's bits never depend on its batch
            return LoadedModel(parts)

        return self.cache.get(info.cache_id("text_encoder"), load)

    def warm_up(self, model_id: str) -> bool:
        """Loads a model's tokenizers and text encoders and encodes an empty prompt. False for a non-pipeline."""
        info = self.store.resolve(model_id, "model")
        if not info.is_text_to_image:
            return False
        self.encode(EncodeJob(model=model_id, positive_prompt="", include_negative=True))
        return True

    def encode(self, job: EncodeJob) -> EncodeResult:
        """Validates the job, then answers it from the cache or from a (possibly shared) forward pass."""
        # Announced from the start, so a batch forming meanwhile waits for this request (up to its max wait).
        with self.batcher.announced() as submit:
            return self._answer(job, submit)

    def _answer(self, job: EncodeJob, submit) -> EncodeResult:
        info = self.store.resolve(job.model, "model")
        if not info.is_text_to_image:
            raise InvalidArgument.one("model", f"{job.model!r} is not a text-to-image model ({info.what})")
        if job.prompt_weighting not in PROMPT_WEIGHTINGS:
            raise InvalidArgument.one("prompt_weighting", f"must be one of {PROMPT_WEIGHTINGS}")
        parts = self.components(info)
        encoder_names = [slot.encoder for slot in info.family.encoder_slots(info)]
        # Every encoder must have the layer: SDXL's CLIP-L (12 layers) is shallower than its OpenCLIP-G (32).
        layers = min(
            parts[name].config.num_hidden_layers
            for name in encoder_names
            if isinstance(parts[name], CLIPTextModel | CLIPTextModelWithProjection)
        )
        if not info.family.chunked_clip_prompts:
            return self._answer_whole(job, info, parts, layers)
        most = info.family.max_clip_skip(layers)
        if job.clip_skip > most:
            raise InvalidArgument.one("clip_skip", f"must be at most {most} for {job.model!r} ({layers} layers)")
        embeddings = self._embeddings(job, parts, encoder_names)
        key = self._cache_key(job, info, embeddings)
        cached = self.results.get(key)
        if cached is not None:
            return cached
        result = self._encode(job, info, parts, encoder_names, embeddings, submit)
        self.results.put(key, result, result.nbytes())
        return result

    def _answer_whole(self, job: EncodeJob, info: ModelInfo, parts: LoadedModel, clip_layers: int) -> EncodeResult:
        """A family that encodes a prompt whole (FLUX, SD3): its own encode_prompt, cached like the rest."""
        length = check_whole_prompt_job(job, info.family, parts, clip_layers)
        key = (*self._cache_key(job, info, []), length)
        cached = self.results.get(key)
        if cached is not None:
            return cached
        positive, negative, notes = encode_whole(job, info.family, parts, length, Conditioning, self.loras)
        result = EncodeResult(
            positive, negative, info.family.hidden_layer_index(job.clip_skip), info.family_name, notes
        )
        self.results.put(key, result, result.nbytes())
        return result

    def _encode(
        self, job: EncodeJob, info: ModelInfo, parts: LoadedModel, encoder_names, embeddings, submit
    ) -> EncodeResult:
        """Chunks both prompts, checks their length, pads them to equal chunk counts and runs them."""
        # w >= 0 adds the concept to the positive prompt at emphasis w; w < 0 to the negative at emphasis |w|.
        texts = [("positive_prompt", job.positive_prompt, [(e, w) for e, w in embeddings if w >= 0])]
        negative_tis = [(e, -w) for e, w in embeddings if w < 0]
        # diffusers' zeros stand for no negative prompt; one that a negative embedding goes to is not empty.
        zero_negative = (
            not job.negative_prompt and not negative_tis and info.flag("force_zeros_for_empty_prompt", False)
        )
        if job.include_negative and not zero_negative:
            texts.append(("negative_prompt", job.negative_prompt, negative_tis))
        prompts, violations = [], []
        for field_name, text, tis in texts:
            prompt = self._chunked(parts, encoder_names, field_name, job.prompt_weighting, text, tis)
            count = len(prompt.chunks[encoder_names[0]])
            if count > self.limits.max_prompt_chunks:
                violations.append((field_name, _too_long(prompt.token_count, count, self.limits.max_prompt_chunks)))
            prompts.append(prompt)
        if violations:
            raise InvalidArgument(violations)
        counts = [len(p.chunks[encoder_names[0]]) for p in prompts]
        notes = [
            f"{p.field}: {p.token_count} tokens, encoded as {count} chunks of {CHUNK_TOKENS} (A1111-style)"
            for p, count in zip(prompts, counts, strict=True)
            if count > 1
        ]
        notes += _pad_to_equal_chunks(prompts, parts, encoder_names)
        work = _Work(parts, info.family, encoder_names, job.clip_skip, prompts)
        rows = sum(len(p.chunks[encoder_names[0]]) for p in prompts)
        conditionings = submit((info.model_id, id(parts), job.loras), work, rows)
        positive = conditionings[0]
        negative = None
        if job.include_negative:
            negative = conditionings[1] if len(conditionings) > 1 else _zeros_like(positive)
        hidden_layer_index = info.family.hidden_layer_index(job.clip_skip)
        return EncodeResult(positive, negative, hidden_layer_index, info.family_name, notes)

    def _chunked(self, parts, encoder_names, field_name: str, weighting: str, text: str, tis) -> _Prompt:
        try:
            fragments = parse_weighted(text) if weighting == "a1111" else literal(text)
        except PromptSyntaxError as exc:
            raise InvalidArgument.one(field_name, str(exc)) from exc
        # An embedding whose token the prompt lacks is appended after one space, with weight 1 from the prompt.
        placed = placed_tokens(fragments, tis)
        fragments += [Fragment(" " + embedding.token, 1.0) for embedding, _ in tis if embedding.token not in placed]
        chunked = {}
        for name in encoder_names:
            chunked[name] = split_into_chunks(tokenizer_for(parts, name), fragments, tis, name)
        if len({len(c.chunks) for c in chunked.values()}) > 1:  # never with CLIP's shared vocabulary
            raise InvalidArgument.one(field_name, "the model's two tokenizers split this prompt differently")
        token_count = chunked[encoder_names[0]].token_count
        return _Prompt(field_name, {name: c.chunks for name, c in chunked.items()}, token_count)

    def _run_batch(self, key, works: list[_Work]) -> list:
        """One forward pass per text encoder over every chunk of `works` (same model, same LoRA set)."""
        first = works[0]
        parts, encoder_names = first.parts, first.encoder_names
        results: list = [[] for _ in works]
        with parts.lock, torch.no_grad():
            self.loras.activate(first.family, {name: parts[name] for name in encoder_names}, key[2])
            per_encoder = {}
            for name in encoder_names:
                chunks, clip_skips = [], []
                for work in works:
                    for prompt in work.prompts:
                        chunks += prompt.chunks[name]
                        clip_skips += [work.clip_skip] * len(prompt.chunks[name])
                per_encoder[name] = encode_rows(parts[name], first.family, chunks, clip_skips)
            row = 0
            for index, work in enumerate(works):
                for prompt in work.prompts:
                    # Results (the cache, the wire) are float32 on the CPU whatever the encoders run on.
                    conditioning = _assemble(parts, encoder_names, per_encoder, prompt, row)
                    results[index].append(conditioning.to_host())
                    row += len(prompt.chunks[encoder_names[0]])
        for index, conditionings in enumerate(results):
            for prompt, conditioning in zip(works[index].prompts, conditionings, strict=True):
                if not all_finite(conditioning.prompt_embeds):
                    results[index] = InvalidArgument.one(
                        prompt.field,
                        "the weights make a chunk's mean zero, which A1111's mean restore divides by; change them",
                    )
                    break
        return results

    def _embeddings(
        self, job: EncodeJob, parts: LoadedModel, encoder_names: list[str]
    ) -> list[tuple[Embedding, float]]:
        """Loads the request's embeddings and checks each fits this model's encoders (SD1 vs SDXL files)."""
        loaded, violations = [], []
        chunk_tokens = min(tokenizer_for(parts, name).model_max_length for name in encoder_names) - 2
        for i, (model_id, weight) in enumerate(job.embeddings):
            field_name = f"embeddings[{i}].model"
            embedding = self.embedding_files.get(model_id, field_name)
            halves = set(embedding.vectors)
            fits = set(encoder_names) <= halves and halves - set(encoder_names) <= {"text_encoder"}
            if fits and encoder_names == ["text_encoder"]:
                fits = halves == {"text_encoder"}
            widths = {name: parts[name].get_input_embeddings().embedding_dim for name in encoder_names}
            counts = {len(embedding.vectors[name]) for name in encoder_names if name in embedding.vectors}
            if not fits:
                kind = "SDXL (clip_l + clip_g)" if "text_encoder_2" in halves else "SD1.x"
                violations.append((field_name, f"{model_id!r} is an {kind} embedding; it does not fit {job.model!r}"))
            elif any(embedding.vectors[name].shape[-1] != width for name, width in widths.items()):
                violations.append((field_name, f"{model_id!r} has vectors of the wrong width for {job.model!r}"))
            elif len(counts) > 1 or max(counts) > chunk_tokens:
                violations.append(
                    (field_name, f"{model_id!r}: halves must have equal vector counts of at most {chunk_tokens}")
                )
            loaded.append((embedding, weight))
        if violations:
            raise InvalidArgument(violations)
        return loaded

    def _cache_key(self, job: EncodeJob, info: ModelInfo, embeddings: list[tuple[Embedding, float]]) -> tuple:
        """Everything a result depends on, files by identity (path, mtime, size) so a replaced file misses."""
        loras = []
        for i, (model_id, weight) in enumerate(job.loras):
            path = resolve_lora(self.store, model_id, f"loras[{i}].model")
            stat = path.stat()
            loras.append((model_id, weight, str(path), stat.st_mtime_ns, stat.st_size))
        return (
            info.model_id,
            str(info.path),
            job.positive_prompt,
            job.negative_prompt,
            job.include_negative,
            job.clip_skip,
            job.prompt_weighting,
            tuple(loras),
            tuple((e.identity, w) for e, w in embeddings),
        )


def _assemble(parts: LoadedModel, encoder_names: list[str], per_encoder: dict, prompt: _Prompt, first_row: int):
    """A prompt's conditioning: each chunk emphasised on its own (as A1111), chunks then encoders concatenated;
    the pooled output is the first chunk's, projected on that row alone."""
    embeds, pooled = [], None
    for name in encoder_names:
        rows = per_encoder[name]
        chunks = [
            emphasise(rows.hidden[first_row + i], chunk.multipliers) for i, chunk in enumerate(prompt.chunks[name])
        ]
        embeds.append(torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0])
        if pooled is None and isinstance(parts[name], CLIPTextModelWithProjection):
            pooled = project_pooled(parts[name], rows.pooled, first_row)
    return Conditioning(torch.cat(embeds, dim=-1) if len(embeds) > 1 else embeds[0], pooled)


def _pad_to_equal_chunks(prompts: list[_Prompt], parts: LoadedModel, encoder_names: list[str]) -> list[str]:
    """Pads the shorter of positive/negative with empty chunks (as A1111) so their shapes match for CFG."""
    if len(prompts) < 2:
        return []
    counts = [len(p.chunks[encoder_names[0]]) for p in prompts]
    target = max(counts)
    notes = []
    for prompt, count, other in zip(prompts, counts, reversed(prompts), strict=True):
        if count < target:
            for name in encoder_names:
                prompt.chunks[name] = prompt.chunks[name] + [empty_chunk(tokenizer_for(parts, name))] * (target - count)
            notes.append(f"{prompt.field}: padded with {target - count} empty chunks to match {other.field}")
    return notes


def tokenizer_for(parts: LoadedModel, encoder_name: str):
    """The tokenizer that feeds `encoder_name` in a model's components: diffusers names them in pairs,
    text_encoder / tokenizer, text_encoder_2 / tokenizer_2, ..."""
    return parts[encoder_name.replace("text_encoder", "tokenizer")]


def _zeros_like(positive: Conditioning) -> Conditioning:
    # diffusers' force_zeros_for_empty_prompt: torch.zeros_like(prompt_embeds), whatever its length.
    pooled = positive.pooled_prompt_embeds
    return Conditioning(torch.zeros_like(positive.prompt_embeds), None if pooled is None else torch.zeros_like(pooled))


def _too_long(tokens: int, chunks: int, maximum: int) -> str:
    return (
        f"{tokens} tokens make {chunks} chunks of {CHUNK_TOKENS}; at most {maximum} chunks "
        f"({maximum * CHUNK_TOKENS} tokens): shorten the prompt or raise TRIPTYCH_MAX_PROMPT_CHUNKS"
    )
