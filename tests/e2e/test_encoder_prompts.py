"""Long prompts, A1111 weighting and embeddings in chunks, through the real encoder process and the chain,
against the written-out reference (tests/e2e/chunked_reference.py) and diffusers, bit for bit."""

from __future__ import annotations

import grpc
import pytest
import torch
from diffusers import StableDiffusionPipeline

from tests.e2e.chunked_reference import ChunkedReference
from triptych.client import field_violations, open_channel
from triptych.runtime.codec import decode_tensor
from triptych.v1 import common_pb2, encoder_service_pb2, encoder_service_pb2_grpc, image_service_pb2

A1111 = encoder_service_pb2.PROMPT_WEIGHTING_A1111
COLOURS, WOODS = ("red", "grey", "black", "white"), ("dark", "bright", "misty", "green")
LONG = ", ".join(f"a {c} fox in a {w} forest" for c in COLOURS for w in WOODS)  # 127 tokens: two chunks
LONGER = LONG + ", " + LONG  # 255 tokens: four chunks


@pytest.fixture(scope="module")
def encoder(services):
    with open_channel(services.addresses["encoder"]) as channel:
        yield encoder_service_pb2_grpc.TextEncoderServiceStub(channel)


@pytest.fixture(scope="module")
def ref(model_root):
    return {name: ChunkedReference(model_root / f"tiny/{name}") for name in ("sd15", "sdxl", "sdxl-refiner")}


def encode(encoder, model: str, prompt: str, negative: str | None = None, **fields):
    request = encoder_service_pb2.EncodeRequest(
        model=model, positive_prompt=prompt, negative_prompt=negative or "", include_negative=negative is not None
    )
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return encoder.Encode(request)


def tensor(message) -> torch.Tensor:
    return decode_tensor(message, "test").clone()


def assert_equal(conditioning, embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
    got = tensor(conditioning.prompt_embeds)
    assert got.shape == embeds.shape and torch.equal(got, embeds), f"max diff {(got - embeds).abs().max()}"
    if pooled is not None:
        assert torch.equal(tensor(conditioning.pooled_prompt_embeds), pooled)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("clip_skip", [0, 1])
def test_long_prompt_is_encoded_in_chunks_and_the_negative_padded(encoder, ref, model, clip_skip):
    reference = ref[model]
    chunks = reference.chunk_count([(LONGER, 1.0)])
    assert chunks == 4
    got = encode(encoder, f"tiny/{model}", LONGER, "blurry, low quality", clip_skip=clip_skip)
    embeds, pooled = reference.encode([(LONGER, 1.0)], clip_skip)
    assert_equal(got.positive, embeds, pooled)
    negative, negative_pooled = reference.encode([("blurry, low quality", 1.0)], clip_skip, pad_to=chunks)
    assert_equal(got.negative, negative, negative_pooled)
    assert any("encoded as 4 chunks" in note for note in got.notes), got.notes
    assert any("negative_prompt: padded with 3 empty chunks" in note for note in got.notes), got.notes


def test_a_longer_negative_pads_the_positive(encoder, ref):
    got = encode(encoder, "tiny/sdxl", "a fox", LONG)
    assert_equal(got.positive, *ref["sdxl"].encode([("a fox", 1.0)], pad_to=2))
    assert_equal(got.negative, *ref["sdxl"].encode([(LONG, 1.0)]))


def test_sdxl_empty_negative_is_zeros_as_long_as_the_positive(encoder):
    got = encode(encoder, "tiny/sdxl", LONGER, "")
    assert tensor(got.negative.prompt_embeds).shape == (1, 4 * 77, 64)
    assert not tensor(got.negative.prompt_embeds).any() and not tensor(got.negative.pooled_prompt_embeds).any()


def test_refiner_long_prompt(encoder, ref):
    got = encode(encoder, "tiny/sdxl-refiner", LONG, "dull")
    assert_equal(got.positive, *ref["sdxl-refiner"].encode([(LONG, 1.0)]))
    assert_equal(got.negative, *ref["sdxl-refiner"].encode([("dull", 1.0)], pad_to=2))


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_a1111_weights_follow_the_written_out_maths(encoder, ref, model):
    prompt = "a (red:1.3) fox, [blurry], ((sharp)) BREAK (" + LONG + ":0.8)"
    fragments = [
        ("a ", 1.0),
        ("red", 1.3),
        (" fox, ", 1.0),
        ("blurry", 1 / 1.1),
        (", ", 1.0),
        ("sharp", 1.1 * 1.1),
        ("BREAK", None),
        (LONG, 0.8),
    ]
    got = encode(encoder, f"tiny/{model}", prompt, "(ugly:1.4)", prompt_weighting=A1111)
    assert_equal(got.positive, *ref[model].encode(fragments))
    assert_equal(got.negative, *ref[model].encode([("ugly", 1.4)], pad_to=3))


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("prompt", ["a red fox, oil painting", LONGER])
def test_a1111_mode_without_syntax_equals_literal(encoder, model, prompt):
    literal = encode(encoder, f"tiny/{model}", prompt, "blurry")
    weighted = encode(encoder, f"tiny/{model}", prompt, "blurry", prompt_weighting=A1111)
    assert weighted.positive.SerializeToString() == literal.positive.SerializeToString()
    assert weighted.negative.SerializeToString() == literal.negative.SerializeToString()


def test_literal_mode_keeps_brackets_as_text_like_diffusers(encoder, model_root):
    pipe = StableDiffusionPipeline.from_pretrained(model_root / "tiny/sd15")
    prompt = "a (red:1.3) fox BREAK [blurry]"
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True, "(ugly)")
    got = encode(encoder, "tiny/sd15", prompt, "(ugly)")
    assert_equal(got.positive, positive)
    assert_equal(got.negative, negative)


