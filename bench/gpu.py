"""`make bench` (python -m bench.gpu): the shard against its baselines and the roofline, one GPU, one run.

A Mistral-7B-shaped checkpoint with random bf16 weights is drawn on the device and written once as a
normal sharded Hugging Face directory (to /dev/shm when it has room, else /tmp); the shard engine, the
shard server process and transformers all load that same directory through their real load paths.
Rank-16 PEFT adapters on all seven projections are written the same way.

Sections (--only picks some; each is fail-soft: an error becomes a row with "error" and the run goes on):
  ceilings      device-to-device copy GB/s (read + written) and bf16 8192^3 matmul TFLOP/s
  prefill       16 x 1024-token prompts through ShardEngine.prefill; FLOPs / time / matmul peak
  decode        ShardEngine.decode steps at each batch (prompt 512, 128 new tokens, at most
                --max-decode-seconds of steps per row); per-step host clock after the step's own sync,
                median over steps; roofline = bytes the step must read / bandwidth / step time
  adapter_load  ShardEngine.load_adapter of distinct rank-16 adapters, until resident and synchronized
  adapters      decode at batch 32/64/128 with 1/8/32 distinct adapters spread round-robin (roofline
                with each adapter's bytes read once per step)
  rotation      1,000 rank-16 adapters through <= 64 device slots, Zipf-drawn, 64 running (throughput vs
                32 all-resident, TTFT of requests whose adapter was not resident): bench/gpu_rotation.py
  mixed_ranks   decode with adapters of ranks 8, 16 and 64 in one batch
  dora          decode at batch 1/64 with 8 DoRA adapters vs the same with LoRA adapters of the same rank
                and A, B (rows with variant lora/dora, and a dora_overhead row: extra step ms and ratio)
  transformers  MistralForCausalLM (sdpa) generate at batch 1/32/64, 64 new tokens (--hf-new-tokens)
  peft          the same model + PEFT, 8 adapters, mixed batch (generate(adapter_names=...)), 16 new
                tokens (--peft-new-tokens). Baselines: tok_s = batch*new/t(new);
                step_ms and decode_tok_s from (t(new) - t(1)) / (new - 1), the decode-only rate
  e2e           batches 1/64/128 run to completion, decode overlap on and off: ShardEngine in this
                process, then a `python -m shard_server serve` process per overlap setting driven by
                the fake router over a unix socket

Writes bench/results/<card>-<date>.json (and a copy into $OUT when set) after every section, so a run
cut short keeps what it measured, and prints a table and the targets last.
`--smoke` runs every section on the CPU with a tiny model and tiny batches (code paths, not numbers).

Here: the CLI, the order of sections and the summary; the sections are bench/gpu_sections.py (engine)
and bench/gpu_baselines.py (gRPC, transformers, PEFT); the plan and the report are bench/gpu_plan.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import common
from bench.gpu_baselines import e2e_grpc, sec_hf
from bench.gpu_plan import REPO, RUN_START, Plan, Report, fail_soft, log, shorten, smoke_plan
from bench.gpu_rotation import sec_mixed_ranks, sec_rotation, summarize_ttft
from bench.gpu_sections import Bench

SECTIONS = ("ceilings", "prefill", "decode", "adapter_load", "adapters", "rotation", "mixed_ranks", "dora",
            "transformers", "peft", "e2e")
ENGINE_SECTIONS = {"prefill", "decode", "adapter_load", "adapters", "rotation", "mixed_ranks", "dora",
                   "e2e"}  # e2e: its direct half


# ---------------------------------------------------------------- summary


def _find(rows, **match) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and r.get("error") is None:
            return r
    return None


def print_table(report: Report) -> None:
    d = report.data
    print(f"\ndevice {d['device']}  commit {d['commit']}  copy {_fmt(d['bandwidth_GBps'], 0)} GB/s  "
          f"matmul {_fmt(d['matmul_tflops'], 1)} TFLOP/s")  # fmt: skip
    head = f"{'kind':<12} {'system':<12} {'batch':>5} {'adapt':>5} {'tok_s':>10} {'step_ms':>8} {'roofl':>6} "
    print(head + f"{'ms':>9}  extra")
    for r in report.rows:
        extra = r.get("error") or " ".join(
            f"{k}={shorten(r[k])}"
            for k in ("variant", "path", "overlap", "backend", "forward_ms", "floor_ms", "ratio_vs_direct",
                      "prefill_ms", "decode_ms", "router_ms", "tflops", "ratio")
            if r.get(k) is not None
        )  # fmt: skip
        print(f"{r['kind']:<12} {r['system']:<12} {_fmt(r['batch'], 0):>5} {_fmt(r['adapters'], 0):>5} "
              f"{_fmt(r['tok_s'], 1):>10} {_fmt(r['step_ms'], 2):>8} {_fmt(r['roofline_fraction'], 3):>6} "
              f"{_fmt(r['ms'], 1):>9}  {extra}")  # fmt: skip


def _fmt(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_targets(report: Report) -> None:
    """The performance targets, from this run's rows (missing rows say so)."""
    rows = report.rows

    def val(key, **m):
        r = _find(rows, **m)
        return None if r is None else r.get(key)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    shard = {"kind": "decode", "system": "shard"}

    def step_over_forward(b):
        r = _find(rows, **shard, batch=b, adapters=0)
        return None if r is None or not r.get("forward_ms") else r["step_ms"] / r["forward_ms"]

    checks = [
        ("decode b1 roofline >= 0.85", val("roofline_fraction", **shard, batch=1, adapters=0), 0.85),
        ("decode b64 roofline >= 0.80", val("roofline_fraction", **shard, batch=64, adapters=0), 0.80),
        ("decode b128 roofline >= 0.80", val("roofline_fraction", **shard, batch=128, adapters=0), 0.80),
        ("decode b1 step / forward <= 1.03 (lower is better)", step_over_forward(1), 1.03),
        ("decode b64 step / forward <= 1.03 (lower is better)", step_over_forward(64), 1.03),
        ("decode b128 step / forward <= 1.03 (lower is better)", step_over_forward(128), 1.03),
        ("e2e b64 grpc / direct >= 0.95 (overlap on)",
         val("ratio_vs_direct", kind="e2e", path="grpc", batch=64, overlap=True), 0.95),
        ("e2e b128 grpc / direct >= 0.95 (overlap on)",
         val("ratio_vs_direct", kind="e2e", path="grpc", batch=128, overlap=True), 0.95),
        ("b64 32 adapters / no adapters >= 0.85",
         ratio(val("tok_s", kind="decode", system="shard", batch=64, adapters=32),
               val("tok_s", kind="decode", system="shard", batch=64, adapters=0)), 0.85),
        ("b32 shard / transformers >= 20 (decode rates)",
         ratio(val("tok_s", kind="decode", system="shard", batch=32, adapters=0),
               val("decode_tok_s", kind="decode", system="transformers", batch=32)), 20),
        ("b64 shard 8 adapters / peft >= 50 (decode rates)",
         ratio(val("tok_s", kind="decode", system="shard", batch=64, adapters=8),
               val("decode_tok_s", kind="decode", system="peft", batch=64)), 50),
        ("prefill / matmul peak >= 0.50", val("roofline_fraction", kind="prefill", system="shard"), 0.50),
        ("LoadAdapter ms <= 100 (lower is better)", val("ms", kind="adapter_load"), 100),
    ]  # fmt: skip
    for b in (32, 64, 128):
        one, none = val("tok_s", **shard, batch=b, adapters=1), val("tok_s", **shard, batch=b, adapters=0)
        checks.append((f"b{b} 1 adapter / no adapter >= 0.95", ratio(one, none), 0.95))
    checks += [(f"b{b} 32 adapters: roofline of own step >= 0.80", val("roofline_fraction", **shard, batch=b,
                adapters=32), 0.80) for b in (64, 128)]
    rotation = next((r for r in rows if r.get("kind") == "rotation" and r.get("ratio_vs_resident")), {})
    checks += [("rotation / all-resident 32 adapters >= 0.80", rotation.get("ratio_vs_resident"), 0.80),
               ("LoadAdapter ms <= 25 (lower is better)", val("ms", kind="adapter_load"), 25)]
    print("\ntargets:")
    for name, v, target in checks:
        if v is None:
            print(f"  [ n/a ] {name}")
            continue
        ok = v <= target if "lower is better" in name else v >= target
        print(f"  [{'pass' if ok else 'MISS'}] {name}: {v:.3f}")
    print(f"  {summarize_ttft(rows)}")


