"""Speculative decoding through the server: a 2-rank tensor-parallel group in router-allocation mode
with `--speculative-tokens 3` reports Info.speculate, takes the router's extra speculative slots, and
gives every request the tokens of the plain single shard (greedy, seeded sampling, adapters, JSON
schemas), with several tokens per step and GeneratedText.skipped_tokens counting them."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import parser
from shard_harness import DEFAULT_KV_BYTES, LIMITS, running_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.testing.json_schemas import SCHEMAS, schema_text
from shard_server.types import AdapterSpec, RequestSpec, SamplingParams, StoppingParams


@pytest.mark.slow  # ~35 s each: two ranks start, then a plain shard for comparison
@pytest.mark.parametrize("overlap", [False, True])
def test_tp_router_blocks_speculation_equals_plain_single_shard(tiny_model_dir, shared_shard, overlap):
    """With `--overlap` every rank enqueues the next verify step before its host work (the same drafts
    from the same host tokens on every rank, so the collectives line up: both ranks' speculative
    counters agree); schema rows are left out there, since a batch with one takes no lookahead."""
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
    port = _free_port_pair()
    if overlap:
        reqs = reqs[:6]
    args = (
        "--metrics-port",
        str(port),
        "--max-kv-cache-bytes",
        str(DEFAULT_KV_BYTES),
        "--speculative-tokens",
        "3",
        "--block-allocator",
        "router",
        *(("--overlap",) if overlap else ()),
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
        counters = [_speculative_counters(port + rank) for rank in (0, 1)]
    assert counters[0] == counters[1]  # every rank drafted, verified and accepted alike
    assert counters[0]["verify_steps"] > 0 and counters[0]["accepted_tokens"] > 0
    assert (counters[0]["lookahead_steps"] > 0) == overlap
    with shared_shard.router(LIMITS) as single:
        plain = single.generate(reqs, clear_at_end=False)
    assert [r.token_ids for r in speculative] == [r.token_ids for r in plain]
    assert [r.text for r in speculative] == [r.text for r in plain]
    assert all(
        r.generated_tokens == 40 and p.skipped_tokens == 0 for r, p in zip(speculative, plain, strict=True)
    )
    assert sum(r.skipped_tokens for r in speculative) > 0  # some steps returned several tokens
    assert overlap or sum(r.skipped_tokens for r in speculative[6:]) > 0  # schema rows among them


def _free_port_pair() -> int:
    """p with p and p + 1 free (rank r serves metrics on --metrics-port + r)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", p + 1))
                    return p
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def _speculative_counters(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("lorax_shard_speculative_")
            if name != sample.name and name.endswith("_total"):
                out[name.removesuffix("_total")] = sample.value
    return out
