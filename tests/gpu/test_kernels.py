"""Triton kernels of model/kernels against their torch references, natively on CUDA (marker gpu).

Fresh random inputs per case, outputs NaN-poisoned before each run, ||out - ref|| / ||ref|| <= 1e-2.
Run on the GPU machine: python -m pytest -m gpu tests/gpu/test_kernels.py -p no:cacheprovider
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

pytest.importorskip("triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element or bad math)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def gen_for(*key) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(hash(key) % 2**31)


# ----------------------------------------------------------------------------------- paged attention


def make_paged_case(gen, B, Hq, Hkv, D, block_size, lens, dtype, fp8=False, extra_blocks=5):
    max_len = max(lens)
    per_seq = math.ceil(max_len / block_size)
    num_blocks = B * per_seq + extra_blocks
    k = torch.randn(num_blocks, block_size, Hkv, D, generator=gen, device=DEV)
    v = torch.randn(num_blocks, block_size, Hkv, D, generator=gen, device=DEV)
    scales = (None, None)
    if fp8:
        k, v = (k * 40).to(torch.float8_e4m3fn), (v * 40).to(torch.float8_e4m3fn)
        scales = (1 / 40, 1 / 40)
    else:
        k, v = k.to(dtype), v.to(dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=DEV)
    tables = perm[: B * per_seq].view(B, per_seq).to(torch.int32)
    q = torch.randn(B, Hq, D, generator=gen, device=DEV).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    return q, k, v, tables, seq_lens, max_len, scales


def ragged_lens(B: int, max_len: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (B,), generator=g).tolist()
    lens[0] = max_len
    if B > 1:
        lens[-1] = 1
    return lens


def _paged_sweep():
    """Every (block size, GQA ratio, head dim) combination once (40 cases), each with a different batch /
    context / window / dtype drawn in rotation, so every level of every factor is covered several times
    without the full product's compile and run time; and two with a group of 3."""
    batches = [(1, 1), (1, 4096), (5, 777), (33, 300), (64, 1030), (3, 2500)]  # (B, max context)
    heads = [(8, 4), (4, 1), (2, 2), (1, 8)]  # (Hkv, G)
    cases = []
    for i, (bs, (Hkv, G), D) in enumerate(itertools.product([16, 32, 64, 128, 256], heads, [64, 128])):
        B, L = batches[i % len(batches)]
        window = 200 if i % 3 == 1 else None
        dtype = torch.float16 if i % 4 == 3 else torch.bfloat16
        cases.append((B, Hkv, G, D, bs, L, window, dtype))
    # A group of 3 (the demo model, SmolLM2: 9 query heads over 3 KV heads), head dim 64.
    cases += [(5, 3, 3, 64, 16, 777, None, torch.bfloat16), (3, 3, 3, 64, 256, 2500, 200, torch.float16)]
    return cases


PAGED_SWEEP = _paged_sweep()


@pytest.mark.parametrize("case", PAGED_SWEEP, ids=str)
def test_paged_decode_attention(case):
    from model.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    B, Hkv, G, D, bs, L, W, dtype = case
    gen = gen_for("pa", *map(str, case))
    q, k, v, tables, seq_lens, max_len, _ = make_paged_case(
        gen, B, Hkv * G, Hkv, D, bs, ragged_lens(B, L, B + L), dtype)
    ref = paged_decode_attention_ref(q, k, v, tables, seq_lens, D**-0.5, max_len, sliding_window=W)
    for splits in (None, 1, 7):  # the heuristic's choice, no split, and an odd split count
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k, v, tables, seq_lens, D**-0.5, max_len, sliding_window=W, out=out,
                               num_splits=splits)
        torch.cuda.synchronize()
        assert rel_err(out, ref) <= 1e-2, splits


