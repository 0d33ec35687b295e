"""The one tensor codec: torch.Tensor <-> triptych.v1.Tensor (raw little-endian C-contiguous bytes)."""

from __future__ import annotations

import math
import sys
import warnings

import torch

from triptych.core.errors import InvalidArgument
from triptych.v1 import tensor_pb2

_TO_WIRE = {
    torch.float32: tensor_pb2.DATA_TYPE_FLOAT32,
    torch.float16: tensor_pb2.DATA_TYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DATA_TYPE_BFLOAT16,
    torch.uint8: tensor_pb2.DATA_TYPE_UINT8,
    torch.int64: tensor_pb2.DATA_TYPE_INT64,
}
_FROM_WIRE = {wire: dtype for dtype, wire in _TO_WIRE.items()}
_BIG_ENDIAN = sys.byteorder == "big"


def encode_tensor(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Serialises a tensor (any device) into the wire format; bit-exact for every supported dtype."""
    if tensor.dtype not in _TO_WIRE:
        raise TypeError(f"dtype {tensor.dtype} has no wire type")
    host = tensor.detach().to("cpu").contiguous()
    if _BIG_ENDIAN:  # pragma: no cover - every supported platform is little-endian
        host = host.view(torch.uint8).flip(-1)
    # A byte view of the storage: no element-wise conversion, so NaN payloads and -0.0 survive.
    raw = host.reshape(-1).view(torch.uint8).numpy().tobytes() if host.numel() else b""
    return tensor_pb2.Tensor(dtype=_TO_WIRE[tensor.dtype], shape=list(host.shape), data=raw)


def decode_tensor(message: tensor_pb2.Tensor, field: str, *, allow_non_finite: bool = False) -> torch.Tensor:
    """Parses a wire tensor, zero-copy over the message bytes; INVALID_ARGUMENT naming `field` if malformed.

    The result is read-only memory owned by the message; callers that modify it must clone first.
    """
    dtype = _FROM_WIRE.get(message.dtype)
    if dtype is None:
        raise InvalidArgument.one(f"{field}.dtype", f"unsupported dtype {message.dtype}")
    shape = list(message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument.one(f"{field}.shape", f"negative dimension in {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected != len(message.data):
        raise InvalidArgument.one(
            f"{field}.data", f"shape {shape} x {itemsize} bytes needs {expected} bytes, got {len(message.data)}"
        )
    if expected == 0:
        try:
            return torch.empty(shape, dtype=dtype)
        except RuntimeError as exc:  # e.g. [2**62, 2**62, 0]: no elements, but torch cannot compute its strides
            raise InvalidArgument.one(f"{field}.shape", f"dimensions too large in {shape}") from exc
    with warnings.catch_warnings():  # protobuf bytes are immutable; we never write through this view
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(message.data, dtype=torch.uint8)
    tensor = flat.view(dtype).reshape(shape)
    if not allow_non_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidArgument.one(f"{field}.data", "contains NaN or Inf")
    return tensor
