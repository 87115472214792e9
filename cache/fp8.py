"""FP8 (e4m3) KV cache scales: per layer one K and one V scale, stored = real / scale.

Where scales come from (the engine decides, in this order):
1. the checkpoint: tensors `model.layers.{i}.self_attn.k_scale` / `v_scale` (one element each, as
   other servers export them) — all layers or none;
2. otherwise calibration at Warmup: K/V of calibration prompts are written to a full-precision scratch
   cache; per layer the largest |K| and |V| (amax) sets scale = amax * CALIBRATION_MARGIN / 448.
   e4m3's relative precision is the same over its whole normal range, so the margin (one binade)
   costs almost nothing, while a value above 448 * scale would saturate: the margin covers decode-time
   keys larger than any seen in calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from cache.kv_cache import KVCache

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn
CALIBRATION_MARGIN = 2.0


class TensorSource(Protocol):
    def __contains__(self, name: str) -> bool: ...
    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class KVScales:
    k: tuple[float, ...]  # [layers]
    v: tuple[float, ...]
    source: str  # "checkpoint" | "calibrated"

    @classmethod
    def from_amax(
        cls, k_amax: Sequence[float], v_amax: Sequence[float], margin: float = CALIBRATION_MARGIN
    ) -> KVScales:
        def scale(a: float) -> float:
            if not a > 0.0:  # all-zero K/V (or NaN): any scale represents it; 1.0 keeps it readable
                return 1.0
            return a * margin / FP8_E4M3_MAX

        return cls(tuple(map(scale, k_amax)), tuple(map(scale, v_amax)), "calibrated")

    def apply(self, cache: KVCache) -> None:
        """Write the scales into the cache's scale tensors in place (their addresses stay: graphs)."""
        if len(cache.layers) != len(self.k):
            raise ValueError(f"{len(self.k)} layer scales for a cache of {len(cache.layers)} layers")
        for layer, ks, vs in zip(cache.layers, self.k, self.v, strict=True):
            if layer.k_scale is None:
                raise ValueError(f"a {cache.dtype} cache has no scales to set")
            layer.k_scale.fill_(ks)
            layer.v_scale.fill_(vs)


def read_kv_scales(weights: TensorSource, num_layers: int) -> KVScales | None:
    """Per-layer scales from a checkpoint; None when it has none. A partial set is an error."""
    names = [
        (f"model.layers.{i}.self_attn.k_scale", f"model.layers.{i}.self_attn.v_scale")
        for i in range(num_layers)
    ]
    present = [n for pair in names for n in pair if n in weights]
    if not present:
        return None
    if len(present) != 2 * num_layers:
        missing = next(n for pair in names for n in pair if n not in weights)
        raise ValueError(f"checkpoint has KV scales for some layers only: '{missing}' is missing")

    def value(name: str) -> float:
        t = weights.get(name)
        if t.numel() != 1:
            raise ValueError(f"checkpoint tensor '{name}' has {t.numel()} elements; one per layer expected")
        v = float(t.float().reshape(()))
        if not v > 0.0:
            raise ValueError(f"checkpoint tensor '{name}' = {v}; a KV scale must be > 0")
        return v

    return KVScales(
        tuple(value(k) for k, _ in names), tuple(value(v) for _, v in names), "checkpoint"
    )


def layer_amax(cache: KVCache) -> tuple[list[float], list[float]]:
    """Per layer max |K| and max |V| over the whole (zero-initialised) cache: what was written."""
    k = [float(layer.k.abs().amax()) for layer in cache.layers]
    v = [float(layer.v.abs().amax()) for layer in cache.layers]
    return k, v
