"""The speculative verify forward: Q tokens per row (the row's next input token, then its drafts), one
decode forward over all B * Q of them, logits (and final hidden states) at every position.

    ForwardBatch.verify: positions [B, Q] = batch.positions[:, None] + arange(Q)
                         slots from the block table for the row's first n_valid[b] tokens, -1 (write
                         nothing) for padding past them (rows with fewer drafts than Q - 1)
    attention: the decode path with Q query tokens per sequence (K/V written first, then each query
               attends causally to the cache, window applied per query; see model/attention)
    LoRA:      eager: SGMV over segments of rows of one adapter (the batch keeps rows grouped by
               adapter); CUDA graph: BGMV over the per-token slot index (static, copied in per replay)

It reads the batch's device tensors and changes nothing but KV slots of positions the batch has not
committed yet, so a failed or rejected step needs no undo: the next step writes those slots again.
No host sync.

On CUDA, `VerifyGraphs` are decode graphs (graphs.py) with max_q = 1 + speculative_tokens query
tokens per row: captured at Warmup beside the decode graphs, LoRA graphs recaptured after
LoadAdapter / OffloadAdapter, dropped with the KV cache, never captured inside a Decode (a step without
a graph runs eagerly). A graph always runs max_q tokens per row; a step with fewer pads them, which
changes no earlier position's result (attention is causal and padding writes nothing), so one graph
per (batch bucket, context bucket, any LoRA) serves every Q.
"""

from __future__ import annotations

import torch

from model.adapters.batch import AdapterBatchMetadata
from model.forward_batch import ForwardBatch
from shard_server.executor.graphs import DecodeGraphs, bucket_of

# Verify graphs hold logits for bucket * max_q rows: the largest bucket is cut to keep that buffer (and
# the capture pool) small; larger verify steps run eagerly (they are compute-bound anyway).
MAX_GRAPH_TOKENS = 2048


