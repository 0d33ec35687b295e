"""Single-file checkpoints (one .safetensors of a whole SD1.x/SD2.x/SDXL pipeline, the original LDM key layout as
civitai serves them) and standalone VAE files, served like the diffusers folders they came from.

Nothing is fetched. A checkpoint's architecture is read from its tensor names and shapes (the keys diffusers'
`infer_diffusers_model_type` looks at), and the configs it is served with are those of the real architecture
(`model_builders/full_size.py`, written without weights into a folder of this process's own) — or, when the file
carries them in its metadata (`triptych.configs`, how `model_builders/ldm.py` exports the tiny family), those.
Each role then reads only its own tensors from the file (safetensors reads a subset), converts their names with
diffusers' own single-file functions, and builds the component without allocating it twice.

Detection reads the file's header only and imports no torch; loading imports torch and diffusers.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from safetensors import safe_open

from triptych import transformer_files

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")  # diffusers' LDM_VAE_KEYS
CONFIGS_METADATA_KEY = "triptych.configs"
# Where each text encoder lives in a checkpoint, per key layout: (prefix, "clip" | "open_clip").
TEXT_ENCODER_PREFIXES = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip"),
    },
    "sdxl-refiner": {"text_encoder_2": ("conditioner.embedders.0.model.", "open_clip")},
}
# Real architectures (model_builders/full_size.py) by diffusers' model type, and their key layouts.
ARCHITECTURES = {"v1": "sd15", "v2": "sd21", "xl_base": "sdxl", "xl_refiner": "sdxl-refiner"}
LAYOUTS = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner"}
# The tensors diffusers' single-file loader tells architectures apart by (single_file_utils.CHECKPOINT_KEY_NAMES).
_KEY_V1 = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
_KEY_V2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_KEY_XL_BASE = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
_KEY_XL_REFINER = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
_KEY_INPAINTING = "model.diffusion_model.input_blocks.0.0.weight"
_KEY_PLAYGROUND = "edm_mean"
_KEY_UPSCALE = "model.diffusion_model.input_blocks.10.0.skip_connection.bias"
_KEY_CONTROLNET = ("control_model.time_embed.0.weight", "controlnet_cond_embedding.conv_in.weight")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class Unservable(ValueError):
    """A file that is a checkpoint (or VAE) of something Triptych does not serve; the message says what."""


@dataclass(frozen=True)
class Checkpoint:
    """A single file served as a pipeline (or a VAE): its file, architecture and key layout, and its configs (a
    JSON string from the file's metadata, or None for the real architecture's). An SD3/FLUX transformer file
    (`transformer` set) holds the transformer and perhaps a VAE; its other parts are its base folder's."""

    path: Path
    # "sd15", "sd21", "sdxl", "sdxl-refiner", "embedded" (configs from the file), "vae" (a standalone VAE file), or
    # a transformer file's diffusers model type ("flux-dev", "flux-schnell", "sd3", "sd35_medium", "sd35_large")
    architecture: str
    # where the text encoders' tensors are: "sd1", "sd2", "sdxl", "sdxl-refiner"; "" for a VAE or transformer file
    layout: str
    embedded_configs: str | None = None
    vae_prefix: str | None = VAE_PREFIXES[0]  # None: the file has no VAE
    transformer: transformer_files.TransformerFile | None = None
    base: str = ""  # the store id of the folder a transformer file's other parts come from

    def holds(self, component: str) -> bool:
        """Whether the file has this component's tensors (else they are the folder's at ModelInfo.path)."""
        if self.transformer is not None:
            return component == "transformer" or (component == "vae" and self.vae_prefix is not None)
        if self.architecture == "vae":
            return component == "vae"
        return component in ("unet", "vae", *TEXT_ENCODER_PREFIXES[self.layout])

    def prefix(self, component: str) -> tuple[str, str]:
        """(key prefix, layout) of a component's tensors in the file: layout "unet", "vae", "clip", "open_clip",
        or a transformer's "flux" / "sd3" (original names) or "diffusers"."""
        if component == "unet":
            return UNET_PREFIX, "unet"
        if component == "vae":
            return self.vae_prefix or "", "vae"
        if component == "transformer" and self.transformer is not None:
            naming = self.transformer.naming
            return self.transformer.prefix, self.transformer.family if naming == "original" else "diffusers"
        return TEXT_ENCODER_PREFIXES[self.layout][component]


