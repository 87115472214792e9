"""Device side of the adapter store: fixed-capacity stacks, slot placement and LRU residency.

`AdapterLayout` is the base class of `cache.adapter_store.AdapterStore`: the store keeps the registry and
the host copies, this class keeps which adapters are device-resident and where. A subclass provides
`_host_of(index) -> HostAdapter` for every registered index.

Device layout (CUDA-graph friendly): per (layer_idx, group) one `LoraGroupStack` (model/adapters/
stacks.py): the group's members that some resident adapter targets (q/k/v in one stack, gate/up in one,
o, down, lm_head alone), A [cap, NT*R, in_local], B [cap, sum(out_local), R] (B scaled, TP-sliced), R =
the bucket (power of two >= 8) of the largest resident rank in the group, zero padding elsewhere, and
per slot the adapter's largest rank in the group (0: it targets none of them), so one shrink and one
expand serve the whole group and a rank-8 adapter reads 8 rows whatever R is. All A/B stacks of one
layout are contiguous views of one device buffer (one allocation, one memset); the per-slot ranks are
one small int32 tensor [groups, cap].
A batch only changes the per-token slot index. `device_bytes()` is what these stacks allocate and never
exceeds the budget: when new adapters do not fit, least recently used residents move out (they stay
registered; their bytes come back from the host side on next use), and the stacks are re-laid out only when capacity or a rank bucket must change
(`layout_version` then increments: recapture CUDA graphs, rebuild AdapterBatchData).

Placing an adapter (cache/adapter_host.Uploader) reads its bytes into a pinned staging buffer, then per
layer copies them to the device on a side stream and unpacks them into the slot (TP slice, B * scale,
copy, zero padding) with a few multi-tensor launches, recording an event per layer: a prefill forward
waits per layer (`ready_events`, so the copy overlaps the layers before), a decode step or a re-layout
for all of them (`wait_uploads`). Growing the capacity copies the resident slots device-to-device
instead of re-uploading every resident adapter from the host; the first layout already has `min_slots`
slots (when the budget allows) so the first adapters loaded do not each re-lay out the stacks.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import torch

from cache.adapter_host import HostAdapter, Uploader, prepared
from model.adapters.errors import AdapterBudgetExceeded
from model.adapters.stacks import GROUP_OF, LORA_GROUPS, LoraGroupStack

MIN_RANK_BUCKET = 8
Key = tuple[int, str]  # (layer_idx, target); layer_idx -1 is lm_head
GroupKey = tuple[int, str]  # (layer_idx, group of stacks.LORA_GROUPS)


def rank_bucket(r: int) -> int:
    """Padded rank of a stack: powers of two from 8, so few distinct shapes (and CUDA graphs) exist."""
    return max(MIN_RANK_BUCKET, 1 << (r - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GroupShape:
    """What one group stack needs: rank bucket, input width, the members present and their widths."""

    rank: int
    fan_in: int
    members: tuple[tuple[str, int], ...]  # (target, out_local), in the group's fused-output order

    def slot_elems(self) -> int:
        return self.rank * (len(self.members) * self.fan_in + sum(w for _, w in self.members))


def group_shapes(modules) -> dict[GroupKey, GroupShape]:
    """modules: iterable of ((layer, target), r, in_local, out_local) -> the group stacks holding them."""
    acc: dict[GroupKey, list] = {}
    for (layer, target), r, fan_in, fan_out in modules:
        entry = acc.setdefault((layer, GROUP_OF[target]), [0, fan_in, {}])
        entry[0] = max(entry[0], rank_bucket(r))
        entry[2][target] = fan_out
    return {
        key: GroupShape(r, fan_in, tuple((t, widths[t]) for t in LORA_GROUPS[key[1]] if t in widths))
        for key, (r, fan_in, widths) in acc.items()
    }


class AdapterLayout:
    """Which registered adapters are device-resident, in which slot of which stacks (module docstring)."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype, budget_bytes: int | None,
                 max_slots: int, min_slots: int = 1):  # fmt: skip
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.max_slots = max_slots
        self.min_slots = max(1, min(min_slots, max_slots))
        self._uploader = Uploader(self.device)
        self._ready: dict[int, torch.cuda.Event] = {}  # layer -> last upload event touching it (CUDA)
        self._ready_all: torch.cuda.Event | None = None  # the last upload event of all
        self.layout_version = 0
        self._cap = 0  # slots allocated in every stack
        self._stacks: dict[GroupKey, LoraGroupStack] = {}
        self._ranks = torch.zeros(0, 0, dtype=torch.int32, device=self.device)  # [groups, cap], stack order
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # resident index -> slot, LRU first

    def _host_of(self, index: int) -> HostAdapter:
        """The host copy of registered `index` (the subclass's registry)."""
        raise NotImplementedError

    def resident_indices(self) -> list[int]:
        return list(self._slot_of)

    def device_bytes(self) -> int:
        """Bytes of the A/B stacks (the per-slot rank vectors add 4 bytes per slot and group)."""
        return sum(s.a.nbytes + s.b.nbytes for s in self._stacks.values())

    def _elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _adapter_device_bytes(self, host: HostAdapter) -> int:
        """Stack bytes of one slot for `host` alone, at its rank buckets (download()'s budget share)."""
        return sum(g.slot_elems() for g in group_shapes(host.shapes()).values()) * self._elem()

    def _need(self, indices: Sequence[int]) -> dict[GroupKey, GroupShape]:
        """The group stacks holding `indices` together."""
        return group_shapes(m for index in indices for m in self._host_of(index).shapes())

    def _layout_bytes(self, cap: int, need: dict[GroupKey, GroupShape]) -> int:
        return cap * sum(g.slot_elems() for g in need.values()) * self._elem()

    def _fits(self, cap: int, need) -> bool:
        if cap > self.max_slots:
            return False
        return self.budget_bytes is None or self._layout_bytes(cap, need) <= self.budget_bytes

    def _fits_current_shapes(self, index: int) -> bool:
        for (layer, target), r, _, _ in self._host_of(index).shapes():
            stack = self._stacks.get((layer, GROUP_OF[target]))
            if stack is None or target not in stack.targets or stack.rank < r:
                return False
        return True

    def _ensure_resident(self, required: list[int]) -> None:
        for index in required:
            if index in self._slot_of:
                self._slot_of.move_to_end(index)  # most recently used last
        missing = [i for i in required if i not in self._slot_of]
        if not missing:
            return
        if len(required) > self.max_slots:
            raise AdapterBudgetExceeded(f"batch needs {len(required)} adapters; only {self.max_slots} slots")
        shapes_ok = all(self._fits_current_shapes(i) for i in missing)
        free = sorted(set(range(self._cap)) - set(self._slot_of.values()))
        evictable = [i for i in self._slot_of if i not in required]  # LRU first
        if shapes_ok and len(free) >= len(missing):
            return self._place(missing, free)
        # Grow (capacity or rank buckets) while keeping every resident adapter, if the budget allows.
        members = list(self._slot_of) + missing
        need = self._need(members)
        grown = min(self.max_slots, 1 << (len(members) - 1).bit_length())
        for cap in (max(self.min_slots, grown), grown, len(members)):
            if cap >= len(members) and self._fits(cap, need):
                return self._rebuild(members, cap)
        # Evict least recently used residents into the slots the current layout already has.
        if shapes_ok and len(free) + len(evictable) >= len(missing):
            for index in evictable[: len(missing) - len(free)]:
                free.append(self._slot_of.pop(index))
            return self._place(missing, sorted(free))
        # Re-lay out for the required set plus as many recent residents as the budget allows.
        keep = [i for i in evictable]
        while True:
            members = keep + required
            need = self._need(members)
            if self._fits(len(members), need):
                return self._rebuild(members, len(members))
            if not keep:
                raise AdapterBudgetExceeded(
                    f"adapters {required} need {self._layout_bytes(len(members), need)} device bytes; the "
                    f"adapter budget is {self.budget_bytes}"
                )
            keep.pop(0)

    def _place(self, indices: list[int], free_slots: list[int]) -> None:
        for index, slot in zip(indices, free_slots, strict=False):
            self._transfer(self._host_of(index), slot)
            self._slot_of[index] = slot

    def _transfer(self, host: HostAdapter, slot: int) -> None:
        """Bring `host` into `slot` of every stack, layer by layer (asynchronous on CUDA, see module doc)."""
        by_layer: dict[int, list[LoraGroupStack]] = defaultdict(list)
        ranks = []
        for (layer, _), stack in self._stacks.items():
            by_layer[layer].append(stack)
            present = [host.modules.get((layer, t)) for t in stack.targets]
            ranks.append(max((m.a.shape[0] for m in present if m is not None), default=0))
        done: set[int] = set()

        def begin() -> None:  # first: any layer's event then also covers the slot's ranks
            if ranks:
                self._ranks[:, slot].copy_(torch.tensor(ranks, dtype=torch.int32), non_blocking=True)

        def unpack(raw: torch.Tensor, keys) -> None:
            layers = sorted({k[0] for k in keys}, key=lambda layer: (layer < 0, layer))
            for layer in layers:
                self._unpack_layer(host, raw, layer, slot, by_layer.get(layer, []))
                done.add(layer)
            self._mark_ready(layers)

        def finish() -> None:  # stacks of layers the adapter has no module in: its slot reads zero
            rest = [t for layer, stacks in by_layer.items() if layer not in done
                    for s in stacks for t in (s.a, s.b)]  # fmt: skip
            if rest:
                torch._foreach_zero_([t[slot] for t in rest])
            self._mark_ready(sorted(set(by_layer) - done))

        self._uploader.upload(host, begin, unpack, finish)

    def _unpack_layer(self, host: HostAdapter, raw: torch.Tensor, layer: int, slot: int,
                      stacks: list[LoraGroupStack]) -> None:  # fmt: skip
        """One layer of `raw` (the adapter's bytes) into `slot`; zero what the adapter does not cover."""
        dst, src, zero = [], [], []
        scale_in_place: dict[float, list[torch.Tensor]] = defaultdict(list)
        for stack in stacks:
            big_r = stack.rank
            members = zip(stack.targets, stack.b_offsets, stack.widths, strict=True)
            for i, (target, b0, w) in enumerate(members):
                a_rows, b_rows = stack.a[slot, i * big_r : (i + 1) * big_r], stack.b[slot, b0 : b0 + w]
                m = host.modules.get((layer, target))
                if m is None:  # the adapter skips this member: its rows must read as zero
                    zero += [a_rows, b_rows]
                    continue
                a, b = m.a.view(raw), m.b.view(raw)
                if m.scale != 1.0 and b.dtype == self.dtype and b.is_contiguous():
                    scale_in_place[m.scale].append(b)  # in the adapter's own (temporary) bytes
                else:
                    a, b = prepared(a, b, m.scale, self.dtype)
                r = a.shape[0]
                dst += [a_rows[:r], b_rows[:, :r]]  # [r, in] of [R, in]; [out, r] of [out, R]
                src += [a, b]
                if r < big_r:  # rank padding: a freed slot may hold an older adapter's values
                    zero += [a_rows[r:], b_rows[:, r:]]
        for scale, bs in scale_in_place.items():  # B * scale in the store dtype, as the cast was exact
            for b in bs:  # per tensor: _foreach_mul_ rounds the scale to bf16 first on the CPU
                b.mul_(scale)
        if zero:
            torch._foreach_zero_(zero)
        if dst:
            torch._foreach_copy_(dst, src)  # on CUDA a few multi-tensor launches per layer

    def _mark_ready(self, layers) -> None:
        if self._uploader.stream is None or not layers:
            return
        event = torch.cuda.Event()
        event.record(self._uploader.stream)
        for layer in layers:
            self._ready[layer] = event
        self._ready_all = event

    def ready_events(self) -> dict[int, torch.cuda.Event]:
        """Per layer, the upload event a forward must wait for before that layer's LoRA (CUDA; else {})."""
        return dict(self._ready)

    def wait_uploads(self) -> None:
        """Order the current stream after every upload so far (decode steps, CUDA graphs, re-layouts)."""
        if self._ready_all is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready_all)
            self._ready.clear()
            self._ready_all = None

    def _zero_slot(self, slot: int) -> None:
        if self._stacks:
            torch._foreach_zero_([t[slot] for s in self._stacks.values() for t in (s.a, s.b)])
            self._ranks[:, slot].zero_()

    def _rebuild(self, members: list[int], cap: int) -> None:
        """New stacks of `cap` slots shaped for `members` (LRU order kept); everyone else is evicted.

        Residents that stay keep their slot and are copied device-to-device from the old stacks (one
        multi-tensor copy, instead of re-uploading each from the host) when their slots fit the new
        capacity and the old and new stacks together fit the budget; otherwise the old stacks are freed
        first and every member is uploaded again from its host copy.
        """
        self.wait_uploads()  # the carry reads slots an upload may still be writing
        need = self._need(members)
        staying = [i for i in members if i in self._slot_of]
        carry = (
            bool(staying)
            and all(self._slot_of[i] < cap for i in staying)
            and (
                self.budget_bytes is None
                or self.device_bytes() + self._layout_bytes(cap, need) <= self.budget_bytes
            )
        )
        old_stacks, old_ranks, old_slots = self._stacks, self._ranks, self._slot_of
        self._stacks = {}  # a new dict: an older AdapterBatchData keeps its own consistent view
        self._slot_of = OrderedDict()
        if not carry:
            old_stacks = {}  # dropped before allocating, so old and new never coexist
        self._cap = cap
        self._stacks, self._ranks = _zeroed_stacks(cap, need, self.device, self.dtype)
        self.layout_version += 1
        if carry:
            self._carry(old_stacks, old_ranks, min(cap, max(old_slots.values()) + 1))
            for i in members:
                if i in old_slots:
                    self._slot_of[i] = old_slots[i]
            free = sorted(set(range(cap)) - set(self._slot_of.values()))
            missing = [i for i in members if i not in self._slot_of]
            self._place(missing, free)
            order = {i: k for k, i in enumerate(members)}  # LRU order of `members`, as before
            self._slot_of = OrderedDict(sorted(self._slot_of.items(), key=lambda kv: order[kv[0]]))
        else:
            self._place(members, list(range(len(members))))

    def _carry(self, old_stacks: dict[GroupKey, LoraGroupStack], old_ranks: torch.Tensor, n: int) -> None:
        """Copy slots [0, n) of every member from the old stacks into the new ones (ranks included)."""
        dst, src, rows_new, rows_old = [], [], [], []
        old_row = {key: i for i, key in enumerate(old_stacks)}
        for i, (key, new) in enumerate(self._stacks.items()):
            old = old_stacks.get(key)
            if old is None:  # a group no staying adapter can target (only new members target it)
                continue
            rows_new.append(i)
            rows_old.append(old_row[key])
            r = min(old.rank, new.rank)  # rows past a smaller new R held evicted adapters only
            for target, ob0, w in zip(old.targets, old.b_offsets, old.widths, strict=True):
                if target not in new.targets:  # only evicted adapters targeted it
                    continue
                io, inew = old.targets.index(target), new.targets.index(target)
                nb0 = new.b_offsets[inew]
                dst += [new.a[:n, inew * new.rank : inew * new.rank + r], new.b[:n, nb0 : nb0 + w, :r]]
                src += [old.a[:n, io * old.rank : io * old.rank + r], old.b[:n, ob0 : ob0 + w, :r]]
        if dst:
            torch._foreach_copy_(dst, src)
        if rows_new:
            new_idx = torch.tensor(rows_new, device=self.device)
            old_idx = torch.tensor(rows_old, device=self.device)
            self._ranks[new_idx, :n] = old_ranks[old_idx, :n]


