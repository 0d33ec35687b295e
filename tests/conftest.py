"""Session fixtures: the tiny model family (built once) and the four real service processes (started once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROLES = ("encoder", "denoiser", "decoder", "gateway")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """The tiny family, built once per session with `triptych models build-tiny`'s own code."""
    from triptych.model_builders.tiny import build_tiny_family

    root = tmp_path_factory.mktemp("models")
    build_tiny_family(root)
    return root


class Services:
    """The running `triptych serve` process tree and the address of each role."""

    def __init__(self, process: subprocess.Popen, addresses: dict[str, str], pids: dict[str, int]):
        self.process, self.addresses, self.pids = process, addresses, pids

    @property
    def gateway(self) -> str:
        return self.addresses["gateway"]


@pytest.fixture(scope="session")
def services(model_root) -> Services:
    """`triptych serve --port 0` exactly as a user starts it: four OS processes on loopback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "triptych.cli", "serve", "--port", "0", "--model-root", str(model_root)],
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    from triptych.cli import read_serving_lines

    addresses, pids = read_serving_lines(process.stdout)
    if set(addresses) != set(ROLES):
        pytest.fail(f"triptych serve exited with {process.wait()} before serving")
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    yield Services(process, addresses, pids)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def client(services):
    from triptych.client import ImageClient

    with ImageClient(services.gateway) as image_client:
        yield image_client
