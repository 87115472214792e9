"""The KV cache the engine allocates: how many blocks it gets, and its FP8 scales.

Size: a small default before Warmup, then what free memory allows.

On CUDA, Warmup runs the router's worst-case batch with peak-memory tracking; the KV cache then gets
the free memory minus that batch's activation peak (which serving needs again) and a safety margin:

    blocks = (free + current KV bytes - activation peak - margin) // bytes per block

On CPU there is no free-memory query worth trusting, so `--max-kv-cache-bytes` decides (default: keep
the start-up size). The KV dtype's real element size counts: an FP8 cache holds twice the tokens.

FP8 scales, over the engine's life: from the checkpoint, or calibrated at Warmup.

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

DEFAULT_TOKENS = 16384  # before Warmup: enough for the first requests of a small deployment
CUDA_MARGIN_FRACTION = 0.05  # of total device memory, for CUDA graphs, sampler buffers, fragmentation


class KVSizing:
    def __init__(self, model, kv_dtype: torch.dtype, max_kv_cache_bytes: int | None):
        self.model = model
        self.device = model.device
        self.block_size = model.block_size
        cfg = model.config
        local_kv_heads = model.model.layers[0].self_attn.num_kv_heads
        self.bytes_per_block = self.block_size * KVCache.bytes_per_token_for(
            cfg.num_hidden_layers, local_kv_heads, cfg.head_dim, kv_dtype
        )
        self.max_bytes = max_kv_cache_bytes
        self._baseline = 0

    def _cap(self, blocks: int) -> int:
        if self.max_bytes is not None:
            blocks = min(blocks, self.max_bytes // self.bytes_per_block)
        return max(blocks, 2)  # block 0 is reserved: at least one usable block

    def initial_blocks(self) -> int:
        blocks = -(-DEFAULT_TOKENS // self.block_size) + 1
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            blocks = min(blocks, int(0.1 * free) // self.bytes_per_block)
        return self._cap(blocks)

    def blocks_for_tokens(self, tokens: int, sequences: int) -> int:
        """Enough blocks for a batch of `tokens` positions over `sequences` sequences (warmup)."""
        return -(-tokens // self.block_size) + sequences + 1

    def start_peak_tracking(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)

    def blocks_after_warmup(self, current: KVCache | None) -> int:
        if self.device.type != "cuda":
            if self.max_bytes is None:
                return self.initial_blocks()
            return self._cap(self.max_bytes // self.bytes_per_block)
        torch.cuda.synchronize(self.device)
        activation_peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._baseline)
        current_bytes = 0 if current is None else current.num_blocks * self.bytes_per_block
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free + current_bytes - activation_peak - int(CUDA_MARGIN_FRACTION * total)
        return self._cap(budget // self.bytes_per_block)


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
