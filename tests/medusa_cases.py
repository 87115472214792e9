"""Medusa heads trained by bench/medusa_train.py against the engine that drafts with them (shared by
tests/unit/test_medusa_training.py and tests/gpu/test_medusa_training_gpu.py).

A tiny random Mistral with its attention output scaled down is mostly a bigram walk: its greedy text is
predictable a few tokens ahead, so heads trained on the engine's own greedy generations learn something.
Heads are trained by the training code (features, train, write_heads into MODEL_DIR/medusa), read back
by an engine with speculation on, and at every greedy verify step the engine must accept exactly the
drafts the training code's heads, on the training code's features, predict there (bench.medusa_train
.chain). Any convention that differs between training and the engine (which hidden state, which future
token a head predicts, norms, the file layout, v1 vs v2, the lm_head, a hidden-state buffer overwritten
before it is read) moves the drafts and breaks the per-step comparison.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from bench.medusa_train import MedusaSettings, chain, features, offline_steps, predictions, train, write_heads
from shard_server.types import BatchSpec, RequestSpec, StoppingParams

MAX_NEW, HEADS = 40, 3


def walk_model(src: Path, dst: Path, scale: float = 0.02) -> Path:
    """A copy of tiny model `src` with every o_proj scaled by `scale`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(dst / "model.safetensors")
    save_file({k: v * scale if k.endswith("o_proj.weight") else v for k, v in w.items()},
              dst / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    return dst


def run(engine, prompts, batch: int = 4):
    """Greedy generation through Prefill/Decode -> (tokens per prompt, per prompt the (g, emitted) of
    each Decode step: g tokens generated before it)."""
    tokens: list[list[int]] = [[] for _ in prompts]
    steps: list[list[tuple[int, int]]] = [[] for _ in prompts]
    for s0 in range(0, len(prompts), batch):
        reqs = tuple(
            RequestSpec(id=j + 1, input_ids=tuple(prompts[j]),
                        stopping=StoppingParams(max_new_tokens=MAX_NEW, ignore_eos_token=True))
            for j in range(s0, min(len(prompts), s0 + batch))
        )  # fmt: skip
        res = engine.prefill(BatchSpec(id=s0 + 1, requests=reqs))
        first = True
        while True:
            for g in res.generations:
                j = g.request_id - 1
                if not first:
                    steps[j].append((len(tokens[j]), len(g.next_tokens.ids)))
                tokens[j].extend(g.next_tokens.ids)
            if res.batch is None:
                break
            res, first = engine.decode([res.batch.id]), False
    return tokens, steps


def train_and_compare(model_dir: Path, engine_for, vocab: int, *, v1: bool, layers: int) -> dict:
    """Train heads on `engine_for(model_dir, 0)`'s greedy outputs into model_dir/medusa, then run
    `engine_for(model_dir, HEADS)` on held-out prompts -> the numbers the callers assert on."""
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 12))] for _ in range(112)]
    train_p, eval_p = prompts[:96], prompts[96:]
    plain = engine_for(model_dir, 0)
    answers, _ = run(plain, prompts, batch=16)
    lm = plain.model.lm_head.weight
    data = features(plain.model, plain.device, train_p, answers[:96], HEADS, 0.1)
    s = MedusaSettings(heads=HEADS, layers=layers, v1=v1, seconds=1e9, max_steps=240, batch_positions=512,
                       eval_every=80, lr=3e-3)  # fmt: skip
    params, report = train(data, lm, s, log=lambda m: None)
    write_heads(model_dir / "medusa", params)
    w, b, out = params
    params = (w, b, None if out is None else out.bfloat16().float())  # as write_heads stores it

    spec = engine_for(model_dir, HEADS)
    base = spec.speculator.medusa.base
    got, steps = run(spec, eval_p)
    # Offline, on the sequences the engine produced (a bf16 near-tie may make one differ from plain).
    ev = features(plain.model, plain.device, eval_p, got, HEADS, 0.0)
    pred = predictions(ev, params, lm)
    right, total = [0] * HEADS, [0] * HEADS
    for seq, a in enumerate(ev.answers):  # the engine's convention, written out: after g generated
        for g in range(1, len(a)):  # tokens, head h (row g-1) proposes generated token g + h
            for h in range(min(HEADS, len(a) - g)):
                assert ev.targets[ev.starts[seq] + g - 1, h] == a[g + h]
                right[h] += int(pred[ev.starts[seq] + g - 1, h] == a[g + h])
                total[h] += 1
    compared = agree = 0
    for seq, row in enumerate(steps):
        for g, emitted in row[1:]:  # a request's first Decode drafts by n-gram (no hidden state yet)
            budget = max(0, min(HEADS, MAX_NEW - g - 1))
            compared += 1
            agree += emitted == min(chain(pred, ev, seq, g, budget) + 1, MAX_NEW - g)
    return {
        "loaded": (base.num_heads, base.out is not None), "equal_to_plain": got == answers[96:],
        "base_top1": (data.base_top1, ev.base_top1),
        "top1": [r / t for r, t in zip(right, total, strict=True)],
        "compared": compared, "agree": agree, "stats": spec.speculator.stats(),
        "offline": offline_steps(pred, ev, HEADS, MAX_NEW), "val_top1": report["best"].get("val_top1"),
        "replayed": getattr(spec.speculator.graphs, "replayed", 0),  # verify CUDA graph replays
    }  # fmt: skip