@pytest.mark.parametrize("bs", [16, 256])
@pytest.mark.parametrize("scale_as_tensor", [False, True])
def test_paged_decode_attention_fp8(bs, scale_as_tensor):
    from model.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    gen = gen_for("pa8", bs, scale_as_tensor)
    q, k, v, tables, seq_lens, max_len, (ks, vs) = make_paged_case(
        gen, 9, 32, 8, 128, bs, ragged_lens(9, 3000, 3), torch.bfloat16, fp8=True)
    if scale_as_tensor:
        ks = torch.tensor([ks], device=DEV)
        vs = torch.tensor([vs], device=DEV)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k, v, tables, seq_lens, 128**-0.5, max_len, k_scale=ks, v_scale=vs, out=out)
    ref = paged_decode_attention_ref(q, k, v, tables, seq_lens, 128**-0.5, max_len, k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("q_len", [2, 5, 8])
@pytest.mark.parametrize("window", [None, 200])
@pytest.mark.parametrize("fp8", [False, True])
def test_paged_verify_attention(q_len, window, fp8):
    """Q query tokens per sequence (speculative verify): each row sees keys up to its own position;
    the last row of each sequence equals plain decode; a short sequence (L < Q) gives zeros where empty."""
    from model.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    gen = gen_for("pav", q_len, window, fp8)
    B, Hq, Hkv, D = 17, 32, 8, 128
    lens = ragged_lens(B, 2100, q_len)
    case = make_paged_case(gen, B, Hq, Hkv, D, 16, lens, torch.bfloat16, fp8=fp8)
    _, k, v, tables, seq_lens, max_len, (ks, vs) = case
    q = torch.randn(B * q_len, Hq, D, generator=gen, device=DEV).to(torch.bfloat16)
    ref = paged_decode_attention_ref(q, k, v, tables, seq_lens, D**-0.5, max_len, sliding_window=window,
                                     k_scale=ks, v_scale=vs)
    for splits in (None, 1, 5):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k, v, tables, seq_lens, D**-0.5, max_len, sliding_window=window, k_scale=ks,
                               v_scale=vs, out=out, num_splits=splits)
        torch.cuda.synchronize()
        assert rel_err(out, ref) <= 1e-2, splits
    last = q.view(B, q_len, Hq, D)[:, -1].contiguous()
    plain = paged_decode_attention(last, k, v, tables, seq_lens, D**-0.5, max_len, sliding_window=window,
                                   k_scale=ks, v_scale=vs)
    assert rel_err(out.view(B, q_len, Hq, D)[:, -1], plain) <= 1e-2


def test_paged_decode_attention_cuda_graph():
    """Captured once for a (batch, max-context bucket); replays with new lengths and tables are right."""
    from model.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    B, Hq, Hkv, D, bs, bucket = 8, 32, 8, 128, 16, 2048
    gen = gen_for("graph")
    q, k, v, tables, seq_lens, _, _ = make_paged_case(gen, B, Hq, Hkv, D, bs, [bucket] * B, torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        paged_decode_attention(q, k, v, tables, seq_lens, D**-0.5, bucket, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k, v, tables, seq_lens, D**-0.5, bucket, out=out)
    for seed in range(3):
        g = torch.Generator(device=DEV).manual_seed(seed)
        seq_lens.copy_(torch.randint(1, bucket + 1, (B,), generator=g, device=DEV, dtype=torch.int32))
        tables.copy_(torch.randperm(k.shape[0], generator=g, device=DEV)[: tables.numel()].view_as(tables))
        q.copy_(torch.randn(q.shape, generator=g, device=DEV))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_decode_attention_ref(q, k, v, tables, seq_lens, D**-0.5, bucket)
        assert rel_err(out, ref) <= 1e-2


# ----------------------------------------------------------------------------------------------- LoRA
# Grouped shrink/expand over fused projection groups (cases: tests/lora_kernel_cases.py). Made on the
# host with a fixed seed (the case builder draws on the CPU), then moved to the device.

LORA_SHAPES = [  # (in, member widths in the fused output, members present)
    (4096, (4096, 1024, 1024), (True, True, True)),  # Mistral-7B q,k,v
    (4096, (4096, 1024, 1024), (True, False, True)),  # q,v only: k's columns untouched
    (8192, (1024, 128, 128), (True, True, True)),  # a 70B-like q,k,v shard (GQA 8:1, TP 8)
    (4096, (14336, 14336), (True, True)),  # gate,up
    (14336, (4096,), (True,)),  # down
    (4096, (4096,), (True,)),  # o
]


def _lora_case(T, S, R, shape, dtype, seed):
    from lora_kernel_cases import make_group_case

    fan_in, widths, present = shape
    return make_group_case(torch.Generator().manual_seed(seed), T, S, R, fan_in, widths, present, dtype,
                           device=DEV)  # fmt: skip


def _check_group(lora, c, plan, dtype, splits=None):
    covered = c.slots >= 0
    v = lora.lora_shrink(c.x, c.a, c.ranks, plan, rank=c.rank, splits=splits)
    poisoned = torch.full_like(v, float("nan"))
    lora.lora_shrink(c.x, c.a, c.ranks, plan, rank=c.rank, splits=splits, out=poisoned)
    v_ref = lora.lora_shrink_ref(c.x, c.a, c.ranks, plan, rank=c.rank)
    assert rel_err(poisoned.sum(0)[covered], v_ref[0][covered]) <= 1e-2
    assert torch.isnan(poisoned[:, ~covered]).all()
    y0 = (0.05 * torch.randn(c.x.shape[0], c.y_cols, device=DEV)).to(dtype)
    y = y0.clone()
    lora.lora_expand(y, v, c.b, c.ranks, plan, rank=c.rank, slices=c.slices)
    want = c.oracle(y0)
    assert rel_err(y.double() - y0.double(), want - y0.double()) <= 1e-2
    assert torch.equal(y[~covered], y0[~covered])
    assert torch.equal(y[:, c.untouched_cols], y0[:, c.untouched_cols])


@pytest.mark.parametrize("T", [1, 8, 64, 256])
@pytest.mark.parametrize("R", [8, 16, 64, 128])
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=str)
def test_lora_grouped_decode_plan(T, R, shape):
    from model.kernels import lora

    dtype = torch.float16 if R == 64 else torch.bfloat16
    c = _lora_case(T, 8, R, shape, dtype, seed=T * 1000 + R)
    _check_group(lora, c, lora.plan_from_slots(c.slots, 8), dtype)


