"""Speculative steps overlap the host as plain ones do (engine/lookahead.py): right after a step's one host
sync, the next step's drafts are taken over the tokens it just emitted and its verify forward is
enqueued, before the step's commit, stopping, detokenization and response.

    Decode N:   ... verify N (or its lookahead) -> score N -> host sync N
                -> look_ahead: n-gram drafts over emitted N, enqueue verify N+1    (device: runs N+1)
                -> commit N, stopping, detokenization, response                  (host, meanwhile)
    Decode N+1: Precomputed.of: rows held at their KV length take the logits of verify N+1; rows
                that joined since get a verify forward of their own now (one more weight read on a
                large model, as for new rows of a plain lookahead); score N+1 with the committed chooser

Sampling and acceptance are never precomputed: scoring runs with the chooser as committed, so seeds,
penalties and grammars see exactly the committed history. Rows that end this step by length are left
out; rows that stop on EOS or a stop sequence are verified in vain, never reported. Batches with Medusa
or schema rows take no lookahead (their next drafts need committed state). A cancelled Decode keeps the
lookahead it found; n-gram indexes rebuild when they hold tokens never committed (NgramIndex.sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shard_server.engine.speculative.drafts import draft_budget
from shard_server.executor.verify import verify_forward


@dataclass
class SpecLookahead:
    """The verify forward of a batch's next speculative step, enqueued before this step's host work
    (the decode overlap of engine/lookahead.py, for speculative steps): row j is `requests[j]` at KV length
    `lengths[j]`, verifying its next input token and `drafts[j]`."""

    requests: list  # [RequestState]
    lengths: list[int]
    drafts: list[list[int]]  # host drafts per row
    logits: torch.Tensor  # [R, Q, V], owned (not a view of a graph's output buffer)


@dataclass
class Precomputed:
    """What `SpecLookahead`s hold of a batch: `drafts[b]` for each row b they hold at its KV length and
    the logits of those rows (`rows[b]`: row of `pool`, whose Q is `q_len`)."""

    drafts: dict[int, list[int]]
    rows: dict[int, int]
    pool: torch.Tensor  # [R, Q, V]: the lookaheads' logits, concatenated
    q_len: int

    @classmethod
    def of(cls, batch, found: Sequence[SpecLookahead], medusa) -> Precomputed | None:
        """None when nothing is usable: no lookahead, lookaheads of different Q, no row held at its
        length, or rows whose drafts need the step's own state (Medusa heads, a grammar)."""
        if not found or len({la.logits.shape[1] for la in found}) != 1 or batch.chooser.grammar is not None:
            return None
        if medusa and any(medusa.heads_for(r.adapter_index) is not None for r in batch.requests):
            return None
        where: dict[int, tuple[int, int, list[int]]] = {}  # id(request) -> (pool row, KV length, drafts)
        offset = 0
        for la in found:
            for j, (r, n, d) in enumerate(zip(la.requests, la.lengths, la.drafts, strict=True)):
                where[id(r)] = (offset + j, n, d)
            offset += len(la.requests)
        drafts, rows = {}, {}
        for b, r in enumerate(batch.requests):
            w = where.get(id(r))
            if w is not None and w[1] == r.length:
                rows[b], drafts[b] = w[0], w[2]
        if not rows:
            return None
        pool = found[0].logits if len(found) == 1 else torch.cat([la.logits for la in found])
        return cls(drafts, rows, pool, found[0].logits.shape[1])

    def logits_for(self, batch, tokens: torch.Tensor, n_valid: torch.Tensor, spec):
        """logits [B, Q, V] of the step (tokens [B, Q], Q >= q_len): precomputed rows gathered, the other
        rows verified now. A precomputed row's positions past q_len are past its drafts: never accepted,
        they are scored on zeros."""
        n, q_len = tokens.shape
        pool = self.pool[:, :q_len]  # Q may be smaller now: the row with the most drafts may have left
        if len(self.rows) == n and q_len <= self.q_len and list(self.rows.values()) == list(range(len(pool))):
            return pool  # the usual step: the same rows in the same order
        dev = pool.device
        hit = list(self.rows)
        out = pool.index_select(0, torch.tensor([self.rows[b] for b in hit], dtype=torch.int64, device=dev))
        if len(hit) == n and q_len <= self.q_len:
            return out
        full = torch.zeros(n, q_len, pool.shape[2], dtype=pool.dtype, device=dev)
        full[:, : pool.shape[1]].index_copy_(0, torch.tensor(hit, dtype=torch.int64, device=dev), out)
        missing = [b for b in range(n) if b not in self.rows]
        if not missing:
            return full
        idx = torch.tensor(missing, dtype=torch.int64, device=dev)
        sub = type(batch)(batch.id, [batch.requests[b] for b in missing], batch.chooser,
                          batch.input_ids.index_select(0, idx), batch.positions.index_select(0, idx),
                          batch.block_tables.index_select(0, idx))  # fmt: skip
        fresh, _ = verify_forward(spec.runner, sub, tokens.index_select(0, idx), n_valid.index_select(0, idx),
                                  spec.graphs)  # fmt: skip
        full.index_copy_(0, idx, fresh.to(full.dtype))
        return full


