"""One-row matmuls of the decoder's projections through our Triton GEMV, launched early (Hopper).

At batch 1 a decode step is a chain of GEMVs and small kernels. Two things make it faster than cuBLAS
there (H200, Mistral-7B shape, decode graph replay, bench/pdl_decode.py,
bench/results/h200-pdl-decode-2026-12-01.json): the GEMV of model/kernels/gemm.py itself (4.345 against
4.530 ms a step, where isolated it was only 2% faster: bench/gemm_variants.py), and launching it as a
programmatic dependent (PDL) of the small kernel before it (4.298 ms), which then triggers its
dependents at its start (`pdl_trigger` of the norm, silu_and_mul and attention-merge kernels): the GEMV
is resident when that kernel ends and waits for it with griddepcontrol.wait before it reads x, so the
values are those of the plain launch, bit for bit. Asking L2 for the GEMV's weight slice before the wait
did not pay (2-4 chunks: 1-5% slower).

    GemvRouter(x [M, K], w [N, K]) -> x @ w^T via the GEMV when M == 1 and (N, K) has a config;
                                      None otherwise (the layer then calls F.linear)

With `prologues` (the default) a one-row layer without LoRA on one rank also hands its projections the
norms and silu_and_mul deferred (model/layers/deferred.py): the GEMV computes them in its programs, and
o_proj / down_proj add the residual in their epilogue, three kernels a layer fewer (decode graph at batch
1: 4.206 against 4.357 ms, bench/results/h200-pdl-decode-2026-12-01-rows-epilogue.json).

Installed by FlashMistralForCausalLM on CUDA devices of compute capability 9.0 and above (where it was
measured; PDL needs it) for bf16 / fp16 weights; lm_head keeps cuBLAS. The split-K workspace is shared
by every call: calls on one stream only (the model's forward), counters back at zero after each.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

# Measured best at M = 1 on an H200 (bench/results/h200-gemm-variants-2026-12-01.json), Mistral-7B (N, K)
MEASURED = {
    (6144, 4096): dict(block_n=64, block_k=128, split_k=4),
    (4096, 4096): dict(block_n=32, block_k=256, split_k=4),
    (28672, 4096): dict(block_n=64, block_k=128, split_k=1),
    (4096, 14336): dict(block_n=32, block_k=256, split_k=4),
}


def gemv_shape_config(n: int, k: int) -> dict | None:
    """GEMV tile settings for an [N, K] weight: the measured ones, else the rule they follow (64 output
    rows a program, 128- or 64-wide K steps, K split 4 ways for N < 8192 so that a narrow matrix still
    has programs for every SM); None when the kernel's divisibility rules cannot be met."""
    if (n, k) in MEASURED:
        return dict(MEASURED[(n, k)])
    if n % 64 or k % 64:
        return None
    block_k = 128 if k % 128 == 0 else 64
    split = next(s for s in (4, 2, 1) if k % (block_k * s) == 0 and (n < 8192 or s == 1))
    return dict(block_n=64, block_k=block_k, split_k=split)


def router_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("triton") is not None
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


# Rows the route takes: its configs are one-row GEMVs (block_m 1), which would read W once per row.
ROWS = 1


@dataclass
class GemvRouter:
    configs: dict  # (N, K) -> model.kernels.gemm.GemmConfig
    workspace: object  # model.kernels.gemm.GemmWorkspace
    pdl: bool = True
    # one-row layers hand their projections the norms / silu_and_mul deferred (model/layers/deferred.py)
    # for the GEMV to compute in its programs: three kernels a layer fewer
    prologues: bool = True
    # with prologues: the qkv GEMV also rotates q, k and writes the K/V cache (model/kernels/gemv_rope.py)
    rope: bool = True

    @classmethod
    def for_shapes(cls, shapes, device: torch.device, *, pdl: bool = True,
                   prologues: bool = True) -> GemvRouter:  # fmt: skip
        from model.kernels.gemm import GemmConfig, GemmWorkspace

        configs = {}
        for n, k in set(shapes):
            kw = gemv_shape_config(n, k)
            if kw is not None:
                configs[(n, k)] = GemmConfig(block_m=1, gemv=True, num_warps=4, num_stages=1, **kw)
        workspace = GemmWorkspace.for_shapes(device, [(c, ROWS, nk[0]) for nk, c in configs.items()])
        return cls(configs, workspace, pdl, prologues)

    def _config(self, w: torch.Tensor):
        """The GEMV config for weight w (None: no config for its shape, or not contiguous)."""
        return self.configs.get(tuple(w.shape)) if w.is_contiguous() else None

    def __call__(self, x: torch.Tensor, w: torch.Tensor,
                 add: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
        """x @ w^T (+ add [1, N], rounded as the activation dtype adds) for one row; None otherwise."""
        cfg = self._config(w)
        if x.shape[0] != ROWS or cfg is None:
            return None
        from model.kernels.gemm import gemm

        return gemm(x.contiguous(), w, cfg, self.workspace, pdl=self.pdl,
                    add=None if add is None else add.contiguous())  # fmt: skip

    def deferred(self, row, w: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor | None:
        """row @ w^T (+ add) for a DeferredRow (model/layers/deferred.py), its norm or activation computed
        by the GEMV's programs; None when (N, K) has no config (the caller materialises the row)."""
        cfg = self._config(w)
        if cfg is None:
            return None
        return row.gemv(w, cfg, self.workspace, self.pdl, None if add is None else add.contiguous())

    def qkv_rope(self, row, w: torch.Tensor, num_heads: int, num_kv_heads: int, kv,
                 step) -> torch.Tensor | None:  # fmt: skip
        """The qkv projection of a deferred norm row with rope and the K/V cache write in its epilogue
        (model/kernels/gemv_rope.py): q, k rotated, K/V in kv's cache at step.slots. None when the kernel
        cannot take the shape (the caller then runs the projection and rotary_kv_write)."""
        from model.kernels import gemv_rope

        cfg = self._config(w)
        head_dim = w.shape[0] // (num_heads + 2 * num_kv_heads)
        if not self.rope or cfg is None or not gemv_rope.supports(cfg, head_dim):
            return None
        return gemv_rope.qkv_rope_gemv(
            row.x.contiguous(), row.norm.weight, row.norm.eps, w, cfg, self.workspace, step.token_rows,
            step.cos[:, 0], step.sin[:, 0], kv.k, kv.v, step.slots, num_heads, num_kv_heads,
            k_scale=kv.k_scale, v_scale=kv.v_scale, pdl=self.pdl,
        )  # fmt: skip
