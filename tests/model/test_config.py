"""MistralConfig from config.json dicts: defaults, transformers 4/5 spellings, named errors."""

from __future__ import annotations

import json

import pytest

from model.config import ConfigError, MistralConfig

BASE = {
    "model_type": "mistral",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
}


def cfg(**kw):
    d = {**BASE, **kw}
    return MistralConfig.from_dict({k: v for k, v in d.items() if v is not ...})


def test_defaults_when_keys_absent():
    c = cfg()
    assert c.sliding_window == 4096
    assert c.num_key_value_heads == 8
    assert c.head_dim == 8  # hidden / heads
    assert c.rope_theta == 10000.0 and c.rms_norm_eps == 1e-6
    assert c.tie_word_embeddings is False and c.eos_token_id == [2] and c.torch_dtype == "float32"


def test_null_sliding_window_means_full_attention():
    assert cfg(sliding_window=None).sliding_window is None
    assert cfg(sliding_window=8).sliding_window == 8


def test_head_dim_honoured_and_sizes():
    c = cfg(head_dim=24, num_key_value_heads=2)
    assert c.head_dim == 24 and c.q_size == 8 * 24 and c.kv_size == 2 * 24
    assert cfg(head_dim=None).head_dim == 8


def test_rope_theta_from_either_spelling():
    assert cfg(rope_theta=1e6).rope_theta == 1e6
    assert cfg(rope_parameters={"rope_type": "default", "rope_theta": 5e5}).rope_theta == 5e5
    with pytest.raises(ConfigError, match="rope_parameters.rope_type"):
        cfg(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0})


def test_dtype_spellings_and_eos_list():
    assert cfg(torch_dtype="bfloat16").torch_dtype == "bfloat16"
    assert cfg(dtype="float16", torch_dtype="bfloat16").torch_dtype == "float16"
    assert cfg(eos_token_id=[2, 7]).eos_token_id == [2, 7]


def test_unknown_model_type_names_the_key():
    with pytest.raises(ConfigError, match="'model_type'.*'gpt2'"):
        cfg(model_type="gpt2")


@pytest.mark.parametrize("key", ["model_type", "vocab_size", "hidden_size", "num_hidden_layers"])
def test_missing_required_key_is_named(key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        cfg(**{key: ...})


def test_gqa_heads_must_divide():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        cfg(num_key_value_heads=3)


def test_from_pretrained_reads_the_kit_model(tiny_model_factory):
    d = tiny_model_factory(sliding_window=8, heads=4, kv_heads=1, head_dim=24)
    c = MistralConfig.from_pretrained(d)
    raw = json.loads((d / "config.json").read_text())
    assert (c.sliding_window, c.num_key_value_heads, c.head_dim, c.vocab_size) == (8, 1, 24, 512)
    assert c.rope_theta == raw.get("rope_parameters", raw).get("rope_theta", 10000.0)
    with pytest.raises(ConfigError, match="no config.json"):
        MistralConfig.from_pretrained(d / "nowhere")
