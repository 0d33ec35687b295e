"""LoRA (text-encoder half in the encoder, UNet half in the denoiser) vs diffusers load_lora_weights + set_adapters."""

from __future__ import annotations

import os
import shutil

import grpc
import numpy as np
import pytest

from tests.e2e.reference import lora_pipe, pipeline, pixels
from tests.e2e.test_services import runtime_info
from triptych.client import field_violations
from triptych.v1 import common_pb2, image_service_pb2

KOHYA, PEFT = "tiny/lora-sd15-kohya", "tiny/lora-sd15-peft"
BASE = dict(
    model="tiny/sd15", positive_prompt="a red fox", negative_prompt="blurry", seed=17, width=64, height=64, steps=6
)


def request(loras: list[tuple[str, float]]) -> dict:
    return dict(BASE, lora=[common_pb2.Lora(model=m, weight=w) for m, w in loras])


def generate(client, loras: list[tuple[str, float]]) -> np.ndarray:
    return pixels(client.generate(image_service_pb2.GenerateRequest(**request(loras)))[0].image.data)


@pytest.mark.parametrize(
    "loras",
    [
        [(KOHYA, 0.0)],
        [(KOHYA, 0.7)],
        [(KOHYA, 1.0)],
        [(PEFT, 0.0)],
        [(PEFT, 0.7)],
        [(PEFT, 1.0)],
        [(KOHYA, 0.5), (PEFT, 0.8)],
    ],
    ids=["kohya-0", "kohya-0.7", "kohya-1", "peft-0", "peft-0.7", "peft-1", "kohya+peft"],
)
def test_lora_equals_diffusers(client, oracle, model_root, loras):
    got = oracle.compare(client, request(loras), pipeline(lora_pipe(model_root, loras))).pixels
    if any(w for _, w in loras):
        assert not np.array_equal(got, generate(client, [])), "a weighted LoRA must change the image"


def test_switching_lora_sets_leaks_nothing_and_reads_disk_once(client, oracle, services):
    base = generate(client, [])
    with_lora = generate(client, [(KOHYA, 0.9)])
    reads = {
        role: runtime_info(services.addresses[role]).counters["lora_disk_reads"] for role in ("encoder", "denoiser")
    }
    assert np.array_equal(generate(client, []), base), "no-LoRA after LoRA must equal the base model"
    assert np.array_equal(generate(client, [(KOHYA, 0.9)]), with_lora), "LoRA again equals the first LoRA run"
    after = {
        role: runtime_info(services.addresses[role]).counters["lora_disk_reads"] for role in ("encoder", "denoiser")
    }
    assert after == reads, "a LoRA already loaded is not read from disk again"
    assert np.array_equal(base, oracle.diffusers(request([])))


def test_a_lora_file_replaced_in_place_is_read_again(client, model_root):
    """Encoder and denoiser know an adapter by its file's identity too: the same model id over new bytes gives the
    new LoRA's image, not the one injected before (nor the encoder's cached embeddings of the old file)."""
    folder = model_root / "replaced"
    folder.mkdir(exist_ok=True)
    path = folder / "lora.safetensors"
    try:
        for i, source in enumerate((KOHYA, PEFT)):
            shutil.copyfile(model_root / f"{source}.safetensors", path)
            os.utime(path, ns=(10**18 + i, 10**18 + i))  # distinct even on a file system with coarse times
            assert np.array_equal(generate(client, [("replaced/lora", 0.9)]), generate(client, [(source, 0.9)]))
    finally:
        shutil.rmtree(folder)


def test_bad_lora_weight_is_named_as_in_the_request(client):
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(image_service_pb2.GenerateRequest(**BASE, lora=[common_pb2.Lora(model=KOHYA, weight=11)]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(raised.value)] == ["lora[0].weight"]


def test_unknown_lora_is_not_found(client):
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(image_service_pb2.GenerateRequest(**BASE, lora=[common_pb2.Lora(model="tiny/nope")]))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "tiny/nope" in raised.value.details()
    assert raised.value.details().startswith("lora[0].model"), "named as GenerateRequest names it"
    assert len(client.generate(image_service_pb2.GenerateRequest(**BASE))) == 1


def test_adapter_cache_is_bounded_by_bytes_and_eviction_changes_no_result(services, model_root):
    """A denoiser whose LoRA cache holds less than one adapter evicts on every switch, re-reads from disk,
    and still returns exactly the latents of a denoiser that never evicted."""
    from tests.e2e.processes import serve_role
    from tests.e2e.stubs import tiny_denoise
    from tests.e2e.test_services import runtime_info
    from triptych.client import open_channel
    from triptych.v1 import denoiser_service_pb2_grpc, encoder_service_pb2, encoder_service_pb2_grpc

    with open_channel(services.addresses["encoder"]) as channel:
        encoded = encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode(
            encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt="a fox", include_negative=True)
        )

    def latents(address: str, loras: list[tuple[str, float]]) -> bytes:
        with open_channel(address) as channel:
            stub = denoiser_service_pb2_grpc.DenoiserServiceStub(channel)
            lora = [common_pb2.Lora(model=m, weight=w) for m, w in loras]
            request = tiny_denoise({"tiny/sd15": encoded}, steps=3, seed=5, loras=lora)
            return [e.result for e in stub.Denoise(request) if e.HasField("result")][0].latents.data

    sequence = [[(KOHYA, 0.8)], [(PEFT, 0.6)], [(KOHYA, 0.8)], [], [(PEFT, 0.6)]]
    expected = [latents(services.addresses["denoiser"], loras) for loras in sequence]
    with serve_role("denoiser", model_root, env={"TRIPTYCH_LORA_CACHE_BYTES": "1"}) as (_, address):
        got = [latents(address, loras) for loras in sequence]
        counters = runtime_info(address).counters
    assert got == expected
    assert counters["lora_disk_reads"] == 4 and counters["lora_evictions"] >= 3
