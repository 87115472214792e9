"""The unpack of an adapter's bytes into its slot (cache/adapter_unpack.py): one strided copy per target and
part when the file lines up, module by module when it does not, and the same values either way (bit for
bit the float32 fold-then-cast path, zero wherever the adapter has nothing): PEFT's name order over 12
layers (0, 1, 10, 11, 2, ...), a shuffled file, aliased tensors, a subset of layers, per-layer scales;
NaN/Inf found on the device after the copy and named by layer and target. Runs are copied both ways:
layer by layer (the CPU) and one index_copy_ each (CUDA)."""

from __future__ import annotations

import dataclasses
import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import common
from bench.adapter_load import model_config
from cache.adapter_store import AdapterStore
from model.adapters.peft_loader import load_peft_adapter
from model.errors import InvalidArgument
from shard_server.types import AdapterSpec

SHAPE = dataclasses.replace(common.TINY, layers=12)
CONFIG = model_config(SHAPE)
WEIGHTS = "adapter_model.safetensors"
_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


@pytest.fixture(autouse=True, params=["per_layer", "gather"])
def copies(request, monkeypatch):
    """Every test both ways: a run copied layer by layer (the CPU's way) and by one index_copy_ (CUDA's)."""
    monkeypatch.setattr("cache.adapter_unpack._gather", lambda raw: request.param == "gather")


