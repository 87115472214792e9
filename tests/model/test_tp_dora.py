"""DoRA under tensor parallelism (gloo, CPU, float32, world size 2) equals world size 1 within 1e-5.

A DoRA adapter of rank 3 on every projection and lm_head beside a plain LoRA adapter and base rows:
column-parallel scales are sharded with the outputs (heads split evenly, and a single KV head that
both ranks replicate), row-parallel (o_proj, down_proj) and lm_head norms are completed by the
all-reduce of squared partial norms (vocabulary 509: the last rank's LM-head block ends in padding).
World size 1 is itself checked against PEFT in test_dora_vs_peft.py.

Also: a load that fails on one rank only (rank 1's adapter root excludes the directory) fails on both,
with no rank left waiting in a collective, and both keep serving.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from test_tensor_parallel import run_ranks
from test_tp_adapters import PROMPTS, SHAPES, VOCAB, _assert_close, _run, last_rows

from cache.adapter_sources import AdapterSourceConfig, AdapterSources
from cache.adapter_store import AdapterStore
from cache.kv_cache import KVCache
from model.errors import ShardError
from model.flash_mistral import FlashMistralForCausalLM
from model.parallel import TPGroup
from shard_server.types import AdapterSpec

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
ADAPTERS = {
    1: dict(rank=3, target_modules=ALL, use_dora=True, seed=71),
    2: dict(rank=5, target_modules=("q_proj", "o_proj", "down_proj"), seed=72),  # plain LoRA
}
REQUESTS = [1, 0, 2, 1, 2]
CASES = [("split", 2), ("mqa", 2)]


def _spec(d) -> AdapterSpec:
    return AdapterSpec(adapter_ids=(str(d),), source="local")


def _serve(tp: TPGroup, model_dir: str, adapter_dirs: dict[int, str], refused_dir: str | None) -> dict:
    model = FlashMistralForCausalLM.from_pretrained(model_dir, tp=tp)
    # Rank 1 confines LOCAL ids to the directory holding the adapters: it cannot read `refused_dir`.
    root = AdapterSourceConfig(adapter_root=Path(adapter_dirs[1]).parent if tp.rank == 1 else None)
    store = AdapterStore(model.config, tp=tp, base_weights=model.projection_weight,
                         sources=AdapterSources(root if refused_dir else None))  # fmt: skip
    for i, d in adapter_dirs.items():
        store.load(i, _spec(d))
    out = {"dora": _run(model, store, requests=REQUESTS)}
    data = store.batch_data(REQUESTS, [len(p) for p in PROMPTS], True, lm_head_indices=last_rows())
    runner_logits, _ = _run_last(model, data)
    out["dora-last"] = (runner_logits, [])
    if refused_dir is not None:
        try:
            store.load(9, _spec(refused_dir))
            out["refusal"] = None
        except ShardError as e:
            out["refusal"] = f"{e.status.name}: {e}"
        out["after-refusal"] = _run(model, store, requests=REQUESTS)  # serving goes on, in step
    return out


def _run_last(model, data):
    from mistral_harness import PagedRunner

    return PagedRunner(model, KVCache.for_model(model, 48), seed=5).prefill(
        PROMPTS, last_only=True, adapter_data=data
    )


@pytest.mark.parametrize("shape,world", CASES, ids=[f"{s}-w{w}" for s, w in CASES])
def test_tp_dora_equals_world_size_1(tiny_model_factory, adapter_factory, shape, world, tmp_path):
    base = tiny_model_factory(**SHAPES[shape])
    dirs = {i: str(adapter_factory(base, **kw)) for i, kw in ADAPTERS.items()}
    truth = _serve(TPGroup(), str(base), dirs, None)
    plain = _run(FlashMistralForCausalLM.from_pretrained(base), None)
    assert (truth["dora"][0] - plain[0]).abs().max() > 1e-1  # the adapters really move the logits
    outside = Path(tempfile.mkdtemp(prefix="refused-", dir="/tmp"))  # outside the adapters' directory
    try:
        refused = shutil.copytree(dirs[1], outside / "adapter")
        per_rank = run_ranks(_serve, world, tmp_path, str(base), dirs, str(refused), timeout=120.0)
    finally:
        shutil.rmtree(outside)
    for r, got in enumerate(per_rank):
        for key in ("dora", "dora-last", "after-refusal"):
            want = truth["dora"] if key == "after-refusal" else truth[key]
            worst = _assert_close(got[key], want, f"{shape}, world {world}, rank {r}, {key}")
            print(f"{shape} world {world} rank {r} {key}: max |logits - world 1| = {worst:.3g}")
    assert per_rank[1]["refusal"].startswith("INVALID_ARGUMENT: ") and "outside the adapter root" in \
        per_rank[1]["refusal"]  # fmt: skip
    assert per_rank[0]["refusal"].startswith("INVALID_ARGUMENT: ") and "another tensor-parallel rank" in \
        per_rank[0]["refusal"]  # fmt: skip
    assert VOCAB % world  # the LM-head padding rows were part of the norms' all-reduce
    assert torch.equal(per_rank[0]["dora"][0], per_rank[1]["dora"][0])
