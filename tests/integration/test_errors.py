"""Every error a router can cause: the right status code, and the shard serves on with another cached
batch intact (a greedy "bystander" batch decodes between the errors and must end up with exactly the
tokens of an undisturbed run). Also: no KV block leaks, and after ClearCache every block is free."""

from __future__ import annotations

import random

import grpc
import pytest
from shard_harness import Bystander, batch, request, running_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.server.convert import adapter_to_pb
from shard_server.testing.fake_router import RouterLimits
from shard_server.testing.wire import tiny_png
from shard_server.types import AdapterSpec, ImageChunk, RequestSpec, StoppingParams, TextChunk

VOCAB = 512  # TinyModelSpec defaults
MAX_POSITIONS = 2048
INVALID, NOT_FOUND, UNIMPLEMENTED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
)
BYSTANDER_PROMPTS = {91_001: (1, 17, 99, 250, 3, 42), 91_002: (1, 400, 401, 402)}
BYSTANDER_NEW_TOKENS = 48


def ids(n: int, seed: int = 0) -> tuple[int, ...]:
    rng = random.Random(seed)
    return (1, *(rng.randrange(3, VOCAB) for _ in range(n - 1)))


def expect(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=60, **kwargs)
    assert e.value.code() == code, e.value.details()
    assert e.value.details()  # every error says what is wrong
    return e.value.details()


@pytest.fixture(scope="module")
def bystander(shared_shard):
    by = Bystander(shared_shard.stub(), 91_000, BYSTANDER_PROMPTS, BYSTANDER_NEW_TOKENS)
    yield by
    shared_shard.stub().ClearCache(pb.ClearCacheRequest(), timeout=30)


BAD_PREFILLS = {
    "empty input": (request(1, ()), INVALID),
    "token id >= vocab": (request(2, (1, 5, VOCAB)), INVALID),
    "prompt + max_new_tokens beyond max positions": (
        request(3, ids(8), max_new_tokens=MAX_POSITIONS),
        INVALID,
    ),
    "top_p above 1": (request(4, ids(5), do_sample=True, top_p=1.5), INVALID),
    "top_p zero": (request(5, ids(5), do_sample=True, top_p=0.0), INVALID),
    "negative temperature": (request(6, ids(5), do_sample=True, temperature=-0.5), INVALID),
    "image chunk outside Warmup": (
        request(7, chunks=(TextChunk("hello"), ImageChunk(tiny_png(), "image/png")), text="hello"),
        INVALID,
    ),
    "schema not JSON": (request(8, ids(5), schema='{"type": '), INVALID),
    "schema not a schema": (request(8, ids(5), schema="[1]"), INVALID),
    "schema with an unsupported keyword": (request(8, ids(5), schema='{"not": {"type": "null"}}'), INVALID),
    "schema too large": (request(8, ids(5), schema='{"enum": [' + '"xxxxxxxx", ' * 7000 + '"x"]}'), INVALID),
    "schema nested too deep": (request(8, ids(5), schema='{"items": ' * 40 + "{}" + "}" * 40), INVALID),
    "adapter index not loaded": (request(9, ids(5), adapter_index=7), NOT_FOUND),
}


@pytest.mark.parametrize("case", list(BAD_PREFILLS))
def test_bad_request_is_rejected_and_shard_serves_on(shared_shard, bystander, case):
    bad, code = BAD_PREFILLS[case]
    stub = shared_shard.stub()
    expect(code, stub.Prefill, pb.PrefillRequest(batch=batch(100, bad)))
    # One bad request fails its whole batch, and the good request's blocks are not leaked.
    good = request(11, ids(6, seed=3))
    expect(code, stub.Prefill, pb.PrefillRequest(batch=batch(101, good, bad)))
    # ... nor is the batch it would have joined touched.
    expect(code, stub.Prefill, pb.PrefillRequest(batch=batch(102, bad), cached_batch=bystander.cached))
    bystander.step()


def test_unknown_batch_ids_are_not_found(shared_shard, bystander):
    stub = shared_shard.stub()
    ghost = pb.CachedBatch(id=123_456, request_ids=[5])
    expect(NOT_FOUND, stub.Decode, pb.DecodeRequest(batches=[ghost]))
    # A Decode naming a live batch and an unknown one must fail before consuming the live one.
    expect(NOT_FOUND, stub.Decode, pb.DecodeRequest(batches=[bystander.cached, ghost]))
    expect(NOT_FOUND, stub.FilterBatch, pb.FilterBatchRequest(batch_id=ghost.id, request_ids=[5]))
    expect(
        NOT_FOUND, stub.Prefill, pb.PrefillRequest(batch=batch(103, request(12, ids(4))), cached_batch=ghost)
    )
    bystander.step()


