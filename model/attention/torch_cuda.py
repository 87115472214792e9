"""CUDA backend on PyTorch's bundled FlashAttention-2 (`torch.nn.attention.varlen.varlen_attn`).

Prefill: varlen_attn's FlashAttention-2 op over the flattened batch (causal, bottom-right aligned when a
sequence continues from a cached prefix, which `gather_prefill_kv` lays out in front of the new tokens),
called directly (`flash_varlen`) where this torch has it, else through varlen_attn. Decode: our
Triton paged kernel (model/kernels/paged_attention.py: GQA-grouped, split-K, reads each sequence's own
length only) when triton is importable, else the sync-free gather in torch (reference.paged_decode),
which reads `max_s` keys for every sequence.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
from torch.nn.attention.varlen import varlen_attn

from model.attention import AttentionBackend
from model.attention.reference import gather_prefill_kv, paged_decode

TRITON_HEAD_DIMS = (64, 128, 256)  # model/kernels/paged_attention.py asserts these


class TorchCudaBackend(AttentionBackend):
    name = "torch_cuda"
    block_size = 16
    # the shortest flash-decoding split of the Triton decode kernel (None: its heuristic's)
    min_split_tokens: int | None = None

    def __init__(self) -> None:
        # Older torch (2.11) has no enable_gqa: repeat the KV heads instead.
        self._native_gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters
        op = getattr(torch.ops.aten, "_flash_attention_forward", None)
        self._direct = op is not None and "window_size_left" in str(op.default._schema)
        self._triton_decode = None
        if importlib.util.find_spec("triton") is not None:
            from model.kernels.paged_attention import paged_decode_attention

            self._triton_decode = paged_decode_attention

    def prefill(self, q, k, v, kv, seqlen, block_tables, *, scale, window):
        cu_k, max_k = seqlen.cu_seqlen_q, seqlen.max_q
        if block_tables is not None and seqlen.has_cached_prefix():
            k, v = gather_prefill_kv(k, v, kv, seqlen, block_tables)  # [Tk, Hkv, D]
            cu_k, max_k = seqlen.cu_seqlen_k, seqlen.max_k
        # (-1, 0) is plain causal; (W - 1, 0) keeps W keys including the query (see package docstring).
        window_size = (-1, 0) if window is None else (window - 1, 0)
        if self._direct and q.is_cuda:  # (tests on CPU stand in for varlen_attn, not for the op)
            return flash_varlen(q, k, v, seqlen.cu_seqlen_q, cu_k, seqlen.max_q, max_k, scale, window_size)
        extra = {}
        if q.shape[1] != k.shape[1]:
            if self._native_gqa:
                extra["enable_gqa"] = True
            else:  # kv head j serves query heads j*g .. j*g+g-1 (repeat_interleave), one copy each
                g = q.shape[1] // k.shape[1]
                k, v = (x[:, :, None].expand(-1, -1, g, -1).flatten(1, 2) for x in (k, v))  # [Tk, Hq, D]
        # v (and q, k after the fused rope) are column slices of the fused qkv output: make rows dense.
        return varlen_attn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            seqlen.cu_seqlen_q,
            cu_k,
            seqlen.max_q,
            max_k,
            scale=scale,
            window_size=window_size,
            **extra,
        )

    def decode(self, q, kv, seqlen, block_tables, max_s, *, scale, window):
        # The Triton kernel is compiled for head_dim 64/128/256 and runs on CUDA only; tiny test models
        # (head_dim 16/24/32) and CPU runs take the torch gather path.
        if self._triton_decode is None or not q.is_cuda or q.shape[-1] not in TRITON_HEAD_DIMS:
            return paged_decode(q, kv, seqlen, block_tables, max_s, scale=scale, window=window)
        return self._triton_decode(
            q, kv.k, kv.v, block_tables, seqlen.input_lengths, scale, max_s,
            sliding_window=window, k_scale=kv.k_scale, v_scale=kv.v_scale,
            pdl=self.pdl and q.shape[0] <= self.pdl_max_rows,
            min_split_tokens=self.min_split_tokens,
        )


def flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, window_size: tuple[int, int]):
    """What varlen_attn computes, calling its FlashAttention-2 op directly: varlen_attn's Python layers
    (custom op, autograd and compile wrappers) cost ~0.3 ms of host time per call on an H200 host, 10 ms
    of a 30-layer prefill (bench/prefill_profile.py). FlashAttention-2 takes fewer KV heads than query
    heads itself (GQA), so they are not repeated. q [Tq, Hq, D], k/v [Tk, Hkv, D] -> [Tq, Hq, D]."""
    return torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, 0.0,
        window_size == (-1, 0), False, scale=scale, window_size_left=window_size[0],
        window_size_right=window_size[1],
    )[0]  # fmt: skip
