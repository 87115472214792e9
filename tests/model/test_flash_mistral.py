"""FlashMistralForCausalLM on the paged cache == transformers.MistralForCausalLM (fp32, CPU, 1e-4)."""

from __future__ import annotations

import random

import pytest
import torch
from mistral_harness import SHAPES, PagedRunner, hf_logits, random_prompts

from cache.kv_cache import KVCache
from model.forward_batch import ForwardBatch, PrefillSeq

ATOL = 1e-4
VOCAB = 512


def _check_prefill(logits, cu, hf, prompts, offset=0):
    for b, p in enumerate(prompts):
        ref = hf_logits(hf, p)[offset:]
        torch.testing.assert_close(logits[cu[b] : cu[b + 1]], ref, atol=ATOL, rtol=0)


def _decode_steps(runner, hf, steps, seed=1, pad_rows=0):
    """Random next tokens; every step's logits vs transformers' full forward of the same prefix.

    transformers is causal, so row t of its forward over the final sequence *is* its full forward of
    the prefix [0, t]: one call per sequence gives every step's truth. The first, a middle and the last
    step are also checked against a separate forward of exactly that prefix.
    """
    g = random.Random(seed)
    start = [len(s) for s in runner.seqs]
    got = []  # [steps] of [B, V]
    for step in range(steps):
        tokens = [g.randrange(3, VOCAB) for _ in runner.seqs]
        logits = runner.decode(tokens, pad_rows=pad_rows)
        assert logits.shape == (len(tokens) + pad_rows, VOCAB)
        got.append(logits[: len(tokens)])
        if step in (0, steps // 2, steps - 1):
            for b, seq in enumerate(runner.seqs):
                torch.testing.assert_close(logits[b], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)
    for b, seq in enumerate(runner.seqs):
        ref = hf_logits(hf, seq)[start[b] : start[b] + steps]  # [steps, V]
        torch.testing.assert_close(torch.stack([g_[b] for g_ in got]), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_ragged_prefill_then_48_decode_steps(model_pair, shape):
    ours, hf, _ = model_pair(**shape)
    runner = PagedRunner(ours, KVCache.for_model(ours, num_blocks=48), seed=3)  # shuffled block pool
    prompts = random_prompts([13, 5, 22, 1], VOCAB, seed=2)
    logits, cu = runner.prefill(prompts)
    assert logits.shape == (sum(map(len, prompts)), VOCAB)
    _check_prefill(logits, cu, hf, prompts)
    pairs = [(a, b) for blocks in runner.blocks for a, b in zip(blocks, blocks[1:], strict=False)]
    assert any(b != a + 1 for a, b in pairs)  # the block tables really are non-contiguous
    _decode_steps(runner, hf, steps=48, pad_rows=2)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_sliding_window_8_crossed_in_prefill_and_decode(model_pair, shape):
    ours, hf, _ = model_pair(sliding_window=8, **shape)
    assert hf.config.sliding_window == 8 and ours.config.sliding_window == 8
    # Block size 4: the window spans several blocks; only the last 8 prompt tokens are cached.

    cache = KVCache.for_config(ours.config, ours.tp, num_blocks=96, block_size=4, dtype=torch.float32)
    runner = PagedRunner(ours, cache, seed=5)
    prompts = random_prompts([40, 40, 6], VOCAB, seed=4)
    logits, cu = runner.prefill(prompts)
    _check_prefill(logits, cu, hf, prompts)
    _decode_steps(runner, hf, steps=40, seed=6)


@pytest.mark.parametrize("window", [None, 8])
def test_prefill_in_two_chunks_equals_prefill_at_once(model_pair, window):
    ours, hf, _ = model_pair(sliding_window=window, heads=4, kv_heads=2)
    prompts = random_prompts([30, 19, 12], VOCAB, seed=7)
    whole = PagedRunner(ours, KVCache.for_model(ours, num_blocks=32), seed=1)
    full_logits, full_cu = whole.prefill(prompts)

    chunked = PagedRunner(ours, KVCache.for_model(ours, num_blocks=32), seed=2)
    cut = [17, 4, 12]  # the third sequence has nothing left for chunk 2
    first, _ = chunked.prefill([p[:c] for p, c in zip(prompts, cut, strict=False)])
    second, cu2 = chunked.prefill([p[c:] for p, c in zip(prompts, cut, strict=False)], seq_ids=[0, 1, 2])
    for b, c in enumerate(cut):
        at_once = full_logits[full_cu[b] + c : full_cu[b + 1]]
        torch.testing.assert_close(second[cu2[b] : cu2[b + 1]], at_once, atol=ATOL, rtol=0)
    # The cache left behind is as good as the one-shot prefill's: decoding continues exactly.
    _decode_steps(chunked, hf, steps=6, seed=8)


def test_window_with_a_ring_of_blocks_and_chunked_prefill(model_pair):
    """Blocks reused cyclically (ceil(W / bs) + 1 per sequence, as the block manager's ring): a 30-token
    chunk overwrites ring slots of prefix keys its first queries still need, so they must be read first."""

    ours, hf, _ = model_pair(sliding_window=8, heads=4, kv_heads=2)
    cache = KVCache.for_config(ours.config, ours.tp, num_blocks=16, block_size=4, dtype=torch.float32)
    runner = PagedRunner(ours, cache, seed=4, ring=3)
    prompts = random_prompts([40, 13], VOCAB, seed=12)
    runner.prefill([p[:10] for p in prompts])
    logits, cu = runner.prefill([p[10:] for p in prompts], seq_ids=[0, 1])
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[cu[b] : cu[b + 1]], hf_logits(hf, p)[10:], atol=ATOL, rtol=0)
    _decode_steps(runner, hf, steps=20, seed=13)


def test_lm_head_indices_and_skip_lm_head(model_pair):
    ours, hf, _ = model_pair(heads=4, kv_heads=2)
    prompts = random_prompts([9, 4, 15], VOCAB, seed=9)
    full, cu = PagedRunner(ours, KVCache.for_model(ours, 16)).prefill(prompts)
    last, _ = PagedRunner(ours, KVCache.for_model(ours, 16)).prefill(prompts, last_only=True)
    assert last.shape == (3, VOCAB)
    torch.testing.assert_close(last, full[[c - 1 for c in cu[1:]]], atol=0, rtol=0)

    runner = PagedRunner(ours, KVCache.for_model(ours, 16))
    hidden, _ = runner.prefill(prompts, last_only=True, skip_lm_head=True)
    assert hidden.shape == (3, ours.config.hidden_size)
    torch.testing.assert_close(ours.lm_head(hidden), last, atol=1e-6, rtol=0)


def test_prefill_without_cache_for_embeddings(model_pair):
    """kv_cache=None in prefill (embedding requests): same logits, nothing written anywhere."""
    ours, hf, _ = model_pair(heads=4, kv_heads=2)
    prompt = random_prompts([11], VOCAB, seed=10)[0]
    fb = ForwardBatch.prefill([PrefillSeq(prompt, all_logits=True)], device="cpu")
    assert fb.slots is None and fb.block_tables is None and fb.lm_head_indices is None
    torch.testing.assert_close(fb.run(ours, None), hf_logits(hf, prompt), atol=ATOL, rtol=0)
    hidden = ForwardBatch.embed([prompt, prompt[:4]], device="cpu").run(ours, None)
    assert hidden.shape == (2, ours.config.hidden_size)


@pytest.mark.parametrize("slot_minus_one", [True, False])
def test_padding_rows_write_nothing_outside_reserved_block_0(model_pair, slot_minus_one):
    """A CUDA-graph bucket's padding rows (position 0, table of zeros) write only into reserved block 0;
    with slot -1 (the model's "write nothing") not even there."""
    ours, _, _ = model_pair(heads=4, kv_heads=2)
    cache = KVCache.for_model(ours, num_blocks=8)
    runner = PagedRunner(ours, cache)
    runner.prefill(random_prompts([5, 7], VOCAB, seed=11))
    before = [(layer.k_slots.clone(), layer.v_slots.clone()) for layer in cache]
    fb = runner.decode_batch([10, 11], pad_rows=3)
    if slot_minus_one:
        fb.slots[2:] = -1
    fb.run(ours, cache)
    written = {runner._slot(i, runner.cached[i] - 1) for i in range(2)}
    reserved = set() if slot_minus_one else set(range(cache.block_size))
    untouched = [s for s in range(cache.num_blocks * cache.block_size) if s not in written | reserved]
    for layer, (k0, v0) in zip(cache, before, strict=False):
        assert torch.equal(layer.k_slots[untouched], k0[untouched])
        assert torch.equal(layer.v_slots[untouched], v0[untouched])
        assert not torch.equal(layer.k_slots[sorted(written)], k0[sorted(written)])
