"""FP8 (e4m3) KV cache: capacity under the same byte budget, scales from the checkpoint or calibrated
at Warmup, and accuracy against the full-precision cache on the tiny model.

Accuracy (64 requests x 16 greedy tokens on a tiny model with weights at std ACCURACY_INIT_STD):
- teacher-forced (same history for both caches) greedy tokens equal on >= 95% of positions (97.3%);
  free-running ones on >= FREE_RUNNING_MIN (85.2%: after one flip a sequence continues differently);
- decode logits, teacher-forced: relative L2 error ||fp8 - fp32|| / ||fp32|| per step below
  LOGITS_REL_ERR_MAX, and on average below LOGITS_REL_ERR_MEAN.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from mistral_harness import PagedRunner
from safetensors.torch import load_file, save_file

from cache.fp8 import FP8_E4M3_MAX, KVScales, read_kv_scales
from cache.kv_cache import KVCache
from model.weights import Weights
from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.server.convert import batch_from_pb
from shard_server.testing.wire import warmup_request
from shard_server.types import BatchSpec, RequestSpec, StoppingParams

LOGITS_REL_ERR_MAX = 0.06  # measured 0.048
LOGITS_REL_ERR_MEAN = 0.03  # measured 0.017
FREE_RUNNING_MIN = 0.8  # measured 85.2%: one flipped token changes the rest of that sequence
# The kit's default tiny model (init_std 0.15) is chaotic: even a bfloat16 cache flips 0.7% of its
# teacher-forced greedy choices, fp8 15%. Weights at std 0.05 put it closer to a trained model's
# sensitivity (fp8 logits error 1.7%, as reported for real models), where the 95% claim is testable.
ACCURACY_INIT_STD = 0.05
KV_BYTES = 4 << 20


def warmed(model_dir, kv: str) -> tuple[ShardEngine, int]:
    engine = ShardEngine(ShardConfig(model_dir=model_dir, kv_cache_dtype=kv, max_kv_cache_bytes=KV_BYTES))
    w = warmup_request(48, 96, 96)
    tokens = engine.warmup(batch_from_pb(w.batch, "Warmup"), 48, 96, 48)
    return engine, tokens


def greedy(engine: ShardEngine, prompts: list[list[int]], max_new: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    reqs = tuple(
        RequestSpec(
            id=i, input_ids=tuple(p), stopping=StoppingParams(max_new_tokens=max_new, ignore_eos_token=True)
        )
        for i, p in enumerate(prompts)
    )
    result = engine.prefill(BatchSpec(id=1, requests=reqs))
    while True:
        for g in result.generations:
            out.setdefault(g.request_id, []).extend(g.next_tokens.ids)
        if result.batch is None:
            break
        result = engine.decode([1])
    return out


def test_capacity_grows_with_the_element_size_ratio(tiny_model_dir):
    full, full_tokens = warmed(tiny_model_dir, "auto")
    fp8, fp8_tokens = warmed(tiny_model_dir, "fp8_e4m3")
    ratio = full.kv_dtype.itemsize / fp8.kv_dtype.itemsize  # float32 on CPU: 4
    assert ratio == 4
    assert fp8_tokens >= 0.95 * ratio * full_tokens
    assert fp8.runner.kv_cache.dtype == torch.float8_e4m3fn
    bytes_per_token = fp8.runner.kv_cache.bytes_per_token()
    assert fp8.runner.kv_cache.num_blocks * fp8.model.block_size * bytes_per_token <= KV_BYTES


@pytest.mark.slow
def test_greedy_tokens_and_logits_close_to_full_precision(tiny_model_factory):
    model_dir = tiny_model_factory(init_std=ACCURACY_INIT_STD)
    full, _ = warmed(model_dir, "auto")
    fp8, _ = warmed(model_dir, "fp8_e4m3")
    scales = fp8.kv_scales.scales
    assert scales.source == "calibrated" and all(0 < s < 1 for s in scales.k + scales.v)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(6, 40))] for _ in range(64)]
    a, b = greedy(full, prompts, 16), greedy(fp8, prompts, 16)
    free = sum(x == y for i in a for x, y in zip(a[i], b[i], strict=True)) / (16 * len(prompts))

    # Teacher-forced on the full-precision tokens: per position, does the fp8 cache pick the same
    # greedy token after the same history, and how far are its logits (the cache's error alone)?
    model = full.model
    ref = PagedRunner(model, KVCache.for_model(model, 260, torch.float32))
    cache8 = KVCache.for_model(model, 260, torch.float8_e4m3fn)
    scales.apply(cache8)
    q8 = PagedRunner(model, cache8)
    ref.prefill(prompts)
    q8.prefill(prompts)
    same, errs = 0, []
    for k in range(15):  # one batched decode step per position, every request at once
        toks = [a[i][k] for i in range(len(prompts))]
        la, lb = ref.decode(toks), q8.decode(toks)  # [64, V]
        nxt = torch.tensor([a[i][k + 1] for i in range(len(prompts))])
        # The engine's tokens, reproduced: each is the maximum here too, up to the float rounding that
        # separates the engine's batch from this runner's (a near-tie may pick either).
        assert (la.max(-1).values - la.gather(1, nxt[:, None])[:, 0]).max() <= 1e-5
        same += int((lb.argmax(-1) == nxt).sum())
        errs += ((lb - la).norm(dim=-1) / la.norm(dim=-1)).tolist()
    forced = (same + len(prompts)) / (16 * len(prompts))  # first tokens: prefill reads no cache
    print(f"fp8 vs fp32 cache: free-running {free:.1%}, teacher-forced {forced:.1%} equal tokens; "
          f"logits rel err mean {sum(errs) / len(errs):.4f} max {max(errs):.4f}")
    assert forced >= 0.95, f"fp8 greedy tokens equal on {forced:.1%} of positions"
    assert free >= FREE_RUNNING_MIN, f"free-running fp8 tokens equal on {free:.1%} of positions"
    assert 0 < max(errs) < LOGITS_REL_ERR_MAX, f"worst decode-logits relative error {max(errs):.4f}"
    assert sum(errs) / len(errs) < LOGITS_REL_ERR_MEAN


def test_scales_from_the_checkpoint_are_used_and_kept(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "with-scales"
    shutil.copytree(tiny_model_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    k, v = (0.011, 0.023), (0.017, 0.029)
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k[i])
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([v[i]])
    save_file(tensors, model_dir / "model.safetensors")
    engine, _ = warmed(model_dir, "fp8_e4m3")  # Warmup must not recalibrate them
    got = engine.kv_scales.scales
    assert got.source == "checkpoint"
    assert got.k == pytest.approx(k) and got.v == pytest.approx(v)
    for i, layer in enumerate(engine.runner.kv_cache.layers):
        assert float(layer.k_scale) == pytest.approx(k[i]) and float(layer.v_scale) == pytest.approx(v[i])
    del tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.self_attn.v_scale"):
        read_kv_scales(Weights.from_dir(model_dir), 2)


def test_calibrated_scale_formula():
    s = KVScales.from_amax([448.0, 0.0], [2.0, 1.0], margin=2.0)
    assert s.k == (2.0, 1.0) and s.v == (2.0 * 2.0 / FP8_E4M3_MAX, 2.0 / FP8_E4M3_MAX)
