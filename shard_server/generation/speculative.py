"""Speculative acceptance: the target token of every verified position, on the device, one host sync.

A verify step feeds each row its next input token plus up to k draft tokens (deterministic drafts:
n-gram lookup or Medusa argmax) and yields logits at Q = k + 1 positions. Position i of row b is
scored exactly as non-speculative decoding would score the token after `drafts[b, :i]`:

    for i in 0..Q-1:
        state_i = chooser state + drafts[b, :i] as generated tokens   (penalty counts, seen, watermark
                                                                        previous token)
        target[b, i] = choose(process(logits[b, i], state_i), step = step_b + i, seed_b)
    accepted[b] = the longest prefix with drafts[b, i] == target[b, i]
    emitted[b]  = target[b, 0 .. accepted[b]]          (accepted drafts, then one more token)

Why this is exact. Greedy rows: target[b, i] is the argmax non-speculative decoding computes at that
step given the same history, so the emitted tokens are its tokens. Sampled rows: the chooser draws
with Gumbel-max noise keyed by (seed, step, token id), so target[b, i] *is* the token non-speculative
decoding draws at step + i given that history: the emitted tokens are, seed for seed, the tokens of
non-speculative decoding, and so they follow the target distribution. This is standard speculative
rejection sampling for a point-mass draft q = delta(d): P(accept d) = P(target = d) = p(d) =
min(1, p(d) / q(d)), and on rejection the token is target | target != d, distributed as
norm(max(0, p - q)) (p with d removed, renormalised). Penalties, warpers, watermark and seed are the
request's own, applied per position with the right history.

Rows with a JSON schema: position i is scored under the grammar's mask after the row's first i drafts
(`DraftMasks`, grammar_drafts.py), as one-token decoding masks the token after that history, so the
argument above holds for them too; a draft the grammar refuses is never accepted.

The chooser is never mutated here: `choose_positions` scores on copies of its [B, V] state, and
`advance_chooser` records the emitted tokens once the step is committed (the grammars consume them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shard_server.generation import verify_fast
from shard_server.generation.grammar_drafts import DraftMasks
from shard_server.generation.sampling import HostSample, NextTokenChooser


@dataclass
class HostTokens:
    """Host results of a step with several tokens per row: ids[b], logprobs[b], alternatives[b][j]."""

    ids: list[list[int]]
    logprobs: list[list[float]]
    alternatives: list[list[list[tuple[int, float]]]]

    @classmethod
    def of(cls, host: HostSample) -> HostTokens:
        """One token per row (a plain decode or prefill step)."""
        return cls(
            [[t] for t in host.next_ids], [[lp] for lp in host.logprobs], [[a] for a in host.alternatives]
        )


@dataclass
class VerifySample:
    """Device results of scoring Q positions per row: targets [B, Q] int64, logprobs [B, Q] float32,
    alt_ids / alt_logprobs [B, Q, K] or None, match [B, Q-1] bool (draft i == target i)."""

    targets: torch.Tensor
    logprobs: torch.Tensor
    match: torch.Tensor
    alt_ids: torch.Tensor | None = None
    alt_logprobs: torch.Tensor | None = None
    alt_k: tuple[int, ...] = ()

    def to_host(self, num_drafts: Sequence[int]) -> tuple[list[int], HostTokens]:
        """ONE device->host transfer -> (accepted drafts per row, the emitted tokens per row).

        `num_drafts[b]` drafts were proposed for row b (positions past it are padding)."""
        accepted, ids, logprobs, alts = verify_fast.to_host(self, num_drafts)
        return accepted, HostTokens(ids, logprobs, alts)


def choose_positions(
    chooser: NextTokenChooser, logits: torch.Tensor, drafts: torch.Tensor, masks: DraftMasks | None = None,
    fast: bool = True,
) -> VerifySample:
    """Target token at each of the Q positions of every row. logits [B, Q, V]; drafts [B, Q-1] int64
    (the tokens fed at positions 1..Q-1; padding past a row's drafts is scored but never accepted,
    since acceptance stops at the row's draft count); `masks`: the grammar masks of every position,
    required when the chooser has constrained rows. No host sync. `fast`: the same numbers in one pass
    with few host ops (verify_fast.py) where it applies (no grammar); False forces the general path."""
    num_rows, q_len, vocab = logits.shape
    if (chooser.grammar is None) != (masks is None):
        raise ValueError("grammar masks of every position are needed for constrained rows, and only then")
    if fast and masks is None:
        s = verify_fast.score(chooser, logits, drafts)
        if s is not None:
            return VerifySample(s.targets, s.logprobs, s.targets[:, :-1] == drafts, s.alt_ids,
                                s.alt_logprobs, s.alt_k)  # fmt: skip
    if chooser.counts is None and chooser.seen is None and not chooser.flags.any_watermark:
        return _choose_stateless(chooser, logits, drafts, masks)
    rows = torch.arange(num_rows, device=logits.device)
    counts = chooser.counts.clone() if chooser.counts is not None else None
    seen = chooser.seen.clone() if chooser.seen is not None else None
    prev = chooser.prev_ids
    outs = []
    for i in range(q_len):
        grammar = masks.at(i, vocab, logits.device) if masks is not None else None
        state = dataclasses.replace(
            chooser, counts=counts, seen=seen, prev_ids=prev, step=chooser.step + i, grammar=grammar
        )
        outs.append(state.choose(logits[:, i]))
        if i + 1 < q_len:  # position i + 1 sees draft i as its latest generated token
            d = drafts[:, i]
            if counts is not None:
                counts[rows, d] += 1
            if seen is not None:
                seen[rows, d] = True
            prev = d
    targets = torch.stack([o.next_ids for o in outs], dim=1)  # [B, Q]
    sample = VerifySample(
        targets=targets,
        logprobs=torch.stack([o.logprobs for o in outs], dim=1),
        match=targets[:, :-1] == drafts,
    )
    if outs[0].alt_ids is not None:
        sample.alt_ids = torch.stack([o.alt_ids for o in outs], dim=1)
        sample.alt_logprobs = torch.stack([o.alt_logprobs for o in outs], dim=1)
        sample.alt_k = outs[0].alt_k
    return sample


def _choose_stateless(
    chooser: NextTokenChooser, logits: torch.Tensor, drafts: torch.Tensor, masks: DraftMasks | None
) -> VerifySample:
    """No penalties and no watermark: position i depends on the history only through the step counter
    of the noise (and, for constrained rows, its grammar mask), so all B x Q positions are scored in one
    pass of a chooser whose rows repeat each request's parameters Q times with steps step .. step + Q - 1
    (row-wise ops: the same numbers)."""
    num_rows, q_len, vocab = logits.shape
    unmasked = dataclasses.replace(chooser, grammar=None)
    expanded = unmasked.filter([b for b in range(num_rows) for _ in range(q_len)])
    expanded.step = expanded.step + torch.arange(q_len, device=logits.device).repeat(num_rows)
    if masks is not None:
        expanded.grammar = masks.expanded(vocab, logits.device)
    out = expanded.choose(logits.reshape(num_rows * q_len, vocab))
    targets = out.next_ids.view(num_rows, q_len)
    logprobs = out.logprobs.view(num_rows, q_len)
    sample = VerifySample(targets=targets, logprobs=logprobs, match=targets[:, :-1] == drafts)
    if out.alt_ids is not None and out.alt_logprobs is not None:
        k = out.alt_ids.shape[1]
        sample.alt_ids = out.alt_ids.view(num_rows, q_len, k)
        sample.alt_logprobs = out.alt_logprobs.view(num_rows, q_len, k)
        sample.alt_k = tuple(min(p.return_k_alternatives, k) for p in chooser.params)
    return sample


def advance_chooser(
    chooser: NextTokenChooser,
    targets: torch.Tensor,
    emitted: torch.Tensor,
    host_ids: Sequence[Sequence[int]] | None = None,
) -> None:
    """Record the first emitted[b] tokens of targets[b] (device [B, Q] and [B] int64) as generated, in
    place: what `update` does once per token, for several tokens per row. `host_ids[b]`: the same
    tokens as host ints, which the grammars of constrained rows consume (required when there are some)."""
    if chooser.grammar is not None:
        if host_ids is None:
            raise ValueError("constrained rows need the emitted tokens on the host")
        chooser.grammar.consume_many(host_ids)
    q_len = targets.shape[1]
    if chooser.counts is not None or chooser.seen is not None:
        keep = torch.arange(q_len, device=targets.device)[None, :] < emitted[:, None]  # [B, Q]
    if chooser.counts is not None:  # integer adds: duplicate tokens in a row simply add up
        chooser.counts.scatter_add_(1, targets, keep.to(chooser.counts.dtype))
    if chooser.seen is not None:
        # Positions past a row's count write to its first target instead, the value that entry ends
        # with: all writes to one entry agree, so duplicate indices need no resolving.
        first = targets[:, :1]
        first_ends = keep[:, :1] | chooser.seen.gather(1, first)  # [B, 1]
        chooser.seen.scatter_(1, torch.where(keep, targets, first), keep | first_ends)
    last = targets.gather(1, (emitted - 1).clamp(min=0)[:, None])[:, 0]
    chooser.prev_ids.copy_(last)
    chooser.step += emitted
