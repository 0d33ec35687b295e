"""Runware `imageInference` task JSON <-> triptych.v1.GenerateRequest. Torch-free.

Keys are camelCase as Runware sends them; any key not listed in TASK_KEYS is an error naming it, never ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from pathlib import Path
from typing import Any

from triptych.v1 import common_pb2, decoder_service_pb2, encoder_service_pb2, image_service_pb2

TASK_KEYS = (
    "taskType",
    "taskUUID",
    "positivePrompt",
    "negativePrompt",
    "model",
    "width",
    "height",
    "steps",
    "CFGScale",
    "scheduler",
    "seed",
    "clipSkip",
    "vae",
    "numberResults",
    "outputFormat",
    "outputQuality",
    "lora",
    "embeddings",
    "controlNet",
    "refiner",
    "promptWeighting",
    "maxSequenceLength",
)
_FORMATS = {
    "PNG": decoder_service_pb2.OUTPUT_FORMAT_PNG,
    "JPG": decoder_service_pb2.OUTPUT_FORMAT_JPEG,
    "JPEG": decoder_service_pb2.OUTPUT_FORMAT_JPEG,
    "WEBP": decoder_service_pb2.OUTPUT_FORMAT_WEBP,
}
# Runware's promptWeighting values (any case) -> PromptWeighting. "sdEmbeds" is A1111 syntax; "compel" is not built.
_WEIGHTINGS = {
    "sdembeds": encoder_service_pb2.PROMPT_WEIGHTING_A1111,
    "a1111": encoder_service_pb2.PROMPT_WEIGHTING_A1111,
}
_MODES = {
    "balanced": common_pb2.CONTROL_MODE_BALANCED,
    "prompt": common_pb2.CONTROL_MODE_PROMPT,
    "controlnet": common_pb2.CONTROL_MODE_CONTROLNET,
}


class TaskError(ValueError):
    """A task that cannot become a request: every offending key, with a reason, as (key, reason) pairs."""

    def __init__(self, violations: list[tuple[str, str]]):
        self.violations = violations
        super().__init__("; ".join(f"{key}: {why}" for key, why in violations))


class _Reader:
    """Reads typed values out of one JSON object, collecting violations instead of stopping at the first."""

    def __init__(self, obj: Any, path: str, violations: list[tuple[str, str]], allowed: tuple[str, ...]):
        self.path, self.violations = path, violations
        if not isinstance(obj, dict):
            violations.append((path or "task", "must be a JSON object"))
            obj = {}
        self.obj = obj
        for key in obj:
            if key not in allowed:
                violations.append((self.key(key), f"unknown key (accepted: {', '.join(allowed)})"))

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def bad(self, name: str, why: str) -> None:
        self.violations.append((self.key(name), why))

    def string(self, name: str) -> str | None:
        value = self.obj.get(name)
        if value is not None and not isinstance(value, str):
            self.bad(name, f"must be a string (got {json.dumps(value)})")
            return None
        return value

    def integer(self, name: str, low: int = 0, high: int = 2**64 - 1) -> int | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(name, f"must be an integer (got {json.dumps(value)})")
            return None
        if not low <= value <= high:
            self.bad(name, f"must be between {low} and {high} (got {value})")
            return None
        return value

    def number(self, name: str) -> float | None:
        value = self.obj.get(name)
        if value is None:
            return None
        try:  # an integer beyond float's range (JSON allows 400 digits) is not finite either
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            self.bad(name, f"must be a finite number (got {json.dumps(value)[:40]})")
            return None
        return number

    def items(self, name: str) -> list:
        value = self.obj.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            self.bad(name, "must be a JSON array")
            return []
        return value


def read_image_bytes(value: str, base_dir: Path | None = None) -> bytes:
    """A guide image given as a data URI, plain base64 or a local file path. URLs are refused (no network)."""
    if value.startswith(("http://", "https://")):
        raise ValueError("URLs are not fetched (there is no network); give a data URI, base64 or a local path")
    if value.startswith("data:"):
        _, _, payload = value.partition(",")
        return base64.b64decode(payload, validate=True)
    path = Path(value) if base_dir is None or Path(value).is_absolute() else base_dir / value
    try:
        is_file = len(value) < 4096 and path.is_file()
    except OSError:  # e.g. ENAMETOOLONG: it cannot be a file name; try base64
        is_file = False
    if is_file:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("neither a readable file, a data URI nor base64") from exc


def request_from_task(task: Any, base_dir: Path | None = None) -> image_service_pb2.GenerateRequest:
    """Builds a GenerateRequest from one Runware imageInference task; TaskError lists every bad key."""
    violations: list[tuple[str, str]] = []
    r = _Reader(task, "", violations, TASK_KEYS)
    request = image_service_pb2.GenerateRequest()
    task_type = r.string("taskType")
    if task_type is not None and task_type != "imageInference":
        r.bad("taskType", f"only 'imageInference' is supported (got {task_type!r})")
    for key, field in (
        ("taskUUID", "task_uuid"),
        ("positivePrompt", "positive_prompt"),
        ("negativePrompt", "negative_prompt"),
        ("model", "model"),
        ("scheduler", "scheduler"),
        ("vae", "vae"),
    ):
        value = r.string(key)
        if value is not None:
            setattr(request, field, value)
    for key, field, high in (
        ("width", "width", 2**32 - 1),
        ("height", "height", 2**32 - 1),
        ("steps", "steps", 2**32 - 1),
        ("clipSkip", "clip_skip", 2**32 - 1),
        ("numberResults", "number_results", 2**32 - 1),
        ("outputQuality", "output_quality", 2**32 - 1),
        ("seed", "seed", 2**64 - 1),
        ("maxSequenceLength", "max_sequence_length", 2**32 - 1),
    ):
        value = r.integer(key, 0, high)
        if value is not None:
            setattr(request, field, value)
    cfg = r.number("CFGScale")
    if cfg is not None:
        request.cfg_scale = cfg
    weighting = r.string("promptWeighting")
    if weighting is not None:
        if weighting.lower() == "compel":
            r.bad("promptWeighting", "'compel' syntax is not supported; use 'sdEmbeds' (A1111 syntax) or omit the key")
        elif weighting.lower() not in _WEIGHTINGS:
            r.bad("promptWeighting", f"must be 'sdEmbeds' (A1111 syntax) or absent (literal) (got {weighting!r})")
        else:
            request.prompt_weighting = _WEIGHTINGS[weighting.lower()]
    fmt = r.string("outputFormat")
    if fmt is not None:
        if fmt.upper() not in _FORMATS:
            r.bad("outputFormat", f"must be PNG, JPG or WEBP (got {fmt!r})")
        else:
            request.output_format = _FORMATS[fmt.upper()]
    for key, target in (("lora", request.lora), ("embeddings", request.embeddings)):
        for i, item in enumerate(r.items(key)):
            sub = _Reader(item, f"{key}[{i}]", violations, ("model", "weight"))
            entry = target.add(model=sub.string("model") or "")
            weight = sub.number("weight")
            if weight is not None:
                entry.weight = weight
    for i, item in enumerate(r.items("controlNet")):
        request.control_net.append(_control_unit(item, f"controlNet[{i}]", violations, base_dir))
    if r.obj.get("refiner") is not None:  # null means absent, as for every other key
        sub = _Reader(r.obj["refiner"], "refiner", violations, ("model", "startStep", "startStepPercentage"))
        request.refiner.model = sub.string("model") or ""
        _start_end(sub, request.refiner, "start", violations)
    if violations:
        raise TaskError(violations)
    return request


def _start_end(sub: _Reader, message, which: str, violations) -> None:
    step, percentage = sub.integer(f"{which}Step", 0, 2**32 - 1), sub.number(f"{which}StepPercentage")
    if step is not None and percentage is not None:
        sub.bad(f"{which}Step", f"give {which}Step or {which}StepPercentage, not both")
    elif step is not None:
        setattr(message, f"{which}_step", step)
    elif percentage is not None:
        setattr(message, f"{which}_step_percentage", percentage)


def _control_unit(item, path: str, violations, base_dir: Path | None) -> common_pb2.ControlNetUnit:
    sub = _Reader(
        item,
        path,
        violations,
        (
            "model",
            "guideImage",
            "weight",
            "startStep",
            "startStepPercentage",
            "endStep",
            "endStepPercentage",
            "controlMode",
        ),
    )
    unit = common_pb2.ControlNetUnit(model=sub.string("model") or "")
    guide = sub.string("guideImage")
    if guide is None:
        sub.bad("guideImage", "required")
    else:
        try:
            unit.guide_image = read_image_bytes(guide, base_dir)
        except ValueError as exc:
            sub.bad("guideImage", str(exc))
    weight = sub.number("weight")
    if weight is not None:
        unit.weight = weight
    _start_end(sub, unit, "start", violations)
    _start_end(sub, unit, "end", violations)
    mode = sub.string("controlMode")
    if mode is not None:
        if mode.lower() not in _MODES:
            sub.bad("controlMode", f"must be balanced, prompt or controlnet (got {mode!r})")
        else:
            unit.control_mode = _MODES[mode.lower()]
    return unit


def requests_from_json(text: str, base_dir: Path | None = None) -> list[image_service_pb2.GenerateRequest]:
    """One task object, or an array of them as Runware's API sends (answered in order)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; an integer of > 4300 digits; deep nesting
        raise TaskError([("task", f"not valid JSON: {exc}")]) from exc
    tasks = data if isinstance(data, list) else [data]
    requests, violations = [], []
    for i, task in enumerate(tasks):
        try:
            requests.append(request_from_task(task, base_dir))
        except TaskError as exc:
            prefix = f"[{i}]." if isinstance(data, list) else ""
            violations.extend((prefix + key, why) for key, why in exc.violations)
    if violations:
        raise TaskError(violations)
    return requests


