"""Why does a decode matmul slow down while LoRA kernels run beside it? A probe, one GPU run.

    python -m bench.side_interference [--out FILE]

A Mistral-7B matmul (down_proj, M rows, cuBLASLt leaving `side` SMs free as the few-adapter graphs do)
runs 8 times back to back on one stream (weights rotated past the L2). Beside it, on a second stream:
  none      nothing
  spin      a Triton kernel of `side` programs that only computes (no memory traffic) for about as long
  stream    a Triton kernel of `side` programs that streams a buffer (memory traffic, like a LoRA expand)
and, where this torch has green contexts (SM partitions), the same with the side kernels on a green
context of `side` SMs (and the matmul on one of the rest). If the matmul slows down beside `spin` too,
the cost is SM placement (cluster scheduling), not bandwidth. Eager launches, CUDA events.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import triton
import triton.language as tl

from bench.common import median, time_ms


@triton.jit
def _spin_kernel(out_ptr, iters, BLOCK: tl.constexpr):
    x = tl.arange(0, BLOCK).to(tl.float32) * 1e-3
    for _ in range(iters):
        x = x * 0.999 + 0.001
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), x)


@triton.jit
def _stream_kernel(src_ptr, dst_ptr, n_per_prog, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * n_per_prog
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, n_per_prog, BLOCK):
        acc += tl.load(src_ptr + base + off + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(dst_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), acc)


def _repeat(fn, k: int) -> None:
    for _ in range(k):
        fn()


def timed(fn) -> float:
    """Median ms of one call of `fn` (CUDA events, after one warm-up call)."""
    return median(time_ms(fn, torch.device("cuda"), 1, 20))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--rows", default="64,128")
    ap.add_argument("--side", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    side_sms = args.side
    weights = [torch.randn(4096, 14336, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(8)]
    spin_out = torch.empty(side_sms * 128, device=dev)
    src = torch.randn(side_sms * (1 << 20), device=dev, dtype=torch.bfloat16)  # 2 MiB a program
    dst = torch.empty(side_sms * 256, device=dev)
    out: dict = {"device": torch.cuda.get_device_name(dev), "sms": sms, "side_sms": side_sms, "rows": []}

    green = None
    try:
        from torch.cuda.green_contexts import SUPPORTED, GreenContext

        if SUPPORTED:
            green = (GreenContext.create(num_sms=sms - side_sms, device_id=0),
                     GreenContext.create(num_sms=side_sms, device_id=0))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - report and go on without
        out["green_error"] = f"{type(e).__name__}: {e}"
    print("green contexts:", green is not None, out.get("green_error", ""))

    prev_lib = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(side_sms)
    try:
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, 14336, device=dev, dtype=torch.bfloat16)

            def gemms(x=x):
                for w in weights:
                    torch.nn.functional.linear(x, w)

            alone = timed(gemms)
            gemm_us = alone / 8 * 1e3
            # side kernels repeated to cover the 8 matmuls' time (one launch each is far shorter)
            spin = partial(_spin_kernel[(side_sms,)], spin_out, 2000, BLOCK=128)
            stream = partial(_stream_kernel[(side_sms,)], src, dst, 1 << 18, BLOCK=256)
            side_kernels = {}
            for name, fn in (("spin", spin), ("stream", stream)):
                k = max(1, round(alone / timed(fn)))
                side_kernels[name] = partial(_repeat, fn, k)
            row = {"rows": m, "gemm_alone_us": gemm_us}
            for name, fn in side_kernels.items():
                row[f"{name}_alone_ms"] = timed(fn)
                streams = [("default", torch.cuda.Stream(dev), torch.cuda.current_stream(dev))]
                if green is not None:
                    streams.append(("green", green[1].Stream(), green[0].Stream()))
                for where, side_stream, main_stream in streams:

                    def both(side_stream=side_stream, main_stream=main_stream, fn=fn):
                        cur = torch.cuda.current_stream(dev)
                        side_stream.wait_stream(cur)
                        main_stream.wait_stream(cur)
                        with torch.cuda.stream(side_stream):
                            fn()
                        with torch.cuda.stream(main_stream):
                            start = torch.cuda.Event(enable_timing=True)
                            end = torch.cuda.Event(enable_timing=True)
                            start.record()
                            gemms()
                            end.record()
                        cur.wait_stream(side_stream)
                        cur.wait_stream(main_stream)
                        return start, end

                    try:
                        both()
                        torch.cuda.synchronize()
                        samples = []
                        for _ in range(20):
                            s, e = both()
                            torch.cuda.synchronize()
                            samples.append(s.elapsed_time(e) / 8 * 1e3)
                        row[f"gemm_beside_{name}_{where}_us"] = median(samples)
                    except Exception as e:  # noqa: BLE001 - e.g. cuBLAS on a green context's stream
                        row[f"gemm_beside_{name}_{where}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if green is not None:
                try:
                    with torch.cuda.stream(green[0].Stream()):
                        row["gemm_alone_green_us"] = timed(gemms) / 8 * 1e3
                except Exception as e:  # noqa: BLE001
                    row["gemm_alone_green_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            out["rows"].append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    finally:
        torch._C._set_sm_carveout_experimental(0)
        torch.backends.cuda.preferred_blas_library(prev_lib)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
