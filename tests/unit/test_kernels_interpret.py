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

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

_INTERPRETED = type(triton.language.standard.cdiv).__name__ == "InterpretedFunction"
pytestmark = [
    pytest.mark.slow,  # ~30-60 s: the interpreter runs every program of every grid in numpy
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: tests/gpu runs them natively"),
    pytest.mark.skipif(
        not torch.cuda.is_available() and not _INTERPRETED,
        reason="triton was imported before TRITON_INTERPRET=1 could be set (compiled mode, no CUDA)",
    ),
]

KERNEL_DIR = Path(__file__).resolve().parents[2] / "model" / "kernels"


def _patch_interpreter(monkeypatch) -> None:
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    orig_patch_tensor = interp._patch_lang_tensor

    def patch_tensor(tensor, scope):
        orig_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    orig_dot = interp.InterpreterBuilder.create_dot

    def as_f32(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, *args):
        return orig_dot(self, as_f32(a), as_f32(b), d, *args)

    torch_dtypes = {"fp32": (torch.float32, torch.int32, np.uint32),
                    "fp16": (torch.float16, torch.int16, np.uint16),
                    "bf16": (torch.bfloat16, torch.int16, np.uint16),
                    "fp8e4nv": (torch.float8_e4m3fn, torch.uint8, np.uint8)}
    orig_convert = interp._convert_float

    def convert_float(data, in_dt, out_dt, rounding_mode):
        if in_dt.name not in torch_dtypes or out_dt.name not in torch_dtypes or \
                in_dt.primitive_bitwidth <= out_dt.primitive_bitwidth:
            return orig_convert(data, in_dt, out_dt, rounding_mode)
        src_t, src_bits, src_np = torch_dtypes[in_dt.name]
        dst_t, dst_bits, dst_np = torch_dtypes[out_dt.name]
        raw = np.ascontiguousarray(data).view(src_np).view(getattr(np, str(src_bits).split(".")[1]))
        res = torch.from_numpy(raw).view(src_t).to(dst_t)
        return res.view(dst_bits).numpy().view(dst_np)

    monkeypatch.setattr(interp, "_convert_float", convert_float)
    monkeypatch.setattr(interp, "_patch_lang_tensor", patch_tensor)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)


def _interpreter_internals_present() -> bool:
    # the shims patch private names of triton 3.6's interpreter; another version may lack them
    import triton.runtime.interpreter as interp

    return all(hasattr(interp, n) for n in ("_convert_float", "_patch_lang_tensor", "TensorHandle")) and \
        hasattr(getattr(interp, "InterpreterBuilder", None), "create_dot")


