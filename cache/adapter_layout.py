"""Device side of the adapter store: fixed-capacity stacks, slot placement and LRU residency.

`cache.adapter_store.AdapterStore` holds one `AdapterLayout` (`store.layout`): the store keeps the registry
and the host copies, the layout keeps which adapters are device-resident and where. It reads host copies
through the `host_of(index) -> HostAdapter` callable the store gives it, for every registered index.

Device layout (CUDA-graph friendly): per (layer_idx, target) one stack A [cap, R, in_local],
B [cap, out_local, R] (B scaled, TP-sliced), R = the bucket (power of two >= 8) of the largest resident
rank for that module, zero padding elsewhere; an adapter not targeting a module leaves its slot zero.
All stacks of one layout are contiguous views of one device buffer (one allocation, one memset).
DoRA adapters add, per module they target, a float32 scale stack [cap, out_local] (ones in the slots of
other adapters), present only while some DoRA adapter that targets the module is resident.
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
from collections.abc import Callable, Sequence

import torch

from model.errors import ResourceExhausted

MIN_RANK_BUCKET = 8
Key = tuple[int, str]  # (layer_idx, target); layer_idx -1 is lm_head
HostWeights = dict[Key, tuple[torch.Tensor, torch.Tensor]]  # A [r, in_local], B [out_local, r], store dtype


def rank_bucket(r: int) -> int:
    """Padded rank of a stack: powers of two from 8, so few distinct shapes (and CUDA graphs) exist."""
    return max(MIN_RANK_BUCKET, 1 << (r - 1).bit_length())


@dataclasses.dataclass
class HostAdapter:
    """One adapter's host copy: every A, then every B (TP-local, store dtype, B scaled) in one buffer."""

    flat: torch.Tensor  # [numel]; the views below share its storage
    weights: HostWeights  # per module (A, B), views of `flat`
    offsets: dict[Key, tuple[int, int]]  # element offsets of A and B in `flat`
    # DoRA: per module the magnitude m [out_local] (float32) from the file, and the output scales
    # m / ||W + s B A|| [out_local] (float32) that need the base model, computed when it is loaded.
    magnitudes: dict[Key, torch.Tensor] = dataclasses.field(default_factory=dict)
    scales: dict[Key, torch.Tensor] = dataclasses.field(default_factory=dict)

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

    def __init__(self, host_of: Callable[[int], HostAdapter], device: torch.device | str, dtype: torch.dtype,
                 budget_bytes: int | None, max_slots: int):  # fmt: skip
        self._host_of = host_of  # the store's registry: registered index -> its host copy
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.max_slots = max_slots
        self.layout_version = 0
        self._cap = 0  # slots allocated in every stack
        self._stacks: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scales: dict[Key, torch.Tensor] = {}  # DoRA output scales [cap, out_local] float32
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # resident index -> slot, LRU first

    def resident_indices(self) -> list[int]:
        return list(self._slot_of)

    @property
    def stacks(self) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
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
        """No adapter stays resident; the stacks' memory is given back."""
        self._rebuild([], 0)

    def device_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self._stacks.values()) + sum(
            s.nbytes for s in self._scales.values()
        )

    def adapter_device_bytes(self, host: HostAdapter) -> int:
        """Stack bytes of one slot for `host` alone, at its rank buckets (download()'s budget share)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(
            rank_bucket(a.shape[0]) * (a.shape[1] + b.shape[0]) * elem for a, b in host.weights.values()
        ) + sum(4 * m.numel() for m in host.magnitudes.values())

    def _need(self, indices: Sequence[int]) -> dict[Key, tuple[int, int, int, bool]]:
        """(R, in_local, out_local, any DoRA) per module for holding `indices` together."""
        need: dict[Key, tuple[int, int, int, bool]] = {}
        for index in indices:
            host = self._host_of(index)
            for key, (a, b) in host.weights.items():
                r0, dora0 = need.get(key, (0, 0, 0, False))[::3]
                dora = dora0 or key in host.scales
                need[key] = (max(rank_bucket(a.shape[0]), r0), a.shape[1], b.shape[0], dora)
        return need

    def _layout_bytes(self, cap: int, need: dict[Key, tuple[int, int, int, bool]]) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(
            cap * r * (fan_in + fan_out) * elem + (cap * fan_out * 4 if dora else 0)
            for r, fan_in, fan_out, dora in need.values()
        )

    def _fits(self, cap: int, need) -> bool:
        if cap > self.max_slots:
            return False
        return self.budget_bytes is None or self._layout_bytes(cap, need) <= self.budget_bytes

    def _fits_current_shapes(self, index: int) -> bool:
        host = self._host_of(index)
        return all(
            key in self._stacks and self._stacks[key][0].shape[1] >= a.shape[0]
            for key, (a, _) in host.weights.items()
        ) and all(key in self._scales for key in host.scales)

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
                raise ResourceExhausted(
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
        dst, src, zero = [], [], []
        views = {key: (a, b) for key, a, b in host.views_of(flat)}
        for key, (stack_a, stack_b) in self._stacks.items():
            ab = views.get(key)
            if ab is None:  # the adapter skips this module: its slot must read as zero
                zero += [stack_a[slot], stack_b[slot]]
                continue
            a, b = ab
            r = a.shape[0]
            dst += [stack_a[slot, :r], stack_b[slot, :, :r]]  # [r, in] of [R, in]; [out, r] of [out, R]
            src += [a, b]
            if r < stack_a.shape[1]:  # rank padding: a freed slot may hold an older adapter's values
                zero += [stack_a[slot, r:], stack_b[slot, :, r:]]
        if zero:
            torch._foreach_zero_(zero)
        if dst:
            torch._foreach_copy_(dst, src)  # on CUDA a few multi-tensor launches instead of 448 copies
        if self._scales:
            self._scatter_scales(host, slot)

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

    def _zero_slot(self, slot: int) -> None:
        if self._stacks:
            torch._foreach_zero_([t[slot] for ab in self._stacks.values() for t in ab])
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
        old_stacks, old_scales, old_slots = self._stacks, self._scales, self._slot_of
        self._stacks, self._scales = {}, {}  # new dicts: an older AdapterBatchData keeps its own view
        self._slot_of = OrderedDict()
        if not carry:
            old_stacks, old_scales = {}, {}  # dropped before allocating, so old and new never coexist
        self._cap = cap
        self._stacks = _zeroed_stacks(cap, need, self.device, self.dtype)
        self._scales = _ones_scales(cap, need, self.device)
        self.layout_version += 1
        if carry:
            n = min(cap, max(old_slots.values()) + 1)  # every staying slot is below n
            dst, src = [], []
            for key, (old_a, old_b) in old_stacks.items():
                if key not in self._stacks:  # only evicted adapters targeted it
                    continue
                new_a, new_b = self._stacks[key]
                r = min(old_a.shape[1], new_a.shape[1])  # rows past a smaller new R held evicted ones only
                dst += [new_a[:n, :r], new_b[:n, :, :r]]  # [n, r, in], [n, out, r]
                src += [old_a[:n, :r], old_b[:n, :, :r]]
            if dst:
                torch._foreach_copy_(dst, src)
            kept = [k for k in old_scales if k in self._scales]  # float32: a multi-tensor copy of its own
            if kept:
                torch._foreach_copy_([self._scales[k][:n] for k in kept], [old_scales[k][:n] for k in kept])
            for i in members:
                if i in old_slots:
                    self._slot_of[i] = old_slots[i]
            free = sorted(set(range(cap)) - set(self._slot_of.values()))
            missing = [i for i in members if i not in self._slot_of]
            self._place(missing, free)
            order = {i: k for k, i in enumerate(members)}  # the residents' order stays `members`' LRU order
            self._slot_of = OrderedDict(sorted(self._slot_of.items(), key=lambda kv: order[kv[0]]))
        else:
            self._place(members, list(range(len(members))))


_ALIGN_BYTES = 256  # every stack starts at this alignment inside the shared buffer (vector loads)


def _zeroed_stacks(cap: int, need: dict[Key, tuple[int, int, int, bool]], device: torch.device,
                   dtype: torch.dtype) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Stacks A [cap, R, in] and B [cap, out, R] per module: contiguous views of one zeroed buffer.

    One allocation and one memset for the whole layout instead of one per stack (448 for a 7B adapter
    on all seven projections: each new size is a cudaMalloc of its own when the stacks grow).
    """
    align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    shapes, total = [], 0
    for key, (r, fan_in, fan_out, _) in sorted(need.items()):
        for shape in ((cap, r, fan_in), (cap, fan_out, r)):
            shapes.append((key, shape, total))
            total += -(-(shape[0] * shape[1] * shape[2]) // align) * align
    flat = torch.zeros(total, device=device, dtype=dtype)
    views: dict[Key, list[torch.Tensor]] = {}
    for key, shape, offset in shapes:
        views.setdefault(key, []).append(flat[offset : offset + shape[0] * shape[1] * shape[2]].view(shape))
    return {key: (a, b) for key, (a, b) in views.items()}


def _ones_scales(cap: int, need: dict[Key, tuple[int, int, int, bool]], device: torch.device) -> dict:
    """DoRA scale stacks [cap, out_local] float32 of ones (scale 1: no DoRA) where `need` says DoRA."""
    keys = sorted(k for k, v in need.items() if v[3])
    if not keys:
        return {}
    flat = torch.ones(cap * sum(need[k][2] for k in keys), dtype=torch.float32, device=device)
    return {k: t.view(cap, need[k][2]) for k, t in zip(keys, flat.split([cap * need[k][2] for k in keys]),
                                                        strict=True)}  # fmt: skip
