"""``python -m triptych.demo.gallery -o PICTURE``: the demo family's features side by side, drawn through a running
gateway (the README's pictures: docs/demo-model.md, "Measured quality").

Four rows of six held-out scenes, each picture with seed i (the model card's settings: 64x64, 20 steps, CFG 7.5;
``--leave-out`` drops the row of an adapter the family ships without):
1. the caption alone (``demo/base``);
2. the same captions with ``demo/lora-outline`` at weight 1;
3. the same scenes as crescents, named by ``demo/ti-moon``'s token;
4. three ControlNet pairs: the guide mask, then what ``demo/controlnet-mask`` drew for a caption without size or
   position.
Torch-free: it needs the client and Pillow only.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from triptych.client import ImageClient
from triptych.v1 import common_pb2, image_service_pb2

from .assets import ADAPTERS
from .render import guide_mask
from .vocabulary import HELD_OUT, Scene

COLUMNS = 6
SETTINGS = dict(model="demo/base", steps=20, cfg_scale=7.5)


def png(array: np.ndarray) -> bytes:
    """A uint8 RGB array as PNG bytes, as a request's guide image carries it."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def controlnet_request(scene: Scene, seed: int) -> dict:
    """GenerateRequest fields asking ``demo/controlnet-mask`` for ``scene``: the caption leaves out where and how
    large, so only the guide mask (``render.guide_mask``) says it."""
    return dict(
        positive_prompt=scene.caption(omit=frozenset({"position", "size"})),
        seed=seed,
        control_net=[common_pb2.ControlNetUnit(model="demo/controlnet-mask", guide_image=png(guide_mask(scene)))],
    )


def rows(client: ImageClient, leave_out: tuple[str, ...] = ()) -> list[list[np.ndarray]]:
    """The gallery's rows of 64x64 uint8 RGB pictures: four, less those of the adapters in ``leave_out``
    (``lora-outline``, ``ti-moon``, ``controlnet-mask``: a family packed without them)."""
    scenes = list(HELD_OUT[:COLUMNS])
    lora = [common_pb2.Lora(model="demo/lora-outline", weight=1.0)]
    moon = [common_pb2.TextualInversion(model="demo/ti-moon", weight=1.0)]
    crescents = [dataclasses.replace(scene, shape="crescent") for scene in scenes]
    guided = scenes[: COLUMNS // 2]
    guides = [guide_mask(scene) for scene in guided]
    groups = {
        "base": [dict(positive_prompt=s.caption(), seed=i) for i, s in enumerate(scenes)],
        "lora-outline": [dict(positive_prompt=s.caption(), seed=i, lora=lora) for i, s in enumerate(scenes)],
        "ti-moon": [
            dict(positive_prompt=s.caption(noun="ti-moon"), seed=i, embeddings=moon) for i, s in enumerate(crescents)
        ],
        "controlnet-mask": [controlnet_request(s, i) for i, s in enumerate(guided)],
    }
    groups = {name: requests for name, requests in groups.items() if name not in leave_out}

    def one(fields: dict) -> np.ndarray:
        (image,) = client.generate(image_service_pb2.GenerateRequest(**SETTINGS, **fields), timeout=300)
        return np.asarray(Image.open(io.BytesIO(image.image.data)).convert("RGB"))

    with ThreadPoolExecutor(8) as pool:
        pictures = iter(pool.map(one, [request for requests in groups.values() for request in requests]))
    drawn = {name: [next(pictures) for _ in requests] for name, requests in groups.items()}
    if "controlnet-mask" in drawn:  # each guide, then what was drawn for it
        drawn["controlnet-mask"] = [p for pair in zip(guides, drawn["controlnet-mask"], strict=True) for p in pair]
    return list(drawn.values())


def sheet(picture_rows: list[list[np.ndarray]], scale: int = 3, gap: int = 4) -> Image.Image:
    """The rows tiled with a white gap, each picture enlarged ``scale`` times (nearest: the pixels as drawn)."""
    side = picture_rows[0][0].shape[0] * scale
    out = Image.new(
        "RGB", (COLUMNS * side + (COLUMNS - 1) * gap, len(picture_rows) * side + (len(picture_rows) - 1) * gap), "white"
    )
    for r, row in enumerate(picture_rows):
        for c, picture in enumerate(row):
            tile = Image.fromarray(picture).resize((side, side), Image.NEAREST)
            out.paste(tile, (c * (side + gap), r * (side + gap)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triptych.demo.gallery", description=__doc__.split("\n")[0])
    parser.add_argument("--gateway", default="127.0.0.1:50051", help="a gateway whose store holds the demo family")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument(
        "--leave-out", action="append", default=[], choices=ADAPTERS, help="an adapter the family ships without"
    )
    args = parser.parse_args(argv)
    with ImageClient(args.gateway) as client:
        sheet(rows(client, tuple(args.leave_out))).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
