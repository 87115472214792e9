"""How many KV blocks the cache gets: a small default before Warmup, then what free memory allows.

On CUDA, Warmup runs the router's worst-case batch with peak-memory tracking; the KV cache then gets
the free memory minus that batch's activation peak (which serving needs again) and a safety margin:

    blocks = (free + current KV bytes - activation peak - margin) // bytes per block

On CPU there is no free-memory query worth trusting, so `--max-kv-cache-bytes` decides (default: keep
the start-up size). The KV dtype's real element size counts: an FP8 cache holds twice the tokens.
"""

from __future__ import annotations

import torch

from cache.kv_cache import KVCache

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
