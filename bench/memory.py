"""Resident memory of each service process, and which components each holds (the denoiser holds no encoder or
VAE weights): with the tiny family loaded (SD1.5 + SDXL generated once each), and with `--full-size`, with one
full-size SD1.5 (the real architecture, random weights: triptych.model_builders.full_size) generated once at 512²,
and with `--flow`, with the tiny FLUX and SD3 generated once each at 128². `--single-file`: the full-size SD1.5
served from its folder, then (fresh processes) from the same weights as one civitai-style LDM file under an AIR
id, with each process's resident and peak memory and the file's share of the folder's.

    python -m bench.memory [--full-size | --flow | --single-file]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import psutil

from bench.common import full_size_store, machine, serve_all, tiny_store


def main(argv: list[str] | None = None) -> dict:
    from triptych.client import ImageClient, open_channel
    from triptych.v1 import image_service_pb2, runtime_service_pb2, runtime_service_pb2_grpc

    parser = argparse.ArgumentParser()
    parser.add_argument("--full-size", action="store_true", help="one full-size SD1.5 instead of the tiny family")
    parser.add_argument("--flow", action="store_true", help="the tiny FLUX and SD3 instead of SD1.5 and SDXL")
    parser.add_argument("--single-file", action="store_true", help="full-size SD1.5: folder vs one LDM file")
    args = parser.parse_args(argv)
    if args.single_file:
        return single_file()
    store, models, steps = (
        (functools.partial(full_size_store, "sd15"), ("full-size/sd15",), 1)
        if args.full_size
        else (tiny_store, ("tiny/flux", "tiny/sd3") if args.flow else ("tiny/sd15", "tiny/sdxl"), 2)
    )
    size = {"width": 128, "height": 128} if args.flow else {}  # FLUX's default size is 1024²
    report = {"machine": machine(), "models": models, "services": {}}
    with store() as root, serve_all(root) as (addresses, pids):
        with ImageClient(addresses["gateway"]) as client:
            for model in models:
                client.generate(
                    image_service_pb2.GenerateRequest(model=model, positive_prompt="x", steps=steps, seed=1, **size)
                )
        for role, address in addresses.items():
            with open_channel(address) as channel:
                info = runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
                    runtime_service_pb2.GetRuntimeInfoRequest()
                )
            rss = psutil.Process(pids[role]).memory_info().rss
            held = sorted({c.component for c in info.loaded_components})
            weights = sum(c.parameter_bytes for c in info.loaded_components)
            report["services"][role] = {"rss_mb": rss / 2**20, "weights_mb": weights / 2**20, "holds": held}
            print(f"{role:9s} RSS {rss / 2**20:7.1f} MiB, weights {weights / 2**20:6.1f} MiB, holds {held}")
    return report


def _memory(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of a process, from /proc."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def single_file() -> dict:
    from triptych.client import ImageClient
    from triptych.model_builders.ldm import export_checkpoint
    from triptych.v1 import image_service_pb2

    report = {"machine": machine(), "services": {}}
    with full_size_store("sd15") as root:
        export_checkpoint(root / "full-size" / "sd15", root / "civitai" / "4384" / "128713.safetensors")
        for model in ("full-size/sd15", "civitai:4384@128713"):
            with serve_all(root) as (addresses, pids), ImageClient(addresses["gateway"]) as client:
                client.generate(image_service_pb2.GenerateRequest(model=model, positive_prompt="x", steps=1, seed=1))
                for role in ("encoder", "denoiser", "decoder"):
                    rss, peak = _memory(pids[role])
                    report["services"].setdefault(role, {})[model] = {"rss_mib": rss, "peak_mib": peak}
                    print(f"{model:22s} {role:9s} RSS {rss:8.1f} MiB, peak {peak:8.1f} MiB")
    for role, by_model in report["services"].items():
        folder, file = by_model["full-size/sd15"], by_model["civitai:4384@128713"]
        ratio, peak = file["rss_mib"] / folder["rss_mib"], file["peak_mib"] / folder["peak_mib"]
        print(f"{role:9s} file / folder: RSS {ratio:.3f}, peak {peak:.3f}")
    return report


if __name__ == "__main__":
    main()
