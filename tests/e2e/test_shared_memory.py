"""Tensors through shared memory between processes on one host, and the bytes path whenever that is not possible.

The session's gateway and backends run on loopback with shared memory on (the default), so every other e2e test
(the diffusers oracle included) already goes through it; these tests show that it is really used, that it gives
the same bytes as the bytes path, that a backend which cannot use it costs one retry and nothing else, and that
bad ranges get clear errors.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.e2e.processes import serve_role
from tests.e2e.stubs import DEADLINE_S, open_stubs, tensor, tiny_decode, tiny_encode, tiny_generate
from tests.e2e.test_services import runtime_info
from triptych.client import ImageClient, field_violations
from triptych.serving import shm
from triptych.v1 import tensor_pb2

REQUEST = dict(model="tiny/sdxl", width=64, height=64, steps=3, seed=5)


def regions_on_host() -> set[str]:
    return {name for name in os.listdir(shm.SHM_DIR) if name.startswith("triptych-")}


def regions_held_by(pid: int) -> set[str]:
    """The shared-memory objects process `pid` has open (its file descriptors into /dev/shm)."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(shm.SHM_DIR + "/triptych-"):
                held.add(target.removeprefix(shm.SHM_DIR + "/"))
    return held


@pytest.fixture(scope="module")
def stubs(services):
    opened = open_stubs(services)
    yield opened
    opened.close()


@pytest.fixture
def region():
    owned = shm.OwnedRegion(1 << 20)
    yield owned
    owned.close()


def test_the_chain_passes_its_tensors_through_shared_memory(client, services):
    before = {role: runtime_info(services.addresses[role]).counters for role in ("encoder", "denoiser", "decoder")}
    client.generate(tiny_generate(**REQUEST))
    after = {role: runtime_info(services.addresses[role]).counters for role in ("encoder", "denoiser", "decoder")}

    def grew(role: str, counter: str) -> int:
        return after[role][counter] - before[role].get(counter, 0)

    assert grew("encoder", "shared_memory_writes") == 4  # prompt and pooled embeddings, positive and negative
    assert grew("denoiser", "shared_memory_reads") == 4
    assert grew("denoiser", "shared_memory_writes") == 1  # the latents
    assert grew("decoder", "shared_memory_reads") == 1
    assert runtime_info(services.gateway).counters.get("shared_memory_refused", 0) == 0


def test_bytes_only_gateway_gives_the_same_image_and_leaves_no_region(services, model_root, client):
    addresses = services.addresses
    backends = [f"--{role}-address={addresses[role]}" for role in ("encoder", "denoiser", "decoder")]
    before = regions_on_host()
    bytes_only = serve_role("gateway", model_root, {"TRIPTYCH_SHARED_MEMORY": "0"}, tuple(backends))
    with bytes_only as (_, address), ImageClient(address) as bytes_client:
        request = tiny_generate(**REQUEST, number_results=2)
        assert [i.image.data for i in bytes_client.generate(request)] == [
            i.image.data for i in client.generate(request)
        ]
    assert regions_on_host() <= before


def test_a_backend_without_shared_memory_costs_one_retry_then_bytes(services, model_root, client):
    """A denoiser that refuses shared memory: the gateway sends that call again in bytes, then stops offering it.
    Its pooled regions are removed when it stops."""
    addresses = services.addresses
    with serve_role("denoiser", model_root, {"TRIPTYCH_SHARED_MEMORY": "0"}) as (_, denoiser):
        backends = (
            f"--encoder-address={addresses['encoder']}",
            f"--denoiser-address={denoiser}",
            f"--decoder-address={addresses['decoder']}",
        )
        with serve_role("gateway", model_root, args=backends) as (process, address), ImageClient(address) as gateway:
            expected = client.generate(tiny_generate(**REQUEST))[0].image.data
            assert gateway.generate(tiny_generate(**REQUEST))[0].image.data == expected
            assert runtime_info(address).counters["shared_memory_refused"] == 1
            assert gateway.generate(tiny_generate(**REQUEST))[0].image.data == expected
            assert runtime_info(address).counters["shared_memory_refused"] == 1, "it stopped offering shared memory"
            held = regions_held_by(process.pid)
    assert held, "the gateway pooled regions for the encoder, which takes shared memory"
    # Only this gateway's own regions: other gateways on the host (another test run) may hold theirs.
    assert not held & regions_on_host()


def test_encode_into_a_range_matches_the_bytes_answer(stubs, region):
    plain = stubs.encoder.Encode(tiny_encode(model="tiny/sdxl"), timeout=DEADLINE_S)
    shared = stubs.encoder.Encode(
        tiny_encode(model="tiny/sdxl", output_shared_memory=region.slice(64, 1 << 19)), timeout=DEADLINE_S
    )
    for name in ("positive", "negative"):
        for part in ("prompt_embeds", "pooled_prompt_embeds"):
            got, want = getattr(getattr(shared, name), part), getattr(getattr(plain, name), part)
            assert not got.data and got.shared_memory.name == region.name
            assert got.shared_memory.offset % shm.ALIGN == 0 and got.shared_memory.offset >= 64
            assert list(got.shape) == list(want.shape)
            assert shm.read(got.shared_memory, "test") == want.data


