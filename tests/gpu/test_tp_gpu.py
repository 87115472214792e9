"""Tensor parallelism on 2 GPUs over NCCL, bf16: world size 2 equals world size 1 (relative error <= 2e-2).

The tiny model (head_dim 64, so the Triton paged decode runs) with a mixed batch of the base model and
three PEFT adapters (ranks 3 and 5: column and row-parallel targets, MLP, lm_head; and a DoRA adapter
on every projection and lm_head, whose row-parallel and lm_head norms are all-reduced over NCCL) served by
the Triton LoRA and DoRA ops; ragged prefill then decode steps. Shapes: KV heads split (8/2) and
replicated (8/1). World size 1 runs in this process on cuda:0; the two ranks are spawned (CUDA cannot
be used in a forked child) and rendezvous through `bootstrap.init_tensor_parallel` (NCCL,
tcp://127.0.0.1:<free port>), as `launch` does.
A second test captures a world-2 decode step in a CUDA graph (NCCL all-reduces inside) and checks the
replay equals the eager step: bench/tp.py times exactly such replays.

Run on a machine with 2 GPUs: `python -m pytest -m gpu tests/gpu/test_tp_gpu.py -p no:cacheprovider -v`.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from mistral_harness import PagedRunner, random_prompts  # noqa: E402

from cache.kv_cache import KVCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

RTOL = 2e-2
INIT_STD = 0.02  # as test_model_gpu.py: bf16 noise stays near 1% while a wrong shard moves logits far more
VOCAB = 512
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    1: dict(rank=3, target_modules=ALL, seed=51),
    2: dict(rank=5, target_modules=("k_proj", "o_proj", "up_proj", "down_proj", "lm_head"), seed=52),
    3: dict(rank=4, target_modules=ALL + ("lm_head",), use_dora=True, seed=53),
}
REQUEST_ADAPTERS = [1, 0, 2, 3]
PROMPTS = random_prompts([13, 5, 22, 8], VOCAB, seed=2)
DECODE = [[30 + i, 60 + i, 90 + i, 120 + i] for i in range(6)]
SHAPES = {
    "kv-split": dict(heads=8, kv_heads=2, head_dim=64, init_std=INIT_STD),
    "kv-replicated": dict(heads=8, kv_heads=1, head_dim=64, init_std=INIT_STD),
}


def _spec(d):
    from shard_server.types import AdapterSpec

    return AdapterSpec(adapter_ids=(str(d),), source="local")


def _model_and_store(tp, model_dir: str, adapter_dirs: dict[int, str]):
    from cache.adapter_store import AdapterStore
    from model.flash_mistral import FlashMistralForCausalLM

    dev = torch.device("cuda", torch.cuda.current_device())
    model = FlashMistralForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device=dev, tp=tp)
    store = AdapterStore(model.config, device=dev, dtype=torch.bfloat16, tp=tp,
                         base_weights=model.projection_weight)  # fmt: skip
    for i, d in adapter_dirs.items():
        store.load(i, _spec(d))
    return model, store


def _generate(tp, model_dir: str, adapter_dirs: dict[int, str]) -> dict:
    """{"base"|"lora": [prefill logits, decode step logits...]} as float32 CPU tensors."""
    model, store = _model_and_store(tp, model_dir, adapter_dirs)
    out = {}
    for key in ("base", "lora"):
        runner = PagedRunner(model, KVCache.for_model(model, 48 if model.block_size < 256 else 12), seed=3)
        lens = [len(p) for p in PROMPTS]
        data = store.batch_data(REQUEST_ADAPTERS, lens, is_prefill=True) if key == "lora" else None
        logits, _ = runner.prefill(PROMPTS, adapter_data=data)
        got = [logits.float().cpu()]
        for tokens in DECODE:
            data = store.batch_data(REQUEST_ADAPTERS, [1] * len(tokens), False) if key == "lora" else None
            got.append(runner.decode(tokens, adapter_data=data).float().cpu())
        out[key] = got
    return out


def _graph_replay(tp, model_dir: str, adapter_dirs: dict[int, str]) -> dict:
    """One decode step eager, then captured and replayed on the same inputs (it rewrites the same K/V)."""
    model, store = _model_and_store(tp, model_dir, adapter_dirs)
    runner = PagedRunner(model, KVCache.for_model(model, 48 if model.block_size < 256 else 12), seed=4)
    data = store.batch_data(REQUEST_ADAPTERS, [len(p) for p in PROMPTS], is_prefill=True)
    runner.prefill(PROMPTS, adapter_data=data)
    data = store.batch_data(REQUEST_ADAPTERS, [1] * len(PROMPTS), False)
    step = runner.decode_batch(DECODE[0], adapter_data=data)
    eager = step.run(model, runner.kv_cache).float().cpu()
    stream = torch.cuda.Stream()  # warm-up off the capture stream, as test_model_gpu.py does
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step.run(model, runner.kv_cache)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = step.run(model, runner.kv_cache)
    static_logits.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return {"eager": eager, "replay": static_logits.float().cpu()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, target, args: tuple) -> None:
    os.environ.update(NCCL_ENV)
    try:
        import torch.distributed as dist

        from shard_server.config import ShardConfig
        from shard_server.engine.bootstrap import init_tensor_parallel

        config = ShardConfig(
            model_dir=Path(out_dir),
            device="cuda",
            dtype="bfloat16",
            rank=rank,
            world_size=world,
            master_port=port,
        )
        tp = init_tensor_parallel(config, torch.device("cuda"))  # sets this rank's device
        try:
            result = target(tp, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _run_world_2(target, *args, timeout: float = 240.0) -> list:
    import torch.multiprocessing as mp

    os.environ.update(NCCL_ENV)
    with tempfile.TemporaryDirectory(prefix="tp-gpu-") as tmp:
        ctx = mp.start_processes(
            _rank_main, args=(2, _free_port(), tmp, target, args), nprocs=2, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout:.0f} s")
        except BaseException as e:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(10)
            errs = "\n".join(f"--- {f.stem}\n{f.read_text()}" for f in sorted(Path(tmp).glob("rank*.err")))
            pytest.fail(f"world size 2 failed: {e}\n{errs}")
        return [torch.load(Path(tmp, f"rank{r}.pt")) for r in range(2)]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst row of ||got - ref|| / ||ref||."""
    return float(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


@pytest.fixture(scope="module")
def dirs(tiny_model_factory, adapter_factory):
    def get(name):
        base = tiny_model_factory(**SHAPES[name])
        return str(base), {i: str(adapter_factory(base, **kw)) for i, kw in ADAPTERS.items()}

    return get


@pytest.mark.parametrize("shape", SHAPES)
def test_world_size_2_equals_world_size_1_bf16_with_adapters(dirs, shape):
    from model.parallel import TPGroup

    model_dir, adapter_dirs = dirs(shape)
    torch.cuda.set_device(0)
    truth = _generate(TPGroup(), model_dir, adapter_dirs)
    torch.cuda.empty_cache()
    per_rank = _run_world_2(_generate, model_dir, adapter_dirs)
    # The adapters move the logits by much more than the tolerance: equality is not vacuous.
    assert rel_err(truth["lora"][0], truth["base"][0]) > 5 * RTOL
    worst = 0.0
    for r, got in enumerate(per_rank):
        for key in ("base", "lora"):
            for i, (g, t) in enumerate(zip(got[key], truth[key], strict=True)):
                err = rel_err(g, t)
                worst = max(worst, err)
                assert err <= RTOL, f"{shape} rank {r} {key} step {i}: relative error {err:.4f}"
    for key in ("base", "lora"):  # identical batch state: every rank computes the very same logits
        assert all(torch.equal(a, b) for a, b in zip(per_rank[0][key], per_rank[1][key], strict=True))
    card = torch.cuda.get_device_name()
    print(f"\n[tp gpu] {shape}: worst relative error world 2 vs 1 = {worst:.4f} ({card})")


def test_world_size_2_decode_step_replays_in_a_cuda_graph(dirs):
    model_dir, adapter_dirs = dirs("kv-split")
    for r, got in enumerate(_run_world_2(_graph_replay, model_dir, adapter_dirs)):
        assert got["replay"].abs().max() > 0, f"rank {r}: the replay wrote nothing"
        assert rel_err(got["replay"], got["eager"]) <= 1e-3, f"rank {r}: replay differs from the eager step"
