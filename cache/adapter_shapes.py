"""Shapes and allocation of the adapter layout's device stacks (cache/adapter_layout.py).

Per (layer_idx, group) one `LoraGroupStack` (model/adapters/stacks.py) at a rank bucket (a power of two
>= 8, so few distinct shapes and CUDA graphs exist), A/B stacks as contiguous views of one zeroed buffer,
and per DoRA module (layer_idx, target) a float32 scale stack [cap, out_local] of ones; the shapes a
`SlotReservation` lays out ahead of any adapter.
"""

from __future__ import annotations

import dataclasses

import torch

from model.adapters.peft_config import MAX_RANK
from model.adapters.peft_loader import LM_HEAD_LAYER, TARGETS, TargetShapes
from model.adapters.sharding import shard_lora
from model.adapters.stacks import GROUP_OF, LORA_GROUPS, LoraGroupStack

MIN_RANK_BUCKET = 8
Key = tuple[int, str]  # (layer_idx, target); layer_idx -1 is lm_head
GroupKey = tuple[int, str]  # (layer_idx, group of stacks.LORA_GROUPS)


def rank_bucket(r: int) -> int:
    """Padded rank of a stack: powers of two from 8, so few distinct shapes (and CUDA graphs) exist."""
    return max(MIN_RANK_BUCKET, 1 << (r - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SlotReservation:
    """Device stacks laid out at start-up: `slots` slots for adapters of rank <= `rank` on `targets` of
    every layer (lm_head: the head), so that loading one is a copy into a free slot (AdapterStore.reserve)."""

    slots: int
    rank: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"adapter slots must be >= 1, got {self.slots}")
        if not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"adapter slot rank must be in 1..{MAX_RANK}, got {self.rank}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(
                f"adapter slot targets must be some of {', '.join(TARGETS)}; got {unknown or '()'}"
            )


def reserved_modules(reservation: SlotReservation, config, tp_rank: int = 0,
                     world_size: int = 1) -> list[tuple[Key, int, int, int]]:  # fmt: skip
    """((layer, target), rank, in_local, out_local) of every module `reservation` covers on this rank."""
    shapes = TargetShapes.from_config(config)
    out = []
    for target in reservation.targets:
        fan_in, fan_out = shapes.shapes[target]
        a = torch.empty(reservation.rank, fan_in, device="meta")
        b = torch.empty(fan_out, reservation.rank, device="meta")
        a, b = shard_lora(target, a, b, config, tp_rank, world_size)
        layers = [LM_HEAD_LAYER] if target == "lm_head" else range(shapes.num_layers)
        out += [((layer, target), reservation.rank, a.shape[1], b.shape[0]) for layer in layers]
    return sorted(out)


@dataclasses.dataclass(frozen=True)
class GroupShape:
    """What one group stack needs: rank bucket, input width, the members present and their widths, and
    the members with a DoRA scale stack."""

    rank: int
    fan_in: int
    members: tuple[tuple[str, int], ...]  # (target, out_local), in the group's fused-output order
    dora: tuple[str, ...] = ()  # members some DoRA adapter targets

    def slot_bytes(self, elem: int) -> int:
        """Bytes of one slot: A and B in the store dtype, DoRA scales in float32."""
        ab = self.rank * (len(self.members) * self.fan_in + sum(w for _, w in self.members))
        return ab * elem + 4 * sum(w for t, w in self.members if t in self.dora)


def group_shapes(modules, dora_keys=()) -> dict[GroupKey, GroupShape]:
    """modules: iterable of ((layer, target), r, in_local, out_local) -> the group stacks holding them;
    dora_keys: the (layer, target) modules that need a DoRA scale stack."""
    acc: dict[GroupKey, list] = {}
    for (layer, target), r, fan_in, fan_out in modules:
        entry = acc.setdefault((layer, GROUP_OF[target]), [0, fan_in, {}])
        entry[0] = max(entry[0], rank_bucket(r))
        entry[2][target] = fan_out
    dora = set(dora_keys)
    return {
        key: GroupShape(r, fan_in, tuple((t, widths[t]) for t in LORA_GROUPS[key[1]] if t in widths),
                        tuple(t for t in LORA_GROUPS[key[1]] if t in widths and (key[0], t) in dora))
        for key, (r, fan_in, widths) in acc.items()
    }  # fmt: skip


_ALIGN_BYTES = 256  # every stack starts at this alignment inside the shared buffer (vector loads)


def zeroed_stacks(cap: int, need: dict[GroupKey, GroupShape], device: torch.device,
                   dtype: torch.dtype) -> tuple[dict[GroupKey, LoraGroupStack], torch.Tensor]:  # fmt: skip
    """Group stacks of `cap` slots: A/B contiguous views of one zeroed buffer, ranks rows of one [G, cap].

    One allocation and one memset for the whole layout instead of one per stack (448 for a 7B adapter
    on all seven projections: each new size is a cudaMalloc of its own when the stacks grow).
    """
    align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    shapes, total = [], 0
    for _, g in sorted(need.items()):
        nt, widths = len(g.members), sum(w for _, w in g.members)
        for shape in ((cap, nt * g.rank, g.fan_in), (cap, widths, g.rank)):
            shapes.append(shape)
            total += -(-(shape[0] * shape[1] * shape[2]) // align) * align
    flat = torch.zeros(total, device=device, dtype=dtype)
    ranks = torch.zeros(len(need), cap, dtype=torch.int32, device=device)
    views, offset = [], 0
    for shape in shapes:
        views.append(flat[offset : offset + shape[0] * shape[1] * shape[2]].view(shape))
        offset += -(-(shape[0] * shape[1] * shape[2]) // align) * align
    stacks = {}
    for i, (key, g) in enumerate(sorted(need.items())):
        targets = tuple(t for t, _ in g.members)
        widths = tuple(w for _, w in g.members)
        stacks[key] = LoraGroupStack(views[2 * i], views[2 * i + 1], ranks[i], targets, widths)
    return stacks, ranks


def ones_scales(cap: int, need: dict[GroupKey, GroupShape], device: torch.device) -> dict[Key, torch.Tensor]:
    """DoRA scale stacks [cap, out_local] float32 of ones (scale 1: no DoRA), per member `need` marks."""
    widths = {(layer, t): w for (layer, _), g in sorted(need.items()) for t, w in g.members if t in g.dora}
    if not widths:
        return {}
    keys = sorted(widths)
    flat = torch.ones(cap * sum(widths.values()), dtype=torch.float32, device=device)
    parts = flat.split([cap * widths[k] for k in keys])
    return {k: t.view(cap, widths[k]) for k, t in zip(keys, parts, strict=True)}
