"""model/weights.py: single file and index shards, fused names, dtype, tied embeddings, named errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from mistral_harness import PagedRunner, hf_logits, random_prompts
from safetensors.torch import load_file, save_file

from cache.kv_cache import KVCache
from model.config import MistralConfig
from model.flash_mistral import FlashMistralForCausalLM
from model.weights import Weights, WeightsError


def _copy_with(src, dst, edit):
    """A copy of checkpoint `src` whose tensors went through `edit(dict)`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    d = _copy_with(tiny_model_dir, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(WeightsError) as err:
        FlashMistralForCausalLM.from_pretrained(d)
    assert f"missing tensor '{name}'" in str(err.value)


def test_misshaped_tensor_is_named(tiny_model_dir, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"

    def edit(t):
        t[name] = t[name][:-1].contiguous()

    d = _copy_with(tiny_model_dir, tmp_path / "m", edit)
    with pytest.raises(WeightsError) as err:
        FlashMistralForCausalLM.from_pretrained(d)
    assert f"'{name}'" in str(err.value) and "expected shape (128, 64), got (127, 64)" in str(err.value)


def test_index_shards_load_like_a_single_file(tiny_model_dir, tmp_path):
    tensors = load_file(tiny_model_dir / "model.safetensors")
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d / "config.json")
    weight_map = {}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, d / fname)
        weight_map.update(dict.fromkeys(keys, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    single = FlashMistralForCausalLM.from_pretrained(tiny_model_dir)
    sharded = FlashMistralForCausalLM.from_pretrained(d)
    for (n1, p1), (n2, p2) in zip(single.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1

    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors"):
        Weights.from_dir(d)


def test_fused_parameters_hold_the_checkpoint_tensors(tiny_model_dir):
    tensors = load_file(tiny_model_dir / "model.safetensors")
    model = FlashMistralForCausalLM.from_pretrained(tiny_model_dir)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    p = "model.layers.1."
    expect_qkv = torch.cat([tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(attn.qkv_proj.weight, expect_qkv)
    assert torch.equal(
        mlp.gate_up_proj.weight,
        torch.cat([tensors[p + "mlp.gate_proj.weight"], tensors[p + "mlp.up_proj.weight"]]),
    )
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


def test_dtype_conversion(tiny_model_dir):
    model = FlashMistralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert KVCache.for_model(model, 4).dtype == torch.bfloat16
    runner = PagedRunner(model, KVCache.for_model(model, 8))
    logits, _ = runner.prefill(random_prompts([7], 512))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_tied_word_embeddings(tiny_model_factory):
    from transformers import MistralForCausalLM

    d = tiny_model_factory(tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(d / "model.safetensors")
    ours = FlashMistralForCausalLM.from_pretrained(d)
    assert ours.config.tie_word_embeddings
    assert torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)
    hf = MistralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompt = random_prompts([10], 512, seed=1)
    logits, _ = PagedRunner(ours, KVCache.for_model(ours, 8)).prefill(prompt)
    torch.testing.assert_close(logits, hf_logits(hf, prompt[0]), atol=1e-4, rtol=0)


def test_weights_none_builds_an_unloaded_model(tiny_model_dir):
    config = MistralConfig.from_pretrained(tiny_model_dir)
    model = FlashMistralForCausalLM(config, None)
    assert model.attention.name == "reference" and model.block_size == 16
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
