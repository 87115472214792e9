"""Where the host time of a decode step goes, speculative (n-gram, k drafts) and plain, per phase.

    python -m bench.spec_host_profile --model-dir DEMO_DIR/model [--device cpu] [--batches 1,16] [--k 5]

Each phase is a function of the real engine, wrapped with timers (wall time and this thread's CPU
time, which a busy host does not inflate; a phase's time includes its children's) and, in a last pass,
a count of the ATen ops it dispatches (each one a kernel launch, ~5-10 us of host time, on a GPU; only
the forward is one CUDA-graph replay there). On a CPU every op also computes, so the forwards and the
samplers (`verify`, `forward`, `choose_positions`, `choose`) are device work here; everything else is
host work on any device: Python per row (drafting, parsing the host copy, stopping and
detokenization) and the launches of small ops.

    decode            ShardEngine.decode, the whole step
      compute         Speculator.compute: drafting, the verify forward, scoring, the host copy
        ngram         Speculator.ngram_drafts (all rows): index the new tokens, look up the suffix
        verify        verify_forward: the forward over B x (1 + k) tokens
        choose_positions  the target token of every position (the sampler, on the device)
        to_host       VerifySample.to_host: the one sync, then the per-row parse of the host copy
        (glue)        compute less the above: per-row budgets, the draft tensor
      forward         ModelRunner.decode: a plain step's forward (no row had a draft; or k = 0)
      choose          NextTokenChooser.choose: a plain step's sampler
      commit          Speculator.commit: chooser state, positions, lengths (per row), Medusa proposals
      emit            ShardEngine.emit: stopping and detokenization per row and token
      look_ahead      Speculator.look_ahead: the next step's drafts and the launch of its verify forward
      (other)         decode less the above: batch bookkeeping, the plain step's host copy
    prefill           ShardEngine.prefill (continuous batching: the new requests' Prefill calls), per
                      decode step like the rest
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.spec_data import demo_eval_texts
from bench.spec_engine import (
    EngineSettings,
    Ids,
    chat_ids,
    generate,
    generate_continuous,
    with_engine,
)

# phase -> the phase it is recorded inside (None: the top). Elsewhere (the prefill's emit, the plain
# sampler inside choose_positions) a function counts toward the phase that encloses it.
PARENT = {"decode": None, "prefill": None, "compute": "decode", "forward": "decode", "choose": "decode",
          "commit": "decode", "emit": "decode", "look_ahead": "decode", "ngram": "compute",
          "verify": "compute", "choose_positions": "compute", "to_host": "compute"}  # fmt: skip


def _phases():
    from shard_server.engine.engine import ShardEngine
    from shard_server.engine.speculative import speculator
    from shard_server.executor.runner import ModelRunner
    from shard_server.generation.sampling import NextTokenChooser
    from shard_server.generation.speculative import VerifySample

    return [
        (ShardEngine, "decode", "decode"),
        (ShardEngine, "prefill", "prefill"),
        (speculator.Speculator, "look_ahead", "look_ahead"),
        (speculator.Speculator, "compute", "compute"),
        (speculator.Speculator, "ngram_drafts", "ngram"),
        (speculator, "verify_forward", "verify"),
        (ModelRunner, "decode", "forward"),
        (speculator, "choose_positions", "choose_positions"),
        (NextTokenChooser, "choose", "choose"),
        (VerifySample, "to_host", "to_host"),
        (speculator.Speculator, "commit", "commit"),
        (ShardEngine, "emit", "emit"),
    ]


class _OpCounter(TorchDispatchMode):
    def __init__(self, stack: list[str], counts: dict[str, int]):
        super().__init__()
        self.stack, self.counts = stack, counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.stack:
            self.counts[self.stack[-1]] += 1
        return func(*args, **(kwargs or {}))


class _Record:
    def __init__(self) -> None:
        self.stack: list[str] = []
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)  # this thread's CPU time (robust to a busy host)
        self.calls: dict[str, int] = defaultdict(int)


@contextlib.contextmanager
def instrumented(rec: _Record):
    """Wrap every phase function with timers (and keep the phase stack the op counter reads)."""
    saved = []
    for owner, attr, name in _phases():
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def wrapped(*a, _fn=fn, _name=name, **kw):
            if (rec.stack[-1] if rec.stack else None) != PARENT[_name]:
                return _fn(*a, **kw)
            rec.stack.append(_name)
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return _fn(*a, **kw)
            finally:
                rec.wall[_name] += time.perf_counter() - w0
                rec.cpu[_name] += time.thread_time() - c0
                rec.calls[_name] += 1
                rec.stack.pop()

        setattr(owner, attr, wrapped)
    try:
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


def _per_step(times: dict[str, float], steps: int) -> dict[str, float]:
    t = dict(times)
    t["(glue)"] = t.get("compute", 0.0) - sum(t.get(n, 0.0) for n in ("ngram", "verify", "choose_positions",
                                                                      "to_host"))  # fmt: skip
    t["(other)"] = t.get("decode", 0.0) - sum(t.get(n, 0.0) for n in PARENT if PARENT[n] == "decode")
    return {k: 1e3 * v / steps for k, v in t.items()}


def profile(engine, prompts: list[list[int]], batch: int, max_new: int, passes: int = 2,
            continuous: int = 0) -> dict:  # fmt: skip
    """Per decode step, for `batch` prompts generated together: wall ms, thread-CPU ms (each the
    minimum over `passes` generations) and ATen ops of each phase. `continuous` > 0: that many times
    `batch` prompts, `batch` running at a time (spec_engine.generate_continuous)."""
    reqs = prompts[: batch * continuous] if continuous else prompts[:batch]
    gen_fn = generate_continuous if continuous else generate
    ids = Ids()
    generate(engine, reqs[:batch], 4, batch, ids)  # first replays, allocator
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for _ in range(passes):
        rec = _Record()
        with instrumented(rec):
            gen = gen_fn(engine, reqs, max_new, batch, ids)
        steps = max(rec.calls["decode"], 1)
        for mine, got in ((wall, _per_step(rec.wall, steps)), (cpu, _per_step(rec.cpu, steps))):
            for k, v in got.items():
                mine[k] = min(mine.get(k, v), v)
    rec = _Record()
    with instrumented(rec), _OpCounter(rec.stack, ops := defaultdict(int)):
        gen_fn(engine, reqs, max_new, batch, ids)
    return {
        "batch": batch, "k": engine.config.speculative_tokens, "decode_steps": steps,
        "continuous": continuous, "prefill_calls": rec.calls["prefill"], "tok_s": gen.tok_s,
        "tokens_per_step": gen.tokens_per_step, "acceptance": gen.acceptance,
        "wall_ms_per_step": wall, "cpu_ms_per_step": cpu,
        "aten_ops_per_step": {k: v / steps for k, v in ops.items()},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: quieter host timings)")
    ap.add_argument("--passes", type=int, default=2, help="timed generations; each phase's minimum kept")
    ap.add_argument("--continuous", type=int, default=0,
                    help="continuous batching: batch x this many requests, rows replaced as they finish")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(x) for x in args.batches.split(",")]
    cuda = args.device == "cuda"
    es = EngineSettings(device=args.device, dtype="bfloat16" if cuda else "float32", max_batch=max(batches),
                        max_input=768, max_new=args.max_new_tokens, kv_bytes=(2 << 30) if cuda else 256 << 20,
                        cuda_graphs=cuda)  # fmt: skip
    texts = demo_eval_texts(max(batches) * max(1, args.continuous))
    rows = []
    for k in (0, args.k):

        def work(engine):
            prompts = [chat_ids(engine.tokenizer, t) for t in texts]
            return [profile(engine, prompts, b, args.max_new_tokens, args.passes, args.continuous)
                    for b in batches]  # fmt: skip

        for r in with_engine(Path(args.model_dir), k, es, work):
            rows.append(r)
            print(f"k={r['k']} batch={r['batch']} tok/step={r['tokens_per_step']:.2f} tok/s={r['tok_s']:.0f} "
                  f"prefill calls={r['prefill_calls']}", flush=True)  # fmt: skip
            for what in ("wall_ms_per_step", "cpu_ms_per_step", "aten_ops_per_step"):
                print(f"  {what}: " + " ".join(f"{n} {v:.2f}" for n, v in r[what].items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
