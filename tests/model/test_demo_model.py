"""The demo model, a real one (SmolLM2-135M-Instruct, from its GGUF, as a Mistral directory) and its two
trained LoRA adapters: our engine's greedy chat answers equal transformers' (base) and PEFT's (each
adapter), all in one mixed batch; with the FP8 KV cache most answers stay the same.

The model and adapters are built once per machine by `make_demo_model` into the user cache
(`default_demo_dir()`, what `make run` uses too); a fresh machine builds them here first (95 s on 2
idle cores, 2.5 minutes on busy ones, most of it training the adapters); then these tests take 20-40 s.
Every check runs against what is there, so a stale or broken cache fails the tests rather than hiding
behind them.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.server.convert import batch_from_pb
from shard_server.testing.wire import warmup_request
from shard_server.tools.demo_model import DEMO_PROMPTS, chat_prompt, default_demo_dir, make_demo_model
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, StoppingParams

# The first test builds the demo model when the cache lacks it: minutes, beyond the default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

MAX_NEW = 32
ADAPTER_INDEX = {"base": 0, "pirate": 1, "json": 2}
# A divergence from the reference is a float near-tie when the reference's logits of the two tokens are
# this close (float32 on both sides; the kernels sum in a different order).
NEAR_TIE = 1e-3
# FP8 KV cache, measured on this model and prompts: 6 of 9 answers identical, 144 of 204 tokens before
# the first difference; each departure where the full-precision model's top two were 0.09-0.15 apart.
FP8_MIN_SAME_ANSWERS = 5
FP8_MIN_TOKEN_SHARE = 0.6
FP8_MAX_GAP = 1.0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """This model's ops are small: on 2 busy cores one thread ran these tests 5-8x faster than two (on
    idle ones about 1.5x slower: 22 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo():
    return make_demo_model(default_demo_dir())


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.model)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(chat_prompt(tokenizer, q), add_special_tokens=False)["input_ids"] for q in DEMO_PROMPTS]


def engine_answers(demo, prompts, kv: str = "auto") -> dict[tuple[str, int], list[int]]:
    """(adapter, prompt index) -> greedy tokens: every prompt under every adapter in one batch."""
    engine = ShardEngine(ShardConfig(model_dir=demo.model, kv_cache_dtype=kv, max_kv_cache_bytes=64 << 20))
    if kv != "auto":  # FP8 scales are calibrated at Warmup
        engine.warmup(batch_from_pb(warmup_request(64, 128, 96).batch, "Warmup"), 64, 128, 32)
    for name, index in ADAPTER_INDEX.items():
        if index:
            engine.load_adapter(index, AdapterSpec(adapter_ids=(str(demo.adapters[name]),), source="local"))
    keys = [(name, p) for name in ADAPTER_INDEX for p in range(len(prompts))]
    reqs = tuple(
        RequestSpec(
            id=i,
            input_ids=tuple(prompts[p]),
            adapter_index=ADAPTER_INDEX[name],
            stopping=StoppingParams(max_new_tokens=MAX_NEW),
        )
        for i, (name, p) in enumerate(keys)
    )
    out: dict[int, list[int]] = {}
    result = engine.prefill(BatchSpec(id=1, requests=reqs))
    while True:
        for g in result.generations:
            out.setdefault(g.request_id, []).extend(g.next_tokens.ids)
        if result.batch is None:
            break
        result = engine.decode([1])
    return {key: out[i] for i, key in enumerate(keys)}


@pytest.fixture(scope="module")
def ours(demo, prompts):
    return engine_answers(demo, prompts)


