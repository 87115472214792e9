"""One step's forward inputs, built in one place, and the one call of the model's forward.

Every forward of `FlashMistralForCausalLM` (the shard's prefill, decode eager and inside CUDA graphs,
embeddings, KV-scale calibration, the benchmarks and the model tests) is a `ForwardBatch` made by one
of its constructors and run by `ForwardBatch.run`, the only caller of `forward`:

    ForwardBatch.prefill(seqs, ...)   host sequences (the prompt is new to the device anyway): every
                                      input built on the host and uploaded once
    ForwardBatch.decode(ids, pos, tables, ...)   one token per sequence from device tensors (a cached
                                      batch's, or a CUDA graph's static buffers); nothing syncs
    ForwardBatch.verify(tokens, pos, tables, ...)   Q tokens per sequence (speculative decoding's
                                      verify step), the decode path with Q queries; nothing syncs
    ForwardBatch.embed(prompts, ...)  prefill without a KV cache, the last token's final hidden state

Each fact is held once. A slot is derived from the block table, never passed beside it:

    slot(p) = block_table[p // block_size] * block_size + p % block_size

(a sliding-window ring repeats its blocks in the table, so the same formula holds); forward's
`cu_seqlen_prefill` is `seqlen.cu_seqlen_q` in prefill and None in decode, and its `max_s` is
`seqlen.max_k`. The type lives in model/ because it is the model's input contract (like `Seqlen`):
the model tests and benchmarks build it without the shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.attention import Seqlen


@dataclass
class PrefillSeq:
    """One sequence of a prefill step (host data)."""

    ids: Sequence[int]  # the sequence's tokens up to the end of this step
    cached: int = 0  # leading tokens whose KV is already cached: this step computes ids[cached:]
    block_table: Sequence[int] | None = None  # logical block table; None: no KV cache (embeddings)
    all_logits: bool = False  # logits of every new token (prompt logprobs), not only the last


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    seqlen: Seqlen  # per-sequence lengths; max_k is forward's max_s
    is_prefill: bool
    block_tables: torch.Tensor | None  # [B, max_blocks] int32; None: no KV cache
    slots: torch.Tensor | None  # [T] int64 KV slot per token (-1: write nothing); None: no KV cache
    adapter_data: object | None = None  # model.lora_hook.AdapterHook (AdapterBatchData)
    prefill_cache_indices: torch.Tensor | None = None  # [N] rows written to the cache (sliding window)
    lm_head_indices: torch.Tensor | None = None  # [N] rows that get logits; None: every row
    skip_lm_head: bool = False  # return the final hidden states of those rows instead

    @property
    def cu_seqlen_prefill(self) -> torch.Tensor | None:
        return self.seqlen.cu_seqlen_q if self.is_prefill else None

    @property
    def max_s(self) -> int:
        return self.seqlen.max_k

    def __len__(self) -> int:
        """Tokens in the step (T)."""
        return self.input_ids.shape[0]

    def run(self, model, kv_cache) -> torch.Tensor:
        """The one call of `model.forward` -> logits [T or len(lm_head_indices), V] (or hidden states).
        `kv_cache`: the per-layer K/V views (cache.kv_cache.KVCache or its `.layers`); None without."""
        out, _ = model(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            cu_seqlen_prefill=self.cu_seqlen_prefill,
            kv_cache=kv_cache,
            block_tables=self.block_tables,
            slots=self.slots,
            seqlen=self.seqlen,
            max_s=self.max_s,
            adapter_data=self.adapter_data,
            prefill_cache_indices=self.prefill_cache_indices,
            lm_head_indices=self.lm_head_indices,
            skip_lm_head=self.skip_lm_head,
        )
        return out

    # ---- constructors -----------------------------------------------------------------------------

    @classmethod
    def prefill(
        cls,
        seqs: Sequence[PrefillSeq],
        *,
        device: torch.device | str,
        block_size: int = 1,
        window: int | None = None,
        adapter_data: object | None = None,
        skip_lm_head: bool = False,
    ) -> ForwardBatch:
        """The new tokens of every sequence, flattened. With a KV cache (every seq has a block table)
        the step reads each cached prefix and writes the new tokens' K/V; with a window only the last
        `window` positions of each sequence are written (the only ones ever read again)."""
        cache = _all_or_none([s.block_table is not None for s in seqs], "block_table")
        ids, positions, slots, cache_rows, head_rows = [], [], [], [], []
        offset = 0
        for s in seqs:
            n, end = len(s.ids) - s.cached, len(s.ids)  # a sequence with n == 0 gets no row
            new = range(s.cached, end)
            ids.extend(s.ids[s.cached :])
            positions.extend(new)
            if cache:
                slots.extend(s.block_table[p // block_size] * block_size + p % block_size for p in new)
            first = s.cached if window is None else max(s.cached, end - window)
            cache_rows.extend(range(offset + first - s.cached, offset + n))
            if s.all_logits:
                head_rows.extend(range(offset, offset + n))
            elif n:
                head_rows.append(offset + n - 1)
            offset += n
        seqlen = Seqlen.from_lengths([len(s.ids) - s.cached for s in seqs], [s.cached for s in seqs], device)
        tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
        return cls(
            input_ids=tensor(ids),
            position_ids=tensor(positions),
            seqlen=seqlen,
            is_prefill=True,
            block_tables=pad_block_tables([s.block_table for s in seqs], device) if cache else None,
            slots=tensor(slots) if cache else None,
            adapter_data=adapter_data,
            prefill_cache_indices=tensor(cache_rows) if cache and len(cache_rows) < offset else None,
            lm_head_indices=tensor(head_rows) if len(head_rows) < offset else None,
            skip_lm_head=skip_lm_head,
        )

    @classmethod
    def decode(
        cls,
        input_ids: torch.Tensor,  # [B] int64
        positions: torch.Tensor,  # [B] int64: each sequence's new position (= tokens already cached)
        block_tables: torch.Tensor,  # [B, max_blocks] int32
        *,
        block_size: int,
        max_s: int,  # python int >= every KV length after the step (a CUDA graph's context bucket)
        adapter_data: object | None = None,
    ) -> ForwardBatch:
        """One token per sequence; slots, lengths derived on the device (no host sync: capturable).
        A padding row (position 0, table row of zeros) writes into reserved block 0 and reads nothing
        another row needs."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        block = block_tables[rows, positions // block_size].to(torch.int64)
        seqlen = Seqlen(
            input_lengths=(positions + 1).to(torch.int32),
            cache_lengths=positions.to(torch.int32),
            max_q=1,
            max_k=max_s,
        )
        return cls(
            input_ids=input_ids,
            position_ids=positions,
            seqlen=seqlen,
            is_prefill=False,
            block_tables=block_tables,
            slots=block * block_size + positions % block_size,  # [B]
            adapter_data=adapter_data,
        )

    @classmethod
    def verify(
        cls,
        tokens: torch.Tensor,  # [B, Q] int64: each sequence's next input token, then its drafts
        positions: torch.Tensor,  # [B] int64: each sequence's first new position (= tokens cached)
        block_tables: torch.Tensor,  # [B, max_blocks] int32, wide enough for positions + Q - 1
        n_valid: torch.Tensor | None = None,  # [B] int64: tokens of each row to cache (None: all Q)
        *,
        block_size: int,
        max_s: int,  # python int >= every KV length after the step (a CUDA graph's context bucket)
        adapter_data: object | None = None,
        skip_lm_head: bool = False,
    ) -> ForwardBatch:
        """Q tokens per sequence (a speculative verify step): a decode forward with Q query tokens,
        the sequence's next Q positions, K/V written before attention, each query causal. Tokens past a
        row's `n_valid` are padding: slot -1 (write nothing), read by no valid query. Device ops only
        (capturable); padding positions past the table read its last column (clamped)."""
        q_len = tokens.shape[1]
        offsets = torch.arange(q_len, device=positions.device)
        pos = positions[:, None] + offsets  # [B, Q]
        column = (pos // block_size).clamp(max=block_tables.shape[1] - 1)
        slots = block_tables.gather(1, column).to(torch.int64) * block_size + pos % block_size
        if n_valid is not None:
            slots = torch.where(offsets[None, :] < n_valid[:, None], slots, -1)
        seqlen = Seqlen(
            input_lengths=(positions + q_len).to(torch.int32),
            cache_lengths=positions.to(torch.int32),
            max_q=q_len,
            max_k=max_s,
        )
        return cls(
            input_ids=tokens.reshape(-1),
            position_ids=pos.reshape(-1),
            seqlen=seqlen,
            is_prefill=False,
            block_tables=block_tables,
            slots=slots.reshape(-1),
            adapter_data=adapter_data,
            skip_lm_head=skip_lm_head,
        )

    @classmethod
    def embed(
        cls,
        prompts: Sequence[Sequence[int]],
        *,
        device: torch.device | str,
        adapter_data: object | None = None,
    ) -> ForwardBatch:
        """Final hidden state of each prompt's last token; no KV cache is read or written."""
        return cls.prefill(
            [PrefillSeq(p) for p in prompts], device=device, adapter_data=adapter_data, skip_lm_head=True
        )


def pad_block_tables(tables: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
    """[B, max_blocks] int32, rows padded with block 0 (past a sequence's length: never read)."""
    width = max((len(t) for t in tables), default=1) or 1
    out = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        if len(t):
            out[i, : len(t)] = torch.tensor(list(t), dtype=torch.int32)
    return out.to(device)


def _all_or_none(flags: list[bool], what: str) -> bool:
    if any(flags) and not all(flags):
        raise ValueError(f"every sequence of a prefill step has a {what}, or none has")
    return bool(flags) and flags[0]
