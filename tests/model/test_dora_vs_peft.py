"""DoRA in mixed batches: base, plain LoRA and DoRA requests in one paged batch equal PEFT per request.

Float32 on the CPU within 1e-4. Two DoRA adapters (one with rsLoRA) cover column-parallel targets,
row-parallel ones (o_proj, down_proj) and lm_head; their magnitude vectors are far from PEFT's initial
||W|| so the scale matters per row. Ragged prefill (every position, and last tokens only through
lm_head_indices), then decode steps with CUDA-graph padding rows, and the same steps through a
graph-style static metadata whose slots are copied in place. Offload and reload of a DoRA adapter, and
an LRU eviction that brings it back from host memory, serve the same logits.
"""

from __future__ import annotations

import random

import pytest
import torch
from mistral_harness import PagedRunner, hf_logits, random_prompts

from cache.adapter_store import AdapterStore
from cache.kv_cache import KVCache
from model.adapters.batch import AdapterBatchMetadata
from model.errors import InvalidArgument, Unimplemented
from model.flash_mistral import FlashMistralForCausalLM
from shard_server.types import AdapterSpec

ATOL = 1e-4
VOCAB = 512
ADAPTERS = {  # index -> adapter_factory kwargs
    1: dict(rank=4, target_modules=("q_proj", "v_proj"), seed=61),  # plain LoRA
    2: dict(rank=6, target_modules=("q_proj", "k_proj", "o_proj", "down_proj", "lm_head"), use_dora=True,
            seed=62),
    3: dict(rank=8, target_modules=("v_proj", "gate_proj", "up_proj", "down_proj"), use_dora=True,
            use_rslora=True, seed=63),
}  # fmt: skip
REQUESTS = [2, 0, 1, 3, 2, 1, 0, 3]


def _spec(d) -> AdapterSpec:
    return AdapterSpec(adapter_ids=(str(d),), source="local")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_factory):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    def base():
        return MistralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    dirs = {i: adapter_factory(tiny_model_dir, **kw) for i, kw in ADAPTERS.items()}
    truth = {0: base(), **{i: PeftModel.from_pretrained(base(), d).eval() for i, d in dirs.items()}}
    ours = FlashMistralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return ours, truth, dirs


def _store(ours, dirs, **kw) -> AdapterStore:
    store = AdapterStore(ours.config, base_weights=ours.projection_weight, **kw)
    for i, d in dirs.items():
        store.load(i, _spec(d))
    return store


def _check(logits, seqs, truth, requests, what):
    for b, (seq, idx) in enumerate(zip(seqs, requests, strict=True)):
        torch.testing.assert_close(logits[b], hf_logits(truth[idx], seq)[-1], atol=ATOL, rtol=0,
                                   msg=f"{what}, request {b} (adapter {idx})")  # fmt: skip


def test_mixed_base_lora_dora_batch_equals_peft_prefill_and_decode(setup):
    ours, truth, dirs = setup
    store = _store(ours, dirs)
    dora_targets = set(ADAPTERS[2]["target_modules"] + ADAPTERS[3]["target_modules"]) - {"lm_head"}
    want = {(layer, t) for layer in (0, 1) for t in dora_targets} | {(-1, "lm_head")}
    assert set(store.layout.scales) == want
    runner = PagedRunner(ours, KVCache.for_model(ours, num_blocks=64), seed=3)
    prompts = random_prompts([6, 9, 4, 11, 3, 7, 5, 8], VOCAB, seed=31)
    data = store.batch_data(REQUESTS, [len(p) for p in prompts], is_prefill=True)
    logits, cu = runner.prefill(prompts, adapter_data=data)
    for b, (p, idx) in enumerate(zip(prompts, REQUESTS, strict=True)):
        ref = hf_logits(truth[idx], p)
        torch.testing.assert_close(logits[cu[b] : cu[b + 1]], ref, atol=ATOL, rtol=0, msg=f"prefill {b}")
    # DoRA is not LoRA with the magnitude ignored: the same batch without the scales misses by far.
    runner2 = PagedRunner(ours, KVCache.for_model(ours, num_blocks=64), seed=3)
    data.scales = {}
    plain, _ = runner2.prefill(prompts, adapter_data=data)
    for b, idx in enumerate(REQUESTS):
        err = (plain[cu[b] : cu[b + 1]] - logits[cu[b] : cu[b + 1]]).abs().max()
        assert err > 1e-2 if idx in (2, 3) else err == 0

    g = random.Random(4)
    meta = AdapterBatchMetadata.for_cuda_graph(len(REQUESTS) + 2, "cpu")  # a bucket with 2 padding rows
    graph_data = store.graph_batch_data(meta)
    for step in range(6):
        tokens = [g.randrange(3, VOCAB) for _ in runner.seqs]
        if step % 2:  # eager decode, with padding rows as the engine's buckets have them
            data = store.batch_data(REQUESTS + [0, 0], [1] * (len(tokens) + 2), is_prefill=False)
        else:  # the CUDA-graph path: static metadata, slots copied in place, same AdapterBatchData
            slots = store.request_slots(REQUESTS) + [-1, -1]
            meta.token_slots.copy_(torch.tensor(slots, dtype=torch.int32))
            data = graph_data
        logits = runner.decode(tokens, pad_rows=2, adapter_data=data)
        _check(logits, runner.seqs, truth, REQUESTS, f"decode step {step}")


