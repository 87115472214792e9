"""Headline: one paged batch mixing the base model and 3 PEFT adapters equals PEFT per request (fp32, 1e-4).

Nine requests interleave base + adapters of ranks 3, 8 (rsLoRA) and 12 with different target modules
(attention, MLP, lm_head); ragged prefill then 16 decode steps (with CUDA-graph-style padding rows) through
FlashMistralForCausalLM on the paged cache, adapters served from the AdapterStore's stacked slots.
Every request's logits at every step equal `PeftModel.from_pretrained(base, adapter)` (or the plain base).
"""

from __future__ import annotations

import random

import pytest
import torch
from mistral_harness import PagedRunner, hf_logits, random_prompts

from cache.adapter_store import AdapterStore
from cache.kv_cache import KVCache
from model.errors import NotFound
from model.flash_mistral import FlashMistralForCausalLM
from shard_server.types import AdapterSpec

ATOL = 1e-4
VOCAB = 512
ADAPTERS = {  # index -> adapter_factory kwargs
    1: dict(rank=3, target_modules=("q_proj", "v_proj"), seed=11),
    2: dict(rank=8, target_modules=("o_proj", "gate_proj", "up_proj", "down_proj"), use_rslora=True, seed=12),
    3: dict(rank=12, target_modules=("q_proj", "k_proj", "down_proj", "lm_head"), seed=13),
}
REQUEST_ADAPTERS = [1, 0, 2, 3, 1, 0, 3, 2, 1]  # interleaved on purpose: many segments


@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_factory):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    def base():
        return MistralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    dirs = {i: adapter_factory(tiny_model_dir, **kw) for i, kw in ADAPTERS.items()}
    truth = {0: base()}
    for i, d in dirs.items():
        truth[i] = PeftModel.from_pretrained(base(), d).eval()  # PEFT injects into its own base copy
    ours = FlashMistralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return ours, truth, dirs


def _spec(d) -> AdapterSpec:
    return AdapterSpec(adapter_ids=(str(d),), source="local")


@pytest.mark.slow
@pytest.mark.parametrize("concurrent", [True, False], ids=["decode-deltas", "in-place"])
def test_mixed_adapter_batch_prefill_and_16_decode_steps_equal_peft(setup, concurrent):
    """`concurrent`: decode LoRA returned as deltas that the next kernel adds (the store's default), or
    added in place after each projection."""
    ours, truth, dirs = setup
    store = AdapterStore(ours.config, device="cpu", dtype=torch.float32, concurrent_lora=concurrent)
    for i, d in dirs.items():
        store.load(i, _spec(d))
    runner = PagedRunner(ours, KVCache.for_model(ours, num_blocks=64), seed=7)
    prompts = random_prompts([7, 12, 3, 9, 1, 15, 5, 11, 6], VOCAB, seed=21)
    data = store.batch_data(REQUEST_ADAPTERS, [len(p) for p in prompts], is_prefill=True)
    assert len(data.meta.segments) == 7  # base requests split the runs
    logits, cu = runner.prefill(prompts, adapter_data=data)
    for b, (p, idx) in enumerate(zip(prompts, REQUEST_ADAPTERS, strict=True)):
        ref = hf_logits(truth[idx], p)
        torch.testing.assert_close(logits[cu[b] : cu[b + 1]], ref, atol=ATOL, rtol=0, msg=f"prefill req {b}")
        if idx:  # the adapter really changes the output, so equality is not vacuous
            assert (ref - hf_logits(truth[0], p)).abs().max() > 1e-2

    g = random.Random(5)
    pad = 2  # padding rows of a CUDA-graph bucket: index 0 -> slot -1, no LoRA
    for step in range(16):
        tokens = [g.randrange(3, VOCAB) for _ in runner.seqs]
        data = store.batch_data(REQUEST_ADAPTERS + [0] * pad, [1] * (len(tokens) + pad), is_prefill=False)
        logits = runner.decode(tokens, pad_rows=pad, adapter_data=data)
        for b, (seq, idx) in enumerate(zip(runner.seqs, REQUEST_ADAPTERS, strict=True)):
            torch.testing.assert_close(
                logits[b], hf_logits(truth[idx], seq)[-1], atol=ATOL, rtol=0, msg=f"step {step} req {b}"
            )

    # Offload: requests for that index are refused; after a reload it serves the same logits again.
    store.offload(3)
    with pytest.raises(NotFound, match="adapter index 3 is not loaded"):
        store.batch_data(REQUEST_ADAPTERS, [1] * len(REQUEST_ADAPTERS), is_prefill=False)
    store.load(3, _spec(dirs[3]))
    tokens = [g.randrange(3, VOCAB) for _ in runner.seqs]
    data = store.batch_data(REQUEST_ADAPTERS, [1] * len(tokens), is_prefill=False)
    logits = runner.decode(tokens, adapter_data=data)
    for b, (seq, idx) in enumerate(zip(runner.seqs, REQUEST_ADAPTERS, strict=True)):
        torch.testing.assert_close(logits[b], hf_logits(truth[idx], seq)[-1], atol=ATOL, rtol=0)


def test_last_token_prefill_with_lm_head_indices_and_a_tight_budget(setup):
    """lm_head on selected rows, and an LRU budget of two adapters' slots while a batch needs two."""
    ours, truth, dirs = setup
    store = AdapterStore(ours.config, budget_bytes=None)
    store.load(3, _spec(dirs[3]))
    store.load(2, _spec(dirs[2]))
    budget = store.device_bytes()  # two slots of the layout these two need
    store = AdapterStore(ours.config, budget_bytes=budget)
    for i, d in dirs.items():
        store.load(i, _spec(d))
    assert store.device_bytes() <= budget
    assert len(store.resident_indices()) < 3  # one of the three waits in host memory
    runner = PagedRunner(ours, KVCache.for_model(ours, num_blocks=32), seed=2)
    for pair in ([3, 0, 2], [1, 3, 0]):  # each batch: two adapters + base; the third is on the host
        prompts = random_prompts([5, 8, 4], VOCAB, seed=sum(pair))
        cu = [0]
        for p in prompts:
            cu.append(cu[-1] + len(p))
        rows = torch.tensor(cu[1:]) - 1
        data = store.batch_data(pair, [len(p) for p in prompts], is_prefill=True, lm_head_indices=rows)
        logits, _ = runner.prefill(prompts, last_only=True, adapter_data=data)
        assert store.device_bytes() <= budget and set(pair) - {0} <= set(store.resident_indices())
        for b, (p, idx) in enumerate(zip(prompts, pair, strict=True)):
            torch.testing.assert_close(logits[b], hf_logits(truth[idx], p)[-1], atol=ATOL, rtol=0)
