"""FP8 KV cache on a GPU: decode at long context with a bf16 vs an FP8 (e4m3) KV cache, and how many
concurrent 4k-token sequences fit. Mistral-7B shape, random bf16 weights built on the device.

    python -m bench.long_context [--out FILE]

Decode rows: batch B at context C (8k, 32k), one step replayed from a CUDA graph; bytes per step =
weights + B * C * KV bytes per token (2 * 32 layers * 8 heads * 128 * element size); roofline fraction
= bytes / step time / copy bandwidth measured in the same run. FP8 halves the KV bytes, so at long
context (KV-dominated) the step should approach half the time.

Capacity rows: free device memory after the model (minus 5% of the card and the activation peak of a
decode step) divided by 4096 tokens' KV bytes -> sequences; then a cache of that many 4k sequences is
actually allocated and one decode step run over all of them (eager), to prove it fits.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from bench.common import device_name, time_ms
from bench.profile_decode import DecodeCase, bandwidth_model_and_weight_bytes
from cache.kv_cache import KVCache

KV_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


def graph_step_ms(case: DecodeCase, max_s: int, dev) -> float:
    case.step(max_s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        case.step(max_s)
    return sorted(time_ms(g.replay, dev, 3, 15))[7]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="8192:16,32768:4", help="context:batch pairs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw, model, weight_bytes = bandwidth_model_and_weight_bytes(dev)
    rows = []
    for case_spec in args.cases.split(","):
        context, batch = (int(x) for x in case_spec.split(":"))
        for name, kv_dtype in KV_DTYPES.items():
            case = DecodeCase(model, batch, context, kv_dtype)
            per_token = KVCache.bytes_per_token_for(32, 8, 128, kv_dtype)
            step_bytes = weight_bytes + batch * (context + 1) * per_token
            ms = graph_step_ms(case, 1 << math.ceil(math.log2(context + 1)), dev)
            row = dict(kind="decode", kv_dtype=name, context=context, batch=batch, step_ms=ms,
                       tok_s=batch / ms * 1e3, roofline_fraction=step_bytes / (ms / 1e3) / bw)
            print(row, flush=True)
            rows.append(row)
            del case
            torch.cuda.empty_cache()
    for name, kv_dtype in KV_DTYPES.items():
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        per_seq = 4096 * KVCache.bytes_per_token_for(32, 8, 128, kv_dtype)
        budget = free - int(0.05 * total) - (2 << 30)  # 2 GiB for the step's activations and logits
        seqs = budget // per_seq
        case = DecodeCase(model, seqs, 4095, kv_dtype)
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(case.step(4096)).all())
        row = dict(kind="capacity", kv_dtype=name, context=4096, sequences=int(seqs), step_ran=ok,
                   kv_GB=seqs * per_seq / 1e9, free_GB_before=free / 1e9)
        print(row, flush=True)
        rows.append(row)
        del case
        torch.cuda.empty_cache()
    result = {"device": device_name(dev), "bandwidth_GBps": bw / 1e9, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
