"""Sliding window in shard-allocation mode: a sequence holds a ring of ceil(W / block_size) + 1
blocks whatever its length, and its greedy tokens equal transformers' with the same window."""

from __future__ import annotations

import random

import pytest
import torch

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import BatchSpec, RequestSpec, StoppingParams


@torch.no_grad()
def hf_greedy(model_dir, prompts: list[list[int]], total: int) -> list[list[int]]:
    """transformers' greedy continuations to `total` tokens, one full forward per token (no cache to
    get wrong; the prompts are equally long after the shorter one's first steps, so no padding)."""
    from transformers import MistralForCausalLM

    hf = MistralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seqs = [list(p) for p in prompts]
    while any(len(s) < total for s in seqs):
        for s in seqs:
            if len(s) < total:
                s.append(int(hf(torch.tensor([s])).logits[0, -1].argmax()))
    return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


# W=8: the ring (2 blocks of 16) is longer than the window; W=24: not a multiple of the block size.
@pytest.mark.parametrize("window", [8, pytest.param(24, marks=pytest.mark.slow)])
def test_ring_bounds_blocks_for_5x_window_and_tokens_equal_transformers(tiny_model_factory, window):
    model_dir = tiny_model_factory(sliding_window=window)
    engine = ShardEngine(ShardConfig(model_dir=model_dir, max_kv_cache_bytes=1 << 20))
    bs = engine.model.block_size
    ring = -(-window // bs) + 1
    total = 5 * window
    rng = random.Random(window)
    # Prompts longer than the window (the prefill itself wraps the ring), decode to 5 x W.
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (2 * window + 3, 3 * window)]
    requests = tuple(
        RequestSpec(
            id=i,
            input_ids=tuple(p),
            stopping=StoppingParams(max_new_tokens=total - len(p), ignore_eos_token=True),
        )
        for i, p in enumerate(prompts)
    )
    usable = engine.usable_blocks()
    result = engine.prefill(BatchSpec(id=1, requests=requests))
    tokens = {g.request_id: list(g.next_tokens.ids) for g in result.generations}
    steps = 0
    while result.batch is not None:
        batch = engine.batches[1]
        for r in batch.requests:
            held = engine.blocks.sequence(r.seq_id).block_ids
            assert len(held) <= ring, f"step {steps}: {len(held)} blocks held, ring is {ring}"
        assert usable - engine.free_blocks() <= ring * len(batch)
        result = engine.decode([1])
        for g in result.generations:
            tokens[g.request_id].extend(g.next_tokens.ids)
        steps += 1
    assert engine.free_blocks() == usable
    expected = hf_greedy(model_dir, prompts, total)
    for i, p in enumerate(prompts):
        assert len(p) + len(tokens[i]) == total
        assert tokens[i] == expected[i]
