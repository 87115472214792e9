"""Attention backends: selection and its log line, sync-free decode, and the CUDA backends' plumbing.

The CUDA kernels cannot run here, so torch_cuda and flash_attn run on CPU against stand-ins that
implement the kernels' documented semantics (FlashAttention-2: causal masks aligned bottom-right,
window (left, right) = keys i - left .. i + right). This checks what we pass (cumulative lengths,
GQA, window mapping, gathered prefixes, block tables); tests/gpu checks the real kernels.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from mistral_harness import PagedRunner, hf_logits, random_prompts

from cache.kv_cache import KVCache
from model.attention import Seqlen, available_backends, select_attention_backend
from model.attention.reference import attend


def test_cpu_selects_reference_and_logs_it(caplog):
    with caplog.at_level(logging.INFO, logger="model.attention"):
        backend = select_attention_backend("cpu", torch.float32)
    assert backend.name == "reference" and backend.block_size == 16
    assert "attention backend: reference" in caplog.text
    assert available_backends("cpu", torch.bfloat16) == ["reference"]


def test_prefer_names_why_a_backend_cannot_run():
    with pytest.raises(ValueError, match="torch_cuda.*needs a CUDA device"):
        select_attention_backend("cpu", torch.float32, prefer="torch_cuda")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        select_attention_backend("cpu", torch.float32, prefer="nope")
    assert select_attention_backend("cpu", torch.float32, prefer="reference").name == "reference"


def test_seqlen_from_lengths():
    s = Seqlen.from_lengths([3, 1, 4], [0, 5, 2])
    assert s.input_lengths.tolist() == [3, 6, 6] and s.cache_lengths.tolist() == [0, 5, 2]
    assert s.cu_seqlen_q.tolist() == [0, 3, 4, 8] and s.cu_seqlen_k.tolist() == [0, 3, 9, 15]
    assert (s.max_q, s.max_k) == (4, 6) and s.has_cached_prefix()
    assert Seqlen(input_lengths=torch.tensor([2], dtype=torch.int32)).cache_lengths.tolist() == [0]
    # Every prefill layer asks: from host lists the answer is known without the device.
    assert Seqlen.from_lengths([3, 1], [0, 0]).cached_prefix is False
    assert Seqlen.from_lengths([3, 1], [0, 2]).cached_prefix is True
    lengths = torch.tensor([4], dtype=torch.int32)
    made = Seqlen(input_lengths=lengths, cache_lengths=torch.tensor([1], dtype=torch.int32))
    assert made.cached_prefix is None and made.has_cached_prefix() and made.cached_prefix is True


def test_decode_has_no_host_sync(model_pair, monkeypatch):
    """Decode must be CUDA-graph capturable: no .item()/.tolist()/bool(tensor)/int(tensor) anywhere."""
    ours, _, _ = model_pair(sliding_window=8, heads=4, kv_heads=2)
    runner = PagedRunner(ours, KVCache.for_model(ours, 16))
    runner.prefill(random_prompts([12, 3], 512))

    def sync(*_a, **_k):
        raise AssertionError("host sync in decode")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    logits = runner.decode([7, 8], pad_rows=2)
    monkeypatch.undo()
    assert logits.shape == (4, 512) and torch.isfinite(logits).all()


# ---- stand-ins for the CUDA kernels ---------------------------------------------------------------


def _fa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, causal=False):
    out = torch.empty_like(q)
    left, right = window_size
    if causal:
        right = 0
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        nq, nk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        i = torch.arange(nq)[:, None] + (nk - nq)  # bottom-right alignment
        j = torch.arange(nk)[None, :]
        mask = torch.ones(nq, nk, dtype=torch.bool)
        if right >= 0:
            mask &= j <= i + right
        if left >= 0:
            mask &= j >= i - left
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        out[qs] = attend(q[qs], k[ks], v[ks], mask, scale)
    return out


def fake_varlen_attn(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)
):
    # torch 2.11's signature: no enable_gqa, so heads must match (the backend repeats KV heads).
    assert query.shape[1] == key.shape[1], "varlen_attn without enable_gqa needs Hq == Hkv"
    assert query.dtype == key.dtype and cu_seq_q.dtype == torch.int32
    return _fa_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)


def fake_flash_attn_varlen_func(
    q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, window_size=(-1, -1)
):
    return _fa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, window_size, causal=causal)


def fake_flash_attn_with_kvcache(
    q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size
):
    b, nq, _, _ = q.shape
    bs = k_cache.shape[1]
    n = block_table.shape[1] * bs
    pos = torch.arange(n)
    slots = block_table.long()[:, pos // bs] * bs + pos % bs  # [B, n]
    k = k_cache.flatten(0, 1)[slots]  # [B, n, Hkv, D]
    v = v_cache.flatten(0, 1)[slots]
    # causal, aligned bottom-right: query i of nq sits at position cache_seqlens - nq + i
    last = cache_seqlens.long()[:, None, None] - nq + torch.arange(nq)[None, :, None]  # [B, nq, 1]
    mask = pos[None, None] <= last
    if window_size[0] >= 0:
        mask &= pos[None, None] >= last - window_size[0]
    return attend(q, k, v, mask, softmax_scale)  # [B, nq, Hq, D]


@pytest.fixture
def cuda_stand_ins(monkeypatch):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn)
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = fake_flash_attn_varlen_func
    fake.flash_attn_with_kvcache = fake_flash_attn_with_kvcache
    for mod in ("model.attention.torch_cuda", "model.attention.flash_attn_backend"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    # Only while our backend imports it: transformers probes sys.modules for flash_attn too.
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    import model.attention.flash_attn_backend  # noqa: F401
    import model.attention.torch_cuda  # noqa: F401

    monkeypatch.delitem(sys.modules, "flash_attn")


@pytest.mark.parametrize("backend_name", ["torch_cuda", "flash_attn"])
@pytest.mark.parametrize("window", [None, 8])
def test_cuda_backends_plumbing_on_cpu(model_pair, cuda_stand_ins, backend_name, window):
    from model.attention import BACKENDS
    from model.flash_mistral import FlashMistralForCausalLM

    ours, hf, d = model_pair(sliding_window=window, heads=4, kv_heads=1, head_dim=24)
    backend = next(e for e in BACKENDS if e.name == backend_name).make()
    model = FlashMistralForCausalLM.from_pretrained(d, attention=backend)
    assert model.block_size == (256 if backend_name == "flash_attn" else 16)

    cache = KVCache.for_config(model.config, model.tp, num_blocks=24, block_size=4, dtype=torch.float32)
    runner = PagedRunner(model, cache, seed=1)
    prompts = random_prompts([20, 5, 11], 512, seed=5)
    runner.prefill([p[:7] for p in prompts])
    logits, cu = runner.prefill([p[7:] for p in prompts], seq_ids=[0, 1, 2])  # cached prefix
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[cu[b] : cu[b + 1]], hf_logits(hf, p)[7:], atol=1e-4, rtol=0)
    for step in range(12):
        logits = runner.decode([30 + step] * 3)
        for b, seq in enumerate(runner.seqs):
            torch.testing.assert_close(logits[b], hf_logits(hf, seq)[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend_name", ["reference", "torch_cuda", "flash_attn"])
@pytest.mark.parametrize("window", [None, 8])
def test_verify_step_several_tokens_per_sequence(model_pair, cuda_stand_ins, backend_name, window):
    """A decode forward with Q tokens per sequence (speculative verify) gives, at every position, the
    logits of transformers' full forward; a window shorter than the context is applied per query."""
    from mistral_harness import verify_batch

    from model.attention import BACKENDS
    from model.flash_mistral import FlashMistralForCausalLM

    ours, hf, d = model_pair(sliding_window=window, heads=4, kv_heads=2)
    backend = next(e for e in BACKENDS if e.name == backend_name).make()
    model = FlashMistralForCausalLM.from_pretrained(d, attention=backend)
    cache = KVCache.for_config(model.config, model.tp, num_blocks=40, block_size=4, dtype=torch.float32)
    runner = PagedRunner(model, cache, seed=2)
    prompts = random_prompts([13, 4, 9], 512, seed=8)
    runner.prefill(prompts)
    for step, q_len in enumerate((4, 1, 3, 5)):
        tokens = random_prompts([q_len] * 3, 512, seed=20 + step)
        logits = verify_batch(runner, tokens).run(model, cache)
        assert logits.shape == (3 * q_len, 512)
        for b, seq in enumerate(runner.seqs):
            want = hf_logits(hf, seq)[-q_len:]
            torch.testing.assert_close(logits[b * q_len : (b + 1) * q_len], want, atol=1e-4, rtol=0)
