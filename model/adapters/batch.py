"""Per-batch LoRA state: which device slot each token uses, and the `add_lora` hook the model calls.

Contract (docs/INTERNALS.md): every LoRA-targetable projection group calls, after its base matmul (and
after the all-reduce of a row-parallel layer),

    adapter_data.add_lora(layer_idx, name, x, out, widths=None)   # layer_idx -1 for lm_head
    # name: a group of stacks.LORA_GROUPS ("qkv_proj", "gate_up_proj", "o_proj", "down_proj", "lm_head")
    #       or one target ("q_proj", ...); x [T, in_local]: the input on this rank;
    # out [T, cols]: the group's fused output (a view is fine), its members' columns side by side with
    #       `widths` (needed when the group has more than one member)
    # effect: out[t, member columns] += LoRA_{slot[t], member}(x[t]) for every token whose adapter
    #       targets that member; nothing for other tokens and members

One shrink and one expand per call, over every member of the group (lora_ops.py: torch reference on the
CPU, Triton on CUDA: tokens grouped by adapter so each adapter's weights are read once per step).
DoRA members then scale their output columns: out[t, member] *= scales[slot(t)] (model/adapters/dora.py),
one step per member with a scale stack after the group's expand, so it composes with either backend.

The model reaches add_lora through two calls, so that a decode step's LoRA can run beside the base matmul:

    pending = adapter_data.begin_lora(layer_idx, name, x, widths)   # before the base matmul (None: no LoRA)
    out = base(x)
    delta = pending.finish(out)   # None: added to out in place; else [T, cols] that out's consumer adds

Decode batches of a store with `concurrent` LoRA take the delta path: begin_lora forks a side stream (high
priority) from the current one and runs the group's shrink and expand there into a delta buffer (the expand
stores the delta, zero on base rows, so the buffer needs no memset when the stack covers all its columns),
while the base matmul runs on the current stream; finish makes the current stream wait for that work and
returns the buffer, which the consumer kernel adds (fused: the next RMSNorm, silu_and_mul, the rope + KV
write). A small adapter then costs about its bytes instead of its launches (docs/lora.md). Everything else
(prefill, lm_head, DoRA members, row-parallel groups under TP whose shrink needs an all-reduce, stacks per
member) is added in place at finish, as before. On the CPU the delta path runs inline (no streams): its
tests check the plumbing the GPU relies on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from model.adapters import ops as reference_ops
from model.adapters.lora_ops import lora_ops_for
from model.adapters.peft_loader import LM_HEAD_LAYER, ROW_PARALLEL
from model.adapters.stacks import GROUP_OF, LORA_GROUPS, LoraGroupStack

# (layer_idx, group or target name) -> LoraGroupStack (the store's device stacks), or a plain
# (A [S, R, in_local], B [S, out_local, R]) pair for one target at full rank.
LoraStacks = Mapping[tuple[int, str], LoraGroupStack | tuple[torch.Tensor, torch.Tensor]]
# (layer_idx, target) -> DoRA output scales [S, out_local] float32 (ones for slots without DoRA); only
# members that some resident DoRA adapter targets have one (per member, also inside a fused group).
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
        `meta.token_slots.copy_(slots)` (padding rows -1). Decode groups tokens from the per-token slots
        (on the device, inside the graph), so no host segments."""
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
    """AdapterBatchData(meta, stacks, is_prefill, tp=None, lm_head_indices=None, scales=None, ready=None,
    concurrent=False, stream=None, lora_sms=None): forward's adapter_data (`scales`: the store's DoRA scale
    stacks, if any).

    `concurrent`: decode groups return their delta for the consumer to add (module docstring), computed
    on `stream` when given (CUDA: the store's LoRA stream), else inline. `lora_sms`: the SMs the Triton
    kernels' grids are sized for (a graph whose matmuls leave that many free; None: the device's).

    `stacks` is the store's current layout (AdapterStore.batch_data builds this object); it is valid until
    the store's `layout_version` changes. `tp`: anything with rank / world_size / group (model.parallel.
    TPGroup); None means world size 1. For a decode CUDA graph, capture with has_lora true and update
    `meta.token_slots` in place: every index value, -1 included, is then served by the captured graph
    (the Triton plan is computed from them on the device, inside the graph).
    """

    def __init__(
        self, meta: AdapterBatchMetadata, stacks: LoraStacks, is_prefill: bool, tp=None,
        lm_head_indices: torch.Tensor | None = None, scales: ScaleStacks | None = None,
        ready: Mapping[int, object] | None = None, concurrent: bool = False,
        stream: torch.cuda.Stream | None = None, lora_sms: int | None = None,
    ):  # fmt: skip
        self.meta = meta
        self.stacks = stacks
        self.scales = scales or {}
        self.is_prefill = is_prefill
        self.ops = lora_ops_for(meta.token_slots.device, lora_sms)
        self.tp = tp
        # The same rows as forward(lm_head_indices=...): lm_head then sees [N] rows, not [T] tokens.
        self.lm_head_indices = lm_head_indices
        # Per layer, a CUDA event the layer's LoRA waits for: an adapter upload still in flight (the
        # store's side stream), so the copy overlaps the layers before. None/empty: nothing in flight.
        self.ready = dict(ready or {})
        self._rows: dict[tuple[bool, int], object] = {}  # token grouping, built once per batch
        self._single: dict[tuple[int, str], LoraGroupStack] = {}
        self.concurrent = concurrent and not is_prefill
        self.stream = stream if self.concurrent else None
        self._side_used = False  # work (plans included) was enqueued on `stream`

    @property
    def has_lora(self) -> bool:
        """Some row of the batch has an adapter (else begin_lora / add_lora do nothing)."""
        return self.meta.has_lora

    def begin_lora(self, layer_idx: int, target: str, x: torch.Tensor,
                   widths: tuple[int, ...]) -> InPlaceLora | DeltaLora | None:  # fmt: skip
        """Start `target`'s LoRA of x before its base matmul, whose output columns `widths` splits into
        the group's members (one width for one member); None when the batch has no adapter rows."""
        if not self.meta.has_lora:
            return None
        members = LORA_GROUPS.get(target, (target,))
        widths = tuple(widths)
        if len(widths) != len(members):
            raise ValueError(f"{target}: widths {widths} do not name one width per member of {members}")
        stack = self._stack(layer_idx, target) if self.concurrent else None
        in_place = (
            stack is None
            or layer_idx == LM_HEAD_LAYER
            or (target in ROW_PARALLEL and self.tp is not None and self.tp.world_size > 1)
            or any((layer_idx, m) in self.scales for m in members)
        )
        if in_place:
            return InPlaceLora(self, layer_idx, target, x, widths)
        delta = x.new_empty((x.shape[0], sum(widths)))  # on the current stream, before the fork
        # The expand stores the delta (zero on base rows) when the stack's members cover every column;
        # otherwise the columns of members no resident adapter targets need zeros first.
        store = sum(stack.widths) == sum(widths)
        done = None
        if self.stream is not None:
            # x is ready; the base matmul is enqueued on the current stream after this point
            self.stream.wait_stream(torch.cuda.current_stream(x.device))
            self._side_used = True
        with torch.cuda.stream(self.stream):  # no stream (the CPU): inline, a no-op context
            if not store:
                delta.zero_()
            self._add(layer_idx, target, x, delta, widths, members, stack, store)
            if self.stream is not None:
                done = torch.cuda.Event()
                done.record(self.stream)
        return DeltaLora(delta, done)

    def add_lora(self, layer_idx: int, target: str, x: torch.Tensor, out: torch.Tensor,
                 widths: tuple[int, ...] | None = None) -> None:  # fmt: skip
        """out += LoRA(x) in place for the tokens and members that an adapter targets; else a no-op."""
        if not self.meta.has_lora:
            return
        members = LORA_GROUPS.get(target, (target,))
        widths = tuple(widths) if widths is not None else (out.shape[1],)
        if len(widths) != len(members) or sum(widths) != out.shape[1]:
            raise ValueError(f"{target}: widths {widths} do not split {out.shape[1]} columns into {members}")
        found = self._stack(layer_idx, target)
        if found is None:
            if len(members) > 1:  # stacks per target (no group stack): one call per member
                y0 = 0
                for m, w in zip(members, widths, strict=True):
                    self.add_lora(layer_idx, m, x, out[:, y0 : y0 + w])
                    y0 += w
            return
        if self._side_used:  # plans or uploads it waited for live on the side stream
            torch.cuda.current_stream(x.device).wait_stream(self.stream)
        self._add(layer_idx, target, x, out, widths, members, found)

    def _add(self, layer_idx: int, target: str, x: torch.Tensor, out: torch.Tensor, widths: tuple[int, ...],
             members: tuple[str, ...], stack: LoraGroupStack, store: bool = False) -> None:  # fmt: skip
        event = self.ready.pop(layer_idx, None)
        if event is not None:
            torch.cuda.current_stream(x.device).wait_event(event)
        starts = dict(zip(members, [sum(widths[:i]) for i in range(len(members))], strict=True))
        slices = []
        for t, b0, w in zip(stack.targets, stack.b_offsets, stack.widths, strict=True):
            if widths[members.index(t)] != w:
                got = widths[members.index(t)]
                raise ValueError(f"{t} of layer {layer_idx}: {got} columns, its stack has {w}")
            slices.append((b0, b0 + w, starts[t]))
        selected = layer_idx == LM_HEAD_LAYER and self.lm_head_indices is not None
        if not selected and x.shape[0] != self.meta.token_slots.shape[0]:
            raise ValueError(
                f"{target} of layer {layer_idx} got {x.shape[0]} rows for {self.meta.token_slots.shape[0]} "
                "tokens" + (": pass forward's lm_head_indices to the AdapterBatchData"
                            if layer_idx == LM_HEAD_LAYER else "")
            )  # fmt: skip
        rows = self._rows_for(selected, stack.a.shape[0])
        v = self.ops.shrink(x, stack, rows)
        if target in ROW_PARALLEL and self.tp is not None and self.tp.world_size > 1:
            # Row-parallel: each rank holds A's columns for its input slice, so v is a partial sum.
            v = self.ops.reduced(v)
            torch.distributed.all_reduce(v, group=self.tp.group)
        self.ops.expand(out, v, stack, slices, rows, store=store)
        if self.scales:
            slots = self.meta.token_slots[self.lm_head_indices] if selected else self.meta.token_slots
            for t, (b0, b1, y0) in zip(stack.targets, slices, strict=True):
                scales = self.scales.get((layer_idx, t))
                if scales is not None:  # base + delta of this member's columns, DoRA rows only
                    dora_scale_op_for(out.device)(out[:, y0 : y0 + b1 - b0], scales, slots)

    def _stack(self, layer_idx: int, name: str) -> LoraGroupStack | None:
        """The stack serving `name` at this layer: its own entry, else its member rows of a group stack."""
        key = (layer_idx, name)
        stack = self.stacks.get(key)
        if isinstance(stack, tuple):  # a plain (A, B) pair: one member at full rank
            if key not in self._single:
                self._single[key] = LoraGroupStack.single(name, *stack)
            return self._single[key]
        if stack is not None:
            return stack
        group = GROUP_OF.get(name)
        parent = self.stacks.get((layer_idx, group)) if group not in (None, name) else None
        return parent.member(name) if isinstance(parent, LoraGroupStack) else None

    def _rows_for(self, selected: bool, num_slots: int):
        key = (selected, num_slots)
        if key not in self._rows:
            row_slots = self.meta.token_slots[self.lm_head_indices] if selected else None
            self._rows[key] = self.ops.rows(self.meta, self.is_prefill, num_slots, row_slots)
        return self._rows[key]


