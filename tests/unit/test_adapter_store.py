"""AdapterStore: load, offload, conflicts, generations, budget + LRU host offload, correct deltas."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from cache.adapter_sources import AdapterSourceConfig, AdapterSources
from cache.adapter_store import AdapterStore, rank_bucket
from model.adapters.batch import AdapterBatchMetadata
from model.adapters.peft_loader import load_peft_adapter
from model.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Status,
    Unimplemented,
)
from shard_server.types import AdapterSpec


def base_config(model_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(**json.loads((model_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def peft_dir(tiny_model_dir, adapter_factory):
    return adapter_factory(tiny_model_dir, rank=3, target_modules=("q_proj", "v_proj"), seed=1)


def synth(peft_dir: Path, out: Path, rank: int, seed: int) -> Path:
    """A variant of a peft-made adapter (same keys and config) with another rank and fresh values."""
    out.mkdir(parents=True)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg.update(r=rank, lora_alpha=2 * rank)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, t in load_file(str(peft_dir / "adapter_model.safetensors")).items():
        shape = (rank, t.shape[1]) if "lora_A" in k else (t.shape[0], rank)
        tensors[k] = torch.randn(shape, generator=gen) * 0.1
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def local(*paths, **kw) -> AdapterSpec:
    return AdapterSpec(adapter_ids=tuple(str(p) for p in paths), source="local", **kw)


def expected_delta(paths_and_weights, config, key, x):
    """Independent oracle: sum_i w_i * x @ (B_i A_i).T from the loader, no store involved."""
    out = torch.zeros(x.shape[0], 0)
    for path, w in paths_and_weights:
        d = load_peft_adapter(path, config).delta(*key)
        if d is not None:
            out = out + w * (x @ d.T) if out.numel() else w * (x @ d.T)
    return out


def check_batch(store, config, requests, is_prefill, gen):
    """requests: [(adapter_index, n_tokens, [(path, weight)] or [] for base)]; every module, every token."""
    data = store.batch_data([r[0] for r in requests], [r[1] for r in requests], is_prefill)
    t = sum(r[1] for r in requests)
    for key in [(0, "q_proj"), (1, "v_proj"), (0, "k_proj")]:
        fan_out = 64 if key[1] == "q_proj" else 32
        x = torch.randn(t, 64, generator=gen)
        out = torch.zeros(t, fan_out)
        data.add_lora(*key, x, out)
        pos = 0
        for _, n, paths in requests:
            want = expected_delta(paths, config, key, x[pos : pos + n])
            want = want if want.numel() else torch.zeros(n, fan_out)
            torch.testing.assert_close(out[pos : pos + n], want, rtol=1e-5, atol=1e-5)
            pos += n


def test_load_serve_offload_conflict_and_generation(tiny_model_dir, peft_dir, tmp_path):
    config = base_config(tiny_model_dir)
    other = synth(peft_dir, tmp_path / "other", rank=5, seed=9)
    store = AdapterStore(config, budget_bytes=None)
    store.load(1, local(peft_dir))
    store.load(1, local(peft_dir))  # the same adapter again: a no-op
    g1 = store.generation(1)
    assert store.is_loaded(1) and store.loaded_spec(1) == local(peft_dir) and store.generation(0) == 0
    with pytest.raises(
        FailedPrecondition, match=r"adapter index 1 already holds .*offload it before loading"
    ) as e:
        store.load(1, local(other))
    assert e.value.status == Status.FAILED_PRECONDITION
    store.load(2, local(other))
    gen = torch.Generator().manual_seed(0)
    reqs = [(1, 3, [(peft_dir, 1.0)]), (0, 2, []), (2, 4, [(other, 1.0)]), (1, 1, [(peft_dir, 1.0)])]
    check_batch(store, config, reqs, True, gen)
    check_batch(store, config, [(r[0], 1, r[2]) for r in reqs], False, gen)

    assert store.offload(1) is True and store.offload(1) is False
    with pytest.raises(NotFound, match="adapter index 1 is not loaded") as e:
        store.batch_data([0, 1], [1, 1], False)
    assert e.value.status == Status.NOT_FOUND
    store.load(1, local(peft_dir))
    assert store.generation(1) > g1  # a reload is a new identity (prefix caching)
    check_batch(store, config, reqs, True, gen)
    store.offload(1), store.offload(2)
    assert store.device_bytes() == 0


def test_more_adapters_than_the_budget_holds_all_serve_and_bytes_stay_under(
    tiny_model_dir, peft_dir, tmp_path
):
    config = base_config(tiny_model_dir)
    paths = [synth(peft_dir, tmp_path / f"a{i}", rank=1 + i % 4, seed=i) for i in range(7)]
    # one slot at rank bucket 8 (q: 8*(64+64), v: 8*(64+32) per layer, 2 layers, fp32) = 14336 bytes
    slot_bytes = 2 * (8 * 128 + 8 * 96) * 4
    budget = 3 * slot_bytes
    assert AdapterStore(config, budget_bytes=budget).download(local(paths[0])) == pytest.approx(1 / 3)
    store = AdapterStore(config, budget_bytes=budget)
    for i, p in enumerate(paths, start=1):
        store.load(i, local(p))
        assert store.device_bytes() <= budget
    assert len(store.resident_indices()) <= 3 < 7
    gen = torch.Generator().manual_seed(1)
    version = store.layout_version
    for step in range(10):  # rotate through all of them, two adapters + base per batch
        i, j = 1 + step % 7, 1 + (3 * step + 1) % 7
        reqs = [(i, 2, [(paths[i - 1], 1.0)]), (0, 1, []), (j, 3, [(paths[j - 1], 1.0)])]
        check_batch(store, config, reqs, step % 2 == 0, gen)
        assert store.device_bytes() <= budget
        assert set(store.resident_indices()) >= {i, j}
    assert all(store.is_loaded(i) for i in range(1, 8))
    assert store.layout_version == version  # evictions reuse slots: no re-layout, CUDA graphs stay valid
    # four distinct adapters in one batch cannot fit three slots' worth of bytes
    with pytest.raises(
        ResourceExhausted, match=r"adapters \[1, 2, 3, 4\] need .* the adapter budget is"
    ) as e:
        store.batch_data([1, 2, 3, 4], [1, 1, 1, 1], False)
    assert e.value.status == Status.RESOURCE_EXHAUSTED
    check_batch(store, config, [(5, 2, [(paths[4], 1.0)])], False, gen)  # still serving afterwards
    assert store.device_bytes() <= budget


def test_rank_bucket_growth_and_a_too_large_adapter(tiny_model_dir, peft_dir, tmp_path):
    config = base_config(tiny_model_dir)
    assert [rank_bucket(r) for r in (1, 8, 9, 12, 16, 200, 256)] == [8, 8, 16, 16, 16, 256, 256]
    store = AdapterStore(config, budget_bytes=60_000)  # two slots at bucket 16: 57344
    store.load(1, local(peft_dir))
    version = store.layout_version
    big = synth(peft_dir, tmp_path / "big", rank=12, seed=3)
    store.load(2, local(big))
    assert store.layout_version > version  # stacks re-laid out at bucket 16
    check_batch(store, config, [(2, 2, [(big, 1.0)]), (1, 2, [(peft_dir, 1.0)])], True, torch.Generator())
    huge = synth(peft_dir, tmp_path / "huge", rank=200, seed=4)
    with pytest.raises(ResourceExhausted, match=r"adapters \[3\] need 458752 device bytes"):
        store.load(3, local(huge))
    assert not store.is_loaded(3) and store.is_loaded(1) and store.device_bytes() <= 60_000


def test_merged_adapter_and_refused_sources(tiny_model_dir, peft_dir, tmp_path):
    config = base_config(tiny_model_dir)
    other = synth(peft_dir, tmp_path / "other", rank=4, seed=5)
    root = tmp_path
    store = AdapterStore(config, sources=AdapterSources(AdapterSourceConfig(adapter_root=root)),
                         preloaded=[(0, local(other))])  # fmt: skip
    assert store.preloaded_adapters() == ((0, local(other)),)
    merged = local(peft_dir, other, weights=(0.6, 0.4))
    with pytest.raises(Exception, match="outside the adapter root"):
        store.load(3, merged)  # peft_dir lies outside this root
    store = AdapterStore(config, preloaded=[(0, local(other))])
    store.load(3, merged)
    gen = torch.Generator().manual_seed(2)
    reqs = [
        (3, 2, [(peft_dir, 0.6), (other, 0.4)]),
        (0, 2, [(other, 1.0)]),
    ]  # index 0 serves the start-up one
    check_batch(store, config, reqs, True, gen)
    with pytest.raises(InvalidArgument, match=r"density must be in \(0, 1\] for TIES; got 0.0"):
        store.load(4, local(peft_dir, other, weights=(0.5, 0.5), merge_strategy="ties"))  # no density
    assert not store.is_loaded(4)
    with pytest.raises(Unimplemented, match="PBASE"):
        store.load(5, AdapterSpec(adapter_ids=("org/x",), source="pbase"))
    with pytest.raises(NotFound, match="does not exist"):
        store.download(local(tmp_path / "nope"))


def test_cuda_graph_style_static_metadata_serves_any_slots_copied_in(tiny_model_dir, peft_dir, tmp_path):
    config = base_config(tiny_model_dir)
    other = synth(peft_dir, tmp_path / "other", rank=6, seed=8)
    store = AdapterStore(config)
    store.load(1, local(peft_dir))
    store.load(2, local(other))
    meta = AdapterBatchMetadata.for_cuda_graph(6, "cpu")  # a bucket of 6 rows, captured once
    graph_data = store.graph_batch_data(meta)
    version = store.layout_version
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, generator=gen)
    for indices in ([1, 2, 0, 1], [2, 2, 1, 0], [0, 0, 0, 0]):
        slots = store.request_slots(indices) + [-1, -1]  # 4 requests + 2 padding rows
        meta.token_slots.copy_(torch.tensor(slots, dtype=torch.int32))  # in place, as before a replay
        assert store.layout_version == version
        got = torch.zeros(6, 64)
        graph_data.add_lora(0, "q_proj", x, got)
        want = torch.zeros(6, 64)
        store.batch_data(indices + [0, 0], [1] * 6, is_prefill=False).add_lora(0, "q_proj", x, want)
        torch.testing.assert_close(got, want)
    assert torch.equal(got, torch.zeros(6, 64))  # the all-base batch ran through the same code path
