"""Textual inversion through the chain vs diffusers' load_textual_inversion (and A1111's emphasis maths)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from tests.e2e.reference import pipeline, pixels
from triptych.v1 import common_pb2, image_service_pb2

SIZE = dict(width=64, height=64, steps=6, seed=23)


@pytest.fixture(scope="module")
def sd15(model_root):
    pipe = StableDiffusionPipeline.from_pretrained(model_root / "tiny/sd15")
    pipe.load_textual_inversion(model_root / "tiny/ti-sd15.safetensors", token="ti-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(model_root):
    pipe = StableDiffusionXLPipeline.from_pretrained(model_root / "tiny/sdxl")
    halves = load_file(model_root / "tiny/ti-sdxl.safetensors")
    pipe.load_textual_inversion(
        halves["clip_l"], token="ti-sdxl", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        halves["clip_g"], token="ti-sdxl", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def request(model, prompt, negative, embeddings) -> dict:
    """A request with these embeddings: [(model, weight)]."""
    tis = [common_pb2.TextualInversion(model=m, weight=w) for m, w in embeddings]
    return dict(model=model, positive_prompt=prompt, negative_prompt=negative, cfg_scale=7.0, **SIZE, embeddings=tis)


def chain(client, model, prompt, negative, embeddings) -> np.ndarray:
    ti_request = image_service_pb2.GenerateRequest(**request(model, prompt, negative, embeddings))
    return pixels(client.generate(ti_request)[0].image.data)


def emphasised(pipe, prompt: str, token: str, weight: float) -> torch.Tensor:
    """The reference emphasis, written out from DESIGN.md: scale the encoder output at the embedding's token
    positions by the weight, then restore the tensor's original mean."""
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True).input_ids
    token_ids = set(pipe.tokenizer.convert_tokens_to_ids([token, f"{token}_1"]))
    with torch.no_grad():
        z = pipe.text_encoder(torch.tensor([ids]))[0]
    multipliers = torch.tensor([weight if i in token_ids else 1.0 for i in ids])
    original_mean = z.mean()
    z = z * multipliers.reshape(1, -1, 1)
    return z * (original_mean / z.mean())


def test_sd15_positive_embedding_appended(client, oracle, sd15):
    ti_request = request("tiny/sd15", "a red fox", "blurry", [("tiny/ti-sd15", 1.0)])
    got = oracle.compare(client, ti_request, pipeline(sd15), prompt="a red fox ti-sd15").pixels
    assert not np.array_equal(got, chain(client, "tiny/sd15", "a red fox", "blurry", []))


def test_sd15_token_inside_the_prompt_takes_its_place(client, oracle, sd15):
    oracle.compare(client, request("tiny/sd15", "a ti-sd15 style fox", "", [("tiny/ti-sd15", 1.0)]), pipeline(sd15))


def test_sd15_token_matches_in_any_case(client, sd15):
    """CLIP's tokenizer lowercases the prompt before it matches diffusers' added tokens, and A1111 matches token
    ids: "TI-SD15" is the embedding too. (diffusers' own pipeline then writes only the first of this 2-vector
    embedding's vectors, since maybe_convert_prompt expands the token case-sensitively; the lower-case prompt is
    the reference, checked against diffusers above.)"""
    upper = chain(client, "tiny/sd15", "a TI-SD15 style fox", "", [("tiny/ti-sd15", 1.0)])
    assert np.array_equal(upper, chain(client, "tiny/sd15", "a ti-sd15 style fox", "", [("tiny/ti-sd15", 1.0)]))


def test_sd15_negative_weight_goes_to_the_negative_prompt(client, oracle, sd15):
    ti_request = request("tiny/sd15", "a red fox", "blurry", [("tiny/ti-sd15", -1.0)])
    oracle.compare(client, ti_request, pipeline(sd15), negative_prompt="blurry ti-sd15")


def test_sd15_one_embedding_in_both_prompts(client, oracle, sd15):
    """Listed once with each sign, an embedding goes to each prompt (twice with one sign is INVALID_ARGUMENT)."""
    ti_request = request("tiny/sd15", "a red fox", "blurry", [("tiny/ti-sd15", 1.0), ("tiny/ti-sd15", -1.0)])
    oracle.compare(client, ti_request, pipeline(sd15), prompt="a red fox ti-sd15", negative_prompt="blurry ti-sd15")


