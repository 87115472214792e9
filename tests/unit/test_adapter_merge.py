"""LINEAR merge is exact (sum of weighted deltas); TIES/DARE are refused by name."""

import pytest
import torch

from model.adapters.merge import merge_adapters
from model.adapters.peft_loader import LoraAdapter
from model.errors import InvalidArgument, Status, Unimplemented


def _adapter(name, ranks_by_key, seed, fan_in=16, fan_out=12):
    gen = torch.Generator().manual_seed(seed)
    ad = LoraAdapter(name=name)
    for key, r in ranks_by_key.items():
        ad.weights[key] = (torch.randn(r, fan_in, generator=gen), torch.randn(fan_out, r, generator=gen))
    return ad


def test_linear_merge_is_the_weighted_sum_of_deltas_over_the_union_of_targets():
    a1 = _adapter("a1", {(0, "q_proj"): 3, (1, "down_proj"): 4}, seed=1)
    a2 = _adapter("a2", {(0, "q_proj"): 8, (-1, "lm_head"): 2}, seed=2)
    m = merge_adapters([a1, a2], [0.7, -0.25], "linear")
    assert set(m.weights) == {(0, "q_proj"), (1, "down_proj"), (-1, "lm_head")}
    assert m.weights[(0, "q_proj")][0].shape[0] == 11  # ranks concatenate
    torch.testing.assert_close(
        m.delta(0, "q_proj"), 0.7 * a1.delta(0, "q_proj") - 0.25 * a2.delta(0, "q_proj")
    )
    torch.testing.assert_close(m.delta(1, "down_proj"), 0.7 * a1.delta(1, "down_proj"))
    torch.testing.assert_close(m.delta(-1, "lm_head"), -0.25 * a2.delta(-1, "lm_head"))


def test_linear_merge_defaults_to_uniform_weights():
    a1, a2 = _adapter("a1", {(0, "v_proj"): 2}, 3), _adapter("a2", {(0, "v_proj"): 2}, 4)
    m = merge_adapters([a1, a2])
    torch.testing.assert_close(m.delta(0, "v_proj"), 0.5 * (a1.delta(0, "v_proj") + a2.delta(0, "v_proj")))


@pytest.mark.parametrize("strategy", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_are_refused_as_unimplemented(strategy):
    a = _adapter("a", {(0, "q_proj"): 2}, 1)
    with pytest.raises(Unimplemented, match=f"merge strategy '{strategy}' is not supported"):
        merge_adapters([a, a], [0.5, 0.5], strategy)
    assert Unimplemented.status == Status.UNIMPLEMENTED


def test_merge_refusals_name_the_problem():
    a = _adapter("a", {(0, "q_proj"): 200}, 1)
    with pytest.raises(InvalidArgument, match="2 adapters but 1 weights"):
        merge_adapters([a, a], [1.0])
    with pytest.raises(InvalidArgument, match=r"layer 0 q_proj has rank 400 > 256"):
        merge_adapters([a, a], [0.5, 0.5])
