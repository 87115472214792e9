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
exceeds the budget: when new adapters do not fit, least recently used residents move out (their host
copy stays), and the stacks are re-laid out only when capacity or a rank bucket must change
(`layout_version` then increments: recapture CUDA graphs, rebuild AdapterBatchData).

Placing an adapter uploads its one host buffer with one H2D copy and scatters it into the slots with a
few multi-tensor launches; growing the capacity copies the resident slots device-to-device instead of
re-uploading every resident adapter from the host.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

import torch

from model.adapters.errors import AdapterBudgetExceeded
from model.adapters.stacks import GROUP_OF, LORA_GROUPS, LoraGroupStack

MIN_RANK_BUCKET = 8
Key = tuple[int, str]  # (layer_idx, target); layer_idx -1 is lm_head
GroupKey = tuple[int, str]  # (layer_idx, group of stacks.LORA_GROUPS)
HostWeights = dict[Key, tuple[torch.Tensor, torch.Tensor]]  # A [r, in_local], B [out_local, r], store dtype


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


@dataclasses.dataclass
class HostAdapter:
    """One adapter's host copy: every A, then every B (TP-local, store dtype, B scaled) in one buffer."""

    flat: torch.Tensor  # [numel]; the views below share its storage
    weights: HostWeights  # per module (A, B), views of `flat`
    offsets: dict[Key, tuple[int, int]]  # element offsets of A and B in `flat`

    def modules(self) -> list[tuple[Key, int, int, int]]:
        """(key, r, in_local, out_local) per module."""
        return [(key, a.shape[0], a.shape[1], b.shape[0]) for key, (a, b) in self.weights.items()]

    def views_of(self, flat: torch.Tensor) -> list[tuple[Key, torch.Tensor, torch.Tensor]]:
        """(key, A, B) as views of `flat`, a copy of `self.flat` (e.g. on the device), in key order."""
        out = []
        for key, (a, b) in self.weights.items():
            oa, ob = self.offsets[key]
            out.append(
                (key, flat[oa : oa + a.numel()].view(a.shape), flat[ob : ob + b.numel()].view(b.shape))
            )
        return out



class AdapterLayout:
    """Which registered adapters are device-resident, in which slot of which stacks (module docstring)."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype, budget_bytes: int | None,
                 max_slots: int):  # fmt: skip
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.max_slots = max_slots
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
        return sum(g.slot_elems() for g in group_shapes(host.modules()).values()) * self._elem()

    def _need(self, indices: Sequence[int]) -> dict[GroupKey, GroupShape]:
        """The group stacks holding `indices` together."""
        return group_shapes(m for index in indices for m in self._host_of(index).modules())

    def _layout_bytes(self, cap: int, need: dict[GroupKey, GroupShape]) -> int:
        return cap * sum(g.slot_elems() for g in need.values()) * self._elem()

    def _fits(self, cap: int, need) -> bool:
        if cap > self.max_slots:
            return False
        return self.budget_bytes is None or self._layout_bytes(cap, need) <= self.budget_bytes

    def _fits_current_shapes(self, index: int) -> bool:
        for (layer, target), r, _, _ in self._host_of(index).modules():
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
        for cap in (min(self.max_slots, 1 << (len(members) - 1).bit_length()), len(members)):
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
            host = self._host_of(index)
            self._scatter(host, self._upload(host), slot)
            self._slot_of[index] = slot

    def _upload(self, host: HostAdapter) -> torch.Tensor:
        """The adapter's buffer on the device: one host->device copy (the buffer itself on CPU).

        Pageable source: the driver stages it at full PCIe rate and returns once the host bytes are
        consumed; whatever reads the result is queued behind it on the same stream.
        """
        return host.flat.to(self.device, non_blocking=True)

    def _scatter(self, host: HostAdapter, flat: torch.Tensor, slot: int) -> None:
        """Copy the uploaded buffer into `slot` of every stack; zero what the adapter does not cover."""
        dst, src, zero, ranks = [], [], [], []
        views = {key: (a, b) for key, a, b in host.views_of(flat)}
        for (layer, _), stack in self._stacks.items():
            big_r, top = stack.rank, 0
            members = zip(stack.targets, stack.b_offsets, stack.widths, strict=True)
            for i, (target, b0, w) in enumerate(members):
                a_rows, b_rows = stack.a[slot, i * big_r : (i + 1) * big_r], stack.b[slot, b0 : b0 + w]
                ab = views.get((layer, target))
                if ab is None:  # the adapter skips this member: its rows must read as zero
                    zero += [a_rows, b_rows]
                    continue
                a, b = ab
                r = a.shape[0]
                top = max(top, r)
                dst += [a_rows[:r], b_rows[:, :r]]  # [r, in] of [R, in]; [out, r] of [out, R]
                src += [a, b]
                if r < big_r:  # rank padding: a freed slot may hold an older adapter's values
                    zero += [a_rows[r:], b_rows[:, r:]]
            ranks.append(top)
        if zero:
            torch._foreach_zero_(zero)
        if dst:
            torch._foreach_copy_(dst, src)  # on CUDA a few multi-tensor launches instead of 448 copies
        if ranks:
            self._ranks[:, slot].copy_(torch.tensor(ranks, dtype=torch.int32), non_blocking=True)

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
