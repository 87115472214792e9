"""The engine sections of `python -m bench.gpu`: ceilings, prefill, decode, adapter_load, adapters, e2e
(direct half), on one ShardEngine in this process; see bench/gpu.py for what each measures.

`Bench` also holds what the baselines (bench/gpu_baselines.py) share with these sections: the plan,
the report, the written checkpoint and adapters, the prompts and the measured ceilings.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import common
from bench.common import StepBytes, decode_step_bytes, median, roofline_fraction, sync
from bench.gpu_plan import Plan, Report, fail_soft, free_device, log

WARM_STEPS = 2  # first decode steps of a batch (allocator growth, first kernels) are left out


class Prompts:
    """Fresh random prompts every call: the engine's prefix cache must never turn a prefill into a hit."""

    def __init__(self, vocab: int, seed: int = 1234):
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.ids = itertools.count(1)

    def specs(self, n: int, length: int, new_tokens: int, adapter_of: Callable[[int], int] = lambda j: 0):
        from shard_server.types import RequestSpec, StoppingParams

        rows = torch.randint(3, self.vocab, (n, length), generator=self.gen).tolist()
        return [
            RequestSpec(
                id=next(self.ids),
                input_ids=tuple(row),
                stopping=StoppingParams(max_new_tokens=new_tokens, ignore_eos_token=True),
                adapter_index=adapter_of(j),
            )
            for j, row in enumerate(rows)
        ]


def round_robin(n_adapters: int, first_index: int = 1) -> Callable[[int], int]:
    if n_adapters == 0:
        return lambda j: 0
    return lambda j: first_index + j % n_adapters


