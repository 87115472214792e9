"""Speculative decoding through the server: a 2-rank tensor-parallel group in router-allocation mode
with `--speculative-tokens 3` reports Info.speculate, takes the router's extra speculative slots, and
gives every request the tokens of the plain single shard (greedy, seeded sampling, adapters, JSON
schemas), with several tokens per step and GeneratedText.skipped_tokens counting them."""

from __future__ import annotations

import pytest
from shard_harness import DEFAULT_KV_BYTES, LIMITS, running_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.testing.json_schemas import SCHEMAS, schema_text
from shard_server.types import AdapterSpec, RequestSpec, SamplingParams, StoppingParams


@pytest.mark.slow  # ~35 s: two ranks start, then a plain shard for comparison
def test_tp_router_blocks_speculation_equals_plain_single_shard(tiny_model_dir, shared_shard):
    reqs = [
        RequestSpec(
            id=k,
            input_ids=(1, 9 + k, 33, 34 + k) * 3,
            sampling=SamplingParams(do_sample=k % 3 == 1, seed=k, temperature=0.8),
            stopping=StoppingParams(40, ignore_eos_token=True),
            adapter_index=k % 3,
        )
        for k in range(6)
    ]
    # Schema rows speculate too: every rank computes the same grammar masks and accepts the same drafts.
    reqs += [
        RequestSpec(
            id=6 + k,
            input_ids=(1, 93, 4, 80, 67, 313, 306) * 2,
            sampling=SamplingParams(schema=schema_text(SCHEMAS[name]), do_sample=k == 1, seed=k),
            stopping=StoppingParams(40, ignore_eos_token=True),
            adapter_index=k + 1,
        )
        for k, name in enumerate(["person", "tool_call"])
    ]
    args = (
        "--max-kv-cache-bytes",
        str(DEFAULT_KV_BYTES),
        "--speculative-tokens",
        "3",
        "--block-allocator",
        "router",
    )
    with running_shard(tiny_model_dir, *args, command="launch", num_shard=2) as sp:
        for rank in (0, 1):
            info = sp.stub(rank).Info(pb.InfoRequest(), timeout=30)
            assert info.speculate == 3 and info.requires_block_allocator
        with sp.router(LIMITS) as router:
            router.warmup()
            for index in (1, 2):
                path = shared_shard.adapters[index]
                assert router.load_adapter(index, AdapterSpec(adapter_ids=(str(path),), source="local"))
            speculative = router.generate(reqs)
    with shared_shard.router(LIMITS) as single:
        plain = single.generate(reqs, clear_at_end=False)
    assert [r.token_ids for r in speculative] == [r.token_ids for r in plain]
    assert [r.text for r in speculative] == [r.text for r in plain]
    assert all(
        r.generated_tokens == 40 and p.skipped_tokens == 0 for r, p in zip(speculative, plain, strict=True)
    )
    assert sum(r.skipped_tokens for r in speculative) > 0  # some steps returned several tokens
    assert sum(r.skipped_tokens for r in speculative[6:]) > 0  # schema rows among them
