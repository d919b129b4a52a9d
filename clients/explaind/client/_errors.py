"""Typed exceptions for gRPC status codes, carrying the server's message."""

from __future__ import annotations

import grpc


class ExplaindError(Exception):
    """Base class; ``code`` is the ``grpc.StatusCode``, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(ExplaindError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ExplaindError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ExplaindError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ExplaindError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(ExplaindError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(ExplaindError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ExplaindError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(ExplaindError):
    code = grpc.StatusCode.CANCELLED


class UnauthenticatedError(ExplaindError):
    code = grpc.StatusCode.UNAUTHENTICATED


class InternalError(ExplaindError):
    code = grpc.StatusCode.INTERNAL


class DataLossError(ExplaindError):
    """Downloaded bytes that do not match their digest."""

    code = grpc.StatusCode.DATA_LOSS


class OperationError(ExplaindError):
    """A job that ended FAILED or CANCELLED; ``code`` is its error status."""


_BY_CODE = {cls.code: cls for cls in ExplaindError.__subclasses__() if cls is not OperationError}


def error_from_code(code: grpc.StatusCode, details: str) -> ExplaindError:
    cls = _BY_CODE.get(code, ExplaindError)
    return cls(details, code)


def from_rpc_error(error: grpc.RpcError) -> ExplaindError:
    """The typed exception for a failed call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_from_code(code, details or code.name)
