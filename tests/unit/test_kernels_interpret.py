"""The Triton kernels of model/kernels under the Triton interpreter (CPU, small shapes).

Runs only where triton is importable and no CUDA device is present (on the GPU machine the same checks
run natively in tests/gpu/test_kernels.py). triton.jit decides interpreter vs compiler when a function is
decorated, triton's own tl.* helpers included, so TRITON_INTERPRET=1 must be set before triton is first
imported: tests/conftest.py does that without CUDA (transformers and peft import triton), and so does this
module for a run that bypasses it. The kernel modules are loaded fresh under private names.

Two shims patch triton 3.6's interpreter for this process (never the kernels):
  * scalars loaded from memory are 1-element numpy arrays, and numpy 2 refuses int() on them, which
    breaks `range(lo, hi)` with loaded bounds;
  * numpy has no bfloat16, the interpreter keeps bf16 as raw uint16 and tl.dot multiplied the raw bits;
  * its float down-casts (fp32 -> bf16/fp16/fp8) truncate, where the GPU (and torch) round to nearest
    even: they are routed through torch so that exact-rounding checks mean the same on CPU and GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

_INTERPRETED = type(triton.language.standard.cdiv).__name__ == "InterpretedFunction"
# Every interpreter test module's marks (test_lora_kernels_interpret.py and test_gemm_interpret.py too)
INTERPRETER_MARKS = [
    pytest.mark.slow,  # ~30-60 s: the interpreter runs every program of every grid in numpy
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: tests/gpu runs them natively"),
    pytest.mark.skipif(
        not torch.cuda.is_available() and not _INTERPRETED,
        reason="triton was imported before TRITON_INTERPRET=1 could be set (compiled mode, no CUDA)",
    ),
]
pytestmark = INTERPRETER_MARKS

from triton_interpret import interpreted  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(scope="module")
def kernels():
    """name -> interpreted module (paged_attention, rmsnorm, rotary, dora, activation; LoRA: its own test
    file)."""
    with interpreted(("paged_attention", "rmsnorm", "rotary", "dora", "activation")) as mods:
        yield mods


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element or bad math)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------- paged attention


def make_paged_case(gen, B, Hq, Hkv, D, block_size, lens, dtype, fp8=False, extra_blocks=3):
    """Random cache with shuffled, non-contiguous block tables and random (non-zero) contents."""
    max_len = max(lens)
    per_seq = math.ceil(max_len / block_size)
    num_blocks = B * per_seq + extra_blocks
    k = torch.randn(num_blocks, block_size, Hkv, D, generator=gen)
    v = torch.randn(num_blocks, block_size, Hkv, D, generator=gen)
    scales = (None, None)
    if fp8:
        k, v = (k * 40).to(torch.float8_e4m3fn), (v * 40).to(torch.float8_e4m3fn)
        scales = (1 / 40, 1 / 40)
    else:
        k, v = k.to(dtype), v.to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: B * per_seq].view(B, per_seq).to(torch.int32)
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return q, k, v, tables, seq_lens, max_len, scales


PAGED_CASES = [
    # B, Hq, Hkv, D, block_size, lens, window, num_splits, dtype, fp8
    (2, 8, 2, 64, 16, [1, 37], None, None, torch.bfloat16, False),
    (3, 8, 1, 128, 32, [100, 5, 300], None, None, torch.bfloat16, False),
    (2, 4, 4, 64, 256, [300, 17], None, 3, torch.float16, False),
    (2, 16, 2, 128, 64, [200, 130], 50, 2, torch.bfloat16, False),
    (2, 8, 2, 64, 128, [90, 1], 16, None, torch.float16, False),
    (2, 8, 2, 64, 16, [90, 33], None, 4, torch.bfloat16, True),
    (1, 2, 1, 128, 16, [1], None, 2, torch.bfloat16, False),
    (2, 9, 3, 64, 16, [45, 3], None, None, torch.bfloat16, False),  # SmolLM2's 9/3 heads: a group of 3
]


@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: f"B{c[0]}-G{c[1] // c[2]}-D{c[3]}-bs{c[4]}")
def test_paged_decode_attention_interpret(kernels, case):
    pa = kernels["paged_attention"]
    B, Hq, Hkv, D, bs, lens, window, splits, dtype, fp8 = case
    gen = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    q, k, v, tables, seq_lens, max_len, (ks, vs) = make_paged_case(gen, B, Hq, Hkv, D, bs, lens, dtype, fp8)
    out = torch.full_like(q, float("nan"))
    pa.paged_decode_attention(q, k, v, tables, seq_lens, D**-0.5, max_len, sliding_window=window,
                              k_scale=ks, v_scale=vs, out=out, num_splits=splits)
    ref = pa.paged_decode_attention_ref(q, k, v, tables, seq_lens, D**-0.5, max_len, sliding_window=window,
                                        k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) <= 1e-2


def test_paged_decode_scales_as_tensors_and_empty_rows(kernels):
    pa = kernels["paged_attention"]
    gen = torch.Generator().manual_seed(7)
    q, k, v, tables, seq_lens, max_len, _ = make_paged_case(gen, 3, 8, 2, 64, 16, [40, 0, 70],
                                                            torch.bfloat16, fp8=True)
    ks, vs = torch.tensor([1 / 40]), torch.tensor([1 / 40])
    for splits in (1, 3):
        out = torch.full_like(q, float("nan"))
        pa.paged_decode_attention(q, k, v, tables, seq_lens, 0.125, max_len, k_scale=ks, v_scale=vs, out=out,
                                  num_splits=splits)
        ref = pa.paged_decode_attention_ref(q, k, v, tables, seq_lens, 0.125, max_len, k_scale=ks,
                                            v_scale=vs)
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # seq_len 0 (graph padding) -> zeros
        assert rel_err(out, ref) <= 1e-2


VERIFY_CASES = [
    # B, Hq, Hkv, D, block_size, lens, window, num_splits, dtype, fp8, Q
    (2, 8, 2, 64, 16, [5, 37], None, None, torch.float32, False, 3),
    (3, 8, 1, 64, 16, [100, 6, 2], 20, 2, torch.bfloat16, False, 5),
    (2, 8, 2, 64, 16, [90, 33], None, 1, torch.bfloat16, True, 2),
]


@pytest.mark.parametrize("case", VERIFY_CASES, ids=lambda c: f"B{c[0]}-Q{c[10]}-W{c[6]}")
def test_paged_verify_attention_interpret(kernels, case):
    """Q query tokens per sequence: the kernel and its reference agree, and query i of each sequence
    equals a plain decode at length L - (Q - 1 - i) (a sequence shorter than Q gives zero rows)."""
    pa = kernels["paged_attention"]
    B, Hq, Hkv, D, bs, lens, window, splits, dtype, fp8, Q = case
    gen = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    _, k, v, tables, seq_lens, max_len, (ks, vs) = make_paged_case(gen, B, Hq, Hkv, D, bs, lens, dtype, fp8)
    q = torch.randn(B * Q, Hq, D, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    kw = dict(sliding_window=window, k_scale=ks, v_scale=vs)
    pa.paged_decode_attention(q, k, v, tables, seq_lens, D**-0.5, max_len, out=out, num_splits=splits, **kw)
    ref = pa.paged_decode_attention_ref(q, k, v, tables, seq_lens, D**-0.5, max_len, **kw)
    assert rel_err(out, ref) <= 1e-2
    for i in range(Q):
        lens_i = (seq_lens - (Q - 1 - i)).clamp(min=0)
        one = pa.paged_decode_attention_ref(q.view(B, Q, Hq, D)[:, i].contiguous(), k, v, tables, lens_i,
                                            D**-0.5, max_len, **kw)
        assert rel_err(ref.view(B, Q, Hq, D)[:, i], one) <= 1e-6


def test_choose_num_splits(kernels):
    pa = kernels["paged_attention"]
    assert pa.choose_num_splits(1, 8, 4096, None, 132) == 16  # long context, one sequence: split
    assert pa.choose_num_splits(64, 8, 4096, None, 132) == 1  # 512 programs already fill the chip
    assert pa.choose_num_splits(1, 8, 100, None, 132) == 1  # too short to pay for a merge
    assert pa.choose_num_splits(1, 8, 32768, 4096, 132) == 16  # the window bounds the work
    # plain decode splits down to one 64-token tile while that still leaves programs under ~2 waves
    assert pa.choose_num_splits(1, 8, 1024, None, 132, 64) == 16
    assert pa.choose_num_splits(4, 8, 1024, None, 132, 64) == 9  # capped at ~2 waves (264 programs)
    assert pa.choose_num_splits(32, 8, 1024, None, 132, 64) == 2  # as with 256-token splits


def test_paged_decode_one_tile_splits_interpret(kernels):
    """The default split of one decode row: one KV tile a split, most of them empty for a short
    sequence in a long context bucket (16 splits, 3 with keys), merged to the reference."""
    pa = kernels["paged_attention"]
    gen = torch.Generator().manual_seed(11)
    q, k, v, tables, seq_lens, _, _ = make_paged_case(gen, 1, 8, 2, 64, 16, [150], torch.bfloat16)
    assert pa.choose_num_splits(1, 2, 1024, None, 132, 64) == 16
    out = torch.full_like(q, float("nan"))
    pa.paged_decode_attention(q, k, v, tables, seq_lens, 0.125, 1024, out=out)
    ref = pa.paged_decode_attention_ref(q, k, v, tables, seq_lens, 0.125, 1024)
    assert rel_err(out, ref) <= 1e-2


# ----------------------------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dora_scale_rows_interpret(kernels, dtype):
    dora = kernels["dora"]
    gen = torch.Generator().manual_seed(5)
    scales = 0.5 + torch.rand(3, 80, generator=gen)  # [S, out] float32
    idx = torch.tensor([2, -1, 0, 0, -1, 1, 2], dtype=torch.int32)
    y0 = torch.randn(7, 96, generator=gen).to(dtype)[:, 8:-8]  # a strided column view [T, 80]
    y, y_ref = y0.clone(), y0.clone()
    dora.scale_rows(y, scales, idx, block_n=32)
    dora.scale_rows_ref(y_ref, scales, idx)
    assert torch.equal(y, y_ref)  # one float32 product, one rounding: bit-identical
    assert torch.equal(y[idx < 0], y0[idx < 0]) and not torch.equal(y[idx >= 0], y0[idx >= 0])


# ------------------------------------------------------------------------------------ RMSNorm, rotary


@pytest.mark.parametrize("T,H,with_res,dtype,with_delta", [
    (1, 64, True, torch.bfloat16, False), (5, 96, False, torch.bfloat16, False),
    (9, 256, True, torch.float16, False), (3, 4096, True, torch.bfloat16, False),
    (4, 96, True, torch.bfloat16, True), (2, 64, False, torch.bfloat16, True),
])
def test_fused_add_rmsnorm_interpret(kernels, T, H, with_res, dtype, with_delta):
    rms = kernels["rmsnorm"]
    gen = torch.Generator().manual_seed(T * H)
    x = torch.randn(T, H, generator=gen).to(dtype)
    res = torch.randn(T, H, generator=gen).to(dtype) if with_res else None
    delta = (0.3 * torch.randn(T, H, generator=gen)).to(dtype) if with_delta else None  # a LoRA delta of x
    w = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype)
    out = torch.full_like(x, float("nan"))
    res_out = torch.full_like(x, float("nan")) if with_res or with_delta else None
    normed, new_res = rms.fused_add_rmsnorm(x, res, w, 1e-5, out=out, residual_out=res_out, delta=delta)
    ref_normed, ref_res = rms.fused_add_rmsnorm_ref(x, res, w, 1e-5, delta=delta)
    assert normed is out and rel_err(normed, ref_normed) <= 1e-2
    assert torch.equal(new_res, ref_res)  # the sums are rounded exactly as torch rounds them
    normed2, _ = rms.fused_add_rmsnorm(x, res, w, 1e-5, delta=delta)  # allocating path
    assert rel_err(normed2, ref_normed) <= 1e-2


@pytest.mark.parametrize("T,inter,with_delta", [(1, 64, False), (3, 1500, True), (2, 2048, True)])
def test_silu_and_mul_interpret(kernels, T, inter, with_delta):
    act = kernels["activation"]
    gen = torch.Generator().manual_seed(T + inter)
    gate_up = torch.randn(T, 2 * inter, generator=gen).bfloat16()
    delta = (0.3 * torch.randn(T, 2 * inter, generator=gen)).bfloat16() if with_delta else None
    out = torch.full((T, inter), float("nan")).bfloat16()
    act.silu_and_mul(gate_up, out=out, delta=delta)
    assert torch.equal(out, act.silu_and_mul_ref(gate_up, delta=delta))  # rounded as torch rounds


def test_rmsnorm_ref_matches_transformers(kernels):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    rms = kernels["rmsnorm"]
    del transformers
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=gen).bfloat16()
    res = torch.randn(4, 64, generator=gen).bfloat16()
    norm = MistralRMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=gen))
        normed, new_res = rms.fused_add_rmsnorm_ref(x, res, norm.weight, 1e-6)
        assert torch.equal(new_res, res + x)
        assert torch.equal(normed, norm(res + x))


def make_rotary_case(gen, T, Hq, Hkv, D, block_size, dtype, full_table, fp8=False):
    max_pos = 64
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)  # [max_pos, D/2]
    if full_table:
        freqs = torch.cat((freqs, freqs), dim=-1)  # HF's emb layout [max_pos, D]
    qkv = torch.randn(T, Hq + 2 * Hkv, D, generator=gen).to(dtype)  # fused projection output
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    positions = torch.randint(0, max_pos, (T,), generator=gen)
    num_blocks = T // block_size + 2
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    k_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan")).to(cache_dtype)
    v_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan")).to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[torch.rand(T, generator=gen) < 0.2] = -1
    return q, k, v, positions, freqs.cos(), freqs.sin(), k_cache, v_cache, slots


@pytest.mark.parametrize("T,Hq,Hkv,D,bs,full,fp8,with_delta", [
    (1, 4, 2, 64, 16, False, False, False), (13, 8, 2, 128, 16, True, False, False),
    (7, 6, 3, 64, 32, False, True, False), (20, 4, 4, 32, 64, True, False, False),
    (5, 8, 2, 64, 16, False, False, True), (6, 6, 3, 64, 32, False, True, True),
])
def test_rotary_kv_write_interpret(kernels, T, Hq, Hkv, D, bs, full, fp8, with_delta):
    rot = kernels["rotary"]
    gen = torch.Generator().manual_seed(T + D)
    case = make_rotary_case(gen, T, Hq, Hkv, D, bs, torch.bfloat16, full, fp8)
    mine = [x.clone() for x in case]
    fused = torch.cat(case[:3], dim=1)  # the kernel gets strided views of one fused qkv output
    mine[:3] = fused[:, :Hq], fused[:, Hq:Hq + Hkv], fused[:, Hq + Hkv:]
    theirs = [x.clone() for x in case]
    scales = {"k_scale": 0.05, "v_scale": 0.02} if fp8 else {}
    delta = None
    if with_delta:  # the qkv projection's LoRA delta: views of one [T, H, D] buffer, as the model passes
        d = (0.3 * torch.randn(T, Hq + 2 * Hkv, D, generator=gen)).bfloat16()
        delta = (d[:, :Hq], d[:, Hq:Hq + Hkv], d[:, Hq + Hkv:])
    rot.rotary_kv_write(*mine, **scales, delta=delta)
    rot.rotary_kv_write_ref(*theirs, **scales, delta=delta)
    if with_delta:
        assert torch.equal(mine[2], theirs[2])  # v + its delta, in place
    if fp8:  # the same with device-resident scales (the CUDA-graph path)
        again = [x.clone() for x in case]
        again[:3] = (t.clone() for t in case[:3])
        rot.rotary_kv_write(*again, k_scale=torch.tensor([0.05]), v_scale=torch.tensor([0.02]), delta=delta)
        assert torch.equal(again[6].view(torch.uint8), mine[6].view(torch.uint8))
        assert torch.equal(again[7].view(torch.uint8), mine[7].view(torch.uint8))
    for i in (0, 1):  # q, k rotated in place
        assert rel_err(mine[i], theirs[i]) <= 1e-2
    written = torch.zeros(mine[6].shape[0] * bs, dtype=torch.bool)
    written[case[8][case[8] >= 0]] = True
    for i in (6, 7):  # caches: written rows match, the rest stay poisoned
        got = mine[i].view(-1, Hkv, D).float()
        want = theirs[i].view(-1, Hkv, D).float()
        assert rel_err(got[written], want[written]) <= (2e-2 if fp8 else 1e-2)
        assert torch.isnan(got[~written]).all()


def test_rotary_ref_matches_transformers(kernels):
    pytest.importorskip("transformers")
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    rot = kernels["rotary"]
    gen = torch.Generator().manual_seed(1)
    q, k, v, positions, cos, sin, kc, vc, slots = make_rotary_case(gen, 5, 4, 2, 64, 16, torch.float32, True)
    heads_first = (q.transpose(0, 1)[None], k.transpose(0, 1)[None])  # HF: [batch, heads, seq, D]
    want_q, want_k = apply_rotary_pos_emb(*heads_first, cos[positions][None], sin[positions][None])
    rot.rotary_kv_write_ref(q, k, v, positions, cos, sin, kc, vc, slots)
    assert torch.allclose(q, want_q[0].transpose(0, 1), atol=1e-6)
    assert torch.allclose(k, want_k[0].transpose(0, 1), atol=1e-6)
