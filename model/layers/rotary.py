"""Rotary position embedding (the default, unscaled kind; "rotate half" layout like transformers)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, *, device=None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        # Not saved in state_dict (checkpoints do not carry it).
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)  # [D/2] float32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """For `positions` [T], once per forward: ([T, 1, D/2], [T, 1, D/2]) in `dtype`.

        Computed, not looked up in a [max_positions, D/2] table: no memory that grows with the context
        limit, and the same float32 products and cos/sin as transformers (then cast, as it does).
        """
        freqs = positions.float()[:, None] * self.inv_freq  # [T, D/2]
        return freqs.cos().unsqueeze(1).to(dtype), freqs.sin().unsqueeze(1).to(dtype)

    @staticmethod
    def apply(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D] -> rotated (q, k)."""
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(q, k, *self.cos_sin(positions, q.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
