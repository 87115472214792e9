"""Speculative decode steps: draft, verify in one forward, accept, commit.

    compute(batch):   drafts per row (Medusa heads of the row's adapter or of the base model when its
                      previous step left some, else n-gram lookup), capped by `drafts.draft_budget`
                      -> tokens [B, Q] = [next input, drafts..., padding], Q = 1 + max drafts
                      -> executor.verify.verify_forward: logits at all B * Q positions
                      -> generation.speculative.choose_positions: target token of every position
                      -> one host sync: accepted drafts per row and the emitted tokens
    commit(batch):    chooser state, positions and lengths advance by the emitted count of each row;
                      Medusa rows compute their next drafts from the hidden state of their last kept
                      position; stopping cuts the emitted tokens where one-token steps would stop.
    look_ahead(batch): with the decode overlap, the next step's verify forward, enqueued between the two
                      (lookahead.py); `compute` of the next Decode takes it as `found`.

`compute` returns None when no row has anything to verify (no n-gram match, no Medusa heads): the
engine then runs its plain decode step (CUDA graphs included). Rows with a JSON schema take part: each
position is scored under the grammar's mask after the row's drafts before it, drafts the grammar
refuses are never accepted, and the grammar consumes exactly the emitted tokens at commit
(generation/grammar_drafts.py); rows without a schema keep their full drafts. Every rank drafts from
the same host tokens (or the same replicated Medusa weights on the same all-reduced hidden states) and
scores with the same logits, seeds and masks, so all ranks accept the same tokens without any exchange.

KV: a row writes its next 1 + drafts positions; rejected positions are not undone, their slots are
written again by the next step (they lie inside the request's own blocks, see drafts.py). With a
sliding window ring of ceil(W / bs) + 1 blocks, writes up to bs positions ahead never overwrite a key
the step's queries still need, hence k <= block size there (checked at start-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.adapters.medusa import MedusaHeads
from shard_server.engine.speculative.drafts import NgramIndex, draft_budget
from shard_server.engine.speculative.lookahead import Precomputed, SpecLookahead, look_ahead
from shard_server.executor.verify import VerifyGraphs, verify_forward
from shard_server.generation.grammar_drafts import DraftMasks
from shard_server.generation.speculative import (
    HostTokens,
    VerifySample,
    advance_chooser,
    choose_positions,
)

BASE_MEDUSA_DIR = "medusa"  # MODEL_DIR/medusa: the base model's heads, in the Medusa/LoRAX format


@dataclass
class RequestDrafts:
    """Per-request drafting state (RequestState.drafts)."""

    ngram: NgramIndex = field(default_factory=NgramIndex)
    medusa: torch.Tensor | None = None  # [heads] int64 on the device: Medusa's drafts for the next step


@dataclass
class SpecStep:
    """A computed verify step, not yet applied to the batch."""

    sample: VerifySample
    accepted: list[int]  # drafts accepted per row
    host: HostTokens  # the emitted tokens per row (accepted drafts, then one more)
    hidden: torch.Tensor  # [B, Q, H]: final hidden states (Medusa heads read the last kept one)
    medusa_rows: list[int]  # rows whose next drafts come from Medusa heads


class Speculator:
    def __init__(self, k: int, runner, medusa: MedusaStore | None = None):
        self.k = k
        self.runner = runner
        self.medusa = medusa if medusa is not None else MedusaStore(runner.model if runner else None)
        # CUDA with graphs on: verify steps replay the graphs Warmup captured (executor/verify.py)
        self.graphs: VerifyGraphs | None = getattr(runner, "verify_graphs", None)
        self.steps = 0  # verify steps run (tests, metrics)
        self.drafted = 0  # draft tokens verified
        self.accepted = 0  # draft tokens accepted (before stopping cut them)
        self.medusa_drafted = 0  # of `drafted`, those that came from Medusa heads
        self.grammar_refused = 0  # of `drafted`, those a row's grammar refused (never accepted)
        self.lookahead_steps = 0  # verify steps whose forward a previous Decode enqueued (overlap)
        self.lookahead_rows_used = 0  # rows of those steps that came precomputed

    def compute(self, batch, found: Sequence[object] = ()) -> SpecStep | None:
        """Draft and verify; reads the batch and writes only uncommitted KV slots (safe to retry).
        `found`: the batch's lookaheads; rows that a `SpecLookahead` holds at their current KV length
        take its drafts and logits, the others (rows that joined since) are verified here with as
        many positions (module docstring of lookahead.py: the same matching for plain steps)."""
        pre = Precomputed.of(batch, [la for la in found if isinstance(la, SpecLookahead)], self.medusa)
        dev = batch.input_ids.device
        bs = self.runner.block_size
        drafts: list[list[int]] = []
        medusa_rows, medusa_next = [], []
        for b, r in enumerate(batch.requests):
            if r.drafts is None:
                r.drafts = RequestDrafts()
            if pre is not None and b in pre.drafts:
                drafts.append(pre.drafts[b])
                continue
            budget = draft_budget(
                self.k, r.max_new_tokens, len(r.tracker.generated_ids), r.length, len(r.block_table) * bs
            )
            heads = self.medusa.heads_for(r.adapter_index) if self.medusa else None
            if heads is not None:
                medusa_rows.append(b)
                if r.drafts.medusa is not None:
                    n = min(budget, r.drafts.medusa.shape[0])
                    medusa_next.append((b, n))
                    drafts.append([0] * n)  # placeholders: the device tensor fills them in
                    continue
            drafts.append(self.ngram_drafts(r, budget) if budget > 0 else [])
        num = [len(d) for d in drafts]
        q_len = 1 + max(num, default=0)  # precomputed rows: their Q is never above it
        if q_len == 1 and not medusa_rows:
            return None
        padded = torch.tensor([d + [0] * (q_len - 1 - len(d)) for d in drafts], dtype=torch.int64)
        draft_ids = padded.to(dev, non_blocking=True).view(len(drafts), q_len - 1)  # [B, Q-1]
        for b, n in medusa_next:
            if n:
                draft_ids[b, :n] = batch.requests[b].drafts.medusa[:n]
                self.medusa_drafted += n
        tokens = torch.cat([batch.input_ids[:, None], draft_ids], dim=1)  # [B, Q]
        n_valid = torch.tensor([1 + n for n in num], dtype=torch.int64).to(dev, non_blocking=True)
        masks = None
        if batch.chooser.grammar is not None:  # filled on the mask worker while the device verifies
            masks = grammar_masks(batch.chooser.grammar, drafts, draft_ids, medusa_next, q_len)
        if pre is None:
            logits, hidden = verify_forward(self.runner, batch, tokens, n_valid, self.graphs)
        else:
            logits, hidden = pre.logits_for(batch, tokens, n_valid, self), None
            self.lookahead_steps += 1
            self.lookahead_rows_used += len(pre.drafts)
        return self._score(batch, drafts, draft_ids, logits, hidden, medusa_rows, masks)

    def _score(self, batch, drafts, draft_ids, logits, hidden, medusa_rows, masks=None) -> SpecStep:
        """The target token of every position, accepted drafts, one host sync."""
        num = [len(d) for d in drafts]
        sample = choose_positions(batch.chooser, logits, draft_ids, masks)
        allowed = num if masks is None else masks.allowed_drafts(num)  # refused drafts: never accepted
        accepted, host = sample.to_host(allowed)  # the step's one device -> host sync
        self.steps += 1
        self.drafted += sum(num)
        self.accepted += sum(accepted)
        self.grammar_refused += sum(num) - sum(allowed)
        return SpecStep(sample, accepted, host, hidden, medusa_rows)

    def ngram_drafts(self, r, budget: int, ahead: Sequence[int] = ()) -> list[int]:
        """Up to `budget` drafts for request `r` from its own prompt and output (prompt lookup), the
        output continued by `ahead` (tokens this step emits, not yet recorded as generated)."""
        generated = r.tracker.generated_ids
        r.drafts.ngram.sync(r.prompt_ids, [*generated, *ahead] if ahead else generated)
        return r.drafts.ngram.propose(budget)

    def look_ahead(self, batch, step: SpecStep) -> SpecLookahead | None:
        """The next step's verify forward, enqueued now (lookahead.look_ahead)."""
        return look_ahead(self, batch, step)

    def commit(self, batch, step: SpecStep) -> None:
        """Apply a computed step to the batch's device state and per-request draft state (the engine
        then emits the tokens; stopping may keep fewer than were accepted, which is harmless: those
        requests finish)."""
        dev = batch.input_ids.device
        emitted = [a + 1 for a in step.accepted]
        emitted_dev = torch.tensor(emitted, dtype=torch.int64).to(dev, non_blocking=True)
        advance_chooser(batch.chooser, step.sample.targets, emitted_dev, step.host.ids)
        last = step.sample.targets.gather(1, (emitted_dev - 1)[:, None])[:, 0]
        batch.advance_many(last, emitted_dev, emitted)
        if step.medusa_rows:
            rows = torch.tensor(step.medusa_rows, dtype=torch.int64, device=dev)
            kept = step.hidden[rows, emitted_dev[rows] - 1]  # [M, H]: hidden of each row's last kept token
            nxt = self.medusa.propose([batch.requests[b].adapter_index for b in step.medusa_rows], kept)
            for j, b in enumerate(step.medusa_rows):
                batch.requests[b].drafts.medusa = nxt[j]

    def totals(self) -> dict[str, int]:
        """The counters EngineStats reports (metrics)."""
        return {"spec_steps": self.steps, "spec_lookahead_steps": self.lookahead_steps,
                "spec_drafted": self.drafted, "spec_accepted": self.accepted}  # fmt: skip

    def stats(self) -> dict[str, float]:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted, "acceptance": rate,
                "medusa_drafted": self.medusa_drafted, "grammar_refused": self.grammar_refused}  # fmt: skip


