"""Medusa heads trained by bench/medusa_train.py, written to MODEL_DIR/medusa and read back by the engine:
the engine's drafts at every greedy verify step are the training code's heads on the training code's
features, so the drafts each step accepts are exactly what the offline heads predict there.

The model is the tiny random Mistral with its attention output scaled down (mostly a bigram walk, so
that greedy text is predictable a few tokens ahead and the heads learn something), trained on the
engine's own greedy generations; the evaluation prompts are held out. Any convention that differs
between training and the engine (which hidden state, which future token a head predicts, norms, the
file layout, v1 vs v2, the lm_head) moves the drafts and fails the per-step comparison.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from bench.medusa_train import MedusaSettings, chain, features, offline_steps, predictions, train, write_heads
from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import BatchSpec, RequestSpec, StoppingParams

MAX_NEW, HEADS, V = 40, 3, 512


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread-pool wake-ups would dominate
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def walk_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with o_proj scaled by 0.02: the next token depends mostly on the current one."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("medusa-train") / "model"
    shutil.copytree(tiny_model_dir, d)
    w = load_file(d / "model.safetensors")
    save_file({k: v * 0.02 if k.endswith("o_proj.weight") else v for k, v in w.items()},
              d / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    return d


def engine_for(model_dir, k: int) -> ShardEngine:
    return ShardEngine(ShardConfig(model_dir=model_dir, max_kv_cache_bytes=1 << 23, speculative_tokens=k))


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


@pytest.mark.parametrize("v1,layers", [(False, 2), (True, 1)], ids=["v2-2layers", "v1-1layer"])
def test_engine_accepts_exactly_what_the_trained_heads_predict(walk_model, tmp_path, v1, layers):
    model_dir = tmp_path / "model"
    shutil.copytree(walk_model, model_dir)
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, V) for _ in range(rng.randrange(4, 12))] for _ in range(112)]
    train_p, eval_p = prompts[:96], prompts[96:]
    plain = engine_for(model_dir, 0)
    answers, _ = run(plain, prompts, batch=16)
    lm = plain.model.lm_head.weight
    data = features(plain.model, plain.device, train_p, answers[:96], HEADS, 0.1)
    assert data.base_top1 == 1.0  # the features are the states that generated the tokens
    s = MedusaSettings(heads=HEADS, layers=layers, v1=v1, seconds=1e9, max_steps=240, batch_positions=512,
                       eval_every=80, lr=3e-3)  # fmt: skip
    params, report = train(data, lm, s, log=lambda m: None)
    write_heads(model_dir / "medusa", params)
    w, b, out = params
    params = (w, b, None if out is None else out.bfloat16().float())  # as written_heads stores it

    ev = features(plain.model, plain.device, eval_p, answers[96:], HEADS, 0.0)
    pred = predictions(ev, params, lm)
    right, total = [0] * HEADS, [0] * HEADS
    for seq, a in enumerate(ev.answers):  # the engine's convention, written out: after g generated
        for g in range(1, len(a)):  # tokens, head h (row g-1) proposes generated token g + h
            for h in range(min(HEADS, len(a) - g)):
                assert ev.targets[ev.starts[seq] + g - 1, h] == a[g + h]
                right[h], total[h] = right[h] + int(pred[ev.starts[seq] + g - 1, h] == a[g + h]), total[h] + 1
    top1 = [r / t for r, t in zip(right, total, strict=True)]
    assert top1[0] > 0.35 and top1[-1] > 0.15, top1  # the heads learned something
    want = offline_steps(pred, ev, HEADS, MAX_NEW)

    spec = engine_for(model_dir, HEADS)
    assert spec.speculator.medusa.base.num_heads == HEADS and (spec.speculator.medusa.base.out is None) != v1
    got, steps = run(spec, eval_p)
    assert got == answers[96:]
    compared = agree = 0
    for seq, row in enumerate(steps):
        for g, emitted in row[1:]:  # a request's first Decode drafts by n-gram (no hidden state yet)
            budget = max(0, min(HEADS, MAX_NEW - g - 1))
            expect = min(chain(pred, ev, seq, g, budget) + 1, MAX_NEW - g)
            compared += 1
            agree += emitted == expect
    assert compared > 100
    assert compared - agree <= max(2, compared // 100), (agree, compared)  # float32: argmax near-ties
    st = spec.speculator.stats()
    assert st["medusa_drafted"] > 0.8 * st["drafted"]
    assert abs(st["acceptance"] - want["acceptance"]) < 0.05, (st, want, top1, report["best"])
