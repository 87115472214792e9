"""LoRA shrink/expand in Triton: BGMV (decode, one slot index per token) and SGMV (prefill, segments).

Layout and semantics are model/adapters/ops.py's (the adapter store's slot stacks):
    lora_a [S, R, in], lora_b [S, out, R] (scaling folded in), indices [T] int32 (-1 = base model),
    segments seg_starts/seg_ends/seg_slots [G] int32.
    shrink: v[t] = x[t] @ A[slot(t)].T   (0 where slot(t) == -1)              v [T, R]
    expand: y[t] += v[t] @ B[slot(t)].T  (untouched where slot(t) == -1)      y [T, out], in place

Several targets of one layer in one launch (q,k,v sharing x; gate,up sharing x): allocate the stacks
concatenated, A_cat [S, NT*R, in] and B_cat [S, out_q+out_k+out_v, R] (per-target stacks are then views
of them), shrink once with A_cat (v [T, NT*R]) and expand once into the fused output y [T, sum(out)] with
slice_offsets=(0, out_q, out_q+out_k, sum(out)): columns of slice i use v[:, i*R:(i+1)*R].

Cost model, Mistral-7B decode (x: 4096, q/o out 4096, k/v out 1024, gate/up 14336), rank 16, bf16:
  A+B bytes of one adapter in one layer, all 7 targets: R * sum(in + out) * 2 B = 16 * 81920 * 2 = 2.6 MB,
  read once from HBM per step per distinct adapter (tokens sharing a slot hit L2); x/v/y traffic is
  T * (in + R + 2*out) * 2 B per target.
  FLOPs 2 * T * R * (in + out) per target: each 2-byte weight serves the tokens of its adapter at 2 FLOP
  each, so ~(tokens per adapter) FLOP/B: memory-bound in decode, and in prefill until ~300 tokens/adapter.
  qkv fused, B=64 tokens, 32 distinct adapters: shrink reads 32*48*4096*2 = 12.6 MB -> 3.8 us at
  3.35 TB/s, predicted ~7 us; expand reads 32*6144*16*2 = 6.3 MB + y 2*64*6144*2 = 1.6 MB -> 2.4 us,
  predicted ~5 us. One adapter, T=1: launch-bound, predicted ~3 us per launch.
  gate_up, T=64, 32 adapters: shrink 8.4 MB -> 2.5 us (pred. 6 us); expand 29 MB + y 7.3 MB -> 11 us
  (pred. 14 us). down: shrink 14.7 MB -> 4.4 us (pred. 8 us); expand 4.2 MB -> 1.3 us (pred. 4 us).
  SGMV prefill, qkv, T=16384, 8 adapters: shrink reads x 134 MB -> 40 us (pred. 55 us); expand
  reads+writes y 403 MB -> 120 us (pred. 140 us): y += LoRA(x) costs a full pass over y in prefill.
Heuristics: BGMV shrink spreads the rows of A over programs until ~2 waves exist (at T=1 one program per
token would stream 128 KB alone; a split over `in` would need a merge launch); BGMV expand tiles
`out` so each program reads ~8K weights; SGMV uses 64x64 tl.dot tiles and a grid over max_seg_len.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NO_BOUNDARY = 2**31 - 1


@triton.jit
def _slice_of(col, b1, b2, b3):
    # which target (0..3) a fused-output column belongs to; unused boundaries are 2**31-1
    return (col >= b1).to(tl.int32) + (col >= b2).to(tl.int32) + (col >= b3).to(tl.int32)


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, idx_ptr, out_ptr, N, K, stride_xt, stride_as, stride_an, stride_ot,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(idx_ptr + t)
    k_end = tl.where(slot >= 0, K, 0)  # no adapter: no reads, v = 0
    a_rows = a_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_as + offs_n[:, None] * stride_an
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xv = tl.load(x_ptr + t * stride_xt + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * xv[None, :], axis=1)  # [BLOCK_N]
    tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _bgmv_expand_kernel(v_ptr, b_ptr, idx_ptr, y_ptr, N, R, b1, b2, b3,
                        stride_vt, stride_bs, stride_bn, stride_yt,
                        BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    t = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    slot = tl.load(idx_ptr + t)
    use = slot >= 0
    v_col = _slice_of(n0, b1, b2, b3) * R  # tiles never straddle a slice boundary (wrapper checks)
    n_ok = (offs_n < N) & use
    r_ok = (offs_r < R) & use
    v = tl.load(v_ptr + t * stride_vt + v_col + offs_r, mask=r_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn
                + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_N, R_PAD]
    delta = tl.sum(b.to(tl.float32) * v[None, :], axis=1)
    y_ptrs = y_ptr + t * stride_yt + offs_n
    y = tl.load(y_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, starts_ptr, ends_ptr, slots_ptr, out_ptr, N, K,
                        stride_xt, stride_as, stride_an, stride_ot,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    g = tl.program_id(0)
    start = tl.load(starts_ptr + g)
    end = tl.load(ends_ptr + g)
    slot = tl.load(slots_ptr + g)
    offs_m = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < end
    n_ok = offs_n < N
    # Tiles past the segment's end, or segments without an adapter, skip the reduction (no reads).
    k_end = tl.where((start + tl.program_id(1) * BLOCK_M < end) & (slot >= 0), K, 0)
    a_base = a_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_as
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xt + offs_k[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_base + offs_n[None, :] * stride_an + offs_k[:, None],
                     mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_N] = A[slot].T
        acc = tl.dot(xt.to(at.dtype), at, acc)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_ot + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sgmv_expand_kernel(v_ptr, b_ptr, starts_ptr, ends_ptr, slots_ptr, y_ptr, N, R, b1, b2, b3,
                        stride_vt, stride_bs, stride_bn, stride_yt,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    g = tl.program_id(0)
    start = tl.load(starts_ptr + g)
    end = tl.load(ends_ptr + g)
    slot = tl.load(slots_ptr + g)
    n0 = tl.program_id(2) * BLOCK_N
    offs_m = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_ok = (offs_m < end) & (slot >= 0)  # no adapter or past the end: no reads, y untouched
    n_ok = offs_n < N
    r_ok = offs_r < R
    v_col = _slice_of(n0, b1, b2, b3) * R
    v = tl.load(v_ptr + offs_m[:, None].to(tl.int64) * stride_vt + v_col + offs_r[None, :],
                mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_M, R_PAD]
    bt = tl.load(b_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn
                 + offs_r[:, None], mask=(n_ok[None, :] & r_ok[:, None]) & (slot >= 0),
                 other=0.0)  # [R_PAD, BLOCK_N] = B[slot].T
    delta = tl.dot(v.to(bt.dtype), bt)  # [BLOCK_M, BLOCK_N] fp32
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=ok)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter runs: size grids as for an H100


def _boundaries(slice_offsets, n_total: int, rank: int, v_cols: int) -> tuple[list[int], int]:
    """(b1, b2, b3) inner slice boundaries, and the largest power-of-two column tile dividing them."""
    offs = list(slice_offsets) if slice_offsets is not None else [0, n_total]
    assert offs[0] == 0 and offs[-1] == n_total and 2 <= len(offs) <= 5, offs
    assert v_cols >= (len(offs) - 1) * rank, "v needs R columns per slice"
    inner = offs[1:-1]
    align = 1 << 30
    for b in inner:
        align = min(align, b & -b)  # lowest set bit: the largest power of two dividing b
    return inner + [_NO_BOUNDARY] * (3 - len(inner)), align


def _check(x_or_v, stack, y=None, *index_vectors):
    assert x_or_v.stride(-1) == 1 and stack.stride(-1) == 1 and (y is None or y.stride(-1) == 1)
    for ix in index_vectors:  # slot indices / segment bounds: dense int32 vectors
        assert ix.dtype == torch.int32 and ix.stride(0) == 1, (ix.dtype, ix.stride())


def _device_segments(starts, ends, slots, device, max_seg_len):
    """Segments as dense int32 device tensors (+ max length). Host sequences (the batch's host copy) are
    uploaded once and give the exact max length, so the grid has no empty rows and nothing syncs."""
    if isinstance(starts, torch.Tensor):
        return starts, ends, slots, max_seg_len
    lens = [e - s for s, e in zip(starts, ends, strict=True)]
    as_t = [torch.tensor(list(c), dtype=torch.int32).to(device) for c in (starts, ends, slots)]
    return (*as_t, max(lens, default=0) if max_seg_len is None else max_seg_len)


def bgmv_shrink(x, lora_a, indices, *, out=None):
    """v = shrink(x) per token.  x [T, in], lora_a [S, R, in], indices [T] int32 -> v [T, R] (x.dtype).

        for t: v[t] = x[t] @ lora_a[indices[t]].T if indices[t] >= 0 else 0
    """
    _check(x, lora_a, None, indices)
    T, K = x.shape
    N = lora_a.shape[1]
    out = torch.empty((T, N), device=x.device, dtype=x.dtype) if out is None else out
    if T == 0:
        return out
    # Rows of A, not the reduction, are spread over programs: at small T each program owns few rows and
    # streams them whole (BLOCK_N * BLOCK_K ~ 4K elements in flight), so no split-K merge launch is needed.
    rows_per_prog = T * N // (2 * _num_sms(x.device))
    BLOCK_N = min(16, triton.next_power_of_2(N), 1 << max(rows_per_prog.bit_length() - 1, 0))
    BLOCK_K = min(triton.next_power_of_2(K), max(256, 4096 // BLOCK_N))
    _bgmv_shrink_kernel[(T, triton.cdiv(N, BLOCK_N))](
        x, lora_a, indices, out, N, K, x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out


def bgmv_expand(y, v, lora_b, indices, *, slice_offsets=None):
    """y += expand(v) per token, in place.  y [T, out] (may be a column view of a fused output),
    v [T, NT*R], lora_b [S, out, R], indices [T] int32; slice_offsets: python ints (0, ..., out).

        for t with indices[t] >= 0, for slice i, cols c in [off[i], off[i+1]):
            y[t, c] += v[t, i*R:(i+1)*R] @ lora_b[indices[t], c]
    """
    _check(v, lora_b, y, indices)
    T, N = y.shape
    R = lora_b.shape[2]
    bounds, align = _boundaries(slice_offsets, N, R, v.shape[1])
    if T == 0:
        return y
    R_PAD = max(16, triton.next_power_of_2(R))
    BLOCK_N = min(max(16, 4096 // R_PAD), align, triton.next_power_of_2(N))
    _bgmv_expand_kernel[(T, triton.cdiv(N, BLOCK_N))](
        v, lora_b, indices, y, N, R, *bounds, v.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_N=BLOCK_N, R_PAD=R_PAD, num_warps=4)
    return y


def sgmv_shrink(x, lora_a, seg_starts, seg_ends, seg_slots, *, max_seg_len=None, out=None):
    """v = shrink(x) per segment.  x [T, in], lora_a [S, R, in], seg_* [G] int32 device tensors or host int
    sequences; max_seg_len: python int >= every segment's length (default: T for tensors). -> v [T, R].

        v = zeros (only when out is None: rows outside every segment are then 0, as in ops.sgmv_shrink)
        for g: v[starts[g]:ends[g]] = x[starts[g]:ends[g]] @ lora_a[slots[g]].T  (0 if slots[g] < 0)
    """
    seg_starts, seg_ends, seg_slots, max_seg_len = _device_segments(seg_starts, seg_ends, seg_slots, x.device,
                                                                    max_seg_len)
    _check(x, lora_a, None, seg_starts, seg_ends, seg_slots)
    T, K = x.shape
    N = lora_a.shape[1]
    out = torch.zeros((T, N), device=x.device, dtype=x.dtype) if out is None else out
    max_seg_len = T if max_seg_len is None else max_seg_len
    if T == 0 or seg_starts.shape[0] == 0:
        return out
    BLOCK_M = 16 if max_seg_len <= 16 else 64
    BLOCK_N = min(64, max(16, triton.next_power_of_2(N)))
    grid = (seg_starts.shape[0], triton.cdiv(max(max_seg_len, 1), BLOCK_M), triton.cdiv(N, BLOCK_N))
    _sgmv_shrink_kernel[grid](x, lora_a, seg_starts, seg_ends, seg_slots, out, N, K, x.stride(0),
                              lora_a.stride(0), lora_a.stride(1), out.stride(0),
                              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=64, num_warps=4, num_stages=3)
    return out


def sgmv_expand(y, v, lora_b, seg_starts, seg_ends, seg_slots, *, max_seg_len=None, slice_offsets=None):
    """y += expand(v) per segment, in place.  y [T, out], v [T, NT*R], lora_b [S, out, R]; see bgmv_expand
    for slice_offsets.

        for g with slots[g] >= 0, for slice i, cols c of slice i:
            y[starts[g]:ends[g], c] += v[starts[g]:ends[g], i*R:(i+1)*R] @ lora_b[slots[g], c]
    """
    seg_starts, seg_ends, seg_slots, max_seg_len = _device_segments(seg_starts, seg_ends, seg_slots, y.device,
                                                                    max_seg_len)
    _check(v, lora_b, y, seg_starts, seg_ends, seg_slots)
    T, N = y.shape
    R = lora_b.shape[2]
    bounds, align = _boundaries(slice_offsets, N, R, v.shape[1])
    assert align >= 16, "slice boundaries must be multiples of 16"
    max_seg_len = T if max_seg_len is None else max_seg_len
    if T == 0 or seg_starts.shape[0] == 0:
        return y
    BLOCK_M = 16 if max_seg_len <= 16 else 64
    R_PAD = max(16, triton.next_power_of_2(R))
    BLOCK_N = min(128 if R_PAD <= 64 else 64, align, max(16, triton.next_power_of_2(N)))
    grid = (seg_starts.shape[0], triton.cdiv(max(max_seg_len, 1), BLOCK_M), triton.cdiv(N, BLOCK_N))
    _sgmv_expand_kernel[grid](v, lora_b, seg_starts, seg_ends, seg_slots, y, N, R, *bounds, v.stride(0),
                              lora_b.stride(0), lora_b.stride(1), y.stride(0),
                              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, R_PAD=R_PAD, num_warps=4)
    return y


def bgmv(y, x, lora_a, lora_b, indices, *, slice_offsets=None):
    """BGMV: for t with indices[t] >= 0: y[t] += (x[t] @ A[indices[t]].T) @ B[indices[t]].T (per slice)."""
    return bgmv_expand(y, bgmv_shrink(x, lora_a, indices), lora_b, indices, slice_offsets=slice_offsets)


def sgmv(y, x, lora_a, lora_b, seg_starts, seg_ends, seg_slots, *, max_seg_len=None, slice_offsets=None):
    """SGMV: for g with slots[g] >= 0: y[s:e] += (x[s:e] @ A[slots[g]].T) @ B[slots[g]].T (per slice)."""
    seg = _device_segments(seg_starts, seg_ends, seg_slots, x.device, max_seg_len)
    v = sgmv_shrink(x, lora_a, *seg[:3], max_seg_len=seg[3])
    return sgmv_expand(y, v, lora_b, *seg[:3], max_seg_len=seg[3], slice_offsets=slice_offsets)


# ------------------------------------------------------------------------ torch references (same API)


def _slices(slice_offsets, n_total):
    offs = list(slice_offsets) if slice_offsets is not None else [0, n_total]
    return list(zip(offs[:-1], offs[1:], strict=True))


def bgmv_shrink_ref(x, lora_a, indices, *, out=None):
    a = lora_a[indices.long().clamp_min(0)].float()  # [T, R, in]
    # select, not multiply by a 0/1 mask: slot 0's values (the placeholder of base rows) stay out of them
    v = torch.where((indices >= 0).unsqueeze(1), torch.einsum("ti,tri->tr", x.float(), a), 0.0)
    return v.to(x.dtype) if out is None else out.copy_(v)


def bgmv_expand_ref(y, v, lora_b, indices, *, slice_offsets=None):
    R = lora_b.shape[2]
    b = lora_b[indices.long().clamp_min(0)].float()  # [T, out, R]
    use = (indices >= 0).unsqueeze(1)
    for i, (c0, c1) in enumerate(_slices(slice_offsets, y.shape[1])):
        delta = torch.einsum("tr,tor->to", v[:, i * R:(i + 1) * R].float(), b[:, c0:c1])
        y[:, c0:c1] = torch.where(use, y[:, c0:c1].float() + delta, y[:, c0:c1].float()).to(y.dtype)
    return y


def _segs(starts, ends, slots):
    cols = (c.tolist() if isinstance(c, torch.Tensor) else list(c) for c in (starts, ends, slots))
    rows = zip(*cols, strict=True)
    return [(s, e, k) for s, e, k in rows if e > s]


def sgmv_shrink_ref(x, lora_a, seg_starts, seg_ends, seg_slots, *, max_seg_len=None, out=None):
    out = torch.zeros((x.shape[0], lora_a.shape[1]), device=x.device, dtype=x.dtype) if out is None else out
    for s, e, k in _segs(seg_starts, seg_ends, seg_slots):
        out[s:e] = (x[s:e].float() @ lora_a[k].float().T).to(out.dtype) if k >= 0 else 0
    return out


def sgmv_expand_ref(y, v, lora_b, seg_starts, seg_ends, seg_slots, *, max_seg_len=None, slice_offsets=None):
    R = lora_b.shape[2]
    for s, e, k in _segs(seg_starts, seg_ends, seg_slots):
        if k < 0:
            continue
        for i, (c0, c1) in enumerate(_slices(slice_offsets, y.shape[1])):
            delta = v[s:e, i * R:(i + 1) * R].float() @ lora_b[k, c0:c1].float().T
            y[s:e, c0:c1] = (y[s:e, c0:c1].float() + delta).to(y.dtype)
    return y


def bgmv_ref(y, x, lora_a, lora_b, indices, *, slice_offsets=None):
    v = bgmv_shrink_ref(x, lora_a, indices)
    return bgmv_expand_ref(y, v, lora_b, indices, slice_offsets=slice_offsets)


def sgmv_ref(y, x, lora_a, lora_b, seg_starts, seg_ends, seg_slots, *, max_seg_len=None,
             slice_offsets=None):
    v = sgmv_shrink_ref(x, lora_a, seg_starts, seg_ends, seg_slots)
    return sgmv_expand_ref(y, v, lora_b, seg_starts, seg_ends, seg_slots, slice_offsets=slice_offsets)
