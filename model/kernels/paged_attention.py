"""Paged decode attention (Q query tokens per sequence, usually 1) over a block-paged K/V cache, in Triton.

Cost model, Mistral-7B decode, one layer (Hq=32, Hkv=8, D=128, bf16 K/V):
  bytes  = K+V read once: 2 * Hkv * D * 2 B = 4 KiB per cached token (fp8: 2 KiB),
           + q/out (B * Hq * D * 2 B each, negligible) + block-table reads (4 B / block).
  FLOPs  = 4 * Hq * D per cached token (QK^T and PV), i.e. 16 KFLOP per 4 KiB: ~4 FLOP/B, so
           memory-bound by ~100x on an H100 even with the query group padded to 16 rows for tl.dot.
  Floors at 3.35 TB/s and predictions (bench/kernels.py cases, block size 16, bf16 unless noted):
    B=1   ctx=512    2.1 MB     0.6 us   predicted   6 us (launch + merge dominate; 8 one-tile splits)
    B=1   ctx=4096   16.8 MB    5.0 us   predicted  10 us (33 splits -> 264 programs stream it)
    B=1   ctx=32768, window 4096: as ctx=4096 (only the window is read)
    B=8   ctx=4096   134 MB     40 us    predicted  50 us
    B=32  ctx=640    84 MB      25 us    predicted  32 us
    B=64  ctx=640    168 MB     50 us    predicted  60 us (~85% of bandwidth)
    B=128 ctx=640    336 MB    100 us    predicted 120 us
    B=64  ctx=4096   1.07 GB   320 us    predicted 360 us; fp8 K/V: 537 MB, 160 us, predicted 190 us
    B=256 ctx=1024   1.07 GB   320 us    predicted 360 us
  sm_90 build (ptxas, offline): 182 registers at block size 16, 126 at 256, no spills, K/V tiles
  arrive by 16-byte cp.async (8-byte for fp8), 2 programs of 4 warps per SM by registers.

Design:
  * one program per (sequence, KV head, split): the G = Hq/Hkv query heads that share the KV head, for
    each of the sequence's Q query tokens (Q > 1: speculative verify), are the rows of one [G_PAD, D]
    tile, so each K/V token row is read from memory exactly once (a row masks the keys past its own
    position); Mistral-7B verify with 4 drafts: G*Q = 20 rows in a 32-row tile;
  * the KV range of a sequence is cut into BLOCK_N-token tiles aligned to absolute positions (so a tile
    maps onto whole pages or a contiguous part of one page); each token row is gathered through the
    block table, which works for any page size (16..256) with one code path;
  * flash-decoding: with num_splits > 1 each program writes its normalised partial output plus its
    running max/sum, and a second kernel merges the splits. The number of splits depends only on the
    batch size and the max-context bucket (python ints), and every tensor stays on the device, so the
    launch is CUDA-graph capturable;
  * fp8 (e4m3) K/V: k_scale folds into the softmax scale and v_scale into the output.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# The shortest flash-decoding split, where the launch has programs enough to stream bytes: shorter splits
# write and merge more partials than they save. Verify steps (Q > 1 query rows) keep it at every batch.
_MIN_TOKENS_PER_SPLIT = 256
# Plain decode (Q = 1) splits down to one KV tile instead: below ~2 waves of programs (the only place
# the split count is not capped by `want` anyway: batch <= 8 with 8 KV heads) a launch is bound by its
# serial tile loop, not by bytes. H200, context 545 in the graphs' 1024 bucket, K/V of 32 layers rotated
# (bench/tune_kernels.py decode-small, h200-tune-decode-small-2026-12-01.json), decode + merge: batch 1
# 6.6 us against 9.8 with 256-token splits (16 splits against 4), batch 2 7.7 / 10.1 (16 / 4), batch 4
# 9.5-9.7 / 10.8 (9 / 4), batch 8 12.7-13.3 / 13.3 (5 / 4); the batch-1 decode graph 3.958 against 4.016
# ms (bench/pdl_decode.py, h200-pdl-decode-2026-12-01-splits.json).
_MAX_SPLITS = 64


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, sliding_window: int | None,
                      num_sms: int, min_tokens: int | None = None) -> int:
    """Split-K count for flash-decoding: enough programs for ~2 waves of the SMs, but each split keeps
    at least `min_tokens` tokens (None: _MIN_TOKENS_PER_SPLIT). Depends only on python ints (CUDA-graph
    bucket keys)."""
    ctx = max_seq_len if not sliding_window else min(max_seq_len, sliding_window)
    programs = max(batch * num_kv_heads, 1)
    want = triton.cdiv(2 * num_sms, programs)
    by_len = max(triton.cdiv(max(ctx, 1), min_tokens or _MIN_TOKENS_PER_SPLIT), 1)
    return max(1, min(want, by_len, _MAX_SPLITS))


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_o_ptr, part_m_ptr, part_l_ptr,
    k_scale_ptr, v_scale_ptr,
    qk_scale, v_scale_val, window, num_splits, max_blocks,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btb, stride_ob, stride_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, SPLIT: tl.constexpr, Q: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # a programmatic dependent (of rope + KV write): let the next one (the merge, or o_proj's
        # GEMV) launch now, then wait for our inputs to be complete
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)  # KV head
    s = tl.program_id(2)  # split
    seq_len = tl.load(lens_ptr + b)
    # The earliest key any of the Q queries sees: the first query's window start.
    lo = tl.where(window > 0, tl.maximum(seq_len - (Q - 1) - window, 0), 0)
    first = (lo // BLOCK_N) * BLOCK_N
    n_tiles = tl.cdiv(tl.maximum(seq_len - first, 0), BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    t_begin = s * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    if SCALE_FROM_PTR:  # scales live on the device (CUDA graphs): read them, never sync
        qk_scale = qk_scale * tl.load(k_scale_ptr).to(tl.float32)
        v_scale_val = tl.load(v_scale_ptr).to(tl.float32)

    # Tile rows: (query token qi, head g of the group), qi-major; Q = 1 is plain decode.
    offs_r = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    qi = offs_r // G
    heads = h * G + offs_r % G  # query heads of this group (HF repeat_kv: head i uses KV head i // G)
    tokens = b * Q + qi  # row of q / out
    row_ok = offs_r < G * Q
    row_end = seq_len - (Q - 1) + qi  # [G_PAD]: keys < row_end are visible to the row (causal)
    row_lo = tl.where(window > 0, row_end - window, 0)
    q = tl.load(q_ptr + tokens[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # [G_PAD, D]
    cdt = q.dtype

    # Finite start value: an empty split then yields m=-1e30, l=0 and merges with weight 0, no NaN.
    m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    bt_row = bt_ptr + b * stride_btb
    for t in range(t_begin, t_end):
        pos = first + t * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute KV positions
        valid = (pos >= lo) & (pos < seq_len) & (pos // BLOCK_SIZE < max_blocks)
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        tok = (pos % BLOCK_SIZE).to(tl.int64)
        k_rows = blk * stride_kb + tok * stride_kt + h * stride_kh
        v_rows = blk * stride_vb + tok * stride_vt + h * stride_vh
        k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        # fp8 -> bf16/fp16 is exact, so the dot runs at the query's precision.
        sc = tl.dot(q, tl.trans(k.to(cdt))) * qk_scale  # [G_PAD, BLOCK_N] (log2 domain)
        if Q == 1:
            sc = tl.where(valid[None, :], sc, float("-inf"))
        else:
            seen = valid[None, :] & (pos[None, :] < row_end[:, None]) & (pos[None, :] >= row_lo[:, None])
            sc = tl.where(seen, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(cdt), v.to(cdt))
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale_val  # [G_PAD, D]
    if SPLIT:
        # partials [B * Q, Hq, S, D] fp32 and [B * Q, Hq, S]; row (token, head) holds num_splits entries
        row = (tokens * (tl.num_programs(1) * G) + heads) * num_splits + s
        tl.store(part_o_ptr + row[:, None] * D + offs_d[None, :], o, mask=row_ok[:, None])
        tl.store(part_m_ptr + row, m_i, mask=row_ok)
        tl.store(part_l_ptr + row, l_i, mask=row_ok)
    else:
        tl.store(out_ptr + tokens[:, None] * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(part_o_ptr, part_m_ptr, part_l_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                         D: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # a programmatic dependent of the split kernel; the next matmul may launch now
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    hq = tl.program_id(1)
    row = b * tl.num_programs(1) + hq
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    ok = offs_s < num_splits
    m = tl.load(part_m_ptr + row * num_splits + offs_s, mask=ok, other=float("-inf"))
    lsum = tl.load(part_l_ptr + row * num_splits + offs_s, mask=ok, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0)) * lsum  # [S_PAD]; empty splits have l=0 -> weight 0
    o = tl.load(part_o_ptr + (row * num_splits + offs_s)[:, None] * D + offs_d[None, :],
                mask=ok[:, None], other=0.0)  # [S_PAD, D]
    den = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter runs: behave like an H100 so the split path gets exercised


def _launch(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale, max_seq_len, sliding_window,
            k_scale, v_scale, out, num_splits, block_n=64, num_warps=4, num_stages=2, pdl=False,
            min_split_tokens=None):
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    _, block_size, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert D in (64, 128, 256) and block_size & (block_size - 1) == 0
    assert B > 0 and T % B == 0, f"{T} query rows are not a whole number per each of {B} sequences"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert block_tables.stride(1) == 1 and seq_lens.stride(0) == 1
    G = Hq // Hkv
    Q = T // B
    if out is None:
        out = torch.empty_like(q)
    if num_splits is None:
        if min_split_tokens is None:
            min_split_tokens = block_n if Q == 1 else _MIN_TOKENS_PER_SPLIT
        # Q > 1 (verify): each split writes Q times the partials and the tile has Q times the rows, so
        # fewer splits pay. Measured on an H200 (bench/tune_kernels.py, Q = 5, context 517): 2 splits at
        # batch 8, 1 at batch 16 and 32 (18.8 / 31.9 us against 23.4 / 39.6 us with the Q = 1 choice).
        programs_per_seq = (Q + 1) // 2
        num_splits = choose_num_splits(B * programs_per_seq, Hkv, max_seq_len, sliding_window,
                                       _num_sms(q.device), min_split_tokens)  # fmt: skip
    scale_ptr = isinstance(k_scale, torch.Tensor)
    assert scale_ptr == isinstance(v_scale, torch.Tensor), "k_scale and v_scale: both floats or both tensors"
    if scale_ptr:
        ks_t, vs_t, ks, vs = k_scale, v_scale, 1.0, 1.0
    else:
        ks_t = vs_t = seq_lens  # unused placeholders (SCALE_FROM_PTR=False)
        ks = 1.0 if k_scale is None else float(k_scale)
        vs = 1.0 if v_scale is None else float(v_scale)
    split = num_splits > 1
    launch = {"launch_pdl": True} if pdl else {}
    if split:
        part_o = torch.empty((T, Hq, num_splits, D), device=q.device, dtype=torch.float32)
        part_m = torch.empty((T, Hq, num_splits), device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    else:
        part_o = part_m = part_l = out  # unused
    _paged_decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_m, part_l, ks_t, vs_t,
        softmax_scale * ks * _LOG2E, vs, int(sliding_window or 0), num_splits, block_tables.shape[1],
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=G, G_PAD=max(16, triton.next_power_of_2(G * Q)), D=D, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        SCALE_FROM_PTR=scale_ptr, SPLIT=split, Q=Q, PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, **launch,
    )
    if split:
        _merge_splits_kernel[(T, Hq)](part_o, part_m, part_l, out, num_splits, out.stride(0), out.stride(1),
                                      D=D, S_PAD=max(2, triton.next_power_of_2(num_splits)),
                                      PDL=pdl, num_warps=4, **launch)
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale: float,
                           max_seq_len: int, *, sliding_window: int | None = None, k_scale=None,
                           v_scale=None, out: torch.Tensor | None = None,
                           num_splits: int | None = None, pdl: bool = False,
                           min_split_tokens: int | None = None) -> torch.Tensor:
    """Decode attention of the Q newest query tokens of each sequence against its paged K/V history.

    q [B * Q, Hq, D] (rows of one sequence adjacent; Q = 1: plain decode, Q > 1: a speculative verify
    step); k_cache, v_cache [num_blocks, block_size, Hkv, D] (bf16/fp16, or fp8 e4m3 with
    k_scale/v_scale: python floats or 1-element float32 device tensors); block_tables [B, max_blocks]
    int32; seq_lens [B] int32 (KV length incl. the Q new tokens, already written); max_seq_len: python
    int >= max(seq_lens) (a CUDA-graph bucket), used only to pick num_splits. Returns out [B * Q, Hq, D].

        for b, i < Q, hq:
            L = seq_lens[b] - (Q - 1 - i)   # query i sits at position L - 1
            lo = max(L - W, 0) if W else 0; hk = hq // (Hq // Hkv)
            for j in lo..L-1: kj = k_cache[block_tables[b, j // bs], j % bs, hk] * k_scale (same for v)
            p = softmax(softmax_scale * [q[b*Q+i, hq] . kj for j]); out[b*Q+i, hq] = sum_j p_j * vj
        (L <= 0 rows, e.g. CUDA-graph padding, give zeros; positions past the block table read nothing.)

    The G = Hq / Hkv heads of all Q queries of a sequence share one tile, so a verify step reads each
    K/V row once, as plain decode does.
    """
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale, max_seq_len, sliding_window,
                   k_scale, v_scale, out, num_splits, pdl=pdl, min_split_tokens=min_split_tokens)


def _gather_pages(cache, tables):
    # gather raw bytes: indexing kernels need not support float8 dtypes on every device
    if cache.element_size() == 1:
        return cache.view(torch.uint8)[tables].view(cache.dtype)
    return cache[tables]


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale: float,
                               max_seq_len: int, *, sliding_window: int | None = None, k_scale=None,
                               v_scale=None, out: torch.Tensor | None = None,
                               num_splits: int | None = None) -> torch.Tensor:
    """Torch reference of paged_decode_attention (float32 math, no host sync; num_splits is ignored).
    Gathers cdiv(max_seq_len, block_size) pages per sequence, so seq_lens must be <= max_seq_len."""
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    Q = T // B
    _, bs, Hkv, _ = k_cache.shape
    nblk = max(math.ceil(max_seq_len / bs), 1)
    tables = block_tables[:, :nblk].long()
    if tables.shape[1] < nblk:  # past the table: block 0, masked below
        tables = torch.nn.functional.pad(tables, (0, nblk - tables.shape[1]))
    k = _gather_pages(k_cache, tables).reshape(B, nblk * bs, Hkv, D).float()  # [B, N, Hkv, D]
    v = _gather_pages(v_cache, tables).reshape(B, nblk * bs, Hkv, D).float()
    if k_scale is not None:
        k = k * (k_scale.float() if isinstance(k_scale, torch.Tensor) else k_scale)
    if v_scale is not None:
        v = v * (v_scale.float() if isinstance(v_scale, torch.Tensor) else v_scale)
    G = Hq // Hkv
    qf = q.float().view(B, Q, Hkv, G, D)
    scores = torch.einsum("bqhgd,bnhd->bqhgn", qf, k) * softmax_scale  # [B, Q, Hkv, G, N]
    pos = torch.arange(nblk * bs, device=q.device)[None, None, :]
    lens = seq_lens.long()[:, None, None] - (Q - 1) + torch.arange(Q, device=q.device)[None, :, None]
    keep = (pos < lens) & (pos < block_tables.shape[1] * bs)  # [B, Q, N]
    if sliding_window:
        keep &= pos >= lens - sliding_window
    scores = scores.masked_fill(~keep[:, :, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows (L <= 0) -> zeros
    res = torch.einsum("bqhgn,bnhd->bqhgd", p, v).reshape(T, Hq, D).to(q.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out
