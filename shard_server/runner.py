"""Builds model inputs from a batch and runs the forward pass; owns the KV cache and the decode graphs.

Prefill takes host lists (the prompt is new to the device anyway) and uploads each input once.
Decode reads the batch's device tensors and derives slots on the device:

    slot[b] = block_tables[b, pos[b] // block_size] * block_size + pos[b] % block_size

On CUDA, decode steps replay CUDA graphs captured per batch-size bucket (see graphs.py); LoRA runs
inside the graph because only the per-token slot index changes between replays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache.adapter_store import AdapterStore
from cache.kv_cache import KVCache
from model.attention import Seqlen
from model.flash_mistral import FlashMistralForCausalLM
from shard_server.batch import Batch

log = logging.getLogger(__name__)


@dataclass
class PrefillSeq:
    """One sequence of a prefill step (host data)."""

    ids: Sequence[int]  # the whole prompt
    cached: int  # leading tokens whose KV is already in the cache (prefix cache / earlier chunk)
    slots: Sequence[int]  # KV slots of ids[cached:] (-1: write nothing)
    block_table: Sequence[int]  # the sequence's logical block table
    adapter_index: int
    all_logits: bool = False  # keep logits of every new token (prefill_logprobs)


@dataclass
class PrefillOutput:
    last_logits: torch.Tensor  # [B, V]: logits of each sequence's last token
    all_logits: list[torch.Tensor | None]  # per sequence: [new tokens, V] when asked for, else None


class ModelRunner:
    def __init__(self, model: FlashMistralForCausalLM, kv_cache: KVCache, adapters: AdapterStore):
        self.model = model
        self.kv_version = 0  # bumps whenever the cache tensors are replaced (CUDA graphs hold pointers)
        self.kv_cache = kv_cache
        self.adapters = adapters
        self.device = model.device
        self.block_size = model.block_size
        self.window = model.config.sliding_window
        self.graphs = None  # shard_server.graphs.DecodeGraphs on CUDA, after warmup

    @property
    def kv_cache(self) -> KVCache | None:
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, cache: KVCache | None) -> None:
        # Graphs captured against the old tensors must never replay against freed memory: the graphs
        # key on this counter (not on id(), which a new cache object may reuse).
        self._kv_cache = cache
        self.kv_version += 1

    # ---- prefill -------------------------------------------------------------------------------------

    def prefill(self, seqs: Sequence[PrefillSeq]) -> PrefillOutput:
        new_lengths = [len(s.ids) - s.cached for s in seqs]
        ids, positions, slots, cache_rows, head_rows = [], [], [], [], []
        offset = 0
        for s, n in zip(seqs, new_lengths, strict=True):
            ids.extend(s.ids[s.cached :])
            positions.extend(range(s.cached, len(s.ids)))
            slots.extend(s.slots)
            if self.window is not None and len(s.ids) > self.window:
                # Only the last `window` positions are ever read again: write just those.
                first = max(s.cached, len(s.ids) - self.window)
                cache_rows.extend(range(offset + first - s.cached, offset + n))
            else:
                cache_rows.extend(range(offset, offset + n))
            head_rows.extend(range(offset, offset + n) if s.all_logits else [offset + n - 1])
            offset += n
        dev = self.device
        tables = pad_block_tables([s.block_table for s in seqs], dev)
        seqlen = Seqlen.from_lengths(new_lengths, [s.cached for s in seqs], dev)
        window_cut = self.window is not None and len(cache_rows) < offset
        lm_head_indices = torch.tensor(head_rows, dtype=torch.int64, device=dev)
        adapter_data = self.adapters.batch_data(
            [s.adapter_index for s in seqs], new_lengths, is_prefill=True, lm_head_indices=lm_head_indices
        )
        logits, _ = self.model(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            position_ids=torch.tensor(positions, dtype=torch.int64, device=dev),
            cu_seqlen_prefill=seqlen.cu_seqlen_q,
            kv_cache=self.kv_cache.layers,
            block_tables=tables,
            slots=torch.tensor(slots, dtype=torch.int64, device=dev),
            seqlen=seqlen,
            max_s=seqlen.max_k,
            adapter_data=adapter_data,
            prefill_cache_indices=(
                torch.tensor(cache_rows, dtype=torch.int64, device=dev) if window_cut else None
            ),
            lm_head_indices=lm_head_indices,
        )  # [len(head_rows), V]
        last, per_seq, row = [], [], 0
        for s, n in zip(seqs, new_lengths, strict=True):
            k = n if s.all_logits else 1
            per_seq.append(logits[row : row + k] if s.all_logits else None)
            last.append(row + k - 1)
            row += k
        last_logits = logits.index_select(0, torch.tensor(last, dtype=torch.int64, device=dev))
        return PrefillOutput(last_logits, per_seq)

    def embed(
        self, prompts: Sequence[Sequence[int]], adapter_indices: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Final hidden state of each prompt's last token -> [B, hidden], each prompt under its adapter
        (None: all base). Nothing is cached."""
        dev = self.device
        lengths = [len(p) for p in prompts]
        adapter_data = None
        if adapter_indices is not None and any(adapter_indices):
            adapter_data = self.adapters.batch_data(adapter_indices, lengths, is_prefill=True)
        seqlen = Seqlen.from_lengths(lengths, None, dev)
        last = torch.tensor(lengths, device=dev).cumsum(0) - 1
        hidden, _ = self.model(
            input_ids=torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=dev),
            position_ids=torch.tensor([i for n in lengths for i in range(n)], dtype=torch.int64, device=dev),
            cu_seqlen_prefill=seqlen.cu_seqlen_q,
            kv_cache=None,
            block_tables=None,
            slots=None,
            seqlen=seqlen,
            max_s=seqlen.max_k,
            adapter_data=adapter_data,
            lm_head_indices=last,
            skip_lm_head=True,
        )
        return hidden

    # ---- decode --------------------------------------------------------------------------------------

    def decode(self, batch: Batch) -> torch.Tensor:
        """One token per request -> logits [B, V]. Reads and leaves the batch's device state as is."""
        slots = self.adapters.request_slots(batch.adapter_indices)
        if self.graphs is not None:
            logits = self.graphs.run(batch, slots)
            if logits is not None:
                return logits
        return self.decode_eager(batch, slots)

    def decode_eager(self, batch: Batch, request_slots: list[int]) -> torch.Tensor:
        positions = batch.positions
        bs = self.block_size
        rows = torch.arange(len(batch), device=positions.device)
        block = batch.block_tables[rows, positions // bs].to(torch.int64)
        slots = block * bs + positions % bs  # [B]
        seqlen = Seqlen(
            input_lengths=(positions + 1).to(torch.int32),
            cache_lengths=positions.to(torch.int32),
            max_q=1,
            max_k=batch.max_len,
        )
        adapter_data = self.adapters.batch_data(batch.adapter_indices, [1] * len(batch), is_prefill=False)
        logits, _ = self.model(
            input_ids=batch.input_ids,
            position_ids=positions,
            cu_seqlen_prefill=None,
            kv_cache=self.kv_cache.layers,
            block_tables=batch.block_tables,
            slots=slots,
            seqlen=seqlen,
            max_s=batch.max_len,
            adapter_data=adapter_data,
        )
        return logits


def pad_block_tables(tables: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """[B, max_blocks] int32, rows padded with block 0 (past a sequence's length: never read)."""
    width = max((len(t) for t in tables), default=1) or 1
    out = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        if len(t):
            out[i, : len(t)] = torch.tensor(list(t), dtype=torch.int32)
    return out.to(device)
