"""The demo family's words, a scene made of them, its caption, and the scenes held out of training.

A scene is one flat shape on a flat background: ``Scene("star", "red", "blue", "large", "top left")`` is captioned
"a large red star at the top left on a blue background". Every combination is drawable (``render.py``); the 72
scenes of ``HELD_OUT`` are never drawn for training (``data.py`` skips them), so a quality check on them measures
what the model composes, not what it memorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The base vocabulary. "crescent" is not in it: textual inversion learns a word for it, "ti-moon" (docs/demo-model.md).
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "heart")
EXTRA_SHAPES = ("crescent",)
ALL_SHAPES = SHAPES + EXTRA_SHAPES

# sRGB values picked far apart (nearest pair: orange-yellow, ~100 apart) so that a colour survives a VAE's blur.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 165, 60),
    "blue": (35, 75, 225),
    "yellow": (250, 230, 40),
    "orange": (250, 135, 20),
    "purple": (135, 45, 175),
    "pink": (250, 145, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (125, 125, 125),
}

SIZES = ("small", "large")
# The longer side of the shape's bounding box, as a fraction of the image side.
SIZE_EXTENT = {"small": 0.28, "large": 0.47}

# Name -> (column, row) on a 3x3 grid; the shape's bounding-box centre sits at CELL_CENTRES of that cell.
POSITIONS: dict[str, tuple[int, int]] = {
    "left": (0, 1),
    "right": (2, 1),
    "top": (1, 0),
    "bottom": (1, 2),
    "center": (1, 1),
    "top left": (0, 0),
    "top right": (2, 0),
    "bottom left": (0, 2),
    "bottom right": (2, 2),
}
CELL_CENTRES = (0.27, 0.5, 0.73)  # not 1/6..5/6: a large shape in a corner must stay inside the picture

# The parts of a caption that training may leave out (``Scene.caption(omit=...)``).
CAPTION_PARTS = ("size", "colour", "shape", "position", "background")
GENERIC_SHAPE_WORD = "shape"


@dataclass(frozen=True)
class Scene:
    """One picture's content in words; ``shape`` may be an ``EXTRA_SHAPES`` word (drawn, never named)."""

    shape: str
    colour: str
    background: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, ALL_SHAPES),
            ("colour", self.colour, COLOURS),
            ("background", self.background, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {', '.join(allowed)} (got {value!r})")
        if self.colour == self.background:
            raise ValueError(f"the shape and the background must differ in colour (both {self.colour!r})")

    def caption(self, omit: frozenset[str] = frozenset(), noun: str | None = None) -> str:
        """ "a large red star at the top left on a blue background", less the parts named in ``omit``.

        Without its shape word the noun is "shape"; a crescent has no word, so it is "shape" unless ``noun`` names
        it (textual inversion's token: "a large red ti-moon at the left ...").
        """
        unknown = set(omit) - set(CAPTION_PARTS)
        if unknown:
            raise ValueError(f"omit names unknown caption parts {sorted(unknown)}; known: {', '.join(CAPTION_PARTS)}")
        if "shape" in omit:
            noun = GENERIC_SHAPE_WORD
        elif noun is None:
            noun = self.shape if self.shape in SHAPES else GENERIC_SHAPE_WORD
        words = []
        if "size" not in omit:
            words.append(self.size)
        if "colour" not in omit:
            words.append(self.colour)
        words = [_article(words[0] if words else noun), *words, noun]
        if "position" not in omit:
            words.append("in the center" if self.position == "center" else f"at the {self.position}")
        if "background" not in omit:
            words += ["on", _article(self.background), self.background, "background"]
        return " ".join(words)


def _article(word: str) -> str:
    """ "an orange star", "a large star": the article the next word asks for (no word of ours starts "u" or "h")."""
    return "an" if word[0] in "aeiou" else "a"


def all_scenes(shapes: tuple[str, ...] = SHAPES) -> list[Scene]:
    """Every scene of the vocabulary, in a fixed order (12,960 for the base shapes)."""
    return [
        Scene(shape, colour, background, size, position)
        for shape in shapes
        for colour in COLOURS
        for background in COLOURS
        if background != colour
        for size in SIZES
        for position in POSITIONS
    ]


def _held_out() -> tuple[Scene, ...]:
    """72 scenes: scene i has shape i mod 8 and position i mod 9 (so each shape meets each position exactly once),
    size i // 8 mod 2, and colours from a seeded generator (seed 20, the issue's number): shape colours and
    backgrounds are two shuffles of 0..71 mod 10 (each colour 7 or 8 times in each role), a background equal to its
    shape colour swapped with the first later one that breaks no pair."""
    rng = np.random.default_rng(20)
    names = list(COLOURS)
    colour_index = rng.permutation(np.arange(72) % len(names))
    background_index = rng.permutation(np.arange(72) % len(names))
    for i in range(72):
        if background_index[i] == colour_index[i]:
            j = next(
                j
                for j in [*range(i + 1, 72), *range(i)]
                if background_index[j] != colour_index[i] and background_index[i] != colour_index[j]
            )
            background_index[i], background_index[j] = background_index[j], background_index[i]
    return tuple(
        Scene(
            shape=SHAPES[i % len(SHAPES)],
            colour=names[colour_index[i]],
            background=names[background_index[i]],
            size=SIZES[(i // len(SHAPES)) % 2],
            position=list(POSITIONS)[i % len(POSITIONS)],
        )
        for i in range(72)
    )


HELD_OUT: tuple[Scene, ...] = _held_out()
HELD_OUT_SET = frozenset(HELD_OUT)
