"""Torch threads from the CPUs a process may use and the replicas sharing its host (issue 15, finding 10)."""

from __future__ import annotations

from triptych.serving.threads import cgroup_cpu_limit, choose_threads, usable_cpus


def test_cgroup_quota_v2_and_v1_and_unlimited(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(v1) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_usable_cpus_is_bounded_by_the_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1  # half a CPU rounds up to one thread
    assert usable_cpus(tmp_path / "absent") >= 1


def test_threads_are_shared_among_replicas_and_oversubscription_warns():
    assert choose_threads(0, 1, 8) == (8, None)
    assert choose_threads(0, 2, 2) == (1, None)  # two replicas on 2 CPUs: one thread each, as measured fastest
    assert choose_threads(0, 4, 2)[0] == 1 and "oversubscribe" in choose_threads(0, 4, 2)[1]
    threads, warning = choose_threads(2, 2, 2)  # an explicit setting wins, with a warning
    assert threads == 2 and "4 threads" not in warning and "2 torch process(es) x 2 threads" in warning
