"""The `flash-attn` package: varlen prefill and paged decode (`flash_attn_with_kvcache`).

Its paged decode requires KV blocks of 256 tokens, hence `block_size = 256`; the runner sizes the
cache with the selected backend's block size. An FP8 cache is not supported by its kernels: decode then
falls back to the torch paged decode (which dequantizes).
"""

from __future__ import annotations

from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from model.attention import AttentionBackend
from model.attention.reference import gather_prefill_kv, paged_decode


def _window(window: int | None) -> tuple[int, int]:
    # flash-attn's left window counts keys before the query; transformers' W includes the query.
    return (-1, -1) if window is None else (window - 1, 0)


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    block_size = 256

    def prefill(self, q, k, v, kv, seqlen, block_tables, *, scale, window):
        cu_k, max_k = seqlen.cu_seqlen_q, seqlen.max_q
        if block_tables is not None and seqlen.has_cached_prefix():
            # Not flash_attn's block_table path: the new tokens are not in the cache yet (see base class).
            k, v = gather_prefill_kv(k, v, kv, seqlen, block_tables)
            cu_k, max_k = seqlen.cu_seqlen_k, seqlen.max_k
        return flash_attn_varlen_func(
            q,
            k,
            v,
            seqlen.cu_seqlen_q,
            cu_k,
            seqlen.max_q,
            max_k,
            softmax_scale=scale,
            causal=True,
            window_size=_window(window),
        )

    def decode(self, q, kv, seqlen, block_tables, max_s, *, scale, window):
        if kv.k.dtype != q.dtype:
            return paged_decode(q, kv, seqlen, block_tables, max_s, scale=scale, window=window)
        # cache_seqlens is the true length: flash-attn applies the window by absolute position itself,
        # and its causal mask is aligned bottom-right, so Q query tokens per sequence (a verify step)
        # are the last Q positions.
        num_seqs = seqlen.input_lengths.shape[0]
        out = flash_attn_with_kvcache(
            q.unflatten(0, (num_seqs, q.shape[0] // num_seqs)),
            kv.k,
            kv.v,  # q [B, Q, Hq, D]; k/v [blocks, 256, Hkv, D]
            cache_seqlens=seqlen.input_lengths,
            block_table=block_tables,
            softmax_scale=scale,
            causal=True,
            window_size=_window(window),
        )
        return out.flatten(0, 1)  # [B * Q, Hq, D]
