"""The tiny model family (the session's, tests/conftest.py builds it once): real tokenizer, deterministic bytes,
every folder loads and runs in diffusers."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from triptych.model_builders.clip_vocab import write_clip_tokenizer
from triptych.model_builders.tiny import TINY_IDS, build_tiny_family

SMALL = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}


def _run(pipe, prompt="a photo of a cat", seed=0, **kwargs) -> np.ndarray:
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{**SMALL, **kwargs}).images
    return np.asarray(out)


def _assert_image(img: np.ndarray, size: int = 64) -> None:
    assert img.shape == (1, size, size, 3)
    assert np.isfinite(img).all()
    assert img.std() > 0.05, "a degenerate (flat) image"
    assert ((img <= 0.0) | (img >= 1.0)).mean() < 0.2, "mostly saturated"


def _sd15(root: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(root / "tiny/sd15")


def _sdxl(root: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(root / "tiny/sdxl")


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(("pad", "pad_id"), [("<|endoftext|>", 49407), ("!", 0)])
def test_clip_tokenizer_is_the_real_one(tmp_path, pad, pad_id):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp_path, pad_token=pad)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == pad_id and tok.pad_token == pad


def test_build_is_byte_for_byte_deterministic(model_root, tmp_path):
    assert build_tiny_family(tmp_path) == TINY_IDS
    first, second = _tree_digest(model_root / "tiny"), _tree_digest(tmp_path / "tiny")
    assert first == second
    assert all((tmp_path / i).exists() for i in TINY_IDS)
    # Served by processes that may run as another user: save_pretrained's safetensors are 0600 until the build ends.
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in [tmp_path / "tiny", *(tmp_path / "tiny").rglob("*")]}
    assert {mode for path, mode in modes.items() if path.is_file()} == {0o644}
    assert {mode for path, mode in modes.items() if path.is_dir()} == {0o755}


def test_model_index_flags(model_root):
    base = json.loads((model_root / "tiny/sdxl/model_index.json").read_text())
    refiner = json.loads((model_root / "tiny/sdxl-refiner/model_index.json").read_text())
    assert base["force_zeros_for_empty_prompt"] is True
    assert refiner["force_zeros_for_empty_prompt"] is False and refiner["requires_aesthetics_score"] is True
    assert refiner["text_encoder"] == [None, None] and refiner["tokenizer"] == [None, None]


def test_sd15_runs_and_20_steps_stay_sane(model_root):
    pipe = _sd15(model_root)
    _assert_image(_run(pipe))
    assert not np.array_equal(_run(pipe), _run(pipe, prompt="a red dog")), "the prompt must matter"
    latents = pipe(
        prompt="a photo of a cat", num_inference_steps=20, height=128, width=128, output_type="latent"
    ).images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all() and latents.std() > 0.1
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    _assert_image((pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), 128)


def test_vae_alt_swaps_in(model_root):
    from diffusers import AutoencoderKL

    pipe = _sd15(model_root)
    base = _run(pipe)
    pipe.vae = AutoencoderKL.from_pretrained(model_root / "tiny/vae-alt")
    alt = _run(pipe)
    _assert_image(alt)
    assert not np.array_equal(base, alt)


def test_sdxl_base_then_refiner(model_root):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = _sdxl(model_root)
    _assert_image(_run(base))
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(model_root / "tiny/sdxl-refiner")
    gen = torch.Generator().manual_seed(0)
    latents = base(
        prompt="a cat",
        num_inference_steps=5,
        height=64,
        width=64,
        denoising_end=0.8,
        output_type="latent",
        generator=gen,
    ).images
    assert latents.shape == (1, 4, 8, 8)
    img = refiner(prompt="a cat", image=latents, num_inference_steps=5, denoising_start=0.8, output_type="np").images
    _assert_image(np.asarray(img))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_has_a_visible_effect(model_root, family):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    pipe = _sd15(model_root) if family == "sd15" else _sdxl(model_root)
    cls = StableDiffusionControlNetPipeline if family == "sd15" else StableDiffusionXLControlNetPipeline
    controlnet = ControlNetModel.from_pretrained(model_root / f"tiny/controlnet-{family}")
    cpipe = cls(**pipe.components, controlnet=controlnet)
    guide = np.zeros((64, 64, 3), np.uint8)
    guide[16:48, 16:48] = 255
    on = _run(cpipe, image=Image.fromarray(guide))
    off = _run(cpipe, image=Image.fromarray(guide), controlnet_conditioning_scale=0.0)
    _assert_image(on)
    assert np.abs(on - off).mean() > 0.005


@pytest.mark.parametrize(
    "name, net_class", [("controlnet-flux", "FluxControlNetModel"), ("controlnet-sd3", "SD3ControlNetModel")]
)
def test_flow_controlnets_have_no_trivial_parameter(model_root, name, net_class):
    """Their zero-initialised layers (diffusers' zero_module) are woken, norms perturbed: nothing is all 0 or all 1.
    (Their effect on the image is checked against diffusers in tests/e2e/test_flow_controlnet.py.)"""
    import diffusers

    net = getattr(diffusers, net_class).from_pretrained(model_root / f"tiny/{name}")
    trivial = [n for n, p in net.named_parameters() if bool((p == 0).all()) or bool((p == 1).all())]
    assert not trivial, trivial


@pytest.mark.parametrize("weight_name", ["lora-sd15-kohya.safetensors", "lora-sd15-peft.safetensors"])
def test_lora_changes_unet_and_text_encoder(model_root, weight_name):
    pipe = _sd15(model_root)
    base_img = _run(pipe)
    base_emb = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    pipe.load_lora_weights(model_root / "tiny", weight_name=weight_name)
    assert "lora" in type(pipe.text_encoder.encoder.layers[0].self_attn.q_proj).__module__
    lora_emb = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    lora_img = _run(pipe)
    _assert_image(lora_img)
    assert (lora_emb - base_emb).abs().mean() > 1e-3, "the text-encoder half must act"
    assert np.abs(lora_img - base_img).mean() > 0.005


def test_textual_inversion_sd15(model_root):
    pipe = _sd15(model_root)
    before = pipe.encode_prompt("a ti-sd15 fox", "cpu", 1, False)[0]
    pipe.load_textual_inversion(model_root / "tiny/ti-sd15.safetensors", token="ti-sd15")
    assert pipe.maybe_convert_prompt("a ti-sd15 fox", pipe.tokenizer) == "a ti-sd15 ti-sd15_1 fox"
    after = pipe.encode_prompt("a ti-sd15 fox", "cpu", 1, False)[0]
    assert not torch.equal(before, after)
    _assert_image(_run(pipe, prompt="a ti-sd15 fox"))


def test_textual_inversion_sdxl(model_root):
    from safetensors.torch import load_file

    pipe = _sdxl(model_root)
    before = pipe.encode_prompt("a ti-sdxl fox", device="cpu", do_classifier_free_guidance=False)[0]
    state = load_file(model_root / "tiny/ti-sdxl.safetensors")
    assert state["clip_l"].shape == state["clip_g"].shape == (2, 32)
    pipe.load_textual_inversion(
        state["clip_l"], token="ti-sdxl", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token="ti-sdxl", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    after = pipe.encode_prompt("a ti-sdxl fox", device="cpu", do_classifier_free_guidance=False)[0]
    # prompt_embeds concatenate both encoders: 32 features from each must change.
    assert not torch.equal(before[..., :32], after[..., :32]) and not torch.equal(before[..., 32:], after[..., 32:])
    _assert_image(_run(pipe, prompt="a ti-sdxl fox"))
