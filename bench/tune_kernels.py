"""Kernel variants side by side, one GPU run: the numbers behind the launch heuristics.

    python -m bench.tune_kernels [--out FILE]

lora    shrink split-K factors (and the heuristic's pick) and the expand, per projection group of the
        Mistral-7B shape at T = 1 / 32 / 128 tokens over 1 or 32 adapters (rank 16, 32 slots); each
        timed as 20 launches inside one CUDA graph (per-launch device time, no host gaps).
launch  an empty Triton kernel, 20 in a graph: the per-launch floor every small kernel pays.
verify  paged attention with Q = 5 query tokens per sequence (a k = 4 verify step) against Q = 1, at
        batch 8 / 16 / 32 and context 517: KV tile width, warps and split count.
decode  paged attention with Q = 1 at batch 1 / 32 / 64 / 128 and context 545 (bench/profile_lora's
        decode case), block size 16: KV tile width, warps, pipeline stages and split count, each with
        the bandwidth it reaches on the K/V bytes (4 KiB a cached token a layer). (A grid with the KV
        heads of a sequence next to each other was measured in a local variant and dropped: 73.6
        against 74.6 us at 128 rows, h200-tune-decode-attention-2026-12-01b.json.)
decode-small  the same at batch 1 / 2 / 4 / 8 (and batch 1 at context 4000), where a launch has too few
        programs to fill the SMs and its serial tile loop, not bytes, sets the time: split counts 1-32
        (splits as short as one KV tile), each layer's K/V a separate cache as in a step (32 rotated, so
        they come from HBM).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import triton

from bench.common import median, time_ms

REPS = 20


def per_launch_ms(fn, dev) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    return median(time_ms(g.replay, dev, 2, 10)) / REPS


@triton.jit
def _empty_kernel(x_ptr):
    pass


def sec_launch(dev, out: dict) -> None:
    x = torch.zeros(1, device=dev)
    for programs in (1, 132, 528):
        ms = per_launch_ms(lambda p=programs: _empty_kernel[(p,)](x), dev)
        out.setdefault("launch", []).append({"programs": programs, "us": ms * 1e3})
        print(f"empty triton kernel, {programs:4d} programs: {ms * 1e3:.2f} us per launch in a graph")


GROUPS = {  # name: (fan_in, member widths)
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}


def sec_lora(dev, out: dict) -> None:
    from model.kernels import lora

    slots, rank = 32, 16
    ranks = torch.full((slots,), rank, dtype=torch.int32, device=dev)
    for name, (fan_in, widths) in GROUPS.items():
        nt, cols = len(widths), sum(widths)
        a = torch.randn(slots, nt * rank, fan_in, device=dev, dtype=torch.bfloat16) * 0.01
        b = torch.randn(slots, cols, rank, device=dev, dtype=torch.bfloat16) * 0.01
        slices, pos = [], 0
        for w in widths:
            slices.append((pos, pos + w, pos))
            pos += w
        for t in (1, 32, 128):
            x = torch.randn(t, fan_in, device=dev, dtype=torch.bfloat16)
            y = torch.zeros(t, cols, device=dev, dtype=torch.bfloat16)
            for used in (1, 32):
                token_slots = (torch.arange(t, device=dev, dtype=torch.int32) % used).contiguous()
                plan = lora.plan_from_slots(token_slots, slots)
                picked = lora.choose_splits(plan, nt * rank, fan_in,
                                            min(128, max(16, triton.next_power_of_2(nt * rank))), 132)
                row = {"group": name, "T": t, "adapters": used, "heuristic_splits": picked, "shrink_us": {}}
                for splits in (1, 2, 4, 8, 16):
                    shrink = partial(lora.lora_shrink, x, a, ranks, plan, rank=rank, splits=splits)
                    row["shrink_us"][splits] = per_launch_ms(shrink, dev) * 1e3
                v = lora.lora_shrink(x, a, ranks, plan, rank=rank)
                expand = partial(lora.lora_expand, y, v, b, ranks, plan, rank=rank, slices=slices)
                row["expand_us"] = per_launch_ms(expand, dev) * 1e3
                out.setdefault("lora", []).append(row)
                best = min(row["shrink_us"], key=row["shrink_us"].get)
                times = " ".join(f"s{k}:{us:5.1f}" for k, us in row["shrink_us"].items())
                print(f"lora {name:8s} T={t:4d} adapters={used:3d}: shrink {times} us (heuristic s{picked}, "
                      f"best s{best})  expand {row['expand_us']:5.1f} us")  # fmt: skip


def sec_verify(dev, out: dict) -> None:
    from model.kernels import paged_attention as pa

    hq, hkv, d, bs, ctx = 32, 8, 128, 16, 517
    for batch in (8, 16, 32):
        blocks_per = -(-ctx // bs)
        kc = torch.randn(batch * blocks_per + 1, bs, hkv, d, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        tables = (torch.arange(batch * blocks_per, device=dev, dtype=torch.int32) + 1).view(batch, -1)
        lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        for q_len in (1, 5):
            q = torch.randn(batch * q_len, hq, d, device=dev, dtype=torch.bfloat16)
            o = torch.empty_like(q)
            default = pa.choose_num_splits(batch, hkv, 576, None, 132)
            for block_n in (32, 64):
                for warps in (4, 8):
                    for splits in sorted({1, 2, 4, default}):
                        run = partial(pa._launch, q, kc, vc, tables, lens, d**-0.5, 576, None, None, None, o,
                                      splits, block_n=block_n, num_warps=warps)  # fmt: skip
                        try:
                            ms = per_launch_ms(run, dev)
                        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                            print(f"verify B={batch} Q={q_len} bn={block_n} w={warps} s={splits}: "
                                  f"{type(e).__name__}")  # fmt: skip
                            continue
                        out.setdefault("verify", []).append(dict(
                            batch=batch, q=q_len, block_n=block_n, warps=warps, splits=splits,
                            default_splits=default, us=ms * 1e3))  # fmt: skip
                        mark = "  (default)" if (block_n, warps, splits) == (64, 4, default) else ""
                        print(f"attention B={batch:3d} Q={q_len} block_n={block_n} warps={warps} "
                              f"splits={splits}: {ms * 1e3:6.1f} us{mark}")  # fmt: skip


def sec_decode(dev, out: dict) -> None:
    from model.kernels import paged_attention as pa

    hq, hkv, d, bs, ctx = 32, 8, 128, 16, 545
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for batch in (1, 32, 64, 128):
        blocks_per = -(-ctx // bs)
        kc = torch.randn(batch * blocks_per + 1, bs, hkv, d, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        tables = (torch.arange(batch * blocks_per, device=dev, dtype=torch.int32) + 1).view(batch, -1)
        lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        q = torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16)
        o = torch.empty_like(q)
        kv_bytes = 2 * batch * ctx * hkv * d * 2
        default = pa.choose_num_splits(batch, hkv, 1024, None, sms)  # the graphs' context bucket
        configs = [(bn, w, st, sp, hm) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)
                   for sp in sorted({1, 2, 4, default}) for hm in (False,)]  # fmt: skip
        for block_n, warps, stages, splits, head_major in configs:
            run = partial(pa._launch, q, kc, vc, tables, lens, d**-0.5, 1024, None, None, None, o, splits,
                          block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                ms = per_launch_ms(run, dev)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"decode B={batch} bn={block_n} w={warps} st={stages} s={splits}: {type(e).__name__}")
                continue
            out.setdefault("decode", []).append(dict(
                batch=batch, block_n=block_n, warps=warps, stages=stages, splits=splits,
                head_major=head_major, default_splits=default, us=ms * 1e3,
                kv_TBps=kv_bytes / ms / 1e9))  # fmt: skip
        rows = sorted((r for r in out["decode"] if r["batch"] == batch), key=lambda r: r["us"])
        shipped = (64, 4, 2, default, False)  # _launch's defaults
        key = ("block_n", "warps", "stages", "splits", "head_major")
        dflt = next(r for r in rows if tuple(r[k] for k in key) == shipped)
        for r in rows[:5]:
            print(f"decode B={batch:3d} bn={r['block_n']:3d} w={r['warps']} st={r['stages']} s={r['splits']} "
                  f"head-major={r['head_major']:d}: {r['us']:6.1f} us {r['kv_TBps']:.2f} TB/s "
                  f"(default: {dflt['us']:.1f} us)")  # fmt: skip
        del kc, vc


def _layers_launch(pa, q, caches, tables, lens, o, splits, block_n, bucket):
    # one decode attention a layer, each on its own K/V cache (from HBM, as in a step)
    for kc, vc in caches:
        pa._launch(q, kc, vc, tables, lens, q.shape[-1] ** -0.5, bucket, None, None, None, o, splits,
                   block_n=block_n)  # fmt: skip


def sec_decode_small(dev, out: dict) -> None:
    from model.kernels import paged_attention as pa

    hq, hkv, d, bs, layers = 32, 8, 128, 16, 32
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cases = ((1, 545, 1024), (2, 545, 1024), (4, 545, 1024), (8, 545, 1024), (1, 4000, 4096))
    for batch, ctx, bucket in cases:  # context bucket: the graphs' max_s
        blocks_per = -(-ctx // bs)
        shape = (batch * blocks_per + 1, bs, hkv, d)
        caches = [(torch.randn(shape, device=dev, dtype=torch.bfloat16),
                   torch.randn(shape, device=dev, dtype=torch.bfloat16)) for _ in range(layers)]  # fmt: skip
        tables = (torch.arange(batch * blocks_per, device=dev, dtype=torch.int32) + 1).view(batch, -1)
        lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        q = torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16)
        o = torch.empty_like(q)
        before = pa.choose_num_splits(batch, hkv, bucket, None, sms)  # 256-token splits
        default = pa.choose_num_splits(batch, hkv, bucket, None, sms, 64)  # one 64-token tile (Q = 1)
        for block_n in (32, 64):
            for splits in sorted({1, 2, 4, 8, 12, 16, 32, before, default}):
                run = partial(_layers_launch, pa, q, caches, tables, lens, o, splits, block_n, bucket)
                us = per_launch_ms(run, dev) / layers * 1e3
                out.setdefault("decode_small", []).append(dict(
                    batch=batch, context=ctx, bucket=bucket, block_n=block_n, splits=splits,
                    default_splits=default, splits_256_tokens=before, us=us))  # fmt: skip
                mark = "  (default)" if (block_n, splits) == (64, default) else ""
                mark += "  (256-token splits)" if (block_n, splits) == (64, before) else ""
                print(f"decode-small B={batch} ctx={ctx} bn={block_n} s={splits:2d}: {us:6.2f} us{mark}",
                      flush=True)  # fmt: skip
        del caches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--sections", default="launch,lora,verify")
    args = ap.parse_args()
    dev = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(dev)}
    for name in args.sections.split(","):
        try:
            sections = {"launch": sec_launch, "lora": sec_lora, "verify": sec_verify, "decode": sec_decode,
                        "decode-small": sec_decode_small}
            sections[name](dev, out)
        except Exception as e:  # noqa: BLE001 - keep the other sections
            import traceback

            traceback.print_exc()
            out.setdefault("errors", []).append(f"{name}: {e!r}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
