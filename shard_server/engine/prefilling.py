"""Prefill steps: KV allocation for new requests, chunk planning, the forward, and the commit.

A step computes, in one varlen forward, the first chunk of new requests and the next chunk of pending
ones (`PendingPrefill`). Chunk semantics (also what LoRAX/TGI shards do):

- `chunk_len` on a new request: prompt tokens (from `cache_len` on) its first Prefill computes; unset:
  the whole rest of the prompt. The request produces no Generation until its last chunk is computed;
  meanwhile it is listed in the returned CachedBatch.
- Later chunks are sized by the shard: every later forward of a batch holding pending prefills (Decode
  of it, or Prefill with it as `cached_batch`) computes the next chunk of each, oldest first, within
  Warmup's `max_prefill_tokens` less the other tokens of that step (at least one token each).
  `CachedBatch.current_tokens` counts the planned chunks, as a router's token budget expects.

`compute` only reads state (plus KV writes a retry rewrites identically); `commit` applies a step
once everything that can fail has run, so a failed call leaves every cached batch as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from model.forward_batch import pad_block_tables
from shard_server.engine import admission
from shard_server.engine.batch import Batch, PendingPrefill, RequestState, grouped_order
from shard_server.engine.outputs import chunk_prompt_logprobs
from shard_server.executor.runner import ModelRunner, PrefillOutput, PrefillSeq
from shard_server.generation.grammar_masks import GrammarRows
from shard_server.generation.sampling import HostSample, NextTokenChooser, SampleOutput


class PrefillHost(Protocol):
    """What a prefill step needs of the engine (ShardEngine provides it; no import back to it)."""

    model_config: Any  # .vocab_size
    adapters: Any  # AdapterStore
    blocks: Any  # BlockManager or the router-allocation bookkeeping
    runner: ModelRunner  # builds and runs the step's ForwardBatch; .block_size
    tokenizer: Any
    eos_ids: Any
    special_ids: Any
    device: torch.device
    computed_prefill_tokens: int

    def next_seq_id(self) -> int: ...

    def emits(self, request_id: int) -> bool: ...

    def emit(self, batch: Batch, host: HostSample, first_token: bool) -> tuple[list, Batch | None]: ...


@dataclass
class PrefillCompute:
    """One step's forward results, not yet applied."""

    items: list[tuple[PendingPrefill, int]]  # (request, tokens computed this step), forward order
    out: PrefillOutput
    finishing: list[int]  # indices into items whose prompt is complete after this step
    chooser: NextTokenChooser | None  # for the finishing ones
    sample: SampleOutput | None
    host: HostSample | None
    chunk_logprobs: list[list[float] | None]  # per item: prompt logprobs of this chunk


def plan_chunks(pending: Sequence[PendingPrefill], budget: int) -> list[int]:
    """Next chunk of each pending prefill, oldest first, within `budget` tokens (>= 1 each)."""
    out = []
    for p in pending:
        n = min(p.remaining, max(budget, 1))
        budget -= n
        out.append(n)
    return out


