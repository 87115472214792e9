"""The grouped LoRA kernels (model/kernels/lora.py) under the Triton interpreter, against their torch
references and a per-token oracle: poisoned outputs, ragged segments, ranks 1..128 in one stack,
members missing from a fused output (gaps), GQA-shaped q/k/v widths, decode plans built on the device
and prefill plans from host segments. The GPU runs the same cases natively (tests/gpu/test_kernels.py).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from lora_kernel_cases import make_group_case, ragged_segments, slots_of_segments
from test_kernels_interpret import INTERPRETER_MARKS, interpreted, rel_err

pytestmark = INTERPRETER_MARKS


@pytest.fixture(scope="module")
def lora():
    with interpreted(("lora",)) as mods:
        yield mods["lora"]


CASES = [
    # T, S, R, in, member widths in y, members present, dtype, splits
    (1, 3, 8, 256, (64,), (True,), torch.bfloat16, 1),
    (7, 4, 16, 320, (64, 32, 32), (True, True, True), torch.bfloat16, 2),  # qkv, GQA 2:1
    (9, 3, 8, 128, (96, 24, 24), (True, False, True), torch.float16, 1),  # q and v only: k's columns stay
    (37, 5, 64, 128, (48, 48), (True, True), torch.bfloat16, 1),  # gate_up; 3 tiles of one slot
    (20, 2, 128, 64, (128,), (True,), torch.bfloat16, 1),
    (12, 4, 16, 192, (64, 16, 16), (False, True, True), torch.float16, 3),  # MQA-like k/v only
    (40, 20, 16, 64, (32, 16, 16), (True, True, True), torch.bfloat16, 1),  # ~20 tiles on 6 tile workers
]


def _id(c):
    return f"T{c[0]}-S{c[1]}-R{c[2]}-m{''.join('1' if p else '0' for p in c[5])}-s{c[7]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("plan_kind", ["decode", "prefill"])
def test_grouped_shrink_expand_interpret(lora, case, plan_kind):
    T, S, R, fan_in, widths, present, dtype, splits = case
    gen = torch.Generator().manual_seed(zlib.crc32(f"{_id(case)}-{plan_kind}".encode()))
    c = make_group_case(gen, T, S, R, fan_in, widths, present, dtype)
    if plan_kind == "prefill":
        segs = ragged_segments(gen, T, S)
        c.slots = slots_of_segments(segs, T)
        plan = lora.plan_from_segments(segs, T, "cpu")
    else:
        plan = lora.plan_from_slots(c.slots, S, block_m=16)
    covered = c.slots >= 0
    n = c.a.shape[1]

    v = torch.full((1, T, n), float("nan"))
    lora.lora_shrink(c.x, c.a, c.ranks, plan, rank=R, splits=splits, out=v)
    v_ref = lora.lora_shrink_ref(c.x, c.a, c.ranks, plan, rank=R)
    assert rel_err(v.sum(0)[covered], v_ref[0][covered]) <= 1e-2
    assert torch.isnan(v[:, ~covered]).all()  # rows in no tile (base model) are not written

    # a strided column view; small next to the delta, so that the rounding of y + delta is not the error
    y0 = (0.05 * torch.randn(T, c.y_cols + 16, generator=gen)).to(dtype)[:, 8:-8]
    y, y_ref = y0.clone(), y0.clone()
    lora.lora_expand(y, v, c.b, c.ranks, plan, rank=R, slices=c.slices)
    lora.lora_expand_ref(y_ref, v_ref, c.b, c.ranks, plan, rank=R, slices=c.slices)
    want = c.oracle(y0)
    assert rel_err(y.double() - y0.double(), want - y0.double()) <= 1e-2
    assert rel_err(y_ref.double() - y0.double(), want - y0.double()) <= 1e-2
    assert torch.equal(y[~covered], y0[~covered])  # base rows: untouched
    assert torch.equal(y[:, c.untouched_cols], y0[:, c.untouched_cols])  # members no adapter targets


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("plan_kernel", [True, False], ids=["plan-kernel", "plan-torch"])
def test_expand_store_writes_the_delta_and_zeros_for_base_rows_interpret(lora, case, plan_kernel):
    """store=True (a LoRA delta buffer, no memset first): every row of the members' columns is written,
    the delta on adapter rows (ranks 1..128, gaps), zero on base rows; other columns are left as they are."""
    T, S, R, fan_in, widths, present, dtype, splits = case
    gen = torch.Generator().manual_seed(zlib.crc32(f"store-{_id(case)}".encode()))
    c = make_group_case(gen, T, S, R, fan_in, widths, present, dtype)
    plan = lora.plan_from_slots(c.slots, S, block_m=16, use_kernel=plan_kernel)
    assert int(plan.lora_rows) == int((c.slots >= 0).sum())
    v = lora.lora_shrink(c.x, c.a, c.ranks, plan, rank=R, splits=splits)
    y = torch.full((T, c.y_cols), float("nan")).to(dtype)
    lora.lora_expand(y, v, c.b, c.ranks, plan, rank=R, slices=c.slices, store=True)
    members = ~c.untouched_cols
    want = c.oracle(torch.zeros(T, c.y_cols, dtype=dtype))  # the delta, zero on base rows
    assert torch.isfinite(y[:, members]).all()
    assert rel_err(y[:, members].double(), want[:, members]) <= 1e-2
    assert torch.equal(y[c.slots < 0][:, members], torch.zeros_like(y[c.slots < 0][:, members]))
    assert torch.isnan(y[:, c.untouched_cols]).all()


@pytest.mark.parametrize("case", [c for c in CASES if c[6] != torch.float32][:4], ids=_id)
def test_in_place_adds_exactly_the_stored_delta_interpret(lora, case):
    """In place, y + delta is rounded as the side stream's consumers round it (y + the stored, already
    rounded delta) and as PEFT adds it: a speculative verify step (in place) and a decode step (delta on
    the side stream) give the same bits. y is as large as the delta, so a float32 add would differ."""
    T, S, R, fan_in, widths, present, dtype, splits = case
    gen = torch.Generator().manual_seed(zlib.crc32(f"in-place-{_id(case)}".encode()))
    c = make_group_case(gen, T, S, R, fan_in, widths, present, dtype)
    plan = lora.plan_from_slots(c.slots, S, block_m=16)
    v = lora.lora_shrink(c.x, c.a, c.ranks, plan, rank=R, splits=splits)
    delta = torch.zeros(T, c.y_cols, dtype=dtype)
    lora.lora_expand(delta, v, c.b, c.ranks, plan, rank=R, slices=c.slices, store=True)
    y0 = (delta.float().std() * torch.randn(T, c.y_cols, generator=gen)).to(dtype)
    y = y0.clone()
    lora.lora_expand(y, v, c.b, c.ranks, plan, rank=R, slices=c.slices)
    members = ~c.untouched_cols
    want = (y0.float() + delta.float()).to(dtype)
    assert torch.equal(y[:, members], want[:, members])
    exact = lora.lora_expand_ref(torch.zeros(T, c.y_cols), v, c.b, c.ranks, plan, rank=R, slices=c.slices)
    assert not torch.equal((y0.float() + exact).to(dtype)[:, members], want[:, members])  # a float32 add
    assert torch.equal(y[:, c.untouched_cols], y0[:, c.untouched_cols])


@pytest.mark.parametrize("plan_kind", ["decode", "prefill"])
def test_a_poisoned_slot_stays_in_its_own_rows_interpret(lora, plan_kind):
    """Slots of NaN weights (slot 0 too) reach no other row: tiles read their own slot only, base rows
    are in no tile, so no other slot's values are ever multiplied by a zero mask (0 * NaN is NaN)."""
    gen = torch.Generator().manual_seed(7)
    T, S, R, fan_in, out = 6, 3, 16, 64, 32
    x = torch.randn(T, fan_in, generator=gen).to(torch.bfloat16)
    a = torch.randn(S, R, fan_in, generator=gen).to(torch.bfloat16)
    b = torch.randn(S, out, R, generator=gen).to(torch.bfloat16)
    a[:2], b[:2] = float("nan"), float("nan")
    ranks = torch.full((S,), R, dtype=torch.int32)
    if plan_kind == "prefill":
        segs = [(1, 3, 2), (3, 5, 1), (5, 6, 0)]  # row 0: base
        slots = torch.tensor([-1, 2, 2, 1, 1, 0], dtype=torch.int32)
        plan = lora.plan_from_segments(segs, T, "cpu")
    else:
        slots = torch.tensor([-1, 2, 1, 2, -1, 0], dtype=torch.int32)
        plan = lora.plan_from_slots(slots, S, block_m=16)
    v = lora.lora_shrink(x, a, ranks, plan, rank=R)
    y0 = torch.randn(T, out, generator=gen).to(torch.bfloat16)
    y = y0.clone()
    lora.lora_expand(y, v, b, ranks, plan, rank=R)
    clean = slots == 2
    assert torch.equal(y[slots < 0], y0[slots < 0])
    assert torch.isfinite(y[clean]).all()
    want = y0[clean].float() + (x[clean].float() @ a[2].float().T) @ b[2].float().T
    assert rel_err(y[clean].float() - y0[clean].float(), want - y0[clean].float()) <= 1e-2


