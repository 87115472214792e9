"""LoRA shrink/expand in Triton over a fused projection group, tokens grouped by adapter (segmented).

Layout (model/adapters/stacks.py): lora_a [S, NT*R, in], lora_b [S, sum(w_i), R] (scaling folded in),
ranks [S] int32 (rows/columns at or past ranks[slot] are zero and never read). A plan (lora_plan.py,
re-exported here) groups the tokens by slot and cuts each slot's run into row tiles of at most BLOCK_M
tokens: plan.perm [T] (token rows in slot order), plan.tiles [3, TILES] (slot, first position in perm
order, rows), plan.count [1] (the non-empty tiles, which come first).

Semantics (torch references in lora_ref.py, same arguments, re-exported here):

    shrink:  for tile (slot, first, n): rows = perm[first:first+n]
                 v[0, rows, :] = x[rows] @ A[slot].T                      v [1, T, NT*R] fp32
                 (rows of no tile are not written)
    expand:  for tile, for member i with B rows [b0_i, b1_i) and output columns from y0_i:
                 y[rows, y0_i + c] += round(v[0, rows, i*R:(i+1)*R] @ B[slot, b0_i + c].T)   in place
             (round: to y's dtype, as PEFT adds a delta; store=True writes the rounded delta instead)

Each tile reads its slot's A and B once, whatever the batch size (BGMV read them once per token). Decode
plans have static shapes, so a CUDA graph serves every mix of adapters. Both kernels are
persistent: a grid of at most a few programs per SM loops over the work items of the `count` real tiles
(shrink: tile x split x column block; expand: tile x column block), so neither empty tiles nor many
adapters serialise the work. Tokens with slot -1 are in no tile: no reads, no writes. One shrink and one
expand launch per group. Split-K shrink for small batches (qkv's A is 48 x 4096 at rank 16: one program
would stream 393 KB): each split stores a partial, and the last split of a (tile, column block) to arrive
— counted with an acq_rel atomic on a counter the plan holds, zeroed when the plan is made and reset by
that last split — sums them into v, so the expand reads one v (no memset launch, no atomics on v). The
expand's column blocks lie inside one member whenever the members' widths allow (Mistral: multiples of
128), so its v columns, B rows and output shift are the block's own and every access is contiguous.
A slot of rank r reads r of the stack's R rows of A and columns of B. Cost model and measurements for
Mistral-7B: docs/lora.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from model.kernels.lora_plan import (  # noqa: F401 - the plan API, re-exported: callers use this module
    MAX_SHRINK_BLOCKS,
    LoraPlan,
    plan_from_segments,
    plan_from_slots,
    plan_from_slots_ref,
)
from model.kernels.lora_ref import lora_expand_ref, lora_shrink_ref  # noqa: F401 - the references, same API

_NO_BOUNDARY = 2**31 - 1
MAX_MEMBERS = 4  # slices per expand launch (qkv has 3)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # interpreter runs: size grids as for an H100


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _slice_of(col, b1, b2, b3):
    # which member (0..3) a B row belongs to; unused boundaries are 2**31-1
    return (col >= b1).to(tl.int32) + (col >= b2).to(tl.int32) + (col >= b3).to(tl.int32)


@triton.jit
def _tile_rows(perm_ptr, first, n, HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < n
    if HAS_PERM:
        rows = tl.load(perm_ptr + first + offs_m, mask=m_ok, other=0)
    else:
        rows = first + offs_m
    return rows.to(tl.int64), m_ok


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, ranks_ptr, perm_ptr, tiles_ptr, count_ptr, sem_ptr, part_ptr, v_ptr, N, K, R,
                   k_chunk, num_tiles, stride_xt, stride_as, stride_an, stride_pt, stride_vt,
                   HAS_PERM: tl.constexpr, SPLITS: tl.constexpr, NBLK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # Persistent: every program loops over work items (tile, split, column block) of the real tiles only.
    per_tile: tl.constexpr = SPLITS * NBLK
    total = tl.load(count_ptr) * per_tile
    for w in range(tl.program_id(0), total, tl.num_programs(0)):
        tile = w // per_tile
        split = (w % per_tile) // NBLK
        nb = w % NBLK
        slot = tl.load(tiles_ptr + tile)
        n_rows = tl.load(tiles_ptr + 2 * num_tiles + tile)
        rows, m_ok = _tile_rows(perm_ptr, tl.load(tiles_ptr + num_tiles + tile), n_rows, HAS_PERM, BLOCK_M)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        live = n_ok & ((offs_n % R) < tl.load(ranks_ptr + slot))  # rows past the slot's rank: zero, unread
        k_lo = split * k_chunk
        k_hi = tl.minimum(K, k_lo + k_chunk)
        k_hi = tl.where(tl.max(live.to(tl.int32), axis=0) > 0, k_hi, k_lo)
        a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_n[None, :] * stride_an
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_hi
            xt = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :],
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            at = tl.load(a_rows + offs_k[:, None], mask=live[None, :] & k_ok[:, None], other=0.0)  # [BK, BN]
            acc = tl.dot(xt.to(at.dtype), at, acc)
        ok = m_ok[:, None] & n_ok[None, :]
        v_ptrs = v_ptr + rows[:, None] * stride_vt + offs_n[None, :]
        if SPLITS == 1:
            tl.store(v_ptrs, acc, mask=ok)
        else:
            # Split-K: each split stores its partial; the last of the tile's splits to arrive (a counter
            # per tile and column block, acq_rel) sums them into v and resets the counter to 0 for the next
            # call on the same plan. No memset launch, no atomics on v, one reduced v for the expand.
            part = part_ptr + tile * BLOCK_M * stride_pt + tl.arange(0, BLOCK_M)[:, None] * stride_pt \
                + offs_n[None, :]
            tl.store(part + split * num_tiles * BLOCK_M * stride_pt, acc, mask=ok)
            tl.debug_barrier()  # every thread's partial written before the arrival is counted
            counter = sem_ptr + tile * NBLK + nb
            if tl.atomic_add(counter, 1, sem="acq_rel") == SPLITS - 1:
                total_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in tl.static_range(SPLITS):
                    total_acc += tl.load(part + s * num_tiles * BLOCK_M * stride_pt, mask=ok, other=0.0,
                                         cache_modifier=".cg")  # fmt: skip
                tl.store(v_ptrs, total_acc, mask=ok)
                tl.atomic_xchg(counter, 0)


@triton.jit
def _expand_kernel(v_ptr, b_ptr, ranks_ptr, perm_ptr, tiles_ptr, count_ptr, lora_rows_ptr, y_ptr, N, T,
                   num_tiles, b1, b2, b3,
                   d0, d1, d2, d3, stride_vs, stride_vt, stride_bs, stride_bn, stride_yt,
                   HAS_PERM: tl.constexpr,
                   SPLITS: tl.constexpr, NBLK: tl.constexpr, R: tl.constexpr, NT: tl.constexpr,
                   NT_PAD: tl.constexpr, R_PAD: tl.constexpr, UNIFORM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, STORE: tl.constexpr):  # fmt: skip
    total = tl.load(count_ptr) * NBLK
    n_items = total
    lora_rows = 0
    if STORE:  # then zero items: the rows without an adapter (last in perm order), BLOCK_M at a time
        lora_rows = tl.load(lora_rows_ptr)
        n_items = total + tl.cdiv(T - lora_rows, BLOCK_M) * NBLK
    # Persistent: work items (tile, column block) of the real tiles, tile-major so that neighbouring
    # programs share a tile's v and slot.
    for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
        is_zero = w >= total
        wz = tl.where(is_zero, w - total, w)
        tile = tl.where(is_zero, 0, wz // NBLK)
        slot = tl.load(tiles_ptr + tile)
        # 0: the slot's adapter targets none of these members (and a zero item reads nothing)
        rank = tl.where(is_zero, 0, tl.load(ranks_ptr + slot))
        first = tl.where(is_zero, lora_rows + (wz // NBLK) * BLOCK_M, tl.load(tiles_ptr + num_tiles + tile))
        n_rows = tl.where(is_zero, tl.minimum(T - first, BLOCK_M), tl.load(tiles_ptr + 2 * num_tiles + tile))
        rows, m_ok = _tile_rows(perm_ptr, first, n_rows, HAS_PERM, BLOCK_M)
        col0 = (wz % NBLK) * BLOCK_N
        offs_n = col0 + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < N) & (rank > 0)
        b_base = b_ptr + slot.to(tl.int64) * stride_bs
        if UNIFORM:
            # Every member's width is a multiple of BLOCK_N: the block lies in one member, so its v
            # columns, B rows and output shift are the block's own (contiguous, vectorised accesses).
            member = _slice_of(col0, b1, b2, b3)
            shift = tl.where(member == 0, d0, tl.where(member == 1, d1, tl.where(member == 2, d2, d3)))
            r = tl.arange(0, R_PAD)
            r_ok = r < tl.minimum(rank, R)
            v_ptrs = v_ptr + rows[:, None] * stride_vt + (member * R + r)[None, :]
            v = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
            for s in tl.static_range(SPLITS):  # partial sums a caller passed (lora_shrink's v has one)
                v += tl.load(v_ptrs + s * stride_vs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_base + offs_n[:, None] * stride_bn + r[None, :], mask=n_ok[:, None] & r_ok[None, :],
                        other=0.0)  # [BLOCK_N, R_PAD], r contiguous
            delta = tl.dot(v.to(b_ptr.dtype.element_ty), tl.trans(b))  # [BLOCK_M, BLOCK_N] fp32
            y_ptrs = y_ptr + rows[:, None] * stride_yt + (offs_n + shift)[None, :]
        else:
            # Members side by side on the reduction axis: kk = member * R_PAD + r. B is loaded
            # block-diagonally (column c only under its own member's kk rows): one dot adds every member.
            kk = tl.arange(0, NT_PAD * R_PAD)
            kk_member = kk // R_PAD
            kk_r = kk % R_PAD
            kk_ok = (kk_member < NT) & (kk_r < tl.minimum(rank, R))
            v_ptrs = v_ptr + rows[:, None] * stride_vt + (kk_member * R + kk_r)[None, :]
            v = tl.zeros([BLOCK_M, NT_PAD * R_PAD], dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                v += tl.load(v_ptrs + s * stride_vs, mask=m_ok[:, None] & kk_ok[None, :], other=0.0)
            member = _slice_of(offs_n, b1, b2, b3)
            bt = tl.load(b_base + offs_n[None, :] * stride_bn + kk_r[:, None],
                         mask=kk_ok[:, None] & n_ok[None, :] & (kk_member[:, None] == member[None, :]),
                         other=0.0)  # [NT_PAD * R_PAD, BLOCK_N]
            delta = tl.dot(v.to(b_ptr.dtype.element_ty), bt)
            shift = tl.where(member == 0, d0, tl.where(member == 1, d1, tl.where(member == 2, d2, d3)))
            y_ptrs = y_ptr + rows[:, None] * stride_yt + (offs_n + shift)[None, :]
        if STORE:  # y = delta (zero for rank 0 and zero items): every row and column of the members
            tl.store(y_ptrs, delta.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n < N)[None, :])
        else:
            ok = m_ok[:, None] & n_ok[None, :]
            # The delta rounded to y's dtype before the add, as PEFT adds it and as the consumers of a
            # stored delta do: in place and side stream give the same bits (speculative verify steps add
            # in place what decode steps added on the side stream).
            y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
            d = delta.to(y_ptr.dtype.element_ty).to(tl.float32)
            tl.store(y_ptrs, (y + d).to(y_ptr.dtype.element_ty), mask=ok)


def _perm_arg(plan: LoraPlan) -> torch.Tensor:
    return plan.perm if plan.perm is not None else plan.tiles  # unread without HAS_PERM; any pointer


def _check(plan: LoraPlan, *tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.stride(-1) == 1, t.stride()
    assert plan.tiles.dtype == torch.int32 and plan.tiles.is_contiguous() and plan.count.dtype == torch.int32
    assert plan.perm is None or (plan.perm.dtype == torch.int32 and plan.perm.stride(0) == 1)


PROGRAMS_PER_SM = 4  # persistent grids: enough resident programs per SM to hide the dependent loads


def persistent_programs(plan: LoraPlan, items_per_tile: int, sms: int) -> int:
    """Programs of a persistent launch: the work items a plan can have (all its static tiles), at most a
    few per SM; each loops over the real items (`count` is read on the device)."""
    return max(1, min(plan.num_tiles * items_per_tile, PROGRAMS_PER_SM * sms))


def choose_splits(plan: LoraPlan, n_cols: int, k: int, block_n: int, sms: int,
                  beside_matmuls: bool = False) -> int:  # fmt: skip
    """Split-K factor of the shrink: enough items for ~2 waves (1 beside matmuls) when the batch has the
    fewest tiles, each split at least 512 deep, at most MAX_SPLITS (SIDE_MAX_SPLITS beside matmuls).
    Measured on an H200 (bench/tune_kernels.py, rank 16, T = 1..128, 1 or 32 adapters): 8 splits of a
    4096-deep reduction and 16 of the 14336-deep down_proj were the fastest or within 0.5 us of it; 16
    splits of 4096 cost up to 4 us more with 32 adapters (more partials to sum). Beside the base matmuls
    (a LoRA side stream, whose kernels slow the matmul they run beside: docs/lora.md) fewer splits paid,
    in 1-adapter graph replays in one process: 4 beat 8 by 3.1% at 128 rows; 8 beat 4 and 16 at 64 rows;
    8 beat down_proj's 16 by 1.2% at 32 rows."""
    programs = max(plan.min_tiles, 1) * triton.cdiv(n_cols, block_n)
    waves, cap = (1, SIDE_MAX_SPLITS) if beside_matmuls else (2, MAX_SPLITS)
    return max(1, min(cap, k // 512, (waves * sms) // programs))


MAX_SPLITS = 16
SIDE_MAX_SPLITS = 8  # a shrink beside base matmuls (choose_splits)


def lora_shrink(x, lora_a, ranks, plan: LoraPlan, *, rank: int, splits: int | None = None,
                out: torch.Tensor | None = None, sms: int | None = None,
                beside_matmuls: bool = False) -> torch.Tensor:  # fmt: skip
    """x [T, in], lora_a [S, N, in] (N = NT*rank), ranks [S] int32 -> v [1, T, N] float32.

        for tile (slot, rows): v[0, rows] = x[rows] @ lora_a[slot].T
        (columns n with n % R >= ranks[slot] are 0; rows in no tile are not written)

    `splits`: split-K factor (default: `choose_splits`, for a kernel beside base matmuls when
    `beside_matmuls`: one wave, at most SIDE_MAX_SPLITS); the partial sums are reduced inside the kernel.
    `out`: [1, T, N] float32 to write into (tests poison it). `sms`: the SMs to size the persistent grid
    and the split-K factor for (default: the device's; fewer when the kernel runs beside matmuls that
    leave only those free, executor/gemm_policy.py).
    """
    _check(plan, x, lora_a)
    t, k = x.shape
    n = lora_a.shape[1]
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    nblk = triton.cdiv(n, block_n)
    assert nblk <= MAX_SHRINK_BLOCKS, (n, block_n)
    block_k = 64 if k <= 1024 else 128
    sms = sms or _num_sms(x.device)
    if splits is None:
        splits = choose_splits(plan, n, k, block_n, sms, beside_matmuls)
    splits = max(1, min(int(splits), MAX_SPLITS))
    k_chunk = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_chunk)  # no empty split: the last of them reduces
    v = torch.empty((1, t, n), device=x.device, dtype=torch.float32) if out is None else out
    assert v.shape == (1, t, n) and v.dtype == torch.float32, v.shape
    if t == 0 or plan.num_tiles == 0:
        return v
    if splits > 1:  # per split, tile and row: the partial sums (tiles are at most BLOCK_M rows)
        part = torch.empty((splits, plan.num_tiles * plan.block_m, n), device=x.device, dtype=torch.float32)
    else:
        part = v
    grid = (persistent_programs(plan, splits * nblk, sms),)
    _shrink_kernel[grid](
        x, lora_a, ranks, _perm_arg(plan), plan.tiles, plan.count, plan.semaphores, part, v, n, k, rank,
        k_chunk,
        plan.num_tiles, x.stride(0), lora_a.stride(0), lora_a.stride(1), part.stride(-2), v.stride(1),
        HAS_PERM=plan.perm is not None, SPLITS=splits, NBLK=nblk, BLOCK_M=plan.block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return v


def lora_expand(y, v, lora_b, ranks, plan: LoraPlan, *, rank: int,
                slices: Sequence[tuple[int, int, int]] | None = None,
                sms: int | None = None, store: bool = False) -> torch.Tensor:  # fmt: skip
    """y += expand(v) in place.  y [T, cols], v [SPLITS, T, NT*rank] (lora_shrink's: SPLITS = 1; partial
    sums are added), lora_b [S, N, rank]; slices: (b_start, b_end, y_start) per member, in B-row order
    (default: one member, all of y). `sms`: as lora_shrink's.

        for tile (slot, rows), member i: y[rows, y_i + c] += sum_s(v[s, rows, i*R:(i+1)*R]) @ B[slot, b_i + c]

    `store` (a decode plan, whose rows without an adapter come last): y[:, members' columns] = the delta
    instead, zero for rows without an adapter — a LoRA delta buffer needs no memset first.
    """
    _check(plan, v, lora_b, y)
    n = lora_b.shape[1]
    slices = list(slices) if slices is not None else [(0, n, 0)]
    nt = len(slices)
    assert 1 <= nt <= MAX_MEMBERS and slices[0][0] == 0 and slices[-1][1] == n, slices
    assert v.shape[2] >= nt * rank and lora_b.shape[2] == rank, (v.shape, lora_b.shape, rank)
    bounds = [s[0] for s in slices[1:]] + [_NO_BOUNDARY] * (MAX_MEMBERS - nt)
    shifts = [y0 - b0 for b0, _, y0 in slices] + [0] * (MAX_MEMBERS - nt)
    if y.shape[0] == 0 or plan.num_tiles == 0:
        return y
    nt_pad = triton.next_power_of_2(nt)
    r_pad = max(16, triton.next_power_of_2(rank))
    widths = [b1 - b0 for b0, b1, _ in slices]
    # The widest block that no member boundary cuts (Mistral's widths are multiples of 128): the block's
    # member is then uniform. Otherwise the block-diagonal path handles blocks across members.
    block_n = next((bn for bn in (128, 64, 32, 16) if all(w % bn == 0 for w in widths)), 0)
    uniform = block_n > 0
    if not uniform:
        block_n = max(16, min(128, 8192 // (nt_pad * r_pad)))
    nblk = triton.cdiv(n, block_n)
    # Twice the shrink's programs per SM: an expand item is one short dependent chain (tile -> v, B, y),
    # so with many adapters (32 tiles x 224 column blocks of gate_up) concurrency is what hides it.
    if store:
        assert plan.perm is not None and plan.lora_rows is not None, "store needs a decode plan"
    lora_rows = plan.lora_rows if store else plan.count  # unread without STORE
    grid = (persistent_programs(plan, nblk, 2 * (sms or _num_sms(y.device))),)
    _expand_kernel[grid](
        v, lora_b, ranks, _perm_arg(plan), plan.tiles, plan.count, lora_rows, y, n, y.shape[0],
        plan.num_tiles, *bounds[:3], *shifts,
        v.stride(0), v.stride(1), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        HAS_PERM=plan.perm is not None, SPLITS=v.shape[0], NBLK=nblk, R=rank, NT=nt, NT_PAD=nt_pad,
        R_PAD=r_pad,
        UNIFORM=uniform, BLOCK_M=plan.block_m, BLOCK_N=block_n, STORE=store, num_warps=4,
    )  # fmt: skip
    return y
