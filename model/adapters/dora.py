"""DoRA at serving time: one scale per output feature of each module, computed once when it is loaded.

PEFT (0.21, tuners/lora/dora.py DoraLinearLayer + variants.DoraLinearVariant), in eval mode (dropout
is the identity there), for a module with base weight W [out, in], LoRA factors A, B, scaling s and
magnitude m [out]:

    norm = ||W + s * B @ A||_2 over the input dim, one value per output feature     [out], detached
    y    = base + (m / norm - 1) * base + (m / norm) * s * B(A(x))
         = (m / norm) * (W x + s B A x)

The scale c = m / norm depends only on the adapter and W, so it is computed here once (float32, B
already scaled by s) and served as `out[t] *= c[slot(t)]` right after the LoRA delta is added to the
module's output (AdapterBatchData.add_lora), for the rows of DoRA adapters only: any LoRA kernel then
composes with it, and rows of plain LoRA adapters or of the base model are untouched.

Tensor parallelism (the store passes this rank's A, B, m and base weight, sliced as the layer is):
- column-parallel targets (q/k/v, gate/up) shard output features: each rank holds whole rows of W and
  B and the full A, so it computes its own rows' norms; c is sharded as the outputs are.
- row-parallel targets (o_proj, down_proj) shard the input dim: each rank computes the squared norm of
  its input slice of every row, and an all-reduce sums them (the norm is over the full input dim);
  the full c [out] multiplies the already all-reduced output on every rank.
- lm_head: each rank holds a block of vocabulary rows of W (padded to equal blocks) and LoRA adds the
  full delta to the gathered logits, so each rank fills its rows of a full-size vector and the same
  all-reduce completes it; c is the full [vocab].
One all-reduce per adapter load carries all of them plus a count of non-finite scales found locally, so
every rank reaches the same verdict: a zero norm (m / 0) is refused on all ranks, never served on one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from model.adapters.peft_loader import ROW_PARALLEL
from model.errors import InvalidArgument

Key = tuple[int, str]
# (A [r, in_local], B [out_local, r] with the scaling folded in, m [out_local]) of one DoRA module
DoraModule = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_CHUNK_ELEMS = 1 << 24  # rows of W + B A materialised at once: at most 64 MB of float32


def dora_scales(
    modules: Mapping[Key, DoraModule], weight_of: Callable[[int, str], torch.Tensor], tp=None
) -> dict[Key, torch.Tensor]:
    """-> {key: c [out_local] float32 on the CPU} (module docstring). InvalidArgument if any is not finite.

    `weight_of(layer_idx, target)`: this rank's base weight of the projection ([out_local, in_local];
    lm_head: [rows per rank, hidden]). `tp`: model.parallel.TPGroup or None (world size 1). With world
    size > 1 every rank must call this for the same modules at the same point (it all-reduces once).
    """
    rank, world = (tp.rank, tp.world_size) if tp is not None else (0, 1)
    local: dict[Key, torch.Tensor] = {}  # squared norms complete on this rank
    partial: dict[Key, torch.Tensor] = {}  # squared norms to be summed over ranks
    device = None
    for key in sorted(modules):
        a, b, _ = modules[key]
        w = weight_of(*key)
        device = w.device
        a = a.to(device, torch.float32)
        b = b.to(device, torch.float32)
        if key[1] == "lm_head":
            rows = w.shape[0]  # this rank's vocabulary block; the last one may end in padding rows
            start = rank * rows
            n = max(0, min(rows, b.shape[0] - start))
            sq = torch.zeros(b.shape[0], dtype=torch.float32, device=device)  # [vocab]
            if n:
                sq[start : start + n] = _row_sq(w[:n], b[start : start + n], a)
            partial[key] = sq
        elif key[1] in ROW_PARALLEL:
            partial[key] = _row_sq(w, b, a)  # [out]: this rank's input slice only
        else:
            local[key] = _row_sq(w, b, a)  # [out_local]
    scales = {k: _scale(modules[k][2], sq) for k, sq in local.items()}
    bad_here = [k for k, c in scales.items() if not torch.isfinite(c).all()]
    if world > 1:
        keys = sorted(partial)
        flat = torch.cat([partial[k] for k in keys] + [torch.tensor([float(len(bad_here))], device=device)])
        torch.distributed.all_reduce(flat, group=tp.group)
        parts = flat[:-1].split([partial[k].numel() for k in keys])
        partial = dict(zip(keys, parts, strict=True))
        bad_elsewhere = int(flat[-1].item()) - len(bad_here)
    else:
        bad_elsewhere = 0
    for k, sq in partial.items():
        scales[k] = _scale(modules[k][2], sq)
        if not torch.isfinite(scales[k]).all():
            bad_here.append(k)
    if bad_here:
        layer, target = bad_here[0]
        raise InvalidArgument(
            f"DoRA scale of layer {layer} {target} is not finite: ||W + s B A|| is zero for some output "
            "feature (magnitude / 0)"
        )
    if bad_elsewhere:
        raise InvalidArgument(
            "DoRA scale is not finite on another tensor-parallel rank: ||W + s B A|| is zero for some "
            "output feature (magnitude / 0)"
        )
    return {k: c.cpu() for k, c in scales.items()}


def _row_sq(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum over the input dim of (W + B @ A)^2, per row, in float32; W [n, in], B [n, r], A [r, in]."""
    out = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, _CHUNK_ELEMS // max(1, w.shape[1]))
    for i in range(0, w.shape[0], step):
        block = w[i : i + step].float() + b[i : i + step] @ a  # [step, in]
        out[i : i + step] = block.square().sum(dim=1)
    return out


def _scale(m: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    return m.to(sq.device, torch.float32) / sq.sqrt()
