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


def _tensors(files: list[Path], prefix: str = "") -> tuple[int, set[str], int]:
    """(parameter count, dtypes, bytes) of the tensors under `prefix` in safetensors files, from their headers."""
    count, dtypes, size = 0, set(), 0
    widths = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    for path in files:
        with safe_open(str(path), "np") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                if not key.startswith(prefix):
                    continue
                tensor = handle.get_slice(key)
                numel = math.prod(tensor.get_shape())
                count += numel
                dtypes.add(str(tensor.get_dtype()))
                size += numel * widths.get(str(tensor.get_dtype()).upper(), 1)
    return count, dtypes, size


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
            if info.weights is not None and info.weights.holds(name):  # in the file, under its prefix
                count, dtypes, disk = _tensors([info.weights.path], info.weights.prefix(name)[0])
            elif info.weights is not None and info.weights.transformer is None:  # a checkpoint's configs
                count, dtypes, disk = 0, set(), 0
            else:
                count, dtypes, _ = _tensors(sorted(folder.glob("*.safetensors"))) if folder.is_dir() else (0, set(), 0)
                disk = _size(folder) if folder.exists() else 0
            found.append(Part(roles.get(name, "-"), name, entry[1], count, tuple(sorted(dtypes)), disk))
        return found
    if info.path.is_file():
        count, dtypes, _ = _tensors([info.path]) if info.path.suffix == ".safetensors" else (0, set(), 0)
        role = "decoder" if info.kind == "vae" else "-"
        return [Part(role, info.path.name, info.what, count, tuple(sorted(dtypes)), _size(info.path))]
    count, dtypes, _ = _tensors(sorted(info.path.glob("*.safetensors")))
    class_name = info.index.get("_class_name", info.kind)
    return [
        Part(
            ROLE_OF_KIND.get(info.kind, "-"), info.path.name, class_name, count, tuple(sorted(dtypes)), _size(info.path)
        )
    ]


def describe(info: ModelInfo) -> str:
    """The inspection as text: a header line, then a line per part."""
    found = parts(info)
    kind = info.family_name + " " + info.kind if info.family is not None else info.kind
    lines = [f"{info.model_id}: {kind}, {sum(p.disk_bytes for p in found) / 1e6:.1f} MB on disk"]
    if info.kind == "pipeline":
        lines[0] += f" ({info.index.get('_class_name', '?')})"
    if info.weights is not None and info.kind == "pipeline":
        lines[0] += f"; {info.note}, {info.weights.path.stat().st_size / 1e6:.1f} MB file"
    lines.append(f"  {'role':9s} {'component':16s} {'class':34s} {'parameters':>12s}  dtypes")
    for part in found:
        lines.append(
            f"  {part.role:9s} {part.name:16s} {part.class_name[:34]:34s} {part.parameters:>12,d}  "
            + (", ".join(part.dtypes) or "-")
        )
    return "\n".join(lines)
