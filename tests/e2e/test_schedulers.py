"""Every scheduler in the table (and the suffixed variants) through the chain equals diffusers."""

from __future__ import annotations

import pytest

from triptych.rules.scheduler_table import TABLE

NAMES = [row.name for row in TABLE] + [
    "Euler Karras",
    "LMS Karras",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE Karras",
    "DPM++ SDE Karras",
    "DPM++ 3M SDE Exponential",
    "DPM2 a Karras",
    "UniPC Karras",
    "EulerAncestralDiscreteScheduler",
]


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_equals_diffusers(client, oracle, name):
    model = "tiny/sdxl" if name in ("DPM++ 2M SDE Karras", "Heun") else "tiny/sd15"
    request = dict(
        model=model,
        positive_prompt="a red fox",
        negative_prompt="blurry",
        seed=13,
        scheduler=name,
        width=64,
        height=64,
        steps=6,
        cfg_scale=6.0,
    )
    oracle.compare(client, request)


def test_list_schedulers_rpc(services):
    from triptych.client import open_channel
    from triptych.v1 import denoiser_service_pb2, denoiser_service_pb2_grpc

    with open_channel(services.addresses["denoiser"]) as channel:
        rows = (
            denoiser_service_pb2_grpc.DenoiserServiceStub(channel)
            .ListSchedulers(denoiser_service_pb2.ListSchedulersRequest())
            .schedulers
        )
    by_name = {row.name: row for row in rows}
    assert by_name["DPM++ 2M SDE Karras"].class_name == "DPMSolverMultistepScheduler"
    assert "use_karras_sigmas=True" in by_name["DPM++ 2M SDE Karras"].options
    assert "DDIM Karras" not in by_name  # DDIM has no Karras option
    assert {row.name for row in TABLE} <= set(by_name)
