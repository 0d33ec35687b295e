"""Runware's REST shapes: a body of tasks in, `{"data": [...]}` and `{"errors": [...]}` out.

A body is a JSON array of tasks, as Runware's API takes it (one object is accepted too). `imageInference` tasks
become GenerateRequests with the Python client's rules (`request_from_task`); an `authentication` task carries
the caller's API key, which goes to the gateway as its bearer token. The keys that only describe the HTTP
answer (`outputType`, `includeCost`, `checkNSFW`, `deliveryMethod`) are read here and taken out first.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from triptych.client import TaskError, request_from_task
from triptych.v1 import image_service_pb2

OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
RESPONSE_KEYS = {"URL": "imageURL", "base64Data": "imageBase64Data", "dataURI": "imageDataURI"}
# gRPC status -> (Runware error code when no field names the problem, HTTP status).
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: ("invalidParameter", 400),
    grpc.StatusCode.NOT_FOUND: ("modelNotFound", 400),
    grpc.StatusCode.UNAUTHENTICATED: ("invalidApiKey", 401),
    grpc.StatusCode.PERMISSION_DENIED: ("invalidApiKey", 403),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("serverBusy", 429),
    grpc.StatusCode.UNAVAILABLE: ("serviceUnavailable", 503),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("timeout", 504),
    grpc.StatusCode.CANCELLED: ("cancelled", 499),
}
# Proto field names whose Runware key is not their camelCase.
_RUNWARE_NAMES = {"cfg_scale": "CFGScale", "task_uuid": "taskUUID"}
_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\[\d+\])?(?:\.[a-z_][a-z0-9_]*(?:\[\d+\])?)*): (.+)$", re.DOTALL)


@dataclass
class InferenceTask:
    """One imageInference task of a body: its request and how its images are answered."""

    task_uuid: str
    request: image_service_pb2.GenerateRequest
    output_types: tuple[str, ...] = ("URL",)
    include_cost: bool = False


@dataclass
class Body:
    """A parsed body: the inference tasks in order, the API key of an authentication task (if any)."""

    tasks: list[InferenceTask] = field(default_factory=list)
    api_key: str | None = None


class RunwareErrors(Exception):
    """Errors in Runware's shape, with the HTTP status of the answer."""

    def __init__(self, errors: list[dict[str, Any]], status: int = 400):
        self.errors, self.status = errors, status
        super().__init__("; ".join(e["message"] for e in errors))


def error(code: str, message: str, parameter: str | None = None, task_uuid: str | None = None) -> dict[str, Any]:
    """One entry of Runware's `errors` array."""
    entry: dict[str, Any] = {"code": code, "message": message}
    if parameter:
        entry["parameter"] = parameter
    if task_uuid:
        entry["taskUUID"] = task_uuid
    return entry


def runware_parameter(proto_path: str) -> str:
    """A proto field path of GenerateRequest (snake_case, as errors name it) as the Runware key path:
    `control_net[1].end_step` -> `controlNet[1].endStep`, `cfg_scale` -> `CFGScale`."""
    parts = []
    for part in proto_path.split("."):
        name, bracket, index = part.partition("[")
        words = name.split("_")
        camel = _RUNWARE_NAMES.get(name, words[0] + "".join(w.capitalize() for w in words[1:]))
        parts.append(camel + bracket + index)
    return ".".join(parts)


def _invalid_code(parameter: str) -> str:
    """`invalid` + the top-level key: `invalidWidth`, `invalidCFGScale`, `invalidLora` for `lora[0].weight`."""
    top = re.split(r"[.\[]", parameter, maxsplit=1)[0]
    return "invalid" + top[:1].upper() + top[1:]


def _output_types(task: dict[str, Any], uuid_: str, errors: list) -> tuple[str, ...]:
    value = task.pop("outputType", "URL")
    values = value if isinstance(value, list) else [value]
    if not values or any(v not in OUTPUT_TYPES for v in values):
        errors.append(
            error(
                "invalidOutputType",
                f"outputType must be one of {', '.join(OUTPUT_TYPES)} or a list of them (got {value!r})",
                "outputType",
                uuid_,
            )
        )
        return ("URL",)
    return tuple(dict.fromkeys(values))


