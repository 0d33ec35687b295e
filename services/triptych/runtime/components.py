"""Loaded model components, cached per (model id, component) with an LRU bound, and reported on request."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from triptych.serving.errors import ModelLoadFailed, TriptychError, is_out_of_memory

log = logging.getLogger("triptych")


@dataclass(frozen=True)
class LoadedComponent:
    """One component held in memory, as GetRuntimeInfo reports it."""

    model: str
    component: str
    class_name: str
    parameter_bytes: int


@dataclass
class LoadedModel:
    """A model's components held in memory (by name: "unet", "text_encoder", "tokenizer", ...), the configs read
    with them, and the lock that serialises requests which change per-model state (LoRA adapters)."""

    components: dict[str, Any]
    configs: dict[str, dict] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __getitem__(self, name: str) -> Any:
        return self.components[name]


def _bytes_of(obj: Any) -> int:
    if hasattr(obj, "parameters") and hasattr(obj, "buffers"):
        return sum(t.numel() * t.element_size() for t in (*obj.parameters(), *obj.buffers()))
    return 0


def _load_or_explain(key: str, load: Callable[[], LoadedModel]) -> LoadedModel:
    """Runs a load; a model whose files do not load becomes ModelLoadFailed naming it (not INTERNAL).

    Typed errors pass through, and so does running out of memory (RESOURCE_EXHAUSTED, a different remedy).
    """
    try:
        return load()
    except TriptychError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise ModelLoadFailed(key, exc) from exc  # which logs the cause


class ComponentCache:
    """Holds models (each a LoadedModel) for a service, evicting the least recently used.

    Loading happens outside the global lock, under a per-model lock, so one slow load does not block
    requests for models already in memory.
    """

    def __init__(self, max_models: int):
        self._max_models = max(1, max_models)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, key: str, load: Callable[[], LoadedModel]) -> LoadedModel:
        """The loaded model `key`, loading it with `load()` on a miss."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            loaded = _load_or_explain(key, load)
            with self._lock:
                self._models[key] = loaded
                while len(self._models) > self._max_models:
                    self._models.popitem(last=False)
                self._loading.pop(key, None)
            return loaded

    def loaded(self) -> list[LoadedComponent]:
        """What is in memory now."""
        with self._lock:
            snapshot = [(key, dict(loaded.components)) for key, loaded in self._models.items()]
        return [
            LoadedComponent(key, name, type(obj).__name__, _bytes_of(obj))
            for key, parts in snapshot
            for name, obj in parts.items()
            if obj is not None
        ]