@dataclass(frozen=True)
class _Header:
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def read_header(path: Path) -> _Header:
    """The tensors' names and shapes and the metadata of a .safetensors file; reads no tensor data.
    A damaged or truncated file raises SafetensorError (safetensors checks the offsets against the file's size)."""
    with safe_open(str(path), "np") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        return _Header(shapes, handle.metadata() or {})


def model_type(shapes: dict[str, tuple[int, ...]]) -> str:
    """diffusers' model type of a checkpoint, from the same keys and shapes as its `infer_diffusers_model_type`,
    for the types a pipeline checkpoint can have; "v1" when nothing else matches, as there."""
    if _KEY_INPAINTING in shapes and shapes[_KEY_INPAINTING][1] == 9:
        return "inpainting"
    if _KEY_V2 in shapes and shapes[_KEY_V2][-1] == 1024:
        return "v2"
    if _KEY_PLAYGROUND in shapes:
        return "playground-v2-5"
    if _KEY_XL_BASE in shapes:
        return "xl_base"
    if _KEY_XL_REFINER in shapes:
        return "xl_refiner"
    if _KEY_UPSCALE in shapes:
        return "upscale"
    if any(key in shapes for key in _KEY_CONTROLNET):
        return "controlnet"
    return "v1"


def layout_of(model_index: dict, text_config: dict | None) -> str:
    name = model_index.get("_class_name")
    if name == "StableDiffusionXLImg2ImgPipeline":
        return "sdxl-refiner"
    if name == "StableDiffusionXLPipeline":
        return "sdxl"
    if name != "StableDiffusionPipeline":
        raise Unservable(f"its configs name a {name}; single files are served for SD1.x, SD2.x and SDXL")
    # SD2's OpenCLIP encoder uses gelu; OpenAI's CLIP (SD1.x) quick_gelu.
    return "sd2" if (text_config or {}).get("hidden_act") == "gelu" else "sd1"


def transformer_file(path: Path, header: _Header) -> Checkpoint | None:
    """An SD3/FLUX transformer file (transformer_files.py), else None; Unservable for one we do not serve."""
    try:
        found = transformer_files.detect(header.shapes, ("", UNET_PREFIX))  # BFL's files have no prefix
    except ValueError as exc:
        raise Unservable(str(exc)) from exc
    if found is None:
        return None
    vae = next((p for p in VAE_PREFIXES if any(key.startswith(p + "decoder.") for key in header.shapes)), None)
    return Checkpoint(path, found.architecture, "", vae_prefix=vae, transformer=found)


def is_pipeline_checkpoint(header: _Header) -> bool:
    return any(key.startswith(UNET_PREFIX) for key in header.shapes)


def file_kind(header: _Header) -> str:
    """What a .safetensors file that is neither a checkpoint nor a VAE holds, in words."""
    keys = list(header.shapes)
    if keys and all("lora" in key.lower() or key.endswith(".alpha") for key in keys):
        return "a LoRA file"
    if keys and (set(keys) <= {"emb_params", "clip_l", "clip_g", "string_to_param"} or len(keys) == 1):
        return "a textual-inversion embedding"
    prefixes = sorted({key.split(".", 1)[0] for key in keys})
    return "a .safetensors file of " + (", ".join(prefixes[:4]) or "no tensors")


