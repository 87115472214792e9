"""Device side of the adapter store: fixed-capacity stacks, slot placement and LRU residency.

`cache.adapter_store.AdapterStore` holds one `AdapterLayout` (`store.layout`): the store keeps the registry
and the host copies, the layout keeps which adapters are device-resident and where. It reads host copies
through the `host_of(index) -> HostAdapter` callable the store gives it, for every registered index.

Device layout (CUDA-graph friendly): per (layer_idx, group) one `LoraGroupStack` (model/adapters/
stacks.py): the group's members that some resident adapter targets (q/k/v in one stack, gate/up in one,
o, down, lm_head alone), A [cap, NT*R, in_local], B [cap, sum(out_local), R] (B scaled, TP-sliced), R =
the bucket (power of two >= 8) of the largest resident rank in the group, zero padding elsewhere, and
per slot the adapter's largest rank in the group (0: it targets none of them), so one shrink and one
expand serve the whole group and a rank-8 adapter reads 8 rows whatever R is. All A/B stacks of one
layout are contiguous views of one device buffer (one allocation, one memset); the per-slot ranks are
one small int32 tensor [groups, cap].
DoRA adapters add, per module (layer, target) they target, a float32 scale stack [cap, out_local] (ones
in the slots of other adapters), present only while some resident DoRA adapter targets the module; for
a fused group each member (q, k, v / gate, up) has its own scale stack or none, applied to its columns.
A batch only changes the per-token slot index. `device_bytes()` is what these stacks allocate and never
exceeds the budget: when new adapters do not fit, least recently used residents move out (they stay
registered; their bytes come back from the host side on next use), and the stacks are re-laid out only
when capacity, a rank bucket or the set of DoRA scale stacks must change (`layout_version` then
increments: recapture CUDA graphs, rebuild AdapterBatchData).

Placing an adapter reads its bytes into a pinned staging buffer and copies them to the device on a
side stream (cache/adapter_host.Uploader, reads and copies overlapped), then unpacks them into the slot
on that stream in a few launches (cache/adapter_unpack.py: one strided copy per target and part over
all layers, B * scale, the TP slice, the cast) and records an event: a forward waits for it before its
first LoRA (`ready_events`), a decode step or a re-layout too (`wait_uploads`). A free slot reads zero
(fresh stacks are zeroed, `release` zeroes); a slot reused after an eviction is zeroed first. Growing
the capacity copies the resident slots device-to-device instead of re-uploading every resident adapter
from the host; the first layout already has `min_slots` slots (when the budget allows) so the first
adapters loaded do not each re-lay out the stacks.

`reserve` lays the stacks out ahead of any adapter (the store calls it at start-up, before Warmup
captures the decode graphs): that many slots at a rank bucket for the given modules, and it fixes the
capacity, so loading an adapter that fits never re-lays out (no `layout_version` change: captured
graphs read the stacks by pointer and the slot index from their static inputs, and stay valid); more
adapters than slots evict the least recently used to the host tier. Only an adapter of a larger rank or
another target (or DoRA) still re-lays out, and an empty store keeps the reserved stacks.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import chain

import torch

from cache.adapter_host import HostAdapter, Uploader
from cache.adapter_shapes import GroupKey, GroupShape, group_shapes, ones_scales, zeroed_stacks
from cache.adapter_unpack import UnpackPlan, build_plan
from model.adapters.stacks import GROUP_OF, LoraGroupStack
from model.errors import ResourceExhausted

Key = tuple[int, str]  # (layer_idx, target); layer_idx -1 is lm_head
Module = tuple[Key, int, int, int]  # (key, r, in_local, out_local)
_PLANS = 8  # unpack plans kept per layout (one per distinct file layout: usually one)
_HEADER_ROOM = 1 << 20  # staging bytes beyond the tensors' (the file's header)


class AdapterLayout:
    """Which registered adapters are device-resident, in which slot of which stacks (module docstring)."""

    def __init__(self, host_of: Callable[[int], HostAdapter], device: torch.device | str, dtype: torch.dtype,
                 budget_bytes: int | None, max_slots: int, min_slots: int = 1):  # fmt: skip
        self._host_of = host_of  # the store's registry: registered index -> its host copy
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.max_slots = max_slots
        self.min_slots = max(1, min(min_slots, max_slots))
        self._limits = (self.min_slots, max_slots)  # without a reservation
        self._uploader = Uploader(self.device)
        self._ready: dict[int, torch.cuda.Event] = {}  # layer -> last upload event touching it (CUDA)
        self._ready_all: torch.cuda.Event | None = None  # the last upload event of all
        self.layout_version = 0
        self._cap = 0  # slots allocated in every stack
        self._stacks: dict[GroupKey, LoraGroupStack] = {}
        self._ranks = torch.zeros(0, 0, dtype=torch.int32, device=self.device)  # [groups, cap], stack order
        self._scales: dict[Key, torch.Tensor] = {}  # DoRA output scales [cap, out_local] float32
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # resident index -> slot, LRU first
        self._reserved: list[Module] = []  # modules every layout holds (`reserve`)
        self._clean: set[int] = set()  # slots known to read zero everywhere
        self._slot_rows: dict[int, list[torch.Tensor]] = {}  # slot -> its A/B rows in every stack
        self._plans: OrderedDict[object, UnpackPlan] = OrderedDict()  # host.layout_key() -> plan
        self._verify: set[int] = set()  # indices whose values `load` checks after the upload
        self._checks: dict[int, tuple[torch.Tensor, UnpackPlan]] = {}

    def resident_indices(self) -> list[int]:
        return list(self._slot_of)

    @property
    def stacks(self) -> dict[GroupKey, LoraGroupStack]:
        """The current stacks; a re-layout replaces the dict, so a holder keeps a consistent view."""
        return self._stacks

    @property
    def scales(self) -> dict[Key, torch.Tensor]:
        """The current DoRA scale stacks (replaced with the stacks at a re-layout, which bumps
        `layout_version`, so captured graphs are recaptured over the new ones)."""
        return self._scales

    def slots(self, indices: Sequence[int]) -> list[int]:
        """Device slot per index, -1 where it is not resident (the base model)."""
        return [self._slot_of.get(i, -1) for i in indices]

    def release(self, index: int) -> None:
        """`index` leaves the device (if resident): its slot is zeroed and free for another adapter."""
        slot = self._slot_of.pop(index, None)
        if slot is not None:
            self._zero_slot(slot)

    def clear(self) -> None:
        """No adapter stays resident; the stacks' memory is given back (kept when reserved)."""
        if not self._reserved:
            self._rebuild([], 0)

    def reserve(self, modules: list[Module], slots: int, file_bytes: int) -> None:
        """Lay out `slots` slots holding `modules` (every layout from now on holds them) and fix the
        capacity at `slots` (module docstring); residents stay, the most recently used first. The upload
        buffers are allocated now for adapter files of up to `file_bytes`."""
        keep = list(self._slot_of)[-slots:]
        need = group_shapes(chain(modules, (m for i in keep for m in self._host_of(i).shapes())))
        total = self._layout_bytes(slots, need)
        if self.budget_bytes is not None and total > self.budget_bytes:
            raise ResourceExhausted(
                f"{slots} adapter slots need {total} device bytes; the adapter budget is "
                f"{self.budget_bytes}: fewer slots, a lower rank, or a larger adapter memory fraction"
            )
        self._reserved = list(modules)
        self.min_slots = self.max_slots = slots
        self._rebuild(keep, slots)
        self._uploader.reserve(file_bytes + _HEADER_ROOM)

    def unreserve(self) -> None:
        """Drop the reservation: the stacks stay as they are, later layouts hold only what residents need."""
        self._reserved = []
        self.min_slots, self.max_slots = self._limits

    def load(self, index: int) -> Key | None:
        """Make a newly registered `index` resident and wait until its upload landed; then the first
        module whose values in the slot are not all finite (the slot is released), or None."""
        self._verify.add(index)
        try:
            self.ensure_resident([index])
        finally:
            self._verify.discard(index)
        self.synchronize()
        if self.device.type == "cuda":  # a re-layout's copies run there
            torch.cuda.current_stream(self.device).synchronize()
        bounds, plan = self._checks.pop(index, (None, None))
        if bounds is None:
            return None
        bad = plan.problem(bounds, self._host_of(index), self._slot_of[index], self._stacks)
        if bad is not None:
            self.release(index)
        return bad

    def synchronize(self) -> None:
        """Wait on the host until every upload queued so far has landed."""
        self._uploader.synchronize()

    def device_bytes(self) -> int:
        """Bytes of the A/B and DoRA scale stacks (the rank vectors add 4 bytes per slot and group)."""
        return sum(s.a.nbytes + s.b.nbytes for s in self._stacks.values()) + sum(
            s.nbytes for s in self._scales.values()
        )

    def _elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def adapter_device_bytes(self, host: HostAdapter) -> int:
        """Stack bytes of one slot for `host` alone, at its rank buckets (download()'s budget share)."""
        shapes = group_shapes(host.shapes(), host.magnitudes)
        return sum(g.slot_bytes(self._elem()) for g in shapes.values())

    def _need(self, indices: Sequence[int]) -> dict[GroupKey, GroupShape]:
        """The group stacks holding `indices` together."""
        hosts = [self._host_of(index) for index in indices]
        return group_shapes(chain(self._reserved, (m for host in hosts for m in host.shapes())),
                            (k for host in hosts for k in host.magnitudes))  # fmt: skip

    def _layout_bytes(self, cap: int, need: dict[GroupKey, GroupShape]) -> int:
        return cap * sum(g.slot_bytes(self._elem()) for g in need.values())

    def _fits(self, cap: int, need) -> bool:
        if cap > self.max_slots:
            return False
        return self.budget_bytes is None or self._layout_bytes(cap, need) <= self.budget_bytes

    def _fits_current_shapes(self, index: int) -> bool:
        host = self._host_of(index)
        for (layer, target), r, _, _ in host.shapes():
            stack = self._stacks.get((layer, GROUP_OF[target]))
            if stack is None or target not in stack.targets or stack.rank < r:
                return False
        return all(key in self._scales for key in host.magnitudes)

    def ensure_resident(self, required: list[int]) -> None:
        """Make every index of `required` resident (evicting others, LRU first, if the budget needs it)."""
        for index in required:
            if index in self._slot_of:
                self._slot_of.move_to_end(index)  # most recently used last
        missing = [i for i in required if i not in self._slot_of]
        if not missing:
            return
        if len(required) > self.max_slots:
            raise ResourceExhausted(f"batch needs {len(required)} adapters; only {self.max_slots} slots")
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
                raise ResourceExhausted(
                    f"adapters {required} need {self._layout_bytes(len(members), need)} device bytes; the "
                    f"adapter budget is {self.budget_bytes}"
                )
            keep.pop(0)

    def _place(self, indices: list[int], free_slots: list[int]) -> None:
        for index, slot in zip(indices, free_slots, strict=False):
            self._transfer(index, slot)
            self._slot_of[index] = slot

    def _plan(self, host: HostAdapter) -> UnpackPlan:
        key = host.layout_key()
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build_plan(host, self._stacks, self.device)
            while len(self._plans) > _PLANS:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return plan

    def _transfer(self, index: int, slot: int) -> None:
        """Bring `index`'s bytes into `slot` of every stack (asynchronous on CUDA, see module doc)."""
        host = self._host_of(index)
        with self._on_upload_stream():  # the plan's small tensors belong to the side stream
            plan = self._plan(host)
        raw, which = self._uploader.stage(host)
        try:
            with self._on_upload_stream():
                if slot not in self._clean:
                    torch._foreach_zero_(self._rows_of(slot))
                self._clean.discard(slot)
                self._ranks[:, slot].copy_(plan.ranks, non_blocking=True)
                if self._scales:
                    self._scatter_scales(host, slot)
                self._unpack(plan, host, raw, slot)
                if index in self._verify:
                    self._checks[index] = (plan.check(host, slot, self._stacks), plan)
        finally:  # the staging buffer is free again once the work queued on it so far is done
            event = self._uploader.staged(which)
        if event is not None:
            self._ready = dict.fromkeys({layer for layer, _ in self._stacks}, event)
            self._ready_all = event

    def _unpack(self, plan: UnpackPlan, host: HostAdapter, raw: torch.Tensor, slot: int) -> None:
        plan.unpack(host, raw, slot, self._stacks, self.dtype)

    def _on_upload_stream(self):
        stream = self._uploader.stream
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _rows_of(self, slot: int) -> list[torch.Tensor]:
        rows = self._slot_rows.get(slot)
        if rows is None:
            rows = self._slot_rows[slot] = [t[slot] for s in self._stacks.values() for t in (s.a, s.b)]
        return rows

    def _scatter_scales(self, host: HostAdapter, slot: int) -> None:
        """The adapter's DoRA scales into `slot` (one upload); ones where it has none (plain LoRA)."""
        keys = [k for k in self._scales if k in host.scales]
        if keys:
            flat = torch.cat([host.scales[k] for k in keys]).to(self.device, non_blocking=True)
            parts = flat.split([host.scales[k].numel() for k in keys])
            torch._foreach_copy_([self._scales[k][slot] for k in keys], list(parts))
        ones = [s[slot] for k, s in self._scales.items() if k not in host.scales]
        if ones:
            torch._foreach_zero_(ones)
            torch._foreach_add_(ones, 1.0)

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
            torch._foreach_zero_(self._rows_of(slot))
            self._ranks[:, slot].zero_()
            self._clean.add(slot)
        if self._scales:
            rows = [s[slot] for s in self._scales.values()]
            torch._foreach_zero_(rows)
            torch._foreach_add_(rows, 1.0)

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
        old_stacks, old_ranks, old_scales, old_slots = self._stacks, self._ranks, self._scales, self._slot_of
        self._stacks, self._scales = {}, {}  # new dicts: an older AdapterBatchData keeps its own view
        self._slot_of = OrderedDict()
        if not carry:
            old_stacks, old_scales = {}, {}  # dropped before allocating, so old and new never coexist
        self._cap = cap
        self._stacks, self._ranks = zeroed_stacks(cap, need, self.device, self.dtype)
        self._scales = ones_scales(cap, need, self.device)
        self.layout_version += 1
        self._plans.clear()  # plans and row views point into the old stacks
        self._slot_rows.clear()
        self._clean = set(range(cap))
        if carry:
            n = min(cap, max(old_slots.values()) + 1)  # every staying slot is below n
            self._carry(old_stacks, old_ranks, n)
            self._clean -= set(range(n))  # the carried slots (evicted ones too) hold values
            kept = [k for k in old_scales if k in self._scales]  # float32: a multi-tensor copy of its own
            if kept:
                torch._foreach_copy_([self._scales[k][:n] for k in kept], [old_scales[k][:n] for k in kept])
            for i in members:
                if i in old_slots:
                    self._slot_of[i] = old_slots[i]
                    self._clean.discard(old_slots[i])
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
