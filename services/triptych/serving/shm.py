"""Shared-memory tensor transport: byte ranges of POSIX shared-memory objects between processes on one host.

The caller owns every object (creates it, keeps it for the call, removes it); services only read a Tensor's
range, or write their outputs into a range the caller offered (triptych.v1.SharedMemoryRegion). Objects are
files in /dev/shm, which is what shm_open(3) uses on Linux; plain os calls, no torch, so the gateway can own
regions too.

Trust boundary: names in /dev/shm are visible to every local user, and a remote caller of a backend may name any
object. So an object begins with a 64-byte header, a magic string and a 32-byte random capability that its owner
writes and renews for every call that uses the object; a backend opens a range only when the request carries that
capability (compared in constant time), and only after the header. A caller who is not the owner, or an earlier
call of the owner's, cannot read or write another call's tensors. Local processes running as the owner's user can
read the header, as they can read its memory: the boundary is the user, as for any file (docs/security.md).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hmac
import logging
import os
import re
import secrets
import stat
import threading

from google.protobuf.message import Message

from triptych.serving.errors import InvalidArgument, PermissionDenied, SharedMemoryUnavailable
from triptych.v1 import tensor_pb2

SHM_DIR = "/dev/shm"
NAME = re.compile(r"/triptych-[A-Za-z0-9_-]{1,64}")
ALIGN = 64  # every tensor a writer places starts at a multiple of this, from the object's start
MAGIC = b"TRIPTYCH-SHM-V1\n"  # 16 bytes
CAPABILITY_BYTES = 32
HEADER = 64  # magic, capability, reserved: ranges start at or after this offset

log = logging.getLogger(__name__)

_enabled = os.path.isdir(SHM_DIR)
# Process-wide, reported by RuntimeService.GetRuntimeInfo: tensors read from / written into callers' ranges, and
# (gateway) calls that a backend refused to take in shared memory and that were sent again as bytes.
counters: collections.Counter[str] = collections.Counter()


def configure(enabled: bool) -> None:
    """Process-wide switch, set once from Settings.shared_memory when a service starts."""
    global _enabled
    _enabled = enabled and os.path.isdir(SHM_DIR)


def enabled() -> bool:
    return _enabled


def _open(region: tensor_pb2.SharedMemoryRegion, field: str, flags: int) -> int:
    """Opens the region's object after checking the name and the range; the caller closes the descriptor."""
    if not NAME.fullmatch(region.name):
        raise InvalidArgument.one(
            f"{field}.name", f"expected '/triptych-' then 1-64 letters, digits, '-' or '_' (got {region.name[:80]!r})"
        )
    if not _enabled:
        raise SharedMemoryUnavailable(field, "shared memory is off on this service (TRIPTYCH_SHARED_MEMORY=0)")
    try:
        # No symlinks, and O_NONBLOCK so that a FIFO planted under the name cannot hang the call.
        fd = os.open(SHM_DIR + region.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        why = "does not exist on this host" if exc.errno == errno.ENOENT else f"cannot be opened ({exc.strerror})"
        raise SharedMemoryUnavailable(field, f"shared-memory object {region.name} {why}") from exc
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        raise SharedMemoryUnavailable(field, f"{region.name} is not a shared-memory object")
    size = status.st_size
    try:
        if region.offset < HEADER:
            raise InvalidArgument.one(f"{field}.offset", f"a range starts at or after the {HEADER}-byte header")
        if region.offset + region.byte_size > size:
            raise InvalidArgument.one(
                field, f"range {region.offset}+{region.byte_size} lies outside {region.name} ({size} bytes)"
            )
        header = os.pread(fd, HEADER, 0)
        if not header.startswith(MAGIC) or not hmac.compare_digest(
            header[len(MAGIC) : len(MAGIC) + CAPABILITY_BYTES], region.capability
        ):
            raise PermissionDenied(f"{field}.capability: does not open {region.name} (not its owner's, or stale)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read(region: tensor_pb2.SharedMemoryRegion, field: str) -> bytes:
    """A copy of the range (one copy, straight into the bytes object): the caller may reuse its object as soon
    as the call returns."""
    return _read(region, field, lambda fd: os.pread(fd, region.byte_size, region.offset))


def read_into(region: tensor_pb2.SharedMemoryRegion, field: str, out) -> None:
    """Copies the range into `out` (a writable buffer of exactly byte_size bytes, e.g. a fresh torch tensor's
    memory, which is 64-byte aligned)."""
    _read(region, field, lambda fd: os.preadv(fd, [out], region.offset))


def _read(region: tensor_pb2.SharedMemoryRegion, field: str, transfer):
    """Opens and checks the range, runs `transfer(fd)` (bytes read, or their count) and checks it got them all."""
    fd = _open(region, field, os.O_RDONLY)
    try:
        result = transfer(fd)
    finally:
        os.close(fd)
    got = result if isinstance(result, int) else len(result)
    if got != region.byte_size:  # the object shrank under us
        raise InvalidArgument.one(field, f"{region.name} is shorter than the range {region.offset}+{region.byte_size}")
    counters["shared_memory_reads"] += 1
    return result


class Writer:
    """Places a call's output tensors one after another in the range a caller offered.

    Opens (and so checks) the range when made, before the call does any work; a context manager that closes it.
    """

    def __init__(self, region: tensor_pb2.SharedMemoryRegion, field: str):
        self.region = region
        self._fd = _open(region, field, os.O_RDWR)
        self._used = 0

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)

    def place(self, data) -> tensor_pb2.SharedMemoryRegion | None:
        """Writes `data` (any bytes-like) into the next aligned free range; None when it does not fit."""
        size = memoryview(data).nbytes
        start = -(-(self.region.offset + self._used) // ALIGN) * ALIGN
        if start + size > self.region.offset + self.region.byte_size:
            return None
        written = os.pwrite(self._fd, data, start)
        if written != size:  # tmpfs full: the caller reads the bytes path instead
            return None
        self._used = start + size - self.region.offset
        counters["shared_memory_writes"] += 1
        return tensor_pb2.SharedMemoryRegion(
            name=self.region.name, offset=start, byte_size=size, capability=self.region.capability
        )


class OwnedRegion:
    """A shared-memory object this process created (mode 0600) and removes in close(); sparse until written.

    Named /triptych-gw-…, and locked (flock) for as long as it lives: the lock goes with the process, so
    `sweep_orphans` can tell the object of a killed owner (SIGKILL, OOM) from one in use. Its header carries the
    capability that opens its ranges; `renew()` replaces it (a pooled region, before each call).
    """

    PREFIX = "/triptych-gw-"

    def __init__(self, size: int):
        token = secrets.token_hex(16)
        self.name = self.PREFIX + token
        self.size = size
        # Created and locked under a name no sweep looks at, then renamed: never visible unlocked.
        draft = f"{SHM_DIR}/.triptych-draft-{token}"
        self._fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(self._fd, size)
            self.renew()
            os.rename(draft, SHM_DIR + self.name)
        except BaseException:
            os.close(self._fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(draft)
            raise

    def renew(self) -> None:
        """A fresh capability in the header: ranges handed out before no longer open the object."""
        self.capability = secrets.token_bytes(CAPABILITY_BYTES)
        os.pwrite(self._fd, MAGIC + self.capability, 0)

    def slice(self, offset: int, size: int) -> tensor_pb2.SharedMemoryRegion:
        """A range of the object (offset >= HEADER) with the capability that opens it."""
        return tensor_pb2.SharedMemoryRegion(name=self.name, offset=offset, byte_size=size, capability=self.capability)

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR + self.name)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def sweep_orphans() -> int:
    """Removes this user's /triptych-gw-… objects whose owner is gone (nobody holds their lock); returns how many.

    Regions are removed at a normal exit, but a killed gateway leaves them in /dev/shm (sparse: what its last
    calls wrote). Objects other callers own under other /triptych- names are never touched.
    """
    removed = 0
    prefix = OwnedRegion.PREFIX.lstrip("/")
    with contextlib.suppress(OSError), os.scandir(SHM_DIR) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix) or not NAME.fullmatch("/" + entry.name):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its owner is alive
                os.unlink(entry.path)
                removed += 1
            except OSError:
                continue
            finally:
                os.close(fd)
    if removed:
        log.warning("removed %d shared-memory regions left by a gateway that was killed", removed)
    return removed


class RegionPool:
    """Reuses owned regions across calls (creating and removing one costs more than the copy it saves).

    A region goes back to the pool only after a call that ended normally, when no service can still write into
    it; after an error or a cancellation it is removed instead. close() removes every pooled region.
    """

    def __init__(self, size: int, keep: int = 8):
        sweep_orphans()
        self.size = size
        self.keep = keep
        self._free: list[OwnedRegion] = []
        self._lock = threading.Lock()

    def take(self) -> OwnedRegion:
        with self._lock:
            region = self._free.pop() if self._free else None
        if region is None:
            return OwnedRegion(self.size)
        region.renew()  # whatever the previous call handed out opens it no more
        return region

    def give_back(self, region: OwnedRegion, clean: bool) -> None:
        with self._lock:
            if clean and len(self._free) < self.keep:
                self._free.append(region)
                return
        region.close()

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for region in free:
            region.close()


def writer(message, field: str = "output_shared_memory") -> Writer | contextlib.nullcontext:
    """The Writer for a request's output range, or a no-op context (yielding None) when it offers none."""
    return Writer(getattr(message, field), field) if message.HasField(field) else contextlib.nullcontext()


def inline(message) -> None:
    """Replaces, in place, every Tensor in `message` that points into shared memory by its bytes (read here)."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        values = [value] if isinstance(value, Message) else value  # one message, or a repeated field
        for item in values:
            if isinstance(item, tensor_pb2.Tensor):
                if item.HasField("shared_memory"):
                    data = read(item.shared_memory, descriptor.name)
                    item.ClearField("shared_memory")
                    item.data = data
            elif isinstance(item, Message):
                inline(item)
