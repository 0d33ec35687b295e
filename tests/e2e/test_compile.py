"""Merged LoRAs (TRIPTYCH_LORA_MODE=merged) and a compiled UNet (TRIPTYCH_COMPILE=1), through real processes.

Merged: the denoiser adds the LoRA deltas into the UNet's weights, so the oracle is diffusers' own
`set_adapters` + `fuse_lora(components=["unet"])` (the encoder keeps the text half as adapters, as the pipeline
does after a UNet-only fuse). Bit-identical, across a sequence of switches that must each restore exactly.

Compiled (the denoiser's UNet and the decoder's VAE decoder): inductor reorders float arithmetic, so the chain
is compared with the eager merged chain within a pixel, and the LoRA must still change the image: the compiled
graph reads weights patched in place. Its graph count must not grow when the LoRA set changes (no recompile on a
switch).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.e2e.processes import chain_with, serve_role
from tests.e2e.reference import lora_pipe, pipeline, pixels
from tests.e2e.stubs import unit
from tests.e2e.test_services import runtime_info
from triptych.client import ImageClient, field_violations, open_channel
from triptych.v1 import (
    common_pb2,
    denoiser_service_pb2,
    denoiser_service_pb2_grpc,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    image_service_pb2,
)

KOHYA, PEFT = "tiny/lora-sd15-kohya", "tiny/lora-sd15-peft"
BASE = dict(
    model="tiny/sd15", positive_prompt="a red fox", negative_prompt="blurry", seed=23, width=64, height=64, steps=5
)
# Each set differs from the one before it, so every step is a switch (and the last repeats the first).
SWITCHES = [[(KOHYA, 0.7)], [(PEFT, 1.0)], [], [(KOHYA, 0.5), (PEFT, 0.8)], [(KOHYA, 0.7)]]


@pytest.fixture(scope="module")
def merged(services, model_root):
    with chain_with(services, model_root, {"TRIPTYCH_LORA_MODE": "merged"}) as (gateway, backends):
        yield gateway, backends["denoiser"]


def request(loras) -> dict:
    return dict(BASE, lora=[common_pb2.Lora(model=m, weight=w) for m, w in loras])


def generate(gateway: str, loras) -> np.ndarray:
    with ImageClient(gateway) as client:
        return pixels(client.generate(image_service_pb2.GenerateRequest(**request(loras)))[0].image.data)


def test_merged_loras_equal_diffusers_fuse_lora_across_switches(oracle, merged, model_root):
    gateway, denoiser = merged
    images = [generate(gateway, loras) for loras in SWITCHES]
    for loras, image in zip(SWITCHES, images, strict=True):
        expected = oracle.diffusers(request(loras), pipeline(lora_pipe(model_root, loras, fuse=True)))
        assert np.array_equal(image, expected), loras
    assert np.array_equal(images[0], images[-1]), "the same set after others gives the same image"
    assert not np.array_equal(images[0], images[2]), "a weighted LoRA changes the image"
    assert runtime_info(denoiser).counters["lora_disk_reads"] == 2, "each file is read once"


def test_merged_lora_errors_leave_the_weights_alone(merged, model_root):
    gateway, _ = merged
    before = generate(gateway, [(KOHYA, 0.7)])
    request = image_service_pb2.GenerateRequest(
        **BASE, lora=[common_pb2.Lora(model=KOHYA, weight=0.3), common_pb2.Lora(model="tiny/sd15", weight=1.0)]
    )
    with ImageClient(gateway) as client, pytest.raises(grpc.RpcError) as error:
        client.generate(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error.value)] == ["lora[1].model"]
    assert np.array_equal(generate(gateway, [(KOHYA, 0.7)]), before)


def test_a_merged_lora_of_another_family_leaves_the_unet_as_it_was(services, merged):
    """The sd15 LoRA fails half-way into SDXL's UNet (its shapes differ): no peft layer or weight change stays."""
    with open_channel(services.addresses["encoder"]) as channel:
        encoded = encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode(
            encoder_service_pb2.EncodeRequest(model="tiny/sdxl", positive_prompt="a red fox", include_negative=True)
        )
    request = denoiser_service_pb2.DenoiseRequest(
        model="tiny/sdxl", positive=encoded.positive, negative=encoded.negative, steps=3, seed=5, width=64, height=64
    )
    with open_channel(merged[1]) as channel:
        denoiser = denoiser_service_pb2_grpc.DenoiserServiceStub(channel)
        before = list(denoiser.Denoise(request))[-1].result.latents.data
        bad = denoiser_service_pb2.DenoiseRequest()
        bad.CopyFrom(request)
        bad.loras.add(model=KOHYA, weight=1.0)
        for _ in range(2):  # and again: nothing half-injected stays behind to make the second attempt differ
            with pytest.raises(grpc.RpcError) as error:
                list(denoiser.Denoise(bad))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [f for f, _ in field_violations(error.value)] == ["loras[0].model"]
        assert list(denoiser.Denoise(request))[-1].result.latents.data == before