def _run(runner, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits [T, V], hidden [T, H]): lm_head applied here so that the final hidden states (what
    Medusa heads read) come out too."""
    hidden = fb.run(runner.model, runner.kv_cache.layers)
    logits = runner.model.lm_head(hidden)
    if fb.adapter_data is not None:
        fb.adapter_data.add_lora(-1, "lm_head", hidden, logits)  # as forward() does after its lm_head
    return logits, hidden


def verify_forward(
    runner, batch, tokens: torch.Tensor, n_valid: torch.Tensor, graphs: VerifyGraphs | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, Q] int64 (device), n_valid [B] int64 (1 + the row's drafts) -> (logits [B, Q, V],
    final hidden states [B, Q, H]). Replays `graphs` when given and one was captured for the batch."""
    if graphs is not None:
        out = graphs.run(batch, tokens, n_valid)
        if out is not None:
            return out
    num_rows, q_len = tokens.shape
    bs = runner.block_size
    max_k = batch.max_cached + q_len  # host ints: no sync
    # Widen the table with block 0 (the shard's reserved block) so padding positions index inside it.
    width = max(-(-max_k // bs), batch.block_tables.shape[1])
    tables = torch.nn.functional.pad(batch.block_tables, (0, width - batch.block_tables.shape[1]))
    adapter_data = runner.adapters.batch_data(batch.adapter_indices, [q_len] * num_rows, is_prefill=True)
    fb = ForwardBatch.verify(
        tokens, batch.positions, tables, n_valid, block_size=bs, max_s=max_k, adapter_data=adapter_data,
        skip_lm_head=True,
    )  # fmt: skip
    logits, hidden = _run(runner, fb)
    return logits.view(num_rows, q_len, -1), hidden.view(num_rows, q_len, -1)


class VerifyGraphs(DecodeGraphs):
    """CUDA graphs of the verify forward (module docstring); capture plan, pool, TP agreement, LoRA
    refresh and KV-version checks are the decode graphs'. Static inputs: tokens [bucket, max_q],
    positions, n_valid, block tables, per-token adapter slots; outputs: logits and hidden states of
    bucket * max_q rows, shared by every graph."""

    kind = "verify"

    def __init__(self, runner, max_q: int, max_batch: int = 256, max_context: int | None = None):
        super().__init__(runner, min(max_batch, max(1, MAX_GRAPH_TOKENS // max_q)), max_context)
        self.max_q = max_q
        if self.window is not None:  # Q queries per row span W + Q - 1 keys (forward clamps max_s so)
            self.window += max_q - 1
        bmax, dev = self.buckets[-1], runner.device
        self.input_ids = torch.zeros(bmax, max_q, dtype=torch.int64, device=dev)
        self.n_valid = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.meta = AdapterBatchMetadata.for_cuda_graph(bmax * max_q, dev)
        self.hidden: torch.Tensor | None = None  # [bmax * max_q, H]: every graph copies its hidden here

    def capture(self, max_total_tokens: int) -> None:
        # a step's KV length includes its Q new tokens (padding ones too)
        super().capture(max_total_tokens + self.max_q if max_total_tokens else 0)

    def _lora_variants(self) -> list[int]:
        return [1]  # LoRA added in place (graphs.LORA); verify graphs keep the default matmul policy

    def _reset_static_inputs(self) -> None:
        super()._reset_static_inputs()
        self.n_valid.zero_()

    def _forward(self, b: int, ctx: int, lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        r, q = self.runner, self.max_q
        meta = AdapterBatchMetadata(
            self.meta.token_slots[: b * q], self.meta.segment_starts, self.meta.segment_ends,
            self.meta.segment_slots, (), has_lora=lora,
        )  # fmt: skip
        fb = ForwardBatch.verify(
            self.input_ids[:b], self.positions[:b], self.block_tables[:b], self.n_valid[:b],
            block_size=self.block_size, max_s=ctx, adapter_data=r.adapters.graph_batch_data(meta),
            skip_lm_head=True,
        )  # fmt: skip
        return _run(r, fb)

    def _forward_into_outputs(self, b: int, ctx: int, lora: bool) -> None:
        logits, hidden = self._forward(b, ctx, lora)
        self.out[: b * self.max_q].copy_(logits)
        self.hidden[: b * self.max_q].copy_(hidden)

    def _capture(self, b: int, ctx: int, lora: bool) -> torch.cuda.CUDAGraph:
        dev = self.runner.device
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm up allocators and autotuners outside the capture
            logits, hidden = self._forward(b, ctx, lora)
        torch.cuda.current_stream(dev).wait_stream(stream)
        if self.out is None:
            rows = self.buckets[-1] * self.max_q
            self.out = torch.empty(rows, logits.shape[1], dtype=logits.dtype, device=dev)
            self.hidden = torch.empty(rows, hidden.shape[1], dtype=hidden.dtype, device=dev)
        del logits, hidden
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward_into_outputs(b, ctx, lora)
        self.captured += 1
        return graph

    def run(self, batch, tokens: torch.Tensor, n_valid: torch.Tensor):  # type: ignore[override]
        """Replay -> (logits [B, Q, V], hidden [B, Q, H]), views of the shared outputs (read them before
        the next replay); None when no captured graph fits (the caller runs the step eagerly)."""
        if self._kv_version != self.runner.kv_version:
            self.clear()
        if not self.contexts:
            return None  # before Warmup (or while it replaces the KV cache): eager
        n, q_len = tokens.shape
        slots = self.runner.adapters.request_slots(batch.adapter_indices)  # may re-lay out the stacks
        lora = any(s >= 0 for s in slots)
        if lora and self._lora_layout != self.runner.adapters.layout_version:
            self._drop(lambda key: key[2])
            self._warn_once(
                ("relayout", self.runner.adapters.layout_version),
                "the adapter stacks were re-laid out after the LoRA verify graphs were captured: LoRA "
                "verify steps run eagerly until the next LoadAdapter/OffloadAdapter",
            )
            return None
        b = bucket_of(n, self.buckets)
        width = batch.block_tables.shape[1]
        max_k = batch.max_cached + self.max_q
        if b is None or q_len > self.max_q or width > self.max_blocks or max_k > self.max_context:
            self._warn_once(
                ("outside", b, q_len), f"a verify step of {n} rows x {q_len} tokens at context {max_k} is "
                "outside every verify graph bucket: it runs eagerly",
            )  # fmt: skip
            return None
        ctx = self.context_bucket(max_k)
        graph = self.graphs.get((b, ctx, int(lora)))
        if graph is None:
            self._warn_once(
                (b, ctx, lora), f"no verify CUDA graph for batch bucket {b}, context bucket {ctx}, "
                f"LoRA {lora} (Warmup did not capture it): those steps run eagerly",
            )  # fmt: skip
            return None
        q = self.max_q
        self.input_ids[:n, :q_len].copy_(tokens)
        self.input_ids[:n, q_len:].zero_()
        self.positions[:n].copy_(batch.positions)
        self.n_valid[:n].copy_(n_valid)
        self.block_tables[:n, :width].copy_(batch.block_tables)
        self.block_tables[:n, width:].zero_()  # padding positions past the table read block 0
        per_token = torch.tensor(slots, dtype=torch.int32).repeat_interleave(q)
        self.meta.token_slots[: n * q].copy_(per_token, non_blocking=True)
        if b > n:  # padding rows: write nothing (n_valid 0), read block 0, no adapter
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.n_valid[n:b].zero_()
            self.block_tables[n:b].zero_()
            self.meta.token_slots[n * q : b * q].fill_(-1)
        graph.replay()
        self.replayed += 1
        logits = self.out[: b * q].view(b, q, -1)[:n, :q_len]
        hidden = self.hidden[: b * q].view(b, q, -1)[:n, :q_len]
        return logits, hidden
