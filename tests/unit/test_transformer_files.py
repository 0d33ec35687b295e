"""SD3/FLUX transformer files (transformer_files.py): detection as diffusers' `infer_diffusers_model_type` tells them,
the structure check against the base's config, and the key tables against diffusers' own converters.

diffusers' FLUX converter fixes FLUX.1's width (3072) where it splits a single block's fused `linear1`; every other
tensor converts whatever its width. So ours is checked against it on the tiny transformer with its single block at
FLUX.1's real width (values, both directions), and on the whole real FLUX.1-dev on the meta device (names, shapes).
SD3's converter in diffusers is generic: our export must be its exact inverse, on the tiny weights and on the real
SD3-medium, SD3.5-large and SD3.5-medium shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders import single_file_utils as sf
from safetensors.torch import load_file

from bench.family_weights import FLUX_DEV, SD3_MEDIUM
from triptych import checkpoint
from triptych import transformer_files as tf
from triptych.model_store import ModelStore
from triptych.serving.settings import Settings

SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm")
SD35_MEDIUM = dict(SD3_MEDIUM, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm", pos_embed_max_size=384)


def _detect(shapes):
    """What checkpoint.py asks: the transformer without a prefix (BFL's files) or under LDM's (ComfyUI's)."""
    return tf.detect(shapes, ("", checkpoint.UNET_PREFIX))


def _meta(model_class, config):
    with torch.device("meta"):
        return model_class(**config)


def _shapes(state):
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def test_flux_on_the_real_architecture_converts_to_the_names_and_shapes_diffusers_gives():
    state = _meta(FluxTransformer2DModel, FLUX_DEV).state_dict()
    original = tf.to_original(state, "flux")
    theirs = sf.convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    ours = tf.flux_to_diffusers(dict(original), _shapes(state))
    assert _shapes(ours) == _shapes(theirs) == _shapes(state)
    found = _detect({checkpoint.UNET_PREFIX + key: shape for key, shape in _shapes(original).items()})
    assert (found.architecture, found.prefix) == ("flux-dev", checkpoint.UNET_PREFIX)
    assert sf.infer_diffusers_model_type(original) == "flux-dev"
    assert tf.mismatch(found, FLUX_DEV) == ""


def test_flux_values_convert_as_diffusers_converts_them_both_ways(model_root):
    tiny = load_file(model_root / "tiny" / "flux" / "transformer" / "diffusion_pytorch_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    inner, mlp = 3072, 4 * 3072  # FLUX.1's width: what diffusers' converter assumes in the single blocks
    wide = {
        "single_transformer_blocks.0.norm.linear.weight": (3 * inner, inner),
        "single_transformer_blocks.0.norm.linear.bias": (3 * inner,),
        "single_transformer_blocks.0.proj_mlp.weight": (mlp, inner),
        "single_transformer_blocks.0.proj_mlp.bias": (mlp,),
        "single_transformer_blocks.0.proj_out.weight": (inner, inner + mlp),
        "single_transformer_blocks.0.proj_out.bias": (inner,),
        **{f"single_transformer_blocks.0.attn.to_{x}.weight": (inner, inner) for x in "qkv"},
        **{f"single_transformer_blocks.0.attn.to_{x}.bias": (inner,) for x in "qkv"},
        **{f"single_transformer_blocks.0.attn.norm_{x}.weight": (128,) for x in "qk"},
    }
    assert set(wide) == {key for key in tiny if key.startswith("single_transformer_blocks.0.")}
    state = {**tiny, **{k: torch.randn(s, generator=generator, dtype=torch.bfloat16) for k, s in wide.items()}}
    original = tf.to_original(state, "flux")
    theirs = sf.convert_flux_transformer_checkpoint_to_diffusers(dict(original))  # diffusers' import of our export
    ours = tf.flux_to_diffusers(dict(original), _shapes(state))  # our import, against diffusers' import
    assert set(theirs) == set(ours) == set(state)
    for key in state:
        assert torch.equal(theirs[key], state[key]) and torch.equal(ours[key], state[key]), key


@pytest.mark.parametrize(
    ("config", "architecture"), [(SD3_MEDIUM, "sd3"), (SD35_LARGE, "sd35_large"), (SD35_MEDIUM, "sd35_medium")]
)
def test_sd3_export_is_the_inverse_of_diffusers_import_on_the_real_shapes(config, architecture):
    state = _meta(SD3Transformer2DModel, config).state_dict()
    original = tf.to_original(state, "sd3")
    assert _shapes(sf.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))) == _shapes(state)
    found = _detect(_shapes(original))
    assert found.architecture == architecture == sf.infer_diffusers_model_type(original)
    assert tf.mismatch(found, config) == ""


def test_sd3_export_is_the_inverse_of_diffusers_import_on_the_tiny_weights(model_root):
    state = load_file(model_root / "tiny" / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors")
    back = sf.convert_sd3_transformer_checkpoint_to_diffusers(tf.to_original(state, "sd3"))
    assert set(back) == set(state) and all(torch.equal(back[key], state[key]) for key in state)


def test_detection_names_what_a_file_is_and_refuses_fill_and_depth():
    state = _meta(FluxTransformer2DModel, dict(FLUX_DEV, num_layers=1, num_single_layers=1)).state_dict()
    original = _shapes(tf.to_original(state, "flux"))
    assert _detect(original).architecture == "flux-dev"
    assert _detect(_shapes(state)).naming == "diffusers"
    schnell = {key: shape for key, shape in original.items() if not key.startswith("guidance_in.")}
    assert _detect(schnell).architecture == "flux-schnell"
    with pytest.raises(ValueError, match="FLUX.1 Fill"):
        _detect({**original, "img_in.weight": (3072, 384)})
    assert _detect({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}) is None
    shapes = {**original, "vae.decoder.conv_in.weight": (1,), "text_encoders.clip_l.x": (1,)}
    with_vae = checkpoint.transformer_file(Path("f.safetensors"), checkpoint._Header(shapes, {}))
    assert with_vae.vae_prefix == "vae." and with_vae.transformer.has_text_encoders
    assert tf.mismatch(_detect(schnell), FLUX_DEV) == "num_layers 1 (base: 19), num_single_layers 1 (base: 38), " + (
        "guidance_embeds False (base: True)"
    )


def test_base_models_setting_parses_and_names_bad_items(monkeypatch):
    monkeypatch.setenv("TRIPTYCH_BASE_MODELS", "flux-dev=a/b, sd3=c")
    assert Settings().base_models == {"flux-dev": "a/b", "sd3": "c"}
    monkeypatch.setenv("TRIPTYCH_BASE_MODELS", "flux=a/b")
    with pytest.raises(ValueError, match="'flux=a/b': want ARCHITECTURE=MODEL_ID"):
        Settings()


def test_the_store_lists_a_file_with_its_base_or_says_the_base_is_missing(model_root, tmp_path):
    from triptych.model_builders import ldm

    shutil.copytree(model_root / "tiny" / "flux", tmp_path / "tiny" / "flux")
    ldm.export_transformer_file(model_root / "tiny" / "flux", tmp_path / "ft" / "flux.safetensors")
    listed = {info.model_id: info for info in ModelStore(tmp_path).list()}
    assert listed["ft/flux"].kind == "checkpoint"
    assert "its base 'black-forest-labs/FLUX.1-dev' is not in the store" in listed["ft/flux"].note
    info = ModelStore(tmp_path, {"flux-dev": "tiny/flux"}).resolve("ft/flux", "model")
    assert info.is_text_to_image and info.family_name == "flux" and info.weights.base == "tiny/flux"
    assert info.weights.holds("transformer") and not info.weights.holds("vae")
    assert info.path == (tmp_path / "tiny" / "flux").resolve()
    assert json.loads((info.path / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
