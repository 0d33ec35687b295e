"""Hop cost at real sizes: an SDXL Encode response (2×77×2048 fp16, 630 KB) and SDXL latents
(1×4×128×128 fp32, 262 KB) through the real message types, the real server bootstrap and our tensor codec,
over TCP loopback and a unix socket. The servicers answer from memory, so only transport + (de)serialisation
is measured. Baseline in the same run: an empty call.

    python -m bench.hop_cost [--calls 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import grpc
import torch

from bench.common import machine, percentile
from triptych.core.codec import decode_tensor, encode_tensor
from triptych.core.server import Service, start
from triptych.core.settings import Settings
from triptych.v1 import (
    common_pb2,
    decoder_service_pb2,
    decoder_service_pb2_grpc,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
)


class FixedEncoder(encoder_service_pb2_grpc.TextEncoderServiceServicer):
    def __init__(self):
        embeds = encode_tensor(torch.randn(1, 77, 2048).half())
        pooled = encode_tensor(torch.randn(1, 1280).half())
        conditioning = common_pb2.TextConditioning(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        self.response = encoder_service_pb2.EncodeResponse(positive=conditioning, negative=conditioning)

    def Encode(self, request, context):
        return self.response if request.positive_prompt else encoder_service_pb2.EncodeResponse()


class LatentSink(decoder_service_pb2_grpc.DecoderServiceServicer):
    def Decode(self, request, context):
        decode_tensor(request.latents, "latents")  # what a real decoder does first
        return decoder_service_pb2.DecodeResponse()


def measure(address: str, calls: int) -> dict[str, float]:
    latents = decoder_service_pb2.DecodeRequest(model="x", latents=encode_tensor(torch.randn(1, 4, 128, 128)))
    options = Settings().grpc_options()
    with grpc.insecure_channel(address, options=options) as channel:
        encoder = encoder_service_pb2_grpc.TextEncoderServiceStub(channel)
        decoder = decoder_service_pb2_grpc.DecoderServiceStub(channel)
        cases = {
            "empty call": lambda: encoder.Encode(encoder_service_pb2.EncodeRequest()),
            "encode response 630 KB": lambda: encoder.Encode(encoder_service_pb2.EncodeRequest(positive_prompt="x")),
            "latents request 262 KB": lambda: decoder.Decode(latents),
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)

    def register(server):
        encoder_service_pb2_grpc.add_TextEncoderServiceServicer_to_server(FixedEncoder(), server)
        decoder_service_pb2_grpc.add_DecoderServiceServicer_to_server(LatentSink(), server)

    service = Service("bench", ["triptych.v1.TextEncoderService", "triptych.v1.DecoderService"], register)
    report = {"machine": machine()}
    server, port, _ = start(service, Settings(), 0)
    try:
        report["tcp"] = measure(f"127.0.0.1:{port}", args.calls)
    finally:
        server.stop(0)
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(host=f"unix:{folder}/hop.sock")
        server, _, _ = start(service, settings, 0)
        try:
            report["unix"] = measure(f"unix:{folder}/hop.sock", args.calls)
        finally:
            server.stop(0)
    for transport in ("tcp", "unix"):
        rows = report[transport]
        print(f"{transport:5s} " + ", ".join(f"{k} {v:.2f} ms" for k, v in rows.items() if not k.endswith("p90")))
    return report


if __name__ == "__main__":
    main()
