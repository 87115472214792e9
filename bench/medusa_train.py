"""Medusa heads for a model by self-distillation on its own greedy generations (minutes on one GPU).

    python -m bench.medusa_train --model-dir DIR [--out DIR/medusa] [--heads 4] [--seconds 60]

Data: the model writes passages on TOPICS (spec_data.PASSAGE_REQUESTS; greedy, and `sampled_passages`
more sampled), then answers the DEMO_TASKS (copy, correct the spelling, extract, repeat and summarize)
over them, greedily, through the shard's engine. The evaluation passages of bench/speculative_demo.py
(spec_data.PASSAGES) are never trained on. One prefill forward per group of sequences gives the final
hidden states x_t (after the norm).

Heads (the Medusa/LoRAX format that model/adapters/medusa.py reads): head h sees x_t and learns token
t+2+h of the greedy sequence, which is the model's own argmax there: exactly the token a greedy verify
step accepts. Only generated positions are trained on (prompt tokens are not the model's choices).

    y = x_t; for l < L: y = y + silu(W[h, l] y + b[h, l])        (W, b start at zero: head = lm_head)
    v2 (default): logits_h = lm_head(y)      v1: logits_h = out[h] y   (out[h] starts as lm_head)

Adam on the cross entropy of all heads, cosine learning rate; the validation split (the last topics,
whole) is scored every `eval_every` steps and the heads with the most tokens per step kept. Reports
per-head top-1 accuracy on it and the tokens per step a greedy verify would gain at a random position,
1 + sum_h P(heads 0..h all right); a speculative decode gains less (steps start where the previous
step's drafts failed, harder positions than average): `offline_steps` simulates it exactly.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
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
    sampled_passages: int = 3  # passages sampled per topic and request beyond the greedy one
    temperature: float = 0.8  # of the sampled passages
    tasks_per_passage: int = 4
    passage_tokens: int = 160
    max_new: int = 192
    gen_batch: int = 64
    seconds: float = 120.0  # training time bound
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
    starts: list[int] = field(default_factory=list)  # first row of each kept sequence (row g-1: x_t
    # under generated token g-1, whose heads propose generated tokens g, g+1, ...)
    answers: list[list[int]] = field(default_factory=list)  # the kept sequences' generated tokens
    base_top1: float = 0.0  # how often lm_head(x_t) is token t+1: 1 when x_t are the generating states


def training_prompts(tokenizer, engine, s: MedusaSettings
                     ) -> tuple[list[list[int]], list[list[int]], list[int], float]:  # fmt: skip
    """-> (prompts, their greedy answers, the topic of each, seconds): passages the model writes (greedy,
    and `sampled_passages` more per request, sampled), then the tasks over them, answered greedily."""
    from shard_server.types import SamplingParams

    t0 = time.perf_counter()
    topics = TOPICS[: s.topics]
    asks = [chat_ids(tokenizer, r.format(topic=t)) for t in topics for r in PASSAGE_REQUESTS]
    written = [generate(engine, asks, s.passage_tokens, s.gen_batch).tokens]
    for j in range(s.sampled_passages):  # more passages to copy: the tasks' answers are most of the data
        sampling = SamplingParams(do_sample=True, temperature=s.temperature, seed=1 + j)
        written.append(generate(engine, asks, s.passage_tokens, s.gen_batch, sampling=sampling).tokens)
    # Per ask: its greedy passage, then its sampled ones; (ask, passage) pairs in that order.
    written_by = [(i, w[i]) for i in range(len(asks)) for w in written]
    passages = [tokenizer.decode(w, skip_special_tokens=True).strip() for _, w in written_by]
    tasks = [chat_ids(tokenizer, demo_task_text(i + j, p))
             for i, p in enumerate(passages) if p for j in range(s.tasks_per_passage)]  # fmt: skip
    answers = generate(engine, tasks, s.max_new, s.gen_batch).tokens
    # One topic's sequences together (its writings, then their tasks), so that a validation split at the
    # end holds out whole topics: the tasks copy their passage, which heads trained on the passage's own
    # writing would otherwise have seen, and passages on one topic share their facts. A sampled writing
    # is not the model's greedy choice: only its tasks are trained on.
    prompts, outputs, topic_of, k = [], [], [], 0
    for n_written, ((i, w), p) in enumerate(zip(written_by, passages, strict=True)):
        n = s.tasks_per_passage if p else 0
        greedy = n_written % len(written) == 0
        prompts += [asks[i]] * greedy + tasks[k : k + n]
        outputs += [w] * greedy + answers[k : k + n]
        topic_of += [i // len(PASSAGE_REQUESTS)] * (greedy + n)
        k += n
    return prompts, outputs, topic_of, time.perf_counter() - t0


@torch.no_grad()
def collect(engine, s: MedusaSettings) -> Dataset:
    """Generate the training sequences with `engine` and read the hidden states of its model."""
    prompts, answers, topic_of, gen_s = training_prompts(engine.tokenizer, engine, s)
    return features(engine.model, engine.device, prompts, answers, s.heads, s.val_fraction, topic_of,
                    gen_s)  # fmt: skip


@torch.no_grad()
def features(model, dev, prompts: list[list[int]], answers: list[list[int]], heads: int,
             val_fraction: float, groups: list[int] | None = None, gen_s: float = 0.0
             ) -> Dataset:  # fmt: skip
    """The dataset of (prompt, greedy answer) pairs: x_t of every generated position and its targets
    t+2+h; the last `val_fraction` of the sequences (whole `groups`, e.g. passages) is the validation."""
    from model.forward_batch import ForwardBatch, PrefillSeq

    groups = groups if groups is not None else list(range(len(prompts)))
    kept = [(p, a, i) for p, a, i in zip(prompts, answers, groups, strict=True) if len(a) >= 2]
    seqs = [(p, a) for p, a, _ in kept]
    hs, ts, val_from, starts, base_right = [], [], None, [], []
    n_val = max(1, int(len(seqs) * val_fraction)) if len(seqs) > 1 and val_fraction > 0 else 0
    # Move the split back to the first sequence of its group: no group on both sides of it.
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
            tgt = pos[:, None] + 2 + torch.arange(heads, device=dev)[None, :]  # [n', heads]
            ts.append(torch.where(tgt < n, ids[tgt.clamp(max=n - 1)], -1))
            starts.append(sum(h.shape[0] for h in hs))
            hs.append(hidden[off + pos].float())
            nxt = model.lm_head(hidden[off + pos[:-1]]).argmax(-1)  # greedy: the next token itself
            base_right.append((nxt == ids[pos[:-1] + 1]).float().sum())
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
    base = float(sum(base_right)) / max(1, sum(len(a) for _, a in seqs))
    return Dataset(hidden, torch.cat(ts), hidden.shape[0] if val_from is None else val_from, len(seqs),
                   gen_s, starts, [a for _, a in seqs], base)  # fmt: skip


@torch.no_grad()
def predictions(data: Dataset, params, lm: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """The heads' drafts at every row of `data`: argmax [N, heads] (MedusaHeads.draft offline)."""
    w, b, out = params
    lm = lm.float()
    return torch.cat([_heads_forward(data.hidden[i : i + rows], w, b, out, lm).argmax(-1)
                      for i in range(0, data.hidden.shape[0], rows)])  # fmt: skip


