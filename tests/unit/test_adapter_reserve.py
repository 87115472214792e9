"""Adapter stacks laid out at start-up (SlotReservation, --adapter-slots): loads that fit fill free slots
without a re-layout (layout_version unchanged: captured CUDA graphs stay valid), the capacity stays fixed
(the least recently used adapters move to the host tier and come back exact), a reused slot reads zero
where the new adapter has nothing, an empty store keeps its stacks, a larger rank still re-lays out, a
reservation over the budget is refused, and `--adapter-slots` reaches the engine's store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import common
from bench.adapter_load import model_config
from cache.adapter_shapes import SlotReservation, group_shapes, reserved_modules
from cache.adapter_store import AdapterStore
from model.adapters.peft_loader import load_peft_adapter
from model.errors import ResourceExhausted
from shard_server.types import AdapterSpec

SHAPE = common.TINY
CONFIG = model_config(SHAPE)
CALLS = [("qkv_proj", 64, (64, 32, 32)), ("o_proj", 64, (64,)), ("gate_up_proj", 64, (128, 128)),
         ("down_proj", 128, (64,))]  # fmt: skip


def adapter(tmp_path: Path, i: int, rank: int, targets=common.LORA_TARGETS) -> AdapterSpec:
    d = common.write_adapter(tmp_path / f"a{i}", SHAPE, rank, torch.device("cpu"), torch.bfloat16,
                             seed=20 + i, std=0.1, targets=targets)  # fmt: skip
    return AdapterSpec(adapter_ids=(str(d),), source="local")


def slot_bytes(rank: int) -> int:
    need = group_shapes(reserved_modules(SlotReservation(1, rank), CONFIG))
    return sum(g.slot_bytes(4) for g in need.values())


def check_serves(store: AdapterStore, specs: dict[int, AdapterSpec], indices: list[int], gen) -> None:
    """A prefill batch of `indices` (0: base) gives each row its adapter's delta, every group and layer."""
    data = store.batch_data(indices, [2] * len(indices), is_prefill=True)
    for layer in range(SHAPE.layers):
        for group, fan_in, widths in CALLS:
            x = torch.randn(2 * len(indices), fan_in, generator=gen)
            out = torch.zeros(x.shape[0], sum(widths))
            data.add_lora(layer, group, x, out, widths)
            members = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
            for row, index in enumerate(indices):
                rows = slice(2 * row, 2 * row + 2)
                want = []
                for target, w in zip(members.get(group, (group,)), widths, strict=True):
                    delta = None
                    if index:
                        delta = load_peft_adapter(specs[index].adapter_ids[0], CONFIG).delta(layer, target)
                    want.append(torch.zeros(2, w) if delta is None else x[rows] @ delta.T)
                torch.testing.assert_close(out[rows], torch.cat(want, dim=1), rtol=1e-5, atol=1e-5)


def test_reserved_slots_take_loads_without_relayout_and_rotate_through_the_host(tmp_path):
    store = AdapterStore(CONFIG, "cpu", torch.float32, reserve=SlotReservation(3, rank=16))
    version = store.layout_version
    assert store.device_bytes() == 3 * slot_bytes(16) and store.resident_indices() == []
    kinds = [(4, common.LORA_TARGETS), (16, ("q_proj", "v_proj")), (8, ("k_proj", "o_proj", "down_proj")),
             (2, ("up_proj",)), (16, common.LORA_TARGETS)]  # fmt: skip
    specs = {i: adapter(tmp_path, i, r, t) for i, (r, t) in enumerate(kinds, start=1)}
    for i, spec in specs.items():
        store.load(i, spec)
    assert store.layout_version == version and len(store.resident_indices()) == 3
    gen = torch.Generator().manual_seed(0)
    for step in range(8):  # every adapter comes back from the host tier into a slot freed by the LRU
        a, b = 1 + step % 5, 1 + (2 * step + 3) % 5
        check_serves(store, specs, [a, 0, b], gen)
    assert store.layout_version == version and store.layout._cap == 3
    for i in specs:
        store.offload(i)
    assert store.device_bytes() == 3 * slot_bytes(16)  # an empty store keeps the reserved stacks
    assert store.layout_version == version
    big = adapter(tmp_path, 9, 32, ("q_proj",))  # past the reserved rank: one re-layout, same capacity
    store.load(9, big)
    assert store.layout_version == version + 1 and store.layout._cap == 3
    check_serves(store, {9: big}, [9, 0], gen)


def test_a_slot_reused_after_an_eviction_reads_zero_where_the_new_adapter_has_nothing(tmp_path):
    store = AdapterStore(CONFIG, "cpu", torch.float32, reserve=SlotReservation(1, rank=16))
    specs = {1: adapter(tmp_path, 1, 16), 2: adapter(tmp_path, 2, 3, ("v_proj",))}
    store.load(1, specs[1])
    store.load(2, specs[2])  # evicts 1 into the host tier: its values must not show through
    assert store.resident_indices() == [2]
    check_serves(store, specs, [2, 0], torch.Generator().manual_seed(1))
    ranks = store.layout._ranks[:, 0].tolist()
    assert sorted(ranks) == [0] * (len(ranks) - SHAPE.layers) + [3] * SHAPE.layers


def test_reserving_keeps_residents_and_over_budget_is_refused(tmp_path):
    specs = {i: adapter(tmp_path, i, 4) for i in (1, 2)}
    store = AdapterStore(CONFIG, "cpu", torch.float32)
    for i, spec in specs.items():
        store.load(i, spec)
    version = store.layout_version
    store.reserve(SlotReservation(4, rank=8))
    assert store.layout_version == version + 1 and store.layout._cap == 4
    assert store.resident_indices() == [1, 2]
    check_serves(store, specs, [1, 2, 0], torch.Generator().manual_seed(2))
    with pytest.raises(ResourceExhausted, match=r"4 adapter slots need \d+ device bytes; the adapter budget"):
        AdapterStore(CONFIG, "cpu", torch.float32, budget_bytes=4 * slot_bytes(16) - 1,
                     reserve=SlotReservation(4, rank=16))  # fmt: skip
    with pytest.raises(ValueError, match="rank must be in 1..256"):
        SlotReservation(4, rank=300)


def test_adapter_slots_option_lays_out_the_engine_store_at_start(tiny_model_dir, adapter_factory):
    from shard_server.config import ShardConfig
    from shard_server.engine.engine import ShardEngine

    engine = ShardEngine(ShardConfig(model_dir=tiny_model_dir, adapter_slots=4, adapter_slot_rank=8,
                                     max_kv_cache_bytes=1 << 20))  # fmt: skip
    store = engine.adapters
    assert store.layout._cap == 4 and store.device_bytes() > 0
    version = store.layout_version
    path = adapter_factory(tiny_model_dir, rank=4, target_modules=("q_proj", "v_proj"), seed=4)
    engine.load_adapter(1, AdapterSpec(adapter_ids=(str(path),), source="local"))
    assert store.layout_version == version and store.resident_indices() == [1]
