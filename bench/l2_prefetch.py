"""Does prefetching the next matmul's weights into L2, while the small kernels before it run, shorten the
decode step? Mistral-7B shape, random bf16 weights, CUDA-graph decode forward (model only).

    python -m bench.l2_prefetch [--batches 1,32,64,128] [--mb 4,8,16] [--modes pf,bulk,load] [--out FILE]

Why: between two projection groups the step runs kernels that hardly touch HBM (RMSNorm, rope + KV
write, silu_and_mul: launch-bound, ~3 us each; at batch 1 attention too), so the weight stream pauses
~25 us a layer (~0.8 ms of a 4.6 ms step at batch 1). A side stream forked after each group's matmul
asks L2 for the first X MB of the next group's weight, so that matmul finds part of it in L2.

Bytes and prediction, written before the run: a step must read 14.5 GB of weights (3.5 ms at 4.1 TB/s).
Prefetching X MB before each of the 4 groups of 32 layers moves 128 X MB of those reads into the
pauses: X = 8 MB -> 1 GB -> up to 0.25 ms a step (5% at batch 1, 3% at 128 rows) if L2 keeps the lines
until the matmul reads them (50 MB of L2; the matmul before streams through it with normal priority,
so the prefetch asks for evict_last). The values do not change (checked: logits equal).

Modes (how the side stream asks L2):
  pf    one `prefetch.global.L2::evict_last` per 128-B line (fire and forget)
  bulk  Hopper's `cp.async.bulk.prefetch.L2.global` of 4 KiB per lane (the TMA unit fetches)
  load  plain loads with eviction_policy="evict_last", summed (the kernel waits for its bytes)

A third placement, extra programs inside the norm / rope / silu kernels that issue the prefetches (no
graph node), was measured at commit ac69c5d and removed: README, "Benchmarks", has the table.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from bench.common import copy_bandwidth_gbps, median, time_ms, write_results
from bench.profile_decode import MAX_S, DecodeCase, build_model

LINE = 128  # bytes a prefetch instruction asks for
BULK = 4096  # bytes a bulk prefetch asks for


@triton.jit
def _prefetch_lines(base_ptr, n_lines, sink_ptr, LINE_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    """Program p asks L2 for lines p*BLOCK .. of the range, one prefetch per line, grid-strided."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, n_lines, tl.num_programs(0) * BLOCK):
        line = start + tl.arange(0, BLOCK)
        ptrs = base_ptr + tl.minimum(line, n_lines - 1).to(tl.int64) * LINE_ELEMS
        acc += tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
                                         [ptrs], dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
    tl.store(sink_ptr + pid, tl.sum(acc).to(tl.float32))  # 0: keeps the asm


@triton.jit
def _prefetch_bulk(base_ptr, n_chunks, sink_ptr, CHUNK_ELEMS: tl.constexpr, CHUNK_BYTES: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, n_chunks, tl.num_programs(0) * BLOCK):
        chunk = start + tl.arange(0, BLOCK)
        ptrs = base_ptr + tl.minimum(chunk, n_chunks - 1).to(tl.int64) * CHUNK_ELEMS
        size = tl.full([BLOCK], CHUNK_BYTES, tl.int32)
        acc += tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
                                         "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False,
                                         pack=1)  # fmt: skip
    tl.store(sink_ptr + pid, tl.sum(acc).to(tl.float32))


