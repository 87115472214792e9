"""Reference attention in plain torch: any device, any dtype; scores and softmax in float32.

Also home of the two pieces the CUDA backends reuse: `gather_prefill_kv` (cached prefix + new tokens
as one contiguous varlen K/V) and `paged_decode` (the sync-free decode over block tables).
"""

from __future__ import annotations

import torch

from model.attention import AttentionBackend, Seqlen
from model.attention.kv import LayerKV


def gather_prefill_kv(
    k: torch.Tensor, v: torch.Tensor, kv: LayerKV, seqlen: Seqlen, block_tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values at positions [0, input_length) of every sequence, flattened by `cu_seqlen_k`.

    Positions below cache_length come from the cache (through the block table), the rest from this
    step's k/v [T, Hkv, D], which are not cached yet (and with a window only their last W will be).
    Cached positions older than the window were never written; they read as zeros and are masked out.
    Returns ([Tk, Hkv, D], [Tk, Hkv, D]). The indices are the same for every layer of a step: the first
    layer computes them (no host sync when Tk is known on the host, one otherwise) and keeps them on
    `seqlen`; each layer then only gathers.
    """
    plan = seqlen.gather_plan
    if plan is None or plan[0] is not block_tables:  # a Seqlen belongs to one step, hence one table
        indices = _gather_indices(seqlen, block_tables, kv.block_size, k.shape[0])
        plan = seqlen.gather_plan = (block_tables, *indices)
    _, slot, new_row, sel = plan
    k_old, v_old = kv.read(slot, k.dtype)  # [Tk, Hkv, D]
    return torch.where(sel, k_old, k[new_row]), torch.where(sel, v_old, v[new_row])


def _gather_indices(seqlen: Seqlen, block_tables: torch.Tensor, bs: int, new_tokens: int):
    """-> (slot [Tk]: cache slot of each cached position, new_row [Tk]: row of this step's k/v for the
    others, sel [Tk, 1, 1]: True where the position comes from the cache)."""
    dev = block_tables.device
    lengths = seqlen.input_lengths.long()  # [B]
    tk = seqlen.total_k if seqlen.total_k is not None else int(seqlen.cu_seqlen_k[-1])
    seq = torch.repeat_interleave(torch.arange(lengths.shape[0], device=dev), lengths, output_size=tk)
    pos = torch.arange(tk, device=dev) - seqlen.cu_seqlen_k.long()[seq]  # [Tk] position in its sequence
    cached = seqlen.cache_lengths.long()[seq]
    from_cache = pos < cached
    block = block_tables.long()[seq, torch.where(from_cache, pos, 0) // bs].clamp(min=0)
    slot = torch.where(from_cache, block * bs + pos % bs, 0)
    new_row = (seqlen.cu_seqlen_q.long()[seq] + pos - cached).clamp(0, max(new_tokens - 1, 0))
    return slot, new_row, from_cache[:, None, None]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked softmax attention with grouped KV heads.

    q [..., Nq, Hq, D], k/v [..., Nk, Hkv, D], mask [..., Nq, Nk] (True: attend) -> [..., Nq, Hq, D].
    Masked scores use float32's lowest value, not -inf: a fully masked (padding) row stays finite.
    """
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    g = hq // hkv
    qg = q.float().unflatten(-2, (hkv, g))  # [..., Nq, Hkv, g, D]
    scores = torch.einsum("...qhgd,...khd->...hgqk", qg, k.float()) * scale  # [..., Hkv, g, Nq, Nk]
    scores = scores.masked_fill(~mask[..., None, None, :, :], torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1)
    out = torch.einsum("...hgqk,...khd->...qhgd", probs, v.float())  # [..., Nq, Hkv, g, D]
    return out.reshape(*out.shape[:-3], hq, d).to(q.dtype)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., Nq, Nk]: causal (k <= q) and, with a window W, k > q - W (transformers' definition)."""
    qp, kp = q_pos[..., :, None], k_pos[..., None, :]
    mask = kp <= qp
    if window is not None:
        mask &= kp > qp - window
    return mask


def paged_decode(
    q: torch.Tensor,
    kv: LayerKV,
    seqlen: Seqlen,
    block_tables: torch.Tensor,
    max_s: int,
    *,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Q query tokens per sequence (its last Q positions) against its last min(L, max_s) keys.

    q [B * Q, Hq, D] -> [B * Q, Hq, D], rows of one sequence adjacent; Q = 1 is plain decode, Q > 1 a
    speculative verify step. L = input_lengths (true length, this step's tokens included, all of them
    already written); query i of sequence b sits at position L_b - Q + i and sees keys up to itself
    (causal) and within the window. The gather width is the python int `max_s` (the caller clamps it
    to the window + Q - 1), so shapes are static and nothing syncs: CUDA-graph capturable. Key j of row b
    is position L_b - max_s + j; positions below 0 are masked. Padding rows (L = 0, slot -1) read
    block 0 and are fully masked: finite garbage that nobody reads.
    """
    bs = kv.block_size
    n = max(int(max_s), 1)
    num_seqs = seqlen.input_lengths.shape[0]
    q_len = q.shape[0] // max(num_seqs, 1)
    lengths = seqlen.input_lengths.long()[:, None]  # [B, 1]
    pos = lengths - n + torch.arange(n, device=q.device)  # [B, n] absolute key positions
    q_pos = lengths - q_len + torch.arange(q_len, device=q.device)  # [B, Q] absolute query positions
    valid = window_mask(q_pos, pos, window) & (pos >= 0)[:, None, :]  # [B, Q, n]
    pos = pos.clamp(min=0)
    block = block_tables.long().gather(1, (pos // bs).clamp(max=block_tables.shape[1] - 1)).clamp(min=0)
    k, v = kv.read(block * bs + pos % bs, q.dtype)  # [B, n, Hkv, D]
    out = attend(q.unflatten(0, (num_seqs, q_len)), k, v, valid, scale)  # [B, Q, Hq, D]
    return out.flatten(0, 1)


class ReferenceBackend(AttentionBackend):
    name = "reference"
    block_size = 16

    def prefill(self, q, k, v, kv, seqlen, block_tables, *, scale, window):
        prefix = block_tables is not None and seqlen.has_cached_prefix()
        if prefix:
            k, v = gather_prefill_kv(k, v, kv, seqlen, block_tables)
        out = torch.empty_like(q)
        # A python loop over sequences: prefill is not graph-captured and the masks stay small.
        cu_q = seqlen.cu_seqlen_q.tolist()
        cu_k = seqlen.cu_seqlen_k.tolist() if prefix else cu_q
        for b in range(len(cu_q) - 1):
            q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
            if q1 == q0:
                continue
            k_pos = torch.arange(k1 - k0, device=q.device)
            q_pos = k_pos[k1 - k0 - (q1 - q0) :]  # new tokens are the last ones of the sequence
            mask = window_mask(q_pos, k_pos, window)
            out[q0:q1] = attend(q[q0:q1], k[k0:k1], v[k0:k1], mask, scale)
        return out

    def decode(self, q, kv, seqlen, block_tables, max_s, *, scale, window):
        return paged_decode(q, kv, seqlen, block_tables, max_s, scale=scale, window=window)
