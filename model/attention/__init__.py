"""Attention: one interface, several backends, one place that picks (and logs) which one runs.

Window convention everywhere in this package: `window` is transformers' `sliding_window` W. A query at
absolute position p sees keys at positions p - W < j <= p, i.e. W keys including itself
(transformers: `kv_idx > q_idx - sliding_window`). FlashAttention's left window counts keys *before*
the query, so it is W - 1.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.attention.kv import LayerKV

logger = logging.getLogger(__name__)


@dataclass
class Seqlen:
    """Per-sequence lengths of one step. Decode reads only `input_lengths` (so a CUDA graph may own it)."""

    input_lengths: torch.Tensor  # [B] int32: KV length after this step (cache + new)
    cache_lengths: torch.Tensor | None = None  # [B] int32: tokens already cached before the step
    cu_seqlen_q: torch.Tensor | None = None  # [B+1] int32: prefix sums of new tokens (prefill)
    cu_seqlen_k: torch.Tensor | None = None  # [B+1] int32: prefix sums of input_lengths (prefill)
    max_q: int = 0
    max_k: int = 0
    # Does any sequence continue from cached tokens? Known on the host when built from host lists
    # (from_lengths); None: `has_cached_prefix` asks the device once and remembers.
    cached_prefix: bool | None = None
    total_k: int | None = None  # sum of input_lengths, when known on the host (from_lengths)
    # (block table, slot, new_row, sel): the prefix gather's indices (reference.gather_prefill_kv), the
    # same for every layer of a step, computed by the first layer that needs them.
    gather_plan: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.cache_lengths is None:
            self.cache_lengths = torch.zeros_like(self.input_lengths)
        if self.cu_seqlen_k is None:
            self.cu_seqlen_k = _cumsum0(self.input_lengths)
        if self.cu_seqlen_q is None:
            self.cu_seqlen_q = _cumsum0(self.input_lengths - self.cache_lengths)

    @classmethod
    def from_lengths(
        cls,
        new_lengths: list[int],
        cache_lengths: list[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> Seqlen:
        """From host lists (no device sync): new tokens and cached tokens per sequence."""
        cached = cache_lengths or [0] * len(new_lengths)
        total = [n + c for n, c in zip(new_lengths, cached, strict=True)]
        return cls(
            input_lengths=torch.tensor(total, dtype=torch.int32, device=device),
            cache_lengths=torch.tensor(cached, dtype=torch.int32, device=device),
            max_q=max(new_lengths, default=0),
            max_k=max(total, default=0),
            cached_prefix=any(c > 0 for c in cached),
            total_k=sum(total),
        )

    def has_cached_prefix(self) -> bool:
        """Prefill only: does any sequence continue from cached tokens? Every layer asks, so the answer
        is known on the host (from_lengths) or fetched once (one host sync) and kept."""
        if self.cached_prefix is None:
            self.cached_prefix = bool((self.cache_lengths > 0).any())
        return self.cached_prefix


def _cumsum0(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(x, 0, dtype=torch.int32), (1, 0))


class AttentionBackend(ABC):
    """Attention over the paged cache.

    prefill: q [T, Hq, D], k/v [T, Hkv, D] of the new tokens, which are *not* in the cache yet (the
      model writes them afterwards, and with a window only the last W of them); sequences with
      `seqlen.cache_lengths > 0` also attend to their cached prefix, read through `block_tables`
      [B, max_blocks]. Causal, with transformers' left window.
    decode: q [B * Q, Hq, D], the Q newest tokens of every sequence (Q = 1: plain decode; Q > 1: a
      speculative verify step), their K/V already written to the cache; query i of sequence b is at
      position input_lengths[b] - Q + i and attends causally. Q = q.shape[0] // B (shapes only). Must
      be CUDA-graph capturable: no host syncs, shapes depend only on python ints (`max_s`).
    """

    name: str = "abstract"
    block_size: int = 16  # KV block size this backend needs (flash-attn's paged decode: 256)
    # Set by the model when its one-row projections run as programmatic dependents (model/layers/gemv.py):
    # a backend whose decode is our Triton kernel launches it as one too for one query row (it waits for
    # the kernel that wrote q and the K/V, and lets o_proj's GEMV launch at its start); others ignore it.
    pdl: bool = False
    # The most query rows (tokens of a decode step) for which rope + K/V write and the decode attention
    # launch as programmatic dependents when `pdl` is set; larger steps keep plain launches. H200, decode
    # graph (bench/pdl_decode.py --pdl-rows, h200-pdl-decode-2026-12-01-pdlrows.json): early launches at
    # every row count against one row only: 5.161 / 5.117 ms at batch 32, 5.600 / 5.628 at 64, 7.160 /
    # 7.195 at 128 (+0.9%, -0.5%, -0.5%: noise-sized and not one way), so one row it stays.
    pdl_max_rows: int = 1

    @abstractmethod
    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv: LayerKV,
        seqlen: Seqlen,
        block_tables: torch.Tensor | None,
        *,
        scale: float,
        window: int | None,
    ) -> torch.Tensor: ...

    @abstractmethod
    def decode(
        self,
        q: torch.Tensor,
        kv: LayerKV,
        seqlen: Seqlen,
        block_tables: torch.Tensor,
        max_s: int,
        *,
        scale: float,
        window: int | None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Entry:
    name: str
    unavailable: Callable[[torch.device, torch.dtype], str | None]  # reason it cannot run, or None
    make: Callable[[], AttentionBackend]


def _cuda_half(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16, not {dtype}"
    return None


def _flash_attn_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not importable"
    return _cuda_half(device, dtype)


def _torch_cuda_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return "this torch has no torch.nn.attention.varlen"
    return _cuda_half(device, dtype)


def _make_reference() -> AttentionBackend:
    from model.attention.reference import ReferenceBackend

    return ReferenceBackend()


def _make_torch_cuda() -> AttentionBackend:
    from model.attention.torch_cuda import TorchCudaBackend

    return TorchCudaBackend()


def _make_flash_attn() -> AttentionBackend:
    from model.attention.flash_attn_backend import FlashAttnBackend

    return FlashAttnBackend()


# In order of preference, which is measured: on an H200 (torch 2.11, commit a341c50, `make bench`) the
# engine's decode step reached 0.68 / 0.62 / 0.63 of the roofline at batch 1 / 64 / 128 with torch_cuda
# (PyTorch's FlashAttention-2 prefill + our Triton paged decode, 16-token blocks) against 0.64 / 0.62 /
# 0.57 with flash-attn 2.8.3 (256-token blocks), so torch_cuda goes first even where flash-attn is
# installed; `attention_backend` in ShardConfig picks another. Immutable: selection has no hidden state.
BACKENDS: tuple[_Entry, ...] = (
    _Entry("torch_cuda", _torch_cuda_unavailable, _make_torch_cuda),
    _Entry("flash_attn", _flash_attn_unavailable, _make_flash_attn),
    _Entry("reference", lambda device, dtype: None, _make_reference),
)


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    device = torch.device(device)
    return [e.name for e in BACKENDS if e.unavailable(device, dtype) is None]


def select_attention_backend(
    device: torch.device | str, dtype: torch.dtype, prefer: str | None = None
) -> AttentionBackend:
    """The best backend for (device, dtype), or exactly `prefer` (an error says why it cannot run)."""
    device = torch.device(device)
    names = [e.name for e in BACKENDS]
    if prefer is not None and prefer not in names:
        raise ValueError(f"unknown attention backend {prefer!r}; known: {names}")
    for entry in BACKENDS:
        if prefer is not None and entry.name != prefer:
            continue
        reason = entry.unavailable(device, dtype)
        if reason is None:
            backend = entry.make()
            logger.info(
                "attention backend: %s (device %s, dtype %s, KV block size %d)",
                backend.name,
                device,
                dtype,
                backend.block_size,
            )
            return backend
        if prefer is not None:
            raise ValueError(f"attention backend {prefer!r} cannot run on {device} with {dtype}: {reason}")
    raise AssertionError("the reference backend is always available")


__all__ = ["AttentionBackend", "Seqlen", "available_backends", "select_attention_backend", "BACKENDS"]
