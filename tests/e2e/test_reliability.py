"""Reliability under drains and restarts, with real processes (issue 15): a denoiser drained under gateway traffic
leaves no call unanswered and every process exits within its grace.

Each test starts the processes it drains, restarts or configures (`triptych serve ROLE`, tests/e2e/processes.py) on
the session's tiny model store, launched together so that their starts overlap; tests that only call a plain
backend call the session's.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.e2e.processes import Served, all_serving, launch
from tests.e2e.test_services import runtime_info
from triptych.client import ImageClient, field_violations, open_channel
from triptych.v1 import (
    common_pb2,
    decoder_service_pb2,
    decoder_service_pb2_grpc,
    denoiser_service_pb2,
    denoiser_service_pb2_grpc,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    image_service_pb2,
    tensor_pb2,
)

# The shutdown grace of each process the drain test stops; 5 s for the other tests' processes.
GRACE = {"encoder": 5.0, "decoder": 5.0, "denoiser": 3.0, "gateway": 5.0}


def _launch(role: str, root: Path, *args: str, grace: float = 5.0, **settings) -> Served:
    """`triptych serve ROLE --port 0 ARGS` without the test environment's TRIPTYCH_* settings, with `grace` and
    `settings` as TRIPTYCH_ variables; returns at once (all_serving waits until it serves)."""
    env = {
        f"TRIPTYCH_{name.upper()}": str(value) for name, value in {**settings, "shutdown_grace_seconds": grace}.items()
    }
    return launch(role, root, env, args, isolated=True)


@contextlib.contextmanager
def chain(root: Path):
    """Encoder, denoiser and decoder, started together, and a gateway over them: each its own process with its grace
    (GRACE); all stopped on exit."""
    backends = {role: _launch(role, root, grace=GRACE[role]) for role in ("encoder", "denoiser", "decoder")}
    with all_serving(*backends.values()):
        links = [f"--{role}-address={served.address}" for role, served in backends.items()]
        with all_serving(_launch("gateway", root, *links, grace=GRACE["gateway"])) as (gateway,):
            yield {**backends, "gateway": gateway}


def _request(caller: int, call: int) -> image_service_pb2.GenerateRequest:
    return image_service_pb2.GenerateRequest(
        model="tiny/sd15", positive_prompt=f"a fox, caller {caller}, call {call}", width=64, height=64, steps=12,
        seed=caller * 1000 + call,
    )  # fmt: skip


def test_a_denoiser_drained_under_gateway_traffic_leaves_no_call_unanswered(model_root):
    """ImageClient callers without a deadline call a gateway while its only denoiser is drained (SIGTERM, 3 s grace).
    Every call ends (an image, or UNAVAILABLE once the denoiser is gone), and every process exits within its grace.
    """
    callers = 6
    with chain(model_root) as procs:
        outcomes: list[str] = []
        sent = [0.0] * callers  # when each caller last sent a call
        lock = threading.Lock()
        stop = threading.Event()

        def caller(index: int) -> None:
            with ImageClient(procs["gateway"].address) as client:
                call = 0
                while not stop.is_set():
                    sent[index] = time.monotonic()
                    try:
                        client.generate(_request(index, call))  # no deadline, as the callers
                        outcome = "ok"
                    except grpc.RpcError as exc:
                        outcome = exc.code().name
                    with lock:
                        outcomes.append(outcome)
                    call += 1

        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while outcomes.count("ok") < callers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcomes.count("ok") >= callers, f"no traffic before the drain: {outcomes}"

        denoiser = procs["denoiser"]
        drained_in = denoiser.stop()
        gone = time.monotonic()
        while min(sent) < gone and time.monotonic() < gone + 60:  # calls keep coming while the denoiser is gone
            time.sleep(0.05)
        stop.set()
        ends_by = time.monotonic() + 60
        for thread in threads:
            thread.join(timeout=max(0.0, ends_by - time.monotonic()))
        hung = sum(thread.is_alive() for thread in threads)
        exits = {role: (proc.stop(), GRACE[role]) for role, proc in procs.items() if role != "denoiser"}

    print(f"\ndrain: {len(outcomes)} calls, {sorted(set(outcomes))}, denoiser exited in {drained_in:.1f}s, {exits}")
    assert min(sent) > gone, "some caller sent no call once the denoiser was gone"
    assert hung == 0, f"{hung} of {callers} callers never got an answer 60 s after the drain"
    assert set(outcomes) <= {"ok", "UNAVAILABLE"}, outcomes
    assert denoiser.process.returncode == 0 and drained_in < GRACE["denoiser"] + 5, drained_in
    for role, (seconds, grace) in exits.items():
        assert procs[role].process.returncode == 0, f"{role} exited with {procs[role].process.returncode}"
        assert seconds < grace + 5, f"{role} took {seconds:.1f} s to exit (grace {grace} s)"


def _encode(address: str, **channel_args) -> encoder_service_pb2.EncodeResponse:
    with open_channel(address, **channel_args) as channel:
        stub = encoder_service_pb2_grpc.TextEncoderServiceStub(channel)
        return stub.Encode(encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt="a fox"), timeout=30)


def _check(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _peak_rss(proc: Served) -> int:
    """The process's peak resident memory so far, in bytes (VmHWM)."""
    status = Path(f"/proc/{proc.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def _refusals(call, requests: list, timeout_override: float = 60.0) -> list[str]:
    """Sends `requests` at once, each on its own thread; returns each call's status code name."""
    codes: list[str] = []

    def one(request) -> None:
        try:
            call(request, timeout=timeout_override)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)

    threads = [threading.Thread(target=one, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


@pytest.fixture(scope="module")
def secured(model_root) -> dict[str, Served]:
    """An encoder and a denoiser that serve only calls with the token "secret", started together. The next test reads
    their peak memory, so it comes first of the tests that call them."""
    launched = [_launch(role, model_root, auth_tokens="secret") for role in ("encoder", "denoiser")]
    with all_serving(*launched) as (encoder, denoiser):
        yield {"encoder": encoder, "denoiser": denoiser}


def test_oversized_and_unauthenticated_requests_are_refused_before_their_body_is_read(secured):
    """An EncodeRequest needs kilobytes: 64 MB ones are refused by size, even with a token. A request without a
    token is refused before its body is read, whatever its size. Neither costs the server their bytes."""
    huge = "a" * (64 << 20)
    encoder, denoiser = secured["encoder"], secured["denoiser"]
    with open_channel(encoder.address, auth_token="secret") as channel:
        encode = encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode
        before = _peak_rss(encoder)
        codes = _refusals(encode, [encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt=huge)] * 4)
        encoder_growth = _peak_rss(encoder) - before
        assert encode(encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt="a fox"), timeout=30)
    assert codes == ["RESOURCE_EXHAUSTED"] * 4, codes

    with open_channel(denoiser.address) as channel:  # no token
        denoise = denoiser_service_pb2_grpc.DenoiserServiceStub(channel).Denoise
        before = _peak_rss(denoiser)
        codes = _refusals(lambda r, **kw: list(denoise(r, **kw)), [denoiser_service_pb2.DenoiseRequest(model=huge)] * 4)
        denoiser_growth = _peak_rss(denoiser) - before
    assert codes == ["UNAUTHENTICATED"] * 4, codes
    with open_channel(denoiser.address, auth_token="secret") as channel:
        # A method without tensors takes 64 KiB even where the server takes more for Denoise.
        list_schedulers = channel.unary_unary("/triptych.v1.DenoiserService/ListSchedulers")
        unknown_field = bytes([0xC2, 0x3E, 0x80, 0x80, 0x04]) + bytes(1 << 16)  # field 1000, 64 KiB
        with pytest.raises(grpc.RpcError) as raised:
            list_schedulers(unknown_field, timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
        assert list_schedulers(bytes([0xC2, 0x3E, 10]) + bytes(10), timeout=30)  # 15 bytes: served
    print(f"\npeak memory growth: encoder {encoder_growth >> 20} MiB, denoiser {denoiser_growth >> 20} MiB")
    # Less than half the four requests' 256 MiB (before the limits: 200 to 330 MiB). What is left is what arrived in
    # flight before the refusal: 17 to 48 MiB on a quiet machine, 85 MiB once in the full suite on a loaded one.
    assert encoder_growth < 128 << 20, f"the encoder took {encoder_growth >> 20} MiB for refused requests"
    assert denoiser_growth < 128 << 20, f"the denoiser took {denoiser_growth >> 20} MiB for refused requests"


def test_watch_streams_without_a_token_cannot_take_the_capacity_meant_for_work(secured):
    """140 Health.Watch streams on one connection, without a token (health is open), against a token-protected
    encoder: the streams beyond the bound are refused RESOURCE_EXHAUSTED, and authenticated calls and health checks
    on other connections are still served while the rest stay open."""
    encoder = secured["encoder"]
    with open_channel(encoder.address) as flood:
        health = health_pb2_grpc.HealthStub(flood)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(140)]
        outcomes: list[str] = []
        for watch in watches:  # each answers its first status, or its refusal
            try:
                next(watch)
                outcomes.append("open")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        assert _encode(encoder.address, auth_token="secret").HasField("positive")
        with open_channel(encoder.address) as other:
            assert _check(other) == health_pb2.HealthCheckResponse.SERVING
        assert set(outcomes) == {"open", "RESOURCE_EXHAUSTED"}, sorted(set(outcomes))
        assert outcomes.count("open") <= 8, outcomes.count("open")
        for watch in watches:
            watch.cancel()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rolling_restart_of_two_replicas_fails_no_call(model_root):
    """Two encoder replicas behind one channel, taken down one after the other on their own ports, as a rolling
    update does: the first is restarted, and the second goes down one second after the first serves again. Every
    call succeeds: the channel reconnects to a restarted replica within a second or two, not after gRPC's default
    backoff (up to 120 s)."""
    ports = [_free_port(), _free_port()]
    replicas = [_launch("encoder", model_root, "--port", str(port), grace=2.0) for port in ports]
    outcomes: list[str] = []
    stop = threading.Event()
    channel = open_channel(",".join(f"127.0.0.1:{port}" for port in ports))
    encode = encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode

    def caller(index: int) -> None:
        call = 0
        while not stop.is_set():
            request = encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt=f"fox {index} {call}")
            try:
                encode(request, timeout=30)
                outcomes.append("ok")
            except grpc.RpcError as exc:
                outcomes.append(f"{exc.code().name}: {exc.details()}")
            call += 1
            time.sleep(0.01)

    def calls_beyond(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(outcomes) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(2)]
    try:
        for replica in replicas:
            replica.wait_serving()
        for thread in threads:
            thread.start()
        calls_beyond(20)
        replicas[0].stop()
        time.sleep(8.0)  # the replica is down: the channel's reconnect attempts fail, its backoff grows
        replicas[0] = _launch("encoder", model_root, "--port", str(ports[0]), grace=2.0).wait_serving()
        time.sleep(1.0)  # then the next replica goes down
        replicas[1].stop()
        calls_beyond(len(outcomes) + 40)  # made while the restarted replica alone serves
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        channel.close()
        for replica in replicas:
            replica.stop()
    failed = [outcome for outcome in outcomes if outcome != "ok"]
    # gRPC's own bug, not ours: a stopping server kills the calls it has received but not yet handed to a handler,
    # with CANCELLED "CANCELLED" (grpc/grpc#41785, open), and the channel's retry policy does not retry them. Seen
    # here once (1 of 1,996 calls) in about six runs; a direct unary caller must retry it itself (docs/security.md).
    # At most one such call per replica stop is gRPC's; any other failure, or more of them, is ours.
    grpc_bug = [outcome for outcome in failed if outcome == "CANCELLED: CANCELLED"]
    print(f"\nrolling restart: {len(outcomes)} calls, {len(failed)} failed ({len(grpc_bug)} grpc/grpc#41785)")
    assert len(outcomes) > 50
    assert len(grpc_bug) <= 2 and len(failed) == len(grpc_bug), (
        f"{len(failed)} of {len(outcomes)} calls failed: {sorted(set(failed))}"
    )


