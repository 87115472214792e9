"""No adapter's values reach another row: a slot full of NaN/Inf leaves every other row's LoRA exact.

The torch reference ops (model/adapters/ops.py, what CPU serving runs) and the torch references of the
Triton kernels (model/kernels/lora.py `lora_*_ref` over a plan) are checked here; the Triton kernels
themselves are checked the same way under the interpreter (test_lora_kernels_interpret.py) and on the
GPU (tests/gpu/test_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from model.adapters import ops

T, S, R, IN, OUT = 6, 3, 4, 8, 5
POISONED = 1  # slot whose weights are NaN / Inf


def _stacks(poison: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(S, R, IN, generator=gen)
    b = torch.randn(S, OUT, R, generator=gen)
    a[POISONED] = poison
    b[POISONED] = poison
    return a, b


def _expected(x, a, b, idx) -> torch.Tensor:
    """Row by row, touching only the row's own slot."""
    y = torch.zeros(x.shape[0], b.shape[1])
    for t, s in enumerate(idx.tolist()):
        if s >= 0:
            y[t] = (x[t] @ a[s].T) @ b[s].T
    return y


# rows: base, slot 0, poisoned, slot 2, base, slot 0
IDX = torch.tensor([-1, 0, POISONED, 2, -1, 0], dtype=torch.int32)
CLEAN = IDX != POISONED


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_reference_bgmv_keeps_a_poisoned_slot_in_its_own_rows(poison):
    a, b = _stacks(poison)
    x = torch.randn(T, IN, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(T, OUT)
    ops.bgmv(y, x, a, b, IDX)
    assert torch.isfinite(y[CLEAN]).all()
    torch.testing.assert_close(y[CLEAN], _expected(x, a, b, IDX)[CLEAN])
    v = ops.bgmv_shrink(x, a, IDX)
    assert torch.equal(v[IDX < 0], torch.zeros_like(v[IDX < 0]))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_reference_sgmv_keeps_a_poisoned_slot_in_its_own_segment(poison):
    a, b = _stacks(poison)
    x = torch.randn(T, IN, generator=torch.Generator().manual_seed(2))
    starts, ends, slots = [0, 2, 4], [2, 4, 6], [0, POISONED, 2]
    y = torch.zeros(T, OUT)
    ops.sgmv(y, x, a, b, starts, ends, slots)
    idx = torch.tensor([0, 0, POISONED, POISONED, 2, 2], dtype=torch.int32)
    clean = idx != POISONED
    assert torch.isfinite(y[clean]).all()
    torch.testing.assert_close(y[clean], _expected(x, a, b, idx)[clean])


def test_kernel_references_keep_a_poisoned_slot_in_its_own_rows():
    lora = pytest.importorskip("model.kernels.lora", exc_type=ImportError)
    a, b = _stacks(float("nan"))
    a[0] = float("nan")  # slot 0 too: the references gather index max(slot, 0) for base rows
    b[0] = float("nan")
    x = torch.randn(T, IN, generator=torch.Generator().manual_seed(3))
    base = IDX < 0
    ranks = torch.full((S,), R, dtype=torch.int32)
    plan = lora.plan_from_slots_ref(IDX, S)  # base rows are in no tile
    got = lora.lora_shrink_ref(x, a, ranks, plan, rank=R)
    assert torch.isnan(got[0, base]).all()  # rows in no tile are never written (nor read by the expand)
    y = torch.zeros(T, OUT)
    lora.lora_expand_ref(y, got, b, ranks, plan, rank=R)
    assert torch.equal(y[base], torch.zeros_like(y[base]))
    clean = IDX == 2
    torch.testing.assert_close(y[clean], _expected(x, a, b, IDX)[clean])
