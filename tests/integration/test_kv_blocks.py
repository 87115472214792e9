"""Every KV block comes back: the engine's own count (ShardEngine.free_blocks / usable_blocks), read on
the model thread of a server built in this process and driven over a real unix socket.

The counts have no RPC, so this is the one integration test that holds the engine in-process; the
out-of-process check of the same invariant is test_errors.py::test_clear_cache_frees_every_kv_block.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from shard_server.config import ShardConfig
from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.server.grpc_server import build_server
from shard_server.server.workers import EngineWorkers
from shard_server.testing.fake_router import FakeRouter, RouterLimits
from shard_server.testing.wire import request_to_pb
from shard_server.types import AdapterSpec, RequestSpec, SamplingParams, StoppingParams

LIMITS = RouterLimits(max_input_length=32, max_total_tokens=64, max_prefill_tokens=96, max_batch_size=6)


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, adapter_dirs):
    from shard_server.engine.engine import ShardEngine

    workers = EngineWorkers()
    engine = workers.model(
        ShardEngine, ShardConfig(model_dir=tiny_model_dir, device="cpu", max_kv_cache_bytes=2 << 20)
    )
    with tempfile.TemporaryDirectory(prefix="kv-", dir="/tmp") as d:
        built = build_server(engine, str(Path(d) / "s"), 0, 1, workers=workers)
        built.server.start()
        try:
            with FakeRouter(built.address, LIMITS) as router:
                router.warmup()
                router.load_adapter(1, AdapterSpec(adapter_ids=(str(adapter_dirs[1]),), source="local"))
                yield engine, workers, router
        finally:
            built.server.stop(0).wait()
            workers.close()


def _counts(engine, workers) -> tuple[int, int]:
    return workers.model(engine.free_blocks), workers.model(engine.usable_blocks)


def _requests(n: int) -> list[RequestSpec]:
    return [
        RequestSpec(
            id=0,
            input_ids=(1, *range(10 + i, 10 + i + 3 + i % 9)),
            adapter_index=i % 2,
            sampling=SamplingParams(do_sample=i % 3 == 0, seed=i),
            stopping=StoppingParams(max_new_tokens=2 + i % 7, ignore_eos_token=i % 2 == 0),
        )
        for i in range(n)
    ]


def test_finished_and_cancelled_requests_free_their_blocks(in_process):
    engine, workers, router = in_process
    free, usable = _counts(engine, workers)
    assert free == usable
    # Cancel every fourth request after its second token: FilterBatch must free its blocks.
    seen: dict[int, int] = {}

    def on_token(i, ev):
        seen[i] = seen.get(i, 0) + 1
        return not (i % 4 == 3 and seen[i] == 2)

    results = router.generate(_requests(20), on_token, clear_at_end=False)
    assert any(r.cancelled for r in results)
    assert _counts(engine, workers) == (usable, usable)  # nothing cached, nothing leaked


def test_clear_cache_frees_every_block_of_live_batches(in_process):
    engine, workers, router = in_process
    usable = _counts(engine, workers)[1]
    stub = router.stubs[0]
    reqs = _requests(6)
    batch = pb.Batch(id=500, requests=[_pb(i, r) for i, r in enumerate(reqs)], size=len(reqs))
    resp = stub.Prefill(pb.PrefillRequest(batch=batch), timeout=60)
    stub.Decode(pb.DecodeRequest(batches=[resp.batch]), timeout=60)
    with pytest.raises(grpc.RpcError):  # an error in between leaks nothing either
        stub.Prefill(
            pb.PrefillRequest(batch=pb.Batch(id=501, requests=[_pb(9, reqs[0]), _pb(10, RequestSpec(id=0))])),
            timeout=60,
        )
    assert _counts(engine, workers)[0] < usable
    stub.ClearCache(pb.ClearCacheRequest(), timeout=30)
    assert _counts(engine, workers) == (usable, usable)


def _pb(rid: int, r: RequestSpec) -> pb.Request:
    return request_to_pb(replace(r, id=rid))
