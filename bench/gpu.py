"""GPU benchmark: the Triptych denoiser service against diffusers' eager pipeline, same weights, same run.

Full-size SD1.5 at 512² and SDXL at 1024² (the real architectures with random weights, which cost exactly what
trained ones do: triptych.model_builders.full_size), 30 steps, CFG 7, fp16. For each: seconds per image and it/s of
diffusers eager (pipeline to latents, prompt embeddings given) and of a real `triptych serve denoiser` process
(TRIPTYCH_DEVICE / TRIPTYCH_DTYPE / TRIPTYCH_CHANNELS_LAST) called over gRPC with the same embeddings, eager
and compiled (TRIPTYCH_COMPILE, --compile-mode; its first call, which compiles, is reported apart); the
FLOPs of one CFG step (torch.utils.flop_counter) and each figure's share of the GPU's dense peak; the peak GPU
memory of the denoiser, and of the text encoders on the same device (RuntimeService cuda_max_allocated_bytes).

    python -m bench.gpu [--families sd15 sdxl] [--runs 3] [--peak-tflops 989] [--record]
    python -m bench.gpu --device cpu --tiny --compile-mode default   # smoke test on the tiny family (no GPU)

Peak: H100 SXM and H200 are 989 TFLOP/s dense fp16/bf16 (1979 is with sparsity).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.common import machine, rewrite_results
from tests.e2e.processes import serve_role

SIZES = {"sd15": 512, "sdxl": 1024}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pipeline(root: Path, family: str, tiny: bool, dtype: torch.dtype, device: torch.device):
    import diffusers

    if tiny:
        from triptych.model_builders.tiny import build_tiny_family

        build_tiny_family(root)
        model = f"tiny/{family}"
    else:
        from triptych.model_builders.full_size import build_full_size

        model = f"full-size/{family}"
        build_full_size(root, family, dtype=dtype, device=device)
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(root / model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


def _step_flops(pipe, embeds: dict, size: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOPs of one UNet call on the CFG batch (two images) at `size`²."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    latents = torch.randn(2, unet.config.in_channels, size // 8, size // 8, device=device, dtype=dtype)
    hidden = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    added = None
    if "pooled_prompt_embeds" in embeds:
        pooled = torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]])
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(latents, torch.tensor(500, device=device), encoder_hidden_states=hidden, added_cond_kwargs=added)
    return float(counter.get_total_flops())


def run_family(family: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    from triptych.client import open_channel
    from triptych.runtime.codec import encode_tensor
    from triptych.v1 import (
        common_pb2,
        denoiser_service_pb2,
        denoiser_service_pb2_grpc,
        encoder_service_pb2,
        encoder_service_pb2_grpc,
        runtime_service_pb2,
        runtime_service_pb2_grpc,
    )

    size = 128 if args.tiny else SIZES[family]
    steps = 4 if args.tiny else args.steps
    with tempfile.TemporaryDirectory(prefix="triptych-gpu-") as folder:
        root = Path(folder)
        model, pipe = _pipeline(root, family, args.tiny, dtype, device)
        if family == "sdxl":
            pos, neg, pooled, neg_pooled = pipe.encode_prompt("a red fox", device=device)
            embeds = dict(
                prompt_embeds=pos,
                negative_prompt_embeds=neg,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=neg_pooled,
            )
        else:
            pos, neg = pipe.encode_prompt("a red fox", device, 1, True)
            embeds = dict(prompt_embeds=pos, negative_prompt_embeds=neg)
        flops = _step_flops(pipe, embeds, size, device, dtype)

        def diffusers_eager() -> float:
            _sync(device)
            started = time.perf_counter()
            pipe(
                **embeds,
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=7.0,
                generator=torch.Generator("cpu").manual_seed(1),
                output_type="latent",
            )
            _sync(device)
            return time.perf_counter() - started

        def conditioning(prompt, pooled_embeds=None) -> common_pb2.TextConditioning:
            message = common_pb2.TextConditioning(prompt_embeds=encode_tensor(prompt))
            if pooled_embeds is not None:
                message.pooled_prompt_embeds.CopyFrom(encode_tensor(pooled_embeds))
            return message

        request = denoiser_service_pb2.DenoiseRequest(
            model=model,
            positive=conditioning(embeds["prompt_embeds"], embeds.get("pooled_prompt_embeds")),
            negative=conditioning(embeds["negative_prompt_embeds"], embeds.get("negative_pooled_prompt_embeds")),
            steps=steps,
            guidance_scale=7.0,
            seed=1,
            width=size,
            height=size,
        )
        env = {
            "TRIPTYCH_DEVICE": str(device),
            "TRIPTYCH_DTYPE": args.dtype,
            "TRIPTYCH_CHANNELS_LAST": "1" if device.type == "cuda" else "0",
        }
        compiled_env = {**env, "TRIPTYCH_COMPILE": "1", "TRIPTYCH_COMPILE_MODE": args.compile_mode}
        paths = {"triptych": env, **({"compiled": compiled_env} if args.compile_mode != "off" else {})}
        with contextlib.ExitStack() as stack:
            stubs, times, first_call = {}, {name: [] for name in paths}, {}
            for name, path_env in paths.items():
                _, address = stack.enter_context(serve_role("denoiser", root, path_env))
                stubs[name] = stack.enter_context(open_channel(address))

            def triptych(name: str) -> float:
                started = time.perf_counter()
                events = list(denoiser_service_pb2_grpc.DenoiserServiceStub(stubs[name]).Denoise(request))
                assert events[-1].HasField("result")
                return time.perf_counter() - started

            for name in paths:  # the first call loads the model (and compiles it)
                first_call[name] = triptych(name)
            for _ in range(2):  # warm-up: cuDNN autotuning, allocator
                diffusers_eager(), [triptych(name) for name in paths]
            eager = []
            for _ in range(args.runs):
                eager.append(diffusers_eager())
                for name in paths:
                    times[name].append(triptych(name))
            infos = {
                name: runtime_service_pb2_grpc.RuntimeServiceStub(stub).GetRuntimeInfo(
                    runtime_service_pb2.GetRuntimeInfoRequest()
                )
                for name, stub in stubs.items()
            }
            info = infos["triptych"]
        # The text encoders on the same device, in a process of their own (as `triptych serve` co-locates them).
        with serve_role("encoder", root, env) as (_, address), open_channel(address) as channel:
            encoder_service_pb2_grpc.TextEncoderServiceStub(channel).Encode(
                encoder_service_pb2.EncodeRequest(model=model, positive_prompt="a red fox", include_negative=True)
            )
            encoder_info = runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
                runtime_service_pb2.GetRuntimeInfoRequest()
            )
    result = {"family": family, "size": size, "steps": steps, "step_tflop": flops / 1e12}
    for name, runs in (("diffusers", eager), *times.items()):
        seconds = statistics.median(runs)
        result[name] = {
            "s_per_image": seconds,
            "it_per_s": steps / seconds,
            "peak_share": flops * steps / seconds / (args.peak_tflops * 1e12),
            "speedup": statistics.median(eager) / seconds,
            "first_call_s": first_call.get(name, 0.0),
            # 0 on the compiled path means it fell back to eager (no C compiler for inductor/Triton: see the log).
            "graphs": infos[name].counters.get("compiled_graphs", 0) if name in infos else 0,
        }
    result["denoiser_peak_gib"] = info.counters.get("cuda_max_allocated_bytes", 0) / 2**30
    result["encoder_peak_gib"] = encoder_info.counters.get("cuda_max_allocated_bytes", 0) / 2**30
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--compile-mode",
        default="default",
        help='TRIPTYCH_COMPILE_MODE of a third path, a compiled denoiser ("max-autotune" tunes for minutes per '
        'shape); "off" leaves it out',
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense fp16/bf16 peak")
    parser.add_argument("--tiny", action="store_true", help="tiny family at 128², 4 steps: a smoke test")
    parser.add_argument("--record", action="store_true", help="rewrite the GPU table of bench/RESULTS.md")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = []
    # The table is printed and recorded after each family, so a failure or a time limit in a later family (a
    # one-shot run on a lent machine) keeps the rows already measured.
    for family in args.families:
        try:
            results.append(run_family(family, args, device, dtype))
        except Exception:  # noqa: BLE001 - reported, and the next family still runs
            traceback.print_exc()
            print(f"{family}: failed; its rows are left out", flush=True)
            continue
        rows = table(results, args, gpu)
        print("\n".join(rows), flush=True)
        if args.record:
            rewrite_results("gpu", rows)
    return results


def table(results: list[dict], args, gpu: str) -> list[str]:
    """The GPU table's lines for the families measured so far."""
    rows = [
        f"Measured on {gpu} ({machine()}), torch {torch.__version__}, with `python -m bench.gpu"
        f"{' --tiny' if args.tiny else ''} --device {args.device} --dtype {args.dtype}`; share of a "
        f"{args.peak_tflops:.0f} TFLOP/s dense peak.",
        "",
        "| model | path | s/image | it/s | share of peak | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        what = f"{r['family']} {r['size']}² × {r['steps']}, CFG ({r['step_tflop']:.2f} TFLOP/step), {args.dtype}"
        labels = {
            "diffusers": "diffusers eager pipeline",
            "triptych": "Triptych denoiser (gRPC), eager",
            "compiled": f"Triptych denoiser (gRPC), compiled {args.compile_mode}",
        }
        for name, label in labels.items():
            if name not in r:
                continue
            m = r[name]
            if name == "compiled":
                label += f" ({m['graphs']} graphs; first call, with compiling: {m['first_call_s']:.0f} s)"
            speed = f"**{m['speedup']:.2f}×**" if name != "diffusers" else "1.00×"
            rows.append(
                f"| {what} | {label} | {m['s_per_image']:.3f} | {m['it_per_s']:.2f} | {m['peak_share']:.1%} | {speed} |"
            )
        rows.append(
            f"| {what} | peak GPU memory (PyTorch allocator): denoiser / encoders co-located in their own process | "
            f"{r['denoiser_peak_gib']:.2f} GiB / +{r['encoder_peak_gib']:.2f} GiB | | | |"
        )
    return rows


if __name__ == "__main__":
    main()
