import json

import pytest
import torch
from safetensors.torch import save_file

from triptych.model_store import ModelStore
from triptych.serving.errors import InvalidArgument, NotFound


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    (root / "tiny" / "sd15").mkdir(parents=True)
    (root / "tiny" / "sd15" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    # files are read (their headers say what they are): real safetensors, a LoRA-shaped one and another
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, root / "tiny" / "lora.safetensors")
    (root / "civitai" / "4201").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, root / "civitai" / "4201" / "130072.safetensors")
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    return ModelStore(root)


def test_ids_resolve_to_folders_files_and_air_paths(store):
    assert store.resolve("tiny/sd15", "model").family.name == "sd1"
    assert store.resolve("tiny/lora", "lora").kind == "file"
    assert store.resolve("tiny/lora", "lora").what == "a LoRA file"
    assert store.resolve("civitai:4201@130072", "model").path.name == "130072.safetensors"


@pytest.mark.parametrize("model_id", ["../x", "/etc/passwd", "tiny/../../x", "tiny\\sd15", "", "a//b", "./tiny"])
def test_ids_that_escape_or_are_malformed_are_invalid(store, model_id):
    with pytest.raises(InvalidArgument):
        store.resolve(model_id, "model")


def test_symlink_out_of_the_root_is_refused(store):
    with pytest.raises(InvalidArgument, match="outside"):
        store.resolve("escape", "model")


def test_missing_model_is_not_found_and_names_it(store):
    with pytest.raises(NotFound, match="tiny/none"):
        store.resolve("tiny/none", "model")


def test_list_shows_models(store):
    ids = [info.model_id for info in store.list()]
    assert "tiny/sd15" in ids and "tiny/lora" in ids and "civitai/4201/130072" in ids
