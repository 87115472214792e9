"""TIES, DARE_LINEAR and DARE_TIES merges equal PEFT's own `add_weighted_adapter` of the same adapters.

PEFT applies merge_utils' functions to the A and B factors (weights split as sqrt(|w s|) with the sign
on A); we compare every merged factor of every module, then the logits of the merged adapter served
from the AdapterStore against PEFT's model with the merged adapter active.

DARE draws its masks from torch's global generator in PEFT; `add_weighted_adapter` first injects the
new adapter (which draws its initial weights from that generator too), so the test seeds the global
generator with our `merge_seed` right after the injection: from there PEFT and we draw the same masks
in the same order, or the merged factors would differ almost everywhere.
"""

from __future__ import annotations

import json

import pytest
import torch
from mistral_harness import PagedRunner, hf_logits, random_prompts
from safetensors.torch import load_file, save_file

from cache.adapter_store import AdapterStore
from cache.kv_cache import KVCache
from model.adapters.merge import check_merge, merge_modules, merge_seed
from model.adapters.peft_loader import read_peft_adapter
from model.config import MistralConfig
from model.flash_mistral import FlashMistralForCausalLM
from shard_server.types import AdapterSpec

ADAPTERS = {  # name -> adapter_factory kwargs; equal ranks (PEFT's requirement), different targets
    "a1": dict(rank=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=51),
    "a2": dict(rank=4, target_modules=("q_proj", "o_proj", "down_proj", "lm_head"), use_rslora=True, seed=52),
    "a3": dict(rank=4, target_modules=("q_proj", "v_proj", "up_proj"), seed=53),
}
WEIGHTS = (0.8, -0.5, 0.3)  # a negative weight: its sign goes on A only
CASES = [  # (strategy, density, majority_sign_method)
    ("ties", 0.3, "total"), ("ties", 0.7, "frequency"), ("dare_linear", 0.5, "total"),
    ("dare_ties", 0.4, "total"), ("dare_ties", 0.6, "frequency"), ("dare_ties", 1.0, "frequency"),
]  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, adapter_factory):
    return {name: adapter_factory(tiny_model_dir, **kw) for name, kw in ADAPTERS.items()}


def _peft_merge(base_dir, adapter_dirs: dict, weights, strategy, density, method, seed, monkeypatch):
    """PEFT's merged adapter 'm' -> (peft model with 'm' active, {(layer, target): (A, B)})."""
    from peft import PeftModel
    from peft.tuners.lora.model import LoraModel
    from transformers import MistralForCausalLM

    base = MistralForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapter_dirs[n], adapter_name=n)
    inject = LoraModel.inject_adapter

    def inject_then_seed(self, *args, **kwargs):
        out = inject(self, *args, **kwargs)
        torch.manual_seed(seed)  # masks from here on: the same stream as our generator
        return out

    monkeypatch.setattr(LoraModel, "inject_adapter", inject_then_seed)
    model.add_weighted_adapter(names, list(weights), "m", combination_type=strategy, density=density,
                               majority_sign_method=method)  # fmt: skip
    monkeypatch.setattr(LoraModel, "inject_adapter", inject)
    model.set_adapter("m")
    factors = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "m" in mod.lora_A:
            target = name.split(".")[-1]
            layer = -1 if target == "lm_head" else int(name.split("layers.")[1].split(".")[0])
            factors[(layer, target)] = (mod.lora_A["m"].weight.detach(), mod.lora_B["m"].weight.detach())
    return model.eval(), factors


def _ours(base_dir, adapter_dirs: dict, weights, strategy, density, method):
    config = MistralConfig.from_pretrained(base_dir)
    files = [read_peft_adapter(d, config) for d in adapter_dirs.values()]
    params = check_merge(len(files), weights, strategy, density, method)
    seed = merge_seed([str(d) for d in adapter_dirs.values()], params)
    return merge_modules([f.modules for f in files], params, seed), seed


@pytest.mark.parametrize("strategy,density,method", CASES, ids=[f"{s}-{d}-{m}" for s, d, m in CASES])
def test_merged_factors_equal_peft(tiny_model_dir, dirs, strategy, density, method, monkeypatch):
    ours, seed = _ours(tiny_model_dir, dirs, WEIGHTS, strategy, density, method)
    _, peft = _peft_merge(tiny_model_dir, dirs, WEIGHTS, strategy, density, method, seed, monkeypatch)
    assert set(ours) == set(peft)  # the union of the targets
    for key, (a, b) in peft.items():
        torch.testing.assert_close(ours[key].a, a, atol=1e-6, rtol=0, msg=f"A of {key}")
        torch.testing.assert_close(ours[key].b, b, atol=1e-6, rtol=0, msg=f"B of {key}")
        assert ours[key].scale == 1.0
    if density < 1:  # pruning really happened: some entries of the merged factors are exactly zero
        assert any((m.a == 0).any() for m in ours.values())


