"""The engine on a GPU: CUDA-graph decode (LoRA inside the graph) equals eager decode, bf16."""

from __future__ import annotations

import pytest
import torch

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, SamplingParams, StoppingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _graph_equals_eager_each_step(engine: ShardEngine, batch_id: int, steps: int) -> None:
    """Before each of `steps` decode steps: the graph replay's logits equal the eager step's."""
    for _ in range(steps):
        batch = engine.batches[batch_id]
        slots = engine.adapters.request_slots(batch.adapter_indices)
        graph_logits = engine.runner.graphs.run(batch, slots).clone()
        eager_logits = engine.runner.decode_eager(batch, slots)
        assert torch.isfinite(graph_logits).all()
        assert _rel(graph_logits, eager_logits) < 2e-2
        engine.decode([batch_id])


def _requests(n: int, adapters: list[int], max_new: int = 24) -> tuple[RequestSpec, ...]:
    return tuple(
        RequestSpec(
            id=i,
            input_ids=tuple(1 + (7 * i + 3 * j) % 300 for j in range(5 + 3 * i)),
            adapter_index=adapters[i % len(adapters)],
            sampling=SamplingParams(),
            stopping=StoppingParams(max_new_tokens=max_new, ignore_eos_token=True),
        )
        for i in range(n)
    )


@pytest.fixture(scope="module")
def gpu_model(tiny_model_factory, adapter_factory):
    model_dir = tiny_model_factory(layers=2, hidden=128, heads=4, kv_heads=2, vocab=512)
    adapters = [
        adapter_factory(model_dir, rank=8, target_modules=("q_proj", "v_proj", "o_proj"), seed=11),
        adapter_factory(model_dir, rank=16, target_modules=("gate_proj", "up_proj", "down_proj"), seed=12),
    ]
    return model_dir, adapters


@pytest.mark.parametrize("batch_size", [1, 5, 33])
def test_graph_decode_equals_eager_with_mixed_adapters(gpu_model, batch_size):
    model_dir, adapters = gpu_model
    cfg = ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16")
    engine = ShardEngine(cfg)
    for i, path in enumerate(adapters, start=1):
        engine.load_adapter(i, AdapterSpec(adapter_ids=(str(path),), source="local"))
    assert engine.runner.graphs is not None
    engine.prefill(BatchSpec(id=1, requests=_requests(batch_size, [0, 1, 2])))
    _graph_equals_eager_each_step(engine, 1, steps=12)
    assert 1 in engine.batches and len(engine.runner.graphs.graphs) >= 1
    engine.clear_cache()
    assert engine.free_blocks() == engine.usable_blocks()


def test_graph_and_eager_engines_generate_the_same_tokens(gpu_model):
    model_dir, adapters = gpu_model
    outputs = []
    for graphs in (True, False):
        engine = ShardEngine(
            ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16", cuda_graphs=graphs)
        )
        engine.load_adapter(1, AdapterSpec(adapter_ids=(str(adapters[0]),), source="local"))
        result = engine.prefill(BatchSpec(id=3, requests=_requests(6, [0, 1], max_new=16)))
        tokens: dict[int, list[int]] = {}
        while True:
            for g in result.generations:
                tokens.setdefault(g.request_id, []).extend(g.next_tokens.ids)
            if result.batch is None:
                break
            result = engine.decode([result.batch.id])
        outputs.append(tokens)
    same = sum(a == b for a, b in zip(outputs[0].values(), outputs[1].values(), strict=True))
    assert same >= 5, outputs  # bf16 near-ties may flip one request; most must agree exactly


def test_warmup_then_graph_decode_with_triton_kernels(tiny_model_factory):
    """head_dim 64 takes every Triton path (paged decode, rope + KV write, norms); Warmup replaces the KV
    cache, after which graphs captured against the old cache must never replay."""
    model_dir = tiny_model_factory(layers=2, hidden=256, heads=4, kv_heads=2, vocab=512, init_std=0.02)
    engine = ShardEngine(ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16"))
    engine.prefill(BatchSpec(id=7, requests=_requests(3, [0], max_new=8)))
    engine.decode([7])  # captures a graph against the start-up cache
    engine.clear_cache()
    warm = BatchSpec(id=0, requests=_requests(4, [0], max_new=4))
    assert engine.warmup(warm, max_input_length=16, max_prefill_tokens=64, max_new_tokens=4) > 0
    engine.prefill(BatchSpec(id=1, requests=_requests(9, [0], max_new=20)))
    _graph_equals_eager_each_step(engine, 1, steps=8)
    torch.cuda.synchronize()
    engine.clear_cache()
    assert engine.free_blocks() == engine.usable_blocks()


@pytest.mark.parametrize("seed", [1, 2])
def test_overlap_on_and_off_give_the_same_tokens_with_graphs(gpu_model, seed):
    """The randomised router (tests/random_router.py) against CUDA-graph engines, overlap on and off."""
    from random_router import run_schedule

    model_dir, adapters = gpu_model
    results, used = [], []
    for overlap in (False, True):
        cfg = ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16", overlap=overlap)
        engine = ShardEngine(cfg)
        warm = RequestSpec(id=0, input_ids=(1, 5, 6, 7), stopping=StoppingParams(max_new_tokens=2))
        engine.warmup(BatchSpec(id=0, requests=(warm,)), 32, 40, 8)
        for i, path in enumerate(adapters, start=1):
            engine.load_adapter(i, AdapterSpec(adapter_ids=(str(path),), source="local"))
        results.append(run_schedule(engine, seed, len(adapters)))
        used.append(engine.lookahead_rows_used)
    assert used[0] == 0 and used[1] > 0
    want, got = results
    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid]["ids"] == want[rid]["ids"], f"request {rid}"
        assert got[rid]["finish"] == want[rid]["finish"], f"request {rid}"
