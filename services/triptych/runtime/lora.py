"""LoRA adapters on our own loaded components, through diffusers' loaders (kohya, diffusers and peft files).

The encoder applies a LoRA's text-encoder half and the denoiser its UNet half; both call `LoraAdapters.activate`
with the request's list. Files are normalised by diffusers' `lora_state_dict` (its converters, not our key
parsing), injected with `load_lora_into_unet` / `load_lora_into_text_encoder`, and weighted with the same
`set_adapters` calls `pipe.set_adapters(names, weights)` makes, so results equal diffusers'. Injected
adapters stay in the module (LRU, bounded): a repeated LoRA set reads nothing from disk; a request without
LoRAs disables the layers, which then compute the base weights alone.

`MergedLoras` (the denoiser with TRIPTYCH_LORA_MODE=merged, the default under TRIPTYCH_COMPILE) adds the active
set's deltas into the UNet's own weights instead, with peft's `merge` as diffusers' `fuse_lora` does, and restores
the touched weights from exact copies before the next set. The module's structure never changes, so a compiled
UNet is never recompiled for a LoRA switch, and no step pays for LoRA matmuls (ComfyUI patches weights the same way).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.peft_utils import delete_adapter_layers, set_adapter_layers
from peft.tuners.lora import LoraLayer

from triptych.families import Family
from triptych.model_store import ModelStore
from triptych.serving.errors import InvalidArgument, ModelLoadFailed

log = logging.getLogger("triptych")


def adapter_name(model_id: str, path: Path) -> str:
    """A peft-safe adapter name, unique per model id and file identity (mtime, size): a file replaced in place
    gets a new name, so it is read and injected afresh (the old adapter ages out of the LRU like any other)."""
    stat = path.stat()
    digest = hashlib.sha1(f"{model_id}\0{stat.st_mtime_ns}\0{stat.st_size}".encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_]", "_", model_id) + "_" + digest


def resolve_lora(store: ModelStore, model_id: str, field: str) -> Path:
    """The .safetensors file a LoRA id names. A file that does not read is INVALID_ARGUMENT on its field (it may be
    damaged or in a format we do not read, docs/security.md), not the store's FAILED_PRECONDITION."""
    try:
        info = store.resolve(model_id, field)
    except ModelLoadFailed as exc:
        raise InvalidArgument.one(
            field, f"cannot read LoRA {model_id!r}: the file is damaged or not a LoRA in a format diffusers reads"
        ) from exc
    if info.kind != "file" or info.path.suffix != ".safetensors":
        raise InvalidArgument.one(field, f"{model_id!r} is not a .safetensors LoRA file ({info.what})")
    return info.path