@pytest.fixture(scope="module")
def compiled(services, model_root):
    env = {"TRIPTYCH_COMPILE": "1"}  # the denoiser's UNets and the decoder's VAE decoders compiled
    with chain_with(services, model_root, env, roles=("denoiser", "decoder")) as (gateway, backends):
        yield gateway, backends


def test_compiled_unet_switches_loras_without_recompiling(merged, compiled):
    eager = {i: generate(merged[0], loras) for i, loras in enumerate(SWITCHES[:3])}
    gateway, backends = compiled
    denoiser = backends["denoiser"]
    first = generate(gateway, SWITCHES[0])  # compiles (and once more for the first LoRA file: docs/decisions.md)
    graphs = runtime_info(denoiser).counters["compiled_graphs"]
    assert graphs > 0, "the UNet was compiled"
    assert runtime_info(backends["decoder"]).counters["compiled_graphs"] > 0, "the VAE decoder was compiled"
    images = {0: first, **{i: generate(gateway, SWITCHES[i]) for i in (1, 2)}}
    assert runtime_info(denoiser).counters["compiled_graphs"] == graphs, "a LoRA switch recompiled the UNet"
    for i, image in images.items():
        assert np.abs(image.astype(int) - eager[i]).max() <= 1, SWITCHES[i]
    assert not np.array_equal(images[0], images[2]), "the compiled graph reads the merged weights"


def test_compiled_unet_takes_controlnet_residuals(merged, compiled):
    request = image_service_pb2.GenerateRequest(**BASE, control_net=[unit(weight=1.5)])
    with ImageClient(merged[0]) as client:
        eager = pixels(client.generate(request)[0].image.data)
        plain = pixels(client.generate(image_service_pb2.GenerateRequest(**BASE))[0].image.data)
    with ImageClient(compiled[0]) as client:
        ours = pixels(client.generate(request)[0].image.data)
    assert np.abs(ours.astype(int) - eager).max() <= 1
    assert not np.array_equal(eager, plain), "the ControlNet changes the image"


def test_a_network_that_cannot_compile_runs_eager(services, model_root, tmp_path):
    """No working C++ compiler (CXX=/bin/false, a fresh inductor cache so nothing compiled earlier is reused): the
    compiled denoiser logs dynamo's warning and serves eager, bit-identical to the session's eager denoiser."""
    env = {"TRIPTYCH_COMPILE": "1", "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    with open_channel(services.addresses["encoder"]) as channel:
        encoded = encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode(
            encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt="a red fox", include_negative=True)
        )
    request = denoiser_service_pb2.DenoiseRequest(
        model="tiny/sd15", positive=encoded.positive, negative=encoded.negative, steps=3, seed=9, width=64, height=64
    )
    results = []
    with serve_role("denoiser", model_root, env) as (_, address):
        for target in (address, services.addresses["denoiser"]):
            with open_channel(target) as channel:
                events = list(denoiser_service_pb2_grpc.DenoiserServiceStub(channel).Denoise(request))
                results.append(events[-1].result.latents.data)
        assert runtime_info(address).counters["compiled_graphs"] == 0
    assert results[0] == results[1]
