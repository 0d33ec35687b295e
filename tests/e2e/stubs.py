"""Calling each of the four services directly: stubs, tiny valid requests, wire tensors, liveness checks.

Shared by the validation matrix, the fuzz test and the load test. Every call carries a deadline.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import grpc
import numpy as np
import psutil
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from triptych.client import open_channel
from triptych.v1 import (
    common_pb2,
    decoder_service_pb2,
    decoder_service_pb2_grpc,
    denoiser_service_pb2,
    denoiser_service_pb2_grpc,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    tensor_pb2,
)

ROLES = ("encoder", "denoiser", "decoder", "gateway")
DEADLINE_S = 60.0
MODELS = ("tiny/sd15", "tiny/sdxl", "tiny/sdxl-refiner")
_WIRE = {
    np.dtype(np.float32): tensor_pb2.DATA_TYPE_FLOAT32,
    np.dtype(np.float16): tensor_pb2.DATA_TYPE_FLOAT16,
    np.dtype(np.uint8): tensor_pb2.DATA_TYPE_UINT8,
    np.dtype(np.int64): tensor_pb2.DATA_TYPE_INT64,
}


@dataclass
class Stubs:
    """One channel and stub per role."""

    channels: list[grpc.Channel]
    encoder: encoder_service_pb2_grpc.TextEncoderServiceStub
    denoiser: denoiser_service_pb2_grpc.DenoiserServiceStub
    decoder: decoder_service_pb2_grpc.DecoderServiceStub
    gateway: image_service_pb2_grpc.ImageServiceStub

    def call(self, role: str, request, timeout: float = DEADLINE_S) -> list:
        """Sends `request` to `role` and returns every response (streams are drained), with a deadline."""
        if role == "encoder":
            return [self.encoder.Encode(request, timeout=timeout)]
        if role == "decoder":
            return [self.decoder.Decode(request, timeout=timeout)]
        if role == "denoiser":
            return list(self.denoiser.Denoise(request, timeout=timeout))
        return list(self.gateway.Generate(request, timeout=timeout))

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def open_stubs(services, max_message_bytes: int | None = None) -> Stubs:
    """Stubs on the session's four processes. A larger client limit lets a test send what the server must refuse."""
    extra = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
    channels = {role: open_channel(services.addresses[role], **extra) for role in ROLES}
    return Stubs(
        list(channels.values()),
        encoder_service_pb2_grpc.TextEncoderServiceStub(channels["encoder"]),
        denoiser_service_pb2_grpc.DenoiserServiceStub(channels["denoiser"]),
        decoder_service_pb2_grpc.DecoderServiceStub(channels["decoder"]),
        image_service_pb2_grpc.ImageServiceStub(channels["gateway"]),
    )


def tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """A numpy array as a wire Tensor (little-endian, C order)."""
    array = np.ascontiguousarray(array)
    return tensor_pb2.Tensor(dtype=_WIRE[array.dtype], shape=list(array.shape), data=array.tobytes())


def set_path(request: Message, path: str, value) -> None:
    """Sets the dotted field `path` of `request` to `value`: None clears it, a message / list / dict replaces it."""
    *parents, name = path.split(".")
    target = request
    for parent in parents:
        target = getattr(target, parent)
    if value is None:
        target.ClearField(name)
    elif isinstance(value, Message):
        getattr(target, name).CopyFrom(value)
    elif isinstance(value, list):
        del getattr(target, name)[:]
        getattr(target, name).extend(value)
    elif isinstance(value, dict):
        getattr(target, name).clear()
        getattr(target, name).update(value)
    else:
        setattr(target, name, value)


def encode_image(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


GUIDE_PNG = encode_image(Image.new("RGB", (16, 16), (200, 30, 90)))


def conditioning(stubs: Stubs) -> dict[str, encoder_service_pb2.EncodeResponse]:
    """The real encoder's conditioning (with negative) for each model, to build valid DenoiseRequests from."""
    return {
        model: stubs.encoder.Encode(
            encoder_service_pb2.EncodeRequest(model=model, positive_prompt="a red fox", include_negative=True),
            timeout=DEADLINE_S,
        )
        for model in MODELS
    }


def tiny_generate(**changes) -> image_service_pb2.GenerateRequest:
    """A cheap valid Generate: 64x64, 2 steps."""
    fields = dict(model="tiny/sd15", positive_prompt="a red fox", width=64, height=64, steps=2, seed=1)
    return image_service_pb2.GenerateRequest(**{**fields, **changes})


def tiny_encode(**changes) -> encoder_service_pb2.EncodeRequest:
    fields = dict(model="tiny/sd15", positive_prompt="a red fox", include_negative=True)
    return encoder_service_pb2.EncodeRequest(**{**fields, **changes})


def tiny_denoise(encoded: dict, model: str = "tiny/sd15", **changes) -> denoiser_service_pb2.DenoiseRequest:
    """A cheap valid Denoise on `model` with its real conditioning: 64x64, 2 steps, CFG 7."""
    fields = dict(
        model=model,
        positive=copy.deepcopy(encoded[model].positive),
        negative=copy.deepcopy(encoded[model].negative),
        width=64,
        height=64,
        steps=2,
        guidance_scale=7.0,
        seed=1,
    )
    return denoiser_service_pb2.DenoiseRequest(**{**fields, **changes})


def tiny_decode(**changes) -> decoder_service_pb2.DecodeRequest:
    fields = dict(model="tiny/sd15", latents=tensor(np.zeros((1, 4, 8, 8), np.float32)))
    return decoder_service_pb2.DecodeRequest(**{**fields, **changes})


def tiny_request(role: str, encoded: dict):
    """The small valid request a role must still answer after a bad one."""
    return {
        "gateway": tiny_generate,
        "encoder": tiny_encode,
        "denoiser": lambda: tiny_denoise(encoded),
        "decoder": tiny_decode,
    }[role]()


def answer(role: str, responses: list) -> bytes:
    """The substance of a valid request's answer (image, conditioning or latents bytes); asserts there is one."""
    if role == "gateway":
        data = b"".join(r.image.image.data for r in responses if r.HasField("image"))
    elif role == "encoder":
        data = responses[0].positive.prompt_embeds.data
    elif role == "denoiser":
        data = responses[-1].result.latents.data if responses[-1].HasField("result") else b""
    else:
        data = b"".join(image.data for image in responses[0].images)
    assert data, f"{role} answered without a result"
    return data


def unit(**fields) -> common_pb2.ControlNetUnit:
    """A ControlNet unit for tiny/sd15 with a valid guide image unless overridden."""
    return common_pb2.ControlNetUnit(**{"model": "tiny/controlnet-sd15", "guide_image": GUIDE_PNG, **fields})


def serving(services) -> dict[str, bool]:
    """Each role: its process is alive and standard health says SERVING."""
    state = {}
    for role in ROLES:
        alive = psutil.pid_exists(services.pids[role]) and psutil.Process(services.pids[role]).status() not in (
            psutil.STATUS_ZOMBIE,
            psutil.STATUS_DEAD,
        )
        with open_channel(services.addresses[role]) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                healthy = False
        state[role] = alive and healthy
    return state


def rss_bytes(services) -> dict[str, int]:
    """Resident memory of each role's process."""
    return {role: psutil.Process(services.pids[role]).memory_info().rss for role in ROLES}