@pytest.mark.parametrize("T", [1, 100, 1024, 4096])
@pytest.mark.parametrize("R", [8, 16, 64, 128])
@pytest.mark.parametrize("shape", LORA_SHAPES[::2], ids=str)
def test_lora_grouped_prefill_segments(T, R, shape):
    from lora_kernel_cases import ragged_segments, slots_of_segments

    from model.kernels import lora

    dtype = torch.float16 if R == 64 else torch.bfloat16
    c = _lora_case(T, 8, R, shape, dtype, seed=T * 7 + R)
    segs = ragged_segments(torch.Generator().manual_seed(T + R), T, 8)
    c.slots = slots_of_segments(segs, T, DEV)
    _check_group(lora, c, lora.plan_from_segments(segs, T, DEV), dtype, splits=1)


@pytest.mark.parametrize("T,S", [(1, 1), (7, 3), (64, 32), (128, 64), (256, 8), (512, 128)])
def test_lora_plan_kernel_equals_torch_plan(T, S):
    from model.kernels import lora

    g = torch.Generator(device=DEV).manual_seed(T + S)
    for slots in (torch.randint(-1, S, (T,), generator=g, device=DEV, dtype=torch.int32),
                  torch.full((T,), -1, dtype=torch.int32, device=DEV),
                  torch.full((T,), S - 1, dtype=torch.int32, device=DEV)):  # fmt: skip
        got = lora.plan_from_slots(slots, S, use_kernel=True)
        ref = lora.plan_from_slots_ref(slots, S)
        assert torch.equal(got.perm, ref.perm) and torch.equal(got.tiles, ref.tiles)
        assert torch.equal(got.count, ref.count)


def test_lora_grouped_cuda_graph():
    """Plan + shrink + expand captured once; slots updated in place; every mix (all -1 too) served."""
    from model.kernels import lora

    T, S = 64, 32
    c = _lora_case(T, S, 16, LORA_SHAPES[0], torch.bfloat16, seed=5)
    y = torch.zeros(T, c.y_cols, dtype=torch.bfloat16, device=DEV)

    def step():
        plan = lora.plan_from_slots(c.slots, S)
        v = lora.lora_shrink(c.x, c.a, c.ranks, plan, rank=c.rank)
        lora.lora_expand(y, v, c.b, c.ranks, plan, rank=c.rank, slices=c.slices)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(4):
        g = torch.Generator(device=DEV).manual_seed(seed)
        slots = torch.randint(-1, S, (T,), generator=g, device=DEV, dtype=torch.int32)
        c.slots.copy_(slots if seed < 3 else torch.full_like(slots, -1))
        c.x.copy_(torch.randn(c.x.shape, generator=g, device=DEV))
        y0 = (0.05 * torch.randn(y.shape, generator=g, device=DEV)).to(y.dtype)
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        want = c.oracle(y0)
        assert rel_err(y.double() - y0.double(), want - y0.double()) <= 1e-2
        if seed == 3:  # every row on the base model: nothing changes
            assert torch.equal(y, y0)


