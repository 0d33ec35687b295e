"""The real SD1.5 architecture as a civitai file: `triptych models build-full-size sd15` (random weights, 4.3 GB),
exported to the original LDM layout as civitai files are made (model_builders/ldm.py, the inverse of diffusers'
own import; no configs in the file), placed under an AIR id, and served through the real processes with the
configs Triptych ships for the architecture: pixels identical to the folder's.

Slow (about two minutes, 8.6 GB of disk while it runs): not in the README's test command; `.ci/run` runs it after
(`scripts/test-slow`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.e2e.processes import serving
from tests.e2e.reference import Oracle
from triptych.client import ImageClient
from triptych.model_builders.full_size import build_full_size
from triptych.model_builders.ldm import export_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("full-size-store")
    folder = build_full_size(root, "sd15")
    export_checkpoint(folder, root / "civitai" / "4384" / "128713.safetensors")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_full_size_sd15_civitai_file_equals_its_folder(store):
    request = dict(positive_prompt="a lighthouse at dusk", negative_prompt="fog", seed=11, width=64, height=64)
    request.update(steps=2, cfg_scale=7.5, clip_skip=1)
    # one model in memory per process: the file's and the folder's 3.4 GB UNets never sit side by side
    with serving(None, store, env={"TRIPTYCH_MAX_LOADED_MODELS": "1"}) as served, ImageClient(served.gateway) as client:
        from_file = Oracle.chain(client, dict(request, model="civitai:4384@128713"))
        from_folder = Oracle.chain(client, dict(request, model="full-size/sd15"))
    assert np.array_equal(from_file.pixels, from_folder.pixels)
    assert from_file.pixels.std() > 0  # (not an empty image: the random network draws noise)