def test_device_plan_groups_tokens_by_slot_in_static_tiles(lora):
    slots = torch.tensor([3, -1, 0, 3, 3, -1, 0, 3, 3, 3], dtype=torch.int32)
    plan = lora.plan_from_slots(slots, num_slots=5, block_m=2)
    assert plan.num_tiles == min(10, 5) + 5  # static: depends on T, S and block_m only
    perm = plan.perm.tolist()
    rows = {}
    for slot, first, n in plan.tiles.T.tolist():
        assert 0 <= n <= 2
        if n:
            rows.setdefault(slot, []).extend(perm[first : first + n])
    assert rows == {0: [2, 6], 3: [0, 3, 4, 7, 8, 9]}  # stable: token order kept within a slot
    assert plan.tiles[2].tolist()[4:] == [0] * (plan.num_tiles - 4)  # 1 + 3 real tiles, then empty
    assert plan.count.tolist() == [4]
    empty = lora.plan_from_slots(torch.full((4,), -1, dtype=torch.int32), 3)
    assert empty.tiles[2].eq(0).all() and empty.count.tolist() == [0]


def test_choose_splits_spreads_small_batches(lora):
    one = lora.plan_from_slots(torch.zeros(4, dtype=torch.int32), 8)  # 1 tile
    many = lora.plan_from_slots(torch.zeros(2048, dtype=torch.int32), 8)  # 128 tiles
    assert lora.choose_splits(one, 48, 4096, 64, 132) == 8
    assert lora.choose_splits(one, 16, 14336, 16, 132) == 16
    assert lora.choose_splits(many, 48, 4096, 64, 132) == 2
    assert lora.choose_splits(one, 16, 256, 16, 132) == 1  # short reduction: no split
    # beside the base matmuls (a side stream of 32 SMs): one wave and at most 8 splits
    rows = {t: lora.plan_from_slots(torch.zeros(t, dtype=torch.int32), 8) for t in (32, 64, 128)}
    assert [lora.choose_splits(rows[t], 16, 14336, 16, 32) for t in (32, 64, 128)] == [16, 16, 8]
    assert [lora.choose_splits(rows[t], 16, 14336, 16, 32, True) for t in (32, 64, 128)] == [8, 8, 4]
    assert [lora.choose_splits(rows[t], 48, 4096, 64, 32, True) for t in (32, 64, 128)] == [8, 8, 4]


