"""Fuzzing the live services: hypothesis generates and mutates requests (GenerateRequest protos, Runware JSON tasks
through the CLI's parser, and direct Encode / Denoise / Decode requests with random tensors and random bytes as guide
images) and sends them to the session's four processes.

Over the module, at least 10,000 requests: none may be answered INTERNAL or UNKNOWN (only OK, INVALID_ARGUMENT with
field violations, NOT_FOUND or RESOURCE_EXHAUSTED), none may hang (a deadline on every call), every process must
still be alive and SERVING after each test, and each process's resident memory may grow by at most RSS_BOUND over
the run (the encoder also by its own result cache's bound, `encoder_cache_bytes`): 128 MiB, about three times the
growth measured (at most ~40 MiB); a process that leaked 40 KB per request it received would exceed it. Examples
are derandomized, so CI sees the same requests every run; run with -s for the counts and latencies per outcome.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.fuzz_strategies import (
    DECODE_FIELDS,
    DENOISE_FIELDS,
    ENCODE_FIELDS,
    GENERATE_FIELDS,
    mutations,
    task_mutations,
)
from tests.e2e.stubs import (
    ROLES,
    Stubs,
    conditioning,
    open_stubs,
    rss_bytes,
    serving,
    set_path,
    tiny_decode,
    tiny_denoise,
    tiny_encode,
    tiny_generate,
    unit,
)
from triptych.client import TaskError, field_violations, requests_from_json
from triptych.serving.errors import SharedMemoryUnavailable
from triptych.serving.settings import Settings
from triptych.v1 import common_pb2, image_service_pb2
from triptych.v1.denoiser_service_pb2 import DenoisingWindow

FUZZ_DEADLINE_S = 20.0
MIB = 1024 * 1024
RSS_BOUND = 128 * MIB
EXAMPLES = {"gateway": 1200, "runware-json": 1000, "encoder": 3800, "denoiser": 2200, "decoder": 2600}
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
ALLOWED |= {grpc.StatusCode.FAILED_PRECONDITION}  # only a shared-memory range that is not on this host, see send()
SD15, SDXL, REFINER = "tiny/sd15", "tiny/sdxl", "tiny/sdxl-refiner"

SENT: Counter = Counter()  # role -> requests sent
OUTCOMES: Counter = Counter()  # (role, code name) -> count
SECONDS: Counter = Counter()  # (role, code name) -> total seconds
CLIENT_REFUSED = Counter()  # Runware tasks the client's parser refused (never sent)
FINISHED: set[str] = set()


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


@dataclass
class Env:
    stubs: Stubs
    encoded: dict
    generator_state: bytes
    latents: object  # a 64x64 window's latents, to continue from (and decode)
    pids: dict
    baseline_rss: dict
    rss_bound: dict = field(default_factory=dict)


GENERATE_BASES = {
    "sd15": {},
    "sd15-no-cfg": {"cfg_scale": 1.0},
    "sdxl": {"model": SDXL},
    "sdxl-refiner": {"model": SDXL, "refiner": image_service_pb2.Refiner(model=REFINER, start_step_percentage=50)},
    "sd15-loras": {"lora": [common_pb2.Lora(model="tiny/lora-sd15-kohya", weight=0.8),
                            common_pb2.Lora(model="tiny/lora-sd15-peft", weight=-0.5)]},
    "sd15-embedding": {"embeddings": [common_pb2.TextualInversion(model="tiny/ti-sd15", weight=-1.5)]},
    "sdxl-embedding": {"model": SDXL, "embeddings": [common_pb2.TextualInversion(model="tiny/ti-sdxl")]},
    "sd15-controlnet": {"control_net": [unit(control_mode=common_pb2.CONTROL_MODE_PROMPT)]},
    "sdxl-controlnet": {"model": SDXL, "control_net": [unit(model="tiny/controlnet-sdxl", end_step=1)]},
    "sd15-vae-alt": {"vae": "tiny/vae-alt", "output_format": 3},
}  # fmt: skip


@pytest.fixture(scope="module")
def env(services):
    stubs = open_stubs(services)
    encoded = conditioning(stubs)
    # Warm up: every model, adapter and code path loaded once, so the memory baseline holds what stays loaded.
    for changes in GENERATE_BASES.values():
        stubs.call("gateway", tiny_generate(**changes))
    stubs.call("decoder", tiny_decode(model=SDXL))
    result = stubs.call("denoiser", tiny_denoise(encoded, scheduler="Euler a"))[-1].result
    cache = Settings().encoder_cache_bytes
    bounds = {role: RSS_BOUND + (cache if role == "encoder" else 0) for role in ROLES}
    baseline = rss_bytes(services)
    yield Env(stubs, encoded, result.generator_state, result.latents, dict(services.pids), baseline, bounds)
    stubs.close()


def apply(env: Env, request: Message, changes) -> Message:
    """Writes (dotted path, value) changes into `request`; None clears the field."""
    for path, value in changes:
        if isinstance(value, tuple) and value and value[0] == "state-flip":
            state = bytearray(env.generator_state)
            for position in value[1]:
                state[position] ^= 0x5A
            value = bytes(state)
        set_path(request, path, value)
    return request


def send(env: Env, role: str, request: Message) -> None:
    """One fuzzed call: answered in time, with an allowed code; a success carries a real answer."""
    SENT[role] += 1
    started = time.perf_counter()
    try:
        responses = env.stubs.call(role, request, timeout=FUZZ_DEADLINE_S)
    except grpc.RpcError as error:
        OUTCOMES[role, error.code().name] += 1
        SECONDS[role, error.code().name] += time.perf_counter() - started
        shown = str(request)[:3000]
        assert error.code() in ALLOWED, f"{role} answered {error.code().name}: {error.details()}\n{shown}"
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert field_violations(error), f"INVALID_ARGUMENT without field violations: {error.details()}"
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            assert SharedMemoryUnavailable.matches(error), f"FAILED_PRECONDITION: {error.details()}"
        return
    OUTCOMES[role, "OK"] += 1
    SECONDS[role, "OK"] += time.perf_counter() - started
    if role == "gateway":
        images = [event for event in responses if event.HasField("image")]
        expected = request.number_results if request.HasField("number_results") else 1
        assert len(images) == expected and all(image.image.image.data for image in images)
    elif role == "denoiser":
        assert [event.HasField("result") for event in responses][-1:] == [True]
    elif role == "decoder":
        assert len(responses[0].images) == request.latents.shape[0]
    else:
        assert responses[0].positive.prompt_embeds.data


def check_still_serving(env: Env, services, name: str) -> None:
    state = serving(services)
    assert all(state.values()), f"after {name}: {state}"
    assert services.pids == env.pids, "a process was replaced"
    grown = {role: rss - env.baseline_rss[role] for role, rss in rss_bytes(services).items()}
    print(f"\n{name}: RSS growth MiB " + ", ".join(f"{r}={g / MIB:+.0f}" for r, g in grown.items()))
    assert all(grown[role] < env.rss_bound[role] for role in ROLES), grown
    FINISHED.add(name)


def test_fuzz_gateway_generate_requests(env, services):
    @fuzz(EXAMPLES["gateway"])
    @given(base=st.sampled_from(list(GENERATE_BASES)), changes=mutations(GENERATE_FIELDS))
    def one(base, changes):
        send(env, "gateway", apply(env, tiny_generate(steps=1, **GENERATE_BASES[base]), changes))

    one()
    check_still_serving(env, services, "gateway")


def cheap(request: image_service_pb2.GenerateRequest) -> image_service_pb2.GenerateRequest:
    """Valid but expensive sizes, steps and counts from arbitrary JSON become tiny ones; invalid ones stay."""
    for name, largest in (("width", 64), ("height", 64), ("steps", 2), ("number_results", 2)):
        value = getattr(request, name)
        valid = 8 <= value <= 2048 and value % 8 == 0 if name in ("width", "height") else 1 <= value <= 150
        if request.HasField(name) and valid and value > largest:
            setattr(request, name, largest)
    return request


def test_fuzz_runware_json_tasks(env, services):
    @fuzz(EXAMPLES["runware-json"])
    @given(base=st.sampled_from(["sd15", "sdxl", "sdxl-refiner"]), changes=task_mutations, as_array=st.booleans())
    def one(base, changes, as_array):
        task = {"positivePrompt": "a red fox", "model": SD15, "width": 64, "height": 64, "steps": 1, "seed": 1}
        if base != "sd15":
            task["model"] = SDXL
        if base == "sdxl-refiner":
            task["refiner"] = {"model": REFINER, "startStepPercentage": 50}
        for key, value in changes:
            if value is None:
                task.pop(key, None)
            else:
                task[key] = value
        try:
            requests = requests_from_json(json.dumps([task] if as_array else task))
        except TaskError as refused:
            assert refused.violations and all(key and why for key, why in refused.violations)
            CLIENT_REFUSED["tasks"] += 1
            return
        for request in requests:
            send(env, "gateway", cheap(request))

    one()
    check_still_serving(env, services, "runware-json")


def test_fuzz_encoder_requests(env, services):
    @fuzz(EXAMPLES["encoder"])
    @given(model=st.sampled_from([SD15, SDXL, REFINER]), changes=mutations(ENCODE_FIELDS))
    def one(model, changes):
        send(env, "encoder", apply(env, tiny_encode(model=model), changes))

    one()
    check_still_serving(env, services, "encoder")


def test_fuzz_denoiser_requests(env, services):
    @fuzz(EXAMPLES["denoiser"])
    @given(model=st.sampled_from([SD15, SDXL, REFINER]), hand_off=st.booleans(), changes=mutations(DENOISE_FIELDS))
    def one(model, hand_off, changes):
        request = tiny_denoise(env.encoded, model, steps=1, scheduler="Euler a")
        if hand_off:  # the second window of a base -> refiner hand-off: latents and generator state travel
            request.steps = 2
            request.window.CopyFrom(DenoisingWindow(start_fraction=0.5))
            request.latents.CopyFrom(env.latents)
            request.generator_state = env.generator_state
        send(env, "denoiser", apply(env, request, changes))

    one()
    check_still_serving(env, services, "denoiser")


def test_fuzz_decoder_requests(env, services):
    @fuzz(EXAMPLES["decoder"])
    @given(model=st.sampled_from([SD15, SDXL, REFINER]), changes=mutations(DECODE_FIELDS))
    def one(model, changes):
        send(env, "decoder", apply(env, tiny_decode(model=model, latents=env.latents), changes))

    one()
    check_still_serving(env, services, "decoder")


def test_fuzz_sent_ten_thousand_requests(env):
    total = sum(SENT.values())
    print(f"\nfuzz: {total} requests sent: {dict(SENT)}; {CLIENT_REFUSED['tasks']} tasks refused by the client parser")
    for (role, code), count in sorted(OUTCOMES.items()):
        print(f"  {role:9} {code:18} {count:6}  mean {SECONDS[role, code] / count * 1000:6.1f} ms")
    if len(FINISHED) < len(EXAMPLES):
        pytest.skip("only part of the fuzz tests ran")
    assert total >= 10_000
