"""`triptych serve` as a process tree: four OS processes, health SERVING, clean stop on SIGTERM/Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.processes import serving
from triptych.client import open_channel


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_serve_starts_four_processes_and_stops_them_all(model_root, stop_signal):
    with serving(None, model_root) as served:
        addresses, pids, process = served.addresses, served.pids, served.process
        assert set(addresses) == {"encoder", "denoiser", "decoder", "gateway"}
        assert len(set(pids.values())) == 4 and process.pid not in pids.values()
        for address in addresses.values():
            with open_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(stop_signal)
        assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while (
        any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids.values())
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not [
        role
        for role, pid in pids.items()
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]


def test_a_stop_while_starting_stops_at_once_and_leaves_no_process(model_root):
    """An orchestrator's SIGTERM during a slow start (here a preload) is not held until every service serves."""
    process = subprocess.Popen(
        [sys.executable, "-m", "triptych.cli", "serve", "--port", "0", "--model-root", str(model_root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TRIPTYCH_PRELOAD_MODELS": "tiny/sdxl"},
    )
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 60
    while not parent.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    children = parent.children(recursive=True)
    assert children, "the first service never started"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert "stopped while starting" in process.stderr.read()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [child.cmdline() for child in alive]


def test_the_python_client_never_imports_torch():
    code = (
        "import sys, triptych.client, triptych.v1.image_service_pb2_grpc; "
        "sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
