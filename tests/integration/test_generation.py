"""64 requests across the base model and 3 adapters, mixed sampling settings, through the fake router
with continuous batching. Greedy requests equal the same request run alone and transformers/PEFT
greedy generation; seeded sampled requests reproduce whatever the batch around them."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.testing.fake_router import RequestResult, RouterLimits, RouterStats
from shard_server.types import FinishReason, RequestSpec, SamplingParams, StoppingParams

VOCAB = 512
EOS = 2
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time",
    "In the beginning was the word",
    "Rust and Go routers talk to Python shards",
    "Hello, world! ",
    "A multi-LoRA Mistral shard serves many adapters.",
]
# Batches capped at 12 so that the 64 requests queue and join the running batch over time; a prefill
# budget of 40 tokens makes longer prompts overflow it and go in chunks (chunk_len).
LIMITS = RouterLimits(max_input_length=48, max_total_tokens=96, max_prefill_tokens=40, max_batch_size=12)


def mixed_requests(tokenizer) -> list[RequestSpec]:
    rng = random.Random(1234)
    out = []
    for i in range(64):
        kind = i % 8
        if kind in (0, 1, 2):  # plain greedy; warpers set on 2 must be ignored when do_sample is off
            extra = dict(temperature=0.7, top_k=5, top_p=0.8) if kind == 2 else {}
            sampling = SamplingParams(**extra)
        elif kind == 3:
            sampling = SamplingParams(repetition_penalty=1.3)
        elif kind == 4:
            sampling = SamplingParams(frequency_penalty=0.8, presence_penalty=0.4, return_k_alternatives=3)
        elif kind in (5, 6):
            sampling = SamplingParams(do_sample=True, seed=1000 + i, temperature=0.8, top_k=20, top_p=0.9)
        else:
            sampling = SamplingParams(
                do_sample=True, seed=2000 + i, typical_p=0.9, repetition_penalty=1.1, watermark=True
            )
        if i % 3 == 0:  # text: the shard tokenizes (and, like the HF tokenizer, adds BOS)
            prompt = dict(inputs=TEXTS[i % len(TEXTS)])
        else:
            prompt = dict(input_ids=(1, *(rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 24)))))
        out.append(
            RequestSpec(
                id=0,
                sampling=sampling,
                stopping=StoppingParams(max_new_tokens=rng.randrange(3, 13)),
                adapter_index=i % 4,
                prefill_logprobs=i % 5 == 0,
                **prompt,
            )
        )
    return out


def is_greedy(r: RequestSpec) -> bool:
    return not r.sampling.do_sample


def prompt_ids(r: RequestSpec, tokenizer) -> list[int]:
    return list(r.input_ids) if r.input_ids else list(tokenizer(r.inputs).input_ids)


@dataclass
class Run:
    requests: list[RequestSpec]
    results: list[RequestResult]
    streamed: dict[int, list[int]]
    stats: RouterStats


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def mixed_run(shared_shard, tokenizer) -> Run:
    reqs = mixed_requests(tokenizer)
    streamed: dict[int, list[int]] = {i: [] for i in range(len(reqs))}
    # With the tokenizer the router knows every prompt's length, so it can chunk text prompts too.
    with shared_shard.router(LIMITS, tokenize=lambda text: tokenizer(text).input_ids) as router:
        results = router.generate(reqs, on_token=lambda i, ev: streamed[i].append(ev.id))
        return Run(reqs, results, streamed, router.stats)


def test_the_router_really_batched_continuously(mixed_run, shared_shard):
    st = mixed_run.stats
    assert st.prefills > 1 and st.prefills_into_running > 0  # new work joined a running batch
    assert st.decodes > max(r.stopping.max_new_tokens for r in mixed_run.requests)
    assert st.filters > 0  # after requests finished
    if shared_shard.stub().Info(pb.InfoRequest(), timeout=10).chunked_prefill:
        assert st.chunked_requests > 0  # a prompt overflowed the prefill budget and was chunked


def test_every_request_completes_and_streams(mixed_run, tokenizer):
    for i, (req, res) in enumerate(zip(mixed_run.requests, mixed_run.results, strict=True)):
        assert res.finish_reason in (FinishReason.LENGTH, FinishReason.EOS_TOKEN), i
        assert mixed_run.streamed[i] == res.token_ids
        assert res.generated_tokens == len(res.token_ids) <= req.stopping.max_new_tokens
        if res.finish_reason == FinishReason.LENGTH:
            assert len(res.token_ids) == req.stopping.max_new_tokens
        else:
            assert res.token_ids[-1] == EOS
        assert (res.seed is not None) == req.sampling.do_sample
        if req.prefill_logprobs:
            ids = prompt_ids(req, tokenizer)
            assert res.prefill_tokens_length == len(ids)
            assert list(res.prefill_tokens.ids) == ids


def test_greedy_equals_run_alone(shared_shard, mixed_run):
    with shared_shard.router(LIMITS) as router:
        for i, req in enumerate(mixed_run.requests):
            if is_greedy(req) or i % 16 == 5:  # every greedy one, and 4 seeded ones
                (alone,) = router.generate([req])
                assert alone.token_ids == mixed_run.results[i].token_ids, f"request {i}"


def test_concatenation_through_decode_reproduces(shared_shard, mixed_run):
    """Every other request again, in other batches: new requests merged by a two-batch Decode instead of
    Prefill.cached_batch. Greedy and seeded requests do not depend on their batch."""
    limits = replace(LIMITS, concat_via="decode", max_batch_size=7)
    picked = list(range(0, len(mixed_run.requests), 2))
    with shared_shard.router(limits) as router:
        again = router.generate([mixed_run.requests[i] for i in picked])
        assert router.stats.prefills_into_running > 0
    for i, b in zip(picked, again, strict=True):
        a = mixed_run.results[i]
        assert a.token_ids == b.token_ids, f"request {i}"
        assert a.seed == b.seed


class _FrequencyPresence:
    """OpenAI frequency/presence penalties over the generated tokens, as a transformers processor."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        gen = input_ids[:, self.prompt_len :]
        counts.scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_greedy_equals_transformers_and_peft(tiny_model_dir, shared_shard, mixed_run, tokenizer):
    from peft import PeftModel
    from transformers import GenerationConfig, LogitsProcessorList, MistralForCausalLM

    models: dict[int, torch.nn.Module] = {}

    def model_for(index: int):
        if index not in models:
            base = MistralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            m = base if index == 0 else PeftModel.from_pretrained(base, Path(shared_shard.adapters[index]))
            models[index] = m.eval()
        return models[index]

    checked = 0
    for i, req in enumerate(mixed_run.requests):
        if not is_greedy(req):
            continue
        prompt = torch.tensor([prompt_ids(req, tokenizer)])
        processors = LogitsProcessorList()
        s = req.sampling
        if s.frequency_penalty or s.presence_penalty:
            processors.append(_FrequencyPresence(prompt.shape[1], s.frequency_penalty, s.presence_penalty))
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=req.stopping.max_new_tokens,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=EOS,
            pad_token_id=EOS,
        )
        with torch.no_grad():
            out = model_for(req.adapter_index).generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                generation_config=config,
                logits_processor=processors,
            )
        expected = out[0, prompt.shape[1] :].tolist()
        assert mixed_run.results[i].token_ids == expected, f"request {i} (adapter {req.adapter_index})"
        checked += 1
    assert checked == 40
