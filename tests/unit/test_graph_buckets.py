"""Which decode CUDA graphs Warmup captures: batch buckets and context buckets (pure arithmetic; the
capture itself is tested on the GPU in tests/gpu/test_engine_gpu.py)."""

from __future__ import annotations

import pytest

from shard_server.executor.graphs import (
    BATCH_BUCKETS,
    batch_buckets,
    bucket_of,
    context_bucket,
    context_buckets,
)


def test_batch_buckets_end_at_the_largest_batch():
    assert batch_buckets(256) == BATCH_BUCKETS
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert batch_buckets(1) == (1,)
    assert bucket_of(17, batch_buckets(20)) == 20 and bucket_of(21, batch_buckets(20)) is None


@pytest.mark.parametrize(
    ("max_len", "max_context", "window", "bucket"),
    [
        (1, 4096, None, 256),
        (256, 4096, None, 256),
        (257, 4096, None, 512),
        (3000, 4096, None, 4096),
        (3000, 2048, None, 2048),  # never past the model's positions
        (100, 128, None, 128),
        (9000, 32768, 4096, 4096),  # forward clamps max_s to the window: one graph for every longer context
        (9000, 32768, 5000, 8192),
        (300, 32768, 4096, 512),
    ],
)
def test_context_bucket(max_len, max_context, window, bucket):
    assert context_bucket(max_len, max_context, window) == bucket


def test_context_buckets_cover_every_length_up_to_the_limit():
    assert context_buckets(160, 2048, None) == (256,)
    assert context_buckets(4096 + 512, 32768, None) == (256, 512, 1024, 2048, 4096, 8192)
    assert context_buckets(32768, 32768, 4096) == (256, 512, 1024, 2048, 4096)
    assert context_buckets(100, 128, None) == (128,)
    for limit in (1, 255, 256, 257, 1000, 5000):
        buckets = context_buckets(limit, 8192, 3000)
        assert all(context_bucket(n, 8192, 3000) in buckets for n in range(1, limit + 1))
