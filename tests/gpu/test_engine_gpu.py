"""The engine on a GPU: CUDA-graph decode (LoRA inside the graph) equals eager decode, bf16; graphs are
captured at Warmup (and after an adapter re-layout, in LoadAdapter), never inside a Decode."""

from __future__ import annotations

import gc

import pytest
import torch

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.executor.graphs import BASE, FEW_ADAPTERS, LORA, LORA_FEW
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, SamplingParams, StoppingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _graph_equals_eager_each_step(engine: ShardEngine, batch_id: int, steps: int) -> None:
    """Before each of `steps` decode steps: the graph replay's logits equal the eager step's; then the
    engine's Decode replays a graph and captures none."""
    graphs = engine.runner.graphs
    for _ in range(steps):
        batch = engine.batches[batch_id]
        slots = engine.adapters.request_slots(batch.adapter_indices)
        graph_logits = graphs.run(batch, slots)
        assert graph_logits is not None, "Warmup captured no graph for this step"
        graph_logits = graph_logits.clone()
        eager_logits = engine.runner.decode_eager(batch, slots)
        assert torch.isfinite(graph_logits).all()
        assert _rel(graph_logits, eager_logits) < 2e-2
        captured, replayed = graphs.captured, graphs.replayed
        engine.decode([batch_id])
        assert graphs.captured == captured and graphs.replayed == replayed + 1


def _engine(model_dir, **kw) -> ShardEngine:
    # A bounded KV cache: Warmup would otherwise give one engine nearly all free memory.
    return ShardEngine(
        ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16", max_kv_cache_bytes=64 << 20, **kw)
    )


def _warmup(engine: ShardEngine, max_input_length: int = 128, max_new_tokens: int = 32) -> None:
    warm = BatchSpec(id=0, requests=_requests(4, [0], max_new=4))
    assert engine.warmup(warm, max_input_length, max_prefill_tokens=512, max_new_tokens=max_new_tokens) > 0


def _spec(path) -> AdapterSpec:
    return AdapterSpec(adapter_ids=(str(path),), source="local")


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


MANY = list(range(FEW_ADAPTERS + 2))  # base rows and FEW_ADAPTERS + 1 adapters: the in-place variant


@pytest.mark.parametrize("batch_size,indices", [
    (1, [0, 1, 2]), (5, [0, 1, 2]), (33, [0, 1, 2]), (70, [0, 1, 2]), (33, MANY), (70, MANY),
])  # fmt: skip
def test_graph_decode_equals_eager_with_mixed_adapters(gpu_model, batch_size, indices):
    """Two adapters in the batch replay the side-stream LoRA graph (LORA_FEW), FEW_ADAPTERS + 1 the
    in-place one; 70 rows take the cuBLASLt matmul policy (executor/gemm_policy.py)."""
    model_dir, adapters = gpu_model
    engine = _engine(model_dir)
    for i in MANY[1:]:  # a device slot each, two distinct files
        engine.load_adapter(i, _spec(adapters[(i - 1) % 2]))
    assert engine.runner.graphs is not None and engine.runner.graphs.captured == 0
    _warmup(engine)
    graphs = engine.runner.graphs
    # Every batch bucket and variant (base; LoRA in place; few adapters' LoRA on the side stream), at
    # context bucket 256 (requests up to 128 + 32 tokens).
    assert set(graphs.graphs) == {(b, 256, v) for b in graphs.buckets for v in (BASE, LORA, LORA_FEW)}
    assert graphs.captured == len(graphs.graphs)
    engine.prefill(BatchSpec(id=1, requests=_requests(batch_size, indices)))
    slots = engine.adapters.request_slots(engine.batches[1].adapter_indices)
    used = {i for i in engine.batches[1].adapter_indices if i}
    want = BASE if not used else LORA_FEW if len(used) <= FEW_ADAPTERS else LORA
    assert graphs.variant_for(slots) == want
    _graph_equals_eager_each_step(engine, 1, steps=12)
    assert 1 in engine.batches
    engine.clear_cache()
    assert engine.free_blocks() == engine.usable_blocks()


def test_graph_and_eager_engines_generate_the_same_tokens(gpu_model):
    model_dir, adapters = gpu_model
    outputs = []
    for graphs in (True, False):
        engine = _engine(model_dir, cuda_graphs=graphs)
        engine.load_adapter(1, _spec(adapters[0]))
        _warmup(engine)
        result = engine.prefill(BatchSpec(id=3, requests=_requests(6, [0, 1], max_new=16)))
        tokens: dict[int, list[int]] = {}
        while True:
            for g in result.generations:
                tokens.setdefault(g.request_id, []).extend(g.next_tokens.ids)
            if result.batch is None:
                break
            result = engine.decode([result.batch.id])
        outputs.append(tokens)
        if graphs:
            assert engine.runner.graphs.replayed >= 15
            assert engine.runner.graphs.captured == len(engine.runner.graphs.graphs)
        del engine
    same = sum(a == b for a, b in zip(outputs[0].values(), outputs[1].values(), strict=True))
    assert same >= 5, outputs  # bf16 near-ties may flip one request; most must agree exactly


