"""Where does LoRA's (and the verify step's) time go? Mistral-7B shape, random bf16 weights on the GPU.

    python -m bench.profile_lora [--out FILE] [--sections lora,verify,gemm]

lora    CUDA-graph decode forward (model only) at batch 1 / 32 / 128: the base model under cuBLAS and under
        the decode graphs' matmul policy; with adapter data but every row on the base model; with 1, 2,
        4, 8 and 32 distinct rank-16 adapters (32 resident slots, all seven projections), each added in
        place and on the LoRA side stream (executor/graphs.py's LORA and LORA_FEW variants); per case
        the replay time and, at 32 and 128 rows, the top kernels of one replay.
verify  decode forward vs verify forward (k = 4: 5 query tokens per row) at batch 8 / 16 / 32, both
        graph-replayed, kernels of each; the scoring of a verify step (choose_positions + host copy),
        eager, with its kernel count.
gemm    the layer's matmul shapes at M = 1 .. 256 rows: time and the weight bandwidth it reaches.

Prints a table per section and writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from functools import partial
from unittest import mock

import torch

from bench.common import copy_bandwidth_gbps, median, time_ms
from bench.profile_decode import MAX_S, DecodeCase, build_model, kernel_times


def kernel_table(fn, n: int = 18) -> list[dict]:
    """`kernel_times` of one call as rows, after a first row with the totals."""
    rows = [{"kernel": k[:80], "ms": ms, "count": c} for k, ms, c in kernel_times(fn)]
    total = {"kernel": "(all)", "ms": sum(r["ms"] for r in rows), "count": sum(r["count"] for r in rows)}
    return [total, *rows[:n]]


def print_kernels(title: str, rows: list[dict]) -> None:
    print(f"  -- {title}")
    for r in rows:
        print(f"     {r['ms']:8.3f} ms  x{r['count']:5d}  {r['kernel']}")


def graph_of(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


@contextlib.contextmanager
def skipped_lora_part(part: str):
    """Inside (part "shrink" or "expand"): the Triton LoRA ops launch no such kernel; a skipped shrink
    returns an unwritten v of the right shape, a skipped expand leaves its output as it was."""
    from model.adapters.lora_ops import TritonLoraOps

    if not part:
        yield
        return
    if part not in ("shrink", "expand"):
        raise ValueError(f"no LoRA part {part!r} (shrink, expand)")
    original = getattr(TritonLoraOps, part)

    def shrink(self, x, stack, plan):
        return torch.empty((1, x.shape[0], stack.a.shape[1]), device=x.device, dtype=torch.float32)

    def expand(self, y, v, stack, slices, plan, store=False):
        return None

    setattr(TritonLoraOps, part, shrink if part == "shrink" else expand)
    try:
        yield
    finally:
        setattr(TritonLoraOps, part, original)


def write_trace(fn, path: str) -> None:
    """A Chrome trace of one call of `fn` (after one untraced call): CUDA kernels with their streams."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)


_KERNEL_KINDS = (("nvjet", "gemm"), ("_shrink", "shrink"), ("_expand", "expand"), ("_add_rmsnorm", "rmsnorm"),
                 ("_rotary", "rotary"), ("_silu", "silu"))  # fmt: skip


