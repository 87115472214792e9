"""The comparisons of `python -m bench.gpu` that run outside the in-process engine: e2e over gRPC (a
`python -m shard_server serve` process driven by the fake router) and the transformers / PEFT baselines.

Functions of a `Bench` (bench/gpu_sections.py): they share its plan, report, checkpoint, adapters and
prompts, and run after its engine is dropped.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import sync
from bench.gpu_plan import REPO, fail_soft, free_device, log
from bench.gpu_sections import Bench


def e2e_grpc(bench: Bench) -> None:
    """A server process per overlap setting, each driven through every e2e batch by the fake router."""
    for overlap in (True, False):
        fail_soft(bench.report, "e2e", "shard", lambda o=overlap: _e2e_grpc_server(bench, o),
                  path="grpc", overlap=overlap)  # fmt: skip


def _e2e_grpc_server(bench: Bench, overlap: bool) -> None:
    # Fail in seconds, not after the server has loaded 14.5 GB: the server needs the generated stubs
    # (shard_server/pb, git-ignored: carry them) and grpcio-health-checking / grpcio-reflection.
    import shard_server.server.grpc_server  # noqa: F401
    from shard_server.testing.fake_router import FakeRouter, RouterLimits

    p = bench.plan
    sock_dir = Path(tempfile.mkdtemp(prefix="shard-bench-", dir="/tmp"))
    uds = sock_dir / "s"
    cmd = [sys.executable, "-m", "shard_server", "serve", str(bench.model_dir), "--uds-path", str(uds),
           "--device", p.device.type, "--dtype", str(p.dtype).removeprefix("torch."),
           "--log-level", "WARNING", "--overlap" if overlap else "--no-overlap"]  # fmt: skip
    largest = max(p.e2e_batches)
    if p.device.type == "cpu":  # the CPU shard needs a bound; on CUDA Warmup sizes the cache itself
        kv = 4 * largest * (p.prompt + p.new_tokens) * p.shape.kv_bytes_per_token(p.elem)
        cmd += ["--max-kv-cache-bytes", str(kv)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        while not Path(f"{uds}-0").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the shard server exited with {proc.returncode} before listening")
            if time.perf_counter() - t0 > 600:
                raise TimeoutError("the shard server did not listen within 600 s")
            time.sleep(0.2)
        log(f"e2e: server (overlap {overlap}) listening after {time.perf_counter() - t0:.1f}s")
        limits = RouterLimits(
            max_input_length=p.prompt, max_total_tokens=p.prompt + p.new_tokens,
            max_prefill_tokens=largest * p.prompt,
        )  # fmt: skip
        with FakeRouter(f"unix://{uds}-0", limits, timeout=600) as router:
            budget = router.warmup()
            log(f"e2e: router warmup done (budget {budget} tokens)")
            for batch in p.e2e_batches:
                router.generate(bench.prompts.specs(batch, p.prompt, 4))  # warm, as the direct run
                specs = bench.prompts.specs(batch, p.prompt, p.new_tokens)
                rpc = dict(router.stats.rpc_seconds)
                t1 = time.perf_counter()
                results = router.generate(specs)
                seconds = time.perf_counter() - t1
                # where the wall time went: waiting on each RPC, and the router's own Python between them
                waited = {m: v - rpc.get(m, 0.0) for m, v in router.stats.rpc_seconds.items()}
                prefill_s, decode_s = waited.get("Prefill", 0.0), waited.get("Decode", 0.0)
                split = {"prefill_ms": prefill_s * 1e3, "decode_ms": decode_s * 1e3,
                         "other_rpc_ms": (sum(waited.values()) - prefill_s - decode_s) * 1e3,
                         "router_ms": (seconds - sum(waited.values())) * 1e3}  # fmt: skip
                tokens = sum(len(r.token_ids) for r in results)
                # against the median of the direct trials at this batch: one slow trial skews neither side
                direct = statistics.median(bench.direct_e2e.get((batch, overlap)) or [0.0])
                bench.report.add(
                    "e2e", "shard", batch=batch, adapters=0, tok_s=tokens / seconds,
                    step_ms=seconds / p.new_tokens * 1e3, ms=seconds * 1e3, path="grpc", tokens=tokens,
                    overlap=overlap, ratio_vs_direct=tokens / seconds / direct if direct else None, **split,
                    notes="shard server process + fake router over a unix socket (Prefill, Decode..., "
                    "FilterBatch, ClearCache, protobuf both ways); same workload as the direct row with "
                    "the same overlap setting",
                )  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def sec_hf(bench: Bench, run_transformers: bool, run_peft: bool) -> None:
    from transformers import MistralForCausalLM

    p = bench.plan
    t0 = time.perf_counter()
    kwargs = {"device_map": {"": str(p.device)}} if p.device.type == "cuda" else {}
    holder = [MistralForCausalLM.from_pretrained(
        bench.model_dir, dtype=p.dtype, attn_implementation="sdpa", **kwargs
    ).eval()]  # fmt: skip  (a list, so that `finally` can drop the only reference)
    log(f"transformers: loaded in {time.perf_counter() - t0:.1f}s")
    try:
        if run_transformers:
            for b in p.hf_batches:
                fail_soft(bench.report, "decode", "transformers",
                          lambda b=b: hf_row(bench, holder[0], "transformers", b, 0, p.hf_new_tokens),
                          batch=b, adapters=0)  # fmt: skip
        if run_peft:
            fail_soft(bench.report, "decode", "peft", lambda: peft_rows(bench, holder[0]),
                      adapters=p.peft_adapters)  # fmt: skip
    finally:
        holder.clear()
        free_device()


def peft_rows(bench: Bench, model) -> None:
    from peft import PeftModel

    p = bench.plan
    dirs = bench.adapters("decode", p.peft_adapters, seed0=1)  # the shard's first adapters, same files
    # autocast_adapter_dtype=False keeps the adapters bf16 like the base (peft would upcast to fp32).
    pm = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0", autocast_adapter_dtype=False)
    for j, d in enumerate(dirs[1:], 1):
        pm.load_adapter(str(d), adapter_name=f"a{j}", autocast_adapter_dtype=False)
    pm.eval()
    n = len(dirs)
    for b in p.peft_batches:
        names = [f"a{j % n}" for j in range(b)]
        fail_soft(bench.report, "decode", "peft",
                  lambda b=b, names=names: hf_row(bench, pm, "peft", b, n, p.peft_new_tokens,
                                                  adapter_names=names),
                  batch=b, adapters=n)  # fmt: skip


def hf_row(bench: Bench, model, system: str, batch: int, n_adapters: int, new: int, **gen_kwargs) -> None:
    p = bench.plan
    ids = torch.randint(3, p.shape.vocab, (batch, p.prompt), generator=bench.prompts.gen).to(p.device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        sync(p.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **gen_kwargs)  # fmt: skip
        sync(p.device)
        return time.perf_counter() - t0

    gen(2)  # warm: kernels, allocator, cuBLAS choices at this shape
    t1, tn = gen(1), gen(new)
    step_s = (tn - t1) / (new - 1)  # decode only: the prefill-only run taken off
    values = bench.decode_values(batch, n_adapters, step_s, p.prompt + new / 2)
    # The issue defines a baseline's tok_s over the whole generate call (prefill included);
    # decode_tok_s is the decode-only rate, the one to compare with the shard's decode rows.
    values["decode_tok_s"], values["tok_s"] = values["tok_s"], batch * new / tn
    bench.report.add(
        "decode", system, **values, ms=tn * 1e3, steps=new - 1, prompt=p.prompt, new_tokens=new,
        prefill_ms=t1 * 1e3,
        notes=f"generate(max_new_tokens={new}): tok_s = batch*new/t(new); "
        "step_ms = (t(new) - t(1)) / (new - 1)",
    )  # fmt: skip
