"""How many torch threads a process runs: from the CPUs it may use, shared with the other replicas on its host.

torch's default is the machine's core count, whatever the process may use: in a container limited to 2 CPUs on a
64-core node it starts 64 OpenMP threads, and two replicas on one 2-core host each start 2, which measured 5x slower
than one thread each (issue 15, finding 10). So the default here counts the CPUs the process may run on (its
affinity mask, then the cgroup's CPU quota, v2 `cpu.max` or v1 `cpu.cfs_quota_us`) and divides them among
`replicas_per_host` torch processes. An explicit `torch_threads` wins; a sum beyond the CPUs draws a warning.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The cgroup's CPU quota in CPUs (e.g. 1.5), None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 = unlimited
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may use: its affinity mask, bounded by the cgroup's quota (rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def choose_threads(configured: int, replicas_per_host: int, cpus: int) -> tuple[int, str | None]:
    """(torch threads, a warning or None): `configured` when set (> 0), else the CPUs shared among the replicas."""
    replicas = max(1, replicas_per_host)
    threads = configured if configured > 0 else max(1, cpus // replicas)
    warning = None
    if threads * replicas > cpus:
        warning = (
            f"{replicas} torch process(es) x {threads} threads on {cpus} usable CPUs oversubscribe them: expect "
            "much slower steps; set TRIPTYCH_TORCH_THREADS or TRIPTYCH_REPLICAS_PER_HOST (docs/decisions.md)"
        )
    return threads, warning
