"""Torch references of the grouped LoRA kernels (model/kernels/lora.py): same arguments, same semantics
(that module's docstring), plain per-tile matmuls in float32. What the kernel tests compare against.

`plan` is a lora_plan.LoraPlan (duck-typed here: this module imports nothing from the kernels' module).
"""

from __future__ import annotations

import torch


def _tiles_host(plan) -> list[tuple[torch.Tensor, int]]:
    """(token rows, slot) per non-empty tile."""
    perm = plan.perm.long() if plan.perm is not None else None
    out = []
    for slot, first, n in plan.tiles.T.tolist():
        if n > 0:
            rows = perm[first : first + n] if perm is not None else torch.arange(first, first + n)
            out.append((rows.to(plan.tiles.device), slot))
    return out


def lora_shrink_ref(x, lora_a, ranks, plan, *, rank: int, splits=None) -> torch.Tensor:
    v = torch.full((1, x.shape[0], lora_a.shape[1]), float("nan"), device=x.device)  # uncovered rows
    for rows, slot in _tiles_host(plan):
        v[0, rows] = x[rows].float() @ lora_a[slot].float().T
    return v


def lora_expand_ref(y, v, lora_b, ranks, plan, *, rank: int, slices=None) -> torch.Tensor:
    n = lora_b.shape[1]
    slices = list(slices) if slices is not None else [(0, n, 0)]
    for rows, slot in _tiles_host(plan):
        vs = v[:, rows].float().sum(0)  # [rows, NT*R]
        for i, (b0, b1, y0) in enumerate(slices):
            delta = vs[:, i * rank : (i + 1) * rank] @ lora_b[slot, b0:b1].float().T
            cols = slice(y0, y0 + b1 - b0)
            y[rows, cols] = (y[rows, cols].float() + delta.to(y.dtype).float()).to(y.dtype)  # delta rounded
    return y
