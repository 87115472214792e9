"""model/kernels/gemm.py builds for Hopper (sm_90) without a GPU, on the paths meant for it.

A child process without TRITON_INTERPRET runs the real compiler (ptxas and cuobjdump from the triton
wheel) on representative configs and reads the SASS: tl.dot tiles with BLOCK_M >= 64, and swap-AB tiles
at 16 tokens, must issue wgmma (HGMMA); the GEMV must load W in 16-byte vectors (LDG.E.128) with split-K
too (the K chunk offset is declared a multiple of BLOCK_K); nothing spills to local memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model.kernels import gemm as gm

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
CASES = [
    gm.GemmConfig(gemv=True, block_m=1, block_n=64, block_k=128, split_k=4, num_stages=1),
    gm.GemmConfig(gemv=True, block_m=4, block_n=16, block_k=128, split_k=2, num_stages=1),
    gm.GemmConfig(block_m=16, block_n=64, block_k=128, split_k=2, swap_ab=True),
    gm.GemmConfig(block_m=64, block_n=128, block_k=64, split_k=1),
    gm.GemmConfig(block_m=128, block_n=128, block_k=64, split_k=2, num_warps=8),
    # the one-row GEMV computing its row: RMSNorm of a 4096-wide row; silu_and_mul, adding the residual
    gm.GemmConfig(gemv=True, block_m=1, block_n=64, block_k=128, split_k=4, num_stages=1),
    gm.GemmConfig(gemv=True, block_m=1, block_n=32, block_k=256, split_k=4, num_stages=1),
]
PROLOGUES = {5: dict(PROLOGUE=gm.ROW_RMSNORM, FULL_K=4096), 6: dict(PROLOGUE=gm.ROW_SILU_MUL, ADD=True)}
for i, cfg in enumerate(CASES):
    fn = gm._gemv_kernel if cfg.gemv else gm._gemm_kernel
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k)
    if cfg.gemv:  # the first one as a programmatic dependent (griddepcontrol.wait / launch_dependents)
        consts.update(PDL=i in (0, 5, 6), **{**dict(PROLOGUE=gm.ROW_PLAIN, FULL_K=16, ADD=False),
                                              **PROLOGUES.get(i, {})})
    else:
        consts.update(GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab, DOT_PREC=None)
    split = cfg.split_k > 1
    types = {"part_ptr": "*fp32" if split else "*bf16", "cnt_ptr": "*i32" if split else "*bf16"}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        else:
            scalar = "fp32" if name == "eps" else "i32"
            sig[name] = types.get(name, "*bf16") if name.endswith("_ptr") else scalar
            if name not in ("M", "eps"):  # as at run time: 16-aligned pointers, N and K multiples of 64
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 64),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        sass = subprocess.run([BIN, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([BIN, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    pdl = sass.count("ACQBULK") + sass.count("PREEXIT")  # griddepcontrol.wait / .launch_dependents
    print(f"RESULT {cfg.short()}|{sass.count('HGMMA')}|{sass.count('LDG.E.128')}|{sass.count('LDL')}|{stack}"
          f"|{pdl}")
"""


def test_gemm_kernels_compile_for_sm90_with_wgmma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    rows = [line.split(" ", 1)[1].split("|") for line in lines if line.startswith("RESULT")]
    assert len(rows) == 7, proc.stdout
    for i, (short, hgmma, ldg128, ldl, stack, pdl) in enumerate(rows):
        assert int(ldl) == 0 and int(stack) == 0, f"{short}: local memory"
        assert (int(pdl) > 0) == (i in (0, 5, 6)), f"{short}: griddepcontrol only in the dependent builds"
        if short.startswith("gemv"):
            assert int(ldg128) > 0 and int(hgmma) == 0, f"{short}: W not in 16-byte loads"
        else:
            assert int(hgmma) > 0, f"{short}: no wgmma"
