"""ComputeThreads: one steady thread per key, results and errors carried back, streams closed on their thread."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from triptych.runtime.compute import ComputeThreads
from triptych.serving.errors import Cancelled, NotFound
from triptych.serving.server import keep_freed_memory


def test_each_key_runs_on_one_steady_thread_of_its_own():
    compute = ComputeThreads("t", keep=4)
    names = {key: {compute.run(key, threading.get_ident) for _ in range(5)} for key in "ab"}
    assert all(len(seen) == 1 for seen in names.values())
    assert names["a"] != names["b"]
    assert threading.get_ident() not in names["a"] | names["b"]


def test_errors_are_raised_in_the_callers_thread_with_their_type():
    compute = ComputeThreads("t")

    def fail():
        raise NotFound("model", "no such model")

    with pytest.raises(NotFound):
        compute.run("a", fail)

    def failing_stream():
        yield 1
        raise NotFound("model", "gone")

    got = []
    with pytest.raises(NotFound):
        for item in compute.stream("a", failing_stream):
            got.append(item)
    assert got == [1]


def test_a_stream_waiting_behind_other_work_ends_when_its_caller_goes_away():
    compute = ComputeThreads("t")
    release, started = threading.Event(), threading.Event()
    compute._executor("a").submit(lambda: (started.set(), release.wait(10)))  # a long job holds the thread
    assert started.wait(5)
    ran = threading.Event()
    active = [True]

    class Payload:  # stands for what a job carries (tensors, guide images)
        pass

    payload = Payload()
    held = weakref.ref(payload)

    def job(carried):
        ran.set()
        yield carried

    stream = compute.stream("a", lambda carried=payload: job(carried), is_active=lambda: active[0])
    del payload
    raised = []

    def wait():
        try:
            next(stream)
        except Exception as exc:  # noqa: BLE001 - checked below, in the test's thread
            raised.append(exc)

    waited = threading.Thread(target=wait, daemon=True)
    began = time.perf_counter()
    waited.start()
    time.sleep(0.1)
    active[0] = False
    waited.join(5)
    assert time.perf_counter() - began < 2.0, "freed within the poll, not at its turn"
    assert len(raised) == 1 and isinstance(raised[0], Cancelled)
    assert not ran.is_set(), "the long job still runs"
    gc.collect()
    assert held() is None, "the queued task no longer holds the job"
    release.set()
    assert compute.run("a", lambda: "free again") == "free again"


def test_closing_a_stream_closes_its_iterator_on_its_thread():
    compute = ComputeThreads("t")
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield time.sleep(0.001)
        finally:
            closed.set()

    stream = compute.stream("a", endless)
    next(stream)
    stream.close()
    assert closed.wait(5)
    assert compute.run("a", lambda: "free again") == "free again"


def test_the_oldest_keys_threads_retire_beyond_keep():
    compute = ComputeThreads("t", keep=2)
    for key in "abc":
        compute.run(key, lambda: None)
    assert list(compute._executors) == ["b", "c"]


def test_malloc_tuning_applies_on_glibc():
    assert keep_freed_memory()
