"""``python -m triptych.demo.readback PICTURE [CAPTION]``: what ``classify.read`` sees in a picture, in the captions'
own words, and, given the caption it was drawn from, which parts match. ``scripts/quickstart`` prints this for the
picture it writes."""

from __future__ import annotations

import sys
from functools import lru_cache

from PIL import Image

from .classify import Reading, read
from .vocabulary import Scene, all_scenes

PARTS = ("size", "colour", "shape", "position", "background")


@lru_cache(maxsize=1)
def _captions() -> dict[str, Scene]:
    """Every full caption of the vocabulary, to its scene."""
    return {scene.caption(): scene for scene in all_scenes()}


def scene_of(caption: str) -> Scene | None:
    """The scene a full caption ("a large red star at the top left on a blue background") names, else None."""
    return _captions().get(" ".join(caption.lower().split()))


def describe(reading: Reading) -> str:
    """A reading as a caption: "a large red star at the top left on a blue background" (or what it lacks)."""
    if reading.shape is None:
        return f"no shape, on a {reading.background} background"
    scene = Scene(reading.shape, reading.colour, reading.background, reading.size, reading.position)
    return scene.caption(noun=reading.shape) + ("" if reading.style == "filled" else f" ({reading.style})")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m triptych.demo.readback PICTURE [CAPTION]", file=sys.stderr)
        return 2
    reading = read(Image.open(args[0]))
    print(f"demo/classify.py reads {args[0]} as: {describe(reading)}")
    if len(args) == 2:
        asked = scene_of(args[1])
        if asked is None:
            print(f"({args[1]!r} is not a full demo caption: nothing to compare)")
            return 0
        marks = [f"{part} {'ok' if getattr(reading, part) == getattr(asked, part) else 'MISSED'}" for part in PARTS]
        print(f"against what was asked: {', '.join(marks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
