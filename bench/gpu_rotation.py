"""Adapter sections of `python -m bench.gpu` beyond the fixed table: mixed ranks in one batch, and the
rotation of many adapters through fewer device slots (issue 13), on the engine of bench/gpu_sections.

rotation     `--rotation-adapters` (1,000) distinct rank-16 adapters registered with LoadAdapter, the
             device keeping at most `--rotation-slots` (64) of them. A driver like the router keeps
             `--rotation-running` (64) requests running: every step it prefills new requests into the
             freed places (adapter drawn Zipf-like, P(k) ~ 1/k^s, s = `--rotation-zipf` 1.1), then
             decodes the running batch, for `--rotation-seconds` after the first fill. The same driver
             runs first over 32 resident adapters (round-robin): the all-resident baseline. Rows: tok/s
             (every generated token / wall time) and its ratio to the baseline, TTFT p50/p99 (the prefill
             call, synchronized) of the requests whose adapter was not resident when they arrived, and of
             the others; misses per second. The adapter directories share `--rotation-unique-files` (16)
             distinct safetensors files through hard links (1,000 distinct files of 84 MB would not fit
             the disk); each directory is its own adapter to the store (own table, own uploads).
mixed_ranks  decode at each --adapter-batches size with 9 adapters of ranks 8, 16, 64 in one batch
             (one stack at bucket 64; each slot reads its own rank's rows); the roofline counts each
             adapter's own bytes.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from pathlib import Path

from bench import common
from bench.common import sync
from bench.gpu_plan import fail_soft, log


def _zipf_sampler(n: int, s: float, seed: int):
    weights = [1.0 / (k**s) for k in range(1, n + 1)]
    rng = random.Random(seed)
    return lambda: rng.choices(range(n), weights=weights)[0]


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def rotation_dirs(bench, n: int) -> list[Path]:
    """n adapter directories over a few distinct files (hard links), each with its own config."""
    p = bench.plan
    unique = bench.adapters("rotation-unique", min(p.rotation_unique_files, n), seed0=9000)
    out = []
    for j in range(n):
        d = bench.work / f"adapter-rotation-{j}"
        if not (d / "adapter_model.safetensors").exists():
            d.mkdir(parents=True, exist_ok=True)
            src = unique[j % len(unique)]
            os.link(src / "adapter_model.safetensors", d / "adapter_model.safetensors")
            (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        out.append(d)
    return out


def drive(bench, adapter_of, seconds: float) -> dict:
    """Keep `rotation_running` requests running for `seconds` after the first fill -> measurements."""
    from shard_server.types import BatchSpec

    p, engine = bench.plan, bench.engine
    rng = random.Random(7)
    running, bid = 0, None
    tokens, ttft_miss, ttft_hit, misses = 0, [], [], 0
    start = None
    try:
        while start is None or time.perf_counter() - start < seconds:
            free = p.rotation_running - running
            new_bid = None
            if free:
                lengths = [rng.randint(p.new_tokens // 2, p.new_tokens * 3 // 2) for _ in range(free)]
                specs = [s for n in lengths
                         for s in bench.prompts.specs(1, p.rotation_prompt, n, lambda _: adapter_of())]
                resident = set(engine.adapters.resident_indices())
                sync(p.device)
                t0 = time.perf_counter()
                res = engine.prefill(BatchSpec(id=next(bench.batch_ids), requests=tuple(specs)))
                sync(p.device)
                dt = (time.perf_counter() - t0) * 1e3
                if start is not None:
                    tokens += len(res.generations)
                    for s in specs:
                        miss = s.adapter_index not in resident
                        misses += miss
                        (ttft_miss if miss else ttft_hit).append(dt)
                new_bid = None if res.batch is None else res.batch.id
            if start is None:
                start = time.perf_counter()  # the first fill is not timed
            ids = [b for b in (bid, new_bid) if b is not None]
            if not ids:
                break
            res = engine.decode(ids)
            tokens += len(res.generations)
            bid = None if res.batch is None else res.batch.id
            running = 0 if res.batch is None else res.batch.size
        sync(p.device)
        wall = time.perf_counter() - start
    finally:
        engine.clear_cache(None)
    return dict(tok_s=tokens / wall, seconds=wall, tokens=tokens, misses=misses, misses_per_s=misses / wall,
                ttft_miss_ms=ttft_miss, ttft_hit_ms=ttft_hit)  # fmt: skip


def sec_rotation(bench) -> None:
    from shard_server.types import AdapterSpec

    p, rep, engine = bench.plan, bench.report, bench.engine
    store = engine.adapters
    # The baseline: 32 adapters, all resident (the adapters section's, loaded again if needed).
    base_dirs = bench.adapters("decode", 32, seed0=1)
    for j, d in enumerate(base_dirs, start=1):
        if not store.is_loaded(j):
            engine.load_adapter(j, AdapterSpec(adapter_ids=(str(d),), source="local"))
    turn = itertools.cycle(range(1, 33))
    base = drive(bench, lambda: next(turn), p.rotation_seconds)
    rep.add("rotation", "shard", batch=p.rotation_running, adapters=32, tok_s=base["tok_s"],
            seconds=base["seconds"], tokens=base["tokens"], resident="all",
            ttft_p50_ms=_percentile(base["ttft_hit_ms"], 0.5),
            ttft_p99_ms=_percentile(base["ttft_hit_ms"], 0.99),
            notes=f"baseline: {p.rotation_running} running, 32 resident adapters round-robin, prompt "
            f"{p.rotation_prompt}, new tokens uniform in [{p.new_tokens // 2}, {p.new_tokens * 3 // 2}]",
            )  # fmt: skip
    for j in range(1, 33):
        engine.offload_adapter(j, AdapterSpec(adapter_ids=(str(base_dirs[j - 1]),), source="local"))
    # The rotation: many registered adapters, at most rotation_slots on the device.
    slots_before = store.layout.max_slots
    store.layout.max_slots = min(store.layout.max_slots, p.rotation_slots)
    try:
        _rotate(bench, base)
    finally:
        store.layout.max_slots = slots_before


def _rotate(bench, base: dict) -> None:
    from shard_server.types import AdapterSpec

    p, rep, engine = bench.plan, bench.report, bench.engine
    store = engine.adapters
    dirs = rotation_dirs(bench, p.rotation_adapters)
    first = 10_000
    t0 = time.perf_counter()
    for j, d in enumerate(dirs):
        engine.load_adapter(first + j, AdapterSpec(adapter_ids=(str(d),), source="local"))
    log(f"rotation: {len(dirs)} adapters registered in {time.perf_counter() - t0:.1f}s, "
        f"{len(store.resident_indices())} resident")
    draw = _zipf_sampler(len(dirs), p.rotation_zipf, seed=11)
    out = drive(bench, lambda: first + draw(), p.rotation_seconds)
    miss, hit = out["ttft_miss_ms"], out["ttft_hit_ms"]
    rep.add("rotation", "shard", batch=p.rotation_running, adapters=len(dirs), tok_s=out["tok_s"],
            ratio_vs_resident=out["tok_s"] / base["tok_s"], seconds=out["seconds"], tokens=out["tokens"],
            device_slots=store.layout.max_slots, misses=out["misses"], misses_per_s=out["misses_per_s"],
            ttft_miss_p50_ms=_percentile(miss, 0.5), ttft_miss_p99_ms=_percentile(miss, 0.99),
            ttft_hit_p50_ms=_percentile(hit, 0.5), ttft_hit_p99_ms=_percentile(hit, 0.99),
            ttft_miss_samples=len(miss),
            notes=f"Zipf s={p.rotation_zipf} over {len(dirs)} rank-{p.rank} adapters "
            f"({p.rotation_unique_files} distinct files), {p.rotation_running} running, "
            f"<= {store.layout.max_slots} device slots; TTFT = the "
            "prefill call of the step that admitted the request (synchronized)")  # fmt: skip
    for j, d in enumerate(dirs):
        engine.offload_adapter(first + j, AdapterSpec(adapter_ids=(str(d),), source="local"))


MIXED_RANKS = (8, 16, 64)


def sec_mixed_ranks(bench) -> None:
    """9 adapters, ranks 8/16/64 interleaved, at each adapter batch size; then offloaded again."""
    from shard_server.types import AdapterSpec

    p, engine = bench.plan, bench.engine
    ranks = [MIXED_RANKS[j % 3] for j in range(9)]
    have = bench.adapter_dirs.setdefault("mixed", [])
    for j in range(len(have), len(ranks)):
        out = bench.work / f"adapter-mixed-{j}"
        have.append(common.write_adapter(out, p.shape, ranks[j], p.device, p.dtype, seed=7000 + j))
    first = 20_000
    specs = [AdapterSpec(adapter_ids=(str(d),), source="local") for d in have]
    for j, spec in enumerate(specs):
        engine.load_adapter(first + j, spec)
    adapter_bytes = sum(p.shape.adapter_params(r) for r in ranks) * p.elem
    try:
        for b in p.adapter_batches:
            row = dict(first_index=first, adapter_bytes=adapter_bytes, ranks=ranks, mixed_ranks=True)
            fail_soft(bench.report, "decode", "shard",
                      lambda b=b, row=row: bench.decode_row(b, len(ranks), **row),
                      batch=b, adapters=len(ranks), mixed_ranks=True)  # fmt: skip
    finally:
        for j, spec in enumerate(specs):
            engine.offload_adapter(first + j, spec)


def summarize_ttft(rows: list[dict]) -> str:
    r = next((x for x in rows if x.get("kind") == "rotation" and x.get("ratio_vs_resident")), None)
    if r is None:
        return "rotation: n/a"
    def ms(key):
        return "-" if r.get(key) is None else f"{r[key]:.1f}"

    return (f"rotation: {r['tok_s']:.0f} tok/s = {r['ratio_vs_resident']:.3f} x all-resident; TTFT of misses "
            f"p50 {ms('ttft_miss_p50_ms')} ms p99 {ms('ttft_miss_p99_ms')} ms "
            f"({r['ttft_miss_samples']} misses), "
            f"hits p50 {ms('ttft_hit_p50_ms')} ms p99 {ms('ttft_hit_p99_ms')} ms")
