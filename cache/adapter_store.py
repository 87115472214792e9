"""Adapters by index: a bounded device-resident set in fixed-capacity stacks, the rest in host memory.

Public API (called by the engine from its one model thread; not thread-safe):

    store = AdapterStore(config, device, dtype, budget_bytes=None, tp=None, max_slots=64,
                         sources=AdapterSources(...), preloaded=[(index, AdapterSpec), ...])
    store.download(spec) -> float        # fetch + validate; device bytes of the adapter / budget
    store.load(index, spec) -> None      # register under index and make it device-resident
    store.offload(index) -> bool         # forget the index, free its slot; False if nothing was loaded
    store.is_loaded(index) / loaded_spec(index) / generation(index)   # generation: bumps on every load
    store.batch_data(adapter_indices, tokens, is_prefill, lm_head_indices=None) -> AdapterBatchData
    store.request_slots(adapter_indices) -> list[int]; store.graph_batch_data(static_meta)  # CUDA graphs
    store.device_bytes() / budget_bytes / layout_version / preloaded_adapters() / resident_indices()

Errors (model.adapters.errors; engine maps `code`): AdapterNotFound (NOT_FOUND: index not loaded, files
missing), AdapterConflict (FAILED_PRECONDITION: load on an index holding another adapter), AdapterInvalid
(INVALID_ARGUMENT), AdapterSourceUnsupported (UNIMPLEMENTED: S3, PBASE, TIES/DARE), AdapterBudgetExceeded
(RESOURCE_EXHAUSTED: one batch or one adapter needs more than the budget).

Index 0 is the base model unless an adapter was loaded (or preloaded) there; any other index must be loaded.

Device layout (CUDA-graph friendly, issue 6): per (layer_idx, target) one stack A [cap, R, in_local],
B [cap, out_local, R] (B scaled, TP-sliced), R = the bucket (power of two >= 8) of the largest resident
rank for that module, zero padding elsewhere; an adapter not targeting a module leaves its slot zero.
All stacks of one layout are contiguous views of one device buffer (one allocation, one memset).
A batch only changes the per-token slot index. `device_bytes()` is what these stacks allocate and never
exceeds the budget: when new adapters do not fit, least recently used residents move out (their host
copy stays), and the stacks are re-laid out only when capacity or a rank bucket must change
(`layout_version` then increments: recapture CUDA graphs, rebuild AdapterBatchData).

Load path cost (7B rank 16, bf16: 448 tensors, 84 MB): the file is mapped, not read into per-tensor
tensors; `_to_host_layout` copies it once into one host buffer per adapter (TP-sliced, cast, B scaled;
no float32 round trip, no page-locking: pinning 84 MB costs more than the pageable copy it would speed
up); `_place` uploads that buffer with one H2D copy and scatters it into the slots with a few
multi-tensor launches; growing the capacity copies the resident slots device-to-device instead of
re-uploading every resident adapter from the host.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from cache.adapter_sources import AdapterSources
from model.adapters.batch import AdapterBatchData, AdapterBatchMetadata
from model.adapters.errors import AdapterBudgetExceeded, AdapterConflict, AdapterInvalid, AdapterNotFound
from model.adapters.merge import check_strategy, merge_adapters
from model.adapters.peft_loader import LoraAdapter, LoraModule, read_peft_adapter
from model.adapters.sharding import shard_lora

MIN_RANK_BUCKET = 8
Key = tuple[int, str]  # (layer_idx, target); layer_idx -1 is lm_head
HostWeights = dict[Key, tuple[torch.Tensor, torch.Tensor]]  # A [r, in_local], B [out_local, r], store dtype


def rank_bucket(r: int) -> int:
    """Padded rank of a stack: powers of two from 8, so few distinct shapes (and CUDA graphs) exist."""
    return max(MIN_RANK_BUCKET, 1 << (r - 1).bit_length())


def _spec_key(spec) -> object:
    return dataclasses.replace(spec, api_token=None)  # the token does not change what is loaded


_HALF_OR_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


def _exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting src -> dst loses nothing, so B may be scaled after the cast, in dst."""
    return src == dst or (dst == torch.float32 and src in (torch.float16, torch.bfloat16))