def test_wire_shape_errors(shared_shard, bystander):
    stub = shared_shard.stub()
    expect(INVALID, stub.Decode, pb.DecodeRequest())
    expect(INVALID, stub.Prefill, pb.PrefillRequest(batch=pb.Batch(id=104)))
    params = pb.AdapterParameters(adapter_ids=[str(shared_shard.adapters[1])])
    expect(
        INVALID,
        stub.LoadAdapter,
        pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=9, adapter_index=5),
    )
    bystander.step()


def _load(index: int, spec: AdapterSpec) -> pb.LoadAdapterRequest:
    params, src = adapter_to_pb(spec)
    return pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=src, adapter_index=index)


def test_adapter_errors(shared_shard, bystander):
    stub = shared_shard.stub()
    other = AdapterSpec(adapter_ids=(str(shared_shard.adapters[2]),), source="local")
    expect(grpc.StatusCode.FAILED_PRECONDITION, stub.LoadAdapter, _load(1, other))
    same = AdapterSpec(adapter_ids=(str(shared_shard.adapters[1]),), source="local")
    assert stub.LoadAdapter(_load(1, same), timeout=60).loaded  # reloading the same one is fine
    pbase = AdapterSpec(adapter_ids=("acme/some-adapter",), source="pbase")
    expect(UNIMPLEMENTED, stub.LoadAdapter, _load(5, pbase))
    params, src = adapter_to_pb(pbase)
    expect(
        UNIMPLEMENTED,
        stub.DownloadAdapter,
        pb.DownloadAdapterRequest(adapter_parameters=params, adapter_source=src),
    )
    bystander.step()


def test_classify_is_unimplemented(shared_shard, bystander):
    msg = expect(
        UNIMPLEMENTED, shared_shard.stub().Classify, pb.ClassifyRequest(batch=batch(105, request(13, ids(4))))
    )
    assert "classification" in msg
    bystander.step()


def test_bystander_tokens_equal_an_undisturbed_run(shared_shard, bystander):
    while len(next(iter(bystander.tokens.values()))) < 12:
        bystander.step()
    with shared_shard.router() as router:
        alone = router.generate(
            [
                RequestSpec(
                    id=0, input_ids=p, stopping=StoppingParams(BYSTANDER_NEW_TOKENS, ignore_eos_token=True)
                )
                for p in BYSTANDER_PROMPTS.values()
            ],
            clear_at_end=False,  # ClearCache of everything would take the bystander too
        )
    for rid, res in zip(BYSTANDER_PROMPTS, alone, strict=True):
        got = bystander.tokens[rid]
        assert got == res.token_ids[: len(got)]


def test_clear_cache_frees_every_kv_block(shared_shard, bystander):
    """Black box: after ClearCache the whole budget Warmup announced can be allocated again."""
    stub = shared_shard.stub()
    stub.ClearCache(pb.ClearCacheRequest(), timeout=30)
    budget = shared_shard.warmup.max_supported_total_tokens
    bs = stub.Info(pb.InfoRequest(), timeout=10).block_size
    per_request = min(MAX_POSITIONS // bs, 32) * bs  # whole blocks: prompt + 1 new token
    n = budget // per_request
    assert n >= 1
    reqs = [request(200 + i, ids(per_request - 1, seed=i), max_new_tokens=1) for i in range(n)]
    resp = stub.Prefill(pb.PrefillRequest(batch=batch(106, *reqs)), timeout=300)
    assert len(resp.generations) == n and not resp.HasField("batch")  # all done after one token
    stub.ClearCache(pb.ClearCacheRequest(), timeout=30)


def test_out_of_kv_blocks_is_resource_exhausted(tiny_model_dir):
    small = RouterLimits(max_input_length=16, max_total_tokens=32, max_prefill_tokens=32)
    with running_shard(tiny_model_dir, "--max-kv-cache-bytes", str(64 << 10)) as sp:
        with sp.router(small) as router:
            budget = router.warmup()
        stub = sp.stub()
        by = Bystander(stub, 1, {1: ids(10)}, max_new_tokens=8)
        too_big = [request(10 + i, ids(30, seed=i), max_new_tokens=30) for i in range(budget // 30 + 2)]
        msg = expect(
            grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Prefill, pb.PrefillRequest(batch=batch(2, *too_big))
        )
        assert msg
        by.step()
        # Nothing leaked from the failed allocation: a batch of what is left still fits.
        fits = [request(50, ids(budget // 2 - 40, seed=9), max_new_tokens=8)]
        resp = stub.Prefill(pb.PrefillRequest(batch=batch(3, *fits)), timeout=60)
        assert len(resp.generations) == 1
        by.step()
