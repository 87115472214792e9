"""CUDA graphs for decode, LoRA included, captured at Warmup and replayed by Decode.

A decode step of a 7B model launches hundreds of small kernels; at small batch the launch gaps, not
the memory reads, would set the step time. So each (batch bucket, context bucket, any LoRA) gets a graph:

    static inputs [bucket]: input_ids, positions, block_tables [bucket, max_blocks], adapter token_slots
    replay: copy the batch's rows in, pad the rest (position 0 of reserved block 0, slot index -1),
            graph.replay(), logits[:B] of the one static output every graph writes

Capture (`capture`, called by Warmup once the KV cache has its final size): every batch bucket up to
`max_batch`, every context bucket up to Warmup's longest request (max_input_length + max_new_tokens;
with a sliding window no further than the window's bucket, since forward clamps max_s to the window),
without LoRA, and with LoRA when the adapter store has stacks. Largest first, into one memory pool: no graph
keeps an output of its own (they all copy into one static buffer), so later captures reuse the pool.
Capture stops early (the rest decode eagerly) after CAPTURE_SECONDS or when less than
CAPTURE_MIN_FREE_FRACTION of the device stays free; with tensor parallelism the ranks agree on stopping,
since every capture runs collectives. Count, seconds and device bytes are logged.

A Decode never captures: a step with no graph for its key runs eagerly and logs one warning per key.

Variants (the key's third part), each captured under its own GemmPolicy (executor/gemm_policy.py):
- BASE: no LoRA; cuBLASLt from 64 rows up (leaving 16 SMs free from 128 rows), else cuBLAS.
- LORA: LoRA added in place after each projection, the same matmul policy as BASE.
- LORA_FEW (when the store has a LoRA stream, --lora-stream): each projection's LoRA runs on the side
  stream beside its base matmul (model/adapters/batch.py), the matmuls leave 32 SMs free for it and the
  LoRA kernels' grids are sized to those. A batch of at most FEW_ADAPTERS distinct adapters replays it.
  Measured on an H200 (Mistral-7B shape, rank-16 adapters, bench/profile_lora.py with the cases timed in
  interleaved rounds, replay ms over the base graph at 32 / 64 / 128 rows;
  bench/results/h200-profile-lora-2026-12-01-sweep.json): one adapter 1.07 / 1.11 / 1.14 against
  1.26 / 1.26 / 1.23 in place, eight 1.11 / 1.14 / 1.15 against 1.30 / 1.29 / 1.24, sixteen 1.17 / 1.24 /
  1.20 against 1.36 / 1.35 / 1.28; but 32 adapters' 2.7 GB do not stream through 32 SMs in time (1.67 /
  1.65 / 1.47 against 1.47 / 1.45 / 1.36), so larger mixes replay LORA. (Leaving 48 SMs beat in place
  at 32 adapters by 1-4%, and lost 4-10% at one adapter; 16 or 24 SMs won at one adapter at some batch
  sizes and lost at others: cuBLASLt picks other tiles per SM target.)

What a graph holds pointers to, and when it is dropped:
- the KV cache: replaced only inside Warmup (`ModelRunner.kv_cache` drops every graph), which then
  captures again;
- with LoRA, the adapter store's stacks: re-laid out (`layout_version`) when capacity or a rank bucket
  must grow, or the store empties. Base-model graphs never read the stacks and stay. LoRA graphs are
  recaptured by `refresh_lora`, which the engine calls after LoadAdapter and OffloadAdapter: those RPCs
  pay for it (about two forwards per graph, logged; a few times over a shard's life, as capacity grows
  in powers of two), not a Decode. A re-layout inside a Prefill (an evicted adapter coming back)
  leaves LoRA decode steps eager until the next LoadAdapter / OffloadAdapter / Warmup. With
  --adapter-slots the store lays its stacks out at start-up, before Warmup, at a rank bucket for all
  seven projections: a LoadAdapter that fits them then re-lays out nothing and recaptures nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch

from model.adapters.batch import AdapterBatchMetadata
from model.forward_batch import ForwardBatch
from shard_server.executor.gemm_policy import GemmPolicy, decode_policy, side_stream_fits

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MIN_CONTEXT_BUCKET = 256
CAPTURE_SECONDS = 60.0  # per capture session (Warmup, or one refresh after an adapter re-layout)
# Stop capturing below this share of device memory free: KV sizing keeps 5% of the device for graphs,
# sampler buffers and fragmentation (engine/kv_setup.py); graphs may take at most part of it.
CAPTURE_MIN_FREE_FRACTION = 0.02

BASE, LORA, LORA_FEW = 0, 1, 2  # graph variants (module docstring); LoRA variants are truthy
FEW_ADAPTERS = 16  # a LoRA batch of at most this many distinct adapters replays LORA_FEW (module docstring)
Key = tuple[int, int, int]  # (batch bucket, context bucket, variant)


def bucket_of(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    return tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)


def context_bucket(max_len: int, max_context: int, window: int | None) -> int:
    """The `max_s` a step of KV length `max_len` replays with: a power of two >= MIN_CONTEXT_BUCKET,
    at most `max_context`; with a window, every context past the window's bucket shares that bucket
    (forward clamps max_s to the window, so those graphs would be identical)."""
    ctx = MIN_CONTEXT_BUCKET
    while ctx < max_len:
        ctx *= 2
    ctx = min(ctx, max_context)
    return ctx if window is None else min(ctx, context_bucket(window, max_context, None))


def context_buckets(limit: int, max_context: int, window: int | None) -> tuple[int, ...]:
    """Every context bucket a step of KV length <= `limit` may use, ascending."""
    top = context_bucket(limit, max_context, window)
    out, length = [], 1
    while True:
        ctx = context_bucket(length, max_context, window)
        if ctx not in out:
            out.append(ctx)
        if ctx >= top:
            return tuple(out)
        length = ctx + 1


class DecodeGraphs:
    kind = "decode"  # what the capture log names (executor/verify.py's VerifyGraphs: "verify")

    def __init__(self, runner, max_batch: int = 256, max_context: int | None = None):
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        self.max_context = max_context or runner.model.config.max_position_embeddings
        bmax, dev = self.buckets[-1], runner.device
        self.block_size = runner.block_size
        self.window = runner.window  # the keys one query may read (its context bucket stops there)
        self.max_blocks = -(-self.max_context // self.block_size)
        self.input_ids = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(bmax, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(bmax, self.max_blocks, dtype=torch.int32, device=dev)
        self.meta = AdapterBatchMetadata.for_cuda_graph(bmax, dev)
        self.out: torch.Tensor | None = None  # [bmax, V]: every graph copies its logits here
        self.pool = None
        self.graphs: dict[Key, torch.cuda.CUDAGraph] = {}
        self.contexts: tuple[int, ...] = ()  # Warmup's context buckets; () before Warmup
        self._kv_version: int | None = None  # the KV cache the graphs were captured against
        self._lora_layout: int | None = None  # the adapter layout the LoRA graphs (if any) read
        self._warned: set = set()
        self.captured = 0  # graphs captured over the engine's life (tests: none inside a Decode)
        self.capture_seconds = 0.0  # time spent capturing over the engine's life (benchmarks)
        self.replayed = 0
        self.sms = self._sms()
        self.lora_variants = self._lora_variants()  # what a LoRA batch may replay

    def context_bucket(self, max_len: int) -> int:
        return context_bucket(max_len, self.max_context, self.window)

    # ---- capture -------------------------------------------------------------------------------------

    def capture(self, max_total_tokens: int) -> None:
        """Warmup: capture every graph a request of at most `max_total_tokens` may replay, for the
        current KV cache and adapter layout (module docstring)."""
        self.clear()
        limit = min(max_total_tokens or self.max_context, self.max_context)
        self.contexts = context_buckets(limit, self.max_context, self.window)
        self._kv_version = self.runner.kv_version
        self._lora_layout = self.runner.adapters.layout_version
        variants = [BASE, *self.lora_variants] if self.runner.adapters.device_bytes() else [BASE]
        self._capture_keys([k for variant in variants for k in self._keys(variant)], "at Warmup")

    def refresh_lora(self) -> None:
        """After LoadAdapter / OffloadAdapter: if the adapter stacks were re-laid out since the LoRA
        graphs were captured, drop those graphs and capture them again (none while the store is empty)."""
        if not self.contexts or self._kv_version != self.runner.kv_version:
            return  # before Warmup: nothing captured, nothing to refresh
        version = self.runner.adapters.layout_version
        if version == self._lora_layout:
            return
        self._drop(lambda key: key[2])
        self._lora_layout = version
        if self.runner.adapters.device_bytes():  # stacks exist: a batch may use LoRA
            keys = [k for variant in self.lora_variants for k in self._keys(variant)]
            self._capture_keys(keys, "after an adapter re-layout")

    def clear(self) -> None:
        """Drop every graph (the KV cache they point into is being replaced)."""
        self.graphs.clear()
        self.contexts = ()
        self._kv_version = None

    def _keys(self, variant: int) -> list[Key]:
        return [(b, ctx, variant) for ctx in reversed(self.contexts) for b in reversed(self.buckets)]

    def _lora_variants(self) -> list[int]:
        side = self.runner.adapters.lora_stream is not None
        return [LORA, LORA_FEW] if side and side_stream_fits(self.sms) else [LORA]

    def _sms(self) -> int:
        dev = torch.device(self.runner.device)
        return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 0

    def _policy(self, b: int, variant: int) -> GemmPolicy:
        return decode_policy(b, self.sms, side_stream=variant == LORA_FEW)

    def variant_for(self, request_slots: list[int]) -> int:
        """The graph variant a batch with these adapter slots (-1: base) replays."""
        used = {s for s in request_slots if s >= 0}
        if not used:
            return BASE
        return LORA_FEW if len(used) <= FEW_ADAPTERS and LORA_FEW in self.lora_variants else LORA

    def _drop(self, which) -> None:
        for key in [k for k in self.graphs if which(k)]:
            del self.graphs[key]

    def _capture_keys(self, keys: list[Key], when: str) -> None:
        dev = self.runner.device
        if not self.graphs:
            # A fresh pool: the old one is released with its last graph, and capturing into a released
            # pool trips the caching allocator ("use_count > 0").
            self.pool = torch.cuda.graph_pool_handle()
        self._reset_static_inputs()
        torch.cuda.synchronize(dev)
        free_before, total = torch.cuda.mem_get_info(dev)
        start, done, why = time.monotonic(), 0, None
        for key in keys:
            why = self._stop_reason(start, total)
            if self._any_rank(why is not None):
                why = why or "another tensor-parallel rank stopped"
                break
            try:
                self.graphs[key] = self._capture(*key)
            except torch.OutOfMemoryError:
                why = "out of device memory"  # a single rank's state; with TP the next collective fails
                break
            done += 1
        torch.cuda.synchronize(dev)
        used = free_before - torch.cuda.mem_get_info(dev)[0]
        self.capture_seconds += time.monotonic() - start
        log.info(
            "captured %d %s CUDA graphs %s in %.2f s, %.1f MiB of device memory (batch buckets %s, "
            "context buckets %s, variants %s)",
            done, self.kind, when, time.monotonic() - start, used / 2**20, _span(self.buckets),
            list(self.contexts), sorted({k[2] for k in keys}),
        )  # fmt: skip
        if why is not None:
            log.warning("stopped capturing after %d of %d graphs (%s): the rest decode eagerly", done,
                        len(keys), why)  # fmt: skip

    def _stop_reason(self, start: float, total: int) -> str | None:
        if time.monotonic() - start > CAPTURE_SECONDS:
            return f"over {CAPTURE_SECONDS:.0f} s"
        if torch.cuda.mem_get_info(self.runner.device)[0] < CAPTURE_MIN_FREE_FRACTION * total:
            return f"less than {CAPTURE_MIN_FREE_FRACTION:.0%} of device memory free"
        return None

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any tensor-parallel rank (every rank must capture the same graphs)."""
        tp = self.runner.model.tp
        if tp.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.runner.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=tp.group)
        return bool(t.item())

    def _reset_static_inputs(self) -> None:
        """Every row a padding row: a capture's eager warm-up then writes into reserved block 0 only."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.block_tables.zero_()
        self.meta.token_slots.fill_(-1)

    def _forward(self, b: int, ctx: int, variant: int, policy: GemmPolicy) -> torch.Tensor:
        r = self.runner
        meta = AdapterBatchMetadata(
            self.meta.token_slots[:b],
            self.meta.segment_starts,
            self.meta.segment_ends,
            self.meta.segment_slots,
            (),
            has_lora=variant != BASE,
        )
        few = variant == LORA_FEW  # its LoRA kernels get the SMs its matmuls leave free
        fb = ForwardBatch.decode(
            self.input_ids[:b],
            self.positions[:b],
            self.block_tables[:b],
            block_size=self.block_size,
            max_s=ctx,
            adapter_data=r.adapters.graph_batch_data(meta, side_stream=few,
                                                     lora_sms=policy.sm_carveout if few else None),
        )  # fmt: skip
        return fb.run(r.model, r.kv_cache.layers)

    def _capture(self, b: int, ctx: int, variant: int) -> torch.cuda.CUDAGraph:
        dev = self.runner.device
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        policy = self._policy(b, variant)
        with policy.applied():  # cuBLAS picks its kernels at call time
            with torch.cuda.stream(stream):  # warm up allocators and autotuners outside the capture
                logits = self._forward(b, ctx, variant, policy)
            torch.cuda.current_stream(dev).wait_stream(stream)
            if self.out is None:
                self.out = torch.empty(self.buckets[-1], logits.shape[1], dtype=logits.dtype, device=dev)
            del logits
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.out[:b].copy_(self._forward(b, ctx, variant, policy))
        self.captured += 1
        return graph

    # ---- replay --------------------------------------------------------------------------------------

    def run(self, batch, request_slots: list[int]) -> torch.Tensor | None:
        """Replay -> logits [B, V] (a view of the shared output: read it before the next replay);
        None when no captured graph fits the batch (the caller runs the step eagerly)."""
        if self._kv_version != self.runner.kv_version:
            self.clear()
        if not self.contexts:
            return None  # before Warmup (or while it replaces the KV cache): eager, as expected
        n = len(batch)
        variant = self.variant_for(request_slots)
        if variant != BASE and self._lora_layout != self.runner.adapters.layout_version:
            self._drop(lambda key: key[2])
            self._warn_once(
                ("relayout", self.runner.adapters.layout_version),
                "the adapter stacks were re-laid out after the LoRA graphs were captured: LoRA decode steps "
                "run eagerly until the next LoadAdapter/OffloadAdapter",
            )
            return None
        b = bucket_of(n, self.buckets)
        ctx = self.context_bucket(batch.max_len)
        if b is None or batch.block_tables.shape[1] > self.max_blocks or batch.max_len > self.max_context:
            self._warn_once(
                ("outside", b),
                f"a decode batch of {n} rows at context {batch.max_len} is "
                "outside every CUDA graph bucket: it runs eagerly",
            )
            return None
        graph = self.graphs.get((b, ctx, variant))
        if graph is None:
            self._warn_once(
                (b, ctx, variant),
                f"no CUDA graph for batch bucket {b}, context bucket {ctx}, "
                f"variant {variant} (Warmup did not capture it): those steps run eagerly",
            )
            return None
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
        graph.replay()
        self.replayed += 1
        return self.out[:n]

    def _warn_once(self, key, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _span(values: Iterable[int]) -> str:
    values = list(values)
    return f"{values[0]}..{values[-1]} ({len(values)})" if values else "none"