@dataclasses.dataclass
class HostAdapter:
    """One adapter's host copy: every A, then every B (TP-local, store dtype, B scaled) in one buffer."""

    flat: torch.Tensor  # [numel]; the views below share its storage
    weights: HostWeights  # per module (A, B), views of `flat`
    offsets: dict[Key, tuple[int, int]]  # element offsets of A and B in `flat`

    def views_of(self, flat: torch.Tensor) -> list[tuple[Key, torch.Tensor, torch.Tensor]]:
        """(key, A, B) as views of `flat`, a copy of `self.flat` (e.g. on the device), in key order."""
        out = []
        for key, (a, b) in self.weights.items():
            oa, ob = self.offsets[key]
            out.append(
                (key, flat[oa : oa + a.numel()].view(a.shape), flat[ob : ob + b.numel()].view(b.shape))
            )
        return out


@dataclasses.dataclass
class _Entry:
    spec: object  # AdapterSpec
    host: HostAdapter
    generation: int


class AdapterStore:
    def __init__(self, config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 budget_bytes: int | None = None, tp=None, max_slots: int = 64,
                 sources: AdapterSources | None = None, preloaded: Sequence[tuple[int, object]] = (),
                 host_cache_entries: int = 8):  # fmt: skip
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.tp = tp
        self.max_slots = max_slots
        self.sources = sources or AdapterSources()
        self.layout_version = 0
        self._entries: dict[int, _Entry] = {}
        self._host_cache: OrderedDict[object, HostWeights] = OrderedDict()  # downloaded, by spec
        self._host_cache_entries = host_cache_entries
        self._host_lock = threading.Lock()  # registry + host cache: DownloadAdapter runs on another thread
        self._next_generation = 1
        self._cap = 0  # slots allocated in every stack
        self._stacks: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # resident index -> slot, LRU first
        self._preloaded = tuple(preloaded)
        for index, spec in self._preloaded:
            self.load(index, spec)

    # ---- registry -------------------------------------------------------------------------------------
    def download(self, spec) -> float:
        """Fetch and validate `spec` (cached by its parameters); -> its device bytes / budget (0 if none)."""
        weights = self._host_weights(spec)
        if not self.budget_bytes:
            return 0.0
        return self._adapter_device_bytes(weights) / self.budget_bytes

    def load(self, index: int, spec) -> None:
        """Register `spec` under `index` and make it device-resident. Same spec again: a no-op."""
        entry = self._entries.get(index)
        if entry is not None:
            if _spec_key(entry.spec) == _spec_key(spec):
                return
            raise AdapterConflict(
                f"adapter index {index} already holds {list(entry.spec.adapter_ids)}; offload it before "
                f"loading {list(spec.adapter_ids)}"
            )
        host = self._host_weights(spec)
        with self._host_lock:
            self._entries[index] = _Entry(spec, host, self._next_generation)
        self._next_generation += 1
        try:
            self._ensure_resident([index])
        except AdapterBudgetExceeded:
            with self._host_lock:
                del self._entries[index]
            raise
        if self.device.type == "cuda":
            # The copies are queued on the stream; LoadAdapter answers once they landed, so a failure
            # surfaces here and the caller's timing is the adapter's real time to usable.
            torch.cuda.current_stream(self.device).synchronize()

    def offload(self, index: int) -> bool:
        """Forget `index` (requests for it are then NOT_FOUND) and zero its device slot."""
        with self._host_lock:
            if self._entries.pop(index, None) is None:
                return False
        slot = self._slot_of.pop(index, None)
        if slot is not None:
            self._zero_slot(slot)
        if not self._entries:  # nothing left: give the stacks' memory back
            self._rebuild([], 0)
        return True

    def is_loaded(self, index: int) -> bool:
        return index in self._entries

    def loaded_spec(self, index: int):
        entry = self._entries.get(index)
        return None if entry is None else entry.spec

    def generation(self, index: int) -> int:
        """Identity of what `index` serves (0: base model); a reload gets a new value (prefix caching)."""
        entry = self._entries.get(index)
        return 0 if entry is None else entry.generation

    def preloaded_adapters(self) -> tuple[tuple[int, object], ...]:
        return self._preloaded

    def resident_indices(self) -> list[int]:
        return list(self._slot_of)

    def device_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self._stacks.values())

    # ---- batches --------------------------------------------------------------------------------------
    def batch_data(self, adapter_indices: Sequence[int], tokens: Sequence[int], is_prefill: bool,
                   lm_head_indices: torch.Tensor | None = None) -> AdapterBatchData:  # fmt: skip
        """Per-request adapter index and token count -> AdapterBatchData; makes all of them resident.

        `lm_head_indices`: the tensor passed to forward(lm_head_indices=...), if any.

        Valid until the next load/offload/batch_data that changes `layout_version` or evicts.
        """
        meta = AdapterBatchMetadata.from_requests(self.request_slots(adapter_indices), tokens, self.device)
        return AdapterBatchData(meta, self._stacks, is_prefill, self.tp, lm_head_indices)

    def request_slots(self, adapter_indices: Sequence[int]) -> list[int]:
        """Device slot per request (-1: base), after making every adapter of the batch resident.

        For a CUDA-graph decode: `meta.token_slots.copy_(torch.tensor(store.request_slots(...)))` into
        the bucket's static metadata, then `graph_batch_data(meta)` if `layout_version` changed.
        """
        for index in adapter_indices:
            if index not in self._entries and index != 0:
                raise AdapterNotFound(f"adapter index {index} is not loaded")
        required = list(dict.fromkeys(i for i in adapter_indices if i in self._entries))
        self._ensure_resident(required)
        return [self._slot_of.get(i, -1) for i in adapter_indices]

    def graph_batch_data(self, meta: AdapterBatchMetadata) -> AdapterBatchData:
        """Decode AdapterBatchData over the current stacks for a graph bucket's static metadata."""
        return AdapterBatchData(meta, self._stacks, False, self.tp)

    # ---- host side ------------------------------------------------------------------------------------
    def _host_weights(self, spec) -> HostAdapter:
        """Host copy of `spec`'s adapter. Safe beside the model thread: DownloadAdapter calls this from
        the server's I/O thread, so the shared registry and host cache are touched only under
        `_host_lock`, and the slow part (reading, validating, packing) runs outside it."""
        key = _spec_key(spec)
        with self._host_lock:
            for entry in list(self._entries.values()):
                if _spec_key(entry.spec) == key:
                    return entry.host
            if key in self._host_cache:
                self._host_cache.move_to_end(key)
                return self._host_cache[key]
        if not spec.adapter_ids:
            raise AdapterInvalid("adapter parameters name no adapter id")
        if len(spec.adapter_ids) > 1:
            check_strategy(spec.merge_strategy)  # refuse TIES/DARE before reading any file
        files = [
            read_peft_adapter(self.sources.resolve(i, spec.source, spec.api_token), self.config, name=i)
            for i in spec.adapter_ids
        ]
        if len(files) > 1 or spec.weights:
            name = "+".join(spec.adapter_ids)
            merged = merge_adapters([f.to_lora_adapter() for f in files], spec.weights, spec.merge_strategy,
                                    name=name)  # fmt: skip
            modules = _as_modules(merged)
        else:
            modules = files[0].modules
        weights = self._to_host_layout(modules)
        with self._host_lock:
            self._host_cache[key] = weights
            while len(self._host_cache) > self._host_cache_entries:
                self._host_cache.popitem(last=False)
        return weights

    def _to_host_layout(self, modules: dict[Key, LoraModule]) -> HostAdapter:
        """TP-slice, cast and scale every module into one new host buffer: A's first, then B's.

        One pass over the bytes: each tensor is copied once from the file mapping into its place; B is
        then scaled in place in the store dtype with one multiply per run of equal scales (usually one
        for the whole adapter), which is bit-identical to the float32 `B * scale` then cast, because the
        cast before it is exact. Where the cast is not exact (e.g. float32 file, bfloat16 store) that B
        is scaled in float32 first, as before.
        """
        rank, world = (self.tp.rank, self.tp.world_size) if self.tp is not None else (0, 1)
        sliced = []
        for key, m in sorted(modules.items()):
            a, b = shard_lora(key[1], m.a, m.b, self.config, rank, world)
            if a.dtype not in _HALF_OR_SINGLE:  # e.g. float64: through float32 first, as the cast always was
                a = a.float()
            if b.dtype not in _HALF_OR_SINGLE:
                b = b.float()
            sliced.append((key, a, b, m.scale))
        numel_a = sum(a.numel() for _, a, _, _ in sliced)
        numel = numel_a + sum(b.numel() for _, _, b, _ in sliced)
        flat = torch.empty(numel, dtype=self.dtype)  # [sum r*in_local | sum out_local*r]
        weights: HostWeights = {}
        offsets: dict[Key, tuple[int, int]] = {}
        runs: list[list] = []  # [start, end, scale] of B ranges still to scale in place
        oa, ob = 0, numel_a
        for key, a, b, scale in sliced:
            dst_a = flat[oa : oa + a.numel()].view(a.shape)
            dst_b = flat[ob : ob + b.numel()].view(b.shape)
            dst_a.copy_(a)
            if scale == 1.0 or _exact_cast(b.dtype, self.dtype):
                dst_b.copy_(b)
                if scale != 1.0:
                    if runs and runs[-1][1] == ob and runs[-1][2] == scale:
                        runs[-1][1] = ob + b.numel()
                    else:
                        runs.append([ob, ob + b.numel(), scale])
            else:
                dst_b.copy_(b.float() * scale)
            weights[key], offsets[key] = (dst_a, dst_b), (oa, ob)
            oa, ob = oa + a.numel(), ob + b.numel()
        for start, end, scale in runs:
            flat[start:end].mul_(scale)
        return HostAdapter(flat, weights, offsets)

    def _adapter_device_bytes(self, host: HostAdapter) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(
            rank_bucket(a.shape[0]) * (a.shape[1] + b.shape[0]) * elem for a, b in host.weights.values()
        )

    # ---- device layout --------------------------------------------------------------------------------
    def _need(self, indices: Sequence[int]) -> dict[Key, tuple[int, int, int]]:
        """(R, in_local, out_local) per module for holding `indices` together."""
        need: dict[Key, tuple[int, int, int]] = {}
        for index in indices:
            for key, (a, b) in self._entries[index].host.weights.items():
                r = max(rank_bucket(a.shape[0]), need.get(key, (0,))[0])
                need[key] = (r, a.shape[1], b.shape[0])
        return need

    def _layout_bytes(self, cap: int, need: dict[Key, tuple[int, int, int]]) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(cap * r * (fan_in + fan_out) * elem for r, fan_in, fan_out in need.values())

    def _fits(self, cap: int, need) -> bool:
        if cap > self.max_slots:
            return False
        return self.budget_bytes is None or self._layout_bytes(cap, need) <= self.budget_bytes

    def _fits_current_shapes(self, index: int) -> bool:
        return all(
            key in self._stacks and self._stacks[key][0].shape[1] >= a.shape[0]
            for key, (a, _) in self._entries[index].host.weights.items()
        )

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
            host = self._entries[index].host
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

    def _zero_slot(self, slot: int) -> None:
        if self._stacks:
            torch._foreach_zero_([t[slot] for ab in self._stacks.values() for t in ab])

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
        old_stacks, old_slots = self._stacks, self._slot_of
        self._stacks = {}  # a new dict: an older AdapterBatchData keeps its own consistent view
        self._slot_of = OrderedDict()
        if not carry:
            old_stacks = {}  # dropped before allocating, so old and new never coexist
        self._cap = cap
        self._stacks = _zeroed_stacks(cap, need, self.device, self.dtype)
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


