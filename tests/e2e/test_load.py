"""Load: 200 concurrent Generate calls on the session's gateway. Every call is answered (an image, or
RESOURCE_EXHAUSTED when a bounded queue is full, or DEADLINE_EXCEEDED), none is lost or hangs, concurrency changes
no image, and the services serve normally afterwards. Run with -s to see the counts.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait

import grpc

from tests.e2e.stubs import open_stubs, serving, tiny_generate

CALLS = 200
DEADLINE_S = 100.0
ACCEPTED = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


def request(i: int):
    """Tiny requests over two models and a few seeds, so that identical ones can be compared."""
    return tiny_generate(model=("tiny/sd15", "tiny/sdxl")[i % 2], seed=i % 5, steps=2)


def test_two_hundred_concurrent_generate_calls_are_all_answered(services):
    stubs = open_stubs(services)
    try:
        # What each distinct request gives alone, first (it also loads both models).
        alone = {(i % 2, i % 5): image_bytes(stubs.call("gateway", request(i))) for i in range(10)}

        def one(i: int) -> tuple[str, bytes, float]:
            started = time.perf_counter()
            try:
                images = image_bytes(stubs.call("gateway", request(i), timeout=DEADLINE_S))
                return "OK", images, time.perf_counter() - started
            except grpc.RpcError as error:
                return error.code().name, error.details().encode(), time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=CALLS) as pool:
            futures = [pool.submit(one, i) for i in range(CALLS)]
            done, not_done = wait(futures, timeout=DEADLINE_S + 30)
        wall = time.perf_counter() - started
        assert not not_done, f"{len(not_done)} calls never returned"
        outcomes = [future.result() for future in futures]
        counts = Counter(code for code, _, _ in outcomes)
        latencies = sorted(seconds for code, _, seconds in outcomes if code == "OK")
        print(
            f"\nload: {CALLS} concurrent Generate calls in {wall:.1f}s: {dict(counts)}"
            + (f"; OK latency p50 {statistics.median(latencies):.2f}s max {latencies[-1]:.2f}s" if latencies else "")
        )
        assert sum(counts.values()) == CALLS, "a call was lost"
        assert set(counts) <= ACCEPTED, counts
        assert counts["OK"] > 0
        for i, (code, images, _) in enumerate(outcomes):
            if code == "OK":
                assert images == alone[i % 2, i % 5], f"call {i}: concurrency changed the image"
        # Nothing is wedged: a small request is answered at once, with the same bytes as before the load.
        assert image_bytes(stubs.call("gateway", request(0), timeout=30)) == alone[0, 0]
        state = serving(services)
        assert all(state.values()), state
    finally:
        stubs.close()


def image_bytes(responses: list) -> bytes:
    images = [event.image.image.data for event in responses if event.HasField("image")]
    assert len(images) == 1
    return images[0]
