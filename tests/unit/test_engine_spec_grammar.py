"""Speculative decoding with structured output: schema rows speculate beside unconstrained ones and give,
request for request, the tokens of plain decoding with the same grammars; every document validates.

Batches mix several schemas (greedy and seeded sampling), unconstrained rows and adapter rows. Drafts come
from the real n-gram lookup, from an oracle that proposes the plain run's future tokens with deliberate
errors (long accepted runs through the grammar, then a refused token), from prompts whose n-grams the
grammar refuses, and from random Medusa heads of an adapter.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

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

K = 4
NAMES = ["person", "enum_field", "int_array", "tuple", "nested_2", "tool_call"]
PROMPTS = ["Reply in JSON. ", "The answer, as a JSON document: ", "x", "Fill in the form below please: "]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


@pytest.fixture(scope="module")
def model(tiny_model_dir, adapter_factory, tmp_path_factory):
    """A copy of the tiny model; adapter 1 carries random Medusa heads of its own, adapter 2 none."""
    root = tmp_path_factory.mktemp("spec-grammar")
    with_heads = root / "adapter-medusa"
    shutil.copytree(
        adapter_factory(tiny_model_dir, rank=4, target_modules=("q_proj", "v_proj"), seed=41), with_heads
    )
    random_medusa_heads(with_heads, 64, 512, heads=3, layers=1, seed=7)
    plain = adapter_factory(tiny_model_dir, rank=8, target_modules=("o_proj", "down_proj"), seed=42)
    return tiny_model_dir, [with_heads, plain]


@pytest.fixture(scope="module")
def engines(model):
    made: dict[int, ShardEngine] = {}

    def get(k: int) -> ShardEngine:
        if k not in made:
            e = ShardEngine(ShardConfig(model_dir=model[0], max_kv_cache_bytes=8 << 20, speculative_tokens=k))
            warm = RequestSpec(id=0, input_ids=(1, 5, 6, 7), stopping=StoppingParams(max_new_tokens=2))
            e.warmup(BatchSpec(id=0, requests=(warm,)), 64, 64, 8)
            for i, path in enumerate(model[1], start=1):
                e.load_adapter(i, AdapterSpec(adapter_ids=(str(path),), source="local"))
            made[k] = e
        e = made[k]
        assert not e.batches
        if e.speculator is not None:
            e.speculator.__dict__.pop("ngram_drafts", None)  # back to the class's n-gram lookup
        return e

    return get


def schema_row(rid: int, name: str, adapter: int = 0, prompt: int = 0, **sampling) -> RequestSpec:
    return RequestSpec(
        id=rid,
        inputs=PROMPTS[prompt % len(PROMPTS)],
        sampling=SamplingParams(schema=schema_text(SCHEMAS[name]), seed=rid, **sampling),
        stopping=StoppingParams(max_new_tokens=120),
        adapter_index=adapter,
    )


def mixed(stateful: bool) -> tuple[list[RequestSpec], dict[int, str]]:
    """Schema rows (greedy and sampled, base and adapter 2), unconstrained rows, adapter rows.
    `stateful`: penalties and watermark in the batch (position-by-position scoring), else none (all
    positions in one sampler pass)."""
    extra = [{}]
    if stateful:
        extra = [dict(repetition_penalty=1.3), dict(watermark=True), dict(frequency_penalty=0.4)]
    specs, names = [], {}
    for i, name in enumerate(NAMES):
        greedy = schema_row(100 + i, name, adapter=2 * (i % 2), prompt=i, **extra[i % len(extra)])
        sampled = schema_row(200 + i, name, adapter=2 * ((i + 1) % 2), prompt=i + 1, do_sample=True,
                             temperature=0.8, top_k=40 * (i % 2), **extra[(i + 1) % len(extra)])  # fmt: skip
        specs += [greedy, sampled]
        names[greedy.id] = names[sampled.id] = name
    # Past its document a row that ignores EOS keeps emitting EOS, the only token its grammar allows.
    done = replace(schema_row(110, "enum_str", prompt=2), stopping=StoppingParams(40, ignore_eos_token=True))
    specs.append(done)
    names[done.id] = "enum_str"
    for j in range(3):
        specs.append(RequestSpec(
            id=300 + j, inputs=PROMPTS[j] * 3, adapter_index=j % 3,
            sampling=SamplingParams(do_sample=j == 1, temperature=0.9, seed=j, **extra[j % len(extra)]),
            stopping=StoppingParams(max_new_tokens=30, ignore_eos_token=True),
        ))  # fmt: skip
    return specs, names


def run(engine: ShardEngine, specs: list[RequestSpec]) -> dict[int, dict]:
    """Prefill every spec in one batch, Decode to the end -> per request: ids, text, reason, skipped."""
    out: dict[int, dict] = {}

    def take(result):
        for g in result.generations:
            o = out.setdefault(g.request_id, {"ids": []})
            o["ids"] += g.next_tokens.ids
            if g.generated_text is not None:
                gt = g.generated_text
                o.update(text=gt.text, reason=gt.finish_reason, n=gt.generated_tokens)
                o["skipped"] = gt.skipped_tokens
        return result.batch

    running = take(engine.prefill(BatchSpec(id=1, requests=tuple(specs))))
    while running is not None:
        running = take(engine.decode([running.id]))
    assert engine.free_blocks() == engine.usable_blocks()
    return out


def assert_same_and_valid(plain: dict, spec: dict, names: dict[int, str]) -> None:
    assert plain.keys() == spec.keys()
    for rid in plain:
        a, b = plain[rid], spec[rid]
        assert (a["ids"], a["text"], a["reason"], a["n"]) == (b["ids"], b["text"], b["reason"], b["n"]), rid
    for rid, name in names.items():
        want = FinishReason.LENGTH if rid == 110 else FinishReason.EOS_TOKEN  # 110 ignores EOS
        assert spec[rid]["reason"] == want, (name, spec[rid])
        jsonschema.validate(json.loads(spec[rid]["text"]), SCHEMAS[name])


def oracle(reference: dict[int, list[int]]):
    """Drafts = the plain run's next tokens; every third call spoils the second draft (for a schema row
    almost always a token its grammar refuses there)."""
    calls = {"n": 0}

    def drafts(r, budget: int, ahead=()) -> list[int]:
        calls["n"] += 1
        g = len(r.tracker.generated_ids) + len(ahead)
        future = reference.get(r.id, [])[g : g + budget]
        if calls["n"] % 3 == 0 and len(future) > 1:
            future[1] = (future[1] + 101) % 512
        return future

    return drafts


def spec_stats(engine: ShardEngine, before: dict) -> dict:
    return {k: v - before[k] for k, v in engine.speculator.stats().items() if k != "acceptance"}


@pytest.mark.parametrize("stateful", [False, True], ids=["one-pass", "per-position"])
@pytest.mark.parametrize("drafter", ["ngram", "oracle"])
def test_mixed_schema_batch_equals_plain_decoding(engines, stateful, drafter):
    specs, names = mixed(stateful)
    plain = run(engines(0), specs)
    engine = engines(K)
    if drafter == "oracle":
        engine.speculator.ngram_drafts = oracle({rid: o["ids"] for rid, o in plain.items()})
    before = engine.speculator.stats()
    spec = run(engine, specs)
    assert_same_and_valid(plain, spec, names)
    stats = spec_stats(engine, before)
    assert stats["steps"] > 0 and stats["accepted"] > 0
    if drafter == "oracle":  # long runs through the grammar are accepted, spoiled drafts refused
        assert all(spec[rid]["skipped"] > 0 for rid in names), {rid: spec[rid]["skipped"] for rid in names}
        assert stats["grammar_refused"] > 0
        assert stats["accepted"] > 0.5 * stats["drafted"]


def test_ngram_drafts_the_grammar_refuses_are_cut(engines):
    """The prompts hold JSON of another shape: every `{"` or `", "` of the output looks up keys the
    schema does not have, so n-gram drafts run into refused tokens (and the grammar rolls back)."""
    noise = '{"nick": "zz", "years": 5, "city": "ab"} ' * 2
    specs = [
        replace_prompt(schema_row(400 + i, name, adapter=i % 3, do_sample=i % 2 == 1, temperature=0.7), noise)
        for i, name in enumerate(["person", "nested_2", "tool_call", "enum_field"])
    ]
    names = {s.id: n for s, n in zip(specs, ["person", "nested_2", "tool_call", "enum_field"], strict=True)}
    plain = run(engines(0), specs)
    engine = engines(K)
    before = engine.speculator.stats()
    spec = run(engine, specs)
    assert_same_and_valid(plain, spec, names)
    stats = spec_stats(engine, before)
    assert stats["grammar_refused"] > 0 and stats["accepted"] > 0, stats


def replace_prompt(spec: RequestSpec, text: str) -> RequestSpec:
    return replace(spec, inputs=text + (spec.inputs or ""))


@pytest.mark.parametrize("heads", ["random", "oracle"])
def test_medusa_drafts_of_a_schema_row(engines, heads):
    """Adapter 1's Medusa heads draft for schema rows too (their drafts come from the device): random
    heads, and heads that propose the plain run's next tokens, every third step one of them spoiled."""
    specs = [schema_row(500 + i, name, adapter=1, prompt=i, do_sample=i == 1, temperature=0.8)
             for i, name in enumerate(["person", "int_array", "tuple"])]  # fmt: skip
    specs.append(RequestSpec(id=510, inputs="hello there", adapter_index=1,
                             stopping=StoppingParams(20, ignore_eos_token=True)))  # fmt: skip
    names = {500: "person", 501: "int_array", 502: "tuple"}
    plain = run(engines(0), specs)
    engine = engines(K)
    spec_engine = engine.speculator
    if heads == "oracle":
        real, calls = spec_engine.compute, {"n": 0}

        def compute(batch, found=()):  # the heads' drafts for this step, as commit left them on the device
            calls["n"] += 1
            for r in batch.requests:
                if r.drafts is not None and r.drafts.medusa is not None:
                    g = len(r.tracker.generated_ids)
                    future = (plain[r.id]["ids"][g : g + 3] + [7, 7, 7])[:3]
                    if calls["n"] % 3 == 0:
                        future[2] = (future[2] + 101) % 512
                    r.drafts.medusa = torch.tensor(future, dtype=torch.int64)
            return real(batch, found)

        spec_engine.compute = compute
    before = spec_engine.stats()
    try:
        spec = run(engine, specs)
    finally:
        spec_engine.__dict__.pop("compute", None)
    assert_same_and_valid(plain, spec, names)
    stats = spec_stats(engine, before)
    assert stats["medusa_drafted"] > 0 and stats["grammar_refused"] > 0
    if heads == "oracle":
        assert all(spec[rid]["skipped"] > 0 for rid in names)
