"""Merge several LoRA adapters into one (AdapterParameters with several adapter_ids and weights).

LINEAR (the only strategy served), exact semantics per module (layer, target):

    delta_merged = sum_i w_i * delta_i            where delta_i = B_i @ A_i  (B_i already scaled)

realised without approximation by concatenating along the rank dimension:

    A_merged = cat([A_i for i targeting the module], dim=0)          [sum r_i, in]
    B_merged = cat([w_i * B_i for the same i], dim=1)                [out, sum r_i]

so the merged rank is the sum of the ranks (refused above MAX_RANK). A module only some adapters target
gets only their terms. Empty `weights` means uniform 1/n.

TIES and DARE are refused (Unimplemented): both operate on dense deltas
(trim/sign-elect or random drop-and-rescale) and have no exact low-rank form, so serving them would need a
truncated SVD whose error we would have to define and test first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.adapters.peft_loader import MAX_RANK, LoraAdapter
from model.errors import InvalidArgument, Unimplemented

SUPPORTED_STRATEGIES = ("linear",)


def check_strategy(strategy: str) -> str:
    """Normalised strategy name; Unimplemented for TIES/DARE or unknown ones."""
    strategy = strategy.lower()
    if strategy not in SUPPORTED_STRATEGIES:
        raise Unimplemented(
            f"merge strategy {strategy!r} is not supported; supported: {', '.join(SUPPORTED_STRATEGIES)}"
        )
    return strategy


def merge_adapters(
    adapters: Sequence[LoraAdapter], weights: Sequence[float] = (), strategy: str = "linear", name: str = ""
) -> LoraAdapter:
    """Merge `adapters` with `weights` by `strategy` (module docstring). One adapter, weight 1: itself."""
    check_strategy(strategy)
    if not adapters:
        raise InvalidArgument("merge needs at least one adapter")
    if not weights:
        weights = [1.0 / len(adapters)] * len(adapters)
    if len(weights) != len(adapters):
        raise InvalidArgument(f"merge got {len(adapters)} adapters but {len(weights)} weights")
    if len(adapters) == 1 and weights[0] == 1.0:
        return adapters[0]

    keys = sorted({k for ad in adapters for k in ad.weights})
    merged = LoraAdapter(name=name or "+".join(ad.name for ad in adapters))
    for key in keys:
        terms = [(ad.weights[key], w) for ad, w in zip(adapters, weights, strict=True) if key in ad.weights]
        a = torch.cat([ab[0] for ab, _ in terms], dim=0)  # [sum r_i, in]
        b = torch.cat([ab[1] * w for ab, w in terms], dim=1)  # [out, sum r_i]
        if a.shape[0] > MAX_RANK:
            raise InvalidArgument(
                f"linear merge of layer {key[0]} {key[1]} has rank {a.shape[0]} > {MAX_RANK} (sum of ranks)"
            )
        merged.weights[key] = (a, b)
    return merged
