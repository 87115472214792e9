"""`make run`: a shard process, two LoRA adapters and the fake router, end to end on CPU.

    python -m shard_server.testing.demo --dir .demo

Makes the tiny model and two adapters under --dir (once), starts `python -m shard_server serve` on a
temporary unix socket, waits for it to report SERVING, warms it up and loads the adapters at indices 1
and 2 as the router would, streams a handful of prompts across the base model and both adapters, and
stops the shard with SIGTERM (exit code 0 expected).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard_server.testing.fake_router import FakeRouter, RouterLimits, TokenEvent
from shard_server.types import AdapterSpec, RequestSpec, SamplingParams, StoppingParams

PROMPTS = [
    (0, "The quick brown fox", SamplingParams()),
    (1, "The quick brown fox", SamplingParams()),
    (2, "The quick brown fox", SamplingParams()),
    (0, "Once upon a time", SamplingParams(do_sample=True, seed=7, temperature=0.8, top_p=0.9)),
    (1, "In the beginning", SamplingParams(repetition_penalty=1.2)),
    (2, "Hello, world!", SamplingParams(do_sample=True, seed=42, top_k=20)),
]


def ensure_assets(root: Path) -> tuple[Path, list[Path]]:
    """The tiny model and two adapters, made only if missing (seconds, no network)."""
    from shard_server.tools.tiny_model import make_tiny_adapter, make_tiny_model

    model = root / "model"
    if not (model / "config.json").exists():
        print(f"making the tiny model in {model}")
        make_tiny_model(model)
    adapters = []
    for i, targets in ((1, ("q_proj", "v_proj")), (2, ("q_proj", "k_proj", "v_proj", "o_proj"))):
        path = root / f"adapter-{i}"
        if not (path / "adapter_config.json").exists():
            print(f"making adapter {i} in {path}")
            make_tiny_adapter(model, path, rank=8, target_modules=targets, seed=i)
        adapters.append(path)
    return model, adapters


def wait_serving(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the shard exited with code {proc.returncode} while starting")
        with grpc.insecure_channel(url) as ch:
            try:
                status = (
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                )
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"the shard was not SERVING after {timeout:.0f}s")


def run_demo(root: Path, max_new_tokens: int, timeout: float) -> int:
    model, adapters = ensure_assets(root)
    sock_dir = Path(tempfile.mkdtemp(prefix="shard-demo-", dir="/tmp"))  # short: unix paths max 107 bytes
    uds = sock_dir / "s"
    log_path = root / "shard.log"
    cmd = [
        sys.executable,
        "-m",
        "shard_server",
        "serve",
        str(model),
        "--uds-path",
        str(uds),
        "--device",
        "cpu",
        "--max-kv-cache-bytes",
        str(4 << 20),
        "--adapter-root",
        str(root),
    ]
    print(f"starting: {' '.join(cmd)}\n  (log: {log_path})")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"unix://{uds}-0"
    results = None
    try:
        wait_serving(proc, url, timeout)
        with FakeRouter(
            url, RouterLimits(max_input_length=32, max_total_tokens=64, max_prefill_tokens=128)
        ) as router:
            info = router.info_pb
            print(f"shard up: {info.device_type} {info.dtype}, block size {info.block_size}")
            print(f"warmup: budget of {router.warmup()} tokens")
            for index, path in enumerate(adapters, start=1):
                router.load_adapter(index, AdapterSpec(adapter_ids=(str(path),), source="local"))
                print(f"loaded adapter {index}: {path}")
            requests = [
                RequestSpec(
                    id=0,
                    inputs=text,
                    adapter_index=adapter,
                    sampling=sampling,
                    stopping=StoppingParams(max_new_tokens=max_new_tokens),
                )
                for adapter, text, sampling in PROMPTS
            ]

            def on_token(i: int, ev: TokenEvent) -> None:
                print(f"  [request {i} | adapter {requests[i].adapter_index}] +{ev.text!r}")

            print("streaming:")
            results = router.generate(requests, on_token)
    except grpc.RpcError as e:  # the shard refused something: say what, still stop it cleanly
        print(f"shard error: {e.code().name}: {e.details()}", file=sys.stderr)
    finally:
        _stop(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)
    if results is not None:
        print("results:")
        for req, res in zip(requests, results, strict=True):
            how = "sampled" if req.sampling.do_sample else "greedy"
            reason = res.finish_reason.name if res.finish_reason is not None else "?"
            print(
                f"  adapter {req.adapter_index} {how:7} {req.inputs!r} -> {res.text!r} ({reason}, "
                f"{res.generated_tokens} tokens)"
            )
    print(f"shard stopped with SIGTERM: exit code {proc.returncode}")
    return 0 if proc.returncode == 0 and results is not None else 1


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m shard_server.testing.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--dir", default=".demo", help="where the tiny model, adapters and the shard log live")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the shard to start")
    args = p.parse_args(argv)
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return run_demo(root, args.max_new_tokens, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
