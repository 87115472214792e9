"""Adapters by index: a bounded device-resident set in fixed-capacity stacks, the rest in host memory.

Public API (called by the engine from its one model thread; not thread-safe):

    store = AdapterStore(config, device, dtype, budget_bytes=None, tp=None, max_slots=64,
                         sources=AdapterSources(...), preloaded=[(index, AdapterSpec), ...], min_slots=1,
                         base_weights=model.projection_weight,   # DoRA's norms read the base weights
                         reserve=SlotReservation(slots, rank))   # stacks laid out now, capacity fixed
    store.download(spec) -> float        # fetch + validate; device bytes of the adapter / budget
    store.prepare(spec) -> HostAdapter   # fetch + validate + pack on the host (any thread)
    store.load(index, spec, host=None)   # register under index and make it device-resident
    store.offload(index) -> bool         # forget the index, free its slot; False if nothing was loaded
    store.reserve(SlotReservation(...))  # lay the stacks out now (start-up; later: a re-layout)
    store.is_loaded(index) / loaded_spec(index) / generation(index)   # generation: bumps on every load
    store.batch_data(adapter_indices, tokens, is_prefill, lm_head_indices=None) -> AdapterBatchData
    store.request_slots(adapter_indices) -> list[int]; store.graph_batch_data(static_meta)  # CUDA graphs
    store.device_bytes() / budget_bytes / layout_version / preloaded_adapters() / resident_indices()

Errors (model.errors, each answers its own status): NotFound (index not loaded, files missing),
FailedPrecondition (load on an index holding another adapter), InvalidArgument (unusable adapter files),
Unimplemented (PBASE, merging DoRA adapters), ResourceExhausted (one batch or one adapter needs more than
the budget, or a reservation does), PermissionDenied / Unavailable (an S3 source refused or could not be
reached).

Index 0 is the base model unless an adapter was loaded (or preloaded) there; any other index must be loaded.

DoRA adapters: `load` computes each module's output scale m / ||W + s B A|| from the base weights
(model/adapters/dora.py; one all-reduce under tensor parallelism) and keeps it with the entry; the
layout serves it as a per-slot scale stack. Under tensor parallelism every `load` first agrees with the
other ranks on whether the adapter could be read anywhere (one small all-reduce), so that a failure on
one rank fails the load on all of them instead of leaving one rank out of a later collective.

Device layout and LRU residency (stacks, DoRA scale stacks, slots, budget, `layout_version`):
`store.layout`, a `cache.adapter_layout.AdapterLayout` that reads each registered adapter's host copy
from the registry.

Load path (7B rank 16, bf16: 448 tensors, 84 MB): the file's header is parsed and every tensor name and
shape validated against a mapping of the file (no tensor byte is read), which gives the module table of
`cache.adapter_host.HostAdapter`: host memory keeps that table, the bytes stay in the page cache (or on
disk). Making it resident reads the file once, by a few threads, into a pinned staging buffer, each chunk
copied to the device on a side stream as it lands; the unpack into the slot (TP slice, cast, B * scale)
is one strided copy per target and part over all layers (cache/adapter_unpack.py), and `load` then reads
back the slot's min and max per run (NaN/Inf: INVALID_ARGUMENT, agreed across tensor-parallel ranks). A
merged adapter, and one from S3 (whose cache directory may evict the file), keeps one packed buffer in
host memory. Stacks laid out at start-up (`reserve`, `SlotReservation`) make a load of an adapter that
fits a copy into a free slot: no re-layout, so no CUDA graph recapture either.
"""


from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from cache.adapter_host import FileIdentity, HostAdapter, prepared
from cache.adapter_layout import AdapterLayout, Key
from cache.adapter_shapes import SlotReservation, rank_bucket, reserved_modules
from cache.adapter_sources import AdapterSources
from model.adapters.batch import AdapterBatchData, AdapterBatchMetadata
from model.adapters.dora import dora_scales
from model.adapters.merge import check_merge, merge_modules, merge_seed
from model.adapters.peft_loader import WEIGHTS_FILE, LoraModule, read_peft_adapter
from model.adapters.sharding import shard_lora, shard_output_vector
from model.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ShardError,
    Unavailable,
    Unimplemented,
)

__all__ = ["AdapterStore", "rank_bucket"]  # rank_bucket: imported from here by tests and bench/adapter_load


