"""LoRA expanded inside the kernel that reads a projection's output next: "hot slot" deltas, in Triton.

A few adapters ("hot slots", S of them) can have their A rows stacked under a projection's weight, so the
base matmul itself returns u = x @ A_hot^T beside y (docs/lora.md, design A; model/adapters/hot.py).
What is left of LoRA is the expand, u @ B, and these kernels do it inside the consumers of y (design B):
no LoRA kernel runs beside the matmuls, and no [T, N] delta is written or read. The delta is a
model.adapters.hot.HotDelta (u, row_slot, b [S, N, R], member widths; its docstring has the formula).

    add_hot_delta_(y, hot)                   y += delta in place (rounded as PEFT adds it)
    silu_and_mul_hot(gate_up, hot)           silu(gate + d_gate) * (up + d_up)
    add_rmsnorm_hot(x, residual, w, eps, hot) RMSNorm of (x + delta) + residual, and that sum

Every addition rounds as the dense-delta consumers do (model/kernels/activation.py, rmsnorm.py):
delta to the activation dtype first, then x + delta rounded, then + residual rounded. A tile of rows
meets each hot slot present among them once: its B columns are read once per row block, not per row.

Bytes (Mistral-7B, 128 rows, one hot slot, per layer): B 16 x 43008 x 2 B = 1.4 MB per row block that
holds the slot, u 128 x 336 x 2 B; against the dense path's delta written and read (2 x 11 MB).
Measured against that bound in bench/lora_fused_bound.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.adapters.hot import HotDelta


@triton.jit
def _member_of(col0, b1, b2):
    return (col0 >= b1).to(tl.int32) + (col0 >= b2).to(tl.int32)


@triton.jit
def _hot_delta_tile(u_ptr, stride_u, rows, slots, row_ok, b_ptr, stride_bs, stride_br, cols, col_ok, member,
                    S: tl.constexpr, M: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):  # fmt: skip
    """[BLOCK_M, BLOCK_N] float32: the delta of these rows and columns (columns of one member)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    r = tl.arange(0, R)
    for h in tl.static_range(S):
        mine = row_ok & (slots == h)
        if tl.sum(mine.to(tl.int32), axis=0) > 0:  # B of slot h is read only by blocks that hold it
            u = tl.load(u_ptr + rows[:, None] * stride_u + ((h * M + member) * R + r)[None, :],
                        mask=mine[:, None], other=0.0)  # [BLOCK_M, R]
            b = tl.load(b_ptr + h * stride_bs + r[:, None] * stride_br + cols[None, :], mask=col_ok[None, :],
                        other=0.0)  # [R, BLOCK_N], N contiguous
            acc = tl.dot(u.to(b.dtype), b, acc)
    return acc


@triton.jit
def _add_hot_kernel(y_ptr, stride_y, u_ptr, stride_u, slot_ptr, b_ptr, stride_bs, stride_br, T, N, b1, b2,
                    S: tl.constexpr, M: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < T, cols < N
    slots = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    if tl.max(slots, axis=0) >= 0:  # a block of base rows only: nothing to add
        member = _member_of(tl.program_id(1) * BLOCK_N, b1, b2)
        d = _hot_delta_tile(u_ptr, stride_u, rows, slots, row_ok, b_ptr, stride_bs, stride_br, cols, col_ok,
                            member, S, M, R, BLOCK_M, BLOCK_N)  # fmt: skip
        ptrs = y_ptr + rows[:, None] * stride_y + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :] & (slots >= 0)[:, None]
        y = tl.load(ptrs, mask=ok, other=0.0)
        tl.store(ptrs, (y.to(tl.float32) + d.to(y.dtype).to(tl.float32)).to(y.dtype), mask=ok)


def _tile_n(hot: HotDelta, block_n: int) -> int:
    """The widest power-of-two tile <= block_n whose tiles never straddle two members."""
    while block_n > 16 and any(w % block_n for w in hot.widths):
        block_n //= 2
    assert all(w % block_n == 0 for w in hot.widths), f"member widths {hot.widths} are not multiples of 16"
    return block_n


def add_hot_delta_(y: torch.Tensor, hot: HotDelta, *, block_m: int = 16, block_n: int = 128) -> torch.Tensor:
    """y [T, N] (last dim contiguous) += hot's delta, in place, rounded as PEFT adds it. Returns y."""
    T, N = y.shape
    assert T == hot.rows and N == hot.width and y.stride(-1) == 1
    if T == 0:
        return y
    bn = _tile_n(hot, block_n)
    b1, b2 = hot.bounds()
    _add_hot_kernel[(triton.cdiv(T, block_m), triton.cdiv(N, bn))](
        y, y.stride(0), hot.u, hot.u.stride(0), hot.row_slot, hot.b, hot.b.stride(0), hot.b.stride(1), T, N,
        b1, b2, S=hot.b.shape[0], M=len(hot.widths), R=hot.rank, BLOCK_M=block_m, BLOCK_N=bn,
        num_warps=4,
    )  # fmt: skip
    return y