def _health(address: str, service: str = "") -> str:
    with open_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _eventually(address: str, service: str, status: str, within: float = 15.0) -> str:
    deadline = time.monotonic() + within
    while (seen := _health(address, service)) != status and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def test_gateway_readiness_follows_its_backends_and_liveness_does_not(services, model_root):
    """A gateway whose denoiser is not running is alive but not ready: its health says NOT_SERVING overall and for
    the denoiser, SERVING for the encoder and decoder and for `liveness`; ready once the denoiser serves, not ready
    again once it is gone."""
    denoiser_port = _free_port()
    links = (
        f"--encoder-address={services.addresses['encoder']}",
        f"--denoiser-address=127.0.0.1:{denoiser_port}",
        f"--decoder-address={services.addresses['decoder']}",
    )
    with all_serving(_launch("gateway", model_root, *links)) as (gateway,):
        address = gateway.address
        assert _eventually(address, "liveness", "SERVING") == "SERVING"
        assert _eventually(address, "", "NOT_SERVING") == "NOT_SERVING"
        assert _health(address, "triptych.v1.ImageService") == "NOT_SERVING"
        assert _health(address, "triptych.v1.DenoiserService") == "NOT_SERVING"
        assert _eventually(address, "triptych.v1.TextEncoderService", "SERVING") == "SERVING"
        assert _eventually(address, "triptych.v1.DecoderService", "SERVING") == "SERVING"
        with all_serving(_launch("denoiser", model_root, "--port", str(denoiser_port))):
            assert _eventually(address, "", "SERVING") == "SERVING"
            assert _health(address, "triptych.v1.ImageService") == "SERVING"
            assert _health(address, "triptych.v1.DenoiserService") == "SERVING"
        assert _eventually(address, "", "NOT_SERVING") == "NOT_SERVING"
        assert _health(address, "liveness") == "SERVING"


