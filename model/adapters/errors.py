"""Typed adapter errors raised by model/adapters and cache/adapter_store.

`model/` and `cache/` never import `shard_server/`, so each class names the gRPC status the engine should
map it to in `code` (the name of a grpc.StatusCode member), the same convention as
`shard_server.errors.ShardError`. The message always names the problem (file, module, field, value).
"""

from __future__ import annotations


def shown(value: object, limit: int = 200) -> str:
    """repr(value), cut to `limit` characters: messages name untrusted values without echoing megabytes
    (a gRPC status message travels in a header, which has a size limit)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 30]}... ({len(text)} characters)"


class AdapterError(Exception):
    """Base class of every deliberate adapter refusal."""

    code = "INTERNAL"


class AdapterNotFound(AdapterError):
    """The index is not loaded, or the adapter's files/repository do not exist."""

    code = "NOT_FOUND"


class AdapterConflict(AdapterError):
    """LoadAdapter on an index that already holds a different adapter."""

    code = "FAILED_PRECONDITION"


class AdapterInvalid(AdapterError):
    """The adapter cannot be used with this base model (shape, target, DoRA, pickle-only, rank, ...)."""

    code = "INVALID_ARGUMENT"


class AdapterSourceUnsupported(AdapterError):
    """A source (S3, PBASE) or feature (TIES/DARE merges) this shard does not implement."""

    code = "UNIMPLEMENTED"


class AdapterBudgetExceeded(AdapterError):
    """The adapters one batch (or one LoadAdapter) needs do not fit the device adapter budget."""

    code = "RESOURCE_EXHAUSTED"
