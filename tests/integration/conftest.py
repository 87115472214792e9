"""Fixtures: one warmed-up shard process shared by the session, the adapters it serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from shard_harness import DEFAULT_KV_BYTES, SharedShard, running_shard

from shard_server.tools.tiny_model import make_tiny_adapter
from shard_server.types import AdapterSpec


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[int, Path]:
    """Three different PEFT adapters for indices 1..3 (ranks, targets and rsLoRA vary)."""
    root = tmp_path_factory.mktemp("adapters")
    variants = {
        1: dict(rank=8, target_modules=("q_proj", "v_proj"), seed=11),
        2: dict(
            rank=4,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            use_rslora=True,
            seed=12,
        ),
        3: dict(rank=16, target_modules=("o_proj", "down_proj"), seed=13),
    }
    return {i: make_tiny_adapter(tiny_model_dir, root / f"a{i}", **kw) for i, kw in variants.items()}


@pytest.fixture(scope="session")
def shared_shard(tiny_model_dir, adapter_dirs) -> Iterator[SharedShard]:
    with running_shard(tiny_model_dir, "--max-kv-cache-bytes", str(DEFAULT_KV_BYTES)) as sp:
        with sp.router() as router:
            router.warmup()  # as the router does once after connecting
            for index, path in adapter_dirs.items():
                assert router.load_adapter(index, AdapterSpec(adapter_ids=(str(path),), source="local"))
            yield SharedShard(sp, router.warmup_response, adapter_dirs)