def trace_summary(path: str) -> dict:
    """Per projection group of a decode trace (write_trace): median duration of its base matmul, of its
    LoRA shrink and expand, of the side chain (shrink start to expand end), and how late the expand ends
    after the matmul (> 0: the consumer waits for the LoRA). Groups are read off the kernel order of a
    layer: rotary follows qkv, the norm after rotary follows o, silu follows gate_up, the next norm down."""
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    events.sort(key=lambda e: e["ts"])
    found: dict[str, list[dict]] = {}
    gemm = shrink = expand = None
    after = None  # the consumer seen last: which group the next norm closes
    for e in events:
        kind = next((k for name, k in _KERNEL_KINDS if name in e["name"]), None)
        if kind in ("gemm", "shrink", "expand"):
            gemm, shrink, expand = (e if kind == "gemm" else gemm, e if kind == "shrink" else shrink,
                                    e if kind == "expand" else expand)  # fmt: skip
            continue
        if kind not in ("rotary", "silu", "rmsnorm"):
            continue
        group = {"rotary": "qkv", "silu": "gate_up"}.get(kind) or {"rotary": "o", "silu": "down"}.get(after)
        after = kind if kind != "rmsnorm" else None
        if group and gemm is not None:
            gemm_end = gemm["ts"] + gemm["dur"]
            row = {"gemm_us": gemm["dur"]}
            if expand is not None and shrink is not None and shrink["ts"] >= gemm["ts"] - 50:
                row.update(shrink_us=shrink["dur"], expand_us=expand["dur"],
                           chain_us=expand["ts"] + expand["dur"] - shrink["ts"],
                           expand_end_after_gemm_us=expand["ts"] + expand["dur"] - gemm_end)  # fmt: skip
            found.setdefault(group, []).append(row)
        gemm = shrink = expand = None
    return {g: {k: median([r[k] for r in rows if k in r]) for k in rows[0]} | {"layers": len(rows)}
            for g, rows in found.items()}  # fmt: skip


def lora_stacks(model, slots: int, rank: int, dev) -> dict:
    from model.adapters.stacks import LoraGroupStack

    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    groups = {
        "qkv_proj": (h, ("q_proj", "k_proj", "v_proj"), (q, kv, kv)),
        "o_proj": (q, ("o_proj",), (h,)),
        "gate_up_proj": (h, ("gate_proj", "up_proj"), (i, i)),
        "down_proj": (i, ("down_proj",), (h,)),
    }
    stacks = {}
    ranks = torch.full((slots,), rank, dtype=torch.int32, device=dev)
    for layer in range(cfg.num_hidden_layers):
        for name, (fan_in, targets, widths) in groups.items():
            a = torch.randn(slots, len(targets) * rank, fan_in, device=dev, dtype=torch.bfloat16) * 0.01
            b = torch.randn(slots, sum(widths), rank, device=dev, dtype=torch.bfloat16) * 0.01
            stacks[(layer, name)] = LoraGroupStack(a, b, ranks, targets, widths)
    return stacks


