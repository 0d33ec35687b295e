"""Each service started in-process on port 0 with the project's own server bootstrap, as `triptych serve ROLE`
builds it, and called with the real generated stubs: the contract tier (no processes, no fakes)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from tests.e2e.stubs import Stubs, conditioning, open_stubs
from triptych.cli import build_role  # how `triptych serve ROLE` builds a role: the same code, not a copy
from triptych.serving.server import start
from triptych.serving.settings import Settings

BACKENDS = ("encoder", "denoiser", "decoder")


@dataclass
class InProcess:
    """The four roles' servers in this process, the loopback address of each, and the Service each serves."""

    servers: dict[str, grpc.Server]
    addresses: dict[str, str]
    services: dict


@pytest.fixture(scope="package")
def in_process(model_root) -> InProcess:
    """Encoder, denoiser and decoder on port 0, then a gateway whose backends are those three."""
    settings = Settings(model_root=model_root)
    servers, addresses, services = {}, {}, {}
    try:
        for role in (*BACKENDS, "gateway"):
            if role == "gateway":
                settings = settings.model_copy(update={f"{name}_address": addresses[name] for name in BACKENDS})
            services[role] = build_role(role, settings)
            servers[role], port, _ = start(services[role], settings, 0)
            addresses[role] = f"127.0.0.1:{port}"
        yield InProcess(servers, addresses, services)
    finally:
        for server in servers.values():
            server.stop(0).wait()


@pytest.fixture(scope="package")
def stubs(in_process) -> Stubs:
    stubs = open_stubs(in_process)
    yield stubs
    stubs.close()


@pytest.fixture(scope="package")
def encoded(stubs) -> dict:
    """The in-process encoder's conditioning (with negative) for each tiny model."""
    return conditioning(stubs)
