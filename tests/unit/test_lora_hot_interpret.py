"""Hot-slot LoRA deltas expanded inside their consumers (model/kernels/lora_hot.py) under the Triton
interpreter, against HotDelta.dense() fed to the dense-delta references: rows of several hot slots and
base rows mixed in one block, u read through the wide matmul output's row stride, q/k/v and gate/up
members, poisoned u columns of other slots (a row reads only its own), slots absent from a block whose
B is never read (NaN there changes nothing). The GPU runs the same cases (tests/gpu/test_kernels.py).
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_interpret import INTERPRETER_MARKS, interpreted, rel_err

from model.adapters.hot import HotDelta

pytestmark = INTERPRETER_MARKS

R = 16


@pytest.fixture(scope="module")
def k():
    with interpreted(("lora_hot", "activation", "rmsnorm")) as mods:
        yield mods


def make_hot(mod, T: int, S: int, widths: tuple[int, ...], seed: int, slots=None, poison: bool = True):
    """(wide [T, N + S*M*R] with y in its first N columns, HotDelta over the rest); u columns of the
    slots a row does not hold are NaN (poison), so are B's of slots no row holds."""
    gen = torch.Generator().manual_seed(seed)
    n, m = sum(widths), len(widths)
    wide = torch.randn(T, n + S * m * R, generator=gen).bfloat16()
    if slots is None:
        slots = torch.randint(-1, S, (T,), generator=gen)
    slots = torch.as_tensor(slots, dtype=torch.int32)
    u = wide[:, n:]
    b = (0.3 * torch.randn(S, R, n, generator=gen)).bfloat16()
    if poison:
        view = u.view(T, S, m * R)
        for t in range(T):
            for h in range(S):
                if h != int(slots[t]):
                    view[t, h] = float("nan")
        for h in range(S):
            if not (slots == h).any():
                b[h] = float("nan")
    return wide, HotDelta(u, slots, b, widths)


def oracle(hot) -> torch.Tensor:
    """Row by row: the delta of each row from its own slot's u and B, fp32, rounded to bf16."""
    s, r, n = hot.b.shape
    m = len(hot.widths)
    out = torch.zeros(hot.rows, n)
    for t in range(hot.rows):
        h = int(hot.row_slot[t])
        if h < 0:
            continue
        start = 0
        for j, w in enumerate(hot.widths):
            u = hot.u[t, (h * m + j) * r : (h * m + j + 1) * r].float()
            out[t, start : start + w] = u @ hot.b[h, :, start : start + w].float()
            start += w
    return out.bfloat16()


CASES = [  # T, S, member widths
    (1, 1, (64,)),
    (5, 2, (128, 32, 32)),  # qkv, GQA 4:1
    (19, 4, (64, 64)),  # gate | up; two row blocks, every slot
    (33, 3, (256,)),  # o / down
]


@pytest.mark.parametrize("T,S,widths", CASES)
def test_dense_matches_row_oracle(k, T, S, widths):
    _, hot = make_hot(k["lora_hot"], T, S, widths, seed=T * 7 + S)
    dense, ref = hot.dense(), oracle(hot)
    assert rel_err(dense, ref) <= 1e-2  # fp32 sums in another order: a bf16 ulp here and there
    assert torch.equal(dense[hot.row_slot < 0], torch.zeros_like(dense[hot.row_slot < 0]))


@pytest.mark.parametrize("T,S,widths", CASES)
def test_add_hot_delta_in_place(k, T, S, widths):
    wide, hot = make_hot(k["lora_hot"], T, S, widths, seed=T + S)
    n = sum(widths)
    y0 = wide[:, :n].clone()
    ref = (y0.float() + hot.dense().float()).bfloat16()
    k["lora_hot"].add_hot_delta_(wide[:, :n], hot, block_n=32)
    y = wide[:, :n]
    base = hot.row_slot < 0
    assert torch.equal(y[base], y0[base])  # base rows untouched, bit for bit
    if (~base).any():
        assert rel_err(y[~base], ref[~base]) <= 1e-2


@pytest.mark.parametrize("T,S", [(3, 2), (18, 4)])
def test_silu_and_mul_hot(k, T, S):
    inter = 64
    wide, hot = make_hot(k["lora_hot"], T, S, (inter, inter), seed=100 + T)
    gate_up = wide[:, : 2 * inter]
    out = torch.full((T, inter), float("nan")).bfloat16()
    k["lora_hot"].silu_and_mul_hot(gate_up, hot, out=out, block_n=32)
    ref = k["activation"].silu_and_mul_ref(gate_up, delta=hot.dense())
    assert rel_err(out, ref) <= 1e-2
    base = hot.row_slot < 0
    assert torch.equal(out[base], k["activation"].silu_and_mul_ref(gate_up[base]))


@pytest.mark.parametrize("T,S,with_res", [(2, 1, True), (17, 3, True), (6, 2, False)])
def test_add_rmsnorm_hot(k, T, S, with_res):
    H = 256
    wide, hot = make_hot(k["lora_hot"], T, S, (H,), seed=200 + T)
    x = wide[:, :H]
    gen = torch.Generator().manual_seed(T)
    res = torch.randn(T, H, generator=gen).bfloat16() if with_res else None
    w = (1 + 0.1 * torch.randn(H, generator=gen)).bfloat16()
    out, res_out = torch.full((T, H), float("nan")).bfloat16(), torch.full((T, H), float("nan")).bfloat16()
    normed, new_res = k["lora_hot"].add_rmsnorm_hot(x, res, w, 1e-5, hot, out=out, residual_out=res_out)
    ref_normed, ref_res = k["rmsnorm"].fused_add_rmsnorm_ref(x, res, w, 1e-5, delta=hot.dense())
    assert normed is out and new_res is res_out
    assert rel_err(new_res, ref_res) <= 1e-2 and rel_err(normed, ref_normed) <= 2e-2
    base = hot.row_slot < 0
    if base.any():  # no LoRA: the sums are the plain ones, rounded as torch rounds them
        plain = x[base] if res is None else (x[base].float() + res[base].float()).bfloat16()
        assert torch.equal(new_res[base], plain)


def test_rows_of_one_block_do_not_read_each_others_slots(k):
    """Two rows of one block on different slots: each row's output depends on its own adapter only
    (changing the other slot's B, within finite values, leaves the row bit-identical)."""
    wide, hot = make_hot(k["lora_hot"], 4, 2, (64,), seed=5, slots=[0, 1, 0, -1], poison=False)
    lh = k["lora_hot"]
    y_a = wide[:, :64].clone()
    lh.add_hot_delta_(y_a, hot)
    b2 = hot.b.clone()
    b2[1] *= 1000.0
    y_b = wide[:, :64].clone()
    lh.add_hot_delta_(y_b, HotDelta(hot.u, hot.row_slot, b2, hot.widths))
    assert torch.equal(y_a[[0, 2, 3]], y_b[[0, 2, 3]]) and not torch.equal(y_a[1], y_b[1])


def test_member_widths_must_fit_tiles(k):
    _, hot = make_hot(k["lora_hot"], 2, 1, (40, 8), seed=1, poison=False)
    with pytest.raises(AssertionError, match="multiples of 16"):
        k["lora_hot"].add_hot_delta_(torch.zeros(2, 48).bfloat16(), hot)
