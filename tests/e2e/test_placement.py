"""TRIPTYCH_DTYPE: the services in bfloat16 against diffusers' pipeline in bfloat16, same weights, same seed.

There is no GPU here, so the device stays cpu; the dtype path (weights, noise, conditioning, scheduler steps and
the VAE in the chosen dtype, float32 on the wire) is the one a GPU runs in fp16/bf16. Two chains: an encoder in
bfloat16 too (the reference encodes the prompt strings itself), and the session's float32 encoder (the reference
gets its embeddings, which a pipeline in bfloat16 casts as our denoiser does).
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from tests.e2e.processes import serve_role
from tests.e2e.reference import pipeline, pixels
from triptych.client import ImageClient, open_channel
from triptych.runtime.codec import decode_tensor
from triptych.v1 import encoder_service_pb2, encoder_service_pb2_grpc, image_service_pb2

BF16 = {"TRIPTYCH_DTYPE": "bfloat16"}


@pytest.fixture(scope="module")
def bf16_backends(model_root):
    with (
        serve_role("encoder", model_root, BF16) as (_, encoder),
        serve_role("denoiser", model_root, BF16) as (_, denoiser),
        serve_role("decoder", model_root, BF16) as (_, decoder),
    ):
        yield {"encoder": encoder, "denoiser": denoiser, "decoder": decoder}


@pytest.fixture(scope="module")
def bf16_gateway(services, model_root, bf16_backends):
    """bfloat16 denoiser and decoder behind the session's float32 encoder."""
    backends = (
        f"--encoder-address={services.addresses['encoder']}",
        f"--denoiser-address={bf16_backends['denoiser']}",
        f"--decoder-address={bf16_backends['decoder']}",
    )
    with serve_role("gateway", model_root, args=backends) as (_, address):
        yield address


@pytest.fixture(scope="module")
def all_bf16_gateway(model_root, bf16_backends):
    backends = tuple(f"--{role}-address={address}" for role, address in bf16_backends.items())
    with serve_role("gateway", model_root, args=backends) as (_, address):
        yield address


@pytest.fixture(scope="module")
def bf16_pipe(model_root):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_root / "tiny/sd15", torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_all_services_in_bfloat16_equal_diffusers_in_bfloat16(oracle, all_bf16_gateway, bf16_pipe):
    request = dict(model="tiny/sd15", positive_prompt="a red fox", negative_prompt="blurry", seed=3, steps=5)
    with ImageClient(all_bf16_gateway) as client:
        oracle.compare(client, request, pipeline(bf16_pipe))


@pytest.mark.parametrize("scheduler", ["", "Euler a"])
def test_bfloat16_chain_equals_diffusers_in_bfloat16(services, oracle, model_root, bf16_gateway, scheduler):
    request = dict(model="tiny/sd15", positive_prompt="a red fox", negative_prompt="blurry", seed=11, steps=6)
    with open_channel(services.addresses["encoder"]) as channel:
        encoded = encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode(
            encoder_service_pb2.EncodeRequest(
                model="tiny/sd15", positive_prompt="a red fox", negative_prompt="blurry", include_negative=True
            )
        )
    # A pipeline of its own: the request's scheduler is set on it.
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_root / "tiny/sd15", torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    embeds = dict(
        prompt_embeds=decode_tensor(encoded.positive.prompt_embeds, "positive").clone(),
        negative_prompt_embeds=decode_tensor(encoded.negative.prompt_embeds, "negative").clone(),
    )
    with ImageClient(bf16_gateway) as client:
        ours = oracle.compare(client, {**request, "scheduler": scheduler}, pipeline(pipe), **embeds).pixels

    with ImageClient(services.gateway) as client:  # and bfloat16 really is another computation than float32
        float32 = pixels(
            client.generate(image_service_pb2.GenerateRequest(**request, scheduler=scheduler))[0].image.data
        )
    assert not np.array_equal(ours, float32)
