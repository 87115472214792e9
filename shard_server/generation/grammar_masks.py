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
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
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

    def __init__(self, llguidance: Any, mask_words: int, vocab_size: int, threads: int, pin_memory: bool):
        self.words = mask_words
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

    def advance(self, grammars: Sequence[RequestGrammar], token_ids: Sequence[int]) -> None:
        """Queue one job: each matcher consumes its token, then the next masks of all are filled."""
        job = self._worker.submit(self._advance_and_fill, [g.matcher for g in grammars], list(token_ids))
        for i, g in enumerate(grammars):
            g.queued = (job, i)

    def _advance_and_fill(self, matchers: list[Any], token_ids: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        # A complete document (or an error) allowed only EOS: nothing more to consume.
        todo = [(m, int(t)) for m, t in zip(matchers, token_ids, strict=True) if not m.is_stopped()]
        if todo:
            for (m, _), ok in zip(todo, self._executor.consume_token_par(todo), strict=True):
                if not ok:
                    log.warning("structured output: grammar error, the request ends: %s", m.get_error()[:300])
        out = self.fill(matchers)
        self.job_seconds.append(time.perf_counter() - t0)
        return out

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
        self.filler.advance(self.live, [token_ids[i] for i in self.rows])

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
        bits = self.host_masks()  # [R, words] int32, host
        dev = x.device
        if dev.type != "cpu":
            bits = bits.to(dev, non_blocking=True)
        R, V = len(self.rows), x.shape[1]
        b8 = bits.view(torch.uint8)  # [R, 4 * words]: byte j // 8 holds token j at bit j % 8
        allowed = ((b8[:, :, None] >> self.filler.shifts(dev)) & 1).view(R, -1)[:, :V].bool()  # [R, V]
        if R == len(self.grammars):
            return x.masked_fill(~allowed, float("-inf"))
        rows = self._rows_dev.get(dev)
        if rows is None:  # once per batch composition; pinned: the upload does not wait for the device
            host = torch.tensor(self.rows, dtype=torch.int64)
            host = host.pin_memory() if self.filler.pin_memory else host
            rows = self._rows_dev[dev] = host.to(dev, non_blocking=True)
        sub = x.index_select(0, rows).masked_fill(~allowed, float("-inf"))
        return x.index_copy(0, rows, sub)
