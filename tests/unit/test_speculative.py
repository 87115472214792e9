"""Speculative acceptance (generation/speculative.py) and n-gram drafts (engine/speculative/drafts.py),
on tensors.

The acceptance rule scores position i of a row as one-token decoding would score the token after the
row's first i drafts, and accepts drafts while they equal those targets. Checked here against a plain
step-by-step chooser (greedy and seeded sampling, with penalties and watermark), and statistically: the
joint distribution of the first two emitted tokens over many seeds is the non-speculative one
(chi-square on an 8-token vocabulary, enough samples to see a 2% bias).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from shard_server.engine.speculative.drafts import NgramIndex, draft_budget
from shard_server.generation.sampling import NextTokenChooser
from shard_server.generation.speculative import advance_chooser, choose_positions
from shard_server.types import SamplingParams

V = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def logits_fn(prefix_token: torch.Tensor, pos: int) -> torch.Tensor:
    """A fixed 'model': logits [B, V] that depend on the previous token and the position."""
    g = torch.Generator().manual_seed(1000 + pos)
    table = torch.randn(V, V, generator=g) * 1.5  # [prev, next]
    return table[prefix_token]


WITH_STATE = [  # penalties and watermark: position i's scores depend on the drafts before it
    SamplingParams(),  # greedy
    SamplingParams(repetition_penalty=1.7, frequency_penalty=0.4),  # greedy with penalties
    SamplingParams(do_sample=True, temperature=0.9, seed=11, presence_penalty=0.6),
    SamplingParams(do_sample=True, top_k=5, top_p=0.9, seed=2**64 - 3, watermark=True),
    SamplingParams(do_sample=True, temperature=1.3, typical_p=0.8, seed=5, repetition_penalty=1.3),
]
STATELESS = [  # no history dependence but the noise's step counter: scored in one pass
    SamplingParams(return_k_alternatives=3),
    SamplingParams(do_sample=True, temperature=0.9, seed=11),
    SamplingParams(do_sample=True, top_k=5, top_p=0.9, seed=2**64 - 3, return_k_alternatives=2),
    SamplingParams(do_sample=True, temperature=1.3, typical_p=0.8, seed=5),
    SamplingParams(do_sample=True, top_k=3, seed=9),
]


@pytest.mark.parametrize("params", [WITH_STATE, STATELESS], ids=["with-state", "stateless"])
def test_targets_equal_step_by_step_choices_and_state_advances_the_same(params):
    """For every row: targets at positions 0..Q-1 (drafts as history) == the tokens a step-by-step
    chooser picks when fed those drafts; after advancing by the emitted count the chooser state equals
    the step-by-step chooser's."""
    PARAMS = params  # noqa: N806
    prompts = [[1, 2, 3], [4, 4], [5], [6, 7, 1, 2], [3]]
    q_len = 4
    rng = random.Random(0)
    drafts = torch.tensor([[rng.randrange(V) for _ in range(q_len - 1)] for _ in PARAMS])
    prev = torch.tensor([p[-1] for p in prompts])
    history = torch.cat([prev[:, None], drafts], dim=1)  # token fed at each position
    logits = torch.stack([logits_fn(history[:, i], i) for i in range(q_len)], dim=1)  # [B, Q, V]

    spec = NextTokenChooser.from_params(PARAMS, prompts, V)
    sample = choose_positions(spec, logits, drafts)
    plain = NextTokenChooser.from_params(PARAMS, prompts, V)
    for i in range(q_len):
        out = plain.choose(logits[:, i])
        assert torch.equal(sample.targets[:, i], out.next_ids), i
        torch.testing.assert_close(sample.logprobs[:, i], out.logprobs)
        if out.alt_ids is not None:
            assert torch.equal(sample.alt_ids[:, i], out.alt_ids) and sample.alt_k == out.alt_k
        if i + 1 < q_len:
            plain.update(drafts[:, i])  # the step-by-step chooser is fed the drafts
    # Advance by 2 emitted tokens per row (drafts[0], then the target at position 1): same state as a
    # chooser that was fed exactly those two tokens.
    emitted = torch.full((len(PARAMS),), 2)
    fed = torch.stack([drafts[:, 0], sample.targets[:, 1]], dim=1)
    sample.targets[:, 0] = drafts[:, 0]
    advance_chooser(spec, sample.targets, emitted)
    ref = NextTokenChooser.from_params(PARAMS, prompts, V)
    ref.update(fed[:, 0])
    ref.update(fed[:, 1])
    for name in ("step", "prev_ids", "counts", "seen"):
        a, b = getattr(spec, name), getattr(ref, name)
        assert (a is None and b is None) or torch.equal(a, b), name


