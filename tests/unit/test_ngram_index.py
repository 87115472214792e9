"""NgramIndex (engine/speculative/drafts.py), synced incrementally in chunks of every size, proposes
exactly what a brute-force scan of the whole token list proposes, for the default n <= 3 (an unrolled
loop) and for other maximum lengths (the general loop)."""

from __future__ import annotations

import random

import pytest

from shard_server.engine.speculative.drafts import NgramIndex


def brute_force(seq: list[int], max_n: int, k: int) -> list[int]:
    """The continuation after the most recent earlier occurrence of the longest suffix (n <= max_n)
    that has a known next token, continued periodically past the end; [] if no suffix occurred."""
    end = len(seq)
    if k <= 0:
        return []
    for n in range(min(max_n, end), 0, -1):
        suffix = seq[end - n :]
        for e in range(end - 1, n - 1, -1):  # e: the position right after the occurrence
            if seq[e - n : e] == suffix:
                out: list[int] = []
                for j in range(k):
                    i = e + j
                    out.append(seq[i] if i < end else out[i - end])
                return out
    return []


@pytest.mark.parametrize("max_n", [1, 2, 3, 4])
def test_incremental_index_proposes_what_a_full_scan_proposes(max_n):
    rng = random.Random(max_n)
    for trial in range(30):
        vocab = rng.choice([3, 5, 12])  # small vocabularies: many repeats, many matches
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        generated: list[int] = []
        idx = NgramIndex(max_n)
        first = rng.randrange(0, len(prompt) + 1)  # index part of the prompt first, as a prefill chunk
        idx.sync(prompt[:first])
        while len(generated) < 40:
            generated += [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
            idx.sync(prompt, generated)
            seq = prompt + generated
            assert idx.tokens == seq
            for k in (0, 1, 4):
                assert idx.propose(k) == brute_force(seq, max_n, k), (trial, seq, k)


def test_sync_with_fewer_tokens_than_indexed_rebuilds():
    """The speculative lookahead indexes a step's emitted tokens before they are committed; when that
    step is cancelled, the next sync has fewer (committed) tokens, and the index must forget the rest."""
    rng = random.Random(5)
    prompt = [rng.randrange(4) for _ in range(10)]
    generated = [rng.randrange(4) for _ in range(8)]
    idx = NgramIndex()
    idx.sync(prompt, generated + [3, 3, 3, 3])  # tokens ahead of the commit
    idx.sync(prompt, generated)  # the step was never committed
    assert idx.tokens == prompt + generated
    fresh = NgramIndex()
    fresh.sync(prompt, generated)
    assert all(idx.propose(k) == fresh.propose(k) for k in (1, 3, 6))
    generated += [1, 2]
    idx.sync(prompt, generated)
    assert idx.tokens == prompt + generated and idx.propose(4) == brute_force(prompt + generated, 3, 4)
