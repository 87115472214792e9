"""Speculative decoding in the engine: speculation on gives, request for request, the tokens, texts,
finish reasons (and logprobs, to float tolerance) of speculation off.

Drafts come from the real n-gram lookup, and from an oracle that proposes the plain run's future
tokens with deliberate errors, so that long runs of drafts are accepted and cut by max_new_tokens, EOS
and stop sequences in the middle of a draft. Batches mix the base model and three adapters, greedy,
seeded sampling and penalties, on a model whose sliding window is shorter than the sequences.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from random_router import positional_oracle, run_schedule

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, SamplingParams, StoppingParams

WINDOW = 8  # shorter than every sequence here (prompts of 20+ tokens)
K = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


@pytest.fixture(scope="module")
def window_model(tiny_model_factory, adapter_factory):
    model_dir = tiny_model_factory(sliding_window=WINDOW)
    adapters = [
        adapter_factory(model_dir, rank=4, target_modules=("q_proj", "v_proj"), seed=21),
        adapter_factory(model_dir, rank=8, target_modules=("o_proj", "gate_proj", "down_proj"), seed=22),
        adapter_factory(model_dir, rank=4, target_modules=("k_proj", "up_proj", "lm_head"), seed=23),
    ]
    return model_dir, adapters


@pytest.fixture(scope="module")
def engines(window_model):
    """engines(k, kv_cache_dtype="auto") -> a warmed-up engine with the three adapters (one per kind,
    reused: every drive ends with all batches cleared); draft function and EOS set reset per call."""
    made: dict[tuple, ShardEngine] = {}

    def get(k: int, kv_cache_dtype: str = "auto") -> ShardEngine:
        key = (k, kv_cache_dtype)
        if key not in made:
            made[key] = make_engine(*window_model, k, kv_cache_dtype=kv_cache_dtype)
            made[key].default_eos = made[key].eos_ids
        e = made[key]
        assert not e.batches
        e.eos_ids = e.default_eos
        if e.speculator is not None:
            e.speculator.__dict__.pop("ngram_drafts", None)  # back to the class's n-gram lookup
        return e

    return get


def make_engine(model_dir, adapters, k: int, **cfg) -> ShardEngine:
    engine = ShardEngine(
        ShardConfig(model_dir=model_dir, max_kv_cache_bytes=1 << 21, speculative_tokens=k, **cfg)
    )
    warm = RequestSpec(id=0, input_ids=(1, 5, 6, 7), stopping=StoppingParams(max_new_tokens=3))
    engine.warmup(BatchSpec(id=0, requests=(warm,)), 64, 48, 8)
    for i, path in enumerate(adapters, start=1):
        engine.load_adapter(i, AdapterSpec(adapter_ids=(str(path),), source="local"))
    return engine


def requests(n: int = 8, seed: int = 0, max_new: int = 24) -> list[RequestSpec]:
    """Prompts with repeated phrases (n-gram material), every sampling kind, adapters 0..3."""
    rng = random.Random(seed)
    kinds = [
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.8, seed=7),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.2),
        SamplingParams(do_sample=True, top_k=20, top_p=0.9, seed=2**63 + 5, watermark=True),
        SamplingParams(return_k_alternatives=2),
    ]
    out = []
    for i in range(n):
        phrase = [rng.randrange(3, 512) for _ in range(5)]
        prompt = [1] + phrase * 3 + [rng.randrange(3, 512) for _ in range(rng.randrange(2, 9))] + phrase[:2]
        out.append(
            RequestSpec(
                id=i + 1,
                input_ids=tuple(prompt),
                sampling=kinds[i % len(kinds)],
                stopping=StoppingParams(max_new_tokens=max_new - (i % 3) * 7, ignore_eos_token=True),
                adapter_index=i % 4,
            )
        )
    return out


def drive(engine: ShardEngine, groups: list[list[RequestSpec]], drop: int | None = None) -> dict[int, dict]:
    """Prefill the groups one after another into the running batch (one Decode between), Decode to the
    end; `drop`: a request id filtered out after the second step. -> per request: ids, logprobs, texts,
    generated text, decode generations received."""
    out: dict[int, dict] = {}
    running = None
    step = 0

    def take(result):
        for g in result.generations:
            o = out.setdefault(
                g.request_id, {"ids": [], "lps": [], "alts": [], "decode_steps": 0, "gt": None}
            )
            o["ids"] += g.next_tokens.ids
            o["lps"] += g.next_tokens.logprobs
            o["alts"] += [a.ids for a in g.next_tokens.alternatives]
            o["decode_steps"] += g.prefill_tokens_length == 0
            if g.generated_text is not None:
                o["gt"] = g.generated_text
        return result.batch

    for i, group in enumerate(groups):
        running = take(engine.prefill(BatchSpec(id=10 + i, requests=tuple(group)), running and running.id))
        if running is not None:
            running = take(engine.decode([running.id]))
            step += 1
    while running is not None:
        if drop is not None and step == 2 and drop in running.request_ids:
            keep = [r for r in running.request_ids if r != drop]
            running = engine.filter_batch(running.id, keep)
            out.pop(drop)
        running = take(engine.decode([running.id]))
        step += 1
    assert engine.free_blocks() == engine.usable_blocks()
    return out


def assert_same(plain: dict, spec: dict) -> None:
    assert plain.keys() == spec.keys()
    for rid in plain:
        a, b = plain[rid], spec[rid]
        assert a["ids"] == b["ids"], rid
        assert a["alts"] == b["alts"], rid
        assert a["lps"] == pytest.approx(b["lps"], abs=1e-4), rid
        ga, gb = a["gt"], b["gt"]
        assert (ga.text, ga.generated_tokens, ga.finish_reason, ga.seed) == (
            gb.text, gb.generated_tokens, gb.finish_reason, gb.seed), rid  # fmt: skip
        # skipped_tokens as LoRAX counts them: every token of a step but its first
        assert gb.skipped_tokens == len(b["ids"]) - 1 - b["decode_steps"], rid
        assert ga.skipped_tokens == 0


def oracle(reference: dict[int, list[int]], vocab: int = 512):
    """Draft function proposing the plain run's next tokens; every third call spoils one draft, and past
    the reference's end it proposes junk (what a stop or EOS must never let through)."""
    calls = {"n": 0}

    def drafts(r, budget: int, ahead=()) -> list[int]:
        calls["n"] += 1
        g = len(r.tracker.generated_ids) + len(ahead)
        future = reference.get(r.id, [])[g : g + budget]
        future += [(7 * len(future) + 11) % vocab for _ in range(budget - len(future))]
        if calls["n"] % 3 == 0 and len(future) > 1:
            future[1] = (future[1] + 1) % vocab
        return future

    return drafts


