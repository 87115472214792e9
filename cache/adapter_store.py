"""Adapters by index: a bounded device-resident set in fixed-capacity stacks, the rest in host memory.

Public API (called by the engine from its one model thread; not thread-safe):

    store = AdapterStore(config, device, dtype, budget_bytes=None, tp=None, max_slots=64,
                         sources=AdapterSources(...), preloaded=[(index, AdapterSpec), ...], min_slots=1)
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

Device layout and LRU residency (stacks, slots, budget, `layout_version`): `cache.adapter_layout`, the
base class of AdapterStore.

Load path (7B rank 16, bf16: 448 tensors, 84 MB): the file's header is parsed and every tensor name and
shape validated against a mapping of the file (no tensor byte is read), which gives the module table of
`cache.adapter_host.HostAdapter`: host memory keeps that table, the bytes stay in the page cache (or on
disk). Making it resident reads the file once into a pinned staging buffer and copies it to the device
layer by layer on a side stream, where the TP slice, the cast and B * scale happen during the scatter
into the slot (`AdapterLayout._transfer`). A merged adapter keeps one packed buffer in host memory.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from cache.adapter_host import FileIdentity, HostAdapter
from cache.adapter_layout import AdapterLayout, Key, rank_bucket
from cache.adapter_sources import AdapterSources
from model.adapters.batch import AdapterBatchData, AdapterBatchMetadata
from model.adapters.errors import AdapterBudgetExceeded, AdapterConflict, AdapterInvalid, AdapterNotFound
from model.adapters.merge import check_strategy, merge_adapters
from model.adapters.peft_loader import WEIGHTS_FILE, LoraAdapter, LoraModule, read_peft_adapter
from model.adapters.sharding import shard_lora

__all__ = ["AdapterStore", "rank_bucket"]  # rank_bucket: imported from here by tests and bench/adapter_load


def _spec_key(spec) -> object:
    return dataclasses.replace(spec, api_token=None)  # the token does not change what is loaded


@dataclasses.dataclass
class _Entry:
    spec: object  # AdapterSpec
    host: HostAdapter
    generation: int


class AdapterStore(AdapterLayout):
    def __init__(self, config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 budget_bytes: int | None = None, tp=None, max_slots: int = 64,
                 sources: AdapterSources | None = None, preloaded: Sequence[tuple[int, object]] = (),
                 host_cache_entries: int = 8, min_slots: int = 1):  # fmt: skip
        super().__init__(device, dtype, budget_bytes, max_slots, min_slots)
        self.config = config
        self.tp = tp
        self.sources = sources or AdapterSources()
        self._entries: dict[int, _Entry] = {}
        self._host_cache: OrderedDict[object, HostAdapter] = OrderedDict()  # downloaded, by spec
        self._host_cache_entries = host_cache_entries
        self._host_lock = threading.Lock()  # registry + host cache: DownloadAdapter runs on another thread
        self._next_generation = 1
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
            # The copies are queued on the upload stream; LoadAdapter answers once they landed, so a
            # failure surfaces here and the caller's timing is the adapter's real time to usable.
            self._uploader.synchronize()
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

    # ---- batches --------------------------------------------------------------------------------------
    def batch_data(self, adapter_indices: Sequence[int], tokens: Sequence[int], is_prefill: bool,
                   lm_head_indices: torch.Tensor | None = None) -> AdapterBatchData:  # fmt: skip
        """Per-request adapter index and token count -> AdapterBatchData; makes all of them resident.

        `lm_head_indices`: the tensor passed to forward(lm_head_indices=...), if any.

        Valid until the next load/offload/batch_data that changes `layout_version` or evicts.
        """
        meta = AdapterBatchMetadata.from_requests(self._slots(adapter_indices), tokens, self.device)
        return AdapterBatchData(meta, self._stacks, is_prefill, self.tp, lm_head_indices,
                                ready=self.ready_events())  # fmt: skip

    def request_slots(self, adapter_indices: Sequence[int]) -> list[int]:
        """Device slot per request (-1: base), after making every adapter of the batch resident.

        For a CUDA-graph decode: `meta.token_slots.copy_(torch.tensor(store.request_slots(...)))` into
        the bucket's static metadata, then `graph_batch_data(meta)` if `layout_version` changed. The
        current stream then waits for every adapter upload in flight (a graph cannot wait per layer).
        """
        slots = self._slots(adapter_indices)
        self.wait_uploads()
        return slots

    def _slots(self, adapter_indices: Sequence[int]) -> list[int]:
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
            cached = self._host_cache.get(key)
            if cached is not None and (cached.file is None or _identity(cached.file.path) == cached.file):
                self._host_cache.move_to_end(key)
                return cached  # (a file that changed since is read again below)
        if not spec.adapter_ids:
            raise AdapterInvalid("adapter parameters name no adapter id")
        if len(spec.adapter_ids) > 1:
            check_strategy(spec.merge_strategy)  # refuse TIES/DARE before reading any file
        dirs = [self.sources.resolve(i, spec.source, spec.api_token) for i in spec.adapter_ids]
        single = len(dirs) == 1 and not spec.weights  # file-backed: the bytes stay in the file
        before = _identity(dirs[0] / WEIGHTS_FILE) if single else None
        files = [read_peft_adapter(d, self.config, name=n)
                 for d, n in zip(dirs, spec.adapter_ids, strict=True)]  # fmt: skip
        host = None
        if before is not None and _identity(before.path) == before:  # not replaced while we read it
            host = HostAdapter.from_file(before, self._sliced(files[0].modules))
        if host is None:  # merged (or an unaligned tensor the loader had to copy): packed in memory
            if len(files) > 1 or spec.weights:
                name = "+".join(spec.adapter_ids)
                merged = merge_adapters([f.to_lora_adapter() for f in files], spec.weights,
                                        spec.merge_strategy, name=name)  # fmt: skip
                modules = _as_modules(merged)
            else:
                modules = files[0].modules
            host = HostAdapter.packed(self._sliced(modules), self.dtype)
        with self._host_lock:
            self._host_cache[key] = host
            while len(self._host_cache) > self._host_cache_entries:
                self._host_cache.popitem(last=False)
        return host

    def _sliced(self, modules: dict[Key, LoraModule]) -> dict[Key, tuple[torch.Tensor, torch.Tensor, float]]:
        """This rank's (A, B, scale) per module: views of the loader's tensors (no copy)."""
        rank, world = (self.tp.rank, self.tp.world_size) if self.tp is not None else (0, 1)
        out = {}
        for key, m in sorted(modules.items()):
            a, b = shard_lora(key[1], m.a, m.b, self.config, rank, world)
            out[key] = (a, b, m.scale)
        return out

    def _host_of(self, index: int) -> HostAdapter:
        return self._entries[index].host


def _identity(path) -> FileIdentity | None:
    try:
        return FileIdentity.of(path)
    except OSError:  # missing: the loader names the problem
        return None


def _as_modules(adapter: LoraAdapter) -> dict[Key, LoraModule]:
    """A merged (float32, already scaled) adapter as loader modules (scale 1)."""
    return {key: LoraModule(a, b, 1.0) for key, (a, b) in adapter.weights.items()}
