"""Chunked prefill: a prompt computed over several steps gives the outputs of one unchunked prefill.

The first chunk's size comes with the request (`chunk_len`); later chunks are the shard's, within
Warmup's max_prefill_tokens, computed by any later Prefill (as cached_batch) or Decode of the batch.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from model.errors import FailedPrecondition, InvalidArgument
from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import BatchSpec, RequestSpec, SamplingParams, StoppingParams

MAX_PREFILL = 24  # Warmup's max_prefill_tokens: the chunk budget of later steps


def make_engine(model_dir, warm: bool = True) -> ShardEngine:
    engine = ShardEngine(ShardConfig(model_dir=model_dir, max_kv_cache_bytes=1 << 20))
    if warm:
        warm_req = RequestSpec(id=0, input_ids=(1, 5, 6, 7), stopping=StoppingParams(max_new_tokens=2))
        engine.warmup(BatchSpec(id=0, requests=(warm_req,)), 16, MAX_PREFILL, 8)
    return engine


def requests() -> list[RequestSpec]:
    rng = random.Random(3)
    out = []
    for i, n in enumerate((70, 41, 9, 55)):
        out.append(
            RequestSpec(
                id=i + 1,
                input_ids=tuple(rng.randrange(3, 512) for _ in range(n)),
                sampling=SamplingParams(do_sample=i == 1, seed=7, temperature=0.8, repetition_penalty=1.1),
                stopping=StoppingParams(max_new_tokens=6 + i, ignore_eos_token=True),
                prefill_logprobs=i == 0,
                chunk_len=None,
            )
        )
    return out


def drive(engine: ShardEngine, schedule: list[list[RequestSpec]]) -> dict[int, dict]:
    """Prefill each group into the running batch (cached_batch), one Decode between groups, then
    Decode to the end. -> per request: tokens, logprobs, prefill logprobs, prefill step count."""
    out: dict[int, dict] = {}
    running = None
    calls = 0

    def take(result):
        for g in result.generations:
            o = out.setdefault(g.request_id, {"ids": [], "lps": [], "first_call": calls})
            o["ids"] += g.next_tokens.ids
            o["lps"] += g.next_tokens.logprobs
            if g.prefill_tokens is not None:
                o["prefill"] = g.prefill_tokens.logprobs
                assert g.prefill_tokens_length == len(g.prefill_tokens.ids)
        return result.batch

    for group in schedule:
        calls += 1
        spec = BatchSpec(id=100 + calls, requests=tuple(group))
        running = take(engine.prefill(spec, running and running.id))
        if running is not None:
            calls += 1
            running = take(engine.decode([running.id]))
    while running is not None:
        calls += 1
        running = take(engine.decode([running.id]))
    assert engine.free_blocks() == engine.usable_blocks()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid]["ids"] == b[rid]["ids"], rid
        assert a[rid]["lps"] == pytest.approx(b[rid]["lps"], abs=1e-4)
        if "prefill" in a[rid]:
            pa, pb = a[rid]["prefill"], b[rid]["prefill"]
            assert math.isnan(pa[0]) and math.isnan(pb[0])
            assert pa[1:] == pytest.approx(pb[1:], abs=1e-4)


@pytest.mark.parametrize("window", [None, 24])
def test_chunked_equals_unchunked(tiny_model_factory, window):
    model_dir = tiny_model_factory(sliding_window=window) if window else tiny_model_factory()
    reqs = requests()
    plain = drive(make_engine(model_dir), [reqs[:2], reqs[2:]])
    engine = make_engine(model_dir)
    chunked = [replace(r, chunk_len=min(len(r.input_ids), 5 + 3 * i)) for i, r in enumerate(reqs)]
    before = engine.computed_prefill_tokens
    got = drive(engine, [chunked[:2], chunked[2:]])
    assert_same(got, plain)
    assert engine.computed_prefill_tokens - before == sum(len(r.input_ids) for r in reqs)
    # A 70-token prompt with a first chunk of 5 and later chunks of <= 24 needs >= 4 steps before
    # its first token; the 9-token prompt (chunk_len = its length) answers in its first Prefill.
    assert got[1]["first_call"] >= 4 and got[3]["first_call"] == 3


def test_pending_prefill_is_listed_and_counted_in_current_tokens(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    long = replace(requests()[0], chunk_len=10)
    result = engine.prefill(BatchSpec(id=1, requests=(long,)))
    assert result.generations == () and result.batch.request_ids == (1,)
    assert result.batch.current_tokens == MAX_PREFILL  # next chunk: the budget (60 tokens remain)
    result = engine.decode([1])
    assert result.generations == () and result.batch.current_tokens == MAX_PREFILL  # 36 remain
    result = engine.decode([1])
    assert result.generations == () and result.batch.current_tokens == 70 - 10 - 2 * MAX_PREFILL
    result = engine.decode([1])
    assert [g.request_id for g in result.generations] == [1]
    assert result.batch.current_tokens == 1  # now a decoding row
    engine.filter_batch(1, [])
    assert engine.free_blocks() == engine.usable_blocks()
    assert engine.info().chunked_prefill


def test_chunk_len_checks(tiny_model_dir):
    cold = make_engine(tiny_model_dir, warm=False)
    r = replace(requests()[0], chunk_len=10)
    with pytest.raises(FailedPrecondition, match="Warmup"):
        cold.prefill(BatchSpec(id=1, requests=(r,)))
    whole = replace(r, chunk_len=len(r.input_ids))  # one chunk needs no budget
    assert cold.prefill(BatchSpec(id=1, requests=(whole,))).generations
    engine = make_engine(tiny_model_dir)
    with pytest.raises(InvalidArgument, match="chunk_len"):
        engine.prefill(BatchSpec(id=1, requests=(replace(r, chunk_len=0),)))
    # An upper bound: more than the prompt computes the prompt (a router's prefix cache may cover part).
    longer = engine.prefill(BatchSpec(id=2, requests=(replace(r, chunk_len=len(r.input_ids) + 9),)))
    assert [g.request_id for g in longer.generations] == [1]
    engine.clear_cache()
    assert engine.free_blocks() == engine.usable_blocks()
