"""Runs the CPU benchmarks (under 10 minutes) and rewrites the CPU and encoder tables of bench/RESULTS.md.

.venv/bin/python -m bench.run [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import importlib

from bench.common import rewrite_results
from bench.split_overhead import breakdown_text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a smoke check")
    args = parser.parse_args()
    quick = args.quick
    split = importlib.import_module("bench.split_overhead").main(["--runs", "5" if quick else "15"])
    compiled_split = importlib.import_module("bench.split_overhead").main(
        ["--runs", "5" if quick else "9", "--service-env", "TRIPTYCH_COMPILE=1"]
    )
    hops = importlib.import_module("bench.hop_cost").main(["--calls", "100" if quick else "300"])
    memory = importlib.import_module("bench.memory").main([])
    full_size = importlib.import_module("bench.memory").main(["--full-size"])
    lora = importlib.import_module("bench.lora_switch").main([])
    compiled = importlib.import_module("bench.lora_switch").main(
        ["--model", "tiny", "--compile", "--rank", "4", "--switches", "2" if quick else "3"]
    )
    rows = [
        f"Measured {datetime.date.today().isoformat()} on {split['machine']} with `python -m bench.run"
        f"{' --quick' if quick else ''}`.",
        "",
        "| benchmark | figure | baseline in the same run | ratio |",
        "|---|---|---|---|",
        f"| split overhead, tiny SDXL 128² × 20 steps, CFG 7 (median of interleaved runs) | chain "
        f"{split['chain_s'] * 1000:.0f} ms | in-process diffusers {split['in_process_s'] * 1000:.0f} ms | "
        f"**{split['ratio']:.3f}×** |",
        f"| … the same, progress_interval_ms 60000 (a caller without a progress bar: one progress event) | chain "
        f"{split['chain_quiet_s'] * 1000:.0f} ms | in-process diffusers {split['in_process_s'] * 1000:.0f} ms | "
        f"**{split['ratio_quiet']:.3f}×** |",
        "| … the same with the denoiser and decoder compiled (TRIPTYCH_COMPILE=1), against eager in-process diffusers "
        f"| chain "
        f"{compiled_split['chain_s'] * 1000:.0f} ms, one progress event {compiled_split['chain_quiet_s'] * 1000:.0f} "
        f"ms | in-process diffusers {compiled_split['in_process_s'] * 1000:.0f} ms | "
        f"**{compiled_split['ratio']:.3f}× / {compiled_split['ratio_quiet']:.3f}×** |",
        f"| … where the chain's time goes, ms (the gateway's server-timing trailer, medians; caller-hop: the caller "
        f"to the gateway and back) | {breakdown_text(split['breakdown_s'])} | | |",
        f"| … one denoising step (median, per-step progress) | {split['step_s'] * 1000:.2f} ms | diffusers' step "
        f"{split['in_process_step_s'] * 1000:.2f} ms | **{split['ratio_step']:.3f}×** |",
        f"| … the denoise stage alone (one Denoise call, one progress event), same embeddings | "
        f"{split['denoise_alone_s'] * 1000:.1f} ms | diffusers' loop, output_type=latent "
        f"{split['in_process_denoise_s'] * 1000:.1f} ms | **{split['ratio_denoise']:.3f}×** |",
    ]
    for transport in ("tcp", "unix"):
        h = hops[transport]
        empty = h["empty call"]
        rows.append(
            f"| hop p50 over {transport}, transport only: SDXL Encode response 630 KB, prebuilt | "
            f"{h['encode response 630 KB, transport only']:.2f} ms | empty call {empty:.2f} ms | "
            f"{h['encode response 630 KB, transport only'] / empty:.1f}× |"
        )
        for path in ("bytes", "shared memory"):
            suffix = "" if path == "bytes" else ", shared memory"
            encode, latents = h["encode response 630 KB" + suffix], h["latents request 262 KB" + suffix]
            rows.append(
                f"| hop p50 over {transport}, tensor to tensor, {path}: SDXL Encode response 630 KB / latents 262 KB "
                f"| {encode:.2f} ms / {latents:.2f} ms | empty call {empty:.2f} ms | {encode / empty:.1f}× / "
                f"{latents / empty:.1f}× |"
            )
    for mode, how in (("adapters", "peft layers beside the weights"), ("merged", "merged into the weights")):
        r = lora[mode]
        rows.append(
            f"| LoRA set switch, full-size SD1.5 UNet, eager, rank {lora['rank']} ({lora['file_mb']:.1f} MB each), "
            f"{how}: between loaded sets / two LoRAs / off | {r['switch_ms']:.1f} ms / {r['two_loras_ms']:.1f} ms / "
            f"{r['off_ms']:.1f} ms | first use (file read + injection) {r['first_use_ms']:.0f} ms | target < 100 ms |"
        )
    adapters, merged = compiled["adapters"], compiled["merged"]
    rows.append(
        f"| LoRA set switch + the next UNet step, tiny SD1.5 UNet compiled (inductor), new weights each switch: merged "
        f"({merged['recompiles']} recompiles) against peft layers ({adapters['recompiles']} recompiles) | "
        f"{merged['switch_ms']:.1f} ms (step alone {merged['step_ms']:.1f} ms) | {adapters['switch_ms']:.0f} ms | "
        f"{adapters['switch_ms'] / merged['switch_ms']:.0f}× faster |"
    )
    for what, report in (("tiny SD1.5 + SDXL loaded", memory), ("full-size SD1.5 (random weights), 512²", full_size)):
        for role, m in report["services"].items():
            rows.append(
                f"| RSS {role} ({what}) | {m['rss_mb']:.0f} MiB (weights {m['weights_mb']:.1f} "
                f"MiB: {', '.join(m['holds']) or 'none'}) | | |"
            )
    rewrite_results("cpu", rows)
    # The encoder table too (its own markers), so one command rewrites every CPU figure.
    importlib.import_module("bench.encoder_throughput").main(["--record", *(["--quick"] if quick else [])])


if __name__ == "__main__":
    main()
