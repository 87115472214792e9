"""Warmup: the router's worst-case batch on a cache sized for it, then the KV cache sized from the peak
memory and the decode CUDA graphs captured against the final cache; any failure restores the cache (and
the graphs) the shard had. Functions of a ShardEngine, which calls them on its model thread."""

from __future__ import annotations

import logging
import time

import torch

from model.errors import FailedPrecondition, ResourceExhausted
from shard_server.engine import admission
from shard_server.types import BatchSpec

log = logging.getLogger("shard_server.engine")


def warmup(
    engine, spec: BatchSpec, max_input_length: int, max_prefill_tokens: int, max_new_tokens: int
) -> int:
    """Run the router's worst-case batch (prefill + one decode), size the KV cache, then capture
    the decode CUDA graphs for requests of up to max_input_length + max_new_tokens tokens."""
    if engine.batches:
        raise FailedPrecondition(f"Warmup with {len(engine.batches)} cached batches: ClearCache first")
    admitted = admission.admit_batch(spec, engine._limits(), warmup=True) if spec.requests else []
    previous = (engine.runner.kv_cache.num_blocks, engine.max_prefill_tokens)
    engine.max_prefill_tokens = max_prefill_tokens if max_prefill_tokens > 0 else None
    tokens = sum(len(a.ids) + 1 for a in admitted)
    try:
        warmup_batch(engine, spec, admitted, tokens, max_input_length, max_prefill_tokens)
        num_blocks = engine.sizing.blocks_after_warmup(engine.runner.kv_cache)
        engine._resize_cache(num_blocks)
        engine.runner.capture_graphs(max_input_length + max_new_tokens)  # against the final cache
    except BaseException:
        restore_after_failed_warmup(engine, *previous)
        raise
    engine.graph_tokens = max_input_length + max_new_tokens
    usable = engine.blocks.num_usable * engine.model.block_size
    log.info("warmup: KV cache sized to %d blocks = %d tokens (%s)", num_blocks, usable, engine.kv_dtype)
    return usable

def restore_after_failed_warmup(engine, num_blocks: int, max_prefill_tokens: int | None) -> None:
    """Whatever failed, the shard serves on with the cache it had (the warmup cache is tiny), and
    with the decode graphs of the last good Warmup captured again against that cache (replacing
    the cache dropped every graph that pointed into the old one)."""
    engine.max_prefill_tokens = max_prefill_tokens
    engine._resize_cache(num_blocks)
    log.warning("warmup failed: KV cache restored to %d blocks", num_blocks)
    if engine.graph_tokens is None:
        return
    try:
        engine.runner.capture_graphs(engine.graph_tokens)
    except Exception:  # noqa: BLE001 - decode runs eagerly without graphs; Warmup's own error wins
        log.exception("warmup failed: decode graphs not captured again; decode runs eagerly")
        engine.runner.graphs.clear()

def warmup_batch(engine, spec, admitted, tokens: int, max_input_length: int, max_prefill_tokens: int):
    """Warmup's worst-case batch on a cache sized for it (prefill + one decode), then cleared."""
    t0 = time.monotonic()
    blocks = engine.sizing.blocks_for_tokens(tokens, len(admitted))
    log.info("warmup 1/4: KV cache of %d blocks for %d requests, %d tokens", blocks, len(admitted),
             tokens)  # fmt: skip
    engine._resize_cache(blocks)
    try:
        if engine.kv_scales.needs_calibration:
            log.info("warmup 2/4: calibrating FP8 KV scales")
            engine.kv_scales.calibrate(engine.runner, [a.ids for a in admitted], max_input_length)
        engine.sizing.start_peak_tracking()
        if admitted:
            log.info("warmup 3/4: prefill + one decode of the worst-case batch")
            _, batch = engine._prefill(spec.id, admitted, None, warmup=True)
            if batch is not None:
                engine.batches[batch.id] = batch
                engine.decode([batch.id])
        log.info("warmup 4/4: sizing the KV cache from peak memory (batch ran in %.2f s)",
                 time.monotonic() - t0)  # fmt: skip
    except torch.OutOfMemoryError as e:
        raise ResourceExhausted(
            f"Warmup ran out of device memory with {tokens} prefill tokens in {len(admitted)} requests "
            f"(max_input_length={max_input_length}, max_prefill_tokens={max_prefill_tokens}): lower the "
            f"router's --max-batch-prefill-tokens or --max-input-length ({e})"
        ) from None
    finally:
        engine.clear_cache()
