"""Shared-memory regions of a killed gateway are found and removed; live ones and other callers' objects are not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from triptych.serving import shm

KILLED_OWNER = """
import os, signal
from triptych.serving.shm import OwnedRegion
region = OwnedRegion(1 << 20)
print(region.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_owners_regions_are_swept_and_live_ones_kept():
    done = subprocess.run([sys.executable, "-c", KILLED_OWNER], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    orphan = shm.SHM_DIR + done.stdout.strip()
    assert os.path.exists(orphan), "SIGKILL left the region behind"
    live = shm.OwnedRegion(4096)
    foreign = shm.SHM_DIR + "/triptych-a-callers-own-region"
    with open(foreign, "wb"):
        pass
    try:
        assert shm.sweep_orphans() >= 1
        assert not os.path.exists(orphan)
        assert os.path.exists(shm.SHM_DIR + live.name), "a region whose owner is alive stays"
        assert os.path.exists(foreign), "objects under other names belong to other callers"
    finally:
        live.close()
        os.unlink(foreign)
    assert not os.path.exists(shm.SHM_DIR + live.name)


def test_a_gateway_sweeps_when_it_starts_its_pool():
    done = subprocess.run([sys.executable, "-c", KILLED_OWNER], capture_output=True, text=True, timeout=60)
    orphan = shm.SHM_DIR + done.stdout.strip()
    pool = shm.RegionPool(4096)
    try:
        assert not os.path.exists(orphan)
    finally:
        pool.close()
