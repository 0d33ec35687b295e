"""Draw a ``Scene``: a flat, anti-aliased shape on a flat background, filled or as an outline, or its guide mask.

Each shape is a few primitives (polygons, discs added or cut out) in its own unit coordinates, scaled so that the
longer side of its bounding box is the size's extent and centred on the position's cell (``vocabulary.py``), so the
classifier can read size and position back from the bounding box alone. Drawing happens at ``SUPERSAMPLE``× the
resolution with Pillow and is box-filtered down: the same scene and placement give the same bytes on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .vocabulary import ALL_SHAPES, CELL_CENTRES, COLOURS, POSITIONS, SIZE_EXTENT, Scene

SUPERSAMPLE = 4
OUTLINE_WIDTH = 0.12  # an outline's stroke, as a fraction of the shape's extent (2 px small, 3.6 px large at 64)
STYLES = ("filled", "outline")

# (add, kind, params): kind "poly" takes vertices, "disc" takes (cx, cy, r); y points down, as in images.
_Primitive = tuple[bool, str, tuple]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [
        ((1.0 if k % 2 == 0 else inner) * math.cos(math.pi * (k / points - 0.5)),
         (1.0 if k % 2 == 0 else inner) * math.sin(math.pi * (k / points - 0.5)))
        for k in range(2 * points)
    ]  # fmt: skip


def _heart(samples: int = 96) -> list[tuple[float, float]]:
    """The classic parametric heart (x = 16 sin³t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), y flipped."""
    ts = [2 * math.pi * k / samples for k in range(samples)]
    return [
        (16 * math.sin(t) ** 3 / 16,
         -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16)
        for t in ts
    ]  # fmt: skip


_ARM = 0.3  # half the width of a cross's arms
SHAPE_PRIMITIVES: dict[str, tuple[_Primitive, ...]] = {
    "circle": ((True, "disc", (0.0, 0.0, 1.0)),),
    "square": ((True, "poly", ((-1, -1), (1, -1), (1, 1), (-1, 1))),),
    "triangle": ((True, "poly", ((0, -math.sqrt(3) / 2), (1, math.sqrt(3) / 2), (-1, math.sqrt(3) / 2))),),
    "star": ((True, "poly", tuple(_star())),),
    "ring": ((True, "disc", (0.0, 0.0, 1.0)), (False, "disc", (0.0, 0.0, 0.5))),
    "cross": (
        (True, "poly", ((-_ARM, -1), (_ARM, -1), (_ARM, 1), (-_ARM, 1))),
        (True, "poly", ((-1, -_ARM), (1, -_ARM), (1, _ARM), (-1, _ARM))),
    ),
    "diamond": ((True, "poly", ((0, -1), (0.7, 0), (0, 1), (-0.7, 0))),),
    "heart": ((True, "poly", tuple(_heart())),),
    # A waxing moon: a disc with an offset disc cut out, horns to the right.
    "crescent": ((True, "disc", (0.0, 0.0, 1.0)), (False, "disc", (0.5, 0.0, 0.85))),
}
if set(SHAPE_PRIMITIVES) != set(ALL_SHAPES):  # a word without a drawing would fail only when first sampled
    raise RuntimeError("every shape word needs primitives")


@dataclass(frozen=True)
class Placement:
    """Small per-picture variation, so a model learns regions and size classes, not 18 exact boxes.

    ``dx``, ``dy``: the centre's shift as a fraction of the image side; ``scale``: multiplies the size's extent.
    """

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0


def _draw(primitives, canvas: int, transform) -> Image.Image:
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    for add, kind, params in primitives:
        fill = 255 if add else 0
        if kind == "poly":
            draw.polygon([transform(x, y) for x, y in params], fill=fill)
        else:
            cx, cy, r = params
            (x0, y0), (x1, y1) = transform(cx - r, cy - r), transform(cx + r, cy + r)
            draw.ellipse((x0, y0, x1, y1), fill=fill)
    return image


@cache
def _unit_box(shape: str) -> tuple[float, float, float]:
    """(centre x, centre y, longer side) of the shape's drawn bounding box in its unit coordinates, measured on a
    1024-pixel raster of [-1.25, 1.25]² (a crescent's box is smaller than its disc)."""
    n, half = 1024, 1.25
    pixel = n / (2 * half)
    mask = np.asarray(_draw(SHAPE_PRIMITIVES[shape], n, lambda x, y: ((x + half) * pixel, (y + half) * pixel)))
    ys, xs = np.nonzero(mask)
    x0, x1 = xs.min() / pixel - half, (xs.max() + 1) / pixel - half
    y0, y1 = ys.min() / pixel - half, (ys.max() + 1) / pixel - half
    return (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)


def shape_box(size: str, position: str, resolution: int, placement: Placement = Placement()) -> tuple[float, ...]:
    """(centre x, centre y, extent) in pixels where a shape of ``size`` at ``position`` is drawn."""
    column, row = POSITIONS[position]
    centre_x = (CELL_CENTRES[column] + placement.dx) * resolution
    centre_y = (CELL_CENTRES[row] + placement.dy) * resolution
    return centre_x, centre_y, SIZE_EXTENT[size] * placement.scale * resolution


def coverage(
    shape: str,
    size: str,
    position: str,
    resolution: int,
    placement: Placement = Placement(),
    style: str = "filled",
) -> np.ndarray:
    """The shape's anti-aliased coverage, float32 (resolution, resolution) in [0, 1]."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)} (got {style!r})")
    centre_x, centre_y, extent = shape_box(size, position, resolution, placement)
    unit_x, unit_y, unit_extent = _unit_box(shape)
    k = extent * SUPERSAMPLE / unit_extent
    canvas = resolution * SUPERSAMPLE

    def transform(x: float, y: float) -> tuple[float, float]:
        return centre_x * SUPERSAMPLE + (x - unit_x) * k, centre_y * SUPERSAMPLE + (y - unit_y) * k

    mask = np.asarray(_draw(SHAPE_PRIMITIVES[shape], canvas, transform)) > 127
    if style == "outline":
        # Keep the band within the stroke width of the edge: the outline lies inside the filled shape's silhouette.
        depth = ndimage.distance_transform_edt(mask)
        mask = mask & (depth <= OUTLINE_WIDTH * extent * SUPERSAMPLE)
    blocks = mask.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def render(scene: Scene, resolution: int = 64, placement: Placement = Placement(), style: str = "filled") -> np.ndarray:
    """The scene as uint8 RGB, shape (resolution, resolution, 3)."""
    alpha = coverage(scene.shape, scene.size, scene.position, resolution, placement, style)[..., None]
    background = np.asarray(COLOURS[scene.background], dtype=np.float32)
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    return np.rint(background + alpha * (colour - background)).astype(np.uint8)


def guide_mask(scene: Scene, resolution: int = 64, placement: Placement = Placement()) -> np.ndarray:
    """The ControlNet guide: the filled shape white on black, uint8 (resolution, resolution, 3) as guide images are."""
    alpha = coverage(scene.shape, scene.size, scene.position, resolution, placement)
    grey = np.rint(alpha * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)
