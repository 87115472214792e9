"""Medusa heads trained by bench/medusa_train.py, written to MODEL_DIR/medusa and read back by the engine
(float32, CPU): at every greedy verify step the engine accepts exactly what the training code's heads
predict there (tests/medusa_cases.py says how and why)."""

from __future__ import annotations

import pytest
from medusa_cases import HEADS, train_and_compare, walk_model

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def engine_for(model_dir, k: int) -> ShardEngine:
    return ShardEngine(ShardConfig(model_dir=model_dir, max_kv_cache_bytes=1 << 23, speculative_tokens=k))


@pytest.mark.parametrize("v1,layers", [(False, 2), (True, 1)], ids=["v2-2layers", "v1-1layer"])
def test_engine_accepts_exactly_what_the_trained_heads_predict(tiny_model_dir, tmp_path, v1, layers):
    model_dir = walk_model(tiny_model_dir, tmp_path / "model")
    got = train_and_compare(model_dir, engine_for, 512, v1=v1, layers=layers)
    assert got["loaded"] == (HEADS, v1)  # the engine read the heads the training wrote
    assert got["equal_to_plain"]
    assert got["base_top1"] == (1.0, 1.0)  # the features are the states that chose the tokens
    top1 = got["top1"]
    assert top1[0] > 0.35 and top1[-1] > 0.15, got  # the heads learned something to compare
    assert got["compared"] > 100
    assert got["compared"] - got["agree"] <= max(2, got["compared"] // 100), got  # float32: near-ties only
    st, want = got["stats"], got["offline"]
    assert st["medusa_drafted"] > 0.8 * st["drafted"]
    assert abs(st["acceptance"] - want["acceptance"]) < 0.03, got  # the first step drafts by n-gram
