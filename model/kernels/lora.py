"""LoRA shrink/expand in Triton over a fused projection group, tokens grouped by adapter (segmented).

Layout (model/adapters/stacks.py): lora_a [S, NT*R, in], lora_b [S, sum(w_i), R] (scaling folded in),
ranks [S] int32 (rows/columns at or past ranks[slot] are zero and never read). A plan groups the tokens
by slot and cuts each slot's run into row tiles of at most BLOCK_M tokens:

    plan.perm   [T] int32 or None   token rows in slot order (None: identity, prefill's contiguous runs)
    plan.tiles  [3, TILES] int32    per tile: slot, first position in perm order, rows (0: empty tile)
    plan.count  [1] int32           non-empty tiles, which come first

Semantics (torch references in lora_ref.py, same arguments, re-exported here):

    shrink:  for tile (slot, first, n): rows = perm[first:first+n]
                 v[0, rows, :] = x[rows] @ A[slot].T                      v [1, T, NT*R] fp32
                 (rows of no tile are not written)
    expand:  for tile, for member i with B rows [b0_i, b1_i) and output columns from y0_i:
                 y[rows, y0_i + c] += v[0, rows, i*R:(i+1)*R] @ B[slot, b0_i + c].T   in place

Each tile reads its slot's A and B once, whatever the batch size (BGMV read them once per token). A decode
plan is built on the device with static shapes (`plan_from_slots`: TILES = min(T, S) + ceil(T / BLOCK_M)
bounds the tiles of any slot mix), so a CUDA graph serves every mix of adapters. Both kernels are
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
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from model.kernels.lora_ref import lora_expand_ref, lora_shrink_ref  # noqa: F401 - the references, same API

_NO_BOUNDARY = 2**31 - 1
MAX_MEMBERS = 4  # slices per expand launch (qkv has 3)


@dataclass(frozen=True)
class LoraPlan:
    """Tokens grouped by slot in tiles of at most `block_m` rows (see the module docstring)."""

    perm: torch.Tensor | None  # [T] int32
    tiles: torch.Tensor  # [3, TILES] int32: slot, first, rows
    count: torch.Tensor  # [1] int32: the real tiles, tiles[:, :count]
    semaphores: torch.Tensor  # [TILES * MAX_SHRINK_BLOCKS] int32, zero: split-K arrival counters (self-reset)
    block_m: int
    num_rows: int  # T
    min_tiles: int  # tiles when every row uses one adapter (prefill: the exact count); sizes the grids
    # [1] int32: rows with an adapter, which come first in perm order (decode plans; None: no such order)
    lora_rows: torch.Tensor | None = None

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[1]


def plan_from_slots(token_slots: torch.Tensor, num_slots: int, block_m: int = 16,
                    use_kernel: bool | None = None) -> LoraPlan:  # fmt: skip
    """Plan from per-token slots on their device: static shapes, no host sync (decode, CUDA graphs).

    One Triton launch on CUDA for T <= PLAN_KERNEL_MAX_ROWS (`use_kernel` forces the choice; tests run it
    under the interpreter), else `plan_from_slots_ref`'s torch ops (~20 small launches).
    """
    t = token_slots.shape[0]
    if use_kernel is None:
        use_kernel = token_slots.is_cuda and 0 < t <= PLAN_KERNEL_MAX_ROWS
    if not use_kernel:
        return plan_from_slots_ref(token_slots, num_slots, block_m)
    s = max(int(num_slots), 1)
    num_tiles = min(t, s) + -(-t // block_m)
    perm = torch.empty(t, dtype=torch.int32, device=token_slots.device)
    n_sem = num_tiles * MAX_SHRINK_BLOCKS
    buf = torch.empty(3 * num_tiles + 2 + n_sem, dtype=torch.int32, device=token_slots.device)
    tiles, count = buf[: 3 * num_tiles].view(3, num_tiles), buf[3 * num_tiles : 3 * num_tiles + 1]
    lora_rows, semaphores = buf[3 * num_tiles + 1 : 3 * num_tiles + 2], buf[3 * num_tiles + 2 :]
    scratch = torch.empty(t, dtype=torch.int32, device=token_slots.device)
    t_pad = triton.next_power_of_2(t)
    _plan_kernel[(1,)](
        token_slots, perm, tiles, count, lora_rows, scratch, semaphores, t, s, num_tiles, n_sem, T_PAD=t_pad,
        CHUNK=min(32, t_pad), BLOCK_M=block_m, J_PAD=triton.next_power_of_2(-(-t // block_m)),
        TILES_PAD=triton.next_power_of_2(num_tiles), SEM_PAD=triton.next_power_of_2(n_sem),
        num_warps=4 if t_pad <= 256 else 8,
    )  # fmt: skip
    return LoraPlan(perm, tiles, count, semaphores, block_m, t, min_tiles=-(-t // block_m),
                    lora_rows=lora_rows)


PLAN_KERNEL_MAX_ROWS = 512


def plan_from_slots_ref(token_slots: torch.Tensor, num_slots: int, block_m: int = 16) -> LoraPlan:
    """`plan_from_slots` in torch ops (the reference; also the path for long row sets)."""
    t, dev = token_slots.shape[0], token_slots.device
    s = max(int(num_slots), 1)
    key = torch.where(token_slots >= 0, token_slots.long(), s)  # base rows sort last, in no tile
    perm = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.zeros(s + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))[:s]
    starts = counts.cumsum(0) - counts  # [S] first position of each slot's run in perm order
    ntiles = (counts + block_m - 1) // block_m
    tile_end = ntiles.cumsum(0)
    num_tiles = min(t, s) + -(-t // block_m)
    j = torch.arange(num_tiles, device=dev)
    seg = torch.searchsorted(tile_end, j, right=True)  # the slot whose tiles cover tile j (S: none)
    seg_c = seg.clamp(max=s - 1)
    within = j - (tile_end[seg_c] - ntiles[seg_c])
    real = seg < s
    rows = torch.where(real, (counts[seg_c] - within * block_m).clamp(max=block_m), 0)
    first = torch.where(real, starts[seg_c] + within * block_m, 0)
    tiles = torch.stack([torch.where(real, seg_c, 0), first, rows]).to(torch.int32)
    count = ntiles.sum().reshape(1).to(torch.int32)
    semaphores = torch.zeros(num_tiles * MAX_SHRINK_BLOCKS, dtype=torch.int32, device=dev)
    lora_rows = (token_slots >= 0).sum().reshape(1).to(torch.int32)
    return LoraPlan(perm, tiles, count, semaphores, block_m, t, min_tiles=-(-t // block_m),
                    lora_rows=lora_rows)


@triton.jit
def _plan_keys(slots_ptr, idx, T, S):
    # sort key of each row: its slot, S for the base model (after every slot), S + 1 past the end
    slot = tl.load(slots_ptr + idx, mask=idx < T, other=-1)
    return tl.where(idx < T, tl.where(slot >= 0, slot, S), S + 1), slot


@triton.jit
def _plan_kernel(slots_ptr, perm_ptr, tiles_ptr, count_ptr, lora_rows_ptr, scratch_ptr, sem_ptr, T, S,
                 num_tiles, n_sem,
                 T_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, J_PAD: tl.constexpr,
                 TILES_PAD: tl.constexpr, SEM_PAD: tl.constexpr):  # fmt: skip
    # One program: a stable counting sort of the rows by slot through all-pairs comparisons (T <= 512).
    i = tl.arange(0, T_PAD)
    key_i, slot_i = _plan_keys(slots_ptr, i, T, S)
    less = tl.zeros([T_PAD], dtype=tl.int32)  # rows with a smaller key: the start of i's run
    before = tl.zeros([T_PAD], dtype=tl.int32)  # earlier rows with the same key
    count = tl.zeros([T_PAD], dtype=tl.int32)  # rows with the same key
    for j0 in range(0, T_PAD, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        key_j, _ = _plan_keys(slots_ptr, j, T, S)
        eq = key_j[None, :] == key_i[:, None]
        less += tl.sum((key_j[None, :] < key_i[:, None]).to(tl.int32), axis=1)
        before += tl.sum((eq & (j[None, :] < i[:, None])).to(tl.int32), axis=1)
        count += tl.sum(eq.to(tl.int32), axis=1)
    tl.store(perm_ptr + less + before, i, mask=i < T)
    lead = (before == 0) & (key_i < S)  # the first row of each adapter's run
    ntiles = tl.where(lead, (count + BLOCK_M - 1) // BLOCK_M, 0)
    tl.store(scratch_ptr + i, ntiles, mask=i < T)
    tl.store(count_ptr, tl.sum(ntiles, axis=0))
    tl.store(lora_rows_ptr, tl.sum(((key_i < S) & (i < T)).to(tl.int32), axis=0))
    t_all = tl.arange(0, TILES_PAD)
    empty = t_all < num_tiles
    tl.store(tiles_ptr + t_all, tl.zeros([TILES_PAD], dtype=tl.int32), mask=empty)
    tl.store(tiles_ptr + num_tiles + t_all, tl.zeros([TILES_PAD], dtype=tl.int32), mask=empty)
    tl.store(tiles_ptr + 2 * num_tiles + t_all, tl.zeros([TILES_PAD], dtype=tl.int32), mask=empty)
    s_all = tl.arange(0, SEM_PAD)
    tl.store(sem_ptr + s_all, tl.zeros([SEM_PAD], dtype=tl.int32), mask=s_all < n_sem)
    tl.debug_barrier()  # every row's tile count (and the cleared table) visible to the whole program
    base = tl.zeros([T_PAD], dtype=tl.int32)  # tiles of the runs with smaller keys
    for j0 in range(0, T_PAD, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        key_j, _ = _plan_keys(slots_ptr, j, T, S)
        nt_j = tl.load(scratch_ptr + j, mask=j < T, other=0)
        base += tl.sum(tl.where(key_j[None, :] < key_i[:, None], nt_j[None, :], 0), axis=1)
    jj = tl.arange(0, J_PAD)
    ok = lead[:, None] & (jj[None, :] < ntiles[:, None])
    tile = base[:, None] + jj[None, :]
    zero = tl.zeros([T_PAD, J_PAD], dtype=tl.int32)
    tl.store(tiles_ptr + tile, slot_i[:, None] + zero, mask=ok)
    tl.store(tiles_ptr + num_tiles + tile, less[:, None] + jj[None, :] * BLOCK_M, mask=ok)
    tl.store(tiles_ptr + 2 * num_tiles + tile, tl.minimum(count[:, None] - jj[None, :] * BLOCK_M, BLOCK_M),
             mask=ok)


def plan_from_segments(segments: Sequence[tuple[int, int, int]], num_rows: int, device,
                       block_m: int | None = None) -> LoraPlan:  # fmt: skip
    """Plan from host segments (start, end, slot) of contiguous rows (prefill): exact, one upload."""
    longest = max((e - s for s, e, k in segments if k >= 0), default=0)
    block_m = block_m or (16 if longest <= 16 else 64)
    tiles = [(slot, first, min(block_m, end - first)) for start, end, slot in segments if slot >= 0
             for first in range(start, end, block_m)]  # fmt: skip
    n = len(tiles)
    n_sem = n * MAX_SHRINK_BLOCKS
    buf = torch.tensor([t[i] for i in range(3) for t in tiles] + [n] + [0] * n_sem, dtype=torch.int32)
    buf = buf.to(device)
    tiles, count, semaphores = buf[: 3 * n].view(3, n), buf[3 * n : 3 * n + 1], buf[3 * n + 1 :]
    return LoraPlan(None, tiles, count, semaphores, block_m, num_rows, min_tiles=n)


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
            y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=ok)


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


def choose_splits(plan: LoraPlan, n_cols: int, k: int, block_n: int, sms: int) -> int:
    """Split-K factor of the shrink: enough items for ~2 waves when the batch has the fewest tiles, each
    split at least 512 deep. Measured on an H200 (bench/tune_kernels.py, rank 16, T = 1..128, 1 or 32
    adapters): 8 splits of a 4096-deep reduction and 16 of the 14336-deep down_proj were the fastest or
    within 0.5 us of it; 16 splits of 4096 cost up to 4 us more with 32 adapters (more partials to sum)."""
    programs = max(plan.min_tiles, 1) * triton.cdiv(n_cols, block_n)
    return max(1, min(MAX_SPLITS, k // 512, (2 * sms) // programs))


MAX_SPLITS = 16
MAX_SHRINK_BLOCKS = 8  # column blocks of a shrink (NT * R <= 4 members * rank 256 at 128 columns a block)


def lora_shrink(x, lora_a, ranks, plan: LoraPlan, *, rank: int, splits: int | None = None,
                out: torch.Tensor | None = None, sms: int | None = None) -> torch.Tensor:  # fmt: skip
    """x [T, in], lora_a [S, N, in] (N = NT*rank), ranks [S] int32 -> v [1, T, N] float32.

        for tile (slot, rows): v[0, rows] = x[rows] @ lora_a[slot].T
        (columns n with n % R >= ranks[slot] are 0; rows in no tile are not written)

    `splits`: split-K factor (default: `choose_splits`); the partial sums are reduced inside the kernel.
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
        splits = choose_splits(plan, n, k, block_n, sms)
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