_ALIGN_BYTES = 256  # every stack starts at this alignment inside the shared buffer (vector loads)


def _zeroed_stacks(cap: int, need: dict[Key, tuple[int, int, int]], device: torch.device,
                   dtype: torch.dtype) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Stacks A [cap, R, in] and B [cap, out, R] per module: contiguous views of one zeroed buffer.

    One allocation and one memset for the whole layout instead of one per stack (448 for a 7B adapter
    on all seven projections: each new size is a cudaMalloc of its own when the stacks grow).
    """
    align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    shapes, total = [], 0
    for key, (r, fan_in, fan_out) in sorted(need.items()):
        for shape in ((cap, r, fan_in), (cap, fan_out, r)):
            shapes.append((key, shape, total))
            total += -(-(shape[0] * shape[1] * shape[2]) // align) * align
    flat = torch.zeros(total, device=device, dtype=dtype)
    views: dict[Key, list[torch.Tensor]] = {}
    for key, shape, offset in shapes:
        views.setdefault(key, []).append(flat[offset : offset + shape[0] * shape[1] * shape[2]].view(shape))
    return {key: (a, b) for key, (a, b) in views.items()}


def _as_modules(adapter: LoraAdapter) -> dict[Key, LoraModule]:
    """A merged (float32, already scaled) adapter in the form `_to_host_layout` takes."""
    return {key: LoraModule(a, b, 1.0) for key, (a, b) in adapter.weights.items()}
