"""``python -m triptych.demo.train STAGE``: train, assemble and measure the demo family (docs/demo-model.md).

Training stages (each resumes from WORK/<stage>/checkpoint.pt): text, vae, vae-decoder (may run beside unet), unet,
unet-crescent, then on the trained base controlnet, lora, ti. assemble writes STORE/demo/base and whichever adapters
are trained; evaluate is the held-out measurement (WORK/evaluation.json and a contact sheet); all runs everything in
that order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .configs import STAGES

TRAINING = ("text", "vae", "vae-decoder", "unet", "unet-crescent", "controlnet", "lora", "ti")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m triptych.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=(*TRAINING, "assemble", "evaluate", "all", "unet-snapshot"))
    parser.add_argument("--work", type=Path, default=Path(".cache/demo-train"), help="checkpoints and stage outputs")
    parser.add_argument("--store", type=Path, default=Path("models"), help="model store root for assemble/evaluate")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (docs/demo-model.md: why 1)")
    parser.add_argument("--device", default="cpu", help="torch device of the training stages (cpu, cuda)")
    parser.add_argument("--steps", type=int, help="total steps of a training stage (default: configs.py)")
    parser.add_argument("--batch-size", type=int, help="batch size of a training stage (default: configs.py)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 250)")
    parser.add_argument("--max-minutes", type=float, help="stop a training stage after this long (checkpointed)")
    parser.add_argument("--to", type=Path, help="unet-snapshot: the work folder to write the UNet's EMA into")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="assemble's weights")
    return parser


def _train(stage: str, args: argparse.Namespace) -> bool:
    from .controlnet import train_controlnet
    from .inversion import train_inversion
    from .lora import train_lora
    from .text import train_text
    from .unet import train_unet, train_unet_crescent
    from .vae import train_vae, train_vae_decoder

    settings = STAGES[stage].with_overrides(
        steps=args.steps, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every
    )
    train = {
        "text": train_text,
        "vae": train_vae,
        "vae-decoder": train_vae_decoder,
        "unet": train_unet,
        "unet-crescent": train_unet_crescent,
        "controlnet": train_controlnet,
        "lora": train_lora,
        "ti": train_inversion,
    }[stage]
    max_seconds = args.max_minutes * 60 if args.max_minutes else None
    return train(
        args.work, settings, max_seconds=max_seconds, log=lambda line: print(line, flush=True), device=args.device
    )


def _evaluate(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from ..evaluate import contact_sheet, generate, score, write_report
    from ..vocabulary import HELD_OUT
    from .assemble import BASE_ID

    folder = args.store / BASE_ID
    pictures = generate(folder, [s.caption() for s in HELD_OUT])
    result = score(list(HELD_OUT), pictures)
    args.work.mkdir(parents=True, exist_ok=True)
    write_report(result, args.work / "evaluation.json")
    Image.fromarray(contact_sheet(np.asarray(pictures))).save(args.work / "held-out.png")
    print(json.dumps({"accuracy": result["accuracy"], "meets_bars": result["meets_bars"]}, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    stages = (*TRAINING, "assemble", "evaluate") if args.stage == "all" else (args.stage,)
    if args.stage == "all" and (args.steps or args.batch_size):
        print("--steps and --batch-size apply to one stage; name it instead of 'all'", file=sys.stderr)
        return 2
    if args.stage == "unet-snapshot":
        from .unet import snapshot

        print(f"unet-snapshot: wrote {snapshot(args.work, args.to)}")
        return 0
    for stage in stages:
        if stage in TRAINING and not _train(stage, args):
            return 3  # stopped by --max-minutes: run the same command again to resume
        if stage == "assemble":
            from .assemble import assemble

            assemble(args.work, args.store, dtype=args.dtype)
        if stage == "evaluate":
            _evaluate(args)
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
