"""cache/kv_cache.py: allocation, slot writes (slot -1 writes nothing), FP8, bytes per token."""

from __future__ import annotations

import torch

from cache.kv_cache import KVCache, LayerKV
from model.config import MistralConfig
from model.parallel import TPGroup


def test_allocation_shapes_dtype_and_zeros():
    cache = KVCache(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    assert len(cache) == 3 and cache.dtype == torch.float16
    for layer in cache:
        assert layer.k.shape == layer.v.shape == (5, 4, 2, 8)
        assert layer.k.dtype == torch.float16 and layer.k_scale is None
        assert layer.num_slots == 20 and layer.block_size == 4
        assert not layer.k.any() and not layer.v.any()
    assert cache[0].k.data_ptr() != cache[1].k.data_ptr()


def test_bytes_per_token_counts_real_element_size():
    assert KVCache(2, 1, 16, 4, 8, torch.float32).bytes_per_token() == 2 * 2 * 4 * 8 * 4
    assert KVCache(2, 1, 16, 4, 8, torch.bfloat16).bytes_per_token() == 2 * 2 * 4 * 8 * 2
    assert KVCache.bytes_per_token_for(2, 4, 8, torch.float8_e4m3fn) == 2 * 2 * 4 * 8  # FP8: twice the tokens


def test_write_by_slot_and_minus_one_writes_nothing():
    cache = KVCache(1, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=3, dtype=torch.float32)
    layer = cache[0]
    k = torch.arange(4 * 6, dtype=torch.float32).view(4, 2, 3) + 1
    slots = torch.tensor([5, -1, 11, -1])
    layer.write(k, -k, slots)
    assert torch.equal(layer.k[1, 1], k[0]) and torch.equal(layer.k[2, 3], k[2])
    assert torch.equal(layer.v[1, 1], -k[0])
    assert int((layer.k != 0).any(-1).any(-1).sum()) == 2  # exactly two slots written
    got_k, got_v = layer.read(torch.tensor([[5, 11]]), torch.float32)
    assert got_k.shape == (1, 2, 2, 3) and torch.equal(got_k[0, 1], k[2]) and torch.equal(got_v[0, 0], -k[0])


def test_hand_built_layer_without_scratch_slot_also_skips_minus_one():
    k = torch.zeros(2, 4, 1, 2)
    layer = LayerKV(k, torch.zeros_like(k))
    layer.write(torch.ones(3, 1, 2), torch.ones(3, 1, 2), torch.tensor([-1, 6, -1]))
    assert int(k.flatten().nonzero().numel()) == 2 and torch.equal(k[1, 2, 0], torch.ones(2))


def test_fp8_cache_round_trips_with_scale():
    cache = KVCache(1, 2, 4, 1, 4, torch.float8_e4m3fn)
    layer = cache[0]
    assert layer.k.dtype == torch.float8_e4m3fn and layer.k_scale is not None
    layer.k_scale.fill_(0.5)
    x = torch.tensor([[[0.25, -1.0, 2.0, 3.5]]])
    layer.write(x, x, torch.tensor([3]))
    k, v = layer.read(torch.tensor([3]), torch.float32)
    torch.testing.assert_close(k, x, atol=0.05, rtol=0.05)
    assert torch.equal(layer.k_slots[3].float() * 0.5, k[0])


def test_for_model_uses_this_ranks_kv_heads():
    config = MistralConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
    )
    assert KVCache.for_config(config, TPGroup(), 4, 16, torch.float32)[0].k.shape == (4, 16, 2, 16)
    assert KVCache.for_config(config, TPGroup(1, 4), 4, 16, torch.float32)[0].k.shape == (4, 16, 1, 16)
