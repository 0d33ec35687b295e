"""`triptych models inspect ID`: what a model in the store is, which role loads which of its parts, how large each
part is. Read from config files and safetensors headers only: inspecting loads no weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from triptych.model_store import ModelInfo

ROLE_OF_KIND = {"vae": "decoder", "controlnet": "denoiser", "unet": "denoiser"}


@dataclass(frozen=True)
class Part:
    """One component (or file) of a model: which role loads it, its class, and its tensors' size."""

    role: str
    name: str
    class_name: str
    parameters: int
    dtypes: tuple[str, ...]
    disk_bytes: int


def _tensors(files: list[Path]) -> tuple[int, set[str], set[str]]:
    """(parameter count, dtypes, key prefixes) over safetensors files, from their headers."""
    count, dtypes, prefixes = 0, set(), set()
    for path in files:
        with safe_open(str(path), "np") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                tensor = handle.get_slice(key)
                count += math.prod(tensor.get_shape())
                dtypes.add(str(tensor.get_dtype()))
                prefixes.add(key.split(".", 1)[0])
    return count, dtypes, prefixes


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parts(info: ModelInfo) -> list[Part]:
    """Every part of a model with the role that loads it ("-" for a part no service loads)."""
    if info.kind == "pipeline":
        roles = {}
        if info.family is not None:
            for slot in info.family.text_encoders:
                roles[slot.tokenizer] = roles[slot.encoder] = "encoder"
            roles[info.family.denoiser_folder] = "denoiser"
            roles["scheduler"] = "denoiser"
            roles["vae"] = "decoder"
        found = []
        for name, entry in sorted(info.index.items()):
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
                continue
            folder = info.path / name
            count, dtypes, _ = _tensors(sorted(folder.glob("*.safetensors"))) if folder.is_dir() else (0, set(), set())
            disk = _size(folder) if folder.exists() else 0
            found.append(Part(roles.get(name, "-"), name, entry[1], count, tuple(sorted(dtypes)), disk))
        return found
    if info.kind == "file":
        count, dtypes, prefixes = _tensors([info.path])
        return [
            Part("-", info.path.name, _file_kind(info.path, prefixes), count, tuple(sorted(dtypes)), _size(info.path))
        ]
    count, dtypes, _ = _tensors(sorted(info.path.glob("*.safetensors")))
    class_name = info.index.get("_class_name", info.kind)
    return [
        Part(
            ROLE_OF_KIND.get(info.kind, "-"), info.path.name, class_name, count, tuple(sorted(dtypes)), _size(info.path)
        )
    ]


def _file_kind(path: Path, prefixes: set[str]) -> str:
    with safe_open(str(path), "np") as handle:
        keys = list(handle.keys())
    if keys and all("lora" in key.lower() or key.endswith(".alpha") for key in keys):
        return "LoRA"
    if set(keys) <= {"emb_params", "clip_l", "clip_g", "string_to_param"} or len(keys) == 1:
        return "textual-inversion embedding"
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return "single-file checkpoint (not served yet: convert it to a diffusers folder)"
    return "safetensors file (" + ", ".join(sorted(prefixes)[:4]) + ")"


def describe(info: ModelInfo) -> str:
    """The inspection as text: a header line, then a line per part."""
    found = parts(info)
    kind = info.family_name + " " + info.kind if info.family is not None else info.kind
    lines = [f"{info.model_id}: {kind}, {sum(p.disk_bytes for p in found) / 1e6:.1f} MB on disk"]
    if info.kind == "pipeline":
        lines[0] += f" ({info.index.get('_class_name', '?')})"
    lines.append(f"  {'role':9s} {'component':16s} {'class':34s} {'parameters':>12s}  dtypes")
    for part in found:
        lines.append(
            f"  {part.role:9s} {part.name:16s} {part.class_name[:34]:34s} {part.parameters:>12,d}  "
            + (", ".join(part.dtypes) or "-")
        )
    return "\n".join(lines)