def sec_lora(model, dev, out: dict, batches: list[int], slots: int = 32,
             adapter_counts: tuple[int, ...] = (1, 2, 4, 8, 32),
             side_carveouts: tuple[int, ...] = (), base_carveouts: tuple[int, ...] = (),
             group_sets: tuple[tuple[str, ...], ...] = (), trace_dir: str = "",
             side_priorities: bool = False, shrink_splits: tuple[int, ...] = (),
             programs_per_sm: tuple[int, ...] = (), skip_parts: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Per batch: the base graph under cuBLAS and under the decode graphs' matmul policy, every row on
    the base model inside a LoRA graph, then for each adapter count (rows round-robin over that many
    adapters) LoRA added in place (graphs.LORA) and on the side stream with 32 SMs left to it
    (graphs.LORA_FEW), each under its policy (executor/gemm_policy.py). `side_carveouts`: the side
    stream again with that many SMs left to it instead (matmuls under cuBLASLt's SM count target, the
    LoRA grids sized to the same SMs), to choose the policy's SIDE_STREAM_SMS and FEW_ADAPTERS;
    `base_carveouts`: the base graph under cuBLASLt leaving that many SMs free (the BASE policy).
    `group_sets`: one adapter on the side stream with LoRA on those projection groups only (the others'
    stacks left out, so they run no LoRA at all): what each group's LoRA costs in the step.
    `side_priorities`: one adapter on a side stream of default priority too ("side_stream@normal"; the
    store's LoRA stream has the highest).
    `shrink_splits`: one adapter on the side stream with every shrink split that many ways ("/splits=N";
    default: lora.choose_splits).
    `programs_per_sm`: one adapter and the most adapters on the side stream with the LoRA kernels'
    persistent grids sized for that many programs per SM ("/pps=N"; default lora.PROGRAMS_PER_SM).
    `skip_parts` ("shrink", "expand"): one adapter on the side stream with that kernel not launched
    ("/no-shrink", "/no-expand"): which of the two slows the matmuls beside them (timing only: the
    skipped kernel's output is left unwritten, so the logits are garbage).
    `trace_dir`: a Chrome trace (kernels by stream, one replay) of the base graph under its policy and of
    every one-adapter side-stream case, to see where the main stream waits."""
    from model.adapters.batch import AdapterBatchData, AdapterBatchMetadata
    from model.forward_batch import ForwardBatch
    from model.kernels import lora
    from shard_server.executor.gemm_policy import DEFAULT, SIDE_STREAM_SMS, GemmPolicy, decode_policy

    stacks = lora_stacks(model, slots, 16, dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    side = torch.cuda.Stream(dev, priority=-100)  # as AdapterStore makes its LoRA stream
    side_normal = torch.cuda.Stream(dev)  # the "@normal" cases: the same at the default priority
    res = out.setdefault("lora", [])
    for b in batches:
        case = DecodeCase(model, b, 544)
        cases = [("none", "cublas", DEFAULT), ("none", "policy", decode_policy(b, sms)),
                 ("base_rows", "in_place", decode_policy(b, sms))]  # fmt: skip
        cases += [("none", f"cublaslt-{c}", GemmPolicy("cublaslt", c)) for c in base_carveouts]
        for n in adapter_counts:
            cases += [(n, "in_place", decode_policy(b, sms)), (n, "side_stream", decode_policy(b, sms, True))]
            extra = [c for c in side_carveouts if c != SIDE_STREAM_SMS]
            cases += [(n, "side_stream", GemmPolicy("cublaslt", c)) for c in extra]
        cases += [(1, "side_stream:" + "+".join(g), decode_policy(b, sms, True)) for g in group_sets]
        if side_priorities:
            cases += [(1, "side_stream@normal", decode_policy(b, sms, True))]
        cases += [(1, f"side_stream/splits={n}", decode_policy(b, sms, True)) for n in shrink_splits]
        cases += [(1, f"side_stream/no-{part}", decode_policy(b, sms, True)) for part in skip_parts]
        cases += [(n_ad, f"side_stream/pps={p}", decode_policy(b, sms, True))
                  for p in programs_per_sm for n_ad in (1, max(adapter_counts))]  # fmt: skip
        graphs = []
        for used, mode, policy in cases:
            if used == "none":
                data = None
            else:
                meta = AdapterBatchMetadata.for_cuda_graph(b, dev)
                if used != "base_rows":
                    meta.token_slots.copy_(torch.arange(b, device=dev, dtype=torch.int32) % int(used))
                on_side = mode.startswith("side_stream")
                groups = mode.partition(":")[2].split("+") if ":" in mode else None
                used_stacks = stacks
                if groups is not None:
                    used_stacks = {k: st for k, st in stacks.items() if k[1] in groups}
                stream = side_normal if mode.endswith("@normal") else side
                data = AdapterBatchData(meta, used_stacks, is_prefill=False, concurrent=on_side,
                                        stream=stream if on_side else None,
                                        lora_sms=policy.sm_carveout if on_side else None)  # fmt: skip

            def step(c=case, d=data):
                fb = ForwardBatch.decode(c.input_ids, c.positions, c.tables, block_size=model.block_size,
                                         max_s=MAX_S, adapter_data=d)  # fmt: skip
                return fb.run(model, c.kv.layers)

            splits = int(mode.partition("/splits=")[2] or 0)
            pps = int(mode.partition("/pps=")[2] or 0)
            skipped = mode.partition("/no-")[2]
            with policy.applied(), contextlib.ExitStack() as knobs:
                if splits:  # every shrink split that many ways instead of lora.choose_splits's
                    knobs.enter_context(mock.patch.object(lora, "choose_splits", lambda *a, n=splits, **k: n))
                if pps:  # the LoRA kernels' persistent grids of that many programs per SM
                    knobs.enter_context(mock.patch.object(lora, "PROGRAMS_PER_SM", pps))
                knobs.enter_context(skipped_lora_part(skipped))
                # the step keeps its adapter data (plan, counters, partials) alive: the graph reads them
                graphs.append((graph_of(step), step))
        # Interleaved rounds: one configuration measured twice in a row drifted by up to 4% on the H200
        # (clocks, placement); rounds spread that drift over every case alike.
        samples: list[list[float]] = [[] for _ in cases]
        for _ in range(ROUNDS):
            for i, (g, _) in enumerate(graphs):
                samples[i] += time_ms(g.replay, dev, 1, REPLAYS_PER_ROUND)
        base_ms = median(samples[0])
        for (used, mode, policy), (g, _), ms_all in zip(cases, graphs, samples, strict=True):
            ms, ordered = median(ms_all), sorted(ms_all)
            row = {"batch": b, "adapters": used, "mode": mode, "replay_ms": ms, "vs_none": ms / base_ms,
                   "replay_ms_p10_p90": [ordered[len(ordered) // 10], ordered[9 * len(ordered) // 10]],
                   "blas": policy.library or "default", "sm_carveout": policy.sm_carveout}
            traced = (used == "none" and mode == "policy") or (used == 1 and mode.startswith("side"))
            if trace_dir and traced:
                path = f"{trace_dir}/trace-b{b}-{used}-{mode.replace(':', '-')}.json"
                write_trace(g.replay, path)
                row["trace"] = trace_summary(path)
            extra_case = mode.startswith(("cublaslt-", "side_stream:"))
            if b in (32, 128) and used in ("none", 1, 32) and not extra_case:
                row["kernels"] = kernel_table(g.replay)
            res.append(row)
            print(f"lora batch {b:4d} adapters {used!s:>9} {mode:11s} {row['blas']:8s} carveout "
                  f"{policy.sm_carveout:2d}: replay {ms:7.3f} ms ({ms / base_ms:.3f} x cuBLAS "
                  "none)")  # fmt: skip
        del graphs, case
        torch.cuda.empty_cache()


ROUNDS, REPLAYS_PER_ROUND = 6, 5


def sec_verify(model, dev, out: dict, batches: list[int], k: int = 4) -> None:
    from bench.speculative import _batch
    from cache.adapter_store import AdapterStore
    from cache.kv_cache import KVCache
    from shard_server.executor.graphs import DecodeGraphs
    from shard_server.executor.runner import ModelRunner
    from shard_server.executor.verify import VerifyGraphs, verify_forward
    from shard_server.generation.speculative import choose_positions

    context = 512
    blocks = _batch(model, max(batches), context, k, dev)[1]
    store = AdapterStore(model.config, dev, model.dtype)
    runner = ModelRunner(model, KVCache.for_model(model, blocks), store)
    runner.graphs = DecodeGraphs(runner, max_batch=max(batches), max_context=context + 64)
    graphs = VerifyGraphs(runner, k + 1, max_batch=max(batches), max_context=context + 64)
    runner.verify_graphs = graphs
    runner.capture_graphs(context + 1)
    res = out.setdefault("verify", [])
    for rows in batches:
        batch, _ = _batch(model, rows, context, k, dev)
        drafts = torch.randint(3, model.config.vocab_size, (rows, k), device=dev)
        tokens = torch.cat([batch.input_ids[:, None], drafts], dim=1)
        n_valid = torch.full((rows,), k + 1, dtype=torch.int64, device=dev)
        logits, _ = verify_forward(runner, batch, tokens, n_valid, graphs)

        def decode_fwd(b=batch):
            return runner.decode(b)

        def verify_fwd(b=batch, t=tokens, n=n_valid):
            return verify_forward(runner, b, t, n, graphs)

        def score(b=batch, lg=logits, d=drafts):
            return choose_positions(b.chooser, lg, d).to_host([k] * len(b))

        row = {"batch": rows, "k": k}
        for name, fn in (("decode_fwd", decode_fwd), ("verify_fwd", verify_fwd), ("score", score)):
            row[name + "_ms"] = median(time_ms(fn, dev, 3, 20))
            row[name + "_kernels"] = kernel_table(fn, 14)
        print(f"verify batch {rows:3d}: decode fwd {row['decode_fwd_ms']:.3f}  verify fwd "
              f"{row['verify_fwd_ms']:.3f} ({row['verify_fwd_ms'] / row['decode_fwd_ms']:.3f} x)  "
              f"score {row['score_ms']:.3f} ms ({row['score_kernels'][0]['count']} kernels)")  # fmt: skip
        for name in ("decode_fwd", "verify_fwd", "score"):
            print_kernels(f"{name} batch {rows}", row[name + "_kernels"])
        res.append(row)


def sec_gemm(model, dev, out: dict, bw: float) -> None:
    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * i), "down": (i, h)}
    res = out.setdefault("gemm", [])
    for name, (fan_in, fan_out) in shapes.items():
        w = torch.randn(fan_out, fan_in, device=dev, dtype=torch.bfloat16)
        line = f"gemm {name:8s}"
        for m in (1, 8, 32, 40, 64, 80, 128, 160, 192, 256):
            x = torch.randn(m, fan_in, device=dev, dtype=torch.bfloat16)
            g = graph_of(partial(torch.nn.functional.linear, x, w))
            reps = 20
            g2 = torch.cuda.CUDAGraph()  # 20 back-to-back launches: per-call time without replay gaps
            with torch.cuda.graph(g2):
                for _ in range(reps):
                    torch.nn.functional.linear(x, w)
            ms = median(time_ms(g2.replay, dev, 2, 10)) / reps
            frac = w.numel() * 2 / (ms / 1e3) / bw
            res.append({"gemm": name, "m": m, "ms": ms, "weight_bw_fraction": frac})
            line += f"  m{m}:{ms * 1e3:6.1f}us({frac:.2f})"
            del g, g2
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--sections", default="lora,verify,gemm")
    ap.add_argument("--lora-batches", default="1,32,128")
    ap.add_argument("--verify-batches", default="8,16,32")
    ap.add_argument("--lora-counts", default="1,2,4,8,32", help="distinct adapters per lora case")
    ap.add_argument("--side-carveouts", default="", help="extra SM counts left to the LoRA side stream")
    ap.add_argument("--base-carveouts", default="", help="SM counts cuBLASLt leaves free, base graph")
    ap.add_argument("--trace-dir", default="", help="lora: Chrome traces of the one-adapter cases here")
    ap.add_argument("--shrink-splits", default="", help="lora: one adapter with the shrink split N ways")
    ap.add_argument("--programs-per-sm", default="", help="lora: LoRA grids of N programs per SM")
    ap.add_argument("--skip-parts", default="", help="lora: one adapter with shrink / expand not launched")
    ap.add_argument("--side-priorities", action="store_true",
                    help="lora: one adapter on a side stream of default priority too")
    ap.add_argument("--lora-groups", default="",
                    help="1 adapter on the side stream, LoRA on these groups only: sets joined by ',', "
                         "groups in a set by '+' (qkv_proj, o_proj, gate_up_proj, down_proj)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth_gbps(dev, 2 << 30) * 1e9
    model = build_model(dev)
    out: dict = {"device": torch.cuda.get_device_name(dev), "bandwidth_GBps": bw / 1e9}
    print(f"copy {bw / 1e9:.0f} GB/s, backend {model.attention.name}")
    sections = args.sections.split(",")
    with torch.no_grad():
        for name in sections:
            try:
                if name == "lora":
                    sec_lora(model, dev, out, [int(x) for x in args.lora_batches.split(",")],
                             adapter_counts=tuple(int(x) for x in args.lora_counts.split(",")),
                             side_carveouts=tuple(int(x) for x in args.side_carveouts.split(",") if x),
                             base_carveouts=tuple(int(x) for x in args.base_carveouts.split(",") if x),
                             group_sets=tuple(tuple(g.split("+")) for g in args.lora_groups.split(",") if g),
                             trace_dir=args.trace_dir, side_priorities=args.side_priorities,
                             shrink_splits=tuple(int(x) for x in args.shrink_splits.split(",") if x),
                             programs_per_sm=tuple(int(x) for x in args.programs_per_sm.split(",") if x),
                             skip_parts=tuple(x for x in args.skip_parts.split(",") if x))
                elif name == "verify":
                    sec_verify(model, dev, out, [int(x) for x in args.verify_batches.split(",")])
                elif name == "gemm":
                    sec_gemm(model, dev, out, bw)
            except Exception as e:  # noqa: BLE001 - a failed section must not lose the others
                import traceback

                traceback.print_exc()
                out.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
