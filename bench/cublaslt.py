"""cuBLASLt matmuls with a chosen algorithm, for bench/lt_algos.py: y[M, N] = x[M, K] @ W[N, K]^T, bf16/fp16.

torch runs each matmul with the first algorithm of cuBLAS(Lt)'s heuristic. This module asks cuBLASLt's
heuristic for more candidates of one problem and runs the one a caller picked, so that a benchmark can
time all of them:

    runtime = LtRuntime()                                   # one per process: library handle, workspaces
    plan = LtPlan.create(LtProblem(m, n, k), runtime, sm_targets=(0, sms - 32))
    plan.run(x, w, out, plan.candidates[i])                 # out = x @ w^T, on torch's current stream

Semantics of run(x, w, out, c), in the column-major terms cuBLASLt speaks:
    A = w seen as K x N (ld K), op(A) = A^T          -> N x K
    B = x seen as K x M (ld K), op(B) = B            -> K x M
    D = out seen as N x M (ld N) = op(A) @ op(B)     == (x @ w^T) row-major [M, N]
    accumulate in fp32 (CUBLAS_COMPUTE_32F), alpha = 1, beta = 0
Candidates differ in tile, split-K and reduction, so their results differ in the fp32 summation order
(a few bf16 ulps), as torch's own choices between cuBLAS and cuBLASLt do.

The library is the one torch already loaded (found in /proc/self/maps), the workspace a torch tensor,
the stream torch's current one: a call is captured into CUDA graphs like torch's own matmuls.

Why a bench tool and not part of the shard: the decode graphs captured with the candidate timed fastest
here (an experiment, commit ec6ab58) replayed no faster than with torch's pick at 64 and 128 rows
(bench/results/h200-profile-lora-2026-12-01-tuned.json), although in isolation the best candidates
summed to 0.15 ms a step less at 128 rows (h200-lt-algos-2026-12-01.json). README, "Decode" has the
numbers.
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass, field

import torch

_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_COMPUTE_32F = 68
_DESC_TRANSA, _DESC_TRANSB, _DESC_SM_COUNT_TARGET = 3, 4, 15
_PREF_MAX_WORKSPACE_BYTES = 1
_OP_N, _OP_T = 0, 1
_ALGO_CONFIG = {"id": 0, "tile": 1, "split_k": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6,
                "inner_shape": 7, "cluster": 8}  # fmt: skip
_DTYPES = {torch.bfloat16: _CUDA_R_16BF, torch.float16: _CUDA_R_16F}
WORKSPACE_BYTES = 32 << 20  # split-K candidates need one; 32 MiB is what cuBLAS itself takes on Hopper


class _Algo(ct.Structure):  # cublasLtMatmulAlgo_t: opaque, 8 x uint64
    _fields_ = [("data", ct.c_uint64 * 8)]


class _HeuristicResult(ct.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", _Algo), ("workspace_size", ct.c_size_t), ("state", ct.c_int),
                ("waves_count", ct.c_float), ("reserved", ct.c_int * 4)]  # fmt: skip


class CublasLtError(RuntimeError):
    pass


@dataclass
class _Library:
    """The cuBLASLt functions this module calls, from the shared object torch loaded."""

    lib: ct.CDLL
    handle: ct.c_void_p

    @classmethod
    def load(cls) -> _Library:
        path = _loaded_cublaslt_path()
        if path is None:
            raise CublasLtError("libcublasLt is not loaded in this process (no CUDA torch, or no matmul ran)")
        lib = ct.CDLL(path)
        vp, i32, i64, u64, sz = ct.c_void_p, ct.c_int32, ct.c_int64, ct.c_uint64, ct.c_size_t
        sigs = {
            "cublasLtCreate": [ct.POINTER(vp)],
            "cublasLtMatmulDescCreate": [ct.POINTER(vp), i32, i32],
            "cublasLtMatmulDescSetAttribute": [vp, i32, vp, sz],
            "cublasLtMatmulDescDestroy": [vp],
            "cublasLtMatrixLayoutCreate": [ct.POINTER(vp), i32, u64, u64, i64],
            "cublasLtMatrixLayoutDestroy": [vp],
            "cublasLtMatmulPreferenceCreate": [ct.POINTER(vp)],
            "cublasLtMatmulPreferenceSetAttribute": [vp, i32, vp, sz],
            "cublasLtMatmulPreferenceDestroy": [vp],
            "cublasLtMatmulAlgoGetHeuristic": [vp] * 7 + [i32, ct.POINTER(_HeuristicResult), ct.POINTER(i32)],
            "cublasLtMatmulAlgoConfigGetAttribute": [ct.POINTER(_Algo), i32, vp, sz, ct.POINTER(sz)],
            "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, ct.POINTER(_Algo), vp, sz, vp],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ct.c_int
        handle = ct.c_void_p()
        _check(lib.cublasLtCreate(ct.byref(handle)), "cublasLtCreate")
        return cls(lib, handle)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"{what} failed: cublasStatus {status}")


def _loaded_cublaslt_path() -> str | None:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "libcublasLt.so" in path:
                    return path
    except OSError:
        return None
    return None


@dataclass
class LtRuntime:
    """One library handle and one workspace per device, created on first use."""

    library: _Library | None = None
    workspaces: dict[int, torch.Tensor] = field(default_factory=dict)

    def lib(self) -> _Library:
        if self.library is None:
            # torch loads cuBLASLt lazily: one tiny matmul makes sure the shared object is mapped.
            one = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
            one @ one
            self.library = _Library.load()
        return self.library

    def workspace(self, device: torch.device) -> torch.Tensor:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.workspaces:
            self.workspaces[index] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return self.workspaces[index]


@dataclass(frozen=True)
class LtProblem:
    m: int
    n: int
    k: int
    dtype: torch.dtype = torch.bfloat16


@dataclass
class LtCandidate:
    """One algorithm the heuristic offered, with the SM target of the descriptor it was asked under (the
    kernel is run under that descriptor: a persistent kernel sizes its grid by it)."""

    sm_target: int  # 0: all of the device's SMs
    workspace_limit: int  # the query's workspace limit
    workspace_bytes: int  # what this algorithm needs
    waves: float
    config: dict[str, int]
    algo: _Algo = field(repr=False)

    @property
    def key(self) -> tuple[int, bytes]:
        return self.sm_target, bytes(self.algo)

    def describe(self) -> dict:
        return dict(sm_target=self.sm_target, workspace_limit=self.workspace_limit,
                    workspace_bytes=self.workspace_bytes, waves=self.waves, **self.config)  # fmt: skip


@dataclass
class LtPlan:
    """Descriptors and heuristic candidates of one problem; reusable for any x, w, out of its shape.

    The candidates are the union (deduplicated) of the heuristic's answers under every SM target in
    `sm_targets` and every workspace limit in `workspace_limits`: a limit excludes the algorithms that
    need more, so smaller limits surface other tiles (torch itself asks with 1 MiB)."""

    problem: LtProblem
    runtime: LtRuntime
    descs: dict[int, ct.c_void_p]  # sm target -> matmul descriptor
    layouts: tuple[ct.c_void_p, ct.c_void_p, ct.c_void_p]  # A (w), B (x), D (out)
    candidates: list[LtCandidate]
    _alpha: ct.c_float = field(default_factory=lambda: ct.c_float(1.0))
    _beta: ct.c_float = field(default_factory=lambda: ct.c_float(0.0))

    @classmethod
    def create(
        cls,
        problem: LtProblem,
        runtime: LtRuntime,
        sm_targets: tuple[int, ...] = (0,),
        workspace_limits: tuple[int, ...] = (0, 1 << 20, 4 << 20, WORKSPACE_BYTES),
        count: int = 16,
    ) -> LtPlan:
        if problem.dtype not in _DTYPES:
            raise ValueError(f"cuBLASLt plans take bf16 or fp16, not {problem.dtype}")
        if max(workspace_limits) > WORKSPACE_BYTES:
            raise ValueError(f"workspace limits above {WORKSPACE_BYTES} bytes")
        lt = runtime.lib()
        lib = lt.lib
        dt = _DTYPES[problem.dtype]
        m, n, k = problem.m, problem.n, problem.k
        layouts = []
        for rows, cols, ld in ((k, n, k), (k, m, k), (n, m, n)):
            lay = ct.c_void_p()
            _check(lib.cublasLtMatrixLayoutCreate(ct.byref(lay), dt, rows, cols, ld), "MatrixLayoutCreate")
            layouts.append(lay)
        a, b, d = layouts
        descs: dict[int, ct.c_void_p] = {}
        candidates: dict[tuple[int, bytes], LtCandidate] = {}
        for target in sm_targets:
            desc = descs[target] = _matmul_desc(lib, target)
            for limit in workspace_limits:
                for r in _heuristic(lt, desc, a, b, d, limit, count):
                    cand = LtCandidate(target, limit, int(r.workspace_size), float(r.waves_count),
                                       _config(lib, r.algo), _Algo.from_buffer_copy(r.algo))  # fmt: skip
                    candidates.setdefault(cand.key, cand)
        return cls(problem, runtime, descs, (a, b, d), list(candidates.values()))

    def run(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cand: LtCandidate) -> torch.Tensor:
        """out = x @ w^T with candidate `cand` (module docstring), on the current stream."""
        p = self.problem
        if x.shape != (p.m, p.k) or w.shape != (p.n, p.k) or out.shape != (p.m, p.n):
            raise ValueError(f"shapes {tuple(x.shape)} @ {tuple(w.shape)}^T -> {tuple(out.shape)} "
                             f"do not match the plan's M={p.m} N={p.n} K={p.k}")  # fmt: skip
        if not (x.is_contiguous() and w.is_contiguous() and out.is_contiguous()):
            raise ValueError("cuBLASLt plans take contiguous tensors")
        if not (x.dtype == w.dtype == out.dtype == p.dtype):
            raise ValueError(f"dtypes {x.dtype}, {w.dtype}, {out.dtype}: the plan takes {p.dtype}")
        lt = self.runtime.lib()
        ws = self.runtime.workspace(out.device)
        a, b, d = self.layouts
        stream = torch.cuda.current_stream(out.device).cuda_stream
        status = lt.lib.cublasLtMatmul(
            lt.handle, self.descs[cand.sm_target], ct.byref(self._alpha), w.data_ptr(), a, x.data_ptr(), b,
            ct.byref(self._beta), out.data_ptr(), d, out.data_ptr(), d, ct.byref(cand.algo),
            ws.data_ptr(), WORKSPACE_BYTES, stream,
        )  # fmt: skip
        _check(status, "cublasLtMatmul")
        return out

    def close(self) -> None:
        lib = self.runtime.lib().lib
        for lay in self.layouts:
            lib.cublasLtMatrixLayoutDestroy(lay)
        for desc in self.descs.values():
            lib.cublasLtMatmulDescDestroy(desc)
        self.layouts, self.descs = (), {}  # type: ignore[assignment]


def _matmul_desc(lib: ct.CDLL, sm_target: int) -> ct.c_void_p:
    desc = ct.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ct.byref(desc), _COMPUTE_32F, _CUDA_R_32F), "MatmulDescCreate")
    attrs = [(_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)] + (
        [(_DESC_SM_COUNT_TARGET, sm_target)] if sm_target else []
    )
    for attr, value in attrs:
        v = ct.c_int32(value)
        _check(
            lib.cublasLtMatmulDescSetAttribute(desc, attr, ct.byref(v), 4), f"MatmulDescSetAttribute({attr})"
        )
    return desc


def _heuristic(lt: _Library, desc, a, b, d, workspace_limit: int, count: int) -> list[_HeuristicResult]:
    lib = lt.lib
    pref = ct.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ct.byref(pref)), "MatmulPreferenceCreate")
    try:
        ws = ct.c_uint64(workspace_limit)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ct.byref(ws), 8),
               "MatmulPreferenceSetAttribute")  # fmt: skip
        results = (_HeuristicResult * count)()
        returned = ct.c_int32(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(lt.handle, desc, a, b, d, d, pref, count, results,
                                                    ct.byref(returned))  # fmt: skip
    finally:
        lib.cublasLtMatmulPreferenceDestroy(pref)
    if status != 0:  # e.g. CUBLAS_STATUS_NOT_SUPPORTED: nothing fits this limit
        return []
    return [results[i] for i in range(returned.value) if results[i].state == 0]


def _config(lib: ct.CDLL, algo: _Algo) -> dict[str, int]:
    out = {}
    for name, attr in _ALGO_CONFIG.items():
        v, written = ct.c_uint32(0), ct.c_size_t(0)
        get = lib.cublasLtMatmulAlgoConfigGetAttribute
        if get(ct.byref(algo), attr, ct.byref(v), 4, ct.byref(written)) == 0:
            out[name] = int(v.value)
    return out
