"""Merge several LoRA adapters into one (AdapterParameters with several adapter_ids and weights).

Inputs are the modules of each adapter as read from its file: (A [r, in], B [out, r], scale) with the
PEFT scaling s_i = alpha_i / r_i (or / sqrt(r_i)) not yet folded in. The result has scale 1.

LINEAR, exact per module (layer, target): delta = sum_i w_i * s_i * B_i @ A_i, realised by
concatenating along the rank (PEFT's "cat"): A = cat_i(A_i) [sum r_i, in], B = cat_i(w_i s_i B_i).
The merged rank is the sum of the ranks (refused above MAX_RANK). Empty `weights` means uniform 1/n.

TIES, DARE_LINEAR, DARE_TIES: PEFT's `add_weighted_adapter` for LoRA (peft 0.21,
`LoraModel._generalized_task_arithmetic_weighted_adapter`): the task-arithmetic functions of
`peft.utils.merge_utils` are applied to the A factors and to the B factors separately, never to the
dense deltas, with per-adapter weights split between the two sides so that their product is w_i * s_i:

    wA_i = sign(w_i s_i) * sqrt(|w_i s_i|)         wB_i = sqrt(|w_i s_i|)
    A = f([A_i], wA)    B = f([B_i], wB)           f = ties | dare_linear | dare_ties (merge_utils)

  ties:        keep the top int(density * numel) |values| of each A_i (B_i), elect a sign per element
               over the kept unweighted values (sum: "total", or count of signs: "frequency"), then
               sum the weighted values agreeing with it, divided by how many agreed (at least 1)
  dare_linear: keep each element with probability `density`, divide the kept ones by `density`, then
               the weighted sum
  dare_ties:   DARE's random drop-and-rescale, then TIES' sign election and disjoint mean

Only adapters that target a module take part in it. PEFT needs equal ranks for these; here every
factor is zero-padded to R = the largest rank of any merged module first (so the result equals
PEFT's merge of the adapters saved zero-padded to rank R), and the merged adapter has rank R.
`density` must be in (0, 1]; at 1 nothing is pruned and no random number is drawn, as in PEFT.

DARE's masks come from `torch.bernoulli` on one CPU `torch.Generator` seeded with `merge_seed(...)`: a
hash of the adapter ids, weights, strategy, density and sign method. The same merge request therefore
gives bit-identical weights on every tensor-parallel rank (each merges the full tensors, then slices)
and after every reload. Masks are drawn in PEFT's order (modules in the model's order: layers up, q, k,
v, o, gate, up, down, then lm_head; per module every adapter's A, then every adapter's B), so PEFT with
its global generator seeded to the same value right before merging draws the same masks.

One PEFT difference on purpose: PEFT gives the merged adapter lora_alpha = r and copies use_rslora from
the first adapter, so when that one uses rsLoRA PEFT's merged delta carries an extra factor sqrt(r);
here the merged delta is always the weighted factors' product with scale 1.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from model.adapters.peft_loader import MAX_RANK, TARGETS, LoraAdapter, LoraModule
from model.errors import InvalidArgument

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
Modules = Mapping[tuple[int, str], LoraModule]


@dataclass(frozen=True)
class MergeParams:
    strategy: str = "linear"
    weights: tuple[float, ...] = ()  # one per adapter (already defaulted: never empty once checked)
    density: float = 1.0
    majority_sign_method: str = "total"


def check_merge(num_adapters: int, weights: Sequence[float] = (), strategy: str = "linear",
                density: float = 1.0, majority_sign_method: str = "total") -> MergeParams:  # fmt: skip
    """Validated parameters (uniform 1/n weights when none are given); InvalidArgument names the problem.

    Runs before any file is read, so a bad request costs nothing.
    """
    strategy = strategy.lower()
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"merge strategy {strategy!r} is unknown; known: {', '.join(STRATEGIES)}")
    if num_adapters < 1:
        raise InvalidArgument("merge needs at least one adapter")
    weights = tuple(float(w) for w in weights)
    if weights and len(weights) != num_adapters:
        raise InvalidArgument(f"merge got {num_adapters} adapters but {len(weights)} weights")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise InvalidArgument(f"merge weights must be finite; got non-finite {bad} in {list(weights)}")
    weights = weights or (1.0 / num_adapters,) * num_adapters
    if strategy == "linear":
        return MergeParams("linear", weights)
    if num_adapters < 2:
        raise InvalidArgument(f"a {strategy.upper()} merge needs at least two adapters; got one")
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise InvalidArgument(f"merge density must be in (0, 1] for {strategy.upper()}; got {density}")
    method = majority_sign_method.lower()
    if method not in SIGN_METHODS:
        raise InvalidArgument(
            f"majority_sign_method {majority_sign_method!r} is unknown; known: {', '.join(SIGN_METHODS)}"
        )
    return MergeParams(strategy, weights, float(density), method)


def merge_seed(adapter_ids: Sequence[str], params: MergeParams) -> int:
    """The DARE generator's seed: a hash of everything that defines the merge (63 bits)."""
    what = [list(adapter_ids), list(params.weights), params.strategy, params.density,
            params.majority_sign_method]  # fmt: skip
    digest = hashlib.sha256(json.dumps(what).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def module_order(key: tuple[int, str]) -> tuple[float, int]:
    """The model's module order (named_modules of transformers' Mistral): layers up, lm_head last."""
    layer, target = key
    return (math.inf if layer < 0 else layer, TARGETS.index(target))


def merge_modules(adapters: Sequence[Modules], params: MergeParams, seed: int = 0) -> dict:
    """Merge per the module docstring -> {(layer, target): LoraModule(A, B, scale=1.0)}, float32.

    `params` from check_merge; `seed` (merge_seed) drives DARE's masks only.
    """
    if len(params.weights) != len(adapters):
        raise InvalidArgument(f"merge got {len(adapters)} adapters but {len(params.weights)} weights")
    keys = sorted({k for ad in adapters for k in ad}, key=module_order)
    merged: dict[tuple[int, str], LoraModule] = {}
    if params.strategy == "linear":
        for key in keys:
            terms = [(ad[key], w) for ad, w in zip(adapters, params.weights, strict=True) if key in ad]
            a = torch.cat([m.a.float() for m, _ in terms], dim=0)  # [sum r_i, in]
            b = torch.cat([m.b.float() * (w * m.scale) for m, w in terms], dim=1)  # [out, sum r_i]
            if a.shape[0] > MAX_RANK:
                raise InvalidArgument(
                    f"linear merge of layer {key[0]} {key[1]} has rank {a.shape[0]} > {MAX_RANK} "
                    "(sum of ranks)"
                )
            merged[key] = LoraModule(a, b, 1.0)
        return merged

    rank = max(m.a.shape[0] for ad in adapters for m in ad.values())
    gen = torch.Generator().manual_seed(seed)
    for key in keys:
        a_terms, b_terms, w_a, w_b = [], [], [], []
        for ad, w in zip(adapters, params.weights, strict=True):
            if key not in ad:
                continue
            m = ad[key]
            ws = w * m.scale
            w_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign goes on one side only
            w_b.append(math.sqrt(abs(ws)))
            a_terms.append(_pad(m.a.float(), rank, dim=0))  # [R, in]
            b_terms.append(_pad(m.b.float(), rank, dim=1))  # [out, R]
        a = _combine(a_terms, torch.tensor(w_a), params, gen)
        b = _combine(b_terms, torch.tensor(w_b), params, gen)
        merged[key] = LoraModule(a, b, 1.0)
    return merged


def merge_adapters(adapters: Sequence[LoraAdapter], weights: Sequence[float] = (), strategy: str = "linear",
                   name: str = "") -> LoraAdapter:  # fmt: skip
    """LINEAR merge of already-scaled LoraAdapters (tests, tools); one adapter, weight 1: itself."""
    params = check_merge(len(adapters), weights, strategy)
    if params.strategy != "linear":
        raise InvalidArgument("merge_adapters takes scaled adapters: use merge_modules for TIES/DARE")
    if len(adapters) == 1 and params.weights[0] == 1.0:
        return adapters[0]
    as_modules = [{k: LoraModule(a, b, 1.0) for k, (a, b) in ad.weights.items()} for ad in adapters]
    out = LoraAdapter(name=name or "+".join(ad.name for ad in adapters))
    for key, m in merge_modules(as_modules, params).items():
        out.weights[key] = (m.a, m.b)
    return out


def _pad(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _combine(tensors: list[torch.Tensor], weights: torch.Tensor, params: MergeParams,
             gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """peft.utils.merge_utils.{ties, dare_linear, dare_ties}(tensors, weights, density, method)."""
    d = params.density
    if params.strategy == "ties":
        tensors = [_magnitude_prune(t, d) for t in tensors]
    else:
        tensors = [_random_prune(t, d, gen) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # [n, ...]
    weighted = stacked * weights.view((-1,) + (1,) * (stacked.dim() - 1))
    if params.strategy == "dare_linear":
        return weighted.sum(dim=0)
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if params.majority_sign_method == "total" else sign.sum(dim=0)
    majority = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * majority).sum(dim=0) / torch.clamp(majority.sum(dim=0), min=1.0)


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * mask / density
