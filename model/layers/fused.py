"""The one place that picks fused Triton kernels for the model's elementwise work.

A decode step of a 7B model at batch 1 spent ~1.5 ms of ~6 ms in small elementwise kernels (the
unfused RMSNorm alone is ~7 kernels, rotary ~8, the KV write 2, per layer; profile in
bench/profile_decode.py, H200, 2026-11-27). On CUDA with triton importable these are replaced by:

  add_rmsnorm      (x, residual, weight, eps) -> (normed, x + residual)   one kernel per norm
  rotary_kv_write  rope on q, k in place + K/V cache write by slot        one kernel per layer (decode)
  silu_and_mul     gate_up [T, 2I] -> silu(gate) * up [T, I]              one kernel instead of two

Elsewhere (CPU, no triton, head dims the kernels are not built for) both are None and the layers run
their torch code: the torch code is the specification the kernels are tested against.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FusedOps:
    add_rmsnorm: Callable | None = None
    rotary_kv_write: Callable | None = None
    silu_and_mul: Callable | None = None

    def with_pdl(self) -> FusedOps:
        """The same ops, the norm and silu_and_mul letting a programmatic dependent (the GEMV of
        model/layers/gemv.py that reads their output) launch at their start. (Decode's rope + KV write
        is launched as a dependent itself when the attention backend's `pdl` is set.)"""
        return dataclasses.replace(
            self,
            add_rmsnorm=self.add_rmsnorm and functools.partial(self.add_rmsnorm, pdl_trigger=True),
            silu_and_mul=self.silu_and_mul and functools.partial(self.silu_and_mul, pdl_trigger=True),
        )

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype, head_dim: int) -> FusedOps:
        if device.type != "cuda" or importlib.util.find_spec("triton") is None:
            return cls()
        from model.kernels.activation import silu_and_mul
        from model.kernels.rmsnorm import fused_add_rmsnorm

        rotary = None
        if dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128, 256):
            from model.kernels.rotary import rotary_kv_write

            rotary = rotary_kv_write
        return cls(add_rmsnorm=fused_add_rmsnorm, rotary_kv_write=rotary, silu_and_mul=silu_and_mul)
