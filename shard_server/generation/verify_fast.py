"""Scoring a verify step with few host operations: the numbers of the general path, in one pass.

`speculative.choose_positions` scores position i of row b (of Q = 1 + drafts) as one-token decoding
scores the token after the row's first i drafts. Its general path builds a B*Q-row chooser every step
(rows without history-dependent state) or runs the chooser Q times (penalties, watermark). For batches
without a grammar, `score` does the same arithmetic with far fewer host operations (except typical-p
with penalties or watermark, see VerifyPlan.build):

    plan (once per chooser and Q; kept on the chooser, whose rows and parameters never change: the
          batch gets a new chooser whenever its rows do):
          expanded = chooser rows repeated Q times (row b*Q + i = request b at position i)
    step: expanded.step     = step[b] + i
          expanded.counts   = counts[b] + #{j < i : drafts[b, j] = v}     (frequency/presence)
          expanded.seen     = seen[b] | {drafts[b, :i]}                    (repetition)
          expanded.prev_ids = [prev[b], drafts[b, 0], ..., drafts[b, Q-2]][i]  (watermark)
          targets, logprobs = expanded.choose(logits [B*Q, V])

Every op of `choose` is row-wise, so row b*Q + i gets exactly the numbers a [B, V] chooser in state i
gets (the general path's per-position loop); the one reduction whose CUDA kernel may split a row's
sum by the number of rows, typical-p's entropy, keeps the loop. A batch of greedy rows without
penalties or watermark skips the chooser: `choose` is then argmax, log-softmax, gather (and top-k
for alternatives), run here directly. The [B*Q, V] count/seen tensors of a step with penalties are
the size of the scores the step computes anyway.

`to_host` (the step's one device -> host transfer): targets, matches, logprobs and alternatives are
packed into one float64 tensor (ids < 2**53 are exact) copied into pinned memory; the host counts
each row's leading matches (two ops on the small host tensor) and cuts its lists at that count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shard_server.generation.sampling import NextTokenChooser

_PLANS = "_verify_plans"  # attribute on the chooser: {Q: VerifyPlan} (as functools.cached_property)
# Per-position penalty state is [B*Q, V]; above this many elements the general path's Q passes over
# [B, V] keep the step's transient memory near a plain step's (large batches are device-bound anyway).
MAX_STATEFUL_ELEMENTS = 1 << 25


@dataclass
class VerifyPlan:
    """What a chooser's verify steps of Q positions share (built on first use)."""

    q_len: int
    offsets: torch.Tensor  # [Q] int64: 0 .. Q-1, the step offset of each position
    alt_k: tuple[int, ...]  # per-request number of alternatives (host ints)
    max_alternatives: int
    expanded: NextTokenChooser | None = None  # None: all-greedy rows, no chooser needed
    stateful: bool = False  # counts / seen / watermark: per-position state each step
    general: bool = False  # leave the step to the general path (see `build`)

    @classmethod
    def build(cls, chooser: NextTokenChooser, q_len: int) -> VerifyPlan:
        flags = chooser.flags
        k = flags.max_alternatives
        stateful = chooser.counts is not None or chooser.seen is not None or flags.any_watermark
        # Typical-p's entropy is a sum over the vocabulary whose CUDA reduction may split a row's work
        # differently for B and B*Q rows: with state, keep the general path's Q passes over [B, V]
        # (stateless rows are scored over B*Q rows by the general path too, so nothing changes there).
        penalty_state = chooser.counts is not None or chooser.seen is not None
        big = len(chooser) * q_len * chooser.vocab_size > MAX_STATEFUL_ELEMENTS
        general = (stateful and flags.typical) or (penalty_state and big)
        expanded = None
        if (flags.any_sampled or stateful) and not general:
            expanded = chooser.filter([b for b in range(len(chooser)) for _ in range(q_len)])
            expanded.counts = expanded.seen = None  # set per step (stateful rows), from the chooser's
        return cls(
            q_len=q_len,
            offsets=torch.arange(q_len, dtype=torch.int64, device=chooser.step.device),
            alt_k=tuple(min(p.return_k_alternatives, k) for p in chooser.params) if k else (),
            max_alternatives=k,
            expanded=expanded,
            stateful=stateful,
            general=general,
        )


def plan_for(chooser: NextTokenChooser, q_len: int) -> VerifyPlan:
    plans = chooser.__dict__.setdefault(_PLANS, {})
    plan = plans.get(q_len)
    if plan is None:
        plan = plans[q_len] = VerifyPlan.build(chooser, q_len)
    return plan


@dataclass
class Scores:
    """Device results: targets [B, Q] int64, logprobs [B, Q] float32, alternatives [B, Q, K] or None."""

    targets: torch.Tensor
    logprobs: torch.Tensor
    alt_ids: torch.Tensor | None
    alt_logprobs: torch.Tensor | None
    alt_k: tuple[int, ...]


