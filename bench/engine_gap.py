"""Why is the engine's decode forward slower than the model's own graph replay? Mistral-7B shape, random
bf16 weights, one process, the same model, batch and context for every case.

    python -m bench.engine_gap [--batches 32,128] [--context 544] [--out FILE]

`make bench` times `runner.decode(batch)` (forward_ms) at 5.85-6.05 ms for 64 rows and 7.37-7.49 ms for
128 at a 513-token context (bench/results/h200-decode-2026-12-01.json, h200-adapters-2026-12-01d.json),
where bench/profile_lora.py replays the model's own decode graph in 5.59-5.62 and 7.10-7.16 ms at 544
tokens: 0.25-0.45 ms a step (4-8%) that no profile so far has looked at. Cases, timed in interleaved
rounds (CUDA events around each call):

  model        ForwardBatch.decode captured by hand (bench/profile_decode.DecodeCase), replayed
  runner       ModelRunner.decode(batch): DecodeGraphs' input copies + its graph's replay, as the engine
  graph        the same DecodeGraphs graph replayed alone (no input copies)

and the kernels of one call of each (model vs runner), so a difference is named, not guessed.

`--engine`: the same on a ShardEngine built as `make bench` builds it (checkpoint written and loaded,
Warmup), prompt 512: the graph alone, runner.decode, and engine.decode steps as `make bench` times them;
then a trace of 8 engine steps, summarised as the share of the span in which the GPU runs nothing and
the kernels that run between two graph replays (`idle_summary`).
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.common import median, time_ms, write_results
from bench.l2_prefetch import graph_of
from bench.profile_decode import DecodeCase, build_model
from bench.profile_lora import kernel_table


def idle_summary(path: str) -> dict:
    """From a Chrome trace (torch profiler): GPU span from the first to the last kernel or copy, the time
    inside it covered by none, and per name the kernels / copies outside the decode graphs' (those whose
    name occurs fewer than 32 times: a graph runs every layer kernel 32+ times)."""
    with open(path) as f:
        kinds = ("kernel", "gpu_memcpy", "gpu_memset")
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("cat") in kinds]
    events.sort(key=lambda e: e["ts"])
    if not events:
        return {}
    start, end = events[0]["ts"], max(e["ts"] + e["dur"] for e in events)
    busy, cur_s, cur_e = 0.0, events[0]["ts"], events[0]["ts"] + events[0]["dur"]
    for e in events[1:]:
        if e["ts"] > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = e["ts"], e["ts"] + e["dur"]
        else:
            cur_e = max(cur_e, e["ts"] + e["dur"])
    busy += cur_e - cur_s
    counts: dict[str, list[float]] = {}
    for e in events:
        counts.setdefault(e["name"][:90], []).append(e["dur"])
    outside = {k: {"count": len(v), "us": sum(v)} for k, v in counts.items() if len(v) < 32}
    return {"span_us": end - start, "busy_us": busy, "idle_us": end - start - busy,
            "outside_graph": dict(sorted(outside.items(), key=lambda kv: -kv[1]["us"]))}


def engine_mode(args) -> dict:
    import tempfile
    import time
    from pathlib import Path

    from bench import common
    from bench.gpu_plan import Plan, Report
    from bench.gpu_sections import Bench
    from bench.profile_lora import write_trace
    from shard_server.executor.graphs import BASE, bucket_of

    dev = torch.device("cuda")
    plan = Plan(device=dev, dtype=torch.bfloat16, shape=common.MISTRAL_7B)
    plan.decode_batches = [int(x) for x in args.batches.split(",")]
    plan.adapter_batches, plan.e2e_batches = [], []
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="engine-gap-", dir=shm))
    bench = Bench(plan, Report(work / "report.json", "gpu", "none"), work, None)
    bench.write_model()
    bench.build_engine()
    eng = bench.engine
    out = {"device": torch.cuda.get_device_name(dev), "mode": "engine", "rows": []}
    for b in plan.decode_batches:
        bid = bench.prefill(bench.prompts.specs(b, plan.prompt, plan.new_tokens), plan.prefill_chunk_tokens)
        batch, graphs = eng.batches[bid], eng.runner.graphs
        key = (bucket_of(len(batch), graphs.buckets), graphs.context_bucket(batch.max_len), BASE)
        graph = graphs.graphs[key]
        cases = {"graph": graph.replay, "runner": lambda bt=batch: eng.runner.decode(bt)}
        samples = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                samples[name] += time_ms(fn, dev, 1, 5)
        row = {"batch": b, "key": list(key), "context": batch.max_len}
        row |= {f"{name}_ms": median(s) for name, s in samples.items()}
        steps = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(40):
            res = eng.decode([bid])
            t1 = time.perf_counter()
            steps.append((t1 - t0) * 1e3)
            t0 = t1
            bid = res.batch.id
        row["engine_step_ms"] = median(steps[2:])
        trace = str(work / f"trace-{b}.json")
        holder = {"bid": bid}

        def eight_steps(h=holder):
            for _ in range(8):
                h["bid"] = eng.decode([h["bid"]]).batch.id

        write_trace(eight_steps, trace)
        row["trace_8_steps"] = idle_summary(trace)
        row["context_after"] = eng.batches[holder["bid"]].max_len
        eng.clear_cache(None)
        out["rows"].append(row)
        t = row["trace_8_steps"]
        print(f"engine batch {b:4d} key {key}: graph {row['graph_ms']:.3f} ms, runner.decode "
              f"{row['runner_ms']:.3f}, engine step {row['engine_step_ms']:.3f} ms; 8 traced steps: span "
              f"{t['span_us'] / 1e3:.3f} ms, GPU idle {t['idle_us'] / 1e3:.3f} ms")  # fmt: skip
        for name, v in list(t["outside_graph"].items())[:12]:
            print(f"     {v['us']:9.1f} us  x{v['count']:3d}  {name}")
    return out


def main() -> None:
    from bench.speculative import _batch
    from cache.adapter_store import AdapterStore
    from cache.kv_cache import KVCache
    from model.forward_batch import ForwardBatch
    from shard_server.executor.gemm_policy import decode_policy
    from shard_server.executor.graphs import BASE, DecodeGraphs
    from shard_server.executor.runner import ModelRunner

    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--context", type=int, default=544)
    ap.add_argument("--max-context", type=int, default=4096, help="DecodeGraphs' max_context")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--engine", action="store_true", help="a ShardEngine built as make bench builds it")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.engine:
        out = engine_mode(args)
        write_results(args.out, out)
        return
    dev = torch.device("cuda")
    model = build_model(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    out = {"device": torch.cuda.get_device_name(dev), "rows": []}
    with torch.no_grad():
        for b in [int(x) for x in args.batches.split(",")]:
            batch, blocks = _batch(model, b, args.context, 0, dev)
            store = AdapterStore(model.config, dev, model.dtype)
            runner = ModelRunner(model, KVCache.for_model(model, blocks), store)
            runner.graphs = DecodeGraphs(runner, max_batch=b, max_context=args.max_context)
            runner.capture_graphs(args.context + 1)
            ctx = runner.graphs.context_bucket(batch.max_len)
            graph = runner.graphs.graphs[(b, ctx, BASE)]
            case = DecodeCase(model, b, args.context)

            def model_step(c=case, s=ctx):
                fb = ForwardBatch.decode(c.input_ids, c.positions, c.tables, block_size=model.block_size,
                                         max_s=s)  # fmt: skip
                return fb.run(model, c.kv.layers)

            with decode_policy(b, sms).applied():
                model_graph, _ = graph_of(model_step)
            cases = {"model": model_graph.replay, "runner": lambda r=runner, bt=batch: r.decode(bt),
                     "graph": graph.replay}  # fmt: skip
            samples = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, fn in cases.items():
                    samples[name] += time_ms(fn, dev, 1, 5)
            base = median(samples["model"])
            row = {"batch": b, "context": args.context, "context_bucket": ctx}
            for name, s in samples.items():
                row[f"{name}_ms"] = median(s)
                print(f"batch {b:4d} ctx {args.context} (bucket {ctx}) {name:7s} {median(s):7.3f} ms "
                      f"({median(s) / base:.3f} x model)")  # fmt: skip
            row["kernels"] = {name: kernel_table(cases[name], 14) for name in ("model", "runner")}
            for name in ("model", "runner"):
                print(f"  -- {name}")
                for k in row["kernels"][name]:
                    print(f"     {k['ms']:8.3f} ms  x{k['count']:5d}  {k['kernel']}")
            out["rows"].append(row)
            del runner, graph, model_graph, case, cases
            torch.cuda.empty_cache()
    write_results(args.out, out)


if __name__ == "__main__":
    main()
