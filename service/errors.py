"""Protocol-neutral errors. Anything below the front ends raises one of these; each front end has one table from
`kind` to its own status (grpc_api: gRPC codes; http_api: HTTP statuses as Triton's HTTP server maps them), and both
share `describe`, the INTERNAL policy. Messages are written for the user who sent the request: model, input,
expected, got."""

from __future__ import annotations

import logging
import uuid

log = logging.getLogger("deepserve.errors")

INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE = "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE"
UNIMPLEMENTED, UNAUTHENTICATED, RESOURCE_EXHAUSTED = "UNIMPLEMENTED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"
INTERNAL, ALREADY_EXISTS = "INTERNAL", "ALREADY_EXISTS"
KINDS = (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, UNIMPLEMENTED, UNAUTHENTICATED, RESOURCE_EXHAUSTED, INTERNAL,
         ALREADY_EXISTS)


class ServingError(Exception):
    kind: str = INTERNAL


def kind_of(exc: BaseException) -> str:
    """The error kind an exception answers with: its own for ours, INTERNAL for anything else."""
    return exc.kind if isinstance(exc, ServingError) else INTERNAL


class InvalidArgument(ServingError):
    kind = INVALID_ARGUMENT


class NotFound(ServingError):
    kind = NOT_FOUND


class Unavailable(ServingError):
    kind = UNAVAILABLE


class Unimplemented(ServingError):
    kind = UNIMPLEMENTED


class Unauthenticated(ServingError):
    kind = UNAUTHENTICATED


class ResourceExhausted(ServingError):
    kind = RESOURCE_EXHAUSTED


class AlreadyExists(ServingError):
    """Registering a shared memory region under a name already taken (Triton: ALREADY_EXISTS, HTTP 409)."""

    kind = ALREADY_EXISTS


class ModelLoadError(Exception):
    """A model version could not be loaded; the message is what RepositoryIndex and ModelReady report."""


def describe(exc: BaseException, method: str, request_id: str = "") -> tuple[str, str]:
    """(kind, message) for the client. A client error says what was wrong; a server-side failure (INTERNAL) gets a
    short message and the request id, and its trace goes to the log under that id. Shared by both front ends."""
    kind = kind_of(exc)
    if kind != INTERNAL:
        return kind, str(exc)
    rid = request_id or uuid.uuid4().hex[:12]
    log.error("%s failed (request id %s): %s", method, rid, exc, exc_info=exc)
    what = str(exc).splitlines()[0][:240] if isinstance(exc, ServingError) else f"internal error in {method}"
    return INTERNAL, f"{what} (request id {rid}); the server log has the details"
