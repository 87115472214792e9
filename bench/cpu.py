"""`make bench-cpu`: the cost of the gRPC layer, measured on the tiny model.

The same workload runs on two sides, interleaved run by run on the same cores:
  grpc:   a `python -m shard_server serve` process driven by the fake router over a unix socket
          (Prefill of every request, Decode until done, ClearCache; protobuf both ways);
  direct: the same steps as ShardEngine calls in this process, on one dedicated thread as in the
          server (BatchSpec in, StepResult out; no protobuf, no socket).
Both print generated tokens per second (best of --repeats); their ratio is the share of throughput the
RPC layer keeps, and the difference per step is the RPC overhead per step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


class GrpcSide:
    """A `serve` process and the fake router that drives it."""

    def __init__(self, model_dir: Path, work: Workload, threads: int):
        self._dir = Path(tempfile.mkdtemp(prefix="shard-bench-", dir="/tmp"))
        uds = self._dir / "s"
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
        self.proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        deadline = time.monotonic() + 120
        while not Path(f"{uds}-0").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the shard did not start")
            time.sleep(0.1)
        self.router = FakeRouter(f"unix://{uds}-0", work.limits())
        self.router.warmup()

    def generate(self, specs: list[RequestSpec]) -> int:
        return sum(len(r.token_ids) for r in self.router.generate(specs))

    def close(self) -> None:
        if getattr(self, "router", None) is not None:
            self.router.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        shutil.rmtree(self._dir, ignore_errors=True)


class DirectSide:
    """The same engine in this process, called on one dedicated thread as the server's model thread."""

    def __init__(self, model_dir: Path, work: Workload, threads: int):
        import torch

        from shard_server.config import ShardConfig
        from shard_server.engine.engine import ShardEngine
        from shard_server.server.convert import batch_from_pb
        from shard_server.testing.wire import warmup_request

        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model")
        self._thread.submit(torch.set_num_threads, threads).result()
        config = ShardConfig(model_dir=model_dir, device="cpu", dtype="float32", max_kv_cache_bytes=KV_BYTES)
        self.engine = self._thread.submit(ShardEngine, config).result()
        lim = work.limits()
        w = warmup_request(lim.max_input_length, lim.max_prefill_tokens, lim.max_total_tokens)
        batch = batch_from_pb(w.batch, "Warmup")
        self._on_thread(self.engine.warmup, batch, w.max_input_length, w.max_prefill_tokens, w.max_new_tokens)
        self._batch_ids = itertools.count(1)

    def _on_thread(self, fn, *args):
        return self._thread.submit(fn, *args).result()

    def _generate(self, specs: list[RequestSpec]) -> int:
        result = self.engine.prefill(BatchSpec(id=next(self._batch_ids), requests=tuple(specs)), None)
        tokens = len(result.generations)
        while result.batch is not None:
            result = self.engine.decode([result.batch.id])
            tokens += len(result.generations)
        self.engine.clear_cache(None)
        return tokens

    def generate(self, specs: list[RequestSpec]) -> int:
        return self._on_thread(self._generate, specs)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def measure(model_dir: Path, work: Workload, repeats: int, threads: int) -> tuple[Timing, Timing]:
    """Best of `repeats` for each side, the runs interleaved: the machine's other load hits both alike."""
    grpc_side = GrpcSide(model_dir, work, threads)
    try:
        direct = DirectSide(model_dir, work, threads)
        try:
            sides = {"grpc": grpc_side, "direct": direct}
            best: dict[str, tuple[float, int]] = {}
            for side in sides.values():
                side.generate(work.specs()[:2])  # first-call costs out of the timing
            for _ in range(repeats):
                for name, side in sides.items():
                    t0 = time.perf_counter()
                    tokens = side.generate(work.specs())
                    dt = time.perf_counter() - t0
                    if name not in best or dt < best[name][0]:
                        best[name] = (dt, tokens)
        finally:
            direct.close()
    finally:
        grpc_side.close()
    return Timing(*best["grpc"], work.new_tokens), Timing(*best["direct"], work.new_tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    # One intra-op thread on both sides by default: tiny matmuls gain nothing from more, and OpenMP
    # barriers behave badly when other work shares the cores (spin-waiting threads get descheduled).
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument(
        "--model-dir", default=None, help="default: a fresh tiny model (shard_server.tools.tiny_model)"
    )
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    # Before torch loads in this process (the direct side), as the environment sets it for the shard:
    # OpenMP reads it once, and torch.set_num_threads alone leaves other threads' OpenMP teams as they are.
    if "torch" in sys.modules:
        print("warning: torch was imported before --torch-threads could apply", file=sys.stderr)
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    work = Workload(args.requests, args.prompt_tokens, args.new_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is None:
            from shard_server.tools.tiny_model import make_tiny_model

            model_dir = make_tiny_model(Path(tmp) / "model")
        grpc_t, direct_t = measure(model_dir, work, args.repeats, args.torch_threads)
    overhead_ms = (grpc_t.seconds - direct_t.seconds) / grpc_t.steps * 1e3
    print(
        f"workload: {work.requests} requests x ({work.prompt_tokens} prompt + {work.new_tokens} new) tokens, "
        f"tiny model, cpu, {args.torch_threads} torch thread(s), best of {args.repeats}, interleaved"
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