# ---------------------------------------------------------------- main


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny batches (code paths only)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {','.join(SECTIONS)}")
    p.add_argument("--model-dir", default=None, help="reuse a checkpoint dir (default: write one)")
    p.add_argument("--work-dir", default=None, help="where checkpoint/adapters go (default /dev/shm or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoint and adapters")
    p.add_argument("--out-dir", default=None, help="default bench/results (smoke: a temporary directory)")
    p.add_argument("--commit", default=None, help="default: git HEAD, or 'unknown' without .git")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="in-process engine: force decode CUDA graphs on/off (default: the engine's)")
    p.add_argument("--deadline-seconds", type=float, default=540.0,
                   help="sections that would start later than this are skipped (rows say so)")  # fmt: skip
    for name, kind in [("decode-batches", _ints), ("adapter-batches", _ints), ("adapter-counts", _ints),
                       ("dora-batches", _ints), ("dora-counts", _ints),
                       ("hf-batches", _ints), ("peft-batches", _ints), ("prompt", int), ("new-tokens", int),
                       ("hf-new-tokens", int), ("peft-new-tokens", int), ("peft-adapters", int),
                       ("prefill-prompts", int), ("prefill-len", int), ("prefill-reps", int),
                       ("load-reps", int), ("e2e-batches", _ints), ("max-decode-seconds", float),
                       ("prefill-chunk-tokens", int), ("attention-backend", str), ("rotation-adapters", int),
                       ("rotation-running", int), ("rotation-slots", int), ("rotation-zipf", float),
                       ("rotation-seconds", float), ("rotation-prompt", int),
                       ("rotation-unique-files", int)]:  # fmt: skip
        f = Plan.__dataclass_fields__[name.replace("-", "_")]
        default = f.default_factory() if callable(f.default_factory) else f.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        p.add_argument(f"--{name}", type=kind, default=None, help=f"default {shown}")
    return p.parse_args(argv)


