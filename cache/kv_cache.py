"""Paged KV cache tensors: per layer one K and one V of shape [num_blocks, block_size, Hkv, D].

A slot is `block * block_size + offset`. Slot -1 means "write nothing" (padding rows of a CUDA-graph
bucket). To keep that sync-free, KVCache allocates one scratch slot past the last block: padding rows are
redirected there by `torch.where`, so the write is a single `index_copy_` with no data-dependent shape.
The cache is zero-initialised: attention masks never-written slots out, and zeros (unlike uninitialised
memory) cannot turn a masked 0 * V into NaN.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from model.attention.kv import FP8_DTYPES, LayerKV


class KVCache:
    """Allocates the K/V tensors of every layer; the cache dtype is fixed at construction."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) <= 0:
            raise ValueError("KVCache dimensions must be positive")
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        n = num_blocks * block_size
        self.layers: list[LayerKV] = []
        for _ in range(num_layers):
            k_slots = torch.zeros(n + 1, num_kv_heads, head_dim, dtype=dtype, device=device)
            v_slots = torch.zeros(n + 1, num_kv_heads, head_dim, dtype=dtype, device=device)
            scale = None
            if dtype in FP8_DTYPES:  # scales stay 1.0 until calibrated scales are loaded
                scale = torch.ones((), dtype=torch.float32, device=device)
            self.layers.append(
                LayerKV(
                    k=k_slots[:n].view(num_blocks, block_size, num_kv_heads, head_dim),
                    v=v_slots[:n].view(num_blocks, block_size, num_kv_heads, head_dim),
                    k_scale=scale,
                    v_scale=None if scale is None else scale.clone(),
                    k_slots=k_slots,
                    v_slots=v_slots,
                )
            )

    @classmethod
    def for_model(cls, model, num_blocks: int, dtype: torch.dtype | None = None) -> KVCache:
        """Sized for `model` (a FlashMistralForCausalLM) on its tensor-parallel rank, with the block size
        its attention backend needs; `dtype` defaults to the model's."""
        return cls.for_config(
            model.config, model.tp, num_blocks, model.block_size, dtype or model.dtype, model.device
        )

    @classmethod
    def for_config(
        cls, config, tp, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu"
    ) -> KVCache:
        """Sized for `config` (a MistralConfig) on this tensor-parallel rank."""
        return cls(
            config.num_hidden_layers,
            num_blocks,
            block_size,
            local_kv_heads(config.num_key_value_heads, tp.world_size),
            config.head_dim,
            dtype,
            device,
        )

    @staticmethod
    def bytes_per_token_for(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Cache bytes one token costs (K and V, every layer); FP8 counts 1 byte per element."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def bytes_per_token(self) -> int:
        return self.bytes_per_token_for(len(self.layers), self.num_kv_heads, self.head_dim, self.dtype)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def __iter__(self) -> Iterator[LayerKV]:
        return iter(self.layers)


def local_kv_heads(num_kv_heads: int, world_size: int) -> int:
    """KV heads on one rank: split when there are enough, else one replicated head per rank."""
    return max(1, num_kv_heads // world_size)
