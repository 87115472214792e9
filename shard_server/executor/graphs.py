"""CUDA graphs for decode, LoRA included.

A decode step of a 7B model launches hundreds of small kernels; at small batch the launch gaps, not
the memory reads, would set the step time. So each (batch bucket, context bucket, any LoRA) gets a graph,
captured lazily the first time it is needed and replayed afterwards:

    static inputs [bucket]: input_ids, positions, block_tables [bucket, max_blocks], adapter token_slots
    replay: copy the batch's rows in, pad the rest (position 0 of reserved block 0, slot index -1),
            graph.replay(), return logits[:B]

LoRA runs inside the graph: it reads the adapter store's fixed-capacity stacks through the per-token
slot index, which is a static tensor updated in place. Any mix of loaded adapters replays the same
graph; graphs are dropped when the store re-lays out its stacks (`layout_version`) or the KV cache is
replaced (Warmup). The context bucket (a power of two) is the `max_s` the attention kernel is captured
with; the kernel still stops at each sequence's true length.
"""

from __future__ import annotations

import logging

import torch

from model.adapters.batch import AdapterBatchMetadata
from model.forward_batch import ForwardBatch

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MIN_CONTEXT_BUCKET = 256


def bucket_of(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int = 256, max_context: int | None = None):
        self.runner = runner
        self.buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        self.max_context = max_context or runner.model.config.max_position_embeddings
        bmax, dev = self.buckets[-1], runner.device
        self.block_size = runner.block_size
        self.max_blocks = -(-self.max_context // self.block_size)
        self.input_ids = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(bmax, self.max_blocks, dtype=torch.int32, device=dev)
        self.meta = AdapterBatchMetadata.for_cuda_graph(bmax, dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._key: tuple[int, int] | None = None  # (adapter layout version, KV cache version)

    def context_bucket(self, max_len: int) -> int:
        ctx = MIN_CONTEXT_BUCKET
        while ctx < max_len:
            ctx *= 2
        return min(ctx, self.max_context)

    def run(self, batch, request_slots: list[int]) -> torch.Tensor | None:
        """Replay (capturing first if needed) -> logits [B, V]; None when the batch does not fit a graph."""
        n = len(batch)
        b = bucket_of(n, self.buckets)
        if b is None or batch.block_tables.shape[1] > self.max_blocks or batch.max_len > self.max_context:
            return None
        key = (self.runner.adapters.layout_version, self.runner.kv_version)
        if key != self._key:
            self.graphs.clear()
            # A fresh pool too: the old one is released with its last graph, and capturing into a
            # released pool trips the caching allocator ("use_count > 0").
            self.pool = torch.cuda.graph_pool_handle()
            self._key = key
        width = batch.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.block_tables[:n, :width].copy_(batch.block_tables)
        self.meta.token_slots[:n].copy_(torch.tensor(request_slots, dtype=torch.int32), non_blocking=True)
        if b > n:  # padding rows: write into reserved block 0, read nothing useful, no adapter
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.block_tables[n:b].zero_()
            self.meta.token_slots[n:b].fill_(-1)
        ctx = self.context_bucket(batch.max_len)
        # A batch with no adapter token replays a graph without LoRA kernels: base-model traffic does
        # not pay for adapters that happen to be resident.
        lora = any(s >= 0 for s in request_slots)
        entry = self.graphs.get((b, ctx, lora))
        if entry is None:
            entry = self._capture(b, ctx, lora)
            self.graphs[(b, ctx, lora)] = entry
        graph, logits = entry
        graph.replay()
        return logits[:n]

    def _forward(self, b: int, ctx: int, lora: bool) -> torch.Tensor:
        r = self.runner
        meta = AdapterBatchMetadata(
            self.meta.token_slots[:b], self.meta.segment_starts, self.meta.segment_ends,
            self.meta.segment_slots, (), has_lora=lora,
        )
        fb = ForwardBatch.decode(
            self.input_ids[:b], self.positions[:b], self.block_tables[:b], block_size=self.block_size,
            max_s=ctx, adapter_data=r.adapters.graph_batch_data(meta),
        )
        return fb.run(r.model, r.kv_cache.layers)

    def _capture(self, b: int, ctx: int, lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):  # warm up allocators and autotuners outside the capture
            self._forward(b, ctx, lora)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(b, ctx, lora)
        log.info("captured decode graph: batch bucket %d, context bucket %d, LoRA %s", b, ctx, lora)
        return graph, logits
