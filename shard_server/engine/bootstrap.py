"""Start-up pieces of the engine: dtype names, the tensor-parallel group, tokenizer, adapter store."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch

from cache.adapter_shapes import SlotReservation
from cache.adapter_sources import AdapterSourceConfig, AdapterSources
from cache.adapter_store import AdapterStore
from cache.s3_source import S3CacheConfig
from model.config import MistralConfig
from model.parallel import TPGroup
from shard_server.config import ShardConfig
from shard_server.generation.detokenize import special_token_ids
from shard_server.types import AdapterSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def init_tensor_parallel(config: ShardConfig, device: torch.device) -> TPGroup:
    """World size 1: no process group. Otherwise NCCL on CUDA, gloo on CPU, rendezvous over TCP."""
    if config.world_size == 1:
        return TPGroup()
    if device.type == "cuda":
        torch.cuda.set_device(config.rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        if config.master_port is None:
            raise ValueError("world_size > 1 needs master_port (MASTER_PORT) for the rendezvous")
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{config.master_addr}:{config.master_port}",
            rank=config.rank,
            world_size=config.world_size,
            timeout=timedelta(minutes=10),
        )
    log.info("tensor parallel: rank %d of %d", config.rank, config.world_size)
    return TPGroup(rank=config.rank, world_size=config.world_size, group=torch.distributed.group.WORLD)


def load_tokenizer(model_dir: Path, model_config: MistralConfig):
    """-> (tokenizer, EOS ids (config + tokenizer), special token ids)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = list(model_config.eos_token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return tokenizer, tuple(eos), special_token_ids(tokenizer)


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_adapter_store(
    config: ShardConfig, model_config: MistralConfig, device: torch.device, dtype: torch.dtype, tp: TPGroup,
    base_weights=None,
) -> AdapterStore:
    """`base_weights`: the model's `projection_weight` (DoRA adapters need the base weights)."""
    budget = int(config.adapter_memory_fraction * device_memory_bytes(device))
    preloaded = [
        (i + 1, AdapterSpec(adapter_ids=(a,), source="local" if Path(a).is_dir() else "hub"))
        for i, a in enumerate(config.preloaded_adapter_ids)
    ]
    s3 = None
    if config.adapter_cache_dir is not None:
        s3 = S3CacheConfig(cache_dir=config.adapter_cache_dir, max_bytes=config.adapter_cache_max_bytes)
    sources = AdapterSources(AdapterSourceConfig(adapter_root=config.adapter_root, s3=s3))
    # min_slots: without reserved slots, the first adapter lays out 8 (when the budget allows), so the
    # next seven loads neither re-lay out the stacks nor drop the captured decode graphs.
    reserve = None
    if config.adapter_slots:
        reserve = SlotReservation(config.adapter_slots, config.adapter_slot_rank)
    return AdapterStore(
        model_config, device, dtype, budget_bytes=budget, tp=tp, sources=sources, preloaded=preloaded,
        min_slots=8, base_weights=base_weights, reserve=reserve, concurrent_lora=config.lora_stream,
    )
