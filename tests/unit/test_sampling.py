"""NextTokenChooser: processors vs transformers, seeded reproducibility, statistics, batch lifecycle."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from shard_server.generation import logits_process as lp
from shard_server.generation.sampling import NextTokenChooser, prompt_logprobs, validate_sampling_params
from shard_server.types import SamplingParams as SP

V = 64


def logits_rows(b: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * scale


def run_steps(chooser: NextTokenChooser, logits: torch.Tensor, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        ids = chooser.choose(logits).next_ids
        chooser.update(ids)
        out.append(ids.tolist())
    return out


def same_filtered(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_repetition_penalty_matches_transformers_over_prompt_and_generated():
    prompts = [[3, 5, 7, 7], [10, 11]]
    params = [SP(repetition_penalty=1.3), SP(repetition_penalty=0.7)]
    c = NextTokenChooser.from_params(params, prompts, V)
    generated = torch.tensor([20, 5])
    c.update(generated)
    x = logits_rows(2)
    ours = c.process(x)
    for b, p in enumerate(params):
        ids = torch.tensor([prompts[b] + [int(generated[b])]])
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x[b : b + 1].clone())
        torch.testing.assert_close(ours[b], ref[0])


def test_frequency_presence_are_openai_over_generated_tokens_only():
    c = NextTokenChooser.from_params([SP(frequency_penalty=0.5, presence_penalty=0.25)], [[4, 4, 9]], V)
    for t in (9, 9, 12):
        c.update(torch.tensor([t]))
    x = logits_rows(1)
    expected = x.clone()
    expected[0, 9] -= 0.5 * 2 + 0.25
    expected[0, 12] -= 0.5 * 1 + 0.25  # prompt token 4 untouched: penalties see generated tokens only
    torch.testing.assert_close(c.process(x), expected)


@pytest.mark.parametrize(
    "p",
    [
        SP(do_sample=True, top_k=5),
        SP(do_sample=True, top_p=0.6),
        SP(do_sample=True, typical_p=0.5),
        SP(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, typical_p=0.9),
        SP(do_sample=True, temperature=1.5, top_k=1000),  # top_k beyond V is clamped (= off)
    ],
)
def test_warpers_match_transformers_chain(p):
    # A heterogeneous batch: the row under test sits between rows with other settings.
    params = [SP(do_sample=True, top_k=3), p, SP(do_sample=True, top_p=0.3, temperature=2.0)]
    c = NextTokenChooser.from_params(params, [[1]] * 3, V)
    x = logits_rows(3, seed=1)
    ours = c.process(x)[1:2]
    ref = x[1:2].clone()
    ids = torch.tensor([[1]])
    chain = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        chain.append(TopPLogitsWarper(p.top_p))
    if p.typical_p < 1:
        chain.append(TypicalLogitsWarper(p.typical_p))
    for w in chain:
        ref = w(ids, ref)
    same_filtered(ours, ref)


def test_greedy_ignores_warpers_but_not_penalties():
    x = logits_rows(1, seed=2)
    top = int(x.argmax())
    greedy = NextTokenChooser.from_params(
        [SP(do_sample=False, temperature=0.3, top_k=2, top_p=0.1, typical_p=0.2)], [[5]], V
    )
    assert greedy.choose(x).next_ids.tolist() == [top]
    # temperature 0 with do_sample is greedy as well
    zero_t = NextTokenChooser.from_params([SP(do_sample=True, temperature=0.0, seed=3)], [[5]], V)
    assert zero_t.choose(x).next_ids.tolist() == [top]
    penalised = NextTokenChooser.from_params([SP(repetition_penalty=100.0)], [[top]], V)
    assert penalised.choose(x).next_ids.tolist() != [top]
    assert penalised.seeds_for_report() == [None] and zero_t.seeds_for_report() == [None]


def test_top_k_1_equals_greedy():
    x = logits_rows(8, seed=4)
    params = [SP(do_sample=True, top_k=1, seed=s) for s in range(8)]
    c = NextTokenChooser.from_params(params, [[1]] * 8, V)
    assert torch.equal(c.choose(x).next_ids, x.argmax(-1))


def test_seeded_draws_do_not_depend_on_batch_composition():
    x = logits_rows(4, seed=5, scale=1.0)  # flat enough that draws vary
    target = SP(do_sample=True, seed=1234, top_p=0.95)
    alone = NextTokenChooser.from_params([target], [[7]], V)
    seq_alone = run_steps(alone, x[0:1], 6)
    others = [SP(do_sample=True, seed=9), SP(), SP(do_sample=True, seed=1234 + 1, top_k=4)]
    mixed = NextTokenChooser.from_params([others[0], target, *others[1:]], [[7]] * 4, V)
    rows = torch.stack([x[1], x[0], x[2], x[3]])
    seq_mixed = run_steps(mixed, rows, 3)
    # Filter then concatenate behind another batch: the step counter travels with the request.
    kept = mixed.filter([1])
    newcomer = NextTokenChooser.from_params([SP(do_sample=True, seed=77)], [[2]], V)
    merged = NextTokenChooser.concatenate([newcomer, kept])
    seq_merged = run_steps(merged, torch.stack([x[3], x[0]]), 3)
    assert [s[0] for s in seq_alone] == [s[1] for s in seq_mixed] + [s[1] for s in seq_merged]
    assert len({s[0] for s in seq_alone}) > 1  # the draws really are random


def test_seed_above_2_63_and_different_seeds_differ():
    x = logits_rows(1, seed=6, scale=0.5).expand(64, V)
    params = [SP(do_sample=True, seed=2**64 - 1 - s) for s in range(64)]
    ids = NextTokenChooser.from_params(params, [[1]] * 64, V).choose(x).next_ids
    assert len(set(ids.tolist())) > 10


def test_sample_frequencies_match_probabilities():
    n = 20000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0] + [-30.0] * (V - 6))
    params = [SP(do_sample=True, seed=s, temperature=0.8) for s in range(n)]
    c = NextTokenChooser.from_params(params, [[1]] * n, V)
    ids = c.choose(base.expand(n, V)).next_ids
    freq = torch.bincount(ids, minlength=V).float() / n
    torch.testing.assert_close(freq, (base / 0.8).softmax(-1), atol=0.012, rtol=0)
    # top-k / top-p never emit a filtered token
    params = [SP(do_sample=True, seed=s, top_k=3, top_p=0.99) for s in range(2000)]
    ids = NextTokenChooser.from_params(params, [[1]] * 2000, V).choose(base.expand(2000, V)).next_ids
    assert set(ids.tolist()) == {0, 1, 2}


def test_hash_uniforms_are_uniform_and_keyed():
    keys = lp.row_keys(torch.arange(256), torch.zeros(256, dtype=torch.int64))
    u = lp.token_uniforms(keys, 1024)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert len(set(keys.tolist())) == 256


def test_watermark_raises_green_share():
    n = 4000
    x = logits_rows(n, seed=7, scale=1.0)
    prev = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(8))
    prompts = [[int(p)] for p in prev]

    def green_share(watermark: bool) -> float:
        params = [SP(do_sample=True, seed=s, watermark=watermark) for s in range(n)]
        ids = NextTokenChooser.from_params(params, prompts, V).choose(x).next_ids
        green = lp.green_mask(prev, V, 0.5, 15485863)
        return float(green.gather(1, ids[:, None]).float().mean())

    plain, marked = green_share(False), green_share(True)
    assert abs(plain - 0.5) < 0.05
    assert marked > plain + 0.2


def test_logprobs_and_alternatives_come_from_processed_logits():
    params = [SP(return_k_alternatives=3), SP(do_sample=True, seed=1, top_k=2, return_k_alternatives=5)]
    c = NextTokenChooser.from_params(params, [[1], [1]], V)
    x = logits_rows(2, seed=9)
    out = c.choose(x)
    logp = c.process(x).log_softmax(-1)
    torch.testing.assert_close(out.logprobs, logp.gather(1, out.next_ids[:, None])[:, 0])
    host = out.to_host()
    assert [len(a) for a in host.alternatives] == [3, 5]
    top3 = logp[0].topk(3)
    assert [i for i, _ in host.alternatives[0]] == top3.indices.tolist()
    assert host.alternatives[0][0] == (host.next_ids[0], pytest.approx(host.logprobs[0]))
    assert host.alternatives[1][2][1] == float("-inf")  # filtered by top_k=2
    no_alts = NextTokenChooser.from_params([SP()], [[1]], V).choose(x[:1]).to_host()
    assert no_alts.alternatives == [[]] and no_alts.next_ids == [int(x[0].argmax())]


def test_filter_and_concatenate_keep_per_request_state():
    a = NextTokenChooser.from_params([SP(repetition_penalty=2.0), SP(frequency_penalty=1.0)], [[3], [4]], V)
    b = NextTokenChooser.from_params([SP()], [[5]], V)  # no [B, V] state at all
    a.update(torch.tensor([6, 8]))
    a.update(torch.tensor([6, 8]))
    merged = NextTokenChooser.concatenate([b, a])
    assert merged.step.tolist() == [0, 2, 2] and merged.prev_ids.tolist() == [5, 6, 8]
    assert merged.counts[2, 8] == 2 and merged.counts[0].sum() == 0
    assert merged.seen[1, 3] and merged.seen[1, 6] and not merged.seen[0].any()
    x = logits_rows(3, seed=10)
    torch.testing.assert_close(merged.process(x)[1:], a.process(x[1:]))
    kept = merged.filter([2])
    assert kept.seen is None and kept.counts is not None and kept.counts[0, 8] == 2
    torch.testing.assert_close(kept.process(x[2:]), a.process(x[1:])[1:])


@pytest.mark.parametrize(
    "field,p",
    [
        ("top_p", SP(top_p=0.0)),
        ("top_p", SP(top_p=1.5)),
        ("temperature", SP(temperature=-0.1)),
        ("typical_p", SP(typical_p=0.0)),
        ("repetition_penalty", SP(repetition_penalty=0.0)),
        ("top_k", SP(top_k=-1)),
    ],
)
def test_validation_names_the_field(field, p):
    with pytest.raises(ValueError, match=field):
        validate_sampling_params(p)


def test_schema_is_checked_by_its_compiler_and_large_top_k_is_fine():
    validate_sampling_params(SP(schema="not even JSON"))  # the grammar compiler judges schemas
    validate_sampling_params(SP(top_k=10**9))


def test_prompt_logprobs_single_and_flattened():
    logits = logits_rows(7, seed=11)
    ids = torch.tensor([1, 5, 9, 2, 1, 7, 3])
    out = prompt_logprobs(logits, ids, torch.tensor([0, 4, 7]))
    logp = logits.log_softmax(-1)
    assert torch.isnan(out[0]) and torch.isnan(out[4])
    for t in (1, 2, 3, 5, 6):
        torch.testing.assert_close(out[t], logp[t - 1, ids[t]])
    single = prompt_logprobs(logits[:4], ids[:4])
    torch.testing.assert_close(single, out[:4], equal_nan=True)


def test_one_seed_over_many_steps_matches_probabilities_and_updates_in_place():
    base = torch.tensor([1.0, 0.0, -1.0] + [-30.0] * (V - 3))[None, :]
    c = NextTokenChooser.from_params([SP(do_sample=True, seed=42)], [[1]], V)
    ptrs = (c.step.data_ptr(), c.prev_ids.data_ptr())
    draws = []
    for _ in range(1500):
        ids = c.choose(base).next_ids
        c.update(ids)
        draws.append(int(ids))
    freq = torch.bincount(torch.tensor(draws), minlength=V).float() / len(draws)
    torch.testing.assert_close(freq, base[0].softmax(-1), atol=0.04, rtol=0)
    assert (c.step.data_ptr(), c.prev_ids.data_ptr()) == ptrs and int(c.step) == 1500


def test_top_k_without_top_p_matches_transformers_per_row():
    # No row uses top_p, so the partial top-k path runs; k = 0 (off) and k > V rows keep everything.
    ks = [3, 0, 10, 1000]
    c = NextTokenChooser.from_params([SP(do_sample=True, top_k=k) for k in ks], [[1]] * 4, V)
    x = logits_rows(4, seed=12)
    ours = c.process(x)
    for b, k in enumerate(ks):
        ref = TopKLogitsWarper(k)(torch.tensor([[1]]), x[b : b + 1].clone()) if 0 < k < V else x[b : b + 1]
        same_filtered(ours[b : b + 1], ref)
    full_sort = lp.apply_top_k_top_p(x, c.top_k, torch.ones(4), use_top_p=False)
    assert torch.equal(full_sort, ours)
