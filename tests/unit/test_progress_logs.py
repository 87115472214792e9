"""Start-up and Warmup say what they are doing: weight loading logs files, bytes and the read rate;
Warmup logs its phases."""

from __future__ import annotations

import logging
import re

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import BatchSpec, RequestSpec, StoppingParams


def test_weight_loading_and_warmup_log_their_progress(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO)
    engine = ShardEngine(ShardConfig(model_dir=tiny_model_dir, max_kv_cache_bytes=1 << 20))
    lines = [r.getMessage() for r in caplog.records if r.name == "model.weights"]
    assert re.search(r"loading weights: 1 files, [\d.]+ MB, \d+ tensors", lines[0]), lines
    assert re.search(r"loaded weights: file 1/1, tensor (\d+)/\1, ([\d.]+)/\2 MB in [\d.]+ s \([\d.]+ MB/s\)",
                     lines[-1]), lines  # fmt: skip
    caplog.clear()
    req = RequestSpec(id=0, input_ids=(1, 5, 6, 7), stopping=StoppingParams(max_new_tokens=4))
    engine.warmup(BatchSpec(id=0, requests=(req,)), 16, 64, 4)
    phases = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warmup")]
    assert [p[:10] for p in phases[:4]] == ["warmup 1/4", "warmup 3/4", "warmup 4/4", "warmup: KV"], phases