@triton.jit
def _prefetch_load(base_ptr, n_elems, sink_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n_elems, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = tl.load(base_ptr + offs, mask=offs < n_elems, other=0.0, eviction_policy="evict_last")
        acc += w.to(tl.float32)
    tl.store(sink_ptr + pid, tl.sum(acc))


def prefetch(w: torch.Tensor, nbytes: int, mode: str, programs: int, sink: torch.Tensor) -> None:
    """Ask L2 for the first `nbytes` of w's storage (contiguous rows)."""
    flat = w.view(-1)
    nbytes = min(nbytes, flat.numel() * flat.element_size())
    per = LINE // flat.element_size()
    if mode == "pf":
        _prefetch_lines[(programs,)](flat, nbytes // LINE, sink, LINE_ELEMS=per, BLOCK=256, num_warps=8)
    elif mode == "bulk":
        chunk = BULK // flat.element_size()
        _prefetch_bulk[(programs,)](flat, nbytes // BULK, sink, CHUNK_ELEMS=chunk, CHUNK_BYTES=BULK,
                                    BLOCK=128, num_warps=4)  # fmt: skip
    elif mode == "load":
        _prefetch_load[(programs,)](flat, nbytes // flat.element_size(), sink, BLOCK=4096, num_warps=8)
    else:
        raise ValueError(mode)


class _Done:
    def __init__(self, hook, layer_idx, target):
        self.hook, self.layer_idx, self.target = hook, layer_idx, target

    def finish(self, out):
        self.hook.after(self.layer_idx, self.target)
        return None


class PrefetchHook:
    """An AdapterHook that adds no LoRA: after each group's matmul is enqueued it forks `side` and asks L2
    for the next group's weight (qkv -> o -> gate_up -> down -> next layer's qkv -> ... -> lm_head);
    lm_head's add_lora joins `side` back (a capture must end joined)."""

    has_lora = True  # model.lora_hook.AdapterHook: begin_lora is called for every group

    ORDER = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def __init__(self, model, side: torch.cuda.Stream, nbytes: int, mode: str, programs: int,
                 groups: tuple[str, ...] = ORDER):  # fmt: skip
        self.model, self.side, self.nbytes, self.mode, self.programs = model, side, nbytes, mode, programs
        self.groups = groups  # the groups whose weights are prefetched
        self.sink = torch.zeros(programs, dtype=torch.float32, device=model.device)
        self.forked = False

    def weight(self, layer_idx: int, target: str) -> torch.Tensor:
        if layer_idx >= len(self.model.model.layers):
            return self.model.lm_head.weight
        layer = self.model.model.layers[layer_idx]
        attn, mlp = layer.self_attn, layer.mlp
        return {"qkv_proj": attn.qkv_proj.weight, "o_proj": attn.o_proj.weight,
                "gate_up_proj": mlp.gate_up_proj.weight, "down_proj": mlp.down_proj.weight}[target]

    def begin_lora(self, layer_idx, target, x, widths):
        return _Done(self, layer_idx, target)

    def after(self, layer_idx: int, target: str) -> None:
        i = self.ORDER.index(target)
        nxt_layer, nxt = (layer_idx, self.ORDER[i + 1]) if i + 1 < 4 else (layer_idx + 1, self.ORDER[0])
        if nxt not in self.groups and nxt_layer < len(self.model.model.layers):
            return
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            prefetch(self.weight(nxt_layer, nxt), self.nbytes, self.mode, self.programs, self.sink)
        self.forked = True

    def add_lora(self, layer_idx, target, x, out, widths=None):
        if self.forked:
            torch.cuda.current_stream().wait_stream(self.side)


def graph_of(fn) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """(graph of fn, the output tensor its replays write)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def main() -> None:
    from model.forward_batch import ForwardBatch
    from shard_server.executor.gemm_policy import decode_policy

    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32,64,128")
    ap.add_argument("--mb", default="4,8,16")
    ap.add_argument("--modes", default="pf,bulk,load")
    ap.add_argument("--programs", default="16")
    ap.add_argument("--groups", default="all", help="all, or + joined groups whose weights are prefetched")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth_gbps(dev, 2 << 30)
    model = build_model(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    side = torch.cuda.Stream(dev)
    groups = PrefetchHook.ORDER if args.groups == "all" else tuple(args.groups.split("+"))
    out = {"device": torch.cuda.get_device_name(dev), "copy_gbps": bw, "rows": []}
    print(f"{out['device']}: copy {bw:.0f} GB/s")
    for b in [int(x) for x in args.batches.split(",")]:
        case = DecodeCase(model, b, 544)
        policy = decode_policy(b, sms)
        cases = [("base", None)]
        for mode in args.modes.split(","):
            for mb in [float(x) for x in args.mb.split(",")]:
                for progs in [int(x) for x in args.programs.split(",")]:
                    cases.append((f"{mode}/{mb:g}MB/{progs}p", (mode, int(mb * 2**20), progs)))
        graphs = []
        for name, spec in cases:
            hook = None if spec is None else PrefetchHook(model, side, spec[1], spec[0], spec[2], groups)

            def step(c=case, h=hook):
                fb = ForwardBatch.decode(c.input_ids, c.positions, c.tables, block_size=model.block_size,
                                         max_s=MAX_S, adapter_data=h)  # fmt: skip
                return fb.run(model, c.kv.layers)

            try:
                with policy.applied():
                    g, logits_out = graph_of(step)
            except Exception as e:  # a mode this card or triton cannot build: report, go on
                print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                torch.cuda.synchronize()
                continue
            graphs.append((name, g, logits_out, hook))
        samples = {name: [] for name, *_ in graphs}
        logits = {}
        for name, g, logits_out, _ in graphs:  # same inputs, same KV: the prefetch changes no value
            g.replay()
            torch.cuda.synchronize()
            logits[name] = logits_out.float().clone()
        for _ in range(args.rounds):
            for name, g, _, _ in graphs:
                samples[name] += time_ms(g.replay, dev, 1, 5)
        base = median(samples["base"])
        for name, *_ in graphs:
            ms = median(samples[name])
            o = sorted(samples[name])
            same = bool(torch.equal(logits[name], logits["base"]))
            row = {"batch": b, "case": name, "replay_ms": ms, "vs_base": ms / base, "logits_equal": same,
                   "p10_p90": [o[len(o) // 10], o[9 * len(o) // 10]], "blas": policy.library or "default",
                   "sm_carveout": policy.sm_carveout, "groups": list(groups)}
            out["rows"].append(row)
            print(f"batch {b:4d} {name:18s} {ms:7.3f} ms  {ms / base:.3f} x base  "
                  f"p10-p90 {o[len(o) // 10]:.3f}-{o[9 * len(o) // 10]:.3f}  logits equal {same}")
        del graphs, case
        torch.cuda.empty_cache()
    write_results(args.out, out)


if __name__ == "__main__":
    main()
