"""Vectorised logits processors for a heterogeneous batch: one kernel per processor, no host sync.

Every function takes the batch's logits `[B, V]` (float32) plus per-row parameters as device tensors
`[B]` and returns new logits; rows whose parameter is neutral come out unchanged. Python control flow
only depends on host-side flags computed when the batch was built, never on tensor values, so the
whole chain can be captured in a CUDA graph.

Semantics (pseudo-code per row b, token j):

    repetition:  if j in seen[b]:  x = x / p if x > 0 else x * p          (transformers)
    frequency:   x -= freq[b] * count[b, j]                               (OpenAI, generated tokens only)
    presence:    x -= pres[b] * (count[b, j] > 0)                          (OpenAI, generated tokens only)
    watermark:   x += delta if green(prev[b], j) else 0                   (Kirchenbauer et al.)
    temperature: x = x / t[b]
    top-k:       keep x >= k-th largest x (ties kept, as transformers)
    top-p:       in descending-probability order keep token i while the mass before it < top_p
    typical:     in order of |-log p - H| keep token i while the mass before it < typical_p
    sampling:    argmax(x + gumbel(hash(seed, step, j)))   (= a draw from softmax(x))

The random numbers come from a counter-based integer hash of (seed, step, token id), so a request's
draw depends only on its own seed and step, never on which other requests share the batch.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a product with a 32-bit value stays below 2**63, so int64 never
# overflows (signed overflow is not something to rely on across backends).
_K1 = 0x7FEB352D
_K2 = 0x5BD1E995
_K3 = 0x2545F491
_GOLDEN = 0x1E3779B9  # spreads consecutive token ids before mixing
_STREAM_SAMPLE = 0x51ED270B  # domain separation: sampling noise vs watermark lists
_STREAM_WATERMARK = 0x3C6EF372


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche mix of 32-bit values held in int64 (xorshift-multiply rounds)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * _K1) & _M32
    x = x ^ (x >> 15)
    x = (x * _K2) & _M32
    x = x ^ (x >> 13)
    x = (x * _K3) & _M32
    return x ^ (x >> 16)


def row_keys(seed: torch.Tensor, step: torch.Tensor, stream: int = _STREAM_SAMPLE) -> torch.Tensor:
    """Per-row 32-bit key from a 64-bit seed (as int64 bit pattern) and a step counter. [B] int64."""
    lo = seed & _M32
    hi = (seed >> 32) & _M32  # arithmetic shift is fine: the mask drops the sign extension
    k = mix32(hi ^ stream)
    k = mix32(k ^ lo)
    return mix32(k ^ (step & _M32))


def token_uniforms(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform floats in (0, 1) for every (row key, token id): [B] -> [B, V] float32."""
    tok = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    h = mix32(keys[:, None] ^ ((tok[None, :] * _GOLDEN) & _M32))  # [B, V]
    h = mix32(h + keys[:, None])
    # 24 high bits fit a float32 mantissa exactly; +0.5 keeps u strictly inside (0, 1).
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] keyed by (seed, step, token id)."""
    u = token_uniforms(row_keys(seed, step), vocab_size)
    return -torch.log(-torch.log(u))


def green_mask(prev_ids: torch.Tensor, vocab_size: int, gamma: float, key: int) -> torch.Tensor:
    """Kirchenbauer green list per row, seeded by the previous token: [B] -> [B, V] bool.

    Instead of a seeded permutation (a host RNG per row), token j is green after token `prev` iff
    hash(key, prev, j) < gamma * 2**32; the list has gamma*V tokens in expectation and is a pure
    function of (key, prev), so a detector can recompute it.
    """
    keys = row_keys(torch.full_like(prev_ids, key), prev_ids, stream=_STREAM_WATERMARK)
    return token_uniforms(keys, vocab_size) < gamma


def apply_repetition_penalty(x: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """x [B, V], seen [B, V] bool (prompt + generated), penalty [B] -> [B, V]."""
    p = penalty[:, None]
    penalised = torch.where(x > 0, x / p, x * p)
    return torch.where(seen, penalised, x)


def apply_frequency_presence(
    x: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """x [B, V], counts [B, V] of generated tokens, frequency/presence [B] -> [B, V]."""
    c = counts.to(x.dtype)
    return x - frequency[:, None] * c - presence[:, None] * (c > 0).to(x.dtype)


def _keep_by_mass(sorted_logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Nucleus rule in a given order: keep position i while the probability before it < mass.

    sorted_logits [B, V] in the order of preference, mass [B] -> keep [B, V] bool. The first position
    is always kept; mass >= 1 keeps everything (float cumsums may not reach exactly 1).
    """
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    keep = before < mass[:, None]
    keep[:, 0] = True
    return keep | (mass >= 1.0)[:, None]


def apply_top_k(x: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Top-k alone, without a full sort: only the `max_k` largest values are found.

    x [B, V]; top_k [B] int64 with V meaning "off"; max_k = the largest k below V in the batch.
    """
    vocab = x.shape[-1]
    top_vals = x.topk(max_k, dim=-1).values  # [B, max_k], descending
    kth = top_vals.gather(1, (top_k.clamp(1, max_k) - 1)[:, None])  # [B, 1]
    kth = kth.masked_fill((top_k >= vocab)[:, None], float("-inf"))  # "off" rows keep everything
    return x.masked_fill(x < kth, float("-inf"))


def apply_top_k_top_p(
    x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, use_top_p: bool
) -> torch.Tensor:
    """Top-k then top-p (renormalised after top-k, as transformers chains them), one sort.

    x [B, V]; top_k [B] int64 with V meaning "off"; top_p [B] with 1.0 meaning "off".
    """
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)  # [B, V]
    kth = sorted_x.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])  # [B, 1]
    sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    if use_top_p:
        sorted_x = sorted_x.masked_fill(~_keep_by_mass(sorted_x, top_p), float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def apply_typical(x: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): prefer tokens whose surprisal is near the entropy.

    x [B, V], typical_p [B] with 1.0 meaning "off" -> [B, V]. Tokens already at -inf stay there.
    """
    logp = x.log_softmax(dim=-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(dim=-1, keepdim=True)  # -inf * 0 = nan for filtered tokens
    distance = (-logp - entropy).abs()  # inf for filtered tokens, so they sort last
    _, order = distance.sort(dim=-1)
    sorted_x = x.gather(1, order)
    keep = _keep_by_mass(sorted_x, typical_p)
    keep_vocab = torch.empty_like(keep).scatter_(1, order, keep)
    return x.masked_fill(~keep_vocab, float("-inf"))