# ---------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, plan: Plan, report: Report, work: Path, model_dir: Path | None):
        self.plan, self.report, self.work = plan, report, work
        self.model_dir = model_dir
        self.prompts = Prompts(plan.shape.vocab)
        self.batch_ids = itertools.count(1)
        self.engine = None
        self.bandwidth = None  # bytes / s
        self.peak_flops = None  # FLOP / s
        self.adapter_dirs: dict[str, list[Path]] = {}
        # (batch, overlap) -> tok/s in process, one entry per trial (--e2e-batches may repeat a batch)
        self.direct_e2e: dict[tuple[int, bool], list[float]] = {}

    # ---- setup ---------------------------------------------------------------------------------------

    def ceilings(self) -> None:
        p, rep = self.plan, self.report
        dtype = torch.bfloat16 if p.device.type == "cuda" else torch.float32
        gbps = common.copy_bandwidth_gbps(p.device, p.copy_bytes)
        tflops = common.matmul_tflops(p.device, p.matmul_n, dtype)
        rep.data["bandwidth_GBps"], rep.data["matmul_tflops"] = gbps, tflops
        rep.save()
        self.bandwidth, self.peak_flops = gbps * 1e9, tflops * 1e12
        log(f"ceilings: copy {gbps:.0f} GB/s (read + written), {p.matmul_n}^3 {dtype} matmul "
            f"{tflops:.1f} TFLOP/s")

    def write_model(self) -> None:
        if self.model_dir is not None:
            return
        p = self.plan
        t0 = time.perf_counter()
        self.model_dir = common.write_model_dir(self.work / "model", p.shape, p.device, p.dtype)
        sync(p.device)
        gb = p.shape.total_params * p.elem / 1e9
        log(f"checkpoint: {gb:.2f} GB written to {self.model_dir} in {time.perf_counter() - t0:.1f}s")

    def adapters(self, group: str, n: int, seed0: int) -> list[Path]:
        """`n` distinct adapter directories of one group (written once, reused by later sections)."""
        have = self.adapter_dirs.setdefault(group, [])
        p = self.plan
        for j in range(len(have), n):
            out = self.work / f"adapter-{group}-{j}"
            have.append(common.write_adapter(out, p.shape, p.rank, p.device, p.dtype, seed=seed0 + j))
        return have[:n]

    def build_engine(self) -> None:
        from shard_server.config import ShardConfig
        from shard_server.engine.engine import ShardEngine
        from shard_server.types import BatchSpec

        p = self.plan
        per_seq = p.prompt + p.new_tokens
        largest = max([*p.decode_batches, *p.adapter_batches, *p.e2e_batches, 1])
        tokens = max(largest * per_seq, p.prefill_prompts * (p.prefill_len + 1))
        # A bound on the KV cache: Warmup would otherwise take nearly all free memory, leaving none
        # for the adapter stacks (32 rank-16 adapters: 2.7 GB) loaded after it.
        kv_bytes = int(1.25 * tokens * p.shape.kv_bytes_per_token(p.elem)) + (64 << 20)
        extra = {} if p.cuda_graphs is None else {"cuda_graphs": p.cuda_graphs}
        t0 = time.perf_counter()
        self.engine = ShardEngine(
            ShardConfig(
                model_dir=self.model_dir, device=p.device.type, dtype=str(p.dtype).removeprefix("torch."),
                max_kv_cache_bytes=kv_bytes, attention_backend=p.attention_backend, overlap=p.overlap,
                **extra,
            )
        )
        log(f"engine: loaded in {time.perf_counter() - t0:.1f}s, decode CUDA graphs: "
            f"{self.engine.runner.graphs is not None}")
        warm = self.prompts.specs(p.prefill_prompts, p.prefill_len, 2)
        usable = self.engine.warmup(
            BatchSpec(id=next(self.batch_ids), requests=tuple(warm)),
            p.prefill_len, p.prefill_prompts * p.prefill_len, 2,
        )  # fmt: skip
        log(f"engine: warmup done, KV cache {usable} tokens, {time.perf_counter() - t0:.1f}s in all")

    def drop_engine(self) -> None:
        self.engine = None
        free_device()

    # ---- engine helpers ------------------------------------------------------------------------------

    def prefill(self, specs, chunk_tokens: int | None) -> int | None:
        """Prefill `specs` as one cached batch (in chunks concatenated through cached_batch_id)."""
        from shard_server.types import BatchSpec

        chunks, cur, n = [], [], 0
        for s in specs:
            if cur and chunk_tokens is not None and n + len(s.input_ids) > chunk_tokens:
                chunks.append(cur)
                cur, n = [], 0
            cur.append(s)
            n += len(s.input_ids)
        chunks.append(cur)
        cached = None
        for chunk in chunks:
            res = self.engine.prefill(BatchSpec(id=next(self.batch_ids), requests=tuple(chunk)), cached)
            cached = None if res.batch is None else res.batch.id
        return cached

    def generate_direct(self, specs) -> tuple[float, int, float]:
        """What the router does with one batch, minus gRPC: one Prefill, Decode until done -> (s, tokens,
        s of the Prefill call)."""
        sync(self.plan.device)
        t0 = time.perf_counter()
        bid = self.prefill(specs, None)
        prefill_s = time.perf_counter() - t0
        tokens = len(specs)
        while bid is not None:
            res = self.engine.decode([bid])
            tokens += len(res.generations)
            bid = None if res.batch is None else res.batch.id
        sync(self.plan.device)
        seconds = time.perf_counter() - t0
        self.engine.clear_cache(None)
        return seconds, tokens, prefill_s

    def load_adapters(self, dirs: list[Path], first_index: int) -> tuple[list[float], list[float]]:
        """-> (ms per LoadAdapter, ms of it spent recapturing LoRA decode graphs after a re-layout)."""
        from shard_server.types import AdapterSpec

        ms, recapture_ms = [], []
        graphs = self.engine.runner.graphs
        for j, d in enumerate(dirs):
            captured_s = graphs.capture_seconds if graphs is not None else 0.0
            sync(self.plan.device)
            t0 = time.perf_counter()
            self.engine.load_adapter(first_index + j, AdapterSpec(adapter_ids=(str(d),), source="local"))
            sync(self.plan.device)  # the host -> device copies are asynchronous: usable means landed
            ms.append((time.perf_counter() - t0) * 1e3)
            recapture_ms.append((graphs.capture_seconds - captured_s) * 1e3 if graphs is not None else 0.0)
        return ms, recapture_ms

    # ---- sections ------------------------------------------------------------------------------------

    def sec_prefill(self) -> None:
        from shard_server.types import BatchSpec

        p, n, length = self.plan, self.plan.prefill_prompts, self.plan.prefill_len

        def once() -> float:
            specs = self.prompts.specs(n, length, 1)  # max_new_tokens 1: done at prefill, blocks freed
            sync(p.device)
            t0 = time.perf_counter()
            res = self.engine.prefill(BatchSpec(id=next(self.batch_ids), requests=tuple(specs)))
            sync(p.device)
            dt = time.perf_counter() - t0
            if res.batch is not None:
                self.engine.clear_cache(None)
            return dt

        once()  # warm: first kernels and allocations at this shape
        times = [once() for _ in range(p.prefill_reps)]
        t = median(times)
        flops = common.prefill_flops(p.shape, [length] * n, logits_rows=n)
        achieved = flops / t
        self.report.add(
            "prefill", "shard", batch=n, adapters=0, tok_s=n * length / t, ms=t * 1e3,
            roofline_fraction=achieved / self.peak_flops if self.peak_flops else None,
            tflops=achieved / 1e12, prompt=length, samples_ms=[x * 1e3 for x in times],
            backend=self.engine.model.attention.name,
            notes="engine.prefill incl. first-token sampling; FLOPs = 2*matmul params*tokens + lm_head rows "
            "+ causal attention; fraction of measured matmul peak",
        )  # fmt: skip

    def decode_row(self, batch: int, n_adapters: int, first_index: int = 1, adapter_bytes: int | None = None,
                   **extra) -> dict:  # fmt: skip
        """Decode steps of `batch` requests over adapters first_index.. (round-robin); adapter_bytes: the
        adapters' own bytes for the roofline when they are not all rank `plan.rank`; `extra`: row fields."""
        p = self.plan
        specs = self.prompts.specs(batch, p.prompt, p.new_tokens, round_robin(n_adapters, first_index))
        steps: list[tuple[int, float]] = []
        try:
            bid = self.prefill(specs, p.prefill_chunk_tokens)
            graphs = self.engine.runner.graphs
            if graphs is not None:  # which decode graph variant (executor/graphs.py) these steps replay
                slots = self.engine.adapters.request_slots(self.engine.batches[bid].adapter_indices)
                extra["graph_variant"] = ("base", "lora", "lora_few")[graphs.variant_for(slots)]
            # The model forward alone (incl. LoRA, no sampling or host bookkeeping), for the split.
            fwd = common.time_ms(lambda: self.engine.runner.decode(self.engine.batches[bid]), p.device, 2, 5)
            # No device sync between steps: each Decode ends with its own host sync of the step's tokens,
            # and with the overlap the next step's forward is already running when it returns; a sync
            # here would wait for that forward and hide exactly what the overlap gains.
            sync(p.device)
            begin = t0 = time.perf_counter()
            while bid is not None and time.perf_counter() - begin < p.max_decode_seconds:
                res = self.engine.decode([bid])
                t1 = time.perf_counter()
                steps.append((len(steps) + 1, t1 - t0))
                t0 = t1
                bid = None if res.batch is None else res.batch.id
        finally:
            self.engine.clear_cache(None)
        timed = steps[WARM_STEPS:] if len(steps) > WARM_STEPS else steps
        step_s = median([dt for _, dt in timed])
        # After decode step k the KV length is prompt + k.
        mean_ctx = p.prompt + statistics.fmean(k for k, _ in timed)
        values = self.decode_values(batch, n_adapters, step_s, mean_ctx, adapter_bytes)
        if n_adapters:  # the roofline counts the adapters used; the store may hold (and read) more
            values["resident_adapters"] = len(self.engine.adapters.resident_indices())
        ms = sorted(dt * 1e3 for _, dt in timed)
        values["step_ms_p10_p90"] = [ms[len(ms) // 10], ms[(9 * len(ms)) // 10]]  # the spread of the median
        return self.report.add("decode", "shard", **values, forward_ms=median(fwd), steps=len(timed),
                               prompt=p.prompt, new_tokens=p.new_tokens,
                               cuda_graphs=self.engine.runner.graphs is not None, overlap=self.engine.overlap,
                               backend=self.engine.model.attention.name, **extra)  # fmt: skip

    def decode_values(self, batch: int, n_adapters: int, step_s: float, mean_ctx: float,
                      adapter_bytes: int | None = None) -> dict:  # fmt: skip
        p = self.plan
        need = decode_step_bytes(p.shape, batch, mean_ctx, n_adapters, p.rank, p.elem, p.elem)
        if adapter_bytes is not None:
            need = StepBytes(need.weights, need.kv, adapter_bytes)
        bw = self.bandwidth
        return dict(
            batch=batch, adapters=n_adapters, tok_s=batch / step_s, step_ms=step_s * 1e3,
            roofline_fraction=roofline_fraction(need.total, step_s, bw) if bw else None,
            mean_context=mean_ctx, bytes_GB=need.total / 1e9, adapter_bytes_GB=need.adapters / 1e9,
            floor_ms=need.total / bw * 1e3 if bw else None,
        )  # fmt: skip

    def sec_decode(self) -> None:
        for b in self.plan.decode_batches:
            fail_soft(self.report, "decode", "shard", lambda b=b: self.decode_row(b, 0), batch=b, adapters=0)

    def sec_adapter_load(self) -> None:
        """LoadAdapter as a shard started with --adapter-slots sees it (stacks laid out before, no re-layout,
        no graph recapture: the `ms` the targets read), then as one without it (growth from empty)."""
        from cache.adapter_shapes import SlotReservation
        from shard_server.types import AdapterSpec

        p, store = self.plan, self.engine.adapters
        mb = p.shape.adapter_params(p.rank) * p.elem / 1e6

        def offload(dirs: list[Path], first: int) -> None:
            for j, d in enumerate(dirs):
                self.engine.offload_adapter(first + j, AdapterSpec(adapter_ids=(str(d),), source="local"))

        # Growth: an empty store lays out its stacks at the first load (8 slots) and recaptures the LoRA
        # decode graphs inside that LoadAdapter. Indices of their own, offloaded again after.
        assert not store.resident_indices(), "adapter_load runs before the sections that load adapters"
        grow_dirs = self.adapters("load", p.load_reps, seed0=5000)
        grow, grow_recapture = self.load_adapters(grow_dirs, 1000)
        offload(grow_dirs, 1000)  # the store is empty again: its stacks and LoRA graphs go
        # Pre-sized: what start-up does with --adapter-slots (the stacks, then Warmup's LoRA graphs).
        slots = max(8, p.load_reps)
        sync(p.device)
        t0 = time.perf_counter()
        store.reserve(SlotReservation(slots, p.rank))
        self.engine.runner.refresh_lora_graphs()
        sync(p.device)
        reserve_ms = (time.perf_counter() - t0) * 1e3
        version = store.layout_version
        dirs = self.adapters("load_presized", p.load_reps, seed0=6000)
        try:
            samples, recapture = self.load_adapters(dirs, 2000)
            relayouts = store.layout_version - version
            offload(dirs, 2000)
        finally:
            store.reserve(None)  # back to growth on demand for the later sections; the stacks go
            self.engine.runner.refresh_lora_graphs()
        self.report.add(
            "adapter_load", "shard", adapters=1, ms=median(samples), samples_ms=samples, adapter_MB=mb,
            stacks="presized", slots=slots, graph_recapture_ms=recapture, relayouts=relayouts,
            reserve_and_capture_ms=reserve_ms,
            notes=f"engine.load_adapter of {len(dirs)} distinct local rank-{p.rank} adapters (all seven "
            f"projections) into stacks laid out beforehand ({slots} slots, rank {p.rank}: what start-up "
            "does with --adapter-slots, then Warmup captures the LoRA graphs; that took "
            "reserve_and_capture_ms, outside the samples); timed to synchronize; files from the page cache",
        )  # fmt: skip
        self.report.add(
            "adapter_load", "shard", adapters=1, ms=median(grow), samples_ms=grow, adapter_MB=mb,
            stacks="growth", graph_recapture_ms=grow_recapture,
            ms_without_graph_recapture=median([a - b for a, b in zip(grow, grow_recapture, strict=True)]),
            notes=f"engine.load_adapter of {len(grow_dirs)} distinct local rank-{p.rank} adapters into an "
            "empty store without --adapter-slots: the first load lays out the stacks (8 slots) and "
            "recaptures the LoRA decode CUDA graphs (graph_recapture_ms); timed to synchronize",
        )  # fmt: skip

    def sec_adapters(self) -> None:
        p = self.plan
        most = max(p.adapter_counts)
        dirs = self.adapters("decode", most, seed0=1)
        samples, recapture = self.load_adapters(dirs, 1)  # indices 1..most
        log(f"adapters: {most} loaded, median {median(samples):.1f} ms each, {sum(recapture) / 1e3:.1f} s "
            "of it recapturing LoRA decode graphs")  # fmt: skip
        for b in p.adapter_batches:
            for n in p.adapter_counts:
                fail_soft(self.report, "decode", "shard", lambda b=b, n=n: self.decode_row(b, n),
                          batch=b, adapters=n)  # fmt: skip

    def sec_dora(self) -> None:
        """DoRA's decode cost over LoRA of the same rank: n LoRA adapters, then n DoRA adapters with the
        same A and B plus magnitudes (one scale kernel per DoRA module and step), rows back to back."""
        p = self.plan
        most = max(p.dora_counts)
        lora = self.adapters("decode", most, seed0=1)  # the `adapters` section's; loading again is a no-op
        have = self.adapter_dirs.setdefault("dora", [])
        for j in range(len(have), most):
            have.append(common.write_adapter(self.work / f"adapter-dora-{j}", p.shape, p.rank, p.device,
                                             p.dtype, seed=1 + j, dora=True))  # fmt: skip
        self.load_adapters(lora, 1)
        first = 3000
        load_ms, recapture_ms = self.load_adapters(have, first)
        log(f"dora: {most} DoRA adapters loaded, median {median(load_ms):.1f} ms each "
            f"({median(recapture_ms):.1f} ms of it recapturing LoRA graphs)")  # fmt: skip
        for b in p.dora_batches:
            for n in p.dora_counts:
                rows: dict[str, dict] = {}

                def row(b=b, n=n, rows=rows, variant="lora", index=1):
                    rows[variant] = self.decode_row(b, n, index, variant=variant)

                for variant, index in (("lora", 1), ("dora", first)):
                    fail_soft(self.report, "decode", "shard",
                              lambda v=variant, i=index: row(variant=v, index=i),
                              batch=b, adapters=n, variant=variant)  # fmt: skip
                if len(rows) == 2:
                    lo, do = rows["lora"], rows["dora"]
                    self.report.add(
                        "dora_overhead", "shard", batch=b, adapters=n, step_ms=do["step_ms"] - lo["step_ms"],
                        ratio=do["step_ms"] / lo["step_ms"],
                        forward_ms_extra=do["forward_ms"] - lo["forward_ms"], rank=p.rank,
                        notes="decode step of n DoRA adapters minus the same batch with n LoRA adapters of "
                        "the same rank (all 7 projections); ratio = DoRA step / LoRA step",
                    )  # fmt: skip

    def e2e_direct(self) -> None:
        """Each e2e batch with the overlap on and off (the engine reads `overlap` at every Decode)."""
        p = self.plan
        for batch in p.e2e_batches:
            for overlap in (True, False):
                fail_soft(self.report, "e2e", "shard", lambda b=batch, o=overlap: self._e2e_direct_row(b, o),
                          batch=batch, path="direct", overlap=overlap)  # fmt: skip
        self.engine.overlap = p.overlap

    def _e2e_direct_row(self, batch: int, overlap: bool) -> None:
        p = self.plan
        self.engine.overlap = overlap
        # Warm at the same batch size: first kernels and allocations at this shape stay out of the timing.
        self.generate_direct(self.prompts.specs(batch, p.prompt, 4))
        specs = self.prompts.specs(batch, p.prompt, p.new_tokens)
        seconds, tokens, prefill_s = self.generate_direct(specs)
        self.direct_e2e.setdefault((batch, overlap), []).append(tokens / seconds)
        self.report.add(
            "e2e", "shard", batch=batch, adapters=0, tok_s=tokens / seconds,
            step_ms=seconds / p.new_tokens * 1e3, ms=seconds * 1e3, path="direct", tokens=tokens,
            overlap=overlap, prefill_ms=prefill_s * 1e3, decode_ms=(seconds - prefill_s) * 1e3,
            notes=f"ShardEngine in process: one prefill of {batch} x {p.prompt} tokens, decode until "
            f"{p.new_tokens} new tokens each; tok_s = generated tokens / wall time",
        )  # fmt: skip
