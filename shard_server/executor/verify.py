"""The speculative verify forward: Q tokens per row (the row's next input token, then its drafts), one
decode forward over all B * Q of them, logits (and final hidden states) at every position.

    positions [B, Q] = batch.positions[:, None] + arange(Q)      (the row's next Q positions)
    slots     [B, Q] = block_tables[b, p // bs] * bs + p % bs     for the row's first n_valid[b] tokens
                       -1 (write nothing) for padding past them   (rows with fewer drafts than Q - 1)
    attention: the decode path with Q query tokens per sequence (K/V written first, then each query
               attends causally to the cache, window applied per query; see model/attention)
    LoRA:      eager: SGMV over segments of rows of one adapter (the batch keeps rows grouped by
               adapter); CUDA graph: BGMV over the per-token slot index (static, copied in per replay)

It reads the batch's device tensors and changes nothing but KV slots of positions the batch has not
committed yet, so a failed or rejected step needs no undo: the next step writes those slots again.
No host sync. On CUDA, `VerifyGraphs` replays a graph per (batch bucket, Q, context bucket, any LoRA),
captured lazily like the decode graphs (graphs.py) and dropped with them when the adapter layout or
the KV cache changes.
"""

from __future__ import annotations

import logging

import torch

from model.adapters.batch import AdapterBatchMetadata
from model.attention import Seqlen
from shard_server.executor.graphs import MIN_CONTEXT_BUCKET, bucket_of

log = logging.getLogger(__name__)


