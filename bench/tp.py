"""Decode step at tensor-parallel world size 1 vs N, in one invocation (self-spawning, one process per rank).

    python -m bench.tp [--world 2] [--batches 1,8,32,64,128] [--context 544] [--out tp.json]
    python -m bench.tp --smoke          # CPU, gloo, a tiny float32 model: checks the wiring, not speed

Each rank builds a Mistral-7B-shaped model with random bf16 weights directly on its GPU (no checkpoint,
as bench/profile_decode.py does), fills a paged KV cache for `batch` sequences at `context` tokens, and
times one decode step: a captured CUDA graph replayed (NCCL all-reduces inside the graph), CUDA events,
median of 20. World size 1 runs first as a single process, then world size N over NCCL (tcp rendezvous
on a free port, like `shard-server launch`). Per row: step ms (the slowest rank's median: every step
ends in collectives, so ranks finish together), tokens/s (batch / step), and the roofline fraction of
rank 0 = (bytes this rank must read per step) / (its measured copy bandwidth) / step time. Bytes per
rank: its weight shards (embedding: only the batch's rows) + its KV heads' cache for every sequence.
The all-reduces' traffic is not in the roofline: the gap between world N's fraction and world 1's is
what communication and the smaller per-rank matmuls cost.

Ranks are spawned (not forked): CUDA cannot be used in a forked child of a process that touched it.
The children set NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 (NVLink
multicast is not available on the machines we are lent) even if the parent did not source gpu_env.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MISTRAL_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
    sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
)  # fmt: skip
SMOKE = dict(
    MISTRAL_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=2048,
    torch_dtype="float32",
)  # fmt: skip
MAX_S = 1024  # the context bucket a graph is captured with for ~544-token contexts (as profile_decode)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, opts: dict, out_dir: str) -> None:
    """One rank: build the model shard, time every batch size, write rank{r}.json (or rank{r}.err)."""
    try:
        os.environ.update(NCCL_ENV)
        _measure(rank, world, port, opts, Path(out_dir))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _measure(rank: int, world: int, port: int, opts: dict, out_dir: Path) -> None:
    import torch.distributed as dist

    from bench.common import copy_bandwidth_gbps, device_name, median, time_ms
    from bench.profile_decode import DecodeCase
    from cache.kv_cache import KVCache
    from model.config import MistralConfig
    from model.flash_mistral import FlashMistralForCausalLM
    from model.parallel import TPGroup

    smoke = opts["smoke"]
    dev = torch.device("cpu") if smoke else torch.device("cuda", rank)
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        torch.set_num_threads(1)  # several ranks share the cores
    else:
        torch.cuda.set_device(dev)
    group = None
    if world > 1:
        kw = {} if smoke else {"device_id": dev}  # eager NCCL init: the communicator exists before capture
        dist.init_process_group(
            "gloo" if smoke else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
            world_size=world, timeout=timedelta(minutes=5), **kw,
        )  # fmt: skip
        group = dist.group.WORLD
    tp = TPGroup(rank, world, group)
    config = MistralConfig(**(SMOKE if smoke else MISTRAL_7B))
    torch.manual_seed(rank)
    model = FlashMistralForCausalLM(config, None, tp=tp, dtype=dtype, device=dev)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    elem = torch.empty((), dtype=dtype).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes -= model.model.embed_tokens.weight.numel() * elem  # only the batch's rows are read
    kv_heads = model.model.layers[0].self_attn.num_kv_heads  # this rank's (replicated heads count once)
    kv_per_token = KVCache.bytes_per_token_for(config.num_hidden_layers, kv_heads, config.head_dim, dtype)
    bw = copy_bandwidth_gbps(dev, (64 << 20) if smoke else (2 << 30)) * 1e9
    max_s = opts["context"] + 1 if smoke else MAX_S
    use_graphs = not smoke and not opts["no_graphs"]
    rows = []
    for batch in opts["batches"]:
        case = DecodeCase(model, batch, opts["context"])
        case.step(max_s)  # eager step: warms kernels (and the NCCL communicator) before any capture
        fn = lambda c=case: c.step(max_s)  # noqa: E731
        graph = None
        if use_graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                case.step(max_s)
            fn = graph.replay
        if world > 1:
            dist.barrier()  # start timing together: a rank that runs ahead only waits in the all-reduce
        ms = median(time_ms(fn, dev, 3, 20 if not smoke else 5))
        slowest = torch.tensor([ms], dtype=torch.float64)
        if world > 1:
            slowest = slowest.to(dev)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        step_ms = float(slowest.item())
        step_bytes = (
            weight_bytes + batch * config.hidden_size * elem + batch * (opts["context"] + 1) * kv_per_token
        )
        rows.append(dict(
            batch=batch, step_ms=step_ms, rank0_ms=ms, tok_s=batch / (step_ms * 1e-3),
            bytes_per_rank=step_bytes, floor_ms=step_bytes / bw * 1e3,
            roofline=step_bytes / bw / (step_ms * 1e-3), cuda_graph=graph is not None,
        ))  # fmt: skip
        del case, graph, fn
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        info = dict(
            world=world, device=device_name(dev), copy_gbps=bw / 1e9, weight_bytes_per_rank=weight_bytes,
            kv_bytes_per_token_per_rank=kv_per_token, attention=model.attention.name, rows=rows,
        )  # fmt: skip
        (out_dir / "rank0.json").write_text(json.dumps(info))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_world(world: int, opts: dict, timeout: float) -> dict:
    """Spawn `world` ranks, wait (killing all of them on a failure or past `timeout`); -> rank 0's results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix=f"bench-tp-w{world}-") as tmp:
        ctx = mp.start_processes(
            _rank_main, args=(world, _free_port(), opts, tmp), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"world size {world} did not finish within {timeout:.0f} s")
        except BaseException as e:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(10)
            errors = sorted(Path(tmp).glob("rank*.err"))
            detail = "\n".join(f"--- {f.stem}\n{f.read_text()}" for f in errors)
            raise RuntimeError(f"world size {world} failed: {e}\n{detail}") from None
        return json.loads(Path(tmp, "rank0.json").read_text())


