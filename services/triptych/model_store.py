"""The model store: a directory of diffusers folders and .safetensors files, addressed by model id.

Ids are paths relative to the root ("tiny/sd15", "tiny/lora-sd15-kohya" for tiny/lora-sd15-kohya.safetensors)
or Runware/AIR-style "source:id@version", which maps to <root>/<source>/<id>/<version>(.safetensors). Nothing is
fetched from a network, and an id that resolves outside the root (.., absolute paths, symlinks out) is refused.
A single-file checkpoint (checkpoint.py) is a pipeline like a folder: its `path` is the folder of configs it is
served with, its `weights` the file. An SD3/FLUX transformer file (transformer_files.py) is a pipeline too: its
`path` is its base, the diffusers folder of the same architecture in the store (`base_models`), which gives the
text encoders, tokenizers, scheduler, configs and (unless the file has its own) the VAE.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors import SafetensorError

from triptych import checkpoint, families, transformer_files
from triptych.checkpoint import Checkpoint
from triptych.families import Family
from triptych.serving.errors import InvalidArgument, ModelLoadFailed, NotFound

_AIR = re.compile(r"^(?P<source>[A-Za-z0-9_.-]+):(?P<id>[A-Za-z0-9_.-]+)@(?P<version>[A-Za-z0-9_.-]+)$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.@:+-]+(/[A-Za-z0-9_.@:+-]+)*$")


FILE_MODE, DIR_MODE = 0o644, 0o755


def readable_by_all(root: Path) -> None:
    """Sets ``root`` and everything under it to 0644 files and 0755 folders. Model files are read by service processes
    that may run as another user (a container's), and ``save_pretrained`` writes its safetensors 0600."""
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


@dataclass(frozen=True)
class ModelInfo:
    """What a model id points at."""

    model_id: str
    path: Path
    # "pipeline", "vae", "controlnet", "unet", "component", "checkpoint" (one we cannot serve), "file", or
    # "transformer" (an SD3/FLUX transformer file before its base is found: ModelStore never returns it)
    kind: str
    family: Family | None  # for a pipeline of a family we serve, else None
    index: dict  # model_index.json (pipelines) or config.json (single components); {} for files
    weights: Checkpoint | None = None  # the single file whose tensors the components are (None: a folder's own)
    note: str = ""  # what a file is, when that is not what its kind says (shown in errors and listings)

    @property
    def what(self) -> str:
        """What the model is, for an error message: "a pipeline", "a LoRA file", "a sd21 checkpoint", ..."""
        return self.note or f"a {self.kind}"

    def flag(self, name: str, default=None):
        """A flag registered in model_index.json, e.g. force_zeros_for_empty_prompt."""
        return self.index.get(name, default)

    def cache_id(self, component: str) -> str:
        """The id a loaded component is cached (and held) under: a transformer file's text encoders and, unless it
        has its own, VAE are its base's, so a fine-tune and its base share one copy of them."""
        if self.weights is not None and self.weights.base and not self.weights.holds(component):
            return self.weights.base
        return self.model_id

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

    def __init__(self, root: Path, base_models: dict[str, str] | None = None):
        self.root = Path(root).resolve()
        # architecture -> store id of the folder its transformer files are served with (transformer_files.py)
        self.base_models = {**transformer_files.DEFAULT_BASES, **(base_models or {})}

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
        """Finds a model (the id as is, else with one of `suffixes`); NOT_FOUND naming the id if absent, and
        INVALID_ARGUMENT when only a pickle (.ckpt, .pt, ...) of that name is there."""
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
                info = _describe(model_id, real)
            except (OSError, ValueError, SafetensorError) as exc:  # a config that does not parse, a truncated file
                raise ModelLoadFailed(model_id, exc) from exc
            return self._with_base(info, field) if info.kind == "transformer" else info
        for suffix in checkpoint.PICKLE_SUFFIXES:
            if candidate.with_name(candidate.name + suffix).is_file():
                raise InvalidArgument.one(field, f"{model_id!r} is {_PICKLE}")
        raise NotFound(field, f"model {model_id!r} is not in the model store")  # never the server's path

    def _with_base(self, info: ModelInfo, field: str) -> ModelInfo:
        """A transformer file served with its base folder; NOT_FOUND naming the base when the store lacks it, and
        a "checkpoint" we cannot serve when the base is no folder of the file's family or of another structure."""
        file = info.weights
        base_id = self.base_models[file.architecture]  # every architecture has one (DEFAULT_BASES)
        what = f"{_article(file.architecture)} {file.architecture} transformer file"
        if base_id == info.model_id:
            return replace(info, kind="checkpoint", note=f"{what} named as its own base ({file.architecture})")
        try:
            base = self.resolve(base_id, field)
        except NotFound as exc:
            raise NotFound(
                field,
                f"model {info.model_id!r} is {what}, served with the text encoders and VAE of its base "
                f"{base_id!r}, which is not in the model store (base_models names each architecture's base)",
            ) from exc
        family = transformer_files.FAMILY_OF[file.architecture]
        if not base.is_text_to_image or base.weights is not None or base.family.name != family:
            note = f"{what}; its base {base_id!r} is not a {family} diffusers folder (it is {base.what})"
            return replace(info, kind="checkpoint", note=note)
        config = json.loads((base.path / base.family.denoiser_folder / "config.json").read_text())
        differs = transformer_files.mismatch(file.transformer, config)
        if differs:
            note = f"{what} of another structure than its base {base_id!r}: {differs}"
            return replace(info, kind="checkpoint", note=note)
        note = f"{what}, served with the text encoders and VAE of {base_id!r}"
        if file.vae_prefix is not None:
            note = f"{what} with its VAE, served with the text encoders of {base_id!r}"
        if file.transformer.has_text_encoders:
            note += " (the text encoders in the file are not read)"
        return replace(base, model_id=info.model_id, weights=replace(file, base=base_id), note=note)

    def _listed(self, info: ModelInfo) -> ModelInfo:
        """`info` as a listing shows it: a transformer file with its base, or noted as not served without one."""
        if info.kind != "transformer":
            return info
        try:
            return self._with_base(info, "model")
        except NotFound:
            base = self.base_models[info.weights.architecture]
            return replace(info, kind="checkpoint", note=f"{info.what}; its base {base!r} is not in the store")

    def place(self, file: Path, model_id: str, replace: bool = False) -> ModelInfo:
        """Copies a .safetensors file into the store under `model_id` (an AIR id names <source>/<id>/<version>),
        as is: a checkpoint, VAE, LoRA or embedding serves from the one file. It is checked first (a pickle, a
        damaged file or a checkpoint of an architecture we do not serve is refused, INVALID_ARGUMENT saying why),
        copied beside its place and renamed into it, so a service never reads half a file."""
        file = Path(file)
        if file.suffix != ".safetensors":
            raise InvalidArgument.one(
                "file", _PICKLE if file.suffix in checkpoint.PICKLE_SUFFIXES else "not a .safetensors file"
            )
        try:
            info = _describe_file(model_id, file.resolve(), file.stat().st_mtime_ns, file.stat().st_size)
        except (OSError, ValueError, SafetensorError) as exc:
            raise InvalidArgument.one(
                "file", f"does not read as .safetensors ({type(exc).__name__}: damaged or truncated)"
            ) from exc
        if info.kind == "checkpoint":
            raise InvalidArgument.one("file", info.what)
        target = self.path_for(model_id, "id")
        target = target if target.suffix == ".safetensors" else target.with_name(target.name + ".safetensors")
        if (target.exists() or target.with_suffix("").exists()) and not replace:
            raise InvalidArgument.one("id", f"{model_id!r} is in the store already (replace it explicitly)")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(file, partial)
        partial.replace(target)
        return self._listed(_describe(model_id, target.resolve()))

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
                try:
                    found.append(self._listed(_describe(rel.with_suffix("").as_posix(), marker)))
                except (OSError, ValueError, SafetensorError) as exc:
                    note = f"a damaged .safetensors file ({type(exc).__name__})"
                    found.append(ModelInfo(rel.with_suffix("").as_posix(), marker, "file", None, {}, note=note))
        return found


_PICKLE = (
    "a pickle file (.ckpt/.pt/.bin): models are read only from .safetensors, since loading a pickle can run code "
    "(textual-inversion .pt embeddings excepted: torch.load(weights_only=True)); convert it where you trust it"
)


def _article(word: str) -> str:
    return "an" if word.startswith("sd") else "a"  # "an sd3", "a flux-dev"


def _describe(model_id: str, path: Path) -> ModelInfo:
    if path.is_file():
        return _describe_file(model_id, path, path.stat().st_mtime_ns, path.stat().st_size)
    if (path / "model_index.json").exists():
        index = json.loads((path / "model_index.json").read_text())
        return ModelInfo(model_id, path, "pipeline", families.for_pipeline(index.get("_class_name", "")), index)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    kinds = {
        "AutoencoderKL": "vae",
        "ControlNetModel": "controlnet",
        "FluxControlNetModel": "controlnet",
        "SD3ControlNetModel": "controlnet",
        "UNet2DConditionModel": "unet",
    }
    return ModelInfo(model_id, path, kinds.get(config.get("_class_name", ""), "component"), None, config)


@functools.lru_cache(maxsize=1024)
def _describe_file(model_id: str, path: Path, mtime_ns: int, size: int) -> ModelInfo:
    """A file in the store, its header read once per (path, mtime, size): a replaced file is read again."""
    if path.suffix in checkpoint.PICKLE_SUFFIXES:
        return ModelInfo(model_id, path, "file", None, {}, note=_PICKLE)
    if path.suffix != ".safetensors":
        return ModelInfo(model_id, path, "file", None, {})
    header = checkpoint.read_header(path)
    try:
        transformer = checkpoint.transformer_file(path, header)
    except checkpoint.Unservable as exc:
        return ModelInfo(model_id, path, "checkpoint", None, {}, note=f"a single file: {exc}")
    if transformer is not None:
        note = f"{_article(transformer.architecture)} {transformer.architecture} transformer file"
        return ModelInfo(model_id, path, "transformer", None, {}, weights=transformer, note=note)
    if checkpoint.is_pipeline_checkpoint(header):
        try:
            found = checkpoint.detect(path, header)
        except checkpoint.Unservable as exc:
            return ModelInfo(model_id, path, "checkpoint", None, {}, note=f"a single-file checkpoint: {exc}")
        folder = checkpoint.configs_folder(found)
        index = json.loads((folder / "model_index.json").read_text())
        family = families.for_pipeline(index.get("_class_name", ""))
        described = "with its configs in its metadata" if found.embedded_configs else f"of {found.architecture}"
        note = f"a single-file checkpoint {described}"
        return ModelInfo(model_id, folder, "pipeline", family, index, weights=found, note=note)
    vae = checkpoint.vae_file(path, header)
    if vae is not None:
        return ModelInfo(model_id, path, "vae", None, {}, weights=vae, note="a VAE file")
    return ModelInfo(model_id, path, "file", None, {}, note=checkpoint.file_kind(header))