def start_request(engine: PrefillHost, a: admission.Admitted, *, warmup: bool) -> PendingPrefill:
    """KV blocks for a new request (the shard's, or the router's as given) -> its pending prefill."""
    seq_id = engine.next_seq_id()
    prompt = list(a.ids)
    max_new = a.spec.stopping.max_new_tokens
    # Positions the generation writes (the last generated token is never fed back). Warmup runs a
    # single decode step, so it needs blocks for one position past the prompt, not the whole budget.
    decode_positions = min(max_new - 1, 1) if warmup else max_new - 1
    if a.router_blocks:
        bs = engine.runner.block_size
        table = list(a.spec.blocks[: -(-(len(prompt) + decode_positions) // bs)])
        cached, own = a.spec.cache_len, False
    else:
        reuse = not a.spec.prefill_logprobs  # a reused prefix has no logits to report
        key = (a.spec.adapter_index, engine.adapters.generation(a.spec.adapter_index))
        alloc = engine.blocks.allocate(
            seq_id, len(prompt), token_ids=prompt if reuse else None, cache_key=key
        )
        try:
            engine.blocks.append_slots(seq_id, decode_positions)
        except BaseException:
            engine.blocks.free(seq_id)
            raise
        table = engine.blocks.block_table(seq_id)
        cached, own = alloc.num_cached_tokens, True
    state = RequestState(
        id=a.spec.id,
        seq_id=seq_id,
        adapter_index=a.spec.adapter_index,
        prompt_ids=prompt,
        sampling=a.spec.sampling,
        max_new_tokens=max_new,
        tracker=admission.tracker(
            engine.tokenizer, prompt, a.spec.stopping, engine.eos_ids, engine.special_ids
        ),
        prefill_logprobs=a.spec.prefill_logprobs,
        emits=engine.emits(a.spec.id),
        length=cached,
        block_table=table,
        own_blocks=own,
        # Tokens 0..cached have no computed logits (the first token never has one).
        prompt_logprobs=[float("nan")] * (cached + 1) if a.spec.prefill_logprobs else None,
        grammar=a.grammar.start() if a.grammar is not None else None,
    )
    # A shard prefix-cache hit may shorten the prompt's rest below the asked chunk: never past the end.
    first = min(a.first_chunk, len(prompt) - cached) if own else a.first_chunk
    return PendingPrefill(state, next_chunk=first)


def compute(engine: PrefillHost, items: list[tuple[PendingPrefill, int]]) -> PrefillCompute:
    """Forward the chunks (grouped by adapter for few LoRA segments) and choose finishing first tokens."""
    order = grouped_order([p.request.adapter_index for p, _ in items])
    items = [items[i] for i in order]
    seqs = [
        PrefillSeq(
            ids=p.request.prompt_ids[: p.request.length + n],
            cached=p.request.length,
            block_table=p.request.block_table,  # a window ring repeats its blocks here
            all_logits=p.request.prompt_logprobs is not None,
            adapter_index=p.request.adapter_index,
        )
        for p, n in items
    ]
    out = engine.runner.prefill(seqs)
    chunk_lps: list[list[float] | None] = [
        None if lg is None else chunk_prompt_logprobs(lg, p.request.prompt_ids, p.request.length)
        for (p, _), lg in zip(items, out.all_logits, strict=True)
    ]
    finishing = [i for i, (p, n) in enumerate(items) if n == p.remaining]
    chooser = sample = host = None
    if finishing:
        reqs = [items[i][0].request for i in finishing]
        chooser = NextTokenChooser.from_params(
            [r.sampling for r in reqs], [r.prompt_ids for r in reqs], engine.model_config.vocab_size,
            engine.device,
            grammar=GrammarRows.of([r.grammar for r in reqs]),
        )
        idx = torch.tensor(finishing, dtype=torch.int64, device=engine.device)
        sample = chooser.choose(out.last_logits.index_select(0, idx))
        host = sample.to_host()  # the step's one device -> host sync
    return PrefillCompute(items, out, finishing, chooser, sample, host, chunk_lps)


def commit(engine: PrefillHost, batch_id: int, c: PrefillCompute) -> tuple[list, Batch | None, list]:
    """Apply a computed step -> (generations, batch of the requests that got their first token,
    pending prefills still unfinished)."""
    for (p, n), lps in zip(c.items, c.chunk_logprobs, strict=True):
        r = p.request
        if lps is not None:
            r.prompt_logprobs.extend(lps)
        r.length += n
        if r.own_blocks:
            engine.blocks.mark_computed(r.seq_id, r.length)  # full prompt blocks join the prefix cache
        engine.computed_prefill_tokens += n
    done = set(c.finishing)
    still = [p for i, (p, _) in enumerate(c.items) if i not in done]
    if not c.finishing:
        return [], None, still
    requests = [c.items[i][0].request for i in c.finishing]
    c.chooser.update(c.sample.next_ids, c.host.next_ids)
    batch = Batch(
        batch_id,
        requests,
        c.chooser,
        c.sample.next_ids.clone(),
        torch.tensor([r.length for r in requests], dtype=torch.int64, device=engine.device),
        pad_block_tables([r.block_table for r in requests], engine.device),
    )
    generations, rows = engine.emit(batch, c.host, first_token=True)
    return generations, rows, still