def test_a_request_beyond_the_work_budget_is_refused_before_any_work(bounded_denoiser, model_root):
    """Each of width 2048, height 2048, 150 steps and 20 images is allowed, but together they are about a day of CPU:
    the gateway refuses the product (pixels x steps x images) at once, naming the budget; a denoiser applies the
    budget an operator set (here lowered) to each Denoise."""
    unused = f"127.0.0.1:{_free_port()}"
    links = [f"--{role}-address={unused}" for role in ("encoder", "denoiser", "decoder")]
    with all_serving(_launch("gateway", model_root, *links)) as (gateway,), ImageClient(gateway.address) as client:
        request = image_service_pb2.GenerateRequest(
            model="tiny/sd15", positive_prompt="a fox", width=2048, height=2048, steps=150, number_results=20
        )
        with pytest.raises(grpc.RpcError) as raised:
            client.generate(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        (field, why), *_ = field_violations(raised.value)
        assert field == "number_results" and "TRIPTYCH_MAX_PIXEL_STEPS" in why, why

    with open_channel(bounded_denoiser.address) as channel:
        denoise = denoiser_service_pb2_grpc.DenoiserServiceStub(channel).Denoise
        request = denoiser_service_pb2.DenoiseRequest(model="tiny/sd15", width=256, height=256, steps=61)
        with pytest.raises(grpc.RpcError) as raised:
            list(denoise(request, timeout=10))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert any(
            field == "steps" and "TRIPTYCH_MAX_PIXEL_STEPS" in why for field, why in field_violations(raised.value)
        )


@pytest.fixture(scope="module")
def damaged_store(model_root, tmp_path_factory) -> Path:
    """tiny/sd15 and the good LoRA, beside copies with damaged files: model_index.json and unet/config.json that are
    not JSON, a textual-inversion file and a LoRA file that are not safetensors."""
    root = tmp_path_factory.mktemp("damaged")
    for name in ("sd15", "bad-index", "bad-unet-config"):
        shutil.copytree(model_root / "tiny" / "sd15", root / "tiny" / name)
    (root / "tiny" / "bad-index" / "model_index.json").write_text("{not json")
    (root / "tiny" / "bad-unet-config" / "unet" / "config.json").write_text("{not json")
    (root / "tiny" / "ti-bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    (root / "tiny" / "lora-bad.safetensors").write_bytes(b"not a safetensors file at all")
    return root


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def test_damaged_store_files_are_named_by_model_id_and_no_error_carries_a_server_path(damaged_store):
    """Damaged files are FAILED_PRECONDITION naming the model id (never INTERNAL); nothing that is missing or
    damaged is reported with a path on the server, in the message or in the status details."""
    with (
        all_serving(_launch("encoder", damaged_store), _launch("denoiser", damaged_store)) as (encoder, denoiser),
        open_channel(encoder.address) as enc_channel,
        open_channel(denoiser.address) as den_channel,
    ):
        encode = encoder_service_pb2_grpc.TextEncoderServiceStub(enc_channel).Encode
        denoise = denoiser_service_pb2_grpc.DenoiserServiceStub(den_channel).Denoise
        good = encode(encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt="a fox"), timeout=60)

        def encoding(model="tiny/sd15", **fields):
            request = encoder_service_pb2.EncodeRequest(model=model, positive_prompt="a fox", **fields)
            return lambda: encode(request, timeout=60)

        def denoising(model="tiny/sd15", **fields):
            request = denoiser_service_pb2.DenoiseRequest(
                model=model, positive=good.positive, width=64, height=64, steps=2, seed=1, **fields
            )
            return lambda: list(denoise(request, timeout=60))

        lora = common_pb2.Lora
        embedding = common_pb2.TextualInversion
        cases = {
            "tiny/bad-index": ("FAILED_PRECONDITION", encoding("tiny/bad-index")),
            "tiny/bad-unet-config": ("FAILED_PRECONDITION", denoising("tiny/bad-unet-config")),
            "tiny/ti-bad": ("FAILED_PRECONDITION", encoding(embeddings=[embedding(model="tiny/ti-bad")])),
            # A LoRA file that does not read may be damaged or in a format we do not read: INVALID_ARGUMENT.
            "tiny/lora-bad": ("INVALID_ARGUMENT", encoding(loras=[lora(model="tiny/lora-bad")])),
            "tiny/lora-bad ": ("INVALID_ARGUMENT", denoising(loras=[lora(model="tiny/lora-bad")])),
            "tiny/missing": ("NOT_FOUND", encoding("tiny/missing")),
            "tiny/no-lora": ("NOT_FOUND", encoding(loras=[lora(model="tiny/no-lora")])),
            "tiny/no-ti": ("NOT_FOUND", encoding(embeddings=[embedding(model="tiny/no-ti")])),
            "tiny/no-unet": ("NOT_FOUND", denoising("tiny/no-unet")),
        }
        seen = {}
        for model, (_, call) in cases.items():
            error = _error(call)
            status = rpc_status.from_call(error)
            seen[model] = (error.code().name, error.details(), str(status))
    wrong = {m: s[:2] for m, s in seen.items() if s[0] != cases[m][0] or m.strip() not in s[1]}
    assert not wrong, f"wrong code, or the model id not named: {wrong}"
    leaks = {m: s[1] for m, s in seen.items() if str(damaged_store) in s[2] or "/tmp/" in s[2]}
    assert not leaks, f"server paths in errors: {leaks}"


@pytest.fixture(scope="module")
def bounded_denoiser(model_root) -> Served:
    """A denoiser with 2 queue slots per model, a 2 s write bound and its work budget lowered to 256 x 256 x 60 steps
    (what the never-read streams ask)."""
    settings = dict(denoiser_queue_per_model=2, stream_write_timeout_seconds=2, max_pixel_steps=256 * 256 * 60)
    with all_serving(_launch("denoiser", model_root, **settings)) as (denoiser,):
        yield denoiser


def test_a_caller_that_never_reads_its_denoise_stream_loses_its_queue_slot(services, bounded_denoiser):
    """Two Denoise streams whose caller never reads them (a small flow-control window, a preview every step) fill
    a model's queue (2 slots here). The server cannot write to them; within the write bound (2 s here) they are
    cancelled and their slots freed, so another caller is served instead of refused RESOURCE_EXHAUSTED."""
    denoiser = bounded_denoiser
    good = _encode(services.addresses["encoder"])
    request = denoiser_service_pb2.DenoiseRequest(
        model="tiny/sd15", positive=good.positive, width=256, height=256, steps=60, seed=1, preview_interval_steps=1
    )
    stalled_options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    stalled = grpc.insecure_channel(denoiser.address, options=stalled_options)
    stub = denoiser_service_pb2_grpc.DenoiserServiceStub(stalled)
    steps_before = runtime_info(denoiser.address).counters["denoise_steps"]
    never_read = [stub.Denoise(request) for _ in range(2)]  # started, never iterated
    deadline = time.monotonic() + 30
    while runtime_info(denoiser.address).counters["denoise_steps"] == steps_before and time.monotonic() < deadline:
        time.sleep(0.05)  # until they compute, holding the queue's slots
    small = denoiser_service_pb2.DenoiseRequest(
        model="tiny/sd15", positive=good.positive, width=64, height=64, steps=2, seed=2
    )
    outcomes: list[str] = []
    deadline = time.monotonic() + 30
    with open_channel(denoiser.address) as channel:
        denoise = denoiser_service_pb2_grpc.DenoiserServiceStub(channel).Denoise
        while time.monotonic() < deadline:
            try:
                list(denoise(small, timeout=30))
                outcomes.append("OK")
                break
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
                time.sleep(0.5)
    for call in never_read:
        call.cancel()
    stalled.close()
    assert outcomes[0] == "RESOURCE_EXHAUSTED", f"the never-read streams did not fill the queue: {outcomes}"
    assert outcomes[-1] == "OK", f"the queue stayed full 30 s: {outcomes}"
    assert len(outcomes) <= 16, f"served only after {len(outcomes)} tries: {outcomes}"


def _cpu_seconds(served: Served) -> float:
    """The CPU time a process has used so far, all its threads."""
    times = psutil.Process(served.process.pid).cpu_times()
    return times.user + times.system


def _decode_request(count: int, side: int) -> decoder_service_pb2.DecodeRequest:
    latents = bytes(count * 4 * side * side * 4)  # zeros, float32
    return decoder_service_pb2.DecodeRequest(
        model="tiny/sd15",
        latents=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[count, 4, side, side], data=latents),
    )