def score(chooser: NextTokenChooser, logits: torch.Tensor, drafts: torch.Tensor) -> Scores | None:
    """The general path's numbers, or None where the general path must run: a batch with a grammar
    (it decides how masks follow drafts), or with penalties/watermark and typical-p rows (see
    VerifyPlan.build). logits [B, Q, V], drafts [B, Q-1] int64. No host sync."""
    if chooser.grammar is not None:
        return None
    num_rows, q_len, vocab = logits.shape
    plan = plan_for(chooser, q_len)
    if plan.general:
        return None
    flat = logits.to(torch.float32).reshape(num_rows * q_len, vocab)  # one copy if a strided view
    if plan.expanded is None:  # what `choose` computes for greedy rows without state
        next_ids = flat.argmax(dim=-1)
        logp = flat.log_softmax(dim=-1)
        logprobs = logp.gather(1, next_ids[:, None])[:, 0]
        alt_logprobs = alt_ids = None
        if plan.max_alternatives:
            alt_logprobs, alt_ids = logp.topk(plan.max_alternatives, dim=-1)
    else:
        out = _choose_expanded(chooser, plan, flat, drafts)
        next_ids, logprobs, alt_ids, alt_logprobs = out.next_ids, out.logprobs, out.alt_ids, out.alt_logprobs
    out = Scores(next_ids.view(num_rows, q_len), logprobs.view(num_rows, q_len), None, None, ())
    if alt_ids is not None and alt_logprobs is not None:
        k = alt_ids.shape[1]
        out.alt_ids = alt_ids.view(num_rows, q_len, k)
        out.alt_logprobs = alt_logprobs.view(num_rows, q_len, k)
        out.alt_k = plan.alt_k
    return out


def _choose_expanded(chooser: NextTokenChooser, plan: VerifyPlan, flat: torch.Tensor, drafts: torch.Tensor):
    ex = plan.expanded
    num_rows, q_len = chooser.step.shape[0], plan.q_len
    ex.step = (chooser.step[:, None] + plan.offsets).view(-1)
    if not plan.stateful:
        return ex.choose(flat)
    vocab = chooser.vocab_size
    if chooser.counts is not None or chooser.seen is not None:
        # history[b, i, v] = how often v occurs in drafts[b, :i] (< Q: a byte holds it)
        small = torch.uint8 if q_len <= 255 else torch.int32
        history = torch.zeros(num_rows, q_len, vocab, dtype=small, device=flat.device)
        if q_len > 1:
            history[:, 1:].scatter_(2, drafts[:, :, None], 1)
            history = history.cumsum(1, dtype=small)
        if chooser.counts is not None:  # int32 + uint8: int32
            ex.counts = (chooser.counts[:, None, :] + history).view(num_rows * q_len, vocab)
        if chooser.seen is not None:
            ex.seen = (chooser.seen[:, None, :] | (history > 0)).view(num_rows * q_len, vocab)
    if chooser.flags.any_watermark:  # the only reader of prev_ids
        ex.prev_ids = torch.cat([chooser.prev_ids[:, None], drafts], dim=1).view(-1)
    try:
        return ex.choose(flat)
    finally:  # the plan outlives the step: drop its [B*Q, V] state now
        ex.counts = ex.seen = None


def to_host(sample, num_drafts: Sequence[int]) -> tuple[list[int], list, list, list]:
    """A VerifySample's ONE device -> host transfer -> (accepted drafts per row, and the emitted tokens'
    ids, logprobs and alternatives per row)."""
    num_rows, q = sample.targets.shape
    parts = [sample.targets, sample.match, sample.logprobs]  # [B, Q + Q-1 + Q], float64 once packed
    k_max = 0
    if sample.alt_ids is not None and sample.alt_logprobs is not None:
        k_max = sample.alt_ids.shape[2]
        parts += [sample.alt_ids.flatten(1), sample.alt_logprobs.flatten(1)]
    width = sum(p.shape[1] for p in parts)
    out = torch.empty(num_rows, width, dtype=torch.float64, device=sample.targets.device)
    packed = torch.cat(parts, dim=1, out=out)  # each part cast straight to float64: ids stay exact
    if packed.is_cuda:
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
    else:
        host = packed
    runs = host[:, q : 2 * q - 1].cumprod(1).sum(1).to(torch.int64).tolist()  # leading matches (host)
    accepted = list(map(min, num_drafts, runs))
    ints = host[:, :q].to(torch.int64).tolist()
    floats = host[:, 2 * q - 1 : 3 * q - 1].tolist()
    ids = [r[: a + 1] for r, a in zip(ints, accepted, strict=True)]
    logprobs = [r[: a + 1] for r, a in zip(floats, accepted, strict=True)]
    if not k_max:  # no alternatives: one empty list per token (read-only, shared within a row)
        return accepted, ids, logprobs, [[[]] * (a + 1) for a in accepted]
    base = 3 * q - 1
    alt_ids = host[:, base : base + q * k_max].to(torch.int64).view(num_rows, q, k_max).tolist()
    alt_lps = host[:, base + q * k_max :].reshape(num_rows, q, k_max).tolist()
    alts = []
    for a, k, ai, al in zip(accepted, sample.alt_k or [0] * num_rows, alt_ids, alt_lps, strict=True):
        if not k:
            alts.append([[]] * (a + 1))
        elif k == k_max:
            alts.append([list(zip(ai[i], al[i], strict=True)) for i in range(a + 1)])
        else:
            alts.append([list(zip(ai[i][:k], al[i][:k], strict=True)) for i in range(a + 1)])
    return accepted, ids, logprobs, alts
