"""Starting one Triptych role as its own process, the way a deployment does (`triptych serve ROLE`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading


@contextlib.contextmanager
def serve_role(role: str, model_root, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
    """Yields (process, address) of `triptych serve ROLE --port 0`; SIGTERM on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "triptych.cli", "serve", role, "--port", "0", "--model-root", str(model_root), *args],
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
        env={**os.environ, **(env or {})},
    )
    address = None
    for line in process.stdout:
        if line.startswith(f"triptych {role} SERVING "):
            address = line.split()[-1]
            break
    if address is None:
        raise RuntimeError(f"{role} exited with {process.wait()} before serving")
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    try:
        yield process, address
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def chain_with(services, model_root, env: dict[str, str], roles=("denoiser",)):
    """A gateway over the session's backends, except `roles`, started anew with `env`; yields the gateway's
    address and {role: address} of every backend."""
    with contextlib.ExitStack() as stack:
        backends = dict(services.addresses)
        for role in roles:
            _, backends[role] = stack.enter_context(serve_role(role, model_root, env))
        links = tuple(f"--{role}-address={backends[role]}" for role in ("encoder", "denoiser", "decoder"))
        _, gateway = stack.enter_context(serve_role("gateway", model_root, args=links))
        yield gateway, backends
