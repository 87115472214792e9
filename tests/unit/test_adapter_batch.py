"""AdapterBatchMetadata segments, AdapterBatchData.add_lora, and the tensor-parallel slicing math."""

from types import SimpleNamespace

import pytest
import torch

from model.adapters.batch import AdapterBatchData, AdapterBatchMetadata
from model.adapters.sharding import shard_lora


def test_metadata_per_token_slots_and_segments_merge_runs_and_skip_base():
    m = AdapterBatchMetadata.from_requests([1, 1, -1, 2, 1, 0], [3, 2, 4, 1, 2, 0])
    assert m.token_slots.dtype == torch.int32
    assert m.token_slots.tolist() == [1] * 5 + [-1] * 4 + [2] + [1] * 2
    assert m.segments == ((0, 5, 1), (9, 10, 2), (10, 12, 1))
    assert m.segment_starts.tolist() == [0, 9, 10] and m.segment_slots.dtype == torch.int32
    assert m.has_lora
    assert not AdapterBatchMetadata.from_requests([-1, -1], [1, 1]).has_lora


def _stacks(gen, slots=3, r=8, fan_in=10, fan_out=6):
    a = torch.randn(slots, r, fan_in, generator=gen)
    b = torch.randn(slots, fan_out, r, generator=gen)
    return {(0, "q_proj"): (a, b)}, a, b


@pytest.mark.parametrize("is_prefill", [True, False])
def test_add_lora_adds_each_tokens_delta_in_place_and_ignores_other_modules(is_prefill):
    gen = torch.Generator().manual_seed(0)
    stacks, a, b = _stacks(gen)
    slots, tokens = [2, -1, 0, 0], [3, 2, 1, 4]
    data = AdapterBatchData(AdapterBatchMetadata.from_requests(slots, tokens), stacks, is_prefill)
    x = torch.randn(10, 10, generator=gen)
    fused = torch.randn(10, 20, generator=gen)  # e.g. a fused qkv output; q is columns 4..10
    expected = fused.clone()
    idx = data.meta.token_slots
    for t in range(10):
        if idx[t] >= 0:
            expected[t, 4:10] += x[t] @ (b[idx[t]] @ a[idx[t]]).T
    data.add_lora(0, "q_proj", x, fused[:, 4:10])
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    before = fused.clone()
    data.add_lora(0, "k_proj", x, fused[:, 10:16])  # no stack for this module: a no-op
    data.add_lora(1, "q_proj", x, fused[:, 4:10])
    assert torch.equal(fused, before)


@pytest.mark.parametrize("is_prefill,concurrent", [(False, True), (False, False), (True, True)])
def test_begin_lora_returns_the_delta_for_decode_and_adds_in_place_otherwise(is_prefill, concurrent):
    """Decode with concurrent LoRA: finish returns out's delta (zero on base rows) and leaves out alone;
    prefill, or concurrent off: finish adds it to out in place. Either way out + delta is the same."""
    gen = torch.Generator().manual_seed(3)
    stacks, a, b = _stacks(gen)
    meta = AdapterBatchMetadata.from_requests([2, -1, 0, 0], [3, 2, 1, 4] if is_prefill else [1, 1, 1, 1])
    data = AdapterBatchData(meta, stacks, is_prefill, concurrent=concurrent)
    t = meta.token_slots.shape[0]
    x, out = torch.randn(t, 10, generator=gen), torch.randn(t, 6, generator=gen)
    expected = out.clone()
    for i, slot in enumerate(meta.token_slots.tolist()):
        if slot >= 0:
            expected[i] += x[i] @ (b[slot] @ a[slot]).T
    pending = data.begin_lora(0, "q_proj", x, (6,))
    before = out.clone()
    delta = pending.finish(out)
    if concurrent and not is_prefill:
        assert torch.equal(out, before)  # untouched: the consumer adds the delta
        assert torch.equal(delta[meta.token_slots < 0], torch.zeros_like(delta[meta.token_slots < 0]))
        out = out + delta
    else:
        assert delta is None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert data.begin_lora(0, "k_proj", x, (6,)).finish(out) is None  # no stack: nothing to do
    base_only = AdapterBatchData(AdapterBatchMetadata.from_requests([-1], [1]), stacks, is_prefill)
    assert base_only.begin_lora(0, "q_proj", x[:1], (6,)) is None
    with pytest.raises(ValueError, match="one width per member"):
        data.begin_lora(0, "qkv_proj", x, (6,))


