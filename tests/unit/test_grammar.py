"""Structured output on the host: schema checks and refusals, the compile cache, masks and their rows.

The tiny model's byte-level BPE tokenizer is the one the engine tests decode with; documents here are
drawn by random walks under the masks (a uniformly random allowed token per step), so a wrong mask
shows up as a document that does not parse or validate.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from model.errors import InvalidArgument, Unimplemented
from shard_server.config import GrammarConfig
from shard_server.engine.admission import compile_schema
from shard_server.generation.grammar import GrammarUnavailable, SchemaCompiler, SchemaError, json_depth
from shard_server.generation.grammar_masks import GrammarRows
from shard_server.testing.json_schemas import SCHEMAS, distinct_schemas, schema_text
from shard_server.types import RequestSpec, SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    c = SchemaCompiler(tokenizer, len(tokenizer), (EOS,))
    yield c
    c.close()


def allowed_ids(bits: torch.Tensor, vocab: int) -> list[int]:
    """Reference unpacking of one int32 bitmask row, bit by bit."""
    words = bits.tolist()
    return [j for j in range(vocab) if (words[j // 32] >> (j % 32)) & 1]


def random_document(compiler: SchemaCompiler, schema: str, rng: random.Random, max_tokens: int = 300):
    """-> (token ids, finished) drawn under the masks; EOS taken with probability 1/2 once allowed."""
    rows = GrammarRows.of([compiler.compile(schema).start()])
    ids: list[int] = []
    for _ in range(max_tokens):
        allowed = allowed_ids(rows.host_masks()[0], compiler.vocab_size)
        assert allowed, "a mask must allow at least one token"
        if EOS in allowed and (allowed == [EOS] or rng.random() < 0.5):
            return ids, True
        tok = rng.choice([t for t in allowed if t != EOS])
        ids.append(tok)
        rows.consume([tok])
    return ids, False


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_documents_under_the_mask_validate(compiler, tokenizer, name):
    schema = SCHEMAS[name]
    rng = random.Random(name)
    for _ in range(3):
        ids, finished = random_document(compiler, schema_text(schema), rng)
        text = tokenizer.decode(ids)
        assert finished, f"no EOS after {len(ids)} tokens: {text!r}"
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    "schema",
    [{"type": "number"}, {"type": "number", "exclusiveMinimum": -2.5, "maximum": 7}, {"type": "integer"},
     {"type": "string"}, {"type": "array", "items": {"type": "number"}}],
)  # fmt: skip
def test_unbounded_scalars_validate(compiler, tokenizer, schema):
    """Shapes the engine tests leave out (a random model may extend them for long): random walks only."""
    rng = random.Random(json.dumps(schema))
    for _ in range(5):
        ids, finished = random_document(compiler, json.dumps(schema), rng, max_tokens=2000)
        assert finished
        jsonschema.validate(json.loads(tokenizer.decode(ids)), schema)


def test_output_format_is_compact_with_dumps_separators(compiler, tokenizer):
    schema = schema_text(SCHEMAS["flags"])
    rows = GrammarRows.of([compiler.compile(schema).start()])
    # Force-feed the document as json.dumps writes it: every token must be allowed on the way.
    ids = tokenizer('{"x": true, "y": false, "z": true}', add_special_tokens=False).input_ids
    for t in ids:
        assert t in allowed_ids(rows.host_masks()[0], compiler.vocab_size)
        rows.consume([t])
    assert allowed_ids(rows.host_masks()[0], compiler.vocab_size) == [EOS]  # complete: EOS only
    # Without the blanks (or with more of them) the same document is refused on the way.
    for other in ('{"x":true,"y":false,"z":true}', '{ "x": true, "y": false, "z": true}'):
        rows = GrammarRows.of([compiler.compile(schema).start()])
        refused = False
        for t in tokenizer(other, add_special_tokens=False).input_ids:
            if t not in allowed_ids(rows.host_masks()[0], compiler.vocab_size):
                refused = True
                break
            rows.consume([t])
        assert refused, other


BAD_SCHEMAS = {
    "not JSON": ('{"type": "object"', "not JSON"),
    "a JSON array": ("[1, 2]", "must be a JSON object"),
    "a JSON string": ('"object"', "must be a JSON object"),
    "false": ("false", "no document satisfies it"),
    "unknown type": ('{"type": "wibble"}', "wibble"),
    "unsupported keyword": ('{"type": "array", "uniqueItems": true}', "uniqueItems"),
    "unsupported not": ('{"not": {"type": "integer"}}', "not"),
    "unknown format": ('{"type": "string", "format": "zipcode"}', "zipcode"),
    "broken pattern": ('{"type": "string", "pattern": "(("}', "regex"),
    "backreference": ('{"type": "string", "pattern": "(a)\\\\1"}', "backreference"),
    "dangling $ref": ('{"$ref": "#/$defs/missing"}', "missing"),
    "x-guidance cannot make it lenient": (
        '{"x-guidance": {"lenient": true}, "type": "array", "uniqueItems": true}',
        "uniqueItems",
    ),
    "too large": (json.dumps({"enum": ["x" * 100] * 700}), "over the limit of 65536"),
    "nested too deep": ('{"properties": {"a": ' * 17 + "{}" + "}}" * 17, "35 levels deep, over the limit"),
    "nested deeper than the parser": ("[" * 30000 + "]" * 30000, "levels"),
}


@pytest.mark.parametrize("case", list(BAD_SCHEMAS))
def test_bad_schemas_are_refused_naming_the_problem(compiler, case):
    text, words = BAD_SCHEMAS[case]
    with pytest.raises(SchemaError, match=None) as e:
        compiler.compile(text)
    assert words.lower() in str(e.value).lower(), str(e.value)
    assert str(e.value).startswith("schema")  # admission prefixes "request N: parameters."


def test_admission_maps_refusals_to_status_codes(compiler):
    bad = RequestSpec(id=7, sampling=SamplingParams(schema="[]"))
    with pytest.raises(InvalidArgument, match="request 7: parameters.schema must be a JSON object"):
        compile_schema(bad, compiler)
    assert compile_schema(RequestSpec(id=8), compiler) is None  # no schema: nothing to compile
    # A tokenizer llguidance cannot read (no tokenizer.json behind it): UNIMPLEMENTED, naming why.
    unreadable = SchemaCompiler(object(), 10, (2,))
    with pytest.raises(GrammarUnavailable):
        unreadable.compile("{}")
    with pytest.raises(Unimplemented, match="request 7: parameters.schema needs a fast"):
        compile_schema(replace(bad, sampling=SamplingParams(schema="{}")), unreadable)
    with pytest.raises(Unimplemented, match="not set up"):
        compile_schema(bad, None)


def test_refusals_are_cached_too(compiler):
    text = '{"type": "array", "uniqueItems": true, "title": "cached refusal"}'
    with pytest.raises(SchemaError):
        compiler.compile(text)
    assert compiler.cached(text)


def test_boolean_true_schema_allows_any_json(compiler, tokenizer):
    ids, finished = random_document(compiler, "true", random.Random(5))
    assert finished
    json.loads(tokenizer.decode(ids))


def test_compile_time_and_grammar_limits(tokenizer):
    # 1500 optional properties compile slowly (llguidance orders them): over a tiny clock limit.
    slow = json.dumps({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1500)},
                       "additionalProperties": False})  # fmt: skip
    c = SchemaCompiler(tokenizer, len(tokenizer), (EOS,), GrammarConfig(compile_timeout_s=0.01))
    c.compile("{}")  # setup done: the clock then measures the compile alone
    t0 = time.monotonic()
    with pytest.raises(SchemaError, match="took longer than 0.01 s to compile"):
        c.compile(slow)
    assert time.monotonic() - t0 < 1.0  # the caller does not wait for the compile to finish
    with pytest.raises(SchemaError, match="took longer"):
        c.compile(slow)  # the verdict is cached, even though the compile has finished since
    c.close()
    # Several ranks: no clock-based verdict (ranks must agree), counted limits instead.
    small = GrammarConfig(compile_timeout_s=0.01, max_grammar_size=200)
    d = SchemaCompiler(tokenizer, len(tokenizer), (EOS,), small, deterministic_only=True)
    assert d.timeout is None
    with pytest.raises(SchemaError, match="not supported: .*grammar"):
        d.compile(slow)
    d.close()


def test_lru_cache_keeps_the_last_schemas(tokenizer):
    c = SchemaCompiler(tokenizer, len(tokenizer), (EOS,), GrammarConfig(cache_size=3))
    texts = [schema_text(s) for s in distinct_schemas(5)]
    first = c.compile(texts[0])
    assert c.compile(texts[0]) is first  # a hit is the same compiled object
    for t in texts[1:]:
        c.compile(t)
    assert [c.cached(t) for t in texts] == [False, False, True, True, True]
    c.close()


def test_json_depth():
    assert json_depth(1) == 0
    assert json_depth({"a": [1, {"b": []}]}) == 4
    assert json_depth({"type": "object"}) == 1


def test_padded_vocabulary_rows_are_never_allowed(tokenizer):
    n_tok = len(tokenizer)
    c = SchemaCompiler(tokenizer, n_tok + 40, (EOS,))  # the model has 40 rows the tokenizer lacks
    rng = random.Random(1)
    for schema in ("{}", schema_text(SCHEMAS["person"]), schema_text(SCHEMAS["string_short"])):
        rows = GrammarRows.of([c.compile(schema).start()])
        for _ in range(30):
            allowed = allowed_ids(rows.host_masks()[0], n_tok + 40)
            assert allowed and max(allowed) < n_tok
            x = torch.zeros(1, n_tok + 40)
            assert torch.isinf(rows.apply(x)[0, n_tok:]).all()
            if allowed == [EOS]:
                break
            rows.consume([rng.choice([t for t in allowed if t != EOS])])
    c.close()


def test_apply_masks_constrained_rows_only_and_exactly(compiler):
    V = compiler.vocab_size
    schemas = [schema_text(SCHEMAS[n]) for n in ("person", "enum_str", "int_array")]
    grammars = [compiler.compile(schemas[0]).start(), None, compiler.compile(schemas[1]).start(), None,
                compiler.compile(schemas[2]).start()]  # fmt: skip
    rows = GrammarRows.of(grammars)
    x = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    y = rows.apply(x.clone())
    bits = rows.host_masks()
    for k, b in enumerate(rows.rows):
        allowed = set(allowed_ids(bits[k], V))
        finite = set(torch.isfinite(y[b]).nonzero().flatten().tolist())
        assert finite == allowed
        assert torch.equal(y[b][list(allowed)], x[b][list(allowed)])
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3])
    assert GrammarRows.of([None, None]) is None


def test_rows_keep_their_state_through_filter_and_concatenate(compiler, tokenizer):
    """A row's mask depends on its own tokens only, wherever filtering and concatenation put it."""
    V = compiler.vocab_size
    texts = [schema_text(s) for s in distinct_schemas(4)]
    rng = random.Random(7)
    grammars = [compiler.compile(t).start() for t in texts]
    history: list[list[int]] = [[] for _ in texts]
    rows = GrammarRows.of(grammars)
    for _ in range(6):
        bits = rows.host_masks()
        chosen = []
        for k in range(len(rows.rows)):
            allowed = [t for t in allowed_ids(bits[k], V) if t != EOS] or [EOS]
            chosen.append(rng.choice(allowed))
        for k, t in zip(rows.rows, chosen, strict=True):
            history[k].append(t)
        rows.consume(chosen)
    # Reorder: drop row 1, put row 3 first, add an unconstrained row and a fresh constrained one.
    kept = rows.filter([3, 0, 2])
    fresh = compiler.compile(texts[1]).start()
    joined = GrammarRows.concatenate([(kept, 3), (None, 1), (GrammarRows.of([fresh]), 1)])
    assert joined.rows == [0, 1, 2, 4]
    got = joined.host_masks()
    for k, hist in zip(range(4), [history[3], history[0], history[2], []], strict=True):
        ref = GrammarRows.of([compiler.compile(texts[[3, 0, 2, 1][k]]).start()])
        for t in hist:
            ref.consume([t])
        assert torch.equal(got[k], ref.host_masks()[0])


def test_two_compilers_give_identical_masks(tokenizer):
    """Tensor-parallel ranks each compile and step their own matchers: the masks must agree."""
    a = SchemaCompiler(tokenizer, len(tokenizer), (EOS,), deterministic_only=True)
    b = SchemaCompiler(tokenizer, len(tokenizer), (EOS,), deterministic_only=True)
    texts = [schema_text(s) for s in distinct_schemas(6)]
    ra = GrammarRows.of([a.compile(t).start() for t in texts])
    rb = GrammarRows.of([b.compile(t).start() for t in texts])
    rng = random.Random(3)
    for _ in range(10):
        ma, mb = ra.host_masks(), rb.host_masks()
        assert torch.equal(ma, mb)
        toks = []
        for k in range(len(texts)):
            allowed = [t for t in allowed_ids(ma[k], len(tokenizer)) if t != EOS] or [EOS]
            toks.append(rng.choice(allowed))
        ra.consume(toks)
        rb.consume(toks)
    a.close()
    b.close()
