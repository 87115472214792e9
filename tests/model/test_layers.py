"""Tensor-parallel layers: each rank's shard, recombined by hand, equals the unsharded layer.

Only world size 1 runs end to end; here the sharding math of world sizes 2 and 4 is checked by
building every rank's layer and doing the collective's work (concat / sum) in the test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightShapeError,
)
from model.parallel import TPGroup

torch.manual_seed(0)


def _load(layer, tensor, *shard):
    layer.weight.weight_loader(layer.weight, tensor, *shard)
    return layer


@pytest.mark.parametrize("world", [1, 2, 4])
def test_column_and_row_shards_recombine(world):
    w, x = torch.randn(8, 12), torch.randn(3, 12)
    cols = [_load(ColumnParallelLinear(12, 8, TPGroup(r, world)), w)(x) for r in range(world)]
    torch.testing.assert_close(torch.cat(cols, -1), x @ w.T)
    rows = [_load(RowParallelLinear(12, 8, TPGroup(r, world)), w) for r in range(world)]
    partial = [F.linear(x.chunk(world, -1)[r], rows[r].weight) for r in range(world)]  # all_reduce by hand
    torch.testing.assert_close(sum(partial), x @ w.T)


@pytest.mark.parametrize("world", [1, 2])
def test_merged_gate_up_shards(world):
    gate, up, x = torch.randn(6, 4), torch.randn(6, 4), torch.randn(2, 4)
    outs = []
    for r in range(world):
        layer = MergedColumnParallelLinear(4, [6, 6], TPGroup(r, world))
        _load(layer, gate, 0)
        _load(layer, up, 1)
        outs.append(layer(x).chunk(2, -1))  # (gate part, up part) of this rank
    torch.testing.assert_close(torch.cat([g for g, _ in outs], -1), x @ gate.T)
    torch.testing.assert_close(torch.cat([u for _, u in outs], -1), x @ up.T)


@pytest.mark.parametrize("world,heads,kv_heads", [(1, 4, 2), (2, 4, 2), (4, 4, 2), (4, 8, 1)])
def test_qkv_heads_split_and_kv_replicated(world, heads, kv_heads):
    d, hidden = 3, 5
    q = torch.randn(heads * d, hidden)
    k, v = torch.randn(kv_heads * d, hidden), torch.randn(kv_heads * d, hidden)
    for r in range(world):
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, TPGroup(r, world))
        for part, t in zip("qkv", (q, k, v), strict=True):
            _load(layer, t, part)
        qs, ks, vs = layer.weight.split(layer.local_sizes())
        hq = heads // world
        assert torch.equal(qs, q[r * hq * d : (r + 1) * hq * d])
        # Query head h uses KV head h // (heads / kv_heads): this rank's KV heads serve its query heads.
        first_q_head = r * hq
        kv_head = first_q_head // (heads // kv_heads)
        assert torch.equal(ks[:d], k[kv_head * d : (kv_head + 1) * d])
        assert torch.equal(vs[:d], v[kv_head * d : (kv_head + 1) * d])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_vocab_parallel_embedding_and_lm_head(world):
    vocab, hidden = 10, 4  # 10 is not divisible by 3: the last rank holds padding rows
    w, ids, h = torch.randn(vocab, hidden), torch.tensor([0, 9, 4, 7, 3]), torch.randn(2, hidden)
    embeds, logits = [], []
    for r in range(world):
        tp = TPGroup(r, world)
        emb = _load(VocabParallelEmbedding(vocab, hidden, tp), w)
        local = ids - emb.vocab_start
        mine = (local >= 0) & (local < emb.rows_per_rank)
        embeds.append(F.embedding(torch.where(mine, local, 0), emb.weight) * mine[:, None])
        logits.append(F.linear(h, _load(ParallelLMHead(vocab, hidden, tp), w).weight))
    torch.testing.assert_close(sum(embeds), w[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], h @ w.T)
    assert VocabParallelEmbedding(vocab, hidden, TPGroup())(ids).shape == (5, hidden)


def test_loaders_reject_wrong_shapes():
    with pytest.raises(WeightShapeError, match=r"expected shape \(8, 12\), got \(8, 11\)"):
        _load(ColumnParallelLinear(12, 8, TPGroup()), torch.randn(8, 11))
    with pytest.raises(WeightShapeError):
        _load(QKVParallelLinear(4, 2, 2, 1, TPGroup()), torch.randn(3, 4), "k")
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(4, 6, TPGroup(0, 4))


def test_rmsnorm_fused_residual():
    norm = RMSNorm(4, 1e-6)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5, 1.0])
    x, res = torch.randn(3, 4), torch.randn(3, 4)
    out, new_res = norm(x, res)
    s = x + res
    torch.testing.assert_close(new_res, s)
    torch.testing.assert_close(out, norm.weight * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_rotary_matches_transformers():
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    d, theta = 8, 10000.0
    rope = RotaryEmbedding(d, theta)
    pos = torch.tensor([0, 5, 63, 17])
    q, k = torch.randn(4, 3, d), torch.randn(4, 1, d)
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    # transformers' layout: q [B, H, T, D], cos [B, T, D]
    ref_q, ref_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    got_q, got_k = rope(pos, q, k)
    torch.testing.assert_close(got_q, ref_q[0].transpose(0, 1))
    torch.testing.assert_close(got_k, ref_k[0].transpose(0, 1))
