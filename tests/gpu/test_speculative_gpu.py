"""Speculative decoding on a GPU (bf16, Triton paged attention with Q query tokens, CUDA-graph verify
steps with LoRA inside): the verify graph's logits equal the eager verify forward's, and speculation
on gives the tokens of speculation off (bf16 near-ties may flip a request; most must agree exactly),
also with an FP8 KV cache and flash-attn when installed."""

from __future__ import annotations

import pytest
import torch

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.executor.verify import verify_forward
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, SamplingParams, StoppingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def gpu_model(tiny_model_factory, adapter_factory):
    # head_dim 64: the Triton paged kernel (with several queries per sequence) and the fused rope run.
    model_dir = tiny_model_factory(layers=2, hidden=256, heads=4, kv_heads=2, vocab=512, sliding_window=40)
    adapters = [
        adapter_factory(model_dir, rank=8, target_modules=("q_proj", "v_proj", "o_proj"), seed=11),
        adapter_factory(model_dir, rank=16, target_modules=("gate_proj", "up_proj", "down_proj"), seed=12),
    ]
    return model_dir, adapters


def _requests(n: int, max_new: int = 48) -> tuple[RequestSpec, ...]:
    out = []
    for i in range(n):
        phrase = [3 + (11 * i + 5 * j) % 400 for j in range(6)]
        out.append(
            RequestSpec(
                id=i,
                input_ids=tuple([1] + phrase * 4 + phrase[:3]),
                adapter_index=i % 3,
                sampling=SamplingParams(do_sample=i % 4 == 3, seed=i, temperature=0.7),
                stopping=StoppingParams(max_new_tokens=max_new, ignore_eos_token=True),
            )
        )
    return tuple(out)


def _engine(model_dir, adapters, k: int, **cfg) -> ShardEngine:
    # a bounded KV cache: several engines share the device
    cfg = ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16", speculative_tokens=k,
                      max_kv_cache_bytes=256 << 20, **cfg)  # fmt: skip
    engine = ShardEngine(cfg)
    warm = RequestSpec(id=0, input_ids=tuple(range(3, 35)), stopping=StoppingParams(max_new_tokens=4))
    engine.warmup(BatchSpec(id=0, requests=(warm,)), 64, 256, 64)  # captures decode and verify graphs
    for i, path in enumerate(adapters, start=1):
        engine.load_adapter(i, AdapterSpec(adapter_ids=(str(path),), source="local"))
    return engine


def _generate(engine: ShardEngine, reqs) -> dict[int, list[int]]:
    result = engine.prefill(BatchSpec(id=3, requests=reqs))
    tokens: dict[int, list[int]] = {}
    while True:
        for g in result.generations:
            tokens.setdefault(g.request_id, []).extend(g.next_tokens.ids)
        if result.batch is None:
            break
        result = engine.decode([result.batch.id])
    torch.cuda.synchronize()
    assert engine.free_blocks() == engine.usable_blocks()
    return tokens


@pytest.mark.parametrize("batch_size", [1, 7, 33])
def test_verify_graph_equals_eager_verify(gpu_model, batch_size):
    model_dir, adapters = gpu_model
    engine = _engine(model_dir, adapters, 4)
    spec = engine.speculator
    assert spec.graphs is not None
    engine.prefill(BatchSpec(id=1, requests=_requests(batch_size)))
    for step in range(6):
        batch = engine.batches[1]
        q_len = 1 + (step % 5)
        g = torch.Generator(device="cuda").manual_seed(step)
        drafts = torch.randint(3, 500, (len(batch), q_len - 1), generator=g, device="cuda")
        tokens = torch.cat([batch.input_ids[:, None], drafts], dim=1)
        n_valid = torch.randint(1, q_len + 1, (len(batch),), generator=g, device="cuda")
        graph_logits, graph_hidden = (t.clone() for t in verify_forward(engine.runner, batch, tokens, n_valid,
                                                                           spec.graphs))  # fmt: skip
        eager_logits, eager_hidden = verify_forward(engine.runner, batch, tokens, n_valid)
        assert torch.isfinite(graph_logits).all()
        assert _rel(graph_logits, eager_logits) < 2e-2 and _rel(graph_hidden, eager_hidden) < 2e-2
        engine.decode([1])
    assert len(spec.graphs.graphs) >= 1 and spec.graphs.replayed >= 6
    captured = spec.graphs.captured
    engine.decode([1])
    assert spec.graphs.captured == captured  # a Decode never captures
    engine.clear_cache()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_speculation_on_equals_off(gpu_model, kv_cache_dtype):
    model_dir, adapters = gpu_model
    reqs = _requests(12)
    plain = _generate(_engine(model_dir, adapters, 0, kv_cache_dtype=kv_cache_dtype), reqs)
    engine = _engine(model_dir, adapters, 4, kv_cache_dtype=kv_cache_dtype)
    spec = _generate(engine, reqs)
    same = sum(plain[r.id] == spec[r.id] for r in reqs)
    assert same >= len(reqs) - 1, (plain, spec)
    assert engine.speculator.steps > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_speculation_overlap_on_and_off_under_a_random_router(gpu_model, seed):
    """The randomised router (tests/random_router.py) against speculative CUDA-graph engines: with the
    overlap on, verify steps run ahead (whole batches, and beside rows that joined since); the tokens
    and finish reasons equal the overlap-off engine's."""
    import gc

    from random_router import positional_oracle, run_schedule

    model_dir, adapters = gpu_model
    reference = run_schedule(_engine(model_dir, adapters, 0), seed, len(adapters))
    runs, used = [], []
    for overlap in (False, True):
        gc.collect()
        torch.cuda.empty_cache()
        engine = _engine(model_dir, adapters, 4, overlap=overlap)
        engine.speculator.ngram_drafts = positional_oracle({rid: o["ids"] for rid, o in reference.items()})
        runs.append(run_schedule(engine, seed, len(adapters)))
        used.append(engine.speculator.lookahead_steps)
        assert engine.speculator.accepted > 0
        del engine
    assert used[0] == 0 and used[1] > 0
    off, on = runs
    assert on.keys() == off.keys()
    for rid in off:
        assert on[rid]["ids"] == off[rid]["ids"], f"request {rid}"
        assert on[rid]["finish"] == off[rid]["finish"], f"request {rid}"