@pytest.fixture(scope="module")
def reference(demo, prompts, tokenizer):
    """(adapter, prompt index) -> (greedy tokens through EOS, per-step logits) from transformers / PEFT,
    the prompts of one adapter in one left-padded batch."""
    from peft import PeftModel
    from transformers import MistralForCausalLM

    base = MistralForCausalLM.from_pretrained(demo.model, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, demo.adapters["pirate"], adapter_name="pirate")
    model.load_adapter(demo.adapters["json"], adapter_name="json")
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True)
    out = {}
    for name in ADAPTER_INDEX:
        with torch.no_grad(), model.disable_adapter() if name == "base" else contextlib.nullcontext():
            if name != "base":
                model.set_adapter(name)
            res = model.generate(ids, return_dict_in_generate=True, pad_token_id=pad, **kwargs)
        for p in range(len(prompts)):
            row = res.sequences[p, width:].tolist()
            if tokenizer.eos_token_id in row:  # then padding
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            out[(name, p)] = (row, [step[p] for step in res.logits[: len(row)]])
    return out


def test_the_checkpoint_is_read_as_smollm2_shaped(demo):
    from model.config import MistralConfig

    c = MistralConfig.from_pretrained(demo.model)
    shape = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert shape == (30, 576, 9, 3, 64) and (c.vocab_size, c.intermediate_size) == (49152, 1536)
    assert c.rope_theta == 100000.0 and c.sliding_window is None and not c.tie_word_embeddings
    assert c.eos_token_id == [2] and c.bos_token_id == 1  # <|im_end|>, <|im_start|>


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def diverges_at_near_tie(ours: list[int], ref: list[int], ref_logits) -> bool:
    """Whether the first difference is a token the reference itself scored within NEAR_TIE of its own."""
    n = common_prefix(ours, ref)
    if n == min(len(ours), len(ref)):  # equal, or one stopped earlier: a different answer, not a tie
        return False
    return bool(ref_logits[n][ref[n]] - ref_logits[n][ours[n]] <= NEAR_TIE)


def test_greedy_answers_equal_transformers_and_peft(ours, reference, tokenizer, demo):
    total = equal = 0
    for key, (ref, logits) in reference.items():
        got = ours[key]
        n = common_prefix(got, ref)
        total += len(ref)
        equal += n
        print(f"{key}: {n}/{len(ref)} tokens equal {tokenizer.decode(got, skip_special_tokens=True)!r}")
        assert got == ref or diverges_at_near_tie(got, ref, logits), (
            key,
            tokenizer.decode(got),
            tokenizer.decode(ref),
        )
    print(f"engine vs transformers/PEFT: {equal}/{total} greedy tokens equal")
    # The adapters really change the answers: not the base model agreeing with itself.
    for p in range(len(DEMO_PROMPTS)):
        assert ours[("pirate", p)] != ours[("base", p)] and ours[("json", p)] != ours[("base", p)]


def test_fp8_kv_cache_keeps_the_answers(demo, prompts, reference, tokenizer):
    """Free-running greedy answers with an FP8 (e4m3) KV cache against the full-precision ones. Where an
    answer departs, it does so at a close call of the full-precision model (its logit gap between the two
    tokens is small), and every answer starts the same (the prompt's own attention reads no cache)."""
    fp8 = engine_answers(demo, prompts, kv="fp8_e4m3")
    same = equal_tokens = 0
    gaps = []
    for key, (ref, logits) in reference.items():
        got = fp8[key]
        n = common_prefix(got, ref)
        same += got == ref
        equal_tokens += n
        if got != ref:
            assert n >= 1, key
            gap = float(logits[n][ref[n]] - logits[n][got[n]]) if n < min(len(got), len(ref)) else None
            gaps.append(gap)
            print(f"  {key} departs at token {n} (full-precision logit gap {gap}): {tokenizer.decode(got)!r}")
    total = sum(len(ref) for ref, _ in reference.values())
    print(
        f"fp8 vs full-precision KV cache: {same}/{len(reference)} answers identical, {equal_tokens}/{total} "
        f"tokens before the first difference"
    )
    assert same >= FP8_MIN_SAME_ANSWERS and equal_tokens >= FP8_MIN_TOKEN_SHARE * total
    assert all(g is not None and g <= FP8_MAX_GAP for g in gaps), gaps
