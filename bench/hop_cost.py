"""Hop cost at real sizes: an SDXL Encode response (2×77×2048 fp16, 630 KB) and SDXL latents
(1×4×128×128 fp32, 262 KB) through the real message types, the real server bootstrap and our tensor codec,
over TCP loopback and a unix socket, with the bytes in the message and through shared memory, to a server in
another process (both with the services' allocator setting, keep_freed_memory). Each case goes
from a torch tensor on one side to a torch tensor on the other (encode_tensor, the call, decode_tensor); the
servicers answer from memory, so only transport + (de)serialisation is measured. Baseline in the same run: an
empty call.

    python -m bench.hop_cost [--calls 300]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time

import grpc
import torch

from bench.common import machine, percentile
from triptych.runtime.codec import decode_tensor, encode_tensor
from triptych.serving import shm
from triptych.serving.server import Service, keep_freed_memory, start
from triptych.serving.settings import Settings
from triptych.v1 import (
    common_pb2,
    decoder_service_pb2,
    decoder_service_pb2_grpc,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    tensor_pb2,
)


class FixedEncoder(encoder_service_pb2_grpc.TextEncoderServiceServicer):
    def __init__(self):
        self.embeds, self.pooled = torch.randn(1, 77, 2048).half(), torch.randn(1, 1280).half()
        half = common_pb2.TextConditioning(
            prompt_embeds=encode_tensor(self.embeds), pooled_prompt_embeds=encode_tensor(self.pooled)
        )
        self.prebuilt = encoder_service_pb2.EncodeResponse(positive=half, negative=half)

    def Encode(self, request, context):
        if not request.positive_prompt:
            return encoder_service_pb2.EncodeResponse()
        if request.positive_prompt == "prebuilt":  # transport only: no tensor encoding on either side
            return self.prebuilt
        with shm.writer(request) as into:  # what the real encoder does: the caller's range when offered
            halves = [
                common_pb2.TextConditioning(
                    prompt_embeds=encode_tensor(self.embeds, into),
                    pooled_prompt_embeds=encode_tensor(self.pooled, into),
                )
                for _ in range(2)
            ]
        return encoder_service_pb2.EncodeResponse(positive=halves[0], negative=halves[1])


class LatentSink(decoder_service_pb2_grpc.DecoderServiceServicer):
    def Decode(self, request, context):
        decode_tensor(request.latents, "latents")  # what a real decoder does first
        return decoder_service_pb2.DecodeResponse()


def measure(address: str, calls: int, region: shm.OwnedRegion) -> dict[str, float]:
    latents = torch.randn(1, 4, 128, 128)
    options = Settings().grpc_options()
    with grpc.insecure_channel(address, options=options) as channel:
        encoder = encoder_service_pb2_grpc.TextEncoderServiceStub(channel)
        decoder = decoder_service_pb2_grpc.DecoderServiceStub(channel)

        def encode(output: tensor_pb2.SharedMemoryRegion | None) -> None:
            response = encoder.Encode(
                encoder_service_pb2.EncodeRequest(positive_prompt="x", output_shared_memory=output)
            )
            for half in (response.positive, response.negative):
                decode_tensor(half.prompt_embeds, "prompt_embeds"), decode_tensor(half.pooled_prompt_embeds, "pooled")

        def decode(into: shm.Writer | None) -> None:
            decoder.Decode(decoder_service_pb2.DecodeRequest(model="x", latents=encode_tensor(latents, into)))

        def decode_shared() -> None:
            with shm.Writer(region.slice(0, region.size), "latents") as into:
                decode(into)

        cases = {
            "empty call": lambda: encoder.Encode(encoder_service_pb2.EncodeRequest()),
            "encode response 630 KB, transport only": lambda: encoder.Encode(
                encoder_service_pb2.EncodeRequest(positive_prompt="prebuilt")
            ),
            "encode response 630 KB": lambda: encode(None),
            "latents request 262 KB": lambda: decode(None),
            "encode response 630 KB, shared memory": lambda: encode(region.slice(0, region.size)),
            "latents request 262 KB, shared memory": decode_shared,
        }
        results = {}
        for name, call in cases.items():
            for _ in range(20):
                call()
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
            results[name] = percentile(times, 0.5) * 1000
            results[name + " p90"] = percentile(times, 0.9) * 1000
    return results


def serve(host: str) -> None:
    """The far end, in its own process (as in a deployment: no GIL shared with the caller); prints its address."""

    def register(server):
        encoder_service_pb2_grpc.add_TextEncoderServiceServicer_to_server(FixedEncoder(), server)
        decoder_service_pb2_grpc.add_DecoderServiceServicer_to_server(LatentSink(), server)

    keep_freed_memory()  # as every service process does at start (serve_forever)
    service = Service("bench", ["triptych.v1.TextEncoderService", "triptych.v1.DecoderService"], register)
    settings = Settings(host=host)
    server, port, _ = start(service, settings, 0)
    print(host if host.startswith("unix:") else f"{host}:{port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0).wait()


@contextlib.contextmanager
def far_end(host: str):
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.hop_cost", "--serve", host],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield process.stdout.readline().strip()
    finally:
        process.stdin.close()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--serve", metavar="HOST", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return {}
    # This process plays the gateway's or the denoiser's part (a Triptych process too): the same allocator setting.
    # Without it, each fresh 630 KB message buffer is a new mmap whose pages fault in: 1.1 against 0.12 ms to build
    # and serialise the Encode response here.
    keep_freed_memory()
    report = {"machine": machine()}
    region = shm.OwnedRegion(4 << 20)
    try:
        with far_end("127.0.0.1") as address:
            report["tcp"] = measure(address, args.calls, region)
        with tempfile.TemporaryDirectory() as folder, far_end(f"unix:{folder}/hop.sock") as address:
            report["unix"] = measure(address, args.calls, region)
    finally:
        region.close()
    for transport in ("tcp", "unix"):
        rows = report[transport]
        print(f"{transport:5s} " + ", ".join(f"{k} {v:.2f} ms" for k, v in rows.items() if not k.endswith("p90")))
    return report


if __name__ == "__main__":
    main()