def vae_file(path: Path, header: _Header) -> Checkpoint | None:
    """A standalone VAE file (LDM names, with or without `first_stage_model.`/`vae.`, or diffusers names), else
    None. It holds weights only: it decodes with the scaling of the model it is used with."""
    for prefix in (*VAE_PREFIXES, ""):
        names = [key[len(prefix) :] for key in header.shapes if key.startswith(prefix)]
        parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        if names and all(name.startswith(parts) for name in names) and any(n.startswith("decoder.") for n in names):
            return Checkpoint(path, "vae", "", vae_prefix=prefix)
    return None


def detect(path: Path, header: _Header) -> Checkpoint:
    """What a pipeline checkpoint is; Unservable naming what was found when it is nothing we serve."""
    embedded = header.metadata.get(CONFIGS_METADATA_KEY)
    if embedded is not None:
        try:
            configs = json.loads(embedded)
            layout = layout_of(configs["model_index"], configs.get("text_encoder"))
        except (ValueError, KeyError, TypeError) as exc:
            raise Unservable(f"its {CONFIGS_METADATA_KEY} metadata does not parse ({type(exc).__name__})") from exc
        checkpoint = Checkpoint(path, "embedded", layout, embedded)
    else:
        found = model_type(header.shapes)
        if found not in ARCHITECTURES:
            raise Unservable(f"a {found} checkpoint; single files are served for SD1.x, SD2.x, SDXL and its refiner")
        architecture = ARCHITECTURES[found]
        checkpoint = Checkpoint(path, architecture, LAYOUTS[architecture])
        _check_real_shapes(checkpoint, header.shapes)
    missing = [
        component
        for component in ("unet", "vae", *TEXT_ENCODER_PREFIXES[checkpoint.layout])
        if not any(key.startswith(checkpoint.prefix(component)[0]) for key in header.shapes)
    ]
    if missing:
        raise Unservable(f"a {checkpoint.architecture} checkpoint without its {', '.join(missing)}")
    return checkpoint