def _flag(task: dict[str, Any], key: str, uuid_: str, errors: list, allowed: tuple[bool, ...] = (True, False)) -> bool:
    value = task.pop(key, False)
    if not isinstance(value, bool) or value not in allowed:
        why = "must be true or false" if not isinstance(value, bool) else "true is not supported here"
        errors.append(error("invalid" + key[:1].upper() + key[1:], f"{key} {why} (got {value!r})", key, uuid_))
        return False
    return value


def parse_body(data: Any, max_tasks: int = 100) -> Body:
    """The tasks of a Runware body; RunwareErrors names every bad key of every task, nothing runs then."""
    tasks = data if isinstance(data, list) else [data]
    body, errors = Body(), []
    if not tasks:
        raise RunwareErrors([error("invalidRequestBody", "the body is an empty array: send at least one task")])
    if len(tasks) > max_tasks:
        message = f"at most {max_tasks} tasks per request (got {len(tasks)}; TRIPTYCH_HTTP_MAX_TASKS)"
        raise RunwareErrors([error("tooManyTasks", message)])
    for i, raw in enumerate(tasks):
        if not isinstance(raw, dict):
            errors.append(error("invalidRequestBody", f"task {i} must be a JSON object (got {type(raw).__name__})"))
            continue
        task = dict(raw)
        task_type = task.get("taskType")
        uuid_ = task.get("taskUUID") if isinstance(task.get("taskUUID"), str) else None
        if task_type == "authentication":
            key = task.get("apiKey")
            if not isinstance(key, str) or not key:
                errors.append(error("invalidApiKey", "authentication needs apiKey, a string", "apiKey", uuid_))
            body.api_key = key if isinstance(key, str) else None
            continue
        if task_type != "imageInference":
            errors.append(
                error(
                    "unsupportedTaskType",
                    f"taskType must be 'imageInference' (or 'authentication') (got {task_type!r})",
                    "taskType",
                    uuid_,
                )
            )
            continue
        uuid_ = uuid_ or str(uuid.uuid4())
        task["taskUUID"] = uuid_
        output_types = _output_types(task, uuid_, errors)
        include_cost = _flag(task, "includeCost", uuid_, errors)
        _flag(task, "checkNSFW", uuid_, errors, allowed=(False,))
        delivery = task.pop("deliveryMethod", "sync")
        if delivery != "sync":
            errors.append(
                error(
                    "invalidDeliveryMethod",
                    f"only 'sync' delivery is served (got {delivery!r})",
                    "deliveryMethod",
                    uuid_,
                )
            )
        try:
            request = request_from_task(task)
        except TaskError as exc:
            for key, why in exc.violations:
                code = "unsupportedParameter" if why.startswith("unknown key") else _invalid_code(key)
                errors.append(error(code, f"{key}: {why}", key, uuid_))
            continue
        body.tasks.append(InferenceTask(uuid_, request, output_types, include_cost))
    if errors:
        raise RunwareErrors(errors)
    return body


def errors_from_rpc(exc: grpc.RpcError, task_uuid: str, violations: list[tuple[str, str]]) -> RunwareErrors:
    """A failed Generate as Runware errors: one per field violation (named by Runware key), else one."""
    code, status = _STATUS.get(exc.code(), ("internalError", 500))
    if violations:
        entries = []
        for proto_path, why in violations:
            parameter = runware_parameter(proto_path)
            entries.append(error(_invalid_code(parameter), f"{parameter}: {why}", parameter, task_uuid))
        return RunwareErrors(entries, status)
    details = exc.details() or exc.code().name
    match = _FIELD_PREFIX.match(details)  # NOT_FOUND names its field first: "lora[0].model: model ... is not ..."
    parameter = runware_parameter(match.group(1)) if match else None
    message = f"{parameter}: {match.group(2)}" if match else details
    return RunwareErrors([error(code, message, parameter, task_uuid)], status)
