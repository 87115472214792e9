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
