"""A randomised router for engine-level tests: what a real router does between steps, at random.

New batches (some chunked, with adapters, stop sequences, seeds), Prefill into a running batch, Decode
of several batches at once (concatenation), FilterBatch of cancelled requests, ClearCache of a batch.
The schedule depends only on the seed, so two engines given the same seed see the same calls.
"""

from __future__ import annotations

import random

from shard_server.engine.engine import ShardEngine
from shard_server.types import BatchSpec, RequestSpec, SamplingParams, StoppingParams

VOCAB = 512


def random_request(rng: random.Random, rid: int, n_adapters: int) -> RequestSpec:
    n = rng.randrange(3, 30)
    sampled = rng.random() < 0.5
    return RequestSpec(
        id=rid,
        input_ids=tuple(rng.randrange(3, VOCAB) for _ in range(n)),
        adapter_index=rng.randrange(0, n_adapters + 1),
        sampling=SamplingParams(
            do_sample=sampled, seed=rng.randrange(1 << 32), temperature=0.9 if sampled else 1.0,
            top_k=rng.choice([0, 20]), repetition_penalty=rng.choice([1.0, 1.2]),
        ),
        stopping=StoppingParams(
            max_new_tokens=rng.randrange(1, 12),
            # Two-byte strings the byte-level tiny tokenizer emits now and then: some requests stop early.
            stop_sequences=tuple(rng.sample(["e ", "th", "an", "s."], k=rng.randrange(0, 3))),
            ignore_eos_token=rng.random() < 0.5,
        ),
        chunk_len=rng.choice([None, None, max(1, n // 2)]),
    )  # fmt: skip


def run_schedule(engine: ShardEngine, seed: int, n_adapters: int, steps: int = 60) -> dict[int, dict]:
    rng = random.Random(seed)
    out: dict[int, dict] = {}
    live: dict[int, list[int]] = {}  # batch id -> request ids
    next_rid, next_bid = 1, 1

    def take(result):
        for g in result.generations:
            o = out.setdefault(g.request_id, {"ids": [], "lps": [], "finish": None})
            o["ids"] += g.next_tokens.ids
            o["lps"] += g.next_tokens.logprobs
            if g.generated_text is not None:
                o["finish"] = (g.generated_text.finish_reason, g.generated_text.text)
        return result.batch

    def store(info, replaced=()):
        for b in replaced:
            live.pop(b, None)
        if info is not None:
            live[info.id] = list(info.request_ids)

    for _ in range(steps):
        action = rng.random()
        if not live or action < 0.25:  # a new batch
            reqs = []
            for _ in range(rng.randrange(1, 4)):
                reqs.append(random_request(rng, next_rid, n_adapters))
                next_rid += 1
            join = rng.choice(list(live)) if live and rng.random() < 0.4 else None
            spec = BatchSpec(id=1000 + next_bid, requests=tuple(reqs))
            next_bid += 1
            info = take(engine.prefill(spec, join))
            store(info, [join] if join is not None else [])
        elif action < 0.80:  # decode one or several running batches
            ids = rng.sample(list(live), k=min(len(live), rng.choice([1, 1, 2, 3])))
            info = take(engine.decode(ids))
            store(info, ids)
        elif action < 0.95:  # the router cancels a request
            bid = rng.choice(list(live))
            keep = [r for r in live[bid] if rng.random() < 0.7]
            info = engine.filter_batch(bid, keep)
            store(info if info.request_ids else None, [bid])
        else:
            bid = rng.choice(list(live))
            engine.clear_cache(bid)
            live.pop(bid)
    while live:
        ids = list(live)
        info = take(engine.decode(ids))
        store(info, ids)
    assert engine.free_blocks() == engine.usable_blocks()
    return out


def positional_oracle(reference: dict[int, list[int]], vocab: int = 512):
    """Drafts = the plain run's next tokens, the second one spoiled at every third position: a function
    of (request, position) alone, so engines get the same drafts however often they ask."""

    def drafts(r, budget: int, ahead=()) -> list[int]:
        g = len(r.tracker.generated_ids) + len(ahead)
        future = reference.get(r.id, [])[g : g + budget]
        future += [(7 * len(future) + 11) % vocab for _ in range(budget - len(future))]
        if (r.id + g) % 3 == 0 and len(future) > 1:
            future[1] = (future[1] + 1) % vocab
        return future

    return drafts
