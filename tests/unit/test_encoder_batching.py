"""The encoder's dynamic batcher and result cache, without models: grouping, bounds, errors, LRU by bytes."""

from __future__ import annotations

import threading
import time

from triptych.encoder.batching import Batcher
from triptych.encoder.cache import ByteBoundedLRU


class Recorder:
    """A `run` that records each call's key and works, slowly enough for others to queue behind it."""

    def __init__(self, delay: float = 0.05):
        self.calls: list[tuple[str, list]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, key, works):
        time.sleep(self.delay)
        with self.lock:
            self.calls.append((key, list(works)))
        return [f"{key}:{work}" for work in works]


def submit_all(batcher: Batcher, items: list[tuple[str, str, int]], prepare_s: float = 0.0) -> dict:
    """Each item from its own thread, announced, then submitted after `prepare_s` (as the engine tokenizes)."""
    results, threads = {}, []
    for key, work, rows in items:

        def go(key=key, work=work, rows=rows):
            with batcher.announced() as submit:
                time.sleep(prepare_s)
                results[work] = submit(key, work, rows)

        threads.append(threading.Thread(target=go))
        threads[-1].start()
        time.sleep(0.002)  # arrival order
    for thread in threads:
        thread.join()
    return results


def test_concurrent_submissions_with_one_key_share_a_call():
    run = Recorder()
    batcher = Batcher(run, max_rows=16, max_wait_s=0.2, name="test")
    results = submit_all(batcher, [("m", f"w{i}", 2) for i in range(6)], prepare_s=0.02)
    assert results == {f"w{i}": f"m:w{i}" for i in range(6)}, "each caller gets its own result"
    assert len(run.calls) == 1 and batcher.shared_calls == 1 and batcher.works == 6 and batcher.rows == 12


def test_keys_never_mix_and_rows_are_bounded():
    run = Recorder()
    batcher = Batcher(run, max_rows=4, max_wait_s=0.2, name="test")
    items = [("a", "a1", 2), ("b", "b1", 2), ("a", "a2", 2), ("a", "a3", 2), ("a", "big", 9)]
    results = submit_all(batcher, items, prepare_s=0.02)
    assert results["big"] == "a:big", "a submission larger than max_rows runs alone"
    for key, works in run.calls:
        assert all(results[w].startswith(f"{key}:") for w in works)
        assert len(works) == 1 or sum(9 if w == "big" else 2 for w in works) <= 4
    assert sorted(w for _, works in run.calls for w in works) == sorted(w for _, w, _ in items)


def test_one_failing_work_fails_only_its_caller_and_a_failing_call_fails_all():
    def run(key, works):
        if key == "broken":
            raise ValueError("the whole batch")
        return [ValueError(f"bad {w}") if w == "bad" else w for w in works]

    batcher = Batcher(run, max_rows=8, max_wait_s=0.05, name="test")
    errors, results = {}, {}

    def go(key, work):
        try:
            results[work] = batcher.submit(key, work, 1)
        except ValueError as exc:
            errors[work] = str(exc)

    threads = [threading.Thread(target=go, args=a) for a in [("k", "good"), ("k", "bad"), ("broken", "x")]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"good": "good"} and errors == {"bad": "bad bad", "x": "the whole batch"}
    assert batcher.submit("k", "after", 1) == "after", "the worker survives errors"


def test_a_lone_caller_does_not_wait():
    run = Recorder(delay=0.0)
    batcher = Batcher(run, max_rows=16, max_wait_s=5.0, name="test")
    started = time.perf_counter()
    submit_all(batcher, [("m", "alone", 1)])
    assert time.perf_counter() - started < 1.0, "nobody else announced: no reason to wait out max_wait"


def test_announced_callers_still_preparing_are_waited_for():
    run = Recorder(delay=0.0)
    batcher = Batcher(run, max_rows=16, max_wait_s=2.0, name="test")
    submit_all(batcher, [("m", f"w{i}", 1) for i in range(4)], prepare_s=0.05)
    assert len(run.calls) == 1, run.calls


def test_wait_zero_still_batches_what_queued_while_busy():
    run = Recorder(delay=0.1)
    batcher = Batcher(run, max_rows=16, max_wait_s=0.0, name="test")
    submit_all(batcher, [("m", f"w{i}", 1) for i in range(5)])
    assert len(run.calls) < 5 and batcher.shared_calls >= 1


def test_lru_is_bounded_by_bytes():
    cache = ByteBoundedLRU(100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # "a" is now the most recently used
    cache.put("c", "C", 40)  # 120 > 100: evicts "b", the least recently used
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    assert (cache.bytes, cache.evictions, cache.hits, cache.misses) == (80, 1, 3, 1)
    cache.put("huge", "H", 101)
    assert cache.get("huge") is None and len(cache) == 2, "a value larger than the bound is not stored"


def test_a_zero_bound_disables_the_cache():
    cache = ByteBoundedLRU(0)
    cache.put("a", "A", 0)
    assert cache.get("a") is None and cache.misses == 0 and len(cache) == 0
