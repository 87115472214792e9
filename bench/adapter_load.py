"""LoadAdapter cost, stage by stage: the store's load path against a naive one, on CPU or CUDA.

    python -m bench.adapter_load                          # CUDA when present, else CPU; 7B shape, rank 16
    python -m bench.adapter_load --device cpu --threads 1 --loads 5 --json out.json

Writes `--loads` distinct rank-`--rank` PEFT adapters of the `--shape` model (all seven projections, every
layer, bf16 files) and loads them one after another, several ways:

  e2e        AdapterStore.load(index, spec) timed to the stream synchronize, nothing instrumented, into a
             store whose stacks were laid out at start-up (`SlotReservation`: `--loads` slots at the rank;
             what a shard started with --adapter-slots sees; bench/gpu.py's adapter_load `ms`).
  growth     the same into a store that starts empty with one slot and grows 1 -> 2 -> 4 -> 8 (a shard
             without --adapter-slots: each growth is a re-layout; in a shard also a LoRA graph recapture).
  stages     the e2e loads again with each stage timed exclusively (CUDA synchronized around each, so their
             sum is a little above e2e): read (header + file mapping), validate (names, shapes, ranks,
             scales), host (the module table), stage (the file's bytes into the pinned staging buffer by
             parallel preadv, each chunk's host->device copy queued as it lands), unpack (into the slot:
             one strided copy per target and part, B * scale, casts), check (the slot's min/max on the
             device and their read-back: NaN/Inf refused), relayout (new stacks), place (the rest of the
             layout's work: zeroing a reused slot, ranks, waiting), other (the rest of AdapterStore.load).
  reference  a naive load path, re-enacted stage by stage with the growth policy: safetensors load_file,
             validate, float32 + scale fold, slice + cast + contiguous per tensor, pin_memory per tensor
             (CUDA), per-tensor zero + copy into the slot, and on growth new stacks with every resident
             re-uploaded from its pinned host copy.

The files are written just before, so they are read from the page cache (as in bench/gpu.py). The machine
matters: on a loaded 2-core VM the CPU numbers swing by 2x between runs and multi-threaded small ops
are slow, hence --threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import common

REF_STAGES = ("read", "validate", "scale_fold", "host_layout", "pin", "device_copy", "relayout")
NEW_STAGES = ("read", "validate", "host", "stage", "unpack", "check", "relayout", "place", "other")


def model_config(shape: common.ModelShape) -> SimpleNamespace:
    """The attributes the loader and the store read from a MistralConfig."""
    return SimpleNamespace(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, vocab_size=shape.vocab,
        num_hidden_layers=shape.layers,
    )  # fmt: skip


def sync(device: torch.device) -> None:
    common.sync(device)


class StageTimer:
    """Exclusive wall time per stage (a nested stage's time is not counted in its caller's)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, time spent in nested stages]

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            self._stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                _, start, nested = self._stack.pop()
                total = (time.perf_counter() - start) * 1e3
                self.ms[name] += total - nested
                if self._stack:
                    self._stack[-1][2] += total

        return timed

    def take(self) -> dict[str, float]:
        out, self.ms = dict(self.ms), defaultdict(float)
        return out


def new_store(config, device: torch.device, dtype: torch.dtype, slots: int | None, rank: int):
    """slots: a store laid out for that many rank-`rank` adapters at start; None: empty, grows from 1."""
    from cache.adapter_shapes import SlotReservation
    from cache.adapter_store import AdapterStore

    reserve = None if slots is None else SlotReservation(slots, rank)
    return AdapterStore(config, device, dtype, budget_bytes=None, max_slots=64, reserve=reserve)


def spec_of(path: Path):
    from shard_server.types import AdapterSpec

    return AdapterSpec(adapter_ids=(str(path),), source="local")


def run_e2e(dirs: list[Path], store, device) -> list[float]:
    out = []
    for j, d in enumerate(dirs):
        sync(device)
        t0 = time.perf_counter()
        store.load(1 + j, spec_of(d))
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run_stages(dirs: list[Path], store, device) -> list[dict[str, float]]:
    import model.adapters.peft_loader as loader
    from cache.adapter_unpack import UnpackPlan

    timer = StageTimer(device)
    wrapped = [(store, "load", "other"), (store, "_host_weights", "host"), (store.layout, "load", "place"),
               (store.layout, "_unpack", "unpack"), (store.layout, "_rebuild", "relayout"),
               (store.layout._uploader, "stage", "stage"), (loader, "_read_tensors", "read"),
               (loader, "validate_lora_tensors", "validate"), (UnpackPlan, "check", "check"),
               (UnpackPlan, "problem", "check")]  # fmt: skip
    saved = [(obj, attr, obj.__dict__.get(attr)) for obj, attr, _ in wrapped]
    for obj, attr, name in wrapped:
        setattr(obj, attr, timer.wrap(name, getattr(obj, attr)))
    try:
        rows = []
        for j, d in enumerate(dirs):
            store.load(1 + j, spec_of(d))
            rows.append(timer.take())
        return rows
    finally:
        for obj, attr, fn in saved:
            if fn is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, fn)


