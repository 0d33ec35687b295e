"""Prompts as A1111-style 77-token chunks, with the real CLIP tokenizer (written offline, as the tiny models')."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from triptych.encoder.chunks import empty_chunk, placed_tokens, split_into_chunks
from triptych.encoder.prompt_syntax import literal, parse_weighted
from triptych.encoder.textual_inversion import PLACEHOLDER_ID, Embedding
from triptych.model_builders.clip_vocab import write_clip_tokenizer

BOS, EOS, A = 49406, 49407, 320  # "a" is one token


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_clip_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tokenizer_2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer_2")
    write_clip_tokenizer(directory, pad_token="!")  # SDXL's second tokenizer pads with "!" (id 0)
    return CLIPTokenizer.from_pretrained(directory)


def words(n: int) -> str:
    return " ".join(["a"] * n)


@pytest.mark.parametrize("prompt", ["", "a red fox", "(a) [castle], oil painting", words(75)])
def test_up_to_75_tokens_is_one_chunk_with_diffusers_ids(tokenizer, tokenizer_2, prompt):
    for tok in (tokenizer, tokenizer_2):
        chunked = split_into_chunks(tok, literal(prompt), [], "text_encoder")
        expected = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert [list(c.input_ids) for c in chunked.chunks] == [expected]
        assert bool((chunked.chunks[0].multipliers == 1).all())


def test_chunks_are_cut_at_exactly_75_tokens(tokenizer):
    chunked = split_into_chunks(tokenizer, literal(words(151)), [], "text_encoder")
    assert chunked.token_count == 151
    assert [c.input_ids for c in chunked.chunks] == [
        (BOS, *[A] * 75, EOS),
        (BOS, *[A] * 75, EOS),
        (BOS, A, EOS, *[EOS] * 74),
    ]


def test_padding_uses_the_tokenizers_pad_token(tokenizer_2):
    chunked = split_into_chunks(tokenizer_2, literal(words(76)), [], "text_encoder_2")
    assert chunked.chunks[1].input_ids == (BOS, A, EOS, *[0] * 74)
    assert empty_chunk(tokenizer_2).input_ids == (BOS, EOS, *[0] * 75)


def test_weights_become_per_token_multipliers(tokenizer):
    chunked = split_into_chunks(tokenizer, parse_weighted("a (a:1.5) [a]"), [], "text_encoder")
    expected = torch.tensor([1.0, 1.0, 1.5, 1 / 1.1, 1.0, *[1.0] * 72])
    assert torch.equal(chunked.chunks[0].multipliers, expected)


def test_break_closes_the_chunk(tokenizer):
    chunks = split_into_chunks(tokenizer, parse_weighted("a a BREAK a"), [], "text_encoder").chunks
    assert [c.input_ids[:4] for c in chunks] == [(BOS, A, A, EOS), (BOS, A, EOS, EOS)]
    leading = split_into_chunks(tokenizer, parse_weighted("BREAK a"), [], "text_encoder").chunks
    assert [c.input_ids[:3] for c in leading] == [(BOS, EOS, EOS), (BOS, A, EOS)], "as A1111: an empty chunk"
    trailing = split_into_chunks(tokenizer, parse_weighted("a BREAK"), [], "text_encoder").chunks
    assert len(trailing) == 1, "as A1111: a trailing BREAK adds no chunk"


def test_an_embedding_never_straddles_two_chunks(tokenizer):
    vectors = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4)
    embedding = Embedding("my-concept", {"text_encoder": vectors})
    fragments = [*parse_weighted(words(73) + " (my-concept:1.2)")]
    chunked = split_into_chunks(tokenizer, fragments, [(embedding, 0.5)], "text_encoder")
    first, second = chunked.chunks
    assert first.input_ids == (BOS, *[A] * 73, EOS, EOS, EOS) and first.substitutions == ()
    assert second.input_ids[:5] == (BOS, PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID, EOS)
    assert [p for p, _ in second.substitutions] == [1, 2, 3]
    assert all(torch.equal(v, vectors[i]) for i, (_, v) in enumerate(second.substitutions))
    # The prompt's weight times the embedding's own.
    assert torch.equal(second.multipliers[1:4], torch.full((3,), 1.2 * 0.5))
    assert chunked.token_count == 76


def test_an_embedding_without_vectors_for_this_encoder_is_dropped(tokenizer):
    embedding = Embedding("sdxl-only", {"text_encoder_2": torch.ones(2, 4)})
    chunked = split_into_chunks(tokenizer, literal("a sdxl-only a"), [(embedding, 1.0)], "text_encoder")
    assert chunked.chunks[0].input_ids[:4] == (BOS, A, A, EOS)


def test_the_longest_embedding_token_wins_and_matching_ignores_case(tokenizer):
    """As the tokenizer matches diffusers' added tokens: longest first and in any case, so "EasyNegativeV2" is that
    embedding, not "EasyNegative" followed by the text "V2", whichever order the request lists them in."""
    short = Embedding("EasyNegative", {"text_encoder": torch.ones(1, 32)})
    long = Embedding("EasyNegativeV2", {"text_encoder": torch.full((2, 32), 2.0)})
    for embeddings in ([(short, 1.0), (long, 1.0)], [(long, 1.0), (short, 1.0)]):
        fragments = literal("a easynegativev2 and EASYNEGATIVE")
        assert placed_tokens(fragments, embeddings) == {"EasyNegative", "EasyNegativeV2"}
        chunk = split_into_chunks(tokenizer, fragments, embeddings, "text_encoder").chunks[0]
        vectors = [float(vector[0]) for _, vector in chunk.substitutions]
        assert vectors == [2.0, 2.0, 1.0], "the two vectors of V2, then EasyNegative's one"
        text = [i for i in chunk.input_ids if i not in (BOS, EOS, PLACEHOLDER_ID)]
        assert text == tokenizer("a and", add_special_tokens=False).input_ids, "no stray 'v2' text"
    assert placed_tokens(literal("a fox"), [(short, 1.0), (long, 1.0)]) == set()
