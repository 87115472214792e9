"""Draft tokens for speculative decoding: n-gram lookup in the request's own tokens (prompt lookup).

    tokens = prompt + generated (the last generated token is the one fed next)
    for n in (3, 2, 1):
        if the last n tokens occurred earlier, at their most recent earlier occurrence ending at e:
            propose tokens[e+1 .. e+k] (continued periodically if that runs into the end)
    no match: no draft

`NgramIndex` keeps, per request, the position after the most recent occurrence of every n-gram
(n <= 3) whose next token is known, updated incrementally as tokens arrive: a lookup is O(1) dict
probes, not a scan of the context.

How many drafts a row may take (`draft_budget`): at most k, and never past what the request may
still emit or has KV slots for. A verify step writes positions L .. L + drafts (L = tokens in the
cache) and emits at most drafts + 1 tokens, so

    drafts <= max_new_tokens - generated - 1        (the last emitted token is never fed back)
    drafts <= slots_in_block_table - 1 - L          (never write past the request's blocks)

which keeps every write inside the blocks the request already holds: rejected positions are simply
overwritten by later steps, and no block is allocated or freed for drafts.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3


class NgramIndex:
    """Prompt-lookup drafts for one request; `sync(tokens)` with the request's growing token list."""

    def __init__(self, max_n: int = MAX_NGRAM):
        self.max_n = max_n
        self.tokens: list[int] = []
        # n-gram -> position right after its most recent occurrence that has a known next token
        self._next: dict[tuple[int, ...], int] = {}

    def sync(self, prompt: Sequence[int], generated: Sequence[int] = ()) -> None:
        """Index the tokens of prompt + generated past the ones already indexed (only the new tail is
        read, so a step costs O(new tokens), not O(context)). Fewer tokens than indexed: a rebuild."""
        seq, nxt = self.tokens, self._next
        start, n_prompt = len(seq), len(prompt)
        if start > n_prompt + len(generated):
            # It indexed tokens a step emitted ahead of its commit (the speculative lookahead), and the
            # step was never committed: start over from the committed tokens.
            self.tokens, self._next = [], {}
            self.sync(prompt, generated)
            return
        if start == n_prompt + len(generated):
            return
        new = [*prompt[start:], *generated] if start < n_prompt else generated[start - n_prompt :]
        if self.max_n != 3:
            for t in new:
                p = len(seq)
                for n in range(1, min(self.max_n, p) + 1):  # n-grams ending at p - 1: next token at p
                    nxt[tuple(seq[p - n : p])] = p
                seq.append(t)
            return
        # The same for n <= 3, unrolled (this runs for every row at every step): `last` and `prev` are
        # the tokens at p - 1 and p - 2.
        p, last, prev = start, seq[-1] if seq else None, seq[-2] if start > 1 else None
        for t in new:
            if p >= 3:
                nxt[(last,)] = nxt[(prev, last)] = nxt[(seq[p - 3], prev, last)] = p
            elif p == 2:
                nxt[(last,)] = nxt[(prev, last)] = p
            elif p == 1:
                nxt[(last,)] = p
            seq.append(t)
            prev, last, p = last, t, p + 1

    def propose(self, k: int) -> list[int]:
        """Up to k draft tokens following the longest suffix (n <= max_n) seen earlier; [] if none."""
        seq = self.tokens
        end = len(seq)
        if k <= 0 or end == 0:
            return []
        for n in range(min(self.max_n, end), 0, -1):
            nxt = self._next.get(tuple(seq[end - n :]))
            if nxt is None:
                continue
            out: list[int] = []
            for j in range(k):  # s[end + j] = s[nxt + j], s = tokens + out (periodic past the end)
                i = nxt + j
                out.append(seq[i] if i < end else out[i - end])
            return out
        return []


def draft_budget(k: int, max_new_tokens: int, generated: int, cache_len: int, slots: int) -> int:
    """Drafts a row may verify this step (see the module docstring); 0 = plain decode for it."""
    return max(0, min(k, max_new_tokens - generated - 1, slots - 1 - cache_len))