def test_decoder_work_is_bounded_stops_when_its_caller_leaves_and_respects_the_grace(model_root):
    """A decoder with 2 slots per model: of 4 big decodes sent at once, 2 are refused RESOURCE_EXHAUSTED; the
    others, abandoned at 2 s, stop between images, so a small decode sent next is served at once; and a big decode
    in flight at SIGTERM does not keep the process past its grace (2 s)."""
    grace = 2.0
    with (
        all_serving(_launch("decoder", model_root, grace=grace, decoder_queue_per_model=2)) as (decoder,),
        open_channel(decoder.address) as channel,
    ):
        decode = decoder_service_pb2_grpc.DecoderServiceStub(channel).Decode
        decode(_decode_request(1, 8), timeout=60)  # loads the VAE
        big = _decode_request(20, 64)  # 20 images at 512²
        codes = _refusals(decode, [big] * 4, timeout_override=2.0)
        started = time.monotonic()
        while True:  # the abandoned decodes hold their slots until their current image is done
            try:
                decode(_decode_request(1, 8), timeout=60)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - started < 30, exc
                time.sleep(0.2)
        small_waited = time.monotonic() - started
        computed = _cpu_seconds(decoder)
        in_flight = threading.Thread(target=_refusals, args=(decode, [big]), daemon=True)
        in_flight.start()
        deadline = time.monotonic() + 30
        while _cpu_seconds(decoder) < computed + 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the decoder computes it
        exited_in = decoder.stop()
    assert sorted(codes) == ["DEADLINE_EXCEEDED"] * 2 + ["RESOURCE_EXHAUSTED"] * 2, codes
    assert small_waited < 5, f"a small decode waited {small_waited:.1f} s behind abandoned work"
    assert exited_in < grace + 5, f"the decoder took {exited_in:.1f} s to exit (grace {grace} s)"
