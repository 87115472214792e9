"""Micro-benchmark of model/kernels on Mistral-7B shapes (Hq=32, Hkv=8, D=128, hidden 4096, inter 14336).

For every case: Triton time and the torch reference's time (triton.testing.do_bench median; it flushes
L2 before each repetition, so these are cold-cache times), the bytes the kernel must move (each input
read once, each output written once), achieved GB/s and its fraction of the measured copy bandwidth, and
the relative error against the reference on the same inputs. Also a launch-config sweep of the paged
decode kernel. Prints a table last, writes everything as JSON:

    python -m bench.kernels --out bench/results/kernels-<card>.json          (GPU)
    TRITON_INTERPRET=1 python -m bench.kernels --smoke --out /tmp/k.json     (CPU: code paths only;
        applies the interpreter shims of tests/unit/test_kernels_interpret.py)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
import triton

from model.kernels import lora, paged_attention, rmsnorm, rotary

HQ, HKV, D, HIDDEN, INTER = 32, 8, 128, 4096, 14336


def timer(smoke: bool):
    if smoke:  # interpreter: one run, host clock (code paths only, numbers meaningless)
        def t(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return t
    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------ cases


def paged_cases(dev, smoke):
    shapes = [(1, 512, 16, None), (1, 4096, 16, None), (1, 32768, 16, 4096), (8, 4096, 16, None),
              (32, 640, 16, None), (64, 640, 16, None), (128, 640, 16, None), (64, 4096, 16, None),
              (64, 640, 256, None), (64, 4096, 256, None), (256, 1024, 16, None)]  # (B, ctx, bs, window)
    if smoke:
        shapes = [(2, 100, 16, None), (1, 300, 64, 128)]
    for B, ctx, bs, window in shapes:
        for fp8 in (False, True) if (B, ctx, bs) == (64, 4096, 16) or smoke else (False,):
            per = triton.cdiv(ctx, bs)
            g = torch.Generator(device=dev).manual_seed(B * ctx + bs)
            k = torch.randn(B * per + 1, bs, HKV, D, generator=g, device=dev)
            v = torch.randn(B * per + 1, bs, HKV, D, generator=g, device=dev)
            dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
            k, v = (k * 40).to(dt), (v * 40).to(dt)
            scale = 1 / 40
            tables = torch.randperm(B * per + 1, generator=g, device=dev)[: B * per].view(B, per).int()
            lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)  # every sequence at the bucket
            q = torch.randn(B, HQ, D, generator=g, device=dev).bfloat16()
            out = torch.empty_like(q)
            kw = dict(sliding_window=window, k_scale=scale, v_scale=scale)
            args = (q, k, v, tables, lens, D**-0.5, ctx)
            attended = min(ctx, window or ctx)
            nbytes = B * attended * HKV * D * 2 * k.element_size() + 2 * q.numel() * 2 + B * per * 4
            splits = paged_attention.choose_num_splits(B, HKV, ctx, window, sms(dev))
            yield dict(
                kernel="paged_decode_attention", case=f"B={B} ctx={ctx} bs={bs} W={window} "
                f"{'fp8' if fp8 else 'bf16'} splits={splits}", bytes=nbytes, flops=4 * B * HQ * D * attended,
                fn=lambda a=args, kw=kw, o=out: paged_attention.paged_decode_attention(*a, out=o, **kw),
                ref=lambda a=args, kw=kw: paged_attention.paged_decode_attention_ref(*a, **kw))


def lora_cases(dev, smoke):
    """Grouped shrink/expand (model/kernels/lora.py) per projection group; decode plans from device slots
    (tokens round-robin over the adapters), prefill plans from contiguous segments. Bytes: each adapter's
    A (shrink) or B (expand) once, x once, y read + written, the split-K partials written and read."""
    S, dt, el = 32, torch.bfloat16, 2
    groups = {"qkv": (HIDDEN, (4096, 1024, 1024)), "o": (HIDDEN, (4096,)),
              "gate_up": (HIDDEN, (INTER, INTER)),
              "down": (INTER, (4096,))}
    decode = [(1, 1, 16), (32, 1, 16), (64, 1, 16), (128, 1, 16), (64, 8, 16), (64, 32, 16), (128, 32, 16),
              (256, 32, 16), (64, 32, 64)]
    prefill = [(16384, 8, 16), (1024, 1, 16)]
    if smoke:
        groups = {"qkv": (64, (64, 32, 32))}
        decode, prefill = [(3, 2, 8)], [(40, 2, 8)]
    for name, (fan_in, outs) in groups.items():
        n_out, nt = sum(outs), len(outs)
        slices = [(sum(outs[:i]), sum(outs[: i + 1]), sum(outs[:i])) for i in range(nt)]
        for T, n_adapters, R in decode + prefill:
            g = torch.Generator(device=dev).manual_seed(T * 7 + n_adapters + R)
            x = torch.randn(T, fan_in, generator=g, device=dev).to(dt)
            a = (torch.randn(S, nt * R, fan_in, generator=g, device=dev) / fan_in**0.5).to(dt)
            b = (torch.randn(S, n_out, R, generator=g, device=dev) / R**0.5).to(dt)
            ranks = torch.full((S,), R, dtype=torch.int32, device=dev)
            y = torch.randn(T, n_out, generator=g, device=dev).to(dt)
            if (T, n_adapters, R) in decode:
                slots = (torch.arange(T, device=dev) % n_adapters).int()  # interleaved: neighbours differ
                plan = lora.plan_from_slots(slots, S)
                kind = "decode"
            else:
                bounds = torch.linspace(0, T, n_adapters + 1).round().int().tolist()
                segs = [(bounds[i], bounds[i + 1], i) for i in range(n_adapters)]
                plan = lora.plan_from_segments(segs, T, dev)
                kind = "prefill"
            v = lora.lora_shrink(x, a, ranks, plan, rank=R)
            splits = v.shape[0]
            partials = splits * T * nt * R * 4
            tag = f"{name} {kind} T={T} adapters={n_adapters} R={R} splits={splits}"
            yield dict(kernel="lora_shrink", case=tag, flops=2 * T * nt * R * fan_in,
                       bytes=n_adapters * nt * R * fan_in * el + T * fan_in * el + partials,
                       fn=lambda x=x, a=a, r=ranks, p=plan, R=R: lora.lora_shrink(x, a, r, p, rank=R),
                       ref=lambda x=x, a=a, r=ranks, p=plan, R=R: lora.lora_shrink_ref(x, a, r, p, rank=R),
                       check=False)  # partial sums vs the full sum: compared in tests
            yield dict(kernel="lora_expand", case=tag, flops=2 * T * R * n_out,
                       bytes=n_adapters * n_out * R * el + 2 * T * n_out * el + partials,
                       fn=lambda y=y, v=v, b=b, r=ranks, p=plan, R=R, s=slices: lora.lora_expand(
                           y, v, b, r, p, rank=R, slices=s),
                       ref=lambda y=y, v=v, b=b, r=ranks, p=plan, R=R, s=slices: lora.lora_expand_ref(
                           y, v, b, r, p, rank=R, slices=s),
                       check=False)  # in place on y: compared in tests, timed here
            if name == "qkv" and kind == "decode":
                yield dict(kernel="lora_plan", case=f"decode T={T} adapters={n_adapters} S={S}", flops=0,
                           bytes=T * 4 * 2, fn=lambda s=slots: lora.plan_from_slots(s, S),
                           ref=lambda s=slots: lora.plan_from_slots(s, S), check=False)


def norm_rope_cases(dev, smoke):
    for T in (3, 17) if smoke else (1, 64, 256, 16384):
        H = 64 if smoke else HIDDEN
        g = torch.Generator(device=dev).manual_seed(T)
        x = torch.randn(T, H, generator=g, device=dev).bfloat16()
        res = torch.randn(T, H, generator=g, device=dev).bfloat16()
        w = torch.randn(H, generator=g, device=dev).bfloat16()
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        yield dict(kernel="fused_add_rmsnorm", case=f"T={T} H={H}", bytes=4 * T * H * 2 + H * 2,
                   flops=5 * T * H,
                   fn=lambda x=x, r=res, w=w, o=out, ro=res_out: rmsnorm.fused_add_rmsnorm(
                       x, r, w, 1e-5, out=o, residual_out=ro)[0],
                   ref=lambda x=x, r=res, w=w: rmsnorm.fused_add_rmsnorm_ref(x, r, w, 1e-5)[0])

        hq, hkv, d, bs = (4, 2, 64, 16) if smoke else (HQ, HKV, D, 16)
        max_pos = 32768
        inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
        freqs = torch.outer(torch.arange(max_pos, device=dev).float(), inv)
        cos, sin = freqs.cos(), freqs.sin()
        qkv = torch.randn(T, hq + 2 * hkv, d, generator=g, device=dev).bfloat16()
        pos = torch.randint(0, max_pos, (T,), generator=g, device=dev)
        nblk = T // bs + 2
        kc = torch.empty(nblk, bs, hkv, d, device=dev, dtype=torch.bfloat16)
        vc = torch.empty_like(kc)
        slots = torch.randperm(nblk * bs, generator=g, device=dev)[:T]
        qkv_bytes = T * (hq + 2 * hkv) * d * 2
        nbytes = qkv_bytes + T * (hq + hkv) * d * 2 + T * 2 * hkv * d * 2 + T * d * 4 + T * 16

        def views(t, hq=hq, hkv=hkv):
            return t[:, :hq], t[:, hq:hq + hkv], t[:, hq + hkv:]

        work = qkv.clone()
        yield dict(kernel="rotary_kv_write", case=f"T={T} Hq={hq} Hkv={hkv} D={d}", bytes=nbytes,
                   flops=6 * T * (hq + hkv) * d,
                   fn=lambda w=work, p=pos, c=cos, s=sin, kc=kc, vc=vc, sl=slots, v=views:
                   rotary.rotary_kv_write(*v(w), p, c, s, kc, vc, sl),
                   ref=lambda w=work, p=pos, c=cos, s=sin, kc=kc, vc=vc, sl=slots, v=views:
                   rotary.rotary_kv_write_ref(*v(w), p, c, s, kc, vc, sl),
                   check=False)  # in place: compared in tests, timed here


# -------------------------------------------------------------------------------------------- main


def apply_interpreter_shims() -> None:
    import importlib.util

    import pytest

    path = Path(__file__).resolve().parents[1] / "tests" / "unit" / "test_kernels_interpret.py"
    spec = importlib.util.spec_from_file_location("_kernel_interpreter_shims", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._patch_interpreter(pytest.MonkeyPatch())  # left applied: this process only runs the interpreter


def sms(dev) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev == "cuda" else 132


def copy_bandwidth(dev, smoke) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    if smoke:
        return float("nan")
    src = torch.randn(256 * 2**20, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    ms = timer(False)(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def sweep_paged(dev, smoke):
    """Launch configs of the decode kernel on three shapes, to pick the defaults from measurements."""
    rows = []
    shapes = [(2, 100, 16)] if smoke else [(1, 4096, 16), (64, 640, 16), (64, 4096, 256)]
    configs = [(64, 4, 2)] if smoke else [(bn, nw, ns) for bn in (32, 64, 128) for nw in (4, 8)
                                          for ns in (1, 2, 3)]
    t = timer(smoke)
    for B, ctx, bs in shapes:
        per = triton.cdiv(ctx, bs)
        k = torch.randn(B * per, bs, HKV, D, device=dev).bfloat16()
        v = torch.randn_like(k)
        tables = torch.randperm(B * per, device=dev)[: B * per].view(B, per).int()
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(B, HQ, D, device=dev).bfloat16()
        out = torch.empty_like(q)
        nbytes = B * ctx * HKV * D * 2 * 2
        for bn, nw, ns in configs:
            def fn(bn=bn, nw=nw, ns=ns, args=(q, k, v, tables, lens, D**-0.5, ctx), out=out):
                return paged_attention._launch(*args, None, None, None, out, None,  # no window, no scales
                                               block_n=bn, num_warps=nw, num_stages=ns)
            try:
                ms = t(fn)
            except Exception as e:  # a config the compiler rejects (out of shared memory) is a result too
                rows.append(dict(case=f"B={B} ctx={ctx} bs={bs}", block_n=bn, num_warps=nw, num_stages=ns,
                                 error=repr(e)[:200]))
                continue
            rows.append(dict(case=f"B={B} ctx={ctx} bs={bs}", block_n=bn, num_warps=nw, num_stages=ns, ms=ms,
                             GBps=nbytes / ms / 1e6))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one run each (CPU interpreter ok)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the paged-attention launch-config sweep")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run on the GPU machine, or use --smoke under TRITON_INTERPRET=1")
    if dev == "cpu":
        apply_interpreter_shims()
    t = timer(args.smoke)
    bw = copy_bandwidth(dev, args.smoke)
    rows = []
    for gen in (paged_cases, lora_cases, norm_rope_cases):
        for c in gen(dev, args.smoke):
            ms = t(c["fn"])
            ref_ms = t(c["ref"])
            err = rel_err(c["fn"](), c["ref"]()) if c.get("check", True) else None
            gbps = c["bytes"] / ms / 1e6
            rows.append(dict(kernel=c["kernel"], case=c["case"], ms=ms, ref_ms=ref_ms, bytes=c["bytes"],
                             flops=c["flops"], GBps=gbps, frac_of_copy_bw=gbps / bw, speedup=ref_ms / ms,
                             rel_err=err))
            del c
    sweep = [] if args.no_sweep else sweep_paged(dev, args.smoke)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    result = dict(device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
                  torch=torch.__version__, triton=triton.__version__, commit=commit, bandwidth_GBps=bw,
                  rows=rows, paged_sweep=sweep)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    for s in sweep:
        head = (f"sweep {s['case']:<22} BLOCK_N={s['block_n']:<4} warps={s['num_warps']} "
                f"stages={s['num_stages']} ")
        print(head + (f"{s['ms'] * 1e3:9.1f} us {s['GBps']:7.0f} GB/s" if "ms" in s else s["error"][:60]))
    print(f"\ndevice: {result['device']}  copy bandwidth {bw:.0f} GB/s (read+write)")
    print(f"{'kernel':<24}{'case':<46}{'us':>9}{'ref us':>10}{'MB':>9}{'GB/s':>8}{'%copy':>7}{'x ref':>7}"
          f"{'err':>9}")
    for r in rows:
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        print(f"{r['kernel']:<24}{r['case'][:45]:<46}{r['ms'] * 1e3:9.1f}{r['ref_ms'] * 1e3:10.1f}"
              f"{r['bytes'] / 1e6:9.2f}{r['GBps']:8.0f}{100 * r['frac_of_copy_bw']:7.1f}{r['speedup']:7.1f}"
              f"{err:>9}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
