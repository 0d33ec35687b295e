"""What the encoder can encode with: the store's text-to-image models and its textual-inversion files.

Read from config files and safetensors headers only: listing loads no weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from safetensors import safe_open

from triptych.model_store import ModelInfo, ModelStore


@dataclass(frozen=True)
class EncoderComponent:
    """One text encoder of a model, from its config.json."""

    component: str
    class_name: str
    hidden_size: int
    num_hidden_layers: int
    projection_dim: int  # 0 when the class has no projection


@dataclass(frozen=True)
class TextToImageModel:
    """A model folder and the clip skip range its encoders allow."""

    model: str
    family: str
    encoders: list[EncoderComponent]
    max_clip_skip: int
    zeros_for_empty_negative: bool


@dataclass(frozen=True)
class EmbeddingListing:
    """A textual-inversion file: its id, token, halves and length in tokens."""

    model: str
    token: str
    components: list[str]
    vector_count: int


def _encoders(info: ModelInfo) -> list[EncoderComponent]:
    found = []
    for slot in info.family.encoder_slots(info):
        name = slot.encoder
        config_path = info.path / name / "config.json"
        if not config_path.exists():
            continue
        config = json.loads(config_path.read_text())
        class_name = info.index[name][1]
        projection = config.get("projection_dim", 0) if class_name == "CLIPTextModelWithProjection" else 0
        # T5 configs name them d_model and num_layers.
        width = config.get("hidden_size", config.get("d_model", 0))
        layers = config.get("num_hidden_layers", config.get("num_layers", 0))
        found.append(EncoderComponent(name, class_name, width, layers, projection))
    return found


def _embedding(model_id: str, path) -> EmbeddingListing | None:
    """The listing for a textual-inversion file, or None for any other .safetensors (LoRA, checkpoint)."""
    try:
        with safe_open(str(path), "pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118 - not iterable
    except Exception:  # noqa: BLE001 - an unreadable file is simply not listed as an embedding
        return None
    if shapes and set(shapes) <= {"clip_l", "clip_g"}:  # SDXL
        halves = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
        components = sorted(halves[key] for key in shapes)
        shape = shapes.get("clip_g") or shapes["clip_l"]
    elif set(shapes) == {"emb_params"} or (len(shapes) == 1 and "lora" not in next(iter(shapes)).lower()):
        components, shape = ["text_encoder"], next(iter(shapes.values()))
    else:
        return None
    if not 1 <= len(shape) <= 3:
        return None
    return EmbeddingListing(model_id, path.stem, components, math.prod(shape[:-1]))


def list_catalog(store: ModelStore) -> tuple[list[TextToImageModel], list[EmbeddingListing]]:
    """Every text-to-image model and every textual-inversion .safetensors file in the store, sorted by id."""
    models, embeddings = [], []
    for info in store.list():
        if info.is_text_to_image:
            encoders = _encoders(info)
            if not encoders:
                continue
            layers = min(e.num_hidden_layers for e in encoders if e.class_name.startswith("CLIP"))  # clip skip: CLIP
            models.append(
                TextToImageModel(
                    model=info.model_id,
                    family=info.family_name,
                    encoders=encoders,
                    max_clip_skip=max(0, info.family.max_clip_skip(layers)),
                    zeros_for_empty_negative=bool(info.flag("force_zeros_for_empty_prompt", False)),
                )
            )
        elif info.kind == "file" and info.path.suffix == ".safetensors":
            listing = _embedding(info.model_id, info.path)
            if listing is not None:
                embeddings.append(listing)
    return models, embeddings
