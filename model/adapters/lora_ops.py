"""The two LoRA backends behind AdapterBatchData: torch reference (CPU) and Triton (CUDA).

Both apply one projection group (model/adapters/stacks.py) with one shrink and one expand:

    rows = backend.rows(meta, is_prefill, num_slots, row_slots)   # once per batch (+ lm_head's rows)
    v = backend.shrink(x, stack, rows)                # [.., T, NT*R] (Triton: split-K partials)
    v = backend.reduced(v)                            # the partial sums folded, before an all-reduce
    backend.expand(y, v, stack, slices, rows)         # y [T, cols] += per member, in place
    backend.expand(y, v, stack, slices, rows, store=True)  # y[:, members] = the delta (decode rows)

`slices` are (b_start, b_end, y_start) per stack member: B rows -> output columns of y.

The reference is ops.py's SGMV (prefill segments) / BGMV (per-token slots), one call per member for the
expand; it is exact in float32 and what the CPU runs. The Triton backend groups tokens by slot on the
device (model/kernels/lora.py plans) so that each adapter's A and B are read once per step.
"""

from __future__ import annotations

import importlib.util

import torch

from model.adapters import ops as reference_ops
from model.adapters.stacks import LoraGroupStack


class TorchLoraOps:
    """ops.py's SGMV (host segments, no sync) or BGMV (per-token slots) per group member."""

    name = "torch"

    @staticmethod
    def rows(meta, is_prefill: bool, num_slots: int, row_slots: torch.Tensor | None):
        if row_slots is not None:  # a subset of rows (lm_head_indices): per-row slots, BGMV
            return ("bgmv", row_slots)
        if is_prefill:
            return ("sgmv", tuple(zip(*meta.segments, strict=True)) or ((), (), ()))
        return ("bgmv", meta.token_slots)

    @staticmethod
    def shrink(x: torch.Tensor, stack: LoraGroupStack, rows) -> torch.Tensor:
        kind, arg = rows
        if kind == "sgmv":
            return reference_ops.sgmv_shrink(x, stack.a, *arg)  # [T, NT*R]
        return reference_ops.bgmv_shrink(x, stack.a, arg)

    @staticmethod
    def reduced(v: torch.Tensor) -> torch.Tensor:
        return v

    @staticmethod
    def expand(y: torch.Tensor, v: torch.Tensor, stack: LoraGroupStack, slices, rows,
               store: bool = False) -> None:  # fmt: skip
        kind, arg = rows
        r = stack.rank
        for i, (b0, b1, y0) in enumerate(slices):
            out, vi, bi = y[:, y0 : y0 + b1 - b0], v[:, i * r : (i + 1) * r], stack.b[:, b0:b1]
            if store:  # the delta itself, zero on rows without an adapter
                out.zero_()
            if kind == "sgmv":
                reference_ops.sgmv_expand(out, vi, bi, *arg)
            else:
                reference_ops.bgmv_expand(out, vi, bi, arg)


class TritonLoraOps:
    """model/kernels/lora.py: tokens grouped by slot in tiles; one launch per shrink and per expand."""

    name = "triton"

    def __init__(self, kernels=None, sms: int | None = None):
        if kernels is None:  # tests pass an interpreted copy of the module
            from model.kernels import lora as kernels
        self.k = kernels
        self.sms = sms  # the SMs the kernels' grids are sized for (None: the device's)

    def rows(self, meta, is_prefill: bool, num_slots: int, row_slots: torch.Tensor | None):
        if row_slots is not None:
            return self.k.plan_from_slots(row_slots, num_slots)
        if is_prefill:  # contiguous runs known on the host: exact tiles, one upload
            return self.k.plan_from_segments(
                meta.segments, meta.token_slots.shape[0], meta.token_slots.device
            )
        # decode: static shapes from the device slots, so a CUDA graph serves any mix of adapters
        return self.k.plan_from_slots(meta.token_slots, num_slots)

    def shrink(self, x: torch.Tensor, stack: LoraGroupStack, plan) -> torch.Tensor:
        # -> [1, T, NT*R]. sms given: the kernels run beside base matmuls on the SMs those leave (a side
        # stream), where fewer split-K partials pay (lora.choose_splits)
        return self.k.lora_shrink(x, stack.a, stack.ranks, plan, rank=stack.rank, sms=self.sms,
                                  beside_matmuls=self.sms is not None)  # fmt: skip

    @staticmethod
    def reduced(v: torch.Tensor) -> torch.Tensor:
        return v.sum(0, keepdim=True) if v.shape[0] > 1 else v

    def expand(self, y: torch.Tensor, v: torch.Tensor, stack: LoraGroupStack, slices, plan,
               store: bool = False) -> None:  # fmt: skip
        self.k.lora_expand(y, v, stack.b, stack.ranks, plan, rank=stack.rank, slices=slices, sms=self.sms,
                           store=store)  # fmt: skip


def lora_ops_for(device: torch.device, sms: int | None = None):
    """The one place that picks the LoRA backend: Triton on CUDA when importable, else torch reference.
    `sms`: Triton grids sized for that many SMs (None: the device's)."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return TritonLoraOps(sms=sms)
    return TorchLoraOps()
