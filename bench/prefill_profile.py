"""Where a Prefill call's time goes: wall time per call at a few sizes, then the torch profiler's top ops
(host time and device time) over a few single-request calls.

    python -m bench.prefill_profile [--model-dir DIR] --out FILE

Without --model-dir a model of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads,
intermediate 1536) with random weights is written first: the host cost of a prefill depends on the shape
and the code path, not on the values. The engine is configured as the speculative benches configure it
(bench/spec_engine.py: CUDA graphs, Warmup). Every call is a fresh batch, cleared afterwards.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import median
from bench.spec_engine import EngineSettings, with_engine


def _prefill_calls(engine, rows: int, tokens: int, calls: int, first_id: int,
                   fresh: bool = False) -> list[float]:  # fmt: skip
    """Wall ms of `calls` Prefill calls of `rows` x `tokens`. The same prompts every call (after the first,
    the block manager's prefix cache serves all but the last block), or `fresh` ones (no prefix hit)."""
    from shard_server.types import BatchSpec, RequestSpec, StoppingParams

    out = []
    for c in range(calls):
        reqs = tuple(RequestSpec(id=first_id + 100 * c + i,
                                 input_ids=tuple(5 + (7 * j + i + (13 * c if fresh else 0)) % 400
                                                 for j in range(tokens)),
                                 stopping=StoppingParams(max_new_tokens=4)) for i in range(rows))  # fmt: skip
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = engine.prefill(BatchSpec(id=first_id + c, requests=reqs))
        out.append(1e3 * (time.perf_counter() - t0))
        if res.batch is not None:
            engine.clear_cache(res.batch.id)
    return out


def run(engine, out: dict) -> None:
    next_id = 1000
    for rows, tokens, fresh in ((1, 250, False), (1, 250, True), (4, 250, False), (16, 250, False),
                                (16, 250, True)):
        ms = _prefill_calls(engine, rows, tokens, 8, next_id, fresh)
        next_id += 10_000
        out["calls"].append({"rows": rows, "tokens": tokens, "fresh_prompts": fresh, "ms": ms,
                             "median_ms": median(ms[2:])})  # fmt: skip
        print(f"prefill {rows:2d} x {tokens} tokens, {'fresh' if fresh else 'same'} prompts: median "
              f"{median(ms[2:]):7.2f} ms  (calls: "
              + " ".join(f"{m:.1f}" for m in ms) + ")", flush=True)  # fmt: skip
    # Python's view: which functions of ours the host time is spent under (cumulative).
    import cProfile
    import io
    import pstats

    prof_py = cProfile.Profile()
    prof_py.enable()
    _prefill_calls(engine, 1, 250, 3, next_id - 5000, fresh=True)
    prof_py.disable()
    text = io.StringIO()
    pstats.Stats(prof_py, stream=text).sort_stats("cumulative").print_stats(40)
    out["python_cumulative"] = text.getvalue()
    print(out["python_cumulative"][-6000:])
    acts = [torch.profiler.ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        _prefill_calls(engine, 1, 250, 3, next_id, fresh=True)
    ka = prof.key_averages()
    by_cpu = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:30]
    out["top_host"] = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3 / 3}
                       for e in by_cpu]  # fmt: skip
    print("top ops by host (self CPU) time, per call:")
    for r in out["top_host"]:
        print(f"  {r['self_cpu_ms']:8.3f} ms  {r['calls'] / 3:7.1f} calls  {r['op'][:90]}")
    if engine.device.type == "cuda":
        by_dev = sorted(ka, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:15]
        out["top_device"] = [
            {"op": e.key, "calls": e.count, "device_ms": getattr(e, "self_device_time_total", 0) / 1e3 / 3}
            for e in by_dev
        ]
        print("top ops by device time, per call:")
        for r in out["top_device"]:
            print(f"  {r['device_ms']:8.3f} ms  {r['calls'] / 3:7.1f} calls  {r['op'][:90]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        from shard_server.tools.tiny_model import TinyModelSpec, make_tiny_model

        shape = TinyModelSpec(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=4096,
                              init_std=0.02)  # fmt: skip
        model_dir = make_tiny_model(Path(tempfile.mkdtemp(prefix="prefill-model-")), shape)
    cuda = args.device == "cuda"
    es = EngineSettings(device=args.device, dtype="bfloat16" if cuda else "float32", max_batch=16,
                        max_input=768, max_new=256, kv_bytes=(2 << 30) if cuda else (256 << 20),
                        cuda_graphs=cuda)  # fmt: skip
    out: dict = {"device": args.device, "model_dir": str(model_dir), "calls": []}
    with_engine(Path(model_dir), 0, es, lambda e: run(e, out))
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
