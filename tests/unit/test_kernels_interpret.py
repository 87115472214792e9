"""The Triton kernels of model/kernels under the Triton interpreter (CPU, small shapes).

Runs only where triton is importable and no CUDA device is present (on the GPU machine the same checks
run natively in tests/gpu/test_kernels.py). triton.jit decides interpreter vs compiler when a function is
decorated, triton's own tl.* helpers included, so TRITON_INTERPRET=1 is set here before triton is first
imported (CPU only; the process cannot run compiled Triton anyway), and the kernel modules are loaded
fresh under private names (a copy imported earlier by other code would be compiled-mode).

Two shims patch triton 3.6's interpreter for this process (never the kernels):
  * scalars loaded from memory are 1-element numpy arrays, and numpy 2 refuses int() on them, which
    breaks `range(lo, hi)` with loaded bounds;
  * numpy has no bfloat16, the interpreter keeps bf16 as raw uint16 and tl.dot multiplied the raw bits.
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

    monkeypatch.setattr(interp, "_patch_lang_tensor", patch_tensor)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture(scope="module")
def kernels():
    """name -> freshly loaded interpreted module (paged_attention, lora, rmsnorm, rotary)."""
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
