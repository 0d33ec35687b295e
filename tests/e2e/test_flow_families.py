"""FLUX and SD3 through the split chain (four processes, real gRPC) against diffusers' FluxPipeline and
StableDiffusion3Pipeline on the tiny weights (plain requests: test_oracle.py's cases): T5 lengths, LoRA, the
encoder's output equal to the pipelines' encode_prompt bit for bit, each process holding only its own components,
bad input naming its field."""

from __future__ import annotations

import diffusers
import grpc
import numpy as np
import pytest
import torch

from tests.e2e.reference import Oracle, pipeline, pixels
from triptych.client import field_violations, open_channel
from triptych.v1 import (
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    image_service_pb2,
    runtime_service_pb2,
    runtime_service_pb2_grpc,
)


def test_max_sequence_length_equals_diffusers_and_truncation_is_noted(client, oracle):
    long_prompt = " ".join(["a red fox in a dark forest"] * 8)
    for model, length in (("tiny/flux", 16), ("tiny/sd3", 24)):
        request = dict(model=model, positive_prompt=long_prompt, seed=3, width=64, height=64, steps=3, cfg_scale=4.0)
        chained = oracle.compare(client, {**request, "max_sequence_length": length}, max_sequence_length=length)
        assert any(f"first {length} tokens" in note for note in chained.image.notes), chained.image.notes


def test_flux_negative_prompt_is_ignored_and_noted(client):
    request = dict(model="tiny/flux", positive_prompt="a boat", seed=8, width=64, height=64, steps=3, cfg_scale=3.5)
    plain = Oracle.chain(client, request)
    negative = Oracle.chain(client, {**request, "negative_prompt": "ugly"})
    assert np.array_equal(plain.pixels, negative.pixels)
    assert any("negative_prompt: ignored" in note for note in negative.image.notes)


def test_flux_guidance_changes_the_image(client):
    request = dict(model="tiny/flux", positive_prompt="a boat", seed=8, width=64, height=64, steps=3)
    low = Oracle.chain(client, {**request, "cfg_scale": 1.0})
    high = Oracle.chain(client, {**request, "cfg_scale": 8.0})
    assert not np.array_equal(low.pixels, high.pixels), "CFGScale is FLUX's guidance embedding"


@pytest.mark.parametrize("model", ["tiny/flux", "tiny/sd3"])
def test_encoder_equals_encode_prompt(services, oracle, model):
    pipe = oracle.pipe(model)
    with open_channel(services.addresses["encoder"]) as channel:
        stub = encoder_service_pb2_grpc.TextEncoderServiceStub(channel)
        reply = stub.Encode(
            encoder_service_pb2.EncodeRequest(
                model=model, positive_prompt="a red fox", negative_prompt="fog", include_negative=True
            )
        )
    from triptych.runtime.codec import decode_tensor

    with torch.no_grad():
        if model == "tiny/flux":
            embeds, pooled, _ = pipe.encode_prompt("a red fox", prompt_2=None, max_sequence_length=512)
            assert not reply.HasField("negative")
        else:
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                "a red fox", None, None, negative_prompt="fog", do_classifier_free_guidance=True
            )
            assert torch.equal(decode_tensor(reply.negative.prompt_embeds, "n"), negative)
            assert torch.equal(decode_tensor(reply.negative.pooled_prompt_embeds, "n"), negative_pooled)
    assert torch.equal(decode_tensor(reply.positive.prompt_embeds, "p"), embeds)
    assert torch.equal(decode_tensor(reply.positive.pooled_prompt_embeds, "p"), pooled)
    assert reply.model_family == model.split("/")[1]