@pytest.fixture(scope="module")
def kernels():
    """name -> freshly loaded interpreted module (paged_attention, lora, rmsnorm, rotary)."""
    if not _interpreter_internals_present():
        pytest.skip(f"triton {triton.__version__}: interpreter internals the shims patch are gone")
    mp = pytest.MonkeyPatch()
    _patch_interpreter(mp)
    mods = {}
    for name in ("paged_attention", "lora", "rmsnorm", "rotary"):
        path = KERNEL_DIR / f"{name}.py"
        if not path.exists():
            continue
        spec = importlib.util.spec_from_file_location(f"_interpreted_kernels_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    yield mods
    for mod in mods.values():
        sys.modules.pop(mod.__name__, None)
    mp.undo()


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


def test_choose_num_splits(kernels):
    pa = kernels["paged_attention"]
    assert pa.choose_num_splits(1, 8, 4096, None, 132) == 16  # long context, one sequence: split
    assert pa.choose_num_splits(64, 8, 4096, None, 132) == 1  # 512 programs already fill the chip
    assert pa.choose_num_splits(1, 8, 100, None, 132) == 1  # too short to pay for a merge
    assert pa.choose_num_splits(1, 8, 32768, 4096, 132) == 16  # the window bounds the work


# ----------------------------------------------------------------------------------------------- LoRA


def make_lora_case(gen, T, S, R, fan_in, outs, dtype, no_adapter_frac=0.25):
    """x [T, in]; A_cat [S, NT*R, in]; B_cat [S, sum(outs), R]; per-token slots with some -1."""
    nt = len(outs)
    x = torch.randn(T, fan_in, generator=gen).to(dtype)
    a = (torch.randn(S, nt * R, fan_in, generator=gen) / fan_in**0.5).to(dtype)
    b = (torch.randn(S, sum(outs), R, generator=gen) / R**0.5).to(dtype)
    idx = torch.randint(0, S, (T,), generator=gen, dtype=torch.int32)
    idx[torch.rand(T, generator=gen) < no_adapter_frac] = -1
    offsets = [0]
    for o in outs:
        offsets.append(offsets[-1] + o)
    return x, a, b, idx, tuple(offsets)


def make_segments(gen, T, S):
    """Ragged segments over [0, T) with a gap (rows in no segment) and one no-adapter segment."""
    cuts = sorted(set(torch.randint(1, T, (min(4, T - 1),), generator=gen).tolist())) if T > 1 else []
    bounds = [0, *cuts, T]
    starts, ends, slots = [], [], []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if i == 1 and e - s > 1:
            s += 1  # leave row s uncovered
        starts.append(s)
        ends.append(e)
        slots.append(-1 if i == 2 else int(torch.randint(0, S, (1,), generator=gen)))
    as_t = [torch.tensor(v, dtype=torch.int32) for v in (starts, ends, slots)]
    return (*as_t, max(e - s for s, e in zip(starts, ends, strict=True)))


LORA_CASES = [
    # T, S, R, in, outs, dtype
    (1, 3, 8, 256, (64,), torch.bfloat16),
    (7, 4, 16, 320, (64, 32, 32), torch.bfloat16),
    (37, 5, 64, 128, (96, 48), torch.float16),
    (20, 2, 128, 64, (128,), torch.bfloat16),
]


@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: f"T{c[0]}-R{c[2]}-slices{len(c[4])}")
def test_bgmv_interpret(kernels, case):
    lora = kernels["lora"]
    T, S, R, fan_in, outs, dtype = case
    gen = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    x, a, b, idx, offsets = make_lora_case(gen, T, S, R, fan_in, outs, dtype)
    v = torch.full((T, a.shape[1]), float("nan"), dtype=dtype)
    lora.bgmv_shrink(x, a, idx, out=v)
    v_ref = lora.bgmv_shrink_ref(x, a, idx)
    assert rel_err(v, v_ref) <= 1e-2
    assert torch.equal(v[idx < 0], torch.zeros_like(v[idx < 0]))

    y0 = torch.randn(T, sum(outs) + 16, generator=gen).to(dtype)[:, 8:-8]  # a strided column view
    y, y_ref = y0.clone(), y0.clone()
    lora.bgmv_expand(y, v_ref, b, idx, slice_offsets=offsets)
    lora.bgmv_expand_ref(y_ref, v_ref, b, idx, slice_offsets=offsets)
    assert rel_err(y - y0, y_ref - y0) <= 1e-2
    assert torch.equal(y[idx < 0], y0[idx < 0])

    y, y_ref = y0.clone(), y0.clone()
    lora.bgmv(y, x, a, b, idx, slice_offsets=offsets)
    lora.bgmv_ref(y_ref, x, a, b, idx, slice_offsets=offsets)
    assert rel_err(y - y0, y_ref - y0) <= 1e-2