@pytest.mark.parametrize("drafter", ["ngram", "oracle"])
def test_mixed_adapters_window_sampling_equal_plain_decoding(engines, drafter):
    reqs = requests()
    plain = drive(engines(0), [reqs])
    engine = engines(K)
    before = engine.speculator.stats()
    if drafter == "oracle":
        engine.speculator.ngram_drafts = oracle({rid: o["ids"] for rid, o in plain.items()})
    spec = drive(engine, [reqs])
    assert_same(plain, spec)
    stats = {k: v - before[k] for k, v in engine.speculator.stats().items() if k != "acceptance"}
    assert stats["steps"] > 0 and stats["drafted"] > 0
    if drafter == "oracle":
        assert stats["accepted"] > 0.5 * stats["drafted"]
        assert sum(o["gt"].skipped_tokens for o in spec.values()) > 40


def test_stop_sequence_eos_and_max_new_tokens_inside_a_draft(engines):
    """Stops that fall in the middle of an accepted draft run end the request exactly there."""
    base = requests(6, seed=4, max_new=30)
    free = drive(engines(0), [base])
    tok = engines(0).tokenizer
    reqs = []
    for i, r in enumerate(base):
        ids = free[r.id]["ids"]
        if i % 3 == 0:  # a stop sequence: the text of generated tokens 6..7
            stop = tok.decode(ids[6:8])
            reqs.append(replace(r, stopping=replace(r.stopping, stop_sequences=(stop,) if stop else ())))
        elif i % 3 == 1:
            reqs.append(replace(r, stopping=replace(r.stopping, max_new_tokens=3)))  # inside the first draft
        else:
            reqs.append(replace(r, stopping=replace(r.stopping, ignore_eos_token=False)))
    eos_extra = free[base[2].id]["ids"][9]  # this request meets an "EOS" at its 10th token

    def engine(k):
        e = engines(k)
        e.eos_ids = (*e.eos_ids, eos_extra)
        return e

    plain = drive(engine(0), [reqs])
    spec_engine = engine(K)
    spec_engine.speculator.ngram_drafts = oracle({rid: o["ids"] for rid, o in free.items()})
    spec = drive(spec_engine, [reqs])
    assert_same(plain, spec)
    assert len(plain[base[1].id]["ids"]) == 3
    assert len(plain[base[2].id]["ids"]) <= 10 and plain[base[2].id]["gt"].finish_reason.name == "EOS_TOKEN"
    assert any(o["gt"].finish_reason.name == "STOP_SEQUENCE" for o in plain.values())


