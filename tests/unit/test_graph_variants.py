"""Which decode graph a batch replays, and the matmul policy each graph is captured under (CPU: the
choices only; tests/gpu/test_engine_gpu.py replays them)."""

from types import SimpleNamespace

import pytest
import torch

from shard_server.executor.gemm_policy import DEFAULT, GemmPolicy, decode_policy
from shard_server.executor.graphs import BASE, FEW_ADAPTERS, LORA, LORA_FEW, DecodeGraphs


def _graphs(monkeypatch, lora_stream, sms: int) -> DecodeGraphs:
    monkeypatch.setattr(DecodeGraphs, "_sms", lambda self: sms)
    runner = SimpleNamespace(
        device=torch.device("cpu"), block_size=16, window=None,
        model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1024)),
        adapters=SimpleNamespace(lora_stream=lora_stream),
    )  # fmt: skip
    return DecodeGraphs(runner, max_batch=64)


def test_few_adapter_batches_replay_the_side_stream_graph(monkeypatch):
    graphs = _graphs(monkeypatch, lora_stream=object(), sms=132)
    assert graphs.lora_variants == [LORA, LORA_FEW]
    assert graphs.variant_for([]) == BASE and graphs.variant_for([-1, -1]) == BASE
    assert graphs.variant_for([3, -1, 3, 5]) == LORA_FEW  # distinct adapters, not rows, count
    assert graphs.variant_for(list(range(FEW_ADAPTERS))) == LORA_FEW
    assert graphs.variant_for(list(range(FEW_ADAPTERS + 1))) == LORA
    graphs.contexts = (256, 512)
    assert set(graphs._keys(LORA_FEW)) == {(b, c, LORA_FEW) for b in graphs.buckets for c in (256, 512)}


@pytest.mark.parametrize("lora_stream,sms", [(None, 132), (object(), 64)])
def test_without_a_lora_stream_or_on_a_small_device_lora_graphs_add_in_place(monkeypatch, lora_stream, sms):
    graphs = _graphs(monkeypatch, lora_stream, sms)
    assert graphs.lora_variants == [LORA]
    assert graphs.variant_for([0, 1]) == LORA


def test_decode_policy_by_rows_and_side_stream():
    assert decode_policy(32, 132) == DEFAULT
    assert decode_policy(64, 132) == decode_policy(112, 132) == GemmPolicy("cublaslt", 0)
    assert decode_policy(128, 132) == decode_policy(256, 132) == GemmPolicy("cublaslt", 16)
    assert decode_policy(1, 132, side_stream=True) == GemmPolicy("cublaslt", 32)
    assert decode_policy(128, 78) == DEFAULT and decode_policy(8, 78, side_stream=True) == DEFAULT


def test_policy_restores_the_carveout_it_changed():
    assert torch._C._get_sm_carveout_experimental() is None
    with GemmPolicy(None, 16).applied():
        assert torch._C._get_sm_carveout_experimental() == 16
    assert torch._C._get_sm_carveout_experimental() is None
    with pytest.raises(KeyError), GemmPolicy(None, 8).applied():
        raise KeyError("a failed capture")
    assert torch._C._get_sm_carveout_experimental() is None
