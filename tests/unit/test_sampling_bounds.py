"""Every parameter set that validation accepts yields a finite distribution; what would not is refused.

Property-based: hypothesis draws any float32 values (tiny, huge, subnormal, negative) for the fields,
logits of magnitude up to 1e4, and a history where every vocabulary token was seen and generated
thousands of times (the worst case for the penalties). Accepted -> the chosen token's logprob is finite
and no processed logit is NaN or +inf. Refused -> ValueError naming the field.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shard_server.generation.sampling import NextTokenChooser, validate_sampling_params
from shard_server.types import SamplingParams

V = 64
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
interesting = st.one_of(
    f32,
    st.sampled_from([0.0, 1e-45, 1e-38, 1e-30, 1e-5, 1e-4, 0.5, 1.0, 2.0, 1e4, 1e30, 3e38, -1e-45, -1e30]),
)


@st.composite
def sampling_params(draw) -> SamplingParams:
    return SamplingParams(
        temperature=draw(interesting),
        top_k=draw(st.integers(0, V + 2)),
        top_p=draw(st.one_of(st.just(1.0), interesting)),
        typical_p=draw(st.one_of(st.just(1.0), interesting)),
        do_sample=draw(st.booleans()),
        seed=draw(st.integers(0, 2**64 - 1)),
        repetition_penalty=draw(st.one_of(st.just(1.0), interesting)),
        frequency_penalty=draw(st.one_of(st.just(0.0), interesting)),
        presence_penalty=draw(st.one_of(st.just(0.0), interesting)),
        watermark=draw(st.booleans()),
        return_k_alternatives=draw(st.integers(0, 4)),
    )


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(p=sampling_params(), scale=st.sampled_from([1.0, 30.0, 1e4]), seed=st.integers(0, 2**16))
def test_accepted_parameters_give_a_finite_distribution(p, scale, seed):
    try:
        validate_sampling_params(p)
    except ValueError:
        return  # refused: the router gets INVALID_ARGUMENT
    chooser = NextTokenChooser.from_params([p], [list(range(V))], V)  # every token seen in the prompt
    if chooser.counts is not None:
        chooser.counts.fill_(131_072)  # every token generated as often as any context allows
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.rand(1, V, generator=gen) * 2 - 1) * scale
    processed = chooser.process(logits)
    assert not torch.isnan(processed).any() and not torch.isposinf(processed).any(), p
    out = chooser.choose(logits).to_host()
    assert math.isfinite(out.logprobs[0]), p


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 1e-45),
        ("temperature", 1e-5),
        ("repetition_penalty", 1e-45),
        ("repetition_penalty", 1e30),
        ("frequency_penalty", -1e30),
        ("presence_penalty", 3e38),
    ],
)
def test_values_that_overflow_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        validate_sampling_params(SamplingParams(do_sample=True, **{field: value}))
