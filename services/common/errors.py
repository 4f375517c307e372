"""Domain errors. Engines and stores raise these; their ``code`` is the gRPC status (one
interceptor sets it) and :data:`HTTP_STATUS` maps it to HTTP."""

from __future__ import annotations

import grpc


class PlauditError(Exception):
    """Base of every deliberate error; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(PlauditError):
    """The request is malformed; the message names the offending field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ResourceExhaustedError(PlauditError):
    """A queue or limit is full; the client may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(PlauditError):
    """The service cannot answer now (no model loaded, shutting down, database down)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(PlauditError):
    """The client's deadline passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(PlauditError):
    """A named entity (model version, feedback id) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(PlauditError):
    """The system is not in a state that allows the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExistsError(PlauditError):
    """An entity with the same identity (e.g. an idempotency key) exists with different content."""

    code = grpc.StatusCode.ALREADY_EXISTS


class UnauthenticatedError(PlauditError):
    """No credentials, or credentials that match no configured API key."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(PlauditError):
    """The caller is known but its roles do not allow the operation."""

    code = grpc.StatusCode.PERMISSION_DENIED


HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""gRPC status of a domain error -> HTTP status (the google.rpc mapping); anything else is 500."""
