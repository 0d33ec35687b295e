"""Split overhead: one request through the four processes vs diffusers' in-process pipeline, same weights.

Interleaved runs, median ratio. Also where the chain's time goes, from the gateway's `server-timing` trailer
(docs/decisions.md, Timing): each stage and its hop, the gateway's own time, and the caller's hop to the
gateway; one denoising step, from the denoiser's progress events, against one of diffusers' steps; and the
denoiser's Denoise call alone against diffusers' own loop on the same embeddings (output_type="latent").

    python -m bench.split_overhead [--runs 15] [--model tiny/sdxl] [--size 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import machine, median, serve_all, tiny_store


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--model", default="tiny/sdxl")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment of the services"
    )
    args = parser.parse_args(argv)

    import diffusers

    from triptych.client import ImageClient, open_channel, server_timing
    from triptych.runtime.codec import decode_tensor
    from triptych.v1 import (
        denoiser_service_pb2,
        denoiser_service_pb2_grpc,
        encoder_service_pb2,
        encoder_service_pb2_grpc,
        image_service_pb2,
    )

    # Fair share: the chain's three torch processes run one after another, so each may use every core,
    # exactly like the in-process pipeline.
    threads = torch.get_num_threads()
    with (
        tiny_store() as root,
        serve_all(
            root, {"TRIPTYCH_TORCH_THREADS": str(threads), **dict(e.split("=", 1) for e in args.service_env)}
        ) as (addresses, _),
    ):
        cls = diffusers.StableDiffusionXLPipeline if "sdxl" in args.model else diffusers.StableDiffusionPipeline
        pipe = cls.from_pretrained(root / args.model)
        pipe.set_progress_bar_config(disable=True)
        request = image_service_pb2.GenerateRequest(
            model=args.model,
            positive_prompt="a red fox",
            seed=1,
            width=args.size,
            height=args.size,
            steps=args.steps,
            cfg_scale=7.0,
        )

        def in_process() -> float:
            started = time.perf_counter()
            pipe(
                prompt="a red fox",
                width=args.size,
                height=args.size,
                num_inference_steps=args.steps,
                guidance_scale=7.0,
                generator=torch.Generator("cpu").manual_seed(1),
            )
            return time.perf_counter() - started

        client = ImageClient(addresses["gateway"])

        # A caller without a progress bar: one progress event (the last step's) instead of one per step.
        quiet = image_service_pb2.GenerateRequest()
        quiet.CopyFrom(request)
        quiet.progress_interval_ms = 60_000

        breakdowns: list[dict[str, float]] = []  # per chain run with per-step progress: trailer, caller hop, step
        steps_seen: list[float] = []

        def chain(which=request) -> float:
            started = time.perf_counter()
            call = client.stream(which)
            elapsed = [e.progress.elapsed_seconds for e in call if e.progress.stage == "denoise"]
            seconds = time.perf_counter() - started
            if which is request:
                timing = server_timing(call)
                breakdowns.append({**timing, "caller-hop": seconds - timing["total"]})
                steps_seen.extend(b - a for a, b in zip(elapsed, elapsed[1:], strict=False))
            return seconds

        encoder = encoder_service_pb2_grpc.TextEncoderServiceStub(open_channel(addresses["encoder"]))
        denoiser = denoiser_service_pb2_grpc.DenoiserServiceStub(open_channel(addresses["denoiser"]))

        encode_request = encoder_service_pb2.EncodeRequest(
            model=args.model, positive_prompt="a red fox", include_negative=True
        )

        def denoise_request(encoded, **options) -> denoiser_service_pb2.DenoiseRequest:
            return denoiser_service_pb2.DenoiseRequest(
                model=args.model,
                positive=encoded.positive,
                negative=encoded.negative,
                steps=args.steps,
                guidance_scale=7.0,
                seed=1,
                width=args.size,
                height=args.size,
                **options,
            )

        # The denoise stage alone against diffusers' own loop on the same embeddings (output_type="latent"):
        # whether the split costs anything inside the denoiser, apart from the hops and the progress events.
        embedded = encoder.Encode(encode_request)
        embeddings = {
            "prompt_embeds": decode_tensor(embedded.positive.prompt_embeds, "p").clone(),
            "negative_prompt_embeds": decode_tensor(embedded.negative.prompt_embeds, "n").clone(),
        }
        if "sdxl" in args.model:
            embeddings["pooled_prompt_embeds"] = decode_tensor(embedded.positive.pooled_prompt_embeds, "p").clone()
            embeddings["negative_pooled_prompt_embeds"] = decode_tensor(
                embedded.negative.pooled_prompt_embeds, "n"
            ).clone()

        diffusers_steps: list[float] = []  # one diffusers step's duration, per step after the first of each run
        step_ends: list[float] = []

        def step_ended(_pipe, _step, _timestep, _tensors) -> dict:
            step_ends.append(time.perf_counter())
            return {}

        def in_process_denoise() -> float:
            started = time.perf_counter()
            step_ends.clear()
            pipe(
                **embeddings,
                width=args.size,
                height=args.size,
                num_inference_steps=args.steps,
                guidance_scale=7.0,
                generator=torch.Generator("cpu").manual_seed(1),
                output_type="latent",
                callback_on_step_end=step_ended,
            )
            seconds = time.perf_counter() - started
            # Between step ends only: the first step's time would include the set-up.
            diffusers_steps.extend(b - a for a, b in zip(step_ends, step_ends[1:], strict=False))
            return seconds

        alone = denoise_request(embedded, progress_interval_ms=60_000)

        def denoise_alone() -> float:
            started = time.perf_counter()
            list(denoiser.Denoise(alone))
            return time.perf_counter() - started

        for _ in range(2):  # warm-up: loads, allocator, caches
            in_process(), chain(), chain(quiet), in_process_denoise(), denoise_alone()
        del breakdowns[:], steps_seen[:], diffusers_steps[:]
        local, split, split_quiet, local_denoise, remote_denoise = [], [], [], [], []
        for _ in range(args.runs):
            local.append(in_process())
            split.append(chain())
            split_quiet.append(chain(quiet))
            local_denoise.append(in_process_denoise())
            remote_denoise.append(denoise_alone())
        result = {
            "machine": machine(),
            "torch_threads": threads,
            "in_process_s": median(local),
            "chain_s": median(split),
            "ratio": median(split) / median(local),
            "chain_quiet_s": median(split_quiet),
            "ratio_quiet": median(split_quiet) / median(local),
            # Medians per metric of the chain runs' trailers (with per-step progress), plus the caller's hop.
            "breakdown_s": {name: median([b[name] for b in breakdowns]) for name in breakdowns[0]},
            "step_s": median(steps_seen),
            "in_process_step_s": median(diffusers_steps),
            "in_process_denoise_s": median(local_denoise),
            "denoise_alone_s": median(remote_denoise),
        }
        result["ratio_denoise"] = result["denoise_alone_s"] / result["in_process_denoise_s"]
        result["ratio_step"] = result["step_s"] / result["in_process_step_s"]
    print(
        f"split overhead ({args.model}, {args.size}², {args.steps} steps, {args.runs} interleaved runs, "
        f"torch threads {threads}): in-process {result['in_process_s'] * 1000:.0f} ms, chain "
        f"{result['chain_s'] * 1000:.0f} ms, ratio {result['ratio']:.3f}×; without per-step progress "
        f"{result['chain_quiet_s'] * 1000:.0f} ms, ratio {result['ratio_quiet']:.3f}×"
    )
    print(f"  where the chain's time goes (ms, medians): {breakdown_text(result['breakdown_s'])}")
    print(
        f"  one denoising step (median, per-step progress) {result['step_s'] * 1000:.2f} ms vs diffusers' "
        f"{result['in_process_step_s'] * 1000:.2f} ms, ratio {result['ratio_step']:.3f}×"
    )
    print(
        f"  denoise alone (one progress event) {result['denoise_alone_s'] * 1000:.1f} ms vs diffusers' latent loop "
        f"{result['in_process_denoise_s'] * 1000:.1f} ms, ratio {result['ratio_denoise']:.3f}×"
    )
    return result


def breakdown_text(breakdown: dict[str, float]) -> str:
    """`encode 1.5, encode-hop 0.4, ...` in milliseconds, in the trailer's order."""
    return ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in breakdown.items())


if __name__ == "__main__":
    main()
