"""Grammar masks of a speculative verify step: one per verified position of every constrained row.

A verify step scores Q = 1 + k positions per row, position i as one-token decoding would score the
token after the row's first i drafts (speculative.py). For a row with a JSON schema that token is
chosen under the grammar's mask after those drafts:

    masks[r, i]      = next-token mask of matcher_r after consuming drafts_r[:i]   (matcher unchanged)
    allowed[r]       = the longest prefix of drafts_r with drafts_r[i] allowed by masks[r, i]
    accepted drafts  = at most allowed[r]: a draft the grammar refuses is never accepted (the target
                       of its position is chosen under that mask, so it differs anyway), and the
                       positions after it do not count, whatever their masks hold

The committed matcher then consumes exactly the emitted tokens (accepted drafts + the token after
them), in the mask worker's next job (`GrammarRows.consume_many`), as one-token steps would one by one.

Off the hot path: the masks are one job on the mask worker, queued behind the job that consumed the
previous step's tokens (jobs run in order), submitted before the verify forward is enqueued, so the
llguidance threads fill them while the device computes; the sampler waits for them (normally done).
Rows without drafts take one mask. Medusa drafts come from the device: the job waits on an event
recorded after their copy to the host, never on the forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from shard_server.generation.grammar_masks import GrammarRows, mask_rows, unpack


class PositionMasks:
    """What a scoring chooser's `process` calls: -inf where the masks refuse, on rows `rows` (None:
    every row) of x."""

    __slots__ = ("allowed", "rows")

    def __init__(self, allowed: torch.Tensor, rows: torch.Tensor | None):
        self.allowed = allowed  # [R, V] bool, device
        self.rows = rows

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return mask_rows(x, self.allowed, self.rows)


class DraftMasks:
    """The masks of one verify step for the constrained rows of a batch (see the module docstring)."""

    def __init__(self, grammar: GrammarRows, drafts: Callable[[], list[list[int]]], q_len: int):
        """`drafts()` -> the drafts of each constrained row (in `grammar.rows` order); it runs on the
        mask worker."""
        self.grammar = grammar
        self.q_len = q_len
        self._drafts: list[list[int]] = []

        def resolve() -> list[list[int]]:
            self._drafts = drafts()
            return self._drafts

        filler = grammar.filler
        self.job: Future = filler.draft_masks([g.matcher for g in grammar.live], resolve, q_len)
        self._host: torch.Tensor | None = None
        self._allowed: torch.Tensor | None = None

    def host(self) -> torch.Tensor:
        """int32 [R, Q, words] host masks (waits for the job once)."""
        if self._host is None:
            t0 = time.perf_counter()
            self._host = self.job.result()
            self.grammar.filler.wait_seconds.append(time.perf_counter() - t0)
        return self._host

    def _allowed_on(self, vocab: int, device: torch.device) -> torch.Tensor:
        """bool [R, Q, V] on the device: one upload and unpack per step."""
        if self._allowed is None:
            r = len(self.grammar.rows)
            self._allowed = unpack(self.host(), vocab, self.grammar.filler, device).view(r, self.q_len, vocab)
        return self._allowed

    def at(self, i: int, vocab: int, device: torch.device) -> PositionMasks:
        """Position i's masks for a chooser of the batch's B rows."""
        allowed = self._allowed_on(vocab, device)[:, i]
        whole = len(self.grammar.rows) == len(self.grammar)
        return PositionMasks(allowed, None if whole else self.grammar.rows_on(device))

    def expanded(self, vocab: int, device: torch.device) -> PositionMasks:
        """All positions for a chooser whose row b * Q + i is position i of row b."""
        allowed = self._allowed_on(vocab, device).flatten(0, 1)  # [R * Q, V]
        if len(self.grammar.rows) == len(self.grammar):
            return PositionMasks(allowed, None)
        offsets = torch.arange(self.q_len, device=device)
        rows = (self.grammar.rows_on(device)[:, None] * self.q_len + offsets).flatten()
        return PositionMasks(allowed, rows)

    def allowed_drafts(self, num_drafts: Sequence[int]) -> list[int]:
        """Per batch row: how many of its `num_drafts[b]` leading drafts the grammar allows (all for an
        unconstrained row). Host work only: the masks are on the host."""
        bits = self.host()  # waits: self._drafts is set
        out = list(num_drafts)
        for r, b in enumerate(self.grammar.rows):
            n, drafts = 0, self._drafts[r]
            while n < min(out[b], len(drafts)) and (int(bits[r, n, drafts[n] // 32]) >> (drafts[n] % 32)) & 1:
                n += 1
            out[b] = n
        return out