def run_reference(dirs: list[Path], config, device, dtype) -> list[dict[str, float]]:
    """The naive path: load_file, float32 fold, per-tensor cast/pin/copy, full re-upload on growth."""
    from safetensors.torch import load_file

    from cache.adapter_store import rank_bucket
    from model.adapters.peft_loader import WEIGHTS_FILE, read_adapter_config, validate_lora_tensors
    from model.adapters.sharding import shard_lora

    timer = StageTimer(device)
    pin = device.type == "cuda"
    hosts: list[dict] = []  # per loaded adapter: key -> (A, B) host copies, store dtype
    stacks: dict = {}
    cap = 0

    def place(host: dict, slot: int) -> None:
        for stack_a, stack_b in stacks.values():
            stack_a[slot].zero_()
            stack_b[slot].zero_()
        for key, (a, b) in host.items():
            stack_a, stack_b = stacks[key]
            r = a.shape[0]
            stack_a[slot, :r].copy_(a, non_blocking=True)
            stack_b[slot, :, :r].copy_(b, non_blocking=True)

    def relayout(new_cap: int) -> None:
        nonlocal stacks, cap
        stacks, cap = {}, new_cap
        need = {}
        for host in hosts:
            for key, (a, b) in host.items():
                need[key] = (max(rank_bucket(a.shape[0]), need.get(key, (0,))[0]), a.shape[1], b.shape[0])
        for key, (r, fan_in, fan_out) in sorted(need.items()):
            stacks[key] = (torch.zeros(cap, r, fan_in, device=device, dtype=dtype),
                           torch.zeros(cap, fan_out, r, device=device, dtype=dtype))  # fmt: skip
        for slot, host in enumerate(hosts):
            timer.wrap("device_copy", place)(host, slot)

    rows = []
    for d in dirs:
        cfg = timer.wrap("read", read_adapter_config)(d)
        tensors = timer.wrap("read", load_file)(str(d / WEIGHTS_FILE), device="cpu")
        modules = timer.wrap("validate", validate_lora_tensors)(
            tensors, cfg, config, d / WEIGHTS_FILE, str(d)
        ).modules

        def fold(modules=modules):
            return {
                k: (m.a.float().contiguous(), (m.b.float() * m.scale).contiguous())
                for k, m in modules.items()
            }

        def layout(scaled):
            out = {}
            for (layer, target), (a, b) in scaled.items():
                a, b = shard_lora(target, a, b, config, 0, 1)
                out[(layer, target)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
            return out

        host = timer.wrap("host_layout", layout)(timer.wrap("scale_fold", fold)())
        if pin:
            host = timer.wrap(
                "pin", lambda h=host: {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in h.items()}
            )()
        hosts.append(host)
        if len(hosts) > cap:
            timer.wrap("relayout", relayout)(1 << (len(hosts) - 1).bit_length())
        else:
            timer.wrap("device_copy", place)(host, len(hosts) - 1)
        rows.append(timer.take())
    return rows


def summarize(rows: list[dict[str, float]], stages: tuple[str, ...]) -> dict[str, float]:
    """Median over the loads of each stage and of their sum."""
    out = {s: statistics.median(r.get(s, 0.0) for r in rows) for s in stages}
    out["sum"] = statistics.median(sum(r.values()) for r in rows)
    return out


def print_table(title: str, rows: list[dict[str, float]], stages: tuple[str, ...]) -> None:
    print(f"\n{title} (ms; one column per load, then the median)")
    width = max(len(s) for s in stages) + 2
    for s in (*stages, "sum"):
        vals = [r.get(s, 0.0) if s != "sum" else sum(r.values()) for r in rows]
        print(f"  {s:<{width}}" + "".join(f"{v:9.1f}" for v in vals) + f"   | {statistics.median(vals):8.1f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", help="store dtype (files are always bf16)")
    ap.add_argument("--shape", default="7b", choices=("7b", "tiny"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--loads", type=int, default=5, help="distinct adapters loaded into one empty store")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-adapter-load"))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--no-reference", action="store_true", help="skip the naive path's breakdown")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = common.MISTRAL_7B if args.shape == "7b" else common.TINY
    config = model_config(shape)
    mb = shape.adapter_params(args.rank) * 2 / 1e6
    print(
        f"device {common.device_name(device)}, store dtype {dtype}, {args.shape} rank {args.rank}: "
        f"{mb:.1f} MB bf16 file per adapter, {args.loads} loads per run, {torch.get_num_threads()} threads"
    )

    # Three sets of distinct files (one per run), so no run finds another's adapter in the store's cache.
    def files(run: str) -> list[Path]:
        out = []
        for j in range(args.loads):
            d = args.work / f"{args.shape}-r{args.rank}-{run}-{j}"
            if not (d / "adapter_model.safetensors").exists():
                common.write_adapter(d, shape, args.rank, torch.device("cpu"), torch.bfloat16, seed=7000 + j)
            out.append(d)
        return out

    result: dict = {"device": common.device_name(device), "dtype": str(dtype), "shape": args.shape,
                    "rank": args.rank, "adapter_MB": mb, "threads": torch.get_num_threads()}  # fmt: skip
    for key, slots, what in (("e2e_ms", args.loads, f"into stacks laid out at start ({args.loads} slots)"),
                             ("e2e_growth_ms", None, "into an empty store growing 1 -> 2 -> 4 -> 8")):
        store = new_store(config, device, dtype, slots, args.rank)
        ms = run_e2e(files(key.removesuffix("_ms")), store, device)
        print(f"\n{key} AdapterStore.load {what}, to synchronize (ms): {' '.join(f'{v:.1f}' for v in ms)}  "
              f"| median {statistics.median(ms):.1f}")  # fmt: skip
        result[key] = ms
        del store
    rows = run_stages(files("stages"), new_store(config, device, dtype, args.loads, args.rank), device)
    print_table("stages, current load path into stacks laid out at start", rows, NEW_STAGES)
    result["stages_ms"] = summarize(rows, NEW_STAGES)
    if not args.no_reference:
        ref = run_reference(files("reference"), config, device, dtype)
        print_table("stages, naive load path (reference)", ref, REF_STAGES)
        result["reference_ms"] = summarize(ref, REF_STAGES)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
