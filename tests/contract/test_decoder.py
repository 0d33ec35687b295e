"""DecoderService in-process: latents in, a PNG of 8x their size out; latents whose bytes do not fit their shape
named."""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image

from tests.e2e.stubs import tiny_decode
from triptych.client import field_violations
from triptych.v1 import tensor_pb2


def test_decode_returns_a_png_eight_times_the_latents(stubs):
    reply = stubs.decoder.Decode(tiny_decode(), timeout=60)
    [image] = reply.images
    assert image.mime_type == "image/png" and (image.width, image.height) == (64, 64)
    assert Image.open(io.BytesIO(image.data)).format == "PNG"


def test_latents_whose_bytes_do_not_fit_their_shape_are_invalid_argument(stubs):
    short = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 4, 8, 8], data=b"\0" * 100)
    with pytest.raises(grpc.RpcError) as raised:
        stubs.decoder.Decode(tiny_decode(latents=short), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(raised.value)] == ["latents.data"]
