"""The dense GEMM / GEMV kernels (model/kernels/gemm.py) on CUDA at the Mistral-7B shapes.

Same bound as tests/unit/test_gemm_interpret.py: |out - exact| <= K * 2^-24 * (|x| @ |w|^T) + 2^-8 |exact|
(fp32 accumulation of exact bf16 products, then one bf16 rounding), exact = the fp64 product. Also: split-K
counters back at zero, repeated calls bitwise equal, a CUDA graph replayed on new inputs.
Run on the GPU machine: python -m pytest -m gpu tests/gpu/test_gemm_gpu.py -p no:cacheprovider
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
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def check_close(out, x, w):
    assert not torch.isnan(out).any(), "NaN: an output element was never written"
    xd, wd = x.double(), w.double()
    exact = xd @ wd.T
    bound = x.shape[1] * 2.0**-24 * (xd.abs() @ wd.abs().T) * 1.01 + 2.0**-8 * exact.abs()
    err = (out.double() - exact).abs()
    assert (err <= bound + 1e-30).all(), f"{int((err > bound).sum())} elements off, worst {err.max():.3g}"
    return (out.float() - torch.nn.functional.linear(x, w).float()).abs().max().item()


def configs(gm, m):
    if m <= 8:
        bm = 1 << (m - 1).bit_length()
        return [gm.GemmConfig(gemv=True, block_m=bm, block_n=64 if bm == 1 else 16, block_k=128, split_k=s,
                              num_warps=4) for s in (1, 4)]  # fmt: skip
    return [gm.GemmConfig(block_m=16 if m <= 32 else 64, block_n=64, block_k=64, split_k=2, swap_ab=m <= 32),
            gm.GemmConfig(block_m=64, block_n=128, block_k=64, split_k=1, group_m=8, num_warps=4),
            gm.GemmConfig(block_m=128, block_n=128, block_k=64, split_k=2, group_m=8, num_warps=8)]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("m", [1, 3, 8, 17, 64, 160, 256])
def test_gemm_real_shapes(shape, m):
    from model.kernels import gemm as gm

    n, k = SHAPES[shape]
    gen = torch.Generator(device=DEV).manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device=DEV, generator=gen).bfloat16()
    w = (torch.randn(n, k, device=DEV, generator=gen) * 0.02).bfloat16()
    cfgs = configs(gm, m)
    ws = gm.GemmWorkspace.for_shapes(DEV, [(c, m, n) for c in cfgs])
    for cfg in cfgs:
        out = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
        gm.gemm(x, w, cfg, ws, out=out)
        diff = check_close(out, x, w)
        print(f"{shape} M={m} {cfg.short()}: max |triton - F.linear| = {diff:.3g}")
        assert ws.counters.eq(0).all(), cfg
        for _ in range(3):  # arrival order varies between runs; the sum order does not
            assert torch.equal(gm.gemm(x, w, cfg, ws), out), cfg


def test_gemm_in_cuda_graph():
    from model.kernels import gemm as gm

    n, k, m = 4096, 14336, 5
    cfg = gm.GemmConfig(gemv=True, block_m=8, block_n=16, block_k=128, split_k=8)
    w = (torch.randn(n, k, device=DEV) * 0.02).bfloat16()
    x = torch.randn(m, k, device=DEV).bfloat16()
    out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
    ws = gm.GemmWorkspace.for_shapes(DEV, [(cfg, m, n)])
    gm.gemm(x, w, cfg, ws, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(4):  # the counters must be back at 0 between launches inside one graph too
            gm.gemm(x, w, cfg, ws, out=out)
    for _ in range(3):
        x.copy_(torch.randn(m, k, device=DEV).bfloat16())
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        check_close(out, x, w)
        assert ws.counters.eq(0).all()