def _step_inputs(first_pos, tables, n_valid, q_len: int, bs: int, max_k: int):
    """-> (positions [B, Q], slots [B * Q], Seqlen) of a verify step (device ops only)."""
    offsets = torch.arange(q_len, device=first_pos.device)
    positions = first_pos[:, None] + offsets  # [B, Q]
    # Padding positions may lie past a row's table: clamp (they write nothing and only padding reads them).
    block = tables.gather(1, (positions // bs).clamp(max=tables.shape[1] - 1)).to(torch.int64)
    slots = torch.where(offsets[None, :] < n_valid[:, None], block * bs + positions % bs, -1)
    seqlen = Seqlen(
        input_lengths=(first_pos + q_len).to(torch.int32),
        cache_lengths=first_pos.to(torch.int32),
        max_q=q_len,
        max_k=max_k,
    )
    return positions, slots.reshape(-1), seqlen


def _model_forward(runner, tokens, positions, tables, slots, seqlen, max_s, adapter_data):
    """-> (logits [B * Q, V], hidden [B * Q, H]): the model's decode forward, lm_head applied here so
    that the final hidden states (what Medusa heads read) come out too."""
    model = runner.model
    hidden, _ = model(
        input_ids=tokens.reshape(-1), position_ids=positions.reshape(-1), cu_seqlen_prefill=None,
        kv_cache=runner.kv_cache.layers, block_tables=tables, slots=slots, seqlen=seqlen, max_s=max_s,
        adapter_data=adapter_data, skip_lm_head=True,
    )  # fmt: skip
    logits = model.lm_head(hidden)
    if adapter_data is not None:
        adapter_data.add_lora(-1, "lm_head", hidden, logits)  # as forward() does after its lm_head
    return logits, hidden


def verify_forward(
    runner, batch, tokens: torch.Tensor, n_valid: torch.Tensor, graphs: VerifyGraphs | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, Q] int64 (device), n_valid [B] int64 (1 + the row's drafts) -> (logits [B, Q, V],
    final hidden states [B, Q, H]). Replays `graphs` when given and the batch fits one."""
    if graphs is not None:
        out = graphs.run(batch, tokens, n_valid)
        if out is not None:
            return out
    num_rows, q_len = tokens.shape
    bs = runner.block_size
    max_k = max(r.length for r in batch.requests) + q_len  # host ints: no sync
    # Widen the table with block 0 (the shard's reserved block) so padding positions index inside it.
    width = max(-(-max_k // bs), batch.block_tables.shape[1])
    tables = torch.nn.functional.pad(batch.block_tables, (0, width - batch.block_tables.shape[1]))
    positions, slots, seqlen = _step_inputs(batch.positions, tables, n_valid, q_len, bs, max_k)
    adapter_data = runner.adapters.batch_data(batch.adapter_indices, [q_len] * num_rows, is_prefill=True)
    logits, hidden = _model_forward(runner, tokens, positions, tables, slots, seqlen, max_k, adapter_data)
    return logits.view(num_rows, q_len, -1), hidden.view(num_rows, q_len, -1)


class VerifyGraphs:
    """CUDA graphs of the verify forward: static inputs sized for the largest bucket and Q; each replay
    copies the batch's rows in and pads the rest (position 0, n_valid 0 so no write, slot index -1)."""

    def __init__(self, decode_graphs, max_q: int):
        self.decode = decode_graphs  # its buckets, context limit and static-table width
        runner, dev = decode_graphs.runner, decode_graphs.runner.device
        self.runner, self.max_q = runner, max_q
        bmax = decode_graphs.buckets[-1]
        self.tokens = torch.zeros(bmax * max_q, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.n_valid = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(bmax, decode_graphs.max_blocks, dtype=torch.int32, device=dev)
        self.meta = AdapterBatchMetadata.for_cuda_graph(bmax * max_q, dev)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None  # made at the first capture (and fresh after every invalidation)
        self._key: tuple | None = None

    def run(self, batch, tokens: torch.Tensor, n_valid: torch.Tensor):
        d = self.decode
        n, q_len = tokens.shape
        b = bucket_of(n, d.buckets)
        max_k = max(r.length for r in batch.requests) + q_len
        width = batch.block_tables.shape[1]
        if b is None or q_len > self.max_q or width > d.max_blocks or max_k > d.max_context:
            return None
        slots = self.runner.adapters.request_slots(batch.adapter_indices)  # may re-lay out the stacks
        key = (self.runner.adapters.layout_version, self.runner.kv_version)
        if key != self._key:  # as the decode graphs: never replay against freed memory; a fresh pool
            self.graphs.clear()
            self.pool = None
            self._key = key
        flat = self.tokens[: b * q_len].view(b, q_len)
        flat[:n].copy_(tokens)
        self.positions[:n].copy_(batch.positions)
        self.n_valid[:n].copy_(n_valid)
        self.block_tables[:n, :width].copy_(batch.block_tables)
        self.block_tables[:n, width:].zero_()
        per_token = torch.tensor(slots, dtype=torch.int32).repeat_interleave(q_len)
        self.meta.token_slots[: n * q_len].copy_(per_token, non_blocking=True)
        if b > n:
            flat[n:].zero_()
            self.positions[n:b].zero_()
            self.n_valid[n:b].zero_()
            self.block_tables[n:b].zero_()
            self.meta.token_slots[n * q_len : b * q_len].fill_(-1)
        ctx = max(d.context_bucket(max_k), MIN_CONTEXT_BUCKET)
        lora = any(s >= 0 for s in slots)
        entry = self.graphs.get((b, q_len, ctx, lora))
        if entry is None:
            entry = self._capture(b, q_len, ctx, lora)
            self.graphs[(b, q_len, ctx, lora)] = entry
        graph, logits, hidden = entry
        graph.replay()
        return logits[:n].view(n, q_len, -1), hidden[:n].view(n, q_len, -1)

    def _forward(self, b: int, q_len: int, ctx: int, lora: bool):
        tables = self.block_tables[:b]
        bs = self.decode.block_size
        positions, slots, seqlen = _step_inputs(self.positions[:b], tables, self.n_valid[:b], q_len, bs, ctx)
        m = self.meta
        meta = AdapterBatchMetadata(
            m.token_slots[: b * q_len], m.segment_starts, m.segment_ends, m.segment_slots, (), has_lora=lora
        )
        tokens = self.tokens[: b * q_len].view(b, q_len)
        adapter_data = self.runner.adapters.graph_batch_data(meta)
        out = _model_forward(self.runner, tokens, positions, tables, slots, seqlen, ctx, adapter_data)
        logits, hidden = out
        return logits.view(b, q_len, -1), hidden.view(b, q_len, -1)

    def _capture(self, b: int, q_len: int, ctx: int, lora: bool):
        dev = self.runner.device
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm up allocators and autotuners outside the capture
            self._forward(b, q_len, ctx, lora)
        torch.cuda.current_stream(dev).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, hidden = self._forward(b, q_len, ctx, lora)
        log.info(
            "captured verify graph: batch bucket %d, Q %d, context bucket %d, LoRA %s", b, q_len, ctx, lora
        )
        return graph, logits, hidden
