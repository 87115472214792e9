"""Grammar masks of a verify step (generation/grammar_drafts.py) against one-token steps: the mask at
position i is the mask one-token decoding computes after the first i drafts, refused drafts stop the
allowed count, a complete document allows EOS only, and the matcher is left as it was."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from shard_server.generation.grammar import SchemaCompiler
from shard_server.generation.grammar_drafts import DraftMasks
from shard_server.generation.grammar_masks import GrammarRows
from shard_server.testing.json_schemas import SCHEMAS, schema_text

EOS = 2
Q = 5


@pytest.fixture(scope="module")
def compiler(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    c = SchemaCompiler(tokenizer, len(tokenizer), (EOS,))
    yield c
    c.close()


def walk(compiler: SchemaCompiler, schema: str, rng: random.Random) -> list[int]:
    """A document drawn uniformly under the masks, then EOS and one more EOS (ignore_eos_token)."""
    rows = GrammarRows.of([compiler.compile(schema).start()])
    ids: list[int] = []
    while True:
        allowed = allowed_ids(rows.host_masks()[0])
        if allowed == [EOS] or (EOS in allowed and rng.random() < 0.3):
            return ids + [EOS, EOS]
        ids.append(rng.choice([t for t in allowed if t != EOS]))
        rows.consume([ids[-1]])


def allowed_ids(bits: torch.Tensor) -> list[int]:
    words = bits.tolist()
    return [j for j in range(32 * len(words)) if (words[j // 32] >> (j % 32)) & 1]


def one_token_masks(compiler, schema: str, history: list[int], drafts: list[int]) -> list[list[int]]:
    """What one-token steps mask after history + drafts[:i], i = 0..len(drafts) (while allowed)."""
    rows = GrammarRows.of([compiler.compile(schema).start()])
    for t in history:
        rows.consume([t])
    out = [allowed_ids(rows.host_masks()[0])]
    for t in drafts:
        if t not in out[-1]:
            break
        rows.consume([t])
        out.append(allowed_ids(rows.host_masks()[0]))
    return out


@pytest.mark.parametrize("name", ["person", "tuple", "enum_str", "int_array", "anyof_objects"])
def test_position_masks_equal_one_token_steps(compiler, name):
    schema = schema_text(SCHEMAS[name])
    rng = random.Random(name)
    doc = walk(compiler, schema, rng)
    for _ in range(6):
        cut = rng.randrange(len(doc) - 1)
        drafts = doc[cut : cut + Q - 1]
        if rng.random() < 0.5 and len(drafts) > 1:  # a token the grammar (almost surely) refuses there
            drafts[rng.randrange(len(drafts))] = rng.randrange(3, 512)
        # Rows: this one, an unconstrained row, the same state without drafts, one at the start.
        grammars = [compiler.compile(schema).start() for _ in range(3)]
        for g in grammars[:2]:
            for t in doc[:cut]:
                if not g.matcher.is_stopped():
                    assert g.matcher.consume_token(t)
        live = GrammarRows.of([grammars[0], None, grammars[1], grammars[2]])
        masks = DraftMasks(live, lambda d=drafts: [d, [], []], Q)
        host = masks.host()
        want = one_token_masks(compiler, schema, doc[:cut], drafts)
        for i, ref in enumerate(want):
            assert allowed_ids(host[0, i]) == ref, (name, cut, drafts, i)
        assert allowed_ids(host[1, 0]) == want[0]
        assert allowed_ids(host[2, 0]) == one_token_masks(compiler, schema, [], [])[0]
        n = masks.allowed_drafts([len(drafts), 3, 0, 0])
        assert n[0] == len(want) - 1 and n[1:] == [3, 0, 0]
        # The matchers were rolled back: they go on exactly as one-token steps do.
        for t in doc[cut:]:
            assert t in allowed_ids(live.filler.fill([grammars[0].matcher])[0])
            if not grammars[0].matcher.is_stopped():
                assert grammars[0].matcher.consume_token(t)


def test_eos_mask_is_what_a_complete_document_allows(compiler):
    schema = schema_text(SCHEMAS["const_str"])
    doc = walk(compiler, schema, random.Random(0))
    g = compiler.compile(schema).start()
    for t in doc[:-2]:
        g.matcher.consume_token(t)
    assert g.matcher.is_stopped()
    assert allowed_ids(g.filler.eos_mask) == allowed_ids(g.filler.fill([g.matcher])[0]) == [EOS]
    # Drafting EOS past the end: every later position allows EOS only, as one-token steps do.
    host = DraftMasks(GrammarRows.of([g]), lambda: [[EOS, EOS, EOS]], 4).host()
    assert all(allowed_ids(host[0, i]) == [EOS] for i in range(4))
