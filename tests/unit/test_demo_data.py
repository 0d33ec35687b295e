"""The demo family's data (#20): captions, the held-out scenes, deterministic examples, and what the renderer draws."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from triptych.demo.data import BASE_MIX, FULL_CAPTIONS, CaptionMix, batch, example, images
from triptych.demo.render import Placement, coverage, guide_mask, render, shape_box
from triptych.demo.vocabulary import (
    ALL_SHAPES,
    COLOURS,
    HELD_OUT,
    HELD_OUT_SET,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    all_scenes,
)

MODEL_CARD = Path(__file__).parents[2] / "docs" / "demo-model.md"


def test_captions_read_as_the_issue_writes_them():
    assert Scene("star", "red", "blue", "large", "top left").caption() == (
        "a large red star at the top left on a blue background"
    )
    assert Scene("ring", "orange", "white", "small", "center").caption() == (
        "a small orange ring in the center on a white background"
    )
    scene = Scene("heart", "orange", "gray", "large", "bottom")
    assert scene.caption(frozenset({"size"})) == "an orange heart at the bottom on a gray background"
    assert scene.caption(frozenset({"shape", "position", "background"})) == "a large orange shape"
    assert scene.caption(frozenset({"size", "colour", "position"})) == "a heart on a gray background"
    # A crescent has no word: it is "shape", unless textual inversion's token names it.
    moon = Scene("crescent", "white", "black", "small", "left")
    assert moon.caption() == "a small white shape at the left on a black background"
    assert moon.caption(noun="ti-moon") == "a small white ti-moon at the left on a black background"
    assert moon.caption(frozenset({"shape"}), noun="ti-moon") == "a small white shape at the left on a black background"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (("moon", "red", "blue", "large", "left"), "shape must be one of"),
        (("star", "teal", "blue", "large", "left"), "colour must be one of"),
        (("star", "red", "red", "large", "left"), "must differ in colour"),
        (("star", "red", "blue", "huge", "left"), "size must be one of"),
        (("star", "red", "blue", "large", "middle"), "position must be one of"),
    ],
)
def test_a_scene_outside_the_vocabulary_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Scene(*fields)


def test_the_vocabulary_has_every_combination():
    scenes = all_scenes()
    assert len(scenes) == len(SHAPES) * 10 * 9 * 2 * 9 == 12960
    assert len(set(scenes)) == len(scenes)


def test_held_out_scenes_are_fixed_balanced_and_in_the_model_card():
    captions = [s.caption() for s in HELD_OUT]
    assert len(HELD_OUT_SET) == len(HELD_OUT) == 72
    assert hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16] == "44b5fe569bb99029"
    assert Counter((s.shape, s.position) for s in HELD_OUT) == Counter(
        {(shape, position): 1 for shape in SHAPES for position in POSITIONS}
    )
    for role in ("colour", "background"):
        assert set(Counter(getattr(s, role) for s in HELD_OUT).values()) <= {7, 8}
    section = MODEL_CARD.read_text(encoding="utf-8").split("## Held-out scenes")[1].split("\n## ")[0]
    listed = re.findall(r"^\d+\. (.+)$", section, flags=re.MULTILINE)
    assert listed == captions, "docs/demo-model.md must list HELD_OUT's captions, in order"


def test_examples_are_a_pure_function_of_seed_and_index():
    first = batch(3, 100, 8)
    assert first == batch(3, 100, 8)
    assert np.array_equal(images(first), images(batch(3, 100, 8)))
    assert first != batch(4, 100, 8)
    assert first[1:] == batch(3, 101, 7)  # a resumed run draws the same examples
    digest = hashlib.sha256(images(batch(0, 0, 4)).tobytes()).hexdigest()[:16]
    assert digest == "756f7e4b1e46f4ae", "the stream's pixels changed: every trained model's data changed"


def test_the_stream_never_draws_a_held_out_scene_and_mixes_captions_as_documented():
    examples = [example(11, i) for i in range(4000)]
    assert not any(e.scene in HELD_OUT_SET for e in examples)
    kinds = Counter(
        "empty" if not e.caption else "full" if e.caption == e.scene.caption() and e.scene.shape in SHAPES else "part"
        for e in examples
    )
    assert abs(kinds["empty"] / 4000 - BASE_MIX.empty) < 0.02
    assert abs(kinds["part"] / 4000 - BASE_MIX.partial) < 0.03
    crescents = [e for e in examples if e.scene.shape == "crescent"]
    assert crescents and all(e.caption == "" or " shape" in e.caption for e in crescents)
    assert all(e.scene.shape in SHAPES for e in (example(11, i, FULL_CAPTIONS) for i in range(500)))
    moons = [example(11, i, FULL_CAPTIONS, shapes=("crescent",), noun="ti-moon") for i in range(50)]
    assert all(e.scene.shape == "crescent" and " ti-moon " in e.caption for e in moons)
    with pytest.raises(ValueError, match="partial \\+ empty"):
        CaptionMix(partial=0.8, empty=0.5)


def _stratified_scenes() -> list[Scene]:
    """Every shape x size x position, colours rotating so that every colour meets several others."""
    names = list(COLOURS)
    combos = [(shape, size, position) for shape in ALL_SHAPES for size in SIZES for position in POSITIONS]
    return [
        Scene(shape, names[i % 10], names[(i + 1 + (i // 10) % 9) % 10], size, position)
        for i, (shape, size, position) in enumerate(combos)
    ]


@pytest.mark.parametrize("resolution", [64, 128])
def test_every_shape_size_and_position_is_drawn_where_its_box_says(resolution):
    for scene in _stratified_scenes():
        alpha = coverage(scene.shape, scene.size, scene.position, resolution)
        ys, xs = np.nonzero(alpha > 0)  # any coverage: a star's tips are thinner than a pixel
        centre_x, centre_y, extent = shape_box(scene.size, scene.position, resolution)
        assert xs.min() >= 0 and ys.min() >= 0 and xs.max() < resolution and ys.max() < resolution
        assert abs((xs.min() + xs.max() + 1) / 2 - centre_x) <= 1 and abs((ys.min() + ys.max() + 1) / 2 - centre_y) <= 1
        assert -1 <= max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) - extent <= 2, scene


def test_pixels_are_the_named_colours_and_the_guide_is_white_on_black():
    scene = Scene("square", "purple", "yellow", "large", "center")
    image = render(scene, 64)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert tuple(image[32, 32]) == COLOURS["purple"] and tuple(image[0, 0]) == COLOURS["yellow"]
    # Anti-aliasing only blends the two colours: every pixel lies on the line between them.
    background, colour = np.array(COLOURS["yellow"], float), np.array(COLOURS["purple"], float)
    t = (image.reshape(-1, 3) - background) @ (colour - background) / np.sum((colour - background) ** 2)
    assert np.abs(background + t[:, None] * (colour - background) - image.reshape(-1, 3)).max() <= 1.0
    guide = guide_mask(scene, 64)
    assert guide.shape == (64, 64, 3) and tuple(guide[32, 32]) == (255, 255, 255) and tuple(guide[0, 0]) == (0, 0, 0)
    outline = render(scene, 64, style="outline")
    assert tuple(outline[32, 32]) == COLOURS["yellow"], "an outline is hollow"
    edge_x = int(round(shape_box("large", "center", 64)[0] - shape_box("large", "center", 64)[2] / 2)) + 1
    assert tuple(outline[32, edge_x]) == COLOURS["purple"]


def test_placement_moves_and_scales_the_shape():
    base = coverage("circle", "small", "center", 64)
    moved = coverage("circle", "small", "center", 64, Placement(dx=0.03, dy=-0.03, scale=1.08))
    assert moved.sum() > base.sum() * 1.1
    centre = lambda a: np.array(np.nonzero(a > 0.5)).mean(axis=1)  # noqa: E731
    dy, dx = centre(moved) - centre(base)
    assert 1.4 < dx < 2.5 and -2.5 < dy < -1.4
