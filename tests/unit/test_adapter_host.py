"""The host side of the adapter store (cache/adapter_host.py): module tables over the files, many more
registered adapters than device slots (host memory holds tables, the bytes are read again from the
file on every upload), refusal of a file that changed under a registered adapter, chunked reads."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bench import common
from bench.adapter_load import model_config
from cache.adapter_host import HostAdapter
from cache.adapter_store import AdapterStore
from model.adapters.peft_loader import load_peft_adapter, read_peft_adapter
from model.errors import FailedPrecondition, Status
from shard_server.types import AdapterSpec

SHAPE = common.TINY
CONFIG = model_config(SHAPE)


def _adapter(tmp_path: Path, i: int, rank: int = 4) -> Path:
    return common.write_adapter(tmp_path / f"a{i}", SHAPE, rank, torch.device("cpu"), torch.bfloat16,
                                seed=10 + i, std=0.1)  # fmt: skip


def _spec(path: Path) -> AdapterSpec:
    return AdapterSpec(adapter_ids=(str(path),), source="local")


def _check_q(store: AdapterStore, index: int, path: Path, gen) -> None:
    """Layer 1 q_proj delta of `index` in a decode batch next to a base row equals the loader's."""
    data = store.batch_data([0, index], [1, 1], is_prefill=False)
    x = torch.randn(2, SHAPE.hidden, generator=gen)
    out = torch.zeros(2, SHAPE.heads * SHAPE.head_dim)
    data.add_lora(1, "q_proj", x, out)
    delta = load_peft_adapter(path, CONFIG).delta(1, "q_proj")
    torch.testing.assert_close(out[1], x[1] @ delta.T, rtol=1e-5, atol=1e-5)
    assert out[0].eq(0).all()


def test_many_registered_adapters_few_slots_bytes_read_from_files(tmp_path):
    paths = [_adapter(tmp_path, i) for i in range(24)]
    store = AdapterStore(CONFIG, "cpu", torch.float32, max_slots=3)
    for i, p in enumerate(paths, start=1):
        store.load(i, _spec(p))
    assert len(store.resident_indices()) == 3
    for i in range(1, 25):  # host memory: a module table per adapter, no tensor bytes
        host = store._entries[i].host
        assert host.memory is None and host.file is not None and len(host.modules) == 2 * 7
    gen = torch.Generator().manual_seed(0)
    version = store.layout_version
    for step in range(30):  # Zipf-ish: low indices come back often, every one comes back from its file
        i = 1 + (step * step) % 24
        _check_q(store, i, paths[i - 1], gen)
    assert store.layout_version == version  # evictions reuse slots


def test_a_file_changed_under_a_registered_adapter_is_refused_until_reloaded(tmp_path):
    a, b, c = (_adapter(tmp_path, i) for i in range(3))
    store = AdapterStore(CONFIG, "cpu", torch.float32, max_slots=1)
    store.load(1, _spec(a))
    store.load(2, _spec(b))  # evicts 1 (one slot)
    weights = a / "adapter_model.safetensors"
    os.replace(c / "adapter_model.safetensors", weights)  # another adapter's bytes, same shapes
    with pytest.raises(FailedPrecondition, match="changed since it was loaded") as e:
        store.batch_data([1], [1], is_prefill=True)
    assert e.value.status == Status.FAILED_PRECONDITION
    store.offload(1)
    store.load(1, _spec(a))
    _check_q(store, 1, a, torch.Generator().manual_seed(1))  # now serving the new file


def test_module_table_views_and_chunked_reads(tmp_path, monkeypatch):
    path = _adapter(tmp_path, 0, rank=3)
    peft = read_peft_adapter(path, CONFIG)
    store = AdapterStore(CONFIG, "cpu", torch.float32)
    host = store._host_weights(_spec(path))
    data = (path / "adapter_model.safetensors").read_bytes()
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    for key, m in peft.modules.items():
        entry = host.modules[key]
        assert torch.equal(entry.a.view(raw), m.a) and torch.equal(entry.b.view(raw), m.b)
        assert entry.scale == m.scale
    packed = HostAdapter.packed({k: (m.a, m.b, m.scale) for k, m in peft.modules.items()}, torch.float32)
    assert packed.memory is not None and packed.file is None
    # Chunked reads: spans in order, covering the file exactly; the buffer then holds the file's bytes.
    monkeypatch.setattr("cache.adapter_host.MIN_CHUNK", 1000)
    with ThreadPoolExecutor(3) as pool:
        buf = torch.zeros(len(data) + 7, dtype=torch.uint8)
        spans = list(host.read_chunks(buf, pool, chunks=5))
        assert spans[0][0] == 0 and spans[-1][1] == len(data) and len(spans) == 5
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert bytes(buf[: len(data)].numpy()) == data and not buf[len(data) :].any()
        # Stopping early still waits for every read already started (none writes into buf afterwards).
        gen = host.read_chunks(torch.zeros(len(data), dtype=torch.uint8), pool, chunks=5)
        next(gen)
        gen.close()