def make_plan(args) -> Plan:
    if args.smoke:
        plan = smoke_plan()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU machine, or pass --smoke for the CPU code paths")
        plan = Plan(device=torch.device("cuda"), dtype=torch.bfloat16, shape=common.MISTRAL_7B)
    for key, value in vars(args).items():
        if value is not None and hasattr(plan, key) and key not in ("smoke",):
            setattr(plan, key, value)
    return plan


def pick_work_dir(args, plan: Plan) -> tuple[Path, bool]:
    """(directory, whether we made it). /dev/shm (RAM) when it has room for the checkpoint, else /tmp."""
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        return Path(args.work_dir), False
    need = plan.shape.total_params * plan.elem * 1.3 + (4 << 30)
    base = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > need else "/tmp"
    return Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=base)), True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    plan = make_plan(args)
    name = common.device_name(plan.device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    card = "cpu-smoke" if plan.smoke else common.card_slug(name)
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="bench-smoke-")) if plan.smoke else REPO / "bench" / "results"
    )  # fmt: skip
    suffix = "" if plan.attention_backend == "auto" else f"-{plan.attention_backend}"
    report = Report(out_dir / f"{card}-{date}{suffix}.json", name, args.commit or common.git_commit(REPO))
    work, made = pick_work_dir(args, plan)
    log(f"device {name}, sections {sorted(only)}, work dir {work}, results {report.path}")
    bench = Bench(plan, report, work, Path(args.model_dir) if args.model_dir else None)
    torch.manual_seed(0)

    def timed(section: str, fn: Callable[[], object], **where) -> None:
        t0 = time.perf_counter()
        if t0 - RUN_START > args.deadline_seconds:  # leave time for the table and the JSON before a kill
            log(f"== {section} skipped: past --deadline-seconds {args.deadline_seconds:.0f}")
            report.add(where.pop("kind", section), where.pop("system", "shard"), **where,
                       error=f"skipped: {section} would start after --deadline-seconds")  # fmt: skip
            return
        log(f"== {section}")
        fail_soft(report, where.pop("kind", section), where.pop("system", "shard"), fn, **where)
        log(f"== {section} done in {time.perf_counter() - t0:.1f}s")

    try:
        if only - {"adapter_load", "e2e"}:  # every other section reports a fraction of a ceiling
            timed("ceilings", bench.ceilings, kind="ceilings", system="device")
        if only - {"ceilings"}:
            timed("checkpoint", bench.write_model, kind="setup", system="shard")
        ready = bench.model_dir is not None
        if ready and only & ENGINE_SECTIONS:
            timed("engine", bench.build_engine, kind="setup", system="shard")
            if bench.engine is not None:
                for section, fn, kind in [("prefill", bench.sec_prefill, "prefill"),
                                          ("decode", bench.sec_decode, "decode"),
                                          ("adapter_load", bench.sec_adapter_load, "adapter_load"),
                                          ("adapters", bench.sec_adapters, "decode"),
                                          ("rotation", lambda: sec_rotation(bench), "rotation"),
                                          ("mixed_ranks", lambda: sec_mixed_ranks(bench), "decode"),
                                          ("dora", bench.sec_dora, "decode"),
                                          ("e2e", bench.e2e_direct, "e2e")]:  # fmt: skip
                    if section in only:
                        timed(f"{section} (shard)", fn, kind=kind)
            bench.drop_engine()
        if ready and only & {"transformers", "peft"}:
            timed("transformers/peft", lambda: sec_hf(bench, "transformers" in only, "peft" in only),
                  kind="decode", system="transformers")  # fmt: skip
        if ready and "e2e" in only:
            timed("e2e (grpc)", lambda: e2e_grpc(bench), kind="e2e")
    finally:
        if made and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    print_targets(report)
    log(f"results: {report.path}")
    try:  # the picture beside the JSON; a missing matplotlib must not lose the numbers
        from bench.plot import plot

        log(f"plot: {plot(report.path)}")
    except Exception as e:  # noqa: BLE001
        log(f"plot skipped: {e!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
