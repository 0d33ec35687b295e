"""A prompt as A1111-style 77-token chunks: [BOS, up to 75 tokens, EOS, padding], one forward pass each.

Mirrors AUTOMATIC1111's `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`: tokens fill a chunk of 75; a
textual-inversion embedding's vectors never straddle two chunks (if they do not fit in what is left of the
chunk, the chunk is closed and they start the next one); BREAK closes the chunk early. Unlike A1111 there is
no comma backtracking: a chunk is cut at exactly 75 tokens. A prompt of at most 75 tokens is one chunk whose
ids equal `tokenizer(prompt, padding="max_length", truncation=True)`, diffusers' own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from triptych.encoder.prompt_syntax import Fragment
from triptych.encoder.textual_inversion import PLACEHOLDER_ID, Embedding

CHUNK_TOKENS = 75  # CLIP's 77 positions less the begin and end tokens


@dataclass(frozen=True, eq=False)
class Chunk:
    """One encoder input row: ids [77], A1111 multipliers [77] and embedding vectors to write at positions."""

    input_ids: tuple[int, ...]
    multipliers: torch.Tensor
    substitutions: tuple[tuple[int, torch.Tensor], ...]


@dataclass(frozen=True)
class ChunkedPrompt:
    """A prompt's chunks for one text encoder, and how many tokens (embedding vectors included) it holds."""

    chunks: list[Chunk]
    token_count: int


def _token_pattern(token: str) -> re.Pattern:
    """Where an embedding's token stands in prompt text: in any case, as CLIP's tokenizer lowercases the prompt
    before it matches added tokens (diffusers' load_textual_inversion) and A1111 matches token ids."""
    return re.compile(re.escape(token), re.IGNORECASE)


def _pieces(
    fragments: list[Fragment], embeddings: list[tuple[Embedding, float]]
) -> Iterator[tuple[str, object, float]]:
    """("break", None, 1) | ("text", str, weight) | ("embedding", (Embedding, its weight), weight), in order."""
    for fragment in fragments:
        if fragment.is_break:
            yield "break", None, 1.0
            continue
        pieces: list[tuple[str, tuple[Embedding, float] | None]] = [(fragment.text, None)]
        # Longest token first, as the tokenizer's added-token matching: "EasyNegativeV2" is not "EasyNegative" + "V2".
        for item in sorted(embeddings, key=lambda item: len(item[0].token), reverse=True):
            split: list[tuple[str, tuple[Embedding, float] | None]] = []
            for text, owner in pieces:
                if owner is not None:
                    split.append((text, owner))
                    continue
                for i, part in enumerate(_token_pattern(item[0].token).split(text)):
                    if i:
                        split.append((item[0].token, item))
                    split.append((part, None))
            pieces = split
        for text, owner in pieces:
            if owner is not None:
                yield "embedding", owner, fragment.weight
            elif text.strip():
                yield "text", text, fragment.weight


def placed_tokens(fragments: list[Fragment], embeddings: list[tuple[Embedding, float]]) -> set[str]:
    """The tokens of `embeddings` that stand somewhere in the prompt's text (the rest are appended to it)."""
    return {value[0].token for kind, value, _ in _pieces(fragments, embeddings) if kind == "embedding"}


def split_into_chunks(
    tokenizer, fragments: list[Fragment], embeddings: list[tuple[Embedding, float]], component: str
) -> ChunkedPrompt:
    """Tokenizes weighted fragments into chunks for the text encoder `component` (its embedding vectors).

    A token's multiplier is its fragment's weight; an embedding vector's is the fragment's weight times the
    embedding's own weight.
    """
    length = tokenizer.model_max_length - 2
    chunks: list[Chunk] = []
    ids: list[int] = []
    multipliers: list[float] = []
    substitutions: list[tuple[int, torch.Tensor]] = []
    token_count = 0

    def close() -> None:
        nonlocal ids, multipliers, substitutions
        chunks.append(_chunk(tokenizer, ids, multipliers, substitutions))
        ids, multipliers, substitutions = [], [], []

    for kind, value, weight in _pieces(fragments, embeddings):
        if kind == "break":
            close()
        elif kind == "text":
            # Always this one call (no padding, no truncation): the fast tokenizer's settings are never mutated,
            # so request threads share it safely. verbose=False: a long fragment is expected here.
            for token in tokenizer(value, add_special_tokens=False, verbose=False).input_ids:
                if len(ids) == length:
                    close()
                ids.append(token)
                multipliers.append(weight)
                token_count += 1
        else:
            embedding, embedding_weight = value
            vectors = embedding.vectors.get(component)
            if vectors is None:
                continue  # e.g. an SDXL file without a clip_l half: the token is dropped for that encoder
            if len(vectors) > length:
                raise ValueError(f"{embedding.token} has {len(vectors)} vectors; a chunk holds {length}")
            if len(ids) + len(vectors) > length:
                close()
            for vector in vectors:
                substitutions.append((len(ids), vector))
                ids.append(PLACEHOLDER_ID)
                multipliers.append(weight * embedding_weight)
            token_count += len(vectors)
    if ids or not chunks:
        close()
    return ChunkedPrompt(chunks, token_count)


def empty_chunk(tokenizer) -> Chunk:
    """The chunk of an empty prompt, which pads a shorter prompt to its partner's chunk count (as A1111)."""
    return _chunk(tokenizer, [], [], [])


def _chunk(tokenizer, ids: list[int], multipliers: list[float], substitutions) -> Chunk:
    padding = tokenizer.model_max_length - 2 - len(ids)
    return Chunk(
        input_ids=(tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * padding),
        multipliers=torch.tensor([1.0, *multipliers, 1.0, *[1.0] * padding]),
        substitutions=tuple((position + 1, vector) for position, vector in substitutions),
    )
