"""ShardEngine: the shard's state (model, KV cache, blocks, adapters, cached batches) and its operations.

Every method runs on the server's one model thread, except `download_adapter`, which runs on the I/O
thread: it reads files outside any lock and touches only the adapter store's host cache, under its
lock, and `prepare_grammars`, which runs on the servicer's handler threads: it only compiles schemas
into the thread-safe `SchemaCompiler` cache, so the model thread keeps decoding meanwhile.
Errors meant for the router are `model.errors.*`, raised here or by model/ and cache/ alike; only
out-of-blocks and device out-of-memory are translated here. A failed call leaves every cached batch as
it was and leaks no KV block.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch

from cache.adapter_store import AdapterStore
from cache.block_manager import BlockManager, OutOfBlocks
from model.attention import select_attention_backend
from model.config import MistralConfig
from model.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from model.flash_mistral import FlashMistralForCausalLM
from shard_server.config import ShardConfig
from shard_server.engine import adapter_ops, admission, prefilling, warmup
from shard_server.engine.batch import Batch, PendingPrefill
from shard_server.engine.bootstrap import (
    build_adapter_store,
    init_tensor_parallel,
    load_tokenizer,
    torch_dtype,
)
from shard_server.engine.kv_setup import KVScaleKeeper, KVSizing
from shard_server.engine.lookahead import Lookahead, logits_for, look_ahead, restore_lookaheads
from shard_server.engine.outputs import emit_step
from shard_server.engine.speculative import speculator
from shard_server.engine.stepping import StillWanted, check_unique_ids, commit_or_cancel, in_order
from shard_server.executor.runner import ModelRunner
from shard_server.generation.grammar import SchemaCompiler
from shard_server.generation.sampling import HostSample
from shard_server.generation.speculative import HostTokens
from shard_server.types import (
    AdapterSpec,
    BatchSpec,
    CachedBatchInfo,
    EngineStats,
    GenerationOut,
    ShardInfo,
    StepResult,
)

log = logging.getLogger(__name__)


class ShardEngine:
    def __init__(self, config: ShardConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = torch_dtype(config.dtype)
        self.tp = init_tensor_parallel(config, self.device)
        self.model_config = MistralConfig.from_pretrained(config.model_dir)
        self.tokenizer, self.eos_ids, self.special_ids = load_tokenizer(config.model_dir, self.model_config)
        prefer = None if config.attention_backend == "auto" else config.attention_backend
        self.model = FlashMistralForCausalLM.from_pretrained(
            config.model_dir, dtype=self.dtype, device=self.device, tp=self.tp,
            attention=select_attention_backend(self.device, self.dtype, prefer=prefer),
        )  # fmt: skip
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else torch.float8_e4m3fn
        self.kv_scales = KVScaleKeeper(self.model, self.kv_dtype, config.model_dir)
        self.sizing = KVSizing(self.model, self.kv_dtype, config.max_kv_cache_bytes)
        self.adapters: AdapterStore = build_adapter_store(
            config, self.model_config, self.device, self.dtype, self.tp, self.model.projection_weight
        )
        num_blocks = self.sizing.initial_blocks()
        self.runner = ModelRunner(self.model, self.kv_scales.new_cache(num_blocks), self.adapters)
        self.blocks = self._new_block_manager(num_blocks)
        self.router_blocks = config.block_allocator == "router"
        self.max_prefill_tokens: int | None = None  # Warmup's; sizes the chunks after the first
        self.computed_prefill_tokens = 0  # prompt tokens run through prefill forwards (tests, metrics)
        if self.device.type == "cuda" and config.cuda_graphs:
            from shard_server.executor.graphs import DecodeGraphs

            self.runner.graphs = DecodeGraphs(self.runner, max_batch=config.max_batch_size or 256)
            if config.speculative_tokens:
                from shard_server.executor.verify import VerifyGraphs

                self.runner.verify_graphs = VerifyGraphs(
                    self.runner, config.speculative_tokens + 1, max_batch=config.max_batch_size or 256
                )
        self.grammars = SchemaCompiler(
            self.tokenizer,
            self.model_config.vocab_size,
            self.eos_ids,
            config.grammar,
            deterministic_only=self.tp.world_size > 1,
            pin_memory=self.device.type == "cuda",
        )
        self.speculator = speculator.build(self) if config.speculative_tokens else None
        self.batches: dict[int, Batch] = {}
        # Decode overlap (lookahead.py): each cached batch's next step, already enqueued.
        self.overlap = config.overlap
        self.lookaheads: dict[int, Lookahead] = {}
        self.lookahead_rows_used = 0  # rows whose logits came precomputed (tests, metrics)
        self.graph_tokens: int | None = None  # the last good Warmup's graph bound (max request tokens)
        self._next_seq_id = 0
        log.info(
            "shard ready: %s on %s (%s), KV cache %d blocks x %d tokens (%s), rank %d/%d",
            config.model_dir,
            self.device,
            self.dtype,
            num_blocks,
            self.model.block_size,
            self.kv_dtype,
            self.tp.rank,
            self.tp.world_size,
        )

    # ---- static facts ----------------------------------------------------------------------------------

    def info(self) -> ShardInfo:
        return ShardInfo(
            dtype=self.config.dtype,
            device_type=self.device.type,
            window_size=self.model_config.sliding_window,
            block_size=self.model.block_size,
            requires_block_allocator=self.router_blocks,
            chunked_prefill=True,
            preloaded_adapters=tuple(self.adapters.preloaded_adapters()),
            speculate=self.config.speculative_tokens,
        )

    def health(self) -> None:
        x = torch.ones(8, 8, device=self.device, dtype=self.dtype)
        if not bool(torch.isfinite(x @ x).all()):  # one host sync: the device really ran the work
            raise RuntimeError(f"the {self.device} device returned non-finite values")

    def free_blocks(self) -> int:
        """Free KV blocks (tests and metrics: equals usable blocks once every batch is cleared)."""
        return self.blocks.num_free

    def usable_blocks(self) -> int:
        return self.blocks.num_usable

    def stats(self) -> EngineStats:
        return EngineStats(
            free_blocks=self.blocks.num_free,
            usable_blocks=self.blocks.num_usable,
            cached_batches=len(self.batches),
            computed_prefill_tokens=self.computed_prefill_tokens,
            reused_prefill_tokens=self.blocks.num_reused_tokens,
            resident_adapters=tuple(self.adapters.resident_indices()),
            **({} if self.speculator is None else self.speculator.totals()),
        )

    # ---- batches ---------------------------------------------------------------------------------------

    def prefill(
        self, spec: BatchSpec, cached_batch_id: int | None = None, still_wanted: StillWanted | None = None
    ) -> StepResult:
        """New requests' (first) chunks, plus the next chunk of the cached batch's pending prefills;
        the cached batch's decoding rows do not step here. Result: one batch (id of the cached one).

        `still_wanted()` is asked after the forward, before anything is committed: False (the caller's
        deadline passed, or it cancelled) raises Cancelled and leaves the shard as before the call."""
        if cached_batch_id is not None and cached_batch_id not in self.batches:
            raise NotFound(f"cached_batch {cached_batch_id} is not a cached batch")
        if spec.id in self.batches and spec.id != cached_batch_id:
            raise FailedPrecondition(
                f"batch.id {spec.id} is already a cached batch (a Prefill of it succeeded before; its "
                "response may have been lost): ClearCache it, or use a new batch id"
            )
        if not spec.requests:
            raise InvalidArgument("batch.requests is empty")
        admitted = admission.admit_batch(spec, self._limits(), warmup=False)
        adapter_ops.check_adapters(self.adapters, [a.spec.adapter_index for a in admitted])
        cached = None if cached_batch_id is None else self.batches[cached_batch_id]
        if cached is not None:
            check_unique_ids([cached.request_ids, [a.spec.id for a in admitted]])
        generations, batch = self._prefill(spec.id, admitted, cached, warmup=False, still_wanted=still_wanted)
        if cached is not None:
            del self.batches[cached.id]
        if batch is not None:
            self.batches[batch.id] = batch
        return StepResult(tuple(generations), None if batch is None else batch.info())

    def decode(self, batch_ids: Sequence[int], still_wanted: StillWanted | None = None) -> StepResult:
        """One token per decoding row; pending prefills of these batches compute their next chunk.
        `still_wanted`: as in prefill (a token the router never receives must not be consumed)."""
        if not batch_ids:
            raise InvalidArgument("batches is empty")
        if len(set(batch_ids)) != len(batch_ids):
            raise InvalidArgument(f"batches names a batch twice: {list(batch_ids)[:20]}")
        missing = [b for b in batch_ids if b not in self.batches]
        if missing:
            raise NotFound(f"batch {missing[0]} is not a cached batch")
        check_unique_ids([self.batches[b].request_ids for b in batch_ids])
        originals = [self.batches.pop(b) for b in batch_ids]
        found = [la for la in (self.lookaheads.pop(b, None) for b in batch_ids) if la is not None]
        try:  # compute everything before changing anything
            batch = Batch.concatenate(originals)
            out = host = chunks = ahead = spec = None
            if len(batch) and self.speculator is not None:
                spec = self.speculator.compute(batch, found)  # None: nothing to verify, a plain step
                if spec is not None and self.overlap:  # the next verify runs while the host finishes
                    ahead = self.speculator.look_ahead(batch, spec)
            if len(batch) and spec is None:
                plain = [la for la in found if isinstance(la, Lookahead)]
                logits, used = logits_for(batch, plain, self.runner.decode)  # [B, V]
                out = batch.chooser.choose(logits)
                to_host = out.start_to_host()  # enqueued before the lookahead: its wait excludes it
                if self.overlap:  # the next step's forward runs while the host finishes this one
                    ahead = look_ahead(batch, out.next_ids, self.runner.decode)
                host = to_host()  # the step's one device -> host sync
            if batch.pending:
                budget = self._chunk_budget() - len(batch)
                plan = prefilling.plan_chunks(batch.pending, budget)
                chunks = prefilling.compute(self, list(zip(batch.pending, plan, strict=True)))
            commit_or_cancel(still_wanted)
        except BaseException:
            for b in originals:  # nothing was mutated yet: the router may retry or clear them
                self.batches[b.id] = b
            restore_lookaheads(self.lookaheads, originals, found)
            raise
        generations: list[GenerationOut] = []
        rows = None
        if spec is not None:
            self.speculator.commit(batch, spec)
            generations, rows = self.emit(batch, spec.host, first_token=False)
        elif out is not None:
            batch.chooser.update(out.next_ids, host.next_ids)
            batch.advance(out.next_ids)
            generations, rows = self.emit(batch, host, first_token=False)
        pending: list[PendingPrefill] = []
        if chunks is not None:
            gens, started, still = prefilling.commit(self, batch.id, chunks)
            pending = in_order(batch.pending, still)
            generations += gens
            rows = self._join(batch.id, [rows, started], [])
        remaining = self._join(batch.id, [rows], pending)
        if remaining is not None:
            self.batches[remaining.id] = remaining
            if ahead is not None:
                self.lookaheads[remaining.id] = ahead
        if out is not None:
            self.lookahead_rows_used += used
        return StepResult(tuple(generations), None if remaining is None else remaining.info())

    def prepare_grammars(self, spec: BatchSpec) -> None:
        """Compile the batch's schemas into the cache (any thread): bad ones fail here, before the batch
        waits for the model thread, and the model thread's admission then finds them compiled."""
        schemas = {r.sampling.schema for r in spec.requests if r.sampling.schema is not None}
        with contextlib.suppress(NotImplementedError):  # no llguidance: compile_schema says so
            for s in schemas:
                self.grammars.start(s)  # every compile thread busy at once
        for r in spec.requests:
            admission.compile_schema(r, self.grammars)

    def filter_batch(self, batch_id: int, request_ids: Sequence[int]) -> CachedBatchInfo:
        batch = self._get(batch_id)
        keep_ids = set(request_ids)
        keep = [i for i, r in enumerate(batch.requests) if r.id in keep_ids]
        pending = [p for p in batch.pending if p.request.id in keep_ids]
        if len(keep) + len(pending) == len(batch.request_ids):
            return batch.info()
        for r in batch.all_requests:
            if r.id not in keep_ids:
                self._release(r)
        if not keep and not pending:
            del self.batches[batch_id]
            self.lookaheads.pop(batch_id, None)
            return CachedBatchInfo(batch_id, (), 0, 0)
        self.batches[batch_id] = self._replan(batch.select(keep, pending))
        return self.batches[batch_id].info()

    def clear_cache(self, batch_id: int | None = None) -> None:
        ids = list(self.batches) if batch_id is None else [self._get(batch_id).id]
        for b in ids:
            self.lookaheads.pop(b, None)
            for r in self.batches.pop(b).all_requests:
                self._release(r)

    def embed(self, spec: BatchSpec) -> list[tuple[int, list[float]]]:
        if not spec.requests:
            raise InvalidArgument("batch.requests is empty")
        admitted = admission.admit_batch(spec, self._limits(), warmup=False, generation=False)
        adapter_ops.check_adapters(self.adapters, [a.spec.adapter_index for a in admitted])
        # No KV cache bounds an Embed: bound its tokens as a Prefill's are (Warmup's budget).
        budget = max(self.max_prefill_tokens or 0, self.model_config.max_position_embeddings)
        tokens = sum(len(a.ids) for a in admitted)
        if tokens > budget:
            raise ResourceExhausted(
                f"Embed batch of {tokens} tokens; this shard embeds at most {budget} tokens per call "
                "(Warmup's max_prefill_tokens, or the model's positions): split the batch"
            )
        hidden = self.runner.embed([a.ids for a in admitted], [a.spec.adapter_index for a in admitted])
        rows = hidden.float().cpu().tolist()
        return [(a.spec.id, row) for a, row in zip(admitted, rows, strict=True) if self.emits(a.spec.id)]

    def warmup(
        self, spec: BatchSpec, max_input_length: int, max_prefill_tokens: int, max_new_tokens: int
    ) -> int:
        """Run the router's worst-case batch, size the KV cache, capture the decode graphs (warmup.py)."""
        return warmup.warmup(self, spec, max_input_length, max_prefill_tokens, max_new_tokens)

    # ---- adapters --------------------------------------------------------------------------------------

    def download_adapter(self, spec: AdapterSpec) -> float:
        """File I/O only (runs beside the model thread): fetch and validate, -> device bytes / budget."""
        return self.adapters.download(spec)

    def prepare_adapter(self, spec: AdapterSpec) -> object:
        """File I/O only (runs on the I/O thread): LoadAdapter's reading, validation and packing."""
        return self.adapters.prepare(spec)

    def load_adapter(self, index: int, spec: AdapterSpec, prepared: object | None = None) -> None:
        """`prepared`: prepare_adapter(spec)'s result, so that the model thread reads no file."""
        adapter_ops.load_adapter(self, index, spec, prepared)

    def offload_adapter(self, index: int, spec: AdapterSpec) -> bool:
        return adapter_ops.offload_adapter(self, index, spec)

    # ---- internals -------------------------------------------------------------------------------------

    def next_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id - 1

    def emits(self, request_id: int) -> bool:
        return request_id % self.tp.world_size == self.tp.rank

    def emit(
        self, batch: Batch, host: HostSample | HostTokens, first_token: bool
    ) -> tuple[list[GenerationOut], Batch | None]:
        """Stopping + detokenization of the rows on the host; finished requests leave (blocks freed).
        -> (generations, the rows still running, without pending prefills)."""
        generations = emit_step(batch, host, first_token, self.tokenizer, self.special_ids)
        keep = []
        for i, r in enumerate(batch.requests):
            if r.tracker.finish_reason is None:
                keep.append(i)
            else:
                self._release(r)
        if not keep:
            return generations, None
        # Nobody finished (most steps): the same tensors, no gather.
        return generations, batch.rows_view() if len(keep) == len(batch) else batch.select(keep, [])

    def _limits(self) -> admission.Limits:
        return admission.Limits(
            tokenizer=self.tokenizer,
            vocab_size=self.model_config.vocab_size,
            max_positions=self.model_config.max_position_embeddings,
            router_blocks=self.router_blocks,
            num_blocks=self.runner.kv_cache.num_blocks,
            block_size=self.model.block_size,
            chunking=self.max_prefill_tokens is not None,
            grammars=self.grammars,
        )

    def _chunk_budget(self) -> int:
        if self.max_prefill_tokens is None:  # admission refuses chunk_len before Warmup
            raise FailedPrecondition("pending prefill chunks before Warmup set max_prefill_tokens")
        return self.max_prefill_tokens

    def _prefill(
        self, batch_id: int, admitted: list[admission.Admitted], cached: Batch | None, *, warmup: bool,
        still_wanted: StillWanted | None = None,
    ) -> tuple[list[GenerationOut], Batch | None]:  # fmt: skip
        """Allocate, forward new requests' first chunks (and `cached`'s pending chunks), commit.
        -> (generations, the joined batch: cached rows, new rows, still pending; None if empty)."""
        started: list[PendingPrefill] = []
        try:
            for a in admitted:
                started.append(prefilling.start_request(self, a, warmup=warmup))
            items = [(p, p.next_chunk) for p in started]
            old = cached.pending if cached is not None else []
            if old:
                budget = self._chunk_budget() - sum(n for _, n in items)
                items += list(zip(old, prefilling.plan_chunks(old, budget), strict=True))
            computed = prefilling.compute(self, items)
            commit_or_cancel(still_wanted)
        except BaseException as e:
            for p in started:
                self._release(p.request)
            if isinstance(e, OutOfBlocks):
                raise ResourceExhausted(f"{e}: the batch needs fewer or shorter requests") from None
            raise
        generations, rows, pending = prefilling.commit(self, batch_id, computed)
        if cached is None:
            return generations, self._join(batch_id, [rows], in_order(started, pending))
        keep = in_order(cached.pending, pending) + in_order(started, pending)  # oldest first
        return generations, self._join(cached.id, [cached.rows_view(), rows], keep)

    def _join(self, batch_id: int, parts: list[Batch | None], pending: list[PendingPrefill]) -> Batch | None:
        """One batch of the rows of `parts` and the pending prefills (None when nothing is live)."""
        parts = [b for b in parts if b is not None and len(b)]
        if not parts and not pending:
            return None
        if not parts:
            batch = Batch.of_pending(batch_id, pending, self.model_config.vocab_size, self.device)
        else:
            batch = Batch.concatenate(parts)
            batch.id = batch_id
            batch.pending = pending
        return self._replan(batch)

    def _replan(self, batch: Batch) -> Batch:
        """Plan the pending prefills' next chunks (CachedBatch.current_tokens reports them)."""
        if batch.pending:
            plan = prefilling.plan_chunks(batch.pending, (self.max_prefill_tokens or 0) - len(batch))
            for p, n in zip(batch.pending, plan, strict=True):
                p.next_chunk = n
        return batch

    def _release(self, r) -> None:
        """A request leaves: free the shard's blocks (the router's are the router's to reuse)."""
        if r.own_blocks:
            self.blocks.free(r.seq_id)

    def _get(self, batch_id: int) -> Batch:
        try:
            return self.batches[batch_id]
        except KeyError:
            raise NotFound(f"batch {batch_id} is not a cached batch") from None

    def _new_block_manager(self, num_blocks: int) -> BlockManager:
        return BlockManager(
            num_blocks,
            self.model.block_size,
            num_reserved=1,
            enable_prefix_caching=True,
            sliding_window=self.model_config.sliding_window,
        )

    def _resize_cache(self, num_blocks: int) -> None:
        self.lookaheads.clear()  # computed against the old cache
        self.runner.kv_cache = None  # drop the old tensors before allocating the new ones
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            self.runner.kv_cache = self.kv_scales.new_cache(num_blocks)
        except torch.OutOfMemoryError:
            raise ResourceExhausted(
                f"cannot allocate a KV cache of {num_blocks} blocks: lower --max-kv-cache-bytes or the "
                "router's --max-batch-prefill-tokens"
            ) from None
        self.blocks = self._new_block_manager(num_blocks)
