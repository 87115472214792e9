"""Random cases for the grouped LoRA kernels (model/kernels/lora.py), shared by the interpreter tests
(tests/unit/test_lora_kernels_interpret.py) and the native GPU tests (tests/gpu/test_kernels.py).

A case is one fused projection group: members with their output widths inside the fused output y
(a member no adapter targets leaves a gap of y columns that must stay untouched), stacks zero-padded
past each slot's true rank (one slot at rank 0: its adapter targets none of the members), per-token
slots with base-model rows (-1), and a naive per-token oracle that knows nothing of plans or tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupCase:
    x: torch.Tensor  # [T, in]
    a: torch.Tensor  # [S, NT*R, in]
    b: torch.Tensor  # [S, sum(w), R]
    ranks: torch.Tensor  # [S] int32
    slots: torch.Tensor  # [T] int32, -1 = base
    rank: int  # R
    slices: list[tuple[int, int, int]]  # (b_start, b_end, y_start) per present member
    y_cols: int
    untouched_cols: torch.Tensor  # [y_cols] bool: columns of members no adapter targets

    def oracle(self, y0: torch.Tensor) -> torch.Tensor:
        """y0 + the LoRA delta, token by token, in float64."""
        y = y0.double().clone()
        r = self.rank
        for t, slot in enumerate(self.slots.tolist()):
            if slot < 0:
                continue
            for i, (b0, b1, y0c) in enumerate(self.slices):
                v = self.x[t].double() @ self.a[slot, i * r : (i + 1) * r].double().T
                y[t, y0c : y0c + b1 - b0] += v @ self.b[slot, b0:b1].double().T
        return y


def make_group_case(gen: torch.Generator, T: int, S: int, R: int, fan_in: int, widths, present, dtype,
                    device="cpu", base_frac: float = 0.25) -> GroupCase:  # fmt: skip
    """widths: every member's output width in y (in order); present: which members are in the stack."""
    nt = sum(present)
    ranks = torch.randint(1, R + 1, (S,), generator=gen, dtype=torch.int32)
    ranks[S - 1] = 0 if S > 1 else R  # the last slot's adapter targets none of the members
    ranks[0] = R  # and one at the full bucket
    a = torch.randn(S, nt * R, fan_in, generator=gen) / fan_in**0.5
    b = torch.randn(S, sum(w for w, p in zip(widths, present, strict=True) if p), R, generator=gen) / R**0.5
    for s in range(S):
        r = int(ranks[s])
        for i in range(nt):
            a[s, i * R + r : (i + 1) * R] = 0
        b[s, :, r:] = 0
    slices, bpos, ypos = [], 0, 0
    untouched = torch.zeros(sum(widths), dtype=torch.bool)
    for w, p in zip(widths, present, strict=True):
        if p:
            slices.append((bpos, bpos + w, ypos))
            bpos += w
        else:
            untouched[ypos : ypos + w] = True
        ypos += w
    slots = torch.randint(0, S, (T,), generator=gen, dtype=torch.int32)
    slots[torch.rand(T, generator=gen) < base_frac] = -1
    x = torch.randn(T, fan_in, generator=gen)
    return GroupCase(x.to(dtype).to(device), a.to(dtype).to(device), b.to(dtype).to(device),
                     ranks.to(device), slots.to(device), R, slices, sum(widths),
                     untouched.to(device))  # fmt: skip


def ragged_segments(gen: torch.Generator, T: int, S: int) -> list[tuple[int, int, int]]:
    """Prefill-style contiguous segments over [0, T): a gap row, a base-model segment, random slots."""
    cuts = sorted(set(torch.randint(1, T, (min(5, T - 1),), generator=gen).tolist())) if T > 1 else []
    bounds = [0, *cuts, T]
    segs = []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if i == 1 and e - s > 1:
            s += 1  # row s is in no segment
        segs.append((s, e, -1 if i == 2 else int(torch.randint(0, S, (1,), generator=gen))))
    return segs


def slots_of_segments(segs, T: int, device="cpu") -> torch.Tensor:
    slots = torch.full((T,), -1, dtype=torch.int32)
    for s, e, k in segs:
        slots[s:e] = k
    return slots.to(device)
