"""PEFT LoRA/DoRA adapters: loading (peft_loader), merging (merge), DoRA scales (dora), per-batch data
(batch), reference ops (ops).

Refusals are `model.errors` types (InvalidArgument, NotFound, Unimplemented, ...), like everywhere else.
"""

from model.adapters.batch import AdapterBatchData, AdapterBatchMetadata
from model.adapters.merge import merge_adapters
from model.adapters.peft_loader import LM_HEAD_LAYER, TARGETS, LoraAdapter, load_peft_adapter

__all__ = [
    "LM_HEAD_LAYER",
    "TARGETS",
    "AdapterBatchData",
    "AdapterBatchMetadata",
    "LoraAdapter",
    "load_peft_adapter",
    "merge_adapters",
]