def test_processes_hold_only_their_own_components(client, services):
    for model in ("tiny/flux", "tiny/sd3"):
        client.generate(
            image_service_pb2.GenerateRequest(model=model, positive_prompt="x", seed=1, width=64, height=64, steps=2)
        )
    held = {}
    for role in ("encoder", "denoiser", "decoder"):
        with open_channel(services.addresses[role]) as channel:
            info = runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
                runtime_service_pb2.GetRuntimeInfoRequest()
            )
        held[role] = {c.component for c in info.loaded_components if c.model in ("tiny/flux", "tiny/sd3")}
    assert held["denoiser"] == {"transformer"}, "the denoiser holds no text encoder and no VAE"
    assert held["decoder"] == {"vae"}
    assert "transformer" not in held["encoder"] and "vae" not in held["encoder"]
    assert {"text_encoder_2", "text_encoder_3", "tokenizer_3"} <= held["encoder"]


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(model="tiny/flux", scheduler="Euler a"), "scheduler"),
        (dict(model="tiny/sd3", scheduler="DPM++ 2M"), "scheduler"),
        (dict(model="tiny/flux", width=72), "width"),
        (dict(model="tiny/flux", max_sequence_length=600), "max_sequence_length"),
        (dict(model="tiny/sd3", prompt_weighting=1), "prompt_weighting"),
        (dict(model="tiny/flux", embeddings=[dict(model="tiny/ti-sd15")]), "embeddings"),
        (dict(model="tiny/sd3", steps=4, refiner=dict(model="tiny/sdxl-refiner", start_step=2)), "refiner.model"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}" for k in v),
)
def test_bad_input_names_the_field_and_the_service_keeps_serving(client, fields, field):
    request = {**dict(positive_prompt="x", seed=1, width=64, height=64, steps=2), **fields}
    with pytest.raises(grpc.RpcError) as error:
        client.generate(image_service_pb2.GenerateRequest(**request))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [name for name, _ in field_violations(error.value)], field_violations(error.value)
    good = dict(model="tiny/flux", positive_prompt="x", seed=1, width=64, height=64, steps=2)
    (image,) = client.generate(image_service_pb2.GenerateRequest(**good))
    assert pixels(image.image.data).shape == (64, 64, 3)


def test_list_schedulers_answers_per_family(services):
    from triptych.v1 import denoiser_service_pb2, denoiser_service_pb2_grpc

    with open_channel(services.addresses["denoiser"]) as channel:
        stub = denoiser_service_pb2_grpc.DenoiserServiceStub(channel)
        flux = stub.ListSchedulers(denoiser_service_pb2.ListSchedulersRequest(model="tiny/flux")).schedulers
        sd = stub.ListSchedulers(denoiser_service_pb2.ListSchedulersRequest(model="tiny/sd15")).schedulers
    assert {row.class_name for row in flux} == {"FlowMatchEulerDiscreteScheduler"}
    assert "Euler" in {row.name for row in flux} and "Euler a" not in {row.name for row in flux}
    assert "Euler a" in {row.name for row in sd}


@pytest.mark.parametrize(
    "model, loras",
    [
        ("tiny/flux", [("lora-flux", 0.8)]),
        ("tiny/sd3", [("lora-sd3", 1.0)]),
        ("tiny/sd3", [("lora-sd3", -0.6)]),
    ],
)
def test_lora_equals_diffusers(client, oracle, model_root, model, loras):
    """Reference: diffusers' load_lora_weights + set_adapters on the family's own pipeline."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(model_root / model)
    pipe.set_progress_bar_config(disable=True)
    names = [f"a{i}" for i in range(len(loras))]
    for name, (file, _) in zip(names, loras, strict=True):
        pipe.load_lora_weights(model_root / "tiny", weight_name=f"{file}.safetensors", adapter_name=name)
    pipe.set_adapters(names, [weight for _, weight in loras])
    request = dict(
        model=model, positive_prompt="a red fox", seed=4, width=64, height=64, steps=3, cfg_scale=4.0,
        lora=[dict(model=f"tiny/{file}", weight=weight) for file, weight in loras],
    )  # fmt: skip
    chained = oracle.compare(client, request, pipeline(pipe))
    plain = Oracle.chain(client, {key: value for key, value in request.items() if key != "lora"})
    assert not np.array_equal(plain.pixels, chained.pixels), "the LoRA changes the image"


@pytest.mark.parametrize(
    "model, lora", [("tiny/sd15", "tiny/lora-flux"), ("tiny/flux", "tiny/lora-sd3"), ("tiny/sd3", "tiny/lora-flux")]
)
def test_a_lora_of_another_family_names_the_field(client, model, lora):
    request = dict(model=model, positive_prompt="x", seed=1, width=64, height=64, steps=2, lora=[dict(model=lora)])
    with pytest.raises(grpc.RpcError) as error:
        client.generate(image_service_pb2.GenerateRequest(**request))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lora[0].model" in [name for name, _ in field_violations(error.value)], field_violations(error.value)
