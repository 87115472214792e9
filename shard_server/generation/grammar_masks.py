"""Per-step token masks of a batch's constrained rows: filled on the host, applied on the device.

Semantics, per constrained row b and token j (unconstrained rows are untouched):

    allowed[b, j] = the grammar of b accepts token j next   (EOS only once the document is complete)
    logits[b, j]  = -inf where not allowed[b, j]

A row's `RequestGrammar` advances only on tokens the request emits, so chunked prefill, FilterBatch and
concatenation need nothing special: a row keeps its matcher wherever it goes.

One step of a batch with R constrained rows over V token ids:
- host: an int32 bitmask [R, ceil(V/32)] (bit j%32 of word j//32), filled by llguidance's thread pool
  with the GIL released. When a step's tokens are known, one job on the mask worker thread advances the
  rows' matchers on them and fills the next step's masks (`MaskFiller.advance`), while the host emits
  this step's text and the device runs the next forward. The worker is the only thread that touches a
  matcher with a job queued; jobs run in order. A row that has never had a job (a new request) is
  filled when its first step needs it.
- device: one upload of the bitmask (from pinned memory, non-blocking), unpacked to [R, V] bools with
  shifts, then a masked fill. No host sync: nothing on the device is read back.
A row whose matcher hit an error (a limit reached mid-document) is allowed EOS only and ends there.

Speculative verify steps score several positions per row: `MaskFiller.draft_masks` fills, per row, the
masks after each prefix of its drafts (grammar_drafts.py), and `advance` consumes several tokens per
row (the accepted drafts and the token after them) in one job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

log = logging.getLogger(__name__)


class RequestGrammar:
    """One request's grammar state: an llguidance matcher that advances on each emitted token."""

    __slots__ = ("matcher", "filler", "queued")

    def __init__(self, matcher: Any, filler: MaskFiller):
        self.matcher = matcher
        self.filler = filler
        # The last job that advances this matcher and fills its next mask: (job, row in its result).
        self.queued: tuple[Future, int] | None = None


