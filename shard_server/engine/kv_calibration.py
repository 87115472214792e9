"""The KV cache's FP8 scales over the engine's life: from the checkpoint, or calibrated at Warmup.

Every cache the engine allocates (start-up, Warmup's resizes) gets the current scales. Without
checkpoint scales an FP8 cache starts at scale 1.0 and Warmup calibrates (cache/fp8.py says how):
the calibration prompts are the Warmup batch's plus one sequence of distinct vocabulary ids (the
router's warmup text repeats one word, which alone would under-represent the keys of real text).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from cache.fp8 import CALIBRATION_MARGIN, KVScales, layer_amax, read_kv_scales
from cache.kv_cache import FP8_DTYPES, KVCache
from model.weights import Weights
from shard_server.executor.runner import ModelRunner, PrefillSeq

log = logging.getLogger(__name__)

CALIBRATION_VOCAB_TOKENS = 512  # length cap of the vocabulary-spread calibration sequence


class KVScaleKeeper:
    def __init__(self, model, kv_dtype: torch.dtype, model_dir: Path | str):
        self.model = model
        self.kv_dtype = kv_dtype
        self.fp8 = kv_dtype in FP8_DTYPES
        self.scales: KVScales | None = None
        if self.fp8:
            weights = Weights.from_dir(model_dir, dtype=torch.float32)
            self.scales = read_kv_scales(weights, model.config.num_hidden_layers)
            if self.scales is not None:
                log.info(
                    "fp8 KV cache: per-layer scales from the checkpoint: k %s, v %s",
                    _fmt(self.scales.k), _fmt(self.scales.v),
                )
            else:
                log.info("fp8 KV cache: no k_scale/v_scale in the checkpoint; Warmup will calibrate them")

    @property
    def needs_calibration(self) -> bool:
        return self.fp8 and (self.scales is None or self.scales.source == "calibrated")

    def new_cache(self, num_blocks: int) -> KVCache:
        cache = KVCache.for_model(self.model, num_blocks, self.kv_dtype)
        if self.scales is not None:
            self.scales.apply(cache)
        return cache

    @torch.inference_mode()
    def calibrate(self, runner: ModelRunner, prompts: Sequence[Sequence[int]], max_input_length: int) -> None:
        """Forward the calibration prompts through a full-precision scratch cache (base model, no
        adapters); per-layer K/V amax -> scales, applied to the runner's current cache."""
        vocab = self.model.config.vocab_size
        n = max(1, min(vocab, max_input_length or CALIBRATION_VOCAB_TOKENS, CALIBRATION_VOCAB_TOKENS))
        spread = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:n].tolist()
        groups = [list(prompts), [spread]] if prompts else [[spread]]
        bs = self.model.block_size
        blocks = sum(-(-len(p) // bs) for g in groups for p in g) + 1
        scratch = KVCache.for_model(self.model, blocks, self.model.dtype)
        serving, runner.kv_cache = runner.kv_cache, scratch
        try:
            next_block = 1  # block 0 stays reserved, as in every cache
            for group in groups:  # separate forwards: none larger than the Warmup batch itself
                seqs = []
                for p in group:
                    table = list(range(next_block, next_block + -(-len(p) // bs)))
                    next_block += len(table)
                    seqs.append(PrefillSeq(list(p), block_table=table, adapter_index=0))
                runner.prefill(seqs)
            k_amax, v_amax = layer_amax(scratch)
        finally:
            runner.kv_cache = serving
            del scratch
        self.scales = KVScales.from_amax(k_amax, v_amax)
        self.scales.apply(runner.kv_cache)
        tokens = sum(len(p) for g in groups for p in g)
        log.info(
            "fp8 KV cache: scales calibrated at Warmup from %d tokens in %d sequences "
            "(per-layer amax x %.1f / 448): k %s, v %s",
            tokens, sum(len(g) for g in groups), CALIBRATION_MARGIN, _fmt(self.scales.k), _fmt(self.scales.v),
        )


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"