def look_ahead(spec, batch, step) -> SpecLookahead | None:
    """Enqueue the verify forward of the batch's next step as if `step` were committed: each row
    continues from its emitted tokens with n-gram drafts over them. Reads the batch, mutates no
    batch or chooser state (n-gram indexes grow by the emitted tokens: `NgramIndex.sync` rebuilds
    one whose tokens were never committed). Rows that end this step by length are left out; rows
    that stop on EOS or a stop sequence are verified in vain, never reported (engine/lookahead.py). None
    (no lookahead) for Medusa or grammar rows, whose next drafts need committed state, and when
    no row has a draft."""
    if step.medusa_rows or batch.chooser.grammar is not None:
        return None
    bs = spec.runner.block_size
    rows, drafts, lengths, lasts = [], [], [], []
    for b, r in enumerate(batch.requests):
        emitted = step.host.ids[b]
        generated = len(r.tracker.generated_ids) + len(emitted)
        if generated >= r.max_new_tokens:
            continue
        length = r.length + len(emitted)
        budget = draft_budget(spec.k, r.max_new_tokens, generated, length, len(r.block_table) * bs)
        rows.append(b)
        drafts.append(spec.ngram_drafts(r, budget, emitted) if budget > 0 else [])
        lengths.append(length)
        lasts.append(emitted[-1])
    q_len = 1 + max((len(d) for d in drafts), default=0)
    if q_len == 1:
        return None
    dev = batch.input_ids.device
    # One host -> device copy: [tokens (Q), position, n_valid] per row; position = KV length.
    rows_host = [[t, *d, *[0] * (q_len - 1 - len(d)), n, 1 + len(d)]
                 for t, d, n in zip(lasts, drafts, lengths, strict=True)]  # fmt: skip
    host = torch.tensor(rows_host, dtype=torch.int64)
    packed = host.to(dev, non_blocking=True)
    tokens, positions, n_valid = packed[:, :q_len], packed[:, q_len], packed[:, q_len + 1]
    requests = [batch.requests[b] for b in rows]
    if len(rows) == len(batch):
        tables = batch.block_tables
    else:
        tables = batch.block_tables.index_select(0, torch.tensor(rows, dtype=torch.int64, device=dev))
    steps_ahead = [n - r.length for n, r in zip(lengths, requests, strict=True)]
    ahead = type(batch)(batch.id, requests, batch.chooser, tokens[:, 0], positions, tables,
                        steps_ahead=steps_ahead)  # fmt: skip
    logits, _ = verify_forward(spec.runner, ahead, tokens, n_valid, spec.graphs)
    # A graph replay returns a view of its static output buffer, which the next replay overwrites.
    return SpecLookahead(requests, lengths, drafts, logits.clone())
