"""Tensor-parallel building blocks. Every parameter carries a `weight_loader(param, loaded[, shard_id])`
that copies this rank's share of a full checkpoint tensor, so model/weights.py never knows about sharding.
"""

from model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from model.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    WeightShapeError,
    default_weight_loader,
)
from model.layers.norm import RMSNorm
from model.layers.rotary import RotaryEmbedding

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "WeightShapeError",
    "default_weight_loader",
]