def task_from_request(request: image_service_pb2.GenerateRequest) -> dict:
    """The inverse of request_from_task: the Runware JSON of a request (set fields only)."""
    task: dict[str, Any] = {"taskType": "imageInference"}
    for key, field in (
        ("taskUUID", "task_uuid"),
        ("positivePrompt", "positive_prompt"),
        ("negativePrompt", "negative_prompt"),
        ("model", "model"),
        ("scheduler", "scheduler"),
        ("vae", "vae"),
    ):
        if getattr(request, field):
            task[key] = getattr(request, field)
    for key, field in (
        ("width", "width"),
        ("height", "height"),
        ("steps", "steps"),
        ("CFGScale", "cfg_scale"),
        ("seed", "seed"),
        ("clipSkip", "clip_skip"),
        ("numberResults", "number_results"),
        ("outputQuality", "output_quality"),
        ("maxSequenceLength", "max_sequence_length"),
    ):
        if request.HasField(field):
            task[key] = getattr(request, field)
    if request.output_format:
        task["outputFormat"] = {1: "PNG", 2: "JPG", 3: "WEBP"}[request.output_format]
    for key, items in (("lora", request.lora), ("embeddings", request.embeddings)):
        if items:
            task[key] = [{"model": x.model, **({"weight": x.weight} if x.HasField("weight") else {})} for x in items]
    if request.prompt_weighting == encoder_service_pb2.PROMPT_WEIGHTING_A1111:
        task["promptWeighting"] = "sdEmbeds"
    if request.control_net:
        task["controlNet"] = [_unit_json(unit) for unit in request.control_net]
    if request.HasField("refiner"):
        refiner = {"model": request.refiner.model}
        _oneof_json(request.refiner, "start", refiner)
        task["refiner"] = refiner
    return task


def _oneof_json(message, group: str, out: dict) -> None:
    which = message.WhichOneof(group)
    if which:
        key = "".join(w.capitalize() if i else w for i, w in enumerate(which.split("_")))
        out[key] = getattr(message, which)


def _unit_json(unit: common_pb2.ControlNetUnit) -> dict:
    out: dict[str, Any] = {
        "model": unit.model,
        "guideImage": "data:application/octet-stream;base64," + base64.b64encode(unit.guide_image).decode(),
    }
    if unit.HasField("weight"):
        out["weight"] = unit.weight
    _oneof_json(unit, "start", out)
    _oneof_json(unit, "end", out)
    if unit.control_mode:
        out["controlMode"] = {1: "balanced", 2: "prompt", 3: "controlnet"}[unit.control_mode]
    return out
