"""Fixtures for the model tests: tiny checkpoints, our model and transformers' on the same weights."""

from __future__ import annotations

import pytest
import torch

from model.flash_mistral import FlashMistralForCausalLM

# (heads, kv_heads, head_dim): GQA ratios 1, 2 and 4; head_dim != hidden/heads (64/4 = 16) in two.
SHAPES = {
    "gqa1-hd32": dict(heads=4, kv_heads=4, head_dim=32),
    "gqa2": dict(heads=4, kv_heads=2),
    "gqa4-hd24": dict(heads=4, kv_heads=1, head_dim=24),
}


@pytest.fixture(scope="session")
def model_pair(tiny_model_factory):
    """model_pair(**spec) -> (FlashMistralForCausalLM fp32 CPU, transformers MistralForCausalLM), cached."""
    from transformers import MistralForCausalLM

    made = {}

    def make(**spec):
        key = tuple(sorted(spec.items()))
        if key not in made:
            d = tiny_model_factory(**spec)
            ours = FlashMistralForCausalLM.from_pretrained(d, dtype=torch.float32)
            hf = MistralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            made[key] = (ours, hf, d)
        return made[key]

    return make
