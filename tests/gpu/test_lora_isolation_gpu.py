"""The Triton LoRA kernels on CUDA keep a slot of non-finite weights in that slot's own rows (marker gpu).

Slots 0 and 1 hold NaN (slot 0 is also the placeholder index base rows use): base rows and rows of slot 2
must come out exactly as without those adapters, in decode (BGMV, also with several slices) and prefill
(SGMV). Run: python -m pytest -m gpu tests/gpu/test_lora_isolation_gpu.py -p no:cacheprovider
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
    idx = torch.tensor([(-1, 2, 1, 0)[t % 4] for t in range(T)], dtype=torch.int32, device=DEV)
    offsets = (0, outs[0], outs[0] + outs[1], out)
    y0 = torch.randn(T, out, generator=gen, device=DEV).to(dtype)
    y = y0.clone()
    lora.bgmv(y, x, a, b, idx, slice_offsets=offsets)
    assert torch.equal(y[idx < 0], y0[idx < 0])
    clean = idx == 2
    a_ok, b_ok = a.clone(), b.clone()
    a_ok[:2], b_ok[:2] = 0, 0
    ref = y0.clone()
    lora.bgmv_ref(ref, x, a_ok, b_ok, idx, slice_offsets=offsets)
    assert torch.isfinite(y[clean]).all()
    torch.testing.assert_close(y[clean].float(), ref[clean].float(), rtol=2e-2, atol=2e-2)

    starts = torch.tensor([0, 16, 32, 48], dtype=torch.int32, device=DEV)
    ends = torch.tensor([16, 32, 48, 64], dtype=torch.int32, device=DEV)
    slots = torch.tensor([1, 2, -1, 0], dtype=torch.int32, device=DEV)
    y = y0.clone()
    lora.sgmv(y, x, a, b, starts, ends, slots, max_seg_len=16, slice_offsets=offsets)
    assert torch.equal(y[32:48], y0[32:48])
    ref = y0.clone()
    lora.sgmv_ref(ref, x, a_ok, b_ok, starts, ends, slots, slice_offsets=offsets)
    assert torch.isfinite(y[16:32]).all()
    torch.testing.assert_close(y[16:32].float(), ref[16:32].float(), rtol=2e-2, atol=2e-2)