class MaskFiller:
    """Engine-wide: llguidance's executor, the mask worker thread, the device unpack constants."""

    def __init__(
        self,
        llguidance: Any,
        mask_words: int,
        vocab_size: int,
        threads: int,
        pin_memory: bool,
        eos_mask: torch.Tensor,
    ):
        self.words = mask_words
        self.eos_mask = eos_mask  # int32 [words]: what llguidance allows a stopped or failed matcher
        self.vocab_size = vocab_size
        self.pin_memory = pin_memory
        self._llguidance, self._threads = llguidance, max(1, threads)
        self._pool: Any = None  # llguidance's thread pool, started by the first mask
        self._pool_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._shifts: dict[torch.device, torch.Tensor] = {}
        # Recent durations in seconds (metrics, benchmarks): a worker job (advance + fill), and what
        # the step waited for masks on the model thread (waiting for a job plus filling new rows).
        self.job_seconds: deque[float] = deque(maxlen=4096)
        self.wait_seconds: deque[float] = deque(maxlen=4096)

    def fill(self, matchers: Sequence[Any]) -> torch.Tensor:
        """Next-token masks of `matchers` -> a new int32 [len, words] host tensor (pinned for a CUDA
        engine: the caching host allocator never hands it out again before its upload has run)."""
        out = torch.empty(len(matchers), self.words, dtype=torch.int32, pin_memory=self.pin_memory)
        if len(matchers):
            self._executor.unsafe_compute_mask_ptr(
                [(m, i) for i, m in enumerate(matchers)], out.data_ptr(), self.words * 4, len(matchers)
            )
        return out

    @property
    def _executor(self) -> Any:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self._llguidance.LLExecutor(num_threads=self._threads)
            return self._pool

    def advance(self, grammars: Sequence[RequestGrammar], tokens: Sequence[Sequence[int]]) -> None:
        """Queue one job: each matcher consumes its tokens (in order), then the next masks of all are
        filled."""
        lists = [[int(t) for t in ts] for ts in tokens]
        job = self._worker.submit(self._advance_and_fill, [g.matcher for g in grammars], lists)
        for i, g in enumerate(grammars):
            g.queued = (job, i)

    def _advance_and_fill(self, matchers: list[Any], tokens: list[list[int]]) -> torch.Tensor:
        t0 = time.perf_counter()
        rows = list(zip(matchers, tokens, strict=True))
        for j in range(max(map(len, tokens), default=0)):  # token j of every row, rows in parallel
            # A complete document (or an error) allowed only EOS: nothing more to consume.
            todo = [(m, ts[j]) for m, ts in rows if j < len(ts) and not m.is_stopped()]
            if todo:
                for (m, _), ok in zip(todo, self._executor.consume_token_par(todo), strict=True):
                    if not ok:
                        log.warning("structured output: grammar error, the request ends: %s",
                                    m.get_error()[:300])  # fmt: skip
        out = self.fill(matchers)
        self.job_seconds.append(time.perf_counter() - t0)
        return out

    def draft_masks(self, matchers: Sequence[Any], drafts: Callable[[], list[list[int]]], q_len: int):
        """Queue one job -> int32 [R, q_len, words] host masks: row r's mask at position i is its
        matcher's next-token mask after consuming drafts()[r][:i]; the matcher is left as it was.

        Positions past a draft the grammar refuses are never accepted; past a draft that stopped the
        matcher (EOS once complete) or failed it, llguidance writes nothing more, and what it would
        compute there is its EOS set: every unwritten position holds `eos_mask`. `drafts` runs on the
        worker (Medusa drafts may still be on their way from the device)."""
        return self._worker.submit(self._fill_draft_masks, list(matchers), drafts, q_len)

    def _fill_draft_masks(self, matchers: list[Any], drafts: Callable[[], list[list[int]]], q_len: int):
        t0 = time.perf_counter()
        rows = drafts()
        n = len(matchers) * q_len
        out = torch.empty(n, self.words, dtype=torch.int32, pin_memory=self.pin_memory)
        out.numpy()[:] = self.eos_mask.numpy()  # numpy: no wake-up of torch's intra-op threads
        pairs = list(enumerate(zip(matchers, rows, strict=True)))
        with_drafts = [(m, r * q_len, d[: q_len - 1]) for r, (m, d) in pairs if d]
        without = [(m, r * q_len) for r, (m, d) in pairs if not d]
        ex, size = self._executor, self.words * 4
        # Advances each matcher over its drafts, one mask per prefix, and rolls it back (GIL released).
        if with_drafts:
            ex.unsafe_compute_mask_ptr_with_draft_token(with_drafts, out.data_ptr(), size, n)
        if without:
            ex.unsafe_compute_mask_ptr(without, out.data_ptr(), size, n)
        self.job_seconds.append(time.perf_counter() - t0)
        return out.view(len(matchers), q_len, self.words)

    def shifts(self, device: torch.device) -> torch.Tensor:
        """uint8 [8] = 0..7 on `device`: bit k of a mask byte is token 8 * byte + k (little endian)."""
        s = self._shifts.get(device)
        if s is None:
            s = self._shifts[device] = torch.arange(8, dtype=torch.uint8, device=device)
        return s

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


