"""Every candidate cuBLASLt's heuristic offers for the decode matmuls, timed: how far torch's pick is from
the best the library has (bench/cublaslt.py runs a chosen one).

    python -m bench.lt_algos --out FILE [--shapes qkv,o,gate_up,down] [--ms 1,32,64,128,160] [--side-sms 32]

For each Mistral-7B projection and M rows:
  torch_cublas   F.linear under torch's default library
  torch_ltC      F.linear under preferred_blas_library("cublaslt") leaving C SMs free (C = 0, 16, side)
  candidates     every algorithm cuBLASLt's heuristic offers under SM targets of all, all - 8, all - 16
                 and all - side SMs, each with workspace limits of 0, 1, 4 and 32 MiB (deduplicated)
  best_all       the fastest candidate; best_side: the fastest that leaves `side` SMs free (what a graph
                 with a LoRA side stream may use)
Each candidate is checked against F.linear once (<= 4 bf16 ulps of the largest output, else never
"best"). Timing as bench.gemm_variants: 20 launches in one CUDA graph cycling over copies of W that
exceed the L2 (each launch streams its weight from HBM, as a model layer does); median replay / 20.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth_gbps
from bench.cublaslt import LtPlan, LtProblem, LtRuntime
from bench.gemm_variants import ELEM, SHAPES, _ulp_ok, per_launch_us


def torch_linear_us(x, weights, dev, library: str | None, carveout: int) -> float:
    prev_lib = torch.backends.cuda.preferred_blas_library()
    prev_carve = torch._C._get_sm_carveout_experimental()
    try:
        if library:
            torch.backends.cuda.preferred_blas_library(library)
        if carveout:
            torch._C._set_sm_carveout_experimental(carveout)
        return per_launch_us([partial(F.linear, x, w) for w in weights], dev)
    finally:
        torch._C._set_sm_carveout_experimental(prev_carve)
        torch.backends.cuda.preferred_blas_library(prev_lib)


def bench_problem(name, n, k, m, sms, side_sms, dev, weights, bw, runtime, out):
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ref = F.linear(x, weights[0])
    ref_max = ref.abs().max().item()
    wbytes = n * k * ELEM

    def frac(us):
        return wbytes / (us * 1e-6) / (bw * 1e9)

    summary = dict(shape=name, N=n, K=k, M=m)
    summary["torch_cublas_us"] = torch_linear_us(x, weights, dev, None, 0)
    for carve in sorted({0, 16, side_sms}):
        summary[f"torch_lt{carve}_us"] = torch_linear_us(x, weights, dev, "cublaslt", carve)
    targets = tuple(sorted({0, sms - 8, sms - 16, sms - side_sms}))
    plan = LtPlan.create(LtProblem(m, n, k, torch.bfloat16), runtime, sm_targets=targets)
    y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    best = {"all": None, "side": None}
    for i, cand in enumerate(plan.candidates):
        plan.run(x, weights[0], y, cand)
        diff = (y.float() - ref.float()).abs().max().item()
        us = per_launch_us([partial(plan.run, x, w, y, cand) for w in weights], dev)
        row = dict(shape=name, M=m, candidate=i, us=us, frac=frac(us), max_abs_diff=diff,
                   ok=_ulp_ok(diff, ref_max), **cand.describe())  # fmt: skip
        out["rows"].append(row)
        if not row["ok"]:
            continue
        groups = ["all"] + (["side"] if cand.sm_target and cand.sm_target <= sms - side_sms else [])
        for g in groups:
            if best[g] is None or us < best[g]["us"]:
                best[g] = row
    plan.close()
    summary["candidates"] = len(plan.candidates)
    for g, row in best.items():
        if row is not None:
            summary[f"best_{g}_us"] = row["us"]
            summary[f"best_{g}"] = {k: v for k, v in row.items() if k not in ("shape", "M")}
    out["summary"].append(summary)
    t = {k: v for k, v in summary.items() if k.endswith("_us")}
    print(f"{name:8s} M={m:4d} ({summary['candidates']:3d} candidates): "
          + " ".join(f"{k[:-3]} {v:5.1f}" for k, v in t.items()), flush=True)  # fmt: skip


def layer_sums(summary, side_sms, layers=32):
    """Per M: the layer's four matmuls under each torch setting, and with the best candidates (all SMs,
    and SMs that leave `side_sms` free); saved ms a step against the better torch setting."""
    sums = {}
    for s in summary:
        d = sums.setdefault(f"M={s['M']}", {})
        for k, v in s.items():
            if k.endswith("_us"):
                d[k] = d.get(k, 0.0) + v
    for d in sums.values():
        torch_all = min(d[k] for k in d if k.startswith("torch_"))
        d["saved_all_ms"] = (torch_all - d.get("best_all_us", torch_all)) * layers / 1e3
        torch_side = d.get(f"torch_lt{side_sms}_us", torch_all)
        d["saved_side_ms"] = (torch_side - d.get("best_side_us", torch_side)) * layers / 1e3
    return sums


def save(out: dict, path: str) -> None:
    """Write the results so far (after every shape: a cut run keeps what it measured)."""
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default="1,32,64,128,160")
    ap.add_argument("--side-sms", type=int, default=32, help="SMs a LoRA side stream takes")
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    bw = copy_bandwidth_gbps(dev, 1 << 30)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"{torch.cuda.get_device_name(dev)}: {sms} SMs, copy bandwidth {bw:.0f} GB/s, L2 {l2 >> 20} MiB")
    out = {"device": torch.cuda.get_device_name(dev), "sms": sms, "copy_bandwidth_gbps": bw,
           "commit": args.commit, "summary": [], "rows": []}  # fmt: skip
    runtime = LtRuntime()
    t0 = time.perf_counter()
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(1, min(8, math.ceil(2.5 * l2 / (n * k * ELEM))))
        weights = [(torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16) for _ in range(copies)]
        for m in [int(v) for v in args.ms.split(",")]:
            bench_problem(name, n, k, m, sms, args.side_sms, dev, weights, bw, runtime, out)
        del weights
        save(out, args.out)
    out["layer_sums"] = layer_sums(out["summary"], args.side_sms)
    for key, d in out["layer_sums"].items():
        print(f"{key}: per layer " + " ".join(f"{k[:-3]} {v:.1f}" for k, v in d.items() if k.endswith("_us"))
              + f" us; saves {d['saved_all_ms']:.3f} ms a step (all SMs), {d['saved_side_ms']:.3f} (side)")
    out["total_s"] = time.perf_counter() - t0
    print(f"total {out['total_s']:.0f} s")
    save(out, args.out)


if __name__ == "__main__":
    main()
