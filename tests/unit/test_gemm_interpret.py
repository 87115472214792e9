"""The dense GEMM / GEMV kernels (model/kernels/gemm.py) under the Triton interpreter, small shapes.

Accuracy is checked against the exact (fp64) product with a bound that holds for any summation order:
|out - exact| <= K * 2^-24 * (|x| @ |w|^T) (fp32 accumulation of exact products: bf16 x bf16 fits in
fp32's mantissa) plus, for bf16 outputs, half a bf16 ulp of the result (<= 2^-8 |exact|), i.e. the kernel
is as exact as any fp32-accumulating GEMM; the torch reference meets the same bound. Split-K: counters
back at 0 after each call, a second call bitwise equal, a NaN-poisoned output (and workspace) fully
overwritten while the rows around the output stay untouched. The GPU runs real shapes in
tests/gpu/test_gemm_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_interpret import INTERPRETER_MARKS, interpreted

pytestmark = INTERPRETER_MARKS


@pytest.fixture(scope="module")
def gm():
    with interpreted(("gemm",)) as mods:
        yield mods["gemm"]


def check_close(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    assert not torch.isnan(out).any(), "NaN: an output element was never written"
    exact = x.double() @ w.double().T
    bound = x.shape[1] * 2.0**-24 * (x.double().abs() @ w.double().abs().T) * 1.01
    if out.dtype != torch.float32:
        bound = bound + 2.0**-8 * exact.abs()
    bad = (out.double() - exact).abs() > bound + 1e-30
    assert not bad.any(), f"{int(bad.sum())} elements off; worst {(out.double() - exact).abs().max():.3g}"


def cfg_of(gm, **kw):
    return gm.GemmConfig(**kw)


CASES = [
    # M, N, K, config fields, dtype
    (1, 128, 256, dict(gemv=True, block_m=1, block_n=32, block_k=64, split_k=1), torch.bfloat16),
    (1, 64, 256, dict(gemv=True, block_m=1, block_n=32, block_k=32, split_k=4), torch.bfloat16),
    (3, 128, 128, dict(gemv=True, block_m=4, block_n=16, block_k=32, split_k=2), torch.bfloat16),
    (3, 64, 192, dict(gemv=True, block_m=2, block_n=64, block_k=64, split_k=1), torch.float32),
    (17, 128, 256, dict(block_m=16, block_n=64, block_k=32, split_k=4, group_m=2), torch.bfloat16),
    (17, 64, 128, dict(block_m=32, block_n=32, block_k=64, split_k=2, swap_ab=True), torch.bfloat16),
    (17, 192, 64, dict(block_m=16, block_n=64, block_k=64, split_k=1), torch.float32),
    (160, 128, 128, dict(block_m=64, block_n=64, block_k=32, split_k=2, group_m=2), torch.bfloat16),
    (160, 256, 64, dict(block_m=64, block_n=128, block_k=64, split_k=1, group_m=4), torch.bfloat16),
    (160, 64, 256, dict(block_m=32, block_n=64, block_k=64, split_k=4, swap_ab=True), torch.float32),
    (64, 128, 128, dict(block_m=64, block_n=32, block_k=64, split_k=1, group_m=1), torch.bfloat16),
]


def _id(c):
    m, n, k, f, dt = c
    kind = "gemv" if f.get("gemv") else ("swap" if f.get("swap_ab") else "dot")
    return f"{kind}-M{m}-N{n}-K{k}-s{f['split_k']}-{str(dt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gemm_matches_exact_product(gm, case):
    m, n, k, fields, dtype = case
    cfg = cfg_of(gm, **fields)
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    part, cnt = gm.GemmWorkspace.needs(cfg, m, n)
    ws = gm.GemmWorkspace.allocate("cpu", part + 7, cnt + 3)
    ws.partials.fill_(float("nan"))  # partials are written before they are read
    guard = torch.full(((m + 2) * n,), float("nan")).to(dtype)
    out = guard[n : n + m * n].view(m, n)  # the row above and the rows below must stay untouched
    res = gm.gemm(x, w, cfg, ws, out=out)
    assert res.data_ptr() == out.data_ptr()
    check_close(out, x, w)
    check_close(gm.gemm_ref(x, w), x, w)
    assert torch.isnan(guard[:n]).all() and torch.isnan(guard[n + m * n :]).all(), "wrote outside out"
    assert ws.counters.eq(0).all(), "split-K counters not reset"
    first = out.clone()
    again = gm.gemm(x, w, cfg, ws)  # allocating path, same workspace: the reset counters work again
    assert torch.equal(again, first)
    assert ws.counters.eq(0).all()


def test_shared_workspace_across_shapes(gm):
    """One workspace serves calls of different shapes and configs in turn (as the layers would)."""
    gen = torch.Generator().manual_seed(3)
    calls = [(5, 128, 256, cfg_of(gm, gemv=True, block_m=8, block_n=16, block_k=64, split_k=4)),
             (33, 64, 128, cfg_of(gm, block_m=32, block_n=32, block_k=32, split_k=2)),
             (2, 128, 128, cfg_of(gm, gemv=True, block_m=2, block_n=64, block_k=32, split_k=2))]
    ws = gm.GemmWorkspace.for_shapes("cpu", [(c, m, n) for m, n, _, c in calls])
    for m, n, k, cfg in calls * 2:
        x = torch.randn(m, k, generator=gen).bfloat16()
        w = torch.randn(n, k, generator=gen).bfloat16()
        check_close(gm.gemm(x, w, cfg, ws), x, w)
        assert ws.counters.eq(0).all()


def test_gemm_rejects_bad_shapes(gm):
    x = torch.randn(4, 96).bfloat16()
    with pytest.raises(AssertionError, match="multiples of 64"):
        gm.gemm(x, torch.randn(64, 96).bfloat16(), cfg_of(gm, block_n=32, block_k=32))
    x = torch.randn(4, 128).bfloat16()
    with pytest.raises(AssertionError, match="BLOCK_N"):
        gm.gemm(x, torch.randn(64, 128).bfloat16(), cfg_of(gm, block_n=128))
    with pytest.raises(AssertionError, match="chunks"):
        gm.gemm(x, torch.randn(64, 128).bfloat16(), cfg_of(gm, block_n=64, block_k=64, split_k=4))
    with pytest.raises(AssertionError, match="contiguous"):
        gm.gemm(torch.randn(128, 4).bfloat16().T, torch.randn(64, 128).bfloat16(), cfg_of(gm, block_n=64))
    small = gm.GemmWorkspace.allocate("cpu", 10, 1)
    with pytest.raises(AssertionError, match="workspace too small"):
        gm.gemm(x, torch.randn(64, 128).bfloat16(), cfg_of(gm, block_m=16, block_n=64, split_k=2), small)
    with pytest.raises(AssertionError, match="power of two"):
        cfg_of(gm, block_n=96)



# The one-row GEMV computing its row (gemv_rmsnorm, gemv_silu_mul) and adding the residual (`add`): the row
# it multiplies must be the unfused kernels' output (model/kernels/rmsnorm.py, activation.py, whose torch
# references define the rounding), so the product is checked against gemm_ref of that row.
PROLOGUE_CFGS = [dict(block_n=32, block_k=64, split_k=1), dict(block_n=64, block_k=32, split_k=4)]


def _pid(f):
    return f"s{f['split_k']}"


@pytest.mark.parametrize("fields", PROLOGUE_CFGS, ids=_pid)
def test_gemv_rmsnorm_equals_norm_then_gemv(gm, fields):
    from model.kernels.rmsnorm import fused_add_rmsnorm_ref

    cfg = cfg_of(gm, gemv=True, block_m=1, num_stages=1, **fields)
    gen = torch.Generator().manual_seed(11)
    k, n = 384, 128  # K not a power of two: the 1/rms pass masks its tail
    x = (torch.randn(1, k, generator=gen) * 3).bfloat16()
    nw = (1 + 0.1 * torch.randn(k, generator=gen)).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    ws = gm.GemmWorkspace.for_shapes("cpu", [(cfg, 1, n)])
    out = gm.gemv_rmsnorm(x, nw, 1e-5, w, cfg, ws)
    normed, _ = fused_add_rmsnorm_ref(x, None, nw, 1e-5)
    check_close(out, normed, w)
    # the same rounding as the unfused pair: differences only where fp32 1/rms sums in another order
    # tip a bf16 rounding of the normed row (none at this size)
    assert torch.equal(out, gm.gemm(normed.contiguous(), w, cfg, ws))
    assert ws.counters.eq(0).all()


@pytest.mark.parametrize("fields", PROLOGUE_CFGS, ids=_pid)
@pytest.mark.parametrize("with_add", [False, True])
def test_gemv_silu_mul_equals_activation_then_gemv(gm, fields, with_add):
    from model.kernels.activation import silu_and_mul_ref

    cfg = cfg_of(gm, gemv=True, block_m=1, num_stages=1, **fields)
    gen = torch.Generator().manual_seed(12)
    k, n = 256, 64
    gate_up = (torch.randn(1, 2 * k, generator=gen) * 4).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    add = torch.randn(1, n, generator=gen).bfloat16() if with_add else None
    ws = gm.GemmWorkspace.for_shapes("cpu", [(cfg, 1, n)])
    out = gm.gemv_silu_mul(gate_up, w, cfg, ws, add=add)
    act = silu_and_mul_ref(gate_up)
    plain = gm.gemm(act.contiguous(), w, cfg, ws)
    check_close(plain, act, w)
    assert torch.equal(out, plain if add is None else plain + add)  # bf16 + bf16: rounded once, as torch


@pytest.mark.parametrize("fields", PROLOGUE_CFGS, ids=_pid)
def test_gemv_add_is_the_residual_add_in_the_activation_dtype(gm, fields):
    cfg = cfg_of(gm, gemv=True, block_m=1, num_stages=1, **fields)
    gen = torch.Generator().manual_seed(13)
    x, w = torch.randn(1, 256, generator=gen).bfloat16(), torch.randn(128, 256, generator=gen).bfloat16()
    add = (torch.randn(1, 128, generator=gen) * 10).bfloat16()
    ws = gm.GemmWorkspace.for_shapes("cpu", [(cfg, 1, 128)])
    assert torch.equal(gm.gemm(x, w, cfg, ws, add=add), gm.gemm(x, w, cfg, ws) + add)
    assert ws.counters.eq(0).all()


def test_gemv_prologues_reject_what_they_cannot_take(gm):
    cfg = cfg_of(gm, gemv=True, block_m=1, block_n=32, block_k=64)
    x, w, nw = torch.randn(1, 128).bfloat16(), torch.randn(64, 128).bfloat16(), torch.ones(128).bfloat16()
    with pytest.raises(AssertionError, match="one row"):
        gm.gemv_rmsnorm(x, nw, 1e-5, w, cfg_of(gm, gemv=True, block_m=2, block_n=32, block_k=64))
    with pytest.raises(AssertionError, match="add: one-row"):
        gm.gemm(torch.randn(2, 128).bfloat16(), w, cfg, add=torch.zeros(1, 64).bfloat16())
    with pytest.raises(AssertionError):
        gm.gemv_silu_mul(x, w, cfg)  # gate_up must be [1, 2K]


@pytest.fixture(scope="module")
def rope_gm():
    with interpreted(("gemm", "gemv_rope", "rotary")) as mods:
        yield mods


@pytest.mark.parametrize("split_k,fp8,table", [(1, False, "half"), (2, True, "full"), (4, False, "full")])
def test_qkv_rope_gemv_equals_norm_gemv_then_rotary_kv_write(rope_gm, split_k, fp8, table):
    """The qkv projection with the norm in and rope + K/V cache write out equals the three-kernel chain
    (gemv_rmsnorm, then rotary_kv_write's reference) bit for bit: same sums, same roundings."""
    from model.kernels.rmsnorm import fused_add_rmsnorm_ref

    gm, gr, rot = rope_gm["gemm"], rope_gm["gemv_rope"], rope_gm["rotary"]
    hq, hkv, d, k, bs = 4, 2, 64, 256, 16
    n = (hq + 2 * hkv) * d
    cfg = cfg_of(gm, gemv=True, block_m=1, block_n=64, block_k=64, split_k=split_k, num_stages=1)
    gen = torch.Generator().manual_seed(split_k)
    x = (torch.randn(1, k, generator=gen) * 2).bfloat16()
    nw = (1 + 0.1 * torch.randn(k, generator=gen)).bfloat16()
    w = (torch.randn(n, k, generator=gen) * 0.1).bfloat16()
    pos = 37
    freqs = torch.outer(torch.arange(64).float(), 1e4 ** (-torch.arange(0, d, 2).float() / d))
    cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()  # [64, D/2]
    if table == "full":  # the [max_pos, D] layout (halves repeated)
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    cache_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    scales = dict(k_scale=torch.tensor([0.05]), v_scale=torch.tensor([0.02])) if fp8 else {}
    caches = [torch.zeros(6, bs, hkv, d).to(cache_dtype) for _ in range(4)]
    positions, slots = torch.tensor([pos]), torch.tensor([3 * bs + 5])
    ws = gm.GemmWorkspace.for_shapes("cpu", [(cfg, 1, n)])

    out = gr.qkv_rope_gemv(x, nw, 1e-5, w, cfg, ws, positions, cos, sin, caches[0], caches[1], slots, hq, hkv,
                           **scales)  # fmt: skip
    assert ws.counters.eq(0).all()
    normed, _ = fused_add_rmsnorm_ref(x, None, nw, 1e-5)
    ref = gm.gemm(normed.contiguous(), w, cfg, ws)
    heads = ref.view(-1, d)  # [Hq + 2 Hkv, D] view: the reference rotates q and k in place
    q, kk, v = heads[:hq][None], heads[hq : hq + hkv][None], heads[hq + hkv :][None]
    rot.rotary_kv_write_ref(q, kk, v, positions, cos, sin, caches[2], caches[3], slots, **scales)
    assert torch.equal(out, ref), "q, k rotated in place and v as the GEMV wrote them"
    for mine, theirs in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))  # raw bytes: fp8 too
    assert caches[0].float().abs().sum() > 0 and caches[1].float().abs().sum() > 0

    caches[0].zero_()
    gr.qkv_rope_gemv(x, nw, 1e-5, w, cfg, ws, positions, cos, sin, caches[0], caches[1], torch.tensor([-1]),
                     hq, hkv, **scales)  # fmt: skip
    assert caches[0].float().abs().sum() == 0, "slot -1 (a padding row) writes nothing"
