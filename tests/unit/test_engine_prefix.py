"""Prefix caching end to end in the engine: reuse computes only the new tokens and changes nothing in
the outputs; another adapter, or the same index reloaded with another adapter, never shares.
(Eviction order with exact block ids: tests/unit/test_block_manager.py.)"""

from __future__ import annotations

import random

import pytest

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, SamplingParams, StoppingParams

rng = random.Random(5)
PREFIX = [rng.randrange(3, 512) for _ in range(40)]  # two full blocks of 16 + 8 tokens
TAIL = [rng.randrange(3, 512) for _ in range(10)]


def run(engine: ShardEngine, prompt: list[int], adapter: int = 0, rid: int = 1):
    """-> (tokens, logprobs, top-5 alternative logprobs per step, prompt tokens computed)."""
    before = engine.computed_prefill_tokens
    spec = RequestSpec(
        id=rid,
        input_ids=tuple(prompt),
        adapter_index=adapter,
        sampling=SamplingParams(return_k_alternatives=5),
        stopping=StoppingParams(max_new_tokens=5, ignore_eos_token=True),
    )
    result = engine.prefill(BatchSpec(id=rid, requests=(spec,)))
    gens = list(result.generations)
    while result.batch is not None:
        result = engine.decode([rid])
        gens += result.generations
    ids = [t for g in gens for t in g.next_tokens.ids]
    lps = [lp for g in gens for lp in g.next_tokens.logprobs]
    alts = [lp for g in gens for a in g.next_tokens.alternatives for lp in a.logprobs]
    assert engine.free_blocks() == engine.usable_blocks()
    return ids, lps, alts, engine.computed_prefill_tokens - before


@pytest.fixture()
def engine(tiny_model_dir):
    return ShardEngine(ShardConfig(model_dir=tiny_model_dir, max_kv_cache_bytes=1 << 20))


def test_same_prefix_and_adapter_computes_only_new_tokens(engine, tiny_model_dir):
    fresh = ShardEngine(ShardConfig(model_dir=tiny_model_dir, max_kv_cache_bytes=1 << 20))
    expected = run(fresh, PREFIX + TAIL)
    assert expected[3] == 50
    assert run(engine, PREFIX + [7])[3] == 41
    reused = engine.blocks.num_reused_tokens
    ids, lps, alts, computed = run(engine, PREFIX + TAIL)
    assert engine.blocks.num_reused_tokens - reused == 32  # the two full blocks of the prefix
    assert computed == 50 - 32
    assert ids == expected[0]
    assert lps == pytest.approx(expected[1], abs=1e-5) and alts == pytest.approx(expected[2], abs=1e-5)


def test_other_adapter_or_reloaded_index_gets_no_reuse(engine, tiny_model_dir, adapter_factory):
    first = adapter_factory(tiny_model_dir, rank=8, target_modules=("q_proj", "k_proj", "v_proj"), seed=21)
    other = adapter_factory(tiny_model_dir, rank=8, target_modules=("q_proj", "k_proj", "v_proj"), seed=22)
    engine.load_adapter(1, AdapterSpec(adapter_ids=(str(first),), source="local"))
    run(engine, PREFIX + [7], adapter=0)
    assert run(engine, PREFIX + TAIL, adapter=1)[3] == 50  # adapter 0's blocks are not adapter 1's
    assert run(engine, PREFIX + [9], adapter=1)[3] == 41 - 32  # control: adapter 1 reuses its own
    assert engine.offload_adapter(1, AdapterSpec(adapter_ids=(str(first),), source="local"))
    engine.load_adapter(1, AdapterSpec(adapter_ids=(str(other),), source="local"))
    fresh = ShardEngine(ShardConfig(model_dir=tiny_model_dir, max_kv_cache_bytes=1 << 20))
    fresh.load_adapter(1, AdapterSpec(adapter_ids=(str(other),), source="local"))
    expected = run(fresh, PREFIX + TAIL, adapter=1)
    got = run(engine, PREFIX + TAIL, adapter=1)
    assert got[3] == 50  # same index, new load generation: the old adapter's KV is not reused
    assert got[0] == expected[0] and got[1] == pytest.approx(expected[1], abs=1e-5)
