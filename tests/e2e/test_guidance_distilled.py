"""A guidance-distilled (LCM) UNet, `time_cond_proj_dim` set: the guidance scale goes in as diffusers'
`timestep_cond` embedding, with no CFG pass, through the chain as in diffusers' pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from tests.e2e.reference import pipeline

MODEL = "distilled/sd15-lcm"


@pytest.fixture(scope="module")
def lcm_folder(model_root):
    """tiny/sd15 with an LCM-shaped UNet (its own random weights, a guidance projection of 32) and LCMScheduler.
    Removed afterwards: other tests list the store's pipelines."""
    folder = model_root / MODEL
    shutil.copytree(model_root / "tiny/sd15", folder)
    config = json.loads((folder / "unet/config.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 32})
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    scheduler = LCMScheduler.from_pretrained(folder / "scheduler")
    shutil.rmtree(folder / "scheduler")
    scheduler.save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "LCMScheduler"]}))
    yield folder
    shutil.rmtree(model_root / "distilled")


def request(cfg_scale: float) -> dict:
    return dict(model=MODEL, positive_prompt="a red fox", seed=3, width=64, height=64, steps=4, cfg_scale=cfg_scale)


def test_guidance_scale_is_the_unets_embedding_as_in_diffusers(client, oracle, lcm_folder):
    pipe = StableDiffusionPipeline.from_pretrained(lcm_folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 32
    got = oracle.compare(client, request(1.5), pipeline(pipe)).pixels
    other_scale = oracle.chain(client, request(4.0)).pixels
    assert not np.array_equal(got, other_scale), "the scale reaches the UNet (it has no CFG pass)"
