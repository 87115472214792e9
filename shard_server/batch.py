"""Per-batch state: the requests of one cached batch and the device tensors that decode steps update.

A `Batch` is what a CachedBatch id names. Its decode inputs live on the device and move forward in
place each step (`input_ids`, `positions`); nothing is rebuilt from Python lists per step. Requests are
kept grouped by adapter index (stable order within a group) so that LoRA segments stay few; `filter`
and `concatenate` preserve that grouping.

Per request the shard pre-allocates KV blocks for the whole generation (prompt + max_new_tokens - 1
positions: the last token is never fed back), so a decode step needs no host-side block bookkeeping:
slot = block_table[pos // block_size] * block_size + pos % block_size, computed on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shard_server.sampling import NextTokenChooser
from shard_server.stopping import GenerationTracker
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
    length: int = 0  # tokens whose KV is written: the prompt after prefill, +1 per decode step
    table_len: int = 0  # logical blocks in this request's block-table row

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


class Batch:
    """A cached batch. Device tensors hold one row per request, in `requests` order."""

    def __init__(
        self,
        batch_id: int,
        requests: list[RequestState],
        chooser: NextTokenChooser,
        input_ids: torch.Tensor,  # [B] int64: the token each request feeds next
        positions: torch.Tensor,  # [B] int64: its position (= tokens already in the cache)
        block_tables: torch.Tensor,  # [B, max_blocks] int32
    ):
        self.id = batch_id
        self.requests = requests
        self.chooser = chooser
        self.input_ids = input_ids
        self.positions = positions
        self.block_tables = block_tables

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    @property
    def adapter_indices(self) -> list[int]:
        return [r.adapter_index for r in self.requests]

    @property
    def max_len(self) -> int:
        """Longest KV length after the next decode step (host ints: no device sync)."""
        return max(r.length for r in self.requests) + 1

    def info(self) -> CachedBatchInfo:
        return CachedBatchInfo(
            id=self.id,
            request_ids=tuple(self.request_ids),
            max_tokens=sum(r.max_total_tokens for r in self.requests),
            current_tokens=len(self.requests),  # a decode step feeds one token per request
        )

    def advance(self, next_ids: torch.Tensor) -> None:
        """After a step: feed the chosen tokens next (device tensors updated in place)."""
        self.input_ids.copy_(next_ids)
        self.positions.add_(1)
        for r in self.requests:
            r.length += 1

    def select(self, keep: Sequence[int]) -> Batch:
        """A batch of the rows `keep` (in that order), same id; device state gathered once."""
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
        )

    @staticmethod
    def concatenate(batches: Sequence[Batch]) -> Batch:
        """One batch (id of the first) holding every request, regrouped by adapter index."""
        if len(batches) == 1:
            return batches[0]
        requests = [r for b in batches for r in b.requests]
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