class LoraAdapters:
    """Loads, caches and activates LoRA adapters on the components of one service."""

    def __init__(self, store: ModelStore, max_bytes: int):
        self.store = store
        self.max_bytes = max_bytes
        self.disk_reads = 0
        self.evictions = 0

    def activate(self, family: Family, modules: dict[str, torch.nn.Module], loras, field: str = "loras") -> None:
        """Makes exactly `loras` ((model id, weight), ...) active on `modules` ({"unet": unet} or text encoders).

        Callers hold the model's lock: adapters are per-module state shared by every request on that model.
        """
        wanted = self._wanted(loras, field)
        for name, path, _, field_name in wanted:
            missing = [(c, m) for c, m in modules.items() if name not in _injected(m)]
            if missing:
                had = self._inject(family, missing, name, path, field_name)
                for (_, module), has_weights in zip(missing, had, strict=True):
                    _injected(module)[name] = _adapter_bytes(module, name) if has_weights else 0
            for module in modules.values():
                _injected(module).move_to_end(name)
        for module in modules.values():
            active = [(name, weight) for name, _, weight, _ in wanted if _injected(module)[name] > 0]
            self._set(module, active)
            self._evict(module, {name for name, *_ in wanted})

    def _wanted(self, loras, field: str) -> list[tuple[str, object, float, str]]:
        """(adapter name, file path, weight, field) per requested LoRA, each resolved in the model store."""
        wanted = []
        for i, (model_id, weight) in enumerate(loras):
            path = resolve_lora(self.store, model_id, f"{field}[{i}].model")
            wanted.append((adapter_name(model_id, path), path, weight, f"{field}[{i}].model"))
        return wanted

    def _inject(self, family: Family, targets, name: str, path, field_name: str) -> list[bool]:
        """Reads one LoRA file and injects it as adapter `name` into each (component, module) of targets; says
        per target whether the file had weights for it."""
        try:
            state_dict, alphas, metadata = family.read_lora(path)
        except (ValueError, KeyError, OSError) as exc:  # the cause's text names server paths: logged, not sent
            model = path.relative_to(self.store.root).with_suffix("").as_posix()  # the id, never the server path
            log.warning("LoRA %r cannot be read: %s: %s", model, type(exc).__name__, exc)
            raise InvalidArgument.one(
                field_name,
                f"cannot read LoRA {model!r} ({type(exc).__name__}): the file is damaged or not a LoRA in a "
                "format diffusers reads (the service log has the details)",
            ) from exc
        # As diffusers' load_lora_weights ("Invalid LoRA checkpoint"): a model's weights file is not a LoRA.
        if not state_dict or not all("lora" in key for key in state_dict):
            raise InvalidArgument.one(field_name, f"{path.name} is not a LoRA (its keys are not LoRA weights)")
        # A file for another family's networks would load into nothing here, silently: refuse it by name.
        known = {family.denoiser_folder, *(slot.encoder for slot in family.text_encoders)}
        foreign = sorted({key.split(".", 1)[0] for key in state_dict} - known)
        if foreign:
            raise InvalidArgument.one(
                field_name,
                f"{path.name} is a LoRA for another model family (it has {', '.join(foreign)} weights; "
                f"{family.name} models have {', '.join(sorted(known))})",
            )
        self.disk_reads += 1
        injected = []
        for component, module in targets:
            prefix = f"{component}."
            has_weights = any(key.startswith(prefix) for key in state_dict)
            try:  # diffusers removes a half-injected adapter itself before it re-raises
                if has_weights:
                    family.inject_lora(component, module, state_dict, alphas, name, metadata)
            except (RuntimeError, ValueError, KeyError) as exc:  # shapes of another model family
                why = str(exc).splitlines()[0]
                raise InvalidArgument.one(
                    field_name, f"{path.name} does not fit this model's {component}: {why}"
                ) from exc
            injected.append(has_weights)
        return injected

    @staticmethod
    def _set(module: torch.nn.Module, active: list[tuple[str, float]]) -> None:
        if not getattr(module, "peft_config", None):
            return  # never had an adapter: nothing to switch off
        if not active:
            set_adapter_layers(module, enabled=False)
            return
        set_adapter_layers(module, enabled=True)
        names, weights = [n for n, _ in active], [w for _, w in active]
        if isinstance(module, ModelMixin):
            module.set_adapters(names, weights)
        else:
            set_adapters_for_text_encoder(names, module, weights)

    def _evict(self, module: torch.nn.Module, keep: set[str]) -> None:
        """Deletes least recently used adapters while the module's adapters exceed max_bytes (never one the
        current request uses, so a single oversized set still runs)."""
        record = _injected(module)
        for name in list(record):
            if sum(record.values()) <= self.max_bytes:
                break
            if name in keep:
                continue
            if record.pop(name):
                if isinstance(module, ModelMixin):
                    module.delete_adapters(name)
                else:
                    delete_adapter_layers(module, name)
            self.evictions += 1