def test_triton_backend_equals_torch_backend_through_the_store(lora, tiny_model_dir, adapter_factory):
    """AdapterBatchData over the store's group stacks: the Triton backend (interpreted) adds what the
    torch reference adds for every group call the model makes, prefill and decode, lm_head rows too."""
    import json
    from types import SimpleNamespace

    from cache.adapter_store import AdapterStore
    from model.adapters.lora_ops import TritonLoraOps
    from shard_server.types import AdapterSpec

    config = SimpleNamespace(**json.loads((tiny_model_dir / "config.json").read_text()))
    qv = adapter_factory(tiny_model_dir, rank=3, target_modules=("q_proj", "v_proj", "down_proj"), seed=2)
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    full = adapter_factory(tiny_model_dir, rank=12, target_modules=every, seed=3)
    store = AdapterStore(config)
    for i, d in ((1, qv), (2, full)):
        store.load(i, AdapterSpec(adapter_ids=(str(d),), source="local"))
    h, q, kv, inter = 64, 64, 32, 128
    calls = [("qkv_proj", h, (q, kv, kv)), ("o_proj", q, (h,)), ("gate_up_proj", h, (inter, inter)),
             ("down_proj", inter, (h,))]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    requests = [1, 0, 2, 1, 2]
    for is_prefill, tokens in ((True, [3, 2, 4, 1, 5]), (False, [1] * 5)):
        ref = store.batch_data(requests, tokens, is_prefill)
        tri = store.batch_data(requests, tokens, is_prefill)
        tri.ops = TritonLoraOps(lora)
        t = sum(tokens)
        for layer in range(2):
            for group, fan_in, widths in calls:
                x = torch.randn(t, fan_in, generator=gen)
                want, got = (torch.randn(t, sum(widths), generator=gen),) * 2
                want, got = want.clone(), got.clone()
                ref.add_lora(layer, group, x, want, widths)
                tri.add_lora(layer, group, x, got, widths)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        rows = torch.tensor([2, 4, t - 1])
        ref = store.batch_data(requests, tokens, is_prefill, lm_head_indices=rows)
        tri = store.batch_data(requests, tokens, is_prefill, lm_head_indices=rows)
        tri.ops = TritonLoraOps(lora)
        x, logits = torch.randn(3, h, generator=gen), torch.randn(3, 512, generator=gen)
        want, got = logits.clone(), logits.clone()
        ref.add_lora(-1, "lm_head", x, want)
        tri.add_lora(-1, "lm_head", x, got)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert not torch.equal(got, logits)


