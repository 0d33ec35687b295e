"""Prompts of the families that encode a prompt whole (FLUX, SD3): CLIP + T5 exactly as their diffusers pipelines'
encode_prompt, under the model's lock, outside the chunked CLIP path (no 75-token chunks, no A1111 weighting, no
textual inversion, no cross-request batching). T5 truncates at max_sequence_length, as diffusers does, and the
response says so in `notes`.
"""

from __future__ import annotations

import torch

from triptych.families.base import Family
from triptych.runtime.components import LoadedModel
from triptych.serving.errors import InvalidArgument


def check_whole_prompt_job(job, family: Family, parts: LoadedModel, clip_layers: int) -> int:
    """Everything the family cannot do with this job, reported at once; returns the max_sequence_length to use."""
    violations = []
    if job.prompt_weighting != "literal":
        violations.append(("prompt_weighting", f"A1111 prompt weighting is not supported for {family.name} models"))
    if job.embeddings:
        violations.append(("embeddings", f"textual inversion is not supported for {family.name} models"))
    most = family.max_clip_skip(clip_layers)
    if job.clip_skip > most:
        violations.append(("clip_skip", f"must be at most {most} for {job.model!r} ({clip_layers} CLIP layers)"))
    length = job.max_sequence_length or family.default_max_sequence_length
    limit = parts[family.t5_slot.tokenizer].model_max_length
    if not 1 <= length <= limit:
        violations.append(("max_sequence_length", f"must be between 1 and {limit} for {job.model!r} (got {length})"))
    if violations:
        raise InvalidArgument(violations)
    return length


def encode_whole(job, family: Family, parts: LoadedModel, max_sequence_length: int, conditioning_class, loras):
    """(positive, negative or None, notes): the family's encode_prompt for each prompt the request needs, with the
    request's LoRAs active on the text encoders (`loras`: the engine's LoraAdapters)."""
    notes: list[str] = []
    if job.clip_skip and not family.clip_skip_has_effect:
        notes.append(f"clip_skip: no effect on {family.name} models (they take CLIP's pooled output only)")
    with parts.lock, torch.no_grad():
        loras.activate(family, {slot.encoder: parts[slot.encoder] for slot in family.text_encoders}, job.loras)
        embeds, pooled, prompt_notes = family.encode_prompt(
            parts, job.positive_prompt, job.clip_skip, max_sequence_length, "positive_prompt"
        )
        notes += prompt_notes
        positive = conditioning_class(embeds, pooled).to_host()
        negative = None
        if not family.takes_negative_prompt:  # guidance-distilled: no unconditional pass, so no negative prompt
            if job.negative_prompt:
                notes.append(f"negative_prompt: ignored by {family.name} models (guidance-distilled, as Runware)")
        elif job.include_negative:
            embeds, pooled, prompt_notes = family.encode_prompt(
                parts, job.negative_prompt, job.clip_skip, max_sequence_length, "negative_prompt"
            )
            notes += prompt_notes
            negative = conditioning_class(embeds, pooled).to_host()
    return positive, negative, notes