def test_an_embedding_that_does_not_fit_starts_the_next_chunk(encoder, model_root):
    """74 tokens, then the 2-vector embedding appended: it moves to chunk 2 whole (as A1111). The reference
    uses diffusers' load_textual_inversion (vocabulary rows) instead of our forward hook."""
    pipe = StableDiffusionPipeline.from_pretrained(model_root / "tiny/sd15")
    pipe.load_textual_inversion(model_root / "tiny/ti-sd15.safetensors", token="ti-sd15")
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    prompt = " ".join(["a"] * 74)
    ti_ids = tokenizer.convert_tokens_to_ids(["ti-sd15", "ti-sd15_1"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks = [[bos, *[320] * 74, eos, eos], [bos, *ti_ids, eos, *[eos] * 73]]
    weight = 1.5
    with torch.no_grad():
        zs = []
        for ids in chunks:
            z = text_encoder(torch.tensor([ids]))[0]
            multipliers = torch.tensor([weight if i in ti_ids else 1.0 for i in ids])
            original_mean = z.mean()
            z = z * multipliers.reshape(1, -1, 1)
            zs.append(z * (original_mean / z.mean()))
    got = encode(
        encoder, "tiny/sd15", prompt, embeddings=[common_pb2.TextualInversion(model="tiny/ti-sd15", weight=weight)]
    )
    assert_equal(got.positive, torch.cat(zs, dim=1))


@pytest.mark.parametrize("model", ["tiny/sd15", "tiny/sdxl"])
def test_chain_with_a_long_weighted_prompt_equals_diffusers_on_the_reference_embeddings(client, oracle, ref, model):
    prompt, negative = "(" + LONG + ":1.2), [dull]", "ugly"
    request = dict(
        model=model, positive_prompt=prompt, negative_prompt=negative, seed=11, width=64, height=64, steps=6,
        cfg_scale=6.0, prompt_weighting=A1111,
    )  # fmt: skip
    reference = ref[model.split("/")[1]]
    embeds, pooled = reference.encode([(LONG, 1.2), (", ", 1.0), ("dull", 1 / 1.1)])
    negative_embeds, negative_pooled = reference.encode([(negative, 1.0)], pad_to=2)
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
    if pooled is not None:
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    generated = oracle.compare(client, request, **kwargs).image
    # The encoder's remarks reach the caller of Generate.
    assert any(n.startswith("positive_prompt:") and "encoded as 2 chunks" in n for n in generated.notes), generated
    assert "negative_prompt: padded with 1 empty chunks to match positive_prompt" in generated.notes


def test_empty_prompt_works(encoder):
    got = encode(encoder, "tiny/sd15", "", "")
    assert tensor(got.positive.prompt_embeds).shape == (1, 77, 32) and not got.notes


@pytest.mark.parametrize(
    "fields,code,field",
    [
        (dict(positive_prompt="a " * 10_001), grpc.StatusCode.INVALID_ARGUMENT, "positive_prompt"),
        (dict(positive_prompt=" ".join(["a"] * 751)), grpc.StatusCode.INVALID_ARGUMENT, "positive_prompt"),
        (dict(negative_prompt="a BREAK " * 11), grpc.StatusCode.INVALID_ARGUMENT, "negative_prompt"),
        (dict(positive_prompt="(a:1.2.3)"), grpc.StatusCode.INVALID_ARGUMENT, "positive_prompt"),
        (dict(prompt_weighting=7), grpc.StatusCode.INVALID_ARGUMENT, "prompt_weighting"),
        (dict(clip_skip=4), grpc.StatusCode.INVALID_ARGUMENT, "clip_skip"),
        (dict(embeddings=[common_pb2.TextualInversion(model="tiny/nope")]), grpc.StatusCode.NOT_FOUND, "embeddings"),
    ],
)
def test_bad_input_is_named(encoder, client, fields, code, field):
    base = dict(model="tiny/sdxl", positive_prompt="a fox", include_negative=True, prompt_weighting=A1111)
    request = encoder_service_pb2.EncodeRequest(**{**base, **fields})
    with pytest.raises(grpc.RpcError) as raised:
        encoder.Encode(request)
    assert raised.value.code() == code and field in raised.value.details(), raised.value.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert field in [f for f, _ in field_violations(raised.value)]
    # The same through the gateway (its names: lora, embeddings), then the service still works.
    generate = image_service_pb2.GenerateRequest(
        model="tiny/sdxl", positive_prompt=request.positive_prompt, negative_prompt=request.negative_prompt,
        prompt_weighting=request.prompt_weighting, embeddings=request.embeddings, width=64, height=64, steps=2,
    )  # fmt: skip
    if request.HasField("clip_skip"):
        generate.clip_skip = request.clip_skip
    with pytest.raises(grpc.RpcError) as relayed:
        client.generate(generate)
    assert relayed.value.code() == code and field in relayed.value.details(), relayed.value.details()
    assert list(encoder.Encode(encoder_service_pb2.EncodeRequest(**base)).positive.prompt_embeds.shape) == [1, 77, 64]


def test_the_chunk_limit_names_itself(encoder):
    with pytest.raises(grpc.RpcError) as raised:
        encode(encoder, "tiny/sd15", " ".join(["a"] * 751))
    assert "751 tokens make 11 chunks of 75; at most 10 chunks (750 tokens)" in raised.value.details()
    assert "TRIPTYCH_MAX_PROMPT_CHUNKS" in raised.value.details()
    assert tensor(encode(encoder, "tiny/sd15", " ".join(["a"] * 750)).positive.prompt_embeds).shape == (1, 770, 32)
