"""Single-file checkpoints and VAE files through the real processes: a checkpoint in the original (LDM) layout,
exported from a tiny folder the way civitai files are made (model_builders/ldm.py, the inverse of diffusers' own
import), serves under any id or its AIR id with pixels equal to the folder's and to diffusers' own
`from_single_file`; each role holds only its own part of it; files that are no model get clear errors.
The full-size SD1.5 check (the real architecture, configs shipped with Triptych) is test_full_size_checkpoint."""

from __future__ import annotations

import json
import shutil

import diffusers
import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.e2e.reference import Oracle
from triptych.client import field_violations, open_channel
from triptych.model_builders import ldm
from triptych.v1 import runtime_service_pb2, runtime_service_pb2_grpc

AIR = "civitai:4384@128713"  # -> <store>/civitai/4384/128713.safetensors
REQUEST = dict(positive_prompt="a red fox in the snow", negative_prompt="blurry", seed=7, width=64, height=64, steps=3)


@pytest.fixture(scope="module")
def single_files(model_root):
    """Tiny SDXL as a civitai-style file under an AIR id, tiny SD1.5 under a plain id, the alternative VAE as a
    VAE file in LDM names, and a damaged copy; written into the session's store, which the services read live, and
    removed after this module (other modules list the store's models)."""
    tiny = model_root / "tiny"
    sdxl = ldm.export_checkpoint(tiny / "sdxl", model_root / "civitai" / "4384" / "128713.safetensors", True)
    sd15 = ldm.export_checkpoint(tiny / "sd15", model_root / "single" / "sd15.safetensors", True)
    (model_root / "single" / "cut.safetensors").write_bytes(sd15.read_bytes()[: sd15.stat().st_size // 3])
    vae = load_file(tiny / "vae-alt" / "diffusion_pytorch_model.safetensors")
    config = json.loads((tiny / "vae-alt" / "config.json").read_text())
    save_file(
        {"first_stage_model." + k: v for k, v in ldm.vae_to_ldm(vae, config).items()},
        model_root / "single" / "vae.safetensors",
    )
    yield {"sdxl": sdxl, "sd15": sd15}
    shutil.rmtree(model_root / "single")
    shutil.rmtree(model_root / "civitai")


def refused(client, request: dict, code: grpc.StatusCode, words: str, model_root) -> grpc.RpcError:
    """The error a request through the chain fails with: `code`, a message with `words` and no server path."""
    with pytest.raises(grpc.RpcError) as failed:
        Oracle.chain(client, request)
    assert failed.value.code() == code, failed.value.details()
    assert words in failed.value.details() and str(model_root) not in failed.value.details()
    return failed.value


def test_an_sdxl_checkpoint_under_its_air_id_equals_the_folder_and_diffusers(client, oracle, single_files):
    # diffusers' own from_single_file cannot be the oracle here: it tells SDXL's two text encoders apart by width,
    # which the tiny ones share, and loads CLIP-L into both. The folder is compared with diffusers instead.
    request = dict(REQUEST, cfg_scale=5.0)
    from_file = Oracle.chain(client, dict(request, model=AIR))
    from_folder = oracle.compare(client, dict(request, model="tiny/sdxl"))
    assert np.array_equal(from_file.pixels, from_folder.pixels)


def test_an_sd15_checkpoint_equals_diffusers_from_single_file(client, single_files, model_root):
    request = dict(REQUEST, cfg_scale=7.0, model="single/sd15")
    from_file = Oracle.chain(client, request)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(single_files["sd15"]), config=str(model_root / "tiny" / "sd15"), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=request["positive_prompt"],
        negative_prompt=request["negative_prompt"],
        num_inference_steps=3,
        guidance_scale=7.0,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    assert np.array_equal(from_file.pixels, np.asarray(expected.convert("RGB")))


def test_an_sd15_checkpoint_with_lora_clip_skip_and_a_vae_file_equals_the_folder(client, single_files):
    request = dict(
        REQUEST,
        cfg_scale=7.0,
        clip_skip=1,
        lora=[dict(model="tiny/lora-sd15-kohya", weight=0.8)],
    )
    for vae in ("", "tiny/vae-alt"):
        from_folder = Oracle.chain(client, dict(request, model="tiny/sd15", vae=vae))
        from_file = Oracle.chain(client, dict(request, model="single/sd15", vae=vae))
        assert np.array_equal(from_file.pixels, from_folder.pixels), vae
    # the VAE file (LDM names, no config) decodes with the model's scaling, as the VAE folder it came from
    with_file_vae = Oracle.chain(client, dict(request, model="tiny/sd15", vae="single/vae"))
    assert np.array_equal(with_file_vae.pixels, from_folder.pixels)


def test_each_role_holds_only_its_own_part_of_the_file(services, client, single_files):
    Oracle.chain(client, dict(REQUEST, model="single/sd15"))
    held = {}
    for role in ("encoder", "denoiser", "decoder"):
        with open_channel(services.addresses[role]) as channel:
            info = runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
                runtime_service_pb2.GetRuntimeInfoRequest(), timeout=30
            )
        held[role] = {c.component for c in info.loaded_components if c.model == "single/sd15"}
    assert held["encoder"] == {"tokenizer", "text_encoder"}
    assert held["denoiser"] <= {"unet", "scheduler"} and "unet" in held["denoiser"]
    assert held["decoder"] == {"vae"}


@pytest.mark.parametrize(
    ("model", "code", "words"),
    [
        ("single/cut", grpc.StatusCode.FAILED_PRECONDITION, "single/cut"),  # truncated
        ("tiny/lora-sd15-kohya", grpc.StatusCode.INVALID_ARGUMENT, "a LoRA file"),
        ("single/vae", grpc.StatusCode.INVALID_ARGUMENT, "VAE file"),
    ],
)
def test_files_that_cannot_serve_are_clear_errors_and_the_service_goes_on(
    client, single_files, model_root, model, code, words
):
    failed = refused(client, dict(REQUEST, model=model), code, words, model_root)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert "model" in dict(field_violations(failed))
    Oracle.chain(client, dict(REQUEST, model="single/sd15"))  # still serving


def test_a_pickle_is_refused_by_name(client, single_files, model_root):
    (model_root / "single" / "old.ckpt").write_bytes(b"never unpickled")
    with pytest.raises(grpc.RpcError) as failed:
        Oracle.chain(client, dict(REQUEST, model="single/old"))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pickle" in failed.value.details()