def dora_scale_op_for(device: torch.device):
    """scale_rows (ops.py semantics): the Triton kernel on CUDA when importable, else the torch reference."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from model.kernels.dora import scale_rows

        return scale_rows
    return reference_ops.scale_rows


class InPlaceLora:
    """A begun LoRA that adds itself to the base output in place at finish (`hook.add_lora`)."""

    def __init__(self, hook, layer_idx: int, target: str, x: torch.Tensor, widths: tuple[int, ...] | None):
        self.hook, self.layer_idx, self.target, self.x, self.widths = hook, layer_idx, target, x, widths

    def finish(self, out: torch.Tensor) -> None:
        self.hook.add_lora(self.layer_idx, self.target, self.x, out, self.widths)


class DeltaLora:
    """A begun LoRA computed into its own buffer (on a side stream when `done` is an event)."""

    def __init__(self, delta: torch.Tensor, done: torch.cuda.Event | None):
        self.delta, self.done = delta, done

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """-> delta [T, cols] for out's consumer to add; the current stream waits for it first."""
        if self.done is not None:
            torch.cuda.current_stream(out.device).wait_event(self.done)
        return self.delta


class InPlaceHook:
    """Mixin for hooks that only implement add_lora (test doubles): begin_lora adds in place at finish."""

    has_lora = True  # a test double may add to any row

    def begin_lora(self, layer_idx: int, target: str, x: torch.Tensor,
                   widths: tuple[int, ...]) -> InPlaceLora:  # fmt: skip
        return InPlaceLora(self, layer_idx, target, x, widths)
