"""ShardEngine: the shard's state (model, KV cache, blocks, adapters, cached batches) and its operations.

Every method runs on the server's one model thread (except `download_adapter`, which only reads files
and touches no engine state). Errors meant for the router are `shard_server.errors.*`; exceptions of
model/ and cache/ are translated here. A failed call leaves every cached batch as it was and leaks no
KV block.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from cache.adapter_store import AdapterStore
from cache.block_manager import BlockManager, OutOfBlocks
from model.adapters.errors import AdapterError
from model.config import MistralConfig
from model.flash_mistral import FlashMistralForCausalLM
from shard_server import admission
from shard_server.batch import Batch, RequestState, grouped_order
from shard_server.bootstrap import build_adapter_store, init_tensor_parallel, load_tokenizer, torch_dtype
from shard_server.config import ShardConfig
from shard_server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ShardError
from shard_server.kv_sizing import KVSizing
from shard_server.outputs import emit_step
from shard_server.runner import ModelRunner, PrefillSeq, pad_block_tables
from shard_server.sampling import HostSample, NextTokenChooser
from shard_server.types import AdapterSpec, BatchSpec, CachedBatchInfo, GenerationOut, ShardInfo, StepResult

log = logging.getLogger(__name__)


class ShardEngine:
    def __init__(self, config: ShardConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = torch_dtype(config.dtype)
        self.tp = init_tensor_parallel(config, self.device)
        self.model_config = MistralConfig.from_pretrained(config.model_dir)
        self.tokenizer, self.eos_ids, self.special_ids = load_tokenizer(config.model_dir, self.model_config)
        self.model = FlashMistralForCausalLM.from_pretrained(
            config.model_dir, dtype=self.dtype, device=self.device, tp=self.tp
        )
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else torch.float8_e4m3fn
        self.sizing = KVSizing(self.model, self.kv_dtype, config.max_kv_cache_bytes)
        self.adapters: AdapterStore = build_adapter_store(
            config, self.model_config, self.device, self.dtype, self.tp
        )
        num_blocks = self.sizing.initial_blocks()
        self.runner = ModelRunner(
            self.model, self.model.new_kv_cache(num_blocks, self.kv_dtype), self.adapters
        )
        self.blocks = self._new_block_manager(num_blocks)
        if self.device.type == "cuda" and config.cuda_graphs:
            from shard_server.graphs import DecodeGraphs

            self.runner.graphs = DecodeGraphs(self.runner, max_batch=config.max_batch_size or 256)
        self.batches: dict[int, Batch] = {}
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
            requires_block_allocator=False,
            chunked_prefill=False,
            preloaded_adapters=tuple(self.adapters.preloaded_adapters()),
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

    # ---- batches ---------------------------------------------------------------------------------------

    def prefill(self, spec: BatchSpec, cached_batch_id: int | None = None) -> StepResult:
        if cached_batch_id is not None and cached_batch_id not in self.batches:
            raise NotFound(f"cached_batch {cached_batch_id} is not a cached batch")
        if spec.id in self.batches and spec.id != cached_batch_id:
            raise InvalidArgument(f"batch.id {spec.id} is already a cached batch")
        if not spec.requests:
            raise InvalidArgument("batch.requests is empty")
        admitted = admission.admit_batch(spec, self._limits(), warmup=False)
        self._check_adapters([a.spec.adapter_index for a in admitted])
        generations, batch = self._prefill(spec.id, admitted)
        if cached_batch_id is not None:
            cached = self.batches.pop(cached_batch_id)
            batch = cached if batch is None else Batch.concatenate([cached, batch])
        if batch is not None:
            self.batches[batch.id] = batch
        return StepResult(tuple(generations), None if batch is None else batch.info())

    def decode(self, batch_ids: Sequence[int]) -> StepResult:
        if not batch_ids:
            raise InvalidArgument("batches is empty")
        if len(set(batch_ids)) != len(batch_ids):
            raise InvalidArgument(f"batches names a batch twice: {list(batch_ids)}")
        missing = [b for b in batch_ids if b not in self.batches]
        if missing:
            raise NotFound(f"batch {missing[0]} is not a cached batch")
        originals = [self.batches.pop(b) for b in batch_ids]
        try:
            batch = Batch.concatenate(originals)
            logits = self.runner.decode(batch)  # [B, V]
            out = batch.chooser.choose(logits)
            host = out.to_host()  # the step's one device -> host sync
        except BaseException:
            for b in originals:  # nothing was mutated yet: the router may retry or clear them
                self.batches[b.id] = b
            raise
        batch.chooser.update(out.next_ids)
        batch.advance(out.next_ids)
        generations, remaining = self._emit(batch, host, prefill_logits=None)
        if remaining is not None:
            self.batches[remaining.id] = remaining
        return StepResult(tuple(generations), None if remaining is None else remaining.info())

    def filter_batch(self, batch_id: int, request_ids: Sequence[int]) -> CachedBatchInfo:
        batch = self._get(batch_id)
        keep_ids = set(request_ids)
        keep = [i for i, r in enumerate(batch.requests) if r.id in keep_ids]
        if len(keep) == len(batch):
            return batch.info()
        for r in batch.requests:
            if r.id not in keep_ids:
                self.blocks.free(r.seq_id)
        if not keep:
            del self.batches[batch_id]
            return CachedBatchInfo(batch_id, (), 0, 0)
        self.batches[batch_id] = batch.select(keep)
        return self.batches[batch_id].info()

    def clear_cache(self, batch_id: int | None = None) -> None:
        ids = list(self.batches) if batch_id is None else [self._get(batch_id).id]
        for b in ids:
            for r in self.batches.pop(b).requests:
                self.blocks.free(r.seq_id)

    def embed(self, spec: BatchSpec) -> list[tuple[int, list[float]]]:
        if not spec.requests:
            raise InvalidArgument("batch.requests is empty")
        admitted = admission.admit_batch(spec, self._limits(), warmup=False, generation=False)
        hidden = self.runner.embed([a.ids for a in admitted])  # [B, hidden]
        rows = hidden.float().cpu().tolist()
        return [(a.spec.id, row) for a, row in zip(admitted, rows, strict=True) if self._emits(a.spec.id)]

    def warmup(
        self, spec: BatchSpec, max_input_length: int, max_prefill_tokens: int, max_new_tokens: int
    ) -> int:
        """Run the router's worst-case batch (prefill + one decode), then size the KV cache."""
        if self.batches:
            raise FailedPrecondition(f"Warmup with {len(self.batches)} cached batches: ClearCache first")
        admitted = admission.admit_batch(spec, self._limits(), warmup=True) if spec.requests else []
        tokens = sum(len(a.ids) + 1 for a in admitted)
        self._resize_cache(self.sizing.blocks_for_tokens(tokens, len(admitted)))
        self.sizing.start_peak_tracking()
        try:
            if admitted:
                _, batch = self._prefill(spec.id, admitted)
                if batch is not None:
                    self.batches[batch.id] = batch
                    self.decode([batch.id])
        except torch.OutOfMemoryError as e:
            raise ResourceExhausted(
                f"Warmup ran out of device memory with {tokens} prefill tokens in {len(admitted)} requests "
                f"(max_input_length={max_input_length}, max_prefill_tokens={max_prefill_tokens}): lower the "
                f"router's --max-batch-prefill-tokens or --max-input-length ({e})"
            ) from None
        finally:
            self.clear_cache()
        num_blocks = self.sizing.blocks_after_warmup(self.runner.kv_cache)
        self._resize_cache(num_blocks)
        usable = self.blocks.num_usable * self.model.block_size
        log.info("warmup: KV cache sized to %d blocks = %d tokens (%s)", num_blocks, usable, self.kv_dtype)
        return usable

    # ---- adapters --------------------------------------------------------------------------------------

    def download_adapter(self, spec: AdapterSpec) -> float:
        """File I/O only (runs beside the model thread): fetch and validate, -> device bytes / budget."""
        with adapter_errors():
            return self.adapters.download(spec)

    def load_adapter(self, index: int, spec: AdapterSpec) -> None:
        if index == 0:
            raise FailedPrecondition("adapter_index 0 is the base model; load adapters at index >= 1")
        with adapter_errors():
            self.adapters.load(index, spec)

    def offload_adapter(self, index: int, spec: AdapterSpec) -> bool:
        if not self.adapters.is_loaded(index):
            return False
        users = [b.id for b in self.batches.values() if index in b.adapter_indices]
        if users:
            raise FailedPrecondition(f"adapter index {index} is in use by cached batches {users}")
        with adapter_errors():
            return self.adapters.offload(index)

    # ---- internals -------------------------------------------------------------------------------------

    def _limits(self) -> admission.Limits:
        return admission.Limits(
            tokenizer=self.tokenizer,
            vocab_size=self.model_config.vocab_size,
            max_positions=self.model_config.max_position_embeddings,
            router_blocks=False,
        )

    def _check_adapters(self, indices: Sequence[int]) -> None:
        for i in dict.fromkeys(indices):
            if i != 0 and not self.adapters.is_loaded(i):
                raise NotFound(f"adapter_index {i} is not loaded (LoadAdapter it first)")

    def _emits(self, request_id: int) -> bool:
        return request_id % self.tp.world_size == self.tp.rank

    def _prefill(
        self, batch_id: int, admitted: list[admission.Admitted]
    ) -> tuple[list[GenerationOut], Batch | None]:
        """Allocate, forward, sample the first token -> (generations, the batch of unfinished requests)."""
        admitted = [admitted[i] for i in grouped_order([a.spec.adapter_index for a in admitted])]
        requests: list[RequestState] = []
        seqs: list[PrefillSeq] = []
        try:
            for a in admitted:
                r, seq = self._allocate(a)
                requests.append(r)
                seqs.append(seq)
            with adapter_errors():
                out = self.runner.prefill(seqs)
            chooser = NextTokenChooser.from_params(
                [r.sampling for r in requests],
                [r.prompt_ids for r in requests],
                self.model_config.vocab_size,
                self.device,
            )
            sample = chooser.choose(out.last_logits)
            host = sample.to_host()  # the step's one device -> host sync
        except BaseException as e:
            for r in requests:
                self.blocks.free(r.seq_id)
            if isinstance(e, OutOfBlocks):
                raise ResourceExhausted(f"{e}: the batch needs fewer or shorter requests") from None
            raise
        for r in requests:
            self.blocks.mark_computed(r.seq_id, len(r.prompt_ids))
            r.length = len(r.prompt_ids)
        chooser.update(sample.next_ids)
        batch = Batch(
            batch_id,
            requests,
            chooser,
            sample.next_ids.clone(),
            torch.tensor([r.length for r in requests], dtype=torch.int64, device=self.device),
            pad_block_tables([s.block_table for s in seqs], self.device),
        )
        return self._emit(batch, host, prefill_logits=out.all_logits)

    def _allocate(self, a: admission.Admitted) -> tuple[RequestState, PrefillSeq]:
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        prompt = list(a.ids)
        max_new = a.spec.stopping.max_new_tokens
        reuse = not a.spec.prefill_logprobs  # a reused prefix has no logits to report
        key = (a.spec.adapter_index, self.adapters.generation(a.spec.adapter_index))
        alloc = self.blocks.allocate(seq_id, len(prompt), token_ids=prompt if reuse else None, cache_key=key)
        try:
            # Positions the generation will write: the last generated token is never fed back.
            self.blocks.append_slots(seq_id, max_new - 1)
        except OutOfBlocks:
            self.blocks.free(seq_id)
            raise
        tracker = admission.tracker(self.tokenizer, prompt, a.spec.stopping, self.eos_ids, self.special_ids)
        table = self.blocks.block_table(seq_id)
        state = RequestState(
            id=a.spec.id,
            seq_id=seq_id,
            adapter_index=a.spec.adapter_index,
            prompt_ids=prompt,
            sampling=a.spec.sampling,
            max_new_tokens=max_new,
            tracker=tracker,
            prefill_logprobs=a.spec.prefill_logprobs,
            emits=self._emits(a.spec.id),
            table_len=len(table),
        )
        seq = PrefillSeq(
            ids=prompt,
            cached=alloc.num_cached_tokens,
            slots=alloc.slots[: len(prompt) - alloc.num_cached_tokens],
            block_table=table,
            adapter_index=a.spec.adapter_index,
            all_logits=a.spec.prefill_logprobs,
        )
        return state, seq

    def _emit(
        self, batch: Batch, host: HostSample, prefill_logits
    ) -> tuple[list[GenerationOut], Batch | None]:
        """Stopping + detokenization on the host; finished requests leave the batch (and free blocks)."""
        generations = emit_step(batch, host, prefill_logits, self.tokenizer, self.special_ids)
        keep = []
        for i, r in enumerate(batch.requests):
            if r.tracker.finish_reason is None:
                keep.append(i)
            else:
                self.blocks.free(r.seq_id)
        if not keep:
            return generations, None
        return generations, batch if len(keep) == len(batch) else batch.select(keep)

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
        self.runner.kv_cache = None  # drop the old tensors before allocating the new ones
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            self.runner.kv_cache = self.model.new_kv_cache(num_blocks, self.kv_dtype)
        except torch.OutOfMemoryError:
            raise ResourceExhausted(
                f"cannot allocate a KV cache of {num_blocks} blocks: lower --max-kv-cache-bytes or the "
                "router's --max-batch-prefill-tokens"
            ) from None
        self.blocks = self._new_block_manager(num_blocks)


@contextlib.contextmanager
def adapter_errors() -> Iterator[None]:
    """model.adapters errors name their gRPC code; re-raise them as the matching ShardError."""
    try:
        yield
    except AdapterError as e:
        err = ShardError(str(e))
        err.code = e.code
        raise err from e
