"""Issue 15, finding 5: running out of memory is RESOURCE_EXHAUSTED everywhere, never INTERNAL with the allocator's
raw text; a model load that runs out of memory is not reported as a damaged model."""

from __future__ import annotations

import grpc
import pytest
import torch

from triptych.runtime.components import ComponentCache
from triptych.serving.errors import is_out_of_memory, status_for


def cpu_allocator_error() -> RuntimeError:
    try:
        torch.empty(10**14, dtype=torch.uint8)  # 100 TB: the CPU allocator refuses at once
    except RuntimeError as exc:
        return exc
    pytest.skip("this machine allocated 100 TB")


@pytest.mark.parametrize("make", [cpu_allocator_error, lambda: MemoryError(), lambda: torch.OutOfMemoryError("x")])
def test_allocation_failures_are_resource_exhausted_without_the_raw_text(make):
    exc = make()
    assert is_out_of_memory(exc)
    status = status_for("/triptych.v1.DecoderService/Decode", exc)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in status.details and "alloc_cpu" not in status.details


def test_other_errors_stay_internal():
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert status_for("/m", KeyError("x")).code == grpc.StatusCode.INTERNAL


def test_a_load_that_runs_out_of_memory_is_not_a_damaged_model():
    def load():
        raise cpu_allocator_error()

    with pytest.raises(RuntimeError) as raised:
        ComponentCache(1).get("some/model", load)
    assert is_out_of_memory(raised.value)
