"""The fast adapter load on CUDA (marker gpu): stacks laid out before any adapter take loads without a
re-layout, and a CUDA graph captured over them before the loads serves the loaded adapters exactly; the
side-stream upload is ordered both ways against the forward: an upload into a slot waits for work queued
before it that reads the slot (an eviction), and a forward after it waits for the upload (per-layer events
in prefill, one wait in decode) while the side stream is held back on purpose, so a missing wait reads a
half-written slot and fails; a NaN adapter is refused after the device check; the engine started with
adapter_slots captures its LoRA graphs at Warmup and never again on LoadAdapter.

Run on the GPU machine: python -m pytest -m gpu tests/gpu/test_adapter_load_gpu.py -p no:cacheprovider
"""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench import common
from bench.adapter_load import model_config
from cache.adapter_shapes import SlotReservation
from cache.adapter_store import AdapterStore
from model.adapters.batch import AdapterBatchMetadata
from model.errors import InvalidArgument
from shard_server.types import AdapterSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPE = common.TINY  # hidden 64, q 64, k/v 32, intermediate 128, 2 layers
CONFIG = model_config(SHAPE)
GROUPS = (("qkv_proj", 64, (64, 32, 32)), ("o_proj", 64, (64,)), ("gate_up_proj", 64, (128, 128)),
          ("down_proj", 128, (64,)))  # fmt: skip
CALLS = [(layer, group, fan_in, widths) for layer in range(SHAPE.layers) for group, fan_in, widths in GROUPS]
HOLD_CYCLES = 200_000_000  # torch.cuda._sleep: ~0.1 s, far longer than a tiny adapter's upload


def _specs(tmp_path, n: int) -> dict[int, AdapterSpec]:
    kinds = [(16, common.LORA_TARGETS), (8, ("q_proj", "v_proj", "down_proj")), (4, common.LORA_TARGETS),
             (16, ("k_proj", "o_proj", "gate_proj", "up_proj"))]  # fmt: skip
    out = {}
    for i in range(1, n + 1):
        rank, targets = kinds[(i - 1) % len(kinds)]
        d = common.write_adapter(tmp_path / f"a{i}", SHAPE, rank, torch.device("cpu"), torch.bfloat16,
                                 seed=300 + i, std=0.1, targets=targets)  # fmt: skip
        out[i] = AdapterSpec(adapter_ids=(str(d),), source="local")
    return out


def _inputs(tokens: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, fan_in, generator=gen) for _, _, fan_in, _ in CALLS]


