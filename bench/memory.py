"""Resident memory of each service process with the tiny family loaded (SD1.5 + SDXL generated once each),
and which components each holds (the denoiser holds no encoder or VAE weights).

    python -m bench.memory
"""

from __future__ import annotations

import psutil

from bench.common import machine, serve_all, tiny_store


def main(argv: list[str] | None = None) -> dict:
    from triptych.client import ImageClient, open_channel
    from triptych.v1 import image_service_pb2, runtime_service_pb2, runtime_service_pb2_grpc

    report = {"machine": machine(), "services": {}}
    with tiny_store() as root, serve_all(root) as (addresses, pids):
        with ImageClient(addresses["gateway"]) as client:
            for model in ("tiny/sd15", "tiny/sdxl"):
                client.generate(image_service_pb2.GenerateRequest(model=model, positive_prompt="x", steps=2, seed=1))
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


if __name__ == "__main__":
    main()
