"""The one tensor codec: torch.Tensor <-> triptych.v1.Tensor (raw little-endian C-contiguous bytes)."""

from __future__ import annotations

import math
import sys
import warnings

import torch

from triptych.serving import shm
from triptych.serving.errors import InvalidArgument
from triptych.v1 import tensor_pb2

_TO_WIRE = {
    torch.float32: tensor_pb2.DATA_TYPE_FLOAT32,
    torch.float16: tensor_pb2.DATA_TYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DATA_TYPE_BFLOAT16,
    torch.uint8: tensor_pb2.DATA_TYPE_UINT8,
    torch.int64: tensor_pb2.DATA_TYPE_INT64,
}
_FROM_WIRE = {wire: dtype for dtype, wire in _TO_WIRE.items()}
_WIDER_SUM = {torch.float16: torch.float32, torch.bfloat16: torch.float64, torch.float32: torch.float64}
_BIG_ENDIAN = sys.byteorder == "big"


def encode_tensor(tensor: torch.Tensor, into: shm.Writer | None = None) -> tensor_pb2.Tensor:
    """Serialises a tensor (any device) into the wire format; bit-exact for every supported dtype.

    With `into`, the bytes go to the caller's shared-memory range when they fit there, else in `data`.
    """
    if tensor.dtype not in _TO_WIRE:
        raise TypeError(f"dtype {tensor.dtype} has no wire type")
    host = tensor.detach().to("cpu").contiguous()
    if _BIG_ENDIAN:  # pragma: no cover - every supported platform is little-endian
        host = host.view(torch.uint8).flip(-1)
    # A byte view of the storage: no element-wise conversion, so NaN payloads and -0.0 survive.
    raw = host.reshape(-1).view(torch.uint8).numpy() if host.numel() else b""
    message = tensor_pb2.Tensor(dtype=_TO_WIRE[tensor.dtype], shape=list(host.shape))
    placed = into.place(raw) if into is not None and len(raw) else None
    if placed is not None:
        message.shared_memory.CopyFrom(placed)
    else:
        message.data = raw.tobytes() if len(raw) else b""
    return message


ALIGN = 64  # bytes; what torch's CPU allocator gives every tensor


def aligned_bytes(data: bytes) -> torch.Tensor:
    """`data` as a uint8 tensor starting on an ALIGN boundary: a view when it already does, else a copy."""
    with warnings.catch_warnings():  # protobuf bytes are immutable; we never write through this view
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat if flat.data_ptr() % ALIGN == 0 else flat.clone()


def decode_tensor(message: tensor_pb2.Tensor, field: str, *, allow_non_finite: bool = False) -> torch.Tensor:
    """Parses a wire tensor; INVALID_ARGUMENT naming `field` if malformed.

    The result always starts on a 64-byte boundary, as torch's own allocations do: BLAS kernels may sum in
    another order for unaligned operands (MKL's sgemm does for some shapes, measured here), and the same request
    must give the same bits whether its tensors came as bytes, through shared memory, or from diffusers in-process.
    Aligned message bytes are used in place (read-only memory owned by the message: callers that modify it must
    clone first); unaligned ones, and shared-memory ranges, are copied into a fresh tensor.
    """
    dtype = _FROM_WIRE.get(message.dtype)
    if dtype is None:
        raise InvalidArgument.one(f"{field}.dtype", f"unsupported dtype {message.dtype}")
    shape = list(message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument.one(f"{field}.shape", f"negative dimension in {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    data = message.data  # read once: some protobuf runtimes copy the bytes on every access
    if message.HasField("shared_memory"):
        region = message.shared_memory
        if data:
            raise InvalidArgument.one(f"{field}.shared_memory", "set data or shared_memory, not both")
        if region.byte_size != expected:
            raise InvalidArgument.one(
                f"{field}.shared_memory.byte_size",
                f"shape {shape} x {itemsize} bytes needs {expected} bytes, got {region.byte_size}",
            )
    elif expected != len(data):
        raise InvalidArgument.one(
            f"{field}.data", f"shape {shape} x {itemsize} bytes needs {expected} bytes, got {len(data)}"
        )
    if expected == 0:
        try:
            return torch.empty(shape, dtype=dtype)
        except RuntimeError as exc:  # e.g. [2**62, 2**62, 0]: no elements, but torch cannot compute its strides
            raise InvalidArgument.one(f"{field}.shape", f"dimensions too large in {shape}") from exc
    if message.HasField("shared_memory"):
        flat = torch.empty(expected, dtype=torch.uint8)
        shm.read_into(region, f"{field}.shared_memory", flat.numpy())
    else:
        flat = aligned_bytes(data)
    tensor = flat.view(dtype).reshape(shape)
    if not allow_non_finite and tensor.is_floating_point() and not all_finite(tensor):
        raise InvalidArgument.one(f"{field}.data", "contains NaN or Inf")
    return tensor


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or infinite.

    For 16- and 32-bit floats this is one sum in a wider type, which is NaN or infinite exactly when an element
    is: no sum of finite float16 values can overflow a float32 (it would take 10^33 of them at 65504), nor one of
    finite bfloat16 or float32 values a float64. A tenth of the time of isfinite().all(), which writes a mask
    first: 13 against 140 µs for SDXL's [1, 77, 2048] float16 here.
    """
    wider = _WIDER_SUM.get(tensor.dtype)
    if wider is None:  # float64: its finite values can overflow their own sum
        return bool(torch.isfinite(tensor).all())
    return bool(torch.isfinite(tensor.sum(dtype=wider)))
