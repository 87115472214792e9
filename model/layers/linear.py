"""Column-, row-parallel and fused linear layers (no bias: Mistral has none).

Column-parallel splits the output features over ranks (each rank computes a slice of y, no
communication); row-parallel splits the input features (each rank computes a partial sum of y, then an
all-reduce). Attention and MLP pair them so that one all-reduce per block suffices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.deferred import DeferredRow
from model.parallel import TPGroup


class WeightShapeError(ValueError):
    """A checkpoint tensor whose shape does not fit the parameter; model/weights.py adds its name."""


def _check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise WeightShapeError(f"expected shape {tuple(expected)}, got {tuple(loaded.shape)}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Unsharded parameter (norm weights): the checkpoint tensor must match exactly."""
    _check_shape(loaded, tuple(param.shape))
    param.data.copy_(loaded)


def _new_weight(rows: int, cols: int, dtype: torch.dtype | None, device) -> nn.Parameter:
    # empty: every element is overwritten by a weight loader (model/weights.py checks that all were).
    return nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False)


def _matmul(gemv, x: torch.Tensor | DeferredRow, weight: torch.Tensor,
            add: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x @ weight^T (+ add, in the activation dtype): through the GEMV router when it takes this shape,
    else cuBLAS. A deferred row (model/layers/deferred.py) goes to the router's fused GEMV, or is
    computed first when it declines."""
    if gemv is not None:
        out = gemv.deferred(x, weight, add) if isinstance(x, DeferredRow) else gemv(x, weight, add)
        if out is not None:
            return out
    out = F.linear(x.materialize() if isinstance(x, DeferredRow) else x, weight)
    return out if add is None else out + add


class ColumnParallelLinear(nn.Module):
    """y[:, rank's out slice] = x @ W[rank's rows].T   (W: [out, in] in the checkpoint)."""

    def __init__(self, input_size: int, output_size: int, tp: TPGroup, *, dtype=None, device=None):
        super().__init__()
        self.tp, self.input_size, self.output_size = tp, input_size, output_size
        _, local = tp.shard(output_size, "output features")
        self.weight = _new_weight(local, input_size, dtype, device)
        self.weight.weight_loader = self.weight_loader
        self.gemv = None  # model.layers.gemv.GemvRouter for one-row inputs (CUDA, Hopper), see use_gemv

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check_shape(loaded, (self.output_size, self.input_size))
        start, n = self.tp.shard(self.output_size, "output features")
        param.data.copy_(loaded.narrow(0, start, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self.gemv, x, self.weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_up).

    The local weight is [sum(out_i / world), in]: each checkpoint tensor i fills its own row block, so
    the output splits back into the original projections with plain column slices.
    """

    def __init__(self, input_size: int, output_sizes: list[int], tp: TPGroup, *, dtype=None, device=None):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), tp, dtype=dtype, device=device)

    def local_sizes(self) -> list[int]:
        return [size // self.tp.world_size for size in self.output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        full = self.output_sizes[shard_id]
        _check_shape(loaded, (full, self.input_size))
        start, n = self.tp.shard(full, f"output features of part {shard_id}")
        offset = sum(self.local_sizes()[:shard_id])
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, start, n))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection with grouped-query heads split over ranks.

    Query heads are split evenly. KV heads are split evenly when there are at least as many as ranks;
    otherwise each KV head is replicated on world/Hkv consecutive ranks (rank r holds KV head r*Hkv//world),
    which keeps every rank's query heads next to the KV head they share.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        tp: TPGroup,
        *,
        dtype=None,
        device=None,
    ):
        ws = tp.world_size
        if num_heads % ws:
            raise ValueError(f"num_attention_heads ({num_heads}) is not divisible by world size {ws}")
        if (num_kv_heads % ws) if num_kv_heads >= ws else (ws % num_kv_heads):
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) and world size {ws} do not divide")
        self.head_dim, self.total_heads, self.total_kv_heads = head_dim, num_heads, num_kv_heads
        self.num_heads = num_heads // ws
        self.num_kv_heads = max(1, num_kv_heads // ws)
        # First KV head on this rank (with replication, world/Hkv consecutive ranks share one head).
        replicated = num_kv_heads < ws
        self.kv_head_start = (tp.rank * num_kv_heads) // ws if replicated else tp.rank * self.num_kv_heads
        nn.Module.__init__(self)
        self.tp, self.input_size = tp, hidden_size
        self.output_size = (num_heads + 2 * num_kv_heads) * head_dim
        local = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        self.weight = _new_weight(local, hidden_size, dtype, device)
        self.weight.weight_loader = self.weight_loader

    def local_sizes(self) -> list[int]:
        """Output columns on this rank: [q, k, v]."""
        kv = self.num_kv_heads * self.head_dim
        return [self.num_heads * self.head_dim, kv, kv]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        d = self.head_dim
        if shard_id == "q":
            _check_shape(loaded, (self.total_heads * d, self.input_size))
            rows, offset = loaded.narrow(0, self.tp.rank * self.num_heads * d, self.num_heads * d), 0
        elif shard_id in ("k", "v"):
            _check_shape(loaded, (self.total_kv_heads * d, self.input_size))
            rows = loaded.narrow(0, self.kv_head_start * d, self.num_kv_heads * d)
            offset = self.num_heads * d + (0 if shard_id == "k" else self.num_kv_heads * d)
        else:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        param.data.narrow(0, offset, rows.shape[0]).copy_(rows)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x[:, rank's in slice] @ W[:, rank's cols].T): the partial sums of every rank."""

    def __init__(self, input_size: int, output_size: int, tp: TPGroup, *, dtype=None, device=None):
        super().__init__()
        self.tp, self.input_size, self.output_size = tp, input_size, output_size
        _, local = tp.shard(input_size, "input features")
        self.weight = _new_weight(output_size, local, dtype, device)
        self.weight.weight_loader = self.weight_loader
        self.gemv = None  # model.layers.gemv.GemvRouter for one-row inputs (CUDA, Hopper), see use_gemv

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check_shape(loaded, (self.output_size, self.input_size))
        start, n = self.tp.shard(self.input_size, "input features")
        param.data.copy_(loaded.narrow(1, start, n))

    def forward(self, x: torch.Tensor | DeferredRow, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`residual`: added to the (all-reduced) output, in the activation dtype; on one rank the GEMV
        route adds it in its epilogue."""
        if self.tp.world_size == 1:
            return _matmul(self.gemv, x, self.weight, residual)
        out = self.tp.all_reduce(_matmul(self.gemv, x, self.weight))
        return out if residual is None else out + residual
