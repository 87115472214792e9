"""The qkv projection of one decode token with everything around it in one kernel (Triton, Hopper route):
RMSNorm of the residual stream in, rope on q and k and the K/V cache write out.

    qkv_rope_gemv(x [1, K], norm_weight, eps, w [N, K], ...) -> qkv [1, N], N = (Hq + 2 Hkv) * D:
        h = norm_weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)          (model/kernels/gemm.py: prologue)
        y = (h @ w^T).to(dtype)
        for each q and k head: y[head] = rope(y[head], cos[pos], sin[pos])   rounded to dtype
        if slot >= 0: k_cache[slot], v_cache[slot] = k heads, v heads      (fp8: scaled and saturated)
    what model/kernels/rmsnorm.py, gemm.py and rotary.py compute in three launches (rotary_kv_write_ref
    is the reference for the last step).

Tiles: the neox rope pairs element j of a head with element j + D/2, so each program's 64 output rows are
32 such pairs of one head (rows j0..j0+31 and D/2+j0..D/2+j0+31): the epilogue of the program that writes
the tile (the last split to arrive) rotates them from registers. Needs D/2 a multiple of 32 (D = 64, 128,
256). Otherwise the GEMV of gemm.py: the same K loop, split-K reduction and programmatic-dependent launch.

Why: at batch 1 the rope + KV write kernel is a launch whose ~2 us on the critical path moves almost no
bytes (bench/pdl_decode.py).

Measured on an H200 (bench/gemv_rows.py, h200-gemv-rows-2026-12-01-rope*.json): a first version issued
the x chunk's loads and math before W's load in its K loop and took 20.3 us against 16.3 for the norm GEMV
plus 2.3 for rotary_kv_write; in the batch-1 decode graph 4.184 against 4.142 ms without it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels.gemm import GemmConfig, GemmWorkspace, _row_chunk, _row_rstd, _split_total
from model.kernels.rotary import cache_scale_args

PAIRS = 32  # rope pairs a program rotates: BLOCK_N = 2 * PAIRS output rows


@triton.jit
def _qkv_rope_kernel(x_ptr, nw_ptr, eps, w_ptr, out_ptr, part_ptr, cnt_ptr, N, K,
                     pos_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin, slot_ptr, kc_ptr, vc_ptr,
                     stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                     k_scale_ptr, v_scale_ptr, k_inv, v_inv, block_size, Hq, Hkv,
                     HALF: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     FULL_K: tl.constexpr, PDL: tl.constexpr, FP8: tl.constexpr,
                     SCALE_FROM_PTR: tl.constexpr):  # fmt: skip
    # grid (N // 64, SPLIT_K)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    p0 = pid_n * PAIRS  # first pair of this tile; a tile never straddles heads (HALF % PAIRS == 0)
    head = p0 // HALF
    j = p0 % HALF + tl.arange(0, PAIRS)  # [PAIRS] element index in the head's first half
    row1 = head * 2 * HALF + j  # [PAIRS] output rows (= W rows) of the first halves; + HALF: second
    # the tile's 64 W rows: [first halves | second halves], one [64, BK] load a step as in the plain GEMV
    r = tl.arange(0, 2 * PAIRS)
    rows = head * 2 * HALF + (r // PAIRS) * HALF + p0 % HALF + r % PAIRS
    offs_k = tl.arange(0, BLOCK_K)
    k_chunk = tl.multiple_of(K // SPLIT_K, BLOCK_K)
    k = split * k_chunk + offs_k
    w_ptrs = w_ptr + rows[:, None] * K + k[None, :]  # [2 * PAIRS, BK]
    if PDL:
        tl.extra.cuda.gdc_wait()
    # what the epilogue needs besides the sums, asked for now so that its latency hides behind the W stream
    pos = tl.load(pos_ptr).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_cos + j).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_sin + j).to(tl.float32)
    slot = tl.load(slot_ptr).to(tl.int64)
    rstd = _row_rstd(x_ptr, K, eps, FULL_K)
    lanes = tl.zeros([2 * PAIRS, BLOCK_K], dtype=tl.float32)
    for _ in range(0, k_chunk, BLOCK_K):
        # W's load issued first: with one stage the x chunk's loads, math and layout change then run
        # while it is in flight (the other order cost 4 us a launch at 7B qkv)
        w = tl.load(w_ptrs).to(tl.float32)
        xv = _row_chunk(x_ptr, nw_ptr, k, K, rstd, 1)  # ROW_RMSNORM
        lanes += w * xv[None, :]
        w_ptrs += BLOCK_K
        k += BLOCK_K
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.sum(lanes, axis=1)[None, :]  # [1, 2 * PAIRS]: [first halves | second halves]
    ok = tl.full((1, 2 * PAIRS), 1, tl.int1)
    total, mine = _split_total(acc, part_ptr, cnt_ptr, ok, pid_n, N // (2 * PAIRS), split, SPLIT_K, 1,
                               2 * PAIRS)  # fmt: skip
    if mine:
        dtype = out_ptr.dtype.element_ty
        a, b = tl.split(tl.trans(tl.reshape(total, (2, PAIRS))))  # [PAIRS] each: halves, fp32 sums
        a = a.to(dtype).to(tl.float32)  # the projection's output, rounded as the matmul rounds it
        b = b.to(dtype).to(tl.float32)
        if head < Hq + Hkv:  # q or k: rope in fp32, rounded (x * cos + rotate_half(x) * sin)
            a, b = a * c - b * s, b * c + a * s
        a = a.to(dtype)
        b = b.to(dtype)
        tl.store(out_ptr + row1, a)
        tl.store(out_ptr + row1 + HALF, b)
        if (head >= Hq) & (slot >= 0):  # k or v head: into the cache at the token's slot
            blk = slot // block_size
            off = slot % block_size
            is_k = head < Hq + Hkv
            kv_head = tl.where(is_k, head - Hq, head - Hq - Hkv)
            if is_k:
                ptr = kc_ptr + blk * stride_kcb + off * stride_kct + kv_head * stride_kch + j
                inv = k_inv
                if SCALE_FROM_PTR:
                    inv = 1.0 / tl.load(k_scale_ptr).to(tl.float32)
            else:
                ptr = vc_ptr + blk * stride_vcb + off * stride_vct + kv_head * stride_vch + j
                inv = v_inv
                if SCALE_FROM_PTR:
                    inv = 1.0 / tl.load(v_scale_ptr).to(tl.float32)
            ca = a.to(tl.float32)
            cb = b.to(tl.float32)
            if FP8:  # saturate like cvt.satfinite (model/kernels/rotary.py)
                ca = tl.clamp(ca * inv, -448.0, 448.0)
                cb = tl.clamp(cb * inv, -448.0, 448.0)
            tl.store(ptr, ca.to(kc_ptr.dtype.element_ty))
            tl.store(ptr + HALF, cb.to(kc_ptr.dtype.element_ty))


def supports(cfg: GemmConfig, head_dim: int) -> bool:
    """Whether this kernel can run the qkv GEMV of `cfg` (one row, 64 output rows a program) at head_dim."""
    return cfg.gemv and cfg.block_m == 1 and cfg.block_n == 2 * PAIRS and (head_dim // 2) % PAIRS == 0


def qkv_rope_gemv(x, norm_weight, eps: float, w, cfg: GemmConfig, workspace: GemmWorkspace | None,
                  positions, cos, sin, k_cache, v_cache, slots, num_heads: int, num_kv_heads: int, *,
                  k_scale=None, v_scale=None, pdl: bool = False) -> torch.Tensor:  # fmt: skip
    """qkv [1, N] of one token (module docstring): x [1, K] the residual stream, norm_weight [K], w [N, K]
    with N = (num_heads + 2 num_kv_heads) * D; positions [1] (the row of cos / sin, [*, D/2] or [*, D]),
    slots [1] int64 (-1: no cache write); k_cache / v_cache [blocks, block_size, Hkv, D] (bf16 / fp16, or
    fp8 e4m3 with k_scale / v_scale floats or 1-element tensors). q and k come back rotated."""
    n, kdim = w.shape
    d = n // (num_heads + 2 * num_kv_heads)
    assert n == (num_heads + 2 * num_kv_heads) * d and supports(cfg, d), (n, d, cfg)
    assert x.shape == (1, kdim) and x.is_contiguous() and w.is_contiguous() and x.dtype == w.dtype
    assert norm_weight.shape == (kdim,) and norm_weight.dtype == x.dtype and norm_weight.is_contiguous()
    assert cos.shape[1] in (d // 2, d) and cos.stride(-1) == 1 and sin.stride(-1) == 1
    assert positions.numel() == 1 and slots.numel() == 1 and slots.dtype == torch.int64
    assert k_cache.shape[-2:] == (num_kv_heads, d) and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    why = cfg.check(n, kdim)
    assert why is None, why
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    scale_ptr, ks_t, vs_t, k_inv, v_inv = cache_scale_args(k_scale, v_scale, slots)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    part, cnt = GemmWorkspace.buffers(workspace, cfg, 1, n, out)
    launch = {"launch_pdl": True} if pdl else {}
    _qkv_rope_kernel[(n // cfg.block_n, cfg.split_k)](
        x, norm_weight, float(eps), w, out, part, cnt, n, kdim,
        positions, cos, sin, cos.stride(0), sin.stride(0), slots, k_cache, v_cache,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        ks_t, vs_t, k_inv, v_inv, k_cache.shape[1], num_heads, num_kv_heads,
        HALF=d // 2, PAIRS=PAIRS, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        FULL_K=triton.next_power_of_2(kdim),
        PDL=pdl, FP8=fp8, SCALE_FROM_PTR=scale_ptr, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch,
    )  # fmt: skip
    return out
