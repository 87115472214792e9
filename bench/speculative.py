"""Speculative decoding on a GPU, one run: what a verify step costs, and what n-gram / Medusa drafts buy.

    python -m bench.speculative --model-dir DEMO_MODEL_DIR [--only verify,ngram,medusa] [--out FILE]
    python -m bench.speculative --smoke          # CPU, tiny model: code paths only, not numbers

verify  Mistral-7B shape, random bf16 weights drawn on the device, context 512: at batch 1..32 the time
        of one engine decode step (CUDA-graph forward + sampling + the host sync) against one verify
        step with k = 4 drafts per row (CUDA-graph verify forward over B x 5 tokens + scoring of the 5
        positions + the host sync); also the forwards alone. Target: verify <= 1.15 x decode.
ngram   the demo model (real weights): an input-grounded task (copy / rewrite / extract from a given
        passage), greedy, speculation off vs --k n-gram drafts, at batch 1 and 16: decode tokens/s,
        speedup, acceptance (accepted / drafted drafts), tokens per step, and whether the outputs are
        identical (they must be). Targets: >= 1.8x at batch 1, >= 1.3x at batch 16.
medusa  Medusa heads (v2: one residual layer per head, the model's lm_head) trained on the demo model by
        self-distillation: the model's own greedy continuations of the task prompts are the targets
        (head h at position t learns token t+2+h), a few hundred Adam steps; then the same measurement
        as `ngram` with the heads in MODEL_DIR/medusa (a linked copy of the model directory).

Writes bench/results/<card>-speculative-<date>.json (and $OUT/ when set) after each section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import card_slug, device_name, git_commit, median, time_ms
from bench.spec_data import PASSAGES, TASKS

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


# ---------------------------------------------------------------- n-gram / Medusa speedup (demo model)


def _prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = TASKS[i % len(TASKS)].format(passage=PASSAGES[i % len(PASSAGES)])
        if getattr(tokenizer, "chat_template", None):
            chat = [{"role": "user", "content": text}]
            prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(prompt, add_special_tokens=False).input_ids  # the template has its own BOS
        else:
            ids = tokenizer(text).input_ids
        out.append(list(ids))
    return out


def _engine(model_dir: Path, k: int, dev, smoke: bool):
    from shard_server.config import ShardConfig
    from shard_server.engine.engine import ShardEngine
    from shard_server.types import BatchSpec, RequestSpec, StoppingParams

    cfg = ShardConfig(model_dir=model_dir, device=dev.type, dtype="float32" if smoke else "bfloat16",
                      speculative_tokens=k, max_kv_cache_bytes=(64 << 20) if smoke else None)  # fmt: skip
    engine = ShardEngine(cfg)
    n = 200 if smoke else 1000
    warm = RequestSpec(id=0, input_ids=tuple(3 + i % 300 for i in range(n)), stopping=StoppingParams(8))
    engine.warmup(BatchSpec(id=0, requests=(warm,) * 4), n, 4 * n, 256)
    return engine


def _generate(engine, prompts: list[list[int]], max_new: int) -> tuple[dict[int, list[int]], float, int]:
    """-> (tokens per request, decode seconds (after the prefill step), decode steps)."""
    from shard_server.types import BatchSpec, RequestSpec, StoppingParams

    reqs = tuple(RequestSpec(id=i + 1, input_ids=tuple(p), stopping=StoppingParams(max_new_tokens=max_new))
                 for i, p in enumerate(prompts))  # fmt: skip
    tokens: dict[int, list[int]] = {}

    def take(res):
        for g in res.generations:
            tokens.setdefault(g.request_id, []).extend(g.next_tokens.ids)
        return res.batch

    running = take(engine.prefill(BatchSpec(id=1, requests=reqs)))
    _sync(engine.device)
    t0, steps = time.perf_counter(), 0
    while running is not None:
        running = take(engine.decode([running.id]))
        steps += 1
    _sync(engine.device)
    return tokens, time.perf_counter() - t0, steps


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _speedup_rows(out: dict, model_dir: Path, dev, args, drafter: str) -> None:
    batches = [1, 2] if args.smoke else [1, 16]
    max_new = args.max_new or (16 if args.smoke else 256)
    plain_engine, spec_engine = (
        _engine(model_dir, 0, dev, args.smoke),
        _engine(model_dir, args.k, dev, args.smoke),
    )
    for rows in batches:
        prompts = _prompts(plain_engine.tokenizer, rows)
        _generate(plain_engine, prompts[:1], 8)  # warm the graphs / kernels of both engines
        _generate(spec_engine, prompts[:1], 8)
        plain, t_plain, steps_plain = _generate(plain_engine, prompts, max_new)
        before = spec_engine.speculator.stats()
        spec, t_spec, steps_spec = _generate(spec_engine, prompts, max_new)
        after = spec_engine.speculator.stats()
        drafted, accepted = after["drafted"] - before["drafted"], after["accepted"] - before["accepted"]
        decoded = sum(len(t) - 1 for t in plain.values())
        row = {
            "kind": drafter, "batch": rows, "k": args.k, "max_new_tokens": max_new,
            "plain_tok_s": decoded / t_plain, "spec_tok_s": decoded / t_spec, "speedup": t_plain / t_spec,
            "acceptance": accepted / drafted if drafted else 0.0, "drafted": drafted, "accepted": accepted,
            "tokens_per_step": decoded / steps_spec / rows,
            "plain_steps": steps_plain, "spec_steps": steps_spec,
            "identical_outputs": sum(plain[i] == spec[i] for i in plain), "requests": len(plain),
            "medusa_drafted": after["medusa_drafted"] - before["medusa_drafted"],
        }  # fmt: skip
        _add(out, row)
        if rows == batches[0]:
            sample = plain_engine.tokenizer.decode(plain[1], skip_special_tokens=True)
            out.setdefault("samples", {})[drafter] = sample[:400]


def sec_ngram(args, dev, out: dict) -> None:
    _speedup_rows(out, _model_dir(args), dev, args, "ngram")


def sec_medusa(args, dev, out: dict) -> None:
    """Train v2 heads by self-distillation, write them to a linked copy of the model, measure."""
    from shard_server.tools.medusa_heads import write_medusa_heads

    src = _model_dir(args)
    engine = _engine(src, 0, dev, args.smoke)
    model, tok = engine.model, engine.tokenizer
    prompts = _prompts(tok, 4 if args.smoke else 64)
    t0 = time.perf_counter()
    texts, _, _ = _generate(engine, prompts, args.max_new or (16 if args.smoke else 256))
    seqs = [p + texts[i + 1] for i, p in enumerate(prompts)]
    heads, layers, steps = args.k, 1, 5 if args.smoke else args.medusa_steps
    hidden, targets = _hidden_and_targets(model, seqs, [len(p) for p in prompts], heads)
    h = hidden.shape[1]
    w = torch.zeros(heads, layers, h, h, device=dev, requires_grad=True)  # zero init: heads start as the base
    b = torch.zeros(heads, layers, h, device=dev, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=args.medusa_lr)
    lm = model.lm_head.weight.detach().float()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, hidden.shape[0], (min(512, hidden.shape[0]),), device=dev)
        x = hidden[idx][:, None, :].expand(-1, heads, -1)  # [N, heads, H]
        y = x + torch.nn.functional.silu(
            torch.einsum("nhi,hoi->nho", x, w[:, 0]) + b[:, 0]
        )  # MedusaHeads.draft
        logits = y @ lm.T  # [N, heads, V]
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[idx].flatten(), ignore_index=-1
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out["medusa_training"] = {
        "positions": int(hidden.shape[0]),
        "steps": steps,
        "heads": heads,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "seconds": time.perf_counter() - t0,
    }
    del engine
    work = Path(tempfile.mkdtemp(prefix="medusa-model-"))
    for f in src.iterdir():
        if f.name != "medusa":
            (work / f.name).symlink_to(f.resolve())
    write_medusa_heads(work / "medusa", w.detach().to(model.dtype), b.detach().to(model.dtype))
    try:
        _speedup_rows(out, work, dev, args, "medusa")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@torch.no_grad()
def _hidden_and_targets(model, seqs: list[list[int]], prompt_lens: list[int], heads: int):
    """Final hidden states (after the norm) of every generated position, and for head h the token at
    t+2+h (-1 past the end): [N, H] float32, [N, heads] int64."""
    from model.forward_batch import ForwardBatch, PrefillSeq

    dev = model.device
    hs, ts = [], []
    for seq, n_prompt in zip(seqs, prompt_lens, strict=True):
        ids = torch.tensor(seq, device=dev)
        fb = ForwardBatch.prefill([PrefillSeq(seq, all_logits=True)], device=dev, skip_lm_head=True)
        hidden = fb.run(model, None)  # [len(seq), H]
        start = max(n_prompt - 1, 0)
        pos = torch.arange(start, len(seq), device=dev)
        tgt = torch.stack([pos + 2 + j for j in range(heads)], dim=1)  # [n, heads]
        tgt = torch.where(tgt < len(seq), ids[tgt.clamp(max=len(seq) - 1)], -1)
        hs.append(hidden[start:].float())
        ts.append(tgt)
    return torch.cat(hs), torch.cat(ts)


def _model_dir(args) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    if not args.smoke:
        raise SystemExit("--model-dir DEMO_MODEL_DIR is required (the demo model: real weights)")
    from shard_server.tools.tiny_model import make_tiny_model

    d = Path(tempfile.gettempdir()) / "bench-speculative-tiny"
    if not (d / "config.json").exists():
        make_tiny_model(d)
    return d


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


SECTIONS = {"verify": sec_verify, "ngram": sec_ngram, "medusa": sec_medusa}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="the demo model (real weights)")
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-new", type=int, default=None, help="new tokens per request (default 256)")
    ap.add_argument("--medusa-steps", type=int, default=400)
    ap.add_argument("--medusa-lr", type=float, default=1e-3)
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
