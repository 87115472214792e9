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
    assert isinstance(router, GemvRouter) and router.pdl and model.attention.pdl_trigger
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