# ------------------------------------------------------------------------------------ RMSNorm, rotary


@pytest.mark.parametrize("T", [1, 7, 64, 256, 4096])
@pytest.mark.parametrize("H", [1024, 4096, 5120])
@pytest.mark.parametrize("with_res", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_fused_add_rmsnorm(T, H, with_res, dtype, with_delta):
    from model.kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref

    gen = gen_for("rms", T, H, with_res, str(dtype), with_delta)
    x = torch.randn(T, H, generator=gen, device=DEV).to(dtype)
    res = torch.randn(T, H, generator=gen, device=DEV).to(dtype) if with_res else None
    delta = (0.3 * torch.randn(T, H, generator=gen, device=DEV)).to(dtype) if with_delta else None
    w = (1 + 0.1 * torch.randn(H, generator=gen, device=DEV)).to(dtype)
    out = torch.full_like(x, float("nan"))
    res_out = torch.full_like(x, float("nan")) if with_res or with_delta else None
    normed, new_res = fused_add_rmsnorm(x, res, w, 1e-5, out=out, residual_out=res_out, delta=delta)
    ref_normed, ref_res = fused_add_rmsnorm_ref(x, res, w, 1e-5, delta=delta)
    assert rel_err(normed, ref_normed) <= 1e-2
    assert torch.equal(new_res, ref_res)


@pytest.mark.parametrize("T", [1, 64, 4096])
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (8, 1)])
@pytest.mark.parametrize("D,bs", [(64, 256), (128, 16)])
@pytest.mark.parametrize("variant", ["half-table", "full-table", "fp8", "lora-delta"])
def test_rotary_kv_write(T, heads, D, bs, variant):
    from model.kernels.rotary import rotary_kv_write, rotary_kv_write_ref

    Hq, Hkv = heads
    gen = gen_for("rope", T, str(heads), D, bs, variant)
    max_pos = 8192
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=DEV).float() / D))
    freqs = torch.outer(torch.arange(max_pos, device=DEV).float(), inv_freq)  # [max_pos, D/2]
    if variant == "full-table":
        freqs = torch.cat((freqs, freqs), dim=-1)
    cos, sin = freqs.cos(), freqs.sin()
    qkv = torch.randn(T, Hq + 2 * Hkv, D, generator=gen, device=DEV).to(torch.bfloat16)
    positions = torch.randint(0, max_pos, (T,), generator=gen, device=DEV)
    num_blocks = T // bs + 3
    cache_dtype = torch.float8_e4m3fn if variant == "fp8" else torch.bfloat16
    shape = (num_blocks, bs, Hkv, D)
    caches = [torch.full(shape, float("nan"), device=DEV).to(cache_dtype) for _ in range(4)]  # poisoned
    slots = torch.randperm(num_blocks * bs, generator=gen, device=DEV)[:T]
    slots[torch.rand(T, generator=gen, device=DEV) < 0.2] = -1
    scales = {"k_scale": torch.tensor([0.05], device=DEV), "v_scale": torch.tensor([0.02], device=DEV)} \
        if variant == "fp8" else {}

    def views(t):
        return t[:, :Hq], t[:, Hq:Hq + Hkv], t[:, Hq + Hkv:]

    if variant == "lora-delta":  # the qkv projection's LoRA delta, added to q, k and v first
        scales["delta"] = views((0.3 * torch.randn(qkv.shape, generator=gen, device=DEV)).to(qkv.dtype))
    mine, ref = qkv.clone(), qkv.clone()
    rotary_kv_write(*views(mine), positions, cos, sin, caches[0], caches[1], slots, **scales)
    rotary_kv_write_ref(*views(ref), positions, cos, sin, caches[2], caches[3], slots, **scales)
    torch.cuda.synchronize()
    assert rel_err(mine, ref) <= 1e-2
    assert torch.equal(views(mine)[2], views(ref)[2])  # v: untouched, or + its delta rounded as torch
    written = torch.zeros(num_blocks * bs, dtype=torch.bool, device=DEV)
    written[slots[slots >= 0]] = True
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        got, want = got.view(-1, Hkv, D).float(), want.view(-1, Hkv, D).float()
        assert rel_err(got[written], want[written]) <= 1e-2
        assert torch.isnan(got[~written]).all()
