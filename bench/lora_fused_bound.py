"""What would one adapter cost with no LoRA kernel at all beside the matmuls? A bound, before building it.

    python -m bench.lora_fused_bound [--batches 32,64,128] [--slots 1,4] [--out FILE]

docs/lora.md names two designs that would stop the LoRA kernels from disturbing the base matmuls:
A, the A matrices of a few hot slots stacked under each projection's weight, so the base matmul also
computes u = x @ A_hot^T (no shrink kernel); B, the expand u @ B done inside the kernel that reads the
projection's output next (rope + KV write, silu_and_mul, the next RMSNorm; no expand kernel, no side
stream, no SMs left free). This bench builds neither. It replays the base decode graph (under its own
matmul policy) with what the two would add, one process, interleaved rounds:

  wide/S=s     every projection's weight widened by the A rows of s hot rank-16 slots (qkv +48 s rows,
               o +16 s, gate_up +32 s, down +16 s): the matmuls' extra bytes and tiles; the consumers read
               the base columns through a view with the wider row stride
  delta        the consumers read a [T, N] delta per group (zeros, one buffer per layer and group, never
               written in the step): more bytes than design B reads (u and B) from 32 rows up, fewer below
  wide+delta   both: the bound on A + B (B's in-kernel dot not counted)
  side         the shipped 1-adapter side-stream graph (executor/graphs.py's LORA_FEW), for reference

A + B as built and measured at commit ccd3042 (its "hot/S=s" cases, removed since): docs/lora.md.

Prediction, written before the run: wide/S=4 +0.16 GB a step (+1.1%, ~0.04 ms at 4.1 TB/s); delta at
128 rows 11 MB a layer read, 0.35 GB a step (~0.09 ms); wide+delta/S=4 ~1.02 x the base graph at 128
rows, against 1.10 for the side stream.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from bench.common import median, time_ms, write_results
from bench.l2_prefetch import graph_of
from bench.profile_decode import MAX_S, DecodeCase, build_model
from bench.profile_lora import kernel_table, lora_stacks

RANK = 16
MEMBERS = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}


def projections(layer) -> dict:
    attn, mlp = layer.self_attn, layer.mlp
    return {"qkv_proj": attn.qkv_proj, "o_proj": attn.o_proj, "gate_up_proj": mlp.gate_up_proj,
            "down_proj": mlp.down_proj}  # fmt: skip


@contextlib.contextmanager
def widened(model, slots: int):
    """Inside: each projection computes F.linear(x, [W; A_hot]) and returns the base columns (a view).
    Yields the widened weights: a graph captured inside reads them, so keep them while it lives."""
    patched, wides = [], []
    for layer in model.model.layers:
        for group, mod in projections(layer).items():
            w = mod.weight
            rows = MEMBERS[group] * RANK * slots
            wide = torch.cat([w, torch.randn(rows, w.shape[1], device=w.device, dtype=w.dtype) * 0.01])
            n = w.shape[0]
            mod.forward = lambda x, wide=wide, n=n: F.linear(x, wide)[:, :n]
            patched.append(mod)
            wides.append(wide)  # [N + rows, K]
    try:
        yield wides
    finally:
        for mod in patched:
            del mod.forward  # the class's forward again


class _Static:
    def __init__(self, delta):
        self.delta = delta

    def finish(self, out):
        return self.delta


class StaticDeltaHook:
    """AdapterHook whose every group returns a zero delta [T, N] of its own (per layer and group), for the
    consumers to read and add; lm_head gets nothing."""

    has_lora = True  # model.lora_hook.AdapterHook: begin_lora is called for every group

    def __init__(self, model, rows: int):
        self.deltas = {}
        for i, layer in enumerate(model.model.layers):
            for group, mod in projections(layer).items():
                n = mod.weight.shape[0]
                self.deltas[(i, group)] = torch.zeros(rows, n, device=model.device, dtype=model.dtype)

    def begin_lora(self, layer_idx, target, x, widths):
        return _Static(self.deltas[(layer_idx, target)])

    def add_lora(self, layer_idx, target, x, out, widths=None):
        return None


def main() -> None:
    from model.adapters.batch import AdapterBatchData, AdapterBatchMetadata
    from model.forward_batch import ForwardBatch
    from shard_server.executor.gemm_policy import decode_policy

    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--slots", default="1,4")
    ap.add_argument("--cases", default="base,delta,side,wide,wide+delta")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--kernels", default="", help="cases whose kernel table is printed, e.g. side")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    stacks = lora_stacks(model, 4, RANK, dev)
    side = torch.cuda.Stream(dev, priority=-100)
    out = {"device": torch.cuda.get_device_name(dev), "rows": []}
    slot_counts = [int(s) for s in args.slots.split(",")]
    with torch.no_grad():
        for b in [int(x) for x in args.batches.split(",")]:
            case = DecodeCase(model, b, 544)
            kinds = args.cases.split(",")
            cases = [(k, 0, k == "delta") for k in ("base", "delta", "side") if k in kinds or k == "base"]
            for kind in ("wide", "wide+delta"):
                if kind in kinds:
                    cases += [(f"{kind}/S={s}", s, kind == "wide+delta") for s in slot_counts]
            graphs = []
            for name, slots, delta in cases:
                policy = decode_policy(b, sms, side_stream=name == "side")
                if name == "side":
                    meta = AdapterBatchMetadata.for_cuda_graph(b, dev)
                    meta.token_slots.zero_()  # every row on slot 0: one adapter
                    hook = AdapterBatchData(meta, stacks, is_prefill=False, concurrent=True, stream=side,
                                            lora_sms=policy.sm_carveout)  # fmt: skip
                else:
                    hook = StaticDeltaHook(model, b) if delta else None

                def step(c=case, h=hook):
                    fb = ForwardBatch.decode(c.input_ids, c.positions, c.tables, block_size=model.block_size,
                                             max_s=MAX_S, adapter_data=h)  # fmt: skip
                    return fb.run(model, c.kv.layers)

                wider = widened(model, slots) if slots else contextlib.nullcontext()
                with policy.applied(), wider as wides:
                    g, _ = graph_of(step)
                graphs.append((name, g, (hook, wides)))
            samples = {name: [] for name, *_ in graphs}
            for _ in range(args.rounds):
                for name, g, _ in graphs:
                    samples[name] += time_ms(g.replay, dev, 1, 5)
            base = median(samples["base"])
            for name, *_ in graphs:
                ms, o = median(samples[name]), sorted(samples[name])
                p = [o[len(o) // 10], o[9 * len(o) // 10]]
                row = {"batch": b, "case": name, "replay_ms": ms, "vs_base": ms / base, "p10_p90": p}
                out["rows"].append(row)
                print(f"batch {b:4d} {name:16s} {ms:7.3f} ms  {ms / base:.3f} x base  "
                      f"p10-p90 {p[0]:.3f}-{p[1]:.3f}")  # fmt: skip
                if name in args.kernels.split(","):
                    g = next(g for n, g, _ in graphs if n == name)
                    row["kernels"] = kernel_table(g.replay, 12)
                    for k in row["kernels"]:
                        print(f"     {k['ms']:8.3f} ms  x{k['count']:5d}  {k['kernel']}")
            del graphs, case
            torch.cuda.empty_cache()
    write_results(args.out, out)


if __name__ == "__main__":
    main()
