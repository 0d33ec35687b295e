"""TRIPTYCH_PRELOAD_MODELS: each backend loads and runs the listed models before it reports SERVING.

Real processes: what they hold before any request (RuntimeService), that a compiled denoiser has compiled its
default-size graph before serving (a request at that size builds no graph), and that an id that does not exist
stops the process with a message naming the setting.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.e2e.processes import all_serving, chain_with, launch
from tests.e2e.test_services import runtime_info
from triptych.client import ImageClient
from triptych.v1 import image_service_pb2

# The refiner (5 time ids), and a VAE folder: only the decoder has a part of that.
PRELOAD = "tiny/sd15, tiny/sdxl,tiny/sdxl-refiner,tiny/vae-alt"


def holds(address: str) -> set[tuple[str, str]]:
    return {(c.model, c.component) for c in runtime_info(address).loaded_components}


def test_each_backend_holds_the_preloaded_models_before_any_request(model_root):
    env = {"TRIPTYCH_PRELOAD_MODELS": PRELOAD}
    launched = (launch(role, model_root, env) for role in ("encoder", "denoiser", "decoder"))
    with all_serving(*launched) as served:
        encoder, denoiser, decoder = (process.address for process in served)
        assert {("tiny/sd15", "text_encoder"), ("tiny/sdxl", "text_encoder_2")} <= holds(encoder)
        assert holds(denoiser) == {("tiny/sd15", "unet"), ("tiny/sdxl", "unet"), ("tiny/sdxl-refiner", "unet")}
        assert runtime_info(denoiser).counters["denoise_steps"] >= 6, "2 steps per model were run (PNDM: 3 calls)"
        assert holds(decoder) == {(m, "vae") for m in ("tiny/sd15", "tiny/sdxl", "tiny/sdxl-refiner", "tiny/vae-alt")}


def test_a_compiled_denoiser_compiles_before_it_serves(services, model_root):
    env = {"TRIPTYCH_PRELOAD_MODELS": "tiny/sd15", "TRIPTYCH_COMPILE": "1"}
    with chain_with(services, model_root, env) as (gateway, backends), ImageClient(gateway) as client:
        graphs = runtime_info(backends["denoiser"]).counters["compiled_graphs"]
        assert graphs > 0
        request = image_service_pb2.GenerateRequest(model="tiny/sd15", positive_prompt="a red fox", steps=3, seed=1)
        assert client.generate(request)[0].image.data  # the model's default size: 128²
        assert runtime_info(backends["denoiser"]).counters["compiled_graphs"] == graphs, "nothing new compiled"


def test_a_preloaded_model_that_does_not_exist_stops_the_process(model_root):
    done = subprocess.run(
        [sys.executable, "-m", "triptych.cli", "serve", "denoiser", "--port", "0", "--model-root", str(model_root)],
        env={**os.environ, "TRIPTYCH_PRELOAD_MODELS": "tiny/sd15,tiny/nope"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "TRIPTYCH_PRELOAD_MODELS: tiny/nope:" in done.stderr, done.stderr
    assert "SERVING" not in done.stdout