def _check_real_shapes(checkpoint: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> None:
    """A file that only looks like a real architecture (a v1 by default) must have its UNet's widths."""
    widths = {"sd15": (320, 768), "sd21": (320, 1024), "sdxl": (320, 2048), "sdxl-refiner": (384, 1280)}
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    cross = next((shape for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    expected = widths[checkpoint.architecture]
    if conv_in is None or cross is None or (conv_in[0], cross[-1]) != expected:
        got = (conv_in[0] if conv_in else None, cross[-1] if cross else None)
        raise Unservable(
            f"a checkpoint of an unknown architecture (UNet and text widths {got}, not "
            f"{checkpoint.architecture}'s {expected}), without {CONFIGS_METADATA_KEY} metadata to describe it"
        )


# ---- the folder of configs a checkpoint is served with ----

_folders: dict[str, Path] = {}
_folders_lock = threading.Lock()


@lru_cache(maxsize=1)
def _scratch() -> Path:
    """This process's folder for configs (removed at exit): the model store may be read-only."""
    path = Path(tempfile.mkdtemp(prefix="triptych-configs-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def configs_folder(checkpoint: Checkpoint) -> Path:
    """A diffusers folder without weights (model_index.json, configs, tokenizers) for the checkpoint, written once
    per architecture (or per embedded configs) and process."""
    key = checkpoint.architecture
    if checkpoint.embedded_configs is not None:
        key = "embedded-" + hashlib.sha256(checkpoint.embedded_configs.encode()).hexdigest()[:16]
    with _folders_lock:
        if key not in _folders:
            out = _scratch() / key
            if checkpoint.embedded_configs is not None:
                _write_embedded(json.loads(checkpoint.embedded_configs), out)
            else:
                from triptych.model_builders.full_size import write_configs

                write_configs(checkpoint.architecture, out)
            _folders[key] = out
        return _folders[key]


def _write_embedded(configs: dict, out: Path) -> None:
    from triptych.model_builders.clip_vocab import write_clip_tokenizer

    out.mkdir(parents=True)
    (out / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2))
    for name, config in configs.items():
        if name == "model_index":
            continue
        (out / name).mkdir()
        if name.startswith("tokenizer"):
            pad = config.get("pad_token", "<|endoftext|>")
            write_clip_tokenizer(out / name, pad_token=pad["content"] if isinstance(pad, dict) else pad)
        else:
            file = "scheduler_config.json" if name == "scheduler" else "config.json"
            (out / name / file).write_text(json.dumps(config, indent=2))


# ---- loading one component's tensors ----


def _read(path: Path, prefixes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    with safe_open(str(path), "pt") as handle:
        keys = [key for key in handle.keys() if key.startswith(prefixes) and not key.startswith(exclude)]  # noqa: SIM118
        return {key: handle.get_tensor(key) for key in keys}


def load_component(model_class, config_folder: Path, weights: Path, prefix: str, layout: str):
    """Component `model_class` built from `config_folder` with the tensors under `prefix` in `weights` (layout
    "unet", "vae" (LDM or diffusers names), "clip" or "open_clip"), in float32 and eval mode. Only those tensors
    are read; the module is built on the meta device and takes them as its parameters."""
    import torch

    model = empty_component(model_class, config_folder)
    others = (*VAE_PREFIXES, "text_encoders.", "cond_stage_model.", "conditioner.") if not prefix else ()
    state = to_diffusers(model, _read(weights, (prefix,), others), prefix, layout)
    state = {key: tensor.to(torch.float32) for key, tensor in state.items()}
    model.load_state_dict(state, strict=False, assign=True)  # (to_diffusers checked that the names are all there)
    return model.eval()


def empty_component(model_class, config_folder: Path):
    """A diffusers or transformers model built from its config with its parameters on the meta device."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if hasattr(model_class, "load_config"):  # diffusers
            return model_class.from_config(model_class.load_config(config_folder))
        return model_class(model_class.config_class.from_pretrained(config_folder))


def to_diffusers(model, tensors: dict, prefix: str, layout: str) -> dict:
    """A component's tensors as read from a checkpoint (names under `prefix`), named as `model` names its
    parameters, by diffusers' own single-file conversions; ValueError unless they are exactly the model's."""
    from diffusers.loaders import single_file_utils as sf

    if layout == "unet":
        state = sf.convert_ldm_unet_checkpoint(tensors, dict(model.config))
    elif layout == "vae" and any(".down_blocks." in key or ".up_blocks." in key for key in tensors):
        state = {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}  # a VAE file in diffusers names
    elif layout == "vae":
        state = sf.convert_ldm_vae_checkpoint(tensors, dict(model.config))
    elif layout == "flux":
        named = {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}
        state = transformer_files.flux_to_diffusers(named, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    elif layout == "sd3":
        state = sf.convert_sd3_transformer_checkpoint_to_diffusers(
            {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}
        )
    elif layout == "diffusers":
        state = {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}
    elif layout == "clip":
        state = sf.convert_ldm_clip_checkpoint(tensors, remove_prefix=prefix)
    else:
        state = sf.convert_open_clip_checkpoint(model, tensors, prefix=prefix)
    if layout in ("clip", "open_clip") and not hasattr(model, "text_model"):
        state = {key.removeprefix("text_model."): tensor for key, tensor in state.items()}  # transformers >= 5.6
    state = {key: tensor for key, tensor in state.items() if not key.endswith("position_ids")}
    expected = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    missing = [key for key in expected if key not in state and key not in buffers]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in state if key in expected and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{type(model).__name__} from {prefix or 'the file'}: {len(missing)} tensors missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}"
        )
    return state


def load(model_class, info, component: str, config_folder: Path | None = None):
    """A model's component, in eval mode: from its diffusers folder (safetensors only), or from the single file the
    model is (`info.weights`) where that file holds it. `config_folder` (default: the model's own folder of the
    component) holds its config, and its weights when the file does not."""
    folder = config_folder or info.path / component
    if info.weights is None or not info.weights.holds(component):
        return model_class.from_pretrained(folder, use_safetensors=True).eval()
    prefix, layout = info.weights.prefix(component)
    return load_component(model_class, folder, info.weights.path, prefix, layout)
