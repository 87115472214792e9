"""Per-batch state: the requests of one cached batch and the device tensors that decode steps update.

A `Batch` is what a CachedBatch id names. Its decode inputs live on the device and move forward in
place each step (`input_ids`, `positions`); nothing is rebuilt from Python lists per step. Requests are
kept grouped by adapter index (stable order within a group) so that LoRA segments stay few; `filter`
and `concatenate` preserve that grouping.

Per request the KV blocks of the whole generation exist before its first forward (prompt +
max_new_tokens - 1 positions: the last token is never fed back): the shard's BlockManager allocates
them, or in router-allocation mode the request brings them. So a decode step needs no host-side block
bookkeeping: slot = block_table[pos // block_size] * block_size + pos % block_size, on the device.

Chunked prefill: a request whose prompt is not fully computed yet is a `PendingPrefill` of the batch
(listed in its request ids, not a row of its device tensors); it becomes a row when its last chunk is
computed and its first token chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shard_server.generation.grammar_masks import RequestGrammar
from shard_server.generation.sampling import NextTokenChooser
from shard_server.generation.stopping import GenerationTracker
from shard_server.types import CachedBatchInfo, SamplingParams


@dataclass
class RequestState:
    """Host-side state of one live request."""

    id: int  # the router's request id
    seq_id: int  # the shard's own sequence id (block manager key; router ids may repeat, e.g. warmup)
    adapter_index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    tracker: GenerationTracker
    prefill_logprobs: bool = False
    emits: bool = True  # tensor parallelism: only the owning rank reports this request
    length: int = 0  # tokens whose KV is written: prompt tokens computed so far, +1 per decode step
    block_table: list[int] = field(default_factory=list)  # logical block table (a window ring repeats)
    own_blocks: bool = True  # the shard's BlockManager holds them (False: the router's blocks)
    # Prompt logprobs gathered chunk by chunk (prefill_logprobs only), reported with the first token.
    prompt_logprobs: list[float] | None = None
    skipped_tokens: int = 0  # generated tokens that came as accepted speculative drafts
    drafts: Any = None  # speculative decoding's per-request state (engine/speculative/speculator.py)
    grammar: RequestGrammar | None = None  # the JSON schema's matcher; advances on emitted tokens only

    @property
    def table_len(self) -> int:
        return len(self.block_table)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass
class PendingPrefill:
    """A request still computing its prompt in chunks; `request.length` prompt tokens are cached."""

    request: RequestState
    next_chunk: int = 0  # tokens its next step computes (CachedBatch.current_tokens)

    @property
    def remaining(self) -> int:
        return len(self.request.prompt_ids) - self.request.length


class Batch:
    """A cached batch. Device tensors hold one row per decoding request, in `requests` order;
    `pending` holds the requests still prefilling in chunks (no row yet)."""

    def __init__(
        self,
        batch_id: int,
        requests: list[RequestState],
        chooser: NextTokenChooser,
        input_ids: torch.Tensor,  # [B] int64: the token each request feeds next
        positions: torch.Tensor,  # [B] int64: its position (= tokens already in the cache)
        block_tables: torch.Tensor,  # [B, max_blocks] int32
        pending: list[PendingPrefill] | None = None,
        # A lookahead's rows are past their requests' `length`: by one step (a decode lookahead), or by
        # each row's emitted tokens (a speculative one: a list, one count per row).
        steps_ahead: int | list[int] = 0,
    ):
        self.id = batch_id
        self.steps_ahead = steps_ahead
        self.requests = requests
        self.chooser = chooser
        self.input_ids = input_ids
        self.positions = positions
        self.block_tables = block_tables
        self.pending: list[PendingPrefill] = pending or []

    @classmethod
    def of_pending(cls, batch_id: int, pending: list[PendingPrefill], vocab_size: int, device) -> Batch:
        """A batch with no decoding rows yet (every request still prefilling)."""
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(
            batch_id,
            [],
            NextTokenChooser.from_params([], [], vocab_size, device),
            empty,
            empty.clone(),
            torch.zeros(0, 1, dtype=torch.int32, device=device),
            pending,
        )

    def __len__(self) -> int:
        """Decoding rows (what a decode forward computes); pending prefills are not rows."""
        return len(self.requests)

    @property
    def request_ids(self) -> list[int]:
        """Every live request: decoding rows, then pending prefills."""
        return [r.id for r in self.requests] + [p.request.id for p in self.pending]

    @property
    def all_requests(self) -> list[RequestState]:
        return self.requests + [p.request for p in self.pending]

    @property
    def adapter_indices(self) -> list[int]:
        return [r.adapter_index for r in self.requests]

    @property
    def max_cached(self) -> int:
        """Longest KV length before the next step (host ints: no device sync)."""
        if isinstance(self.steps_ahead, int):
            return max(r.length for r in self.requests) + self.steps_ahead
        return max(r.length + a for r, a in zip(self.requests, self.steps_ahead, strict=True))

    @property
    def max_len(self) -> int:
        """Longest KV length after the next decode step (host ints: no device sync)."""
        return self.max_cached + 1

    def info(self) -> CachedBatchInfo:
        return CachedBatchInfo(
            id=self.id,
            request_ids=tuple(self.request_ids),
            max_tokens=sum(r.max_total_tokens for r in self.all_requests),
            # a decode step feeds one token per row, plus the next chunk of each pending prefill
            current_tokens=len(self.requests) + sum(p.next_chunk for p in self.pending),
        )

    def rows_view(self) -> Batch:
        """The same rows (shared tensors and chooser), without pending prefills."""
        return Batch(
            self.id, self.requests, self.chooser, self.input_ids, self.positions, self.block_tables, []
        )

    def advance(self, next_ids: torch.Tensor) -> None:
        """After a step: feed the chosen tokens next (device tensors updated in place)."""
        self.input_ids.copy_(next_ids)
        self.positions.add_(1)
        for r in self.requests:
            r.length += 1

    def advance_many(self, next_ids: torch.Tensor, counts: torch.Tensor, host_counts: Sequence[int]) -> None:
        """After a speculative step: row b wrote counts[b] positions and feeds next_ids[b] next
        (device [B] int64; host_counts the same counts as host ints)."""
        self.input_ids.copy_(next_ids)
        self.positions.add_(counts)
        for r, n in zip(self.requests, host_counts, strict=True):
            r.length += n

    def select(self, keep: Sequence[int], pending: list[PendingPrefill] | None = None) -> Batch:
        """A batch of the rows `keep` (in that order) and `pending` (default: this batch's), same id."""
        idx = torch.tensor(list(keep), dtype=torch.int64, device=self.input_ids.device)
        requests = [self.requests[i] for i in keep]
        width = max((r.table_len for r in requests), default=1) or 1
        return Batch(
            self.id,
            requests,
            self.chooser.filter(list(keep)),
            self.input_ids.index_select(0, idx),
            self.positions.index_select(0, idx),
            self.block_tables.index_select(0, idx)[:, :width].contiguous(),
            self.pending if pending is None else pending,
        )

    @staticmethod
    def concatenate(batches: Sequence[Batch]) -> Batch:
        """One batch (id of the first) holding every request, regrouped by adapter index."""
        if len(batches) == 1:
            return batches[0]
        requests = [r for b in batches for r in b.requests]
        pending = [p for b in batches for p in b.pending]
        width = max(b.block_tables.shape[1] for b in batches)
        tables = torch.cat(
            [torch.nn.functional.pad(b.block_tables, (0, width - b.block_tables.shape[1])) for b in batches]
        )
        joined = Batch(
            batches[0].id,
            requests,
            NextTokenChooser.concatenate([b.chooser for b in batches]),
            torch.cat([b.input_ids for b in batches]),
            torch.cat([b.positions for b in batches]),
            tables,
            pending,
        )
        order = grouped_order([r.adapter_index for r in requests])
        return joined if order == list(range(len(requests))) else joined.select(order)


def grouped_order(adapter_indices: Sequence[int]) -> list[int]:
    """Row order that groups equal adapter indices, keeping first-appearance order of the groups and
    the original order inside each group (so an already grouped batch keeps its order)."""
    first: dict[int, int] = {}
    for i, a in enumerate(adapter_indices):
        first.setdefault(a, i)
    return sorted(range(len(adapter_indices)), key=lambda i: (first[adapter_indices[i]], i))
