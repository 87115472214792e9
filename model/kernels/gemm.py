"""Dense y = x @ W^T in Triton for the decode / verify matmuls (M = 1..256 tokens), with in-kernel split-K.

    x [M, K], w [N, K] (row-major, K contiguous), out [M, N]; bf16/fp16 (fp32 for tests), fp32 accumulation.

Semantics (`gemm_ref` is the reference):

    for each output tile (m0, n0) of BLOCK_M x BLOCK_N, each split s of K (K_CHUNK = K / SPLIT_K):
        acc[s] = x[m0:m0+BM, s*K_CHUNK:(s+1)*K_CHUNK] @ w[n0:n0+BN, s*K_CHUNK:(s+1)*K_CHUNK].T   fp32
    out[m0:m0+BM, n0:n0+BN] = (sum_s acc[s]).to(out.dtype)            rows >= M are never written

Two kernels, one config dataclass (`GemmConfig`):
  * `_gemm_kernel` (tl.dot): programs ordered in GROUP_M bands so the programs that share a W column block
    run together and meet it in L2. SWAP_AB computes the tile as (W @ x^T)^T: the W rows fill the MMA's
    64-row side (wgmma needs 64 per warpgroup) while a few tokens fill its narrow side, for M in 16..64.
  * `_gemv_kernel` (gemv=True, M <= 8 or so): no tl.dot. Each program streams a [BLOCK_N, BLOCK_K] tile of W
    per step, multiplies it by every row of x (broadcast) into an fp32 accumulator that keeps the K lanes
    apart, and reduces them once at the end (no shuffles in the loop).
Split-K (SPLIT_K > 1) reduces inside the same launch: every split stores its fp32 partial to the caller's
workspace; the last split of an output tile to arrive (an acq_rel atomic on a per-tile counter) sums the
partials in split order (its own from registers, so the result does not depend on who came last), writes
the bf16 tile and sets the counter back to 0, so the next call (a CUDA-graph replay) starts from zeros
with no memset. Same protocol as model/kernels/lora.py.

One-row GEMVs can compute the row they multiply (PROLOGUE: gemv_rmsnorm, gemv_silu_mul) and add a residual
to their output (`add`), so that the norm / silu_and_mul kernels around them are not launched at batch 1
(model/layers/deferred.py).

The model runs its one-row projections through the GEMV on Hopper (model/layers/gemv.py: in the decode
graph 4% faster than cuBLAS at batch 1, 5% launched as a programmatic dependent); bench/gemm_variants.py
measures every config against cuBLAS (bench/results/h200-gemm-variants-2026-12-01.json: isolated, the
best saved 0.08 ms of a 7B step at M = 1, and were slower than cuBLAS from M = 64 up).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False  # the broadcast-multiply kernel (no tl.dot): tiny M
    swap_ab: bool = False  # tl.dot kernel: tile computed as (W @ x^T)^T (W rows on the MMA's wide side)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "split_k", "group_m"):
            v = getattr(self, name)
            assert v >= 1 and v & (v - 1) == 0, f"GemmConfig.{name}={v} must be a power of two"
        assert not (self.gemv and self.swap_ab), "swap_ab is a tl.dot variant"
        assert self.gemv or min(self.block_m, self.block_n, self.block_k) >= 16, "tl.dot needs tiles >= 16"

    def short(self) -> str:
        kind = "gemv" if self.gemv else ("swap" if self.swap_ab else "dot")
        return (f"{kind} m{self.block_m} n{self.block_n} k{self.block_k} s{self.split_k} g{self.group_m} "
                f"w{self.num_warps} st{self.num_stages}")

    def check(self, n: int, k: int) -> str | None:
        """Why this config cannot run an [N, K] weight (None: it can)."""
        if n % 64 or k % 64:
            return f"N={n} and K={k} must be multiples of 64"
        if n % self.block_n:
            return f"N={n} is not a multiple of BLOCK_N={self.block_n}"
        if k % (self.block_k * self.split_k):
            return f"K={k} does not split into {self.split_k} chunks of whole BLOCK_K={self.block_k} blocks"
        return None


@dataclass
class GemmWorkspace:
    """Split-K scratch owned by the caller: fp32 partials and per-tile arrival counters (zero at rest).

    Allocate once (outside any CUDA-graph capture) and pass to every call; calls on one stream may share it
    (each call's last splits leave the counters at 0). Concurrent calls on different streams must not.
    """

    partials: torch.Tensor  # [P] float32
    counters: torch.Tensor  # [C] int32, all zero between calls

    @classmethod
    def allocate(cls, device, partial_elems: int, num_counters: int) -> GemmWorkspace:
        return cls(torch.empty(max(1, partial_elems), dtype=torch.float32, device=device),
                   torch.zeros(max(1, num_counters), dtype=torch.int32, device=device))

    @staticmethod
    def needs(cfg: GemmConfig, m: int, n: int) -> tuple[int, int]:
        """(partial elements, counters) one call with this config needs; (0, 0) without split-K."""
        if cfg.split_k == 1:
            return 0, 0
        tiles = triton.cdiv(m, cfg.block_m) * (n // cfg.block_n)
        return cfg.split_k * tiles * cfg.block_m * cfg.block_n, tiles

    @classmethod
    def buffers(cls, workspace: GemmWorkspace | None, cfg: GemmConfig, m: int, n: int, out: torch.Tensor):
        """(partials, counters) a launch of `cfg` on [m, n] passes: `workspace`'s (checked large enough;
        one allocated for this call when None), or `out` twice without split-K (unread: any pointer)."""
        part_elems, counters = cls.needs(cfg, m, n)
        if not counters:
            return out, out
        if workspace is None:
            workspace = cls.allocate(out.device, part_elems, counters)
        assert workspace.partials.numel() >= part_elems and workspace.counters.numel() >= counters, \
            f"workspace too small: needs {part_elems} partials and {counters} counters"
        return workspace.partials, workspace.counters

    @classmethod
    def for_shapes(cls, device, uses: Iterable[tuple[GemmConfig, int, int]]) -> GemmWorkspace:
        """Big enough for every (config, M, N) in `uses`."""
        p = c = 0
        for cfg, m, n in uses:
            pp, cc = cls.needs(cfg, m, n)
            p, c = max(p, pp), max(c, cc)
        return cls.allocate(device, p, c)


def gemm_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The specification: fp32 (fp64 for fp32 inputs) product of x [M, K] and w [N, K]^T, in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float32 else torch.float32
    return (x.to(acc) @ w.to(acc).T).to(x.dtype)


@triton.jit
def _store_out(out_ptrs, add_ptrs, total, ok, ADD: tl.constexpr):
    # out = total rounded to out's dtype; ADD: plus the addend, the sum rounded again (a projection's
    # output added to the residual stream in the activation dtype, as transformers adds it)
    y = total.to(out_ptrs.dtype.element_ty)
    if ADD:
        y = (y.to(tl.float32) + tl.load(add_ptrs, mask=ok, other=0.0).to(tl.float32)).to(y.dtype)
    tl.store(out_ptrs, y, mask=ok)


@triton.jit
def _split_total(acc, part_ptr, cnt_ptr, ok, tile, num_tiles, split,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # -> (total, mine): the tile's sum over the K splits, and whether this program is the one that writes
    # it (the last split to arrive; the only one without split-K). acc [BLOCK_M, BLOCK_N] fp32: this
    # split's sum; `ok` masks rows >= M.
    if SPLIT_K == 1:
        return acc, True
    else:
        # partials [SPLIT_K, num_tiles, BLOCK_M, BLOCK_N]: whole tiles, so no masks (the workspace is sized
        # for the padded rows)
        tile_elems: tl.constexpr = BLOCK_M * BLOCK_N
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_part = part_ptr + tile.to(tl.int64) * tile_elems + local
        split_stride = num_tiles.to(tl.int64) * tile_elems
        tl.store(tile_part + split * split_stride, acc)
        tl.debug_barrier()  # every thread's partial written before the arrival is counted
        counter = cnt_ptr + tile
        mine = tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1
        # summed in split order whichever split arrives last (bitwise reproducible); its own partial is
        # still in registers. The others' loads are masked off in the programs that do not write.
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            other = tl.load(tile_part + s * split_stride, mask=(s != split) & ok & mine, other=0.0,
                            cache_modifier=".cg")  # fmt: skip
            total += tl.where(s == split, acc, other)
        tl.atomic_xchg(counter, 0, mask=mine)  # ready for the next call: no memset, graph replays safe
        return total, mine


@triton.jit
def _epilogue(acc, out_ptr, part_ptr, cnt_ptr, offs_m, offs_n, M, N, tile, num_tiles, split,
              SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              add_ptr, ADD: tl.constexpr):  # fmt: skip
    # out[offs_m, offs_n] = the tile's total over the splits (+ add); N is a multiple of BLOCK_N.
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    add_ptrs = add_ptr + offs_m[:, None] * N + offs_n[None, :]  # read only with ADD
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    total, mine = _split_total(acc, part_ptr, cnt_ptr, ok, tile, num_tiles, split, SPLIT_K, BLOCK_M, BLOCK_N)
    _store_out(out_ptrs, add_ptrs, total, ok & mine, ADD)


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    # grid (tiles_m * tiles_n, SPLIT_K). x [M, K], w [N, K], out [M, N], all contiguous.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = N // BLOCK_N
    # GROUP_M bands: consecutive programs walk GROUP_M row tiles of one W column block before the next
    # block, so a W tile is fetched from HBM once and its other readers hit L2.
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_chunk = tl.multiple_of(K // SPLIT_K, BLOCK_K)  # the host checks K % (BLOCK_K * SPLIT_K) == 0
    k_lo = split * k_chunk
    rows = offs_m % M  # rows past M re-read valid rows (no load masks); their results are never stored
    x_ptrs = x_ptr + rows[:, None] * K + (k_lo + offs_k)[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_n[:, None] * K + (k_lo + offs_k)[None, :]  # [BN, BK]
    if SWAP_AB:
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, k_chunk, BLOCK_K):
        a = tl.load(x_ptrs)
        b = tl.load(w_ptrs)
        if SWAP_AB:
            acc_t = tl.dot(b, tl.trans(a), acc_t, input_precision=DOT_PREC)  # [BN, BM]
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PREC)  # [BM, BN]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc_t)
    _epilogue(acc, out_ptr, part_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_m * tiles_n + pid_n,
              tiles_m * tiles_n, split, SPLIT_K, BLOCK_M, BLOCK_N, out_ptr, False)  # fmt: skip


# What the one-row GEMV multiplies W by (`PROLOGUE`), computed by every program from its inputs so that the
# kernel that would have produced it (a norm, silu_and_mul) is not launched at all:
ROW_PLAIN, ROW_RMSNORM, ROW_SILU_MUL = 0, 1, 2


@triton.jit
def _row_rstd(x_ptr, K, eps, FULL_K: tl.constexpr):
    # ROW_RMSNORM: 1 / rms of the whole row x [K] (each program reads all of it: 8 KB from L2 for a
    # 4096-wide row, issued at once)
    offs = tl.arange(0, FULL_K)
    xf = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / K + eps)


@triton.jit
def _row_chunk(x_ptr, nw_ptr, k, K, rstd, PROLOGUE: tl.constexpr):
    # elements k ([BLOCK_K] offsets) of the row W is multiplied by, in fp32, rounded as the unfused
    # kernels round them (model/kernels/rmsnorm.py, activation.py)
    if PROLOGUE == 1:  # weight * (x * rstd).to(dtype), rounded
        x = tl.load(x_ptr + k)
        normed = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32) * tl.load(nw_ptr + k).to(tl.float32)
        return normed.to(x.dtype).to(tl.float32)
    elif PROLOGUE == 2:  # x = gate_up [2K]: silu(gate) rounded, times up, rounded
        up = tl.load(x_ptr + K + k)
        gate = tl.load(x_ptr + k).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype).to(tl.float32)
    else:
        return tl.load(x_ptr + k).to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, nw_ptr, add_ptr, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, PDL: tl.constexpr, PROLOGUE: tl.constexpr = 0,
                 FULL_K: tl.constexpr = 16, ADD: tl.constexpr = False):  # fmt: skip
    # grid (N // BLOCK_N, SPLIT_K, cdiv(M, BLOCK_M)): one W column block and K chunk per program, all of
    # the (few) rows of x at once, so W is read once per row tile. PROLOGUE != ROW_PLAIN or ADD: M == 1.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_chunk = tl.multiple_of(K // SPLIT_K, BLOCK_K)  # the host checks K % (BLOCK_K * SPLIT_K) == 0
    k_lo = split * k_chunk
    m_ok = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None] * K + (k_lo + offs_k)[None, :]  # [BN, BK], 16-byte runs along K
    if PDL:  # launched early, beside the kernel before (programmatic dependent launch): wait for its
        # output (x) to be complete and visible before the first read
        tl.extra.cuda.gdc_wait()
    if BLOCK_M == 1:
        rstd = 1.0
        if PROLOGUE == 1:
            rstd = _row_rstd(x_ptr, K, eps, FULL_K)
        k = k_lo + offs_k  # [BK]
        lanes = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for _ in range(0, k_chunk, BLOCK_K):
            w = tl.load(w_ptrs).to(tl.float32)
            xv = _row_chunk(x_ptr, nw_ptr, k, K, rstd, PROLOGUE)
            lanes += w * xv[None, :]
            w_ptrs += BLOCK_K
            k += BLOCK_K
        acc = tl.sum(lanes, axis=1)[None, :]  # [1, BN]
    else:
        x_ptrs = x_ptr + offs_m[:, None] * K + (k_lo + offs_k)[None, :]  # [BM, BK]
        lanes3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for _ in range(0, k_chunk, BLOCK_K):
            w = tl.load(w_ptrs).to(tl.float32)
            xv = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
            lanes3 += xv[:, None, :] * w[None, :, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        acc = tl.sum(lanes3, axis=2)  # [BM, BN]
    if PDL:  # the kernel after us may launch now (it waits for us itself if it is a dependent)
        tl.extra.cuda.gdc_launch_dependents()
    tiles_n = N // BLOCK_N
    _epilogue(acc, out_ptr, part_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_m * tiles_n + pid_n,
              tl.cdiv(M, BLOCK_M) * tiles_n, split, SPLIT_K, BLOCK_M, BLOCK_N, add_ptr, ADD)  # fmt: skip


def gemm(x: torch.Tensor, w: torch.Tensor, cfg: GemmConfig, workspace: GemmWorkspace | None = None,
         out: torch.Tensor | None = None, *, pdl: bool = False,
         add: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """out [M, N] = x [M, K] @ w [N, K]^T with `cfg` (module docstring). With split-K and no `workspace`
    one is allocated for this call (not CUDA-graph safe); a passed one must be large enough.
    `pdl` (gemv configs, sm_90+): launched as a programmatic dependent of the kernel before it, which
    may then be still running (it must call gdc_launch_dependents early to let this one start): the
    programs wait for it (gdc_wait) before reading x.
    `add` [1, N] (one-row GEMV configs): out = (x @ w^T rounded) + add, rounded (the residual add)."""
    assert x.dim() == 2 and x.is_contiguous(), "gemm needs a contiguous x [M, K]"
    return _launch(x, x.shape[0], x.shape[1], w, cfg, workspace, out, pdl, add=add)


def gemv_rmsnorm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w: torch.Tensor, cfg: GemmConfig,
                 workspace: GemmWorkspace | None = None, *, pdl: bool = False) -> torch.Tensor:  # fmt: skip
    """out [1, N] = rmsnorm(x) @ w^T for one row x [1, K], the norm computed by the GEMV's programs (no
    norm kernel): each reads the whole row for 1/rms, then normalises its K chunk as it streams W.

        h = norm_weight * (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)   (rounded)
        out = h @ w^T
    (The residual add before the norm is the epilogue of the GEMV that produced x: `gemm(..., add=)`.)"""
    assert cfg.gemv and cfg.block_m == 1, "a GEMV config of one row"
    assert x.shape == (1, w.shape[1]) and x.is_contiguous() and norm_weight.shape == (x.shape[1],)
    assert norm_weight.dtype == x.dtype and norm_weight.is_contiguous(), "norm weight in x's dtype"
    return _launch(x, 1, x.shape[1], w, cfg, workspace, None, pdl, prologue=ROW_RMSNORM,
                   norm=(norm_weight, float(eps)))  # fmt: skip


def gemv_silu_mul(gate_up: torch.Tensor, w: torch.Tensor, cfg: GemmConfig,
                  workspace: GemmWorkspace | None = None, *, pdl: bool = False,
                  add: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """out [1, N] = (silu(gate) * up) @ w^T (+ add) for gate_up = [gate | up] [1, 2K], the activation
    computed by the GEMV's programs as they stream W (no silu_and_mul kernel), rounded as it rounds."""
    assert cfg.gemv and cfg.block_m == 1, "a GEMV config of one row"
    assert gate_up.shape == (1, 2 * w.shape[1]) and gate_up.is_contiguous(), (gate_up.shape, w.shape)
    return _launch(gate_up, 1, w.shape[1], w, cfg, workspace, None, pdl, prologue=ROW_SILU_MUL, add=add)


