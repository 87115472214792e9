"""DoRA on a GPU, bf16: the Triton scale kernel, the Triton LoRA + DoRA path against PEFT, CUDA graphs.

- model/kernels/dora.scale_rows equals the torch reference bit for bit (one float32 product, one
  rounding), strided outputs included, and replays inside a CUDA graph with slots changed in place.
- A mixed batch (base, plain LoRA, two DoRA adapters on column- and row-parallel targets and lm_head)
  through FlashMistralForCausalLM in bf16 with the adapter store on the GPU (Triton SGMV/BGMV and the
  DoRA kernel) equals PEFT's DoRA model in float32 on the same card per request within the bf16
  tolerance of tests/gpu/test_model_gpu.py (relative error per row <= 2e-2), prefill and decode.
- The engine's CUDA-graph decode with DoRA adapters resident equals its eager decode each step.

Run on the GPU machine: `make test-gpu` or `python -m pytest -m gpu tests/gpu/test_dora_gpu.py -v`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from mistral_harness import assert_batch_matches_peft, max_row_rel_err, peft_truth  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RTOL = 2e-2
VOCAB = 512
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # index -> adapter_factory kwargs
    1: dict(rank=8, target_modules=("q_proj", "v_proj", "o_proj"), seed=81),
    2: dict(rank=8, target_modules=ALL + ("lm_head",), use_dora=True, seed=82),
    3: dict(rank=16, target_modules=("k_proj", "gate_proj", "down_proj"), use_dora=True, use_rslora=True,
            seed=83),
}  # fmt: skip
REQUESTS = [2, 0, 1, 3, 2, 3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,out", [(1, 64), (37, 1000), (300, 14336)])
def test_scale_rows_kernel_equals_reference(dtype, T, out):
    from model.kernels.dora import scale_rows, scale_rows_ref

    gen = torch.Generator(device="cuda").manual_seed(T + out)
    scales = 0.5 + torch.rand(5, out, generator=gen, device="cuda")
    idx = torch.randint(-1, 5, (T,), generator=gen, device="cuda", dtype=torch.int32)
    y0 = torch.randn(T, out + 24, generator=gen, device="cuda").to(dtype)[:, 8:-16]  # strided view
    y, y_ref = y0.clone(), y0.clone()
    scale_rows(y, scales, idx)
    scale_rows_ref(y_ref, scales, idx)
    assert torch.equal(y, y_ref)
    assert torch.equal(y[idx < 0], y0[idx < 0])


def test_scale_rows_kernel_in_a_cuda_graph_with_slots_changed_in_place():
    from model.kernels.dora import scale_rows, scale_rows_ref

    gen = torch.Generator(device="cuda").manual_seed(3)
    scales = 0.5 + torch.rand(4, 4096, generator=gen, device="cuda")
    idx = torch.full((8,), -1, dtype=torch.int32, device="cuda")
    y = torch.zeros(8, 4096, dtype=torch.bfloat16, device="cuda")
    scale_rows(y, scales, idx)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scale_rows(y, scales, idx)
    for slots in ([0, 1, 2, 3, -1, -1, 0, 1], [3, 3, -1, 2, 1, 0, -1, -1]):
        x = torch.randn(8, 4096, generator=gen, device="cuda").to(torch.bfloat16)
        idx.copy_(torch.tensor(slots, dtype=torch.int32))
        y.copy_(x)
        graph.replay()
        want = x.clone()
        scale_rows_ref(want, scales, idx)
        assert torch.equal(y, want)


@pytest.fixture(scope="module")
def setup(tiny_model_factory, adapter_factory):
    from cache.adapter_store import AdapterStore
    from model.flash_mistral import FlashMistralForCausalLM
    from shard_server.types import AdapterSpec

    model_dir = tiny_model_factory(heads=4, kv_heads=2, head_dim=64, init_std=0.02)
    dirs = {i: adapter_factory(model_dir, init_std=0.02, **kw) for i, kw in ADAPTERS.items()}
    truth = peft_truth(model_dir, dirs, device="cuda")
    ours = FlashMistralForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
    store = AdapterStore(
        ours.config, device="cuda", dtype=torch.bfloat16, base_weights=ours.projection_weight
    )
    for i, d in dirs.items():
        store.load(i, AdapterSpec(adapter_ids=(str(d),), source="local"))
    return model_dir, dirs, ours, store, truth


def test_mixed_lora_dora_batch_bf16_triton_equals_peft_fp32(setup):
    from model.adapters.batch import dora_scale_op_for, lora_ops_for

    _, _, ours, store, truth = setup
    assert dora_scale_op_for(torch.device("cuda")).__module__ == "model.kernels.dora"
    assert lora_ops_for(torch.device("cuda")).name == "triton"
    assert len(store.layout.scales) > 0
    assert_batch_matches_peft(ours, store, truth, REQUESTS, [13, 5, 22, 1, 9, 17], VOCAB, RTOL, seed=3,
                              blocks=48)  # fmt: skip


def test_engine_graph_decode_equals_eager_with_dora_adapters(setup):
    """Graphs are captured at Warmup (no adapters yet); loading DoRA adapters re-lays out the stacks and
    LoadAdapter recaptures the LoRA graphs over the scale stacks; every decode step then replays a graph
    (none captured inside Decode) whose logits equal the eager step's."""
    from shard_server.config import ShardConfig
    from shard_server.engine.engine import ShardEngine
    from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, SamplingParams, StoppingParams

    model_dir, dirs, *_ = setup

    def requests(n, max_new):
        return tuple(
            RequestSpec(id=i, input_ids=tuple(1 + (7 * i + 3 * j) % 300 for j in range(5 + 3 * i)),
                        adapter_index=[0, 1, 2, 3][i % 4], sampling=SamplingParams(),
                        stopping=StoppingParams(max_new_tokens=max_new, ignore_eos_token=True))
            for i in range(n)
        )  # fmt: skip

    engine = ShardEngine(
        ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16", max_kv_cache_bytes=64 << 20)
    )
    warm = BatchSpec(id=0, requests=tuple(r for r in requests(4, 4) if r.adapter_index == 0))
    assert engine.warmup(warm, 128, max_prefill_tokens=512, max_new_tokens=32) > 0
    graphs = engine.runner.graphs
    assert graphs is not None
    version, captured = engine.adapters.layout_version, graphs.captured
    for i, d in dirs.items():
        engine.load_adapter(i, AdapterSpec(adapter_ids=(str(d),), source="local"))
    assert engine.adapters.layout_version > version and engine.adapters.layout.scales
    assert graphs.captured > captured  # the LoRA graphs were recaptured inside LoadAdapter
    engine.prefill(BatchSpec(id=1, requests=requests(7, 16)))
    for _ in range(8):
        batch = engine.batches[1]
        slots = engine.adapters.request_slots(batch.adapter_indices)
        graph_logits = graphs.run(batch, slots)
        assert graph_logits is not None, "no LoRA graph for this step after LoadAdapter"
        graph_logits = graph_logits.clone()
        eager_logits = engine.runner.decode_eager(batch, slots)
        assert torch.isfinite(graph_logits).all()
        assert max_row_rel_err(graph_logits, eager_logits.float().cpu()) < RTOL
        captured, replayed = graphs.captured, graphs.replayed
        engine.decode([1])
        assert graphs.captured == captured and graphs.replayed == replayed + 1
    engine.clear_cache()
    assert engine.free_blocks() == engine.usable_blocks()
