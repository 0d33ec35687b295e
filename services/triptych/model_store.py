"""The model store: a directory of diffusers folders and .safetensors files, addressed by model id.

Ids are paths relative to the root ("tiny/sd15", "tiny/lora-sd15-kohya" for tiny/lora-sd15-kohya.safetensors)
or Runware/AIR-style "source:id@version", which maps to <root>/<source>/<id>/<version>. Nothing is fetched
from a network, and an id that resolves outside the root (.., absolute paths, symlinks out) is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from triptych import families
from triptych.families import Family
from triptych.serving.errors import InvalidArgument, ModelLoadFailed, NotFound

_AIR = re.compile(r"^(?P<source>[A-Za-z0-9_.-]+):(?P<id>[A-Za-z0-9_.-]+)@(?P<version>[A-Za-z0-9_.-]+)$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.@:+-]+(/[A-Za-z0-9_.@:+-]+)*$")


@dataclass(frozen=True)
class ModelInfo:
    """What a model id points at."""

    model_id: str
    path: Path
    kind: str  # "pipeline", "vae", "controlnet", "unet", "file"
    family: Family | None  # for a pipeline of a family we serve, else None
    index: dict  # model_index.json (pipelines) or config.json (single components); {} for files

    def flag(self, name: str, default=None):
        """A flag registered in model_index.json, e.g. force_zeros_for_empty_prompt."""
        return self.index.get(name, default)

    @property
    def is_text_to_image(self) -> bool:
        """A diffusers pipeline folder of a family we serve: what the encoder and denoiser take."""
        return self.kind == "pipeline" and self.family is not None

    @property
    def family_name(self) -> str:
        """The family's name for this model ("sd1", "sdxl", "sdxl-refiner"); "" when it is no pipeline we serve."""
        return self.family.variant(self) if self.family is not None else ""


class ModelStore:
    """Resolves model ids to folders/files under one root."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def path_for(self, model_id: str, field: str) -> Path:
        """Maps an id to a path inside the root (without checking it exists); INVALID_ARGUMENT if it escapes."""
        if not model_id:
            raise InvalidArgument.one(field, "a model id is required")
        air = _AIR.match(model_id)
        relative = f"{air['source']}/{air['id']}/{air['version']}" if air else model_id
        if not _SAFE_ID.match(relative) or any(part in (".", "..") for part in relative.split("/")):
            raise InvalidArgument.one(field, f"{model_id!r} is not a valid model id (relative path in the store)")
        return self.root / relative

    def resolve(self, model_id: str, field: str, suffixes: tuple[str, ...] = (".safetensors",)) -> ModelInfo:
        """Finds a model (the id as is, else with one of `suffixes`); NOT_FOUND naming the id if absent."""
        candidate = self.path_for(model_id, field)
        for path in (candidate, *(candidate.with_name(candidate.name + suffix) for suffix in suffixes)):
            try:
                if not path.exists():
                    continue
            except OSError as exc:  # e.g. ENAMETOOLONG: no file can have this name
                raise InvalidArgument.one(field, f"not a valid model id ({exc.strerror})") from exc
            real = path.resolve()
            if not real.is_relative_to(self.root):
                raise InvalidArgument.one(field, f"{model_id!r} resolves outside the model store")
            try:
                return _describe(model_id, real)
            except (OSError, ValueError) as exc:  # model_index.json or config.json that does not parse
                raise ModelLoadFailed(model_id, exc) from exc
        raise NotFound(field, f"model {model_id!r} is not in the model store")  # never the server's path

    def list(self) -> list[ModelInfo]:
        """Every model in the store, sorted by id."""
        found = []
        if not self.root.is_dir():
            return found
        for marker in sorted(self.root.rglob("*")):
            rel = marker.relative_to(self.root)
            if marker.is_dir() and ((marker / "model_index.json").exists() or (marker / "config.json").exists()):
                if not any((p / "model_index.json").exists() for p in marker.parents if p != self.root.parent):
                    found.append(_describe(rel.as_posix(), marker))
            elif marker.suffix == ".safetensors" and not any(
                (p / "model_index.json").exists() or (p / "config.json").exists() for p in marker.parents
            ):
                found.append(_describe(rel.with_suffix("").as_posix(), marker))
        return found


def _describe(model_id: str, path: Path) -> ModelInfo:
    if path.is_file():
        return ModelInfo(model_id, path, "file", None, {})
    if (path / "model_index.json").exists():
        index = json.loads((path / "model_index.json").read_text())
        return ModelInfo(model_id, path, "pipeline", families.for_pipeline(index.get("_class_name", "")), index)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    kinds = {"AutoencoderKL": "vae", "ControlNetModel": "controlnet", "UNet2DConditionModel": "unet"}
    return ModelInfo(model_id, path, kinds.get(config.get("_class_name", ""), "component"), None, config)
