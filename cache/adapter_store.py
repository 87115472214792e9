"""Adapters by index: a bounded device-resident set in fixed-capacity stacks, the rest in host memory.

Public API (called by the engine from its one model thread; not thread-safe):

    store = AdapterStore(config, device, dtype, budget_bytes=None, tp=None, max_slots=64,
                         sources=AdapterSources(...), preloaded=[(index, AdapterSpec), ...],
                         base_weights=model.projection_weight)   # DoRA's norms read the base weights
    store.download(spec) -> float        # fetch + validate; device bytes of the adapter / budget
    store.load(index, spec) -> None      # register under index and make it device-resident
    store.offload(index) -> bool         # forget the index, free its slot; False if nothing was loaded
    store.is_loaded(index) / loaded_spec(index) / generation(index)   # generation: bumps on every load
    store.batch_data(adapter_indices, tokens, is_prefill, lm_head_indices=None) -> AdapterBatchData
    store.request_slots(adapter_indices) -> list[int]; store.graph_batch_data(static_meta)  # CUDA graphs
    store.device_bytes() / budget_bytes / layout_version / preloaded_adapters() / resident_indices()

Errors (model.errors, each answers its own status): NotFound (index not loaded, files missing),
FailedPrecondition (load on an index holding another adapter), InvalidArgument (unusable adapter files),
Unimplemented (PBASE, merging DoRA adapters), ResourceExhausted (one batch or one adapter needs more than
the budget), PermissionDenied / Unavailable (an S3 source refused or could not be reached).

Index 0 is the base model unless an adapter was loaded (or preloaded) there; any other index must be loaded.

DoRA adapters: `load` computes each module's output scale m / ||W + s B A|| from the base weights
(model/adapters/dora.py; one all-reduce under tensor parallelism) and keeps it with the entry; the
layout serves it as a per-slot scale stack. Under tensor parallelism every `load` first agrees with the
other ranks on whether the adapter could be read anywhere (one small all-reduce), so that a failure on
one rank fails the load on all of them instead of leaving one rank out of a later collective.

Device layout and LRU residency (stacks, DoRA scale stacks, slots, budget, `layout_version`):
`store.layout`, a `cache.adapter_layout.AdapterLayout` that reads each registered adapter's host copy
from the registry.

Load path cost (7B rank 16, bf16: 448 tensors, 84 MB): the file is mapped, not read into per-tensor
tensors; `_to_host_layout` copies it once into one host buffer per adapter (TP-sliced, cast, B scaled;
no float32 round trip, no page-locking: pinning 84 MB costs more than the pageable copy it would speed
up); `AdapterLayout._place` uploads that buffer with one H2D copy and scatters it into the slots with a
few multi-tensor launches; growing the capacity copies the resident slots device-to-device instead of
re-uploading every resident adapter from the host.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from cache.adapter_layout import AdapterLayout, HostAdapter, HostWeights, Key, rank_bucket
from cache.adapter_sources import AdapterSources
from model.adapters.batch import AdapterBatchData, AdapterBatchMetadata
from model.adapters.dora import dora_scales
from model.adapters.merge import check_merge, merge_modules, merge_seed
from model.adapters.peft_loader import LoraModule, read_peft_adapter
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


_HALF_OR_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


def _exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting src -> dst loses nothing, so B may be scaled after the cast, in dst."""
    return src == dst or (dst == torch.float32 and src in (torch.float16, torch.bfloat16))


@dataclasses.dataclass
class _Entry:
    spec: object  # AdapterSpec
    host: HostAdapter
    generation: int


