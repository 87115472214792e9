"""The GEMV route's shape rules and when it declines (model/layers/gemv.py); the kernel itself is checked
under the interpreter (tests/unit/test_gemm_interpret.py), for sm_90 with PDL by
tests/unit/test_gemm_compile_sm90.py, and natively by tests/gpu/test_gemv_gpu.py."""

from __future__ import annotations

import pytest
import torch

from model.layers.gemv import MEASURED, gemv_shape_config, router_supported


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),  # 7B
                                 (960, 576), (576, 576), (3072, 576), (576, 1536),  # SmolLM2-135M
                                 (3072, 2048), (16384, 4096)])  # fmt: skip
def test_every_config_fits_the_kernels_divisibility_rules(n, k):
    gm = pytest.importorskip("model.kernels.gemm")
    kw = gemv_shape_config(n, k)
    assert kw is not None
    cfg = gm.GemmConfig(block_m=1, gemv=True, num_stages=1, **kw)
    assert cfg.check(n, k) is None
    if (n, k) in MEASURED:
        assert kw == MEASURED[(n, k)]
    elif n >= 8192:
        assert kw["split_k"] == 1  # wide matrices have programs enough without splitting K


@pytest.mark.parametrize("n,k", [(100, 4096), (4096, 96), (64 * 3 + 1, 64)])
def test_shapes_the_kernel_cannot_take_stay_on_cublas(n, k):
    assert gemv_shape_config(n, k) is None


def test_not_routed_off_hopper():
    assert not router_supported(torch.device("cpu"), torch.bfloat16)
    assert not router_supported(torch.device("cpu"), torch.float32)


def test_layers_take_the_route_only_when_it_answers():
    """A projection calls its router first and falls back to F.linear when the router declines (None);
    row-parallel layers all-reduce whichever result (world size 1 here: the identity)."""
    from model.layers.linear import ColumnParallelLinear, RowParallelLinear
    from model.parallel import TPGroup

    calls = []

    def router(x, w, add=None):
        calls.append(x.shape[0])
        return torch.full((x.shape[0], w.shape[0]), 7.0) if x.shape[0] == 1 else None

    for cls in (ColumnParallelLinear, RowParallelLinear):
        layer = cls(8, 4, TPGroup(), dtype=torch.float32)
        layer.weight.data.normal_()
        layer.gemv = router
        one, two = torch.randn(1, 8), torch.randn(2, 8)
        assert torch.equal(layer(one), torch.full((1, 4), 7.0))
        assert torch.allclose(layer(two), two @ layer.weight.T)
        layer.gemv = None
        assert torch.allclose(layer(one), one @ layer.weight.T)
    assert calls == [1, 2, 1, 2]


def test_row_parallel_residual_is_added_by_the_route_or_after_the_matmul():
    """RowParallelLinear(x, residual): on one rank the router gets the residual to add in its epilogue;
    when it declines, F.linear's output plus the residual (in the activation dtype)."""
    from model.layers.linear import RowParallelLinear
    from model.parallel import TPGroup

    seen = []

    def router(x, w, add=None):
        seen.append(add)
        return (x @ w.T + add) * 0 - 1 if x.shape[0] == 1 else None

    layer = RowParallelLinear(8, 4, TPGroup(), dtype=torch.bfloat16)
    layer.weight.data.normal_()
    layer.gemv = router
    one, two = torch.randn(1, 8).bfloat16(), torch.randn(2, 8).bfloat16()
    res1, res2 = torch.randn(1, 4).bfloat16(), torch.randn(2, 4).bfloat16()
    assert torch.equal(layer(one, res1), torch.full((1, 4), -1.0).bfloat16())
    assert seen[-1] is res1
    assert torch.equal(layer(two, res2), two @ layer.weight.T + res2)
