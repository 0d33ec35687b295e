"""The ASGI app (Starlette): Runware's `POST /v1`, OpenAI's `POST /v1/images/generations`, images answered by
URL at `GET /v1/images/{name}`, and `GET /health`. Each task is one ImageService.Generate call to the gateway."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import OrderedDict
from typing import Any

import anyio
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from triptych.client import field_violations
from triptych.client.streams import RetriedStream
from triptych.http.openai import OpenAIError, openai_param, parse_images_body
from triptych.http.runware import RESPONSE_KEYS, RunwareErrors, errors_from_rpc, parse_body
from triptych.http.runware import error as runware_error
from triptych.http.settings import HTTPSettings
from triptych.v1 import image_service_pb2, image_service_pb2_grpc

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class BodyTooLarge(Exception):
    """A request body over http_max_body_bytes."""


class ImageStore:
    """Images answered by URL, kept in memory up to a byte budget; the oldest go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self.images: OrderedDict[str, tuple[bytes, str]] = OrderedDict()

    def put(self, name: str, data: bytes, mime_type: str) -> None:
        self.images[name] = (data, mime_type)
        self.used += len(data)
        while self.used > self.max_bytes and self.images:
            _, (old, _) = self.images.popitem(last=False)
            self.used -= len(old)

    def get(self, name: str) -> tuple[bytes, str] | None:
        return self.images.get(name)


class Gateway:
    """Blocking Generate calls on one channel to the gateway, run in worker threads. The caller's API key goes
    to the gateway as its bearer token; without one, this process's own (client_auth_token), if set."""

    def __init__(self, channel: grpc.Channel, settings: HTTPSettings, fallback_token: str | None):
        self.channel, self.settings, self.fallback_token = channel, settings, fallback_token
        self.stub = image_service_pb2_grpc.ImageServiceStub(channel)

    def _metadata(self, api_key: str | None) -> list[tuple[str, str]]:
        token = api_key or self.fallback_token
        return [("authorization", f"Bearer {token}")] if token else []

    def _generate(self, request, api_key: str | None) -> list[image_service_pb2.GeneratedImage]:
        metadata = self._metadata(api_key)
        # Opened again on UNAVAILABLE before its first event, as the Python client's ImageClient.stream does.
        events = RetriedStream(
            lambda remaining: self.stub.Generate(request, timeout=remaining, metadata=metadata),
            self.settings.http_timeout_s,
        )
        return sorted((e.image for e in events if e.HasField("image")), key=lambda image: image.index)

    async def generate(self, request, api_key: str | None) -> list[image_service_pb2.GeneratedImage]:
        return await anyio.to_thread.run_sync(self._generate, request, api_key)

    def _serving(self) -> bool:
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def serving(self) -> bool:
        return await anyio.to_thread.run_sync(self._serving)