@pytest.mark.parametrize("weight", [2.0, 0.5, -1.5])
def test_sd15_emphasis_follows_the_a1111_maths(client, oracle, sd15, weight):
    if weight >= 0:
        positive = emphasised(sd15, "a red fox ti-sd15", "ti-sd15", weight)
        negative = emphasised(sd15, "blurry", "ti-sd15", 1.0)
    else:
        positive = emphasised(sd15, "a red fox", "ti-sd15", 1.0)
        negative = emphasised(sd15, "blurry ti-sd15", "ti-sd15", -weight)
    ti_request = request("tiny/sd15", "a red fox", "blurry", [("tiny/ti-sd15", weight)])
    oracle.compare(client, ti_request, pipeline(sd15), prompt_embeds=positive, negative_prompt_embeds=negative)


def test_sdxl_embedding_both_halves(client, oracle, sdxl):
    ti_request = request("tiny/sdxl", "a red fox", "", [("tiny/ti-sdxl", 1.0)])
    oracle.compare(client, ti_request, pipeline(sdxl), prompt="a red fox ti-sdxl")


def test_sdxl_negative_embedding_with_an_empty_negative_prompt(client, oracle, sdxl):
    """The SDXL base's zeros stand for no negative prompt; one that gets a negative embedding is its token."""
    ti_request = request("tiny/sdxl", "a red fox", "", [("tiny/ti-sdxl", -1.0)])
    got = oracle.compare(client, ti_request, pipeline(sdxl), negative_prompt="ti-sdxl").pixels
    assert not np.array_equal(got, chain(client, "tiny/sdxl", "a red fox", "", []))


def test_every_file_layout_gives_the_same_image(client, model_root):
    vectors = load_file(model_root / "tiny/ti-sd15.safetensors")["emb_params"]
    extra = model_root / "ti-formats"
    extra.mkdir(exist_ok=True)
    save_file({"ti-sd15": vectors}, extra / "ti-sd15.safetensors")  # diffusers {token: tensor}
    (extra / "a1111").mkdir(exist_ok=True)
    torch.save({"string_to_param": {"*": vectors}, "name": "ti-sd15", "step": 100}, extra / "a1111/ti-sd15.pt")
    expected = chain(client, "tiny/sd15", "a red fox", "", [("tiny/ti-sd15", 1.0)])
    assert np.array_equal(chain(client, "tiny/sd15", "a red fox", "", [("ti-formats/ti-sd15", 1.0)]), expected)
    assert np.array_equal(chain(client, "tiny/sd15", "a red fox", "", [("ti-formats/a1111/ti-sd15", 1.0)]), expected)


class NotATensor:  # pickled by reference: torch.load(weights_only=True) refuses it
    pass


@pytest.mark.parametrize(
    "embeddings,code,field",
    [
        ([("tiny/ti-none", 1.0)], grpc.StatusCode.NOT_FOUND, "embeddings[0].model"),
        ([("tiny/ti-sd15", 5.0)], grpc.StatusCode.INVALID_ARGUMENT, "embeddings[0].weight"),
        ([("tiny/ti-sd15", -4.5)], grpc.StatusCode.INVALID_ARGUMENT, "embeddings[0].weight"),
        ([("tiny/ti-sdxl", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "embeddings[0].model"),
        ([("ti-formats/pickle", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "embeddings[0].model"),
    ],
)
def test_bad_embeddings(client, model_root, embeddings, code, field):
    (model_root / "ti-formats").mkdir(exist_ok=True)
    torch.save(
        {"string_to_param": {"*": torch.ones(1, 32)}, "trainer": NotATensor()}, model_root / "ti-formats/pickle.pt"
    )
    with pytest.raises(grpc.RpcError) as raised:
        chain(client, "tiny/sd15", "a red fox", "", embeddings)
    assert raised.value.code() == code and field in raised.value.details(), raised.value.details()
    assert chain(client, "tiny/sd15", "a red fox", "", []).shape == (64, 64, 3)
