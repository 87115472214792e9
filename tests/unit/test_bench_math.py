"""The benchmark's roofline arithmetic and its adapter writer (bench/common.py)."""

import pytest

from bench import common
from bench.common import MISTRAL_7B, TINY, decode_step_bytes, prefill_flops, roofline_fraction


def test_mistral_7b_counts_match_the_published_model():
    assert MISTRAL_7B.total_params == 7_241_732_096  # Mistral-7B's parameter count
    assert MISTRAL_7B.kv_bytes_per_token(2) == 128 * 1024  # 2 (K, V) * 32 layers * 8 heads * 128 * 2 B
    # Rank 16 on all seven projections: 16 * (in + out) summed per layer, 32 layers.
    assert MISTRAL_7B.adapter_params(16) == 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432) == 41_943_040


def test_decode_step_bytes_counts_each_term_once():
    b = decode_step_bytes(MISTRAL_7B, batch=64, mean_context=576, distinct_adapters=8, rank=16)
    # Weights: everything but the embedding, whose rows are read per token.
    assert b.weights == 2 * (MISTRAL_7B.total_params - MISTRAL_7B.vocab_params + 64 * 4096)
    assert b.kv == 64 * 576 * 128 * 1024
    assert b.adapters == 8 * MISTRAL_7B.adapter_params(16) * 2
    assert b.total == b.weights + b.kv + b.adapters
    assert 14.2e9 < b.weights < 14.3e9


def test_roofline_fraction_is_ideal_time_over_measured_time():
    assert roofline_fraction(3e9, 1e-3, 3e12) == pytest.approx(1.0)
    assert roofline_fraction(3e9, 2e-3, 3e12) == pytest.approx(0.5)


def test_prefill_flops_counts_the_causal_attention_pairs():
    one = prefill_flops(MISTRAL_7B, [1], logits_rows=0)
    attn_one = 32 * 4 * 32 * 128  # one (query, key) pair: QK^T and PV, 2 FLOPs each, every head, layer
    assert one == pytest.approx(2 * MISTRAL_7B.matmul_params + attn_one)
    two = prefill_flops(MISTRAL_7B, [2], logits_rows=1)  # 3 pairs under the mask
    assert two == pytest.approx(4 * MISTRAL_7B.matmul_params + 2 * MISTRAL_7B.vocab_params + 3 * attn_one)


def test_card_slug():
    assert common.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert common.card_slug("NVIDIA H200") == "h200"


def test_written_adapter_is_accepted_by_the_shard_loader(tmp_path):
    import torch

    from model.adapters.peft_loader import load_peft_adapter
    from model.config import MistralConfig

    out = common.write_adapter(tmp_path / "a", TINY, rank=8, device=torch.device("cpu"), dtype=torch.float32)
    config = MistralConfig(
        vocab_size=TINY.vocab, hidden_size=TINY.hidden, intermediate_size=TINY.intermediate,
        num_hidden_layers=TINY.layers, num_attention_heads=TINY.heads, num_key_value_heads=TINY.kv_heads,
        head_dim=TINY.head_dim,
    )  # fmt: skip
    adapter = load_peft_adapter(out, config)
    assert adapter.rank == 8 and adapter.targets == frozenset(common.LORA_TARGETS)
    assert len(adapter.weights) == TINY.layers * 7
    n = sum(a.numel() + b.numel() for a, b in adapter.weights.values())
    assert n == TINY.adapter_params(8)


def test_plot_draws_a_png_from_a_result_file(tmp_path):
    """bench/plot.py on a committed H100 result: a real PNG of a plausible size comes out."""
    pytest.importorskip("matplotlib")
    import shutil
    from pathlib import Path

    from bench.plot import plot

    src = Path(__file__).resolve().parents[2] / "bench/results/h100-80gb-hbm3-2026-11-27.json"
    result = tmp_path / "r.json"
    shutil.copy(src, result)
    out = plot(result)
    assert out == tmp_path / "r.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