@triton.jit
def _silu_mul_hot_kernel(x_ptr, stride_x, out_ptr, stride_o, u_ptr, stride_u, slot_ptr, b_ptr, stride_bs,
                         stride_br, T, I, S: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < T, cols < I
    ok = row_ok[:, None] & col_ok[None, :]
    slots = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    gate = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    up = tl.load(x_ptr + rows[:, None] * stride_x + I + cols[None, :], mask=ok, other=0.0)
    if tl.max(slots, axis=0) >= 0:
        dg = _hot_delta_tile(u_ptr, stride_u, rows, slots, row_ok, b_ptr, stride_bs, stride_br, cols, col_ok,
                             0, S, 2, R, BLOCK_M, BLOCK_N)  # fmt: skip
        du = _hot_delta_tile(u_ptr, stride_u, rows, slots, row_ok, b_ptr, stride_bs, stride_br, cols + I,
                             col_ok, 1, S, 2, R, BLOCK_M, BLOCK_N)  # fmt: skip
        gate = (gate.to(tl.float32) + dg.to(up.dtype).to(tl.float32)).to(up.dtype)
        up = (up.to(tl.float32) + du.to(up.dtype).to(tl.float32)).to(up.dtype)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(up.dtype)  # as model/kernels/activation.py rounds
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :],
             (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=ok)


def silu_and_mul_hot(gate_up: torch.Tensor, hot: HotDelta, *, out: torch.Tensor | None = None,
                     block_m: int = 16, block_n: int = 128) -> torch.Tensor:  # fmt: skip
    """gate_up [T, 2I] (last dim contiguous; gate | up, hot.widths == (I, I)) -> silu(gate) * up [T, I] of
    gate_up + hot's delta, each half rounded to gate_up's dtype first (silu_and_mul's `delta`)."""
    T, two_i = gate_up.shape
    inter = two_i // 2
    assert hot.widths == (inter, inter) and hot.rows == T and gate_up.stride(-1) == 1
    out = torch.empty((T, inter), dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    if T == 0:
        return out
    bn = _tile_n(hot, block_n)
    _silu_mul_hot_kernel[(triton.cdiv(T, block_m), triton.cdiv(inter, bn))](
        gate_up, gate_up.stride(0), out, out.stride(0), hot.u, hot.u.stride(0), hot.row_slot, hot.b,
        hot.b.stride(0), hot.b.stride(1), T, inter, S=hot.b.shape[0], R=hot.rank, BLOCK_M=block_m,
        BLOCK_N=bn, num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _add_rmsnorm_hot_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, u_ptr, slot_ptr, b_ptr, H, eps,
                            stride_x, stride_r, stride_o, stride_ro, stride_u, stride_bs, stride_br,
                            R: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):  # fmt: skip
    """One row per program, as model/kernels/rmsnorm.py: s = (x + delta) + residual, normed = w * (s *
    rstd); the delta of the row's slot as R multiply-adds of b's rows (N contiguous), u[r] broadcast."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    s = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    slot = tl.load(slot_ptr + row)
    if slot >= 0:
        d = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(R):
            ur = tl.load(u_ptr + row * stride_u + slot * R + r).to(tl.float32)
            br = tl.load(b_ptr + slot * stride_bs + r * stride_br + offs, mask=ok, other=0.0)
            d += ur * br.to(tl.float32)
        s = (s.to(tl.float32) + d.to(s.dtype).to(tl.float32)).to(s.dtype)
    if HAS_RES:
        r_ = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0)
        s = (s.to(tl.float32) + r_.to(tl.float32)).to(s.dtype)
    tl.store(res_out_ptr + row * stride_ro + offs, s, mask=ok)
    sf = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / H + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    normed = (sf * rstd).to(s.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + offs, normed.to(out_ptr.dtype.element_ty), mask=ok)


def add_rmsnorm_hot(x, residual, weight, eps: float, hot: HotDelta, *, out=None, residual_out=None):
    """fused_add_rmsnorm (model/kernels/rmsnorm.py) with `delta` given as a HotDelta of one member:
    x [T, H] (+ delta) (+ residual [T, H] | None) -> (normed [T, H], the sum [T, H], its own tensor).
    Each row reads its slot's b (R x H) once, from L2 after the first row of that slot."""
    T, H = x.shape
    assert x.stride(-1) == 1 and weight.shape == (H,) and hot.rows == T and hot.width == H
    assert len(hot.widths) == 1
    if out is None:
        out = torch.empty((T, H), device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    residual_out = torch.empty_like(x) if residual_out is None else residual_out
    if T == 0:
        return out, residual_out
    res = residual if residual is not None else x  # unread placeholder without HAS_RES
    block = triton.next_power_of_2(H)
    _add_rmsnorm_hot_kernel[(T,)](
        x, res, weight, out, residual_out, hot.u, hot.row_slot, hot.b, H, eps, x.stride(0), res.stride(0),
        out.stride(0), residual_out.stride(0), hot.u.stride(0), hot.b.stride(0), hot.b.stride(1), R=hot.rank,
        BLOCK=block, HAS_RES=residual is not None, num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip
    return out, residual_out
