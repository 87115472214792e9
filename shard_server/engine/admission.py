"""Admission of a batch's requests: inputs -> token ids, and every check that names the bad field.

Everything a router can get wrong is refused here with INVALID_ARGUMENT (or UNIMPLEMENTED for a feature
we do not build) before any KV block is taken or any device work runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.errors import FailedPrecondition, InvalidArgument, Unimplemented
from shard_server.engine.router_blocks import check_router_blocks
from shard_server.generation.grammar import CompiledSchema, SchemaCompiler
from shard_server.generation.sampling import validate_sampling_params
from shard_server.generation.stopping import GenerationTracker
from shard_server.types import BatchSpec, ImageChunk, RequestSpec, StoppingParams, TextChunk


@dataclass(frozen=True)
class Limits:
    tokenizer: Any
    vocab_size: int
    max_positions: int
    router_blocks: bool  # router-allocation mode: requests bring blocks and slots
    num_blocks: int = 0  # KV cache blocks (router-allocation mode checks block ids against it)
    block_size: int = 16
    chunking: bool = False  # continuing chunks is possible (Warmup told the prefill token budget)
    grammars: SchemaCompiler | None = None  # compiles `schema` (None: structured output unavailable)


@dataclass(frozen=True)
class Admitted:
    spec: RequestSpec
    ids: tuple[int, ...]  # the prompt after tokenization and truncation
    first_chunk: int  # prompt tokens its first prefill computes (from cache_len on)
    grammar: CompiledSchema | None = None  # parameters.schema, compiled

    @property
    def router_blocks(self) -> bool:
        """KV blocks come with the request (router-allocation mode); else the shard allocates."""
        return bool(self.spec.blocks)


def admit_batch(spec: BatchSpec, limits: Limits, *, warmup: bool, generation: bool = True) -> list[Admitted]:
    """Validate and tokenize every request; the router's warmup batch may repeat ids and carry images."""
    if not warmup:
        seen: set[int] = set()
        for r in spec.requests:
            if r.id in seen:
                raise InvalidArgument(f"batch.requests: request id {r.id} appears twice")
            seen.add(r.id)
    return [admit(r, limits, warmup=warmup, generation=generation) for r in spec.requests]


def admit(r: RequestSpec, limits: Limits, *, warmup: bool, generation: bool = True) -> Admitted:
    where = f"request {r.id}"
    ids = _input_ids(r, limits, warmup, where)
    if not ids:
        raise InvalidArgument(f"{where}: inputs is empty (no text, no tokenized_inputs.ids)")
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidArgument(
            f"{where}: tokenized_inputs.ids holds token id {bad}, "
            f"outside the vocabulary of {limits.vocab_size}"
        )
    if generation:
        _check_generation(r, len(ids), limits, where)
    elif len(ids) > limits.max_positions:
        raise InvalidArgument(
            f"{where}: prompt of {len(ids)} tokens exceeds the model's {limits.max_positions} positions"
        )
    if not limits.router_blocks and (r.blocks or r.slots or r.cache_len):
        raise InvalidArgument(
            f"{where}: blocks/slots/cache_len are only accepted when the shard runs with "
            "--block-allocator router (Info.requires_block_allocator)"
        )
    # Warmup requests come without blocks even in router-allocation mode: the shard allocates them.
    if limits.router_blocks and generation and not (warmup and not r.blocks):
        check_router_blocks(r, len(ids), limits.num_blocks, limits.block_size, where)
    first = _first_chunk(r, len(ids), limits, where) if generation else len(ids)
    grammar = compile_schema(r, limits.grammars) if generation else None
    return Admitted(r, tuple(ids), first, grammar)


def compile_schema(r: RequestSpec, grammars: SchemaCompiler | None) -> CompiledSchema | None:
    """parameters.schema -> its compiled grammar (cached), None without a schema."""
    if r.sampling.schema is None:
        return None
    if grammars is None:
        raise Unimplemented(f"request {r.id}: parameters.schema: structured output is not set up here")
    try:
        return grammars.compile(r.sampling.schema)
    except NotImplementedError as e:
        raise Unimplemented(f"request {r.id}: parameters.{e}") from None
    except ValueError as e:
        raise InvalidArgument(f"request {r.id}: parameters.{e}") from None


def _first_chunk(r: RequestSpec, prompt_len: int, limits: Limits, where: str) -> int:
    """chunk_len: at most this many prompt tokens (from cache_len on) are computed by this Prefill;
    None = all of them. An upper bound, not an exact count: a router that budgets a chunk on the whole
    prompt while its prefix cache supplies `cache_len` tokens asks for more than is left."""
    rest = prompt_len - r.cache_len
    if r.chunk_len is None:
        return rest
    if r.chunk_len < 1:
        raise InvalidArgument(f"{where}: chunk_len must be >= 1 when set, got {r.chunk_len}")
    if r.chunk_len < rest and not limits.chunking:
        raise FailedPrecondition(
            f"{where}: chunk_len {r.chunk_len} leaves {rest - r.chunk_len} prompt tokens for later "
            "steps, which are sized by Warmup's max_prefill_tokens: call Warmup first"
        )
    return min(r.chunk_len, rest)


def _input_ids(r: RequestSpec, limits: Limits, warmup: bool, where: str) -> list[int]:
    if r.input_ids:
        ids = list(r.input_ids)
    else:
        texts = []
        for chunk in r.input_chunks:
            if isinstance(chunk, ImageChunk):
                if warmup:
                    continue  # a text-only model ignores the router's warmup image
                raise InvalidArgument(
                    f"{where}: tokenized_inputs.input_chunks holds an image "
                    f"({chunk.mimetype or 'no mimetype'}); this model is text-only"
                )
            if isinstance(chunk, TextChunk):
                texts.append(chunk.text)
        text = "".join(texts) if r.input_chunks else r.inputs
        ids = limits.tokenizer(text).input_ids if text else []
    if r.truncate > 0 and len(ids) > r.truncate:
        ids = ids[-r.truncate :]
    return ids


def _check_generation(r: RequestSpec, prompt_len: int, limits: Limits, where: str) -> None:
    max_new = r.stopping.max_new_tokens
    if max_new < 1:
        raise InvalidArgument(f"{where}: stopping_parameters.max_new_tokens must be >= 1, got {max_new}")
    if prompt_len + max_new > limits.max_positions:
        raise InvalidArgument(
            f"{where}: prompt of {prompt_len} tokens + stopping_parameters.max_new_tokens {max_new} exceeds "
            f"the model's {limits.max_positions} positions"
        )
    try:
        validate_sampling_params(r.sampling)
    except NotImplementedError as e:
        raise Unimplemented(f"{where}: {e}") from None
    except ValueError as e:
        raise InvalidArgument(f"{where}: parameters.{e}") from None


def tracker(
    tokenizer, prompt: Sequence[int], stopping: StoppingParams, eos_ids, special_ids
) -> GenerationTracker:
    return GenerationTracker(tokenizer, prompt, stopping, eos_ids, special_ids)