class GrammarRows:
    """The constrained rows of one batch (by row index) and the device side of their masks."""

    def __init__(self, grammars: list[RequestGrammar | None]):
        self.grammars = grammars  # one entry per batch row; None: unconstrained
        self.rows = [i for i, g in enumerate(grammars) if g is not None]
        self.live = [grammars[i] for i in self.rows]
        self.filler = self.live[0].filler
        self._rows_dev: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def of(cls, grammars: Sequence[RequestGrammar | None]) -> GrammarRows | None:
        """None when no row is constrained (the chooser then skips masking altogether)."""
        return cls(list(grammars)) if any(g is not None for g in grammars) else None

    def __len__(self) -> int:
        return len(self.grammars)

    # ---- batch lifecycle

    def filter(self, indices: Sequence[int]) -> GrammarRows | None:
        return GrammarRows.of([self.grammars[i] for i in indices])

    @staticmethod
    def concatenate(parts: Sequence[tuple[GrammarRows | None, int]]) -> GrammarRows | None:
        """parts: (rows or None, number of batch rows) in batch order."""
        if all(g is None for g, _ in parts):
            return None
        out: list[RequestGrammar | None] = []
        for g, n in parts:
            out.extend(g.grammars if g is not None else [None] * n)
        return GrammarRows.of(out)

    # ---- one step

    def consume(self, token_ids: Sequence[int]) -> None:
        """The step's tokens (host ints, one per batch row): advance the constrained rows on theirs and
        start the next step's masks, on the mask worker."""
        self.filler.advance(self.live, [[token_ids[i]] for i in self.rows])

    def consume_many(self, token_ids: Sequence[Sequence[int]]) -> None:
        """A verify step's emitted tokens (host ints, a list per batch row): as `consume`, in order."""
        self.filler.advance(self.live, [token_ids[i] for i in self.rows])

    def rows_on(self, device: torch.device) -> torch.Tensor:
        """The constrained rows' indices, int64 on `device` (uploaded once per batch composition;
        pinned: the upload does not wait for the device)."""
        rows = self._rows_dev.get(device)
        if rows is None:
            host = torch.tensor(self.rows, dtype=torch.int64)
            host = host.pin_memory() if self.filler.pin_memory else host
            rows = self._rows_dev[device] = host.to(device, non_blocking=True)
        return rows

    def host_masks(self) -> torch.Tensor:
        """int32 [R, words] for the constrained rows, in row order: queued rows from their jobs
        (waited for), rows that never had one filled now."""
        t0 = time.perf_counter()
        out = self._host_masks()
        self.filler.wait_seconds.append(time.perf_counter() - t0)
        return out

    def _host_masks(self) -> torch.Tensor:
        jobs = [g.queued for g in self.live]
        job = jobs[0][0] if jobs[0] is not None else None
        if job is not None and all(j is not None and j[0] is job and j[1] == k for k, j in enumerate(jobs)):
            buf = job.result()
            if buf.shape[0] == len(jobs):
                return buf  # the common step: one job made exactly these rows
        fresh = [k for k, j in enumerate(jobs) if j is None]
        filled = self.filler.fill([self.live[k].matcher for k in fresh]) if fresh else None
        at = {k: n for n, k in enumerate(fresh)}
        rows = [filled[at[k]] if j is None else j[0].result()[j[1]] for k, j in enumerate(jobs)]
        out = torch.empty(len(rows), self.filler.words, dtype=torch.int32, pin_memory=self.filler.pin_memory)
        return torch.stack(rows, out=out)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, V] float -> x with -inf at the tokens the constrained rows' grammars refuse."""
        allowed = unpack(self.host_masks(), x.shape[1], self.filler, x.device)  # [R, V]
        rows = None if len(self.rows) == len(self.grammars) else self.rows_on(x.device)
        return mask_rows(x, allowed, rows)


def unpack(bits: torch.Tensor, vocab: int, filler: MaskFiller, device: torch.device) -> torch.Tensor:
    """int32 [N, words] host bitmasks -> bool [N, vocab] on `device` (one upload, no host sync)."""
    if device.type != "cpu":
        bits = bits.to(device, non_blocking=True)
    b8 = bits.reshape(-1, filler.words).view(torch.uint8)  # [N, 4 * words]: token j: bit j % 8, byte j // 8
    return ((b8[:, :, None] >> filler.shifts(device)) & 1).view(b8.shape[0], -1)[:, :vocab].bool()


def mask_rows(x: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x [B, V] with -inf where allowed [R, V] is False, for rows `rows` [R] of x (None: all rows)."""
    if rows is None:
        return x.masked_fill(~allowed, float("-inf"))
    sub = x.index_select(0, rows).masked_fill(~allowed, float("-inf"))
    return x.index_copy(0, rows, sub)