def test_outputs_that_do_not_fit_come_back_as_bytes(stubs, region):
    plain = stubs.encoder.Encode(tiny_encode(), timeout=DEADLINE_S)
    pooled_size = len(plain.positive.prompt_embeds.data) - 1  # too small for the prompt embeddings
    shared = stubs.encoder.Encode(
        tiny_encode(output_shared_memory=region.slice(shm.HEADER, pooled_size)), timeout=DEADLINE_S
    )
    assert shared.positive.prompt_embeds.data == plain.positive.prompt_embeds.data
    assert not shared.positive.prompt_embeds.HasField("shared_memory")


def test_decode_reads_latents_from_a_range(stubs, region):
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    wire = tensor(latents)
    with open(shm.SHM_DIR + region.name, "r+b") as file:
        file.seek(4096)
        file.write(wire.data)
    wire.ClearField("data")
    wire.shared_memory.CopyFrom(region.slice(4096, latents.nbytes))
    shared = stubs.decoder.Decode(tiny_decode(latents=wire), timeout=DEADLINE_S)
    plain = stubs.decoder.Decode(tiny_decode(latents=tensor(latents)), timeout=DEADLINE_S)
    assert shared.images[0].data == plain.images[0].data


def _shared(region: tensor_pb2.SharedMemoryRegion, size: int = 1 * 4 * 8 * 8 * 4, data: bytes = b"") -> dict:
    wire = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 4, 8, 8], data=data)
    wire.shared_memory.CopyFrom(region)
    return {"latents": wire}


@pytest.mark.parametrize(
    "case, field",
    [
        ("bad name", "latents.shared_memory.name"),
        ("outside the object", "latents.shared_memory"),
        ("wrong size", "latents.shared_memory.byte_size"),
        ("data too", "latents.shared_memory"),
        ("in the header", "latents.shared_memory.offset"),
    ],
)
def test_bad_ranges_are_invalid_argument_naming_the_field(stubs, region, case, field):
    changes = {
        "bad name": _shared(tensor_pb2.SharedMemoryRegion(name="/etc/passwd", byte_size=1024)),
        "outside the object": _shared(region.slice((1 << 20) - 512, 1024)),
        "wrong size": _shared(region.slice(shm.HEADER, 1000)),
        "data too": _shared(region.slice(shm.HEADER, 1024), data=bytes(1024)),
        "in the header": _shared(region.slice(0, 1024)),
    }[case]
    with pytest.raises(grpc.RpcError) as raised:
        stubs.decoder.Decode(tiny_decode(**changes), timeout=DEADLINE_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in field_violations(raised.value)]
    stubs.decoder.Decode(tiny_decode(), timeout=DEADLINE_S)  # still serving


def test_a_missing_object_is_failed_precondition_of_type_shared_memory(stubs):
    missing = tensor_pb2.SharedMemoryRegion(name="/triptych-no-such-object", byte_size=1024)
    with pytest.raises(grpc.RpcError) as raised:
        stubs.decoder.Decode(tiny_decode(**_shared(missing)), timeout=DEADLINE_S)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "/triptych-no-such-object does not exist" in raised.value.details()
    failure = error_details_pb2.PreconditionFailure()
    rpc_status.from_call(raised.value).details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [("SHARED_MEMORY", "latents.shared_memory")]
    with pytest.raises(grpc.RpcError) as raised:
        stubs.encoder.Encode(tiny_encode(output_shared_memory=missing), timeout=DEADLINE_S)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_range_opens_only_with_its_owners_current_capability(stubs, region):
    """Issue 15, finding 7: anyone can list /dev/shm and name a gateway's region; without the capability its
    owner wrote into the header (renewed per call), a backend neither reads nor writes it."""
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with open(shm.SHM_DIR + region.name, "r+b") as file:
        file.seek(4096)
        file.write(latents.tobytes())
    before = Path(shm.SHM_DIR + region.name).read_bytes()
    stolen = region.slice(4096, latents.nbytes)
    guesses = {"none": b"", "another": bytes(32), "stale": stolen.capability}
    region.renew()  # as the pool does before it hands the region to the next call: the old capability is stale
    for name, capability in guesses.items():
        wire = tensor(latents)
        wire.ClearField("data")
        wire.shared_memory.CopyFrom(stolen)
        wire.shared_memory.capability = capability
        with pytest.raises(grpc.RpcError) as raised:
            stubs.decoder.Decode(tiny_decode(latents=wire), timeout=DEADLINE_S)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        output = region.slice(shm.HEADER, 1 << 19)
        output.capability = capability
        with pytest.raises(grpc.RpcError) as raised:
            stubs.encoder.Encode(tiny_encode(output_shared_memory=output), timeout=DEADLINE_S)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    after = Path(shm.SHM_DIR + region.name).read_bytes()
    assert after[shm.HEADER :] == before[shm.HEADER :], "nothing was written into the region"
    stubs.decoder.Decode(tiny_decode(), timeout=DEADLINE_S)  # still serving


def test_the_gateways_pooled_regions_refuse_a_stranger(client, stubs):
    """The attack as found: a caller lists the gateway's regions and asks the encoder to write into them."""
    client.generate(tiny_generate(**REQUEST))  # the gateway now has pooled regions in /dev/shm
    names = sorted(name for name in regions_on_host() if name.startswith("triptych-gw-"))
    assert names
    for name in names:
        target = tensor_pb2.SharedMemoryRegion(name="/" + name, offset=shm.HEADER, byte_size=1 << 19)
        with pytest.raises(grpc.RpcError) as raised:
            stubs.encoder.Encode(tiny_encode(output_shared_memory=target), timeout=DEADLINE_S)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
