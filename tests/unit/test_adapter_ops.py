"""Reference SGMV/BGMV against naive per-token / per-segment loops (DESIGN.md semantics)."""

import pytest
import torch

from model.adapters import ops


def _stack(num_slots, max_rank, fan_in, fan_out, ranks, gen):
    """Zero-padded stacks with a different true rank per slot (mixed ranks in one batch)."""
    a = torch.zeros(num_slots, max_rank, fan_in)
    b = torch.zeros(num_slots, fan_out, max_rank)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, fan_in, generator=gen)
        b[s, :, :r] = torch.randn(fan_out, r, generator=gen)
    return a, b


def _naive_bgmv(y, x, a, b, idx):
    y = y.clone()
    for t in range(x.shape[0]):
        if idx[t] >= 0:
            y[t] += (x[t] @ a[idx[t]].T) @ b[idx[t]].T
    return y


def _naive_sgmv(y, x, a, b, starts, ends, slots):
    y = y.clone()
    for s, e, k in zip(starts, ends, slots, strict=True):
        if k >= 0:
            y[s:e] += (x[s:e] @ a[k].T) @ b[k].T
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bgmv_matches_per_token_loop_with_base_tokens_and_mixed_ranks(seed):
    gen = torch.Generator().manual_seed(seed)
    t, fan_in, fan_out = 29, 24, 40
    a, b = _stack(5, 16, fan_in, fan_out, ranks=[3, 16, 8, 1, 12], gen=gen)
    x = torch.randn(t, fan_in, generator=gen)
    y0 = torch.randn(t, fan_out, generator=gen)
    idx = torch.randint(-1, 5, (t,), generator=gen, dtype=torch.int32)
    idx[0] = -1  # at least one base token
    y = y0.clone()
    ops.bgmv(y, x, a, b, idx)
    torch.testing.assert_close(y, _naive_bgmv(y0, x, a, b, idx), rtol=1e-5, atol=1e-5)
    base = idx < 0
    assert torch.equal(y[base], y0[base])  # base-model tokens untouched, bit for bit


@pytest.mark.parametrize("seed", [0, 1])
def test_sgmv_matches_per_segment_loop_on_ragged_segments(seed):
    gen = torch.Generator().manual_seed(seed)
    fan_in, fan_out = 16, 20
    a, b = _stack(4, 8, fan_in, fan_out, ranks=[2, 8, 5, 7], gen=gen)
    # ragged runs; a gap of base tokens (10..13) and an empty segment
    starts, ends, slots = [0, 3, 13, 13, 20], [3, 10, 13, 20, 31], [2, 0, 1, 3, 2]
    t = 33  # tokens 31, 32 are base
    x = torch.randn(t, fan_in, generator=gen)
    y0 = torch.randn(t, fan_out, generator=gen)
    y = y0.clone()
    seg = [torch.tensor(v, dtype=torch.int32) for v in (starts, ends, slots)]
    ops.sgmv(y, x, a, b, *seg)
    torch.testing.assert_close(y, _naive_sgmv(y0, x, a, b, starts, ends, slots), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[10:13], y0[10:13]) and torch.equal(y[31:], y0[31:])


def test_sgmv_equals_bgmv_on_the_same_assignment():
    gen = torch.Generator().manual_seed(5)
    a, b = _stack(3, 8, 12, 10, ranks=[8, 4, 6], gen=gen)
    starts, ends, slots = [0, 4, 9], [4, 9, 15], [1, -1, 2]
    idx = torch.tensor([1] * 4 + [-1] * 5 + [2] * 6, dtype=torch.int32)
    x = torch.randn(15, 12, generator=gen)
    y1, y2 = torch.zeros(15, 10), torch.zeros(15, 10)
    ops.sgmv(y1, x, a, b, starts, ends, slots)
    ops.bgmv(y2, x, a, b, idx)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)


def test_shrink_then_expand_compose_to_the_full_op_and_split_over_input_shards():
    """Row-parallel TP: shrink partial sums over input shards add up to the full shrink."""
    gen = torch.Generator().manual_seed(7)
    a, b = _stack(2, 8, 16, 6, ranks=[8, 3], gen=gen)
    x = torch.randn(9, 16, generator=gen)
    idx = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1], dtype=torch.int32)
    full = ops.bgmv_shrink(x, a, idx)
    parts = sum(ops.bgmv_shrink(x[:, i : i + 8], a[:, :, i : i + 8], idx) for i in (0, 8))
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-6)
    y = torch.zeros(9, 6)
    ops.bgmv_expand(y, full, b, idx)
    torch.testing.assert_close(y, _naive_bgmv(torch.zeros(9, 6), x, a, b, idx), rtol=1e-5, atol=1e-5)
