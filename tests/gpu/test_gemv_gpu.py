"""The one-row GEMV route of the decoder projections (model/layers/gemv.py), natively on a Hopper GPU.

Eager: the route's logits equal cuBLAS's within bf16 tolerance at 1 row and are cuBLAS's, bit for bit, at
2 rows (not routed). In a CUDA graph: launched as programmatic dependents (PDL, the norm / silu / merge
kernels triggering early) the logits are those of the plain launch bit for bit, so griddepcontrol.wait
orders every read after the kernel before.
"""

from __future__ import annotations

import pytest
import torch

from model.config import MistralConfig
from model.flash_mistral import FlashMistralForCausalLM
from model.forward_batch import ForwardBatch
from model.layers.gemv import GemvRouter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                       reason="needs a Hopper (sm_90+) GPU"),
]


def _model():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e4, sliding_window=None,
                        tie_word_embeddings=False)
    model = FlashMistralForCausalLM(cfg, None, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def _step(model, rows: int, context: int = 300):
    from bench.profile_decode import DecodeCase

    case = DecodeCase(model, rows, context)

    def run():
        fb = ForwardBatch.decode(case.input_ids, case.positions, case.tables, block_size=model.block_size,
                                 max_s=512)
        return fb.run(model, case.kv.layers)

    return case, run


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_router_is_installed_and_matches_cublas_eagerly():
    model = _model()
    router = model.model.layers[0].self_attn.qkv_proj.gemv
    assert isinstance(router, GemvRouter) and router.pdl and model.attention.pdl
    for rows in (1, 2):
        _, run = _step(model, rows)
        routed = run().clone()
        model.use_gemv(None)
        plain = run().clone()
        model.use_gemv(router)
        assert torch.isfinite(routed).all()
        if rows == 1:
            assert _rel(routed, plain) < 2e-2
        else:
            assert torch.equal(routed, plain)  # more than one row: cuBLAS either way


def test_programmatic_dependent_launch_in_a_graph_equals_the_plain_launch():
    model = _model()
    router = model.model.layers[0].self_attn.qkv_proj.gemv
    outs = []
    _, run = _step(model, 1)  # the same inputs for both launches
    for pdl in (True, False):
        model.use_gemv(GemvRouter(router.configs, router.workspace, pdl=pdl))
        run()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run()
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        outs.append(out.clone())
        eager = run()
        assert _rel(out, eager) < 1e-6
    assert torch.equal(outs[0], outs[1])


def test_deferred_rows_match_the_unfused_route():
    """One row without LoRA: the norms and silu_and_mul computed by the GEMVs (model/layers/deferred.py)
    give the unfused route's logits within bf16 (the fused 1/rms sums the row in another order)."""
    model = _model()
    shipped = model.model.layers[0].self_attn.qkv_proj.gemv
    assert shipped.prologues and all(layer.defer_rows for layer in model.model.layers)
    _, run = _step(model, 1)
    fused = run().clone()
    model.use_gemv(GemvRouter(shipped.configs, shipped.workspace, pdl=True, prologues=False))
    unfused = run().clone()
    assert torch.isfinite(fused).all()
    assert _rel(fused, unfused) < 1e-2


@pytest.mark.parametrize("n,k", [(6144, 4096), (28672, 4096)])
def test_norm_prologue_matches_norm_then_gemv_at_7b_shapes(n, k):
    from model.kernels.gemm import GemmConfig, GemmWorkspace, gemm, gemv_rmsnorm
    from model.kernels.rmsnorm import fused_add_rmsnorm
    from model.layers.gemv import gemv_shape_config

    torch.manual_seed(n)
    x = torch.randn(1, k, device="cuda").bfloat16()
    nw = (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16()
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    cfg = GemmConfig(block_m=1, gemv=True, num_stages=1, **gemv_shape_config(n, k))
    ws = GemmWorkspace.for_shapes("cuda", [(cfg, 1, n)])
    fused = gemv_rmsnorm(x, nw, 1e-5, w, cfg, ws)
    normed, _ = fused_add_rmsnorm(x, None, nw, 1e-5)
    ref = gemm(normed, w, cfg, ws)
    assert _rel(fused, ref) < 2e-3
    assert (fused != ref).float().mean().item() < 0.02  # only where 1/rms's last bit tips a rounding
    assert ws.counters.eq(0).all()


@pytest.mark.parametrize("n,k", [(4096, 14336), (4096, 4096)])
def test_silu_prologue_and_residual_epilogue_at_7b_shapes(n, k):
    """down_proj (silu_and_mul in, residual added out) and o_proj (residual added): the unfused pair's
    values bit for bit (same arithmetic, same rounding)."""
    from model.kernels.activation import silu_and_mul
    from model.kernels.gemm import GemmConfig, GemmWorkspace, gemm, gemv_silu_mul
    from model.layers.gemv import gemv_shape_config

    torch.manual_seed(5)
    gate_up = (torch.randn(1, 2 * k, device="cuda") * 3).bfloat16()
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    residual = torch.randn(1, n, device="cuda").bfloat16()
    cfg = GemmConfig(block_m=1, gemv=True, num_stages=1, **gemv_shape_config(n, k))
    ws = GemmWorkspace.for_shapes("cuda", [(cfg, 1, n)])
    act = silu_and_mul(gate_up)
    plain = gemm(act, w, cfg, ws)
    assert torch.equal(gemv_silu_mul(gate_up, w, cfg, ws), plain)
    assert torch.equal(gemv_silu_mul(gate_up, w, cfg, ws, add=residual), plain + residual)
    assert torch.equal(gemm(act, w, cfg, ws, add=residual), plain + residual)


@pytest.mark.parametrize("fp8", [False, True])
def test_qkv_rope_gemv_matches_norm_gemv_then_rotary_kv_write_at_7b_shape(fp8):
    """The qkv GEMV with the norm in and rope + K/V write out (model/kernels/gemv_rope.py) against the
    three kernels it replaces, Mistral-7B's qkv shape."""
    from model.kernels.gemm import GemmConfig, GemmWorkspace, gemv_rmsnorm
    from model.kernels.gemv_rope import qkv_rope_gemv
    from model.kernels.rotary import rotary_kv_write
    from model.layers.gemv import gemv_shape_config

    torch.manual_seed(7)
    hq, hkv, d, k, bs = 32, 8, 128, 4096, 16
    n = (hq + 2 * hkv) * d
    x = torch.randn(1, k, device="cuda").bfloat16()
    nw = (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16()
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    freqs = torch.outer(torch.arange(4096, device="cuda").float(),
                        1e6 ** (-torch.arange(0, d, 2, device="cuda").float() / d))  # fmt: skip
    cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    scales = dict(k_scale=torch.tensor([0.05], device="cuda"), v_scale=torch.tensor([0.02], device="cuda")) \
        if fp8 else {}  # fmt: skip
    caches = [torch.zeros(9, bs, hkv, d, device="cuda").to(dtype) for _ in range(4)]
    positions, slots = torch.tensor([1234], device="cuda"), torch.tensor([5 * bs + 3], device="cuda")
    cfg = GemmConfig(block_m=1, gemv=True, num_stages=1, **gemv_shape_config(n, k))
    ws = GemmWorkspace.for_shapes("cuda", [(cfg, 1, n)])
    fused = qkv_rope_gemv(x, nw, 1e-5, w, cfg, ws, positions, cos, sin, caches[0], caches[1], slots, hq, hkv,
                          **scales)  # fmt: skip
    ref = gemv_rmsnorm(x, nw, 1e-5, w, cfg, ws)
    heads = ref.view(1, -1, d)
    q, k_, v = heads[:, :hq], heads[:, hq : hq + hkv], heads[:, hq + hkv :]
    rotary_kv_write(q, k_, v, positions, cos, sin, caches[2], caches[3], slots, **scales)
    assert ws.counters.eq(0).all()
    assert _rel(fused, ref) < 1e-3 and (fused != ref).float().mean().item() < 0.01
    for mine, theirs in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert mine.float().abs().sum() > 0
        assert _rel(mine.float(), theirs.float()) < (5e-2 if fp8 else 1e-3)
