"""cuBLAS vs cuBLASLt vs padded cuBLAS vs the Triton GEMM/GEMV (model/kernels/gemm.py), one GPU run.

    python -m bench.gemm_variants --out FILE [--jobs 8] [--no-rotate] [--shapes qkv,o] [--ms 1,160]

For each Mistral-7B projection (qkv, o, gate_up, down) and M in MS tokens, y = x @ W^T in bf16:
  cublas     F.linear (torch's default BLAS)
  cublaslt   F.linear with torch.backends.cuda.preferred_blas_library("cublaslt") (restored afterwards)
  pad64/128  F.linear on x padded with zero rows to M rounded up to 64 / 128 (the matmul only; the
             padding copy is timed once and reported as pad_copy_us)
  triton     the kernel over config_grid(M) (<= 12 configs per M bucket), each checked against F.linear
             once (max abs diff) before timing; results off by more than 4 bf16 ulps are never "best"
Timing: 20 launches captured in one CUDA graph, median of 10 replays / 20. With rotation (default) the
launches cycle over enough copies of W that they exceed ~2.5x the L2, so each launch streams its weight
from HBM as a model layer does (the next layer's weight is another tensor); --no-rotate reuses one W.
Fraction = weight bytes / time / copy bandwidth (bench.common.copy_bandwidth_gbps, measured here).
Triton configs are compiled first in --jobs worker processes (tiny shapes, same specialisation: M is not
specialised, N and K are multiples of 16), so the timing pass only loads them from Triton's disk cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth_gbps, median, time_ms
from model.kernels.gemm import GemmConfig, GemmWorkspace, gemm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # N, K
MS = (1, 2, 4, 8, 16, 32, 64, 128, 160, 256)
REPS = 20
LAYERS = 32
ELEM = 2  # bf16


def _gemv(bm, bn, bk, s, w=4):
    return GemmConfig(block_m=bm, block_n=bn, block_k=bk, split_k=s, num_warps=w, num_stages=1, gemv=True)


def _dot(bm, bn, bk, s, w=4, st=4, swap=False, g=8):
    return GemmConfig(block_m=bm, block_n=bn, block_k=bk, split_k=s, group_m=g, num_warps=w, num_stages=st,
                      swap_ab=swap)  # fmt: skip


def config_grid(m: int) -> list[GemmConfig]:
    """Triton configs tried at M tokens. M=1: GEMV tiles from 16 to 128 W rows and split-K up to 8 (o and
    down have only N/BLOCK_N column blocks for 132 SMs); M<=8: GEMV with every row per program plus
    swap-AB dots at 16 tokens; 16..32: swap-AB (W rows on wgmma's 64-row side) and mma.sync at BM=M;
    64: wgmma at BM=64 both ways round; 128..256: BM 64/128/256 tiles, split 1/2 for N=4096's few tiles."""
    if m == 1:
        return [_gemv(1, 64, 128, 1), _gemv(1, 64, 128, 2), _gemv(1, 64, 128, 4), _gemv(1, 32, 128, 2),
                _gemv(1, 32, 256, 4), _gemv(1, 16, 256, 4), _gemv(1, 128, 64, 4), _gemv(1, 128, 128, 2, 8),
                _gemv(1, 64, 256, 2, 8), _gemv(1, 32, 128, 8), _dot(16, 64, 128, 4, swap=True),
                _dot(16, 128, 64, 2, swap=True)]  # fmt: skip
    if m <= 8:
        bm = 1 << (m - 1).bit_length()
        return [_gemv(bm, 16, 128, 1), _gemv(bm, 16, 128, 2), _gemv(bm, 16, 128, 4), _gemv(bm, 32, 64, 2),
                _gemv(bm, 32, 128, 2, 8), _gemv(bm, 32, 128, 4, 8), _gemv(bm, 16, 256, 2, 8),
                _gemv(bm, 64, 64, 4, 8), _dot(16, 64, 128, 1, swap=True), _dot(16, 64, 128, 2, swap=True),
                _dot(16, 128, 64, 4, swap=True), _dot(16, 64, 64, 4, st=5, swap=True)]  # fmt: skip
    if m <= 32:
        bm = max(16, 1 << (m - 1).bit_length())
        return [_dot(bm, 64, 128, 1, swap=True), _dot(bm, 64, 128, 2, swap=True),
                _dot(bm, 64, 64, 4, st=5, swap=True), _dot(bm, 128, 64, 1, swap=True),
                _dot(bm, 128, 64, 2, swap=True), _dot(bm, 128, 128, 2, st=3, swap=True),
                _dot(bm, 128, 128, 4, w=8, st=3, swap=True), _dot(bm, 256, 64, 1, w=8, st=3, swap=True),
                _dot(bm, 64, 64, 1), _dot(bm, 64, 128, 2), _dot(bm, 128, 64, 2)]  # fmt: skip
    if m <= 64:
        return [_dot(64, 64, 64, 1), _dot(64, 128, 64, 1), _dot(64, 128, 64, 2),
                _dot(64, 256, 64, 1, w=8, st=3), _dot(64, 64, 128, 2, st=3), _dot(64, 128, 128, 1, st=3),
                _dot(64, 64, 64, 4), _dot(64, 64, 64, 1, swap=True), _dot(64, 128, 64, 1, swap=True),
                _dot(64, 128, 64, 2, swap=True), _dot(32, 128, 64, 1, swap=True),
                _dot(64, 128, 64, 1, w=8)]  # fmt: skip
    return [_dot(64, 128, 64, 1), _dot(64, 256, 64, 1, w=8, st=3), _dot(128, 128, 64, 1, w=8),
            _dot(128, 128, 64, 2, w=8), _dot(128, 256, 64, 1, w=8, st=3), _dot(128, 64, 64, 1),
            _dot(64, 128, 64, 2), _dot(64, 64, 64, 1), _dot(128, 128, 64, 1, w=4),
            _dot(64, 128, 64, 1, swap=True), _dot(256, 128, 64, 1, w=8, st=3),
            _dot(128, 128, 64, 1, w=8, st=3, g=1)]  # fmt: skip


def _compile_some(cfgs: list[dict]) -> list[str]:
    """Worker: compile each config by running it on a tiny shape (fills Triton's disk cache)."""
    dev = torch.device("cuda")
    errors = []
    for d in cfgs:
        cfg = GemmConfig(**d)
        n, k = max(256, cfg.block_n), max(64, 2 * cfg.block_k * cfg.split_k)
        try:
            x = torch.randn(min(cfg.block_m, 8), k, device=dev, dtype=torch.bfloat16)
            gemm(x, torch.randn(n, k, device=dev, dtype=torch.bfloat16), cfg)
        except Exception as e:  # noqa: BLE001 - reported; the timing pass records it per shape
            errors.append(f"{cfg.short()}: {type(e).__name__}: {str(e)[:200]}")
    torch.cuda.synchronize()
    return errors


def precompile(cfgs: list[GemmConfig], jobs: int) -> list[str]:
    todo = [asdict(c) for c in dict.fromkeys(cfgs)]
    if jobs <= 1:
        return _compile_some(todo)
    import multiprocessing as mp

    chunks = [todo[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        return [e for errs in pool.map(_compile_some, chunks) for e in errs]


def per_launch_us(fns, dev) -> float:
    """20 launches (cycling over `fns`) in one CUDA graph; median replay / 20, in microseconds."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(REPS):
            fns[i % len(fns)]()
    us = median(time_ms(g.replay, dev, 2, 10)) / REPS * 1e3
    del g
    return us


def _ulp_ok(diff: float, ref_max: float) -> bool:
    return diff <= 4 * 2.0**-7 * ref_max + 1e-6  # 4 bf16 ulps of the largest output


def bench_shape(name, n, k, ms, dev, copies, bw, out):
    weights = [(torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16) for _ in range(copies)]
    wbytes = n * k * ELEM
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x, weights[0])
        ref_max = ref.abs().max().item()

        def record(variant, us, config=None, m=m, **extra):
            frac = wbytes / (us * 1e-6) / (bw * 1e9) if us and us > 0 else None
            row = dict(shape=name, N=n, K=k, M=m, variant=variant, config=config, us=us, frac=frac, **extra)
            out["rows"].append(row)
            return row

        record("cublas", per_launch_us([partial(F.linear, x, w) for w in weights], dev))
        prev = torch.backends.cuda.preferred_blas_library()
        try:
            torch.backends.cuda.preferred_blas_library("cublaslt")
            record("cublaslt", per_launch_us([partial(F.linear, x, w) for w in weights], dev))
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
        for pad in (64, 128):
            mp = -(-m // pad) * pad
            xp = torch.zeros(mp, k, device=dev, dtype=torch.bfloat16)
            copy_us = per_launch_us([partial(xp[:m].copy_, x)], dev)
            record(f"pad{pad}", per_launch_us([partial(F.linear, xp, w) for w in weights], dev),
                   padded_m=mp, pad_copy_us=copy_us)  # fmt: skip
        for cfg in config_grid(m):
            why = cfg.check(n, k)
            if why:
                continue
            ws = GemmWorkspace.for_shapes(dev, [(cfg, m, n)])
            try:
                diff = (gemm(x, weights[0], cfg, ws).float() - ref.float()).abs().max().item()
                us = per_launch_us([partial(gemm, x, w, cfg, ws) for w in weights], dev)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: recorded, next config
                out["errors"].append(f"{name} M={m} {cfg.short()}: {type(e).__name__}: {str(e)[:200]}")
                continue
            record("triton", us, asdict(cfg), max_abs_diff=diff, ok=_ulp_ok(diff, ref_max),
                   counters_zero=bool(ws.counters.eq(0).all()))  # fmt: skip


def pick_best(rows):
    """Per (shape, M): the fastest of everything, with cuBLAS's time beside it."""
    best = []
    keys = dict.fromkeys((r["shape"], r["M"]) for r in rows)
    for shape, m in keys:
        mine = [r for r in rows if (r["shape"], r["M"]) == (shape, m) and r["us"] and r.get("ok", True)]
        if not mine:
            continue
        top = min(mine, key=lambda r: r["us"])
        cublas = next((r for r in mine if r["variant"] == "cublas"), None)
        best.append({**top, "cublas_us": cublas["us"] if cublas else None})
    return best


def layer_sums(rows, best, ms=(1, 160)):
    out = {}
    for m in ms:
        cub = [r["us"] for r in rows if r["M"] == m and r["variant"] == "cublas"]
        top = [r["us"] for r in best if r["M"] == m]
        if len(cub) == len(SHAPES) and len(top) == len(SHAPES):
            out[str(m)] = dict(cublas_layer_us=sum(cub), best_layer_us=sum(top),
                               cublas_model_ms=sum(cub) * LAYERS / 1e3, best_model_ms=sum(top) * LAYERS / 1e3,
                               saved_model_ms=(sum(cub) - sum(top)) * LAYERS / 1e3)  # fmt: skip
    return out


def _short(cfg: dict | None) -> str:
    return GemmConfig(**cfg).short() if cfg else ""


def print_shape(name, rows, best):
    print(f"\n{name}: us per call (fraction of copy bandwidth)")
    print(f"{'M':>4} {'cublas':>12} {'cublaslt':>12} {'pad64':>7} {'pad128':>7} {'triton':>12}  best   "
          f"max|diff|  triton config")  # fmt: skip
    for b in [b for b in best if b["shape"] == name]:
        m = b["M"]
        here = [r for r in rows if r["shape"] == name and r["M"] == m]
        got = {r["variant"]: r for r in here if r["variant"] != "triton"}
        tri = [r for r in here if r["variant"] == "triton" and r["ok"]]
        t = min(tri, key=lambda r: r["us"], default=None)
        cell = lambda r: f"{r['us']:5.1f} ({r['frac']:.2f})" if r else "-"  # noqa: E731
        worst = max((r["max_abs_diff"] for r in here if r["variant"] == "triton"), default=math.nan)
        print(f"{m:4d} {cell(got.get('cublas')):>12} {cell(got.get('cublaslt')):>12} "
              f"{got['pad64']['us'] if 'pad64' in got else math.nan:7.1f} "
              f"{got['pad128']['us'] if 'pad128' in got else math.nan:7.1f} {cell(t):>12}  "
              f"{b['variant']:<8} {worst:.3g}  {_short(t['config']) if t else ''}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile workers")
    ap.add_argument("--no-rotate", action="store_true", help="one W per shape (may sit in L2)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = args.shapes.split(",")
    t0 = time.perf_counter()
    errors = precompile([c for m in ms for c in config_grid(m)], args.jobs)
    t_compile = time.perf_counter() - t0
    print(f"compiled {len(set(c for m in ms for c in config_grid(m)))} Triton configs in {t_compile:.0f} s "
          f"({args.jobs} workers); {len(errors)} failed")  # fmt: skip
    bw = copy_bandwidth_gbps(dev, 1 << 30)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"{torch.cuda.get_device_name(dev)}: copy bandwidth {bw:.0f} GB/s, L2 {l2 >> 20} MiB")
    out = {"device": torch.cuda.get_device_name(dev), "copy_bandwidth_gbps": bw, "l2_bytes": l2,
           "rotate": not args.no_rotate, "compile_s": t_compile, "rows": [], "errors": errors,
           "weight_copies": {}}  # fmt: skip
    for name in shapes:
        n, k = SHAPES[name]
        copies = 1 if args.no_rotate else max(1, min(8, math.ceil(2.5 * l2 / (n * k * ELEM))))
        out["weight_copies"][name] = copies
        bench_shape(name, n, k, ms, dev, copies, bw, out)
        out["best"] = pick_best(out["rows"])
        print_shape(name, out["rows"], out["best"])
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    out["layer_sums"] = layer_sums(out["rows"], out["best"])
    for m, s in out["layer_sums"].items():
        print(f"M={m}: per layer cuBLAS {s['cublas_layer_us']:.1f} us, best {s['best_layer_us']:.1f} us; "
              f"x{LAYERS} layers {s['cublas_model_ms']:.3f} -> {s['best_model_ms']:.3f} ms "
              f"(saves {s['saved_model_ms']:.3f} ms)")  # fmt: skip
    for e in out["errors"]:
        print("error:", e)
    out["total_s"] = time.perf_counter() - t0
    print(f"total {out['total_s']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
