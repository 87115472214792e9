"""The engine's adapter operations on the model thread: LoadAdapter and OffloadAdapter keep the adapter
store, the Medusa heads of speculative decoding and the LoRA CUDA graphs in step, and requests name
only loaded adapters.

Reading and validating files happens before (`ShardEngine.prepare_adapter` on the I/O thread); here the
store registers and uploads. A LoadAdapter whose Medusa heads are bad is refused before the adapter
loads. Graphs are recaptured here when the store re-lays out its stacks, never inside a Decode.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.errors import FailedPrecondition, NotFound, shown
from shard_server.engine.speculative import speculator
from shard_server.types import AdapterSpec


def load_adapter(engine, index: int, spec: AdapterSpec, prepared: object | None = None) -> None:
    """`prepared`: prepare_adapter(spec)'s result, so that the model thread reads no file."""
    if index == 0:
        raise FailedPrecondition("adapter_index 0 is the base model; load adapters at index >= 1")
    heads = speculator.adapter_heads(engine.speculator, engine.adapters, spec)  # bad files refuse here
    engine.adapters.load(index, spec, host=prepared)
    if engine.speculator is not None:  # its requests draft with these heads, or with the base's
        engine.speculator.medusa.by_adapter.pop(index, None)
        if heads is not None:
            engine.speculator.medusa.by_adapter[index] = heads
    engine.runner.refresh_lora_graphs()  # here, if the stacks moved: never inside a Decode


def offload_adapter(engine, index: int, spec: AdapterSpec) -> bool:
    """False if nothing is loaded at `index`; refused while a cached batch uses it."""
    if not engine.adapters.is_loaded(index):
        return False
    held = engine.adapters.loaded_spec(index)
    if tuple(held.adapter_ids) != tuple(spec.adapter_ids):
        raise FailedPrecondition(
            f"adapter index {index} holds {shown(list(held.adapter_ids))}, not "
            f"{shown(list(spec.adapter_ids))}: nothing offloaded"
        )
    users = [b.id for b in engine.batches.values() if index in {r.adapter_index for r in b.all_requests}]
    if users:
        raise FailedPrecondition(f"adapter index {index} is in use by cached batches {users}")
    if engine.speculator is not None:
        engine.speculator.medusa.by_adapter.pop(index, None)
    offloaded = engine.adapters.offload(index)
    engine.runner.refresh_lora_graphs()
    return offloaded


def check_adapters(adapters, indices: Sequence[int]) -> None:
    """Every adapter index a batch names (0: the base model) is loaded."""
    for i in dict.fromkeys(indices):
        if i != 0 and not adapters.is_loaded(i):
            raise NotFound(f"adapter_index {i} is not loaded (LoadAdapter it first)")
