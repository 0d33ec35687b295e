"""Encoder throughput: one-at-a-time vs dynamically batched, and cache-hit latency, on real processes.

Starts two encoder processes the way a deployment does (`triptych serve encoder --port 0`): one with batching
off (TRIPTYCH_ENCODER_MAX_BATCH_ROWS=1) and its cache off, one with the defaults (batching and cache on).
Each Encode carries a unique prompt and a negative (2 chunks of 77 tokens), so nothing hits the cache until
the cache-hit measurement, which repeats one request. Prints ratios measured in the same run.

    .venv/bin/python -m bench.encoder_throughput [--quick] [--model tiny/sdxl] [--record]
    .venv/bin/python -m bench.encoder_throughput --quick --full-size sdxl     (with TRIPTYCH_DEVICE=cuda: the GPU)

The processes and the in-process forward passes are placed by the environment (TRIPTYCH_DEVICE, TRIPTYCH_DTYPE).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import full_size_store, machine, median, rewrite_results, tiny_store

_unique = itertools.count()


@contextlib.contextmanager
def serve_encoder(model_root: Path, env: dict[str, str]):
    """`python -m triptych.cli serve encoder --port 0`; yields its address."""
    from triptych.client import open_channel, wait_until_serving

    command = [sys.executable, "-m", "triptych.cli", "serve", "encoder", "--port", "0", "--model-root", str(model_root)]
    # stderr passes through: a process that cannot start (a one-shot run on a lent GPU) says why.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    address = None
    for line in process.stdout:
        if line.startswith("triptych encoder SERVING "):
            address = line.split()[-1]
            break
    if address is None:
        raise RuntimeError(f"encoder exited with {process.wait()} before serving")
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    try:
        wait_until_serving(address)
        with open_channel(address) as channel:
            yield channel
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def request(model: str, prompt: str | None = None):
    from triptych.v1 import encoder_service_pb2

    text = prompt or f"a photo of fox number {next(_unique)} in a misty forest, oil painting"
    return encoder_service_pb2.EncodeRequest(
        model=model, positive_prompt=text, negative_prompt="blurry, low quality", include_negative=True
    )


def throughput(stub, model: str, callers: int, total: int) -> float:
    """Requests per second with `callers` threads, each sending Encode calls back to back."""
    requests = [request(model) for _ in range(total)]
    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(stub.Encode, requests))
    return total / (time.perf_counter() - started)


def latencies(stub, requests: list) -> list[float]:
    out = []
    for item in requests:
        started = time.perf_counter()
        stub.Encode(item)
        out.append(time.perf_counter() - started)
    return out


def forward_ceiling(model_root: Path, model: str, count: int, rounds: int) -> dict[str, float]:
    """The text encoders' forward passes alone, in this process, in ms per request: one request (prompt and
    negative, 2 rows) per pass against `count` requests in one pass. This is all that batching can save on
    this model and machine, before any gRPC, tokenizing or other per-request work. The passes are the
    encoder service's own (`encode_rows`, rows made batch-independent); medians of interleaved rounds."""
    import torch

    from triptych.encoder.chunks import split_into_chunks
    from triptych.encoder.engine import TextEncoderEngine, tokenizer_for
    from triptych.encoder.forward import encode_rows
    from triptych.encoder.prompt_syntax import literal
    from triptych.model_store import ModelStore
    from triptych.rules.limits import Limits
    from triptych.runtime.components import ComponentCache
    from triptych.runtime.lora import LoraAdapters
    from triptych.runtime.placement import Placement
    from triptych.serving.settings import Settings

    store = ModelStore(model_root)
    # Placed as the encoder processes are (TRIPTYCH_DEVICE, TRIPTYCH_DTYPE from the environment).
    placement = Placement.from_settings(Settings(model_root=model_root))
    engine = TextEncoderEngine(store, ComponentCache(1), LoraAdapters(store, 0), Limits(), placement=placement)
    info = store.resolve(model, "model")
    parts = engine.components(info)
    names = [slot.encoder for slot in info.family.encoder_slots(info)]
    texts = [
        text for item in (request(model) for _ in range(count)) for text in (item.positive_prompt, item.negative_prompt)
    ]
    rows = {
        name: [split_into_chunks(tokenizer_for(parts, name), literal(text), [], name).chunks[0] for text in texts]
        for name in names
    }

    def passes(per_pass: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for first in range(0, len(texts), per_pass):
                for name in names:
                    chunks = rows[name][first : first + per_pass]
                    encode_rows(parts[name], info.family, chunks, [0] * len(chunks))
        if placement.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / count * 1e3

    passes(2), passes(2 * count)  # warm the kernels at both shapes
    times: dict[str, list[float]] = {"one per pass": [], "batched": []}
    for _ in range(rounds):
        times["one per pass"].append(passes(2))
        times["batched"].append(passes(2 * count))
    return {name: median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict:
    from triptych.serving.settings import Settings
    from triptych.v1 import encoder_service_pb2_grpc

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls and no 64-caller run (~1 minute)")
    parser.add_argument("--model", default="tiny/sdxl")
    parser.add_argument("--model-root", type=Path, help="a store holding --model; default: a fresh tiny family")
    parser.add_argument(
        "--full-size",
        choices=("sd15", "sdxl"),
        help="a fresh full-size model (real architecture, random weights) instead of --model, drawn on TRIPTYCH_DEVICE",
    )
    parser.add_argument("--record", action="store_true", help="rewrite the encoder table of bench/RESULTS.md")
    args = parser.parse_args(argv)
    callers = [1, 4, 16] if args.quick else [1, 4, 16, 64]
    per_caller, minimum, rounds = (8, 60, 3) if args.quick else (16, 150, 5)
    if args.full_size:
        settings = Settings()
        args.model = f"full-size/{args.full_size}"
        store = full_size_store(args.full_size, settings.dtype, settings.device)
    else:
        store = contextlib.nullcontext(args.model_root) if args.model_root else tiny_store()
    figures: dict = {"machine": machine(), "model": args.model, "quick": args.quick, "rows": {}}
    with store as root:
        ceiling = forward_ceiling(root, args.model, 16, rounds)
        figures["ceiling"] = ceiling
        print(
            f"forward passes alone, in process: one request per pass {ceiling['one per pass']:.2f} ms/request, "
            f"16 per pass {ceiling['batched']:.2f} ms/request ({ceiling['one per pass'] / ceiling['batched']:.2f}x: "
            "the most batching can give here)",
            flush=True,
        )
        unbatched_env = {"TRIPTYCH_ENCODER_MAX_BATCH_ROWS": "1", "TRIPTYCH_ENCODER_CACHE_BYTES": "0"}
        with serve_encoder(root, unbatched_env) as plain, serve_encoder(root, {}) as batched:
            stubs = {
                "one at a time": encoder_service_pb2_grpc.TextEncoderServiceStub(plain),
                "batched": encoder_service_pb2_grpc.TextEncoderServiceStub(batched),
            }
            for stub in stubs.values():  # load the model, warm the kernels
                latencies(stub, [request(args.model) for _ in range(5)])
            baseline = None
            for count in callers:
                total = max(count * per_caller, minimum)
                # Interleaved rounds, median per configuration: the shared machine's load drifts.
                rates: dict[str, list[float]] = {name: [] for name in stubs}
                for _ in range(rounds):
                    for name, stub in stubs.items():
                        rates[name].append(throughput(stub, args.model, count, total))
                row = {name: median(values) for name, values in rates.items()}
                baseline = baseline or row["one at a time"]
                figures["rows"][count] = row
                spread = "; ".join(f"{name} " + " ".join(f"{v:.0f}" for v in values) for name, values in rates.items())
                print(
                    f"{count:>3} callers: one at a time {row['one at a time']:7.1f} req/s, batched "
                    f"{row['batched']:7.1f} req/s ({row['batched'] / row['one at a time']:.2f}x at the same "
                    f"concurrency, {row['batched'] / baseline:.2f}x a single caller) [rounds: {spread}]",
                    flush=True,
                )
            repeats = 50 if args.quick else 200
            misses = latencies(stubs["batched"], [request(args.model) for _ in range(repeats)])
            same = request(args.model, "a red fox, cached")
            hits = latencies(stubs["batched"], [same] * (repeats + 1))[1:]
            figures["miss_p50_ms"], figures["hit_p50_ms"] = median(misses) * 1e3, median(hits) * 1e3
            print(
                f"latency p50: cache hit {figures['hit_p50_ms']:.2f} ms, miss {figures['miss_p50_ms']:.2f} ms "
                f"({figures['miss_p50_ms'] / figures['hit_p50_ms']:.1f}x faster on a hit)"
            )
    if args.record:
        record(figures, argv)
    return figures


def record(figures: dict, argv: list[str] | None) -> None:
    """Rewrites the encoder table in bench/RESULTS.md between its markers."""
    single = figures["rows"][1]["one at a time"]
    flags = sys.argv[1:] if argv is None else argv
    rows = [
        f"Measured on {figures['machine']} with `{' '.join(['python -m bench.encoder_throughput', *flags])}`"
        f" ({figures['model']}; each Encode = prompt + negative, 2 chunks).",
        "",
        "| callers | one at a time (req/s) | batched (req/s) | batched / one at a time | batched / 1 caller |",
        "|---|---|---|---|---|",
    ]
    for count, row in figures["rows"].items():
        rows.append(
            f"| {count} | {row['one at a time']:.1f} | {row['batched']:.1f} | "
            f"**{row['batched'] / row['one at a time']:.2f}×** | {row['batched'] / single:.2f}× |"
        )
    ceiling = figures["ceiling"]
    one, batched = 1e3 / ceiling["one per pass"], 1e3 / ceiling["batched"]
    rows.append(
        f"| 16, forward passes alone (in process, no gRPC: the ceiling) | {one:.1f} | {batched:.1f} | "
        f"**{batched / one:.2f}×** | |"
    )
    rows.append(
        f"| cache hit p50 | | {figures['hit_p50_ms']:.2f} ms | miss p50 {figures['miss_p50_ms']:.2f} ms | "
        f"**{figures['miss_p50_ms'] / figures['hit_p50_ms']:.1f}×** faster |"
    )
    rewrite_results("encoder", rows)


if __name__ == "__main__":
    main()
