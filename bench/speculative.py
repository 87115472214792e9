"""What a speculative verify step costs on a GPU, against a plain decode step.

    python -m bench.speculative [--k 4] [--context 512] [--out FILE]
    python -m bench.speculative --smoke          # CPU, tiny model: code paths only, not numbers

verify  Mistral-7B shape, random bf16 weights drawn on the device, context 512: at batch 1..32 the time
        of one engine decode step (CUDA-graph forward + sampling + the host sync) against one verify
        step with k = 4 drafts per row (CUDA-graph verify forward over B x 5 tokens + scoring of the 5
        positions + the host sync); also the forwards alone. Target: verify <= 1.15 x decode.

What drafts buy on real weights (n-gram and Medusa, the demo model): bench/speculative_demo.py.
Writes bench/results/<card>-speculative-<date>.json (and $OUT/ when set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

from bench.common import card_slug, device_name, git_commit, median, time_ms

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- verify step cost (7B shape)


def _random_model(dev: torch.device, smoke: bool):
    from model.config import MistralConfig
    from model.flash_mistral import FlashMistralForCausalLM

    if smoke:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    else:
        from bench.profile_decode import SHAPE as shape
    cfg = MistralConfig(**{**dict(max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=1e6,
                                  sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16"),
                           **shape})  # fmt: skip
    dtype = torch.float32 if smoke else torch.bfloat16
    model = FlashMistralForCausalLM(cfg, None, dtype=dtype, device=dev)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def _batch(model, rows: int, context: int, k: int, dev):
    from shard_server.engine.batch import Batch, RequestState
    from shard_server.generation.sampling import NextTokenChooser
    from shard_server.types import SamplingParams

    bs = model.block_size
    per_row = -(-(context + k + 1) // bs)
    tables = (torch.arange(rows * per_row, dtype=torch.int32) + 1).view(rows, per_row)  # block 0: reserved
    reqs = [
        RequestState(id=i, seq_id=i, adapter_index=0, prompt_ids=[1] * context, sampling=SamplingParams(),
                     max_new_tokens=256, tracker=None, length=context, block_table=tables[i].tolist())
        for i in range(rows)
    ]  # fmt: skip
    vocab = model.config.vocab_size
    chooser = NextTokenChooser.from_params([r.sampling for r in reqs], [[1]] * rows, vocab, dev)
    ids = torch.randint(3, vocab, (rows,), device=dev)
    positions = torch.full((rows,), context, dtype=torch.int64, device=dev)
    return Batch(0, reqs, chooser, ids, positions, tables.to(dev)), rows * per_row + 1


def sec_verify(args, dev, out: dict) -> None:
    from cache.adapter_store import AdapterStore
    from cache.kv_cache import KVCache
    from shard_server.executor.graphs import DecodeGraphs
    from shard_server.executor.runner import ModelRunner
    from shard_server.executor.verify import VerifyGraphs, verify_forward
    from shard_server.generation.speculative import choose_positions

    model = _random_model(dev, args.smoke)
    k, context = args.k, args.context
    batches = [1, 2] if args.smoke else [1, 2, 4, 8, 16, 32]
    blocks = _batch(model, max(batches), context, k, dev)[1]
    runner = ModelRunner(
        model, KVCache.for_model(model, blocks), AdapterStore(model.config, dev, model.dtype)
    )
    graphs = None
    if dev.type == "cuda":
        runner.graphs = DecodeGraphs(runner, max_batch=max(batches), max_context=context + 64)
        runner.verify_graphs = graphs = VerifyGraphs(runner, k + 1, max_batch=max(batches),
                                                     max_context=context + 64)  # fmt: skip
        runner.capture_graphs(context + 1)  # as Warmup does: never inside a timed step
    reps = 3 if args.smoke else 30
    for rows in batches:
        batch, _ = _batch(model, rows, context, k, dev)
        drafts = torch.randint(3, model.config.vocab_size, (rows, k), device=dev)
        tokens = torch.cat([batch.input_ids[:, None], drafts], dim=1)
        n_valid = torch.full((rows,), k + 1, dtype=torch.int64, device=dev)

        def decode_fwd(b=batch):
            return runner.decode(b)

        def verify_fwd(b=batch, t=tokens, n=n_valid):
            return verify_forward(runner, b, t, n, graphs)

        def decode_step(b=batch):
            return b.chooser.choose(runner.decode(b)).to_host()

        def verify_step(b=batch, t=tokens, n=n_valid, d=drafts):
            logits, _ = verify_forward(runner, b, t, n, graphs)
            return choose_positions(b.chooser, logits, d).to_host([k] * len(b))

        row = {"kind": "verify", "batch": rows, "context": context, "k": k}
        for name, fn in (("decode_fwd_ms", decode_fwd), ("verify_fwd_ms", verify_fwd),
                         ("decode_step_ms", decode_step), ("verify_step_ms", verify_step)):  # fmt: skip
            row[name] = median(time_ms(fn, dev, 3, reps))
        row["step_ratio"] = row["verify_step_ms"] / row["decode_step_ms"]
        row["forward_ratio"] = row["verify_fwd_ms"] / row["decode_fwd_ms"]
        _add(out, row)


# ---------------------------------------------------------------- report


def _add(out: dict, row: dict) -> None:
    out["rows"].append(row)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    _save(out)


def _save(out: dict) -> None:
    text = json.dumps(out, indent=1)
    Path(out["path"]).parent.mkdir(parents=True, exist_ok=True)
    Path(out["path"]).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / Path(out["path"]).name).write_text(text)


SECTIONS = {"verify": sec_verify}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: code paths only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    name = device_name(dev)
    date = datetime.date.today().isoformat()
    path = args.out or str(REPO / "bench" / "results" / f"{card_slug(name)}-speculative-{date}.json")
    out = {"device": name, "commit": git_commit(REPO), "path": path, "k": args.k, "rows": []}
    for section in args.only.split(","):
        t0 = time.perf_counter()
        try:
            SECTIONS[section](args, dev, out)
        except Exception as e:  # noqa: BLE001 - a benchmark keeps going past one failed section
            import traceback

            traceback.print_exc()
            out["rows"].append({"kind": section, "error": f"{type(e).__name__}: {e}"[:500]})
        print(f"[{section}: {time.perf_counter() - t0:.1f} s]", flush=True)
        _save(out)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
