"""Hot-slot LoRA: A stacked under the base weight, B expanded by the kernel that reads the output next.

A hook that serves a projection group this way returns a `HotLora` from begin_lora. The layer then
computes its projection with `pending.project(x)`, one matmul against the weight widened by the hot
slots' A rows ([W; A_hot], [N + S*M*R, K]), which returns y (the base columns, a view) and keeps
u = x @ A_hot^T (the rest); `finish` hands y's consumer a `HotDelta` instead of a dense [T, N] delta.
The consumer expands it inside its own kernel (model/kernels/lora_hot.py on CUDA; `dense()` here, the
torch reference, elsewhere). Tensor parallelism: only at world size 1 (a row-parallel layer's u would
need the all-reduce its y gets inside RowParallelLinear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HotDelta:
    """The not-yet-expanded LoRA delta of one projection group:

    delta[t, n] = sum_r u[t, (row_slot[t] * M + member(n)) * R + r] * b[row_slot[t], r, n]  (row_slot >= 0)
    rounded to the activation dtype; 0 where row_slot[t] < 0. member(n): the member (q / k / v, gate / up)
    whose columns hold n; M = len(widths); b [S, R, N] is (B * scale)^T of each hot slot, N contiguous so
    that a row of b is one coalesced read for a row-wise consumer and a [R, tile] block for a tiled one."""

    u: torch.Tensor  # [T, S * M * R], last dim contiguous (a view of the widened matmul's output)
    row_slot: torch.Tensor  # [T] int32
    b: torch.Tensor  # [S, R, N], contiguous
    widths: tuple[int, ...]  # member widths, sum N

    def __post_init__(self):
        s, r, n = self.b.shape
        assert sum(self.widths) == n and 1 <= len(self.widths) <= 3, (self.widths, n)
        want = (self.row_slot.shape[0], s * len(self.widths) * r)
        assert self.u.shape == want, (self.u.shape, self.b.shape)
        assert self.u.stride(-1) == 1 and self.b.is_contiguous() and self.row_slot.dtype == torch.int32

    @property
    def rows(self) -> int:
        return self.u.shape[0]

    @property
    def width(self) -> int:
        return self.b.shape[2]

    @property
    def rank(self) -> int:
        return self.b.shape[1]

    def bounds(self) -> tuple[int, int]:
        """(first column of member 1, of member 2); past N when there is no such member."""
        n, w = self.width, self.widths
        return (w[0] if len(w) > 1 else n + 1, w[0] + w[1] if len(w) > 2 else n + 1)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Torch reference: the delta [T, N], float32 math, rounded to `dtype` (default b's)."""
        s, r, n = self.b.shape
        m = len(self.widths)
        out = torch.zeros(self.rows, n, dtype=torch.float32, device=self.u.device)
        u = self.u.float().view(self.rows, s, m, r)
        slot = self.row_slot.long()
        start = 0
        for j, w in enumerate(self.widths):
            for h in range(s):
                rows = (slot == h).nonzero().flatten()
                if rows.numel():
                    out[rows, start : start + w] = u[rows, h, j] @ self.b[h, :, start : start + w].float()
            start += w
        return out.to(dtype or self.b.dtype)


def dense_delta(delta, dtype: torch.dtype) -> torch.Tensor | None:
    """A consumer's delta as a dense tensor (None, a tensor, or a HotDelta)."""
    return delta.dense(dtype) if isinstance(delta, HotDelta) else delta


class HotLora:
    """A begun LoRA whose shrink rides in the base matmul (`project`) and whose expand is its consumer's."""

    def __init__(self, wide_weight: torch.Tensor, base_rows: int, row_slot: torch.Tensor, b: torch.Tensor,
                 widths: tuple[int, ...]):  # fmt: skip
        self.wide_weight, self.base_rows = wide_weight, base_rows  # [N + S*M*R, K], N
        self.row_slot, self.b, self.widths = row_slot, b, widths
        self.u: torch.Tensor | None = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> y [T, N] (a view of [y | u]); u is kept for finish."""
        out = F.linear(x, self.wide_weight)
        self.u = out[:, self.base_rows :]
        return out[:, : self.base_rows]

    def finish(self, out: torch.Tensor) -> HotDelta:
        assert self.u is not None, "HotLora.finish before project"
        return HotDelta(self.u, self.row_slot, self.b, self.widths)
