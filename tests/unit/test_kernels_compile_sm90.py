"""Every Triton kernel of model/kernels builds for Hopper (sm_90) on a machine without a GPU.

The interpreter (test_kernels_interpret.py) does not type-check like the compiler; this test runs the
real compiler (ptxas from the triton wheel, no driver needed) in a child process without
TRITON_INTERPRET. Skipped where triton is not installed (CI); the GPU machine runs the kernels natively.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

KERNEL_DIR = Path(__file__).resolve().parents[2] / "model" / "kernels"

_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model.kernels import activation, gemv_rope, lora, lora_plan, paged_attention as pa, rmsnorm, rotary

PTR = {"bt": "*i32", "lens": "*i32", "idx": "*i32", "starts": "*i32", "ends": "*i32", "slots": "*i32",
       "part_o": "*fp32", "part_m": "*fp32", "part_l": "*fp32", "k_scale": "*fp32", "v_scale": "*fp32",
       "cos": "*fp32", "sin": "*fp32", "pos": "*i64", "slot": "*i64", "ranks": "*i32", "perm": "*i32",
       "tiles": "*i32", "v": "*fp32", "scratch": "*i32", "count": "*i32", "sem": "*i32", "part": "*fp32",
       "lora_rows": "*i32", "cnt": "*i32"}
FLOATS = {"qk_scale", "v_scale_val", "eps", "k_inv", "v_inv"}
CASES = [
    (pa._paged_decode_kernel, dict(G=4, G_PAD=16, D=128, BLOCK_SIZE=16, BLOCK_N=64, SCALE_FROM_PTR=False,
                                   SPLIT=True)),
    (pa._paged_decode_kernel, dict(G=8, G_PAD=16, D=64, BLOCK_SIZE=256, BLOCK_N=64, SCALE_FROM_PTR=True,
                                   SPLIT=False, PDL=True),
     {"k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv"}),
    (pa._merge_splits_kernel, dict(D=128, S_PAD=16, PDL=True)),
    (lora._shrink_kernel, dict(HAS_PERM=True, SPLITS=8, NBLK=1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)),
    (lora._shrink_kernel, dict(HAS_PERM=False, SPLITS=1, NBLK=2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)),
    (lora._expand_kernel, dict(HAS_PERM=True, SPLITS=1, NBLK=48, R=16, NT=3, NT_PAD=4, R_PAD=16, UNIFORM=True,
                               BLOCK_M=16, BLOCK_N=128, STORE=True)),
    (lora._expand_kernel, dict(HAS_PERM=True, SPLITS=2, NBLK=7, R=16, NT=3, NT_PAD=4, R_PAD=16, UNIFORM=False,
                               BLOCK_M=16, BLOCK_N=128, STORE=True)),
    (lora._expand_kernel, dict(HAS_PERM=False, SPLITS=1, NBLK=64, R=128, NT=1, NT_PAD=1, R_PAD=128,
                               UNIFORM=True, BLOCK_M=64, BLOCK_N=64, STORE=False)),
    (lora_plan._plan_kernel, dict(T_PAD=256, CHUNK=32, BLOCK_M=16, J_PAD=16, TILES_PAD=512, SEM_PAD=4096)),
    (rmsnorm._add_rmsnorm_kernel, dict(BLOCK=4096, HAS_RES=True, HAS_DELTA=False, STORE_SUM=True)),
    (rmsnorm._add_rmsnorm_kernel, dict(BLOCK=4096, HAS_RES=True, HAS_DELTA=True, STORE_SUM=True,
                                       PDL_TRIGGER=True)),
    (rotary._rotary_kv_kernel, dict(HQ_PAD=32, HKV_PAD=8, HALF=64, FP8=False, SCALE_FROM_PTR=False,
                                    HAS_DELTA=False, PDL=True)),
    (rotary._rotary_kv_kernel, dict(HQ_PAD=32, HKV_PAD=8, HALF=64, FP8=True, SCALE_FROM_PTR=True,
                                    HAS_DELTA=True), {"kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv"}),
    (activation._silu_mul_kernel, dict(BLOCK=1024, HAS_DELTA=True, PDL_TRIGGER=True)),
    (gemv_rope._qkv_rope_kernel, dict(HALF=64, PAIRS=32, BLOCK_K=128, SPLIT_K=4, FULL_K=4096, PDL=True,
                                      FP8=False, SCALE_FROM_PTR=False)),
]
for fn, consts, *types in CASES:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = (types[0] if types else {}).get(name) or PTR.get(name[:-4], "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the runtime sees for torch allocations
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=4, num_stages=2))
    print("compiled", fn.__name__, consts)
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """Build every kernel for Hopper in a child process (no TRITON_INTERPRET there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(KERNEL_DIR.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 15