def test_warmup_then_graph_decode_with_triton_kernels(tiny_model_factory):
    """head_dim 64 takes every Triton path (paged decode, rope + KV write, norms). Before Warmup a decode
    runs eagerly and captures nothing; Warmup replaces the KV cache and captures against the new one."""
    model_dir = tiny_model_factory(layers=2, hidden=256, heads=4, kv_heads=2, vocab=512, init_std=0.02)
    engine = _engine(model_dir)
    engine.prefill(BatchSpec(id=7, requests=_requests(3, [0], max_new=8)))
    engine.decode([7])
    assert engine.runner.graphs.captured == 0 and engine.runner.graphs.replayed == 0
    engine.clear_cache()
    _warmup(engine, max_input_length=16, max_new_tokens=4)
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
        # Engines of earlier tests (reference cycles through their graphs) may still hold the memory a
        # CUDA Warmup hands out, and Warmup gives each engine nearly all that is free: collect, bound.
        engine = None
        gc.collect()
        torch.cuda.empty_cache()
        cfg = ShardConfig(
            model_dir=model_dir, device="cuda", dtype="bfloat16", overlap=overlap, max_kv_cache_bytes=1 << 26
        )
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


def test_lora_side_stream_on_and_off_agree_in_graphs_and_eagerly(gpu_model):
    """Decode LoRA on the side stream (deltas added by the next kernel) against LoRA added in place after
    each projection: the same first-step logits within bf16 rounding (the delta is rounded once more, as
    PEFT rounds it), and in each engine graph replay equals eager at every step, for a batch mixing base
    rows and two adapters. (Later steps are not compared across engines: a bf16 near-tie may pick another
    token, after which that row's inputs differ.)"""
    model_dir, adapters = gpu_model
    logits = {}
    for lora_stream in (False, True):
        gc.collect()
        torch.cuda.empty_cache()
        engine = _engine(model_dir, lora_stream=lora_stream)
        for i, path in enumerate(adapters, start=1):
            engine.load_adapter(i, _spec(path))
        assert (engine.adapters.lora_stream is not None) == lora_stream
        _warmup(engine)
        engine.prefill(BatchSpec(id=1, requests=_requests(7, [0, 1, 2])))
        steps = []
        for _ in range(6):
            batch = engine.batches[1]
            slots = engine.adapters.request_slots(batch.adapter_indices)
            replayed = engine.runner.graphs.run(batch, slots).clone()
            steps.append((replayed, engine.runner.decode_eager(batch, slots)))
            engine.decode([1])
        logits[lora_stream] = steps
        del engine
    for steps in logits.values():
        for graph_logits, eager_logits in steps:
            assert torch.isfinite(graph_logits).all()
            assert _rel(graph_logits, eager_logits) < 2e-2
    assert _rel(logits[True][0][0], logits[False][0][0]) < 2e-2


def test_decode_past_warmup_contexts_runs_eagerly_without_capturing(gpu_model):
    model_dir, _ = gpu_model
    engine = _engine(model_dir)
    _warmup(engine, max_input_length=16, max_new_tokens=4)  # context bucket 256 only
    graphs = engine.runner.graphs
    captured = graphs.captured
    long = RequestSpec(
        id=1,
        input_ids=tuple(3 + j % 400 for j in range(300)),
        adapter_index=0,
        sampling=SamplingParams(),
        stopping=StoppingParams(max_new_tokens=4, ignore_eos_token=True),
    )
    engine.prefill(BatchSpec(id=1, requests=(long,)))
    batch = engine.batches[1]
    assert graphs.run(batch, engine.adapters.request_slots(batch.adapter_indices)) is None
    engine.decode([1])
    assert graphs.captured == captured and graphs.replayed == 0
    engine.clear_cache()


def test_adapter_relayout_recaptures_lora_graphs_in_load_adapter(gpu_model):
    """Stacks re-laid out by LoadAdapter: the LoRA graphs are recaptured there (base graphs stay), and
    the Decodes after it replay graphs equal to eager steps, capturing nothing."""
    model_dir, adapters = gpu_model
    engine = _engine(model_dir)
    engine.load_adapter(1, _spec(adapters[0]))  # rank 8, attention targets
    _warmup(engine)
    graphs = engine.runner.graphs
    base = {k: g for k, g in graphs.graphs.items() if not k[2]}
    lora = {k: g for k, g in graphs.graphs.items() if k[2]}
    layout = engine.adapters.layout_version
    engine.load_adapter(2, _spec(adapters[1]))  # rank 16, MLP targets: new stacks
    assert engine.adapters.layout_version != layout
    assert all(graphs.graphs[k] is g for k, g in base.items())
    assert set(lora) <= set(graphs.graphs) and all(graphs.graphs[k] is not g for k, g in lora.items())
    engine.prefill(BatchSpec(id=1, requests=_requests(5, [0, 1, 2])))
    _graph_equals_eager_each_step(engine, 1, steps=6)
    engine.clear_cache()
    for i, path in ((1, adapters[0]), (2, adapters[1])):
        engine.offload_adapter(i, _spec(path))
    assert not any(k[2] for k in graphs.graphs)  # the store is empty: LoRA graphs dropped, none captured
    assert engine.free_blocks() == engine.usable_blocks()
