"""Speculative decoding with structured output on a GPU (bf16, CUDA-graph verify steps, pinned mask
uploads, Medusa drafts copied to the host behind an event): every schema row's document validates with
speculation on, schema rows do accept drafts, and the tokens equal speculation off (bf16 near-ties
between the decode and verify kernels may flip a request; most must agree exactly)."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest
import torch

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.testing.json_schemas import SCHEMAS, schema_text
from shard_server.tools.medusa_heads import random_medusa_heads
from shard_server.types import (
    AdapterSpec,
    BatchSpec,
    FinishReason,
    RequestSpec,
    SamplingParams,
    StoppingParams,
)

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

HIDDEN, VOCAB = 256, 512


@pytest.fixture(scope="module")
def model(tiny_model_factory, adapter_factory, tmp_path_factory):
    model_dir = tiny_model_factory(layers=2, hidden=HIDDEN, heads=4, kv_heads=2, vocab=VOCAB)
    with_heads = tmp_path_factory.mktemp("spec-grammar-gpu") / "adapter-medusa"
    adapter = adapter_factory(model_dir, rank=8, target_modules=("q_proj", "v_proj"), seed=11)
    shutil.copytree(adapter, with_heads)
    random_medusa_heads(with_heads, HIDDEN, VOCAB, heads=3, layers=1, seed=5)
    return model_dir, with_heads


def _engine(model_dir, adapter, k: int) -> ShardEngine:
    cfg = ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16", speculative_tokens=k,
                      max_kv_cache_bytes=256 << 20)  # fmt: skip
    engine = ShardEngine(cfg)
    warm = RequestSpec(id=0, input_ids=tuple(range(3, 35)), stopping=StoppingParams(max_new_tokens=4))
    engine.warmup(BatchSpec(id=0, requests=(warm,)), 64, 512, 256)  # captures decode and verify graphs
    engine.load_adapter(1, AdapterSpec(adapter_ids=(str(adapter),), source="local"))
    assert engine.grammars._pin
    return engine


def _run(engine: ShardEngine, specs) -> dict[int, dict]:
    out: dict[int, dict] = {}
    result = engine.prefill(BatchSpec(id=3, requests=tuple(specs)))
    while True:
        for g in result.generations:
            o = out.setdefault(g.request_id, {"ids": []})
            o["ids"] += g.next_tokens.ids
            if g.generated_text is not None:
                o["text"], o["reason"] = g.generated_text.text, g.generated_text.finish_reason
                o["skipped"] = g.generated_text.skipped_tokens
        if result.batch is None:
            break
        result = engine.decode([result.batch.id])
    torch.cuda.synchronize()
    assert engine.free_blocks() == engine.usable_blocks()
    return out


def test_schema_rows_speculate_and_validate(model):
    names = list(SCHEMAS)
    noise = '{"nick": "zz", "years": 5} '  # n-gram material the grammars refuse
    specs = []
    for i, name in enumerate(names):
        sampling = dict(do_sample=True, temperature=0.8, seed=i) if i % 2 else {}
        if i % 5 == 4:
            sampling["repetition_penalty"] = 1.2  # some batches score position by position
        specs.append(RequestSpec(
            id=i, inputs=noise * 2 + "JSON: ", adapter_index=i % 2,
            sampling=SamplingParams(schema=schema_text(SCHEMAS[name]), **sampling),
            stopping=StoppingParams(max_new_tokens=200),
        ))  # fmt: skip
    specs += [RequestSpec(id=500 + k, inputs="Hello " * 6, adapter_index=k % 2,
                          stopping=StoppingParams(max_new_tokens=40, ignore_eos_token=True))
              for k in range(4)]  # fmt: skip
    plain = _run(_engine(*model, 0), specs)
    engine = _engine(*model, 4)
    spec = _run(engine, specs)
    for i, name in enumerate(names):
        assert spec[i]["reason"] == FinishReason.EOS_TOKEN, (name, spec[i])
        jsonschema.validate(json.loads(spec[i]["text"]), SCHEMAS[name])
    same = sum(plain[r]["ids"] == spec[r]["ids"] for r in plain)
    assert same >= 0.8 * len(plain), (same, len(plain))
    stats = engine.speculator.stats()
    assert stats["medusa_drafted"] > 0 and stats["grammar_refused"] > 0 and stats["accepted"] > 0
    assert sum(spec[i]["skipped"] for i in range(len(names))) > 0
    waits = sorted(engine.grammars._filler.wait_seconds)
    print(f"speculation {stats}; mask wait median {1e3 * waits[len(waits) // 2]:.3f} ms, "
          f"p90 {1e3 * waits[9 * len(waits) // 10]:.3f} ms")  # fmt: skip
