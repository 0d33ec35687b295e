"""LoRA set switch latency on a full-size SD1.5 UNet (random weights), eager (no compiled graph to rebuild).

Two rank-16 LoRAs on every attention projection (as most SD1.5 LoRAs), saved by diffusers' own
save_lora_weights, then activated through the denoiser's LoraAdapters exactly as a request does: the first
use of each (file read + injection), switching between sets that are already injected, and turning LoRAs off.
The target is < 100 ms per switch.

    python -m bench.lora_switch [--device cpu] [--rank 16] [--switches 10]
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--switches", type=int, default=10)
    args = parser.parse_args(argv)

    from triptych.core.lora import LoraAdapters
    from triptych.core.model_store import ModelStore
    from triptych.models.full_size import sd15_unet

    torch.manual_seed(0)
    unet = sd15_unet().eval()
    with tempfile.TemporaryDirectory(prefix="triptych-bench-") as root:
        folder = Path(root) / "loras"
        folder.mkdir()
        for seed, name in enumerate(("a", "b")):
            _write_lora(unet, folder, name, args.rank, seed)
        unet = unet.to(args.device)
        adapters = LoraAdapters(ModelStore(Path(root)), 1 << 30)
        modules = {"unet": unet}

        def timed(loras) -> float:
            started = time.perf_counter()
            adapters.activate("sd1", modules, loras)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - started

        first = [timed((("loras/a", 1.0),)), timed((("loras/b", 0.8),))]
        switches, offs, both = [], [], []
        for i in range(args.switches):
            switches.append(timed((("loras/a" if i % 2 else "loras/b", 1.0),)))
            offs.append(timed(()))
            both.append(timed((("loras/a", 0.7), ("loras/b", 0.5))))
        size_mb = (folder / "a.safetensors").stat().st_size / 2**20
    result = {
        "machine": machine(),
        "device": args.device,
        "rank": args.rank,
        "file_mb": size_mb,
        "first_use_ms": statistics.median(first) * 1000,
        "switch_ms": statistics.median(switches) * 1000,
        "off_ms": statistics.median(offs) * 1000,
        "two_loras_ms": statistics.median(both) * 1000,
    }
    print(
        f"LoRA switch, full-size SD1.5 UNet on {args.device}, rank {args.rank} ({size_mb:.1f} MB file): first use "
        f"{result['first_use_ms']:.0f} ms, switch between injected sets {result['switch_ms']:.1f} ms, off "
        f"{result['off_ms']:.1f} ms, two LoRAs {result['two_loras_ms']:.1f} ms"
    )
    return result


if __name__ == "__main__":
    main()
