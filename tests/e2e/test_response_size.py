"""Issue 18: a large image never fails after the work is done. A caller says what it can receive
(GenerateRequest.max_response_bytes; the Python client sends its own limit) and the gateway refuses up front a
request whose image could exceed it, before any downstream work."""

from __future__ import annotations

import grpc
import pytest

from tests.e2e.stubs import tiny_generate
from tests.e2e.test_admission import _encodes
from triptych.client import ImageClient, field_violations


def test_a_request_whose_image_could_exceed_the_callers_limit_is_refused_before_any_work(services):
    small_limit = 1 << 20  # 1 MiB: a 1024x1024 RGB image alone is 3 MiB uncompressed
    with ImageClient(services.gateway, max_message_bytes=small_limit) as client:
        before = _encodes(services.addresses["encoder"])
        with pytest.raises(grpc.RpcError) as raised:
            client.generate(tiny_generate(positive_prompt="too large for my channel", width=1024, height=1024))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in field_violations(raised.value)] == ["max_response_bytes"]
        assert _encodes(services.addresses["encoder"]) == before, "refused before the encoder did any work"
        (image,) = client.generate(tiny_generate())  # 64x64 fits a 1 MiB channel
        assert image.image.data


def test_an_explicit_limit_is_checked_and_unset_means_no_check(services):
    from triptych.client import open_channel
    from triptych.v1 import image_service_pb2_grpc

    with open_channel(services.gateway) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Generate(tiny_generate(width=512, height=512, max_response_bytes=100_000)))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert any(event.HasField("image") for event in stub.Generate(tiny_generate()))  # no field: no check
