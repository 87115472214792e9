"""Test harness: a paged batch driver for FlashMistralForCausalLM and transformers as the truth.

Blocks are handed out from a shuffled pool so that every sequence's block table is non-contiguous.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from cache.kv_cache import KVCache
from model.forward_batch import ForwardBatch, PrefillSeq, pad_block_tables

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
    """Holds sequences' token lists and block lists; runs prefill/decode steps as ForwardBatches.

    Block 0 is reserved, as in the shard's cache: a padding row of a CUDA-graph bucket writes there.
    """

    model: object
    kv_cache: object
    seed: int = 0
    ring: int | None = None  # blocks per sequence reused cyclically (the block manager's window ring)
    seqs: list[list[int]] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # tokens of each sequence already in the cache
    blocks: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        self.pool = list(range(1, self.kv_cache.num_blocks))
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

    def prefill(self, chunks: list[list[int]], seq_ids: list[int] | None = None, last_only=False,
                adapter_data=None, skip_lm_head=False):  # fmt: skip
        """Append `chunks[b]` to sequence seq_ids[b] (new sequences when seq_ids is None).
        -> (logits of every new token, or of each sequence's last one with last_only; cu offsets)."""
        if seq_ids is None:
            seq_ids = []
            for _ in chunks:
                self.seqs.append([])
                self.cached.append(0)
                self.blocks.append([])
                seq_ids.append(len(self.seqs) - 1)
        seqs, cu = [], [0]
        for i, chunk in zip(seq_ids, chunks, strict=True):
            start = self.cached[i]
            self._ensure_blocks(i, start + len(chunk))
            self.seqs[i].extend(chunk)
            self.cached[i] = start + len(chunk)
            seqs.append(PrefillSeq(list(self.seqs[i]), start, self._table(i), all_logits=not last_only))
            cu.append(cu[-1] + len(chunk))
        fb = ForwardBatch.prefill(
            seqs, device=self.device, block_size=self.bs, window=self.window, adapter_data=adapter_data,
            skip_lm_head=skip_lm_head,
        )  # fmt: skip
        return fb.run(self.model, self.kv_cache), cu

    def decode(self, tokens: list[int], seq_ids: list[int] | None = None, pad_rows: int = 0,
               adapter_data=None):  # fmt: skip
        """One token for each sequence; `pad_rows` extra rows padded as a CUDA-graph bucket pads."""
        return self.decode_batch(tokens, seq_ids, pad_rows, adapter_data).run(self.model, self.kv_cache)

    def decode_batch(self, tokens: list[int], seq_ids: list[int] | None = None, pad_rows: int = 0,
                     adapter_data=None) -> ForwardBatch:  # fmt: skip
        """The ForwardBatch of one decode step (host->device copies happen here, not in forward)."""
        seq_ids = list(range(len(self.seqs))) if seq_ids is None else seq_ids
        pos = []
        for i, tok in zip(seq_ids, tokens, strict=True):
            p = self.cached[i]
            self._ensure_blocks(i, p + 1)
            pos.append(p)
            self.seqs[i].append(tok)
            self.cached[i] = p + 1
        tables = [self._table(i) for i in seq_ids] + [[]] * pad_rows  # padding: position 0 of block 0
        t = lambda x: torch.tensor(x, dtype=torch.int64, device=self.device)  # noqa: E731
        return ForwardBatch.decode(
            t(tokens + [0] * pad_rows), t(pos + [0] * pad_rows), pad_block_tables(tables, self.device),
            block_size=self.bs, max_s=max(pos) + 1, adapter_data=adapter_data,
        )  # fmt: skip


def verify_batch(runner: PagedRunner, tokens: list[list[int]], adapter_data=None) -> ForwardBatch:
    """The ForwardBatch of a speculative verify step: Q tokens for every sequence (a decode forward
    with B * Q query tokens, the Q newest positions of each sequence, written before attention)."""
    q_len = len(tokens[0])
    assert all(len(t) == q_len for t in tokens)
    pos = []
    for i, toks in enumerate(tokens):
        p = runner.cached[i]
        runner._ensure_blocks(i, p + q_len)
        pos.append(p)
        runner.seqs[i].extend(toks)
        runner.cached[i] = p + q_len
    tables = pad_block_tables([runner._table(i) for i in range(len(tokens))], runner.device)
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=runner.device)  # noqa: E731
    return ForwardBatch.verify(
        t(tokens), t(pos), tables, block_size=runner.bs, max_s=max(pos) + q_len, adapter_data=adapter_data
    )


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = random.Random(seed)
    return [[g.randrange(3, vocab) for _ in range(n)] for n in lengths]


def peft_truth(model_dir, adapter_dirs: dict, device="cpu") -> dict:
    """index -> the float32 reference model: 0 the base, i `PeftModel` over adapter_dirs[i]."""
    from peft import PeftModel

    truth = {0: hf_model(model_dir, device=device)}
    for i, d in adapter_dirs.items():
        truth[i] = PeftModel.from_pretrained(hf_model(model_dir, device=device), d).eval()
    return truth


def max_row_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of ||got - ref|| / ||ref|| (ref on the CPU, float32)."""
    got = got.float().cpu()
    return float(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


def assert_batch_matches_peft(ours, store, truth: dict, requests: list[int], prompt_lengths: list[int],
                              vocab: int, rtol: float, *, seed: int, blocks: int, steps: int = 12,
                              each_step=None) -> None:  # fmt: skip
    """A batch of requests over adapter indices `requests` (0: base), ragged prefill then `steps` decode
    steps with two padding rows, through `store`'s adapter data: per request, the relative error of every
    row against its PEFT model is at most `rtol`, and each adapter moves the prefill logits by far more
    than that error (equality is not vacuous). `each_step(data)`: called with each decode step's data."""
    runner = PagedRunner(ours, KVCache.for_model(ours, blocks), seed=seed)
    prompts = random_prompts(prompt_lengths, vocab, seed=seed + 1)
    data = store.batch_data(requests, [len(p) for p in prompts], is_prefill=True)
    logits, cu = runner.prefill(prompts, adapter_data=data)
    for b, (p, idx) in enumerate(zip(prompts, requests, strict=True)):
        ref = hf_logits(truth[idx], p)
        err = max_row_rel_err(logits[cu[b] : cu[b + 1]], ref)
        assert err <= rtol, f"prefill request {b} (adapter {idx}): relative error {err:.4f}"
        if idx:
            assert max_row_rel_err(logits[cu[b] : cu[b + 1]], hf_logits(truth[0], p)) > 3 * err
    g = random.Random(seed + 2)
    start = [len(s) for s in runner.seqs]
    got = []
    for _ in range(steps):
        tokens = [g.randrange(3, vocab) for _ in runner.seqs]
        data = store.batch_data(requests + [0, 0], [1] * (len(tokens) + 2), is_prefill=False)
        if each_step is not None:
            each_step(data)
        got.append(runner.decode(tokens, pad_rows=2, adapter_data=data)[: len(tokens)].float().cpu())
    for b, (seq, idx) in enumerate(zip(runner.seqs, requests, strict=True)):
        ref = hf_logits(truth[idx], seq)[start[b] : start[b] + len(got)]
        err = max_row_rel_err(torch.stack([x[b] for x in got]), ref)
        assert err <= rtol, f"decode request {b} (adapter {idx}): relative error {err:.4f}"
