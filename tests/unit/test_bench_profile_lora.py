"""bench/profile_lora.py's trace summary: which matmul, shrink and expand belong to which projection group,
read off the kernel order of a decode layer in a Chrome trace (no GPU: a written trace)."""

from __future__ import annotations

import json

from bench.profile_lora import trace_summary


def _layer(t0: float, late_qkv: float) -> list[dict]:
    """One layer's kernels: (name, start, duration) as a side-stream LoRA graph runs them."""
    k = [
        ("_add_rmsnorm_kernel", 0, 2),
        ("_shrink_kernel", 3, 8), ("nvjet_sm90_qkv", 3, 16), ("_expand_kernel", 11, 8 + late_qkv),
        ("_rotary_kv_kernel", 20 + late_qkv, 3), ("_paged_decode_kernel", 24 + late_qkv, 30),
        ("_shrink_kernel", 55 + late_qkv, 6), ("nvjet_sm90_o", 55 + late_qkv, 12),
        ("_expand_kernel", 61 + late_qkv, 4),
        ("_add_rmsnorm_kernel", 68 + late_qkv, 2),
        ("_shrink_kernel", 71 + late_qkv, 9), ("nvjet_sm90_gate_up", 71 + late_qkv, 64),
        ("_expand_kernel", 80 + late_qkv, 20),
        ("_silu_mul_kernel", 136 + late_qkv, 3),
        ("_shrink_kernel", 140 + late_qkv, 11), ("nvjet_sm90_down", 140 + late_qkv, 36),
        ("_expand_kernel", 151 + late_qkv, 7),
    ]  # fmt: skip
    return [{"ph": "X", "cat": "kernel", "name": n, "ts": t0 + s, "dur": d} for n, s, d in k]


def test_groups_and_their_times_are_read_off_the_kernel_order(tmp_path):
    events = _layer(0, late_qkv=2) + _layer(1000, late_qkv=2)
    events.append({"ph": "X", "cat": "kernel", "name": "_add_rmsnorm_kernel", "ts": 2000, "dur": 2})
    events.append({"ph": "X", "cat": "cpu_op", "name": "ignored", "ts": 5, "dur": 1})
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    got = trace_summary(str(path))
    assert set(got) == {"qkv", "o", "gate_up", "down"}
    assert all(g["layers"] == 2 for g in got.values())
    assert got["qkv"]["gemm_us"] == 16 and got["qkv"]["shrink_us"] == 8 and got["qkv"]["expand_us"] == 10
    assert got["qkv"]["chain_us"] == 18 and got["qkv"]["expand_end_after_gemm_us"] == 2  # the join waits
    assert got["gate_up"]["gemm_us"] == 64 and got["gate_up"]["expand_end_after_gemm_us"] == 100 - 135
    assert got["down"]["gemm_us"] == 36 and got["o"]["gemm_us"] == 12


def test_a_base_graph_has_matmuls_and_no_lora(tmp_path):
    events = [e for e in _layer(0, 0) if "shrink" not in e["name"] and "expand" not in e["name"]]
    events.append({"ph": "X", "cat": "kernel", "name": "_add_rmsnorm_kernel", "ts": 500, "dur": 2})
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    got = trace_summary(str(path))
    assert got["down"] == {"gemm_us": 36, "layers": 1}
    assert "chain_us" not in got["qkv"]


def test_a_skipped_lora_part_launches_nothing_and_comes_back_after():
    """profile_lora's skipped_lora_part: inside, TritonLoraOps runs no shrink (an unwritten v of the
    right shape) or no expand (its output untouched); outside, the real methods again."""
    import pytest
    import torch

    from bench.profile_lora import skipped_lora_part
    from model.adapters.lora_ops import TritonLoraOps
    from model.adapters.stacks import LoraGroupStack

    ops = TritonLoraOps(kernels=object(), sms=32)  # a kernels module without kernels: any launch fails
    stack = LoraGroupStack(torch.zeros(2, 48, 64), torch.zeros(2, 96, 16), torch.full((2,), 16),
                           ("q_proj", "k_proj", "v_proj"), (32, 32, 32))  # fmt: skip
    x, y = torch.ones(5, 64), torch.full((5, 96), 7.0)
    with skipped_lora_part("shrink"):
        v = ops.shrink(x, stack, plan=None)
    assert v.shape == (1, 5, 48) and v.dtype == torch.float32
    with skipped_lora_part("expand"):
        ops.expand(y, v, stack, [(0, 32, 0), (32, 64, 32), (64, 96, 64)], plan=None, store=True)
    assert y.eq(7.0).all()
    with pytest.raises(AttributeError):  # the real shrink again: it reaches for the missing kernels
        ops.shrink(x, stack, plan=None)
    with pytest.raises(ValueError, match="no LoRA part"), skipped_lora_part("gemm"):
        pass
