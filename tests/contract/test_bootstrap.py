"""What the server bootstrap adds to every role: health, reflection and RuntimeService."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.e2e.stubs import ROLES, tiny_generate
from triptych.client import open_channel
from triptych.v1 import runtime_service_pb2, runtime_service_pb2_grpc


@pytest.mark.parametrize("role", ROLES)
def test_health_says_serving_for_the_server_and_each_service(in_process, role):
    with open_channel(in_process.addresses[role]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ["", *in_process.services[role].service_names]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


@pytest.mark.parametrize("role", ROLES)
def test_reflection_lists_the_roles_services(in_process, role):
    with open_channel(in_process.addresses[role]) as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        listed = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {*in_process.services[role].service_names, "triptych.v1.RuntimeService"} <= listed


def test_runtime_service_lists_the_components_each_role_loaded(in_process, stubs):
    stubs.call("gateway", tiny_generate())
    held = {}
    for role in ROLES:
        with open_channel(in_process.addresses[role]) as channel:
            info = runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
                runtime_service_pb2.GetRuntimeInfoRequest(), timeout=10
            )
        assert info.role == role
        held[role] = {(c.model, c.component) for c in info.loaded_components}
    assert {("tiny/sd15", "text_encoder"), ("tiny/sd15", "tokenizer")} <= held["encoder"]
    assert ("tiny/sd15", "unet") in held["denoiser"]
    assert ("tiny/sd15", "vae") in held["decoder"]
    assert held["gateway"] == set()