class MergedLoras(LoraAdapters):
    """LoRAs merged into the weights of one module (the UNet). Each file is injected once by diffusers' loader,
    its peft layers are detached from the module (which gets its own layers back, `unload_lora`), and kept
    (LRU, bounded by max_bytes). Activating a set restores every weight a previous set changed from its copy,
    then merges the set in request order, each layer scaled as `set_adapters(names, weights)` scales it. So
    the weights equal diffusers' `set_adapters(...)` + `fuse_lora(adapter_names=...)` bit for bit, and a set
    that is already active costs nothing.
    """

    def activate(self, family: Family, modules: dict[str, torch.nn.Module], loras, field: str = "loras") -> None:
        ((component, module),) = modules.items()
        wanted = self._wanted(loras, field)
        state = _merge_state(module)
        for name, path, _, field_name in wanted:
            if name not in state.layers:
                self._detach(family, component, module, name, path, field_name, state)
            state.layers.move_to_end(name)
        applied = tuple((name, weight) for name, _, weight, _ in wanted)
        if applied != state.applied:
            state.applied = None  # until the merge below completes: the next call restores first
            self._merge(state, applied)
            state.applied = applied
        keep = {name for name, *_ in wanted}
        for name in list(state.layers):
            if sum(state.bytes.values()) <= self.max_bytes:
                break
            if name not in keep:
                del state.layers[name], state.bytes[name]
                self.evictions += 1

    def _detach(self, family, component, module, name, path, field_name, state: _MergeState) -> None:
        try:
            self._inject(family, [(component, module)], name, path, field_name)
            layers = [m for m in module.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
        finally:
            # Every peft layer out, whatever happened (a file of another family fails half-way): the module's
            # own layers are back and its graph is unchanged.
            module.unload_lora()
        if any(name in layer.lora_variant or layer.lora_bias[name] for layer in layers):
            raise InvalidArgument.one(field_name, f"{path.name}: DoRA and LoRA biases are not supported merged")
        state.layers[name] = layers
        state.bytes[name] = sum(
            p.numel() * p.element_size()
            for layer in layers
            for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters())
        )

    @staticmethod
    @torch.no_grad()
    def _merge(state: _MergeState, applied: tuple[tuple[str, float], ...]) -> None:
        for base, weight in state.backups.items():
            base.weight.copy_(weight)  # in place: a compiled graph (or CUDA graph) keeps reading this storage
        touched = set()
        for name, scale in applied:
            for layer in state.layers[name]:
                base = layer.get_base_layer()
                if base not in state.backups:  # recorded before the weight changes, so a failure restores it
                    state.backups[base] = base.weight.detach().clone()
                touched.add(base)
                layer.set_scale(name, scale)
                layer.merge(adapter_names=[name])  # peft's own delta (conv and linear) added into base.weight
                layer.merged_adapters.clear()
        for base in [b for b in state.backups if b not in touched]:
            del state.backups[base]  # copies of weights the new set leaves alone


class _MergeState:
    """What MergedLoras keeps per module: detached peft layers per adapter (LRU), their bytes, the original of
    every weight the active set changed, and the active set itself."""

    def __init__(self):
        self.layers: OrderedDict[str, list[LoraLayer]] = OrderedDict()
        self.bytes: dict[str, int] = {}
        self.backups: dict[torch.nn.Module, torch.Tensor] = {}
        self.applied: tuple[tuple[str, float], ...] | None = ()


def _merge_state(module: torch.nn.Module) -> _MergeState:
    state = module.__dict__.get("_triptych_merged")
    if state is None:
        state = module.__dict__["_triptych_merged"] = _MergeState()
    return state


def _adapter_bytes(module: torch.nn.Module, name: str) -> int:
    """Bytes of one adapter's weights in a module (peft names them `...lora_A.<adapter>.weight`)."""
    marker = f".{name}."
    return sum(p.numel() * p.element_size() for key, p in module.named_parameters() if marker in key)


def _injected(module: torch.nn.Module) -> OrderedDict[str, int]:
    """Adapters injected into this module (name -> bytes of its weights here, 0 if the file had none), in LRU
    order. Kept on the module itself so the record lives and dies with the weights it describes."""
    record = module.__dict__.get("_triptych_loras")
    if record is None:
        record = module.__dict__["_triptych_loras"] = OrderedDict()
    return record
