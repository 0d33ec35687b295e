"""Reliability with real processes: replicas behind one channel (round-robin, UNAVAILABLE retried, one replica
killed with SIGKILL mid-load), graceful shutdown on SIGTERM, and a model whose files do not load.

The processes are started once for the module: two encoder replicas, a denoiser and a decoder, on a model
store holding tiny/sd15 and tiny/broken (the same model with truncated weights). The last two tests consume
them (SIGTERM to the denoiser, SIGKILL to an encoder), so they run last, in file order.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.e2e.processes import Served, all_serving, launch
from tests.e2e.stubs import tiny_denoise
from triptych.client import ImageClient, open_channel
from triptych.client.transport import channel_target
from triptych.v1 import (
    denoiser_service_pb2,
    denoiser_service_pb2_grpc,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    image_service_pb2,
    runtime_service_pb2,
    runtime_service_pb2_grpc,
)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _start(role: str, root: Path, *args: str) -> Served:
    return launch(role, root, {"TRIPTYCH_SHUTDOWN_GRACE_SECONDS": "60"}, args, isolated=True)


@pytest.fixture(scope="module")
def store(model_root, tmp_path_factory) -> Path:
    """tiny/sd15, and tiny/broken: the same files with the text encoder's and UNet's weights cut in half."""
    root = tmp_path_factory.mktemp("store")
    for name in ("sd15", "broken"):
        shutil.copytree(model_root / "tiny" / "sd15", root / "tiny" / name)
    for weights in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        path = root / "tiny" / "broken" / weights
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as an interrupted copy leaves it
    return root


@pytest.fixture(scope="module")
def fleet(store):
    """Two encoder replicas, a denoiser and a decoder, started together (each its own OS process)."""
    procs = {name: _start(role, store) for name, role in [
        ("encoder_a", "encoder"), ("encoder_b", "encoder"), ("denoiser", "denoiser"), ("decoder", "decoder")
    ]}  # fmt: skip
    with all_serving(*procs.values()):
        yield procs


def _encode(channel, prompt: str = "a red fox", model: str = "tiny/sd15", **fields):
    request = encoder_service_pb2.EncodeRequest(model=model, positive_prompt=prompt, **fields)
    return encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode(request, timeout=30)


def _runtime(address: str) -> runtime_service_pb2.GetRuntimeInfoResponse:
    with open_channel(address) as channel:
        stub = runtime_service_pb2_grpc.RuntimeServiceStub(channel)
        return stub.GetRuntimeInfo(runtime_service_pb2.GetRuntimeInfoRequest(), timeout=10)


def _encodes_served(address: str) -> int:
    counters = _runtime(address).counters
    return counters.get("encode_cache_hits", 0) + counters.get("encode_cache_misses", 0)


def test_a_replica_list_is_one_static_target():
    assert channel_target("127.0.0.1:50061") == "127.0.0.1:50061"
    assert channel_target("127.0.0.1:1, localhost:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///encoders.internal:50061") == "dns:///encoders.internal:50061"
    for bad in ("encoder-0:1,encoder-1:1", "127.0.0.1:1,[::1]:2", "127.0.0.1,127.0.0.2:1"):
        with pytest.raises(ValueError):
            channel_target(bad)


def test_a_model_that_fails_to_load_is_named_and_the_service_keeps_serving(fleet):
    with open_channel(fleet["encoder_a"].address) as channel:
        for _ in range(2):  # a failed load is not remembered, and does not wedge the model's lock
            with pytest.raises(grpc.RpcError) as raised:
                _encode(channel, model="tiny/broken")
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION, raised.value.details()
            assert "tiny/broken" in raised.value.details()
            detail = rpc_status.from_call(raised.value).details[0]
            failure = error_details_pb2.PreconditionFailure()
            assert detail.Unpack(failure) and failure.violations[0].subject == "tiny/broken"
            conditioning = _encode(channel)  # another model on the same process still works
        assert list(conditioning.positive.prompt_embeds.shape) == [1, 77, 32]

    request = denoiser_service_pb2.DenoiseRequest(
        model="tiny/broken", positive=conditioning.positive, width=64, height=64, steps=2, seed=1
    )
    with open_channel(fleet["denoiser"].address) as channel:
        stub = denoiser_service_pb2_grpc.DenoiserServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Denoise(request, timeout=30))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "tiny/broken" in raised.value.details()
        request.model = "tiny/sd15"
        assert list(stub.Denoise(request, timeout=30))[-1].HasField("result")


def test_the_gateway_balances_over_an_encoder_replica_list(fleet, store):
    encoders = f"{fleet['encoder_a'].address},{fleet['encoder_b'].address}"
    gateway = _start(
        "gateway", store, f"--encoder-address={encoders}", f"--denoiser-address={fleet['denoiser'].address}",
        f"--decoder-address={fleet['decoder'].address}",
    ).wait_serving()  # fmt: skip
    try:
        before = {name: _encodes_served(fleet[name].address) for name in ("encoder_a", "encoder_b")}
        with ImageClient(gateway.address) as client:
            for seed in range(4):
                request = image_service_pb2.GenerateRequest(
                    model="tiny/sd15", positive_prompt=f"a fox {seed}", width=64, height=64, steps=1, seed=seed
                )
                assert len(client.generate(request, timeout=60)) == 1
        served = {name: _encodes_served(fleet[name].address) - before[name] for name in before}
        assert min(served.values()) >= 1, served  # round-robin: both replicas took part
    finally:
        gateway.stop()


def _read_into(stream, arrivals: list) -> None:
    try:
        for event in stream:
            arrivals.append((time.monotonic(), event))
    except grpc.RpcError as exc:
        arrivals.append((time.monotonic(), exc))


def _refused(channel) -> bool:
    """True when a new call gets UNAVAILABLE, False when it is served."""
    try:
        denoiser_service_pb2_grpc.DenoiserServiceStub(channel).ListSchedulers(
            denoiser_service_pb2.ListSchedulersRequest(), timeout=10
        )
        return False
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
        return True


def test_sigterm_finishes_the_running_denoise_and_refuses_new_calls(fleet):
    with open_channel(fleet["encoder_a"].address) as channel:
        conditioning = _encode(channel, include_negative=True)
    request = tiny_denoise({"tiny/sd15": conditioning}, width=512, height=512, steps=24, seed=11)
    denoiser = fleet["denoiser"]
    arrivals: list[tuple[float, denoiser_service_pb2.DenoiseResponse]] = []
    with open_channel(denoiser.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == SERVING
        stream = denoiser_service_pb2_grpc.DenoiserServiceStub(channel).Denoise(request, timeout=120)
        arrivals.append((time.monotonic(), next(stream)))  # the run has started
        reader = threading.Thread(target=_read_into, args=(stream, arrivals))
        reader.start()

        denoiser.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # a Watch is an in-flight call too: left open, it would hold the server for the grace period
        # Health turns NOT_SERVING a moment before the server stops taking calls: poll for the refusal.
        deadline = time.monotonic() + 10
        with open_channel(denoiser.address) as fresh:
            while not _refused(fresh):
                assert time.monotonic() < deadline, "new calls still accepted 10 s after SIGTERM"
                time.sleep(0.05)
        assert _refused(channel), "a new call on the connection already open is refused too"
        refused_at = time.monotonic()
        reader.join(timeout=120)

    finished_at, last = arrivals[-1]
    assert not isinstance(last, grpc.RpcError), f"the stream in flight failed: {last}"
    assert last.HasField("result"), "the stream in flight at SIGTERM completes with its result"
    assert finished_at > refused_at, "new calls were refused while the run was still going"
    assert list(last.result.latents.shape) == [1, 4, 64, 64]
    progress = [e.progress for _, e in arrivals if e.HasField("progress")]
    assert progress[-1].step == progress[-1].total_steps >= 24, "every step ran"
    assert denoiser.process.wait(timeout=30) == 0


def test_kill_9_of_one_encoder_replica_mid_load_fails_no_request(fleet):
    """Four concurrent callers, then a sequential one, over one round-robin channel to two replicas; one
    replica is SIGKILLed while calls are in flight. Retries on UNAVAILABLE must cover every call."""
    victim, survivor = fleet["encoder_b"], fleet["encoder_a"]
    channel = open_channel(f"{survivor.address},{victim.address}")
    victim_served_before = _encodes_served(victim.address)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    in_flight = [0]
    killed = threading.Event()
    in_flight_at_kill = []

    def call(prompt: str) -> None:
        with lock:
            in_flight[0] += 1
        try:
            _encode(channel, prompt)
            result = "ok_after_kill" if killed.is_set() else "ok_before_kill"
        except grpc.RpcError as exc:
            result = exc.code().name
        with lock:
            in_flight[0] -= 1
            outcomes[result] += 1

    def worker(index: int) -> None:
        for i in range(60):
            call(f"a fox, caller {index}, call {i}")

    workers = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    started = time.monotonic()
    for thread in workers:
        thread.start()
    while outcomes["ok_before_kill"] < 60 and any(t.is_alive() for t in workers):
        time.sleep(0.005)
    served_victim = _encodes_served(victim.address) - victim_served_before
    with lock:
        in_flight_at_kill.append(in_flight[0])
        victim.process.send_signal(signal.SIGKILL)
        killed.set()
    for thread in workers:
        thread.join(timeout=120)
    for i in range(40):
        call(f"a fox, sequential call {i}")
    elapsed = time.monotonic() - started
    channel.close()

    failed = {code: n for code, n in outcomes.items() if not code.startswith("ok")}
    print(
        f"\nreplica kill: {sum(outcomes.values())} calls in {elapsed:.1f}s, {dict(outcomes)}, "
        f"{in_flight_at_kill[0]} in flight at the kill, victim had served {served_victim}"
    )
    assert victim.process.wait(timeout=10) == -signal.SIGKILL
    assert served_victim > 0, "round-robin sent calls to both replicas before the kill"
    assert outcomes["ok_after_kill"] > 0
    assert not failed, f"failed calls: {failed}"