def test_dare_depends_on_the_seed_only(tiny_model_dir, dirs):
    """Same request -> bit-identical weights (every rank, every reload); a different weight -> new masks."""
    one, seed1 = _ours(tiny_model_dir, dirs, WEIGHTS, "dare_ties", 0.5, "total")
    two, seed2 = _ours(tiny_model_dir, dirs, WEIGHTS, "dare_ties", 0.5, "total")
    assert seed1 == seed2 and all(torch.equal(one[k].a, two[k].a) for k in one)
    _, seed3 = _ours(tiny_model_dir, dirs, (0.8, -0.5, 0.31), "dare_ties", 0.5, "total")
    assert seed3 != seed1


def _padded_copy(src, dst, rank: int):
    """The same adapter saved at a larger rank: zero rows of A, zero columns of B, alpha keeping s."""
    cfg = json.loads((src / "adapter_config.json").read_text())
    r = cfg["r"]
    grow = (rank / r) ** 0.5 if cfg.get("use_rslora") else rank / r
    cfg.update(r=rank, lora_alpha=cfg["lora_alpha"] * grow)
    tensors = {}
    for k, t in load_file(src / "adapter_model.safetensors").items():
        if k.endswith("lora_A.weight"):
            t = torch.cat([t, t.new_zeros(rank - r, t.shape[1])], dim=0)
        elif k.endswith("lora_B.weight"):
            t = torch.cat([t, t.new_zeros(t.shape[0], rank - r)], dim=1)
        tensors[k] = t.contiguous()
    dst.mkdir()
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("strategy", ["ties", "dare_linear", "dare_ties"])
def test_different_ranks_merge_as_peft_does_the_zero_padded_adapters(
    tiny_model_dir, dirs, adapter_factory, strategy, tmp_path, monkeypatch
):
    wide = adapter_factory(tiny_model_dir, rank=8, target_modules=("k_proj", "q_proj", "gate_proj"), seed=54)
    mixed = {"a1": dirs["a1"], "a2": dirs["a2"], "w": wide}  # ranks 4, 4, 8
    ours, seed = _ours(tiny_model_dir, mixed, (0.6, 0.9, -0.4), strategy, 0.5, "frequency")
    padded = {"a1": _padded_copy(dirs["a1"], tmp_path / "a1", 8),
              "a2": _padded_copy(dirs["a2"], tmp_path / "a2", 8), "w": wide}  # fmt: skip
    _, peft = _peft_merge(tiny_model_dir, padded, (0.6, 0.9, -0.4), strategy, 0.5, "frequency", seed,
                          monkeypatch)  # fmt: skip
    assert set(ours) == set(peft) and all(m.a.shape[0] == 8 for m in ours.values())
    for key, (a, b) in peft.items():
        torch.testing.assert_close(ours[key].b @ ours[key].a, b @ a, atol=1e-6, rtol=0, msg=f"{key}")


def test_merged_adapter_served_from_the_store_equals_peft_logits(tiny_model_dir, dirs, monkeypatch):
    strategy, density, method = "dare_ties", 0.6, "total"
    _, seed = _ours(tiny_model_dir, dirs, WEIGHTS, strategy, density, method)
    peft_model, _ = _peft_merge(tiny_model_dir, dirs, WEIGHTS, strategy, density, method, seed, monkeypatch)
    ours = FlashMistralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    store = AdapterStore(ours.config)
    spec = AdapterSpec(adapter_ids=tuple(str(d) for d in dirs.values()), weights=WEIGHTS,
                       merge_strategy=strategy, density=density, majority_sign_method=method,
                       source="local")  # fmt: skip
    store.load(1, spec)
    prompts = random_prompts([6, 9, 4], 512, seed=8)
    runner = PagedRunner(ours, KVCache.for_model(ours, num_blocks=16), seed=1)
    data = store.batch_data([1, 0, 1], [len(p) for p in prompts], is_prefill=True)
    logits, cu = runner.prefill(prompts, adapter_data=data)
    with peft_model.disable_adapter():
        base = [hf_logits(peft_model, p) for p in prompts]
    for b, (p, idx) in enumerate(zip(prompts, [1, 0, 1], strict=True)):
        want = hf_logits(peft_model, p) if idx else base[b]
        torch.testing.assert_close(logits[cu[b] : cu[b + 1]], want, atol=1e-4, rtol=0)
        if idx:
            assert (want - base[b]).abs().max() > 1e-2  # the merged adapter changes the output
