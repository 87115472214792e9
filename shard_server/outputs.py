"""One step's host results -> GenerationOut per request (stopping, detokenization, prompt logprobs)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from shard_server.batch import Batch, RequestState
from shard_server.detokenize import token_texts
from shard_server.sampling import HostSample, prompt_logprobs
from shard_server.types import AlternativeTokensOut, GenerationOut, TokensOut


def emit_step(
    batch: Batch,
    host: HostSample,
    prefill_logits: Sequence[torch.Tensor | None] | None,
    tokenizer,
    special_ids: frozenset[int],
) -> list[GenerationOut]:
    """Push each request's new token through its tracker; a Generation for each request this rank owns.

    `prefill_logits` (prefill only): per request, the logits of every prompt position when it asked for
    prefill_logprobs, else None. Every tracker is advanced, owned or not, so all ranks agree on which
    requests finished.
    """
    seeds = batch.chooser.seeds_for_report()
    out: list[GenerationOut] = []
    for i, r in enumerate(batch.requests):
        alts = host.alternatives[i]
        step = r.tracker.push(host.next_ids[i], [a for a, _ in alts])
        if not r.emits:
            continue
        next_tokens = TokensOut(
            ids=(step.token_id,),
            logprobs=(host.logprobs[i],),
            texts=(step.text,),
            is_special=(step.is_special,),
            alternatives=(
                (
                    AlternativeTokensOut(
                        ids=tuple(a for a, _ in alts),
                        logprobs=tuple(lp for _, lp in alts),
                        texts=step.alternative_texts,
                    ),
                )
                if r.sampling.return_k_alternatives > 0
                else ()
            ),
        )
        prefill = None
        if prefill_logits is not None and prefill_logits[i] is not None:
            prefill = _prefill_tokens(r, prefill_logits[i], tokenizer, special_ids)
        out.append(
            GenerationOut(
                request_id=r.id,
                next_tokens=next_tokens,
                prefill_tokens=prefill,
                prefill_tokens_length=len(r.prompt_ids) if prefill_logits is not None else 0,
                generated_text=(
                    r.tracker.generated_text(seeds[i]) if step.finish_reason is not None else None
                ),
            )
        )
    return out


def _prefill_tokens(r: RequestState, logits: torch.Tensor, tokenizer, special_ids) -> TokensOut:
    """Every prompt id with the logprob the model gave it (NaN for the first) and its text."""
    ids = torch.tensor(r.prompt_ids, device=logits.device)
    lps = prompt_logprobs(logits, ids).cpu().tolist()
    lps[0] = math.nan
    return TokensOut(
        ids=tuple(r.prompt_ids),
        logprobs=tuple(lps),
        texts=tuple(token_texts(tokenizer, r.prompt_ids)),
        is_special=tuple(t in special_ids for t in r.prompt_ids),
    )
