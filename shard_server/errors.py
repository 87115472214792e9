"""Errors the engine raises on purpose; service.py maps each to its gRPC status code.

Anything else that escapes is a bug and becomes INTERNAL.
"""

from __future__ import annotations


class ShardError(Exception):
    """Base class; `code` is the name of a grpc.StatusCode member."""

    code = "INTERNAL"


class InvalidArgument(ShardError):
    code = "INVALID_ARGUMENT"


class NotFound(ShardError):
    code = "NOT_FOUND"


class ResourceExhausted(ShardError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ShardError):
    code = "FAILED_PRECONDITION"


class Unimplemented(ShardError):
    code = "UNIMPLEMENTED"


class Cancelled(ShardError):
    """The caller is gone (deadline passed or RPC cancelled): nothing was committed."""

    code = "CANCELLED"
