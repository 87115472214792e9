"""model/attention/torch_cuda.flash_varlen (the FlashAttention-2 op called without varlen_attn's Python
layers, KV heads not repeated) against varlen_attn itself on repeated KV heads: ragged sequences, GQA,
causal and windowed, queries that continue a longer key sequence (a cached prefix)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.varlen import varlen_attn

from model.attention.torch_cuda import flash_varlen

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("window", [None, 5, 64])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (9, 3)])
@pytest.mark.parametrize("prefix", [False, True])
def test_flash_varlen_equals_varlen_attn(window, heads, prefix):
    hq, hkv = heads
    g = torch.Generator(device="cuda").manual_seed(hq * 10 + hkv + (window or 0))
    new = [37, 1, 130, 64]
    old = [20, 5, 0, 100] if prefix else [0, 0, 0, 0]
    total = [n + o for n, o in zip(new, old, strict=True)]
    q = torch.randn(sum(new), hq, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(sum(total), hkv, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(sum(total), hkv, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    window_size = (-1, 0) if window is None else (window - 1, 0)
    got = flash_varlen(q, k, v, _cu(new), _cu(total), max(new), max(total), 0.125, window_size)
    rep = hq // hkv
    k_full, v_full = (x.repeat_interleave(rep, dim=1) for x in (k, v))
    want = varlen_attn(q, k_full, v_full, _cu(new), _cu(total), max(new), max(total), scale=0.125,
                       window_size=window_size)  # fmt: skip
    assert got.shape == want.shape == q.shape
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    # strided views (column slices of a fused qkv output) give the same
    qkv = torch.cat([q.flatten(1), torch.zeros(q.shape[0], 64, device="cuda", dtype=q.dtype)], dim=1)
    q_view = qkv[:, : hq * 64].view(-1, hq, 64)
    again = flash_varlen(q_view, k, v, _cu(new), _cu(total), max(new), max(total), 0.125, window_size)
    assert torch.equal(again, got)
