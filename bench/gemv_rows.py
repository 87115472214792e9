"""What computing the norm / silu_and_mul inside the one-row GEMV costs, kernel by kernel (GPU).

    python -m bench.gemv_rows [--out FILE]

At each Mistral-7B projection shape: the plain GEMV of model/kernels/gemm.py, the same GEMV computing its
row (gemv_rmsnorm, gemv_silu_mul) or adding the residual in its epilogue (`add`), and the standalone
kernel it replaces (fused_add_rmsnorm, silu_and_mul): 20 launches captured in a CUDA graph, each on
another copy of W (2.5 x L2 of weights rotated, as a model's layers are), median us a launch. A fused
GEMV pays if it costs less than the plain GEMV plus the kernel it replaces.

First run (h200-gemv-rows-2026-12-01-a.json, an earlier version whose norm GEMV also added the residual
and wrote x + residual): gate_up 73.1 us against 56.5 plain. 157 registers a thread (128 without the
residual) leave 3 programs an SM instead of 4, and gate_up's 448 programs then take two waves. So the
residual add moved to the epilogue of the GEMV that produces x (o_proj / down_proj), where it is one load
per output element. Second run (h200-gemv-rows-2026-12-01.json): each fused GEMV costs 0.1-1.0 us more
than the plain one and saves a 1.5-1.9 us kernel.
"""

from __future__ import annotations

import argparse
import math

import torch

from bench.common import median, time_ms, write_results

SHAPES = {"qkv": (6144, 4096, "norm"), "o": (4096, 4096, "add"), "gate_up": (28672, 4096, "norm"),
          "down": (4096, 14336, "silu")}
LAUNCHES = 20


def graph_us(fn, dev) -> float:
    fn(0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(LAUNCHES):
            fn(i)
    return median(time_ms(g.replay, dev, 3, 15)) * 1e3 / LAUNCHES


def shape_cases(n: int, k: int, kind: str, dev) -> dict:
    """case name -> fn(i) launching it on weight copy i (rotated past L2)."""
    from model.kernels.activation import silu_and_mul
    from model.kernels.gemm import GemmConfig, GemmWorkspace, gemm, gemv_rmsnorm, gemv_silu_mul
    from model.kernels.rmsnorm import fused_add_rmsnorm
    from model.layers.gemv import gemv_shape_config

    cfg = GemmConfig(block_m=1, gemv=True, num_stages=1, **gemv_shape_config(n, k))
    ws = GemmWorkspace.for_shapes(dev, [(cfg, 1, n)])
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    copies = max(2, math.ceil(2.5 * l2 / (n * k * 2)))
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    res = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    out_res = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
    nw = torch.ones(k, device=dev, dtype=torch.bfloat16)
    gate_up = torch.randn(1, 2 * k, device=dev, dtype=torch.bfloat16)

    def w(i):
        return weights[i % copies]

    cases = {"gemv": lambda i: gemm(x, w(i), cfg, ws)}
    if kind == "norm":
        cases["gemv_rmsnorm"] = lambda i: gemv_rmsnorm(x, nw, 1e-5, w(i), cfg, ws)
        cases["add_rmsnorm alone"] = lambda i: fused_add_rmsnorm(x, res, nw, 1e-5)
        if n == 6144:  # Mistral-7B qkv: Hq 32, Hkv 8, D 128; rope + K/V write in the GEMV or after it
            cases.update(rope_cases(x, nw, w, cfg, ws, dev))
    elif kind == "add":
        cases["gemv+add"] = lambda i: gemm(x, w(i), cfg, ws, add=out_res)
    else:
        cases["gemv_silu_mul+add"] = lambda i: gemv_silu_mul(gate_up, w(i), cfg, ws, add=out_res)
        cases["silu_and_mul alone"] = lambda i: silu_and_mul(gate_up)
    return {name: (fn, cfg) for name, fn in cases.items()}


def rope_cases(x, nw, w, cfg, ws, dev) -> dict:
    from model.kernels.gemv_rope import qkv_rope_gemv
    from model.kernels.rotary import rotary_kv_write

    hq, hkv, d = 32, 8, 128
    cos = sin = torch.rand(1, d // 2, device=dev, dtype=torch.bfloat16)
    kc, vc = (torch.zeros(4, 16, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    pos = torch.zeros(1, dtype=torch.int64, device=dev)
    slots = torch.full((1,), 5, dtype=torch.int64, device=dev)
    qkv = torch.randn(1, (hq + 2 * hkv) * d, device=dev, dtype=torch.bfloat16)
    heads = qkv.view(1, -1, d)

    def rope_alone(i):
        q, k, v = heads[:, :hq], heads[:, hq : hq + hkv], heads[:, hq + hkv :]
        rotary_kv_write(q, k, v, pos, cos, sin, kc, vc, slots)

    def fused(i):
        qkv_rope_gemv(x, nw, 1e-5, w(i), cfg, ws, pos, cos, sin, kc, vc, slots, hq, hkv)

    return {"rotary_kv_write alone": rope_alone, "qkv_rope_gemv": fused}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "rows": []}
    for name, (n, k, kind) in SHAPES.items():
        for case, (fn, cfg) in shape_cases(n, k, kind, dev).items():
            us = graph_us(fn, dev)
            out["rows"].append({"shape": name, "N": n, "K": k, "case": case, "us": us, "config": cfg.short()})
            print(f"{name:8s} {case:20s} {us:7.2f} us")
        torch.cuda.empty_cache()
    write_results(args.out, out)


if __name__ == "__main__":
    main()
