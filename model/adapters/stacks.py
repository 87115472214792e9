"""LoRA projection groups and the stacked device layout the LoRA ops read (one stack per layer and group).

The model fuses q/k/v and gate/up into one matmul each, so it calls the LoRA hook once per group with
the fused output; the adapter store lays out one stack per (layer_idx, group) so that one shrink and one
expand launch serve every member of the group:

    group "qkv_proj": members q_proj, k_proj, v_proj (fused output columns [q | k | v])
    group "gate_up_proj": gate_proj, up_proj;  "o_proj", "down_proj", "lm_head": one member each

    a      [S, NT * R, in]    member i's A in rows [i*R, i*R + r), zero-padded to the bucket R
    b      [S, sum(w_i), R]   member i's B in rows [off_i, off_i + w_i) (scaling folded in), zero-padded
    ranks  [S] int32          per slot: the adapter's largest rank over the members (0: targets none);
                              every A row / B column at or past it is zero, so kernels may skip them
    targets, widths           the NT members present (any resident adapter targets them), their widths

Only members some resident adapter targets are in the stack, so a q/v adapter reads no k rows; the
output columns of a member come from the caller (`widths` of the fused output), not from the stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
    "lm_head": ("lm_head",),
}
GROUP_OF: dict[str, str] = {t: g for g, members in LORA_GROUPS.items() for t in members}


@dataclass(frozen=True)
class LoraGroupStack:
    """One (layer, group)'s slot stacks; see the module docstring for the layout."""

    a: torch.Tensor  # [S, NT * R, in]
    b: torch.Tensor  # [S, sum(widths), R]
    ranks: torch.Tensor  # [S] int32
    targets: tuple[str, ...]
    widths: tuple[int, ...]

    @property
    def rank(self) -> int:
        """R: the stack's rank bucket (columns of B, rows of A per member)."""
        return self.b.shape[2]

    @property
    def b_offsets(self) -> tuple[int, ...]:
        out, pos = [], 0
        for w in self.widths:
            out.append(pos)
            pos += w
        return tuple(out)

    def member(self, target: str) -> LoraGroupStack | None:
        """Views of one member's rows (None when no resident adapter targets it)."""
        if target not in self.targets:
            return None
        i, r = self.targets.index(target), self.rank
        off, w = self.b_offsets[i], self.widths[i]
        return LoraGroupStack(self.a[:, i * r : (i + 1) * r], self.b[:, off : off + w], self.ranks,
                              (target,), (w,))  # fmt: skip

    @classmethod
    def single(cls, target: str, a: torch.Tensor, b: torch.Tensor) -> LoraGroupStack:
        """A one-member stack from plain (A [S, R, in], B [S, out, R]) tensors; every slot at full rank."""
        ranks = torch.full((a.shape[0],), a.shape[1], dtype=torch.int32, device=a.device)
        return cls(a, b, ranks, (target,), (b.shape[1],))
