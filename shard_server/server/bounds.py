"""Bounds on what a client may send and on what the shard echoes back (untrusted input, both ways).

- `check_adapter_parameters`: AdapterParameters with too many or too long ids, or a non-finite merge
  weight or density, are INVALID_ARGUMENT before any file is touched (a NaN weight would otherwise be
  folded into the merged adapter and reach every token of its requests).
- `check_api_token`: a token travels in an HTTP header to the hub; one that is not visible ASCII (or is
  over MAX_API_TOKEN_CHARS) is INVALID_ARGUMENT here, not an encoding error deep in the HTTP client.
- `bounded_message`: a status message travels in a header (gRPC's metadata limit is 8 KiB by default,
  and the message is percent-encoded, up to 3 bytes per byte): it is cut to MAX_STATUS_MESSAGE_BYTES so
  an echoed input can never turn a refusal into a transport error ("Stream removed").
"""

from __future__ import annotations

import math

from model.errors import InvalidArgument

MAX_ADAPTER_IDS = 64  # adapters in one merge
MAX_ADAPTER_ID_CHARS = 4096
MAX_STATUS_MESSAGE_BYTES = 1024
MAX_API_TOKEN_CHARS = 4096


def check_adapter_parameters(adapter_ids, weights, density: float) -> None:
    if len(adapter_ids) > MAX_ADAPTER_IDS:
        raise InvalidArgument(
            f"adapter_parameters.adapter_ids has {len(adapter_ids)} ids; at most {MAX_ADAPTER_IDS}"
        )
    for i, adapter_id in enumerate(adapter_ids):
        if len(adapter_id) > MAX_ADAPTER_ID_CHARS:
            raise InvalidArgument(
                f"adapter_parameters.adapter_ids[{i}] has {len(adapter_id)} characters; "
                f"at most {MAX_ADAPTER_ID_CHARS}"
            )
    if not all(math.isfinite(w) for w in weights) or not math.isfinite(density):
        raise InvalidArgument(
            f"adapter_parameters: merge weights and density must be finite, got weights "
            f"{list(weights)[:8]} density {density}"
        )


def check_api_token(token: str | None) -> None:
    if token is None:
        return
    if len(token) > MAX_API_TOKEN_CHARS:
        raise InvalidArgument(f"api_token has {len(token)} characters; at most {MAX_API_TOKEN_CHARS}")
    if not all("!" <= c <= "~" for c in token):  # visible ASCII: what an HTTP header value can carry
        raise InvalidArgument("api_token must be visible ASCII characters (no spaces, controls or non-ASCII)")


def bounded_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """`message` cut to `limit` UTF-8 bytes (on a character boundary), saying how long it was."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= limit:
        return message
    head = raw[: limit - 40].decode("utf-8", "ignore")
    return f"{head}... ({len(raw)} bytes in all)"
