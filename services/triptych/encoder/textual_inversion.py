"""Textual inversion without mutating the tokenizer or the text encoder.

An embedding's token is its file's stem (as A1111). Where the token occurs in a prompt its vectors take its
place; absent, it is appended ("prompt + ' ' + token"). The prompt is tokenized around the token (in 75-token
chunks, encoder/chunks.py), the token's positions get a placeholder id, and a forward hook on the encoder's
token-embedding layer writes the vectors there, row by row of a batch: the same numbers diffusers'
load_textual_inversion gets by adding vocabulary rows, with no state left behind for the next request.
Emphasis (weight) follows A1111: scale the encoder output at those positions, then restore the output's
original mean.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from triptych.model_store import ModelStore
from triptych.serving.errors import InvalidArgument, ModelLoadFailed

PLACEHOLDER_ID = 0  # an ordinary token id: never BOS/EOS, so pooling and padding are unaffected


@dataclass(frozen=True)
class Embedding:
    """One embedding file: its token, its vectors [n, dim] per text encoder component, and the file's identity
    (resolved path, mtime in ns, size), which keys every cache of results computed from it."""

    token: str
    vectors: dict[str, torch.Tensor]
    identity: tuple[str, int, int] = ("", 0, 0)


def _parse(path: Path, field: str) -> dict[str, torch.Tensor]:
    """The vectors per encoder component, from any supported file layout."""
    if path.suffix == ".safetensors":
        data = load_file(str(path))
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a plain tensor file"
            raise InvalidArgument.one(
                field, f"{path.name} does not load with torch.load(weights_only=True); convert it to .safetensors"
            ) from exc
    if not isinstance(data, dict):
        raise InvalidArgument.one(field, f"{path.name} is not a textual-inversion file")
    if "clip_l" in data or "clip_g" in data:  # SDXL
        vectors = {"text_encoder": data.get("clip_l"), "text_encoder_2": data.get("clip_g")}
        return {k: v for k, v in vectors.items() if v is not None}
    if "emb_params" in data:  # A1111 safetensors
        tensor = data["emb_params"]
    elif "string_to_param" in data:  # A1111 .pt
        tensor = next(iter(data["string_to_param"].values()))
    elif len(data) == 1:  # diffusers {token: tensor}
        tensor = next(iter(data.values()))
    else:
        raise InvalidArgument.one(field, f"{path.name}: unknown textual-inversion layout (keys {sorted(data)[:5]})")
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument.one(field, f"{path.name}: the embedding is not a tensor")
    return {"text_encoder": tensor}


class EmbeddingFiles:
    """Reads embedding files from the store, caching the parsed vectors (bounded LRU)."""

    def __init__(self, store: ModelStore, max_files: int = 64):
        self.store = store
        self.max_files = max_files
        self._cache: OrderedDict[tuple[str, int, int], Embedding] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str, field: str) -> Embedding:
        info = self.store.resolve(model_id, field, suffixes=(".safetensors", ".pt", ".bin"))
        if info.kind != "file":
            raise InvalidArgument.one(field, f"{model_id!r} is not an embedding file")
        stat = info.path.stat()
        key = (str(info.path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            parsed = _parse(info.path, field)
        except (OSError, ValueError, SafetensorError) as exc:  # a damaged file: the store needs fixing
            raise ModelLoadFailed(model_id, exc) from exc
        vectors = {
            name: (t if t.ndim == 2 else t.reshape(-1, t.shape[-1])).to(torch.float32).contiguous()
            for name, t in parsed.items()
        }
        embedding = Embedding(info.path.stem, vectors, key)
        with self._lock:
            self._cache[key] = embedding
            while len(self._cache) > self.max_files:
                self._cache.popitem(last=False)
        return embedding


@contextlib.contextmanager
def substituted(text_encoder, substitutions: list[tuple[int, int, torch.Tensor]]):
    """Writes each (row, position, vector) into the token-embedding output for one forward pass (caller holds
    the model lock)."""
    if not substitutions:
        yield
        return
    layer = text_encoder.get_input_embeddings()
    expected = layer.embedding_dim

    def hook(module, inputs, output):
        output = output.clone()
        for row, position, vector in substitutions:
            output[row, position] = vector.to(device=output.device, dtype=output.dtype)
        return output

    for _, _, vector in substitutions:
        if vector.shape[-1] != expected:
            raise InvalidArgument.one(
                "embeddings", f"embedding width {vector.shape[-1]} does not fit this text encoder ({expected})"
            )
    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def emphasise(hidden: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """A1111 emphasis: scale the output at each position, then restore the tensor's original mean."""
    if bool((multipliers == 1).all()):
        return hidden
    original_mean = hidden.mean()
    scaled = hidden * multipliers.reshape(1, -1, 1).to(device=hidden.device, dtype=hidden.dtype)
    return scaled * (original_mean / scaled.mean())
