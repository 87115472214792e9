"""The fast verify scoring (generation/verify_fast.py) against the general path of choose_positions.

Bit for bit: targets, logprobs, alternatives, matches, and on the host the accepted counts, emitted
ids, logprobs and alternatives, over several steps of one chooser (the cached plan follows the step
counters and the penalty state), for greedy rows, seeded sampling with every warper, penalties,
watermark, top-k alternatives and all of them mixed in one batch; logits in bfloat16 and as a strided
view (what a verify CUDA graph returns when a step has fewer drafts than the graph's width).
"""

from __future__ import annotations

import random

import pytest
import torch

from shard_server.generation import verify_fast
from shard_server.generation.sampling import NextTokenChooser
from shard_server.generation.speculative import advance_chooser, choose_positions
from shard_server.types import SamplingParams

V = 48

GREEDY = [SamplingParams(), SamplingParams(temperature=0.0, do_sample=True)]
ALTERNATIVES = [
    SamplingParams(return_k_alternatives=3),
    SamplingParams(),
    SamplingParams(return_k_alternatives=1),
]
SAMPLED = [
    SamplingParams(do_sample=True, temperature=0.7, seed=1),
    SamplingParams(do_sample=True, top_k=5, seed=2**64 - 1, return_k_alternatives=2),
    SamplingParams(do_sample=True, top_p=0.8, temperature=1.3, seed=3),
    SamplingParams(do_sample=True, typical_p=0.7, top_k=9, seed=4),
    SamplingParams(),
]
PENALTIES = [
    SamplingParams(repetition_penalty=1.5),
    SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4, return_k_alternatives=2),
    SamplingParams(do_sample=True, seed=8, repetition_penalty=0.8, frequency_penalty=1.1),
    SamplingParams(),
]
WATERMARK = [
    SamplingParams(watermark=True),
    SamplingParams(do_sample=True, seed=6, watermark=True),
    SamplingParams(),
]
# Typical-p with penalties is left to the general path (verify_fast.VerifyPlan.build).
MIXED = GREEDY + ALTERNATIVES + [p for p in SAMPLED if p.typical_p == 1.0] + PENALTIES + WATERMARK
CASES = {"greedy": GREEDY, "alternatives": ALTERNATIVES, "sampled": SAMPLED, "penalties": PENALTIES,
         "watermark": WATERMARK, "mixed": MIXED}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def batch_of(kinds: list[SamplingParams], rows: int, seed: int):
    rng = random.Random(seed)
    params = [kinds[i % len(kinds)] for i in range(rows)]
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(1, 6))] for _ in range(rows)]
    return params, prompts


def host_reference(targets: torch.Tensor, drafts: torch.Tensor, num: list[int]) -> list[int]:
    """Accepted drafts: the leading drafts equal to their targets, at most the row's draft count."""
    out = []
    for t, d, n in zip(targets.tolist(), drafts.tolist(), num, strict=True):
        a = 0
        while a < n and d[a] == t[a]:
            a += 1
        out.append(a)
    return out


def assert_same_tensor(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), what


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["float32", "bfloat16-strided"])
def test_fast_scoring_equals_the_general_path_over_several_steps(case, layout):
    rows = 2 * len(CASES[case]) + 1
    params, prompts = batch_of(CASES[case], rows, seed=len(case))
    fast = NextTokenChooser.from_params(params, prompts, V)
    general = NextTokenChooser.from_params(params, prompts, V)
    g = torch.Generator().manual_seed(7)
    rng = random.Random(3)
    for step, q_len in enumerate([5, 5, 3, 1, 5, 2]):
        raw = torch.randn(rows, 6, V, generator=g) * 3
        raw[:, :, :4] += 4.0  # a few likely tokens: drafts often match, and repeat (penalties bite)
        logits = raw[:, :q_len]
        if layout == "bfloat16-strided":
            logits = raw.to(torch.bfloat16)[:, :q_len]  # a view with the graph's row stride
        # Drafts: the greedy continuation, corrupted at a random place per row (or not at all).
        drafts = logits[:, : q_len - 1].float().argmax(-1)
        for b in range(rows):
            cut = rng.randrange(q_len + 1)
            if cut < q_len - 1:
                drafts[b, cut] = (drafts[b, cut] + 1 + rng.randrange(V - 1)) % V
        num = [rng.randrange(q_len) for _ in range(rows)]

        assert verify_fast.score(fast, logits, drafts) is not None  # the fast path does run
        a = choose_positions(fast, logits, drafts)
        b = choose_positions(general, logits, drafts, fast=False)
        for name in ("targets", "logprobs", "match", "alt_ids", "alt_logprobs"):
            assert_same_tensor(getattr(a, name), getattr(b, name), f"step {step}: {name}")
        assert a.alt_k == b.alt_k
        acc_a, host_a = a.to_host(num)
        acc_b, host_b = b.to_host(num)
        assert acc_a == acc_b == host_reference(b.targets, drafts, num), step
        assert (
            host_a.ids == host_b.ids == [t[: n + 1] for t, n in zip(b.targets.tolist(), acc_b, strict=True)]
        )
        assert host_a.logprobs == host_b.logprobs and host_a.alternatives == host_b.alternatives
        if b.alt_ids is not None:
            expect = [
                [list(zip(b.alt_ids[r, i, :k].tolist(), b.alt_logprobs[r, i, :k].tolist(), strict=True))
                 for i in range(n + 1)]
                for r, (k, n) in enumerate(zip(b.alt_k, acc_b, strict=True))
            ]  # fmt: skip
            assert host_a.alternatives == expect
        else:
            assert host_a.alternatives == [[[]] * (n + 1) for n in acc_b]
        emitted = torch.tensor([n + 1 for n in acc_a])
        advance_chooser(fast, a.targets, emitted)
        advance_chooser(general, b.targets, emitted)
        assert torch.equal(fast.prev_ids, torch.tensor([ids[-1] for ids in host_a.ids]))
        for name in ("step", "prev_ids", "counts", "seen"):
            assert_same_tensor(getattr(fast, name), getattr(general, name), f"step {step}: state {name}")


