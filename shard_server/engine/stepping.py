"""What the engine's steps share: the last check before committing, request-id uniqueness across the
batches a step joins, and the order of pending prefills after a step.

Every Prefill and Decode computes first and commits after (so a failure changes nothing): between the
two, `commit_or_cancel` asks whether the caller still wants the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from model.errors import Cancelled, InvalidArgument
from shard_server.engine.batch import PendingPrefill

StillWanted = Callable[[], bool]


def commit_or_cancel(still_wanted: StillWanted | None) -> None:
    """The last check before a step's results are committed: is anyone still waiting for them?"""
    if still_wanted is not None and not still_wanted():
        raise Cancelled("the caller is gone (deadline passed or cancelled); nothing was committed")


def check_unique_ids(groups: Sequence[Sequence[int]]) -> None:
    """Request ids of batches about to be joined must be unique: the router tells requests apart by id.
    (Within one batch admission checks them; only Warmup's own batch repeats id 0.)"""
    seen: set[int] = set()
    for ids in groups:
        ids = set(ids)
        for rid in ids:
            if rid in seen:
                raise InvalidArgument(
                    f"request id {rid} is in more than one of the batches to concatenate; request ids must "
                    "be unique across a Decode's batches (and a Prefill's batch and cached_batch)"
                )
        seen |= ids


def in_order(order: Sequence[PendingPrefill], keep: Sequence[PendingPrefill]) -> list[PendingPrefill]:
    """The members of `keep` in the order of `order` (by identity)."""
    ids = {id(p) for p in keep}
    return [p for p in order if id(p) in ids]