def chain(pred: torch.Tensor, data: Dataset, seq: int, g: int, budget: int) -> int:
    """Drafts a greedy verify step accepts for kept sequence `seq` after its first g generated tokens:
    the heads' drafts from row g-1 that match generated tokens g, g+1, ... (at most `budget`)."""
    answer, row = data.answers[seq], pred[data.starts[seq] + g - 1].tolist()
    n = 0
    while n < min(budget, len(row)) and g + n < len(answer) and row[n] == answer[g + n]:
        n += 1
    return n


def offline_steps(pred: torch.Tensor, data: Dataset, k: int, max_new: int) -> dict:
    """The greedy speculative decode of `data`'s sequences with these drafts at every step, simulated:
    what an engine drafting with the same heads must measure (its first step drafts by n-gram lookup
    instead, and bf16 moves a few drafts)."""
    steps = drafted = accepted = emitted = 0
    for seq, answer in enumerate(data.answers):
        g = 1  # the first token comes from the prefill
        while g < len(answer):
            budget = max(0, min(k, max_new - g - 1))
            n = chain(pred, data, seq, g, budget)
            steps, drafted, accepted = steps + 1, drafted + budget, accepted + n
            emitted += min(n + 1, len(answer) - g)
            g += n + 1
    return {"steps": steps, "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else None,
            "tokens_per_step": emitted / steps if steps else 0.0}  # fmt: skip


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
    """-> ((w, b, out or None) float32, report): Adam; the heads of the evaluation with the most validation
    tokens per step are kept (what speculation gains; the loss keeps falling, or rising, past it when the
    heads grow over- or under-confident)."""
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
    best = {"val_tokens_per_step": 0.0}
    best_params = None
    try:
        while step < s.max_steps and time.perf_counter() - t0 < s.seconds and n_train:
            # cosine decay over the run, whichever bound (steps or seconds) ends it
            done = min(1.0, max(step / s.max_steps, (time.perf_counter() - t0) / s.seconds))
            for group in opt.param_groups:
                group["lr"] = s.lr * 0.5 * (1.0 + math.cos(math.pi * done))
            idx = torch.randint(0, n_train, (min(s.batch_positions, n_train),), device=dev, generator=gen)
            loss = _loss(_heads_forward(data.hidden[idx], w, b, out, lm), data.targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last = step == s.max_steps or time.perf_counter() - t0 >= s.seconds
            if step % s.eval_every == 0 or last:
                ev = _evaluate(data, (w, b, out), lm, s.batch_positions)
                history.append({"step": step, "train_loss": loss.item(), **ev,
                                "seconds": time.perf_counter() - t0})  # fmt: skip
                log(f"medusa step {step}: " + ", ".join(f"{k} {v}" for k, v in history[-1].items()))
                if ev and ev["val_tokens_per_step"] > best["val_tokens_per_step"]:
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


def train_medusa(engine, out_dir: Path, s: MedusaSettings, log=print, evaluation=None) -> dict:
    """Collect with `engine` (no speculation), train, write the heads to `out_dir`; -> the report.
    `evaluation`: (prompts, their greedy answers from `engine`, max_new_tokens) of the benchmark: the
    report's "eval" says what a greedy Medusa engine must measure on them (evaluate_heads)."""
    data = collect(engine, s)
    log(f"medusa data: {data.sequences} sequences, {data.hidden.shape[0]} positions "
        f"({data.gen_seconds:.1f} s to generate), base top-1 {data.base_top1:.4f}")  # fmt: skip
    lm = engine.model.lm_head.weight
    params, report = train(data, lm, s, log)
    report["base_top1"] = data.base_top1
    del data
    write_heads(out_dir, params)
    report["out_dir"] = str(out_dir)
    if evaluation is not None:
        prompts, answers, max_new = evaluation
        report["eval"] = evaluate_heads(engine, prompts, answers, params, max_new)
        log(f"medusa on the evaluation's plain outputs: {report['eval']}")
    return report


def evaluate_heads(engine, prompts, answers, params, max_new: int) -> dict:
    """The heads offline on greedy sequences of `engine`: top-1 per head at every position, and the
    simulated greedy speculative decode (offline_steps) whose acceptance and tokens per step an engine
    drafting with these heads must reproduce (up to its n-gram first step and bf16 near-ties)."""
    w, b, out = params
    heads = w.shape[0]
    written = (w, b, None if out is None else out.bfloat16().float())  # as write_heads stores them
    ev = features(engine.model, engine.device, prompts, answers, heads, 0.0)
    pred = predictions(ev, written, engine.model.lm_head.weight)
    valid = ev.targets >= 0
    top1 = ((pred == ev.targets) & valid).float().sum(0) / valid.float().sum(0).clamp(min=1)
    return {"top1": [round(float(x), 4) for x in top1], "base_top1": ev.base_top1,
            **offline_steps(pred, ev, heads, max_new)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", default=None, help="where the heads go (default MODEL_DIR/medusa)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--heads", type=int, default=MedusaSettings.heads)
    ap.add_argument("--layers", type=int, default=MedusaSettings.layers)
    ap.add_argument("--v1", action="store_true", help="heads with their own LM head")
    ap.add_argument("--topics", type=int, default=MedusaSettings.topics)
    ap.add_argument("--sampled-passages", type=int, default=MedusaSettings.sampled_passages)
    ap.add_argument("--max-new-tokens", type=int, default=MedusaSettings.max_new)
    ap.add_argument("--seconds", type=float, default=MedusaSettings.seconds)
    ap.add_argument("--steps", type=int, default=MedusaSettings.max_steps)
    ap.add_argument("--lr", type=float, default=MedusaSettings.lr)
    args = ap.parse_args(argv)
    s = MedusaSettings(heads=args.heads, layers=args.layers, v1=args.v1, topics=args.topics,
                       sampled_passages=args.sampled_passages,
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
