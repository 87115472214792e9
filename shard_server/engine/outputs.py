"""One step's host results -> GenerationOut per request (stopping, detokenization, prompt logprobs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from shard_server.engine.batch import Batch, RequestState
from shard_server.generation.detokenize import token_texts
from shard_server.generation.sampling import HostSample
from shard_server.generation.speculative import HostTokens
from shard_server.types import AlternativeTokensOut, GenerationOut, TokensOut


def emit_step(
    batch: Batch,
    host: HostSample | HostTokens,
    first_token: bool,
    tokenizer,
    special_ids: frozenset[int],
) -> list[GenerationOut]:
    """Push each request's new token(s) through its tracker; a Generation for each request this rank owns.

    `host` holds one token per row, or several (a speculative verify step: accepted drafts, then one
    more): they are pushed in order and the rest is dropped as soon as one of them stops the request
    (EOS, stop sequence, max_new_tokens), exactly where one-token steps would have stopped. Tokens past
    the first of a step count as `skipped_tokens` (LoRAX's GeneratedText.skipped_tokens).
    `first_token`: the rows just finished their prompt (the Prefill generation, possibly after chunks):
    it reports `prefill_tokens_length` and, for prefill_logprobs requests, `prefill_tokens` from the
    logprobs gathered in `RequestState.prompt_logprobs`. Every tracker is advanced, owned or not, so all
    ranks agree on which requests finished.
    """
    rows = host if isinstance(host, HostTokens) else HostTokens.of(host)
    seeds = batch.chooser.seeds_for_report()
    out: list[GenerationOut] = []
    for i, r in enumerate(batch.requests):
        steps, alt_rows = [], []
        for token, alts in zip(rows.ids[i], rows.alternatives[i], strict=True):
            steps.append(r.tracker.push(token, [a for a, _ in alts]))
            alt_rows.append(alts)
            if steps[-1].finish_reason is not None:
                break
        r.skipped_tokens += len(steps) - 1
        if not r.emits:
            continue
        next_tokens = TokensOut(
            ids=tuple(s.token_id for s in steps),
            logprobs=tuple(rows.logprobs[i][: len(steps)]),
            texts=tuple(s.text for s in steps),
            is_special=tuple(s.is_special for s in steps),
            alternatives=(
                tuple(
                    AlternativeTokensOut(
                        ids=tuple(a for a, _ in alts),
                        logprobs=tuple(lp for _, lp in alts),
                        texts=s.alternative_texts,
                    )
                    for s, alts in zip(steps, alt_rows, strict=True)
                )
                if r.sampling.return_k_alternatives > 0
                else ()
            ),
        )
        prefill = None
        if first_token and r.prompt_logprobs is not None:
            prefill = _prefill_tokens(r, tokenizer, special_ids)
        finish = steps[-1].finish_reason
        out.append(
            GenerationOut(
                request_id=r.id,
                next_tokens=next_tokens,
                prefill_tokens=prefill,
                prefill_tokens_length=len(r.prompt_ids) if first_token else 0,
                generated_text=(
                    replace(r.tracker.generated_text(seeds[i]), skipped_tokens=r.skipped_tokens)
                    if finish is not None
                    else None
                ),
                adapter_index=r.adapter_index,
            )
        )
    return out


def _prefill_tokens(r: RequestState, tokenizer, special_ids) -> TokensOut:
    """Every prompt id with the logprob the model gave it and its text (NaN: the first token, and
    tokens whose logits were never computed because a router's prefix cache held them)."""
    return TokensOut(
        ids=tuple(r.prompt_ids),
        logprobs=tuple(r.prompt_logprobs),
        texts=tuple(token_texts(tokenizer, r.prompt_ids)),
        is_special=tuple(t in special_ids for t in r.prompt_ids),
    )


def chunk_prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], start: int) -> list[float]:
    """Logprobs of prompt tokens start+1 .. start+n (those that exist) from the raw logits [n, V] of
    positions start .. start+n-1: position p's logits score token p+1. One host transfer."""
    targets = list(prompt[start + 1 : start + 1 + logits.shape[0]])
    if not targets:
        return []
    idx = torch.tensor(targets, dtype=torch.int64, device=logits.device)
    logp = logits[: len(targets)].to(torch.float32).log_softmax(dim=-1)  # [n', V]
    return logp.gather(1, idx[:, None])[:, 0].cpu().tolist()
