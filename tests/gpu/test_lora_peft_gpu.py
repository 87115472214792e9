"""Plain LoRA on a GPU, bf16, against PEFT in float32: decode LoRA on the side stream (deltas added by the
fused consumer kernels) and added in place, per request within the bf16 tolerance of
tests/gpu/test_model_gpu.py (relative error per row <= 2e-2), prefill and 12 decode steps of a batch
mixing base rows and three adapters of ranks 4 / 8 / 16 whose targets leave some group members out (the
delta buffer then needs its memset) and cover others (the expand stores the delta).

Run on the GPU machine: `make test-gpu` or `python -m pytest -m gpu tests/gpu/test_lora_peft_gpu.py -v`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from mistral_harness import PagedRunner, hf_logits, random_prompts  # noqa: E402

from cache.kv_cache import KVCache  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RTOL = 2e-2
VOCAB = 512
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # index -> adapter_factory kwargs
    1: dict(rank=8, target_modules=("q_proj", "v_proj", "o_proj"), seed=91),
    2: dict(rank=16, target_modules=ALL, seed=92),
    3: dict(rank=4, target_modules=("gate_proj", "down_proj"), use_rslora=True, seed=93),
}
REQUESTS = [2, 0, 1, 3, 2, 1, 0, 3]


@pytest.fixture(scope="module")
def setup(tiny_model_factory, adapter_factory):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    from model.flash_mistral import FlashMistralForCausalLM

    model_dir = tiny_model_factory(heads=4, kv_heads=2, head_dim=64, init_std=0.02)
    dirs = {i: adapter_factory(model_dir, init_std=0.02, **kw) for i, kw in ADAPTERS.items()}

    def base():
        return MistralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()

    truth = {0: base(), **{i: PeftModel.from_pretrained(base(), d).eval() for i, d in dirs.items()}}
    ours = FlashMistralForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
    return dirs, ours, truth


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.float().cpu()
    return float(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


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
    runner = PagedRunner(ours, KVCache.for_model(ours, 64), seed=5)
    prompts = random_prompts([11, 4, 19, 1, 7, 15, 9, 3], VOCAB, seed=6)
    data = store.batch_data(REQUESTS, [len(p) for p in prompts], is_prefill=True)
    logits, cu = runner.prefill(prompts, adapter_data=data)
    for b, (p, idx) in enumerate(zip(prompts, REQUESTS, strict=True)):
        ref = hf_logits(truth[idx], p)
        err = _rel(logits[cu[b] : cu[b + 1]], ref)
        assert err <= RTOL, f"prefill request {b} (adapter {idx}): relative error {err:.4f}"
        if idx:  # the adapter moves the logits by far more than our error: equality is not vacuous
            assert _rel(logits[cu[b] : cu[b + 1]], hf_logits(truth[0], p)) > 3 * err
    g = random.Random(8)
    start = [len(s) for s in runner.seqs]
    got = []
    for _ in range(12):
        tokens = [g.randrange(3, VOCAB) for _ in runner.seqs]
        data = store.batch_data(REQUESTS + [0, 0], [1] * (len(tokens) + 2), is_prefill=False)
        x = torch.zeros(len(tokens) + 2, ours.config.q_size, dtype=torch.bfloat16, device="cuda")
        probe = data.begin_lora(0, "o_proj", x, (ours.config.hidden_size,))
        assert isinstance(probe, DeltaLora) == concurrent  # the path under test is the one taken
        probe.finish(torch.empty(x.shape[0], ours.config.hidden_size, dtype=x.dtype, device="cuda"))
        got.append(runner.decode(tokens, pad_rows=2, adapter_data=data)[: len(tokens)].float().cpu())
    for b, (seq, idx) in enumerate(zip(runner.seqs, REQUESTS, strict=True)):
        ref = hf_logits(truth[idx], seq)[start[b] : start[b] + len(got)]
        err = _rel(torch.stack([x[b] for x in got]), ref)
        assert err <= RTOL, f"decode request {b} (adapter {idx}): relative error {err:.4f}"
