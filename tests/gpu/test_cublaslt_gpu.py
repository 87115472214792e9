"""The cuBLASLt candidates bench/lt_algos.py times (bench/cublaslt.py), on a GPU: every candidate
computes x @ W^T; a captured call replays the eager one bit for bit; wrong tensors are refused."""

from __future__ import annotations

import pytest
import torch

from bench.cublaslt import LtPlan, LtProblem, LtRuntime

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

DEV = torch.device("cuda")


def _sms() -> int:
    return torch.cuda.get_device_properties(DEV).multi_processor_count


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (64, 6144, 4096), (128, 4096, 14336), (160, 1024, 512)])
def test_every_candidate_computes_the_matmul(m, n, k):
    runtime = LtRuntime()
    plan = LtPlan.create(LtProblem(m, n, k), runtime, sm_targets=(0, _sms() - 32))
    assert len(plan.candidates) >= 2
    gen = torch.Generator(device=DEV).manual_seed(m + n)
    x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device=DEV, generator=gen) * 0.02).to(torch.bfloat16)
    ref = x.float() @ w.float().T
    scale = ref.abs().max().item()
    for cand in plan.candidates:
        out = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
        plan.run(x, w, out, cand)
        # bf16 output of an fp32 sum: within a few bf16 ulps of the exact result, whatever the order
        assert (out.float() - ref).abs().max().item() <= 8 * 2.0**-8 * scale, cand.describe()
    plan.close()


def test_a_captured_call_replays_the_eager_result_bit_for_bit():
    runtime = LtRuntime()
    m, n, k = 96, 4096, 4096
    plan = LtPlan.create(LtProblem(m, n, k), runtime)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
    for cand in plan.candidates[:4]:
        eager = plan.run(x, w, torch.empty(m, n, device=DEV, dtype=torch.bfloat16), cand).clone()
        out = torch.zeros(m, n, device=DEV, dtype=torch.bfloat16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan.run(x, w, out, cand)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


def test_run_refuses_tensors_the_plan_was_not_made_for():
    plan = LtPlan.create(LtProblem(8, 256, 128), LtRuntime())
    x = torch.randn(8, 128, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(256, 128, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(8, 256, device=DEV, dtype=torch.bfloat16)
    cand = plan.candidates[0]
    with pytest.raises(ValueError, match="do not match"):
        plan.run(x[:4], w, out, cand)
    with pytest.raises(ValueError, match="contiguous"):
        plan.run(x, w.t().contiguous().t(), out, cand)
    with pytest.raises(ValueError, match="dtypes"):
        plan.run(x.half(), w, out, cand)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        LtPlan.create(LtProblem(8, 256, 128, torch.float32), LtRuntime())
