"""The fast adapter load path computes what the naive one does: device stacks bit-identical to the float32
fold-then-cast path (every dtype pair, TP slices, non power-of-two scales), stacks identical after growth
with device-to-device carry-over, padding zeroed when a slot is reused, corrupt files refused, and
bench/adapter_load.py runs. Functional only: no timing is asserted."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import common
from bench.adapter_load import main as bench_main
from bench.adapter_load import model_config
from cache.adapter_layout import AdapterLayout
from cache.adapter_store import AdapterStore
from model.adapters.peft_loader import load_peft_adapter, read_peft_adapter
from model.adapters.sharding import shard_lora
from model.errors import InvalidArgument
from shard_server.types import AdapterSpec

SHAPE = common.TINY
CONFIG = model_config(SHAPE)


def adapter(
    out: Path, rank: int, dtype=torch.bfloat16, alpha=None, seed=1, targets=common.LORA_TARGETS
) -> Path:
    common.write_adapter(out, SHAPE, rank, torch.device("cpu"), dtype, seed=seed, targets=targets)
    if alpha is not None:  # a scale that is not a power of two makes the rounding order visible
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["lora_alpha"] = alpha
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def local(path: Path) -> AdapterSpec:
    return AdapterSpec(adapter_ids=(str(path),), source="local")


def naive_host_layout(path: Path, dtype: torch.dtype, rank: int, world: int) -> dict:
    """The naive path: float32 with B * scale, then TP slice, then cast."""
    out = {}
    for (layer, target), (a, b) in load_peft_adapter(path, CONFIG).weights.items():
        a, b = shard_lora(target, a, b, CONFIG, rank, world)
        out[(layer, target)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    return out


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("store_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tp_rank,world", [(0, 1), (1, 2)])
@pytest.mark.parametrize("path", ["runs", "gather", "by_module"])
def test_stacks_are_bit_identical_to_the_float32_path(tmp_path, monkeypatch, file_dtype, store_dtype, tp_rank,
                                                      world, path):  # fmt: skip
    """runs: a copy per layer of each (target, part) run (the CPU); gather: one index_copy_ per run (CUDA's
    way, here on the CPU); by_module: cache/adapter_unpack.py's fallback for files that do not line up."""
    by_module = path == "by_module"
    if by_module:
        monkeypatch.setattr("cache.adapter_unpack._run", lambda *a, **k: None)
    if path == "gather":
        monkeypatch.setattr("cache.adapter_unpack._gather", lambda raw: True)
    path = adapter(tmp_path / "a", rank=5, dtype=file_dtype, alpha=7)  # scale 7/5
    tp = None if world == 1 else SimpleNamespace(rank=tp_rank, world_size=world, group=None)
    store = AdapterStore(CONFIG, "cpu", store_dtype, tp=tp)
    # This rank's host copy into a layout of its own (store.load would all-reduce under TP; the other
    # rank is not here).
    host = store._host_weights(local(path))
    layout = AdapterLayout(lambda _: host, "cpu", store_dtype, None, max_slots=4)
    layout.ensure_resident([1])
    (plan,) = layout._plans.values()
    assert (len(plan.runs), len(plan.loose)) == ((0, 14) if by_module else (14, 0))
    want = naive_host_layout(path, store_dtype, tp_rank, world)
    slot, seen = layout._slot_of[1], set()
    for (layer, _), stack in layout._stacks.items():
        for target in stack.targets:
            m, (a, b) = stack.member(target), want[(layer, target)]
            assert m.a.dtype == m.b.dtype == store_dtype
            assert torch.equal(m.a[slot, : a.shape[0]], a) and torch.equal(m.b[slot, :, : b.shape[1]], b)
            seen.add((layer, target))
    assert seen == want.keys()
    # host memory keeps the module table only: the bytes stay in the file and are read again on upload
    assert host.file is not None and host.memory is None
    assert host.file.path == path / "adapter_model.safetensors"