class AdapterStore:
    def __init__(self, config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 budget_bytes: int | None = None, tp=None, max_slots: int = 64,
                 sources: AdapterSources | None = None, preloaded: Sequence[tuple[int, object]] = (),
                 host_cache_entries: int = 8,
                 base_weights: Callable[[int, str], torch.Tensor] | None = None):  # fmt: skip
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = config
        self.tp = tp
        self._base_weights = base_weights  # (layer_idx, target) -> this rank's base weight (DoRA)
        self.sources = sources or AdapterSources()
        entries: dict[int, _Entry] = {}
        self._entries = entries
        # The layout reads host copies from the registry dict itself (not through `self`: no cycle, so the
        # stacks go as soon as the store does).
        self.layout = AdapterLayout(lambda i: entries[i].host, self.device, dtype, budget_bytes, max_slots)
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
        return self.layout.adapter_device_bytes(weights) / self.budget_bytes

    def load(self, index: int, spec) -> None:
        """Register `spec` under `index` and make it device-resident. Same spec again: a no-op."""
        entry = self._entries.get(index)
        if entry is not None:
            if _spec_key(entry.spec) == _spec_key(spec):
                return
            raise FailedPrecondition(
                f"adapter index {index} already holds {list(entry.spec.adapter_ids)}; offload it before "
                f"loading {list(spec.adapter_ids)}"
            )
        host, error = None, None
        try:
            host = self._host_weights(spec)
        except Exception as e:  # every rank must reach the agreement below
            error = e
        self._agree(spec, error)
        if host.magnitudes:
            host = dataclasses.replace(host, scales=self._dora_scales(host))
        with self._host_lock:
            self._entries[index] = _Entry(spec, host, self._next_generation)
        self._next_generation += 1
        try:
            self.layout.ensure_resident([index])
        except ResourceExhausted:
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
        meta = AdapterBatchMetadata.from_requests(self.request_slots(adapter_indices), tokens, self.device)
        return AdapterBatchData(meta, self.layout.stacks, is_prefill, self.tp, lm_head_indices,
                                self.layout.scales)  # fmt: skip

    def request_slots(self, adapter_indices: Sequence[int]) -> list[int]:
        """Device slot per request (-1: base), after making every adapter of the batch resident.

        For a CUDA-graph decode: `meta.token_slots.copy_(torch.tensor(store.request_slots(...)))` into
        the bucket's static metadata, then `graph_batch_data(meta)` if `layout_version` changed.
        """
        for index in adapter_indices:
            if index not in self._entries and index != 0:
                raise NotFound(f"adapter index {index} is not loaded")
        required = list(dict.fromkeys(i for i in adapter_indices if i in self._entries))
        self.layout.ensure_resident(required)
        return self.layout.slots(adapter_indices)

    def graph_batch_data(self, meta: AdapterBatchMetadata) -> AdapterBatchData:
        """Decode AdapterBatchData over the current stacks for a graph bucket's static metadata."""
        return AdapterBatchData(meta, self.layout.stacks, False, self.tp, scales=self.layout.scales)

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
            raise InvalidArgument("adapter parameters name no adapter id")
        merge = None
        if len(spec.adapter_ids) > 1 or spec.weights or spec.merge_strategy.lower() != "linear":
            # Refuse bad merge parameters before reading any file.
            merge = check_merge(len(spec.adapter_ids), spec.weights, spec.merge_strategy, spec.density,
                                spec.majority_sign_method)  # fmt: skip
        files = [
            read_peft_adapter(self.sources.resolve(i, spec.source, spec.api_token), self.config, name=i)
            for i in spec.adapter_ids
        ]
        if merge is not None:
            if any(m.magnitude is not None for f in files for m in f.modules.values()):
                raise Unimplemented(
                    "merging DoRA adapters is not supported: each magnitude vector belongs to its own "
                    "factors (and PEFT's add_weighted_adapter keeps the new adapter's initial magnitude)"
                )
            modules = merge_modules([f.modules for f in files], merge, merge_seed(spec.adapter_ids, merge))
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
        is scaled in float32 first, then cast (one rounding, at the end).
        """
        rank, world = (self.tp.rank, self.tp.world_size) if self.tp is not None else (0, 1)
        sliced = []
        for key, m in sorted(modules.items()):
            a, b = shard_lora(key[1], m.a, m.b, self.config, rank, world)
            if a.dtype not in _HALF_OR_SINGLE:  # e.g. float64: through float32, then the store dtype
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
        magnitudes = {  # owned float32 copies: the file mapping may change later
            key: shard_output_vector(key[1], m.magnitude.float(), self.config, rank, world).clone()
            for key, m in modules.items()
            if m.magnitude is not None
        }
        return HostAdapter(flat, weights, offsets, magnitudes)

    def _dora_scales(self, host: HostAdapter) -> dict[Key, torch.Tensor]:
        if self._base_weights is None:
            raise Unimplemented(
                "DoRA adapters need the base model's weights, and this adapter store was built without them"
            )
        modules = {key: (*host.weights[key], m) for key, m in host.magnitudes.items()}
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
