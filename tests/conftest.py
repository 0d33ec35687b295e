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


def pytest_addoption(parser):
    parser.addoption("--demo-assets", type=Path, help="the demo family for the demo tests (default: assets/demo)")


@pytest.fixture(scope="session")
def demo_assets(request) -> tuple[Path, list[str]]:
    """The demo family's folder (assets/demo, or --demo-assets) and what is wrong with it (docs/demo-model.md,
    "Committed weights"): ["absent"] when there is no such folder."""
    from triptych.demo.assets import default_source, problems

    source = request.config.getoption("--demo-assets") or default_source()
    return source, (problems(source) if source.is_dir() else ["absent"])


@pytest.fixture(scope="session")
def model_root(tmp_path_factory, demo_assets) -> Path:
    """The tiny family, built once per session with `triptych models build-tiny`'s own code, and the demo family
    from its committed assets when they are there and sound (`triptych models install-demo`'s code)."""
    from triptych.demo.assets import install
    from triptych.model_builders.tiny import build_tiny_family

    root = tmp_path_factory.mktemp("models")
    build_tiny_family(root)
    source, issues = demo_assets
    if not issues:
        install(source, root)
    return root


@pytest.fixture(scope="session")
def demo_root(model_root, demo_assets) -> Path:
    """The session store, for tests of the demo family: skips only when its folder is absent (the weights not yet
    committed); present but broken (a file missing or changed against its manifest) is an error, never a skip."""
    source, issues = demo_assets
    if issues == ["absent"]:
        pytest.skip(f"no demo family at {source}: its weights are not committed (docs/demo-model.md)")
    if issues:
        pytest.fail(f"the demo family at {source} is broken:\n  " + "\n  ".join(issues), pytrace=False)
    return model_root


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
