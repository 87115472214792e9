"""Structured output on a GPU: masks uploaded from pinned memory and applied to the logits after the
CUDA-graph replay; every constrained row's document validates, greedy and sampled, in bf16, next to
unconstrained rows and adapters; the mask applied on the device equals the host's bitmask exactly."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.generation.grammar_masks import GrammarRows
from shard_server.testing.json_schemas import SCHEMAS, schema_text
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


@pytest.fixture(scope="module")
def engine(tiny_model_factory, adapter_factory):
    model_dir = tiny_model_factory(layers=2, hidden=128, heads=4, kv_heads=2, vocab=512)
    adapter = adapter_factory(model_dir, rank=8, target_modules=("q_proj", "v_proj", "o_proj"), seed=11)
    eng = ShardEngine(ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16"))
    eng.load_adapter(1, AdapterSpec(adapter_ids=(str(adapter),), source="local"))
    assert eng.runner.graphs is not None and eng.grammars._pin
    return eng


def test_every_schema_validates_with_cuda_graphs(engine):
    names = list(SCHEMAS)
    specs = []
    for i, name in enumerate(names):
        sampling = dict(do_sample=True, temperature=0.9, top_p=0.95) if i % 2 else {}
        params = SamplingParams(schema=schema_text(SCHEMAS[name]), seed=i, **sampling)
        specs.append(RequestSpec(id=i, inputs="JSON: ", adapter_index=i % 2, sampling=params,
                                 stopping=StoppingParams(max_new_tokens=200)))  # fmt: skip
    plain = [RequestSpec(id=500 + k, inputs="Hello", adapter_index=k % 2,
                         stopping=StoppingParams(16, (), True)) for k in range(3)]  # fmt: skip
    texts, ids = {}, {}
    result = engine.prefill(BatchSpec(id=1, requests=tuple(specs + plain)))
    while True:
        for g in result.generations:
            ids.setdefault(g.request_id, []).extend(g.next_tokens.ids)
            if g.generated_text is not None:
                texts[g.request_id] = g.generated_text
        if result.batch is None:
            break
        result = engine.decode([result.batch.id])
    for i, name in enumerate(names):
        assert texts[i].finish_reason == FinishReason.EOS_TOKEN, (name, texts[i])
        jsonschema.validate(json.loads(texts[i].text), SCHEMAS[name])
    assert engine.free_blocks() == engine.usable_blocks()


def test_device_mask_equals_the_host_bitmask(engine):
    V = engine.model_config.vocab_size
    grammars = [engine.grammars.compile(schema_text(SCHEMAS[n])).start() for n in ("person", "tuple")]
    rows = GrammarRows.of([grammars[0], None, grammars[1]])
    x = torch.randn(3, V, device="cuda")
    y = rows.apply(x.clone())
    bits = rows.host_masks()
    for k, b in enumerate(rows.rows):
        words = bits[k].tolist()
        allowed = torch.tensor([(words[j // 32] >> (j % 32)) & 1 for j in range(V)], dtype=torch.bool)
        assert torch.equal(torch.isfinite(y[b]).cpu(), allowed)
    assert torch.equal(y[1], x[1])