def _launch(x, m, k, w, cfg, workspace, out, pdl, *, prologue=ROW_PLAIN, norm=None, add=None):
    assert w.dim() == 2 and w.shape[1] == k and w.is_contiguous(), f"w [N, {k}] contiguous, got {w.shape}"
    assert x.dtype == w.dtype and x.device == w.device, (x.dtype, w.dtype)
    n = w.shape[0]
    why = cfg.check(n, k)
    assert why is None, why
    assert n * k < 2**31 and m * n < 2**31, "32-bit offsets"
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.is_contiguous(), out.shape
    if add is not None:
        assert cfg.gemv and cfg.block_m == 1 and m == 1, "add: one-row GEMV configs"
        assert add.shape == (1, n) and add.dtype == x.dtype and add.is_contiguous(), add.shape
    if m == 0:
        return out
    part, cnt = GemmWorkspace.buffers(workspace, cfg, m, n, out)
    if cfg.gemv:
        grid = (n // cfg.block_n, cfg.split_k, triton.cdiv(m, cfg.block_m))
        launch = {"launch_pdl": True} if pdl else {}
        nw, eps = norm if norm is not None else (x, 0.0)  # unread without ROW_RMSNORM
        _gemv_kernel[grid](x, w, out, part, cnt, m, n, k, nw, out if add is None else add, eps,
                           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                           SPLIT_K=cfg.split_k, PDL=pdl, PROLOGUE=prologue,
                           FULL_K=triton.next_power_of_2(k) if prologue == ROW_RMSNORM else 16,
                           ADD=add is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                           **launch)  # fmt: skip
    else:
        grid = (triton.cdiv(m, cfg.block_m) * (n // cfg.block_n), cfg.split_k)
        _gemm_kernel[grid](x, w, out, part, cnt, m, n, k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m,
                           SWAP_AB=cfg.swap_ab, DOT_PREC="ieee" if x.dtype == torch.float32 else None,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
    return out


def weight_fraction(n: int, k: int, elem_bytes: int, seconds: float, bandwidth_bytes_per_s: float) -> float:
    """Weight bytes / time / copy bandwidth: 1.0 = the weight streamed at copy speed."""
    return n * k * elem_bytes / seconds / bandwidth_bytes_per_s if seconds > 0 else math.nan
