"""The LoRA hook: every projection group calls add_lora(layer_idx, group, x, fused_out, widths) once,
with the right input, the fused output (not a copy) and its members' column widths.

A test double adds x @ delta.T for every member on its columns (split by `widths`); transformers with
W + delta in each weight is then the truth. Any wrong split (q vs k columns, gate vs up), wrong input x,
or an out that is a copy instead of the fused output shows up as a logits mismatch.
"""

from __future__ import annotations

import copy

import torch
from mistral_harness import PagedRunner, hf_logits, random_prompts

from cache.kv_cache import KVCache
from model.adapters.batch import InPlaceHook

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class DeltaAdapter(InPlaceHook):
    """add_lora double: out[:, member columns] += x @ delta[(layer, member)].T, recording every call."""

    def __init__(self, deltas: dict[tuple[int, str], torch.Tensor]):
        self.deltas = deltas
        self.calls: list[tuple[int, str, tuple, tuple, tuple | None]] = []

    def add_lora(self, layer_idx, target, x, out, widths=None):
        self.calls.append((layer_idx, target, tuple(x.shape), tuple(out.shape), widths))
        col = 0
        for member, w in zip(GROUPS.get(target, (target,)), widths or (out.shape[1],), strict=True):
            out[:, col : col + w] += x @ self.deltas[(layer_idx, member)].T
            col += w


def _hf_module(hf, layer, target):
    if target == "lm_head":
        return hf.lm_head
    block = hf.model.layers[layer]
    return getattr(block.self_attn if target in TARGETS[:4] else block.mlp, target)


def test_hook_called_with_correct_slices_in_prefill_and_decode(model_pair):
    ours, hf, _ = model_pair(heads=4, kv_heads=1, head_dim=24)
    gen = torch.Generator().manual_seed(0)
    deltas = {}
    keys = [(i, t) for i in range(ours.config.num_hidden_layers) for t in TARGETS] + [(-1, "lm_head")]
    for layer, target in keys:
        w = _hf_module(hf, layer, target).weight
        deltas[(layer, target)] = 0.05 * torch.randn(w.shape, generator=gen)
    hf_lora = copy.deepcopy(hf)
    with torch.no_grad():
        for (layer, target), delta in deltas.items():
            _hf_module(hf_lora, layer, target).weight += delta

    adapter = DeltaAdapter(deltas)
    runner = PagedRunner(ours, KVCache.for_model(ours, 16))
    prompts = random_prompts([6, 9], 512, seed=3)
    logits, cu = runner.prefill(prompts, adapter_data=adapter)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[cu[b] : cu[b + 1]], hf_logits(hf_lora, p), atol=1e-4, rtol=0)
    assert not torch.allclose(logits[: cu[1]], hf_logits(hf, prompts[0]), atol=1e-2)  # deltas matter

    cfg, t = ours.config, cu[-1]
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    h = cfg.hidden_size
    per_layer = [  # (group, x cols, out cols, member widths)
        ("qkv_proj", h, q + 2 * kv, (q, kv, kv)),
        ("o_proj", q, h, (h,)),
        ("gate_up_proj", h, 2 * inter, (inter, inter)),
        ("down_proj", inter, h, (h,)),
    ]
    expected = [(i, g, (t, xc), (t, oc), w) for i in range(2) for g, xc, oc, w in per_layer]
    expected.append((-1, "lm_head", (t, cfg.hidden_size), (t, cfg.vocab_size), None))
    assert adapter.calls == expected

    adapter.calls.clear()
    for step in range(3):
        logits = runner.decode([40 + step, 50 + step], adapter_data=adapter)
        for b, seq in enumerate(runner.seqs):
            torch.testing.assert_close(logits[b], hf_logits(hf_lora, seq)[-1], atol=1e-4, rtol=0)
    assert len(adapter.calls) == 3 * (2 * len(per_layer) + 1)


def test_lm_head_hook_sees_only_selected_rows(model_pair):
    ours, _, _ = model_pair(heads=4, kv_heads=2)
    deltas = {(i, t): torch.zeros(1) for i in range(2) for t in TARGETS}
    deltas[(-1, "lm_head")] = torch.zeros(ours.config.vocab_size, ours.config.hidden_size)
    adapter = DeltaAdapter(deltas)
    adapter.add_lora = lambda i, t, x, out, w=None: adapter.calls.append(
        (i, t, tuple(x.shape), tuple(out.shape))
    )
    PagedRunner(ours, KVCache.for_model(ours, 16)).prefill(
        random_prompts([6, 9], 512), adapter_data=adapter, last_only=True
    )
    assert adapter.calls[-1] == (-1, "lm_head", (2, 64), (2, 512))