def _run(data, xs: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    """Every group call of every layer, as the model makes them (out += LoRA(x))."""
    for (layer, group, _, widths), x, out in zip(CALLS, xs, outs, strict=True):
        out.zero_()
        data.add_lora(layer, group, x, out, widths)


def _reference(cpu: AdapterStore, indices: list[int], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = [torch.zeros(x.shape[0], sum(w)) for x, (_, _, _, w) in zip(xs, CALLS, strict=True)]
    _run(cpu.batch_data(indices, [1] * len(indices), is_prefill=False), xs, outs)
    return outs


def _same(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for (layer, group, _, _), g, w in zip(CALLS, got, want, strict=True):
        err = ((g.float().cpu() - w).norm() / w.norm().clamp_min(1e-12)).item()
        assert err <= 5e-3, (what, layer, group, err)  # float32 stacks; Triton's dot runs in tf32


def _stores(specs, slots: int):
    cpu = AdapterStore(CONFIG, "cpu", torch.float32)
    for i, spec in specs.items():
        cpu.load(i, spec)
    gpu = AdapterStore(CONFIG, "cuda", torch.float32, reserve=SlotReservation(slots, rank=16))
    return cpu, gpu


def _hold_upload_stream(store: AdapterStore) -> None:
    """Hold back the side stream: whatever the store queues there next runs ~0.1 s later."""
    with torch.cuda.stream(store.layout._uploader.stream):
        torch.cuda._sleep(HOLD_CYCLES)


def test_a_graph_captured_before_the_loads_serves_them_without_relayout(tmp_path):
    specs = _specs(tmp_path, 4)
    cpu, gpu = _stores(specs, slots=4)
    version = gpu.layout_version
    meta = AdapterBatchMetadata.for_cuda_graph(4, "cuda")
    xs = [x.cuda() for x in _inputs(4, seed=1)]
    outs = [torch.zeros(4, sum(w), device="cuda") for _, _, _, w in CALLS]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (Triton compiles)
        _run(gpu.graph_batch_data(meta), xs, outs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run(gpu.graph_batch_data(meta), xs, outs)
    times = []
    for i, spec in specs.items():
        t0 = time.perf_counter()
        gpu.load(i, spec)
        times.append((time.perf_counter() - t0) * 1e3)
        assert gpu.layout._uploader.stream.query()  # landed when load returned
    assert gpu.layout_version == version  # no re-layout: the graph's pointers still hold
    for indices in ([1, 2, 3, 4], [4, 0, 2, 2], [3, 1, 0, 0]):
        slots = gpu.request_slots(indices)
        # pinned and non-blocking, as the runner copies them: a pageable copy would make the host wait
        # for the current stream, which now waits for the held upload
        meta.token_slots.copy_(torch.tensor(slots, dtype=torch.int32).pin_memory(), non_blocking=True)
        graph.replay()
        _same(outs, _reference(cpu, indices, [x.cpu() for x in xs]), f"graph {indices}")
    print(f"tiny LoadAdapter into reserved stacks, ms: {[round(t, 2) for t in times]}")


def test_an_upload_into_a_slot_waits_for_the_work_queued_before_it_that_reads_the_slot(tmp_path):
    specs = _specs(tmp_path, 3)
    cpu, gpu = _stores(specs, slots=2)
    for i in (1, 3, 2):  # 1 goes to host memory when 2 arrives: resident 3, 2; all three registered
        gpu.load(i, specs[i])
    xs = [x.cuda() for x in _inputs(2, seed=2)]
    outs_b = [torch.zeros(2, sum(w), device="cuda") for _, _, _, w in CALLS]
    torch.cuda.synchronize()
    torch.cuda._sleep(HOLD_CYCLES)  # the reads of adapter 2's slot below run ~0.1 s from now
    _run(gpu.batch_data([2, 2], [1, 1], is_prefill=False), xs, outs_b)
    gpu.batch_data([1], [1], is_prefill=False)  # 1 back into 3's slot and most recently used: 2 is next
    data_c = gpu.batch_data([3, 3], [1, 1], is_prefill=True)  # evicts 2; 3 goes into its slot
    assert 2 not in gpu.resident_indices()
    outs_c = [torch.zeros(2, sum(w), device="cuda") for _, _, _, w in CALLS]
    _run(data_c, xs, outs_c)
    torch.cuda.synchronize()
    host_xs = [x.cpu() for x in xs]
    _same(outs_b, _reference(cpu, [2, 2], host_xs), "reads queued before the upload see adapter 2")
    _same(outs_c, _reference(cpu, [3, 3], host_xs), "reads after it see adapter 3")


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_a_forward_waits_for_an_upload_held_back_on_the_side_stream(tmp_path, step):
    """Adapter 1 is evicted, then needed again while the side stream is held back: the forward of 1 and
    2 must wait for the upload (prefill per layer through the batch's events, decode through
    request_slots' wait), and adapter 2's rows, in their own slot, stay exact throughout."""
    specs = _specs(tmp_path, 3)
    cpu, gpu = _stores(specs, slots=2)
    for i in (1, 2, 3):  # 3 evicts 1 (least recently used)
        gpu.load(i, specs[i])
    assert gpu.resident_indices() == [2, 3]
    gpu.batch_data([3], [1], is_prefill=False)  # use 3, then 2: 3 is the one to go for 1
    gpu.batch_data([2], [1], is_prefill=False)
    indices = [1, 2, 0, 1]
    xs = [x.cuda() for x in _inputs(len(indices), seed=3)]
    outs = [torch.zeros(len(indices), sum(w), device="cuda") for _, _, _, w in CALLS]
    torch.cuda.synchronize()
    _hold_upload_stream(gpu)
    if step == "prefill":
        data = gpu.batch_data(indices, [1] * len(indices), is_prefill=True)  # uploads 1, behind the hold
    else:
        meta = AdapterBatchMetadata.for_cuda_graph(len(indices), "cuda")
        slots = gpu.request_slots(indices)  # uploads 1; the current stream waits for it
        # pinned and non-blocking, as the runner copies them: a pageable copy would make the host wait
        # for the current stream, which now waits for the held upload
        meta.token_slots.copy_(torch.tensor(slots, dtype=torch.int32).pin_memory(), non_blocking=True)
        data = gpu.graph_batch_data(meta)
    assert not gpu.layout._uploader.stream.query()  # still held back when the forward is queued
    _run(data, xs, outs)
    torch.cuda.synchronize()
    _same(outs, _reference(cpu, indices, [x.cpu() for x in xs]), step)


def test_nan_adapter_is_refused_after_the_device_check_and_its_slot_freed(tmp_path):
    specs = _specs(tmp_path, 1)
    bad = tmp_path / "nan"
    bad.mkdir()
    src = specs[1].adapter_ids[0]
    (bad / "adapter_config.json").write_text(open(f"{src}/adapter_config.json").read())
    tensors = load_file(f"{src}/adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][3, 2] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    cpu, gpu = _stores(specs, slots=2)
    with pytest.raises(InvalidArgument, match="non-finite values .* in layer 1 up_proj"):
        gpu.load(7, AdapterSpec(adapter_ids=(str(bad),), source="local"))
    assert not gpu.is_loaded(7) and gpu.resident_indices() == []
    assert all(not t.any() for s in gpu.layout._stacks.values() for t in (s.a, s.b))
    gpu.load(1, specs[1])
    xs = _inputs(2, seed=4)
    outs = [torch.zeros(2, sum(w), device="cuda") for _, _, _, w in CALLS]
    _run(gpu.batch_data([1, 0], [1, 1], is_prefill=False), [x.cuda() for x in xs], outs)
    _same(outs, _reference(cpu, [1, 0], xs), "after a refused load")


def test_engine_with_adapter_slots_captures_lora_graphs_at_warmup_only(tiny_model_factory, adapter_factory):
    from shard_server.config import ShardConfig
    from shard_server.engine.engine import ShardEngine
    from shard_server.types import BatchSpec, RequestSpec, SamplingParams, StoppingParams

    model_dir = tiny_model_factory(layers=2, hidden=128, heads=4, kv_heads=2, vocab=512)
    kinds = ((8, ("q_proj", "v_proj", "o_proj")), (16, ("gate_proj", "up_proj", "down_proj")))
    adapters = [adapter_factory(model_dir, rank=r, target_modules=t, seed=40 + r) for r, t in kinds]
    engine = ShardEngine(ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16",
                                     max_kv_cache_bytes=64 << 20, adapter_slots=4, adapter_slot_rank=16))

    def requests(n, indices, max_new):
        return tuple(RequestSpec(id=i, input_ids=tuple(1 + (7 * i + 3 * j) % 300 for j in range(5 + 3 * i)),
                                 adapter_index=indices[i % len(indices)], sampling=SamplingParams(),
                                 stopping=StoppingParams(max_new_tokens=max_new, ignore_eos_token=True))
                     for i in range(n))  # fmt: skip

    warm = BatchSpec(id=0, requests=requests(4, [0], 4))
    engine.warmup(warm, 128, max_prefill_tokens=512, max_new_tokens=32)
    graphs = engine.runner.graphs
    assert any(key[2] for key in graphs.graphs)  # LoRA graphs captured at Warmup, over the reserved stacks
    captured, version = graphs.captured, engine.adapters.layout_version
    for i, path in enumerate(adapters, start=1):
        engine.load_adapter(i, AdapterSpec(adapter_ids=(str(path),), source="local"))
    assert graphs.captured == captured and engine.adapters.layout_version == version
    engine.prefill(BatchSpec(id=1, requests=requests(5, [0, 1, 2], 12)))
    for _ in range(8):
        batch = engine.batches[1]
        slots = engine.adapters.request_slots(batch.adapter_indices)
        graph_logits = graphs.run(batch, slots)
        assert graph_logits is not None
        graph_logits = graph_logits.clone()
        eager = engine.runner.decode_eager(batch, slots)
        err = float((graph_logits.float() - eager.float()).norm() / eager.float().norm())
        assert err < 2e-2, err
        replayed = graphs.replayed
        engine.decode([1])
        assert graphs.replayed == replayed + 1 and graphs.captured == captured
    engine.clear_cache()
    assert engine.free_blocks() == engine.usable_blocks()
