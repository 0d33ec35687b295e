"""Single-file checkpoints without serving them: detection agrees with diffusers' own, every real architecture's
LDM names convert back to exactly its parameters (on the meta device: nothing allocated), and the tiny family
survives export -> load bit for bit. The end-to-end checks (pixels through the real processes) are in
tests/e2e/test_single_file.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import save_file

from triptych import checkpoint
from triptych.model_builders import full_size, ldm
from triptych.model_store import ModelStore
from triptych.serving.errors import InvalidArgument, ModelLoadFailed

KIND_OF = {"sd15": "v1", "sd21": "v2", "sdxl": "xl_base", "sdxl-refiner": "xl_refiner"}
LAYOUT_OF = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner"}


def _ldm_state(architecture: str, folder: Path) -> tuple[dict, dict]:
    """(components on the meta device, the whole checkpoint state in LDM names) of a real architecture."""
    with init_empty_weights():
        pipe = full_size._PIPELINES[architecture](folder)
    parts = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    state = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    state.update(
        {ldm.VAE_PREFIXES[0] + k: v for k, v in ldm.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()}
    )
    for name, (prefix, layout) in checkpoint.TEXT_ENCODER_PREFIXES[LAYOUT_OF[architecture]].items():
        weights = parts[name].state_dict()
        converted = ldm.clip_to_ldm(weights) if layout == "clip" else ldm.open_clip_to_ldm(weights)
        state.update({prefix + k: v for k, v in converted.items()})
    return parts, state


@pytest.mark.parametrize("architecture", list(KIND_OF))
def test_real_architectures_are_detected_as_diffusers_detects_them_and_convert_back_exactly(architecture, tmp_path):
    parts, state = _ldm_state(architecture, tmp_path)
    assert infer_diffusers_model_type(state) == KIND_OF[architecture]  # our export is what diffusers recognises
    header = checkpoint._Header({key: tuple(t.shape) for key, t in state.items()}, {})
    found = checkpoint.detect(Path("x.safetensors"), header)
    assert (found.architecture, found.layout) == (architecture, LAYOUT_OF[architecture])
    for name, module in parts.items():
        prefix, layout = found.prefix(name)
        tensors = {key: tensor for key, tensor in state.items() if key.startswith(prefix)}
        converted = checkpoint.to_diffusers(module, tensors, prefix, layout)  # raises unless exactly the params
        assert set(converted) | {n for n, _ in module.named_buffers()} >= set(module.state_dict())


def test_the_configs_a_real_checkpoint_is_served_with_describe_the_real_pipeline(tmp_path):
    folder = checkpoint.configs_folder(
        checkpoint.Checkpoint(tmp_path / "x.safetensors", "sdxl-refiner", "sdxl-refiner")
    )
    index = (folder / "model_index.json").read_text()
    assert "StableDiffusionXLImg2ImgPipeline" in index and '"requires_aesthetics_score": true' in index
    assert (folder / "tokenizer_2" / "vocab.json").exists() and not (folder / "tokenizer").exists()
    assert not list(folder.rglob("*.safetensors"))  # configs only


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sdxl-refiner"])
def test_tiny_pipelines_survive_export_and_load_bit_for_bit(model_root, tmp_path, name):
    import diffusers
    import transformers

    ldm.export_checkpoint(model_root / "tiny" / name, tmp_path / "civitai" / "1" / "2.safetensors", embed_configs=True)
    info = ModelStore(tmp_path).resolve("civitai:1@2", "model")
    assert info.is_text_to_image and info.weights is not None and info.note.startswith("a single-file checkpoint")
    for component, (library, class_name) in ((k, v) for k, v in info.index.items() if isinstance(v, list)):
        if library not in ("diffusers", "transformers") or class_name.endswith(("Tokenizer", "Scheduler")):
            continue
        model_class = getattr(diffusers if library == "diffusers" else transformers, class_name)
        loaded = checkpoint.load(model_class, info, component).state_dict()
        folder = model_class.from_pretrained(model_root / "tiny" / name / component).state_dict()
        assert loaded.keys() == folder.keys()
        assert all(torch.equal(loaded[key], folder[key]) for key in folder), component


def test_files_that_are_no_model_say_what_they_are(model_root, tmp_path):
    store = ModelStore(tmp_path)
    (tmp_path / "a").mkdir()
    # a LoRA as a model
    (tmp_path / "a" / "lora.safetensors").write_bytes(
        (model_root / "tiny" / "lora-sd15-kohya.safetensors").read_bytes()
    )
    assert not store.resolve("a/lora", "model").is_text_to_image
    # a pickle: refused by name, never opened
    (tmp_path / "a" / "old.ckpt").write_bytes(b"not read")
    with pytest.raises(InvalidArgument, match="pickle"):
        store.resolve("a/old", "model")
    # a truncated checkpoint: FAILED_PRECONDITION naming the id, not the server's path
    whole = ldm.export_checkpoint(model_root / "tiny" / "sd15", tmp_path / "whole.safetensors", embed_configs=True)
    (tmp_path / "a" / "cut.safetensors").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ModelLoadFailed) as failed:
        store.resolve("a/cut", "model")
    assert "a/cut" in str(failed.value) and str(tmp_path) not in str(failed.value)
    # an unknown architecture: the tiny UNet's tensors without the configs that describe them
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, tmp_path / "a" / "odd.safetensors"
    )
    odd = store.resolve("a/odd", "model")
    assert odd.kind == "checkpoint" and "unknown architecture" in odd.what
    # a standalone VAE in LDM names
    vae = {
        ldm.VAE_PREFIXES[0] + k: v
        for k, v in ldm.vae_to_ldm(_tiny_vae(model_root), _tiny_vae_config(model_root)).items()
    }
    save_file(vae, tmp_path / "a" / "vae.safetensors")
    assert store.resolve("a/vae", "vae").kind == "vae"


def _tiny_vae(model_root):
    from safetensors.torch import load_file

    return load_file(model_root / "tiny" / "vae-alt" / "diffusion_pytorch_model.safetensors")


def _tiny_vae_config(model_root):
    import json

    return json.loads((model_root / "tiny" / "vae-alt" / "config.json").read_text())


def test_models_import_places_a_checked_file_under_its_air_id(model_root, tmp_path, capsys):
    from triptych.cli import main

    made = ldm.export_checkpoint(model_root / "tiny" / "sd15", tmp_path / "download.safetensors", embed_configs=True)
    store = tmp_path / "store"
    assert main(["models", "--root", str(store), "import", str(made), "--id", "civitai:4384@128713"]) == 0
    assert "imported civitai:4384@128713: a single-file checkpoint" in capsys.readouterr().out
    assert (store / "civitai" / "4384" / "128713.safetensors").read_bytes() == made.read_bytes()
    assert ModelStore(store).resolve("civitai:4384@128713", "model").is_text_to_image
    # the id is taken: only --replace replaces it
    assert main(["models", "--root", str(store), "import", str(made), "--id", "civitai:4384@128713"]) == 1
    assert "already" in capsys.readouterr().err
    assert main(["models", "--root", str(store), "import", str(made), "--id", "civitai:4384@128713", "--replace"]) == 0
    # refused, saying why: a pickle, a damaged file, an architecture we do not serve
    (tmp_path / "old.ckpt").write_bytes(b"x")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(made.read_bytes()[:1000])
    odd = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, odd)
    for bad, words in ((tmp_path / "old.ckpt", "pickle"), (cut, "damaged"), (odd, "unknown architecture")):
        assert main(["models", "--root", str(store), "import", str(bad), "--id", "x/y"]) == 1
        assert words in capsys.readouterr().err
    assert not (store / "x").exists()
