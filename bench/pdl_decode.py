"""Batch-1 decode with the matmuls as Triton GEMVs launched early (programmatic dependent launch, PDL).

    python -m bench.pdl_decode [--batches 1] [--out FILE]

Why: at batch 1 the step (4.5 ms on an H200) is 1.3 x its weight floor (3.45 ms), yet the GEMVs alone
stream at 0.94 of it. The rest is ~30 us a layer of small kernels (norms, rope + KV write, attention,
silu_and_mul) during which HBM idles, plus launch gaps. cuBLAS kernels cannot be launched early; our
GEMV (model/kernels/gemm.py, 2% faster than cuBLAS at M = 1 alone) can: launched as a programmatic
dependent of the small kernel before it (which lets it start at once, gdc_launch_dependents), it asks L2
for its W slice while that kernel runs, then waits for it (gdc_wait) before reading x.

Prediction, written before the first run: the norm / merge / silu before each of the 4 GEMVs of a layer
runs ~2 us, in which HBM could stream ~8 MB: ~8 us a layer hidden, 0.25 ms a step (4.53 -> ~4.25 ms,
0.80 of the roofline), if L2 keeps the prefetched lines until the GEMV reads them. Measured: 4.298 ms,
but from the GEMV itself (4.345 ms with plain launches) and the early launch, not the prefetch.

Cases, replayed in interleaved rounds (decode graph, context 544, the base graph's policy):
  cublas         every projection on cuBLAS (the model before the route)
  gemv+pdl       projections through the Triton GEMV (model/layers/gemv.py) launched as programmatic
                 dependents, the norm / silu before them triggering early (78c618b; then the attention
                 triggered too: 4.298 ms, below)
  gemv+rows      the norms and silu_and_mul computed by the GEMVs that read them, the residual added by
                 o_proj / down_proj (model/layers/deferred.py): three kernels a layer fewer; plain launches
  gemv+rows+pdl  ... the GEMVs as programmatic dependents (738f56b)
  gemv+rows+pdl+attn   ... and rope + KV write and the decode attention too (each waits for the kernel
                 before and lets the next launch at its start) (9edbad6)
  gemv+rows+rope       the qkv GEMV also rotating q, k and writing the K/V cache (model/kernels/
                 gemv_rope.py): one kernel a layer fewer again; plain launches
  gemv+rows+pdl+attn+rope   ... with every launch early: the model as shipped on Hopper
(A first version also had each GEMV program ask L2 for the first 1 / 2 / 4 chunks of its weight slice
before it waits: 0.949 / 0.969 / 1.049 x cuBLAS against 0.949 without, h200-pdl-decode-2026-12-01-
prefetch.json; dropped.)
A PDL variant must give the logits of its plain-launch twin bit for bit (same kernels, only launch
order): checked.

Prediction for the deferred rows, written before their first run: the two norms and silu_and_mul are ~2.5
us each on the critical path at batch 1 (each GEMV already waits for them with PDL); every norm-fused GEMV
program first reads the whole 8 KB row and residual from L2 (~1 us). Net ~5 us a layer, 0.15-0.2 ms a
step: 4.30 -> ~4.12 ms, 0.84 of the roofline. Measured: a first version whose norm GEMV also added the
residual: 4.643 ms, slower (gate_up's GEMV in two waves of programs: bench/gemv_rows.py; -rows.json); with
the residual moved to the epilogue of o_proj / down_proj: 4.206 against 4.357 (-0.15 ms, -rows-epilogue.json).
Each GEMV loading its next W tile before using the current one (register prefetch): 4.93-4.96 ms, lost
(registers; -rows-pf.json); dropped.

Prediction for rope + KV write and the attention as dependents, before the run: ~1 us saved at each of the
boundaries qkv -> rope -> attention (-> merge), 2-3 us a layer, 0.06-0.1 ms a step. Measured: 4.087 against
4.199 ms (h200-pdl-decode-2026-12-01-attn.json).

Prediction for rope + K/V write in the qkv GEMV's epilogue, before the run: the 2.3 us rope kernel gone,
~0.5 us more in the GEMV's tail: ~0.06 ms a step. First version: 4.184 against 4.142 ms (slower: its K
loop issued the x chunk's loads and math before W's load, 20.3 us alone against 16.3 + 2.3, -rope-first
files); with W's load first: 16.9 us alone, **4.070 against 4.142 ms** (h200-pdl-decode-2026-12-01-rope.json).

The decode attention's split count at batch 1 (--split-tokens: the shipped route with the shortest split
at 32 / 64 / 128 tokens against the heuristic's 256 then), before the run: 4 splits of up to 3 KV tiles
each run their tiles in series; one-tile splits should take ~3 us off the ~8 us attention + merge a
layer, ~0.1 ms a step. Measured: 3.977 / **3.958** / 3.973 against 4.016 ms (h200-pdl-decode-2026-12-01-
splits.json): 0.06 ms, so decode now splits down to one 64-token tile (model/kernels/paged_attention.py).

Rope + K/V write and the attention launched early at more than one row (--pdl-rows 1,65536 --batches
32,64,128 --cases cublas; the projections are cuBLAS there, so only the rope -> attention (-> merge) edge
can start early), before the run: ~1 us a layer, 0.03 ms a step. Measured (h200-pdl-decode-2026-12-01-
pdlrows.json): 5.161 against 5.117 ms at batch 32, 5.600 / 5.628 at 64, 7.160 / 7.195 at 128 (p10-p90 of
7.14-7.74 there): noise-sized and not one way, so more rows keep plain launches
(AttentionBackend.pdl_max_rows).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from bench.common import median, time_ms, write_results
from bench.l2_prefetch import graph_of
from bench.profile_decode import MAX_S, DecodeCase, bandwidth_model_and_weight_bytes


@contextlib.contextmanager
def route(model, router, attention_pdl: bool | None = None, split_tokens: int | None = None,
          pdl_rows: int | None = None):
    """Inside: the model's one-row projections through `router` (None: cuBLAS); `attention_pdl`: rope +
    KV write and the decode attention as programmatic dependents or not (None: as the router sets it);
    `split_tokens`: the decode attention's shortest flash-decoding split (None: its heuristic's);
    `pdl_rows`: the most rows for which rope + KV write and the attention launch early (None: shipped)."""
    shipped = model.model.layers[0].self_attn.qkv_proj.gemv
    shipped_split = getattr(model.attention, "min_split_tokens", None)
    shipped_rows = model.attention.pdl_max_rows
    model.use_gemv(router)
    if attention_pdl is not None:
        model.attention.pdl = attention_pdl
    model.attention.min_split_tokens = split_tokens
    if pdl_rows is not None:
        model.attention.pdl_max_rows = pdl_rows
    try:
        yield
    finally:
        model.use_gemv(shipped)
        model.attention.min_split_tokens = shipped_split
        model.attention.pdl_max_rows = shipped_rows


def main() -> None:
    from model.forward_batch import ForwardBatch
    from shard_server.executor.gemm_policy import decode_policy

    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="")
    ap.add_argument("--split-tokens", default="", help="also the shipped route with the decode attention's "
                    "shortest split at each of these token counts, e.g. 64,128")
    ap.add_argument("--pdl-rows", default="", help="also the shipped route with rope + KV write and the "
                    "attention launched early up to each of these row counts, e.g. 1,256")
    ap.add_argument("--cases", default="", help="only these cases (comma-separated names)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw_bytes, model, weight_bytes = bandwidth_model_and_weight_bytes(dev)
    bw = bw_bytes / 1e9
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    out = {"device": torch.cuda.get_device_name(dev), "copy_gbps": bw, "rows": []}
    print(f"{out['device']}: copy {bw:.0f} GB/s")
    from model.layers.gemv import GemvRouter

    shipped = model.model.layers[0].self_attn.qkv_proj.gemv
    assert shipped is not None, "no GEMV route on this device (model/layers/gemv.py: Hopper and later)"
    def variant(pdl, prologues, rope=False):
        return GemvRouter(shipped.configs, shipped.workspace, pdl=pdl, prologues=prologues, rope=rope)

    cases = {"cublas": (None, None), "gemv+pdl": (variant(True, False), False),
             "gemv+rows": (variant(False, True), None), "gemv+rows+pdl": (variant(True, True), False),
             "gemv+rows+pdl+attn": (variant(True, True), None),
             "gemv+rows+rope": (variant(False, True, True), None),
             "gemv+rows+pdl+attn+rope": (variant(True, True, True), None)}  # fmt: skip
    for tokens in [int(x) for x in args.split_tokens.split(",") if x]:
        cases[f"shipped/split{tokens}"] = (variant(True, True, True), None, tokens)
    for rows in [int(x) for x in args.pdl_rows.split(",") if x]:
        cases[f"shipped/pdlrows{rows}"] = (variant(True, True, True), None, None, rows)
    if args.cases:
        keep = set(args.cases.split(",")) | {"cublas"}
        cases = {k: v for k, v in cases.items() if k in keep or k.startswith("shipped/")}
    # the plain launch each PDL variant must equal bit for bit
    twin = {"gemv+rows+pdl": "gemv+rows", "gemv+rows+pdl+attn": "gemv+rows",
            "gemv+rows+pdl+attn+rope": "gemv+rows+rope"}
    twin |= {n: "shipped/pdlrows1" for n in cases if n.startswith("shipped/pdlrows") and n[15:] != "1"}
    with torch.no_grad():
        for b in [int(x) for x in args.batches.split(",")]:
            case = DecodeCase(model, b, 544)
            floor_ms = (weight_bytes + b * 545 * 131072) / (bw * 1e9) * 1e3

            def step(c=case):
                fb = ForwardBatch.decode(c.input_ids, c.positions, c.tables, block_size=model.block_size,
                                         max_s=MAX_S)  # fmt: skip
                return fb.run(model, c.kv.layers)

            graphs = {}
            for name, spec in cases.items():
                try:
                    with decode_policy(b, sms).applied(), route(model, *spec):
                        graphs[name] = (*graph_of(step), spec)
                except Exception as e:  # a variant this triton / driver cannot build: report, go on
                    print(f"  {name}: failed: {type(e).__name__}: {str(e)[:300]}")
                    torch.cuda.synchronize()
            logits = {}
            for name, (g, o, _) in graphs.items():
                g.replay()
                torch.cuda.synchronize()
                logits[name] = o.float().clone()
            samples = {name: [] for name in graphs}
            for _ in range(args.rounds):
                for name, (g, _, _) in graphs.items():
                    samples[name] += time_ms(g.replay, dev, 1, 10)
            base = median(samples["cublas"])
            for name in graphs:
                ms, o = median(samples[name]), sorted(samples[name])
                plain = twin.get(name, None if name.startswith("shipped/") else name)
                same = bool(torch.equal(logits[name], logits[plain])) if plain in logits else None
                err = (logits[name] - logits["cublas"]).abs().max().item()
                row = {"batch": b, "case": name, "replay_ms": ms, "vs_cublas": ms / base,
                       "floor_ms": floor_ms, "roofline": floor_ms / ms,
                       "p10_p90": [o[len(o) // 10], o[9 * len(o) // 10]], "logits_equal_plain_launch": same,
                       "max_abs_diff_vs_cublas": err}  # fmt: skip
                out["rows"].append(row)
                print(f"batch {b:3d} {name:14s} {ms:7.3f} ms  {ms / base:.3f} x cublas  roofline "
                      f"{floor_ms / ms:.3f}  = plain launch bitwise: {same}  "
                      f"max |diff| vs cublas {err:.3g}")  # fmt: skip
            del graphs, case
    write_results(args.out, out)


if __name__ == "__main__":
    main()
