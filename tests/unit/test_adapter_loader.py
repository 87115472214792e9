"""PEFT adapter loading: scaling folded into B (incl. rsLoRA) and every refusal with its message."""

import json
import math
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.adapters.peft_loader import load_peft_adapter
from model.errors import InvalidArgument, NotFound


def base_config(model_dir: Path) -> SimpleNamespace:
    """The base shapes straight from config.json (model.config.MistralConfig has the same names)."""
    d = json.loads((model_dir / "config.json").read_text())
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    return SimpleNamespace(**d)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, adapter_factory):
    return adapter_factory(tiny_model_dir, rank=3, target_modules=("q_proj", "v_proj"), seed=1)


@pytest.fixture
def bad_copy(adapter_dir, tmp_path):
    """A writable copy of a good adapter, to break in one way per test."""
    out = tmp_path / "bad"
    shutil.copytree(adapter_dir, out)
    return out


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn):
    path = d / "adapter_model.safetensors"
    save_file(fn(load_file(str(path))), str(path))


def test_scaling_alpha_over_r_is_folded_into_b(tiny_model_dir, adapter_factory):
    d = adapter_factory(tiny_model_dir, rank=3, target_modules=("q_proj", "v_proj"), seed=1, alpha=5)
    raw = load_file(str(d / "adapter_model.safetensors"))
    ad = load_peft_adapter(d, base_config(tiny_model_dir))
    assert ad.targets == {"q_proj", "v_proj"} and ad.rank == 3 and len(ad.weights) == 4
    a, b = ad.weights[(1, "v_proj")]
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(a, raw[f"{prefix}.lora_A.weight"])
    torch.testing.assert_close(b, raw[f"{prefix}.lora_B.weight"] * (5 / 3))


def test_deltas_equal_peft_incl_rslora_mlp_and_lm_head(tiny_model_dir, adapter_factory):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    d = adapter_factory(tiny_model_dir, rank=12, seed=3, use_rslora=True,
                        target_modules=("k_proj", "down_proj", "lm_head"))  # fmt: skip
    ad = load_peft_adapter(d, base_config(tiny_model_dir))
    assert ad.targets == {"k_proj", "down_proj", "lm_head"}
    a, b = ad.weights[(0, "k_proj")]
    raw_b = load_file(str(d / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    ]
    torch.testing.assert_close(b, raw_b * (24 / math.sqrt(12)))  # rsLoRA: alpha / sqrt(r)
    peft = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(tiny_model_dir), d)
    inner = peft.base_model.model
    for layer, target, module in [
        (0, "k_proj", inner.model.layers[0].self_attn.k_proj),
        (1, "down_proj", inner.model.layers[1].mlp.down_proj),
        (-1, "lm_head", inner.lm_head),
    ]:
        torch.testing.assert_close(ad.delta(layer, target), module.get_delta_weight("default"))


def test_refuses_pickle_only_adapter_without_unpickling(bad_copy, tmp_path, monkeypatch):
    sentinel = tmp_path / "UNPICKLED"

    class Exploit:  # unpickling this creates the sentinel file
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    (bad_copy / "adapter_model.safetensors").unlink()
    (bad_copy / "adapter_model.bin").write_bytes(pickle.dumps(Exploit()))

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader tried to unpickle adapter_model.bin")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(InvalidArgument, match=r"only a pickle file adapter_model\.bin.*never unpickled"):
        load_peft_adapter(bad_copy, SimpleNamespace())
    assert not sentinel.exists()


