"""Domain types that cross between the gRPC layer (service.py) and the engine.

No protobuf below this line: service.py converts messages to these dataclasses and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    watermark: bool = False
    return_k_alternatives: int = 0
    schema: str | None = None


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int = 16
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class ImageChunk:
    data: bytes
    mimetype: str


@dataclass(frozen=True)
class RequestSpec:
    """One request of a Prefill/Warmup/Embed batch, as the router sent it."""

    id: int
    inputs: str = ""
    input_ids: tuple[int, ...] = ()  # tokenized_inputs.ids; used when non-empty
    input_chunks: tuple[TextChunk | ImageChunk, ...] = ()
    truncate: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    prefill_logprobs: bool = False
    adapter_index: int = 0
    # Router-allocation mode only.
    blocks: tuple[int, ...] = ()
    slots: tuple[int, ...] = ()
    cache_len: int = 0
    chunk_len: int | None = None


@dataclass(frozen=True)
class BatchSpec:
    id: int
    requests: tuple[RequestSpec, ...]
    max_tokens: int = 0
    max_blocks: int = 0


@dataclass(frozen=True)
class CachedBatchInfo:
    id: int
    request_ids: tuple[int, ...]
    max_tokens: int
    current_tokens: int

    @property
    def size(self) -> int:
        return len(self.request_ids)


class FinishReason(IntEnum):  # values are the wire enum's
    LENGTH = 0
    EOS_TOKEN = 1
    STOP_SEQUENCE = 2


@dataclass(frozen=True)
class AlternativeTokensOut:
    ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    texts: tuple[str, ...]


@dataclass(frozen=True)
class TokensOut:
    ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    texts: tuple[str, ...]
    is_special: tuple[bool, ...]
    alternatives: tuple[AlternativeTokensOut, ...] = ()


@dataclass(frozen=True)
class GeneratedTextOut:
    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int | None = None
    skipped_tokens: int = 0  # of generated_tokens, those that came as accepted speculative drafts


@dataclass(frozen=True)
class GenerationOut:
    request_id: int
    next_tokens: TokensOut
    prefill_tokens: TokensOut | None = None
    prefill_tokens_length: int = 0
    generated_text: GeneratedTextOut | None = None
    adapter_index: int = 0  # the request's (metrics label; not on the wire)


@dataclass(frozen=True)
class StepResult:
    generations: tuple[GenerationOut, ...]
    batch: CachedBatchInfo | None  # None once every request has finished


@dataclass(frozen=True)
class EngineStats:
    """Counts the engine reports for metrics (`ShardEngine.stats`, read on the model thread)."""

    free_blocks: int
    usable_blocks: int
    cached_batches: int
    computed_prefill_tokens: int  # totals since start (prefix reuse: since the last KV cache resize)
    reused_prefill_tokens: int
    resident_adapters: tuple[int, ...]  # adapter indices in device memory
    # Speculative decoding totals since start (0 when off): verify steps, of those the ones whose forward
    # a previous Decode had enqueued (the overlap), draft tokens verified and accepted.
    spec_steps: int = 0
    spec_lookahead_steps: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0


@dataclass(frozen=True)
class AdapterSpec:
    """AdapterParameters: one id, or several ids with weights and a merge strategy."""

    adapter_ids: tuple[str, ...]
    weights: tuple[float, ...] = ()
    merge_strategy: str = "linear"  # linear | ties | dare_linear | dare_ties
    density: float = 0.0
    majority_sign_method: str = "total"  # total | frequency
    source: str = "hub"  # hub | s3 | local | pbase
    api_token: str | None = None


@dataclass(frozen=True)
class ShardInfo:
    dtype: str
    device_type: str
    window_size: int | None
    block_size: int
    requires_block_allocator: bool
    chunked_prefill: bool
    preloaded_adapters: tuple[tuple[int, AdapterSpec], ...] = ()
    supports_generation: bool = True
    supports_embeddings: bool = True
    supports_classification: bool = False
    speculate: int = 0  # draft tokens verified per decode step (0: no speculative decoding)