def table(results: dict[int, dict]) -> str:
    base = {r["batch"]: r for r in results[1]["rows"]}
    head = ("world", 5), ("batch", 5), ("step ms", 9), ("tok/s", 10), ("floor ms", 9), ("roofline", 8)
    lines = [" ".join(f"{name:>{width}}" for name, width in head) + f" {'speedup':>8}"]
    for world, res in sorted(results.items()):
        for r in res["rows"]:
            speedup = base[r["batch"]]["step_ms"] / r["step_ms"] if r["batch"] in base else float("nan")
            lines.append(
                f"{world:>5} {r['batch']:>5} {r['step_ms']:>9.3f} {r['tok_s']:>10.1f} {r['floor_ms']:>9.3f} "
                f"{r['roofline']:>8.3f} {speedup:>7.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--world", type=int, default=2, help="tensor-parallel world size compared with 1 (default 2)"
    )
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,8,32,64,128; smoke 1,4)")
    ap.add_argument("--context", type=int, default=None, help="tokens per sequence (default 544; smoke 40)")
    ap.add_argument("--no-graphs", action="store_true", help="time eager steps instead of CUDA-graph replays")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, a tiny float32 model")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per world size before killing it")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    opts = dict(
        smoke=args.smoke, no_graphs=args.no_graphs,
        batches=[int(b) for b in (args.batches or ("1,4" if args.smoke else "1,8,32,64,128")).split(",")],
        context=args.context or (40 if args.smoke else 544),
    )  # fmt: skip
    if not args.smoke and torch.cuda.device_count() < args.world:
        print(f"needs {args.world} CUDA devices, found {torch.cuda.device_count()} (use --smoke on CPU)")
        return 2
    os.environ.update(NCCL_ENV)  # spawned children inherit it too
    results = {}
    for world in (1, args.world):
        t0 = time.monotonic()
        results[world] = run_world(world, opts, args.timeout)
        print(f"world {world}: {results[world]['device']}, copy {results[world]['copy_gbps']:.0f} GB/s, "
              f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    print(table(results))
    if args.out:
        from bench.common import git_commit

        doc = dict(
            benchmark="tp_decode", context=opts["context"],
            max_s=opts["context"] + 1 if args.smoke else MAX_S,
            smoke=args.smoke, cuda_graphs=not (args.smoke or args.no_graphs), torch=torch.__version__,
            commit=git_commit(Path(__file__).resolve().parents[1]), nccl_env=NCCL_ENV,
            worlds={str(w): r for w, r in results.items()},
        )  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
