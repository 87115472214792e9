"""The shard's one error hierarchy: refusals raised on purpose, each carrying the status it answers with.

It lives at the bottom of the import graph so that model/, cache/ and shard_server/ all raise the same
types; `Status` is our own enum (no grpc below shard_server/server), and the servicer maps each member
to the grpc.StatusCode of the same name in one table. Anything that is not a ShardError is a bug and
answers INTERNAL. The message always names the problem (field, value, file, index).
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """The status codes the shard answers with (the gRPC codes of the same names)."""

    INVALID_ARGUMENT = enum.auto()
    NOT_FOUND = enum.auto()
    FAILED_PRECONDITION = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    UNIMPLEMENTED = enum.auto()
    PERMISSION_DENIED = enum.auto()
    UNAVAILABLE = enum.auto()
    CANCELLED = enum.auto()
    INTERNAL = enum.auto()


def shown(value: object, limit: int = 200) -> str:
    """repr(value), cut to `limit` characters: messages name untrusted values without echoing megabytes
    (a gRPC status message travels in a header, which has a size limit)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 30]}... ({len(text)} characters)"


class ShardError(Exception):
    """Base class; `status` is what the RPC answers."""

    status = Status.INTERNAL


class InvalidArgument(ShardError):
    """The request (or an adapter's files) cannot be served as given: a bad field, shape, dtype, rank."""

    status = Status.INVALID_ARGUMENT


class NotFound(ShardError):
    """A batch id or adapter index that is not cached/loaded, or adapter files that do not exist."""

    status = Status.NOT_FOUND


class FailedPrecondition(ShardError):
    """Valid, but not in the shard's current state (Warmup with cached batches, index already taken)."""

    status = Status.FAILED_PRECONDITION


class ResourceExhausted(ShardError):
    """Does not fit: KV blocks, device memory, the adapter budget."""

    status = Status.RESOURCE_EXHAUSTED


class Unimplemented(ShardError):
    """A protocol feature this shard does not implement (the PBASE source, classification, merging DoRA
    adapters)."""

    status = Status.UNIMPLEMENTED


class PermissionDenied(ShardError):
    """A path or source outside what the operator allowed, or an adapter source (S3) refusing access."""

    status = Status.PERMISSION_DENIED


class Unavailable(ShardError):
    """The shard cannot do work right now (device failing, model thread stuck, an adapter source out of
    reach); the router may retry."""

    status = Status.UNAVAILABLE


class Cancelled(ShardError):
    """The caller is gone (deadline passed or RPC cancelled): nothing was committed."""

    status = Status.CANCELLED
