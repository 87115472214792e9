"""Per-batch LoRA state: which device slot each token uses, and the `add_lora` hook the model calls.

Contract (docs/INTERNALS.md): every LoRA-targetable projection calls, after its base matmul (and after
the all-reduce of a row-parallel layer),

    adapter_data.add_lora(layer_idx, target, x, out)   # layer_idx -1 for lm_head
    # x [T, in_local]: the layer's input on this rank; out [T, out_local]: view of the target's columns
    # effect: out[t] += LoRA_{slot[t]}(x[t]) for every token whose adapter targets (layer_idx, target)

Prefill uses SGMV over segments, decode BGMV over the per-token slot index (see ops.py for semantics).
DoRA modules then scale the whole output of their rows: out[t] *= scales[slot(t)] (model/adapters/dora.py),
a separate step after the delta, so it composes with whichever LoRA kernels run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from model.adapters import ops as reference_ops
from model.adapters.peft_loader import LM_HEAD_LAYER, ROW_PARALLEL

# (layer_idx, target) -> (A [S, R, in_local], B [S, out_local, R]); the store's stacked device tensors.
LoraStacks = Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
# (layer_idx, target) -> DoRA output scales [S, out_local] float32 (ones for slots without DoRA); only
# modules that some resident DoRA adapter targets have one.
ScaleStacks = Mapping[tuple[int, str], torch.Tensor]


@dataclass
class AdapterBatchMetadata:
    """token_slots [T] int32 (-1: base model) and segments (runs of one slot; base runs are not segments).

    `segments` is the host copy of (start, end, slot) so prefill needs no device->host sync. `has_lora`
    false lets add_lora return at once (an all-base batch costs nothing); a CUDA graph is captured with it
    true (see `for_cuda_graph`) so that the captured step serves any slot indices later copied in.
    """

    token_slots: torch.Tensor  # [T] int32
    segment_starts: torch.Tensor  # [G] int32
    segment_ends: torch.Tensor  # [G] int32
    segment_slots: torch.Tensor  # [G] int32
    segments: tuple[tuple[int, int, int], ...]
    has_lora: bool

    @classmethod
    def for_cuda_graph(cls, num_tokens: int, device: torch.device | str) -> AdapterBatchMetadata:
        """Static decode metadata of a graph bucket: all -1 now; before each replay the runner does
        `meta.token_slots.copy_(slots)` (padding rows -1). Decode uses BGMV only, so no segments."""
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        token_slots = torch.full((num_tokens,), -1, dtype=torch.int32, device=device)
        return cls(token_slots, empty, empty.clone(), empty.clone(), (), has_lora=True)

    @classmethod
    def from_requests(
        cls, request_slots: Sequence[int], request_tokens: Sequence[int], device: torch.device | str = "cpu"
    ) -> AdapterBatchMetadata:
        """request_slots[i]: device slot of request i (-1: base); request_tokens[i]: its tokens this step."""
        if len(request_slots) != len(request_tokens):
            raise ValueError(f"{len(request_slots)} request slots but {len(request_tokens)} token counts")
        segments: list[tuple[int, int, int]] = []
        pos = 0
        for slot, n in zip(request_slots, request_tokens, strict=True):
            if slot >= 0 and n > 0:
                if segments and segments[-1][2] == slot and segments[-1][1] == pos:
                    segments[-1] = (segments[-1][0], pos + n, slot)  # same adapter as the previous request
                else:
                    segments.append((pos, pos + n, slot))
            pos += n
        slots_t = torch.tensor(list(request_slots), dtype=torch.int32)
        tokens_t = torch.tensor(list(request_tokens), dtype=torch.int64)
        token_slots = torch.repeat_interleave(slots_t, tokens_t)  # [T]
        # One dense int32 vector per field: a column view of a [G, 3] tensor keeps stride 3 even after
        # .contiguous() when G == 1 (a size-1 dim counts as contiguous), and the Triton ops need stride 1.
        starts, ends, seg_slots = ([seg[i] for seg in segments] for i in range(3))
        return cls(
            token_slots=token_slots.to(device),
            segment_starts=torch.tensor(starts, dtype=torch.int32, device=device),
            segment_ends=torch.tensor(ends, dtype=torch.int32, device=device),
            segment_slots=torch.tensor(seg_slots, dtype=torch.int32, device=device),
            segments=tuple(segments),
            has_lora=bool(segments),
        )


class AdapterBatchData:
    """AdapterBatchData(meta, stacks, is_prefill, tp=None, lm_head_indices=None, scales=None): forward's
    adapter_data (`scales`: the store's DoRA scale stacks, if any).

    `stacks` is the store's current layout (AdapterStore.batch_data builds this object); it is valid until
    the store's `layout_version` changes. `tp`: anything with rank / world_size / group (model.parallel.
    TPGroup); None means world size 1. For a decode CUDA graph, capture with has_lora true and update
    `meta.token_slots` in place: every index value, -1 included, is then served by the captured graph.
    """

    def __init__(
        self, meta: AdapterBatchMetadata, stacks: LoraStacks, is_prefill: bool, tp=None,
        lm_head_indices: torch.Tensor | None = None, scales: ScaleStacks | None = None,
    ):  # fmt: skip
        self.meta = meta
        self.stacks = stacks
        self.scales = scales or {}
        self.is_prefill = is_prefill
        self.ops = lora_ops_for(meta.token_slots.device)
        self._seg_args, self._seg_kwargs = self._segment_arguments()
        self.tp = tp
        # The same rows as forward(lm_head_indices=...): lm_head then sees [N] rows, not [T] tokens.
        self.lm_head_indices = lm_head_indices

    def _segment_arguments(self) -> tuple[tuple, dict]:
        """Prefill segments as the chosen ops want them: the reference takes the host copy (no sync per
        layer); Triton takes the device tensors plus the longest segment (its grid size, a host int)."""
        m = self.meta
        if self.ops is reference_ops:
            return tuple(zip(*m.segments, strict=True)) or ((), (), ()), {}
        longest = max((e - s for s, e, _ in m.segments), default=0)
        return (m.segment_starts, m.segment_ends, m.segment_slots), {"max_seg_len": longest}

    def add_lora(self, layer_idx: int, target: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += LoRA(x) in place for the tokens whose slot targets (layer_idx, target); else a no-op."""
        if not self.meta.has_lora:
            return
        stack = self.stacks.get((layer_idx, target))
        if stack is None:  # no resident adapter targets this module
            return
        lora_a, lora_b = stack  # [S, R, in_local], [S, out_local, R]
        m = self.meta
        if layer_idx == LM_HEAD_LAYER and self.lm_head_indices is not None:
            idx = m.token_slots[self.lm_head_indices]  # [N]: per-row slots; rows are no longer segments
            self.ops.bgmv_expand(out, self.ops.bgmv_shrink(x, lora_a, idx), lora_b, idx)
            self._dora(layer_idx, target, out, idx)
            return
        if x.shape[0] != m.token_slots.shape[0]:
            raise ValueError(
                f"{target} of layer {layer_idx} got {x.shape[0]} rows for {m.token_slots.shape[0]} tokens"
                + (
                    ": pass forward's lm_head_indices to the AdapterBatchData"
                    if layer_idx == LM_HEAD_LAYER
                    else ""
                )
            )
        ops = self.ops
        if self.is_prefill:
            v = ops.sgmv_shrink(x, lora_a, *self._seg_args, **self._seg_kwargs)  # [T, R]
        else:
            v = ops.bgmv_shrink(x, lora_a, m.token_slots)  # [T, R]
        if target in ROW_PARALLEL and self.tp is not None and self.tp.world_size > 1:
            # Row-parallel: each rank holds A's columns for its input slice, so v is a partial sum.
            torch.distributed.all_reduce(v, group=self.tp.group)
        if self.is_prefill:
            ops.sgmv_expand(out, v, lora_b, *self._seg_args, **self._seg_kwargs)
        else:
            ops.bgmv_expand(out, v, lora_b, m.token_slots)
        self._dora(layer_idx, target, out, m.token_slots)

    def _dora(self, layer_idx: int, target: str, out: torch.Tensor, slots: torch.Tensor) -> None:
        """DoRA rows: out[t] *= scale[slot(t)] over base + delta; other rows have scale 1 (untouched)."""
        scales = self.scales.get((layer_idx, target))
        if scales is not None:
            dora_scale_op_for(out.device)(out, scales, slots)


def lora_ops_for(device: torch.device):
    """The one place that picks the LoRA kernels: Triton on CUDA when importable, else torch reference.

    Both modules expose bgmv_shrink/bgmv_expand/sgmv_shrink/sgmv_expand with the semantics of ops.py.
    The reference BGMV contracts against every slot of the stack; the Triton one reads only the slots
    the batch uses, which is what makes many resident adapters cheap on a GPU.
    """
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from model.kernels import lora as triton_ops

        return triton_ops
    return reference_ops


def dora_scale_op_for(device: torch.device):
    """scale_rows (ops.py semantics): the Triton kernel on CUDA when importable, else the torch reference."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from model.kernels.dora import scale_rows

        return scale_rows
    return reference_ops.scale_rows
