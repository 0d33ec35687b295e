"""Read a demo picture back into words: the automatic quality check of issue #20.

``read(image)`` finds, in order:
1. the background: the median colour of the border, then the nearest named colour;
2. the shape colour: among the pixels that differ from the background, the named colour whose blend line from the
   background passes nearest them (a blended edge between red and yellow lies on red's line, though it looks
   orange), plus a quarter of its distance from the shape's inside (gray on white also lies on black's line);
3. the shape's coverage: each pixel's position on the line from the background to the shape's inside colour
   (0 = background, 1 = shape), kept where it is over one half and in a component of at least a tenth of the
   largest one (specks out);
4. position from the coverage's bounding box (the generator places shapes by their box: ``render.py``): the
   centre's third of the picture in each direction;
5. shape and style by template matching: the box cropped and stretched to 32×32, compared (soft IoU) with every
   shape, filled and outlined, drawn by the generator itself at the same resolution;
6. size from the coverage's mass against that template's fill (blur keeps mass; a blurred star's box shrinks).

Numpy, Pillow and scipy only: tests read generated images without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from .render import STYLES, coverage
from .vocabulary import ALL_SHAPES, COLOURS, POSITIONS, SIZE_EXTENT, SIZES

_NAMES = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[n] for n in _NAMES], dtype=np.float32)
_POSITION_AT = {cell: name for name, cell in POSITIONS.items()}
_SIZE_THRESHOLD = (SIZE_EXTENT["small"] + SIZE_EXTENT["large"]) / 2
_TEMPLATE = 32  # side of the normalised frame in which shapes are compared
INSIDE_WEIGHT = 0.25  # see _shape_colour: 0.25 reads blurred strokes and gray on white best
_MIN_DEVIATION = 40.0  # RGB distance from the background below which a pixel is background (nearest colours: ~95)


@dataclass(frozen=True)
class Reading:
    """What a picture shows. Without a shape (nothing differs from the background), every field but
    ``background`` is None and ``mask`` is all False."""

    background: str
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    style: str | None
    mask: np.ndarray = field(repr=False)  # bool (H, W): the pixels read as shape
    shape_scores: dict[str, float] = field(default_factory=dict, repr=False)  # best soft IoU per shape word

    def matches(self, **expected: str) -> dict[str, bool]:
        """``{field: read == expected}`` for each keyword given, e.g. ``matches(shape="star", colour="red")``."""
        return {name: getattr(self, name) == value for name, value in expected.items()}


def _as_rgb(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3) (got {array.shape})")
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (got {array.dtype}); convert floats with (x * 255).round()")
    return array.astype(np.float32)


def nearest_colour(rgb, exclude: str | None = None) -> str:
    """The named colour nearest (in RGB) to ``rgb``, other than ``exclude``."""
    distance = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32), axis=-1)
    if exclude is not None:
        distance[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(distance))]


def colour_share(image, colour: str) -> float:
    """The fraction of pixels whose nearest named colour is ``colour`` (a negative prompt naming it should lower it)."""
    pixels = _as_rgb(image).reshape(-1, 3)
    distance = np.linalg.norm(pixels[:, None, :] - _PALETTE[None], axis=-1)
    return float(np.mean(np.argmin(distance, axis=1) == _NAMES.index(colour)))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (a ControlNet's shape against its guide mask)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _normalised(alpha: np.ndarray) -> np.ndarray:
    """The coverage's bounding box, stretched to the template frame."""
    ys, xs = np.nonzero(alpha > 0.5)
    crop = alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    frame = Image.fromarray(crop.astype(np.float32), mode="F").resize((_TEMPLATE, _TEMPLATE), Image.BILINEAR)
    return np.asarray(frame)


@dataclass(frozen=True)
class _Template:
    frame: np.ndarray  # the normalised coverage
    fill: float  # coverage mass / extent²: how much of its extent's square the shape covers


