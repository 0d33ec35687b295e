"""The gateway's downstream calls for one Generate: deadline, cancellation together, relayed errors, and how
tensors travel (a shared-memory region the gateway owns, or bytes when a backend cannot use it).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time

import grpc

from triptych.serving import shm
from triptych.serving.errors import Relayed
from triptych.serving.timing import StageClock

log = logging.getLogger(__name__)

# Downstream field names that GenerateRequest spells differently, for relayed errors.
DOWNSTREAM_FIELDS = {"loras": "lora"}


class Calls:
    """Downstream calls in flight for one Generate; cancelled together when the caller goes away."""

    def __init__(self, context: grpc.ServicerContext, transport: Transport):
        self._context = context
        self.transport = transport
        self.clock = StageClock()
        self._lock = threading.Lock()
        self._active: list = []
        self._cancelled = False
        context.add_callback(self.cancel_all)

    def timeout(self) -> float | None:
        remaining = self._context.time_remaining()
        return remaining if remaining is not None and remaining < 1e8 else None

    def track(self, call):
        """Registers a downstream call; one started after the caller went away is cancelled at once."""
        with self._lock:
            self._active.append(call)
            if self._cancelled:
                call.cancel()
        return call

    def relayed(self, exc: grpc.RpcError, renames: dict[str, str] = DOWNSTREAM_FIELDS) -> Relayed:
        """A downstream error as the caller gets it. CANCELLED that the gateway did not cause (its caller is still
        there) means the backend stopped under the call, a drain past its grace: UNAVAILABLE, which callers retry,
        as for a backend that was gone before the call."""
        if exc.code() == grpc.StatusCode.CANCELLED and not self._cancelled:
            return Relayed(BackendStopped(exc.details()))
        return Relayed(exc, renames)

    def cancel_all(self) -> None:
        with self._lock:
            self._cancelled = True
            for call in self._active:
                call.cancel()

    def unary(
        self, stage: str, method, request, renames: dict[str, str] = DOWNSTREAM_FIELDS, output: str | None = None
    ):
        """One downstream call of `stage` (for the timing trailer); again in bytes if the backend refused shared
        memory."""
        started = time.perf_counter()
        self.transport.prepare(request, output)
        try:
            return self._unary(stage, started, method, request, renames)
        except Relayed as exc:
            if not self.transport.refused(exc):
                raise
        self.transport.prepare(request, output)
        return self._unary(stage, started, method, request, renames)

    def _unary(self, stage: str, started: float, method, request, renames: dict[str, str]):
        try:
            call = self.track(method.future(request, timeout=self.timeout()))
            response = call.result()
            self.clock.record(stage, time.perf_counter() - started, call.trailing_metadata())
            return response
        except grpc.RpcError as exc:
            raise self.relayed(exc, renames) from exc
        except grpc.FutureCancelledError as exc:
            raise Relayed(CancelledByCaller()) from exc


class SharedMemory:
    """The gateway's shared-memory state: whether it still offers regions, and the pool they come from.

    Each Generate's region is split in fixed slices, one per kind of downstream output. A backend that cannot use
    shared memory (FAILED_PRECONDITION, SHARED_MEMORY) gets the call again in bytes, and the gateway stops offering
    it to anyone.
    """

    # An SDXL encode at the prompt limit (2 prompts x 10 chunks x 77 x 2048 float32) is 12.6 MB; latents at
    # 2048² are 1 MiB. Sparse in /dev/shm: only what a call writes takes memory.
    SLICES = {"encode": 16 << 20, "refiner_encode": 16 << 20, "denoise": 4 << 20, "refine": 4 << 20}
    # After the region's header (magic and capability): tensors never share a page with it.
    OFFSETS = dict(zip(SLICES, itertools.accumulate(SLICES.values(), initial=4096), strict=False))
    SIZE = 4096 + sum(SLICES.values())

    def __init__(self, enabled: bool, keep: int):
        self.enabled = enabled and shm.enabled()
        self.regions = shm.RegionPool(self.SIZE, keep=keep)
        atexit.register(self.regions.close)

    def refused(self, exc: Relayed) -> bool:
        """Whether a failed call only refused shared memory; if so, stops offering it (the caller retries)."""
        if not exc.shared_memory_refused:
            return False
        shm.counters["shared_memory_refused"] += 1
        if self.enabled:
            self.enabled = False
            log.warning("a backend cannot use shared memory (%s); passing tensors as bytes from now on", exc.message)
        return True


class Transport:
    """How one Generate passes tensors: through a region it owns (backends on this host), or bytes."""

    def __init__(self, shared: SharedMemory):
        self._shared = shared
        self.region = shared.regions.take() if shared.enabled else None
        self.clean = False

    def prepare(self, request, output: str | None = None) -> None:
        """Offers `output`'s slice to the backend, or (no shared memory) inlines tensors that point into it."""
        if self.region is not None and self._shared.enabled:
            if output is not None:
                slice_ = self.region.slice(SharedMemory.OFFSETS[output], SharedMemory.SLICES[output])
                request.output_shared_memory.CopyFrom(slice_)
            return
        if output is not None:
            request.ClearField("output_shared_memory")
        if self.region is not None:
            shm.inline(request)

    def refused(self, exc: Relayed) -> bool:
        return self.region is not None and self._shared.refused(exc)

    def close(self) -> None:
        if self.region is not None:
            self._shared.regions.give_back(self.region, self.clean)


class BackendStopped(grpc.RpcError):
    """A downstream call its server cancelled while the gateway's caller was still there (the backend stopped)."""

    def __init__(self, details: str | None):
        super().__init__()
        self._details = details

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return f"a backend stopped during the call ({self._details or 'cancelled'}); retry"


class CancelledByCaller(grpc.RpcError):
    """What a downstream call that the gateway cancelled itself (the caller went away) is relayed as."""

    def code(self):
        return grpc.StatusCode.CANCELLED

    def details(self):
        return "cancelled by the caller"
