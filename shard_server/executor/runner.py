"""Runs the model's forward for the engine: prefill, decode and embeddings; owns the KV cache and the
decode CUDA graphs.

Inputs are `model.forward_batch.ForwardBatch`es (that module says how each is built): prefill from the
requests' host lists, decode from the cached batch's device tensors (slots derived on the device). On
CUDA, decode steps replay the CUDA graphs Warmup captured (see graphs.py; LoRA runs inside the graph
because only the per-token slot index changes between replays); a step no graph covers runs eagerly,
never capturing one on the way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cache.adapter_store import AdapterStore
from cache.kv_cache import KVCache
from model import forward_batch
from model.flash_mistral import FlashMistralForCausalLM
from model.forward_batch import ForwardBatch
from shard_server.engine.batch import Batch

log = logging.getLogger(__name__)


@dataclass
class PrefillSeq(forward_batch.PrefillSeq):
    """One sequence of a prefill step: the model's host description plus the request's adapter."""

    adapter_index: int = 0


@dataclass
class PrefillOutput:
    last_logits: torch.Tensor  # [B, V]: logits of each sequence's last token
    all_logits: list[torch.Tensor | None]  # per sequence: [new tokens, V] when asked for, else None


class ModelRunner:
    def __init__(self, model: FlashMistralForCausalLM, kv_cache: KVCache, adapters: AdapterStore):
        self.model = model
        self.graphs = None  # shard_server.executor.graphs.DecodeGraphs on CUDA (captured at Warmup)
        self.verify_graphs = None  # executor.verify.VerifyGraphs on CUDA with speculative decoding
        self.kv_version = 0  # bumps whenever the cache tensors are replaced (CUDA graphs hold pointers)
        self.kv_cache = kv_cache
        self.adapters = adapters
        self.device = model.device
        self.block_size = model.block_size
        self.window = model.config.sliding_window

    @property
    def kv_cache(self) -> KVCache | None:
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, cache: KVCache | None) -> None:
        # Graphs captured against the old tensors must never replay against freed memory: they go now
        # (their pool is freed with the old cache), and the graphs also check this counter (not id(),
        # which a new cache object may reuse).
        for graphs in (self.graphs, self.verify_graphs):
            if graphs is not None:
                graphs.clear()
        self._kv_cache = cache
        self.kv_version += 1

    # ---- CUDA graphs (no-ops without them) -----------------------------------------------------------

    def capture_graphs(self, max_total_tokens: int) -> None:
        """Warmup, after the KV cache got its final size: capture the decode (and verify) graphs."""
        for graphs in (self.graphs, self.verify_graphs):
            if graphs is not None:
                graphs.capture(max_total_tokens)

    def refresh_lora_graphs(self) -> None:
        """After LoadAdapter / OffloadAdapter: recapture LoRA graphs if the adapter stacks moved."""
        for graphs in (self.graphs, self.verify_graphs):
            if graphs is not None:
                graphs.refresh_lora()

    # ---- prefill -------------------------------------------------------------------------------------

    def prefill(self, seqs: Sequence[PrefillSeq]) -> PrefillOutput:
        fb = ForwardBatch.prefill(seqs, device=self.device, block_size=self.block_size, window=self.window)
        fb.adapter_data = self.adapters.batch_data(
            [s.adapter_index for s in seqs],
            [len(s.ids) - s.cached for s in seqs],
            is_prefill=True,
            lm_head_indices=fb.lm_head_indices,
        )
        logits = fb.run(self.model, self.kv_cache.layers)  # [rows with logits, V]
        last, per_seq, row = [], [], 0
        for s in seqs:
            k = len(s.ids) - s.cached if s.all_logits else 1
            per_seq.append(logits[row : row + k] if s.all_logits else None)
            last.append(row + k - 1)
            row += k
        last_logits = logits.index_select(0, torch.tensor(last, dtype=torch.int64, device=self.device))
        return PrefillOutput(last_logits, per_seq)

    def embed(
        self, prompts: Sequence[Sequence[int]], adapter_indices: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Final hidden state of each prompt's last token -> [B, hidden], each prompt under its adapter
        (None: all base). Nothing is cached."""
        adapter_data = None
        if adapter_indices is not None and any(adapter_indices):
            lengths = [len(p) for p in prompts]
            adapter_data = self.adapters.batch_data(adapter_indices, lengths, is_prefill=True)
        return ForwardBatch.embed(prompts, device=self.device, adapter_data=adapter_data).run(
            self.model, None
        )

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
        fb = ForwardBatch.decode(
            batch.input_ids,
            batch.positions,
            batch.block_tables,
            block_size=self.block_size,
            max_s=batch.max_len,
            adapter_data=self.adapters.batch_data(batch.adapter_indices, [1] * len(batch), is_prefill=False),
        )
        return fb.run(self.model, self.kv_cache.layers)
