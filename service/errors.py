"""One exception per gRPC status, raised anywhere below the servicer and mapped to a status in exactly one place
(grpc_api). Messages are written for the user who sent the request: model, input, expected, got."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status an exception answers with: its own for ours, INTERNAL for anything else."""
    return exc.code if isinstance(exc, ServingError) else grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServingError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModelLoadError(Exception):
    """A model version could not be loaded; the message is what RepositoryIndex and ModelReady report."""
