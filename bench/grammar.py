"""Structured output at batch 64: every row its own JSON schema vs the same batch unconstrained.

    python -m bench.grammar                  # GPU: Mistral-7B-shaped random bf16 model, CUDA graphs
    python -m bench.grammar --device cpu     # CPU: the tiny model (code paths and host costs)

One run, one engine, in this order:
  compile      cold compiles of the 64 distinct schemas (each row's own) on the engine's SchemaCompiler:
               p50, p99, max; plus the one-time tokenizer read (llguidance's token trie)
  decode       `--rounds` rounds of: the batch unconstrained, then the same prompts with one schema per
               row. Per-step host clock after the step's own sync (as bench/gpu.py's decode rows),
               median over steps, the first WARM_STEPS of each run left out. tok_s = batch / step.
               A row's schema is an object of 32 required properties, each <one of 64 distinct
               schemas of shard_server/testing/json_schemas.py>: no document completes within the run,
               so the batch stays at 64 constrained rows and every step computes real masks.
               (Not "an array with minItems 1000": llguidance's mask cost grows with such counts,
               ~2.5 ms per row per step at 1000.)
  masks        per step: the mask worker's job (advance 64 matchers, fill 64 masks; overlapped with
               the host's emit and the next forward) and the model thread's wait for it: p50, p99
Rows go to bench/results/<card>-grammar-<date>.json (JSON rows like bench/gpu.py's) and $OUT; the
CPU run writes to a temporary directory unless --out-dir is given. Target (issue): constrained tok/s
>= 0.90 x unconstrained, on the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench import common
from bench.gpu_plan import REPO, Report, fail_soft, log
from bench.gpu_sections import WARM_STEPS, Prompts

ROW_KEYS = ("kind", "system", "batch", "tok_s", "step_ms", "ms")


def bench_schemas(n: int, copies: int = 32) -> list[str]:
    """n distinct schemas: an object of `copies` required properties, each one of n distinct schemas."""
    from shard_server.testing.json_schemas import distinct_schemas

    out = []
    for s in distinct_schemas(n):
        item = dict(s)
        defs = item.pop("$defs", None)  # "#/$defs/..." refers to the document's root
        keys = [f"part_{j}" for j in range(copies)]
        doc = {"type": "object", "properties": {k: item for k in keys}, "required": keys,
               "additionalProperties": False}  # fmt: skip
        out.append(json.dumps(doc | ({"$defs": defs} if defs else {})))
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class GrammarBench:
    def __init__(self, args, report: Report, model_dir: Path):
        self.args, self.report = args, report
        self.device = torch.device(args.device)
        self.model_dir = model_dir
        self.engine = None
        self.batch_ids = iter(range(1, 1 << 30))

    def build_engine(self) -> None:
        from shard_server.config import GrammarConfig, ShardConfig
        from shard_server.engine.engine import ShardEngine
        from shard_server.types import BatchSpec

        a = self.args
        cfg = json.loads((self.model_dir / "config.json").read_text())
        dtype = "bfloat16" if a.device == "cuda" else "float32"
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        elem = 2 if a.device == "cuda" else 4
        per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * elem
        kv_bytes = int(1.5 * a.batch * (a.prompt + a.new_tokens) * per_token) + (64 << 20)
        t0 = time.perf_counter()
        grammar = GrammarConfig(**({"mask_threads": a.mask_threads} if a.mask_threads else {}))
        self.engine = ShardEngine(ShardConfig(model_dir=self.model_dir, device=a.device, dtype=dtype,
                                              max_kv_cache_bytes=kv_bytes, grammar=grammar))  # fmt: skip
        self.prompts = Prompts(min(512, cfg["vocab_size"]))
        warm = self.prompts.specs(4, a.prompt, 2)
        warm_batch = BatchSpec(id=next(self.batch_ids), requests=tuple(warm))
        self.engine.warmup(warm_batch, a.prompt, 4 * a.prompt, 2)
        graphs = self.engine.runner.graphs is not None
        log(f"engine ready in {time.perf_counter() - t0:.1f}s, CUDA graphs {graphs}")

    def sec_compile(self) -> None:
        g = self.engine.grammars
        t0 = time.perf_counter()
        g.compile("{}")  # waits for the tokenizer read started with the engine
        setup_ms = (time.perf_counter() - t0) * 1e3
        times = []
        for text in bench_schemas(self.args.batch):
            t0 = time.perf_counter()
            g.compile(text)
            times.append((time.perf_counter() - t0) * 1e3)
        self.report.add(
            "compile", "llguidance", batch=len(times), ms=statistics.median(times),
            compile_ms_p50=statistics.median(times), compile_ms_p99=pct(times, 0.99),
            compile_ms_max=max(times), first_compile_ms=setup_ms,
            notes="cold compiles of each row's schema (cache empty for each); first_compile_ms includes "
            "the tokenizer read that starts with the engine",
        )  # fmt: skip

    def run(self, constrained: bool) -> dict:
        from shard_server.types import BatchSpec, SamplingParams

        a, eng = self.args, self.engine
        specs = self.prompts.specs(a.batch, a.prompt, a.new_tokens)
        if constrained:
            texts = bench_schemas(a.batch)
            specs = [replace(s, sampling=SamplingParams(schema=t)) for s, t in zip(specs, texts, strict=True)]
        filler = eng.grammars._filler
        if filler is not None:
            filler.job_seconds.clear()
            filler.wait_seconds.clear()
        steps = []
        try:
            res = eng.prefill(BatchSpec(id=next(self.batch_ids), requests=tuple(specs)))
            bid = res.batch.id
            while bid is not None:
                common.sync(self.device)
                t0 = time.perf_counter()
                res = eng.decode([bid])
                common.sync(self.device)
                steps.append(time.perf_counter() - t0)
                assert len(res.generations) == a.batch or res.batch is None
                bid = None if res.batch is None else res.batch.id
        finally:
            eng.clear_cache(None)
        timed = steps[WARM_STEPS:]
        out = {"step_s": statistics.median(timed), "steps": len(timed)}
        if constrained:
            jobs = [x * 1e3 for x in list(filler.job_seconds)[WARM_STEPS:]]
            waits = [x * 1e3 for x in list(filler.wait_seconds)[WARM_STEPS:]]
            out |= {"mask_job_ms_p50": statistics.median(jobs), "mask_job_ms_p99": pct(jobs, 0.99),
                    "mask_wait_ms_p50": statistics.median(waits),
                    "mask_wait_ms_p99": pct(waits, 0.99)}  # fmt: skip
        return out

    def sec_decode(self) -> None:
        a = self.args
        self.run(False)  # warm: graphs for this batch bucket, allocator growth
        plain, grammar = [], []
        for _ in range(a.rounds):
            plain.append(self.run(False))
            grammar.append(self.run(True))
        base = statistics.median(r["step_s"] for r in plain)
        cons = statistics.median(r["step_s"] for r in grammar)
        self.report.add("decode", "unconstrained", batch=a.batch, tok_s=a.batch / base, step_ms=base * 1e3,
                        rounds=[r["step_s"] * 1e3 for r in plain], prompt=a.prompt, new_tokens=a.new_tokens)
        masks = {k: statistics.median(r[k] for r in grammar) for k in grammar[0] if k.startswith("mask_")}
        self.report.add(
            "decode", "schema_per_row", batch=a.batch, tok_s=a.batch / cons, step_ms=cons * 1e3,
            mask_threads=self.engine.config.grammar.mask_threads,
            ratio_vs_unconstrained=base / cons, rounds=[r["step_s"] * 1e3 for r in grammar], prompt=a.prompt,
            new_tokens=a.new_tokens, **masks, notes="64 distinct schemas, one per row; medians over rounds "
            "of per-step medians; mask_job = worker (advance + fill), mask_wait = model thread's wait",
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grammar", description=__doc__.split("\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=("cuda", "cpu"), default=default_device)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=None, help="default 512 on cuda, 32 on cpu")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 on cuda, 24 on cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mask-threads", type=int, default=None, help="llguidance's mask threads (GrammarConfig)")
    p.add_argument("--model-dir", default=None, help="reuse a checkpoint dir (default: write one)")
    p.add_argument("--out-dir", default=None, help="default bench/results on cuda, a temporary dir on cpu")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.prompt = args.prompt or (512 if cuda else 32)
    args.new_tokens = args.new_tokens or (128 if cuda else 24)
    device = torch.device(args.device)
    name = common.device_name(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out_dir = Path(args.out_dir) if args.out_dir else (
        REPO / "bench" / "results" if cuda else Path(tempfile.mkdtemp(prefix="bench-grammar-")))  # fmt: skip
    card = common.card_slug(name) if cuda else "cpu"
    report = Report(out_dir / f"{card}-grammar-{date}.json", name, common.git_commit(REPO))
    work = Path(tempfile.mkdtemp(prefix="bench-grammar-", dir="/dev/shm" if cuda else None))
    try:
        if args.model_dir:
            model_dir = Path(args.model_dir)
        elif cuda:
            log("writing a Mistral-7B-shaped random bf16 checkpoint")
            model_dir = common.write_model_dir(work / "model", common.MISTRAL_7B, device, torch.bfloat16)
        else:
            from shard_server.tools.tiny_model import make_tiny_model

            model_dir = make_tiny_model(work / "model")
        bench = GrammarBench(args, report, model_dir)
        bench.build_engine()
        fail_soft(report, "compile", "llguidance", bench.sec_compile)
        fail_soft(report, "decode", "schema_per_row", bench.sec_decode)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in report.rows:
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                 if v is not None and k not in ("notes", "rounds")}  # fmt: skip
        print(json.dumps(shown))
    log(f"results: {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