def _spec_key(spec) -> object:
    return dataclasses.replace(spec, api_token=None)  # the token does not change what is loaded


@dataclasses.dataclass
class _Entry:
    spec: object  # AdapterSpec
    host: HostAdapter
    generation: int


class AdapterStore:
    def __init__(self, config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 budget_bytes: int | None = None, tp=None, max_slots: int = 64,
                 sources: AdapterSources | None = None, preloaded: Sequence[tuple[int, object]] = (),
                 host_cache_entries: int = 8, min_slots: int = 1,
                 base_weights: Callable[[int, str], torch.Tensor] | None = None,
                 reserve: SlotReservation | None = None, concurrent_lora: bool = True):  # fmt: skip
        self.device = torch.device(device)
        # Decode LoRA as a delta for the consumer kernel, computed on a side stream on CUDA
        # (model/adapters/batch.py). The stream asks for the highest priority, which helps eager steps; in
        # CUDA-graph replay it measured no effect (docs/lora.md): the SMs the decode graphs' matmuls leave
        # free are what make room for its kernels.
        self.concurrent_lora = concurrent_lora
        self.lora_stream = None
        if concurrent_lora and self.device.type == "cuda":
            # priority: lower is higher; torch clamps a value past the device's range to its highest
            self.lora_stream = torch.cuda.Stream(self.device, priority=-100)
        self.dtype = dtype
        self.config = config
        self.tp = tp
        self._base_weights = base_weights  # (layer_idx, target) -> this rank's base weight (DoRA)
        self.sources = sources or AdapterSources()
        entries: dict[int, _Entry] = {}
        self._entries = entries
        # The layout reads host copies from the registry dict itself (not through `self`: no cycle, so the
        # stacks go as soon as the store does).
        self.layout = AdapterLayout(lambda i: entries[i].host, self.device, dtype, budget_bytes, max_slots,
                                    min_slots)  # fmt: skip
        self._host_cache: OrderedDict[object, HostAdapter] = OrderedDict()  # downloaded, by spec
        self._host_cache_entries = host_cache_entries
        self._host_lock = threading.Lock()  # registry + host cache: DownloadAdapter runs on another thread
        self._next_generation = 1
        self._preloaded = tuple(preloaded)
        if reserve is not None:
            self.reserve(reserve)
        for index, spec in self._preloaded:
            self.load(index, spec)

    # ---- registry -------------------------------------------------------------------------------------
    def download(self, spec) -> float:
        """Fetch and validate `spec` (cached by its parameters; its values are checked by `load`, on the
        device); -> its device bytes / budget (0 if none)."""
        weights = self._host_weights(spec)
        if not self.budget_bytes:
            return 0.0
        return self.layout.adapter_device_bytes(weights) / self.budget_bytes

    def prepare(self, spec) -> HostAdapter:
        """Read, validate and pack `spec`'s files into its host copy (no device work, no registry change):
        the file work of a load, for the server's I/O thread; pass the result to `load(..., host=)`."""
        return self._host_weights(spec)

    def load(self, index: int, spec, host: HostAdapter | None = None) -> None:
        """Register `spec` under `index` and make it device-resident. Same spec again: a no-op.
        `host`: the result of `prepare(spec)`, so that no file is read here."""
        entry = self._entries.get(index)
        if entry is not None:
            if _spec_key(entry.spec) == _spec_key(spec):
                return
            raise FailedPrecondition(
                f"adapter index {index} already holds {list(entry.spec.adapter_ids)}; offload it before "
                f"loading {list(spec.adapter_ids)}"
            )
        error = None
        try:
            if host is None:
                host = self._host_weights(spec)
        except Exception as e:  # every rank must reach the agreement below
            error = e
        self._agree(spec, error)
        if host.magnitudes:
            host = dataclasses.replace(host, scales=self._dora_scales(host))
        with self._host_lock:
            self._entries[index] = _Entry(spec, host, self._next_generation)
        self._next_generation += 1
        error = None
        try:
            # Returns once the upload landed: LoadAdapter's time is the adapter's real time to usable.
            bad = self.layout.load(index)
            if bad is not None:
                error = InvalidArgument(
                    f"adapter has non-finite values (NaN or Inf) in layer {bad[0]} {bad[1]} after scaling "
                    f"and casting to {self.dtype}: check its weights, lora_alpha and merge weights"
                )
            self._agree(spec, error)  # a slice that is bad on one rank only fails the load everywhere
        except ShardError:
            self.layout.release(index)
            with self._host_lock:
                del self._entries[index]
                self._host_cache.pop(_spec_key(spec), None)
            raise

    def reserve(self, reservation: SlotReservation | None) -> None:
        """Lay out the device stacks for `reservation` now and fix their capacity (AdapterLayout.reserve):
        loading an adapter that fits is then a copy into a free slot, never a re-layout. Start-up calls
        this before Warmup (which then captures the LoRA decode graphs over these stacks); a later call
        re-lays out (`layout_version`): recapture graphs after it, as after a LoadAdapter. None drops
        the reservation (the stacks go when the store is empty)."""
        if reservation is None:
            self.layout.unreserve()
            if not self._entries:
                self.layout.clear()
            return
        rank, world = (self.tp.rank, self.tp.world_size) if self.tp is not None else (0, 1)
        # Every rank reads the whole file; float32 files (PEFT saves the training dtype) are the largest.
        file_bytes = 4 * sum(r * (i + o) for _, r, i, o in reserved_modules(reservation, self.config))
        self.layout.reserve(reserved_modules(reservation, self.config, rank, world), reservation.slots,
                            file_bytes)  # fmt: skip

    def offload(self, index: int) -> bool:
        """Forget `index` (requests for it are then NOT_FOUND) and zero its device slot."""
        with self._host_lock:
            if self._entries.pop(index, None) is None:
                return False
        self.layout.release(index)
        if not self._entries:  # nothing left: give the stacks' memory back
            self.layout.clear()
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

    # ---- the device layout's facts (graphs, metrics, tests) -------------------------------------------
    @property
    def budget_bytes(self) -> int | None:
        return self.layout.budget_bytes

    @property
    def layout_version(self) -> int:
        """Bumps whenever the stacks are re-laid out: CUDA graphs and AdapterBatchData must be rebuilt."""
        return self.layout.layout_version

    def device_bytes(self) -> int:
        return self.layout.device_bytes()

    def resident_indices(self) -> list[int]:
        return self.layout.resident_indices()

    # ---- batches --------------------------------------------------------------------------------------
    def batch_data(self, adapter_indices: Sequence[int], tokens: Sequence[int], is_prefill: bool,
                   lm_head_indices: torch.Tensor | None = None) -> AdapterBatchData:  # fmt: skip
        """Per-request adapter index and token count -> AdapterBatchData; makes all of them resident.

        `lm_head_indices`: the tensor passed to forward(lm_head_indices=...), if any.

        Valid until the next load/offload/batch_data that changes `layout_version` or evicts.
        """
        meta = AdapterBatchMetadata.from_requests(self._slots(adapter_indices), tokens, self.device)
        return AdapterBatchData(meta, self.layout.stacks, is_prefill, self.tp, lm_head_indices,
                                self.layout.scales, ready=self.layout.ready_events(),
                                concurrent=self.concurrent_lora, stream=self.lora_stream)  # fmt: skip

    def request_slots(self, adapter_indices: Sequence[int]) -> list[int]:
        """Device slot per request (-1: base), after making every adapter of the batch resident.

        For a CUDA-graph decode: `meta.token_slots.copy_(torch.tensor(store.request_slots(...)))` into
        the bucket's static metadata, then `graph_batch_data(meta)` if `layout_version` changed. The
        current stream then waits for every adapter upload in flight (a graph cannot wait per layer).
        """
        slots = self._slots(adapter_indices)
        self.layout.wait_uploads()
        return slots

    def _slots(self, adapter_indices: Sequence[int]) -> list[int]:
        for index in adapter_indices:
            if index not in self._entries and index != 0:
                raise NotFound(f"adapter index {index} is not loaded")
        required = list(dict.fromkeys(i for i in adapter_indices if i in self._entries))
        self.layout.ensure_resident(required)
        return self.layout.slots(adapter_indices)

    def graph_batch_data(self, meta: AdapterBatchMetadata, side_stream: bool = False,
                         lora_sms: int | None = None) -> AdapterBatchData:  # fmt: skip
        """Decode AdapterBatchData over the current stacks for a graph bucket's static metadata; LoRA added
        in place, or (`side_stream`, when the store has a LoRA stream) computed on the LoRA stream with
        kernels sized for `lora_sms` SMs (executor/graphs.py picks per graph)."""
        stream = self.lora_stream if side_stream else None
        return AdapterBatchData(meta, self.layout.stacks, False, self.tp, scales=self.layout.scales,
                                concurrent=stream is not None, stream=stream, lora_sms=lora_sms)

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
            raise InvalidArgument("adapter parameters name no adapter id")
        merge = None
        if len(spec.adapter_ids) > 1 or spec.weights or spec.merge_strategy.lower() != "linear":
            # Refuse bad merge parameters before reading any file.
            merge = check_merge(len(spec.adapter_ids), spec.weights, spec.merge_strategy, spec.density,
                                spec.majority_sign_method)  # fmt: skip
        dirs = [self.sources.resolve(i, spec.source, spec.api_token) for i in spec.adapter_ids]
        # File-backed: the bytes stay in the file (not for S3, whose cache directory may evict it).
        single = merge is None and spec.source.lower() != "s3"
        before = _identity(dirs[0] / WEIGHTS_FILE) if single else None
        files = [read_peft_adapter(d, self.config, name=n)
                 for d, n in zip(dirs, spec.adapter_ids, strict=True)]  # fmt: skip
        if merge is not None:
            if any(m.magnitude is not None for f in files for m in f.modules.values()):
                raise Unimplemented(
                    "merging DoRA adapters is not supported: each magnitude vector belongs to its own "
                    "factors (and PEFT's add_weighted_adapter keeps the new adapter's initial magnitude)"
                )
            modules = merge_modules([f.modules for f in files], merge, merge_seed(spec.adapter_ids, merge))
        else:
            modules = files[0].modules
        sliced = self._sliced(modules)  # no byte read: the device checks the values it serves (load)
        host = None
        if before is not None and _identity(before.path) == before:  # not replaced while we read it
            host = HostAdapter.from_file(before, sliced)
        if host is None:  # merged, S3 (or an unaligned tensor the loader had to copy): packed in memory
            host = HostAdapter.packed(sliced, self.dtype)
        host.magnitudes = self._magnitudes(modules)
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

    def _magnitudes(self, modules: dict[Key, LoraModule]) -> dict[Key, torch.Tensor]:
        """DoRA: this rank's magnitude vectors, as owned float32 copies (the file mapping may change)."""
        rank, world = (self.tp.rank, self.tp.world_size) if self.tp is not None else (0, 1)
        return {
            key: shard_output_vector(key[1], m.magnitude.float(), self.config, rank, world).clone()
            for key, m in modules.items()
            if m.magnitude is not None
        }

    def _dora_scales(self, host: HostAdapter) -> dict[Key, torch.Tensor]:
        if self._base_weights is None:
            raise Unimplemented(
                "DoRA adapters need the base model's weights, and this adapter store was built without them"
            )
        raw = torch.empty(host.nbytes, dtype=torch.uint8)
        host.read_into(raw, None)  # A and B as the device will see them: B scaled, in the store dtype
        modules = {}
        for key, m in host.magnitudes.items():
            mod = host.modules[key]
            a, b = prepared(mod.a.view(raw), mod.b.view(raw), mod.scale, self.dtype)
            modules[key] = (a.to(self.dtype), b.to(self.dtype), m)
        return dora_scales(modules, self._base_weights, self.tp)

    def _agree(self, spec, error: Exception | None) -> None:
        """Raise `error`, or, with world size > 1, the failure of any other rank loading `spec`."""
        if self.tp is not None and self.tp.world_size > 1:
            mine = 0 if error is None else 1 + next(
                (i for i, cls in enumerate(_AGREED_ERRORS) if isinstance(error, cls)), len(_AGREED_ERRORS) - 1
            )
            flag = torch.tensor([mine], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.tp.group)
            worst = int(flag.item())
            if error is None and worst:
                raise _AGREED_ERRORS[worst - 1](
                    f"adapter {list(spec.adapter_ids)} failed to load on another tensor-parallel rank (its "
                    "log says why)"
                )
        if error is not None:
            raise error


# The kinds of failure one rank can report to the others (agreement in `load`); the last is the catch-all.
_AGREED_ERRORS = (NotFound, InvalidArgument, Unimplemented, ResourceExhausted,
                  FailedPrecondition, PermissionDenied, Unavailable, ShardError)  # fmt: skip


def _identity(path) -> FileIdentity | None:
    try:
        return FileIdentity.of(path)
    except OSError:  # missing: the loader names the problem
        return None
