"""bench/gemm_variants.py's host-side pieces: the config grid (bounded, valid for every Mistral shape) and
the picking of the best variant per shape and M, and the per-layer sums."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from bench import gemm_variants as gv  # noqa: E402
from model.kernels.gemm import GemmConfig  # noqa: E402


def test_config_grid_bounded_and_valid():
    distinct = set()
    for m in gv.MS:
        grid = gv.config_grid(m)
        assert 1 <= len(grid) <= 12 and len(set(grid)) == len(grid), m
        distinct |= set(grid)
        for n, k in gv.SHAPES.values():
            assert all(c.check(n, k) is None for c in grid), (m, n, k)
        if m <= 8:
            assert any(c.gemv and c.block_m >= m for c in grid)  # one program holds every row
    assert len(distinct) <= 80  # compile time of the whole run


def _row(shape, m, variant, us, config=None, ok=True):
    n, k = gv.SHAPES[shape]
    return dict(shape=shape, N=n, K=k, M=m, variant=variant, config=config, us=us, frac=0.5, ok=ok,
                max_abs_diff=0.0)  # fmt: skip


def test_pick_best_and_layer_sums():
    fast = GemmConfig(gemv=True, block_m=1, block_n=64, block_k=128, split_k=4).__dict__
    rows = [_row("o", 1, "cublas", 10.0), _row("o", 1, "pad64", 9.0), _row("o", 1, "triton", 8.0, fast),
            _row("o", 1, "triton", 1.0, fast, ok=False),  # wrong results never win
            _row("down", 1, "cublas", 30.0), _row("down", 1, "triton", 29.5, fast)]  # < 3%: keep cuBLAS
    best = gv.pick_best(rows)
    top = {b["shape"]: b for b in best}
    assert top["o"]["variant"] == "triton" and top["o"]["us"] == 8.0 and top["o"]["cublas_us"] == 10.0
    assert top["down"]["variant"] == "triton"  # fastest overall, even by a hair
    rows += [_row(s, 1, "cublas", 10.0) for s in ("qkv", "gate_up")]
    best = gv.pick_best(rows)
    sums = gv.layer_sums(rows, best, ms=(1,))["1"]
    assert sums["cublas_layer_us"] == 60.0 and sums["best_layer_us"] == 57.5
    assert abs(sums["saved_model_ms"] - 2.5 * 32 / 1e3) < 1e-12