async def _read_json(request: Request, limit: int) -> Any:
    size = int(request.headers.get("content-length") or 0)
    if size > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return json.loads(b"".join(chunks))


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def create_app(settings: HTTPSettings, channel: grpc.Channel, fallback_token: str | None = None) -> Starlette:
    """The HTTP API over a channel to the gateway."""
    gateway = Gateway(channel, settings, fallback_token)
    store = ImageStore(settings.http_image_store_bytes)
    limit = settings.http_max_body_bytes

    def image_url(request: Request, image: image_service_pb2.GeneratedImage) -> str:
        name = f"{uuid.uuid4()}.{_EXTENSIONS.get(image.image.mime_type, 'bin')}"
        store.put(name, image.image.data, image.image.mime_type)
        return str(request.url_for("image", name=name))

    async def runware(request: Request) -> Response:
        try:
            body = parse_body(await _read_json(request, limit), settings.http_max_tasks)
        except BodyTooLarge:
            message = f"the body is larger than {limit} bytes (TRIPTYCH_HTTP_MAX_BODY_BYTES)"
            return JSONResponse({"errors": [runware_error("requestTooLarge", message)]}, 413)
        except (ValueError, RecursionError) as exc:
            return JSONResponse({"errors": [runware_error("invalidRequestBody", f"not valid JSON: {exc}")]}, 400)
        except RunwareErrors as exc:
            return JSONResponse({"errors": exc.errors}, exc.status)
        api_key = _bearer(request) or body.api_key
        data: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        status = 200
        outcomes: list[list | grpc.RpcError] = [[] for _ in body.tasks]

        async def run(i: int, task) -> None:
            try:
                outcomes[i] = await gateway.generate(task.request, api_key)
            except grpc.RpcError as exc:
                outcomes[i] = exc

        async with anyio.create_task_group() as group:  # the tasks of a body run at once; answered in order
            for i, task in enumerate(body.tasks):
                group.start_soon(run, i, task)
        for task, outcome in zip(body.tasks, outcomes, strict=True):
            if isinstance(outcome, grpc.RpcError):
                failed = errors_from_rpc(outcome, task.task_uuid, field_violations(outcome))
                errors.extend(failed.errors)
                status = status if status != 200 else failed.status
                continue
            for image in outcome:
                entry: dict[str, Any] = {
                    "taskType": "imageInference",
                    "taskUUID": task.task_uuid,
                    "imageUUID": str(uuid.uuid4()),
                    "seed": image.seed,
                }
                encoded = base64.b64encode(image.image.data).decode()
                for output_type in task.output_types:
                    if output_type == "URL":
                        entry[RESPONSE_KEYS[output_type]] = image_url(request, image)
                    elif output_type == "dataURI":
                        entry[RESPONSE_KEYS[output_type]] = f"data:{image.image.mime_type};base64,{encoded}"
                    else:
                        entry[RESPONSE_KEYS[output_type]] = encoded
                if task.include_cost:
                    entry["cost"] = 0
                data.append(entry)
        # Runware's shape: "data" for what was made, "errors" for what failed; both when some tasks failed.
        answer: dict[str, Any] = {"data": data} if data or not errors else {}
        if errors:
            answer["errors"] = errors
        return JSONResponse(answer, status)

    async def images_generations(request: Request) -> Response:
        try:
            parsed = parse_images_body(await _read_json(request, limit), settings.http_default_model)
        except BodyTooLarge:
            return JSONResponse(OpenAIError(f"the body is larger than {limit} bytes", status=413).body(), 413)
        except (ValueError, RecursionError) as exc:
            return JSONResponse(OpenAIError(f"not valid JSON: {exc}").body(), 400)
        except OpenAIError as exc:
            return JSONResponse(exc.body(), exc.status)
        try:
            images = await gateway.generate(parsed.request, _bearer(request))
        except grpc.RpcError as exc:
            failed = errors_from_rpc(exc, "", field_violations(exc))
            first = failed.errors[0]
            error = OpenAIError(first["message"], openai_param(first.get("parameter")), failed.status, first["code"])
            return JSONResponse(error.body(), error.status)
        if parsed.response_format == "url":
            data = [{"url": image_url(request, image)} for image in images]
        else:
            data = [{"b64_json": base64.b64encode(image.image.data).decode()} for image in images]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def image(request: Request) -> Response:
        found = store.get(request.path_params["name"])
        if found is None:
            return JSONResponse({"errors": [runware_error("imageNotFound", "no such image (or it expired)")]}, 404)
        return Response(found[0], media_type=found[1])

    async def health(_: Request) -> Response:
        if await gateway.serving():
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING", "gateway": settings.gateway_address}, 503)

    return Starlette(
        routes=[
            Route("/v1", runware, methods=["POST"]),
            Route("/v1/images/generations", images_generations, methods=["POST"]),
            Route("/v1/images/{name}", image, methods=["GET"], name="image"),
            Route("/health", health, methods=["GET"]),
        ]
    )