def test_begin_lora_keeps_lm_head_dora_and_tp_row_parallel_in_place():
    """Deltas only where a consumer adds them and nothing must follow the expand: lm_head (no consumer),
    DoRA members (scaled after the expand), row-parallel under TP (the shrink's all-reduce)."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 4, 10, generator=gen), torch.randn(2, 6, 4, generator=gen)
    meta = AdapterBatchMetadata.from_requests([1, 0], [1, 1])
    x = torch.randn(2, 10, generator=gen)
    stacks = {(0, "o_proj"): (a, b), (-1, "lm_head"): (a, b), (0, "down_proj"): (a, b)}
    plain = AdapterBatchData(meta, stacks, False, concurrent=True)
    assert type(plain.begin_lora(0, "o_proj", x, (6,))).__name__ == "DeltaLora"
    assert type(plain.begin_lora(-1, "lm_head", x, (6,))).__name__ == "InPlaceLora"
    dora = AdapterBatchData(meta, stacks, False, concurrent=True, scales={(0, "o_proj"): torch.ones(2, 6)})
    assert type(dora.begin_lora(0, "o_proj", x, (6,))).__name__ == "InPlaceLora"
    assert type(dora.begin_lora(0, "down_proj", x, (6,))).__name__ == "DeltaLora"
    tp = SimpleNamespace(world_size=2, rank=0, group=None)
    sharded = AdapterBatchData(meta, stacks, False, tp, concurrent=True)
    assert type(sharded.begin_lora(0, "o_proj", x, (6,))).__name__ == "InPlaceLora"


CFG = SimpleNamespace(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                      intermediate_size=24, vocab_size=10)  # fmt: skip


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    "target,fan_in,fan_out", [("q_proj", 16, 16), ("k_proj", 16, 8), ("up_proj", 16, 24)]
)
def test_column_parallel_slices_b_rows_like_the_model_shards_outputs(world, target, fan_in, fan_out):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, fan_in, generator=gen), torch.randn(fan_out, 3, generator=gen)
    x = torch.randn(5, fan_in, generator=gen)
    full = x @ a.T @ b.T  # [5, out]
    locals_ = [x @ la.T @ lb.T for la, lb in (shard_lora(target, a, b, CFG, r, world) for r in range(world))]
    if target == "k_proj" and world == 4:  # 2 KV heads over 4 ranks: rank r holds head r * 2 // 4
        got = torch.cat([locals_[0], locals_[2]], dim=1)
    else:
        got = torch.cat(locals_, dim=1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("target,fan_in", [("o_proj", 16), ("down_proj", 24)])
def test_row_parallel_partial_shrinks_sum_to_the_full_delta(world, target, fan_in):
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, fan_in, generator=gen), torch.randn(16, 5, generator=gen)
    x = torch.randn(7, fan_in, generator=gen)
    n = fan_in // world
    v = 0
    for r in range(world):
        la, lb = shard_lora(target, a, b, CFG, r, world)
        assert torch.equal(lb, b)  # B replicated; the expand runs once on the reduced shrink
        v = v + x[:, r * n : (r + 1) * n] @ la.T  # what the all-reduce sums
    torch.testing.assert_close(v @ b.T, x @ a.T @ b.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("is_prefill", [True, False])
def test_lm_head_on_selected_rows_uses_the_slots_of_those_tokens(is_prefill):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 8, 10, generator=gen), torch.randn(2, 6, 8, generator=gen)
    meta = AdapterBatchMetadata.from_requests([1, -1, 0], [3, 2, 4])
    rows = torch.tensor([2, 4, 8])  # the last token of each request
    x = torch.randn(3, 10, generator=gen)
    with pytest.raises(ValueError, match="got 3 rows for 9 tokens: pass forward.s lm_head_indices"):
        AdapterBatchData(meta, {(-1, "lm_head"): (a, b)}, is_prefill).add_lora(
            -1, "lm_head", x, torch.zeros(3, 6)
        )
    data = AdapterBatchData(meta, {(-1, "lm_head"): (a, b)}, is_prefill, lm_head_indices=rows)
    out = torch.zeros(3, 6)
    data.add_lora(-1, "lm_head", x, out)
    want = torch.stack([x[0] @ (b[1] @ a[1]).T, torch.zeros(6), x[2] @ (b[0] @ a[0]).T])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_lm_head_is_not_sliced_because_the_hook_sees_gathered_logits():
    a, b = torch.randn(3, 16), torch.randn(10, 3)
    for r in range(2):
        la, lb = shard_lora("lm_head", a, b, CFG, r, 2)
        assert la is a and lb is b


def test_only_row_parallel_targets_all_reduce_the_shrink_result(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda v, group=None: calls.append((v.shape, group)))
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 8, 10, generator=gen), torch.randn(2, 6, 8, generator=gen)
    stacks = {(0, t): (a, b) for t in ("q_proj", "o_proj", "down_proj", "up_proj")}
    tp = SimpleNamespace(rank=0, world_size=2, group="G")
    for is_prefill in (True, False):
        data = AdapterBatchData(AdapterBatchMetadata.from_requests([0, 1], [2, 3]), stacks, is_prefill, tp)
        for target in ("q_proj", "o_proj", "down_proj", "up_proj"):
            data.add_lora(0, target, torch.randn(5, 10), torch.zeros(5, 6))
    assert calls == [(torch.Size([5, 8]), "G")] * 4  # o_proj and down_proj, prefill and decode
