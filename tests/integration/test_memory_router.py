"""Router-allocation mode (`--block-allocator router`) driven by a fake router that allocates the KV
blocks and keeps its own per-adapter prefix cache: the outputs equal shard-allocation mode, reused
prefixes are not recomputed (cache_len), and bad blocks or slots are INVALID_ARGUMENT."""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import replace

import grpc
import pytest
from shard_harness import DEFAULT_KV_BYTES, LIMITS, request, running_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.testing.fake_router import FakeRouter, _Live
from shard_server.types import AdapterSpec, RequestSpec, SamplingParams, StoppingParams


class PrefixCachingRouter(FakeRouter):
    """Router-allocation mode plus the router's prefix cache: when a request ends, its full prompt
    blocks stay cached under (adapter index, prompt tokens up to the block's end); a later request whose
    prompt starts with cached blocks gets them (shared, ref counted) and `cache_len`. Unreferenced cached
    blocks are evicted least recently used first when the free list runs out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cached: dict[tuple, int] = {}  # (adapter index, token prefix) -> block
        self.key_of: dict[int, tuple] = {}
        self.refs: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.reused_tokens = 0

    def _allocate(self, e: _Live) -> bool:
        bs = self.info_pb.block_size
        prompt = list(e.spec.input_ids)
        hits = []
        for i in range((len(prompt) - 1) // bs):  # whole blocks, never the last prompt token
            block = self.cached.get((e.spec.adapter_index, tuple(prompt[: (i + 1) * bs])))
            if block is None:
                break
            hits.append(block)
        new = -(-e.tokens // bs) - len(hits)
        reclaimable = len(self.evictable) - sum(1 for b in hits if b in self.evictable)
        if new > len(self._free_blocks) + reclaimable:
            return False
        for b in hits:
            self.refs[b] += 1
            self.evictable.pop(b, None)
        while len(self._free_blocks) < new:
            victim, _ = self.evictable.popitem(last=False)
            del self.cached[self.key_of.pop(victim)], self.refs[victim]
            self._free_blocks.append(victim)
        blocks = tuple(hits + self._free_blocks[:new])
        del self._free_blocks[:new]
        slots = tuple(b * bs + i for b in blocks for i in range(bs))[
            : e.input_tokens + e.spec.stopping.max_new_tokens
        ]
        e.blocks = blocks
        e.spec = replace(e.spec, blocks=blocks, slots=slots, cache_len=len(hits) * bs)
        self.reused_tokens += len(hits) * bs
        return True

    def _release(self, e: _Live) -> None:
        bs = self.info_pb.block_size
        prompt = list(e.spec.input_ids)
        for i, b in enumerate(e.blocks):
            key = (e.spec.adapter_index, tuple(prompt[: (i + 1) * bs]))
            if b in self.key_of:  # a shared cached block
                self.refs[b] -= 1
                if self.refs[b] == 0:
                    self.evictable[b] = None
            elif (i + 1) * bs <= len(prompt) and key not in self.cached:
                self.cached[key], self.key_of[b], self.refs[b] = b, key, 0
                self.evictable[b] = None
            else:
                self._free_blocks.append(b)
        e.blocks = ()

    def load_adapter(self, index: int, spec: AdapterSpec) -> bool:
        # Another adapter under this index: its cached prefixes are no longer valid.
        for b in [b for b, key in self.key_of.items() if key[0] == index and self.refs[b] == 0]:
            del self.cached[self.key_of.pop(b)], self.refs[b]
            self.evictable.pop(b)
            self._free_blocks.append(b)
        return super().load_adapter(index, spec)


@pytest.fixture(scope="module")
def router_shard(tiny_model_dir, adapter_dirs):
    args = ("--max-kv-cache-bytes", str(DEFAULT_KV_BYTES), "--block-allocator", "router")
    with running_shard(tiny_model_dir, *args) as sp:
        with PrefixCachingRouter(sp.url(), LIMITS, timeout=120.0) as router:
            router.warmup()
            for index, path in adapter_dirs.items():
                assert router.load_adapter(index, AdapterSpec(adapter_ids=(str(path),), source="local"))
            yield sp, router


def workload() -> list[RequestSpec]:
    rng = random.Random(8)
    prefixes = [[1] + [rng.randrange(3, 512) for _ in range(33)] for _ in range(3)]
    out = []
    for i in range(18):
        tail = [rng.randrange(3, 512) for _ in range(rng.randrange(1, 12))]
        out.append(
            RequestSpec(
                id=0,
                input_ids=tuple(prefixes[i % 3] + tail),
                adapter_index=(i // 3) % 4,
                sampling=SamplingParams(do_sample=i % 4 == 1, seed=i, temperature=0.7),
                stopping=StoppingParams(max_new_tokens=3 + i % 9, ignore_eos_token=True),
            )
        )
    return out


def test_info_says_router_allocation_and_chunking(router_shard):
    _, router = router_shard
    assert router.info_pb.requires_block_allocator and router.info_pb.chunked_prefill


def test_outputs_equal_shard_allocation_mode(shared_shard, router_shard):
    _, router = router_shard
    reqs = workload()
    with shared_shard.router() as shard_mode:
        expected = shard_mode.generate(reqs)
    total = router.free_router_blocks + len(router.evictable)
    for _ in range(2):  # the second round finds every prefix in the router's cache
        got = router.generate(reqs)
        for g, x in zip(got, expected, strict=True):
            assert g.token_ids == x.token_ids
            assert g.logprobs == pytest.approx(x.logprobs, abs=1e-4)
    assert router.reused_tokens >= len(reqs) * 32
    assert router.free_router_blocks + len(router.evictable) == total  # every block came back


def _stub_prefill(stub, bid: int, r: pb.Request):
    return stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=bid, requests=[r], size=1)), timeout=60)


def _with_blocks(rid: int, ids, table, max_new=4, **override) -> pb.Request:
    """A request in router-allocation mode: `table` blocks and their slots, fields overridden."""
    r = request(rid, ids, max_new_tokens=max_new)
    bs = 16
    slots = [b * bs + i for b in table for i in range(bs)][: len(ids) + max_new]
    r.blocks.extend(override.pop("blocks", table))
    r.slots.extend(override.pop("slots", slots))
    for k, v in override.items():
        setattr(r, k, v)
    return r


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(blocks=[]), "blocks is empty"),
        (dict(blocks=[0, 5]), "blocks[0] is block 0"),
        (dict(blocks=[4, 10**6]), "blocks[1] = 1000000"),
        (dict(blocks=[4, 4]), "blocks[1] = 4 repeats"),
        (dict(slots=[64 + i for i in range(20)]), "slots has 20 entries"),
        (dict(slots=[80 + i for i in range(24)]), "slots[0] = 80"),
        (dict(cache_len=20), "cache_len 20"),
    ],
)
def test_bad_blocks_or_slots_are_invalid_argument(router_shard, bad, field):
    sp, _ = router_shard
    stub = sp.stub()
    ids = list(range(3, 23))  # 20 tokens + 4 new: 23 positions written, 2 blocks
    with pytest.raises(grpc.RpcError) as err:
        _stub_prefill(stub, 900, _with_blocks(1, ids, [4, 5], **bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    ok = _stub_prefill(stub, 901, _with_blocks(1, ids, [4, 5]))  # the shard serves on
    assert len(ok.generations) == 1
    stub.ClearCache(pb.ClearCacheRequest(id=901), timeout=30)


def _tokens(resp) -> list[tuple[int, float]]:
    pairs = [zip(g.next_tokens.ids, g.next_tokens.logprobs, strict=True) for g in resp.generations]
    return [p for gen in pairs for p in gen]


def test_chunked_prefill_in_router_mode_equals_unchunked(router_shard):
    sp, _ = router_shard
    stub = sp.stub()
    ids = [1] + list(range(40, 110))  # 71 tokens: chunks of 8, then the shard's (<= max_prefill)

    def run(bid: int, chunk: int | None) -> list[tuple[int, float]]:
        r = _with_blocks(7, ids, [20 + j for j in range(6)], max_new=6)
        if chunk is not None:
            r.chunk_len = chunk
        resp = _stub_prefill(stub, bid, r)
        out = _tokens(resp)
        first = len(out)
        batch = resp.batch if resp.HasField("batch") else None
        while batch is not None:
            resp = stub.Decode(pb.DecodeRequest(batches=[batch]), timeout=60)
            out += _tokens(resp)
            batch = resp.batch if resp.HasField("batch") else None
        assert first == (0 if chunk else 1)
        return out

    plain, chunked = run(910, None), run(911, 8)
    assert [t for t, _ in chunked] == [t for t, _ in plain] and len(plain) == 6
    assert all(math.isclose(a, b, abs_tol=1e-4) for (_, a), (_, b) in zip(chunked, plain, strict=True))
