"""Test harness: a paged batch driver for FlashMistralForCausalLM and transformers as the truth.

Blocks are handed out from a shuffled pool so that every sequence's block table is non-contiguous.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from model.attention import Seqlen

# (heads, kv_heads, head_dim): GQA ratios 1, 2 and 4; head_dim != hidden/heads (64/4 = 16) in two.
SHAPES = {
    "gqa1-hd32": dict(heads=4, kv_heads=4, head_dim=32),
    "gqa2": dict(heads=4, kv_heads=2),
    "gqa4-hd24": dict(heads=4, kv_heads=1, head_dim=24),
}


def hf_model(model_dir, dtype=torch.float32, device="cpu"):
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


@torch.no_grad()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """transformers' full forward of one sequence -> [len(ids), V] float32 (CPU)."""
    dev = next(hf.parameters()).device
    return hf(torch.tensor([ids], device=dev)).logits[0].float().cpu()


@dataclass
class PagedRunner:
    """Holds sequences' token lists and block lists; builds forward() arguments for prefill/decode."""

    model: object
    kv_cache: object
    seed: int = 0
    ring: int | None = None  # blocks per sequence reused cyclically (the block manager's window ring)
    seqs: list[list[int]] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # tokens of each sequence already in the cache
    blocks: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        self.pool = list(range(self.kv_cache.num_blocks))
        random.Random(self.seed).shuffle(self.pool)
        self.bs = self.kv_cache.block_size
        self.window = self.model.config.sliding_window
        self.device = self.model.device

    def _ensure_blocks(self, i: int, length: int) -> None:
        while len(self.blocks[i]) * self.bs < length and len(self.blocks[i]) != self.ring:
            self.blocks[i].append(self.pool.pop())

    def _slot(self, i: int, pos: int) -> int:
        blocks = self.blocks[i]
        return blocks[(pos // self.bs) % len(blocks)] * self.bs + pos % self.bs

    def _table(self, i: int) -> list[int]:
        """One entry per logical block; a ring repeats (as cache/block_manager.py expands it)."""
        n = -(-self.cached[i] // self.bs)
        return [self.blocks[i][j % len(self.blocks[i])] for j in range(n)]

    def _block_tables(self, idx: list[int]) -> torch.Tensor:
        tables = [self._table(i) for i in idx]
        width = max(map(len, tables))
        rows = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def prefill(self, chunks: list[list[int]], seq_ids: list[int] | None = None, last_only=False, **kw):
        """Append `chunks[b]` to sequence seq_ids[b] (new sequences when seq_ids is None)."""
        if seq_ids is None:
            seq_ids = []
            for _ in chunks:
                self.seqs.append([])
                self.cached.append(0)
                self.blocks.append([])
                seq_ids.append(len(self.seqs) - 1)
        ids, pos, slots, keep, cu, last = [], [], [], [], [0], []
        for i, chunk in zip(seq_ids, chunks, strict=True):
            start = self.cached[i]
            total = start + len(chunk)
            self._ensure_blocks(i, total)
            for j, tok in enumerate(chunk):
                p = start + j
                if self.window is None or p >= total - self.window:
                    keep.append(len(ids))
                ids.append(tok)
                pos.append(p)
                slots.append(self._slot(i, p))
            cu.append(len(ids))
            last.append(len(ids) - 1)
            self.seqs[i].extend(chunk)
            self.cached[i] = total
        before = [self.cached[i] - len(c) for i, c in zip(seq_ids, chunks, strict=True)]
        seqlen = Seqlen.from_lengths([len(c) for c in chunks], before, self.device)
        t = lambda x, dt: torch.tensor(x, dtype=dt, device=self.device)  # noqa: E731
        logits, _ = self.model(
            input_ids=t(ids, torch.int64),
            position_ids=t(pos, torch.int64),
            cu_seqlen_prefill=t(cu, torch.int32),
            kv_cache=self.kv_cache,
            block_tables=self._block_tables(seq_ids),
            slots=t(slots, torch.int64),
            seqlen=seqlen,
            max_s=seqlen.max_k,
            adapter_data=kw.pop("adapter_data", None),
            prefill_cache_indices=t(keep, torch.int64) if self.window is not None else None,
            lm_head_indices=t(last, torch.int64) if last_only else None,
            **kw,
        )
        return logits, cu

    def decode(self, tokens: list[int], seq_ids: list[int] | None = None, pad_rows: int = 0, **kw):
        """One token for each sequence; `pad_rows` extra rows with slot -1 (CUDA-graph bucket padding)."""
        logits, _ = self.model(**self.decode_args(tokens, seq_ids, pad_rows, **kw))
        return logits

    def decode_args(self, tokens: list[int], seq_ids: list[int] | None = None, pad_rows: int = 0, **kw):
        """forward() keyword arguments of one decode step (device tensors built here, not in forward)."""
        seq_ids = list(range(len(self.seqs))) if seq_ids is None else seq_ids
        pos, slots, lengths = [], [], []
        for i, tok in zip(seq_ids, tokens, strict=True):
            p = self.cached[i]
            self._ensure_blocks(i, p + 1)
            pos.append(p)
            slots.append(self._slot(i, p))
            lengths.append(p + 1)
            self.seqs[i].append(tok)
            self.cached[i] = p + 1
        bt = self._block_tables(seq_ids)
        if pad_rows:
            tokens = tokens + [0] * pad_rows
            pos, slots, lengths = pos + [0] * pad_rows, slots + [-1] * pad_rows, lengths + [0] * pad_rows
            bt = torch.cat([bt, torch.zeros(pad_rows, bt.shape[1], dtype=bt.dtype, device=bt.device)])
        t = lambda x, dt: torch.tensor(x, dtype=dt, device=self.device)  # noqa: E731
        return dict(
            input_ids=t(tokens, torch.int64),
            position_ids=t(pos, torch.int64),
            cu_seqlen_prefill=None,
            kv_cache=self.kv_cache,
            block_tables=bt,
            slots=t(slots, torch.int64),
            seqlen=Seqlen(input_lengths=t(lengths, torch.int32)),
            max_s=max(lengths),
            adapter_data=kw.pop("adapter_data", None),
            **kw,
        )


def verify_args(runner: PagedRunner, tokens: list[list[int]], **kw) -> dict:
    """forward() arguments of a speculative verify step: Q tokens for every sequence (a decode forward
    with B * Q query tokens, the Q newest positions of each sequence, written before attention)."""
    q_len = len(tokens[0])
    assert all(len(t) == q_len for t in tokens)
    ids, pos, slots, lengths = [], [], [], []
    for i, toks in enumerate(tokens):
        p = runner.cached[i]
        runner._ensure_blocks(i, p + q_len)
        for j, tok in enumerate(toks):
            ids.append(tok)
            pos.append(p + j)
            slots.append(runner._slot(i, p + j))
        runner.seqs[i].extend(toks)
        runner.cached[i] = p + q_len
        lengths.append(p + q_len)
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=runner.device)  # noqa: E731
    return dict(
        input_ids=t(ids, torch.int64),
        position_ids=t(pos, torch.int64),
        cu_seqlen_prefill=None,
        kv_cache=runner.kv_cache,
        block_tables=runner._block_tables(list(range(len(tokens)))),
        slots=t(slots, torch.int64),
        seqlen=Seqlen(input_lengths=t(lengths, torch.int32), max_q=q_len),
        max_s=max(lengths),
        adapter_data=kw.pop("adapter_data", None),
        **kw,
    )


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = random.Random(seed)
    return [[g.randrange(3, vocab) for _ in range(n)] for n in lengths]
