"""The attention backend is a measured, explicit choice: preference order and ShardConfig's override."""

from __future__ import annotations

import pytest
import torch

from model.attention import BACKENDS, select_attention_backend
from shard_server.config import ShardConfig


def test_preference_order_is_the_measured_one():
    # torch_cuda + our Triton decode measured faster than flash-attn on an H200 (see BACKENDS' comment).
    assert [e.name for e in BACKENDS] == ["torch_cuda", "flash_attn", "reference"]


def test_auto_on_cpu_is_the_reference_and_a_named_backend_that_cannot_run_says_why():
    assert select_attention_backend("cpu", torch.float32).name == "reference"
    with pytest.raises(ValueError, match="torch_cuda.*cannot run on cpu"):
        select_attention_backend("cpu", torch.float32, prefer="torch_cuda")


def test_shard_config_validates_the_backend_name(tmp_path):
    assert ShardConfig(model_dir=tmp_path).attention_backend == "auto"
    assert ShardConfig(model_dir=tmp_path, attention_backend="reference").attention_backend == "reference"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        ShardConfig(model_dir=tmp_path, attention_backend="xformers")


def test_engine_uses_the_configured_backend(tiny_model_dir):
    from shard_server.engine.engine import ShardEngine

    engine = ShardEngine(ShardConfig(model_dir=tiny_model_dir, attention_backend="reference"))
    assert engine.model.attention.name == "reference"
