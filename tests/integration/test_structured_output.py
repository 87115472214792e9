"""JSON schemas through a real shard process and the fake router: constrained and unconstrained requests
over the base model and three adapters, greedy and sampled, batched continuously (joins, chunked
prompts, filters). Every constrained output parses and validates; the unconstrained ones equal the same
requests run without a constrained neighbour; refusals name the problem and leave the shard serving."""

from __future__ import annotations

import json
import random

import grpc
import jsonschema
import pytest
from shard_harness import batch, request

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.testing.fake_router import RouterLimits
from shard_server.testing.json_schemas import SCHEMAS, schema_text
from shard_server.types import FinishReason, RequestSpec, SamplingParams, StoppingParams

# Batches of at most 8, so requests queue and join the running batch; a prefill budget of 40 tokens
# chunks the longer prompts.
LIMITS = RouterLimits(max_input_length=48, max_total_tokens=256, max_prefill_tokens=40, max_batch_size=8)
PICKED = ["person", "const_field", "ref_defs", "anyof_objects", "tool_call", "int_array", "enum_field",
          "pattern_digits", "nested_3", "tuple", "ref_in_array", "date_like", "matrix", "event", "nullable",
          "sentiment"]  # fmt: skip
SAMPLING = [
    dict(),
    dict(do_sample=True, temperature=0.9, top_k=30),
    dict(repetition_penalty=1.2),
    dict(do_sample=True, top_p=0.85, typical_p=0.95, watermark=True),
]
TEXTS = ["Answer with JSON only. ", "Form: ", "Extract the fields of this invoice into a JSON document now. "]


def workload() -> tuple[list[RequestSpec], list[RequestSpec]]:
    rng = random.Random(9)
    constrained, plain = [], []
    for i, name in enumerate(PICKED):
        constrained.append(
            RequestSpec(
                id=0,
                inputs=TEXTS[i % len(TEXTS)],
                sampling=SamplingParams(schema=schema_text(SCHEMAS[name]), seed=i, **SAMPLING[i % 4]),
                stopping=StoppingParams(max_new_tokens=160),
                adapter_index=i % 4,
            )
        )
    for i in range(8):
        plain.append(
            RequestSpec(
                id=0,
                input_ids=(1, *(rng.randrange(3, 512) for _ in range(rng.randrange(3, 30)))),
                sampling=SamplingParams(seed=100 + i, **SAMPLING[(i + 1) % 4]),
                stopping=StoppingParams(max_new_tokens=12, ignore_eos_token=True),
                adapter_index=(i + 2) % 4,
            )
        )
    return constrained, plain


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_mixed_batches_validate_and_leave_neighbours_alone(shared_shard, tokenizer):
    constrained, plain = workload()
    mixed = [r for pair in zip(constrained[:8], plain, strict=True) for r in pair] + constrained[8:]
    with shared_shard.router(LIMITS, tokenize=lambda t: tokenizer(t).input_ids) as router:
        results = router.generate(mixed)
        stats = router.stats
    assert stats.prefills_into_running > 0 and stats.filters > 0 and stats.chunked_requests > 0
    by_spec = {id(r): res for r, res in zip(mixed, results, strict=True)}
    for name, spec in zip(PICKED, constrained, strict=True):
        res = by_spec[id(spec)]
        assert res.finish_reason == FinishReason.EOS_TOKEN, (name, res.text)
        jsonschema.validate(json.loads(res.text), SCHEMAS[name])
        assert "".join(res.token_texts).startswith(res.text)  # streamed text, then EOS's
    with shared_shard.router(LIMITS) as router:
        alone = router.generate(plain)
    for spec, res in zip(plain, alone, strict=True):
        assert by_spec[id(spec)].token_ids == res.token_ids


REFUSALS = {
    "not JSON": ('{"type": "object", ', "schema is not JSON"),
    "not a schema": ("[1, 2, 3]", "schema must be a JSON object"),
    "unsupported keyword": ('{"type": "array", "uniqueItems": true}', "uniqueItems"),
    "too large": (json.dumps({"enum": [f"value {i:05d}" for i in range(6000)]}), "over the limit of 65536"),
    "nests too deep": ('{"items": ' * 40 + "{}" + "}" * 40, "levels deep"),
}


def test_refusals_name_the_problem(shared_shard):
    stub = shared_shard.stub()
    for rid, (text, words) in enumerate(REFUSALS.values(), start=500):
        bad = request(rid, (1, 5, 9), schema=text)
        with pytest.raises(grpc.RpcError) as e:
            stub.Prefill(pb.PrefillRequest(batch=batch(rid, request(rid + 100, (1, 7)), bad)), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"request {rid}: parameters.schema" in e.value.details() and words in e.value.details()
