"""Issue 15, finding 9: a gateway admits Generates against the denoisers' capacity before it encodes anything, so a
request that would be refused costs the encoder nothing (overload used to burn encoder CPU on refused requests)."""

from __future__ import annotations

import threading

import grpc

from tests.e2e.processes import serve_role
from tests.e2e.stubs import tiny_generate
from tests.e2e.test_services import runtime_info
from triptych.client import ImageClient


def _encodes(address: str) -> int:
    counters = runtime_info(address).counters
    return counters.get("encode_cache_hits", 0) + counters.get("encode_cache_misses", 0)


def test_generates_beyond_the_denoisers_capacity_are_refused_before_encoding(services, model_root):
    backends = tuple(f"--{role}-address={services.addresses[role]}" for role in ("encoder", "denoiser", "decoder"))
    env = {"TRIPTYCH_GATEWAY_QUEUE_PER_MODEL": "1"}
    with serve_role("gateway", model_root, env, backends) as (_, gateway), ImageClient(gateway) as client:
        started, release = threading.Event(), threading.Event()
        outcome = {}

        def slow() -> None:  # holds the model's one slot while the test sends more
            try:
                for event in client.stream(tiny_generate(positive_prompt="admission holder", steps=40)):
                    started.set()
                    if event.HasField("progress"):
                        release.wait(60)
                outcome["slow"] = "ok"
            except grpc.RpcError as error:
                outcome["slow"] = error.code()

        holder = threading.Thread(target=slow)
        holder.start()
        assert started.wait(60)
        before = _encodes(services.addresses["encoder"])
        refused = []
        for i in range(3):
            try:
                client.generate(tiny_generate(positive_prompt=f"refused {i}"))
            except grpc.RpcError as error:
                refused.append(error.code())
        assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        assert _encodes(services.addresses["encoder"]) == before, "a refused Generate encoded nothing"
        assert client.generate(tiny_generate(model="tiny/sdxl"))  # another model has its own slots
        release.set()
        holder.join(120)
        assert outcome["slow"] == "ok"
        assert client.generate(tiny_generate(positive_prompt="after"))  # the slot came back
