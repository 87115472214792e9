"""Tensor-parallel slicing of one module's LoRA weights, applied once at upload time.

Column-parallel targets (q/k/v/gate/up) shard their output dim, so each rank keeps the full
A [r, in] and the rows of B [out, r] of its own output columns:  out_local = x @ A.T @ B_local.T.
Row-parallel targets (o_proj, down_proj) shard their input dim, so each rank keeps the columns of
A [r, in] that match its input slice and the full B; the shrink result is a partial sum,

    v = sum_over_ranks(x_local @ A_local.T)     # all-reduce of [T, r], before the expand
    y += v @ B.T                                  # added after the base layer's own all-reduce

which is exact (each rank adds the same full delta once to the already-reduced base output), unlike
adding a per-rank expand before the base all-reduce with a duplicated B.

lm_head is not sliced: the model calls its hook on the gathered logits [N, V] (every rank holds all of
them), so every rank adds the full delta with the full B.

The head split matches the model's fused QKV: query heads contiguous per rank; KV heads contiguous when
there are at least as many as ranks, else replicated (rank r holds head r * Hkv // world).
"""

from __future__ import annotations

import torch

from model.adapters.peft_loader import ROW_PARALLEL
from model.errors import InvalidArgument


def _even_chunk(n: int, rank: int, world: int, what: str) -> slice:
    if n % world:
        raise InvalidArgument(f"{what} size {n} is not divisible by the tensor-parallel world size {world}")
    size = n // world
    return slice(rank * size, (rank + 1) * size)


def _head_rows(num_heads: int, head_dim: int, rank: int, world: int) -> slice:
    if num_heads >= world:
        heads = _even_chunk(num_heads, rank, world, "head count")
        return slice(heads.start * head_dim, heads.stop * head_dim)
    head = rank * num_heads // world  # replicated KV heads
    return slice(head * head_dim, (head + 1) * head_dim)


def shard_lora(
    target: str, a: torch.Tensor, b: torch.Tensor, config, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) full -> this rank's (A_local, B_local). World size 1 returns them unchanged."""
    if world_size == 1 or target == "lm_head":
        return a, b
    if target in ROW_PARALLEL:
        return a[:, _even_chunk(a.shape[1], rank, world_size, f"{target} input")], b
    return a, b[_output_rows(target, b.shape[0], config, rank, world_size)]


def shard_output_vector(target: str, v: torch.Tensor, config, rank: int, world_size: int) -> torch.Tensor:
    """A per-output-feature vector [out] (DoRA's magnitude) -> this rank's part: B's rows of `shard_lora`
    for column-parallel targets, the whole vector for row-parallel ones and lm_head (full outputs)."""
    if world_size == 1 or target == "lm_head" or target in ROW_PARALLEL:
        return v
    return v[_output_rows(target, v.shape[0], config, rank, world_size)]


def _output_rows(target: str, n_out: int, config, rank: int, world: int) -> slice:
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if target == "q_proj":
        return _head_rows(config.num_attention_heads, d, rank, world)
    if target in ("k_proj", "v_proj"):
        return _head_rows(config.num_key_value_heads, d, rank, world)
    return _even_chunk(n_out, rank, world, f"{target} output")  # gate_proj, up_proj
