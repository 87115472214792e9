"""Rotary embedding (neox / HF rotate_half convention) fused with the paged K/V cache write, in Triton.

One pass per token: read q, k, v and the token's cos/sin row, write rotated q and k back in place and
write k (rotated) and v into the cache at the token's slot; without fusion that is a rope kernel over q,
one over k and two scatter copies, re-reading k.

Cost model, Mistral-7B (Hq=32, Hkv=8, D=128, bf16), per token: read q,k,v (48 heads * 256 B = 12 KiB)
+ cos/sin (2 * 64 * 4 B), write q,k (10 KiB) + cache k,v (4 KiB): ~26.5 KiB; FLOPs ~6 per q/k element.
  decode T=64:    1.7 MB  -> 0.5 us at 3.35 TB/s; predicted ~3 us (launch-bound).
  prefill T=4096: 111 MB  ->  33 us at 3.35 TB/s; predicted ~45 us (per-token programs, gathers).
  T=16384:        444 MB  -> 133 us; predicted ~160 us.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def _load_heads(ptr, d_ptr, stride_h, stride_dh, n_heads, H_PAD: tl.constexpr, HALF: tl.constexpr,
                HAS_DELTA: tl.constexpr):
    """The halves of [n_heads, 2*HALF] at ptr (+ the LoRA delta at d_ptr, rounded to the input dtype)."""
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF)
    ok = (offs_h < n_heads)[:, None]
    p1 = ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=ok, other=0.0)
    x2 = tl.load(p1 + HALF, mask=ok, other=0.0)
    if HAS_DELTA:
        pd = d_ptr + offs_h[:, None] * stride_dh + offs_d[None, :]
        x1 = (x1.to(tl.float32) + tl.load(pd, mask=ok, other=0.0).to(tl.float32)).to(x1.dtype)
        x2 = (x2.to(tl.float32) + tl.load(pd + HALF, mask=ok, other=0.0).to(tl.float32)).to(x2.dtype)
    return p1, ok, x1, x2


@triton.jit
def _rope_heads(ptr, d_ptr, stride_h, stride_dh, n_heads, c, s, H_PAD: tl.constexpr, HALF: tl.constexpr,
                HAS_DELTA: tl.constexpr):
    """Rotate [n_heads, 2*HALF] at ptr (+ delta) in place; returns the rotated halves (input dtype)."""
    p1, ok, x1, x2 = _load_heads(ptr, d_ptr, stride_h, stride_dh, n_heads, H_PAD, HALF, HAS_DELTA)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    o1 = (a * c[None, :] - b * s[None, :]).to(x1.dtype)  # x * cos + rotate_half(x) * sin, first half
    o2 = (b * c[None, :] + a * s[None, :]).to(x1.dtype)  # second half
    tl.store(p1, o1, mask=ok)
    tl.store(p1 + HALF, o2, mask=ok)
    return o1, o2


@triton.jit
def _cache_store(cache_ptr, row_off, stride_h, n_heads, x1, x2, inv_scale,
                 H_PAD: tl.constexpr, HALF: tl.constexpr, FP8: tl.constexpr):
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF)
    ok = (offs_h < n_heads)[:, None]
    p1 = cache_ptr + row_off + offs_h[:, None] * stride_h + offs_d[None, :]
    if FP8:  # saturate like cvt.satfinite: out-of-range values become +-448, never NaN
        x1 = tl.clamp(x1.to(tl.float32) * inv_scale, -448.0, 448.0)
        x2 = tl.clamp(x2.to(tl.float32) * inv_scale, -448.0, 448.0)
    tl.store(p1, x1.to(cache_ptr.dtype.element_ty), mask=ok)
    tl.store(p1 + HALF, x2.to(cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                      k_scale_ptr, v_scale_ptr, dq_ptr, dk_ptr, dv_ptr, k_inv, v_inv, Hq, Hkv, block_size,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
                      stride_cos, stride_sin,
                      stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                      HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr, HALF: tl.constexpr,
                      FP8: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, HAS_DELTA: tl.constexpr,
                      PDL: tl.constexpr = False):
    if PDL:  # a programmatic dependent: let the next one (attention) launch, then wait for our inputs
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * stride_cos + offs_d).to(tl.float32)  # [HALF]; a [.., D] table repeats
    s = tl.load(sin_ptr + pos * stride_sin + offs_d).to(tl.float32)  # its halves, so the first suffices
    _rope_heads(q_ptr + t * stride_qt, dq_ptr + t * stride_dt, stride_qh, stride_dh, Hq, c, s, HQ_PAD, HALF,
                HAS_DELTA)
    k1, k2 = _rope_heads(k_ptr + t * stride_kt, dk_ptr + t * stride_dt, stride_kh, stride_dh, Hkv, c, s,
                         HKV_PAD, HALF, HAS_DELTA)
    pv, v_ok, v1, v2 = _load_heads(v_ptr + t * stride_vt, dv_ptr + t * stride_dt, stride_vh, stride_dh,
                                   Hkv, HKV_PAD, HALF, HAS_DELTA)
    if HAS_DELTA:  # v + its delta back in place too: a fused prefill attends over v itself
        tl.store(pv, v1, mask=v_ok)
        tl.store(pv + HALF, v2, mask=v_ok)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # -1: padding row of a graph bucket, nothing to cache
        if SCALE_FROM_PTR:
            k_inv = 1.0 / tl.load(k_scale_ptr).to(tl.float32)
            v_inv = 1.0 / tl.load(v_scale_ptr).to(tl.float32)
        blk = slot // block_size
        off = slot % block_size
        _cache_store(kc_ptr, blk * stride_kcb + off * stride_kct, stride_kch, Hkv, k1, k2, k_inv,
                     HKV_PAD, HALF, FP8)
        _cache_store(vc_ptr, blk * stride_vcb + off * stride_vct, stride_vch, Hkv, v1, v2, v_inv,
                     HKV_PAD, HALF, FP8)


def cache_scale_args(k_scale, v_scale, placeholder: torch.Tensor):
    """A cache write's scales as kernel arguments: (SCALE_FROM_PTR, k_scale_ptr, v_scale_ptr, k_inv,
    v_inv). 1-element tensors are read by the kernel (the pointers; inverses unused); python floats or None
    (1.0) become the inverses, `placeholder` standing in for the unread pointers."""
    scale_ptr = isinstance(k_scale, torch.Tensor)
    assert scale_ptr == isinstance(v_scale, torch.Tensor), "k_scale and v_scale: both floats or both tensors"
    if scale_ptr:
        return True, k_scale, v_scale, 1.0, 1.0
    k_inv = 1.0 / (1.0 if k_scale is None else float(k_scale))
    v_inv = 1.0 / (1.0 if v_scale is None else float(v_scale))
    return False, placeholder, placeholder, k_inv, v_inv


def rotary_kv_write(q, k, v, positions, cos, sin, k_cache, v_cache, slots, *, k_scale=None, v_scale=None,
                    delta=None, pdl: bool = False):
    """Rope on q and k in place, then k (rotated) and v into the paged cache.

    q [T, Hq, D], k/v [T, Hkv, D] (views of the fused qkv output are fine: last dim contiguous);
    positions [T] int; cos/sin [max_pos, D/2] or [max_pos, D] (HF cat(freqs, freqs) layout);
    k_cache/v_cache [num_blocks, block_size, Hkv, D] (bf16/fp16, or fp8 e4m3 with k_scale/v_scale as
    python floats or 1-element device tensors); slots [T] int64, -1 = skip the write. delta: None or
    (dq, dk, dv) shaped as q, k, v: the qkv projection's LoRA delta, first added in place (rounded to the
    input dtype, as PEFT adds it), v's included. `pdl` (sm_90+): launched as a programmatic dependent
    of the kernel before it (it waits for it before reading), letting the next one launch at its start.

        if delta: q[t], k[t], v[t] = q[t] + dq[t], k[t] + dk[t], v[t] + dv[t]
        c, s = cos[positions[t], :D/2], sin[positions[t], :D/2]
        for x in q[t], k[t] (every head): x1, x2 = x[:D/2], x[D/2:]
            x[:D/2], x[D/2:] = x1*c - x2*s, x2*c + x1*s        (== x*cos + rotate_half(x)*sin)
        if slots[t] >= 0: blk, off = divmod(slots[t], block_size)
            k_cache[blk, off] = k[t] / k_scale;  v_cache[blk, off] = v[t] / v_scale  (fp8: saturated)
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert D % 2 == 0 and triton.next_power_of_2(D // 2) == D // 2 and cos.shape[1] in (D // 2, D)
    for x in (q, k, v, cos, sin, k_cache, v_cache):
        assert x.stride(-1) == 1
    assert positions.stride(0) == 1 and slots.stride(0) == 1 and slots.dtype == torch.int64
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    scale_ptr, ks_t, vs_t, k_inv, v_inv = cache_scale_args(k_scale, v_scale, slots)
    if delta is not None:
        dq, dk, dv = delta
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        # one stride set for the three (views of one [T, cols] buffer; a single row's token stride is moot)
        assert dq.stride(1) == dk.stride(1) == dv.stride(1)
        assert dq.stride(-1) == dk.stride(-1) == dv.stride(-1) == 1
        assert T <= 1 or dq.stride(0) == dk.stride(0) == dv.stride(0)
    else:
        dq = dk = dv = q  # unread placeholders without HAS_DELTA
    if T == 0:
        return q, k
    _rotary_kv_kernel[(T,)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slots, ks_t, vs_t, dq, dk, dv, k_inv, v_inv, Hq, Hkv,
        k_cache.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dq.stride(0), dq.stride(1), cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HQ_PAD=triton.next_power_of_2(Hq), HKV_PAD=triton.next_power_of_2(Hkv), HALF=D // 2,
        FP8=fp8, SCALE_FROM_PTR=scale_ptr, HAS_DELTA=delta is not None, PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}))
    return q, k


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_kv_write_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slots, *, k_scale=None, v_scale=None,
                        delta=None):
    """Torch reference: transformers' apply_rotary_pos_emb (float32 math) then the slot scatter."""
    if delta is not None:
        for x, d in zip((q, k, v), delta, strict=True):
            x.add_(d)
    D = q.shape[-1]
    pos = positions.long()
    c = cos[pos, : D // 2].float().repeat(1, 2)[:, None, :]  # [T, 1, D]
    s = sin[pos, : D // 2].float().repeat(1, 2)[:, None, :]
    q.copy_(q.float() * c + _rotate_half(q.float()) * s)
    k.copy_(k.float() * c + _rotate_half(k.float()) * s)
    keep = slots >= 0
    rows = slots[keep]
    for cache, x, scale in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
        flat = cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
        val = x[keep].float()
        if scale is not None:
            val = val / (scale.float() if isinstance(scale, torch.Tensor) else scale)
        if cache.dtype == torch.float8_e4m3fn:
            val = val.clamp(-_FP8_MAX, _FP8_MAX)
        if cache.element_size() == 1:  # scatter raw bytes: index_put need not support float8 dtypes
            flat.view(torch.uint8)[rows] = val.to(cache.dtype).view(torch.uint8)
        else:
            flat[rows] = val.to(cache.dtype)
    return q, k
