"""LoRA under tensor parallelism: world sizes 2 and 4 (gloo, CPU, float32) equal world size 1 within 1e-5.

One paged batch mixes the base model and two PEFT adapters whose ranks (3 and 5) divide neither world
size, targeting every column-parallel projection (q/k/v, gate/up), both row-parallel ones (o_proj,
down_proj) and lm_head; ragged prefill (every position's logits, and last tokens only through
lm_head_indices as the engine asks) then decode steps, one with a CUDA-graph padding row. Shapes: query
and KV heads split evenly, KV heads replicated (fewer than ranks) under a sliding window, a single KV
head, and a vocabulary that is not a multiple of the world size.
World size 1 (the truth here) is itself checked against PEFT in test_lora_vs_peft.py.

The row-parallel derivation (docs/tensor_parallel.md) is tested by running alternative placements of
the LoRA delta through the real model: the exact ones pass, the double-counting ones and the S-LoRA
slice added after the base all-reduce fail by far more than the tolerance, so this file would catch them.
"""

from __future__ import annotations

import pytest
import torch
from mistral_harness import PagedRunner, random_prompts
from test_tensor_parallel import run_ranks

from cache.adapter_store import AdapterStore
from cache.kv_cache import KVCache
from model.adapters.batch import AdapterBatchData
from model.adapters.peft_loader import ROW_PARALLEL
from model.flash_mistral import FlashMistralForCausalLM
from model.parallel import TPGroup
from shard_server.types import AdapterSpec

ATOL = 1e-5  # float32; the sums only regroup (per-rank partial sums, then the all-reduce)
VOCAB = 509  # not a multiple of 2 or 4: the last rank's LM-head rows are padding
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # index -> adapter_factory kwargs; ranks 3 and 5 divide neither 2 nor 4
    1: dict(rank=3, target_modules=ALL, seed=31),
    2: dict(rank=5, target_modules=("k_proj", "o_proj", "up_proj", "down_proj", "lm_head"),
            use_rslora=True, seed=32),
}  # fmt: skip
REQUEST_ADAPTERS = [1, 0, 2, 1, 2]  # interleaved with the base model: several segments
PROMPTS = random_prompts([9, 4, 14, 6, 11], VOCAB, seed=5)
DECODE = [[40 + i, 80 + i, 120 + i, 160 + i, 200 + i] for i in range(3)]
PAD_STEP = 1  # this decode step carries one padding row (slot -1, adapter index 0), as a graph bucket does

SHAPES = {  # name -> tiny_model_factory kwargs
    "split": dict(heads=8, kv_heads=4, head_dim=16, vocab=VOCAB, seed=3),  # head_dim != hidden / heads
    "replicated-window": dict(heads=8, kv_heads=2, sliding_window=8, vocab=VOCAB, seed=4),
    "mqa": dict(heads=8, kv_heads=1, vocab=VOCAB, seed=6),
}
CASES = [("split", 2), ("split", 4), ("replicated-window", 4), ("mqa", 2)]


def last_rows() -> torch.Tensor:
    return torch.tensor([len(p) for p in PROMPTS]).cumsum(0) - 1


def _spec(d) -> AdapterSpec:
    return AdapterSpec(adapter_ids=(str(d),), source="local")


