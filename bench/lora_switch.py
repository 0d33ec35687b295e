"""LoRA set switch latency, as a request meets it: LoraAdapters (peft layers beside the weights) against
MergedLoras (deltas merged into the weights), optionally on a compiled UNet.

Two rank-16 LoRAs on every attention projection (as most SD1.5 LoRAs), saved by diffusers' own
save_lora_weights, then activated exactly as the denoiser does for a request: the first use of each (file read +
injection), switching between sets already loaded, two LoRAs at once, and turning LoRAs off. The target is
< 100 ms per switch.

With --compile the UNet is compiled first and each switch is timed up to the end of the next UNet step (a CFG
batch), so a recompile shows: peft layers put each set's names and weights into the graph as constants, so every
new (set, weights) recompiles; merged weights are graph inputs, so nothing does. The step alone is the baseline.

    python -m bench.lora_switch [--model sd15|tiny] [--compile] [--device cpu] [--dtype float32] [--rank 16]
        [--switches 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine


def _write_lora(unet, folder: Path, name: str, rank: int, seed: int) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in unet.named_parameters():
            if f".{name}." in key:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"{name}.safetensors")
    unet.delete_adapters(name)


def _unet(model: str):
    if model == "tiny":
        from triptych.model_builders.tiny import _sd15_unet

        return _sd15_unet()
    from triptych.model_builders.full_size import sd15_unet

    return sd15_unet()


def _measure(unet, root: Path, mode: str, args) -> dict:
    from triptych.model_store import ModelStore
    from triptych.runtime.lora import LoraAdapters, MergedLoras
    from triptych.runtime.placement import compiled_graphs

    adapters = (MergedLoras if mode == "merged" else LoraAdapters)(ModelStore(root), 1 << 30)
    modules = {"unet": unet}
    config = unet.config
    side = config.sample_size
    dtype = getattr(torch, args.dtype)
    sample = torch.randn(2, config.in_channels, side, side, device=args.device, dtype=dtype)
    context = torch.randn(2, 77, config.cross_attention_dim, device=args.device, dtype=dtype)
    timestep = torch.tensor(500, device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=context, return_dict=False)
        sync()

    def timed(loras) -> float:
        started = time.perf_counter()
        adapters.activate("sd1", modules, loras)
        sync()
        if args.compile:
            step()
        return time.perf_counter() - started

    if args.compile:
        step()  # the first compile, before any LoRA
    first = [timed((("loras/a", 1.0),)), timed((("loras/b", 0.8),))]
    graphs = compiled_graphs()
    switches, offs, both = [], [], []
    for i in range(args.switches):
        # New weights each round: a graph that holds the weights as constants must recompile for every one.
        switches.append(timed((("loras/a" if i % 2 else "loras/b", 1.0 - i / 100),)))
        offs.append(timed(()))
        both.append(timed((("loras/a", 0.7), ("loras/b", 0.5 - i / 100))))
    steps = []
    if args.compile:
        for _ in range(3):
            started = time.perf_counter()
            step()
            steps.append(time.perf_counter() - started)
    result = {
        "first_use_ms": statistics.median(first) * 1000,
        "switch_ms": statistics.median(switches) * 1000,
        "off_ms": statistics.median(offs) * 1000,
        "two_loras_ms": statistics.median(both) * 1000,
        "recompiles": compiled_graphs() - graphs,
        "step_ms": statistics.median(steps) * 1000 if steps else 0.0,
    }
    adapters.activate("sd1", modules, ())
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="the UNet's, as TRIPTYCH_DTYPE"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="compile the UNet; time each switch + one step")
    parser.add_argument("--modes", default="adapters,merged")
    args = parser.parse_args(argv)

    from triptych.serving.server import keep_freed_memory

    keep_freed_memory()  # as every service process does at start
    result = {"machine": machine(), "device": args.device, "rank": args.rank, "model": args.model}
    with tempfile.TemporaryDirectory(prefix="triptych-bench-") as root:
        folder = Path(root) / "loras"
        folder.mkdir()
        for mode in args.modes.split(","):
            torch.manual_seed(0)
            unet = _unet(args.model).eval()
            if not any(folder.iterdir()):
                for seed, name in enumerate(("a", "b")):
                    _write_lora(unet, folder, name, args.rank, seed)
            unet = unet.to(args.device, dtype=getattr(torch, args.dtype))
            if args.compile:
                torch._dynamo.reset()
                unet.compile()
            result[mode] = _measure(unet, Path(root), mode, args)
            del unet
        result["file_mb"] = (folder / "a.safetensors").stat().st_size / 2**20
    for mode in args.modes.split(","):
        r = result[mode]
        compiled = f", compiled (switch + one step; step alone {r['step_ms']:.1f} ms), {r['recompiles']} recompiles"
        print(
            f"LoRA switch, {mode}, {args.model} SD1.5 UNet on {args.device} in {args.dtype}"
            f"{compiled if args.compile else ''}, rank "
            f"{args.rank} ({result['file_mb']:.1f} MB file): first use {r['first_use_ms']:.0f} ms, switch "
            f"{r['switch_ms']:.1f} ms, off {r['off_ms']:.1f} ms, two LoRAs {r['two_loras_ms']:.1f} ms"
        )
    return result


if __name__ == "__main__":
    main()
