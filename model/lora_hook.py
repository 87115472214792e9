"""The LoRA hook contract between the model's projections and the adapter batch (model/adapters/batch.py).

Every LoRA-targetable projection group calls `pending = begin_lora(adapter_data, layer_idx, group, x,
widths)` before its base matmul and `delta = lora_output(pending, out)` after it (docs/INTERNALS.md, Model).
"""

from __future__ import annotations

from typing import Protocol

import torch


class PendingLora(Protocol):
    def finish(self, out: torch.Tensor) -> torch.Tensor | None: ...


class AdapterHook(Protocol):
    has_lora: bool  # False: no row of the batch has an adapter (begin_lora / add_lora do nothing)

    def begin_lora(self, layer_idx: int, target: str, x: torch.Tensor,
                   widths: tuple[int, ...]) -> PendingLora | None: ...  # fmt: skip

    def add_lora(self, layer_idx: int, target: str, x: torch.Tensor, out: torch.Tensor,
                 widths: tuple[int, ...] | None = None) -> None: ...


def lora_output(pending: PendingLora | None, out: torch.Tensor) -> torch.Tensor | None:
    """The delta out's consumer must add (None: nothing, or already added in place)."""
    return None if pending is None else pending.finish(out)


def has_lora(adapter_data: AdapterHook | None) -> bool:
    return adapter_data is not None and adapter_data.has_lora


def begin_lora(adapter_data: AdapterHook | None, layer_idx: int, target: str, x,
               widths) -> PendingLora | None:  # fmt: skip
    if not has_lora(adapter_data):
        return None
    return adapter_data.begin_lora(layer_idx, target, x, tuple(widths))
