"""A one-row projection input that the projection's GEMV computes itself: the norm or activation before it
is then never launched as a kernel of its own.

At batch 1 a decode step is a chain of GEMVs and small kernels, and each small kernel is a launch in
which HBM idles (~2 us each on an H200, three a layer: the two norms and silu_and_mul). With the GEMV
route of model/layers/gemv.py installed, a layer whose batch is one row without LoRA (on one rank) hands
its projections these instead of tensors:

    NormedRow(norm, s)          ->  norm(s), s the residual stream (the residual add already done by the
                                    epilogue of the GEMV that produced s: o_proj / down_proj with `add`)
    SiluMulRow(gate_up, act)    ->  silu(gate) * up

The projection's GEMV computes them in its programs (model/kernels/gemm.py: gemv_rmsnorm, gemv_silu_mul),
rounded as the unfused kernels round. Where no GEMV takes the shape, `materialize()` runs the unfused op,
once (a consumer that reads the row twice gets the same tensor).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class DeferredRow:
    """An input row of one token not computed yet (see the module docstring)."""

    _value: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._compute()
        return self._value

    def _compute(self) -> torch.Tensor:
        raise NotImplementedError

    def gemv(self, w: torch.Tensor, cfg, workspace, pdl: bool, add: torch.Tensor | None) -> torch.Tensor:
        """self @ w^T (+ add) through the fused GEMV of model/kernels/gemm.py with `cfg` (one-row config)."""
        raise NotImplementedError


class NormedRow(DeferredRow):
    def __init__(self, norm, x: torch.Tensor):
        # norm: model.layers.norm.RMSNorm (weight [H], eps; its forward is the unfused op); x [1, H]
        assert x.shape[0] == 1, "one row"
        self.norm, self.x = norm, x

    def _compute(self) -> torch.Tensor:
        return self.norm(self.x)[0]

    def gemv(self, w, cfg, workspace, pdl, add):
        from model.kernels.gemm import gemv_rmsnorm

        assert add is None, "a norm's projections (qkv, gate_up) add no residual"
        return gemv_rmsnorm(self.x.contiguous(), self.norm.weight, self.norm.eps, w, cfg, workspace, pdl=pdl)


class SiluMulRow(DeferredRow):
    def __init__(self, gate_up: torch.Tensor, act: Callable | None = None):
        # act: the fused silu_and_mul kernel (None: torch)
        assert gate_up.shape[0] == 1, "one row"
        self.gate_up, self.act = gate_up, act

    def _compute(self) -> torch.Tensor:
        if self.act is not None and self.gate_up.is_cuda:
            return self.act(self.gate_up)
        gate, up = self.gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gemv(self, w, cfg, workspace, pdl, add):
        from model.kernels.gemm import gemv_silu_mul

        return gemv_silu_mul(self.gate_up.contiguous(), w, cfg, workspace, pdl=pdl, add=add)
