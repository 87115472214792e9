"""Decode overlap on and off give the same tokens under a randomised router.

The router here does what a real one does between steps, at random: new batches (some chunked, with
adapters, stop sequences, seeds), Prefill into a running batch, Decode of several batches at once
(concatenation), FilterBatch of cancelled requests, ClearCache of a batch. The same schedule runs
against an engine with the overlap and one without; every request's tokens, logprobs and finish
reason must match, no KV block may leak, and the overlap engine must really have used precomputed
steps (the comparison would be empty otherwise).
"""

from __future__ import annotations

import pytest
from random_router import run_schedule

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, StoppingParams

MAX_PREFILL = 40


def make_engine(model_dir, adapters, overlap: bool) -> ShardEngine:
    engine = ShardEngine(ShardConfig(model_dir=model_dir, max_kv_cache_bytes=1 << 21, overlap=overlap))
    warm = RequestSpec(id=0, input_ids=(1, 5, 6, 7), stopping=StoppingParams(max_new_tokens=2))
    engine.warmup(BatchSpec(id=0, requests=(warm,)), 32, MAX_PREFILL, 8)
    for i, path in enumerate(adapters, start=1):
        engine.load_adapter(i, AdapterSpec(adapter_ids=(str(path),), source="local"))
    return engine


@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_factory):
    adapters = [
        adapter_factory(tiny_model_dir, rank=4, target_modules=("q_proj", "v_proj"), seed=11),
        adapter_factory(tiny_model_dir, rank=8, target_modules=("o_proj", "down_proj"), seed=12),
    ]
    return tiny_model_dir, adapters


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_overlap_on_and_off_give_the_same_tokens(setup, seed):
    model_dir, adapters = setup
    plain = make_engine(model_dir, adapters, overlap=False)
    ahead = make_engine(model_dir, adapters, overlap=True)
    want = run_schedule(plain, seed, len(adapters))
    got = run_schedule(ahead, seed, len(adapters))
    assert plain.lookahead_rows_used == 0
    assert ahead.lookahead_rows_used > 0, "the schedule never used a precomputed step"
    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid]["ids"] == want[rid]["ids"], f"request {rid}"
        assert got[rid]["finish"] == want[rid]["finish"], f"request {rid}"
        assert got[rid]["lps"] == pytest.approx(want[rid]["lps"], abs=1e-4), f"request {rid}"


def test_lookahead_skips_rows_whose_token_is_their_last_by_length(tiny_model_dir):
    """A request with max_new_tokens=1 owns no KV slot past its prompt: it must never be looked ahead."""
    engine = make_engine(tiny_model_dir, [], overlap=True)
    reqs = tuple(
        RequestSpec(id=i, input_ids=(5, 6, 7, 8 + i),
                    stopping=StoppingParams(max_new_tokens=m, ignore_eos_token=True))
        for i, m in ((1, 2), (2, 5))
    )  # fmt: skip
    info = engine.prefill(BatchSpec(id=7, requests=reqs)).batch
    engine.decode([info.id])  # request 1 takes its last token here: only request 2 is looked ahead
    la = engine.lookaheads[info.id]
    assert [r.id for r in la.requests] == [2]
    engine.clear_cache(None)
    assert not engine.lookaheads and engine.free_blocks() == engine.usable_blocks()
