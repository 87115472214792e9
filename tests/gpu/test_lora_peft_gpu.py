"""Plain LoRA on a GPU, bf16, against PEFT in float32: decode LoRA on the side stream (deltas added by the
fused consumer kernels) and added in place, per request within the bf16 tolerance of
tests/gpu/test_model_gpu.py (relative error per row <= 2e-2), prefill and 12 decode steps of a batch
mixing base rows and three adapters of ranks 4 / 8 / 16 whose targets leave some group members out (the
delta buffer then needs its memset) and cover others (the expand stores the delta).

Run on the GPU machine: `make test-gpu` or `python -m pytest -m gpu tests/gpu/test_lora_peft_gpu.py -v`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from mistral_harness import assert_batch_matches_peft, peft_truth  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # index -> adapter_factory kwargs
    1: dict(rank=8, target_modules=("q_proj", "v_proj", "o_proj"), seed=91),
    2: dict(rank=16, target_modules=ALL, seed=92),
    3: dict(rank=4, target_modules=("gate_proj", "down_proj"), use_rslora=True, seed=93),
}
REQUESTS = [2, 0, 1, 3, 2, 1, 0, 3]


@pytest.fixture(scope="module")
def setup(tiny_model_factory, adapter_factory):
    from model.flash_mistral import FlashMistralForCausalLM

    model_dir = tiny_model_factory(heads=4, kv_heads=2, head_dim=64, init_std=0.02)
    # 0.05: each adapter moves the logits well past the bf16 error (at 0.02 the rank-4 one did not)
    dirs = {i: adapter_factory(model_dir, init_std=0.05, **kw) for i, kw in ADAPTERS.items()}
    ours = FlashMistralForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
    return dirs, ours, peft_truth(model_dir, dirs, device="cuda")


@pytest.mark.parametrize("concurrent", [True, False], ids=["side-stream", "in-place"])
def test_mixed_lora_batch_bf16_equals_peft_fp32(setup, concurrent):
    from cache.adapter_store import AdapterStore
    from model.adapters.batch import DeltaLora
    from shard_server.types import AdapterSpec

    dirs, ours, truth = setup
    store = AdapterStore(ours.config, device="cuda", dtype=torch.bfloat16, concurrent_lora=concurrent)
    for i, d in dirs.items():
        store.load(i, AdapterSpec(adapter_ids=(str(d),), source="local"))
    assert (store.lora_stream is not None) == concurrent
    cfg = ours.config

    def takes_the_path_under_test(data) -> None:
        x = torch.zeros(len(REQUESTS) + 2, cfg.q_size, dtype=torch.bfloat16, device="cuda")
        probe = data.begin_lora(0, "o_proj", x, (cfg.hidden_size,))
        assert isinstance(probe, DeltaLora) == concurrent
        probe.finish(torch.empty(x.shape[0], cfg.hidden_size, dtype=x.dtype, device="cuda"))

    assert_batch_matches_peft(ours, store, truth, REQUESTS, [11, 4, 19, 1, 7, 15, 9, 3], 512, 2e-2, seed=5,
                              blocks=64, each_step=takes_the_path_under_test)  # fmt: skip
