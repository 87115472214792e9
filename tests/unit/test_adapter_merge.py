"""LINEAR merge is exact (sum of weighted deltas); merge parameters are checked before any file is read.

TIES/DARE against PEFT: tests/model/test_merge_vs_peft.py."""

import math

import pytest
import torch

from model.adapters.merge import check_merge, merge_adapters, merge_modules, merge_seed
from model.adapters.peft_loader import LoraAdapter, LoraModule
from model.errors import InvalidArgument, Status


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


REFUSED = [  # (n adapters, weights, strategy, density, sign method) -> message
    ((2, (0.5, math.nan), "linear", 0.0, "total"), "weights must be finite"),
    ((2, (0.5, math.inf), "ties", 0.5, "total"), "weights must be finite"),
    ((2, (0.5, 0.5), "ties", 0.0, "total"), r"density must be in \(0, 1\] for TIES; got 0.0"),
    ((2, (0.5, 0.5), "dare_linear", 1.5, "total"), r"density must be in \(0, 1\] for DARE_LINEAR; got 1.5"),
    ((2, (0.5, 0.5), "dare_ties", -0.1, "total"), r"density must be in \(0, 1\]"),
    ((2, (0.5, 0.5), "dare_ties", math.nan, "total"), r"density must be in \(0, 1\]"),
    ((1, (1.0,), "ties", 0.5, "total"), "TIES merge needs at least two adapters; got one"),
    ((1, (), "dare_ties", 0.5, "frequency"), "DARE_TIES merge needs at least two adapters"),
    ((2, (0.5, 0.5), "svd", 0.5, "total"), "merge strategy 'svd' is unknown"),
    ((2, (0.5, 0.5), "ties", 0.5, "median"), "majority_sign_method 'median' is unknown"),
]


@pytest.mark.parametrize("args,message", REFUSED, ids=[m for _, m in REFUSED])
def test_bad_merge_parameters_are_invalid_argument(args, message):
    with pytest.raises(InvalidArgument, match=message):
        check_merge(*args)
    assert InvalidArgument.status == Status.INVALID_ARGUMENT


def test_ties_keeps_the_elected_sign_and_averages_the_agreeing_values():
    """A hand-worked example of merge_utils.ties on rank-1 factors (no pruning at density 1)."""
    key = (0, "q_proj")
    a1 = {key: LoraModule(torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[1.0], [1.0]]), 4.0)}
    a2 = {key: LoraModule(torch.tensor([[-3.0, -1.0, 0.5]]), torch.tensor([[1.0], [-1.0]]), 1.0)}
    m = merge_modules([a1, a2], check_merge(2, (1.0, 1.0), "ties", 1.0, "total"))[key]
    # wA = (2, 1): column 0 sums to -2 -> only a2's -3 agrees: -3; column 1: both negative: (-4 - 1) / 2
    torch.testing.assert_close(m.a, torch.tensor([[-3.0, -2.5, 0.75]]))
    torch.testing.assert_close(m.b, torch.tensor([[1.5], [2.0]]))  # row 1: sum 0 elects +, a1 only


def test_dare_seed_is_a_function_of_the_whole_request():
    p = check_merge(2, (0.5, 0.5), "dare_ties", 0.5, "total")
    assert merge_seed(["a", "b"], p) == merge_seed(["a", "b"], p)
    others = [merge_seed(["b", "a"], p), merge_seed(["a", "b"], check_merge(2, (0.5, 0.5), "dare_ties", 0.6)),
              merge_seed(["a", "b"], check_merge(2, (0.5, 0.5), "dare_linear", 0.5))]  # fmt: skip
    assert merge_seed(["a", "b"], p) not in others


def test_merge_refusals_name_the_problem():
    a = _adapter("a", {(0, "q_proj"): 200}, 1)
    with pytest.raises(InvalidArgument, match="2 adapters but 1 weights"):
        merge_adapters([a, a], [1.0])
    with pytest.raises(InvalidArgument, match=r"layer 0 q_proj has rank 400 > 256"):
        merge_adapters([a, a], [0.5, 0.5])
