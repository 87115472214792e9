"""Typed adapter errors raised by model/adapters and cache/adapter_store.

`model/` and `cache/` never import `shard_server/`, so each class names the gRPC status the engine should
map it to in `code` (the name of a grpc.StatusCode member), the same convention as
`shard_server.errors.ShardError`. The message always names the problem (file, module, field, value).
"""

from __future__ import annotations


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
    """A source (PBASE) or feature this shard does not implement."""

    code = "UNIMPLEMENTED"


class AdapterBudgetExceeded(AdapterError):
    """The adapters one batch (or one LoadAdapter) needs do not fit the device adapter budget."""

    code = "RESOURCE_EXHAUSTED"


class AdapterPermissionDenied(AdapterError):
    """The adapter's source refused access (S3 AccessDenied, no usable credentials)."""

    code = "PERMISSION_DENIED"


class AdapterUnavailable(AdapterError):
    """The adapter's source could not be reached or failed transiently (network, 5xx); retrying may work."""

    code = "UNAVAILABLE"
