"""Session fixtures: the tiny model family (built once), the four real service processes (started once) and the
diffusers oracle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning, here and in every process the tests start (they inherit this): the
# test process and the services share two cores, and threads spinning in one starved the others (a tiny 64x64
# pipeline call took 4 to 11 s instead of 0.1 to 0.7 s while the cores were busy). Results do not change: the
# threads and how work is split among them stay the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
TINY_BASE_MODELS = "flux-dev=tiny/flux,sd3=tiny/sd3,flux-schnell=tiny/missing-schnell"


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """The tiny family, built once per session with `triptych models build-tiny`'s own code."""
    from triptych.model_builders.tiny import build_tiny_family

    root = tmp_path_factory.mktemp("models")
    build_tiny_family(root)
    return root


@pytest.fixture(scope="session")
def services(model_root):
    """`triptych serve --port 0` exactly as a user starts it: four OS processes on loopback (a Served: the
    address and pid of each role), with one setting: the tiny folders are the bases of SD3/FLUX transformer files
    (tests/e2e/test_transformer_files.py; flux-schnell's base is absent on purpose)."""
    from tests.e2e.processes import serving

    with serving(None, model_root, env={"TRIPTYCH_BASE_MODELS": TINY_BASE_MODELS}) as served:
        yield served


@pytest.fixture(scope="session")
def client(services):
    from triptych.client import ImageClient

    with ImageClient(services.gateway) as image_client:
        yield image_client


@pytest.fixture(scope="session")
def oracle(model_root):
    """The chain-vs-diffusers oracle; each model's diffusers pipeline is loaded once per session."""
    from tests.e2e.reference import Oracle

    return Oracle(model_root)