def adapter(out: Path, rank: int = 5, dtype=torch.bfloat16, alpha: float = 7, seed: int = 1) -> Path:
    common.write_adapter(out, SHAPE, rank, torch.device("cpu"), dtype, seed=seed, std=0.1)
    edit_config(out, lora_alpha=alpha)  # scale 7/5: not a power of two, rounding order shows
    return out


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def write_raw(path: Path, tensors: dict[str, torch.Tensor], order: list[str], alias: dict | None = None):
    """A safetensors file with the data in `order` and `alias[name]` sharing another tensor's bytes
    (the format allows both; safetensors' own writer sorts by name and never aliases)."""
    header, blobs, pos = {}, [], 0
    for name in order:
        t = tensors[name].contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + len(data)]}  # fmt: skip
        blobs.append(data)
        pos += len(data)
    for name, other in (alias or {}).items():
        header[name] = dict(header[other])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (path / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def stacks_hold(store: AdapterStore, slot: int, want: dict) -> None:
    """`slot` holds exactly `want` {(layer, target): (A, B * scale)} in the store dtype, zero elsewhere."""
    seen = set()
    for (layer, _), stack in store.layout._stacks.items():
        for target in stack.targets:
            member = stack.member(target)
            a_full, b_full = torch.zeros_like(member.a[slot]), torch.zeros_like(member.b[slot])
            if (layer, target) in want:
                a, b = want[(layer, target)]
                a_full[: a.shape[0]], b_full[:, : b.shape[1]] = a, b
                seen.add((layer, target))
            assert torch.equal(member.a[slot], a_full), (layer, target)
            assert torch.equal(member.b[slot], b_full), (layer, target)
    assert seen == set(want)


def naive(path: Path, dtype: torch.dtype) -> dict:
    return {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in load_peft_adapter(path, CONFIG).weights.items()}


def load_one(path: Path, dtype=torch.float32) -> AdapterStore:
    store = AdapterStore(CONFIG, "cpu", dtype)
    store.load(1, AdapterSpec(adapter_ids=(str(path),), source="local"))
    return store


def plan_of(store: AdapterStore):
    (plan,) = store.layout._plans.values()
    return plan


@pytest.mark.parametrize("store_dtype", [torch.bfloat16, torch.float32])
def test_peft_order_over_twelve_layers_is_one_copy_per_target_and_part(tmp_path, store_dtype):
    path = adapter(tmp_path / "a")
    store = load_one(path, store_dtype)
    plan = plan_of(store)
    assert len(plan.runs) == 14 and not plan.loose
    q_a = next(r for r in plan.runs if (r.target, r.part) == ("q_proj", "a"))
    assert list(q_a.layers) == sorted(range(12), key=str)  # the file's order: 0, 1, 10, 11, 2, ...
    stacks_hold(store, store.layout._slot_of[1], naive(path, store_dtype))


def test_shuffled_file_is_copied_module_by_module_with_the_same_values(tmp_path):
    path = adapter(tmp_path / "a")
    tensors = load_file(str(path / WEIGHTS))
    order = sorted(tensors)
    random.Random(3).shuffle(order)
    write_raw(path, tensors, order)
    store = load_one(path)
    assert plan_of(store).loose  # offsets no longer a constant step apart
    stacks_hold(store, store.layout._slot_of[1], naive(path, torch.float32))


def test_aliased_tensors_are_scaled_once_each(tmp_path):
    """Two B tensors on the same bytes: each module gets B * scale once (B is scaled in the slot, never in
    the adapter's bytes, where the second module would see the first one's scaling)."""
    path = adapter(tmp_path / "a")
    tensors = load_file(str(path / WEIGHTS))
    key = "base_model.model.model.layers.{}.self_attn.v_proj.lora_B.weight"
    write_raw(path, tensors, sorted(set(tensors) - {key.format(4)}), alias={key.format(4): key.format(3)})
    want = naive(path, torch.bfloat16)
    assert torch.equal(want[(3, "v_proj")][1], want[(4, "v_proj")][1])
    store = load_one(path, torch.bfloat16)  # the file's dtype: no cast, B scaled in place
    stacks_hold(store, store.layout._slot_of[1], want)


def test_a_subset_of_layers_and_per_layer_scales(tmp_path):
    path = adapter(tmp_path / "a")
    tensors = load_file(str(path / WEIGHTS))
    keep = {k: t for k, t in tensors.items() if any(f"layers.{i}." in k for i in (1, 3, 10))}
    write_raw(path, keep, sorted(keep))
    edit_config(path, alpha_pattern={"model.layers.3.self_attn.q_proj": 3})  # q_proj's scale varies
    other = adapter(tmp_path / "b", seed=2)  # all layers: the stacks have every layer
    store = load_one(other)
    store.load(2, AdapterSpec(adapter_ids=(str(path),), source="local"))
    plan = next(p for p in store.layout._plans.values() if p.loose)
    assert {key[1] for key in plan.loose} == {"q_proj"} and len(plan.runs) == 12
    assert sorted({layer for r in plan.runs for layer in r.layers}) == [1, 3, 10]
    stacks_hold(store, store.layout._slot_of[2], naive(path, torch.float32))
    stacks_hold(store, store.layout._slot_of[1], naive(other, torch.float32))


@pytest.mark.parametrize("by_module", [False, True])
@pytest.mark.parametrize("where,value", [((10, "q_proj", "B"), float("nan")),
                                         ((3, "down_proj", "A"), float("inf"))])  # fmt: skip
def test_non_finite_values_are_found_in_the_slot_and_named(tmp_path, monkeypatch, by_module, where, value):
    if by_module:
        monkeypatch.setattr("cache.adapter_unpack._run", lambda *a, **k: None)
    path = adapter(tmp_path / "a")
    tensors = load_file(str(path / WEIGHTS))
    layer, target, part = where
    group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    tensors[f"base_model.model.model.layers.{layer}.{group}.{target}.lora_{part}.weight"][1, 1] = value
    write_raw(path, tensors, sorted(tensors))
    good = adapter(tmp_path / "good", seed=5)
    store = AdapterStore(CONFIG, "cpu", torch.float32)
    named = rf"non-finite values \(NaN or Inf\) in layer {layer} {target} "
    with pytest.raises(InvalidArgument, match=named):
        store.load(1, AdapterSpec(adapter_ids=(str(path),), source="local"))
    assert not store.is_loaded(1) and not store._host_cache  # refused adapters are not kept
    assert all(not t[0].any() for s in store.layout._stacks.values() for t in (s.a, s.b))  # slot zeroed
    store.load(2, AdapterSpec(adapter_ids=(str(good),), source="local"))
    stacks_hold(store, store.layout._slot_of[2], naive(good, torch.float32))
