"""The encoder's cache, dynamic batching and catalogue, through real processes: neither the cache nor a shared
forward pass changes a single byte of a response."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from safetensors.torch import save_file

from tests.e2e.processes import serve_role
from triptych.client import open_channel
from triptych.v1 import (
    common_pb2,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    runtime_service_pb2,
    runtime_service_pb2_grpc,
)

A1111 = encoder_service_pb2.PROMPT_WEIGHTING_A1111
Request = encoder_service_pb2.EncodeRequest


@pytest.fixture(scope="module")
def solo_encoder(model_root):
    """A second encoder process, started as a user would, with the cache off and a 50 ms batching window."""
    env = {
        "TRIPTYCH_ENCODER_CACHE_BYTES": "0",
        "TRIPTYCH_ENCODER_BATCH_WAIT_MS": "50",
        "TRIPTYCH_ENCODER_MAX_BATCH_ROWS": "64",
    }
    with serve_role("encoder", model_root, env) as (_, address):
        yield address


def stub(address: str):
    return encoder_service_pb2_grpc.TextEncoderServiceStub(open_channel(address))


def counters(address: str) -> dict[str, int]:
    with open_channel(address) as channel:
        info = runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
            runtime_service_pb2.GetRuntimeInfoRequest()
        )
    return dict(info.counters)


def mixed_requests() -> list:
    """Requests that differ in everything a shared pass must keep apart: model, clip skip, weighting, length,
    embeddings (per-row vectors) and LoRA sets (per-model state, never shared)."""
    ti = {"tiny/sd15": "tiny/ti-sd15", "tiny/sdxl": "tiny/ti-sdxl"}
    requests = []
    for i in range(24):
        model = ("tiny/sd15", "tiny/sdxl")[i % 2]
        request = Request(
            model=model,
            positive_prompt=f"a ({i} red:1.{i % 5}) fox" + ", in a deep forest at night" * (i % 4) * 5,
            negative_prompt="blurry" if i % 3 else "",
            include_negative=i % 5 != 0,
            clip_skip=i % 3,
            prompt_weighting=A1111 if i % 4 else 0,
        )
        if i % 6 == 1:
            request.embeddings.append(common_pb2.TextualInversion(model=ti[model], weight=1.0 + (i % 3) / 2))
        if model == "tiny/sd15" and i % 4 == 2:
            request.loras.append(common_pb2.Lora(model="tiny/lora-sd15-kohya", weight=0.5 + i / 10))
        requests.append(request)
    return requests


def test_concurrent_encodes_equal_one_at_a_time_byte_for_byte(solo_encoder, services):
    encoder, requests = stub(solo_encoder), mixed_requests()
    alone = [encoder.Encode(request).SerializeToString() for request in requests]
    before = counters(solo_encoder)
    with ThreadPoolExecutor(len(requests)) as pool:
        for _ in range(2):
            together = list(pool.map(lambda request: encoder.Encode(request).SerializeToString(), requests))
            assert together == alone
    after = counters(solo_encoder)
    shared = after["encode_shared_forward_passes"] - before["encode_shared_forward_passes"]
    served = after["encode_batched_requests"] - before["encode_batched_requests"]
    passes = after["encode_forward_passes"] - before["encode_forward_passes"]
    assert served == 2 * len(requests) and shared > 0 and passes < served, (shared, passes, served)
    # Another process, with its cache on and its own batches, gives the same bytes.
    assert [stub(services.addresses["encoder"]).Encode(r).SerializeToString() for r in requests] == alone


def test_a_cache_hit_equals_the_computed_result(services, solo_encoder):
    address = services.addresses["encoder"]
    request = Request(model="tiny/sdxl", positive_prompt=f"fox {uuid.uuid4()}", negative_prompt="dull")
    request.include_negative = True
    before = counters(address)
    first = stub(address).Encode(request).SerializeToString()
    second = stub(address).Encode(request).SerializeToString()
    after = counters(address)
    assert first == second == stub(solo_encoder).Encode(request).SerializeToString()
    assert after["encode_cache_misses"] - before["encode_cache_misses"] == 1
    assert after["encode_cache_hits"] - before["encode_cache_hits"] == 1
    assert after["encode_forward_passes"] - before["encode_forward_passes"] == 1
    # Anything the result depends on is part of the key.
    request.include_negative = False
    assert not stub(address).Encode(request).HasField("negative")


def test_a_replaced_embedding_file_misses_the_cache(services, solo_encoder, model_root):
    folder = model_root / "ti-cache"
    folder.mkdir(exist_ok=True)
    path = folder / "my-concept.safetensors"
    request = Request(model="tiny/sd15", positive_prompt="a my-concept fox")
    request.embeddings.append(common_pb2.TextualInversion(model="ti-cache/my-concept"))
    save_file({"emb_params": torch.full((2, 32), 0.5)}, str(path))
    first = stub(services.addresses["encoder"]).Encode(request).SerializeToString()
    save_file({"emb_params": torch.full((2, 32), -0.25)}, str(path))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new identity, however coarse mtime is
    second = stub(services.addresses["encoder"]).Encode(request).SerializeToString()
    assert second != first
    assert second == stub(solo_encoder).Encode(request).SerializeToString()


def test_list_text_encoders_describes_models_and_embeddings(services):
    encoder = stub(services.addresses["encoder"])
    listing = encoder.ListTextEncoders(encoder_service_pb2.ListTextEncodersRequest())
    models = {m.model: m for m in listing.models if m.model.startswith("tiny/")}  # demo/* too, once committed
    assert set(models) == {"tiny/sd15", "tiny/sdxl", "tiny/sdxl-refiner", "tiny/flux", "tiny/sd3"}, (
        "ControlNets and VAEs are not listed"
    )
    te = ("text_encoder", "CLIPTextModel", 32, 5, 0)
    te2 = ("text_encoder_2", "CLIPTextModelWithProjection", 32, 5, 32)
    t5 = ("T5EncoderModel", 80, 2, 0)
    expected = {
        "tiny/sd15": ("sd1", [te], 4, False),
        "tiny/sdxl": ("sdxl", [te, te2], 3, True),
        "tiny/sdxl-refiner": ("sdxl-refiner", [te2], 3, False),
        # Clip skip counts CLIP layers only; FLUX reads CLIP-L's pooled output (clip skip accepted, with a note).
        "tiny/flux": ("flux", [te, ("text_encoder_2", *t5)], 4, False),
        "tiny/sd3": ("sd3", [("text_encoder", *te2[1:]), te2, ("text_encoder_3", *t5)], 3, False),
    }
    for name, (family, encoders, max_clip_skip, zeros) in expected.items():
        model = models[name]
        described = [
            (e.component, e.class_name, e.hidden_size, e.num_hidden_layers, e.projection_dim) for e in model.encoders
        ]
        assert (model.family, described, model.max_clip_skip, model.zeros_for_empty_negative) == (
            family,
            encoders,
            max_clip_skip,
            zeros,
        )
        # The advertised range is the enforced one.
        encoder.Encode(Request(model=name, positive_prompt="fox", clip_skip=max_clip_skip))
        with pytest.raises(grpc.RpcError) as raised:
            encoder.Encode(Request(model=name, positive_prompt="fox", clip_skip=max_clip_skip + 1))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    embeddings = {e.model: (e.token, list(e.components), e.vector_count) for e in listing.embeddings}
    assert embeddings["tiny/ti-sd15"] == ("ti-sd15", ["text_encoder"], 2)
    assert embeddings["tiny/ti-sdxl"] == ("ti-sdxl", ["text_encoder", "text_encoder_2"], 2)
    assert not any("lora" in model for model in embeddings), "LoRA files are not embeddings"
    assert (listing.max_prompt_chunks, listing.chunk_tokens) == (10, 75)
