"""The Triton LoRA kernels on CUDA keep a slot of non-finite weights in that slot's own rows (marker gpu).

Slots 0 and 1 hold NaN (slot 0 is also the placeholder index base rows use): base rows and rows of slot 2
must come out exactly as without those adapters, in decode (a plan from per-token slots, three
members of a fused group) and prefill (a plan from host segments).
Run: python -m pytest -m gpu tests/gpu/test_lora_isolation_gpu.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_triton_lora_isolates_poisoned_slots(dtype, poison):
    from model.kernels import lora

    gen = torch.Generator(device=DEV).manual_seed(5)
    T, S, R, fan_in, outs = 64, 4, 16, 4096, (4096, 1024, 1024)
    out = sum(outs)
    x = torch.randn(T, fan_in, generator=gen, device=DEV).to(dtype)
    a = torch.randn(S, 3 * R, fan_in, generator=gen, device=DEV).to(dtype) * 0.01
    b = torch.randn(S, out, R, generator=gen, device=DEV).to(dtype) * 0.01
    a[:2], b[:2] = poison, poison
    a_ok, b_ok = a.clone(), b.clone()
    a_ok[:2], b_ok[:2] = 0, 0
    ranks = torch.full((S,), R, dtype=torch.int32, device=DEV)
    q, k = outs[0], outs[0] + outs[1]
    slices = [(0, q, 0), (q, k, q), (k, out, k)]  # (B rows, y column) per member
    y0 = torch.randn(T, out, generator=gen, device=DEV).to(dtype)

    def run(plan, wa, wb, ref=False):
        y = y0.clone()
        shrink = lora.lora_shrink_ref if ref else lora.lora_shrink
        expand = lora.lora_expand_ref if ref else lora.lora_expand
        expand(y, shrink(x, wa, ranks, plan, rank=R), wb, ranks, plan, rank=R, slices=slices)
        return y

    # decode: a plan from per-token slots (base rows -1 in no tile)
    idx = torch.tensor([(-1, 2, 1, 0)[t % 4] for t in range(T)], dtype=torch.int32, device=DEV)
    plan = lora.plan_from_slots(idx, S)
    y, ref = run(plan, a, b), run(plan, a_ok, b_ok, ref=True)
    assert torch.equal(y[idx < 0], y0[idx < 0])
    clean = idx == 2
    assert torch.isfinite(y[clean]).all()
    torch.testing.assert_close(y[clean].float(), ref[clean].float(), rtol=2e-2, atol=2e-2)

    # prefill: a plan from host segments; rows 32..48 are on the base model (in no segment)
    plan = lora.plan_from_segments([(0, 16, 1), (16, 32, 2), (48, 64, 0)], T, DEV)
    y, ref = run(plan, a, b), run(plan, a_ok, b_ok, ref=True)
    assert torch.equal(y[32:48], y0[32:48])
    assert torch.isfinite(y[16:32]).all()
    torch.testing.assert_close(y[16:32].float(), ref[16:32].float(), rtol=2e-2, atol=2e-2)
