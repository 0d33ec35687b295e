"""BoundedQueue: a bound per key, and no memory of keys once their requests are done (the gateway's keys are the
model ids callers send, so a table of every id ever seen would grow without bound)."""

from __future__ import annotations

import pytest

from triptych.runtime.admission import BoundedQueue
from triptych.serving.errors import ResourceExhausted


def test_a_key_is_bounded_and_forgotten_when_its_requests_are_done():
    queue = BoundedQueue(1, "denoise")
    with queue.slot("a"):
        with pytest.raises(ResourceExhausted, match="'a'"), queue.slot("a"):
            pass
        assert queue.depths() == {"a": 1} and queue.rejected == 1
    for n in range(1000):
        with queue.slot(f"caller-chosen-{n}"):
            pass
    assert queue._counts == {}
