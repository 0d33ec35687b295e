"""Torch threads in the real processes: the usable CPUs shared among TRIPTYCH_REPLICAS_PER_HOST replicas."""

from __future__ import annotations

from tests.e2e.processes import serve_role
from triptych.client import open_channel
from triptych.serving.threads import usable_cpus
from triptych.v1 import runtime_service_pb2, runtime_service_pb2_grpc


def test_a_process_takes_its_share_of_the_cpus(model_root):
    cpus = usable_cpus()
    with (
        serve_role("decoder", model_root, {"TRIPTYCH_REPLICAS_PER_HOST": "2"}) as (_, address),
        open_channel(address) as channel,
    ):
        info = runtime_service_pb2_grpc.RuntimeServiceStub(channel).GetRuntimeInfo(
            runtime_service_pb2.GetRuntimeInfoRequest()
        )
    assert info.torch_threads == max(1, cpus // 2), "two replicas on this host: half the usable CPUs each"
