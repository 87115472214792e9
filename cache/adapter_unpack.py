"""An adapter's uploaded bytes -> its slot of the layout's stacks, in a few launches per adapter.

A PEFT file stores, per target and part (q_proj lora_A, ...), one tensor per layer, all of one dtype,
shape and strides, at offsets a constant step apart once the layers are taken in file order (names
sort "layers.0, layers.1, layers.10, ..."; each layer's block has the same size). The layout's stacks
of one group are views of one device buffer a constant step apart per layer too (cache/adapter_shapes.
zeroed_stacks). So one strided view of the bytes, [n, rows, cols] with the layers in file order, and
one of the slot's rows in every layer's stack, [layers, rows, cols], cover a (target, part) everywhere,
and one `index_copy_` (dim 0: each file row's layer) moves it:

    run (target, part):  dst[slot][layer(k) - first] = cast(src[k]);  B: dst[slot] *= scale afterwards

14 copies (plus 7 scales) for an adapter on all seven projections instead of 448 per-tensor copies,
and no per-tensor Python. Scaling the slot's rows after the copy also scales the zero rows of layers
the adapter skips (still zero) and never touches the adapter's bytes, which a crafted file may alias.
Targets whose tensors do not line up this way (another writer's order, per-layer ranks or scales, a
layout whose layers differ) are copied module by module (`loose`; multi-tensor copies): same values.

Values equal the float32 fold-then-cast path bit for bit (`adapter_host.prepared`): B is scaled after
the cast when the cast is exact (in the store dtype), else in float32 before it; float64 goes via
float32. `plan.check` then reads the slot back on the device: min and max per run (or module), one
small tensor the host reads after the upload, so a NaN/Inf (from the file, alpha, a merge, or a cast
that overflows) refuses the adapter without a pass over its bytes on the host.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from cache.adapter_host import HostAdapter, TensorBytes, exact_cast
from model.adapters.stacks import GROUP_OF, LoraGroupStack

Key = tuple[int, str]  # (layer_idx, target); layer_idx -1 is lm_head
GroupKey = tuple[int, str]
_HALF_OR_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


def cast_source(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as the stacks receive it unscaled: float64 via float32 (as the float32 path rounds), then dtype."""
    if t.dtype not in _HALF_OR_SINGLE:
        t = t.float()
    return t.to(dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One (target, part) over the layers that have it: a strided source and a strided slot view."""

    target: str
    part: str  # "a" | "b"
    src: TensorBytes  # [n, rows, cols] over the adapter's bytes, layers in file order
    layers: tuple[int, ...]  # the layer of each source row
    positions: tuple[int, ...]  # layer - first, per source row
    idx: torch.Tensor  # [n] int64 on the device: `positions`
    scale: float  # B's scale (1.0 for A)
    dst: torch.Tensor  # a stack tensor whose storage holds the rows (storage offsets are absolute)
    dst_shape: tuple[int, int, int]  # [last - first + 1, rows, cols]
    dst_stride: tuple[int, int, int]
    dst_offset: int  # storage offset of slot 0's rows in layer `first`
    slot_stride: int
    first: int

    def slot_view(self, slot: int) -> torch.Tensor:
        return self.dst.as_strided(self.dst_shape, self.dst_stride, self.dst_offset + slot * self.slot_stride)


@dataclasses.dataclass
class UnpackPlan:
    """How one module table lands in any slot of one layout (cached by the layout per table)."""

    runs: list[Run]
    loose: list[Key]  # modules copied one by one
    ranks: torch.Tensor  # [groups] int32 on the device: the slot's column of the layout's rank table

    def unpack(self, host: HostAdapter, raw: torch.Tensor, slot: int, stacks: dict[GroupKey, LoraGroupStack],
               dtype: torch.dtype) -> None:  # fmt: skip
        """Write `host`'s modules from `raw` (its bytes) into `slot`; the slot must read zero before.
        A run is one `index_copy_` where launches cost more than bytes (CUDA); on the CPU, whose
        index_copy_ moves element by element, its layers are copied one by one (memcpy speed)."""
        pairs = []  # (dst, src, scale) for per-tensor work
        gather = _gather(raw)
        for run in self.runs:
            src, dst = run.src.view(raw), run.slot_view(slot)
            if not gather:
                rows = dst.unbind(0)
                pairs += [(rows[j], s, run.scale) for j, s in zip(run.positions, src.unbind(0), strict=True)]
            elif run.scale == 1.0:
                dst.index_copy_(0, run.idx, cast_source(src, dtype))
            elif exact_cast(src.dtype, dtype):
                dst.index_copy_(0, run.idx, src.to(dtype))
                dst.mul_(run.scale)
            else:
                dst.index_copy_(0, run.idx, (src.float() * run.scale).to(dtype))
        for key in self.loose:
            m, (a_rows, b_rows) = host.modules[key], _rows(stacks, key, slot, host)
            pairs += [(a_rows, m.a.view(raw), 1.0), (b_rows, m.b.view(raw), m.scale)]
        _copy_scaled(pairs, dtype)

    def check(self, host: HostAdapter, slot: int, stacks: dict[GroupKey, LoraGroupStack]) -> torch.Tensor:
        """[2 * (runs + 2 * loose)]: min and max of what each run / loose A and B put into `slot` (on the
        device; one small tensor, read by `problem` once the upload landed)."""
        views = [run.slot_view(slot) for run in self.runs]
        for key in self.loose:
            views += list(_rows(stacks, key, slot, host))
        return torch.stack([bound for v in views for bound in torch.aminmax(v)])

    def problem(self, bounds: torch.Tensor, host: HostAdapter, slot: int,
                stacks: dict[GroupKey, LoraGroupStack]) -> Key | None:  # fmt: skip
        """After `check`'s values landed: the first module whose values are not all finite, or None."""
        ok = torch.isfinite(bounds.cpu())
        if bool(ok.all()):
            return None
        j = int((~ok).nonzero()[0]) // 2
        if j < len(self.runs):
            run = self.runs[j]
            finite = torch.isfinite(run.slot_view(slot)).flatten(1).all(dim=1).cpu()
            return run.first + int((~finite).nonzero()[0]), run.target
        return self.loose[(j - len(self.runs)) // 2]


def _gather(raw: torch.Tensor) -> bool:
    return raw.is_cuda


def _copy_scaled(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype) -> None:
    """dst = src cast and scaled, per pair, rounded as the float32 path (module docstring): the copies in
    one multi-tensor call; B * scale in the store dtype when the cast is exact (in the same pass when
    src already has that dtype), else in float32 before the cast."""
    dst, src, fused, after = [], [], [], []
    for d, s, scale in pairs:
        if scale == 1.0:
            dst.append(d)
            src.append(cast_source(s, dtype))
        elif s.dtype == dtype:
            fused.append((d, s, scale))
        elif exact_cast(s.dtype, dtype):
            dst.append(d)
            src.append(s)
            after.append((d, scale))
        else:
            dst.append(d)
            src.append((s.float() * scale).to(dtype))
    if dst:
        torch._foreach_copy_(dst, src)
    for d, s, scale in fused:  # per tensor: _foreach_mul rounds the scale to bf16 on the CPU
        torch.mul(s, scale, out=d)
    for d, scale in after:
        d.mul_(scale)


def build_plan(host: HostAdapter, stacks: dict[GroupKey, LoraGroupStack], device: torch.device) -> UnpackPlan:
    """The runs of `host`'s module table into `stacks` (which hold every module: ensure_resident)."""
    by_target: dict[str, list[tuple[int, object]]] = defaultdict(list)
    for (layer, target), m in host.modules.items():
        by_target[target].append((layer, m))
    runs, loose = [], []
    for target, mods in sorted(by_target.items()):
        pair = [_run(target, part, mods, stacks, device) for part in ("a", "b")]
        if None in pair:
            loose += sorted((layer, target) for layer, _ in mods)
        else:
            runs += pair
    ranks = []
    for (layer, _), stack in stacks.items():
        present = [host.modules.get((layer, t)) for t in stack.targets]
        ranks.append(max((m.a.shape[0] for m in present if m is not None), default=0))
    return UnpackPlan(runs, loose, torch.tensor(ranks, dtype=torch.int32).to(device))


def _rows(stacks: dict[GroupKey, LoraGroupStack], key: Key, slot: int, host: HostAdapter):
    """(A rows [r, in], B columns [out, r]) of `key`'s member in `slot`."""
    layer, target = key
    stack = stacks[(layer, GROUP_OF[target])]
    i, r, big_r = stack.targets.index(target), host.modules[key].a.shape[0], stack.rank
    b0, w = stack.b_offsets[i], stack.widths[i]
    return stack.a[slot, i * big_r : i * big_r + r], stack.b[slot, b0 : b0 + w, :r]


def _step(values: list[int]) -> int | None:
    """The constant difference of an ascending sequence (0 for one value), or None."""
    if len(values) == 1:
        return 0
    step = values[1] - values[0]
    return step if all(b - a == step for a, b in zip(values, values[1:], strict=False)) else None


def _run(target: str, part: str, mods, stacks: dict[GroupKey, LoraGroupStack], device) -> Run | None:
    """The run of (target, part) over `mods` [(layer, ModuleBytes)], or None when it does not line up."""
    tbs = sorted(((getattr(m, part), layer) for layer, m in mods), key=lambda tl: tl[0].offset)
    t0 = tbs[0][0]
    like = (t0.dtype, t0.shape, t0.stride)
    if len(t0.shape) != 2 or any((t.dtype, t.shape, t.stride) != like for t, _ in tbs):
        return None
    scales = {m.scale for _, m in mods} if part == "b" else {1.0}
    src_step = _step([t.offset for t, _ in tbs])
    size = t0.dtype.itemsize
    if len(scales) != 1 or src_step is None or src_step % size or t0.offset % size:
        return None
    views = {}
    for t, layer in tbs:
        stack = stacks.get((layer, GROUP_OF[target]))
        if stack is None or target not in stack.targets:
            return None
        i, big_r = stack.targets.index(target), stack.rank
        if part == "a":  # [cap, r, in] of [cap, NT * R, in]
            view = stack.a[:, i * big_r : i * big_r + t.shape[0]]
        else:  # [cap, out, r] of [cap, sum(out), R]
            b0, w = stack.b_offsets[i], stack.widths[i]
            view = stack.b[:, b0 : b0 + w, : t.shape[1]]
        if tuple(view.shape[1:]) != t.shape:
            return None
        views[layer] = view
    layers = sorted(views)
    v0 = views[layers[0]]
    storage = v0.untyped_storage().data_ptr()
    for v in views.values():
        if v.untyped_storage().data_ptr() != storage or v.stride() != v0.stride():
            return None
    offsets = [views[layer].storage_offset() - v0.storage_offset() for layer in layers]
    dst_step = 0 if len(layers) == 1 else offsets[1] // (layers[1] - layers[0])
    if any(off != (layer - layers[0]) * dst_step for off, layer in zip(offsets, layers, strict=True)):
        return None
    first, order = layers[0], [layer for _, layer in tbs]
    src = TensorBytes(t0.offset, t0.dtype, (len(tbs), *t0.shape), (src_step // size, *t0.stride))
    positions = tuple(layer - first for layer in order)
    return Run(
        target, part, src, tuple(order), positions, torch.tensor(positions).to(device),
        scales.pop(), v0, (layers[-1] - first + 1, *t0.shape), (dst_step, *v0.stride()[1:]),
        v0.storage_offset(), v0.stride(0), first,
    )  # fmt: skip