_ALIGN_BYTES = 256  # every stack starts at this alignment inside the shared buffer (vector loads)


def _zeroed_stacks(cap: int, need: dict[GroupKey, GroupShape], device: torch.device,
                   dtype: torch.dtype) -> tuple[dict[GroupKey, LoraGroupStack], torch.Tensor]:  # fmt: skip
    """Group stacks of `cap` slots: A/B contiguous views of one zeroed buffer, ranks rows of one [G, cap].

    One allocation and one memset for the whole layout instead of one per stack (448 for a 7B adapter
    on all seven projections: each new size is a cudaMalloc of its own when the stacks grow).
    """
    align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    shapes, total = [], 0
    for _, g in sorted(need.items()):
        nt, widths = len(g.members), sum(w for _, w in g.members)
        for shape in ((cap, nt * g.rank, g.fan_in), (cap, widths, g.rank)):
            shapes.append(shape)
            total += -(-(shape[0] * shape[1] * shape[2]) // align) * align
    flat = torch.zeros(total, device=device, dtype=dtype)
    ranks = torch.zeros(len(need), cap, dtype=torch.int32, device=device)
    views, offset = [], 0
    for shape in shapes:
        views.append(flat[offset : offset + shape[0] * shape[1] * shape[2]].view(shape))
        offset += -(-(shape[0] * shape[1] * shape[2]) // align) * align
    stacks = {}
    for i, (key, g) in enumerate(sorted(need.items())):
        targets = tuple(t for t, _ in g.members)
        widths = tuple(w for _, w in g.members)
        stacks[key] = LoraGroupStack(views[2 * i], views[2 * i + 1], ranks[i], targets, widths)
    return stacks, ranks
