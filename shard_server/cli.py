"""Command line: `shard-server serve | launch | make-tiny-model | make-tiny-adapter`."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shard-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tiny_model(sub)
    _add_tiny_adapter(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
