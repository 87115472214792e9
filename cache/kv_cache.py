"""Paged KV cache tensors: per layer one K and one V of shape [num_blocks, block_size, Hkv, D].

A slot is `block * block_size + offset`. Slot -1 means "write nothing" (padding rows of a CUDA-graph
bucket). To keep that sync-free, KVCache allocates one scratch slot past the last block: padding rows are
redirected there by `torch.where`, so the write is a single `index_copy_` with no data-dependent shape.
The cache is zero-initialised: attention masks never-written slots out, and zeros (unlike uninitialised
memory) cannot turn a masked 0 * V into NaN.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class LayerKV:
    k: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    k_scale: torch.Tensor | None = None  # float32 scalar for FP8 caches: stored = real / scale
    v_scale: torch.Tensor | None = None
    # Flat slot views [num_blocks * block_size (+1 scratch), Hkv, D]; KVCache sets them, a hand-built
    # LayerKV gets views without the scratch slot (then slot -1 rows are dropped with a host sync).
    k_slots: torch.Tensor | None = None
    v_slots: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.k.dim() != 4 or self.k.shape != self.v.shape:
            raise ValueError(
                f"k and v must both be [blocks, block_size, Hkv, D], got {self.k.shape}, {self.v.shape}"
            )
        if self.k_slots is None:
            self.k_slots = self.k.view(-1, *self.k.shape[2:])
            self.v_slots = self.v.view(-1, *self.v.shape[2:])

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_slots(self) -> int:
        return self.k.shape[0] * self.k.shape[1]

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [N, Hkv, D] written to `slots` [N] int64; rows with slot -1 write nothing."""
        k, v = _bits(self._quantize(k, self.k_scale)), _bits(self._quantize(v, self.v_scale))
        k_slots, v_slots = _bits(self.k_slots), _bits(self.v_slots)
        n = self.num_slots
        if k_slots.shape[0] > n:
            idx = torch.where(slots < 0, n, slots)  # padding -> scratch slot n
            k_slots.index_copy_(0, idx, k)
            v_slots.index_copy_(0, idx, v)
        else:
            keep = slots >= 0
            k_slots[slots[keep]] = k[keep]
            v_slots[slots[keep]] = v[keep]

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather K and V at `slots` (any shape S, all >= 0) -> ([*S, Hkv, D], [*S, Hkv, D]) in `dtype`."""
        k = _bits(self.k_slots)[slots].view(self.k.dtype)
        v = _bits(self.v_slots)[slots].view(self.v.dtype)
        return self._dequantize(k, self.k_scale, dtype), self._dequantize(v, self.v_scale, dtype)

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is not None:
            x = x.float() / scale
        if self.k.dtype in FP8_DTYPES:  # saturate: an out-of-range cast may give NaN on some devices
            limit = torch.finfo(self.k.dtype).max
            x = x.clamp(-limit, limit)
        return x.to(self.k.dtype)

    @staticmethod
    def _dequantize(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if scale is None:
            return x.to(dtype)
        return (x.float() * scale).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as uint8: index_copy_ and gathers are not implemented for float8 on every device."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


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
    def for_model(
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
