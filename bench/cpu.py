"""`make bench-cpu`: the cost of the gRPC layer, measured on the tiny model.

The same workload runs twice, one after the other on the same cores:
  grpc:   a `python -m shard_server serve` process driven by the fake router over a unix socket
          (Prefill of every request, Decode until done, ClearCache; protobuf both ways);
  direct: the same steps as ShardEngine calls in this process (BatchSpec in, StepResult out).
Both print generated tokens per second (best of --repeats); their ratio is the share of throughput the
RPC layer keeps, and the difference per step is the RPC overhead per step.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shard_server.testing.fake_router import FakeRouter, RouterLimits
from shard_server.types import BatchSpec, RequestSpec, StoppingParams

KV_BYTES = 16 << 20


@dataclass(frozen=True)
class Workload:
    requests: int
    prompt_tokens: int
    new_tokens: int
    vocab: int = 512

    def specs(self) -> list[RequestSpec]:
        rng = random.Random(0)
        return [
            RequestSpec(
                id=i,
                input_ids=(1, *(rng.randrange(3, self.vocab) for _ in range(self.prompt_tokens - 1))),
                stopping=StoppingParams(max_new_tokens=self.new_tokens, ignore_eos_token=True),
            )
            for i in range(self.requests)
        ]

    def limits(self) -> RouterLimits:
        # One Prefill takes every request, as the direct run does: both sides run identical steps.
        per = self.prompt_tokens + self.new_tokens
        return RouterLimits(
            max_input_length=self.prompt_tokens,
            max_total_tokens=per,
            max_prefill_tokens=self.requests * self.prompt_tokens,
        )

    @property
    def generated(self) -> int:
        return self.requests * self.new_tokens


@dataclass(frozen=True)
class Timing:
    seconds: float
    tokens: int
    steps: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_grpc(model_dir: Path, work: Workload, repeats: int) -> Timing:
    sock_dir = Path(tempfile.mkdtemp(prefix="shard-bench-", dir="/tmp"))
    uds = sock_dir / "s"
    cmd = [
        sys.executable,
        "-m",
        "shard_server",
        "serve",
        str(model_dir),
        "--uds-path",
        str(uds),
        "--device",
        "cpu",
        "--max-kv-cache-bytes",
        str(KV_BYTES),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{uds}-0").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the shard did not start")
            time.sleep(0.1)
        with FakeRouter(f"unix://{uds}-0", work.limits()) as router:
            router.warmup()
            router.generate(work.specs()[:2])  # first-call costs out of the timing
            best = None
            for _ in range(repeats):
                t0 = time.perf_counter()
                results = router.generate(work.specs())
                dt = time.perf_counter() - t0
                tokens = sum(len(r.token_ids) for r in results)
                best = dt if best is None else min(best, dt)
        return Timing(best, tokens, work.new_tokens)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def run_direct(model_dir: Path, work: Workload, repeats: int) -> Timing:
    from shard_server.config import ShardConfig
    from shard_server.engine import ShardEngine
    from shard_server.service import batch_from_pb
    from shard_server.testing.wire import warmup_request

    engine = ShardEngine(
        ShardConfig(model_dir=model_dir, device="cpu", dtype="float32", max_kv_cache_bytes=KV_BYTES)
    )
    lim = work.limits()
    wreq = warmup_request(lim.max_input_length, lim.max_prefill_tokens, lim.max_total_tokens)
    engine.warmup(
        batch_from_pb(wreq.batch, "Warmup"),
        wreq.max_input_length,
        wreq.max_prefill_tokens,
        wreq.max_new_tokens,
    )
    batch_ids = iter(range(1, 1_000_000))

    def generate(specs: list[RequestSpec]) -> tuple[int, int]:
        result = engine.prefill(BatchSpec(id=next(batch_ids), requests=tuple(specs)), None)
        tokens, steps = len(result.generations), 1
        while result.batch is not None:
            result = engine.decode([result.batch.id])
            tokens += len(result.generations)
            steps += 1
        engine.clear_cache(None)
        return tokens, steps

    generate(work.specs()[:2])
    best, tokens = None, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens, _steps = generate(work.specs())
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return Timing(best, tokens, work.new_tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--model-dir", default=None, help="default: a fresh tiny model (shard_server.tools.tiny_model)"
    )
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    work = Workload(args.requests, args.prompt_tokens, args.new_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is None:
            from shard_server.tools.tiny_model import make_tiny_model

            model_dir = make_tiny_model(Path(tmp) / "model")
        grpc_t = run_grpc(model_dir, work, args.repeats)
        direct_t = run_direct(model_dir, work, args.repeats)
    overhead_ms = (grpc_t.seconds - direct_t.seconds) / grpc_t.steps * 1e3
    print(
        f"workload: {work.requests} requests x ({work.prompt_tokens} prompt + {work.new_tokens} new) tokens, "
        f"tiny model, cpu, best of {args.repeats}"
    )
    print(
        f"grpc (fake router -> shard process): {grpc_t.tokens_per_s:10.1f} tokens/s  ({grpc_t.seconds:.3f} s)"
    )
    print(
        f"direct (ShardEngine in process):     {direct_t.tokens_per_s:10.1f} tokens/s"
        f"  ({direct_t.seconds:.3f} s)"
    )
    print(
        f"ratio grpc/direct: {grpc_t.tokens_per_s / direct_t.tokens_per_s:.3f}; "
        f"RPC overhead ~{overhead_ms:.2f} ms per step ({grpc_t.steps} steps)"
    )
    if args.json:
        out = {
            "workload": work.__dict__,
            "grpc_tokens_per_s": grpc_t.tokens_per_s,
            "direct_tokens_per_s": direct_t.tokens_per_s,
            "overhead_ms_per_step": overhead_ms,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