@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: f"T{c[0]}-R{c[2]}-slices{len(c[4])}")
def test_sgmv_interpret(kernels, case):
    lora = kernels["lora"]
    T, S, R, fan_in, outs, dtype = case
    gen = torch.Generator().manual_seed(hash(str(case)) % 2**31 + 1)
    x, a, b, _, offsets = make_lora_case(gen, T, S, R, fan_in, outs, dtype)
    starts, ends, slots, max_len = make_segments(gen, T, S)
    covered = torch.zeros(T, dtype=torch.bool)
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        covered[s:e] = True
    v = torch.full((T, a.shape[1]), float("nan"), dtype=dtype)
    lora.sgmv_shrink(x, a, starts, ends, slots, max_seg_len=max_len, out=v)
    v_ref = lora.sgmv_shrink_ref(x, a, starts, ends, slots)
    assert rel_err(v[covered], v_ref[covered]) <= 1e-2
    assert torch.isnan(v[~covered]).all()  # rows outside every segment are not written
    fresh = lora.sgmv_shrink(x, a, starts, ends, slots)  # allocated by the op: uncovered rows are 0
    assert fresh[~covered].eq(0).all()

    y0 = torch.randn(T, sum(outs), generator=gen).to(dtype)
    y, y_ref = y0.clone(), y0.clone()
    lora.sgmv_expand(y, v_ref, b, starts, ends, slots, max_seg_len=max_len, slice_offsets=offsets)
    lora.sgmv_expand_ref(y_ref, v_ref, b, starts, ends, slots, slice_offsets=offsets)
    assert rel_err(y - y0, y_ref - y0) <= 1e-2
    assert torch.equal(y[~covered], y0[~covered])

    # the combined op, with the segments as host lists (the batch's host copy)
    host = [c.tolist() for c in (starts, ends, slots)]
    y, y_ref = y0.clone(), y0.clone()
    lora.sgmv(y, x, a, b, *host, slice_offsets=offsets)
    lora.sgmv_ref(y_ref, x, a, b, *host, slice_offsets=offsets)
    assert rel_err(y - y0, y_ref - y0) <= 1e-2


# ------------------------------------------------------------------------------------ RMSNorm, rotary


@pytest.mark.parametrize("T,H,with_res,dtype", [
    (1, 64, True, torch.bfloat16), (5, 96, False, torch.bfloat16),
    (9, 256, True, torch.float16), (3, 4096, True, torch.bfloat16),
])
def test_fused_add_rmsnorm_interpret(kernels, T, H, with_res, dtype):
    rms = kernels["rmsnorm"]
    gen = torch.Generator().manual_seed(T * H)
    x = torch.randn(T, H, generator=gen).to(dtype)
    res = torch.randn(T, H, generator=gen).to(dtype) if with_res else None
    w = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype)
    out = torch.full_like(x, float("nan"))
    res_out = torch.full_like(x, float("nan")) if with_res else None
    normed, new_res = rms.fused_add_rmsnorm(x, res, w, 1e-5, out=out, residual_out=res_out)
    ref_normed, ref_res = rms.fused_add_rmsnorm_ref(x, res, w, 1e-5)
    assert normed is out and rel_err(normed, ref_normed) <= 1e-2
    assert torch.equal(new_res, ref_res)  # the sum is rounded exactly as torch rounds it
    normed2, _ = rms.fused_add_rmsnorm(x, res, w, 1e-5)  # allocating path
    assert rel_err(normed2, ref_normed) <= 1e-2


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


@pytest.mark.parametrize("T,Hq,Hkv,D,bs,full,fp8", [
    (1, 4, 2, 64, 16, False, False), (13, 8, 2, 128, 16, True, False),
    (7, 6, 3, 64, 32, False, True), (20, 4, 4, 32, 64, True, False),
])
def test_rotary_kv_write_interpret(kernels, T, Hq, Hkv, D, bs, full, fp8):
    rot = kernels["rotary"]
    gen = torch.Generator().manual_seed(T + D)
    case = make_rotary_case(gen, T, Hq, Hkv, D, bs, torch.bfloat16, full, fp8)
    mine = [x.clone() for x in case]
    fused = torch.cat(case[:3], dim=1)  # the kernel gets strided views of one fused qkv output
    mine[:3] = fused[:, :Hq], fused[:, Hq:Hq + Hkv], fused[:, Hq + Hkv:]
    theirs = [x.clone() for x in case]
    scales = {"k_scale": 0.05, "v_scale": 0.02} if fp8 else {}
    rot.rotary_kv_write(*mine, **scales)
    rot.rotary_kv_write_ref(*theirs, **scales)
    if fp8:  # the same with device-resident scales (the CUDA-graph path)
        again = [x.clone() for x in case]
        again[:3] = (t.clone() for t in case[:3])
        rot.rotary_kv_write(*again, k_scale=torch.tensor([0.05]), v_scale=torch.tensor([0.02]))
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
