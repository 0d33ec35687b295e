"""OpenAI's image API shape: `POST /v1/images/generations` with {prompt, model, n, size, response_format} in,
`{"created", "data": [{"b64_json" | "url"}]}` and `{"error": {"message", "type", "param", "code"}}` out.

The body becomes a Runware task and then a GenerateRequest with the Python client's rules, so limits and
messages are the same; a bad key is named by its OpenAI name. Beyond OpenAI's keys, `seed`, `negative_prompt`,
`steps`, `cfg_scale` and `scheduler` are accepted (Triptych's own; OpenAI's SDKs pass them with `extra_body`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from triptych.client import TaskError, request_from_task
from triptych.v1 import image_service_pb2

RESPONSE_FORMATS = ("b64_json", "url")
# OpenAI key -> Runware key; `size` becomes width and height.
_KEYS = {
    "prompt": "positivePrompt",
    "model": "model",
    "n": "numberResults",
    "output_format": "outputFormat",
    "output_compression": "outputQuality",
    "seed": "seed",
    "negative_prompt": "negativePrompt",
    "steps": "steps",
    "cfg_scale": "CFGScale",
    "scheduler": "scheduler",
}
_IGNORED = ("user",)  # accepted and unused: it identifies the caller's end user to OpenAI
_BACK = {runware: openai for openai, runware in _KEYS.items()} | {"width": "size", "height": "size"}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class OpenAIError(Exception):
    """An error in OpenAI's shape, with the HTTP status of the answer."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        self.message, self.param, self.status, self.code = message, param, status, code
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ImagesRequest:
    """A parsed `images/generations` body."""

    request: image_service_pb2.GenerateRequest
    response_format: str


def parse_images_body(data: Any, default_model: str | None) -> ImagesRequest:
    """The GenerateRequest of an OpenAI images body; OpenAIError names the first bad key (OpenAI answers one)."""
    if not isinstance(data, dict):
        raise OpenAIError("the body must be a JSON object")
    task: dict[str, Any] = {}
    for key, value in data.items():
        if key in _IGNORED:
            continue
        if key not in _KEYS and key not in ("size", "response_format"):
            accepted = ", ".join((*_KEYS, "size", "response_format", *_IGNORED))
            raise OpenAIError(f"unknown parameter {key!r} (accepted: {accepted})", key, code="unknown_parameter")
        if key in _KEYS:
            task[_KEYS[key]] = value
    if not isinstance(data.get("prompt"), str) or not data["prompt"]:
        raise OpenAIError("prompt is required: a non-empty string", "prompt")
    task.setdefault("model", default_model)
    if task["model"] is None:
        raise OpenAIError("model is required (this server has no default model: TRIPTYCH_HTTP_DEFAULT_MODEL)", "model")
    size = data.get("size", "auto")
    if size != "auto":
        match = _SIZE.match(size) if isinstance(size, str) else None
        if not match:
            raise OpenAIError(f"size must be 'WIDTHxHEIGHT', e.g. '1024x1024', or 'auto' (got {size!r})", "size")
        task["width"], task["height"] = int(match.group(1)), int(match.group(2))
    response_format = data.get("response_format", "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise OpenAIError(f"response_format must be 'b64_json' or 'url' (got {response_format!r})", "response_format")
    try:
        request = request_from_task(task)
    except TaskError as exc:
        key, why = exc.violations[0]
        param = _BACK.get(key, key)
        raise OpenAIError(f"{param}: {why}", param) from None
    return ImagesRequest(request, response_format)


def openai_param(runware_parameter: str | None) -> str | None:
    """A Runware key path (from a server-side error) as the OpenAI parameter it came from."""
    if runware_parameter is None:
        return None
    top = re.split(r"[.\[]", runware_parameter, maxsplit=1)[0]
    return _BACK.get(top, runware_parameter)
