"""The engine-level refusals on a GPU (marker gpu): Embed applies the request's adapter through the Triton
SGMV path; a failed Warmup restores the cache (and the graphs still replay afterwards); a Decode whose
caller is gone changes nothing, with CUDA graphs and the decode overlap on; a NaN adapter is refused.
Run: python -m pytest -m gpu tests/gpu/test_hardening_gpu.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import errors
from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, StoppingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def _req(rid: int, adapter: int = 0, n: int = 12, new: int = 8) -> RequestSpec:
    ids = tuple(3 + (5 * rid + 7 * j) % 400 for j in range(n))
    return RequestSpec(id=rid, input_ids=ids, adapter_index=adapter,
                       stopping=StoppingParams(max_new_tokens=new, ignore_eos_token=True))  # fmt: skip


@pytest.fixture(scope="module")
def setup(tiny_model_factory, adapter_factory):
    model_dir = tiny_model_factory(layers=2, hidden=128, heads=4, kv_heads=2, vocab=512)
    full = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter = adapter_factory(model_dir, rank=8, target_modules=full, seed=31)
    engine = ShardEngine(ShardConfig(model_dir=model_dir, device="cuda", dtype="bfloat16",
                                     max_kv_cache_bytes=64 << 20, overlap=True))  # fmt: skip
    engine.load_adapter(1, AdapterSpec(adapter_ids=(str(adapter),), source="local"))
    warm = BatchSpec(id=0, requests=tuple(_req(i, n=32, new=4) for i in range(4)))
    assert engine.warmup(warm, 64, 256, 32) > 0
    return engine, adapter


def test_embed_applies_the_adapter_on_cuda(setup):
    engine, _ = setup
    rows = engine.embed(BatchSpec(id=1, requests=(_req(1), _req(2, adapter=1))))
    base, adapted = (torch.tensor(v) for _, v in rows)
    assert torch.isfinite(base).all() and torch.isfinite(adapted).all()
    assert not torch.allclose(base, adapted)
    with pytest.raises(errors.NotFound):
        engine.embed(BatchSpec(id=1, requests=(_req(3, adapter=5),)))


def test_failed_warmup_restores_the_cache_and_graphs_still_replay(setup):
    engine, _ = setup
    blocks = engine.runner.kv_cache.num_blocks
    with pytest.raises(errors.ShardError):
        engine.warmup(BatchSpec(id=0, requests=(_req(0, adapter=7),)), 64, 256, 32)
    assert engine.runner.kv_cache.num_blocks == blocks
    out = engine.prefill(BatchSpec(id=2, requests=(_req(1), _req(2, adapter=1))))
    while out.batch is not None:
        out = engine.decode([2])
    assert engine.free_blocks() == engine.usable_blocks()


def test_decode_for_a_caller_that_is_gone_changes_nothing_on_cuda(setup):
    engine, _ = setup
    reqs = (_req(1, new=10), _req(2, adapter=1, new=10))

    def run(cancel_at: int | None) -> list[int]:
        out = engine.prefill(BatchSpec(id=3, requests=reqs))
        tokens = [g.next_tokens.ids[0] for g in out.generations]
        step = 0
        while out.batch is not None:
            if step == cancel_at:
                with pytest.raises(errors.Cancelled):
                    engine.decode([3], still_wanted=lambda: False)
            out = engine.decode([3])
            tokens += [g.next_tokens.ids[0] for g in out.generations]
            step += 1
        return tokens

    assert run(cancel_at=3) == run(cancel_at=None)
    assert engine.free_blocks() == engine.usable_blocks()


def test_nan_adapter_is_refused_on_cuda(setup, tmp_path):
    engine, adapter = setup
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    spec = AdapterSpec(adapter_ids=(str(bad),), source="local")
    with pytest.raises(errors.InvalidArgument, match="non-finite"):
        engine.load_adapter(2, spec, engine.prepare_adapter(spec))
    assert not engine.adapters.is_loaded(2)
