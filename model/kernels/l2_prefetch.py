"""Asking L2 for bytes a later kernel will read, from inside a kernel that runs before it.

    for line in lines p, p + P, p + 2P, ... of [base, base + n_lines * 128 B):   (program p of P)
        prefetch.global.L2::evict_last [line]          fire and forget: nothing is loaded into registers

A kernel that takes a `prefetch` (L2Prefetch) launches P extra programs that do only this, so the weight
stream of the next matmul starts while the launch-bound kernel before it (RMSNorm, rope + KV write,
silu_and_mul) runs; the values computed never change. Experimental: bench/l2_prefetch.py measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LINE_BYTES = 128


@dataclass(frozen=True)
class L2Prefetch:
    tensor: torch.Tensor  # its first `nbytes` of storage are asked for (contiguous)
    nbytes: int
    programs: int = 16

    def args(self) -> tuple[torch.Tensor, int, int]:
        """(flat tensor, lines, elements per line) for a kernel's prefetch arguments."""
        flat = self.tensor.view(-1)
        per = LINE_BYTES // flat.element_size()
        return flat, min(self.nbytes, flat.numel() * flat.element_size()) // LINE_BYTES, per


@triton.jit
def prefetch_lines(base_ptr, n_lines, prog, n_progs, LINE_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    """Program `prog` of `n_progs` asks L2 for its share of the lines (see the module docstring)."""
    for start in range(prog * BLOCK, n_lines, n_progs * BLOCK):
        line = start + tl.arange(0, BLOCK)
        ptrs = base_ptr + tl.minimum(line, n_lines - 1).to(tl.int64) * LINE_ELEMS
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)
