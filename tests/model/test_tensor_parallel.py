"""World sizes 2 and 4 over gloo on CPU: the sharded model == transformers (split and replicated KV heads).

Ranks are forked processes (fork, not spawn: re-importing torch in fresh interpreters costs more than
the test itself); each child runs with one intra-op thread, which keeps OpenMP fork-safe. The rendezvous
is the server's own: `bootstrap.init_tensor_parallel` over tcp://127.0.0.1:<free port>. `run_ranks` is
also used by test_tp_adapters.py: it always joins or kills every child and turns a child's exception or
a hang into a test failure that names the rank.
"""

from __future__ import annotations

import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from mistral_harness import PagedRunner, hf_logits, random_prompts

from cache.kv_cache import KVCache

PROMPTS = random_prompts([9, 4, 14], 500, seed=21)  # ids < every test vocab (509 included)
DECODE = [[40, 41, 42], [50, 51, 52], [60, 61, 62]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(target, rank: int, world: int, port: int, out_dir: str, args: tuple) -> None:
    import torch.distributed as dist

    from shard_server.config import ShardConfig
    from shard_server.engine.bootstrap import init_tensor_parallel

    try:
        torch.set_num_threads(1)
        config = ShardConfig(model_dir=Path(out_dir), rank=rank, world_size=world, master_port=port)
        tp = init_tensor_parallel(config, torch.device("cpu"))
        try:
            result = target(tp, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    except BaseException:
        Path(f"{out_dir}/rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def run_ranks(target, world: int, out_dir: Path, *args, timeout: float = 60.0) -> list:
    """Fork `world` ranks running `target(tp, *args)`; -> every rank's return value, in rank order.

    `target` must be a module-level function (it runs after fork, so closures would work too, but
    results travel back through torch.save files, which keeps the parent free of pipes that can fill).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(target, r, world, port, str(out_dir), args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    errors = [(out_dir / f"rank{r}.err") for r in range(world)]
    failed = {r: e.read_text() for r, e in enumerate(errors) if e.exists()}
    if failed:
        r, tb = next(iter(failed.items()))
        pytest.fail(f"rank {r} of {world} failed:\n{tb}")
    if hung:
        pytest.fail(f"ranks {hung} of {world} did not finish within {timeout:.0f} s (killed)")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        pytest.fail(f"ranks exited abnormally (rank, exit code): {bad}")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def _prefill_and_decode(tp, model_dirs: list[str]) -> list:
    from model.flash_mistral import FlashMistralForCausalLM

    results = []
    for d in model_dirs:
        model = FlashMistralForCausalLM.from_pretrained(d, tp=tp)
        runner = PagedRunner(model, KVCache.for_model(model, 16), seed=1)
        logits, _ = runner.prefill(PROMPTS)
        steps = [runner.decode(tokens) for tokens in DECODE]
        results.append((logits, steps))
    return results


def _check_against_transformers(dirs: list[str], per_rank: list) -> None:
    from transformers import MistralForCausalLM

    for r, results in enumerate(per_rank[1:], start=1):  # identical batch state needs identical logits
        for (l0, s0), (lr, sr) in zip(per_rank[0], results, strict=True):
            assert torch.equal(l0, lr) and all(map(torch.equal, s0, sr)), f"rank {r} differs from rank 0"
    for d, (logits, steps) in zip(dirs, per_rank[0], strict=True):
        hf = MistralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        seqs = [list(p) for p in PROMPTS]
        torch.testing.assert_close(logits, torch.cat([hf_logits(hf, p) for p in seqs]), atol=1e-4, rtol=0)
        for tokens, step in zip(DECODE, steps, strict=True):
            for b, tok in enumerate(tokens):
                seqs[b].append(tok)
                torch.testing.assert_close(step[b], hf_logits(hf, seqs[b])[-1], atol=1e-4, rtol=0)


def test_world_size_2_equals_transformers(tiny_model_factory, tmp_path):
    shapes = [dict(heads=4, kv_heads=2), dict(heads=4, kv_heads=1, head_dim=24, sliding_window=8)]
    dirs = [str(tiny_model_factory(**s)) for s in shapes]
    _check_against_transformers(dirs, run_ranks(_prefill_and_decode, 2, tmp_path, dirs))


def test_world_size_4_equals_transformers(tiny_model_factory, tmp_path):
    # 8/4 heads: one KV head per rank; 8/2: each KV head replicated on two ranks, under a window;
    # vocab 509 is not a multiple of 4, so the last rank's vocab rows are padding.
    shapes = [dict(heads=8, kv_heads=4, head_dim=16, vocab=509), dict(heads=8, kv_heads=2, sliding_window=8)]
    dirs = [str(tiny_model_factory(**s)) for s in shapes]
    _check_against_transformers(dirs, run_ranks(_prefill_and_decode, 4, tmp_path, dirs))


def test_run_ranks_reports_a_failing_rank(tmp_path):
    """The harness itself: a rank that raises fails the test with its traceback and rank number."""
    with pytest.raises(pytest.fail.Exception, match=r"rank 1 of 2 failed(.|\n)*boom on rank 1"):
        run_ranks(_fail_on_rank_1, 2, tmp_path, timeout=30)


def _fail_on_rank_1(tp):
    if tp.rank == 1:
        raise RuntimeError("boom on rank 1")
    return tp.rank


def test_run_ranks_kills_a_hung_rank(tmp_path):
    """A rank stuck (here: sleeping; in real life: in a collective whose peer died) is killed in time."""
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"ranks \[1\] of 2 did not finish within 3 s"):
        run_ranks(_hang_on_rank_1, 2, tmp_path, timeout=3)
    assert time.monotonic() - t0 < 60  # killed, not waited for: the rank would sleep 120 s


def _hang_on_rank_1(tp):
    if tp.rank == 1:
        time.sleep(120)
    return tp.rank
