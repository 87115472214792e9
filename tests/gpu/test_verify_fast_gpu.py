"""The fast verify scoring (generation/verify_fast.py) on CUDA, at the 7B vocabulary: the general path's
targets, logprobs and acceptance bit for bit, over several steps of one chooser (pinned packed copy,
mixed-dtype pack, device run lengths, cumulative draft histories, advance_chooser's scatters), for
greedy, seeded sampling, penalties, watermark and a mixed batch of 32 rows.

Logits in bf16 (a strided view, as the verify graph returns them) tie often; the alternatives' order
among exactly tied logprobs is then up to the top-k kernel, which may differ between B and B*Q rows
(the general path loops over B rows for penalties), so with bf16 logits the alternatives are
compared by their logprobs; with float32 logits everything is compared bit for bit.
"""

from __future__ import annotations

import random

import pytest
import torch

from shard_server.generation import verify_fast
from shard_server.generation.sampling import NextTokenChooser
from shard_server.generation.speculative import advance_chooser, choose_positions
from shard_server.types import SamplingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

V = 32000
KINDS = {
    "greedy": [SamplingParams()],
    "alternatives": [SamplingParams(return_k_alternatives=3), SamplingParams()],
    "sampled": [
        SamplingParams(do_sample=True, temperature=0.7, seed=1),
        SamplingParams(do_sample=True, top_k=40, top_p=0.9, seed=2**64 - 1, return_k_alternatives=2),
        SamplingParams(do_sample=True, typical_p=0.7, seed=4),
        SamplingParams(),
    ],
    "penalties": [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.4, return_k_alternatives=2),
        SamplingParams(do_sample=True, seed=8, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.5),
        SamplingParams(watermark=True),
        SamplingParams(),
    ],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-strided", "fp32"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fast_scoring_equals_the_general_path_on_cuda(kind, dtype):
    rows, dev = 32, torch.device("cuda")
    rng = random.Random(1)
    params = [KINDS[kind][i % len(KINDS[kind])] for i in range(rows)]
    prompts = [[rng.randrange(V) for _ in range(8)] for _ in range(rows)]
    fast = NextTokenChooser.from_params(params, prompts, V, dev)
    general = NextTokenChooser.from_params(params, prompts, V, dev)
    g = torch.Generator(device=dev).manual_seed(5)
    for step, q_len in enumerate([5, 5, 2, 5, 1]):
        raw = torch.randn(rows, 5, V, device=dev, generator=g) * 4
        raw[:, :, :16] += 6.0  # a few likely tokens: drafts match and repeat
        logits = raw.to(dtype)[:, :q_len]
        drafts = logits[:, : q_len - 1].float().argmax(-1)
        for b in range(rows):
            cut = rng.randrange(q_len + 1)
            if cut < q_len - 1:
                drafts[b, cut] = (drafts[b, cut] + 1) % V
        num = [rng.randrange(q_len) for _ in range(rows)]
        assert verify_fast.score(fast, logits, drafts) is not None
        a = choose_positions(fast, logits, drafts)
        b = choose_positions(general, logits, drafts, fast=False)
        for name in ("targets", "logprobs", "match", "alt_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), (step, name)
        acc_a, host_a = a.to_host(num)
        acc_b, host_b = b.to_host(num)
        assert acc_a == acc_b and host_a.ids == host_b.ids and host_a.logprobs == host_b.logprobs, step
        if dtype == torch.float32:
            assert (a.alt_ids is None and b.alt_ids is None) or torch.equal(a.alt_ids, b.alt_ids), step
            assert host_a.alternatives == host_b.alternatives
        emitted = torch.tensor([n + 1 for n in acc_a], device=dev)
        advance_chooser(fast, a.targets, emitted)
        advance_chooser(general, b.targets, emitted)
        for name in ("step", "prev_ids", "counts", "seen"):
            x, y = getattr(fast, name), getattr(general, name)
            assert (x is None and y is None) or torch.equal(x, y), (step, name)


def test_to_host_on_cuda_keeps_large_ids_exact():
    from shard_server.generation.speculative import VerifySample

    big, dev = 2**40 + 1, torch.device("cuda")
    targets = torch.tensor([[big, big + 2, 7], [5, 6, 7]], device=dev)
    match = torch.tensor([[True, True], [True, False]], device=dev)
    logprobs = torch.tensor([[-0.5, -1.5, -2.5], [-0.25, -0.75, -1.0]], device=dev)
    alt_ids = torch.tensor([[[big, 3]] * 3, [[4, 5]] * 3], device=dev)
    alt_logprobs = torch.full((2, 3, 2), -1.25, device=dev)
    sample = VerifySample(targets, logprobs, match, alt_ids, alt_logprobs, (2, 1))
    accepted, host = sample.to_host([2, 2])
    assert accepted == [2, 1] and host.ids == [[big, big + 2, 7], [5, 6]]
    assert host.logprobs == [[-0.5, -1.5, -2.5], [-0.25, -0.75]]
    assert host.alternatives == [[[(big, -1.25), (3, -1.25)]] * 3, [[(4, -1.25)]] * 2]
