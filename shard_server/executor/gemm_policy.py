"""How cuBLAS runs the matmuls captured into one CUDA graph: the library and the SMs they may use.

A captured matmul keeps the kernel cuBLAS chose when it was captured, so a graph can be captured under
settings that would be wrong process-wide. Two settings of torch matter (both read at call time):

    library      torch.backends.cuda.preferred_blas_library: "cublas" (torch's default) or "cublaslt"
    sm_carveout  torch._C._set_sm_carveout_experimental: SMs cuBLASLt leaves free (its SM count target)

Measured on an H200, Mistral-7B shape, decode forward graph-replayed (bench/profile_lora.py; results in
bench/results/h200-profile-lora-2026-12-01-{carveouts,stream,store}.json): cuBLASLt with 16 SMs left free
against cuBLAS, three runs: 0.961 / 0.995 / 0.998 of the step at 64 rows, 0.971 / 0.985 / 1.003 at 128
(about 1.5% on average, near this card's run-to-run noise; its heuristics pick tiles that need no
split-K reduce kernel). At 32 rows it was 1.010-1.023 (worse), so smaller buckets keep the default.
From 64 to 112 rows no SMs are left free (LT_CARVEOUT_ROWS below: measured better at 64 rows, worse at 128).
Leaving 32 SMs free costs the base matmuls 1-2% and is what lets a LoRA side stream run beside them
without waiting for SMs (model/adapters/batch.py; DecodeGraphs' few-adapter graphs): that is the gain
that matters here (docs/lora.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemmPolicy:
    library: str | None = None  # None: leave torch's choice
    sm_carveout: int = 0  # SMs the matmuls leave free (cuBLASLt only)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """These settings for the matmuls called inside (a capture); the previous ones restored after."""
        if self.library is None and not self.sm_carveout:
            yield
            return
        library = torch.backends.cuda.preferred_blas_library()
        carveout = torch._C._get_sm_carveout_experimental()
        try:
            if self.library is not None:
                torch.backends.cuda.preferred_blas_library(self.library)
            if self.sm_carveout:
                torch._C._set_sm_carveout_experimental(self.sm_carveout)
            yield
        finally:
            torch._C._set_sm_carveout_experimental(carveout)
            torch.backends.cuda.preferred_blas_library(library)


DEFAULT = GemmPolicy()
LT_ROWS = 64  # decode buckets of at least this many rows capture with cuBLASLt (module docstring)
# SMs cuBLASLt leaves free from LT_CARVEOUT_ROWS rows up (below: none). Measured on an H200, the base
# graph's replay over cuBLAS's in one process, cases in interleaved rounds (bench/results/
# h200-profile-lora-2026-12-01-base-carveouts.json), leaving 0 / 8 / 16 / 24 / 32 SMs free: 0.959 / 0.976 /
# 0.976 / 0.970 / 0.990 at 64 rows, 0.989 / 0.970 / 0.968 / 0.991 / 0.991 at 128. The isolated matmuls
# agree (h200-gemm-variants-2026-12-01.json: cuBLASLt's own heuristics 0.24 ms faster a step than cuBLAS
# at M = 64, 0.08 ms slower at M = 128).
LT_CARVEOUT, LT_CARVEOUT_ROWS = 16, 128
SIDE_STREAM_SMS = 32  # few-adapter LoRA graphs: SMs left to the LoRA side stream


def side_stream_fits(sms: int) -> bool:
    """Whether a device of `sms` SMs can leave SIDE_STREAM_SMS to a LoRA side stream: devices much smaller
    than an H100 keep torch's default (the carveouts would take too large a share)."""
    return sms >= 4 * SIDE_STREAM_SMS


def decode_policy(rows: int, sms: int, side_stream: bool = False) -> GemmPolicy:
    """The policy of a decode graph of `rows` rows on a device of `sms` SMs; `side_stream`: the graph runs
    LoRA on a side stream, which gets SIDE_STREAM_SMS of them (its kernels' grids are sized to the
    policy's sm_carveout)."""
    if not side_stream_fits(sms):
        return DEFAULT
    if side_stream:
        return GemmPolicy("cublaslt", SIDE_STREAM_SMS)
    if rows < LT_ROWS:
        return DEFAULT
    return GemmPolicy("cublaslt", LT_CARVEOUT if rows >= LT_CARVEOUT_ROWS else 0)
