"""Torch reference LoRA ops over a stacked slot layout: SGMV (prefill, segments), BGMV (decode, per token).

Layout (the adapter store's, fixed capacity so CUDA graphs can capture LoRA):

    lora_a  [S, R, in]    S device slots, rank zero-padded to the stack's bucket R
    lora_b  [S, out, R]   scaling already folded in; zeros where a slot's adapter skips this module
    indices [T] int32     slot of each token's adapter, -1 = base model (no LoRA)
    segments              seg_starts [G], seg_ends [G], seg_slots [G] (int32): token runs of one slot

Semantics (any implementation, the Triton ones in model/kernels/ included, must match these):

    shrink:  v[t] = x[t] @ A[idx[t]].T      (v[t] = 0 where idx[t] == -1)        v: [T, R]
    expand:  y[t] += v[t] @ B[idx[t]].T     (nothing where idx[t] == -1)         y: [T, out], in place
    SGMV:    for s in segments: y[s.start:s.end] += (x[s.start:s.end] @ A[s.slot].T) @ B[s.slot].T
    BGMV:    for t in tokens:   y[t] += (x[t] @ A[idx[t]].T) @ B[idx[t]].T   (idx -1: no adapter)

Signatures (the Triton kernels in model/kernels/ take the same arguments; y is updated in place):

    bgmv_shrink(x [T, in], lora_a [S, R, in], indices [T] int32) -> v [T, R]
    bgmv_expand(y [T, out], v [T, R], lora_b [S, out, R], indices [T] int32) -> None
    bgmv(y, x, lora_a, lora_b, indices) -> None
    sgmv_shrink(x, lora_a, seg_starts [G], seg_ends [G], seg_slots [G]) -> v [T, R]
    sgmv_expand(y, v, lora_b, seg_starts, seg_ends, seg_slots) -> None
    sgmv(y, x, lora_a, lora_b, seg_starts, seg_ends, seg_slots) -> None
    (segment arguments: int32 tensors, or host int sequences; the reference converts tensors to lists)

Shrink and expand are separate because under tensor parallelism a row-parallel layer's partial shrink
result must be all-reduced between them (see batch.AdapterBatchData).

No Python loop over tokens and no host sync (capturable in a CUDA graph): BGMV gathers each token's
own slot (A[idx[t]], B[idx[t]]) and computes only with it. Rows never combine other slots' values, not
even multiplied by a zero mask (0 * NaN is NaN): an adapter with non-finite weights could otherwise
poison every row of the batch. Base rows (idx -1) gather slot 0 as a placeholder and are then *selected*
away with torch.where, which, unlike a multiply, does not propagate the unselected value. SGMV loops
over segments, each with its own slot, which the batch keeps few by grouping requests by adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IntSeq = Sequence[int] | torch.Tensor


def _own_slots(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather index [T] int64: idx with -1 mapped to a placeholder slot 0, use [T] bool: idx >= 0)."""
    use = indices >= 0
    return indices.long().clamp_min(0), use


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """v[t] = x[t] @ A[idx[t]].T, zeros for idx -1.  x [T, in], lora_a [S, R, in], indices [T] -> v [T, R]."""
    gather, use = _own_slots(indices)
    a = lora_a.index_select(0, gather)  # [T, R, in]: each token's own adapter only
    v = torch.bmm(a, x.unsqueeze(-1)).squeeze(-1)  # [T, R]
    return torch.where(use.unsqueeze(1), v, torch.zeros((), dtype=v.dtype, device=v.device))


def bgmv_expand(y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor) -> None:
    """y[t] += v[t] @ B[idx[t]].T in place, nothing for idx -1.  y [T, out], v [T, R], lora_b [S, out, R]."""
    gather, use = _own_slots(indices)
    b = lora_b.index_select(0, gather)  # [T, out, R]
    delta = torch.bmm(b, v.unsqueeze(-1)).squeeze(-1)  # [T, out]
    y += torch.where(use.unsqueeze(1), delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def bgmv(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor
) -> None:
    """BGMV: for t in tokens: y[t] += (x[t] @ A[idx[t]].T) @ B[idx[t]].T   (idx -1: no adapter)."""
    bgmv_expand(y, bgmv_shrink(x, lora_a, indices), lora_b, indices)


def _segments(starts: IntSeq, ends: IntSeq, slots: IntSeq) -> list[tuple[int, int, int]]:
    as_list = [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in (starts, ends, slots)]
    return [(a, b, k) for a, b, k in zip(*as_list, strict=True) if k >= 0 and b > a]


def sgmv_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, seg_starts: IntSeq, seg_ends: IntSeq, seg_slots: IntSeq
) -> torch.Tensor:
    """for s in segments: v[s.start:s.end] = x[s.start:s.end] @ A[s.slot].T; other rows 0.  -> v [T, R]."""
    v = x.new_zeros(x.shape[0], lora_a.shape[1])
    for start, end, slot in _segments(seg_starts, seg_ends, seg_slots):
        v[start:end] = x[start:end] @ lora_a[slot].T  # [n, in] @ [in, R]
    return v


def sgmv_expand(
    y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, seg_starts: IntSeq, seg_ends: IntSeq,
    seg_slots: IntSeq,
) -> None:  # fmt: skip
    """for s in segments: y[s.start:s.end] += v[s.start:s.end] @ B[s.slot].T, in place."""
    for start, end, slot in _segments(seg_starts, seg_ends, seg_slots):
        y[start:end] += v[start:end] @ lora_b[slot].T  # [n, R] @ [R, out]


def sgmv(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, seg_starts: IntSeq,
    seg_ends: IntSeq, seg_slots: IntSeq,
) -> None:  # fmt: skip
    """SGMV: for s in segments: y[s.start:s.end] += (x[s.start:s.end] @ A[s.slot].T) @ B[s.slot].T."""
    sgmv_expand(y, sgmv_shrink(x, lora_a, seg_starts, seg_ends, seg_slots), lora_b, seg_starts, seg_ends,
                seg_slots)  # fmt: skip


def scale_rows(y: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor) -> None:
    """DoRA's output scale, in place: y[t] *= scales[idx[t]] for idx[t] >= 0; rows with idx -1 untouched.

    y [T, out] (a column view is fine), scales [S, out] float32 (rows of slots without DoRA are ones),
    indices [T] int32. The product is taken in float32 and rounded once to y's dtype.
    """
    rows = scales.index_select(0, indices.clamp(min=0).long())  # [T, out]
    rows = torch.where((indices >= 0).unsqueeze(1), rows, 1.0)  # base rows: scale 1
    y.copy_(y.float() * rows)
