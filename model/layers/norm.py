"""RMSNorm with an optional fused residual add, computed the way transformers does (float32 inside)."""

from __future__ import annotations

import torch
from torch import nn

from model.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.fused = None  # model.layers.fused.FusedOps.add_rmsnorm on CUDA: one kernel instead of ~7

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, delta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual): the sum is the next block's residual stream.
        `delta`: a LoRA delta of the projection that produced x, added to x first (model/adapters/batch.py).
        """
        if self.fused is not None and x.is_cuda:
            return self.fused(x, residual, self.weight, self.eps, delta=delta)
        if delta is not None:
            x = x + delta
        if residual is not None:
            x = x + residual  # in the model dtype, as transformers adds the residual
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype), x
