"""Stopping criteria and GeneratedText with the real tiny tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from shard_server.generation.stopping import GenerationTracker, StoppingCriteria
from shard_server.types import FinishReason, StoppingParams

EOS = 2


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def run(tracker: GenerationTracker, ids: list[int]) -> list:
    steps = []
    for i in ids:
        steps.append(tracker.push(i))
        if steps[-1].finish_reason is not None:
            break
    return steps


def test_max_new_tokens_is_length(tok):
    t = GenerationTracker(tok, [1], StoppingParams(max_new_tokens=3), [EOS])
    steps = run(t, encode(tok, "Hello world"))
    assert [s.finish_reason for s in steps] == [None, None, FinishReason.LENGTH]
    out = t.generated_text(seed=None)
    assert (out.text, out.generated_tokens, out.finish_reason, out.seed) == (
        "Hell",
        3,
        FinishReason.LENGTH,
        None,
    )


def test_eos_unless_ignored_and_several_eos_ids(tok):
    ids = encode(tok, "Hi") + [EOS] + encode(tok, " there")
    t = GenerationTracker(tok, [1], StoppingParams(max_new_tokens=20), [EOS, 99])
    steps = run(t, ids)
    assert steps[-1].finish_reason == FinishReason.EOS_TOKEN and steps[-1].is_special
    assert steps[-1].text == "</s>"
    out = t.generated_text(seed=7)
    assert out.text == "Hi" and out.generated_tokens == 3 and out.seed == 7  # EOS counted, not shown
    t2 = GenerationTracker(tok, [1], StoppingParams(max_new_tokens=20), [99, 123])
    assert run(t2, [5, 123])[-1].finish_reason == FinishReason.EOS_TOKEN
    ignoring = GenerationTracker(
        tok, [1], StoppingParams(max_new_tokens=len(ids), ignore_eos_token=True), [EOS]
    )
    steps = run(ignoring, ids)
    assert len(steps) == len(ids) and steps[-1].finish_reason == FinishReason.LENGTH
    assert ignoring.generated_text().text == "Hi there"


def test_eos_wins_over_length():
    c = StoppingCriteria(StoppingParams(max_new_tokens=1), [EOS])
    assert c(EOS, "</s>") == FinishReason.EOS_TOKEN


def test_stop_sequence_across_token_boundaries(tok):
    ids = encode(tok, "Hello world")  # H e ll o ' w' or l d
    t = GenerationTracker(tok, [1], StoppingParams(max_new_tokens=50, stop_sequences=("lo wo",)), [EOS])
    steps = run(t, ids)
    assert [s.text for s in steps] == ["H", "e", "ll", "o", " w", "or"]
    assert steps[-1].finish_reason == FinishReason.STOP_SEQUENCE
    assert t.generated_text().text == "Hello wor"  # the stop sequence stays in the text


def test_stop_sequence_inside_a_multibyte_character_run(tok):
    ids = encode(tok, "on 世界 mat")
    t = GenerationTracker(tok, [1], StoppingParams(max_new_tokens=50, stop_sequences=("世界",)), [EOS])
    steps = run(t, ids)
    assert steps[-1].finish_reason == FinishReason.STOP_SEQUENCE
    assert "".join(s.text for s in steps) == "on 世界"
    assert all("\ufffd" not in s.text for s in steps)


def test_only_the_needed_tail_is_kept():
    c = StoppingCriteria(StoppingParams(max_new_tokens=1000, stop_sequences=("abcd", "zz")), [EOS])
    for piece in ["xyzab", "cx", "ab", "c"]:
        assert c(5, piece) is None
        assert len(c.tail) <= 3
    assert c(5, "d") == FinishReason.STOP_SEQUENCE  # "abc" + "d" across three pushes


def test_alternative_texts_use_the_context_before_the_token(tok):
    w = encode(tok, "Hello world")
    t = GenerationTracker(tok, [1] + w[:4], StoppingParams(max_new_tokens=5), [EOS])
    step = t.push(w[4], alternative_ids=[w[4], 2])
    assert step.text == " w" and step.alternative_texts == (" w", "</s>")


def test_push_after_finish_and_text_before_finish_are_bugs(tok):
    t = GenerationTracker(tok, [1], StoppingParams(max_new_tokens=1), [EOS])
    with pytest.raises(RuntimeError):
        t.generated_text()
    t.push(5)
    with pytest.raises(RuntimeError):
        t.push(6)