def test_refuses_use_dora_without_magnitude_vectors(bad_copy, tiny_model_dir):
    _edit_config(bad_copy, use_dora=True)
    with pytest.raises(InvalidArgument, match="use_dora is set but layer 0 q_proj has no lora_magnitude"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


@pytest.mark.parametrize(
    "value,message",
    [(torch.ones(63), r"shape mismatch .*lora_magnitude_vector.*got \(63,\), needs \(64,\)"),
     (torch.tensor([1.0] * 63 + [float("inf")]), "lora_magnitude_vector' has non-finite values")],
)  # fmt: skip
def test_refuses_bad_dora_magnitude_vectors(bad_copy, tiny_model_dir, value, message):
    def add(t):
        for k in [k for k in t if k.endswith("lora_A.weight")]:
            out = 32 if ".v_proj." in k else 64  # tiny model: 4 query heads x 16, 2 KV heads x 16
            t[k.replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(out)
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = value
        return t

    _edit_config(bad_copy, use_dora=True)
    _edit_tensors(bad_copy, add)
    with pytest.raises(InvalidArgument, match=message):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


def test_refuses_dora_magnitude_tensor_even_if_config_hides_it(bad_copy, tiny_model_dir):
    def add(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
        return t

    _edit_tensors(bad_copy, add)
    with pytest.raises(InvalidArgument, match="DoRA magnitude vector .* does not set use_dora"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


def test_refuses_modules_to_save(bad_copy, tiny_model_dir):
    _edit_config(bad_copy, modules_to_save=["lm_head"])
    with pytest.raises(InvalidArgument, match="modules_to_save is not supported"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


def test_refuses_unknown_target_module_in_config(bad_copy, tiny_model_dir):
    _edit_config(bad_copy, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(InvalidArgument, match=r"unknown target module\(s\) \['embed_tokens'\]"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


def test_refuses_unknown_target_module_in_tensors(bad_copy, tiny_model_dir):
    _edit_config(bad_copy, target_modules=".*proj")  # a regex: the tensor keys decide

    def rename(t):
        return {k.replace("v_proj", "rotary_proj"): v for k, v in t.items()}

    _edit_tensors(bad_copy, rename)
    with pytest.raises(InvalidArgument, match="unknown target module 'rotary_proj'"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


def test_refuses_shape_mismatch(bad_copy, tiny_model_dir):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def widen(t):
        t[key] = torch.zeros(48, 3)  # v_proj has 2 KV heads x 16 = 32 outputs
        return t

    _edit_tensors(bad_copy, widen)
    with pytest.raises(
        InvalidArgument, match=r"shape mismatch for .*v_proj\.lora_B.*got \(48, 3\).*\(32, 3\)"
    ):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


def test_refuses_a_layer_beyond_the_base_model(bad_copy, tiny_model_dir):
    _edit_tensors(bad_copy, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    with pytest.raises(InvalidArgument, match="targets layer 7 but the base model has 2"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


@pytest.mark.parametrize("r", [0, 257, "8"])
def test_refuses_rank_out_of_range(bad_copy, tiny_model_dir, r):
    _edit_config(bad_copy, r=r)
    with pytest.raises(InvalidArgument, match=r"rank r=.* is out of range 1\.\.256"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


def test_refuses_rank_that_disagrees_with_config(bad_copy, tiny_model_dir):
    _edit_config(bad_copy, r=4)
    with pytest.raises(InvalidArgument, match="has rank 3 but adapter_config.json says r=4"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


def test_refuses_half_a_pair_and_non_lora_types(bad_copy, tiny_model_dir):
    _edit_tensors(
        bad_copy, lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    )
    with pytest.raises(InvalidArgument, match=r"layer 0 q_proj has only \['lora_A'\]"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))
    _edit_config(bad_copy, peft_type="IA3")
    with pytest.raises(InvalidArgument, match="peft_type 'IA3' is not LORA"):
        load_peft_adapter(bad_copy, base_config(tiny_model_dir))


def test_refuses_missing_and_corrupt_files(bad_copy, tiny_model_dir, tmp_path):
    cfg = base_config(tiny_model_dir)
    with pytest.raises(NotFound, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere", cfg)
    (bad_copy / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(InvalidArgument, match="unreadable safetensors file"):
        load_peft_adapter(bad_copy, cfg)
    (bad_copy / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidArgument, match="missing adapter_model.safetensors"):
        load_peft_adapter(bad_copy, cfg)
    (bad_copy / "adapter_config.json").unlink()
    with pytest.raises(InvalidArgument, match="missing adapter_config.json"):
        load_peft_adapter(bad_copy, cfg)


def test_rank_pattern_and_alpha_pattern_match_peft(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        task_type="CAUSAL_LM",
        rank_pattern={"layers.1.self_attn.q_proj": 6},
        alpha_pattern={"down_proj": 3},
    )
    peft = get_peft_model(MistralForCausalLM.from_pretrained(tiny_model_dir), cfg)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft.save_pretrained(tmp_path / "rp")
    ad = load_peft_adapter(tmp_path / "rp", base_config(tiny_model_dir))
    inner = peft.base_model.model
    assert ad.weights[(1, "q_proj")][0].shape[0] == 6 and ad.weights[(0, "q_proj")][0].shape[0] == 4
    for (layer, target), module in [
        ((0, "q_proj"), inner.model.layers[0].self_attn.q_proj),
        ((1, "q_proj"), inner.model.layers[1].self_attn.q_proj),
        ((1, "down_proj"), inner.model.layers[1].mlp.down_proj),
    ]:
        torch.testing.assert_close(ad.delta(layer, target), module.get_delta_weight("default"))