def _run(model, store, wrap=None, requests=REQUEST_ADAPTERS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill (all positions) + decode steps; store None: no adapters. -> (prefill logits, step logits)."""
    runner = PagedRunner(model, KVCache.for_model(model, 48), seed=3)
    wrap = wrap or (lambda d: d)
    data = None
    if store is not None:
        data = wrap(store.batch_data(requests, [len(p) for p in PROMPTS], is_prefill=True))
    logits, _ = runner.prefill(PROMPTS, adapter_data=data)
    steps = []
    for i, tokens in enumerate(DECODE):
        pad = 1 if i == PAD_STEP else 0
        if store is not None:
            data = wrap(store.batch_data(requests + [0] * pad, [1] * (len(tokens) + pad), False))
        steps.append(runner.decode(tokens, pad_rows=pad, adapter_data=data)[: len(tokens)])
    return logits, steps


def _with_and_without_adapters(tp: TPGroup, model_dir: str, adapter_dirs: dict[int, str]) -> dict:
    model = FlashMistralForCausalLM.from_pretrained(model_dir, tp=tp)
    store = AdapterStore(model.config, tp=tp)
    for i, d in adapter_dirs.items():
        store.load(i, _spec(d))
    # The engine's prefill: logits of each sequence's last token only (lm_head LoRA on selected rows).
    runner = PagedRunner(model, KVCache.for_model(model, 48), seed=5)
    data = store.batch_data(REQUEST_ADAPTERS, [len(p) for p in PROMPTS], True, lm_head_indices=last_rows())
    last_logits, _ = runner.prefill(PROMPTS, last_only=True, adapter_data=data)
    return {"base": _run(model, None), "lora": _run(model, store), "lora-last": (last_logits, [])}


def _assert_close(got, want, what: str, atol: float = ATOL) -> float:
    (gl, gs), (wl, ws) = got, want
    worst = 0.0
    steps = zip(gs, ws, strict=True)
    pairs = [("prefill", gl, wl)] + [(f"decode {i}", a, b) for i, (a, b) in enumerate(steps)]
    for name, g, w in pairs:
        err = (g - w).abs().max().item()
        assert err <= atol, f"{what}: {name} logits differ from world size 1 by {err:.3g} > {atol}"
        worst = max(worst, err)
    return worst


@pytest.fixture(scope="module")
def dirs(tiny_model_factory, adapter_factory):
    """dirs(name) -> (model dir, {index: adapter dir}); made on first use, so each test pays for its own."""

    def get(name: str) -> tuple[str, dict[int, str]]:
        base = tiny_model_factory(**SHAPES[name])
        return str(base), {i: str(adapter_factory(base, **kw)) for i, kw in ADAPTERS.items()}

    return get


@pytest.fixture(scope="module")
def world1(dirs):
    """world1(name): the truth, the same code at world size 1 (no process group) in this process."""
    made = {}

    def get(name: str) -> dict:
        if name not in made:
            made[name] = _with_and_without_adapters(TPGroup(), *dirs(name))
        return made[name]

    return get


@pytest.mark.parametrize("shape,world", CASES, ids=[f"{s}-w{w}" for s, w in CASES])
def test_tp_logits_equal_world_size_1_with_and_without_adapters(dirs, world1, shape, world, tmp_path):
    model_dir, adapter_dirs = dirs(shape)
    truth = world1(shape)
    per_rank = run_ranks(_with_and_without_adapters, world, tmp_path, model_dir, adapter_dirs)
    # The adapters really move the logits, so equality below is not the base model agreeing with itself.
    assert (truth["lora"][0] - truth["base"][0]).abs().max() > 1e-1
    # lm_head_indices picks rows of the full prefill: the same numbers, from a different code path.
    assert (truth["lora-last"][0] - truth["lora"][0][last_rows()]).abs().max() <= ATOL
    for r, got in enumerate(per_rank):
        for key in ("base", "lora", "lora-last"):
            worst = _assert_close(got[key], truth[key], f"{shape}, world {world}, rank {r}, {key}")
            print(f"{shape} world {world} rank {r} {key}: max |logits - world 1| = {worst:.3g}")
    # Identical batch state on every rank: greedy/seeded sampling then picks the same tokens everywhere.
    for r, got in enumerate(per_rank[1:], start=1):
        for key in ("base", "lora"):
            assert torch.equal(got[key][0], per_rank[0][key][0]), f"rank {r} prefill differs from rank 0"


# ---- row-parallel LoRA: where the delta is added decides whether it is counted once -------------------


class _RowScheme(AdapterBatchData):
    """The same LoRA weights and slots, with the row-parallel delta placed by another scheme.

    add_lora is called after the base all-reduce. A scheme that adds a per-rank term d_r *before* the
    base all-reduce is modelled exactly by `out += all_reduce(d_r)` here, since all_reduce(base_r + d_r)
    == all_reduce(base_r) + all_reduce(d_r): the all-reduce is a sum.
    """

    scheme = "ours"

    def add_lora(self, layer_idx, target, x, out, widths=None):
        if target not in ROW_PARALLEL or self.scheme == "ours" or not self.meta.has_lora:
            return super().add_lora(layer_idx, target, x, out, widths)
        stack = self._stack(layer_idx, target)  # A: this rank's input columns; B: full
        rows = self._rows_for(False, stack.a.shape[0])
        v = self.ops.reduced(self.ops.shrink(x, stack, rows))  # [T, R] partial sum
        world, rank = self.tp.world_size, self.tp.rank
        reduce = lambda t: torch.distributed.all_reduce(t, group=self.tp.group) or t  # noqa: E731
        if self.scheme != "partial-before-reduce":
            reduce(v)  # every other scheme first makes v the full shrink x @ A.T
        d = torch.zeros_like(out)
        self.ops.expand(d, v, stack, [(0, out.shape[1], 0)], rows)
        if self.scheme.startswith("slice"):  # S-LoRA: B sharded on out; rank r adds its column block only
            n = out.shape[1] // world
            keep = torch.zeros_like(d)
            keep[:, rank * n : (rank + 1) * n] = 1
            d *= keep
        if self.scheme == "full-b-before-reduce/W":
            d /= world
        if self.scheme == "slice-after-reduce":
            out += d  # never summed over ranks: each rank holds the delta on its own columns only
        else:
            out += reduce(d)


SCHEMES = {  # scheme -> exact (equals world size 1)?
    "ours": True,  # all-reduce v [T, r], full B, added after the base all-reduce
    "partial-before-reduce": True,  # v_r @ B.T before the base all-reduce: linear, so also exact
    "full-b-before-reduce": False,  # all-reduced v, full B, before the base all-reduce: W times the delta
    "full-b-before-reduce/W": True,  # the same with the 1/W factor
    "slice-before-reduce": True,  # all-reduced v, B sliced on out, rank's columns, then the base all-reduce
    "slice-after-reduce": False,  # the same slice added after a base layer that already all-reduced
}


ROW_REQUESTS = [1, 0, 1, 1, 0]


def _schemes(tp: TPGroup, model_dir: str, adapter_dir: str) -> dict:
    model = FlashMistralForCausalLM.from_pretrained(model_dir, tp=tp)
    store = AdapterStore(model.config, tp=tp)
    store.load(1, _spec(adapter_dir))
    out = {}
    for scheme in SCHEMES:
        cls = type(f"Scheme_{scheme}", (_RowScheme,), {"scheme": scheme})
        wrap = lambda d, cls=cls: cls(d.meta, d.stacks, d.is_prefill, d.tp)  # noqa: E731
        out[scheme] = _run(model, store, wrap, ROW_REQUESTS)
    return out


def test_row_parallel_lora_placement_schemes(tiny_model_factory, adapter_factory, tmp_path):
    base = tiny_model_factory(**SHAPES["split"])
    adapter = str(adapter_factory(base, rank=3, target_modules=("o_proj", "down_proj"), seed=41))
    model = FlashMistralForCausalLM.from_pretrained(base)
    store = AdapterStore(model.config)
    store.load(1, _spec(adapter))
    truth = _run(model, store, requests=ROW_REQUESTS)
    assert (truth[0] - _run(model, None)[0]).abs().max() > 1e-1  # the row-parallel delta matters
    per_rank = run_ranks(_schemes, 2, tmp_path, str(base), adapter)
    for scheme, exact in SCHEMES.items():
        got = per_rank[0][scheme]
        print(f"scheme {scheme}: max |logits - world 1| = {(got[0] - truth[0]).abs().max().item():.3g}")
        if exact:
            _assert_close(got, truth, f"scheme {scheme}")
        else:
            err = (got[0] - truth[0]).abs().max().item()
            assert err > 1e-2, f"scheme {scheme} should be wrong but is within {err:.3g} of world size 1"
