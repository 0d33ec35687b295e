"""Reliability under drains and restarts, with real processes (issue 15): a denoiser drained under gateway traffic
leaves no call unanswered and every process exits within its grace.

Each test starts its own processes (`triptych serve ROLE`) on the session's tiny model store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from triptych.client import ImageClient, open_channel
from triptych.v1 import encoder_service_pb2, encoder_service_pb2_grpc, image_service_pb2


@dataclass
class Proc:
    role: str
    process: subprocess.Popen
    grace: float
    address: str = ""

    def stop(self) -> float:
        """SIGTERM; returns the seconds until the process exited (killed after grace + 30 s)."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.grace + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - started


def start(role: str, root: Path, *args: str, grace: float = 5.0, **settings: str) -> Proc:
    """`triptych serve ROLE --port 0` with `settings` as TRIPTYCH_ variables; returns once it serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    env.update(PYTHONUNBUFFERED="1", TRIPTYCH_TORCH_THREADS="1", TRIPTYCH_SHUTDOWN_GRACE_SECONDS=str(grace))
    env.update({f"TRIPTYCH_{name.upper()}": value for name, value in settings.items()})
    command = [sys.executable, "-m", "triptych.cli", "serve", role, "--port", "0", "--model-root", str(root), *args]
    proc = Proc(role, subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1, env=env), grace)
    for line in proc.process.stdout:
        if line.startswith(f"triptych {role} SERVING "):
            proc.address = line.split()[-1]
            threading.Thread(target=lambda: [None for _ in proc.process.stdout], daemon=True).start()
            return proc
    raise RuntimeError(f"{role} exited with {proc.process.wait()} before serving")


@contextlib.contextmanager
def chain(root: Path, denoiser_grace: float = 3.0, gateway_grace: float = 5.0):
    """Encoder, denoiser, decoder and a gateway over them, each its own process; all stopped on exit."""
    procs: dict[str, Proc] = {}
    try:
        for role in ("encoder", "decoder"):
            procs[role] = start(role, root)
        procs["denoiser"] = start("denoiser", root, grace=denoiser_grace)
        links = [f"--{role}-address={procs[role].address}" for role in ("encoder", "denoiser", "decoder")]
        procs["gateway"] = start("gateway", root, *links, grace=gateway_grace)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


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
        lock = threading.Lock()
        stop = threading.Event()

        def caller(index: int) -> None:
            with ImageClient(procs["gateway"].address) as client:
                call = 0
                while not stop.is_set():
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
        time.sleep(2.0)  # calls keep coming while the denoiser is gone
        stop.set()
        ends_by = time.monotonic() + 60
        for thread in threads:
            thread.join(timeout=max(0.0, ends_by - time.monotonic()))
        hung = sum(thread.is_alive() for thread in threads)
        exits = {role: (proc.stop(), proc.grace) for role, proc in procs.items() if role != "denoiser"}

    print(f"\ndrain: {len(outcomes)} calls, {sorted(set(outcomes))}, denoiser exited in {drained_in:.1f}s, {exits}")
    assert hung == 0, f"{hung} of {callers} callers never got an answer 60 s after the drain"
    assert set(outcomes) <= {"ok", "UNAVAILABLE"}, outcomes
    assert denoiser.process.returncode == 0 and drained_in < denoiser.grace + 5, drained_in
    for role, (seconds, grace) in exits.items():
        assert procs[role].process.returncode == 0, f"{role} exited with {procs[role].process.returncode}"
        assert seconds < grace + 5, f"{role} took {seconds:.1f} s to exit (grace {grace} s)"


def _encode(address: str, **channel_args) -> encoder_service_pb2.EncodeResponse:
    with open_channel(address, **channel_args) as channel:
        stub = encoder_service_pb2_grpc.TextEncoderServiceStub(channel)
        return stub.Encode(encoder_service_pb2.EncodeRequest(model="tiny/sd15", positive_prompt="a fox"), timeout=30)


def _check(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_watch_streams_without_a_token_cannot_take_the_capacity_meant_for_work(model_root):
    """140 Health.Watch streams on one connection, without a token (health is open), against a token-protected
    encoder: the streams beyond the bound are refused RESOURCE_EXHAUSTED, and authenticated calls and health checks
    on other connections are still served while the rest stay open."""
    encoder = start("encoder", model_root, auth_tokens="secret")
    try:
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
    finally:
        assert encoder.stop() < encoder.grace + 5
