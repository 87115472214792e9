"""Decode overlap: the next step's forward is enqueued before this step's response leaves.

Without it the device idles while the host does a step's bookkeeping (stopping, detokenization,
protobuf) and while the router turns the response into the next Decode. With it, a Decode does

    logits_N -> sample N (device) -> enqueue forward N+1 on the sampled ids -> one host sync for N
             -> stopping, detokenization, response ...            (device: forward N+1 runs meanwhile)
    next Decode: logits N+1 are already there (or being computed) -> sample N+1 -> enqueue N+2 -> ...

The forward of step N+1 depends only on device state (the sampled ids, positions + 1, the block tables),
so it needs nothing from the host. What the router does in between is absorbed by matching rows by
request identity and KV length:

  FilterBatch            kept rows take their precomputed logits; the others' are dropped.
  Decode of several      each batch's precomputed rows are gathered in the concatenated order.
  Prefill into a batch   its decoding rows do not step, so their precomputed logits stay valid.
  new or mismatched rows (a prefill just finished, a row the lookahead skipped) get a forward of
                         their own this step; the rest keep theirs.
  ClearCache, Warmup     the precomputed steps of those batches are dropped.

A row is looked ahead only if the token being sampled cannot be its last by length: its next position
must be inside the KV blocks it owns (prompt + max_new_tokens - 1 positions). Rows that stop on EOS or a
stop sequence are computed one step too far; that forward is wasted, never reported. Writing the KV of
position p+1 early is harmless: it is exactly what the real step would write (a recomputation rewrites
it), and with a sliding-window ring the slot it reuses lies outside every live window. Block frees need
no wait: every later write to a freed block is enqueued after the lookahead on the same stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shard_server.engine.batch import Batch, RequestState


@dataclass
class Lookahead:
    """Logits of one batch's next step, computed ahead: row j is `requests[j]` at KV length `lengths[j]`."""

    requests: list[RequestState]
    lengths: list[int]  # each request's `length` when these logits are the right ones
    logits: torch.Tensor  # [len(requests), V], owned (not a view of a graph's output buffer)


def rows_to_look_ahead(batch: Batch) -> list[int]:
    """Rows whose token of this step cannot be their last by length (host ints only: no sync)."""
    return [i for i, r in enumerate(batch.requests) if len(r.tracker.generated_ids) + 1 < r.max_new_tokens]


def look_ahead(
    batch: Batch, next_ids: torch.Tensor, forward: Callable[[Batch], torch.Tensor]
) -> Lookahead | None:
    """Enqueue the forward of the step after this one, for the rows that may still be running then.

    `next_ids` [B] are this step's sampled tokens (device). Reads the batch, mutates nothing of it.
    """
    rows = rows_to_look_ahead(batch)
    if not rows:
        return None
    if len(rows) == len(batch):
        ids, positions, tables = next_ids, batch.positions + 1, batch.block_tables
    else:
        idx = torch.tensor(rows, dtype=torch.int64, device=next_ids.device)
        ids, positions = next_ids.index_select(0, idx), batch.positions.index_select(0, idx) + 1
        tables = batch.block_tables.index_select(0, idx)
    requests = [batch.requests[i] for i in rows]
    ahead = Batch(batch.id, requests, batch.chooser, ids, positions, tables, steps_ahead=1)
    # A graph replay returns a view of its static output buffer, which the next replay overwrites.
    logits = forward(ahead).clone()
    return Lookahead(requests, [r.length + 1 for r in requests], logits)


def logits_for(
    batch: Batch, found: Sequence[Lookahead], forward: Callable[[Batch], torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """This step's logits [B, V] for `batch`: precomputed rows where `found` has them (same request,
    same KV length), one forward over the rest. -> (logits, rows that were precomputed)."""
    where: dict[int, tuple[int, int, int]] = {}  # id(request) -> (which lookahead, row, length)
    for k, la in enumerate(found):
        for j, (r, n) in enumerate(zip(la.requests, la.lengths, strict=True)):
            where[id(r)] = (k, j, n)
    hits: list[tuple[int, int, int]] = []  # (batch row, lookahead, lookahead row)
    missing: list[int] = []
    for i, r in enumerate(batch.requests):
        w = where.get(id(r))
        if w is not None and w[2] == r.length:
            hits.append((i, w[0], w[1]))
        else:
            missing.append(i)
    if not hits:
        return forward(batch), 0
    if not missing and len(found) == 1 and [j for _, _, j in hits] == list(range(len(found[0].requests))):
        return found[0].logits, len(hits)  # the usual step: the same rows in the same order
    offsets = [0]
    for la in found:
        offsets.append(offsets[-1] + len(la.requests))
    pool = found[0].logits if len(found) == 1 else torch.cat([la.logits for la in found])
    dev = pool.device
    out = torch.empty(len(batch), pool.shape[1], dtype=pool.dtype, device=dev)
    rows = torch.tensor([i for i, _, _ in hits], dtype=torch.int64, device=dev)
    src = torch.tensor([offsets[k] + j for _, k, j in hits], dtype=torch.int64, device=dev)
    out.index_copy_(0, rows, pool.index_select(0, src))
    if missing:
        fresh = forward(batch.select(missing))
        out.index_copy_(0, torch.tensor(missing, dtype=torch.int64, device=dev), fresh.to(out.dtype))
    return out, len(hits)


def restore_lookaheads(
    lookaheads: dict[int, Lookahead], originals: list[Batch], found: list[Lookahead]
) -> None:
    """After a failed Decode: give each of its batches (`originals`) back the precomputed step whose
    rows it holds (`found`: the lookaheads the Decode took)."""
    for b in originals:
        mine = {id(r) for r in b.requests}
        for la in found:
            if la.requests and id(la.requests[0]) in mine:
                lookaheads[b.id] = la
