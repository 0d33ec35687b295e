"""Starting Triptych as its own OS processes, the way a user or a deployment does (`triptych serve [ROLE]`), and
reading the line each service prints once it serves: "triptych ROLE SERVING ADDRESS". The one place tests do that."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from triptych.cli import ROLES, read_serving_lines


def isolated_env(**settings: str) -> dict[str, str]:
    """The test environment without its TRIPTYCH_* settings, plus `settings`; one torch thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    return {**env, "TRIPTYCH_TORCH_THREADS": "1", **settings}


@dataclass
class Served:
    """A `triptych serve` process: one role, or (role None) the whole tree of four; once it serves, the address
    and pid of each role it runs."""

    process: subprocess.Popen
    role: str | None
    addresses: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.addresses[self.role]

    @property
    def gateway(self) -> str:
        return self.addresses["gateway"]

    def wait_serving(self) -> Served:
        """Reads stdout up to the SERVING line (the tree: up to "all services SERVING"), then drains the rest in
        the background so the process never blocks on a full pipe. RuntimeError if it exits before."""
        if self.role is None:
            self.addresses, self.pids = read_serving_lines(self.process.stdout)
        else:
            for line in self.process.stdout:
                if line.startswith(f"triptych {self.role} SERVING "):
                    self.addresses, self.pids = {self.role: line.split()[-1]}, {self.role: self.process.pid}
                    break
        if set(self.addresses) != ({self.role} if self.role else set(ROLES)):
            raise RuntimeError(f"triptych serve {self.role or ''} exited with {self.process.wait()} before serving")
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()
        return self

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM unless it has exited already; SIGKILL if it is still running after `timeout` seconds. Returns the
        seconds until it exited."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - started


def launch(
    role: str | None, model_root: Path, env: dict[str, str] | None = None, args=(), isolated: bool = False
) -> Served:
    """Starts `triptych serve [ROLE] --port 0 --model-root ROOT ARGS` with this environment (`isolated`: without
    its TRIPTYCH_* settings) plus `env`, and returns at once: call wait_serving() on the result."""
    role_args = [role] if role else []
    command = [
        sys.executable,
        "-m",
        "triptych.cli",
        "serve",
        *role_args,
        "--port",
        "0",
        "--model-root",
        str(model_root),
    ]
    base = isolated_env() if isolated else os.environ
    environment = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, text=True, bufsize=1, env=environment)
    return Served(process, role)


@contextlib.contextmanager
def serving(role: str | None, model_root: Path, env: dict[str, str] | None = None, args=(), isolated: bool = False):
    """Yields the Served process of `launch(...)` once it serves; stops it on exit."""
    with all_serving(launch(role, model_root, env, args, isolated)) as (served,):
        yield served


@contextlib.contextmanager
def all_serving(*launched: Served):
    """Yields `launched` (from launch(), so their starts overlap) once each serves; stops them all on exit."""
    try:
        yield tuple(served.wait_serving() for served in launched)
    finally:
        for served in launched:
            served.stop()


@contextlib.contextmanager
def serve_role(role: str, model_root: Path, env: dict[str, str] | None = None, args=()):
    """Yields (process, address) of `triptych serve ROLE --port 0` once it serves; SIGTERM on exit."""
    with serving(role, model_root, env, args) as served:
        yield served.process, served.address


@contextlib.contextmanager
def chain_with(services, model_root, env: dict[str, str], roles=("denoiser",)):
    """A gateway over the session's backends, except `roles`, started anew (together) with `env`; yields the
    gateway's address and {role: address} of every backend."""
    with all_serving(*(launch(role, model_root, env) for role in roles)) as started:
        backends = {**services.addresses, **{served.role: served.address for served in started}}
        links = tuple(f"--{role}-address={backends[role]}" for role in ("encoder", "denoiser", "decoder"))
        with serve_role("gateway", model_root, args=links) as (_, gateway):
            yield gateway, backends