def test_the_plan_is_built_once_per_chooser_and_width():
    """A step reuses its chooser's plan (no per-step filter); a filtered chooser starts afresh."""
    params, prompts = batch_of(SAMPLED, 6, seed=1)
    chooser = NextTokenChooser.from_params(params, prompts, V)
    logits, drafts = torch.randn(6, 4, V), torch.zeros(6, 3, dtype=torch.int64)
    choose_positions(chooser, logits, drafts)
    plan = verify_fast.plan_for(chooser, 4)
    chooser.step += 3
    first = choose_positions(chooser, logits, drafts)
    assert verify_fast.plan_for(chooser, 4) is plan
    assert torch.equal(plan.expanded.step, (chooser.step[:, None] + torch.arange(4)).view(-1))
    assert verify_fast.plan_for(chooser, 2) is not plan
    kept = chooser.filter([5, 0])
    again = choose_positions(kept, logits[[5, 0]], drafts[[5, 0]])
    assert torch.equal(again.targets, first.targets[[5, 0]]) and torch.equal(
        again.logprobs, first.logprobs[[5, 0]]
    )


def test_advance_chooser_records_each_rows_emitted_prefix_with_repeated_tokens():
    """Counts and seen after advancing rows by 0..Q tokens (tokens repeating inside a row) equal the
    one-token-at-a-time bookkeeping."""
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)] * 6
    prompts = [[1], [2, 3], [4], [5], [0, 0], [7]]
    chooser = NextTokenChooser.from_params(params, prompts, 8)
    counts, seen = chooser.counts.clone(), chooser.seen.clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        targets = torch.randint(0, 3, (6, 5), generator=g)  # 3 tokens over 5 positions: repeats
        emitted = torch.tensor([0, 1, 2, 3, 5, 4])
        advance_chooser(chooser, targets, emitted)
        for b, n in enumerate(emitted.tolist()):
            for t in targets[b, :n].tolist():
                counts[b, t] += 1
                seen[b, t] = True
        assert torch.equal(chooser.counts, counts) and torch.equal(chooser.seen, seen)


def test_typical_p_with_penalties_and_large_penalty_state_are_left_to_the_general_path(monkeypatch):
    logits, drafts = torch.randn(2, 3, V), torch.zeros(2, 2, dtype=torch.int64)
    typical = [SamplingParams(do_sample=True, typical_p=0.8, seed=1), SamplingParams(repetition_penalty=1.2)]
    chooser = NextTokenChooser.from_params(typical, [[1], [2]], V)
    assert verify_fast.score(chooser, logits, drafts) is None
    a, b = choose_positions(chooser, logits, drafts), choose_positions(chooser, logits, drafts, fast=False)
    assert torch.equal(a.targets, b.targets) and torch.equal(a.logprobs, b.logprobs)
    monkeypatch.setattr(verify_fast, "MAX_STATEFUL_ELEMENTS", 2 * 3 * V - 1)  # [B*Q, V] is one too many
    penalties = NextTokenChooser.from_params([SamplingParams(frequency_penalty=0.5)] * 2, [[1], [2]], V)
    assert verify_fast.score(penalties, logits, drafts) is None
    watermark = NextTokenChooser.from_params([SamplingParams(watermark=True)] * 2, [[1], [2]], V)
    assert verify_fast.score(watermark, logits, drafts) is not None  # no [B*Q, V] state


def test_to_host_keeps_large_ids_exact_and_cuts_at_the_draft_count():
    """Packed as float64, ids up to 2**53 survive; acceptance is the leading matches, capped."""
    from shard_server.generation.speculative import VerifySample

    big = 2**40 + 1
    targets = torch.tensor([[big, big + 2, 7], [5, 6, 7], [1, 2, 3]])
    match = torch.tensor([[True, True], [True, False], [False, True]])
    logprobs = torch.tensor([[-0.5, -1.5, -2.5], [-0.25, -0.75, -1.0], [-3.0, -2.0, -1.0]])
    sample = VerifySample(targets, logprobs, match)
    accepted, host = sample.to_host([1, 2, 2])
    assert accepted == [1, 1, 0]
    assert host.ids == [[big, big + 2], [5, 6], [1]]
    assert host.logprobs == [[-0.5, -1.5], [-0.25, -0.75], [-3.0]]
    assert host.alternatives == [[[], []], [[], []], [[]]]


def test_bench_verify_host_runs_and_finds_both_paths_equal(monkeypatch, tmp_path, capsys):
    """bench/verify_host.py's scoring section (tiny sizes): it runs, and its exactness check holds."""
    import json
    import sys

    from bench import verify_host

    out = tmp_path / "rows.json"
    argv = [
        "verify_host",
        "--device",
        "cpu",
        "--vocab",
        "32",
        "--batches",
        "3",
        "--reps",
        "2",
        "--out",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    verify_host.main()
    rows = json.loads(out.read_text())
    assert {r["mix"] for r in rows} == set(verify_host.MIXES) and all(r["same"] for r in rows)
    assert all(r["verify_kernels"] < r["before_kernels"] for r in rows)
    assert "MISMATCH" not in capsys.readouterr().out
