"""Every feature has a visible, checkable effect on the demo family (issue #20, "Must show"), through the gateway and
read back by demo/classify.py: the ControlNet puts the shape inside its guide mask, the LoRA draws outlines, the
textual-inversion word draws crescents, a negative prompt naming a colour lowers that colour's share. Each check on
24 held-out scenes (every shape three times, every position at least twice); skipped while assets/demo is absent, and
an adapter's check while the committed family ships without that adapter.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tests.e2e.demo_pictures import captions, generate, held_out, require
from triptych.demo.classify import colour_share, iou, read
from triptych.demo.gallery import controlnet_request
from triptych.demo.render import guide_mask
from triptych.demo.vocabulary import ALL_SHAPES
from triptych.v1 import common_pb2

COUNT = 24
TI_TOKEN = "ti-moon"  # an A1111 embedding's token is its file's stem


def test_controlnet_draws_the_shape_inside_the_guide_mask(demo_root, client):
    require(demo_root, "controlnet-mask")
    # The captions leave out where and how large: only the guide mask says it.
    scenes = held_out(COUNT)
    guides = [guide_mask(scene) for scene in scenes]
    requests = [controlnet_request(scene, i) for i, scene in enumerate(scenes)]
    overlaps = [
        iou(read(picture).mask, guide[..., 0] > 127)
        for picture, guide in zip(generate(client, requests), guides, strict=True)
    ]
    inside = float(np.mean(np.asarray(overlaps) >= 0.5))
    figures = ", ".join(f"{i}: {value:.2f}" for i, value in enumerate(overlaps))
    assert inside > 0.5, f"IoU with the guide mask >= 0.5 in {inside:.0%} of pictures (must be most); IoU {figures}"


def test_lora_at_weight_one_draws_outlines_and_at_zero_filled_shapes(demo_root, client):
    require(demo_root, "lora-outline")
    scenes = held_out(COUNT)
    styles = {}
    for weight in (1.0, 0.0):
        lora = [common_pb2.Lora(model="demo/lora-outline", weight=weight)]
        styles[weight] = [read(picture).style for picture in generate(client, captions(scenes, lora=lora))]
    outlines, filled = np.mean([s == "outline" for s in styles[1.0]]), np.mean([s == "filled" for s in styles[0.0]])
    assert outlines > 0.5 and filled > 0.5, (
        f"weight 1: {outlines:.0%} outlines; weight 0: {filled:.0%} filled (each must be most pictures); "
        f"read at 1: {styles[1.0]}; at 0: {styles[0.0]}"
    )


def test_textual_inversion_word_draws_crescents(demo_root, client):
    require(demo_root, TI_TOKEN)
    # The held-out scenes with a crescent: named by the embedding's token, and by "shape" (the base's only way to
    # draw one; its rate is what the word must beat).
    scenes = [dataclasses.replace(scene, shape="crescent") for scene in held_out(COUNT)]
    embedding = [common_pb2.TextualInversion(model=f"demo/{TI_TOKEN}", weight=1.0)]
    with_word = [
        dict(positive_prompt=s.caption(noun=TI_TOKEN), seed=i, embeddings=embedding) for i, s in enumerate(scenes)
    ]
    shapes = {
        name: [read(picture, shapes=ALL_SHAPES).shape for picture in generate(client, requests)]
        for name, requests in (("word", with_word), ("shape", captions(scenes)))
    }
    word, base = (float(np.mean([s == "crescent" for s in shapes[name]])) for name in ("word", "shape"))
    assert word > 0.5 and word >= 2 * base, (
        f"crescents: {word:.0%} with {TI_TOKEN!r}, {base:.0%} with 'shape' (must be most pictures and at least twice "
        f"the base's rate); read with the word: {shapes['word']}"
    )


def test_negative_prompt_naming_a_colour_lowers_its_share(demo_root, client):
    scenes = held_out(COUNT)
    plain = generate(client, captions(scenes))
    negated = generate(
        client, [dict(r, negative_prompt=s.colour) for r, s in zip(captions(scenes), scenes, strict=True)]
    )
    before = [colour_share(p, s.colour) for p, s in zip(plain, scenes, strict=True)]
    after = [colour_share(p, s.colour) for p, s in zip(negated, scenes, strict=True)]
    pairs = ", ".join(f"{s.colour} {b:.3f}->{a:.3f}" for s, b, a in zip(scenes, before, after, strict=True))
    mean_before, mean_after = float(np.mean(before)), float(np.mean(after))
    assert mean_after < mean_before, f"mean share of the negated colour {mean_before:.3f} -> {mean_after:.3f}: {pairs}"