def test_accepted_prefix_stops_at_first_mismatch_and_at_draft_count():
    params = [SamplingParams()] * 3
    chooser = NextTokenChooser.from_params(params, [[1], [1], [1]], V)
    logits = torch.full((3, 4, V), -5.0)
    logits[:, :, 3] = 5.0  # the target is token 3 everywhere
    drafts = torch.tensor([[3, 3, 3], [3, 1, 3], [3, 3, 3]])
    accepted, host = choose_positions(chooser, logits, drafts).to_host([3, 3, 1])
    assert accepted == [3, 1, 1]
    assert host.ids == [[3, 3, 3, 3], [3, 3], [3, 3]]
    assert all(len(lp) == len(ids) for lp, ids in zip(host.logprobs, host.ids, strict=True))


def _chi_square_p(observed: list[int], expected: list[float]) -> float:
    """Upper-tail p-value of Pearson's statistic (Wilson-Hilferty approximation; cells with E >= 5)."""
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    k = len(observed) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("bias,freq", [(0.0, 0.5), (0.02, 0.5), (0.0, 0.0)])
def test_two_token_distribution_matches_non_speculative(bias, freq):
    """N seeds sample two tokens speculatively (draft d for token 1, then target or next step for token
    2); the (t1, t2) histogram matches p(t1) p(t2 | t1) of the sampler's own distribution. A sampler
    that moves 2% of token 1's mass onto the draft is rejected (p-value tiny), so the test has power."""
    n = 40_000
    params = [SamplingParams(do_sample=True, seed=s, frequency_penalty=freq) for s in range(n)]
    prompt_token = 2
    draft = 5
    chooser = NextTokenChooser.from_params(params, [[prompt_token]] * n, V)
    first = logits_fn(torch.full((n,), prompt_token), 0)  # [n, V]
    second_after_draft = logits_fn(torch.full((n,), draft), 1)
    logits = torch.stack([first, second_after_draft], dim=1)
    drafts = torch.full((n, 1), draft)
    sample = choose_positions(chooser, logits, drafts)
    accepted, host = sample.to_host([1] * n)
    t1 = torch.tensor([ids[0] for ids in host.ids])
    if bias:  # a wrong sampler: extra mass on the draft
        flip = torch.rand(n, generator=torch.Generator().manual_seed(9)) < bias
        t1 = torch.where(flip, torch.full_like(t1, draft), t1)
    # Rows that rejected the draft get token 2 from a plain next step, as the engine would.
    emitted = torch.tensor([len(ids) for ids in host.ids])
    targets = sample.targets.clone()
    targets[:, 0] = t1
    advance_chooser(chooser, targets, torch.ones(n, dtype=torch.int64))
    nxt = chooser.choose(logits_fn(t1, 1)).next_ids
    t2 = torch.where(emitted == 2, sample.targets[:, 1], nxt) if not bias else nxt
    observed = torch.bincount(t1 * V + t2, minlength=V * V).tolist()
    # The exact distribution of the sampler (temperature 1, frequency penalty on generated tokens).
    p1 = first[0].softmax(-1)
    expected = []
    for a in range(V):
        second = logits_fn(torch.tensor([a]), 1)[0] - freq * torch.nn.functional.one_hot(torch.tensor(a), V)
        p2 = second.softmax(-1)
        expected += (n * p1[a] * p2).tolist()
    keep = [i for i, e in enumerate(expected) if e >= 5]
    p = _chi_square_p([observed[i] for i in keep], [expected[i] for i in keep])
    if bias:
        assert p < 1e-6
    else:
        assert p > 1e-4
        assert abs(sum(accepted) / n - p1[draft].item()) < 0.01  # acceptance rate = p(draft)


def test_ngram_index_proposes_the_continuation_of_the_longest_recent_match():
    idx = NgramIndex()
    idx.sync([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert idx.propose(3) == [7, 8, 5]  # "2 3" last continued by 7 8 5 (trigram "5 2 3" never seen)
    idx.sync([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3, 4])
    assert idx.propose(2) == []  # "4" never seen before
    idx.sync([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3, 4, 1])
    assert idx.propose(2) == [2, 3]  # unigram "1": last continued by 2 3
    periodic = NgramIndex()
    periodic.sync([4, 5, 4, 5, 4])
    assert periodic.propose(5) == [5, 4, 5, 4, 5]  # continues the period past the end
    assert NgramIndex().propose(3) == [] and periodic.propose(0) == []


def test_draft_budget_stays_inside_max_new_tokens_and_the_block_table():
    # k=4; 10 new tokens allowed, 3 generated: at most 6 more drafts, k caps at 4
    assert draft_budget(4, 10, 3, cache_len=20, slots=64) == 4
    assert draft_budget(4, 10, 8, cache_len=20, slots=64) == 1  # 2 left: 1 draft + 1 token
    assert draft_budget(4, 10, 9, cache_len=20, slots=64) == 0  # the last token: plain step
    assert draft_budget(4, 10, 3, cache_len=61, slots=64) == 2  # writes positions 61..63 only
