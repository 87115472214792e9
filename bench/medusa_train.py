"""Medusa heads for a model by self-distillation on its own greedy generations (minutes on one GPU).

    python -m bench.medusa_train --model-dir DIR [--out DIR/medusa] [--heads 4] [--seconds 60]

Data: the model writes passages on TOPICS (spec_data.PASSAGE_REQUESTS), then answers the DEMO_TASKS
(copy, correct the spelling, extract, repeat and summarize) over them, greedily, through the shard's
engine. The evaluation passages of bench/speculative_demo.py (spec_data.PASSAGES) are never trained on.
One prefill forward per group of sequences gives the final hidden states x_t (after the norm).

Heads (the Medusa/LoRAX format that model/adapters/medusa.py reads): head h sees x_t and learns token
t+2+h of the greedy sequence, which is the model's own argmax there: exactly the token a greedy verify
step accepts. Only generated positions are trained on (prompt tokens are not the model's choices).

    y = x_t; for l < L: y = y + silu(W[h, l] y + b[h, l])        (W, b start at zero: head = lm_head)
    v2 (default): logits_h = lm_head(y)      v1: logits_h = out[h] y   (out[h] starts as lm_head)

Adam on the cross entropy of all heads; the validation split (the last sequences) is scored every
`eval_every` steps and the best heads kept. Reports per-head top-1 accuracy on it and the tokens per
step a greedy verify would gain, 1 + sum_h P(heads 0..h all right).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.spec_data import PASSAGE_REQUESTS, TOPICS, demo_task_text
from bench.spec_engine import EngineSettings, chat_ids, generate, with_engine


@dataclass(frozen=True)
class MedusaSettings:
    heads: int = 4
    layers: int = 1
    v1: bool = False  # heads with their own LM head (v1) instead of the model's (v2)
    topics: int = 64  # passages written per PASSAGE_REQUESTS entry (at most len(TOPICS))
    tasks_per_passage: int = 4
    passage_tokens: int = 160
    max_new: int = 192
    gen_batch: int = 64
    seconds: float = 60.0  # training time bound
    max_steps: int = 4000
    batch_positions: int = 2048
    lr: float = 1e-3
    eval_every: int = 200
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class Dataset:
    hidden: torch.Tensor  # [N, H] float32: x_t of every generated position
    targets: torch.Tensor  # [N, heads] int64: token t+2+h, -1 past the sequence's end
    val_from: int  # rows >= val_from belong to the validation sequences
    sequences: int
    gen_seconds: float


def training_prompts(tokenizer, engine, s: MedusaSettings
                     ) -> tuple[list[list[int]], list[list[int]], list[int], float]:  # fmt: skip
    """-> (prompts, their greedy answers, the passage of each, seconds): passages the model writes, then
    tasks over them."""
    t0 = time.perf_counter()
    asks = [chat_ids(tokenizer, r.format(topic=t)) for t in TOPICS[: s.topics] for r in PASSAGE_REQUESTS]
    written = generate(engine, asks, s.passage_tokens, s.gen_batch).tokens
    passages = [tokenizer.decode(w, skip_special_tokens=True).strip() for w in written]
    tasks = [chat_ids(tokenizer, demo_task_text(i + j, p))
             for i, p in enumerate(passages) if p for j in range(s.tasks_per_passage)]  # fmt: skip
    answers = generate(engine, tasks, s.max_new, s.gen_batch).tokens
    # One passage's sequences together (its writing, then its tasks), so that a validation split at the
    # end holds out whole passages: the tasks copy their passage, which heads trained on the passage's
    # own writing would otherwise have seen.
    prompts, outputs, passage_of, k = [], [], [], 0
    for i, p in enumerate(passages):
        n = s.tasks_per_passage if p else 0
        prompts += [asks[i], *tasks[k : k + n]]
        outputs += [written[i], *answers[k : k + n]]
        passage_of += [i] * (1 + n)
        k += n
    return prompts, outputs, passage_of, time.perf_counter() - t0


@torch.no_grad()
def collect(engine, s: MedusaSettings) -> Dataset:
    """Generate the training sequences with `engine` and read the hidden states of its model."""
    from model.forward_batch import ForwardBatch, PrefillSeq

    prompts, answers, passage_of, gen_s = training_prompts(engine.tokenizer, engine, s)
    kept = [(p, a, i) for p, a, i in zip(prompts, answers, passage_of, strict=True) if len(a) >= 2]
    seqs = [(p, a) for p, a, _ in kept]
    model, dev = engine.model, engine.device
    hs, ts, val_from = [], [], None
    n_val = max(1, int(len(seqs) * s.val_fraction)) if len(seqs) > 1 else 0
    # Move the split back to the first sequence of its passage: no passage on both sides of it.
    while 0 < n_val < len(seqs) - 1 and kept[-n_val - 1][2] == kept[-n_val][2]:
        n_val += 1
    group: list[tuple[list[int], list[int]]] = []

    def flush() -> None:
        fb = ForwardBatch.prefill([PrefillSeq(p + a, all_logits=True) for p, a in group], device=dev,
                                  skip_lm_head=True)  # fmt: skip
        hidden = fb.run(model, None)  # [sum of lengths, H]
        off = 0
        for p, a in group:
            n = len(p) + len(a)
            ids = torch.tensor(p + a, device=dev)
            pos = torch.arange(len(p) - 1, n, device=dev)  # x_t for t = last prompt token .. end
            tgt = pos[:, None] + 2 + torch.arange(s.heads, device=dev)[None, :]  # [n', heads]
            ts.append(torch.where(tgt < n, ids[tgt.clamp(max=n - 1)], -1))
            hs.append(hidden[off + pos].float())
            off += n
        group.clear()

    for i, seq in enumerate(seqs):
        if i == len(seqs) - n_val:
            if group:
                flush()
            val_from = sum(h.shape[0] for h in hs)
        group.append(seq)
        if sum(len(p) + len(a) for p, a in group) >= 16384:
            flush()
    if group:
        flush()
    hidden = torch.cat(hs)
    return Dataset(hidden, torch.cat(ts), hidden.shape[0] if val_from is None else val_from, len(seqs),
                   gen_s)  # fmt: skip


def _heads_forward(x, w, b, out, lm):
    """x [N, H] -> logits [N, heads, V] (MedusaHeads.draft's math, differentiable)."""
    y = x[:, None, :].expand(-1, w.shape[0], -1)  # [N, heads, H]
    for layer in range(w.shape[1]):
        y = y + torch.nn.functional.silu(torch.einsum("nhi,hoi->nho", y, w[:, layer]) + b[:, layer])
    if out is not None:
        return torch.einsum("nhi,hvi->nhv", y, out)
    return y @ lm.T


def _loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


@torch.no_grad()
def _evaluate(data: Dataset, params, lm, rows: int) -> dict:
    """Validation loss, per-head top-1 accuracy, tokens per greedy verify step (chained heads)."""
    w, b, out = params
    x, t = data.hidden[data.val_from :], data.targets[data.val_from :]
    if not x.shape[0]:
        return {}
    losses, right = [], []
    for i in range(0, x.shape[0], rows):
        logits = _heads_forward(x[i : i + rows], w, b, out, lm)
        losses.append(_loss(logits, t[i : i + rows]) * (t[i : i + rows] >= 0).sum())
        right.append((logits.argmax(-1) == t[i : i + rows]) | (t[i : i + rows] < 0))
    ok = torch.cat(right)  # [n, heads]; past the end counts as right (the step stops there anyway)
    valid = (t >= 0).float()
    acc = ((ok & (t >= 0)).float().sum(0) / valid.sum(0).clamp(min=1)).tolist()
    chain = torch.cumprod(ok.float(), dim=1)  # heads 0..h all right
    return {"val_loss": float(sum(losses) / valid.sum().clamp(min=1)), "val_top1": acc,
            "val_tokens_per_step": 1.0 + float(chain.sum(1).mean())}  # fmt: skip


def train(data: Dataset, lm_weight: torch.Tensor, s: MedusaSettings, log=print):
    """-> ((w, b, out or None) float32, report): Adam with the best validation loss kept."""
    dev, h = data.hidden.device, data.hidden.shape[1]
    gen = torch.Generator(device=dev).manual_seed(s.seed)
    lm = lm_weight.detach().float()
    w = torch.zeros(s.heads, s.layers, h, h, device=dev, requires_grad=True)
    b = torch.zeros(s.heads, s.layers, h, device=dev, requires_grad=True)
    out = lm[None].repeat(s.heads, 1, 1).requires_grad_(True) if s.v1 else None
    opt = torch.optim.Adam([p for p in (w, b, out) if p is not None], lr=s.lr)
    n_train = data.val_from
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # training only; restored below
    t0, step, history = time.perf_counter(), 0, []
    best = {"val_loss": float("inf")}
    best_params = None
    try:
        while step < s.max_steps and time.perf_counter() - t0 < s.seconds and n_train:
            idx = torch.randint(0, n_train, (min(s.batch_positions, n_train),), device=dev, generator=gen)
            loss = _loss(_heads_forward(data.hidden[idx], w, b, out, lm), data.targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % s.eval_every == 0 or step == s.max_steps:
                ev = _evaluate(data, (w, b, out), lm, s.batch_positions)
                history.append({"step": step, "train_loss": loss.item(), **ev,
                                "seconds": time.perf_counter() - t0})  # fmt: skip
                log(f"medusa step {step}: " + ", ".join(f"{k} {v}" for k, v in history[-1].items()))
                if ev and ev["val_loss"] < best["val_loss"]:
                    best = {**ev, "step": step}
                    best_params = tuple(None if p is None else p.detach().clone() for p in (w, b, out))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    final = tuple(None if p is None else p.detach() for p in (w, b, out))
    if best_params is None:  # no validation split or no evaluation yet: the last heads
        best = {**_evaluate(data, final, lm, s.batch_positions), "step": step}
        best_params = final
    report = {"positions": int(data.hidden.shape[0]), "val_positions": int(data.hidden.shape[0] - n_train),
              "sequences": data.sequences, "generation_seconds": data.gen_seconds, "steps": step,
              "train_seconds": time.perf_counter() - t0, "best": best, "history": history,
              "settings": asdict(s)}  # fmt: skip
    return best_params, report


def write_heads(out_dir: Path, params) -> Path:
    from shard_server.tools.medusa_heads import write_medusa_heads

    w, b, out = params
    return write_medusa_heads(out_dir, w.float(), b.float(), None if out is None else out.bfloat16())


def train_medusa(engine, out_dir: Path, s: MedusaSettings, log=print) -> dict:
    """Collect with `engine` (no speculation), train, write the heads to `out_dir`; -> the report."""
    data = collect(engine, s)
    log(f"medusa data: {data.sequences} sequences, {data.hidden.shape[0]} positions "
        f"({data.gen_seconds:.1f} s to generate)")  # fmt: skip
    params, report = train(data, engine.model.lm_head.weight, s, log)
    write_heads(out_dir, params)
    report["out_dir"] = str(out_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", default=None, help="where the heads go (default MODEL_DIR/medusa)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--heads", type=int, default=MedusaSettings.heads)
    ap.add_argument("--layers", type=int, default=MedusaSettings.layers)
    ap.add_argument("--v1", action="store_true", help="heads with their own LM head")
    ap.add_argument("--topics", type=int, default=MedusaSettings.topics)
    ap.add_argument("--max-new-tokens", type=int, default=MedusaSettings.max_new)
    ap.add_argument("--seconds", type=float, default=MedusaSettings.seconds)
    ap.add_argument("--steps", type=int, default=MedusaSettings.max_steps)
    ap.add_argument("--lr", type=float, default=MedusaSettings.lr)
    args = ap.parse_args(argv)
    s = MedusaSettings(heads=args.heads, layers=args.layers, v1=args.v1, topics=args.topics,
                       max_new=args.max_new_tokens, seconds=args.seconds, max_steps=args.steps, lr=args.lr)
    cuda = args.device == "cuda"
    es = EngineSettings(device=args.device, dtype="bfloat16" if cuda else "float32", max_batch=s.gen_batch,
                        max_input=768, max_new=max(s.max_new, s.passage_tokens))  # fmt: skip
    out = Path(args.out) if args.out else Path(args.model_dir) / "medusa"
    report = with_engine(Path(args.model_dir), 0, es, lambda e: train_medusa(e, out, s))
    print({k: v for k, v in report.items() if k not in ("history", "settings")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