def grammar_masks(grammar, drafts: list[list[int]], draft_ids: torch.Tensor, medusa_next, q_len: int):
    """Start the step's grammar masks (generation/grammar_drafts.py) for the constrained rows, whose
    host drafts are `drafts[b]`, except Medusa rows (`medusa_next`: (row, n)), whose n drafts are in
    `draft_ids` on the device: copied to the host behind an event that the mask worker waits for."""
    lists = [drafts[b] for b in grammar.rows]
    at = {b: r for r, b in enumerate(grammar.rows)}
    from_device = [(at[b], b, n) for b, n in medusa_next if n and b in at]
    if not from_device:
        return DraftMasks(grammar, lambda: lists, q_len)
    if not draft_ids.is_cuda:
        values = draft_ids.tolist()
        for r, b, n in from_device:
            lists[r] = values[b][:n]
        return DraftMasks(grammar, lambda: lists, q_len)
    host = torch.empty(draft_ids.shape, dtype=draft_ids.dtype, pin_memory=True)
    host.copy_(draft_ids, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()  # before the verify forward is enqueued: waiting for it never waits for that

    def resolve() -> list[list[int]]:
        copied.synchronize()
        values = host.tolist()
        for r, b, n in from_device:
            lists[r] = values[b][:n]
        return lists

    return DraftMasks(grammar, resolve, q_len)


class MedusaStore:
    """Medusa heads by adapter index: an adapter's own heads, else the base model's, else None (n-gram).
    Heads are replicated on every tensor-parallel rank (their inputs, the final hidden states, are)."""

    def __init__(self, model, base: MedusaHeads | None = None):
        self.model = model
        self.base = base
        self.by_adapter: dict[int, MedusaHeads] = {}

    def __bool__(self) -> bool:
        return self.base is not None or bool(self.by_adapter)

    def heads_for(self, adapter_index: int) -> MedusaHeads | None:
        return self.by_adapter.get(adapter_index, self.base)

    def read(self, directory: Path) -> MedusaHeads | None:
        cfg = self.model.config
        return MedusaHeads.load(directory, cfg.hidden_size, cfg.vocab_size, dtype=self.model.dtype,
                                device=self.model.device)  # fmt: skip

    def propose(self, adapter_indices: list[int], hidden: torch.Tensor) -> list[torch.Tensor]:
        """hidden [M, H] of M rows -> each row's drafts [heads of its adapter] (device)."""
        groups: dict[int, tuple[MedusaHeads, list[int]]] = {}
        for j, a in enumerate(adapter_indices):
            heads = self.heads_for(a)
            groups.setdefault(id(heads), (heads, []))[1].append(j)
        out: list[torch.Tensor] = [None] * len(adapter_indices)  # type: ignore[list-item]
        for heads, rows in groups.values():
            idx = torch.tensor(rows, dtype=torch.int64, device=hidden.device)
            drafts = heads.draft(hidden.index_select(0, idx), self.model.lm_head)  # [m, heads]
            for i, j in enumerate(rows):
                out[j] = drafts[i]
        return out


def build(engine) -> Speculator:
    """The engine's speculator for `config.speculative_tokens` drafts per step (> 0), with the base
    model's Medusa heads when MODEL_DIR/medusa holds some."""
    k = engine.config.speculative_tokens
    window, bs = engine.model_config.sliding_window, engine.model.block_size
    if window is not None and k > bs:
        raise ValueError(
            f"speculative_tokens {k} exceeds the KV block size {bs}: with a sliding window a sequence "
            "keeps a ring of ceil(W / block_size) + 1 blocks, and writing drafts further ahead would "
            "overwrite keys the step still reads"
        )
    medusa = MedusaStore(engine.model)
    base_dir = Path(engine.config.model_dir) / BASE_MEDUSA_DIR
    if base_dir.is_dir():
        medusa.base = medusa.read(base_dir)
    speculator = Speculator(k, engine.runner, medusa)
    for index, spec in engine.adapters.preloaded_adapters():
        heads = adapter_heads(speculator, engine.adapters, spec)
        if heads is not None:
            medusa.by_adapter[index] = heads
    return speculator


def adapter_heads(speculator: Speculator | None, adapters, spec) -> MedusaHeads | None:
    """Medusa heads that a LOCAL single adapter's directory carries (read before the adapter loads, so
    bad files refuse the LoadAdapter); None without speculation, for other sources, merged adapters."""
    if speculator is None or spec.source != "local" or len(spec.adapter_ids) != 1:
        return None
    directory = adapters.sources.resolve(spec.adapter_ids[0], spec.source, spec.api_token)
    return speculator.medusa.read(directory)