@pytest.mark.parametrize("T,S,block_m", [(1, 1, 16), (10, 5, 2), (37, 8, 16), (64, 64, 16), (130, 3, 16)])
def test_plan_kernel_equals_the_torch_plan(lora, T, S, block_m):
    gen = torch.Generator().manual_seed(T * 31 + S)
    for trial in range(3):
        slots = torch.randint(-1, S, (T,), generator=gen, dtype=torch.int32)
        if trial == 1:
            slots[:] = -1  # no adapter row at all
        if trial == 2:
            slots[:] = S - 1  # one adapter everywhere: the most tiles of one run
        ref = lora.plan_from_slots_ref(slots, S, block_m)
        got = lora.plan_from_slots(slots, S, block_m, use_kernel=True)
        assert torch.equal(got.perm, ref.perm) and torch.equal(got.tiles, ref.tiles), (trial, slots)
        assert torch.equal(got.count, ref.count), (trial, slots)


@pytest.mark.parametrize("plan_kind", ["decode", "prefill"])
def test_split_k_counters_reset_for_the_next_call_on_the_same_plan(lora, plan_kind):
    """The shrink reduces its split-K partials through per-tile arrival counters kept in the plan: every
    call must leave them at zero, or the next group of the same step (same plan) would reduce too early."""
    gen = torch.Generator().manual_seed(11)
    T, S, R = 21, 4, 8
    c = make_group_case(gen, T, S, R, 512, (64, 32, 32), (True, True, True), torch.bfloat16)
    if plan_kind == "prefill":
        segs = ragged_segments(gen, T, S)
        c.slots = slots_of_segments(segs, T)
        plan = lora.plan_from_segments(segs, T, "cpu")
    else:
        plan = lora.plan_from_slots(c.slots, S, block_m=16)
    covered = c.slots >= 0
    want = lora.lora_shrink_ref(c.x, c.a, c.ranks, plan, rank=R)[0]
    assert plan.semaphores.eq(0).all()
    for splits in (4, 3, 4):
        v = lora.lora_shrink(c.x, c.a, c.ranks, plan, rank=R, splits=splits)
        assert rel_err(v[0][covered], want[covered]) <= 1e-2, splits
        assert plan.semaphores.eq(0).all(), splits
