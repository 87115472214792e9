"""Triton SiLU-and-mul equals torch's silu(gate) * up on fresh random inputs (outputs poisoned first)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from model.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,inter", [(1, 14336), (7, 1000), (64, 14336), (300, 512)])
def test_silu_and_mul_matches_torch(tokens, inter, dtype):
    gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=dtype) * 3
    out = torch.full((tokens, inter), float("nan"), device="cuda", dtype=dtype)
    silu_and_mul(gate_up, out=out)
    ref = silu_and_mul_ref(gate_up.float()).to(dtype)
    assert torch.isfinite(out).all()
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


@pytest.mark.parametrize("tokens,inter", [(1, 14336), (33, 1000)])
def test_silu_and_mul_adds_the_lora_delta_rounded_as_torch(tokens, inter):
    gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16) * 3
    delta = torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16) * 0.3
    out = torch.full((tokens, inter), float("nan"), device="cuda", dtype=torch.bfloat16)
    silu_and_mul(gate_up, out=out, delta=delta)
    ref = silu_and_mul_ref(gate_up, delta=delta)  # bf16 torch ops: gate_up + delta rounded, then silu * up
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
