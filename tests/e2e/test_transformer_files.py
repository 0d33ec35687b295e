"""SD3 and FLUX transformer files through the real processes: a fine-tune's one .safetensors (the transformer in
BFL's / Stability's original key layout, with or without ComfyUI's prefix, perhaps with its VAE) serves with the
text encoders and VAE of its base folder (the session's services map flux-dev and sd3 to tiny/flux and tiny/sd3 by
`TRIPTYCH_BASE_MODELS`, tests/conftest.py), with pixels equal to the folder it came from and, for SD3, to diffusers' own
`SD3Transformer2DModel.from_single_file`. diffusers' FLUX converter fixes FLUX.1's width, so it cannot read the tiny
file: tests/unit/test_transformer_files.py checks our converter against it on FLUX.1's real shapes."""

from __future__ import annotations

import shutil

import diffusers
import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.e2e.reference import Oracle
from tests.e2e.test_single_file import refused
from triptych.client import field_violations, open_channel
from triptych.model_builders import ldm
from triptych.v1 import runtime_service_pb2, runtime_service_pb2_grpc

AIR = "civitai:618692@691639"  # -> <store>/civitai/618692/691639.safetensors
FLUX = dict(positive_prompt="a boat", seed=8, width=64, height=64, steps=3, cfg_scale=3.5)
SD3 = dict(positive_prompt="a boat", negative_prompt="fog", seed=8, width=64, height=64, steps=3, cfg_scale=5.0)


@pytest.fixture(scope="module")
def files(model_root):
    """The tiny FLUX transformer as BFL ships FLUX.1 (no prefix) under an AIR id and as ComfyUI saves it; the tiny SD3
    transformer with its VAE as Stability's sd3_medium.safetensors; a FLUX.1-schnell-shaped file (no guidance
    embedding), whose base (tiny/missing-schnell) is not in the store; a FLUX file of another structure than its base
    (tiny/flux with its single block left out)."""
    tiny = model_root / "tiny"
    ldm.export_transformer_file(tiny / "flux", model_root / "civitai" / "618692" / "691639.safetensors")
    ldm.export_transformer_file(tiny / "flux", model_root / "ft" / "flux-comfy.safetensors", prefix=ldm.UNET_PREFIX)
    sd3 = ldm.export_transformer_file(
        tiny / "sd3", model_root / "ft" / "sd3.safetensors", prefix=ldm.UNET_PREFIX, vae_prefix="first_stage_model."
    )
    dev = load_file(model_root / "civitai" / "618692" / "691639.safetensors")
    schnell = {k: v for k, v in dev.items() if not k.startswith("guidance_in.")}
    save_file(schnell, model_root / "ft" / "schnell.safetensors")
    shorter = {k: v for k, v in dev.items() if not k.startswith("single_blocks.")}
    save_file(shorter, model_root / "ft" / "shorter.safetensors")
    yield {"sd3": sd3}
    shutil.rmtree(model_root / "ft")
    shutil.rmtree(model_root / "civitai")


@pytest.mark.parametrize("model", [AIR, "ft/flux-comfy"])
def test_a_flux_transformer_file_equals_its_folder(client, files, model):
    from_file = Oracle.chain(client, dict(FLUX, model=model))
    from_folder = Oracle.chain(client, dict(FLUX, model="tiny/flux"))
    assert np.array_equal(from_file.pixels, from_folder.pixels)


def test_a_flux_transformer_file_takes_a_lora_like_its_folder(client, files):
    request = dict(FLUX, lora=[dict(model="tiny/lora-flux", weight=0.8)])
    from_file = Oracle.chain(client, dict(request, model=AIR))
    from_folder = Oracle.chain(client, dict(request, model="tiny/flux"))
    plain = Oracle.chain(client, dict(FLUX, model=AIR))
    assert np.array_equal(from_file.pixels, from_folder.pixels)
    assert not np.array_equal(from_file.pixels, plain.pixels)  # the LoRA did something


def test_an_sd3_file_with_its_vae_equals_diffusers_from_single_file(client, files, model_root):
    from_file = Oracle.chain(client, dict(SD3, model="ft/sd3"))
    base = model_root / "tiny" / "sd3"
    transformer = diffusers.SD3Transformer2DModel.from_single_file(
        str(files["sd3"]), config=str(base), subfolder="transformer", local_files_only=True
    )
    vae = diffusers.AutoencoderKL.from_single_file(
        str(files["sd3"]), config=str(base), subfolder="vae", local_files_only=True
    )
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(base), transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=SD3["positive_prompt"],
        negative_prompt=SD3["negative_prompt"],
        num_inference_steps=3,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(8),
    ).images[0]
    assert np.array_equal(from_file.pixels, np.asarray(expected.convert("RGB")))


@pytest.mark.parametrize(
    ("model", "code", "words"),
    [
        ("ft/schnell", grpc.StatusCode.NOT_FOUND, "its base 'tiny/missing-schnell', which is not in the model store"),
        ("ft/shorter", grpc.StatusCode.INVALID_ARGUMENT, "num_single_layers 0 (base: 1)"),
    ],
)
def test_a_file_without_its_base_or_of_another_structure_is_a_clear_error(
    client, files, model_root, model, code, words
):
    failed = refused(client, dict(FLUX, model=model), code, words, model_root)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert "model" in dict(field_violations(failed))
    else:
        assert failed.details().startswith("model: ")
    Oracle.chain(client, dict(FLUX, model=AIR))  # still serving


def test_a_fine_tune_shares_its_bases_text_encoders_and_vae(services, client, files):
    for model in (AIR, "tiny/flux"):
        Oracle.chain(client, dict(FLUX, model=model))
    held = {}
    for role in ("encoder", "denoiser", "decoder"):
        with open_channel(services.addresses[role]) as channel:
            info = runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
                runtime_service_pb2.GetRuntimeInfoRequest(), timeout=30
            )
        held[role] = {(c.model, c.component) for c in info.loaded_components if c.model in (AIR, "tiny/flux")}
    assert not any(model == AIR for model, _ in held["encoder"] | held["decoder"])  # one copy: the base's
    assert ("tiny/flux", "text_encoder_2") in held["encoder"] and ("tiny/flux", "vae") in held["decoder"]
    assert (AIR, "transformer") in held["denoiser"] and ("tiny/flux", "transformer") in held["denoiser"]
