"""Typed errors and their one mapping to gRPC status (google.rpc.Status with typed details).

Engines and servicers raise these; the interceptor in core.server turns them into statuses. Nothing else
calls context.abort.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


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


class Relayed(TriptychError):
    """An error returned by a downstream Triptych service, passed on unchanged (code, message, details)."""

    def __init__(self, error: grpc.RpcError):
        self.code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        self._rich = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
        super().__init__(error.details() if hasattr(error, "details") else str(error))

    def to_status(self) -> grpc.Status:
        if self._rich is not None:
            return rpc_status.to_status(self._rich)
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message or ""))