def test_last_token_logits_offload_reload_and_eviction(setup):
    ours, truth, dirs = setup
    probe = _store(ours, {2: dirs[2], 3: dirs[3]})
    budget = probe.device_bytes()  # room for the two DoRA adapters, not for all three
    store = _store(ours, dirs, budget_bytes=budget)
    assert store.device_bytes() <= budget and len(store.resident_indices()) < 3
    runner = PagedRunner(ours, KVCache.for_model(ours, num_blocks=48), seed=5)
    for round_, batch in enumerate(([3, 0, 2], [1, 3, 0], [2, 1, 0], [2, 3, 3])):  # evictions both ways
        prompts = random_prompts([5, 8, 4], VOCAB, seed=40 + round_)
        rows = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
        data = store.batch_data(batch, [len(p) for p in prompts], is_prefill=True, lm_head_indices=rows)
        logits, _ = runner.prefill(prompts, last_only=True, adapter_data=data)
        assert store.device_bytes() <= budget
        _check(logits, prompts, truth, batch, f"round {round_}")
    store.offload(2)
    store.load(2, _spec(dirs[2]))
    prompts = random_prompts([7, 3], VOCAB, seed=50)
    data = store.batch_data([2, 3], [len(p) for p in prompts], is_prefill=True,
                            lm_head_indices=torch.tensor([6, 9]))  # fmt: skip
    logits, _ = runner.prefill(prompts, last_only=True, adapter_data=data)
    _check(logits, prompts, truth, [2, 3], "after reload")


def test_dora_refusals(setup, tmp_path):
    ours, _, dirs = setup
    with pytest.raises(Unimplemented, match="DoRA adapters need the base model's weights"):
        AdapterStore(ours.config).load(2, _spec(dirs[2]))
    store = AdapterStore(ours.config, base_weights=ours.projection_weight)
    merged = AdapterSpec(adapter_ids=(str(dirs[1]), str(dirs[2])), weights=(0.5, 0.5), source="local")
    with pytest.raises(Unimplemented, match="merging DoRA adapters is not supported"):
        store.load(4, merged)
    # A zero row of W and an adapter that adds nothing to it: ||W + s B A|| = 0 there -> m / 0, refused.
    w = ours.projection_weight(0, "k_proj")
    saved = w[3].clone()
    try:
        w[3].zero_()
        spec = _spec(_zero_b_row(dirs[2], tmp_path / "z", "model.layers.0.self_attn.k_proj", 3))
        with pytest.raises(InvalidArgument, match="DoRA scale of layer 0 k_proj is not finite"):
            store.load(5, spec)
        assert not store.is_loaded(5)
    finally:
        w[3].copy_(saved)


def test_dora_arrival_re_lays_out_and_graph_data_reads_the_scale_stacks(setup):
    """Captured CUDA graphs read the scale stacks: a DoRA adapter whose modules have none yet must
    re-lay out (bump layout_version, so LoRA graphs are recaptured), and graph data holds the new stacks."""
    ours, _, dirs = setup
    store = AdapterStore(ours.config, base_weights=ours.projection_weight)
    store.load(1, _spec(dirs[1]))  # plain LoRA: no scale stacks
    assert store.layout.scales == {}
    version = store.layout_version
    store.load(2, _spec(dirs[2]))
    assert store.layout_version > version and store.layout.scales
    meta = AdapterBatchMetadata.for_cuda_graph(4, "cpu")
    data = store.graph_batch_data(meta)
    assert data.scales is store.layout.scales
    slot = store.request_slots([2])[0]
    key = (0, "q_proj")
    torch.testing.assert_close(data.scales[key][slot], store._entries[2].host.scales[key])
    # Another adapter with the same DoRA modules fits the current stacks: no re-layout, same tensors.
    version, scales = store.layout_version, store.layout.scales
    store.offload(1)
    store.load(1, _spec(dirs[2]))
    assert store.layout_version == version and store.layout.scales is scales


def _zero_b_row(src, dst, module: str, row: int):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"base_model.model.{module}.lora_B.weight"][row] = 0
    save_file(tensors, path)
    return dst
