"""Issue 15, finding 5: a decoder with decoder_tile_above_pixels decodes large images in tiles, bounding the memory one
image takes, exactly as diffusers' `vae.enable_tiling()` decodes them; smaller images decode whole."""

from __future__ import annotations

import numpy as np

from tests.e2e.processes import chain_with
from tests.e2e.reference import Oracle, pipeline
from triptych.client import ImageClient

REQUEST = dict(model="tiny/sd15", positive_prompt="a red fox", seed=9, steps=3)


def test_large_images_decode_in_tiles_as_diffusers_does(services, model_root, oracle, client):
    env = {"TRIPTYCH_DECODER_TILE_ABOVE_PIXELS": str(128 * 128)}  # the tiny VAE's tile is 128 px
    with chain_with(services, model_root, env, roles=("decoder",)) as (gateway, _), ImageClient(gateway) as tiled:
        pipe = oracle.pipe("tiny/sd15")
        pipe.vae.enable_tiling()
        try:
            large = {**REQUEST, "width": 256, "height": 192}
            chained = oracle.compare(tiled, large, pipeline(pipe))
        finally:
            pipe.vae.disable_tiling()
        whole = Oracle.chain(client, large)  # the session's decoder decodes it whole
        assert not np.array_equal(chained.pixels, whole.pixels), "tiling changed how it decoded"
        small = {**REQUEST, "width": 128, "height": 128}  # not above the threshold: decoded whole, as diffusers
        assert np.array_equal(Oracle.chain(tiled, small).pixels, oracle.diffusers(small))
