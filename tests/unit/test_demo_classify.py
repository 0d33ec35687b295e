"""The demo quality check (#20) reads the generator's own pictures: all of them clean, nearly all after the blur, noise
and colour drift a VAE adds. Later tests trust it on generated images only because of these."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from triptych.demo.classify import colour_share, iou, nearest_colour, read
from triptych.demo.data import FULL_CAPTIONS, example
from triptych.demo.render import guide_mask, render
from triptych.demo.vocabulary import COLOURS, HELD_OUT, SHAPES, Scene

FIELDS = ("background", "colour", "shape", "size", "position")


def _degrade(image: np.ndarray, rng: np.random.Generator, blur=1.0, noise=8.0, drift=15.0) -> np.ndarray:
    """What a small VAE does to a flat picture: a colour drift, soft edges, grain."""
    x = image.astype(np.float32) + rng.uniform(-drift, drift, 3)
    x = ndimage.gaussian_filter(x, sigma=(blur, blur, 0)) + rng.normal(0.0, noise, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _accuracy(pairs) -> dict[str, float]:
    """{field: share read right} over (scene, reading) pairs."""
    right, total = Counter(), 0
    for scene, reading in pairs:
        total += 1
        right.update(f for f in FIELDS if getattr(reading, f) == getattr(scene, f))
    return {f: right[f] / total for f in FIELDS}


def test_every_held_out_scene_reads_back_exactly():
    for scene in HELD_OUT:
        reading = read(render(scene, 64))
        assert reading.matches(**{f: getattr(scene, f) for f in FIELDS}) == dict.fromkeys(FIELDS, True), scene
        assert reading.style == "filled"


@pytest.mark.parametrize(("resolution", "count"), [(64, 300), (128, 40)])
def test_clean_training_pictures_read_back_exactly(resolution, count):
    examples = [example(5, i, FULL_CAPTIONS) for i in range(count)]
    accuracy = _accuracy((e.scene, read(e.image(resolution))) for e in examples)
    assert accuracy == dict.fromkeys(FIELDS, 1.0)


def test_blurred_noisy_drifted_pictures_still_read_back():
    rng = np.random.default_rng(0)
    examples = [example(6, i, FULL_CAPTIONS) for i in range(300)]
    accuracy = _accuracy((e.scene, read(_degrade(e.image(64), rng))) for e in examples)
    assert min(accuracy.values()) >= 0.98, accuracy
    # Harder blur: the small shapes' corners go first (a small star reads as a diamond), the rest holds.
    harder = _accuracy((e.scene, read(_degrade(e.image(64), rng, blur=1.5, noise=12))) for e in examples)
    assert harder["shape"] >= 0.9 and min(harder[f] for f in FIELDS if f != "shape") >= 0.97, harder


def test_outlines_read_as_outlines_and_fills_as_fills():
    examples = [example(8, i, FULL_CAPTIONS, style="outline") for i in range(200)]
    outlines = [(e.scene, read(e.image(64))) for e in examples]
    assert _accuracy(outlines)["shape"] >= 0.98
    assert Counter(r.style for _, r in outlines)["outline"] >= 196
    fills = [read(example(8, i, FULL_CAPTIONS).image(64)) for i in range(200)]
    assert all(r.style == "filled" for r in fills)
    # The LoRA check will count styles on generated pictures: mildly blurred large outlines still read.
    rng = np.random.default_rng(1)
    large = [e for e in examples if e.scene.size == "large"]
    blurred = [read(_degrade(e.image(64), rng, blur=0.8, noise=6)) for e in large]
    assert Counter(r.style for r in blurred)["outline"] >= 0.9 * len(large)


def test_a_crescent_reads_as_a_crescent_only_when_asked_for():
    scenes = [Scene("crescent", c, b, size, "center") for c, b in (("white", "blue"), ("red", "black"))
              for size in ("small", "large")]  # fmt: skip
    for scene in scenes:
        assert read(render(scene, 64)).shape == "crescent"
        assert read(render(scene, 64), shapes=SHAPES).shape in SHAPES  # the base vocabulary has no crescent


def test_a_flat_picture_has_no_shape():
    flat = np.full((64, 64, 3), COLOURS["green"], dtype=np.uint8)
    reading = read(flat)
    assert reading.background == "green" and reading.shape is None and reading.colour is None
    assert not reading.mask.any()


def test_the_mask_matches_the_guide_and_colour_share_counts_pixels():
    scene = Scene("heart", "red", "white", "large", "bottom right")
    reading = read(Image.fromarray(render(scene, 64)))  # PIL images are read too
    assert iou(reading.mask, guide_mask(scene, 64)[..., 0] > 127) > 0.95
    share = colour_share(render(scene, 64), "red")
    assert 0.1 < share < 0.3 and colour_share(render(scene, 64), "blue") == 0.0
    assert nearest_colour((200, 40, 40)) == "red" and nearest_colour((200, 40, 40), exclude="red") != "red"


def test_pictures_of_the_wrong_kind_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="uint8"):
        read(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="square"):
        read(np.zeros((64, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        read(np.zeros((64, 64), dtype=np.uint8))


def test_the_check_imports_no_torch():
    """Tests and tools read pictures without loading torch (docs/architecture.md: demo/ is torch-free but train/)."""
    import subprocess
    import sys

    code = (
        "import sys, triptych.demo.classify, triptych.demo.data, triptych.demo.evaluate; print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
