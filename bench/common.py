"""Shared by the benchmarks: a tiny model store, the four real processes, statistics."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def tiny_store():
    """A freshly built tiny model family in a temporary directory."""
    from triptych.model_builders.tiny import build_tiny_family

    with tempfile.TemporaryDirectory(prefix="triptych-bench-") as root:
        build_tiny_family(Path(root))
        yield Path(root)


@contextlib.contextmanager
def full_size_store(family: str, dtype: str = "float32", device: str = "cpu"):
    """One full-size model (the real architecture, random weights) in a temporary directory: full-size/<family>."""
    import torch

    from triptych.model_builders.full_size import build_full_size

    with tempfile.TemporaryDirectory(prefix="triptych-bench-") as root:
        build_full_size(Path(root), family, dtype=getattr(torch, dtype), device=device)
        yield Path(root)


@contextlib.contextmanager
def serve_all(model_root: Path, extra_env: dict[str, str] | None = None):
    """`triptych serve --port 0`: yields {role: address} and {role: pid}."""
    process = subprocess.Popen(
        [sys.executable, "-m", "triptych.cli", "serve", "--port", "0", "--model-root", str(model_root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        env={**os.environ, **(extra_env or {})},
    )
    from triptych.cli import read_serving_lines

    addresses, pids = read_serving_lines(process.stdout)
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    try:
        yield addresses, pids
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


RESULTS = Path(__file__).with_name("RESULTS.md")


def rewrite_results(table: str, rows: list[str]) -> None:
    """Replaces the lines between `<!-- {table}-results:begin -->` and its end marker in bench/RESULTS.md."""
    import re

    begin, end = f"<!-- {table}-results:begin -->", f"<!-- {table}-results:end -->"
    block = begin + "\n" + "\n".join(rows) + "\n" + end
    text = RESULTS.read_text()
    RESULTS.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S))
    print(f"rewrote the {table} table of {RESULTS}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
