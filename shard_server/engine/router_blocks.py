"""Router-allocation mode: the KV blocks and slots a request brings, checked before anything runs.

Convention (what our fake router sends and what the LoRAX/TGI routers build from their block
allocators): `blocks` lists the request's block ids in logical order (position p lives in block
`blocks[p // block_size]`), and `slots[p]` is the KV slot of position p for p = 0, 1, ...:

    slots[p] == blocks[p // block_size] * block_size + p % block_size

`slots` covers at least every position whose KV is written (prompt + max_new_tokens - 1; the last
generated token is never fed back; a router may send one more). The block table the attention kernels
read is `blocks` itself, so prefill writes `slots[cache_len:prompt_len]` and decode writes the slot of
its position through the same table: the two can only agree if the slots are the ones the table
implies, hence the check. `cache_len` tokens are already in those blocks (the router's prefix cache);
at least the last prompt token is always computed (its logits choose the first token).
Block 0 is the shard's (Health, padding rows of decode graphs): never a request's.
"""

from __future__ import annotations

from model.errors import InvalidArgument
from shard_server.types import RequestSpec


def check_router_blocks(
    r: RequestSpec, prompt_len: int, num_blocks: int, block_size: int, where: str
) -> None:
    """INVALID_ARGUMENT naming the field unless blocks/slots/cache_len are usable as given."""
    if not r.blocks:
        raise InvalidArgument(
            f"{where}: blocks is empty, but this shard runs with --block-allocator router "
            "(Info.requires_block_allocator): every request brings its KV blocks and slots"
        )
    seen: dict[int, int] = {}
    for i, b in enumerate(r.blocks):
        if b == 0:
            raise InvalidArgument(f"{where}: blocks[{i}] is block 0, which is reserved for the shard")
        if b >= num_blocks:
            raise InvalidArgument(
                f"{where}: blocks[{i}] = {b} is outside the KV cache of {num_blocks} blocks "
                f"(ids 1..{num_blocks - 1})"
            )
        if b in seen:
            raise InvalidArgument(f"{where}: blocks[{i}] = {b} repeats blocks[{seen[b]}]")
        seen[b] = i
    written = prompt_len + r.stopping.max_new_tokens - 1
    if len(r.slots) < written:
        raise InvalidArgument(
            f"{where}: slots has {len(r.slots)} entries; a prompt of {prompt_len} tokens and "
            f"max_new_tokens {r.stopping.max_new_tokens} write {written} positions (one slot each)"
        )
    capacity = len(r.blocks) * block_size
    if len(r.slots) > capacity:
        raise InvalidArgument(
            f"{where}: slots has {len(r.slots)} entries but its {len(r.blocks)} blocks hold {capacity}"
        )
    for p, s in enumerate(r.slots):
        expected = r.blocks[p // block_size] * block_size + p % block_size
        if s != expected:
            raise InvalidArgument(
                f"{where}: slots[{p}] = {s} is not in position {p}'s place of blocks "
                f"(blocks[{p // block_size}] * {block_size} + {p % block_size} = {expected})"
            )
    if r.cache_len >= prompt_len:
        raise InvalidArgument(
            f"{where}: cache_len {r.cache_len} must be below the prompt's {prompt_len} tokens "
            "(the last prompt token is always computed)"
        )