def test_chunked_prefill_concatenation_and_filter(engines):
    """A second group joins the running batch (its prompts chunked over several steps) and one request
    is filtered out mid-way: speculation changes none of the outputs."""
    first = requests(4, seed=8)
    second = [replace(r, id=r.id + 100, chunk_len=5) for r in requests(4, seed=9)]
    groups = [first, second]
    plain = drive(engines(0), groups, drop=3)
    engine = engines(K)
    engine.speculator.ngram_drafts = oracle({rid: o["ids"] for rid, o in plain.items()})
    spec = drive(engine, groups, drop=3)
    assert_same(plain, spec)


def test_fp8_kv_cache(engines):
    reqs = requests(4, seed=5)
    plain = drive(engines(0, "fp8_e4m3"), [reqs])
    engine = engines(K, "fp8_e4m3")
    engine.speculator.ngram_drafts = oracle({rid: o["ids"] for rid, o in plain.items()})
    spec = drive(engine, [reqs])
    for rid in plain:
        assert plain[rid]["ids"] == spec[rid]["ids"]


def test_info_reports_speculate_and_limits_are_checked(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from shard_server.engine.speculative import speculator

    assert ShardEngine(ShardConfig(model_dir=tiny_model_dir, speculative_tokens=3)).info().speculate == 3
    assert ShardEngine(ShardConfig(model_dir=tiny_model_dir)).info().speculate == 0
    with pytest.raises(ValueError, match="speculative_tokens must be in 0..16"):
        ShardConfig(model_dir=tiny_model_dir, speculative_tokens=17)
    # A window ring has block_size positions of slack: drafts may not run further ahead than that.
    small_blocks = SimpleNamespace(
        config=SimpleNamespace(speculative_tokens=8, model_dir=tmp_path),
        model_config=SimpleNamespace(sliding_window=64),
        model=SimpleNamespace(block_size=4),
        runner=None,
        adapters=SimpleNamespace(preloaded_adapters=lambda: ()),
    )
    with pytest.raises(ValueError, match="exceeds the KV block size 4"):
        speculator.build(small_blocks)
    small_blocks.model_config.sliding_window = None
    assert speculator.build(small_blocks).k == 8


def test_verify_graph_inputs_on_cpu(engines, monkeypatch):
    """The verify graphs' static-buffer path (rows copied in, padded to the bucket and to max_q tokens,
    per-token adapter slots, BGMV, shared outputs) gives the eager verify forward's logits and hidden
    states. CUDA graphs cannot run here, so a 'graph' that replays by recomputing into the shared
    outputs stands in for the capture (tests/gpu runs the real one)."""
    from shard_server.executor.verify import VerifyGraphs, verify_forward

    class Recompute:  # replay = run the captured function again
        def __init__(self, fn):
            self.fn = fn

        def replay(self):
            self.fn()

    def capture(self, b, ctx, lora):
        logits, hidden = self._forward(b, ctx, lora)
        if self.out is None:
            rows = self.buckets[-1] * self.max_q
            self.out = torch.empty(rows, logits.shape[1], dtype=logits.dtype)
            self.hidden = torch.empty(rows, hidden.shape[1], dtype=hidden.dtype)
        self.captured += 1
        return Recompute(lambda: self._forward_into_outputs(b, ctx, lora))

    engine = engines(K)
    engine.prefill(BatchSpec(id=60, requests=tuple(requests(5, seed=12))))
    batch = engine.batches[60]
    monkeypatch.setattr(VerifyGraphs, "_capture", capture)
    graphs = VerifyGraphs(engine.runner, K + 1, max_batch=8, max_context=1024)
    assert graphs.run(batch, batch.input_ids[:, None], torch.ones(len(batch), dtype=torch.int64)) is None
    assert graphs.captured == 0  # before Warmup's capture: eager, never a capture inside a step
    # Warmup's capture plan without the CUDA calls around it (pool, synchronize, free memory)
    engine.runner.adapters.request_slots(batch.adapter_indices)  # the layout this batch uses
    graphs.contexts, graphs._kv_version = (256, 512), engine.runner.kv_version
    graphs._lora_layout = engine.runner.adapters.layout_version
    for key in [(b, ctx, lora) for b in graphs.buckets for ctx in graphs.contexts for lora in (False, True)]:
        graphs.graphs[key] = graphs._capture(*key)
    g = torch.Generator().manual_seed(0)
    for q_len in (3, 5, 1, 3):
        drafts = torch.randint(3, 500, (len(batch), q_len - 1), generator=g)
        tokens = torch.cat([batch.input_ids[:, None], drafts], dim=1)
        n_valid = torch.randint(1, q_len + 1, (len(batch),), generator=g)
        replayed = graphs.replayed
        graph_logits, graph_hidden = (
            t.clone() for t in verify_forward(engine.runner, batch, tokens, n_valid, graphs)
        )
        assert graphs.replayed == replayed + 1
        logits, hidden = verify_forward(engine.runner, batch, tokens, n_valid)
        assert graph_logits.shape == logits.shape == (len(batch), q_len, logits.shape[-1])
        torch.testing.assert_close(graph_logits, logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(graph_hidden, hidden, atol=1e-4, rtol=1e-4)
    assert graphs.captured == len(graphs.graphs)  # replays captured nothing
    engine.clear_cache()


def test_decode_overlap_with_speculation(engines, window_model):
    """With the decode overlap on, a speculative step enqueues the next step's verify forward before its
    host work (SpecLookahead), and the next step uses it; plain steps between (nothing to draft) ignore
    it and take their own lookaheads. Outputs equal plain decoding through prefill joins, chunks and a
    filter."""
    from shard_server.engine.speculative.speculator import SpecLookahead

    first = requests(4, seed=8)
    second = [replace(r, id=r.id + 100, chunk_len=5) for r in requests(4, seed=9)]
    groups = [first, second]
    plain = drive(engines(0), groups, drop=3)
    engine = make_engine(*window_model, K, overlap=True)
    spec = engine.speculator
    spec.ngram_drafts = oracle({rid: o["ids"] for rid, o in plain.items()})
    real_compute, real_decode, calls = spec.compute, engine.decode, {"n": 0, "spec_ahead": 0}

    def compute(batch, found=()):  # two plain steps, two speculative ones, and again
        calls["n"] += 1
        return real_compute(batch, found) if calls["n"] % 4 >= 2 else None

    def decode(batch_ids):
        result = real_decode(batch_ids)
        if result.batch is not None:
            calls["spec_ahead"] += isinstance(engine.lookaheads.get(result.batch.id), SpecLookahead)
        return result

    spec.compute, engine.decode = compute, decode
    assert_same(plain, drive(engine, groups, drop=3))
    assert spec.steps > 0 and spec.accepted > 0
    assert calls["spec_ahead"] > 0 and spec.lookahead_steps > 0  # speculative steps looked ahead, used it
    assert spec.lookahead_steps < spec.steps  # and some ran fresh (after a plain step, a join)
    assert engine.lookahead_rows_used > 0  # a plain step after a plain step used its lookahead


@pytest.mark.parametrize("seed", [1, 2])
def test_speculation_overlap_on_and_off_under_a_random_router(window_model, seed):
    """The randomised router (new batches, chunked prefills, joins, concatenated Decodes, filters,
    ClearCache, stop sequences, seeds) against speculation with the overlap on and off: the same tokens,
    logprobs and finish reasons, and the overlap really used precomputed verify steps. (The router's
    schedule follows the responses, and so do the requests it makes: plain decoding sees other requests
    after a while. Its outputs serve as drafts: right ones for the first requests, junk later.)"""
    model_dir, adapters = window_model
    want = run_schedule(make_engine(model_dir, adapters, 0), seed, len(adapters))
    reference = {rid: o["ids"] for rid, o in want.items()}

    runs = {}
    for overlap in (False, True):
        engine = make_engine(model_dir, adapters, K, overlap=overlap)
        engine.speculator.ngram_drafts = positional_oracle(reference)
        runs[overlap] = run_schedule(engine, seed, len(adapters))
        assert engine.speculator.stats()["accepted"] > 0
        assert (engine.speculator.lookahead_steps > 0) == overlap
    off, on = runs[False], runs[True]
    assert on.keys() == off.keys()
    for rid in off:
        assert on[rid]["ids"] == off[rid]["ids"], rid
        assert on[rid]["finish"] == off[rid]["finish"], rid
        assert on[rid]["lps"] == pytest.approx(off[rid]["lps"], abs=1e-4), rid


def test_cancelled_speculative_step_with_overlap(window_model):
    """A speculative step the router never receives commits nothing: the batch keeps the verify lookahead
    it had, the retry uses it, and the outputs equal plain decoding (the n-gram indexes forget the tokens
    the cancelled lookahead indexed ahead of its commit)."""
    from model import errors

    reqs = requests(4, seed=3)
    engine = make_engine(*window_model, K, overlap=True)
    plain = drive(make_engine(*window_model, 0), [reqs])
    spec = engine.speculator
    spec.ngram_drafts = positional_oracle({rid: o["ids"] for rid, o in plain.items()})
    running = engine.prefill(BatchSpec(id=50, requests=tuple(reqs))).batch
    out: dict[int, list[int]] = {}
    cancelled = 0
    while running is not None:
        had = engine.lookaheads.get(running.id)
        if cancelled < 3 and had is not None:
            with pytest.raises(errors.Cancelled):
                engine.decode([running.id], still_wanted=lambda: False)
            assert engine.lookaheads.get(running.id) is had
            cancelled += 1
        result = engine.decode([running.id])
        for g in result.generations:
            out.setdefault(g.request_id, []).extend(g.next_tokens.ids)
        running = result.batch
    assert cancelled == 3 and spec.lookahead_steps > 0
    for rid, o in plain.items():
        assert o["ids"][1:] == out[rid], rid
    assert engine.free_blocks() == engine.usable_blocks()
