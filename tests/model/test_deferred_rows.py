"""One-row layers hand their projections the norms and silu_and_mul deferred (model/layers/deferred.py),
for the GEMV route to compute in its programs; on the CPU the route's Triton GEMV runs under the
interpreter (float32, so the fused and unfused rows agree to rounding). Where the route declines a shape
the rows are computed first, giving the unrouted model's logits bit for bit; a batch with LoRA, or more
than one row, is never deferred."""

from __future__ import annotations

import pytest
import torch

from model.config import MistralConfig
from model.flash_mistral import FlashMistralForCausalLM
from model.forward_batch import ForwardBatch
from model.layers import deferred
from model.layers.gemv import GemvRouter


def _model(window: int | None = None):
    torch.manual_seed(0)
    # every projection fits the GEMV's divisibility rules (multiples of 64), o_proj's and down_proj's K = 256
    # splits, and head_dim 64 lets the qkv GEMV rotate (model/kernels/gemv_rope.py)
    cfg = MistralConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=1e4, sliding_window=window,
                        tie_word_embeddings=False)
    model = FlashMistralForCausalLM(cfg, None, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.05)
    return model


def _decode(model, rows: int, adapter_data=None, kv_dtype=None):
    from bench.profile_decode import DecodeCase

    torch.manual_seed(1)
    case = DecodeCase(model, rows, 20, kv_dtype)
    for _ in range(2):  # the second step reads the K/V the first one wrote
        fb = ForwardBatch.decode(case.input_ids, case.positions, case.tables, block_size=model.block_size,
                                 max_s=64, adapter_data=adapter_data)  # fmt: skip
        out = fb.run(model, case.kv.layers)
        case.positions += 1
    return out


def _router(model, configs=None, prologues=True):
    shapes = [tuple(m.weight.shape) for m in model.decoder_projections()]
    router = GemvRouter.for_shapes(shapes, torch.device("cpu"), pdl=False, prologues=prologues)
    if configs is None:
        return router
    return GemvRouter(configs, router.workspace, pdl=False, prologues=prologues)


def _interpreted() -> bool:
    triton = pytest.importorskip("triton")
    return type(triton.language.standard.cdiv).__name__ == "InterpretedFunction"


def test_declined_rows_are_computed_first_bit_for_bit(monkeypatch):
    model = _model()
    plain = _decode(model, 1)
    model.use_gemv(_router(model, configs={}))  # takes no shape: every row materialised
    made = []
    for cls in (deferred.NormedRow, deferred.SiluMulRow):
        orig = cls._compute
        monkeypatch.setattr(cls, "_compute", lambda self, orig=orig: made.append(type(self)) or orig(self))
    assert torch.equal(_decode(model, 1), plain)
    assert made.count(deferred.NormedRow) == 2 * 2 * 2 and made.count(deferred.SiluMulRow) == 2 * 2


def test_more_rows_or_lora_are_not_deferred(monkeypatch):
    from model.adapters.batch import InPlaceHook

    class NoDelta(InPlaceHook):
        def add_lora(self, layer_idx, target, x, out, widths=None):
            assert isinstance(x, torch.Tensor)

    model = _model()
    model.use_gemv(_router(model, configs={}))
    monkeypatch.setattr(deferred.DeferredRow, "materialize", lambda self: pytest.fail("deferred"))
    _decode(model, 2)
    _decode(model, 1, adapter_data=NoDelta())


@pytest.mark.slow
@pytest.mark.parametrize("window,kv_dtype", [(None, None), (8, torch.float8_e4m3fn)],
                         ids=["plain", "window-fp8"])  # fmt: skip
def test_fused_prologues_equal_the_unfused_model(monkeypatch, window, kv_dtype):
    """... also with a sliding window shorter than the context and an fp8 K/V cache (the rope epilogue
    scales and saturates what it writes as rotary_kv_write does)."""
    if torch.cuda.is_available() or not _interpreted():
        pytest.skip("the GEMV runs under the Triton interpreter here (natively: tests/gpu/test_gemv_gpu.py)")
    from triton_interpret import interpreted

    model = _model(window)
    plain = _decode(model, 1, kv_dtype=kv_dtype)
    with interpreted(()):  # the interpreter's shims (range over loaded bounds, rounding like the GPU)
        model.use_gemv(_router(model, prologues=False))
        routed = _decode(model, 1, kv_dtype=kv_dtype)
        model.use_gemv(_router(model, prologues=True))
        from model.kernels import gemv_rope

        calls = []
        with monkeypatch.context() as mp:  # every deferred row goes to the GEMV, none is materialised
            mp.setattr(deferred.DeferredRow, "materialize", lambda self: pytest.fail("materialised"))
            orig = gemv_rope.qkv_rope_gemv
            mp.setattr(gemv_rope, "qkv_rope_gemv", lambda *a, **k: calls.append(1) or orig(*a, **k))
            fused = _decode(model, 1, kv_dtype=kv_dtype)
        assert len(calls) == 2 * 2, "qkv with rope + K/V write in one kernel, every layer and step"
    torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    model.use_gemv(None)
    assert torch.equal(_decode(model, 1, kv_dtype=kv_dtype), plain)  # the route off: cuBLAS / torch for all