@lru_cache(maxsize=16)
def _templates(resolution: int) -> dict[tuple[str, str, str], _Template]:
    """Every (shape, style, size) drawn by the generator at this resolution."""
    templates = {}
    for shape in ALL_SHAPES:
        for style in STYLES:
            for size in SIZES:
                alpha = coverage(shape, size, "center", resolution, style=style)
                fill = float(alpha.sum()) / (SIZE_EXTENT[size] * resolution) ** 2
                templates[(shape, style, size)] = _Template(_normalised(alpha), fill)
    return templates


def _shape_colour(pixels: np.ndarray, background_rgb: np.ndarray, background: str) -> tuple[str, np.ndarray]:
    """The shape's named colour, and the colour of its inside (the quarter of its pixels farthest from the background).

    Each candidate is scored by how far the pixels lie from its blend line with the background (blended edges lie on
    it, so a thin red stroke on yellow does not read orange) plus a quarter of its distance from the inside colour
    (gray on white lies on white's line to black too).
    """
    deviation = np.linalg.norm(pixels - background_rgb, axis=-1)
    inside = np.median(pixels[deviation >= np.percentile(deviation, 75)], axis=0)
    scores = np.full(len(_NAMES), np.inf)
    for k, (name, colour) in enumerate(zip(_NAMES, _PALETTE, strict=True)):
        axis = colour - background_rgb
        if name == background or not axis.any():
            continue
        t = np.clip((pixels - background_rgb) @ axis / float(axis @ axis), 0.0, 1.0)
        off_line = np.mean(np.linalg.norm(pixels - background_rgb - t[:, None] * axis, axis=-1))
        scores[k] = off_line + INSIDE_WEIGHT * np.linalg.norm(inside - colour)
    return _NAMES[int(np.argmin(scores))], inside


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def read(image, shapes: tuple[str, ...] = ALL_SHAPES) -> Reading:
    """Read a square uint8 RGB picture (array or PIL image); ``shapes``: the words a template may match."""
    rgb = _as_rgb(image)
    height, width, _ = rgb.shape
    if height != width:
        raise ValueError(f"demo pictures are square (got {width}x{height})")
    border = max(1, height // 32)
    ring = np.ones((height, width), dtype=bool)
    ring[border:-border, border:-border] = False
    background_rgb = np.median(rgb[ring], axis=0)
    background = nearest_colour(background_rgb)

    deviation = np.linalg.norm(rgb - background_rgb, axis=-1)
    candidates = deviation > _MIN_DEVIATION
    if candidates.sum() < max(4, height * width // 2000):
        return Reading(background, None, None, None, None, None, np.zeros((height, width), dtype=bool))
    colour, shape_rgb = _shape_colour(rgb[candidates], background_rgb, background)
    axis = shape_rgb - background_rgb
    alpha = np.clip((rgb - background_rgb) @ axis / float(axis @ axis), 0.0, 1.0)
    labels, count = ndimage.label(alpha > 0.5, structure=np.ones((3, 3)))
    if count == 0:
        return Reading(background, colour, None, None, None, None, labels > 0)
    areas = ndimage.sum_labels(np.ones_like(alpha), labels, index=np.arange(1, count + 1))
    kept = np.isin(labels, 1 + np.flatnonzero(areas >= 0.1 * areas.max()))
    # Keep the blended edge next to the kept pixels, so the template sees the same soft edge the generator draws.
    alpha = np.where(ndimage.binary_dilation(kept, structure=np.ones((3, 3))), alpha, 0.0)

    ys, xs = np.nonzero(kept)
    centre_x, centre_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    column, row = (min(2, int(3 * c / width)) for c in (centre_x, centre_y))
    position = _POSITION_AT[(column, row)]

    observed = _normalised(alpha)
    scores = {key: _soft_iou(observed, t.frame) for key, t in _templates(width).items() if key[0] in shapes}
    shape, style, _ = max(scores, key=scores.__getitem__)
    # Size from the coverage's mass, which blur preserves (a blurred star loses its tips, not its mass).
    extent = np.sqrt(alpha.sum() / _templates(width)[(shape, style, "large")].fill) / width
    size = SIZES[int(extent > _SIZE_THRESHOLD)]
    shape_scores = {s: max(v for k, v in scores.items() if k[0] == s) for s in shapes}
    return Reading(background, colour, shape, size, position, style, kept, shape_scores)
