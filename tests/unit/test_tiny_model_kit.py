"""The tiny-model kit writes real Hugging Face and PEFT directories."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shard_server.server.cli import main as cli_main


def test_make_tiny_model_cli_writes_a_real_hf_directory(tmp_path):
    out = tmp_path / "m"
    rc = cli_main(
        ["make-tiny-model", str(out), "--layers", "3", "--hidden", "48", "--heads", "6", "--kv-heads", "2",
         "--head-dim", "12", "--sliding-window", "16", "--vocab", "400", "--seed", "7"]
    )
    assert rc == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral"
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (3, 48, 12)
    assert config["sliding_window"] == 16 and config["vocab_size"] == 400

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MistralForCausalLM"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    ids = tok("hello world").input_ids
    assert ids[0] == tok.bos_token_id
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 400) and torch.isfinite(logits).all()


def test_seeded_weights_are_reproducible(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, "3"), (b, "3"), (c, "4")):
        cli_main(["make-tiny-model", str(d), "--seed", seed])
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(wa[key], wb[key])
    assert not torch.equal(wa[key], wc[key])


def test_tokenizer_round_trips_non_ascii(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ("Größe über Äpfel", "日本語の文章 🙂🚀", "¿dónde está? — “quotes” ∑∞", "плохо\tи\nхорошо"):
        ids = tok(text).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_adapter_fixture_is_a_peft_adapter(tiny_model_dir, adapter_factory):
    from peft import PeftConfig

    d = adapter_factory(tiny_model_dir, rank=4, target_modules=("q_proj", "down_proj"), use_rslora=True)
    cfg = PeftConfig.from_pretrained(d)
    assert cfg.r == 4 and set(cfg.target_modules) == {"q_proj", "down_proj"} and cfg.use_rslora
    weights = load_file(d / "adapter_model.safetensors")
    a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and b.abs().sum() > 0
