"""Incremental detokenization with the real tiny byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from shard_server.generation.detokenize import IncrementalDetokenizer, special_token_ids, token_texts

TEXTS = ["The cat 🐈 sat on 世界 mat", "café 🎉🎉 ok", "Hello world", "日本語のテキスト"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_text_and_never_split_a_character(tok, text):
    ids = encode(tok, text)
    pieces = token_texts(tok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # multi-byte characters really span several tokens here, so some tokens must yield ""
    if any(ord(ch) > 0x7F for ch in text):
        assert "" in pieces


def test_partial_utf8_yields_empty_until_the_character_completes(tok):
    ids = encode(tok, "café")
    detok = IncrementalDetokenizer(tok, encode(tok, "Hello"))
    assert [detok.push(i) for i in ids[:3]] == ["c", "a", "f"]
    assert detok.push(ids[3]) == "" and detok.pending() == 1  # first byte of é
    assert detok.push(ids[4]) == "é" and detok.pending() == 0


def test_emoji_across_four_byte_tokens(tok):
    ids = encode(tok, " 🐈")  # ' \xf0', '\x9f', '\x90' ... one token per byte or pair
    detok = IncrementalDetokenizer(tok, encode(tok, "The cat"))
    pieces = [detok.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == " 🐈"


def test_prompt_context_and_peek(tok):
    prompt = encode(tok, "Hello")
    detok = IncrementalDetokenizer(tok, prompt)
    w = encode(tok, " world")
    assert detok.peek(w[0]) == " w"
    assert detok.peek(w[0]) == " w" and detok.pending() == 0  # peek changes nothing
    assert [detok.push(i) for i in w] == [" w", "or", "l", "d"]


def test_special_tokens_have_text_and_are_flagged(tok):
    specials = special_token_ids(tok)
    assert {0, 1, 2} <= specials
    detok = IncrementalDetokenizer(tok, [1, 42])
    assert detok.push(2) == "</s>"
    assert special_token_ids(tok.backend_tokenizer) >= {1, 2}  # a bare tokenizers.Tokenizer works too


def test_window_stays_short(tok):
    detok = IncrementalDetokenizer(tok, encode(tok, "x" * 50))
    for i in encode(tok, "Hello world " * 20):
        detok.push(i)
    assert len(detok._ids) <= 5
