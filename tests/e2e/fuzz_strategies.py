"""Hypothesis strategies for tests/e2e/test_fuzz.py: nasty values per field type, and mutations of valid requests.

A mutation is (dotted field path, value); `apply` writes it into a request. Values that need the live services
(the encoder's conditioning, a real generator state) are tagged tuples that `apply` resolves from the session.
Valid values of the expensive fields (sizes, steps, image counts) are drawn only from cheap ones: invalid values
of every size go through, but what passes validation stays tiny.
"""

from __future__ import annotations

import base64
import io
import math
import string

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from tests.e2e.matrix_rows import TRUNCATED_PNG, png_header_only
from tests.e2e.stubs import GUIDE_PNG
from triptych.client.task import TASK_KEYS
from triptych.rules.scheduler_table import TABLE
from triptych.v1 import common_pb2, tensor_pb2
from triptych.v1.image_service_pb2 import Refiner

NASTY_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 1.5, 4.0, 4.0001, 5.0, 6.0, 10.0, 10.0001, 50.0]
NASTY_FLOATS += [50.0001, 99.9, 100.0, 100.0001, 1e39, 1e308, -1e308, 5e-324, -1.0, -4.0, -10.0, -50.0]
floats = st.one_of(st.sampled_from(NASTY_FLOATS), st.floats(-200, 200), st.floats())
fractions = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1e-12, 0.25, 0.5, 0.999999, 1.0, -0.1, 1.1, math.nan]))
UINT32_EDGES = [0, 1, 2, 3, 7, 8, 9, 20, 21, 150, 151, 2049, 2056, 4096, 2**31 - 1, 2**31, 2**32 - 1]
uint32s = st.one_of(st.sampled_from(UINT32_EDGES), st.integers(0, 2**32 - 1))
uint64s = st.one_of(st.sampled_from([0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
enums = st.one_of(st.integers(-1, 5), st.sampled_from([2**31 - 1, -(2**31)]))
# Sizes, steps and counts: every invalid value, but only cheap valid ones.
sizes = st.one_of(st.sampled_from([64, 72]), uint32s.filter(lambda v: v < 64 or v % 8 or v > 2048))
steps = st.one_of(st.sampled_from([1, 2]), uint32s.filter(lambda v: v == 0 or v > 150))
counts = st.one_of(st.sampled_from([1, 2]), uint32s.filter(lambda v: v == 0 or v > 20))

NASTY_TEXT = ["", " ", "\x00", "\n", "Default", "default", "..", "/", "\\", "🦊", "\u202e", "a" * 300, "%s%n", "{}"]
texts = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=40))
PROMPT_PIECES = ["fox ", "(red:1.3) ", "[x] ", "((a)) ", "BREAK ", "ti-sd15 ", "ti-sdxl ", "(a:1e308) ", "(b:-1e30) "]
prompts = st.one_of(
    texts,
    st.text(alphabet=string.printable + "()[]:\\", max_size=200),
    st.builds(lambda piece, n: piece * n, st.sampled_from(PROMPT_PIECES), st.sampled_from([1, 74, 75, 76, 749, 751])),
)
MODEL_IDS = [
    "", "tiny/sd15", "tiny/sdxl", "tiny/sdxl-refiner", "tiny/controlnet-sd15", "tiny/controlnet-sdxl", "tiny/vae-alt",
    "tiny/lora-sd15-kohya", "tiny/lora-sd15-peft", "tiny/lora-sd15-kohya.safetensors", "tiny/ti-sd15", "tiny/ti-sdxl",
    "tiny", "tiny/", "/", "..", "../tiny/sd15", "tiny/../tiny/sd15", "/etc/passwd", "tiny//sd15", "./tiny/sd15",
    "TINY/SD15", "tiny/nope", "a:b@c", "tiny:sd15@1", "tiny/sd15/unet", "tiny/sd15/vae", "tiny/sd15/text_encoder",
    "tiny/sd15/model_index.json", "tiny/README.txt", "tiny/README", "tiny/sd15/unet/diffusion_pytorch_model",
    "tiny/sdxl/text_encoder_2/model", "tiny/vae-alt/diffusion_pytorch_model", "tiny/sd15/scheduler",
]  # fmt: skip
model_ids = st.one_of(st.sampled_from(MODEL_IDS), texts)
SCHEDULERS = [row.name for row in TABLE] + [row.class_name for row in TABLE] + ["", "Default", "Euler a Karras"]
SCHEDULERS += [f"{row.name} {suffix}" for row in TABLE for suffix in ("Karras", "Exponential", "karras  ", "Beta")]
schedulers = st.one_of(st.sampled_from(SCHEDULERS), texts)


def _image(mode: str, width: int, height: int, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # a mode the format cannot hold: an RGB PNG instead
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _flip(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for position in positions:
        out[position % len(out)] ^= 0xFF
    return bytes(out)


GUIDES = [GUIDE_PNG, TRUNCATED_PNG, png_header_only(20_000, 20_000), png_header_only(5_000, 5_000), b"", b"GIF89a"]
guide_images = st.one_of(
    st.sampled_from(GUIDES),
    st.binary(max_size=300),
    st.builds(_flip, st.just(GUIDE_PNG), st.lists(st.integers(0, 10_000), min_size=1, max_size=4)),
    st.builds(
        _image,
        st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "F", "CMYK", "YCbCr", "HSV"]),
        st.integers(1, 40),
        st.integers(1, 40),
        st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM"]),
        st.integers(0, 2**16),
    ),
)


@st.composite
def tensors(draw) -> tensor_pb2.Tensor:
    """Wire tensors: right and wrong dtypes, shapes and byte lengths; finite, extreme and non-finite values."""
    dtype = draw(st.sampled_from([1, 1, 1, 1, 2, 3, 4, 5, 0, 6, -1]))
    dims = [-1, 0, 1, 2, 3, 4, 8, 16, 32, 64, 65, 77, 154, 2**31, 2**62]
    shape = draw(st.lists(st.sampled_from(dims), max_size=5))
    itemsize = {2: 2, 3: 2, 4: 1, 5: 8}.get(dtype, 4)
    count = math.prod(shape) if all(d >= 0 for d in shape) else 0
    how = draw(st.sampled_from(["exact", "exact", "exact", "short", "long", "random"]))
    if how == "random" or count * itemsize > 1 << 20:
        return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=256)))
    fill = draw(st.sampled_from(["normal", "zeros", "nan", "inf", "huge", "denormal", "bytes"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype == 1 and fill != "bytes":
        values = {
            "normal": lambda: rng.standard_normal(count),
            "zeros": lambda: np.zeros(count),
            "nan": lambda: np.where(rng.random(count) < 0.01, np.nan, 0.0),
            "inf": lambda: np.where(rng.random(count) < 0.01, -np.inf, 1.0),
            "huge": lambda: rng.choice([3e38, -3e38, 1e30], count),
            "denormal": lambda: np.full(count, 1e-45),
        }[fill]()
        data = values.astype("<f4").tobytes()
    else:
        data = rng.integers(0, 256, count * itemsize, dtype=np.uint8).tobytes()
    if how == "short":
        data = data[: max(0, len(data) - draw(st.integers(1, 8)))]
    elif how == "long":
        data += bytes(draw(st.integers(1, 8)))
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


# Shared-memory ranges: malformed names, names of objects that do not exist, every offset and size.
shm_names = st.one_of(
    st.sampled_from(["", "/", "/triptych-", "/triptych-absent", "triptych-a", "/triptych-../x", "/etc/passwd"]),
    st.sampled_from(["/triptych-" + "a" * 65, "/triptych-\x00", "/dev/shm/triptych-a"]),
    st.text(max_size=40),
)
shm_regions = st.builds(tensor_pb2.SharedMemoryRegion, name=shm_names, offset=uint64s, byte_size=uint64s)


def _optional(message, name: str, value):
    if value is not None:
        setattr(message, name, value)
    return message


loras = st.lists(
    st.builds(_optional, st.builds(common_pb2.Lora, model=model_ids), st.just("weight"), st.none() | floats),
    max_size=9,
)
embeddings = st.lists(
    st.builds(
        _optional, st.builds(common_pb2.TextualInversion, model=model_ids), st.just("weight"), st.none() | floats
    ),
    max_size=9,
)


@st.composite
def units(draw) -> common_pb2.ControlNetUnit:
    model = draw(st.one_of(st.sampled_from(["tiny/controlnet-sd15", "tiny/controlnet-sdxl"]), model_ids))
    unit = common_pb2.ControlNetUnit(model=model, guide_image=draw(guide_images), control_mode=draw(enums))
    _optional(unit, "weight", draw(st.none() | floats))
    for edge in ("start", "end"):
        which = draw(st.sampled_from([None, "step", "percentage"]))
        if which == "step":
            setattr(unit, f"{edge}_step", draw(uint32s))
        elif which == "percentage":
            setattr(unit, f"{edge}_step_percentage", draw(floats))
    return unit


control_nets = st.lists(units(), max_size=5)


@st.composite
def refiners(draw) -> Refiner:
    refiner = Refiner(model=draw(st.one_of(st.just("tiny/sdxl-refiner"), model_ids)))
    which = draw(st.sampled_from([None, "step", "percentage"]))
    if which == "step":
        refiner.start_step = draw(uint32s)
    elif which == "percentage":
        refiner.start_step_percentage = draw(floats)
    return refiner


def mutations(fields: dict) -> st.SearchStrategy:
    """Lists of 1-4 (path, value) drawn from `fields` (path -> strategy); a value of None clears the field."""
    one = st.one_of(*[st.tuples(st.just(path), strategy) for path, strategy in fields.items()])
    return st.lists(st.one_of(one, st.tuples(st.sampled_from(list(fields)), st.none())), min_size=1, max_size=4)


GENERATE_FIELDS = {
    "task_uuid": texts, "positive_prompt": prompts, "negative_prompt": prompts, "model": model_ids, "width": sizes,
    "height": sizes, "steps": steps, "cfg_scale": floats, "scheduler": schedulers, "seed": uint64s,
    "clip_skip": uint32s, "vae": model_ids, "number_results": counts, "output_format": enums,
    "output_quality": uint32s, "lora": loras, "embeddings": embeddings, "control_net": control_nets,
    "refiner": refiners(), "prompt_weighting": enums, "preview_interval_steps": uint32s,
    "progress_interval_ms": uint32s,
}  # fmt: skip
ENCODE_FIELDS = {
    "model": model_ids, "positive_prompt": prompts, "negative_prompt": prompts, "include_negative": st.booleans(),
    "clip_skip": uint32s, "loras": loras, "embeddings": embeddings, "prompt_weighting": enums,
    "output_shared_memory": shm_regions,
}  # fmt: skip
DENOISE_FIELDS = {
    "model": model_ids, "positive.prompt_embeds": tensors(), "negative.prompt_embeds": tensors(),
    "positive.pooled_prompt_embeds": tensors(), "negative.pooled_prompt_embeds": tensors(), "positive": st.none(),
    "negative": st.none(), "width": sizes, "height": sizes, "steps": steps, "guidance_scale": floats,
    "scheduler": schedulers, "seed": uint64s, "loras": loras, "control_net": control_nets,
    "window": st.none(),
    "window.start_fraction": fractions, "window.end_fraction": fractions, "latents": tensors(),
    "generator_state": st.one_of(
        st.binary(max_size=64), st.tuples(st.just("state-flip"), st.lists(st.integers(0, 5055), max_size=3))
    ),
    "aesthetic_score": floats, "negative_aesthetic_score": floats, "preview_interval_steps": uint32s,
    "output_shared_memory": shm_regions, "latents.shared_memory": shm_regions, "progress_interval_ms": uint32s,
    "positive.prompt_embeds.shared_memory": shm_regions,
}  # fmt: skip
decoder_tensors = st.one_of(
    tensors(),
    st.builds(
        lambda b, c, h, w, fill: tensor_pb2.Tensor(
            dtype=1, shape=[b, c, h, w], data=np.full(b * c * h * w, fill, "<f4").tobytes()
        ),
        st.integers(0, 3), st.sampled_from([3, 4, 5]), st.sampled_from([0, 1, 2, 3, 8, 16, 257]),
        st.sampled_from([0, 1, 5, 16, 300]), st.sampled_from([0.0, -3.0, 1e30, math.nan]),
    ),
)  # fmt: skip
DECODE_FIELDS = {
    "model": model_ids, "vae": model_ids, "latents": decoder_tensors, "output_format": enums, "quality": uint32s,
    "png_text": st.dictionaries(texts, texts, max_size=3), "latents.shared_memory": shm_regions,
}  # fmt: skip


# --- Runware JSON ------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=8,
)
data_uris = st.builds(lambda raw: "data:image/png;base64," + base64.b64encode(raw).decode(), guide_images)
plain_base64 = st.builds(lambda raw: base64.b64encode(raw).decode(), guide_images)
TASK_VALUES = {
    "taskType": st.one_of(st.just("imageInference"), json_values), "taskUUID": texts, "positivePrompt": prompts,
    "negativePrompt": prompts, "model": model_ids, "width": st.one_of(sizes, json_values),
    "height": st.one_of(sizes, json_values), "steps": st.one_of(steps, json_values),
    "CFGScale": st.one_of(floats, json_values), "scheduler": schedulers,
    "seed": st.one_of(st.integers(-(2**65), 2**65), json_values), "clipSkip": st.one_of(uint32s, json_values),
    "vae": model_ids, "numberResults": st.one_of(counts, json_values),
    "outputFormat": st.sampled_from(["PNG", "jpg", "JPEG", "WEBP", "GIF", ""]), "outputQuality": uint32s,
    "promptWeighting": st.sampled_from(["sdEmbeds", "compel", "A1111", "none", ""]),
    "maxSequenceLength": st.one_of(uint32s, json_values),
    "lora": st.lists(st.fixed_dictionaries({"model": model_ids}, optional={"weight": floats, "x": json_values}),
                     max_size=3),
    "embeddings": st.lists(st.fixed_dictionaries({"model": model_ids}, optional={"weight": floats}), max_size=3),
    "controlNet": st.lists(st.fixed_dictionaries(
        {"model": st.one_of(st.just("tiny/controlnet-sd15"), model_ids),
         "guideImage": st.one_of(data_uris, plain_base64, texts)},
        optional={"weight": floats, "startStep": uint32s, "startStepPercentage": floats, "endStep": uint32s,
                  "endStepPercentage": floats, "controlMode": st.sampled_from(["balanced", "PROMPT", "x"])}),
        max_size=3),
    "refiner": st.fixed_dictionaries({"model": st.one_of(st.just("tiny/sdxl-refiner"), model_ids)},
                                     optional={"startStep": uint32s, "startStepPercentage": floats}),
}  # fmt: skip
assert set(TASK_VALUES) == set(TASK_KEYS), "a Runware key has no strategy"
task_mutations = st.lists(
    st.one_of(
        st.one_of(*[st.tuples(st.just(key), strategy) for key, strategy in TASK_VALUES.items()]),
        st.tuples(st.sampled_from(list(TASK_KEYS)), json_values),  # any JSON where a key expects a type
        st.tuples(st.text(min_size=1, max_size=12), json_values),  # unknown keys
        st.tuples(st.sampled_from(list(TASK_KEYS)), st.just(None)),  # remove the key
    ),
    min_size=1,
    max_size=4,
)
