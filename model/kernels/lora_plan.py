"""Plans of the grouped LoRA kernels (model/kernels/lora.py): the batch's tokens grouped by adapter slot,
each slot's run cut into row tiles of at most BLOCK_M tokens.

    plan.perm       [T] int32 or None   token rows in slot order, rows without an adapter last (None:
                                        identity, prefill's contiguous runs)
    plan.tiles      [3, TILES] int32    per tile: slot, first position in perm order, rows (0: empty)
    plan.count      [1] int32           non-empty tiles, which come first
    plan.lora_rows  [1] int32 or None   rows with an adapter (decode plans: first in perm order)

A decode plan is built on the device with static shapes (`plan_from_slots`: TILES = min(T, S) +
ceil(T / BLOCK_M) bounds the tiles of any slot mix), so a CUDA graph serves every mix of adapters; a
prefill plan comes from the host's contiguous segments (`plan_from_segments`, exact, one upload). The
plan also holds the shrink's split-K arrival counters, zeroed when it is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_SHRINK_BLOCKS = 8  # column blocks of a shrink (NT * R <= 4 members * rank 256 at 128 columns a block)


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
