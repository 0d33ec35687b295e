"""The training stream: example ``index`` of ``seed`` is always the same scene, placement, caption and pixels.

Nothing is stored: every example is drawn from its own generator, ``numpy.random.default_rng((seed, index))``, so a
run resumed at step k draws exactly the batches a run that never stopped would have drawn, on any machine.

The caption mix (docs/demo-model.md, "Captions"): most captions name everything; some leave parts out, so that short
prompts ("a red star") and negative prompts ("red") mean something; some are empty, which is classifier-free
guidance's caption dropout. A caption that does not name the shape says "shape", and then the shape may also be a
crescent, which no caption names (the ``unet-crescent`` stage shows the UNet crescents under a vector no word has;
textual inversion learns a word for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import STYLES, Placement, guide_mask, render
from .vocabulary import ALL_SHAPES, CAPTION_PARTS, COLOURS, HELD_OUT_SET, POSITIONS, SHAPES, SIZES, Scene


@dataclass(frozen=True)
class CaptionMix:
    """How often a caption is complete, partial or empty; within a partial one, how often each part is left out."""

    partial: float = 0.15
    empty: float = 0.10
    omit_part: float = 0.5
    omit_shape: float = 0.3

    def __post_init__(self) -> None:
        if self.partial < 0 or self.empty < 0 or self.partial + self.empty > 1:
            raise ValueError(f"partial + empty must lie in [0, 1] (got {self.partial} + {self.empty})")


BASE_MIX = CaptionMix()
FULL_CAPTIONS = CaptionMix(partial=0.0, empty=0.0)

JITTER_SHIFT = 0.03  # ± of the image side (2 px at 64): far inside the classifier's thirds
JITTER_SCALE = 0.08  # ± of the extent: small stays well below large


@dataclass(frozen=True)
class Example:
    """One training picture: what it shows, where exactly, its caption (maybe partial or empty) and its style."""

    scene: Scene
    placement: Placement
    caption: str
    omitted: frozenset[str] = frozenset()  # the caption parts left out (all of them for an empty caption)
    style: str = "filled"

    def image(self, resolution: int = 64) -> np.ndarray:
        """The picture, uint8 (resolution, resolution, 3)."""
        return render(self.scene, resolution, self.placement, self.style)

    def guide(self, resolution: int = 64) -> np.ndarray:
        """The ControlNet guide for this picture: its filled silhouette, white on black."""
        return guide_mask(self.scene, resolution, self.placement)


def _scene(rng: np.random.Generator, shapes: tuple[str, ...]) -> Scene:
    """A uniformly drawn scene that is not held out (drawn again from the same generator until it is not)."""
    colours = list(COLOURS)
    while True:
        colour = colours[rng.integers(len(colours))]
        others = [c for c in colours if c != colour]
        scene = Scene(
            shape=shapes[rng.integers(len(shapes))],
            colour=colour,
            background=others[rng.integers(len(others))],
            size=SIZES[rng.integers(len(SIZES))],
            position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        )
        if scene not in HELD_OUT_SET:
            return scene


def example(
    seed: int,
    index: int,
    mix: CaptionMix = BASE_MIX,
    style: str = "filled",
    shapes: tuple[str, ...] | None = None,
    noun: str | None = None,
) -> Example:
    """Example ``index`` of the stream ``seed``: a pure function of its arguments.

    ``shapes``: the shapes drawn (default: the named ones, and all nine where the caption leaves the shape out);
    ``noun``: the word that names them (textual inversion's token for crescents).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)} (got {style!r})")
    if index < 0:
        raise ValueError(f"index must be >= 0 (got {index})")
    rng = np.random.default_rng((seed, index))
    u = rng.random()
    if u < mix.empty:
        kind, omit = "empty", frozenset(CAPTION_PARTS)
    elif u < mix.empty + mix.partial:
        kind = "partial"
        omit = frozenset(
            part for part in CAPTION_PARTS if rng.random() < (mix.omit_shape if part == "shape" else mix.omit_part)
        )
    else:
        kind, omit = "full", frozenset()
    scene = _scene(rng, shapes or (ALL_SHAPES if "shape" in omit else SHAPES))
    placement = Placement(
        dx=float(rng.uniform(-JITTER_SHIFT, JITTER_SHIFT)),
        dy=float(rng.uniform(-JITTER_SHIFT, JITTER_SHIFT)),
        scale=float(rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE)),
    )
    caption = "" if kind == "empty" else scene.caption(omit, noun)
    return Example(scene=scene, placement=placement, caption=caption, omitted=omit, style=style)


def batch(
    seed: int, start: int, count: int, mix: CaptionMix = BASE_MIX, style: str = "filled", **kinds
) -> list[Example]:
    """Examples ``start .. start + count - 1``: training step k of batch size b reads ``batch(seed, k * b, b)``.
    ``kinds``: ``example``'s ``shapes`` and ``noun``."""
    return [example(seed, start + i, mix, style, **kinds) for i in range(count)]


def images(examples: list[Example], resolution: int = 64) -> np.ndarray:
    """The examples' pictures stacked, uint8 (n, resolution, resolution, 3)."""
    return np.stack([e.image(resolution) for e in examples])