def expected_stacks(store: AdapterStore, paths: dict[int, Path]) -> None:
    """Every slot of every group stack holds exactly its adapter (zero-padded), free and skipped parts
    zero, and its rank per group is the adapter's largest rank over the group's members (0: none)."""
    by_slot = {slot: paths[i] for i, slot in store.layout._slot_of.items()}
    for slot in range(store.layout._cap):
        if slot not in by_slot:
            continue  # a free slot is never indexed
        want = naive_host_layout(by_slot[slot], store.dtype, 0, 1)
        for (layer, group), stack in store.layout._stacks.items():
            top = 0
            for target in stack.targets:
                member = stack.member(target)
                a_full, b_full = torch.zeros_like(member.a[slot]), torch.zeros_like(member.b[slot])
                if (layer, target) in want:
                    a, b = want[(layer, target)]
                    a_full[: a.shape[0]] = a
                    b_full[:, : b.shape[1]] = b
                    top = max(top, a.shape[0])
                assert torch.equal(member.a[slot], a_full), (slot, layer, target)
                assert torch.equal(member.b[slot], b_full), (slot, layer, target)
            assert int(stack.ranks[slot]) == top, (slot, layer, group)


def test_growth_carries_resident_slots_and_bumps_layout_version(tmp_path):
    store = AdapterStore(CONFIG, "cpu", torch.float32)
    paths, versions = {}, []
    for i in range(1, 7):  # capacity 1 -> 2 -> 4 -> 8; rank 12 (bucket 16) at i=4 re-buckets everything
        rank = 12 if i == 4 else 3 + i % 3
        targets = ("q_proj", "v_proj") if i == 2 else common.LORA_TARGETS
        paths[i] = adapter(tmp_path / f"a{i}", rank=rank, alpha=5, seed=i, targets=targets)
        version = store.layout_version
        store.load(i, local(paths[i]))
        versions.append(store.layout_version - version)
        expected_stacks(store, paths)
    assert versions == [1, 1, 1, 1, 1, 0]  # reallocated stacks always bump the version; a free slot does not
    assert store.layout._cap == 8 and list(store.resident_indices()) == list(range(1, 7))


def test_reused_slot_is_cleared_and_tight_budget_reuploads_from_host(tmp_path):
    big = adapter(tmp_path / "big", rank=8, seed=1)
    small = adapter(tmp_path / "small", rank=2, seed=2, targets=("q_proj",))
    third = adapter(tmp_path / "third", rank=4, seed=3)
    probe = AdapterStore(CONFIG, "cpu", torch.float32)
    host = probe._host_weights(local(big))
    one_slot = probe.layout.adapter_device_bytes(host)  # rank 8: one slot at bucket 8
    # Two slots fit the budget, but two slots plus one old slot do not: growth re-uploads from the host.
    store = AdapterStore(CONFIG, "cpu", torch.float32, budget_bytes=2 * one_slot)
    store.load(1, local(big))
    store.load(2, local(small))
    expected_stacks(store, {1: big, 2: small})
    store.offload(1)
    store.load(3, local(third))  # into big's old slot: rows 4..7 and the skipped modules must read zero
    expected_stacks(store, {2: small, 3: third})
    store.load(4, local(big))  # evicts the least recently used resident into its slot
    assert store.device_bytes() <= 2 * one_slot
    resident = set(store.resident_indices())
    expected_stacks(store, {i: p for i, p in {2: small, 3: third, 4: big}.items() if i in resident})
    assert all(store.is_loaded(i) for i in (2, 3, 4))


def test_integer_lora_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = adapter(tmp_path / "a", rank=2)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(InvalidArgument, match=r"unreadable safetensors file: .*lora_A.weight' has dtype I8"):
        read_peft_adapter(path, CONFIG)


HEADER = b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'  # 16 bytes promised, 0 given


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00not a safetensors file", (16).to_bytes(8, "little") + b"{not json}      ",
     len(HEADER).to_bytes(8, "little") + HEADER],
)  # fmt: skip
def test_corrupt_files_are_refused(tmp_path, payload):
    path = adapter(tmp_path / "a", rank=2)
    (path / "adapter_model.safetensors").write_bytes(payload)
    with pytest.raises(InvalidArgument, match="unreadable safetensors file"):
        read_peft_adapter(path, CONFIG)


def test_bench_runs_on_the_tiny_shape(tmp_path, capsys):
    out = bench_main(["--device", "cpu", "--shape", "tiny", "--loads", "3", "--work", str(tmp_path),
                      "--json", str(tmp_path / "r.json")])  # fmt: skip
    stages = {"read", "validate", "host", "stage", "unpack", "check", "relayout", "sum"}
    assert set(out["stages_ms"]) >= stages
    assert len(out["e2e_ms"]) == len(out["e2e_growth_ms"]) == 3 and "reference_ms" in out
    assert json.loads((tmp_path / "r.json").read_text())["shape"] == "tiny"
    assert "naive load path" in capsys.readouterr().out
