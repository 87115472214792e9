"""The per-layer view of the paged KV cache that attention reads and writes.

Per layer one K and one V tensor [num_blocks, block_size, Hkv, D]; a slot is
`block * block_size + offset`, and slot -1 means "write nothing" (padding rows of a CUDA-graph bucket).
The model owns this contract; cache/kv_cache.py allocates the tensors behind it.
"""

from __future__ import annotations

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
