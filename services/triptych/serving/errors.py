"""Typed errors and their one mapping to gRPC status (google.rpc.Status with typed details).

Engines and servicers raise these; the interceptor in serving/server.py turns them into statuses with status_for.
Nothing else calls context.abort.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger("triptych")


def _precondition_failure(kind: str, subject: str, description: str) -> any_pb2.Any:
    """A packed google.rpc.PreconditionFailure with one violation."""
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(type=kind, subject=subject, description=description)
        ]
    )
    packed = any_pb2.Any()
    packed.Pack(failure)
    return packed


class TriptychError(Exception):
    """Base class: an error with a gRPC status code and a message for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        return []

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        status.details.extend(self.details())
        return rpc_status.to_status(status)


class InvalidArgument(TriptychError):
    """One or more request fields are bad; every violation is reported at once."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[tuple[str, str]]):
        self.violations = list(violations)
        super().__init__("; ".join(f"{field}: {why}" for field, why in self.violations))

    @classmethod
    def one(cls, field: str, why: str) -> InvalidArgument:
        return cls([(field, why)])

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [packed]


class NotFound(TriptychError):
    """A named model, LoRA, embedding or VAE does not exist in the model store."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, field: str, what: str):
        self.field = field
        super().__init__(f"{field}: {what}")

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ResourceInfo(resource_type="model", resource_name=self.message)
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]


class Unimplemented(TriptychError):
    """A valid request for a feature this build does not have yet."""

    code = grpc.StatusCode.UNIMPLEMENTED


class ResourceExhausted(TriptychError):
    """A queue is full or memory ran out; retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TriptychError):
    """The service is loading or draining."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(TriptychError):
    """The caller went away or its deadline passed; work stopped at the next step."""

    code = grpc.StatusCode.CANCELLED


class Unauthenticated(TriptychError):
    """The call carries no valid bearer token (the message never says which tokens exist)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TriptychError):
    """The call may not use what it names (e.g. a shared-memory range whose capability does not match)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ModelLoadFailed(TriptychError):
    """A model exists in the store but its files do not load (corrupt, truncated, wrong format).

    FAILED_PRECONDITION, not INTERNAL: the request is fine and the service is healthy; the store needs fixing.
    Nothing is remembered, so a repaired model loads on the next request without a restart.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, model_id: str, cause: BaseException):
        self.model_id = model_id
        # The cause's text names paths on the server: it goes to the service log, not to the caller.
        log.warning("model %r failed to load: %s: %s", model_id, type(cause).__name__, cause)
        super().__init__(
            f"model {model_id!r} is in the model store but failed to load ({type(cause).__name__}); its files "
            "are damaged or incomplete: rebuild or replace them (the service log has the details)"
        )

    def details(self) -> list[any_pb2.Any]:
        return [_precondition_failure("MODEL_LOAD", self.model_id, self.message)]


class SharedMemoryUnavailable(TriptychError):
    """A tensor's shared-memory range cannot be used here: shared memory is off, or the object is not on this host
    or not openable. FAILED_PRECONDITION with a PreconditionFailure of type SHARED_MEMORY: the request is fine,
    and the same tensors sent as bytes will work (the gateway does exactly that, then stops using shared memory).
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    TYPE = "SHARED_MEMORY"

    def __init__(self, field: str, why: str):
        self.field = field
        super().__init__(f"{field}: {why}; send the tensor in `data` instead")

    def details(self) -> list[any_pb2.Any]:
        return [_precondition_failure(self.TYPE, self.field, self.message)]

    @classmethod
    def matches(cls, error: grpc.RpcError) -> bool:
        """Whether a call failed with this error (read from the status details, not the message)."""
        return cls.in_status(rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None)

    @classmethod
    def in_status(cls, status: status_pb2.Status | None) -> bool:
        """Whether a call's rich status (rpc_status.from_call) is this error."""
        if status is None or status.code != cls.code.value[0]:
            return False
        for detail in status.details:
            if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
                failure = error_details_pb2.PreconditionFailure()
                detail.Unpack(failure)
                if any(v.type == cls.TYPE for v in failure.violations):
                    return True
        return False


class Relayed(TriptychError):
    """An error returned by a downstream Triptych service, passed on (code, message, details), with field names
    renamed where the caller's request names the same thing differently (the gateway's `lora` is the encoder's
    and the denoiser's `loras`)."""

    def __init__(self, error: grpc.RpcError, renames: dict[str, str] | None = None):
        self.code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        self._rich = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
        self._renames = renames or {}
        self.shared_memory_refused = SharedMemoryUnavailable.in_status(self._rich)
        super().__init__(self._rename(error.details() if hasattr(error, "details") else str(error)))

    def _rename(self, text: str) -> str:
        for old, new in self._renames.items():
            text = re.sub(rf"(?<![\w.]){re.escape(old)}(?=[\[.:]|$)", new, text or "")
        return text

    def to_status(self) -> grpc.Status:
        if self._rich is None:
            return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message or ""))
        status = status_pb2.Status(code=self._rich.code, message=self._rename(self._rich.message))
        for detail in self._rich.details:
            if self._renames and detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                for violation in bad.field_violations:
                    violation.field = self._rename(violation.field)
                detail = any_pb2.Any()
                detail.Pack(bad)
            status.details.append(detail)
        return rpc_status.to_status(status)


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: Python's MemoryError, torch's OutOfMemoryError (CUDA), or the RuntimeError torch's CPU
    allocator raises ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # never imported here: the gateway has no torch
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc) and "allocate" in str(exc)


def _internal(method: str, exc: BaseException) -> grpc.Status:
    log.error("unexpected error in %s: %s", method, "".join(traceback.format_exception(exc)))
    # The exception's text may name paths on the server: it goes to the log above, the caller gets its type.
    message = f"internal error ({type(exc).__name__}); the service log has the details"
    status = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message=message)
    return rpc_status.to_status(status)


def status_for(method: str, exc: BaseException) -> grpc.Status:
    """The status a handler's exception becomes: typed errors as they say, out of memory as RESOURCE_EXHAUSTED,
    anything else INTERNAL with its type only (the text, which may name server paths, goes to the log)."""
    if isinstance(exc, TriptychError):
        return exc.to_status()
    if is_out_of_memory(exc):
        log.warning("out of memory in %s: %s", method, exc)  # the allocator's text stays in the log
        message = "out of memory serving this request; retry later, or ask for a smaller size or fewer images"
        return rpc_status.to_status(
            status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message=message)
        )
    return _internal(method, exc)
