"""Fixtures for the model tests: tiny checkpoints, our model and transformers' on the same weights."""

from __future__ import annotations

import pytest
import torch

from model.flash_mistral import FlashMistralForCausalLM


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
