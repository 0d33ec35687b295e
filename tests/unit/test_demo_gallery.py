"""The gallery's pieces that need no services: its tiling, and the ControlNet request the feature test shares."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from triptych.demo.render import guide_mask
from triptych.demo.vocabulary import HELD_OUT


def test_the_gallery_sheet_tiles_rows_of_pictures_enlarged_with_gaps():
    from triptych.demo.gallery import COLUMNS, sheet

    rows = [[np.full((64, 64, 3), 10 * (r * COLUMNS + c), np.uint8) for c in range(COLUMNS)] for r in range(4)]
    out = np.asarray(sheet(rows, scale=3, gap=4))
    assert out.shape == (4 * 192 + 3 * 4, COLUMNS * 192 + (COLUMNS - 1) * 4, 3)
    assert (out[0, 0] == 0).all() and (out[196, 196] == 10 * (COLUMNS + 1)).all()  # row 1, column 1
    assert (out[192:196] == 255).all()  # the white gap between rows


def test_a_controlnet_request_carries_the_guide_and_a_caption_without_where_or_how_large():
    from triptych.demo.gallery import controlnet_request

    scene = HELD_OUT[0]
    request = controlnet_request(scene, 7)
    assert request["seed"] == 7
    assert scene.size not in request["positive_prompt"].split() and scene.colour in request["positive_prompt"]
    (unit,) = request["control_net"]
    assert unit.model == "demo/controlnet-mask"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(unit.guide_image))), guide_mask(scene))
